//! The PATH plugin protocol: a worker class as a program of its own.
//!
//! `crew --class NAME` for a class that is not built in runs the
//! executable `crew-worker-NAME` found on `PATH` and talks to it over its
//! stdin and stdout, one JSON object per line (`docs/plugin-protocol.md`
//! is the reference; this module holds its types and the plugin's side).
//! Requests carry an `id` that the answer repeats, so a plugin may answer
//! out of order (a slow launch does not hold up a probe).
//!
//! Why a pipe and not argv or the environment: a launch carries the agent
//! command and its one-time secret, which must not show in `ps` or
//! `/proc/PID/environ` (see [`LaunchParams::secret`]).
//!
//! A Rust class becomes a PATH plugin with [`serve`]:
//!
//! ```no_run
//! # #[derive(Debug)] struct MyClass;
//! # #[async_trait::async_trait]
//! # impl crew_core::worker::Worker for MyClass {
//! #     fn class(&self) -> &str { "mine" }
//! #     fn capabilities(&self) -> crew_core::worker::Capabilities { crew_core::worker::Capabilities::local() }
//! #     async fn launch(&self, _: &crew_core::worker::LaunchSpec) -> Result<Vec<crew_core::worker::Handle>, crew_core::worker::WorkerError> { Ok(vec![]) }
//! #     async fn probe(&self, h: &[crew_core::worker::Handle]) -> Result<Vec<crew_core::worker::Liveness>, crew_core::worker::WorkerError> { Ok(vec![]) }
//! #     async fn terminate(&self, _: &[crew_core::worker::Handle]) -> Result<(), crew_core::worker::WorkerError> { Ok(()) }
//! # }
//! // The `main` of the executable `crew-worker-mine`:
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> std::io::Result<()> {
//!     crew_core::plugin::serve(std::sync::Arc::new(MyClass)).await
//! }
//! ```
//!
//! **API boundary:** the messages are a public, versioned contract
//! ([`PLUGIN_PROTOCOL_VERSION`]); fields are only ever added.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

pub use crate::worker::OptionSpec;
use crate::worker::{Capabilities, ENV_TOKEN, Handle, LaunchMember, LaunchSpec, Liveness, Worker, WorkerError};

/// The protocol version this crate speaks (the `protocol` of `hello`).
pub const PLUGIN_PROTOCOL_VERSION: u32 = 1;

/// The prefix of a plugin's executable name: class `NAME` is
/// `crew-worker-NAME`.
pub const PLUGIN_PREFIX: &str = "crew-worker-";

/// The longest line either side reads (1 MiB); a longer one is a protocol
/// error, so a runaway peer cannot make the other allocate without bound.
pub const MAX_LINE: usize = 1 << 20;

/// One request from crew to the plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Request {
    /// Repeated in the answer.
    pub id: u64,
    /// `hello`, `check_options`, `launch`, `probe` or `terminate`.
    pub method: String,
    /// The method's parameters (an object).
    #[serde(default)]
    pub params: Value,
}

impl Request {
    /// A request.
    pub fn new(id: u64, method: impl Into<String>, params: Value) -> Self {
        Self { id, method: method.into(), params }
    }
}

/// The plugin's answer to one request: `result` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Response {
    /// The request's id (0 when the request could not be read at all).
    pub id: u64,
    /// The method's result (an object) on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// What went wrong otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A success.
    pub fn ok(id: u64, result: Value) -> Self {
        Self { id, result: Some(result), error: None }
    }

    /// A failure.
    pub fn err(id: u64, error: ErrorBody) -> Self {
        Self { id, result: None, error: Some(error) }
    }
}

/// What kind of error a plugin reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The class options are wrong ([`WorkerError::Options`]).
    Options,
    /// The platform refused or failed ([`WorkerError::Platform`]).
    Platform,
    /// The request itself was not understood (unknown method, bad params,
    /// unsupported protocol version).
    Protocol,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorBody {
    /// Its kind.
    pub kind: ErrorKind,
    /// What went wrong and how to fix it, in one line.
    pub message: String,
    /// True when the same request may succeed later.
    #[serde(default)]
    pub retryable: bool,
}

