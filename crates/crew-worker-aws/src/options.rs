//! The class options of `aws-batch` (`--opt key=value`, `[class.aws-batch]`
//! in `crew.toml`, `CREW_AWS_*` variables), parsed into [`BatchOptions`].
//!
//! Parsing is the validation: `check_options` and `launch` run the same
//! [`BatchOptions::parse`], so a recruit that was accepted always launches
//! with the options it was checked with.

use std::collections::BTreeMap;
use std::time::Duration;

use crew_core::worker::WorkerError;

use crate::CLASS;

/// Every option key, in the order the docs list them.
pub const KEYS: [&str; 13] = [
    "job-queue",
    "job-definition",
    "cpus",
    "memory",
    "gpus",
    "region",
    "endpoint",
    "share-identifier",
    "scheduling-priority",
    "tags",
    "wall-grace",
    "name-prefix",
    "agent-command",
];

/// What each of [`KEYS`] means, for `crew classes aws-batch`.
pub(crate) fn specs() -> Vec<crew_core::worker::OptionSpec> {
    use crew_core::worker::OptionSpec;
    let help = |k: &str| match k {
        "job-queue" => "the job queue, name or ARN",
        "job-definition" => "the job definition: name, name:revision or ARN",
        "cpus" => "vCPUs per worker (2; 0.25 on Fargate)",
        "memory" => "memory per worker: 4GiB, 4096MiB, 512M, or MiB",
        "gpus" => "GPUs per worker",
        "region" => "the AWS region, if not the standard chain's",
        "endpoint" => "the Batch endpoint URL, if not AWS's",
        "share-identifier" => "fair-share identifier",
        "scheduling-priority" => "scheduling priority, 0-9999 (fair-share queues)",
        "tags" => "AWS tags of the jobs, key=value,key=value",
        "wall-grace" => "added to the slot's wall time for Batch's hard timeout (default 15m)",
        "name-prefix" => "the start of the Batch job names (default crew)",
        _ => "the container command that starts the worker (default: crew worker)",
    };
    KEYS.iter()
        .map(|k| {
            let spec = OptionSpec::new(*k, format!("{} [{}]", help(k), env_name(k)));
            if matches!(*k, "job-queue" | "job-definition") { spec.required() } else { spec }
        })
        .collect()
}

/// The prefix of the environment variables that give options defaults:
/// `CREW_AWS_JOB_QUEUE` for `job-queue`, and so on (upper case, `_` for `-`).
pub const ENV_PREFIX: &str = "CREW_AWS_";

/// How long Batch lets a worker run past its slot's wall time (which is soft:
/// the worker finishes its job first) when `wall-grace` is not given.
pub const DEFAULT_WALL_GRACE: Duration = Duration::from_secs(15 * 60);

/// Batch refuses attempt durations under a minute.
const MIN_ATTEMPT_SECONDS: u64 = 60;

/// The options of one recruit, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchOptions {
    /// The job queue (name or ARN).
    pub job_queue: String,
    /// The job definition (`name`, `name:revision` or ARN).
    pub job_definition: String,
    /// vCPUs per worker, as Batch takes them (`2`, `0.25` on Fargate).
    pub cpus: Option<String>,
    /// Memory per worker in MiB.
    pub memory_mib: Option<u64>,
    /// GPUs per worker.
    pub gpus: Option<u32>,
    /// The AWS region, if not the one of the standard chain.
    pub region: Option<String>,
    /// The Batch endpoint URL, if not AWS's (emulators, VPC endpoints).
    pub endpoint: Option<String>,
    /// The fair-share identifier.
    pub share_identifier: Option<String>,
    /// The scheduling priority (fair-share queues).
    pub scheduling_priority: Option<i32>,
    /// AWS tags of the Batch jobs (propagated to their ECS tasks).
    pub tags: BTreeMap<String, String>,
    /// Added to the slot's wall time to make the Batch attempt timeout.
    pub wall_grace: Duration,
    /// The start of every Batch job name (default `crew`).
    pub name_prefix: String,
    /// The container command that starts the agent, when not the
    /// controller's agent program by its file name (found on the image's
    /// `PATH`) with its arguments: `crew worker` for the stock binary.
    pub agent_command: Option<Vec<String>>,
}

fn bad(message: impl Into<String>) -> WorkerError {
    WorkerError::Options { class: CLASS.to_owned(), message: message.into() }
}

/// The environment variable that gives `key` a default (`CREW_AWS_JOB_QUEUE`).
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('-', "_"))
}

/// The defaults found in the environment, by option key (empty variables
/// count as unset).
pub fn env_defaults() -> BTreeMap<String, String> {
    KEYS.iter()
        .filter_map(|k| {
            let v = std::env::var(env_name(k)).ok().filter(|v| !v.trim().is_empty())?;
            Some(((*k).to_owned(), v))
        })
        .collect()
}

