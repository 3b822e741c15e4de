//! The job model: what a user sends, and its identity.
//!
//! A [`JobSpec`] is what is sent: a [`Command`] with its environment, working
//! folder, stdin, limits and tags. The controller gives it a [`JobId`] when it
//! accepts it. The same type travels to the agent on the wire, so every field
//! is plain data (serde, MessagePack on the wire, JSON for users).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tags::Tags;

/// The identity the controller gives an accepted job: unique within one
/// controller (a `crew run`, or one daemon project), increasing in send order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(JobId)
    }
}

/// What a job runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// A program and its arguments, executed directly (no shell).
    Argv(Vec<String>),
    /// A line for `sh -c`.
    Shell(String),
    /// A function compiled into the agent, by name, with JSON arguments
    /// (see [`crate::builtins`]).
    Builtin {
        /// The builtin's registered name (`noop`, `sleep`, `echo`, or one an
        /// embedder registered).
        name: String,
        /// Its arguments, any JSON value (`null` when none).
        #[serde(default)]
        args: serde_json::Value,
    },
}

impl Command {
    /// A short human description, for tables and logs.
    pub fn describe(&self) -> String {
        match self {
            Command::Argv(argv) => argv.join(" "),
            Command::Shell(line) => line.clone(),
            Command::Builtin { name, args } if args.is_null() => format!("builtin:{name}"),
            Command::Builtin { name, args } => format!("builtin:{name} {args}"),
        }
    }
}

/// Default number of crashed attempts after which a job ends `crashed`.
pub const DEFAULT_CRASHES_MAX: u32 = 3;

/// Longest job name accepted, in bytes.
pub const NAME_MAX_LEN: usize = 256;

/// A job as sent by a user: everything needed to run it anywhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Optional name, unique among the controller's jobs that are not yet
    /// received. The seed is derived from it when present.
    #[serde(default)]
    pub name: Option<String>,
    /// The job runs only on a worker whose tags include all of these.
    #[serde(default)]
    pub tags: Tags,
    /// What to run.
    pub command: Command,
    /// Extra environment variables for the job's processes.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working folder on the worker; the agent's own when absent.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Bytes fed to the job's stdin; `/dev/null` when absent.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Wall-clock limit of one attempt: SIGTERM, then SIGKILL to the whole
    /// process group, and the job ends `timed_out`.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Re-runs after a failure exit (status `failed`); 0 by default.
    #[serde(default)]
    pub retries: u32,
    /// Crashed attempts (the worker died under the job) before the job ends
    /// `crashed`.
    #[serde(default = "default_crashes_max")]
    pub crashes_max: u32,
    /// Higher runs first; equal priorities run in send order.
    #[serde(default)]
    pub priority: i32,
}

fn default_crashes_max() -> u32 {
    DEFAULT_CRASHES_MAX
}

impl JobSpec {
    /// A job running `command` with every other field at its default.
    pub fn new(command: Command) -> Self {
        Self {
            name: None,
            tags: Tags::new(),
            command,
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: None,
            retries: 0,
            crashes_max: DEFAULT_CRASHES_MAX,
            priority: 0,
        }
    }

    /// A job running `line` with `sh -c`.
    pub fn shell(line: impl Into<String>) -> Self {
        Self::new(Command::Shell(line.into()))
    }

    /// A job running a builtin function.
    pub fn builtin(name: impl Into<String>, args: serde_json::Value) -> Self {
        Self::new(Command::Builtin { name: name.into(), args })
    }

    /// Sets the name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the tags.
    pub fn with_tags(mut self, tags: Tags) -> Self {
        self.tags = tags;
        self
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Checks everything that can be checked before the job is accepted, so
    /// that a bad job is refused at `send` rather than failing on a worker.
    pub fn validate(&self) -> Result<(), JobError> {
        if let Some(name) = &self.name {
            if name.is_empty() {
                return Err(JobError::new("the name cannot be empty"));
            }
            if name.len() > NAME_MAX_LEN {
                return Err(JobError::new("the name is longer than 256 bytes"));
            }
            if name.chars().any(char::is_control) {
                return Err(JobError::new("the name contains a control character"));
            }
        }
        match &self.command {
            Command::Argv(argv) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(JobError::new("the command is empty: give at least a program"));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(JobError::new("a command argument contains a NUL byte"));
                }
            }
            Command::Shell(line) => {
                if line.trim().is_empty() {
                    return Err(JobError::new("the shell line is empty"));
                }
                if line.contains('\0') {
                    return Err(JobError::new("the shell line contains a NUL byte"));
                }
            }
            Command::Builtin { name, .. } => {
                if name.is_empty() {
                    return Err(JobError::new("the builtin name is empty"));
                }
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(JobError::new(format!(
                    "invalid environment variable name {k:?}: it must be non-empty, without '=' or NUL"
                )));
            }
            if v.contains('\0') {
                return Err(JobError::new(format!("the value of environment variable {k} contains a NUL byte")));
            }
        }
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return Err(JobError::new("the timeout must be greater than zero"));
            }
        }
        if self.crashes_max == 0 {
            return Err(JobError::new("crashes_max must be at least 1"));
        }
        Ok(())
    }

    /// The key the seed derives from: the name, or the id when unnamed.
    pub fn seed_key(&self, id: JobId) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => id.to_string(),
        }
    }
}