impl ErrorBody {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>, retryable: bool) -> Self {
        Self { kind, message: message.into(), retryable }
    }

    /// The class error it stands for.
    pub fn into_worker_error(self, class: &str) -> WorkerError {
        match self.kind {
            ErrorKind::Options => WorkerError::Options { class: class.to_owned(), message: self.message },
            _ => WorkerError::Platform { class: class.to_owned(), message: self.message, retryable: self.retryable },
        }
    }
}

impl From<WorkerError> for ErrorBody {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Options { message, .. } => Self::new(ErrorKind::Options, message, false),
            WorkerError::Platform { message, retryable, .. } => Self::new(ErrorKind::Platform, message, retryable),
        }
    }
}

/// `hello` parameters: the first request, before any other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HelloParams {
    /// The highest protocol version crew speaks.
    pub protocol: u32,
    /// The class name crew asked for (`NAME` of `crew-worker-NAME`).
    pub class: String,
    /// crew's version.
    #[serde(default)]
    pub crew_version: String,
}

impl HelloParams {
    /// The `hello` of this crate's protocol version for class `class`.
    pub fn new(class: impl Into<String>, crew_version: impl Into<String>) -> Self {
        Self { protocol: PLUGIN_PROTOCOL_VERSION, class: class.into(), crew_version: crew_version.into() }
    }
}

/// `hello` result: the plugin's version and what the class is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HelloResult {
    /// The protocol version the plugin speaks (at most crew's).
    pub protocol: u32,
    /// The class's capabilities.
    pub capabilities: WireCapabilities,
    /// The options the class takes (its schema), for listing and for a
    /// first check by crew; `check_options` has the last word.
    #[serde(default)]
    pub options: Vec<OptionSpec>,
    /// How long crew waits for each answer, when the plugin's platform
    /// needs other limits than crew's defaults (absent: the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<WireTimeouts>,
}

/// The time limits a plugin asks for in `hello`, in milliseconds; a field
/// left out keeps crew's default for that method. crew keeps each within
/// [`TIMEOUT_MIN`] and [`TIMEOUT_MAX`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WireTimeouts {
    /// `check_options` (default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_options_ms: Option<u64>,
    /// `launch` (default 120 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_ms: Option<u64>,
    /// `probe` (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_ms: Option<u64>,
    /// `terminate` (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminate_ms: Option<u64>,
}

/// The shortest time limit a plugin may ask for.
pub const TIMEOUT_MIN: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest time limit a plugin may ask for.
pub const TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// [`Capabilities`] on the wire (durations in milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WireCapabilities {
    /// [`Capabilities::launch_batch_max`].
    pub launch_batch_max: u64,
    /// [`Capabilities::probe_batch_max`].
    pub probe_batch_max: u64,
    /// [`Capabilities::probe_interval`], in milliseconds.
    pub probe_interval_ms: u64,
    /// [`Capabilities::shares_filesystem`].
    #[serde(default)]
    pub shares_filesystem: bool,
    /// [`Capabilities::reaches_loopback`].
    #[serde(default)]
    pub reaches_loopback: bool,
    /// [`Capabilities::queues_launches`].
    #[serde(default)]
    pub queues_launches: bool,
}

impl From<&Capabilities> for WireCapabilities {
    fn from(c: &Capabilities) -> Self {
        Self {
            launch_batch_max: u64::try_from(c.launch_batch_max).unwrap_or(u64::MAX),
            probe_batch_max: u64::try_from(c.probe_batch_max).unwrap_or(u64::MAX),
            probe_interval_ms: u64::try_from(c.probe_interval.as_millis()).unwrap_or(u64::MAX),
            shares_filesystem: c.shares_filesystem,
            reaches_loopback: c.reaches_loopback,
            queues_launches: c.queues_launches,
        }
    }
}

