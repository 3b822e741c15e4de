//! The journal: a durable record of what a controller accepted, so that a
//! restarted controller (the daemon after SIGKILL) loses nothing.
//!
//! It is an append-only file of JSON lines, one [`Record`] per line. Lines
//! are written in batches and made durable with `fdatasync` by
//! [`Journal::commit`], or by [`Journal::flush`] and an `fdatasync` of the
//! [`SyncHandle`] it returns, outside any lock (the daemon's group commit:
//! one `fdatasync` covers every record appended meanwhile). A daemon
//! acknowledges a request only once its records are durable: a job whose id
//! a client saw is on disk. A write is all or nothing: when one fails (a
//! full disk), what of it reached the file is cut off at once
//! ([`Journal::flush`]), so the file always ends with a whole record and
//! appending goes on once there is space again. Reading it back
//! ([`Journal::open`]) folds the
//! records into a [`Replay`]: the slots recruited, the jobs accepted and not
//! finished (with their history), the outputs finished and not received,
//! and the next job id. Replaying never panics: a torn last line (a crash in
//! the middle of a write) is dropped; a line that does not parse, or is
//! longer than [`MAX_RECORD`], is skipped and reported in
//! [`Replay::skipped`] (by line number), and the rest is recovered.
//!
//! Why an append-only log and not an embedded database: the access pattern
//! is exactly "append, and read everything once at start", records are
//! small, JSON lines can be inspected with standard tools, and it costs no
//! dependency. The file is compacted when opened (the replay is written back
//! as a fresh journal, atomically by rename), so it does not grow across
//! restarts, and by [`Journal::compact_if_grown`], which a long-lived daemon
//! calls after its commits: once the file has grown past a threshold and to
//! twice its size after the last compaction, it is read back and rewritten
//! on a thread of its own, so that its size stays within a constant factor
//! of the live state (jobs
//! not finished, outputs not received) and the cost of compacting is
//! amortized over the records written since.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crew_core::job::{JobId, JobSpec};
use crew_core::output::Output;
use crew_core::tags::Tags;
use crew_scheduler::{History, SlotFilter, SlotLimits};

/// One line of the journal. `S` and `O` are how a job's spec and an
/// output are held: parsed (the default: what a restart reads) or as their
/// JSON ([`RawSpec`], [`RawOutput`]: what a compaction reads, since it only
/// copies them).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record<S = JobSpec, O = Output> {
    /// Slots were recruited.
    Recruit {
        /// Their class.
        class: String,
        /// How many.
        count: u32,
        /// Their tags.
        tags: Tags,
        /// Their limits.
        limits: SlotLimits,
        /// Class options.
        #[serde(default)]
        options: BTreeMap<String, String>,
    },
    /// Slots were dismissed.
    Dismiss {
        /// Slots with these tags (all when absent).
        tags: Option<Tags>,
        /// Only this slot.
        slot: Option<String>,
    },
    /// Jobs were accepted. A large request is journaled as several
    /// records, written together: all but the last have `more`, and replay
    /// takes their jobs only once it reads the last, so that a request torn
    /// by a crash in the middle of its write is accepted in no part.
    Accepted {
        /// The jobs, with their ids.
        jobs: Vec<(JobId, S)>,
        /// More records of the same request follow.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// A job was sent to a worker (made durable by the next group commit,
    /// not before the job goes out: losing one only means a job that was
    /// running is not counted a crash).
    Assigned {
        /// The job.
        job: JobId,
        /// Its attempt number.
        attempt: u32,
        /// The slot it went to (absent in journals of older versions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<String>,
    },
    /// A job finished; its output waits to be received.
    Delivered {
        /// The output.
        output: Box<O>,
    },
    /// Outputs were received by a client (each is delivered once).
    Received {
        /// Their job ids.
        ids: Vec<JobId>,
    },
    /// A client asked to cancel these jobs (journaled before the
    /// controller acts): a restarted controller ends those not finished as
    /// cancelled instead of running them again.
    Cancel {
        /// Their job ids.
        ids: Vec<JobId>,
    },
    /// Jobs journaled as accepted that the controller then refused (it
    /// closed, or their tags became unsatisfiable in between): forgotten.
    Withdrawn {
        /// Their job ids.
        ids: Vec<JobId>,
    },
    /// A job not finished, with its history (written by compaction).
    Pending {
        /// The job.
        id: JobId,
        /// What it runs (boxed: the other records are small).
        spec: Box<S>,
        /// Attempts started.
        attempts: u32,
        /// Crashes suffered.
        crashes: u32,
        /// Failed runs retried.
        failures: u32,
        /// On a worker when the record was written.
        running: bool,
        /// A client asked to cancel it.
        #[serde(default)]
        cancelled: bool,
        /// The slot it was on, when `running`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<String>,
    },
    /// A worker connected for this slot (made durable with the next group
    /// commit): a restarted controller expects it back.
    Up {
        /// The slot.
        slot: String,
    },
    /// The slot's worker went away; without `slot`, every worker (a clean
    /// stop).
    Down {
        /// The slot, or all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<String>,
    },
    /// The id the next accepted job gets (written by compaction, so that a
    /// journal whose jobs were all received still never reuses an id).
    NextJob {
        /// That id.
        next: u64,
    },
}

impl<S, O> Record<S, O> {
    /// The same record with its specs (if any) made by `spec` and its
    /// output (if any) by `output`; the first error of either stops it.
    fn map<S2, O2, E>(
        self,
        mut spec: impl FnMut(S) -> Result<S2, E>,
        mut output: impl FnMut(O) -> Result<O2, E>,
    ) -> Result<Record<S2, O2>, E> {
        Ok(match self {
            Record::Accepted { jobs, more } => Record::Accepted {
                jobs: jobs.into_iter().map(|(id, s)| Ok((id, spec(s)?))).collect::<Result<_, E>>()?,
                more,
            },
            Record::Delivered { output: o } => Record::Delivered { output: Box::new(output(*o)?) },
            Record::Pending { id, spec: s, attempts, crashes, failures, running, cancelled, slot } => {
                Record::Pending { id, spec: Box::new(spec(*s)?), attempts, crashes, failures, running, cancelled, slot }
            }
            Record::Recruit { class, count, tags, limits, options } => {
                Record::Recruit { class, count, tags, limits, options }
            }
            Record::Dismiss { tags, slot } => Record::Dismiss { tags, slot },
            Record::Assigned { job, attempt, slot } => Record::Assigned { job, attempt, slot },
            Record::Received { ids } => Record::Received { ids },
            Record::Cancel { ids } => Record::Cancel { ids },
            Record::Withdrawn { ids } => Record::Withdrawn { ids },
            Record::Up { slot } => Record::Up { slot },
            Record::Down { slot } => Record::Down { slot },
            Record::NextJob { next } => Record::NextJob { next },
        })
    }
}

/// A recruit request as journaled.
#[derive(Clone, Debug, PartialEq)]
pub struct Recruited {
    /// The class.
    pub class: String,
    /// How many slots.
    pub count: u32,
    /// Their tags.
    pub tags: Tags,
    /// Their limits.
    pub limits: SlotLimits,
    /// Class options.
    pub options: BTreeMap<String, String>,
}

/// A job accepted and not finished.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingJob<S = JobSpec> {
    /// What it runs.
    pub spec: S,
    /// Its history so far.
    pub history: History,
    /// True when it was on a worker when the journal ends: it was running
    /// when the controller stopped, and a restarted controller counts that
    /// attempt as a crash.
    pub running: bool,
    /// A client asked to cancel it ([`Record::Cancel`]): a restarted
    /// controller ends it as cancelled.
    pub cancelled: bool,
    /// The slot it was last sent to (with `running`): a restarted
    /// controller holds it for that slot's worker to come back with it.
    pub slot: Option<String>,
}

/// What `replay` says besides jobs and outputs: its recruits, dismissals,
/// workers up and next job id.
fn meta_of<S, O>(replay: &Replay<S, O>) -> Replay<RawSpec, RawOutput> {
    Replay {
        recruits: replay.recruits.clone(),
        dismissed: replay.dismissed.clone(),
        up: replay.up.clone(),
        next_job: replay.next_job,
        ..Replay::default()
    }
}

/// A job's spec as the JSON the journal holds (see [`Record`]).
pub type RawSpec = Box<serde_json::value::RawValue>;

/// An output as the JSON the journal holds, with its job's id (see
/// [`Record`]). A compaction takes it from a `delivered` line as it is
/// written without checking it; a restart, which parses every output, is
/// what skips (and reports) one that is damaged.
#[derive(Clone, Debug)]
pub struct RawOutput {
    /// Its job.
    pub id: JobId,
    /// The output, as written.
    pub json: Box<str>,
}

impl<'de> Deserialize<'de> for RawOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let json = Box::<serde_json::value::RawValue>::deserialize(d)?;
        let id = output_id(json.get().as_bytes()).map_err(serde::de::Error::custom)?;
        Ok(Self { id, json: json.into() })
    }
}

/// The job id of an output's JSON as outputs are written: right after
/// `{"v":N,"id":`.
fn output_id_direct(json: &[u8]) -> Option<JobId> {
    let rest = json.strip_prefix(br#"{"v":"#)?;
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_digit())?..];
    let digits = rest.strip_prefix(br#","id":"#)?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || !matches!(digits[end], b',' | b'}') {
        return None;
    }
    std::str::from_utf8(&digits[..end]).ok()?.parse::<u64>().ok().map(JobId)
}

/// The job id of an output's JSON: read straight ([`output_id_direct`]),
/// or else by a parse that skips the other fields.
fn output_id(json: &[u8]) -> Result<JobId, serde_json::Error> {
    match output_id_direct(json) {
        Some(id) => Ok(id),
        None => {
            #[derive(Deserialize)]
            struct Id {
                id: JobId,
            }
            serde_json::from_slice::<Id>(json).map(|o| o.id)
        }
    }
}

