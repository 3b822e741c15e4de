//! The class options (`--opt key=value`, `[class.slurm]` in `crew.toml`),
//! parsed and checked whole before anything is submitted, so that a typo
//! is an error that names the key and the fix, not a job Slurm refuses
//! later (or, worse, one it runs with the wrong resources).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crew_core::worker::WorkerError;

use crate::CLASS;

/// Every option the class takes.
pub const KEYS: [&str; 16] = [
    "partition",
    "account",
    "qos",
    "time",
    "memory",
    "cpus",
    "gres",
    "nodes",
    "log_dir",
    "extra",
    "preamble",
    "agent",
    "state_dir",
    "job_name",
    "export",
    "shell",
];

/// What is added to a slot's wall time for the Slurm time limit when
/// `time` is not set: the agent retires at its wall time and needs a
/// moment to finish its job and leave.
pub const WALL_GRACE: Duration = Duration::from_secs(300);

/// The options of one launch, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlurmOptions {
    /// `--partition` (a name, or a comma-separated list).
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// `--time`, in Slurm's syntax (a crew duration such as `2h` is
    /// converted to whole minutes, rounded up).
    pub time: Option<String>,
    /// `--mem`, in MiB.
    pub memory_mib: Option<u64>,
    /// `--cpus-per-task`.
    pub cpus: Option<u32>,
    /// `--gres`.
    pub gres: Option<String>,
    /// `--nodes`.
    pub nodes: Option<u32>,
    /// Where each worker's log goes (`crew-<job>_<task>.out`); default
    /// `<state_dir>/logs`.
    pub log_dir: PathBuf,
    /// Extra `#SBATCH` lines, each an sbatch option (`--constraint=avx2`).
    pub extra: Vec<String>,
    /// Shell lines run before the agent (module loads, conda activate).
    pub preamble: Option<String>,
    /// The agent program on the compute nodes; default the controller's
    /// own path (clusters share their software folders).
    pub agent: Option<String>,
    /// A folder the controller and the compute nodes share, for job
    /// scripts and one-time launch secrets; default `~/.crew/slurm`.
    pub state_dir: PathBuf,
    /// The Slurm job name prefix (`crew`).
    pub job_name: String,
    /// `--export` (which of the submitter's variables jobs see); Slurm's
    /// default (`ALL`) when unset.
    pub export: Option<String>,
    /// The interpreter of the batch script (`/bin/bash`: `module` and
    /// `conda` are shell functions that bash imports from the submitter's
    /// environment, a POSIX `sh` may not).
    pub shell: String,
}

fn bad(message: String) -> WorkerError {
    WorkerError::Options { class: CLASS.to_owned(), message }
}

/// One word for an `#SBATCH` line: no whitespace, quotes or `#`, which
/// sbatch would split or cut at.
fn word(key: &str, value: &str, example: &str) -> Result<String, WorkerError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(bad(format!("{key} is empty: give a value ({key}={example}) or leave the option out")));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '#' | '\\')) {
        return Err(bad(format!(
            "{key} {v:?} holds a space, quote, backslash or #, which an #SBATCH line cannot carry ({key}={example})"
        )));
    }
    Ok(v.to_owned())
}

fn positive(key: &str, value: &str) -> Result<u32, WorkerError> {
    match value.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(bad(format!("{key} {value:?} is not a whole number of at least 1 ({key}=4)"))),
    }
}