impl WireCapabilities {
    /// The capabilities they describe, with zero batch sizes raised to 1 and
    /// the probe interval kept between 10 ms and 10 minutes.
    pub fn to_capabilities(&self) -> Capabilities {
        let mut c = Capabilities::local();
        c.launch_batch_max = usize::try_from(self.launch_batch_max.max(1)).unwrap_or(usize::MAX);
        c.probe_batch_max = usize::try_from(self.probe_batch_max.max(1)).unwrap_or(usize::MAX);
        c.probe_interval = Duration::from_millis(self.probe_interval_ms.clamp(10, 600_000));
        c.shares_filesystem = self.shares_filesystem;
        c.reaches_loopback = self.reaches_loopback;
        c.queues_launches = self.queues_launches;
        c
    }
}

/// `check_options` parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CheckOptionsParams {
    /// The options of a recruit (`--opt key=value`).
    pub options: BTreeMap<String, String>,
}

impl CheckOptionsParams {
    /// The parameters for `options`.
    pub fn new(options: BTreeMap<String, String>) -> Self {
        Self { options }
    }
}

/// One agent of a launch on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WireMember {
    /// [`LaunchMember::slot`].
    pub slot: String,
    /// [`LaunchMember::index`]: set `CREW_INDEX` to it for this agent.
    pub index: u32,
}

/// `launch` parameters: start one agent per member.
///
/// Each agent runs `program` with `args`, the environment `env` plus
/// `CREW_INDEX=<member index>`, and must get `secret`: when
/// `token_stdin_args` is given, by appending those arguments and writing
/// the secret and a newline to the agent's stdin (never as an argument);
/// otherwise as `CREW_TOKEN` in the agent's environment.
#[derive(Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LaunchParams {
    /// The agent program (a path on crew's machine).
    pub program: String,
    /// Its name for platforms that run it from their own `PATH` (`crew`).
    pub program_name: String,
    /// Its arguments (`["worker"]`); never a secret.
    pub args: Vec<String>,
    /// Arguments that make the agent read its secret from the first line
    /// of its stdin (`["--token-stdin"]` for `crew worker`); absent when the
    /// agent program cannot.
    #[serde(default)]
    pub token_stdin_args: Option<Vec<String>>,
    /// The agents' environment, without the secret.
    pub env: BTreeMap<String, String>,
    /// The launch's one-time secret. Must reach the agents only through a
    /// pipe, a file only they can read, or the environment; never a
    /// command line or a log.
    pub secret: crate::worker::Secret,
    /// The agents to start.
    pub members: Vec<WireMember>,
    /// The class options of these slots, already checked.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The slots' wall time in milliseconds, if set.
    #[serde(default)]
    pub wall_time_ms: Option<u64>,
}

impl std::fmt::Debug for LaunchParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchParams")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl LaunchParams {
    /// The wire form of a launch: the secret (`CREW_TOKEN`) moves out of
    /// the environment into [`LaunchParams::secret`].
    pub fn from_spec(spec: &LaunchSpec, token_stdin_args: Option<Vec<String>>) -> Self {
        let mut env = spec.env.clone();
        let secret = crate::worker::Secret::new(env.remove(ENV_TOKEN).unwrap_or_default());
        Self {
            program: spec.program.clone(),
            program_name: spec.program_name.clone(),
            args: spec.args.clone(),
            token_stdin_args,
            env,
            secret,
            members: spec.members.iter().map(|m| WireMember { slot: m.slot.clone(), index: m.index }).collect(),
            options: spec.options.clone(),
            wall_time_ms: spec.wall_time.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The launch as a [`Worker`] takes it: the secret back in `env` as
    /// `CREW_TOKEN` (the trait's contract; `token_stdin_args` is crew's
    /// offer to programs that start agents themselves).
    pub fn to_spec(&self) -> LaunchSpec {
        let mut env = self.env.clone();
        env.insert(ENV_TOKEN.to_owned(), self.secret.expose().to_owned());
        LaunchSpec {
            program: self.program.clone(),
            program_name: self.program_name.clone(),
            args: self.args.clone(),
            env,
            members: self.members.iter().map(|m| LaunchMember { slot: m.slot.clone(), index: m.index }).collect(),
            options: self.options.clone(),
            wall_time: self.wall_time_ms.map(Duration::from_millis),
        }
    }
}

/// `launch` result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LaunchResult {
    /// One handle per member, in order.
    pub handles: Vec<String>,
}