/// What a replay needs of an output: its job, and its JSON to write back.
pub trait Delivery {
    /// The output's job.
    fn job(&self) -> JobId;
    /// Writes the output as JSON.
    fn write_json(&self, w: &mut dyn Write) -> std::io::Result<()>;
}

impl Delivery for Output {
    fn job(&self) -> JobId {
        self.id
    }

    fn write_json(&self, w: &mut dyn Write) -> std::io::Result<()> {
        serde_json::to_writer(w, self).map_err(std::io::Error::other)
    }
}

impl Delivery for RawOutput {
    fn job(&self) -> JobId {
        self.id
    }

    fn write_json(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(self.json.as_bytes())
    }
}

/// How a `delivered` line starts, as this code writes it.
const DELIVERED_HEAD: &[u8] = br#"{"t":"delivered","output":"#;

/// Most jobs in one `accepted` record a compaction writes.
const ACCEPTED_PER_RECORD: usize = 4096;

/// The state a journal describes (specs and outputs held as `S` and `O`,
/// see [`Record`]).
#[derive(Clone, Debug)]
pub struct Replay<S = JobSpec, O = Output> {
    /// Recruit requests, in order (dismissals already applied as filters in
    /// `dismissed`).
    pub recruits: Vec<Recruited>,
    /// Dismiss requests, in order, to apply after the recruits.
    pub dismissed: Vec<SlotFilter>,
    /// Jobs accepted and not finished, by id.
    pub pending: BTreeMap<JobId, PendingJob<S>>,
    /// Outputs finished and not yet received, in the order they finished.
    pub ready: VecDeque<O>,
    /// The id the next accepted job gets.
    pub next_job: u64,
    /// Slots whose worker was connected when the journal ends.
    pub up: std::collections::BTreeSet<String>,
    /// Lines that were skipped (damaged, or longer than [`MAX_RECORD`]):
    /// `line N: reason`, for the log. Empty for a sound journal.
    pub skipped: Vec<String>,
    /// How many outputs of `ready` have each id, kept by [`Replay::apply`]
    /// so that a [`Record::Received`] takes what it names without a pass
    /// over every output waiting (see [`Replay::receive`]); rebuilt when
    /// `ready` changed length behind its back.
    ready_ids: HashMap<JobId, usize>,
    /// The sum of `ready_ids`: `ready.len()` unless `ready` was changed
    /// other than by [`Replay::apply`].
    ready_counted: usize,
    /// Outputs looked at by the passes of [`Replay::receive`] over `ready`.
    #[cfg(test)]
    scanned: usize,
    /// Jobs of an `accepted` request whose last record is not read yet
    /// (`more`); dropped if the journal ends first.
    accepting: Vec<(JobId, S)>,
}

impl<S, O> Default for Replay<S, O> {
    fn default() -> Self {
        Self {
            recruits: Vec::new(),
            dismissed: Vec::new(),
            pending: BTreeMap::new(),
            ready: VecDeque::new(),
            next_job: 0,
            up: std::collections::BTreeSet::new(),
            skipped: Vec::new(),
            ready_ids: HashMap::new(),
            ready_counted: 0,
            #[cfg(test)]
            scanned: 0,
            accepting: Vec::new(),
        }
    }
}

impl Replay {
    /// The state that journal text rebuilds, read exactly as
    /// [`Journal::open`] reads a journal file: damaged or over-long lines
    /// are skipped and noted in [`Replay::skipped`], a torn last line is
    /// dropped. For tools and the fuzz targets; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Replay {
        let mut replay = Replay::default();
        // Reading from memory has no I/O to fail.
        if let Err(e) = read_into(Path::new("<memory>"), bytes, &mut replay) {
            replay.skipped.push(e.to_string());
        }
        replay
    }
}

impl<S, O: Delivery> Replay<S, O> {
    /// Folds one record into the state.
    pub fn apply(&mut self, record: Record<S, O>) {
        match record {
            Record::Recruit { class, count, tags, limits, options } => {
                self.recruits.push(Recruited { class, count, tags, limits, options });
            }
            Record::Dismiss { tags, slot } => self.dismissed.push(SlotFilter { tags, slot }),
            Record::Accepted { jobs, more } => {
                self.accepting.extend(jobs);
                if more {
                    if let Some((id, _)) = self.accepting.last() {
                        self.next_job = self.next_job.max(id.0.saturating_add(1));
                    }
                    return;
                }
                for (id, spec) in std::mem::take(&mut self.accepting) {
                    self.next_job = self.next_job.max(id.0.saturating_add(1));
                    let job =
                        PendingJob { spec, history: History::default(), running: false, cancelled: false, slot: None };
                    self.pending.insert(id, job);
                }
            }
            Record::Assigned { job, attempt, slot } => {
                // Crashes in between are not inferred (a retry after a
                // failure looks the same); the restart itself counts one for
                // a job left running (see `PendingJob::running`).
                if let Some(p) = self.pending.get_mut(&job) {
                    if attempt >= p.history.attempts {
                        p.slot = slot;
                    }
                    p.history.attempts = p.history.attempts.max(attempt);
                    p.running = true;
                }
            }
            Record::Delivered { output } => {
                let id = output.job();
                self.pending.remove(&id);
                self.next_job = self.next_job.max(id.0.saturating_add(1));
                self.index_ready();
                *self.ready_ids.entry(id).or_default() += 1;
                self.ready_counted += 1;
                self.ready.push_back(*output);
            }
            Record::Received { ids } => self.receive(ids),
            Record::Cancel { ids } => {
                for id in ids {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.cancelled = true;
                    }
                }
            }
            Record::Withdrawn { ids } => {
                for id in ids {
                    self.pending.remove(&id);
                }
            }
            Record::Pending { id, spec, attempts, crashes, failures, running, cancelled, slot } => {
                self.next_job = self.next_job.max(id.0.saturating_add(1));
                let history = History { attempts, crashes, failures };
                self.pending.insert(id, PendingJob { spec: *spec, history, running, cancelled, slot });
            }
            Record::NextJob { next } => self.next_job = self.next_job.max(next),
            Record::Up { slot } => {
                self.up.insert(slot);
            }
            Record::Down { slot: Some(slot) } => {
                self.up.remove(&slot);
            }
            Record::Down { slot: None } => self.up.clear(),
        }
    }

    /// Removes every ready output with one of `ids`. A client that takes
    /// the oldest output (`crew receive`, one at a time) leaves a record per
    /// output naming the front of `ready`: those come off the front, so that
    /// replaying n of them costs O(n), not a pass over the outputs still
    /// waiting for each (O(n²): minutes for a backlog of 10⁵ outputs). Only
    /// ids still in `ready` after that (a client that chose outputs by id or
    /// name) cost a pass, as they cost the daemon when it served them.
    fn receive(&mut self, ids: Vec<JobId>) {
        self.index_ready();
        let ids: HashSet<JobId> = ids.into_iter().filter(|id| self.ready_ids.contains_key(id)).collect();
        while let Some(front) = self.ready.front() {
            let id = front.job();
            if !ids.contains(&id) {
                break;
            }
            self.ready.pop_front();
            self.forget_ready(id);
        }
        if !ids.iter().any(|id| self.ready_ids.contains_key(id)) {
            return;
        }
        #[cfg(test)]
        {
            self.scanned += self.ready.len();
        }
        let mut gone = Vec::new();
        self.ready.retain(|o| {
            let keep = !ids.contains(&o.job());
            if !keep {
                gone.push(o.job());
            }
            keep
        });
        for id in gone {
            self.forget_ready(id);
        }
    }

    /// Rebuilds the count of ready ids when `ready` was changed other than
    /// by [`Replay::apply`] (its length no longer matches).
    fn index_ready(&mut self) {
        if self.ready_counted != self.ready.len() {
            self.ready_ids.clear();
            for o in &self.ready {
                *self.ready_ids.entry(o.job()).or_default() += 1;
            }
            self.ready_counted = self.ready.len();
        }
    }

    fn forget_ready(&mut self, id: JobId) {
        if let Some(n) = self.ready_ids.get_mut(&id) {
            *n -= 1;
            self.ready_counted -= 1;
            if *n == 0 {
                self.ready_ids.remove(&id);
            }
        }
    }

    /// The records that rebuild this state (what compaction writes).
    pub fn records(&self) -> Vec<Record<S, O>>
    where
        S: Clone,
        O: Clone,
    {
        let mut out = vec![Record::NextJob { next: self.next_job }];
        for r in &self.recruits {
            out.push(Record::Recruit {
                class: r.class.clone(),
                count: r.count,
                tags: r.tags.clone(),
                limits: r.limits.clone(),
                options: r.options.clone(),
            });
        }
        for f in &self.dismissed {
            out.push(Record::Dismiss { tags: f.tags.clone(), slot: f.slot.clone() });
        }
        for (id, p) in &self.pending {
            out.push(Record::Pending {
                id: *id,
                spec: Box::new(p.spec.clone()),
                attempts: p.history.attempts,
                crashes: p.history.crashes,
                failures: p.history.failures,
                running: p.running,
                cancelled: p.cancelled,
                slot: p.slot.clone(),
            });
        }
        for o in &self.ready {
            out.push(Record::Delivered { output: Box::new(o.clone()) });
        }
        for slot in &self.up {
            out.push(Record::Up { slot: slot.clone() });
        }
        out
    }
}