/// A job that cannot be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

impl JobError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Parses a duration as users write it: `30s`, `1m30s`, `500ms`, `2h`, or a
/// plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, JobError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if (0.0..1e12).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(JobError::new(format!("invalid duration {s:?}: out of range")));
    }
    humantime::parse_duration(s).map_err(|e| {
        JobError::new(format!("invalid duration {s:?} ({e}); write e.g. 30s, 1m30s, 500ms or a number of seconds"))
    })
}

/// One job line in the JSON form (see README, "Job lines").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    name: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    command: Option<Vec<String>>,
    shell: Option<String>,
    builtin: Option<String>,
    args: Option<serde_json::Value>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    stdin: Option<String>,
    timeout: Option<DurationField>,
    retries: Option<u32>,
    crashes_max: Option<u32>,
    priority: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationField {
    Seconds(f64),
    Text(String),
}

/// Defaults applied to job lines that do not set the field themselves.
#[derive(Clone, Debug, Default)]
pub struct LineDefaults {
    /// Tags added to every job.
    pub tags: Tags,
    /// Timeout for jobs without one.
    pub timeout: Option<Duration>,
    /// Retries for jobs without a `retries` field.
    pub retries: Option<u32>,
}

/// Parses a job given as a JSON value of the job-line form (an object with
/// `name`, `tags`, `command`/`shell`/`builtin`, ...; see README, "Job
/// lines"), as APIs receive it. Returns a validated job.
pub fn parse_job_value(value: serde_json::Value, defaults: &LineDefaults) -> Result<JobSpec, JobError> {
    if !value.is_object() {
        return Err(JobError::new("a job must be a JSON object"));
    }
    let line: JobLine = serde_json::from_value(value).map_err(|e| JobError::new(format!("invalid JSON job: {e}")))?;
    finish(from_json(line, defaults)?, defaults)
}

/// Parses one non-empty job line: a JSON object (when it starts with `{`) or
/// else a plain shell command line. Returns a validated job.
pub fn parse_job_line(line: &str, defaults: &LineDefaults) -> Result<JobSpec, JobError> {
    let trimmed = line.trim();
    let spec = if trimmed.starts_with('{') {
        let l: JobLine = serde_json::from_str(trimmed).map_err(|e| JobError::new(format!("invalid JSON job: {e}")))?;
        from_json(l, defaults)?
    } else {
        let mut s = JobSpec::shell(trimmed);
        s.retries = defaults.retries.unwrap_or(0);
        s
    };
    finish(spec, defaults)
}

fn from_json(l: JobLine, defaults: &LineDefaults) -> Result<JobSpec, JobError> {
    let command = match (l.command, l.shell, l.builtin) {
        (Some(argv), None, None) => Command::Argv(argv),
        (None, Some(line), None) => Command::Shell(line),
        (None, None, Some(name)) => Command::Builtin { name, args: l.args.clone().unwrap_or(serde_json::Value::Null) },
        (None, None, None) => {
            return Err(JobError::new(
                "the job has no command: give one of \"command\" (argv array), \"shell\" (string) or \"builtin\" (name)",
            ));
        }
        _ => {
            return Err(JobError::new("give exactly one of \"command\", \"shell\" or \"builtin\""));
        }
    };
    if l.args.is_some() && !matches!(command, Command::Builtin { .. }) {
        return Err(JobError::new("\"args\" goes only with \"builtin\""));
    }
    let tags = Tags::try_from_iter(l.tags).map_err(|e| JobError::new(e.to_string()))?;
    let timeout = match l.timeout {
        None => None,
        Some(DurationField::Seconds(s)) => Some(parse_duration(&s.to_string())?),
        Some(DurationField::Text(t)) => Some(parse_duration(&t)?),
    };
    Ok(JobSpec {
        name: l.name,
        tags,
        command,
        env: l.env,
        cwd: l.cwd,
        stdin: l.stdin,
        timeout,
        retries: l.retries.or(defaults.retries).unwrap_or(0),
        crashes_max: l.crashes_max.unwrap_or(DEFAULT_CRASHES_MAX),
        priority: l.priority.unwrap_or(0),
    })
}