/// `probe` and `terminate` parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandlesParams {
    /// Handles from earlier launches (or unknown ones).
    pub handles: Vec<String>,
}

impl HandlesParams {
    /// The parameters for `handles`.
    pub fn new(handles: &[Handle]) -> Self {
        Self { handles: handles.iter().map(|h| h.id.clone()).collect() }
    }
}

/// `probe` result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProbeResult {
    /// One state per handle, in order.
    pub states: Vec<WireLiveness>,
}

/// [`Liveness`] on the wire: `{"state": "running"}`,
/// `{"state": "exited", "reason": "exit status 1"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum WireLiveness {
    /// [`Liveness::Starting`].
    Starting,
    /// [`Liveness::Running`].
    Running,
    /// [`Liveness::Exited`].
    Exited {
        /// Why it ended.
        #[serde(default)]
        reason: String,
    },
    /// [`Liveness::Unknown`].
    Unknown,
}

impl From<&Liveness> for WireLiveness {
    fn from(l: &Liveness) -> Self {
        match l {
            Liveness::Starting => Self::Starting,
            Liveness::Running => Self::Running,
            Liveness::Exited { reason } => Self::Exited { reason: reason.clone() },
            Liveness::Unknown => Self::Unknown,
        }
    }
}

impl From<WireLiveness> for Liveness {
    fn from(l: WireLiveness) -> Self {
        match l {
            WireLiveness::Starting => Self::Starting,
            WireLiveness::Running => Self::Running,
            WireLiveness::Exited { reason } => Self::Exited { reason },
            WireLiveness::Unknown => Self::Unknown,
        }
    }
}

/// Serves `worker` as a PATH plugin on this process's stdin and stdout
/// until stdin closes (crew went away). Log to stderr, never to stdout:
/// stdout carries the protocol.
///
/// Requests are handled concurrently, each on a task of its own. Needs a
/// Tokio runtime.
pub async fn serve(worker: Arc<dyn Worker>) -> std::io::Result<()> {
    let options = worker.options();
    serve_io(worker, options, tokio::io::BufReader::new(tokio::io::stdin()), tokio::io::stdout()).await
}

/// [`serve`] over any reader and writer, with the option schema `options`
/// sent in `hello` ([`Worker::options`] for [`serve`]; `check_options`
/// still decides).
pub async fn serve_io<R, W>(
    worker: Arc<dyn Worker>,
    options: Vec<OptionSpec>,
    mut input: R,
    mut output: W,
) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Response>();
    let options = Arc::new(options);
    let mut line = Vec::new();
    let mut reading = true;
    // Tasks in flight hold a sender each; the loop ends when input is done
    // and every answer was written.
    let mut tx = Some(tx);
    loop {
        tokio::select! {
            read = read_line(&mut input, &mut line), if reading => {
                match read? {
                    None => {
                        reading = false;
                        tx = None;
                    }
                    Some(text) => {
                        let Some(sender) = tx.clone() else { continue };
                        match serde_json::from_str::<Request>(&text) {
                            Ok(req) => {
                                let worker = worker.clone();
                                let options = options.clone();
                                tokio::spawn(async move {
                                    let answer = handle(worker.as_ref(), &options, req).await;
                                    let _ = sender.send(answer);
                                });
                            }
                            Err(e) => {
                                let id = serde_json::from_str::<Value>(&text)
                                    .ok()
                                    .and_then(|v| v.get("id").and_then(Value::as_u64))
                                    .unwrap_or(0);
                                let body = ErrorBody::new(ErrorKind::Protocol, format!("not a request: {e}"), false);
                                let _ = sender.send(Response::err(id, body));
                            }
                        }
                    }
                }
            }
            answer = rx.recv() => {
                let Some(answer) = answer else { break };
                let mut text = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
                text.push(b'\n');
                output.write_all(&text).await?;
                output.flush().await?;
            }
        }
    }
    Ok(())
}

