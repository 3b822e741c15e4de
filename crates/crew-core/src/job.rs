//! The job model: what a user sends, and its identity.
//!
//! A [`JobSpec`] is what is sent: a [`Command`] with its environment, working
//! folder, stdin, limits and tags, and the data it reads ([`Input`]) and
//! writes (output patterns). The controller gives it a [`JobId`] when it
//! accepts it. The same type travels to the agent on the wire, so every field
//! is plain data (serde, MessagePack on the wire, JSON for users).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
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
    /// (see the crew-exec crate's builtins).
    Builtin {
        /// The builtin's registered name (`noop`, `sleep`, `echo`, or one an
        /// embedder registered).
        name: String,
        /// Its arguments, any JSON value (`null` when none).
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
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
///
/// Its serde form (the journal's, and the wire's to agents) leaves out
/// every field at its default, so that a million small jobs are a million
/// small records; what users write and read is [`JobSpec::as_line`]. The
/// fields most jobs leave at their defaults are in [`JobSpec::opts`], held
/// out of line, so that a queued job that sets none of them costs a pointer
/// for them all (see [`Opts`]); the serde form is flat all the same.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "SpecFields")]
#[non_exhaustive]
pub struct JobSpec {
    /// Optional name, unique among the controller's jobs that are not yet
    /// received. The seed is derived from it when present.
    pub name: Option<String>,
    /// The job runs only on a worker whose tags include all of these.
    pub tags: Tags,
    /// What to run.
    pub command: Command,
    /// Extra environment variables for the job's processes.
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit of one attempt: SIGTERM, then SIGKILL to the whole
    /// process group, and the job ends `timed_out`.
    pub timeout: Option<Duration>,
    /// Re-runs after a failure exit (status `failed`); 0 by default.
    pub retries: u32,
    /// Crashed attempts (the worker died under the job) before the job ends
    /// `crashed`.
    pub crashes_max: u32,
    /// Higher runs first; equal priorities run in send order.
    pub priority: i32,
    /// Everything else a job may set: its working folder, stdin, CPU and
    /// memory limits, inherited variables, inputs and outputs. Read them as
    /// `spec.opts.cwd`; a write (`spec.opts.cwd = Some(..)`) gives the job
    /// its own [`JobOptions`] first.
    pub opts: Opts,
}

/// The fields of a [`JobSpec`] that most jobs leave at their defaults.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct JobOptions {
    /// Names of variables the job takes from its worker's environment
    /// (when set there), on top of [`BASE_ENV`]. Only names
    /// travel: the agent reads the values where the job runs, so an
    /// inherited secret is never sent or journaled. The agent-only
    /// variables ([`crate::worker::AGENT_ONLY_ENV`]) are refused.
    pub env_inherit: Vec<String>,
    /// Working folder on the worker; the agent's own when absent.
    pub cwd: Option<PathBuf>,
    /// Bytes fed to the job's stdin; `/dev/null` when absent.
    pub stdin: Option<String>,
    /// CPU time (user + system) one process of the job may use: past it,
    /// the process gets SIGXCPU (SIGKILL a little later) and the job ends
    /// `cpu_limit`. Enforced per process with `RLIMIT_CPU`, in whole
    /// seconds (rounded up); see the crew-exec crate.
    pub cpu: Option<Duration>,
    /// Memory in bytes one process of the job may allocate (`RLIMIT_DATA`:
    /// heap and private writable mappings); see the crew-exec crate.
    pub memory: Option<u64>,
    /// Files the job reads, put in its working folder before it starts.
    /// The controller accepts only staged inputs ([`InputSource::Object`]);
    /// see [`crate::staging`].
    pub inputs: Vec<Input>,
    /// Glob patterns, relative to the job's working folder, of the files
    /// uploaded to the store when the job ends (`*` and `?` within a path
    /// segment, `**` for any number of segments).
    pub outputs: Vec<String>,
    /// Where the outputs go in the store instead of `jobs/<id>`: an
    /// attempt's files are then `<prefix>/<attempt>/outputs/<name>` and its
    /// manifest `<prefix>/<attempt>/manifest.json`. Pipelines use it to keep
    /// outputs under keys that no other controller's job ids can reuse.
    pub output_prefix: Option<String>,
}

/// What a job that sets no [`JobOptions`] reads.
static NO_OPTIONS: JobOptions = JobOptions {
    env_inherit: Vec::new(),
    cwd: None,
    stdin: None,
    cpu: None,
    memory: None,
    inputs: Vec::new(),
    outputs: Vec::new(),
    output_prefix: None,
};

/// A job's [`JobOptions`], held out of line: nothing (one pointer, null)
/// while every option is at its default, a box of its own once one is set.
/// It reads as a `JobOptions` (`Deref`); writing through it (`DerefMut`)
/// boxes the defaults first. Two are equal when their options are, boxed or
/// not.
#[derive(Clone, Default)]
pub struct Opts(Option<Box<JobOptions>>);

impl Opts {
    /// True when every option is at its default.
    pub fn is_default(&self) -> bool {
        self.0.as_deref().is_none_or(|o| *o == NO_OPTIONS)
    }
}

