//! The `Worker` trait: one backend class (local processes, AWS Batch, ...).
//!
//! A class only knows how to start the agent somewhere, tell whether that
//! thing is still alive, and stop it (DESIGN.md, principle 2). Everything
//! else — dispatch, results, heartbeats, retries, crash detection — is shared
//! code in the controller, over one wire protocol.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Environment variable carrying the controller address to the agent.
pub const ENV_CONNECT: &str = "CREW_CONNECT";
/// Environment variable carrying the launch id to the agent.
pub const ENV_LAUNCH: &str = "CREW_LAUNCH";
/// Environment variable carrying the launch secret to the agent.
pub const ENV_TOKEN: &str = "CREW_TOKEN";
/// Environment variable a class may set instead of [`ENV_TOKEN`]: a
/// reference to where the agent finds its member secret
/// ([`member_secret`]), read once and removed. The reference is not the
/// secret; resolving it is up to the agent binary (`crew worker` resolves
/// `ssm:PREFIX`, an SSM SecureString named `PREFIX<index>`, through
/// crew-worker-aws), so crew-core needs no cloud SDK.
pub const ENV_TOKEN_REF: &str = "CREW_TOKEN_REF";
/// The scheme of a [`ENV_TOKEN_REF`] to one-time files:
/// `file:/shared/dir/token.` names the file `/shared/dir/token.<index>`,
/// holding the member's own secret ([`Secret::member_secret`]); the agent
/// claims it (renames it), reads it once and deletes it, and refuses one
/// that others than its owner may read. For classes whose agents share a
/// file system with the controller but whose job definitions others may
/// read (a Slurm batch script): crew-agent resolves it.
pub const TOKEN_REF_FILE: &str = "file:";
/// Environment variable carrying the agent's index within its launch.
pub const ENV_INDEX: &str = "CREW_INDEX";
/// Environment variable a class that starts agents as platform array jobs
/// may set to the member index of the array's first child: the agent's
/// index is then this plus the platform's array index
/// (`AWS_BATCH_JOB_ARRAY_INDEX`), when [`ENV_INDEX`] is not set.
pub const ENV_INDEX_BASE: &str = "CREW_INDEX_BASE";
/// Environment variable a class that starts agents as its own child
/// processes sets to its pid: the agent then exits when that process dies
/// (a parent-death signal on Linux), even if it was killed with SIGKILL.
pub const ENV_PARENT_PID: &str = "CREW_PARENT_PID";
/// Set to `1` by a class that hands the agent its launch secret on stdin
/// (its first line) rather than in [`ENV_TOKEN`]: for agents started
/// through a channel whose environment or command line others can read
/// (`ssh host crew worker`).
pub const ENV_TOKEN_STDIN: &str = "CREW_TOKEN_STDIN";
/// Environment variable carrying the SHA-256 of the controller's TLS
/// certificate: when set, the agent connects with TLS and accepts only that
/// certificate (the crew-tls crate).
pub const ENV_TLS_SHA256: &str = "CREW_TLS_SHA256";
/// The file holding the address of the controller an agent may come back
/// to after that controller restarted (set for local agents of a daemon;
/// see `crew_core::controller::ResumeConfig`). An agent started with it
/// does not arm its parent-death signal: it outlives its controller for
/// the reconnect window.
pub const ENV_RESUME_FILE: &str = "CREW_RESUME_FILE";