/// One line without its newline; `None` at the end of input. A line over
/// [`MAX_LINE`] is an error. Cancel-safe: what a cancelled call read stays
/// in `buf` and the next call goes on from there.
async fn read_line<R: AsyncBufRead + Unpin>(input: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    use tokio::io::AsyncReadExt;
    let room = (MAX_LINE + 1).saturating_sub(buf.len()) as u64;
    let n = (&mut *input).take(room).read_until(b'\n', buf).await?;
    if n == 0 && buf.is_empty() {
        return Ok(None);
    }
    if buf.len() > MAX_LINE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a request line over 1 MiB"));
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    let text = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    Ok(Some(text))
}

async fn handle(worker: &dyn Worker, options: &[OptionSpec], req: Request) -> Response {
    match answer(worker, options, &req).await {
        Ok(v) => Response::ok(req.id, v),
        Err(e) => Response::err(req.id, e),
    }
}

fn params<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, ErrorBody> {
    serde_json::from_value(req.params.clone())
        .map_err(|e| ErrorBody::new(ErrorKind::Protocol, format!("bad params for {}: {e}", req.method), false))
}

fn json<T: Serialize>(v: &T) -> Result<Value, ErrorBody> {
    serde_json::to_value(v).map_err(|e| ErrorBody::new(ErrorKind::Protocol, e.to_string(), false))
}