impl std::ops::Deref for Opts {
    type Target = JobOptions;
    fn deref(&self) -> &JobOptions {
        self.0.as_deref().unwrap_or(&NO_OPTIONS)
    }
}

impl std::ops::DerefMut for Opts {
    fn deref_mut(&mut self) -> &mut JobOptions {
        self.0.get_or_insert_with(Box::default)
    }
}

impl PartialEq for Opts {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for Opts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl From<JobOptions> for Opts {
    fn from(o: JobOptions) -> Self {
        if o == NO_OPTIONS { Self(None) } else { Self(Some(Box::new(o))) }
    }
}

/// The serde form of a [`JobSpec`] as read: every field flat, those at
/// their defaults left out ([`SpecFieldsRef`] writes it).
#[derive(Deserialize)]
struct SpecFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    tags: Tags,
    command: Command,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    env_inherit: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cwd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpu: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    retries: u32,
    #[serde(default = "default_crashes_max", skip_serializing_if = "is_default_crashes")]
    crashes_max: u32,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    priority: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<Input>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_prefix: Option<String>,
}

impl From<SpecFields> for JobSpec {
    fn from(f: SpecFields) -> Self {
        let opts = JobOptions {
            env_inherit: f.env_inherit,
            cwd: f.cwd,
            stdin: f.stdin,
            cpu: f.cpu,
            memory: f.memory,
            inputs: f.inputs,
            outputs: f.outputs,
            output_prefix: f.output_prefix,
        };
        Self {
            name: f.name,
            tags: f.tags,
            command: f.command,
            env: f.env,
            timeout: f.timeout,
            retries: f.retries,
            crashes_max: f.crashes_max,
            priority: f.priority,
            opts: opts.into(),
        }
    }
}

/// The serde form of a [`JobSpec`] as written, borrowed: [`SpecFields`]'
/// fields in the same order, those at their defaults left out.
#[derive(Serialize)]
struct SpecFieldsRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    tags: &'a Tags,
    command: &'a Command,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    env_inherit: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdin: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<u64>,
    #[serde(skip_serializing_if = "is_zero")]
    retries: u32,
    #[serde(skip_serializing_if = "is_default_crashes")]
    crashes_max: u32,
    #[serde(skip_serializing_if = "is_zero_i")]
    priority: i32,
    #[serde(skip_serializing_if = "<[Input]>::is_empty")]
    inputs: &'a [Input],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    outputs: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    output_prefix: Option<&'a str>,
}

impl Serialize for JobSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let o: &JobOptions = &self.opts;
        SpecFieldsRef {
            name: self.name.as_deref(),
            tags: &self.tags,
            command: &self.command,
            env: &self.env,
            env_inherit: &o.env_inherit,
            cwd: o.cwd.as_deref(),
            stdin: o.stdin.as_deref(),
            timeout: self.timeout,
            cpu: o.cpu,
            memory: o.memory,
            retries: self.retries,
            crashes_max: self.crashes_max,
            priority: self.priority,
            inputs: &o.inputs,
            outputs: &o.outputs,
            output_prefix: o.output_prefix.as_deref(),
        }
        .serialize(serializer)
    }
}

/// A file a job reads: where it comes from, and the relative path it gets in
/// the job's working folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Input {
    /// Relative path in the job's working folder (`data.csv`, `in/a.bin`).
    pub name: String,
    /// Where its bytes are.
    pub source: InputSource,
}

/// Where an input's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSource {
    /// A file on the sending machine, not yet staged.
    Path(PathBuf),
    /// An object in the store (staged): its key, size and SHA-256, which the
    /// agent checks after the download.
    Object {
        /// The store key (`cas/sha256/<hex>` when staged by crew).
        key: String,
        /// Its size in bytes.
        size: u64,
        /// Its SHA-256, lowercase hex.
        sha256: String,
    },
}

impl Input {
    /// A staged input: the store object `key` (of `size` bytes and SHA-256
    /// `sha256`, lowercase hex), named `name` in the job's folder.
    pub fn object(name: impl Into<String>, key: impl Into<String>, size: u64, sha256: impl Into<String>) -> Self {
        Self { name: name.into(), source: InputSource::Object { key: key.into(), size, sha256: sha256.into() } }
    }

    /// An input read from the file `path` on this machine, named `name` in
    /// the job's folder (not yet staged).
    pub fn path(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), source: InputSource::Path(path.into()) }
    }

    /// Parses the command-line form `PATH[=NAME]`; the name defaults to the
    /// file name of `PATH` (the last `=` separates them, so a path may hold
    /// `=`; a name cannot).
    pub fn parse(text: &str) -> Result<Self, JobError> {
        let (path, name) = match text.rsplit_once('=') {
            Some((path, name)) => (path, Some(name)),
            None => (text, None),
        };
        Self::from_path_and_name(path, name)
    }

    fn from_path_and_name(path: &str, name: Option<&str>) -> Result<Self, JobError> {
        if path.is_empty() {
            return Err(JobError::new("an input has an empty path"));
        }
        let name = match name {
            Some(n) => n.to_owned(),
            None => match Path::new(path).file_name().and_then(|n| n.to_str()) {
                Some(n) => n.to_owned(),
                None => {
                    return Err(JobError::new(format!(
                        "input {path:?}: cannot take a name from this path; write PATH=NAME"
                    )));
                }
            },
        };
        Ok(Self::path(name, path))
    }
}