impl<S: Serialize, O: Delivery> Replay<S, O> {
    /// Writes records that rebuild this state, one a line, without copying
    /// the jobs and the outputs to build them: those of [`Replay::records`],
    /// but for jobs never started, written as `accepted` records of many
    /// jobs each (smaller than a `pending` record each, and read back the
    /// same).
    fn write_state(&self, w: &mut impl Write) -> std::io::Result<()> {
        #[derive(Serialize)]
        #[serde(tag = "t", rename = "pending")]
        struct PendingRef<'a, S> {
            id: JobId,
            spec: &'a S,
            attempts: u32,
            crashes: u32,
            failures: u32,
            running: bool,
            cancelled: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            slot: Option<&'a str>,
        }
        #[derive(Serialize)]
        #[serde(tag = "t", rename = "accepted")]
        struct AcceptedRef<'a, S> {
            jobs: &'a [(JobId, &'a S)],
        }
        fn line(w: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
            serde_json::to_writer(&mut *w, value).map_err(std::io::Error::other)?;
            w.write_all(b"\n")
        }
        // Records that hold no job nor output: `()` for both.
        line(w, &Record::<(), ()>::NextJob { next: self.next_job })?;
        for r in &self.recruits {
            line(
                w,
                &Record::<(), ()>::Recruit {
                    class: r.class.clone(),
                    count: r.count,
                    tags: r.tags.clone(),
                    limits: r.limits.clone(),
                    options: r.options.clone(),
                },
            )?;
        }
        for f in &self.dismissed {
            line(w, &Record::<(), ()>::Dismiss { tags: f.tags.clone(), slot: f.slot.clone() })?;
        }
        let mut fresh: Vec<(JobId, &S)> = Vec::new();
        for (id, p) in &self.pending {
            let started = p.history != History::default() || p.running || p.cancelled || p.slot.is_some();
            if !started {
                fresh.push((*id, &p.spec));
                if fresh.len() == ACCEPTED_PER_RECORD {
                    line(w, &AcceptedRef { jobs: &fresh })?;
                    fresh.clear();
                }
                continue;
            }
            line(
                w,
                &PendingRef {
                    id: *id,
                    spec: &p.spec,
                    attempts: p.history.attempts,
                    crashes: p.history.crashes,
                    failures: p.history.failures,
                    running: p.running,
                    cancelled: p.cancelled,
                    slot: p.slot.as_deref(),
                },
            )?;
        }
        if !fresh.is_empty() {
            line(w, &AcceptedRef { jobs: &fresh })?;
        }
        for o in &self.ready {
            w.write_all(DELIVERED_HEAD)?;
            o.write_json(w)?;
            w.write_all(b"}\n")?;
        }
        for slot in &self.up {
            line(w, &Record::<(), ()>::Up { slot: slot.clone() })?;
        }
        Ok(())
    }
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl JournalError {
    /// True when the write failed for want of space (`ENOSPC`, or a
    /// quota): the records were cut back and the journal goes on; freeing
    /// space is the fix.
    pub fn is_disk_full(&self) -> bool {
        match self {
            JournalError::Io { source, .. } => is_disk_full(source),
        }
    }
}

/// Whether an I/O error means the file system (or the user's quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// The longest line replay reads as a record; a longer one is skipped
/// (and reported) without being held in memory. Records are far smaller:
/// the largest, an `accepted` batch, is bounded by the daemon's request
/// body limit (64 MiB) and its JSON.
pub const MAX_RECORD: usize = 256 * 1024 * 1024;

/// A descriptor of the journal's current file, for an `fdatasync` outside
/// the journal's lock (see [`Journal::flush`]).
pub type SyncHandle = std::sync::Arc<File>;

/// The most memory the append buffers keep between writes.
const RETAINED: usize = 1024 * 1024;

/// The size a journal may reach before [`Journal::compact_if_grown`]
/// compacts it, by default.
pub const COMPACT_AFTER: u64 = 64 * 1024 * 1024;

/// An open journal, appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The file, written at explicit offsets (never past `written`).
    file: File,
    /// Records appended and not yet written to the file.
    pending: Vec<u8>,
    /// The length of the file's whole records: where the next write goes,
    /// and where a failed one is cut back to.
    written: u64,
    /// The same file, for `fdatasync` without the journal's lock.
    sync: SyncHandle,
    /// Records appended since the last commit or flush.
    dirty: bool,
    /// Records flushed to the file but perhaps not synced (a flush whose
    /// sync failed, or is in progress elsewhere).
    unsynced: bool,
    /// The file's size, counting buffered records.
    size: u64,
    /// A reused serialization buffer.
    line: Vec<u8>,
    /// The file's size after the last compaction.
    base: u64,
    /// Bytes of `accepted` records appended since the last compaction:
    /// they describe jobs that are (mostly) still waiting, so they do not
    /// count toward the thresholds. A compaction right after a large send
    /// would read it back and write it again, as large, holding a second
    /// copy of every job in memory meanwhile.
    accepted: u64,
    /// The size below which the file is never compacted.
    compact_after: u64,
    /// A compaction in progress on a thread of its own.
    compaction: Option<Compaction>,
    /// A compaction was asked for whatever the thresholds
    /// ([`Journal::mark_idle`]).
    wanted: bool,
    /// What the journal describes besides jobs and outputs (recruits,
    /// dismissals, workers up, the next job id), kept from what was
    /// appended: all a checkpoint writes.
    meta: Replay<RawSpec, RawOutput>,
    /// How many records about jobs or outputs were appended (anything but
    /// what `meta` keeps); a checkpoint is void when one came after the
    /// caller said the state was empty.
    job_records: u64,
    /// `job_records` when the caller said the state was empty
    /// ([`Journal::mark_idle`]), and the mark's number.
    idle: Option<(u64, u64)>,
    /// A write failed and was cut back since the journal was opened: the
    /// records it dropped (a recruit, a dismissal) may still be in `meta`,
    /// so no checkpoint is written from it (compactions read the file).
    meta_inexact: bool,
    /// Marks handed out by [`Journal::mark_idle`].
    marks: u64,
    /// The last mark that was settled: its checkpoint written, or found
    /// void (a compaction is due instead).
    settled: u64,
}

/// The size from which [`Journal::mark_idle`] compacts a journal (a
/// smaller one is left alone).
pub const COMPACT_SOON_AFTER: u64 = 1024 * 1024;

/// A compaction in progress: a thread reads the journal up to `offset`
/// (whole, committed lines) and writes what it describes to the
/// `.compacting` file; records appended meanwhile are copied after it when
/// it is installed.
#[derive(Debug)]
struct Compaction {
    offset: u64,
    done: std::sync::mpsc::Receiver<Result<File, JournalError>>,
    /// A checkpoint replaced the journal meanwhile: the compaction's file
    /// is removed once it is done, never installed.
    abandoned: bool,
    /// Set when abandoned: the thread stops reading (its answer is an
    /// error) rather than read and write a large journal for nothing.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A reader that fails once `stop` is set (an abandoned compaction).
struct Stoppable<R> {
    inner: R,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for Stoppable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("the compaction was abandoned for a checkpoint"));
        }
        self.inner.read(buf)
    }
}

/// Where a compacted journal is written before it replaces the journal.
fn compacting_path(path: &Path) -> PathBuf {
    path.with_extension("compacting")
}

/// Where a checkpoint is written before it replaces the journal (not the
/// compaction's file: one may still be writing that).
fn checkpoint_path(path: &Path) -> PathBuf {
    path.with_extension("checkpoint")
}

/// Writes the records of `replay` to `to` (the `.compacting` or
/// `.checkpoint` file next to `path`), durably; returns it, open for
/// appending at its end.
fn write_compacted<S: Serialize, O: Delivery>(
    path: &Path,
    to: &Path,
    replay: &Replay<S, O>,
) -> Result<File, JournalError> {
    let written = write_compacted_file(path, to, replay);
    if written.is_err() {
        // A part-written copy must not keep the space (a full disk).
        let _ = std::fs::remove_file(to);
    }
    written
}

fn write_compacted_file<S: Serialize, O: Delivery>(
    path: &Path,
    to: &Path,
    replay: &Replay<S, O>,
) -> Result<File, JournalError> {
    let io = |source| JournalError::Io { path: path.to_path_buf(), source };
    // Private (0600): jobs' command lines and environments are in it. The
    // mode is set explicitly too, since a file left by an older version
    // keeps its own on open.
    let file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(to).map_err(io)?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)?;
    let mut w = BufWriter::with_capacity(256 * 1024, file);
    replay.write_state(&mut w).map_err(io)?;
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_data().map_err(io)?;
    Ok(file)
}

impl Journal {
    /// Opens (or creates) the journal at `path`, reads it back, and compacts
    /// it. Returns the journal, ready to append, and the state it held.
    pub fn open(path: impl AsRef<Path>) -> Result<(Self, Replay), JournalError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| JournalError::Io { path: path.clone(), source };
        let mut replay = Replay { next_job: 1, ..Replay::default() };
        match File::open(&path) {
            Ok(file) => read_into(&path, file, &mut replay)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // A checkpoint a crash cut short, before its rename (a compaction's
        // file is written over by `rewrite`).
        let _ = std::fs::remove_file(checkpoint_path(&path));
        let journal = Self::rewrite(&path, &replay)?;
        Ok((journal, replay))
    }

    /// Writes `replay` as a fresh journal next to `path` and renames it over
    /// `path` (atomic), then opens it for appending.
    fn rewrite(path: &Path, replay: &Replay) -> Result<Self, JournalError> {
        let to = compacting_path(path);
        let file = write_compacted(path, &to, replay)?;
        let mut journal = Self::install(path, &to, file)?;
        journal.meta = meta_of(replay);
        Ok(journal)
    }