/// A secret, redacted in `Debug` (and not `Display` at all) so that it never reaches a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// A fresh random secret: 32 bytes from the OS, hex encoded.
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        // getrandom only fails when the OS has no entropy source at all; a
        // controller cannot run safely then, so this is a fatal condition.
        #[allow(clippy::expect_used)]
        getrandom::fill(&mut bytes).expect("the operating system refused to provide random bytes");
        let mut s = String::with_capacity(64);
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// The secret itself. Call only to hand it to the process that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret of member `index` of the launch whose secret this is: a
    /// SHA-256 of the launch secret and the index. The controller accepts
    /// either from member `index`; a class that hands each member its own
    /// ([`ENV_TOKEN_REF`]) keeps one member from posing as another.
    pub fn member_secret(&self, index: u32) -> Secret {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"crew member secret\0");
        h.update(self.0.as_bytes());
        h.update(b"\0");
        h.update(index.to_be_bytes());
        let mut s = String::with_capacity(64);
        for b in h.finalize() {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// Constant-time comparison (no early exit on the first difference).
    pub fn matches(&self, other: &str) -> bool {
        let a = self.0.as_bytes();
        let b = other.as_bytes();
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One agent to start in a launch ([`LaunchMember::new`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LaunchMember {
    /// The slot's name, unique within the controller (`local-3`).
    pub slot: String,
    /// The member's index within the launch (0-based); the agent reports it
    /// back with the launch secret. Classes pass it as `CREW_INDEX` (local)
    /// or map it from the platform's array index (AWS Batch).
    pub index: u32,
}

/// Everything a class needs to start agents: one launch is one call to
/// [`Worker::launch`] and may start many agents at once (an array).
///
/// Its `Debug` redacts the values of secret variables in `env`
/// ([`ENV_TOKEN`], and any whose name says token, secret, password or
/// credential), so that a launch can be logged.
///
/// Classes read it; the controller builds it ([`LaunchSpec::new`] and the
/// `with_` methods), so that it may grow fields without breaking a class.
#[derive(Clone)]
#[non_exhaustive]
pub struct LaunchSpec {
    /// The agent program to run (the `crew` binary, or an embedder's own).
    pub program: String,
    /// Its name for classes that run it elsewhere from their own `PATH` (an
    /// image), where the controller's path means nothing: `crew` for the
    /// stock binary.
    pub program_name: String,
    /// Its arguments (e.g. `["worker"]`). Never contains a secret.
    pub args: Vec<String>,
    /// Environment common to every member: the controller address
    /// ([`ENV_CONNECT`]), the launch id ([`ENV_LAUNCH`]) and the secret
    /// ([`ENV_TOKEN`]). The secret must reach the agent only through its
    /// environment (or stdin), never its command line.
    pub env: BTreeMap<String, String>,
    /// The agents to start.
    pub members: Vec<LaunchMember>,
    /// The class options of these slots (`--opt key=value`), already
    /// validated by the class.
    pub options: BTreeMap<String, String>,
    /// How long the agent may run in all (its slot's soft wall time), if set;
    /// platforms with a hard limit use it plus a grace period.
    pub wall_time: Option<Duration>,
}

impl LaunchMember {
    /// The agent of slot `slot`, member `index` of its launch.
    #[must_use]
    pub fn new(slot: impl Into<String>, index: u32) -> Self {
        Self { slot: slot.into(), index }
    }
}

impl LaunchSpec {
    /// A launch of `program` (known as `program_name` elsewhere) for
    /// `members`, with no arguments, environment, options or wall time yet.
    #[must_use]
    pub fn new(program: impl Into<String>, program_name: impl Into<String>, members: Vec<LaunchMember>) -> Self {
        Self {
            program: program.into(),
            program_name: program_name.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            members,
            options: BTreeMap::new(),
            wall_time: None,
        }
    }

    /// With the agent's arguments.
    #[must_use]
    pub fn with_args(mut self, args: Vec<String>) -> Self {
        self.args = args;
        self
    }

    /// With the environment common to every member.
    #[must_use]
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> Self {
        self.env = env;
        self
    }

    /// With the slots' class options.
    #[must_use]
    pub fn with_options(mut self, options: BTreeMap<String, String>) -> Self {
        self.options = options;
        self
    }

    /// With the slots' wall time.
    #[must_use]
    pub fn with_wall_time(mut self, wall_time: Option<Duration>) -> Self {
        self.wall_time = wall_time;
        self
    }
}

/// Whether an environment variable's value is a secret, by its name.
pub fn is_secret_var(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    name == ENV_TOKEN || ["TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"].iter().any(|w| upper.contains(w))
}

impl fmt::Debug for LaunchSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: BTreeMap<&str, &str> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_var(k) { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("LaunchSpec")
            .field("program", &self.program)
            .field("program_name", &self.program_name)
            .field("args", &self.args)
            .field("env", &env)
            .field("members", &self.members)
            .field("options", &self.options)
            .field("wall_time", &self.wall_time)
            .finish()
    }
}

/// A class's reference to one started agent (a pid, a Batch job id, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Handle {
    /// Class-specific identifier, shown to users as the slot's platform
    /// handle.
    pub id: String,
}

impl Handle {
    /// A handle with the class's identifier of one started worker.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into() }
    }
}

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Liveness {
    /// Submitted or starting; not running the agent yet.
    Starting,
    /// The agent process is running.
    Running,
    /// It has ended; the reason in the platform's words (exit status, a
    /// signal, `CannotPullContainerError`, a spot reclaim, ...).
    Exited {
        /// Why it ended.
        reason: String,
    },
    /// The platform does not know this handle (any more).
    Unknown,
}

/// What a class can do; the controller adapts to it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Most agents one `launch` call may start (1 when the platform has no
    /// arrays).
    pub launch_batch_max: usize,
    /// Most handles one `probe` call may take.
    pub probe_batch_max: usize,
    /// How often the controller should probe (platform calls may be slow or
    /// rate-limited).
    pub probe_interval: Duration,
    /// True when the agents share the controller's file system (a local
    /// store path works for them).
    pub shares_filesystem: bool,
    /// True when the agents can reach the controller on loopback.
    pub reaches_loopback: bool,
    /// True when a launch may wait in the platform's queue for long (a
    /// batch scheduler such as Slurm): the slot's launch timeout then
    /// counts from the last probe that found the worker still
    /// [`Liveness::Starting`], not from the launch, so that a worker is
    /// given up only when it runs but does not connect.
    pub queues_launches: bool,
}