/// Longest relative path (input name, output pattern) accepted, in bytes.
pub const RELATIVE_PATH_MAX_LEN: usize = 512;

/// Checks a path relative to a job's working folder (an input name, an
/// output pattern, an output name): `/`-separated segments, none empty, `.`
/// or `..`, no control character or backslash, not absolute. Such a path
/// cannot name anything outside the folder it is joined to (symbolic links
/// aside, which the agent refuses to follow).
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.len() > RELATIVE_PATH_MAX_LEN {
        return Err(format!("the path is longer than {RELATIVE_PATH_MAX_LEN} bytes"));
    }
    if path.starts_with('/') {
        return Err("the path is absolute; give a path relative to the job's working folder".into());
    }
    for seg in path.split('/') {
        if seg.is_empty() {
            return Err("the path has an empty segment (// or a trailing /)".into());
        }
        if seg == "." || seg == ".." {
            return Err("the path has a . or .. segment; it must stay inside the job's working folder".into());
        }
        if seg.chars().any(|c| c.is_control() || c == '\\') {
            return Err("the path has a control character or a backslash".into());
        }
    }
    Ok(())
}

/// Checks an environment variable name: non-empty, without `=` or NUL.
fn check_env_name(name: &str) -> Result<(), JobError> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(JobError::new(format!(
            "invalid environment variable name {name:?}: it must be non-empty, without '=' or NUL"
        )));
    }
    Ok(())
}