async fn answer(worker: &dyn Worker, options: &[OptionSpec], req: &Request) -> Result<Value, ErrorBody> {
    match req.method.as_str() {
        "hello" => {
            let p: HelloParams = params(req)?;
            if p.protocol < PLUGIN_PROTOCOL_VERSION {
                return Err(ErrorBody::new(
                    ErrorKind::Protocol,
                    format!("crew speaks plugin protocol {}, this plugin needs {PLUGIN_PROTOCOL_VERSION}", p.protocol),
                    false,
                ));
            }
            json(&HelloResult {
                protocol: PLUGIN_PROTOCOL_VERSION,
                capabilities: WireCapabilities::from(&worker.capabilities()),
                options: options.to_vec(),
                timeouts: None,
            })
        }
        "check_options" => {
            let p: CheckOptionsParams = params(req)?;
            worker.check_options(&p.options)?;
            Ok(Value::Object(Default::default()))
        }
        "launch" => {
            let p: LaunchParams = params(req)?;
            let handles = worker.launch(&p.to_spec()).await?;
            json(&LaunchResult { handles: handles.into_iter().map(|h| h.id).collect() })
        }
        "probe" => {
            let p: HandlesParams = params(req)?;
            let handles: Vec<Handle> = p.handles.into_iter().map(|id| Handle { id }).collect();
            let lives = worker.probe(&handles).await?;
            json(&ProbeResult { states: lives.iter().map(WireLiveness::from).collect() })
        }
        "terminate" => {
            let p: HandlesParams = params(req)?;
            let handles: Vec<Handle> = p.handles.into_iter().map(|id| Handle { id }).collect();
            worker.terminate(&handles).await?;
            Ok(Value::Object(Default::default()))
        }
        other => Err(ErrorBody::new(ErrorKind::Protocol, format!("unknown method {other:?}"), false)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// A class that records what it was asked and starts nothing.
    #[derive(Debug, Default)]
    struct Recorder {
        launched: Mutex<Vec<LaunchSpec>>,
    }

    #[async_trait::async_trait]
    impl Worker for Recorder {
        fn class(&self) -> &str {
            "recorder"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::remote(10, 5, Duration::from_secs(2))
        }
        fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
            match options.keys().find(|k| *k != "zone") {
                None => Ok(()),
                Some(k) => Err(WorkerError::Options { class: "recorder".into(), message: format!("unknown {k}") }),
            }
        }
        async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError> {
            self.launched
                .lock()
                .map_err(|_| WorkerError::Platform { class: "r".into(), message: "poisoned".into(), retryable: false })?
                .push(spec.clone());
            Ok(spec.members.iter().map(|m| Handle { id: format!("h{}", m.index) }).collect())
        }
        async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError> {
            Ok(handles.iter().map(|h| if h.id == "h0" { Liveness::Running } else { Liveness::Unknown }).collect())
        }
        async fn terminate(&self, _: &[Handle]) -> Result<(), WorkerError> {
            Err(WorkerError::Platform { class: "recorder".into(), message: "busy".into(), retryable: true })
        }
    }

    #[tokio::test]
    async fn serve_answers_every_method_by_id() {
        let class = Arc::new(Recorder::default());
        let (client, server) = tokio::io::duplex(1 << 16);
        let (server_read, server_write) = tokio::io::split(server);
        let served = tokio::spawn(serve_io(
            class.clone(),
            vec![OptionSpec::new("zone", "where")],
            BufReader::new(server_read),
            server_write,
        ));
        let (client_read, mut client_write) = tokio::io::split(client);
        let mut lines = BufReader::new(client_read).lines();
        let spec = LaunchSpec {
            program: "/bin/crew".into(),
            program_name: "crew".into(),
            args: vec!["worker".into()],
            env: BTreeMap::from([(ENV_TOKEN.to_owned(), "s3cret".to_owned()), ("CREW_CONNECT".into(), "a:1".into())]),
            members: vec![LaunchMember { slot: "x-1".into(), index: 0 }, LaunchMember { slot: "x-2".into(), index: 1 }],
            options: BTreeMap::new(),
            wall_time: Some(Duration::from_secs(3)),
        };
        let launch = LaunchParams::from_spec(&spec, Some(vec!["--token-stdin".into()]));
        assert!(!launch.env.contains_key(ENV_TOKEN), "the secret leaves the environment");
        assert!(!format!("{launch:?}").contains("s3cret"));
        let requests = [
            json!({"id": 1, "method": "hello", "params": {"protocol": 1, "class": "recorder"}}),
            json!({"id": 2, "method": "check_options", "params": {"options": {"zone": "a"}}}),
            json!({"id": 3, "method": "check_options", "params": {"options": {"size": "a"}}}),
            json!({"id": 4, "method": "launch", "params": serde_json::to_value(&launch).unwrap_or_default()}),
            json!({"id": 5, "method": "probe", "params": {"handles": ["h0", "nope"]}}),
            json!({"id": 6, "method": "terminate", "params": {"handles": ["h0"]}}),
            json!({"id": 7, "method": "fly"}),
        ];
        for r in &requests {
            client_write.write_all(format!("{r}\n").as_bytes()).await.unwrap_or_default();
        }
        client_write.write_all(b"this is not json\n").await.unwrap_or_default();
        client_write.shutdown().await.unwrap_or_default();
        let mut answers = BTreeMap::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let r: Response = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            answers.insert(r.id, r);
        }
        assert!(served.await.is_ok_and(|r| r.is_ok()));
        let hello: HelloResult =
            serde_json::from_value(answers[&1].result.clone().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hello.protocol, PLUGIN_PROTOCOL_VERSION);
        assert_eq!(hello.capabilities.to_capabilities(), Capabilities::remote(10, 5, Duration::from_secs(2)));
        assert_eq!(hello.options[0].name, "zone");
        assert!(answers[&2].error.is_none());
        assert_eq!(answers[&3].error.as_ref().map(|e| e.kind), Some(ErrorKind::Options));
        assert_eq!(answers[&4].result, Some(json!({"handles": ["h0", "h1"]})));
        assert_eq!(answers[&5].result, Some(json!({"states": [{"state": "running"}, {"state": "unknown"}]})));
        let busy = answers[&6].error.clone().map(|e| e.into_worker_error("recorder"));
        assert!(busy.is_some_and(|e| e.is_retryable()));
        assert_eq!(answers[&7].error.as_ref().map(|e| e.kind), Some(ErrorKind::Protocol));
        assert_eq!(
            answers[&0].error.as_ref().map(|e| e.kind),
            Some(ErrorKind::Protocol),
            "garbage gets an error, not a crash"
        );
        // The class got the launch as the trait defines it: the secret in env.
        let launched = class.launched.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(launched.len(), 1);
        assert_eq!(launched[0].env.get(ENV_TOKEN).map(String::as_str), Some("s3cret"));
        assert_eq!(launched[0].wall_time, Some(Duration::from_secs(3)));
        assert_eq!(launched[0].members.len(), 2);
    }
}