impl BatchOptions {
    /// Parses `options` over `defaults` (options win per key).
    pub fn parse(defaults: &BTreeMap<String, String>, options: &BTreeMap<String, String>) -> Result<Self, WorkerError> {
        for k in options.keys() {
            if !KEYS.contains(&k.as_str()) {
                return Err(bad(format!("unknown option {k:?} (valid options: {})", KEYS.join(", "))));
            }
        }
        let get = |k: &str| -> Option<&str> {
            options.get(k).or_else(|| defaults.get(k)).map(|v| v.trim()).filter(|v| !v.is_empty())
        };
        let required = |k: &str| {
            get(k).map(str::to_owned).ok_or_else(|| {
                bad(format!("missing option {k:?}: pass --opt {k}=..., set it in [class.{CLASS}] or {}", env_name(k)))
            })
        };
        let job_queue = required("job-queue")?;
        let job_definition = required("job-definition")?;
        let cpus = get("cpus").map(parse_cpus).transpose()?;
        let memory_mib = get("memory").map(parse_memory).transpose()?;
        let gpus = get("gpus")
            .map(|v| {
                v.parse::<u32>().map_err(|_| bad(format!("gpus: {v:?} is not a whole number of GPUs (e.g. gpus=1)")))
            })
            .transpose()?
            .filter(|g| *g > 0);
        let scheduling_priority = get("scheduling-priority")
            .map(|v| {
                v.parse::<i32>()
                    .ok()
                    .filter(|p| (0..=9999).contains(p))
                    .ok_or_else(|| bad(format!("scheduling-priority: {v:?} is not a whole number from 0 to 9999")))
            })
            .transpose()?;
        let endpoint = get("endpoint").map(str::to_owned);
        if let Some(e) = &endpoint {
            if !endpoint_ok(e) {
                return Err(bad(format!("endpoint: {e:?} is not a URL (e.g. endpoint=http://127.0.0.1:5000)")));
            }
        }
        let wall_grace = match get("wall-grace") {
            Some(v) => crew_core::job::parse_duration(v).map_err(|e| bad(format!("wall-grace: {e}")))?,
            None => DEFAULT_WALL_GRACE,
        };
        let name_prefix = get("name-prefix").unwrap_or("crew").to_owned();
        if !name_prefix.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !name_prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || name_prefix.len() > 64
        {
            return Err(bad(format!(
                "name-prefix: {name_prefix:?} must start with a letter or digit and hold only letters, digits, - and _ (at most 64)"
            )));
        }
        let agent_command = get("agent-command").map(|v| v.split_whitespace().map(str::to_owned).collect());
        Ok(Self {
            agent_command,
            job_queue,
            job_definition,
            cpus,
            memory_mib,
            gpus,
            region: get("region").map(str::to_owned),
            endpoint,
            share_identifier: get("share-identifier").map(str::to_owned),
            scheduling_priority,
            tags: get("tags").map(parse_tags).transpose()?.unwrap_or_default(),
            wall_grace,
            name_prefix,
        })
    }

    /// The Batch attempt timeout for workers whose slot has `wall_time`:
    /// the wall time plus the grace, at least Batch's minimum of 60 s.
    pub fn attempt_seconds(&self, wall_time: Option<Duration>) -> Option<i32> {
        let secs = (wall_time? + self.wall_grace).as_secs().max(MIN_ATTEMPT_SECONDS);
        Some(i32::try_from(secs).unwrap_or(i32::MAX))
    }
}

fn parse_cpus(v: &str) -> Result<String, WorkerError> {
    match cpus_value(v) {
        Some(_) => Ok(v.to_owned()),
        None => Err(bad(format!("cpus: {v:?} is not a positive number of vCPUs (e.g. cpus=2 or cpus=0.25)"))),
    }
}

/// A number of vCPUs as Batch takes it (`2`, `0.25`): positive and finite.
/// The rule of the `cpus` option, shared with job definitions.
pub(crate) fn cpus_value(v: &str) -> Option<f64> {
    v.parse::<f64>().ok().filter(|n| n.is_finite() && *n > 0.0)
}

/// Memory in MiB: `4GiB`, `4G`, `4096MiB`, `512M`, `1TiB`, or a plain
/// number of MiB. Decimal units (`GB`, `MB`) are refused rather than guessed.
pub fn parse_memory(v: &str) -> Result<u64, WorkerError> {
    memory_mib(v).ok_or_else(|| {
        bad(format!(
            "memory: {v:?} is not a size; write MiB or GiB (e.g. memory=4GiB, memory=4096MiB, memory=512M, or a number of MiB)"
        ))
    })
}