/// True for a lowercase hex SHA-256 (64 characters).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
            timeout: None,
            retries: 0,
            crashes_max: DEFAULT_CRASHES_MAX,
            priority: 0,
            opts: Opts::default(),
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
            check_env_name(k)?;
            if v.contains('\0') {
                return Err(JobError::new(format!("the value of environment variable {k} contains a NUL byte")));
            }
        }
        for name in &self.opts.env_inherit {
            check_env_name(name).map_err(|e| JobError::new(format!("env_inherit: {e}")))?;
            if crate::worker::AGENT_ONLY_ENV.contains(&name.as_str()) {
                return Err(JobError::new(format!(
                    "env_inherit: {name} belongs to the worker's agent (its connection to the controller) and is \
                     never passed to jobs; remove it, or pass a value with env"
                )));
            }
        }
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return Err(JobError::new("the timeout must be greater than zero"));
            }
        }
        if let Some(cpu) = self.opts.cpu {
            if cpu.is_zero() {
                return Err(JobError::new("the cpu limit must be greater than zero"));
            }
            if cpu > CPU_LIMIT_MAX {
                return Err(JobError::new(format!(
                    "the cpu limit must be at most {} days; leave it out for no limit",
                    CPU_LIMIT_MAX.as_secs() / 86_400
                )));
            }
        }
        if let Some(memory) = self.opts.memory {
            if !(MEMORY_LIMIT_MIN..=SIZE_MAX).contains(&memory) {
                return Err(JobError::new(format!(
                    "the memory limit must be between 1MiB and 1PiB (got {memory} bytes); leave it out for no limit"
                )));
            }
        }
        if self.crashes_max == 0 {
            return Err(JobError::new("crashes_max must be at least 1"));
        }
        let mut names = std::collections::HashSet::new();
        for input in &self.opts.inputs {
            check_relative_path(&input.name).map_err(|e| JobError::new(format!("input name {:?}: {e}", input.name)))?;
            if !names.insert(input.name.as_str()) {
                return Err(JobError::new(format!("two inputs are named {:?}", input.name)));
            }
            match &input.source {
                InputSource::Path(p) if p.as_os_str().is_empty() => {
                    return Err(JobError::new(format!("input {:?} has an empty path", input.name)));
                }
                InputSource::Path(_) => {}
                InputSource::Object { key, sha256, .. } => {
                    crate::store::StoreKey::new(key.as_str())
                        .map_err(|e| JobError::new(format!("input {:?}: {e}", input.name)))?;
                    if !is_sha256_hex(sha256) {
                        return Err(JobError::new(format!(
                            "input {:?}: sha256 must be 64 lowercase hex digits",
                            input.name
                        )));
                    }
                }
            }
        }
        for pattern in &self.opts.outputs {
            check_relative_path(pattern).map_err(|e| JobError::new(format!("output {pattern:?}: {e}")))?;
        }
        if let Some(prefix) = &self.opts.output_prefix {
            crate::store::StoreKey::new(prefix.as_str())
                .map_err(|e| JobError::new(format!("output_prefix {prefix:?}: {e}")))?;
        }
        Ok(())
    }

    /// True when the job has inputs or outputs (it needs a store, and runs
    /// in a working folder of its own unless it has a `cwd`).
    pub fn has_data(&self) -> bool {
        !self.opts.inputs.is_empty() || !self.opts.outputs.is_empty()
    }

    /// The first input that is not staged yet (still a local path).
    pub fn unstaged_input(&self) -> Option<&Input> {
        self.opts.inputs.iter().find(|i| matches!(i.source, InputSource::Path(_)))
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

/// Smallest memory limit accepted: below it, no program could even start.
pub const MEMORY_LIMIT_MIN: u64 = 1 << 20;

/// Largest size [`parse_size`] accepts (1 PiB): anything larger is a typo.
pub const SIZE_MAX: u64 = 1 << 50;

/// Largest CPU limit accepted (a year of CPU time).
pub const CPU_LIMIT_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a size as users write it: a plain number of bytes (`1048576`), or
/// a number and a binary unit: `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`
/// (powers of 1024, any case; `B` for bytes). Decimal units (`KB`, `MB`, `GB`) are
/// refused rather than guessed. Fractions are taken (`1.5GiB`) and rounded
/// down to whole bytes; the result is at most [`SIZE_MAX`].
pub fn parse_size(s: &str) -> Result<u64, JobError> {
    let t = s.trim();
    let bad = || {
        JobError::new(format!(
            "invalid size {s:?}: write a number of bytes or a number with a unit, e.g. 512MiB, 2GiB, 64M (units \
             B, K/KiB, M/MiB, G/GiB, T/TiB)"
        ))
    };
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = if number.contains('.') {
        let n: f64 = number.parse().map_err(|_| bad())?;
        let b = n * scale as f64;
        if !b.is_finite() || b > SIZE_MAX as f64 {
            return Err(JobError::new(format!("invalid size {s:?}: more than 1PiB")));
        }
        b as u64
    } else {
        let n: u64 = number.parse().map_err(|_| bad())?;
        n.checked_mul(scale)
            .filter(|b| *b <= SIZE_MAX)
            .ok_or_else(|| JobError::new(format!("invalid size {s:?}: more than 1PiB")))?
    };
    Ok(bytes)
}
/// The longest duration crew accepts anywhere it parses one (timeouts,
/// idle and wall limits, grace periods): 10 years. Longer is surely a
/// mistake, and would overflow the clock arithmetic of deadlines.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses a duration as users write it: `30s`, `1m30s`, `500ms`, `2h`, or a
/// plain number of seconds (`1.5`); at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, JobError> {
    let s = s.trim();
    let too_long = || JobError::new(format!("invalid duration {s:?}: longer than the limit of 10 years (3650d)"));
    if let Ok(secs) = s.parse::<f64>() {
        if !(secs >= 0.0 && secs.is_finite()) {
            return Err(JobError::new(format!(
                "invalid duration {s:?}: write a positive number of seconds or e.g. 30s"
            )));
        }
        if secs > MAX_DURATION.as_secs_f64() {
            return Err(too_long());
        }
        return Ok(Duration::from_secs_f64(secs));
    }
    let d = humantime::parse_duration(s).map_err(|e| {
        let e = e.to_string();
        if e.contains("overflow") {
            too_long()
        } else {
            JobError::new(format!("invalid duration {s:?} ({e}); write e.g. 30s, 1m30s, 500ms or a number of seconds"))
        }
    })?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// The largest a job may be on the wire (MessagePack, as the controller
/// sends it to an agent): a frame ([`crate::protocol::MAX_FRAME`]) less
/// room for the frame's other fields. A job over it is refused when it is
/// sent (a huge argv, environment or stdin): large data goes through the
/// store as an input file.
pub const MAX_JOB_BYTES: usize = crate::protocol::MAX_FRAME - 64 * 1024;

/// Counts the bytes written to it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl JobSpec {
    /// The job's size on the wire, in bytes.
    pub fn wire_size(&self) -> usize {
        let mut c = Counter(0);
        // Serializing a JobSpec does not fail (string keys, no maps with
        // other keys); a failure would count as too large.
        match rmp_serde::encode::write_named(&mut c, self) {
            Ok(()) => c.0,
            Err(_) => usize::MAX,
        }
    }

    /// Refuses a job too large to be sent to an agent in one frame
    /// ([`MAX_JOB_BYTES`]), with an error that says what to do.
    pub fn check_size(&self) -> Result<(), JobError> {
        let size = self.wire_size();
        if size > MAX_JOB_BYTES {
            return Err(JobError::new(format!(
                "the job is too large: {} on the wire (command line, environment and stdin), over the limit of {}; \
                 pass large data as an input file (--input, \"inputs\") instead",
                human_bytes(size),
                human_bytes(MAX_JOB_BYTES)
            )));
        }
        Ok(())
    }
}

fn human_bytes(n: usize) -> String {
    if n == usize::MAX {
        return "more than can be counted".to_owned();
    }
    format!("{n} bytes ({:.1} MiB)", n as f64 / (1024.0 * 1024.0))
}

/// One job line in the JSON form (see README, "Job lines"), as read;
/// [`JobLineRef`] writes it.
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
    #[serde(default)]
    env_inherit: Vec<String>,
    cwd: Option<PathBuf>,
    stdin: Option<String>,
    timeout: Option<DurationField>,
    cpu: Option<DurationField>,
    memory: Option<SizeField>,
    retries: Option<u32>,
    crashes_max: Option<u32>,
    priority: Option<i32>,
    #[serde(default)]
    inputs: Vec<serde_json::Value>,
    #[serde(default)]
    outputs: Vec<String>,
    output_prefix: Option<String>,
}