impl Capabilities {
    /// Capabilities of a class that starts processes on this machine.
    pub fn local() -> Self {
        Self {
            launch_batch_max: usize::MAX,
            probe_batch_max: usize::MAX,
            probe_interval: Duration::from_millis(500),
            shares_filesystem: true,
            reaches_loopback: true,
            queues_launches: false,
        }
    }

    /// Capabilities of a remote class: explicit batch sizes and interval.
    pub fn remote(launch_batch_max: usize, probe_batch_max: usize, probe_interval: Duration) -> Self {
        Self {
            launch_batch_max,
            probe_batch_max,
            probe_interval,
            shares_filesystem: false,
            reaches_loopback: false,
            queues_launches: false,
        }
    }
}

/// Errors of a class.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The class options are wrong (unknown key, missing value, bad format).
    #[error("invalid option for class {class}: {message}")]
    Options {
        /// The class.
        class: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The platform refused or failed a request.
    #[error("{class}: {message}")]
    Platform {
        /// The class.
        class: String,
        /// What happened, in the platform's words.
        message: String,
        /// True when the same call may succeed later (throttling, network).
        retryable: bool,
    },
}

impl WorkerError {
    /// True when the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WorkerError::Platform { retryable: true, .. })
    }
}

/// One option of a worker class (`--opt NAME=VALUE`), as
/// [`Worker::options`] lists it and `crew classes NAME` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct OptionSpec {
    /// Its key (`--opt KEY=VALUE`).
    pub name: String,
    /// What it does, for `crew classes`.
    #[serde(default)]
    pub help: String,
    /// True when a recruit must give it.
    #[serde(default)]
    pub required: bool,
}

impl OptionSpec {
    /// An optional option.
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Self {
        Self { name: name.into(), help: help.into(), required: false }
    }

    /// This option, required.
    #[must_use]
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }
}

