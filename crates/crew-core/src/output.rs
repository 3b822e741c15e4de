//! The output record: what crew hands back for every finished job.
//!
//! **API boundary:** the JSON form of [`Output`] is a public, versioned format
//! (`crew run --json`, and later the daemon's HTTP API). Fields may be added
//! in a minor version; removing or changing the meaning of one bumps
//! [`OUTPUT_FORMAT`]. README.md documents every field.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::job::JobId;
pub use crate::staging::StoredObject;
use crate::tags::Tags;

/// The version of the output record format, written in every record as `"v"`.
pub const OUTPUT_FORMAT: u32 = 1;

/// How a job ended. Every accepted job ends in exactly one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// Exit status 0 (or the builtin returned Ok).
    Succeeded,
    /// Non-zero exit, killed by a signal, or could not be started (bad
    /// program, bad cwd), after its retries.
    Failed,
    /// Ran past its timeout and was killed.
    TimedOut,
    /// A process of the job used up its CPU-time limit (`JobOptions::cpu`)
    /// and was killed. Final: not retried.
    CpuLimit,
    /// The job went past its memory limit (`JobOptions::memory`) and was
    /// killed, as far as the worker could tell (see the crew-exec crate). Final:
    /// not retried.
    MemoryLimit,
    /// Its worker died under it `crashes_max` times.
    Crashed,
    /// Cancelled by the user (or because the run was stopped).
    Cancelled,
    /// No worker that could run it could be launched within the relaunch
    /// budget.
    LaunchFailed,
}

impl Status {
    /// The lowercase name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::CpuLimit => "cpu_limit",
            Status::MemoryLimit => "memory_limit",
            Status::Crashed => "crashed",
            Status::Cancelled => "cancelled",
            Status::LaunchFailed => "launch_failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Captured stdout or stderr of a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Captured {
    /// The first bytes, up to the inline cap, as UTF-8 (invalid sequences
    /// replaced by U+FFFD).
    pub text: String,
    /// Total bytes written by the job.
    pub bytes: u64,
    /// True when `text` holds only the beginning; the whole stream is then in
    /// the store under `key`.
    pub truncated: bool,
    /// Store key of the whole stream, when it was too large to inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Captured {
    /// Nothing was written (what a job that prints nothing reports; the
    /// wire leaves it out).
    pub fn is_nothing(&self) -> bool {
        *self == Captured::default()
    }

    /// A stream whose first bytes are `text`, of `bytes` in all;
    /// `truncated` when `text` is only the beginning.
    pub fn inline(text: String, bytes: u64, truncated: bool) -> Self {
        Self { text, bytes, truncated, key: None }
    }
}

/// A point in time, serialized as an RFC 3339 UTC string with microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Self(SystemTime::now())
    }
}