impl JobSpec {
    /// This job in the job-line JSON form, borrowed, to serialize: what a
    /// client sends to the daemon's `POST /v1/jobs`, and what
    /// [`parse_job_value`] reads back to an equal job. Fields at their
    /// defaults are left out, to keep big requests small.
    pub fn as_line(&self) -> JobLineRef<'_> {
        let (command, shell, builtin, args) = match &self.command {
            Command::Argv(argv) => (Some(argv.as_slice()), None, None, None),
            Command::Shell(line) => (None, Some(line.as_str()), None, None),
            Command::Builtin { name, args } => (None, None, Some(name.as_str()), (!args.is_null()).then_some(args)),
        };
        JobLineRef {
            name: self.name.as_deref(),
            tags: &self.tags,
            command,
            shell,
            builtin,
            args,
            env: &self.env,
            env_inherit: &self.opts.env_inherit,
            cwd: self.opts.cwd.as_deref(),
            stdin: self.opts.stdin.as_deref(),
            timeout: self.timeout.map(|d| d.as_secs_f64()),
            cpu: self.opts.cpu.map(|d| d.as_secs_f64()),
            memory: self.opts.memory,
            retries: self.retries,
            crashes_max: self.crashes_max,
            priority: self.priority,
            inputs: self.opts.inputs.iter().map(InputRef::from).collect(),
            outputs: &self.opts.outputs,
            output_prefix: self.opts.output_prefix.as_deref(),
        }
    }
}

/// A job in the job-line JSON form, borrowed from a [`JobSpec`]
/// ([`JobSpec::as_line`]); serialize it.
#[derive(Debug, Serialize)]
pub struct JobLineRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Tags::is_empty")]
    tags: &'a Tags,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shell: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    builtin: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    env_inherit: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdin: Option<&'a str>,
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<f64>,
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<f64>,
    /// Bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<u64>,
    #[serde(skip_serializing_if = "is_zero")]
    retries: u32,
    #[serde(skip_serializing_if = "is_default_crashes")]
    crashes_max: u32,
    #[serde(skip_serializing_if = "is_zero_i")]
    priority: i32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<InputRef<'a>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    outputs: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    output_prefix: Option<&'a str>,
}

/// An input in the job-line JSON form: `{"path", "name"}` or a staged
/// object `{"name", "key", "size", "sha256"}`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum InputRef<'a> {
    Path { path: &'a Path, name: &'a str },
    Object { name: &'a str, key: &'a str, size: u64, sha256: &'a str },
}