/// The rule of [`parse_memory`] without its message (shared with job
/// definitions, whose messages name flags, not options): a plain number is
/// MiB, anything else is a size by crew's rule (`crew_core::job::parse_size`,
/// binary units), which must be a whole number of MiB.
pub(crate) fn memory_mib(v: &str) -> Option<u64> {
    let v = v.trim();
    let mib = if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let n: f64 = v.parse().ok()?;
        if !n.is_finite() || n.fract() != 0.0 || n > u32::MAX as f64 {
            return None;
        }
        n as u64
    } else {
        // Units only: a bare number of bytes would read as MiB above.
        let lower = v.to_ascii_lowercase();
        if lower.ends_with('b') && !lower.ends_with("ib") {
            return None;
        }
        let bytes = crew_core::job::parse_size(v).ok()?;
        if bytes % (1 << 20) != 0 {
            return None;
        }
        bytes >> 20
    };
    (1..=u64::from(u32::MAX)).contains(&mib).then_some(mib)
}

/// An endpoint URL as the SDK takes it: `http://` or `https://`.
pub(crate) fn endpoint_ok(e: &str) -> bool {
    e.starts_with("http://") || e.starts_with("https://")
}

/// AWS tags: `key=value` pairs separated by commas.
fn parse_tags(v: &str) -> Result<BTreeMap<String, String>, WorkerError> {
    let mut tags = BTreeMap::new();
    for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, val)) = pair.split_once('=') else {
            return Err(bad(format!("tags: {pair:?} is not key=value (e.g. tags=team=genomics,project=p1)")));
        };
        let k = k.trim();
        if k.is_empty() || k.len() > 128 || val.len() > 256 || k.to_ascii_lowercase().starts_with("aws:") {
            return Err(bad(format!("tags: {k:?} is not a valid AWS tag key (1-128 characters, not aws:...)")));
        }
        tags.insert(k.to_owned(), val.trim().to_owned());
    }
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn message(r: Result<BatchOptions, WorkerError>) -> String {
        match r {
            Ok(o) => panic!("expected an error, got {o:?}"),
            Err(e) => e.to_string(),
        }
    }

    const BASE: [(&str, &str); 2] = [("job-queue", "q"), ("job-definition", "crew-worker")];

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("4GiB").ok(), Some(4096));
        assert_eq!(parse_memory("4G").ok(), Some(4096));
        assert_eq!(parse_memory("4096MiB").ok(), Some(4096));
        assert_eq!(parse_memory("512M").ok(), Some(512));
        assert_eq!(parse_memory("512").ok(), Some(512));
        assert_eq!(parse_memory("1.5GiB").ok(), Some(1536));
        for bad in ["4GB?", "4GB", "GiB", "", "0", "-1G", "1.3M", "4 GiBs"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn full_options_parse() {
        let mut o = opts(&BASE);
        o.extend(opts(&[
            ("cpus", "2"),
            ("memory", "4GiB"),
            ("gpus", "1"),
            ("tags", "team=gen, project=p1"),
            ("scheduling-priority", "10"),
            ("wall-grace", "5m"),
        ]));
        let p = BatchOptions::parse(&BTreeMap::new(), &o).expect("valid");
        assert_eq!(p.cpus.as_deref(), Some("2"));
        assert_eq!(p.memory_mib, Some(4096));
        assert_eq!(p.gpus, Some(1));
        assert_eq!(p.tags.get("project").map(String::as_str), Some("p1"));
        assert_eq!(p.attempt_seconds(Some(Duration::from_secs(3600))), Some(3900));
        assert_eq!(p.attempt_seconds(None), None);
    }

    #[test]
    fn errors_say_what_and_how() {
        let e = message(BatchOptions::parse(&BTreeMap::new(), &opts(&[("job-queue", "q"), ("queue", "x")])));
        assert!(e.contains("unknown option \"queue\"") && e.contains("job-definition, cpus"), "{e}");
        let e = message(BatchOptions::parse(&BTreeMap::new(), &opts(&[("job-queue", "q")])));
        assert!(e.contains("missing option \"job-definition\"") && e.contains("CREW_AWS_JOB_DEFINITION"), "{e}");
        let mut o = opts(&BASE);
        o.insert("memory".into(), "4GB?".into());
        let e = message(BatchOptions::parse(&BTreeMap::new(), &o));
        assert!(e.contains("memory: \"4GB?\"") && e.contains("4GiB"), "{e}");
        o.insert("memory".into(), "4GiB".into());
        o.insert("cpus".into(), "-2".into());
        assert!(message(BatchOptions::parse(&BTreeMap::new(), &o)).contains("positive number"));
        o.insert("cpus".into(), "2".into());
        o.insert("gpus".into(), "1.5".into());
        assert!(message(BatchOptions::parse(&BTreeMap::new(), &o)).contains("whole number"));
    }

    #[test]
    fn options_win_over_defaults() {
        let defaults = opts(&[("job-queue", "from-env"), ("job-definition", "d"), ("region", "eu-west-1")]);
        let p = BatchOptions::parse(&defaults, &opts(&[("job-queue", "given")])).expect("valid");
        assert_eq!((p.job_queue.as_str(), p.region.as_deref()), ("given", Some("eu-west-1")));
        assert_eq!(env_name("job-queue"), "CREW_AWS_JOB_QUEUE");
    }
}