// Human-readable formats (JSON) get RFC 3339; binary ones (the MessagePack
// wire) get microseconds since the epoch, which is cheaper to write per job.
impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(&humantime::format_rfc3339_micros(self.0))
        } else {
            let micros = self.0.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            s.serialize_u64(micros)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both forms whatever the format claims: rmp-serde's
        // deserializer calls itself human-readable while its serializer
        // does not.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or microseconds since the epoch")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Timestamp, E> {
                Ok(Timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timestamp, E> {
                humantime::parse_rfc3339(v).map(Timestamp).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

/// The record of one finished job (see README, "Output records").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Output {
    /// Format version, [`OUTPUT_FORMAT`].
    pub v: u32,
    /// The job's id.
    pub id: JobId,
    /// The job's name, if it had one.
    pub name: Option<String>,
    /// How it ended.
    pub status: Status,
    /// Exit code of the job's main process, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the main process, when it was killed.
    pub signal: Option<i32>,
    /// Why it did not succeed, in words (absent when it succeeded).
    pub error: Option<String>,
    /// Captured standard output.
    pub stdout: Captured,
    /// Captured standard error.
    pub stderr: Captured,
    /// When the last attempt started running on its worker.
    pub started: Option<Timestamp>,
    /// When the job ended.
    pub finished: Timestamp,
    /// Wall-clock seconds of the last attempt.
    pub wall_seconds: f64,
    /// CPU seconds (user + system) of the job's processes in the last attempt.
    pub cpu_seconds: f64,
    /// Peak resident set size of the job's largest process, in bytes.
    pub peak_rss_bytes: u64,
    /// The CPU limit that was reached, in seconds (status `cpu_limit`
    /// only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_seconds: Option<f64>,
    /// The memory limit that was reached, in bytes (status `memory_limit`
    /// only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// The slot the last attempt ran on.
    pub slot: Option<String>,
    /// The class of that slot.
    pub class: Option<String>,
    /// The attempt number of the last attempt (1 for the first run; 0 when it
    /// never started).
    pub attempt: u32,
    /// The job's seed, also exported to it as `CREW_SEED`.
    pub seed: u64,
    /// The job's tags.
    pub tags: Tags,
    /// The outputs the last attempt uploaded to the store (empty, and left
    /// out of the JSON, when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<StoredObject>,
}

impl Output {
    /// A record for a job that ended without (successfully) running on a
    /// worker: cancelled, crashed, launch_failed.
    pub fn without_run(id: JobId, name: Option<String>, tags: Tags, seed: u64, status: Status, error: String) -> Self {
        Self {
            v: OUTPUT_FORMAT,
            id,
            name,
            status,
            exit_code: None,
            signal: None,
            error: Some(error),
            stdout: Captured::default(),
            stderr: Captured::default(),
            started: None,
            finished: Timestamp::now(),
            wall_seconds: 0.0,
            cpu_seconds: 0.0,
            peak_rss_bytes: 0,
            cpu_limit_seconds: None,
            memory_limit_bytes: None,
            slot: None,
            class: None,
            attempt: 0,
            seed,
            tags,
            objects: Vec::new(),
        }
    }

    /// The record of job `id` (`spec`) from the result of its last
    /// attempt; the caller sets where it ran (`slot`, `class`, `attempt`)
    /// and its `seed`.
    pub fn from_result(id: JobId, spec: &crate::JobSpec, r: JobResult) -> Self {
        Self {
            v: OUTPUT_FORMAT,
            id,
            name: spec.name.clone(),
            status: r.status,
            exit_code: r.exit_code,
            signal: r.signal,
            error: r.error,
            stdout: r.stdout,
            stderr: r.stderr,
            started: Some(r.started),
            finished: r.finished,
            wall_seconds: r.wall_seconds,
            cpu_seconds: r.cpu_seconds,
            peak_rss_bytes: r.peak_rss_bytes,
            cpu_limit_seconds: (r.status == Status::CpuLimit)
                .then(|| spec.opts.cpu.map(|c| crate::job::cpu_limit_seconds(c) as f64))
                .flatten(),
            memory_limit_bytes: (r.status == Status::MemoryLimit).then_some(spec.opts.memory).flatten(),
            slot: None,
            class: None,
            attempt: 0,
            seed: 0,
            tags: spec.tags.clone(),
            objects: r.objects,
        }
    }

    /// True when the job succeeded.
    pub fn succeeded(&self) -> bool {
        self.status == Status::Succeeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_stable() {
        let mut o = Output::without_run(JobId(7), Some("a".into()), Tags::new(), 1, Status::Cancelled, "x".into());
        o.finished = Timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000));
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["id"], 7);
        assert_eq!(v["status"], "cancelled");
        assert_eq!(v["finished"], "1970-01-01T00:00:01.500000Z");
        assert_eq!(v["stdout"]["truncated"], false);
        let back: Output = serde_json::from_value(v).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn a_job_result_leaves_defaults_out_on_the_wire_and_reads_back_equal() {
        let t = Timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5));
        let bare = JobResult::new(Status::Succeeded, t, t);
        let mut full = JobResult::new(Status::Failed, t, t);
        full.exit_code = Some(2);
        full.signal = Some(9);
        full.error = Some("boom".into());
        full.stdout.text = "out".into();
        full.stdout.bytes = 3;
        full.stderr.truncated = true;
        full.wall_seconds = 1.5;
        full.cpu_seconds = 0.25;
        full.peak_rss_bytes = 1 << 20;
        for r in [bare.clone(), full] {
            let packed = rmp_serde::to_vec_named(&r).unwrap();
            assert_eq!(rmp_serde::from_slice::<JobResult>(&packed).unwrap(), r);
        }
        let keys = serde_json::to_value(&bare).unwrap().as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys, ["finished", "started", "status", "wall_seconds"]);
    }
}

/// What the agent reports for one attempt of a job. The controller adds the
/// job's identity, slot, class, attempt and seed to make an
/// [`crate::Output`]. On the wire, fields at their default are left out
/// (a no-op job's report is a few fields, not a dozen and two nested ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobResult {
    /// `Succeeded`, `Failed`, `TimedOut` or `Cancelled` (the agent never
    /// reports `Crashed` or `LaunchFailed`; the controller decides those).
    pub status: Status,
    /// Exit code of the main process, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that killed the main process, when it was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it did not succeed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Captured standard output.
    #[serde(default, skip_serializing_if = "Captured::is_nothing")]
    pub stdout: Captured,
    /// Captured standard error.
    #[serde(default, skip_serializing_if = "Captured::is_nothing")]
    pub stderr: Captured,
    /// When the attempt started.
    pub started: Timestamp,
    /// When it ended.
    pub finished: Timestamp,
    /// Wall-clock seconds.
    pub wall_seconds: f64,
    /// User + system CPU seconds of the job's processes.
    #[serde(default, skip_serializing_if = "is_zero_seconds")]
    pub cpu_seconds: f64,
    /// Peak resident set size of the largest process, in bytes.
    #[serde(default, skip_serializing_if = "is_zero_bytes")]
    pub peak_rss_bytes: u64,
    /// The outputs uploaded to the store (see [`crate::staging`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<StoredObject>,
}

fn is_zero_seconds(s: &f64) -> bool {
    *s == 0.0
}

fn is_zero_bytes(n: &u64) -> bool {
    *n == 0
}

impl JobResult {
    /// An attempt that ran from `started` to `finished` and ended
    /// `status`, with nothing captured, measured or uploaded yet.
    pub fn new(status: Status, started: Timestamp, finished: Timestamp) -> Self {
        Self {
            status,
            exit_code: None,
            signal: None,
            error: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            started,
            finished,
            wall_seconds: 0.0,
            cpu_seconds: 0.0,
            peak_rss_bytes: 0,
            objects: Vec::new(),
        }
    }
}