/// A backend class: starts agents somewhere, probes them, stops them.
///
/// # Contract
/// - `launch` starts every member of the spec, or fails as a whole; on
///   success it returns one [`Handle`] per member, in the order of
///   `spec.members`. It returns once the platform accepted the request; the
///   agents connect to the controller on their own, later. The controller
///   enforces the launch timeout, not the class.
/// - The agent's command line is `spec.program` + `spec.args`; its
///   environment includes `spec.env` and [`ENV_INDEX`] set to the member's
///   index (or the class maps the platform's array index to it). The secret
///   in `spec.env` must not appear on any command line or in any log.
/// - `probe` takes handles of this class only and returns one [`Liveness`]
///   per handle, in order. It must not change anything. It is called every
///   [`Capabilities::probe_interval`] with at most
///   [`Capabilities::probe_batch_max`] handles.
/// - `terminate` stops the agents (and everything they started) and is
///   idempotent: terminating an exited or unknown handle succeeds. It may
///   return before the processes are gone; a later probe tells.
/// - Dropping a class value or a handle never kills a running agent; only
///   `terminate` does (agents also exit on their own when the controller
///   connection drops).
///
/// # Cancellation
/// Any future may be dropped at an await point; a dropped `launch` may have
/// started agents, which then connect with a launch id the controller no
/// longer honours and are stopped by their own connect timeout.
///
/// # Errors
/// [`WorkerError::is_retryable`] tells the controller whether to try again
/// (it does, with backoff, within the slot's relaunch budget).
///
/// # Implementing
/// `crew-worker-local` is the reference implementation; run
/// `crew_core::conformance::worker` (feature `conformance`) in your tests.
#[async_trait]
pub trait Worker: Send + Sync + fmt::Debug + 'static {
    /// The class name users select it by (`local`, `aws-batch`).
    fn class(&self) -> &str;

    /// What the class can do.
    fn capabilities(&self) -> Capabilities;

    /// The options the class takes, for `crew classes NAME` and the plugin
    /// handshake; [`Worker::check_options`] still decides what is valid.
    /// The default: none.
    fn options(&self) -> Vec<OptionSpec> {
        Vec::new()
    }

    /// Checks the class options given at recruit time (`--opt key=value`),
    /// so that mistakes are reported before anything is launched. The
    /// default accepts no options.
    fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(WorkerError::Options {
                class: self.class().to_owned(),
                message: format!("unknown option {k:?}: this class takes no options"),
            }),
        }
    }

    /// Starts the agents of one launch.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError>;

    /// Reports on each handle, in order.
    async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError>;

    /// Stops the agents behind the handles (idempotent).
    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError>;
}

/// Variables the agent itself receives to connect to its controller. They are
/// removed from every job's environment: the launch secret must never reach
/// a job.
pub const AGENT_ONLY_ENV: [&str; 8] =
    [ENV_TOKEN, ENV_LAUNCH, ENV_CONNECT, ENV_INDEX, ENV_PARENT_PID, ENV_TLS_SHA256, ENV_RESUME_FILE, ENV_TOKEN_STDIN];

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn secret_is_redacted_and_compares() {
        let s = Secret::random();
        assert_eq!(s.expose().len(), 64);
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(s.matches(s.expose()));
        assert!(!s.matches("nope"));
        assert_ne!(Secret::random(), s);
    }

    /// Every type that holds a launch secret, formatted with `{:?}` (and
    /// `{:#?}`), never shows it.
    #[test]
    fn every_type_holding_a_token_redacts_it_in_debug() {
        use std::collections::BTreeMap;

        use super::{ENV_CONNECT, ENV_TOKEN, LaunchMember, LaunchSpec};
        use crate::protocol::AgentMsg;

        let secret = Secret::random();
        let token = secret.expose().to_owned();
        let spec = LaunchSpec {
            program: "/usr/bin/crew".into(),
            program_name: "crew".into(),
            args: vec!["worker".into()],
            env: BTreeMap::from([
                (ENV_TOKEN.to_owned(), token.clone()),
                (ENV_CONNECT.to_owned(), "127.0.0.1:7000".to_owned()),
                ("MY_API_TOKEN".to_owned(), "embedder-secret".to_owned()),
            ]),
            members: vec![LaunchMember { slot: "local-1".into(), index: 0 }],
            options: BTreeMap::new(),
            wall_time: None,
        };
        let hello = AgentMsg::Hello {
            version: crate::protocol::PROTOCOL_VERSION,
            launch: "1".into(),
            index: 0,
            token: secret.clone(),
            pid: 1,
            host: "h".into(),
        };
        let shown = [format!("{spec:?}"), format!("{spec:#?}"), format!("{hello:?}"), format!("{secret:?}")];
        for text in &shown {
            assert!(!text.contains(&token), "the secret shows in {text}");
            assert!(!text.contains("embedder-secret"), "a secret variable shows in {text}");
        }
        assert!(shown[0].contains("127.0.0.1:7000") && shown[0].contains("<redacted>"), "{}", shown[0]);
    }
}