/// Applies the defaults a job did not set, then validates it.
fn finish(mut spec: JobSpec, defaults: &LineDefaults) -> Result<JobSpec, JobError> {
    if spec.timeout.is_none() {
        spec.timeout = defaults.timeout;
    }
    if !defaults.tags.is_empty() {
        let merged = spec.tags.iter().chain(defaults.tags.iter()).map(str::to_owned);
        spec.tags = Tags::try_from_iter(merged).map_err(|e| JobError::new(e.to_string()))?;
    }
    spec.validate()?;
    Ok(spec)
}

/// A bad line in a job file: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}: {reason}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: JobError,
}

/// Parses a whole job file: every non-empty line that is not a `#` comment.
/// All bad lines are reported (not only the first), and nothing is returned
/// unless every line is good, so that a file either runs whole or not at all.
/// Names must be unique within the file.
pub fn parse_job_file(text: &str, defaults: &LineDefaults) -> Result<Vec<JobSpec>, Vec<LineError>> {
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    let mut names = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match parse_job_line(t, defaults) {
            Ok(spec) => {
                if let Some(name) = &spec.name {
                    if let Some(first) = names.insert(name.clone(), i + 1) {
                        errors.push(LineError {
                            line: i + 1,
                            reason: JobError::new(format!("duplicate job name {name:?} (first used on line {first})")),
                        });
                        continue;
                    }
                }
                jobs.push(spec);
            }
            Err(reason) => errors.push(LineError { line: i + 1, reason }),
        }
    }
    if errors.is_empty() { Ok(jobs) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_is_shell() {
        let j = parse_job_line("echo hi | wc -c", &LineDefaults::default()).unwrap();
        assert_eq!(j.command, Command::Shell("echo hi | wc -c".into()));
    }

    #[test]
    fn json_forms() {
        let d = LineDefaults::default();
        let j = parse_job_line(
            r#"{"name":"a","tags":["gpu"],"command":["python","x.py"],"env":{"K":"V"},"timeout":"30s","retries":2}"#,
            &d,
        )
        .unwrap();
        assert_eq!(j.command, Command::Argv(vec!["python".into(), "x.py".into()]));
        assert_eq!(j.timeout, Some(Duration::from_secs(30)));
        assert_eq!(j.retries, 2);
        assert_eq!(j.crashes_max, DEFAULT_CRASHES_MAX);
        let b = parse_job_line(r#"{"builtin":"sleep","args":{"seconds":1},"timeout":1.5}"#, &d).unwrap();
        assert!(matches!(b.command, Command::Builtin { .. }));
        assert_eq!(b.timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn bad_lines() {
        let d = LineDefaults::default();
        for bad in [
            r#"{"shell":"x","command":["y"]}"#,
            r#"{"name":"x"}"#,
            r#"{"shell":"x","bogus":1}"#,
            r#"{"shell":"x","timeout":"soon"}"#,
            r#"{"command":[]}"#,
            r#"{"shell":"x","args":1}"#,
            r#"{"shell":"x","tags":["a b"]}"#,
            r#"{"shell":"x","crashes_max":0}"#,
            r#"{"shell":"#,
        ] {
            assert!(parse_job_line(bad, &d).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_reports_every_bad_line() {
        let text = "true\n\n# comment\n{\"bad\n{\"name\":\"a\",\"shell\":\"x\"}\n{\"name\":\"a\",\"shell\":\"y\"}\n";
        let errs = parse_job_file(text, &LineDefaults::default()).unwrap_err();
        assert_eq!(errs.iter().map(|e| e.line).collect::<Vec<_>>(), vec![4, 6]);
    }

    #[test]
    fn json_values_parse_like_lines() {
        let d = LineDefaults::default();
        let v = serde_json::json!({"name": "a", "command": ["echo", "x"], "timeout": "2s"});
        let from_value = parse_job_value(v.clone(), &d).unwrap();
        assert_eq!(from_value, parse_job_line(&v.to_string(), &d).unwrap());
        assert!(parse_job_value(serde_json::json!("echo hi"), &d).is_err());
        assert!(parse_job_value(serde_json::json!({"shell": "x", "bogus": 1}), &d).is_err());
    }

    #[test]
    fn defaults_apply() {
        let d = LineDefaults { tags: "x".parse().unwrap(), timeout: Some(Duration::from_secs(5)), retries: Some(1) };
        let j = parse_job_line(r#"{"shell":"x","tags":["y"]}"#, &d).unwrap();
        assert_eq!(j.tags.to_string(), "x,y");
        assert_eq!(j.retries, 1);
        assert_eq!(j.timeout, Some(Duration::from_secs(5)));
    }
}