impl<'a> From<&'a Input> for InputRef<'a> {
    fn from(i: &'a Input) -> Self {
        match &i.source {
            InputSource::Path(path) => InputRef::Path { path, name: &i.name },
            InputSource::Object { key, size, sha256 } => InputRef::Object { name: &i.name, key, size: *size, sha256 },
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_i(n: &i32) -> bool {
    *n == 0
}

fn is_default_crashes(n: &u32) -> bool {
    *n == DEFAULT_CRASHES_MAX
}

/// An input in a job line: `"PATH[=NAME]"`, `{"path", "name"?}`, or a
/// staged object `{"name", "key", "size", "sha256"}`; converted by hand for
/// clear errors.
fn input_from_json(value: serde_json::Value) -> Result<Input, JobError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PathForm {
        path: String,
        #[serde(default)]
        name: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ObjectForm {
        name: String,
        key: String,
        size: u64,
        sha256: String,
    }
    let shown = value.to_string();
    match value {
        serde_json::Value::String(t) => Input::parse(&t),
        serde_json::Value::Object(map) if map.contains_key("path") => {
            let f: PathForm = serde_json::from_value(serde_json::Value::Object(map))
                .map_err(|e| JobError::new(format!("input {shown}: {e}")))?;
            Input::from_path_and_name(&f.path, f.name.as_deref())
        }
        serde_json::Value::Object(map) => {
            let f: ObjectForm = serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| {
                JobError::new(format!(
                    "input {shown}: {e} (give {{\"path\", \"name\"}} or a staged {{\"name\", \"key\", \"size\", \"sha256\"}})"
                ))
            })?;
            Ok(Input { name: f.name, source: InputSource::Object { key: f.key, size: f.size, sha256: f.sha256 } })
        }
        _ => Err(JobError::new(format!(
            "input {shown}: give \"PATH[=NAME]\", {{\"path\": .., \"name\": ..}} or a staged object"
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationField {
    Seconds(f64),
    Text(String),
}

impl DurationField {
    fn parse(self) -> Result<Duration, JobError> {
        match self {
            DurationField::Seconds(s) => parse_duration(&s.to_string()),
            DurationField::Text(t) => parse_duration(&t),
        }
    }
}

/// A size in a job line: a number of bytes or a string such as `"2GiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeField {
    Bytes(u64),
    Text(String),
}

impl SizeField {
    fn parse(self) -> Result<u64, JobError> {
        match self {
            SizeField::Bytes(b) if b <= SIZE_MAX => Ok(b),
            SizeField::Bytes(b) => Err(JobError::new(format!("invalid size {b}: more than 1PiB"))),
            SizeField::Text(t) => parse_size(&t),
        }
    }
}

/// Defaults applied to job lines that do not set the field themselves.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct LineDefaults {
    /// Tags added to every job.
    pub tags: Tags,
    /// Timeout for jobs without one.
    pub timeout: Option<Duration>,
    /// Retries for jobs without a `retries` field.
    pub retries: Option<u32>,
    /// CPU limit for jobs without one.
    pub cpu: Option<Duration>,
    /// Memory limit for jobs without one.
    pub memory: Option<u64>,
    /// Inputs added to every job (after its own).
    pub inputs: Vec<Input>,
    /// Output patterns added to every job (after its own).
    pub outputs: Vec<String>,
    /// Variables every job inherits from its worker (after its own).
    pub env_inherit: Vec<String>,
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
    let timeout = l.timeout.map(DurationField::parse).transpose()?;
    let cpu = l.cpu.map(DurationField::parse).transpose().map_err(|e| JobError::new(format!("cpu: {e}")))?;
    let memory = l.memory.map(SizeField::parse).transpose().map_err(|e| JobError::new(format!("memory: {e}")))?;
    let inputs = l.inputs.into_iter().map(input_from_json).collect::<Result<Vec<_>, _>>()?;
    Ok(JobSpec {
        name: l.name,
        tags,
        command,
        env: l.env,
        timeout,
        retries: l.retries.or(defaults.retries).unwrap_or(0),
        crashes_max: l.crashes_max.unwrap_or(DEFAULT_CRASHES_MAX),
        priority: l.priority.unwrap_or(0),
        opts: JobOptions {
            env_inherit: l.env_inherit,
            cwd: l.cwd,
            stdin: l.stdin,
            cpu,
            memory,
            inputs,
            outputs: l.outputs,
            output_prefix: l.output_prefix,
        }
        .into(),
    })
}

/// Applies the defaults a job did not set, then validates it.
fn finish(mut spec: JobSpec, defaults: &LineDefaults) -> Result<JobSpec, JobError> {
    if spec.timeout.is_none() {
        spec.timeout = defaults.timeout;
    }
    // Options are written only when a default gives one: a write boxes
    // the job's options (see `Opts`).
    if spec.opts.cpu.is_none() && defaults.cpu.is_some() {
        spec.opts.cpu = defaults.cpu;
    }
    if spec.opts.memory.is_none() && defaults.memory.is_some() {
        spec.opts.memory = defaults.memory;
    }
    if !defaults.inputs.is_empty() {
        spec.opts.inputs.extend(defaults.inputs.iter().cloned());
    }
    for pattern in &defaults.outputs {
        if !spec.opts.outputs.contains(pattern) {
            spec.opts.outputs.push(pattern.clone());
        }
    }
    for name in &defaults.env_inherit {
        if !spec.opts.env_inherit.contains(name) {
            spec.opts.env_inherit.push(name.clone());
        }
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
#[non_exhaustive]
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
        match parse_job_line(t, defaults).and_then(|spec| spec.check_size().map(|()| spec)) {
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

/// The variables every job takes from its agent's environment, when set
/// there: the few a program commonly needs to run at all. Nothing else of
/// the agent's environment reaches a job unless the job names it in
/// [`JobOptions::env_inherit`], so that what ran a worker (a shell, the
/// daemon, a container) does not leak into jobs.
pub const BASE_ENV: [&str; 6] = ["PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "LANG"];

/// A CPU limit as `RLIMIT_CPU` takes it: whole seconds, rounded up, at
/// least 1.
pub fn cpu_limit_seconds(limit: std::time::Duration) -> u64 {
    let secs = limit.as_secs() + u64::from(limit.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_written_as_a_line_reads_back_equal() {
        let d = LineDefaults::default();
        let mut full = JobSpec::new(Command::Argv(vec!["python".into(), "x y.py".into()]));
        full.name = Some("n".into());
        full.tags = "gpu,big".parse().unwrap();
        full.env.insert("K".into(), "V =".into());
        full.opts.env_inherit = vec!["HOME2".into()];
        full.opts.cwd = Some("/tmp/w".into());
        full.opts.stdin = Some("in\n".into());
        full.timeout = Some(Duration::from_millis(1500));
        full.opts.cpu = Some(Duration::from_secs(10));
        full.opts.memory = Some(2 << 30);
        full.retries = 3;
        full.crashes_max = 1;
        full.priority = -4;
        full.opts.inputs = vec![
            Input { name: "a.csv".into(), source: InputSource::Path("/data/a.csv".into()) },
            Input {
                name: "b".into(),
                source: InputSource::Object { key: "cas/ab".into(), size: 3, sha256: "ab".repeat(32) },
            },
        ];
        full.opts.outputs = vec!["out/**".into()];
        full.opts.output_prefix = Some("pipeline/objects/x".into());
        let builtin = JobSpec::builtin("sleep", serde_json::json!({"seconds": 1}));
        for spec in [full, JobSpec::shell("echo hi | wc -c"), builtin] {
            let value = serde_json::to_value(spec.as_line()).unwrap();
            let back = parse_job_value(value.clone(), &d).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(back, spec, "{value}");
        }
    }

    /// The serde form (journal, wire) leaves defaults out and reads back
    /// equal, in JSON and in MessagePack, whichever fields are set; an
    /// older journal's record with every field reads the same.
    #[test]
    fn a_job_in_its_serde_form_reads_back_equal_and_leaves_defaults_out() {
        let noop = JobSpec::builtin("noop", serde_json::Value::Null);
        assert_eq!(serde_json::to_string(&noop).unwrap(), r#"{"command":{"builtin":{"name":"noop"}}}"#);
        let older = r#"{"name":null,"tags":[],"command":{"builtin":{"name":"noop","args":null}},"env":{},"cwd":null,"stdin":null,"timeout":null,"retries":0,"crashes_max":3,"priority":0}"#;
        assert_eq!(serde_json::from_str::<JobSpec>(older).unwrap(), noop);
        let mut full = JobSpec::shell("echo");
        full.name = Some("n".into());
        full.tags = "gpu".parse().unwrap();
        full.env.insert("K".into(), "V".into());
        full.opts.cwd = Some("/w".into());
        full.opts.stdin = Some(String::new());
        full.timeout = Some(Duration::from_secs(2));
        full.retries = 1;
        full.crashes_max = 0;
        full.priority = -1;
        let mut more = JobSpec::new(Command::Argv(vec!["a".into(), "b".into()]));
        more.crashes_max = 7;
        more.priority = 5;
        for spec in [noop, full, more, JobSpec::builtin("echo", serde_json::json!([1, null]))] {
            let json = serde_json::to_vec(&spec).unwrap();
            assert_eq!(serde_json::from_slice::<JobSpec>(&json).unwrap(), spec, "{}", String::from_utf8_lossy(&json));
            let packed = rmp_serde::to_vec_named(&spec).unwrap();
            assert_eq!(rmp_serde::from_slice::<JobSpec>(&packed).unwrap(), spec);
        }
    }

    /// A job that sets no option holds none (one null pointer for them
    /// all), as read from a line or from its serde form; one that sets any
    /// holds them boxed; either way they compare and read alike.
    #[test]
    fn options_are_boxed_only_when_a_job_sets_one() {
        let d = LineDefaults::default();
        let plain = parse_job_line(r#"{"builtin":"noop"}"#, &d).unwrap();
        assert!(plain.opts.0.is_none());
        let packed = rmp_serde::to_vec_named(&plain).unwrap();
        assert!(rmp_serde::from_slice::<JobSpec>(&packed).unwrap().opts.0.is_none());
        let with = parse_job_line(r#"{"shell":"cat","stdin":"x"}"#, &d).unwrap();
        assert_eq!(with.opts.stdin.as_deref(), Some("x"));
        assert!(with.opts.0.is_some() && !with.opts.is_default());
        let mut written = JobSpec::builtin("noop", serde_json::Value::Null);
        written.opts.cwd = None;
        assert!(written.opts.0.is_some() && written.opts.is_default());
        assert_eq!(written, JobSpec::builtin("noop", serde_json::Value::Null));
        assert_eq!(serde_json::to_string(&written).unwrap(), r#"{"command":{"builtin":{"name":"noop"}}}"#);
        // What a queued job costs (figure 10d): keep the struct small.
        assert!(std::mem::size_of::<JobSpec>() <= 176, "JobSpec is {} bytes", std::mem::size_of::<JobSpec>());
    }

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
    fn inputs_and_outputs() {
        let d = LineDefaults::default();
        let j = parse_job_line(
            r#"{"shell":"x","inputs":["data.csv","/abs/a=b.csv",{"path":"p/q.bin","name":"in/q.bin"},{"path":"k=v/r.txt"}],"outputs":["fit/*","count.txt"]}"#,
            &d,
        )
        .unwrap();
        assert_eq!(
            j.opts.inputs,
            [
                Input::path("data.csv", "data.csv"),
                Input::path("b.csv", "/abs/a"),
                Input::path("in/q.bin", "p/q.bin"),
                Input::path("r.txt", "k=v/r.txt"),
            ]
        );
        assert_eq!(j.opts.outputs, ["fit/*", "count.txt"]);
        assert!(j.unstaged_input().is_some());
        let staged = parse_job_value(
            serde_json::json!({"shell": "x", "inputs": [{"name": "a", "key": "cas/sha256/x", "size": 3, "sha256": "0".repeat(64)}]}),
            &d,
        )
        .unwrap();
        assert!(staged.unstaged_input().is_none());
        // The serde form (journal, wire) round-trips.
        let back: JobSpec = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn escaping_names_and_patterns_are_refused() {
        let d = LineDefaults::default();
        for bad in ["../../etc/passwd", "/abs/path", "a/../../b", "a//b", "./a", "a/", "a\\b", "a\u{1}b", ""] {
            let out = serde_json::json!({"shell": "x", "outputs": [bad]});
            let err = parse_job_value(out, &d).unwrap_err();
            assert!(err.0.starts_with("output "), "{bad}: {err}");
            let named = serde_json::json!({"shell": "x", "inputs": [{"path": "/tmp/x", "name": bad}]});
            let err = parse_job_value(named, &d).unwrap_err();
            assert!(err.0.contains("input"), "{bad}: {err}");
            let text = serde_json::json!({"shell": "x", "inputs": [format!("/tmp/x={bad}")]});
            assert!(parse_job_value(text, &d).is_err(), "{bad}");
        }
        for bad in [
            serde_json::json!({"shell": "x", "inputs": ["a", "b/a"]}),
            serde_json::json!({"shell": "x", "inputs": [{"name": "a", "key": "../x", "size": 1, "sha256": "0".repeat(64)}]}),
            serde_json::json!({"shell": "x", "inputs": [{"name": "a", "key": "x", "size": 1, "sha256": "XYZ"}]}),
            serde_json::json!({"shell": "x", "inputs": [1]}),
            serde_json::json!({"shell": "x", "inputs": ["/"]}),
            serde_json::json!({"shell": "x", "inputs": [{"path": "x", "nmae": "y"}]}),
        ] {
            assert!(parse_job_value(bad.clone(), &d).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_inherit_names_are_checked_and_agent_variables_refused() {
        let d = LineDefaults { env_inherit: vec!["HOME".into(), "FOO".into()], ..LineDefaults::default() };
        let j = parse_job_line(r#"{"shell":"x","env_inherit":["FOO","AWS_PROFILE"]}"#, &d).unwrap();
        assert_eq!(j.opts.env_inherit, ["FOO", "AWS_PROFILE", "HOME"]);
        let plain = parse_job_line("env", &d).unwrap();
        assert_eq!(plain.opts.env_inherit, ["HOME", "FOO"]);
        for agent_only in crate::worker::AGENT_ONLY_ENV {
            let err = parse_job_value(serde_json::json!({"shell": "x", "env_inherit": [agent_only]}), &d).unwrap_err();
            assert!(err.0.starts_with(&format!("env_inherit: {agent_only} belongs to the worker's agent")), "{err}");
        }
        for bad in ["", "A=B", "A\0B"] {
            assert!(parse_job_value(serde_json::json!({"shell": "x", "env_inherit": [bad]}), &d).is_err(), "{bad:?}");
        }
        assert!(parse_job_value(serde_json::json!({"shell": "x", "env_inherit": "FOO"}), &d).is_err());
        // Names only, in the serde form (journal, wire).
        let back: JobSpec = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("64MiB", 64 << 20),
            ("64M", 64 << 20),
            ("2GiB", 2 << 30),
            ("2 G", 2 << 30),
            ("4g", 4 << 30),
            ("1.5GiB", 3 << 29),
            ("512KiB", 512 << 10),
            ("100B", 100),
            ("1TiB", 1 << 40),
            ("1024TiB", 1 << 50),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "GiB", "2GB", "2MB", "-1", "1e9", "2 gigs", "1.2.3M", "1025TiB", "99999999999999999999"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.0.starts_with(&format!("invalid size {bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_and_memory_limits() {
        let d = LineDefaults { cpu: Some(Duration::from_secs(60)), memory: Some(1 << 30), ..LineDefaults::default() };
        let j = parse_job_line(r#"{"shell":"x","cpu":"10m","memory":"2GiB"}"#, &d).unwrap();
        assert_eq!((j.opts.cpu, j.opts.memory), (Some(Duration::from_secs(600)), Some(2 << 30)));
        let j = parse_job_line(r#"{"shell":"x","cpu":1.5,"memory":67108864}"#, &d).unwrap();
        assert_eq!((j.opts.cpu, j.opts.memory), (Some(Duration::from_millis(1500)), Some(64 << 20)));
        let j = parse_job_line("true", &d).unwrap();
        assert_eq!((j.opts.cpu, j.opts.memory), (Some(Duration::from_secs(60)), Some(1 << 30)));
        for (bad, says) in [
            (r#"{"shell":"x","cpu":"soon"}"#, "cpu: invalid duration"),
            (r#"{"shell":"x","cpu":0}"#, "the cpu limit must be greater than zero"),
            (r#"{"shell":"x","cpu":"400days"}"#, "the cpu limit must be at most 366 days"),
            (r#"{"shell":"x","memory":"2GB"}"#, "memory: invalid size \"2GB\""),
            (r#"{"shell":"x","memory":"5PiB"}"#, "memory: invalid size"),
            (r#"{"shell":"x","memory":100}"#, "the memory limit must be between 1MiB and 1PiB"),
            (r#"{"shell":"x","memory":-1}"#, "invalid JSON job"),
        ] {
            let err = parse_job_line(bad, &LineDefaults::default()).unwrap_err();
            assert!(err.0.starts_with(says), "{bad}: {err}");
        }
        // The serde form (journal, wire) round-trips.
        let back: JobSpec = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn defaults_apply() {
        let d = LineDefaults {
            tags: "x".parse().unwrap(),
            timeout: Some(Duration::from_secs(5)),
            retries: Some(1),
            ..LineDefaults::default()
        };
        let j = parse_job_line(r#"{"shell":"x","tags":["y"]}"#, &d).unwrap();
        assert_eq!(j.tags.to_string(), "x,y");
        assert_eq!(j.retries, 1);
        assert_eq!(j.timeout, Some(Duration::from_secs(5)));
    }
}