    /// Renames the compacted file `file` (at `from`: [`compacting_path`] or
    /// [`checkpoint_path`]) over `path` and appends to it from now on. The
    /// descriptor follows the file, so nothing can fail between the rename
    /// and the switch (which would leave appends going to the replaced
    /// file). What the journal describes besides jobs (`meta`) is the
    /// caller's to carry over.
    fn install(path: &Path, from: &Path, file: File) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let base = file.metadata().map_err(io)?.len();
        // Everything that can fail comes before the rename: once the new
        // file is in place, the caller must append to it (appends to the
        // replaced file would be durable in a file no restart reads).
        let sync = std::sync::Arc::new(file.try_clone().map_err(io)?);
        std::fs::rename(from, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            // Make the rename itself durable.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
            written: base,
            sync,
            dirty: false,
            unsynced: false,
            size: base,
            line: Vec::new(),
            base,
            accepted: 0,
            compact_after: COMPACT_AFTER,
            compaction: None,
            wanted: false,
            meta: Replay { next_job: 1, ..Replay::default() },
            job_records: 0,
            idle: None,
            meta_inexact: false,
            marks: 0,
            settled: 0,
        })
    }

    /// A journal that replaced this one (a compaction or a checkpoint
    /// installed): it goes on with this one's settings and with what it
    /// knows besides jobs, which neither changes.
    fn succeeded_by(&mut self, mut fresh: Self) {
        fresh.compact_after = self.compact_after;
        fresh.wanted = self.wanted;
        fresh.meta = std::mem::take(&mut self.meta);
        fresh.job_records = self.job_records;
        fresh.idle = self.idle;
        fresh.meta_inexact = self.meta_inexact;
        fresh.marks = self.marks;
        fresh.settled = self.settled;
        *self = fresh;
    }

    /// Sets the size below which [`Journal::compact_if_grown`] leaves the
    /// file alone (default [`COMPACT_AFTER`]).
    pub fn set_compact_after(&mut self, bytes: u64) {
        self.compact_after = bytes;
    }

    /// Commits, then keeps the file within a factor of what it describes:
    /// once it is larger than the threshold and than twice its size after
    /// the last compaction, a thread reads it back and writes what it
    /// describes (as a restart would) to a new file; a later call, when
    /// that is done, copies the records appended meanwhile after it and
    /// puts it in the journal's place. Only that copy and the rename happen
    /// in the caller, so a daemon is not held up by a large journal. Returns
    /// whether a compaction was installed. On an error the journal goes on
    /// as it is (appending works) and the next attempt waits until the file
    /// doubled again.
    pub fn compact_if_grown(&mut self) -> Result<bool, JournalError> {
        self.commit()?;
        if let Some((at, mark)) = self.idle.take() {
            self.settled = mark;
            if at == self.job_records && self.size >= COMPACT_SOON_AFTER && !self.meta_inexact {
                // Nothing about jobs was appended since the caller found
                // its state empty: what is left is `meta`. On a failure the
                // compaction asked for with the mark (`wanted`) goes on.
                match self.checkpoint() {
                    Ok(()) => return Ok(true),
                    Err(e) => tracing::warn!("cannot write the journal's checkpoint (it is compacted instead): {e}"),
                }
            }
        }
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let size = self.file.metadata().map_err(io)?.len();
        if let Some(c) = &self.compaction {
            let result = match c.done.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(false),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Err(io(std::io::Error::other("the compaction thread ended without an answer")))
                }
                Ok(compacted) if c.abandoned => {
                    // A checkpoint took its place: its file goes (a failed
                    // one removed its own).
                    if compacted.is_ok() {
                        let _ = std::fs::remove_file(compacting_path(&self.path));
                    }
                    self.compaction = None;
                    return Ok(false);
                }
                Ok(compacted) => compacted.and_then(|file| self.install_compacted(file, c.offset)),
            };
            self.compaction = None;
            return match result {
                Ok(fresh) => {
                    // Asked for while this one ran (it may not have seen
                    // the records that made the state empty): still due.
                    self.succeeded_by(fresh);
                    Ok(true)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(compacting_path(&self.path));
                    self.base = size;
                    Err(e)
                }
            };
        }
        let soon = self.wanted && size >= COMPACT_SOON_AFTER;
        let grown = size.saturating_sub(self.accepted);
        if grown < self.compact_after.max(self.base.saturating_mul(2)) && !soon {
            return Ok(false);
        }
        self.wanted = false;
        let (tx, rx) = std::sync::mpsc::channel();
        let path = self.path.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let spawned = std::thread::Builder::new().name("crew-journal-compaction".into()).spawn(move || {
            let compacted = (|| {
                let io = |source| JournalError::Io { path: path.clone(), source };
                // Specs and outputs are only copied: kept as their JSON.
                let mut replay = Replay::<RawSpec, RawOutput> { next_job: 1, ..Replay::default() };
                // Only what was committed when it started: whole lines.
                let prefix =
                    Stoppable { inner: std::io::Read::take(File::open(&path).map_err(io)?, size), stop: stopped };
                read_into_limited(&path, prefix, &mut replay, MAX_RECORD, parse_raw_record)?;
                write_compacted(&path, &compacting_path(&path), &replay)
            })();
            let _ = tx.send(compacted);
        });
        match spawned {
            Ok(_) => {
                self.compaction = Some(Compaction { offset: size, done: rx, abandoned: false, stop });
                Ok(false)
            }
            Err(e) => {
                self.base = size;
                Err(io(e))
            }
        }
    }

    /// Copies what was appended after `offset` to the compacted `file`,
    /// makes it durable and puts it in the journal's place.
    fn install_compacted(&self, mut file: File, offset: u64) -> Result<Self, JournalError> {
        use std::io::{Seek, SeekFrom};
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let mut old = File::open(&self.path).map_err(io)?;
        old.seek(SeekFrom::Start(offset)).map_err(io)?;
        std::io::copy(&mut old, &mut file).map_err(io)?;
        file.sync_data().map_err(io)?;
        Self::install(&self.path, &compacting_path(&self.path), file)
    }

    /// Replaces the journal with the records of `meta` alone (the caller's
    /// state holds no job and no output: [`Journal::mark_idle`]), written
    /// from memory: a few records, where a compaction would read the whole
    /// file back. A compaction running meanwhile is abandoned.
    fn checkpoint(&mut self) -> Result<(), JournalError> {
        let to = checkpoint_path(&self.path);
        let file = write_compacted(&self.path, &to, &self.meta)?;
        let fresh = Self::install(&self.path, &to, file).inspect_err(|_| {
            let _ = std::fs::remove_file(&to);
        })?;
        let running = self.compaction.take().map(|c| {
            c.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            Compaction { abandoned: true, ..c }
        });
        self.succeeded_by(fresh);
        self.compaction = running;
        self.wanted = false;
        Ok(())
    }

    /// Waits for a compaction in progress and installs it (tests, and a
    /// daemon that wants a small journal before it stops).
    pub fn finish_compaction(&mut self) -> Result<bool, JournalError> {
        if let Some(c) = &self.compaction {
            // Block until the thread answered; the answer stays in the
            // channel for compact_if_grown.
            let answer = c.done.recv();
            let (tx, rx) = std::sync::mpsc::channel();
            if let Ok(a) = answer {
                let _ = tx.send(a);
            }
            let (offset, abandoned, stop) = (c.offset, c.abandoned, c.stop.clone());
            self.compaction = Some(Compaction { offset, done: rx, abandoned, stop });
            return self.compact_if_grown();
        }
        Ok(false)
    }

    /// Appends a record (buffered in memory: no I/O; durable after
    /// [`Journal::commit`], or after [`Journal::flush`] and a sync of its
    /// handle). Fails only if the record cannot be serialized, and then
    /// appends nothing.
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        self.line.clear();
        write_record(&mut self.line, record).map_err(|source| JournalError::Io { path: self.path.clone(), source })?;
        self.note(record);
        self.dirty = true;
        self.size += self.line.len() as u64;
        self.pending.extend_from_slice(&self.line);
        Ok(())
    }

    /// Appends a [`Record::Assigned`] for each of `jobs` (with its attempt),
    /// all sent to the slot `slot`, written straight from them.
    pub fn append_assigned(&mut self, slot: &str, jobs: &[(JobId, u32)]) -> Result<(), JournalError> {
        #[derive(Serialize)]
        #[serde(tag = "t", rename = "assigned")]
        struct AssignedRef<'a> {
            job: JobId,
            attempt: u32,
            slot: &'a str,
        }
        let start = self.pending.len();
        for &(job, attempt) in jobs {
            if let Err(e) = serde_json::to_writer(&mut self.pending, &AssignedRef { job, attempt, slot }) {
                self.pending.truncate(start);
                return Err(JournalError::Io { path: self.path.clone(), source: std::io::Error::other(e) });
            }
            self.pending.push(b'\n');
        }
        self.job_records += 1;
        self.dirty = true;
        self.size += (self.pending.len() - start) as u64;
        Ok(())
    }

    /// Appends the [`Record::Accepted`] records of one send: jobs `ids`
    /// and `specs` (as many), `per_record` a record, all but the last
    /// marked `more`, so that replay takes them together or not at all.
    /// Serialized from the jobs themselves, without a copy of every job to
    /// build the records first. All or nothing, like [`Journal::append`].
    pub fn append_accepted(&mut self, ids: &[JobId], specs: &[JobSpec], per_record: usize) -> Result<(), JournalError> {
        #[derive(Serialize)]
        #[serde(tag = "t", rename = "accepted")]
        struct AcceptedRef<'a> {
            jobs: &'a [(JobId, &'a JobSpec)],
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            more: bool,
        }
        let per_record = per_record.max(1);
        let records = ids.len().min(specs.len()).div_ceil(per_record).max(1);
        let start = self.pending.len();
        let mut jobs: Vec<(JobId, &JobSpec)> = Vec::with_capacity(per_record.min(ids.len()));
        for i in 0..records {
            let range = i * per_record..((i + 1) * per_record).min(ids.len()).min(specs.len());
            jobs.clear();
            jobs.extend(ids[range.clone()].iter().copied().zip(&specs[range]));
            let more = i + 1 < records;
            if let Err(e) = serde_json::to_writer(&mut self.pending, &AcceptedRef { jobs: &jobs, more }) {
                self.pending.truncate(start);
                return Err(JournalError::Io { path: self.path.clone(), source: std::io::Error::other(e) });
            }
            self.pending.push(b'\n');
        }
        self.job_records += 1;
        if let Some(last) = ids.iter().max() {
            self.meta.next_job = self.meta.next_job.max(last.0.saturating_add(1));
        }
        self.dirty = true;
        self.size += (self.pending.len() - start) as u64;
        self.accepted += (self.pending.len() - start) as u64;
        Ok(())
    }

    /// Keeps what `record` says besides jobs and outputs in `meta`, and
    /// counts a record about jobs.
    fn note(&mut self, record: &Record) {
        let last = match record {
            Record::Recruit { .. }
            | Record::Dismiss { .. }
            | Record::Up { .. }
            | Record::Down { .. }
            | Record::NextJob { .. } => {
                // Neither a spec nor an output in these: nothing to make.
                if let Ok(kept) = record.clone().map(|_| Err(()), |_| Err(())) {
                    self.meta.apply(kept);
                }
                return;
            }
            Record::Accepted { jobs, .. } => jobs.iter().map(|(id, _)| *id).max(),
            Record::Pending { id, .. } => Some(*id),
            Record::Delivered { output } => Some(output.id),
            Record::Assigned { .. } | Record::Received { .. } | Record::Cancel { .. } | Record::Withdrawn { .. } => {
                None
            }
        };
        if let Some(id) = last {
            self.meta.next_job = self.meta.next_job.max(id.0.saturating_add(1));
        }
        self.job_records += 1;
    }

    /// Appends a [`Record::Delivered`] whose output is already serialized
    /// (`output_json`: the JSON of an [`Output`], as `serde_json` writes
    /// it), so that a caller that needs those bytes anyway does not pay for
    /// a second serialization. Like [`Journal::append`], buffered.
    pub fn append_delivered(&mut self, output_json: &[u8]) {
        let len = DELIVERED_HEAD.len() + output_json.len() + 2;
        self.pending.reserve(len);
        self.pending.extend_from_slice(DELIVERED_HEAD);
        self.pending.extend_from_slice(output_json);
        self.pending.extend_from_slice(b"}\n");
        self.job_records += 1;
        self.dirty = true;
        self.size += len as u64;
    }

    /// Makes every appended record durable (write + fdatasync).
    pub fn commit(&mut self) -> Result<(), JournalError> {
        if let Some(handle) = self.flush()? {
            handle.sync_data().map_err(|source| JournalError::Io { path: self.path.clone(), source })?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Writes the appended records to the file (no sync) and returns a
    /// handle whose `sync_data` makes them durable, or `None` when there is
    /// nothing to sync. The caller syncs outside its lock (a group commit:
    /// records appended meanwhile wait for the next one), then calls
    /// [`Journal::synced`] if that sync succeeded. Should the journal's
    /// file be replaced in between (compaction), the records were copied to
    /// the new file and made durable there first.
    ///
    /// All or nothing: when the write fails (a full disk:
    /// [`JournalError::is_disk_full`]), whatever part of it reached the
    /// file is cut off again and every record appended since the last
    /// flush is dropped, so the file ends with the last whole record
    /// written before, and later appends go on from there.
    pub fn flush(&mut self) -> Result<Option<SyncHandle>, JournalError> {
        if !self.dirty && !self.unsynced {
            return Ok(None);
        }
        if !self.pending.is_empty() {
            if let Err(source) = self.file.write_all_at(&self.pending, self.written) {
                self.pending.clear();
                self.dirty = false;
                self.size = self.written;
                self.meta_inexact = true;
                self.cut_back();
                return Err(JournalError::Io { path: self.path.clone(), source });
            }
            self.written += self.pending.len() as u64;
            self.pending.clear();
            if self.pending.capacity() > RETAINED {
                // A large send's records are written: give their memory back.
                self.pending = Vec::new();
            }
        }
        self.unsynced = true;
        self.dirty = false;
        Ok(Some(self.sync.clone()))
    }

    /// Cuts the file back to its whole records after a failed write (a
    /// torn tail must not hold records nobody was told were kept, nor run
    /// into the next line). Best effort: should it fail too, the next
    /// write goes at the same offset and overwrites the tail, and replay
    /// drops a torn last line.
    fn cut_back(&mut self) {
        let cut = self.file.set_len(self.written).and_then(|()| self.file.sync_data());
        if let Err(e) = cut {
            tracing::warn!(path = %self.path.display(), "cannot cut a failed write off the journal: {e}");
        }
    }

    /// Records that a sync of the handle [`Journal::flush`] returned
    /// succeeded, and no record was appended since that flush.
    pub fn synced(&mut self) {
        if !self.dirty {
            self.unsynced = false;
        }
    }

    /// Whether [`Journal::compact_if_grown`] has work: a compaction to
    /// install, or a file past its threshold. Cheap (no system call).
    pub fn compaction_due(&self) -> bool {
        self.compaction.is_some()
            || self.idle.is_some()
            || self.size.saturating_sub(self.accepted) >= self.compact_after.max(self.base.saturating_mul(2))
            || (self.wanted && self.size >= COMPACT_SOON_AFTER)
    }

    /// Says that the records appended so far describe no job pending and
    /// no output unreceived (a daemon whose clients received everything
    /// they sent), so that the journal of a finished session of a million
    /// jobs shrinks to a few records at once and a restart reads next to
    /// nothing. Provided the file is at least [`COMPACT_SOON_AFTER`] long,
    /// the next [`Journal::compact_if_grown`] writes a checkpoint: the
    /// recruits, dismissals, workers up and next job id it kept from the
    /// records appended, written from memory (no read of the file) and
    /// renamed over it. Should a record about jobs be appended before that
    /// (the state is not empty any more), it compacts instead, whatever
    /// the thresholds. Returns the mark that [`Journal::settled`] reaches
    /// once that call came, or `None` for a small file (left alone).
    pub fn mark_idle(&mut self) -> Option<u64> {
        if self.size < COMPACT_SOON_AFTER {
            return None;
        }
        self.marks += 1;
        self.idle = Some((self.job_records, self.marks));
        self.wanted = true;
        Some(self.marks)
    }

    /// Settles the mark of [`Journal::mark_idle`] at once if it is void (a
    /// record about jobs came after it), without the commit that
    /// [`Journal::compact_if_grown`] begins with: for a caller that cannot
    /// commit now and does not want a waiter held until it can.
    pub fn settle_if_void(&mut self) {
        if let Some((at, mark)) = self.idle {
            if at != self.job_records {
                self.idle = None;
                self.settled = mark;
            }
        }
    }

    /// The last mark of [`Journal::mark_idle`] settled: its checkpoint
    /// written (or found void) by [`Journal::compact_if_grown`].
    pub fn settled(&self) -> u64 {
        self.settled
    }

    /// A compaction runs on its own thread and waits to be installed by
    /// [`Journal::compact_if_grown`].
    pub fn compacting(&self) -> bool {
        self.compaction.is_some()
    }

    /// Replaces the file with the records of `replay` (after committing).
    pub fn compact(&mut self, replay: &Replay) -> Result<(), JournalError> {
        self.commit()?;
        let mut fresh = Self::rewrite(&self.path, replay)?;
        let meta = std::mem::take(&mut fresh.meta);
        self.succeeded_by(fresh);
        self.meta = meta;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn write_record(w: &mut impl Write, record: &Record) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, record).map_err(std::io::Error::other)?;
    w.write_all(b"\n")
}

/// Parses one journal line. The records this code writes start with their
/// tag (`{"t":"delivered",...`); for the ones a journal is mostly made of,
/// the variant's fields are read directly, since serde reads an internally
/// tagged enum by first buffering the whole record as a tree of its own
/// (about half of the time a replay or a compaction took). Anything else
/// (an older writer's field order, a rare record) takes the general way.
fn parse_record(line: &[u8]) -> Result<Record, serde_json::Error> {
    parse_held(line)
}

/// [`parse_record`] with specs and outputs kept as their JSON (for a
/// compaction, which only copies them: neither parsed nor written again).
/// A record only the general way reads (its tag not first) is read that
/// way and its specs and outputs written back to JSON, so that a
/// compaction keeps whatever a restart reads.
fn parse_raw_record(line: &[u8]) -> Result<Record<RawSpec, RawOutput>, serde_json::Error> {
    use serde_json::value::to_raw_value;
    // A `delivered` line as written: its output taken as it is.
    if let Some(json) = line
        .strip_prefix(DELIVERED_HEAD)
        .map(|rest| rest.strip_suffix(b"\n").unwrap_or(rest))
        .and_then(|rest| rest.strip_suffix(b"}"))
    {
        if let (Some(id), Ok(json)) = (output_id_direct(json), std::str::from_utf8(json)) {
            return Ok(Record::Delivered { output: Box::new(RawOutput { id, json: json.into() }) });
        }
    }
    let held = parse_held::<RawSpec, RawOutput>(line);
    if held.is_ok() {
        return held;
    }
    parse_record(line)?.map(
        |spec| to_raw_value(&spec),
        |o| serde_json::to_string(&o).map(|json| RawOutput { id: o.id, json: json.into() }),
    )
}

/// [`parse_record`] with specs held as `S` and outputs as `O`.
fn parse_held<S: DeserializeOwned, O: DeserializeOwned>(line: &[u8]) -> Result<Record<S, O>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(bound = "O: DeserializeOwned")]
    struct Delivered<O> {
        output: Box<O>,
    }
    #[derive(Deserialize)]
    struct Assigned {
        job: JobId,
        attempt: u32,
        #[serde(default)]
        slot: Option<String>,
    }
    #[derive(Deserialize)]
    struct Ids {
        ids: Vec<JobId>,
    }
    #[derive(Deserialize)]
    #[serde(bound = "S: DeserializeOwned")]
    struct Accepted<S> {
        jobs: Vec<(JobId, S)>,
        #[serde(default)]
        more: bool,
    }
    #[derive(Deserialize)]
    #[serde(bound = "S: DeserializeOwned")]
    struct Pending<S> {
        id: JobId,
        spec: Box<S>,
        attempts: u32,
        crashes: u32,
        failures: u32,
        running: bool,
        #[serde(default)]
        cancelled: bool,
        #[serde(default)]
        slot: Option<String>,
    }
    let tag =
        line.strip_prefix(br#"{"t":""#).and_then(|rest| rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]));
    match tag {
        Some(b"delivered") => {
            serde_json::from_slice::<Delivered<O>>(line).map(|d| Record::Delivered { output: d.output })
        }
        Some(b"assigned") => serde_json::from_slice::<Assigned>(line).map(|a| Record::Assigned {
            job: a.job,
            attempt: a.attempt,
            slot: a.slot,
        }),
        Some(b"received") => serde_json::from_slice::<Ids>(line).map(|r| Record::Received { ids: r.ids }),
        Some(b"accepted") => {
            serde_json::from_slice::<Accepted<S>>(line).map(|a| Record::Accepted { jobs: a.jobs, more: a.more })
        }
        Some(b"pending") => serde_json::from_slice::<Pending<S>>(line).map(|p| Record::Pending {
            id: p.id,
            spec: p.spec,
            attempts: p.attempts,
            crashes: p.crashes,
            failures: p.failures,
            running: p.running,
            cancelled: p.cancelled,
            slot: p.slot,
        }),
        _ => serde_json::from_slice::<Record<S, O>>(line),
    }
}