/// A folder option: absolute, or `~/...` under `$HOME`; no whitespace or
/// `%` (Slurm expands `%` in `--output`).
fn folder(key: &str, value: &str) -> Result<PathBuf, WorkerError> {
    let v = value.trim();
    let path = match v.strip_prefix("~/") {
        Some(rest) => home().ok_or_else(|| bad(format!("{key} {v:?} starts with ~ but HOME is not set")))?.join(rest),
        None => PathBuf::from(v),
    };
    if !path.is_absolute() {
        return Err(bad(format!(
            "{key} {v:?} is not an absolute path: compute nodes start in another folder ({key}=/shared/me/crew)"
        )));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control() || c == '%' || c == '"' || c == '\'') {
        return Err(bad(format!("{key} {v:?} holds a space, quote or %, which Slurm's paths cannot carry")));
    }
    Ok(path)
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// `value` as a Slurm time limit: Slurm's own syntax (`MM`, `MM:SS`,
/// `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`, `UNLIMITED`), or a crew
/// duration (`90m`, `2h`) in whole minutes, rounded up.
pub fn slurm_time(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("unlimited") || v.eq_ignore_ascii_case("infinite") {
        return Ok("UNLIMITED".to_owned());
    }
    let numbers = |s: &str, most: usize| -> bool {
        let parts: Vec<&str> = s.split(':').collect();
        parts.len() <= most
            && parts.iter().all(|p| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if v.bytes().all(|b| b.is_ascii_digit() || b == b':' || b == b'-') && !v.is_empty() {
        let ok = match v.split_once('-') {
            Some((days, rest)) => numbers(days, 1) && numbers(rest, 3),
            None => numbers(v, 3),
        };
        return if ok {
            Ok(v.to_owned())
        } else {
            Err(format!("time {v:?} is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS) nor a duration (90m, 2h)"))
        };
    }
    let d = crew_core::job::parse_duration(v)
        .map_err(|e| format!("time {v:?} is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS) nor a duration: {e}"))?;
    Ok(minutes(d).to_string())
}

/// Whole minutes, rounded up, at least 1 (Slurm counts time limits in
/// minutes).
pub(crate) fn minutes(d: Duration) -> u64 {
    d.as_secs().div_ceil(60).max(1)
}

impl SlurmOptions {
    /// `options` over `defaults`, checked.
    pub fn parse(
        defaults: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<SlurmOptions, WorkerError> {
        if let Some(k) = options.keys().chain(defaults.keys()).find(|k| !KEYS.contains(&k.as_str())) {
            return Err(bad(format!("unknown option {k:?}: the slurm class takes {}", KEYS.join(", "))));
        }
        let mut all = defaults.clone();
        all.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
        let get = |k: &str| all.get(k).map(String::as_str);
        let mut o = SlurmOptions {
            job_name: "crew".to_owned(),
            shell: "/bin/bash".to_owned(),
            state_dir: match get("state_dir") {
                Some(v) => folder("state_dir", v)?,
                None => home()
                    .ok_or_else(|| {
                        bad("HOME is not set: pass --opt state_dir=/shared/folder (seen by the compute nodes)".into())
                    })?
                    .join(".crew/slurm"),
            },
            ..SlurmOptions::default()
        };
        o.log_dir = match get("log_dir") {
            Some(v) => folder("log_dir", v)?,
            None => o.state_dir.join("logs"),
        };
        if let Some(v) = get("partition") {
            o.partition = Some(word("partition", v, "debug")?);
        }
        if let Some(v) = get("account") {
            o.account = Some(word("account", v, "myproject")?);
        }
        if let Some(v) = get("qos") {
            o.qos = Some(word("qos", v, "normal")?);
        }
        if let Some(v) = get("gres") {
            o.gres = Some(word("gres", v, "gpu:1")?);
        }
        if let Some(v) = get("export") {
            o.export = Some(word("export", v, "ALL")?);
        }
        if let Some(v) = get("job_name") {
            let v = v.trim();
            if v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(bad(format!("job_name {v:?}: use 1 to 64 letters, digits, -, _ or . (job_name=crew)")));
            }
            o.job_name = v.to_owned();
        }
        if let Some(v) = get("shell") {
            let v = v.trim();
            if !v.starts_with('/') || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(format!("shell {v:?}: give the interpreter's absolute path (shell=/bin/sh)")));
            }
            o.shell = v.to_owned();
        }
        if let Some(v) = get("time") {
            o.time = Some(slurm_time(v).map_err(bad)?);
        }
        if let Some(v) = get("cpus") {
            o.cpus = Some(positive("cpus", v)?);
        }
        if let Some(v) = get("nodes") {
            o.nodes = Some(positive("nodes", v)?);
        }
        if let Some(v) = get("memory") {
            let v = v.trim();
            if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return Err(bad(format!(
                    "memory {v:?} has no unit: write memory={v}M or memory={v}G (Slurm reads a bare number as \
                     megabytes, crew as bytes, so neither is guessed)"
                )));
            }
            let bytes = crew_core::job::parse_size(v).map_err(|e| bad(format!("memory {v:?}: {e} (memory=4G)")))?;
            let mib = bytes.div_ceil(1 << 20);
            if mib == 0 {
                return Err(bad(format!("memory {v:?} is zero (memory=4G)")));
            }
            o.memory_mib = Some(mib);
        }
        if let Some(v) = get("extra") {
            for line in v.split(['\n', ';']).map(str::trim).filter(|l| !l.is_empty()) {
                let line = line.strip_prefix("#SBATCH").map_or(line, str::trim);
                if !line.starts_with('-') || line.chars().any(|c| c.is_control()) {
                    return Err(bad(format!(
                        "extra line {line:?} is not an sbatch option: write options separated by ; or new lines \
                         (extra=--constraint=avx2;--exclusive)"
                    )));
                }
                if line.starts_with("--array") || line.starts_with("-a") {
                    return Err(bad("extra must not set --array: crew makes one array per launch".into()));
                }
                o.extra.push(line.to_owned());
            }
        }
        if let Some(v) = get("preamble") {
            if v.contains('\0') {
                return Err(bad("preamble holds a NUL byte".into()));
            }
            if !v.trim().is_empty() {
                o.preamble = Some(v.to_owned());
            }
        }
        if let Some(v) = get("agent") {
            let v = v.trim();
            if v.is_empty() || v.chars().any(char::is_control) {
                return Err(bad(format!("agent {v:?}: give the agent program on the compute nodes (agent=crew)")));
            }
            o.agent = Some(v.to_owned());
        }
        Ok(o)
    }

    /// The Slurm time limit of a launch: the `time` option, else the slots'
    /// wall time plus [`WALL_GRACE`] in whole minutes, else none (the
    /// partition's default).
    pub fn time_limit(&self, wall_time: Option<Duration>) -> Option<String> {
        self.time.clone().or_else(|| wall_time.map(|w| minutes(w.saturating_add(WALL_GRACE)).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::{SlurmOptions, slurm_time};

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn options_parse_and_bad_ones_say_how_to_fix_them() {
        let o = SlurmOptions::parse(
            &BTreeMap::new(),
            &opts(&[
                ("partition", "debug"),
                ("memory", "1.5G"),
                ("cpus", "4"),
                ("time", "2h"),
                ("state_dir", "/shared/crew"),
                ("extra", "#SBATCH --constraint=avx2; --exclusive\n"),
                ("preamble", "module load R\nconda activate x"),
            ]),
        )
        .expect("valid");
        assert_eq!(o.partition.as_deref(), Some("debug"));
        assert_eq!(o.memory_mib, Some(1536));
        assert_eq!(o.cpus, Some(4));
        assert_eq!(o.time.as_deref(), Some("120"));
        assert_eq!(o.log_dir, std::path::PathBuf::from("/shared/crew/logs"));
        assert_eq!(o.extra, vec!["--constraint=avx2".to_owned(), "--exclusive".to_owned()]);
        for (bad, says) in [
            (opts(&[("partiton", "x")]), "unknown option \"partiton\""),
            (opts(&[("partition", "a b")]), "space"),
            (opts(&[("partition", "")]), "empty"),
            (opts(&[("memory", "4000")]), "no unit"),
            (opts(&[("memory", "4GB")]), "memory"),
            (opts(&[("cpus", "0")]), "at least 1"),
            (opts(&[("nodes", "two")]), "whole number"),
            (opts(&[("time", "1:2:3:4")]), "not a Slurm time"),
            (opts(&[("log_dir", "logs")]), "absolute"),
            (opts(&[("log_dir", "/x/%j")]), "%"),
            (opts(&[("extra", "constraint=avx2")]), "not an sbatch option"),
            (opts(&[("extra", "--array=0-9")]), "--array"),
            (opts(&[("job_name", "a b")]), "job_name"),
            (opts(&[("shell", "bash")]), "absolute path"),
        ] {
            let e = SlurmOptions::parse(&BTreeMap::new(), &bad).expect_err("refused").to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn times_in_slurm_syntax_or_as_durations() {
        for (given, slurm) in [
            ("30", "30"),
            ("1:30:00", "1:30:00"),
            ("2-12", "2-12"),
            ("1-00:30:00", "1-00:30:00"),
            ("unlimited", "UNLIMITED"),
            ("90s", "2"),
            ("1h", "60"),
        ] {
            assert_eq!(slurm_time(given).as_deref(), Ok(slurm), "{given}");
        }
        for bad in ["", "1-", "-1", "1::2", "soon", "1-2-3"] {
            assert!(slurm_time(bad).is_err(), "{bad}");
        }
        let o = SlurmOptions::parse(&BTreeMap::new(), &opts(&[("state_dir", "/s")])).expect("valid");
        assert_eq!(o.time_limit(Some(Duration::from_secs(3600))).as_deref(), Some("65"));
        assert_eq!(o.time_limit(None), None);
    }
}