/// How a line is read into a record ([`parse_record`], [`parse_raw_record`]).
type ParseRecord<S, O> = fn(&[u8]) -> Result<Record<S, O>, serde_json::Error>;

fn read_into(path: &Path, file: impl std::io::Read, replay: &mut Replay) -> Result<(), JournalError> {
    read_into_limited(path, file, replay, MAX_RECORD, parse_record)
}

/// Folds the whole lines of `file` into `replay`. A line that does not
/// parse or is longer than `limit` is skipped and noted in
/// `replay.skipped`; a last line without its newline (a torn write) is
/// dropped silently. Only I/O errors fail.
fn read_into_limited<S, O: Delivery>(
    path: &Path,
    file: impl std::io::Read,
    replay: &mut Replay<S, O>,
    limit: usize,
    parse: ParseRecord<S, O>,
) -> Result<(), JournalError> {
    let io = |source| JournalError::Io { path: path.to_path_buf(), source };
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::new();
    let mut n: u64 = 0;
    loop {
        line.clear();
        n += 1;
        // Reads one line, keeping at most `limit` bytes of it.
        let mut too_long = false;
        let mut ended = false;
        loop {
            let buf = reader.fill_buf().map_err(io)?;
            if buf.is_empty() {
                break;
            }
            let (take, found) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if !too_long {
                if line.len() + take > limit.saturating_add(1) {
                    too_long = true;
                    line.clear();
                } else {
                    line.extend_from_slice(&buf[..take]);
                }
            }
            reader.consume(take);
            if found {
                ended = true;
                break;
            }
        }
        if !ended {
            // End of file: nothing more, or a torn last line (the write
            // that a crash cut short), dropped.
            if too_long || !line.is_empty() {
                tracing::debug!(path = %path.display(), line = n, "journal: a torn last line was dropped");
            }
            return Ok(());
        }
        if too_long {
            replay.skipped.push(format!("line {n}: longer than {limit} bytes"));
            continue;
        }
        match parse(&line) {
            Ok(record) => replay.apply(record),
            Err(e) => replay.skipped.push(format!("line {n}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crew_core::output::{OUTPUT_FORMAT, Status};

    fn output(id: u64) -> Output {
        let mut o = Output::without_run(JobId(id), None, Tags::new(), 0, Status::Succeeded, String::new());
        o.v = OUTPUT_FORMAT;
        o.error = None;
        o
    }

    fn recruit() -> Record {
        Record::Recruit {
            class: "local".into(),
            count: 2,
            tags: "gpu".parse().unwrap(),
            limits: SlotLimits::default(),
            options: BTreeMap::new(),
        }
    }

    /// The direct parse of the common records reads what the general one
    /// reads (compared by writing both back).
    #[test]
    fn the_direct_parse_of_records_agrees_with_the_general_one() {
        let records = vec![
            Record::Delivered { output: Box::new(output(7)) },
            Record::Assigned { job: JobId(3), attempt: 2, slot: Some("local-1".into()) },
            Record::Assigned { job: JobId(3), attempt: 1, slot: None },
            Record::Received { ids: vec![JobId(1), JobId(9)] },
            Record::Accepted { jobs: vec![(JobId(4), JobSpec::shell("echo 4"))], more: true },
            Record::Accepted { jobs: vec![(JobId(5), JobSpec::shell("echo 5"))], more: false },
            Record::Pending {
                id: JobId(6),
                spec: Box::new(JobSpec::shell("true")),
                attempts: 2,
                crashes: 1,
                failures: 0,
                running: true,
                cancelled: true,
                slot: Some("s".into()),
            },
            recruit(),
            Record::NextJob { next: 12 },
        ];
        for r in records {
            let line = serde_json::to_vec(&r).unwrap();
            let direct = serde_json::to_string(&parse_record(&line).unwrap()).unwrap();
            let general = serde_json::to_string(&serde_json::from_slice::<Record>(&line).unwrap()).unwrap();
            assert_eq!(direct, general);
        }
        // `append_assigned` writes what `append` does.
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _) = Journal::open(dir.path().join("a")).unwrap();
        let (mut b, _) = Journal::open(dir.path().join("b")).unwrap();
        a.append_assigned("local-1", &[(JobId(3), 1), (JobId(5), 2)]).unwrap();
        for (job, attempt) in [(3, 1), (5, 2)] {
            b.append(&Record::Assigned { job: JobId(job), attempt, slot: Some("local-1".into()) }).unwrap();
        }
        assert_eq!(a.pending, b.pending);
        assert_eq!(a.size, b.size);
        // A record that does not parse fails either way.
        assert!(parse_record(br#"{"t":"delivered","output":3}"#).is_err());
        assert!(parse_record(br#"{"t":"assigned"}"#).is_err());
    }

    /// A send journaled as several `accepted` records is taken whole or
    /// not at all: a journal that ends inside it (a crash in the middle of
    /// its write) accepts none of its jobs, but never reuses their ids;
    /// `append_delivered` reads back as `delivered`.
    #[test]
    fn a_send_in_several_records_replays_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let part = |from: u64, more: bool| Record::Accepted {
            jobs: (from..from + 3).map(|i| (JobId(i), JobSpec::shell(format!("echo {i}")))).collect(),
            more,
        };
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            j.append(&part(1, true)).unwrap();
            j.append(&part(4, false)).unwrap();
            let json = serde_json::to_vec(&output(2)).unwrap();
            j.append_delivered(&json);
            j.append_accepted(&[JobId(13)], &[JobSpec::shell("echo 13")], 8192).unwrap();
            j.append(&part(7, true)).unwrap();
            j.append(&part(10, true)).unwrap();
            j.commit().unwrap();
        }
        for _ in 0..2 {
            let (_j, r) = Journal::open(&path).unwrap();
            assert_eq!(r.pending.keys().map(|id| id.0).collect::<Vec<_>>(), vec![1, 3, 4, 5, 6, 13]);
            assert_eq!(r.pending[&JobId(13)].spec, JobSpec::shell("echo 13"));
            assert_eq!(r.ready.iter().map(|o| o.id).collect::<Vec<_>>(), vec![JobId(2)]);
            assert_eq!(r.next_job, 14, "the ids of the torn send are not reused");
        }
    }

    #[test]
    fn replay_folds_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, r) = Journal::open(&path).unwrap();
            assert_eq!(r.next_job, 1);
            j.append(&recruit()).unwrap();
            let jobs = (1..=4).map(|i| (JobId(i), JobSpec::shell(format!("echo {i}")))).collect();
            j.append(&Record::Accepted { jobs, more: false }).unwrap();
            j.append(&Record::Assigned { job: JobId(1), attempt: 1, slot: None }).unwrap();
            j.append(&Record::Assigned { job: JobId(2), attempt: 1, slot: None }).unwrap();
            j.append(&Record::Delivered { output: Box::new(output(1)) }).unwrap();
            j.append(&Record::Delivered { output: Box::new(output(3)) }).unwrap();
            j.append(&Record::Received { ids: vec![JobId(3)] }).unwrap();
            // Job 2 runs again (after a crash or a failure).
            j.append(&Record::Assigned { job: JobId(2), attempt: 2, slot: Some("local-1".into()) }).unwrap();
            j.commit().unwrap();
        }
        for _ in 0..2 {
            // Twice: the second time reads the compacted file.
            let (_j, r) = Journal::open(&path).unwrap();
            assert_eq!(r.recruits.len(), 1);
            assert_eq!(r.recruits[0].count, 2);
            assert_eq!(r.next_job, 5);
            assert_eq!(r.ready.iter().map(|o| o.id).collect::<Vec<_>>(), vec![JobId(1)]);
            assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), vec![JobId(2), JobId(4)]);
            let two = &r.pending[&JobId(2)];
            assert!(two.running);
            assert_eq!(two.history, History { attempts: 2, crashes: 0, failures: 0 });
            assert!(!r.pending[&JobId(4)].running);
        }
    }

    #[test]
    fn ids_are_never_reused_after_everything_was_received() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            j.append(&Record::Accepted { jobs: vec![(JobId(1), JobSpec::shell("true"))], more: false }).unwrap();
            j.append(&Record::Delivered { output: Box::new(output(1)) }).unwrap();
            j.append(&Record::Received { ids: vec![JobId(1)] }).unwrap();
            j.commit().unwrap();
        }
        // Compacted at every open: nothing is left but the counter.
        for _ in 0..3 {
            let (_j, r) = Journal::open(&path).unwrap();
            assert!(r.pending.is_empty() && r.ready.is_empty());
            assert_eq!(r.next_job, 2);
        }
    }

    /// What a compaction writes (reading specs and outputs as their JSON)
    /// rebuilds what a restart reads of the journal it compacted, record
    /// for record, whichever way each line had to be read.
    #[test]
    fn a_compaction_keeps_what_a_restart_reads() {
        let mut spec = JobSpec::shell("echo \"ü\" \\ 1");
        spec.name = Some("named".into());
        spec.env.insert("K".into(), "v".into());
        let mut named = output(5);
        named.name = Some("n\"5".into());
        named.stdout.text = "line\n\u{1}".into();
        let mut lines: Vec<Vec<u8>> = [
            recruit(),
            Record::Dismiss { tags: Some("gpu".parse().unwrap()), slot: None },
            Record::Accepted { jobs: (1..=3).map(|i| (JobId(i), spec.clone())).collect(), more: true },
            Record::Accepted {
                jobs: (4..=8).map(|i| (JobId(i), JobSpec::shell(format!("echo {i}")))).collect(),
                more: false,
            },
            Record::Up { slot: "local-1".into() },
            Record::Up { slot: "local-2".into() },
            Record::Assigned { job: JobId(1), attempt: 1, slot: Some("local-1".into()) },
            Record::Assigned { job: JobId(2), attempt: 2, slot: Some("local-2".into()) },
            Record::Delivered { output: Box::new(output(3)) },
            Record::Delivered { output: Box::new(named) },
            Record::Delivered { output: Box::new(output(6)) },
            Record::Received { ids: vec![JobId(3)] },
            Record::Cancel { ids: vec![JobId(7)] },
            Record::Withdrawn { ids: vec![JobId(8)] },
            Record::Pending {
                id: JobId(20),
                spec: Box::new(spec.clone()),
                attempts: 3,
                crashes: 1,
                failures: 1,
                running: true,
                cancelled: false,
                slot: Some("local-2".into()),
            },
            Record::Down { slot: Some("local-2".into()) },
            Record::NextJob { next: 30 },
        ]
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap())
        .collect();
        // Records an older writer might have left, their tag last: read
        // the general way.
        lines.push(br#"{"jobs":[[21,{"command":{"shell":"echo 21"}}]],"t":"accepted"}"#.to_vec());
        let late = serde_json::to_string(&output(22)).unwrap();
        lines.push(format!(r#"{{"output":{late},"t":"delivered"}}"#).into_bytes());
        let mut text = lines.join(&b"\n"[..]);
        text.push(b'\n');

        let restart = Replay::from_bytes(&text);
        assert!(restart.skipped.is_empty(), "{:?}", restart.skipped);
        assert_eq!(restart.pending.len(), 6, "{:?}", restart.pending.keys());
        assert_eq!(restart.ready.len(), 3);
        let mut raw = Replay::<RawSpec, RawOutput>::default();
        read_into_limited(Path::new("<memory>"), &text[..], &mut raw, MAX_RECORD, parse_raw_record).unwrap();
        assert!(raw.skipped.is_empty(), "{:?}", raw.skipped);
        let mut compacted = Vec::new();
        raw.write_state(&mut compacted).unwrap();
        let mut again = Vec::new();
        restart.write_state(&mut again).unwrap();
        assert_eq!(String::from_utf8_lossy(&compacted), String::from_utf8_lossy(&again));
        let reread = Replay::from_bytes(&compacted);
        let as_lines = |r: &Replay| r.records().iter().map(|r| serde_json::to_string(r).unwrap()).collect::<Vec<_>>();
        assert_eq!(as_lines(&reread), as_lines(&restart));
        // Jobs never started come back as `accepted` records.
        let again = String::from_utf8_lossy(&again);
        assert!(again.lines().any(|l| l.starts_with(r#"{"t":"accepted","jobs":[[4,"#)), "{again}");
        assert!(again.lines().any(|l| l.starts_with(r#"{"t":"pending","id":1,"#)), "{again}");
    }

    #[test]
    fn an_output_id_is_read_straight_or_by_a_parse() {
        assert_eq!(output_id(br#"{"v":1,"id":42,"name":null}"#).unwrap(), JobId(42));
        assert_eq!(output_id(br#"{"v":12,"id":7}"#).unwrap(), JobId(7));
        assert_eq!(output_id(br#"{"name":"x","id":9,"v":1}"#).unwrap(), JobId(9));
        assert!(output_id(br#"{"v":1,"id":42.5}"#).unwrap_err().is_data());
        assert!(output_id(br#"{"v":1,"id":}"#).is_err());
        assert!(output_id(br#"{"v":1}"#).is_err());
    }

    #[test]
    fn a_long_lived_journal_stays_within_a_factor_of_its_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let threshold = 64 * 1024;
        let (mut j, _) = Journal::open(&path).unwrap();
        j.set_compact_after(threshold);
        j.append(&recruit()).unwrap();
        let mut compactions = 0;
        let mut largest = 0;
        // 5,000 jobs go through; the last 10 stay pending, and the 10
        // before them finished without being received.
        for i in 1..=5_000u64 {
            j.append(&Record::Accepted { jobs: vec![(JobId(i), JobSpec::shell(format!("echo {i}")))], more: false })
                .unwrap();
            j.append(&Record::Assigned { job: JobId(i), attempt: 1, slot: None }).unwrap();
            if i <= 4_990 {
                j.append(&Record::Delivered { output: Box::new(output(i)) }).unwrap();
            }
            if i <= 4_980 {
                j.append(&Record::Received { ids: vec![JobId(i)] }).unwrap();
            }
            if j.compact_if_grown().unwrap() {
                compactions += 1;
            }
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        j.finish_compaction().unwrap();
        assert!(compactions >= 3, "only {compactions} compactions");
        // Records keep coming while a compaction runs on its thread.
        assert!(largest < 8 * threshold, "the file reached {largest} bytes");
        drop(j);
        assert!(!compacting_path(&path).exists(), "a compaction was left half-done");
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.recruits.len(), 1);
        assert_eq!(r.next_job, 5_001);
        assert_eq!(r.pending.keys().map(|id| id.0).collect::<Vec<_>>(), (4_991..=5_000).collect::<Vec<_>>());
        assert!(r.pending.values().all(|p| p.running && p.history.attempts == 1));
        assert_eq!(r.ready.iter().map(|o| o.id.0).collect::<Vec<_>>(), (4_981..=4_990).collect::<Vec<_>>());
    }

    #[test]
    fn a_compaction_cut_short_leaves_the_journal_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.set_compact_after(1024);
        for i in 1..=200u64 {
            j.append(&Record::Accepted { jobs: vec![(JobId(i), JobSpec::shell(format!("echo {i}")))], more: false })
                .unwrap();
        }
        // A compaction starts; more records come; the process "dies" before
        // the next commit installs it (the thread's file is left behind).
        assert!(!j.compact_if_grown().unwrap(), "started, not installed");
        for i in 1..=150u64 {
            j.append(&Record::Delivered { output: Box::new(output(i)) }).unwrap();
        }
        j.commit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(j);
        std::fs::write(compacting_path(&path), b"{\"t\":\"received\",\"ids\":[1]}\ntorn").unwrap();
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.keys().map(|id| id.0).collect::<Vec<_>>(), (151..=200).collect::<Vec<_>>());
        assert_eq!(r.ready.len(), 150, "what the half-done compaction file said is not taken");
        assert_eq!(r.next_job, 201);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_damage_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            j.append(&Record::Accepted { jobs: vec![(JobId(1), JobSpec::shell("true"))], more: false }).unwrap();
            j.commit().unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"t":"accepted","jobs":[[2,{"comm"#).unwrap();
        drop(f);
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), vec![JobId(1)]);
        assert!(r.skipped.is_empty(), "a torn last line is not damage: {:?}", r.skipped);

        // Garbage, a torn record, binary junk, an id at the top of the
        // range and a record over the size limit, each in the middle: each
        // skipped (and named), everything around it recovered.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        f.write_all(br#"{"t":"accepted","jobs":[[2,{"comm"#).unwrap();
        f.write_all(b"\n").unwrap();
        f.write_all(b"\xff\xfe\x00\x01{}\n").unwrap();
        f.write_all(b"{\"t\":\"delivered\",\"output\":{\"nope\":1}}\n").unwrap();
        writeln!(f, r#"{{"t":"next_job","next":18446744073709551615}}"#).unwrap();
        writeln!(f, r#"{{"t":"accepted","jobs":[[18446744073709551615,{{"command":{{"argv":["true"]}}}}]]}}"#).unwrap();
        f.write_all(&vec![b'x'; 5000]).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            // A sound record after the damage (the open compacted the file,
            // so write the damage again below, after it).
            j.append(&Record::Accepted { jobs: vec![(JobId(3), JobSpec::shell("true"))], more: false }).unwrap();
            j.commit().unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![b'{'; 5000]).unwrap();
        f.write_all(b"\n").unwrap();
        f.write_all(b"[1,2\n").unwrap();
        writeln!(f, r#"{{"t":"received","ids":[]}}"#).unwrap();
        drop(f);
        let mut replay = Replay { next_job: 1, ..Replay::default() };
        read_into_limited(&path, File::open(&path).unwrap(), &mut replay, 1000, parse_record).unwrap();
        assert_eq!(
            replay.pending.keys().copied().collect::<Vec<_>>(),
            vec![JobId(1), JobId(3), JobId(u64::MAX)],
            "the sound records around the damage are recovered"
        );
        assert_eq!(replay.next_job, u64::MAX);
        assert_eq!(replay.skipped.len(), 2, "{:?}", replay.skipped);
        assert!(replay.skipped[0].contains("longer than 1000 bytes"), "{:?}", replay.skipped);
        // And the real open (its limit far above these lines) skips the rest.
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.len(), 3);
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
    }

    #[test]
    fn outputs_received_one_at_a_time_replay_without_a_pass_over_the_backlog() {
        // A backlog of outputs, then `crew receive` taking the oldest one at
        // a time: each record names the front of `ready`.
        let n = 2_000;
        let mut r: Replay = Replay::default();
        for id in 1..=n {
            r.apply(Record::Delivered { output: Box::new(output(id)) });
        }
        for id in 1..=n / 2 {
            r.apply(Record::Received { ids: vec![JobId(id)] });
        }
        assert_eq!(r.scanned, 0, "no output was looked at beyond those received");
        assert_eq!(r.ready.iter().map(|o| o.id.0).collect::<Vec<_>>(), (n / 2 + 1..=n).collect::<Vec<_>>());
        // Ids that are not (or no longer) ready cost nothing either.
        r.apply(Record::Received { ids: vec![JobId(1), JobId(n + 5)] });
        assert_eq!(r.scanned, 0);
        // One from the middle (chosen by id or name) costs one pass, as it
        // cost the daemon.
        r.apply(Record::Received { ids: vec![JobId(n)] });
        assert_eq!(r.scanned, (n / 2) as usize);
        assert_eq!(r.ready.len(), (n / 2) as usize - 1);
    }

    #[test]
    fn received_removes_every_ready_output_it_names_like_a_full_pass() {
        // Against the plain rule (remove every ready output whose id is
        // named), over deliveries with repeated ids, receives from the
        // front, the middle and of absent ids, and `ready` edited by hand
        // in between.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut r: Replay = Replay::default();
        let mut model: Vec<JobId> = Vec::new();
        for step in 0..5_000 {
            match next(10) {
                0..=4 => {
                    let id = next(40);
                    r.apply(Record::Delivered { output: Box::new(output(id)) });
                    model.push(JobId(id));
                }
                5 | 6 => {
                    let ids: Vec<JobId> = match model.first() {
                        Some(front) if next(2) == 0 => vec![*front],
                        _ => (0..next(4)).map(|_| JobId(next(45))).collect(),
                    };
                    r.apply(Record::Received { ids: ids.clone() });
                    model.retain(|id| !ids.contains(id));
                }
                7 if step % 7 == 0 => {
                    r.ready.pop_back();
                    model.pop();
                }
                _ => {
                    let ids = vec![JobId(next(40)), JobId(next(40))];
                    r.apply(Record::Received { ids: ids.clone() });
                    model.retain(|id| !ids.contains(id));
                }
            }
            assert_eq!(r.ready.iter().map(|o| o.id).collect::<Vec<_>>(), model, "step {step}");
        }
    }

    #[test]
    fn damage_in_the_middle_is_reported_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut f = File::create(&path).unwrap();
        writeln!(f, r#"{{"t":"accepted","jobs":[[1,{{"command":{{"argv":["true"]}}}}]]}}"#).unwrap();
        f.write_all(b"not json\n").unwrap();
        f.write_all(b"\xff\xfe{\n").unwrap();
        writeln!(f, r#"{{"t":"accepted","jobs":[[2,{{"command":{{"argv":["true"]}}}}]]}}"#).unwrap();
        drop(f);
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), vec![JobId(1), JobId(2)]);
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
        assert!(r.skipped[0].starts_with("line 2:") && r.skipped[1].starts_with("line 3:"), "{:?}", r.skipped);
    }

    #[test]
    fn a_group_commit_syncs_outside_the_lock_and_cancels_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            let jobs = (1..=3).map(|i| (JobId(i), JobSpec::shell("true"))).collect();
            j.append(&Record::Accepted { jobs, more: false }).unwrap();
            j.append(&Record::Cancel { ids: vec![JobId(2), JobId(9)] }).unwrap();
            j.append(&Record::Withdrawn { ids: vec![JobId(3)] }).unwrap();
            let handle = j.flush().unwrap().expect("something to sync");
            handle.sync_data().unwrap();
            j.synced();
            assert!(j.flush().unwrap().is_none(), "nothing left to sync");
        }
        for _ in 0..2 {
            let (_j, r) = Journal::open(&path).unwrap();
            assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), vec![JobId(1), JobId(2)]);
            assert!(!r.pending[&JobId(1)].cancelled);
            assert!(r.pending[&JobId(2)].cancelled, "kept through compaction");
            assert_eq!(r.next_job, 4);
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A journal over [`COMPACT_SOON_AFTER`] whose jobs (ids 1 to `n`)
    /// were all delivered and received, with a recruit and one worker up
    /// (another came and went).
    fn finished_session(path: &Path, n: u64) -> Journal {
        let (mut j, _) = Journal::open(path).unwrap();
        j.append(&recruit()).unwrap();
        j.append(&Record::Up { slot: "local-1".into() }).unwrap();
        j.append(&Record::Up { slot: "local-2".into() }).unwrap();
        let ids: Vec<JobId> = (1..=n).map(JobId).collect();
        let specs: Vec<JobSpec> =
            ids.iter().map(|id| JobSpec::shell(format!("echo {} {}", id.0, "x".repeat(300)))).collect();
        j.append_accepted(&ids, &specs, 1000).unwrap();
        j.append_assigned("local-1", &ids.iter().map(|id| (*id, 1)).collect::<Vec<_>>()).unwrap();
        for id in &ids {
            j.append_delivered(&serde_json::to_vec(&output(id.0)).unwrap());
        }
        j.append(&Record::Down { slot: Some("local-2".into()) }).unwrap();
        j.append(&Record::Received { ids }).unwrap();
        j.commit().unwrap();
        assert!(j.size >= COMPACT_SOON_AFTER);
        j
    }

    /// A journal whose state is empty is replaced by a checkpoint written
    /// from what it kept besides jobs: a few records, read back as the
    /// whole file was (recruits, workers up, next id), with no file left
    /// beside it.
    #[test]
    fn an_idle_journal_is_replaced_by_a_checkpoint_of_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut j = finished_session(&path, 3000);
        let full = Replay::from_bytes(&std::fs::read(&path).unwrap());
        let mark = j.mark_idle().expect("a large journal is marked");
        assert!(j.compaction_due());
        assert!(j.compact_if_grown().unwrap(), "the checkpoint is installed");
        assert_eq!(j.settled(), mark);
        assert!(!j.compaction_due());
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1024, "the checkpoint is a few records, not {size} bytes");
        assert!(!checkpoint_path(&path).exists() && !compacting_path(&path).exists());
        // Appending goes on in the new file.
        j.append(&Record::Up { slot: "local-3".into() }).unwrap();
        j.commit().unwrap();
        drop(j);
        // One cut short by a crash before its rename is removed at open.
        std::fs::write(checkpoint_path(&path), b"{\"t\":\"next_job\",\"next\":9}\n").unwrap();
        let (_j, r) = Journal::open(&path).unwrap();
        assert!(!checkpoint_path(&path).exists());
        assert!(r.pending.is_empty() && r.ready.is_empty() && r.skipped.is_empty());
        assert_eq!(r.recruits, full.recruits);
        assert_eq!(r.next_job, 3001);
        assert_eq!(r.up.iter().map(String::as_str).collect::<Vec<_>>(), ["local-1", "local-3"]);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A record about jobs appended after the mark (a send came) voids
    /// the checkpoint: the journal is compacted the long way instead and
    /// keeps the new job; a small journal is not marked at all.
    #[test]
    fn a_job_after_the_idle_mark_voids_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut j = finished_session(&path, 3000);
        let mark = j.mark_idle().unwrap();
        j.append_accepted(&[JobId(3001)], &[JobSpec::shell("echo late")], 10).unwrap();
        j.settle_if_void();
        assert_eq!(j.settled(), mark, "a void mark lets its waiter go at once");
        assert!(j.compaction_due(), "the compaction asked for with the mark is still due");
        assert!(!j.compact_if_grown().unwrap(), "a compaction starts on its thread");
        assert!(j.finish_compaction().unwrap());
        drop(j);
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), [JobId(3001)]);
        assert!(r.ready.is_empty());

        let (mut small, _) = Journal::open(dir.path().join("small")).unwrap();
        small.append(&recruit()).unwrap();
        assert_eq!(small.mark_idle(), None);
        assert!(!small.compaction_due());
    }

    /// A checkpoint taken while a compaction runs abandons it: the
    /// compaction's file is removed when it is done, never installed over
    /// the checkpoint (nor are the records appended after it lost).
    #[test]
    fn a_checkpoint_abandons_a_compaction_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut j = finished_session(&path, 3000);
        j.set_compact_after(1);
        assert!(!j.compact_if_grown().unwrap());
        assert!(j.compacting());
        j.mark_idle().unwrap();
        assert!(j.compact_if_grown().unwrap(), "the checkpoint does not wait for the compaction");
        assert!(j.compacting(), "the abandoned compaction is still waited for");
        j.append(&Record::NextJob { next: 5000 }).unwrap();
        j.commit().unwrap();
        assert!(!j.finish_compaction().unwrap(), "an abandoned compaction is not installed");
        assert!(!j.compacting());
        assert!(!compacting_path(&path).exists());
        assert!(std::fs::metadata(&path).unwrap().len() < 1024);
        drop(j);
        let (_j, r) = Journal::open(&path).unwrap();
        assert!(r.pending.is_empty() && r.ready.is_empty());
        assert_eq!(r.next_job, 5000);
        assert_eq!(r.up.len(), 1);
    }

    /// A write that failed and was cut back may have dropped records that
    /// the checkpoint's `meta` kept: from then on the journal is compacted
    /// from the file, so what a client was told was not done stays undone.
    #[test]
    fn after_a_failed_write_no_checkpoint_is_written_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut j = finished_session(&path, 3000);
        // A descriptor that cannot write: the next flush fails.
        let writable = std::mem::replace(&mut j.file, File::open(&path).unwrap());
        j.append(&Record::Recruit {
            class: "lost".into(),
            count: 1,
            tags: Tags::new(),
            limits: SlotLimits::default(),
            options: BTreeMap::new(),
        })
        .unwrap();
        assert!(j.flush().is_err());
        j.file = writable;
        let mark = j.mark_idle().unwrap();
        assert!(!j.compact_if_grown().unwrap(), "a compaction from the file, not a checkpoint");
        assert_eq!(j.settled(), mark);
        assert!(j.finish_compaction().unwrap());
        drop(j);
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.recruits.iter().map(|r| r.class.as_str()).collect::<Vec<_>>(), ["local"]);
        assert!(r.pending.is_empty() && r.ready.is_empty());
    }
}
