//! The controller: the async loop around the scheduler, and the library API.
//!
//! [`Controller`] is what an embedding program (or `crew run`, or the daemon)
//! holds: `recruit` slots of a class, `send` jobs, `receive` outputs, and
//! `status`, `launch`, `shutdown`, `dismiss`, `cancel`, `restart`, `close`.
//!
//! Inside, one mutex guards the [`Scheduler`] and the runtime tables (slots,
//! launches, connections, outputs). Every event — an API call, a frame from
//! an agent, a timer tick, a probe result — takes the lock, feeds the
//! scheduler, and carries out the actions it returns before letting go.
//! Frames to agents are written with non-blocking writes straight from that
//! point, falling back to a per-connection writer task only when the socket
//! is full. There is no central task to hop through: a job result read from
//! one agent becomes the next job written to it within the same wake-up,
//! which is what keeps the round trip in tens of microseconds.
//! Class calls (`launch`, `probe`, `terminate`) are slow and async, so they
//! run in tasks of their own and report back as events.
//!
//! **Security:** the listener binds to loopback unless told otherwise; each
//! launch has a fresh secret, each member may use it once (with its index),
//! and only while its slot waits for exactly that launch. Secrets never
//! appear in logs (`Secret` redacts itself) or on command lines. A
//! controller that listens beyond loopback (or is told to, [`TlsMode`])
//! speaks TLS with an ephemeral certificate its agents pin ([`crew_tls`]);
//! plaintext is then accepted from loopback peers only, so that local
//! workers keep the fast path. A TLS connection is unwrapped by a task of
//! its own into one end of a socket pair, and the other end goes through
//! the same non-blocking code as a plain TCP connection.

pub mod journal;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crew_core::job::{JobError, JobId, JobSpec};
use crew_core::output::{OUTPUT_FORMAT, Output, Status};
use crew_core::protocol::{self, AgentMsg, ControllerMsg, PROTOCOL_VERSION, RunJob};
use crew_core::seed::job_seed;
use crew_core::store::Store;
use crew_core::tags::Tags;
use crew_core::worker::{
    ENV_CONNECT, ENV_LAUNCH, ENV_RESUME_FILE, ENV_TLS_SHA256, ENV_TOKEN, Handle, LaunchMember, LaunchSpec, Liveness,
    Secret, Worker,
};
use crew_scheduler::{Action, Counts, Scheduler, SlotConfig, SlotFilter, SlotId, SlotLimits, SlotState, SubmitError};
use crew_tls::ControllerTls;

/// How the controller starts an agent: a program and its arguments. The
/// connection details and the secret are added to its environment.
#[derive(Clone, Debug)]
pub struct AgentCommand {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The program's name where classes start agents on other machines
    /// from their own `PATH` (an image), never the path it has here; `None`:
    /// the file name of `program`. [`AgentCommand::crew`] sets `crew`.
    pub name: Option<String>,
}

impl AgentCommand {
    /// `crew worker` from a given `crew` binary.
    pub fn crew(program: impl Into<String>) -> Self {
        Self { program: program.into(), args: vec!["worker".to_owned()], name: Some("crew".to_owned()) }
    }

    /// The program's name on other machines: [`AgentCommand::name`], else
    /// the file name of the program.
    pub fn portable_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::path::Path::new(&self.program)
                .file_name()
                .map_or_else(|| self.program.clone(), |n| n.to_string_lossy().into_owned())
        })
    }

    /// The running executable itself, which must call
    /// `crew_agent::run_if_agent` first thing in `main` (embedders).
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self { program: std::env::current_exe()?.to_string_lossy().into_owned(), args: Vec::new(), name: None })
    }
}

/// Settings of a controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where to listen for agents (loopback and a free port by default).
    pub listen: SocketAddr,
    /// The address agents dial, when it differs from the listening one (a
    /// NAT, a wildcard bind): `host:port`, or a bare host to which the bound
    /// port is added. Defaults to the bound address. Agents of classes that
    /// reach loopback dial loopback instead when the listener takes it.
    pub advertise: Option<String>,
    /// When agent connections use TLS.
    pub tls: TlsMode,
    /// How agents are started.
    pub agent: AgentCommand,
    /// The crew seed; per-job seeds derive from it and the job names.
    pub seed: u64,
    /// The store for large stdout/stderr and job data.
    pub store: Option<Arc<dyn Store>>,
    /// Heartbeat interval, both ways.
    pub heartbeat: Duration,
    /// A worker silent for this many heartbeat intervals is lost.
    pub heartbeat_misses: u32,
    /// Time a stopping worker gets before its class terminates it.
    pub stop_grace: Duration,
    /// Time an agent has to send its hello after connecting.
    pub hello_timeout: Duration,
    /// Connections that may wait for their hello (or TLS handshake) at
    /// once; past it, the oldest waiting one is closed. Authenticated
    /// connections are bounded by the slots (one per launch member), so
    /// the worker port holds at most slots + this many connections.
    pub max_handshakes: usize,
    /// The id of the first job sent (a restarted controller continues its
    /// numbering).
    pub first_job_id: u64,
    /// Told of every job sent to a worker (for a journal); called with the
    /// controller's lock held, so it must be quick and must not call back
    /// into the controller.
    pub observer: Option<Arc<dyn Observer>>,
    /// When set, agents that dial loopback in plaintext may outlive this
    /// controller and come back to the next one (see [`ResumeConfig`]).
    pub resume: Option<ResumeConfig>,
}

/// How agents survive a restart of their controller (the daemon's).
///
/// Each slot's reconnect credential is an HMAC-SHA256 of its name under
/// `key`, so that a restarted controller with the same key recognises the
/// slot without any per-slot secret on disk; agents get it in their
/// `Welcome` (never in their environment or command line) and keep it in
/// memory. Agents find the restarted controller through `address_file`
/// (the path is in their environment, [`crew_core::worker::ENV_RESUME_FILE`]),
/// which [`Controller::publish_address`] writes.
#[derive(Clone, Debug)]
pub struct ResumeConfig {
    /// The key slot credentials derive from (kept private by the caller).
    pub key: Secret,
    /// Where the address agents dial is published.
    pub address_file: std::path::PathBuf,
    /// How long an agent whose controller went away keeps trying to come
    /// back (its job running) before it stops.
    pub window: Duration,
}

impl ResumeConfig {
    /// The reconnect credential of the slot `name`.
    pub fn slot_token(&self, name: &str) -> Secret {
        Secret::new(hmac_sha256_hex(self.key.expose().as_bytes(), format!("crew-resume-v1\0{name}").as_bytes()))
    }
}

/// HMAC-SHA256 (RFC 2104) as lowercase hex.
fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// When agent connections use TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS when the controller listens beyond loopback; plaintext from
    /// loopback peers stays allowed (local workers dial loopback).
    #[default]
    Auto,
    /// TLS for every agent connection, loopback ones included.
    Always,
}

impl TlsMode {
    /// The mode's name, as [`str::parse`] takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            _ => Err(format!("{s:?} is not a TLS mode: use auto (TLS beyond loopback) or always")),
        }
    }
}

/// Hooks for a program that keeps its own record of the controller's work
/// (the daemon's journal).
pub trait Observer: Send + Sync + fmt::Debug {
    /// The job was sent to the worker of slot `slot` for its attempt
    /// `attempt`.
    fn assigned(&self, job: JobId, attempt: u32, slot: &str);
    /// A worker connected (or came back) for the slot `slot`: a restarted
    /// controller expects it back ([`Controller::await_workers`]).
    fn connected(&self, _slot: &str) {}
    /// The slot's worker went away.
    fn disconnected(&self, _slot: &str) {}
}

/// A job a previous controller accepted, for [`Controller::restore`].
#[derive(Clone, Debug)]
pub struct RestoredJob {
    /// Its id, kept.
    pub id: JobId,
    /// What it runs.
    pub spec: JobSpec,
    /// Its past: attempts started, crashes, failures retried.
    pub history: crew_scheduler::History,
    /// The slot whose worker ran it (attempt `history.attempts`) when the
    /// previous controller stopped: with [`ControllerConfig::resume`], the
    /// job is held for that slot's worker to come back with it.
    pub slot: Option<String>,
}

impl ControllerConfig {
    /// Defaults, with the given agent command.
    pub fn new(agent: AgentCommand) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            tls: TlsMode::Auto,
            agent,
            seed: 0,
            store: None,
            heartbeat: Duration::from_secs(2),
            heartbeat_misses: 5,
            stop_grace: Duration::from_secs(3),
            hello_timeout: Duration::from_secs(10),
            max_handshakes: MAX_HANDSHAKES,
            first_job_id: 1,
            observer: None,
            resume: None,
        }
    }
}

/// Errors of the controller API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// The job is not acceptable.
    #[error("invalid job: {0}")]
    InvalidJob(#[from] crew_core::job::JobError),
    /// No slot can run the job.
    #[error(transparent)]
    Refused(#[from] SubmitError),
    /// The name is used by a job not yet received.
    #[error("a job named {0:?} is already pending; names must be unique")]
    DuplicateName(String),
    /// The listener could not be set up.
    #[error("could not listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The controller was closed.
    #[error("the controller is closed")]
    Closed,
    /// Invalid recruit request.
    #[error("invalid recruit request: {0}")]
    Recruit(String),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] crew_tls::TlsError),
    /// The advertised address is not one agents can dial.
    #[error("invalid advertised address: {0}")]
    Advertise(String),
}

/// A recruit request: `count` slots of one class.
#[derive(Clone)]
pub struct Recruit {
    /// The class that starts their agents.
    pub class: Arc<dyn Worker>,
    /// How many slots.
    pub count: u32,
    /// Their tags.
    pub tags: Tags,
    /// Their limits.
    pub limits: SlotLimits,
    /// Class options (`--opt key=value`).
    pub options: BTreeMap<String, String>,
}

impl fmt::Debug for Recruit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recruit")
            .field("class", &self.class.class())
            .field("count", &self.count)
            .field("tags", &self.tags)
            .finish_non_exhaustive()
    }
}

impl Recruit {
    /// `count` slots of `class` with default limits and no tags.
    pub fn new(class: Arc<dyn Worker>, count: u32) -> Self {
        Self { class, count, tags: Tags::new(), limits: SlotLimits::default(), options: BTreeMap::new() }
    }
}

/// One slot in a status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlotStatus {
    /// Name.
    pub name: String,
    /// Class.
    pub class: String,
    /// Tags.
    pub tags: Tags,
    /// `down`, `launching`, `idle`, `busy`, `stopping`, `broken`.
    pub state: &'static str,
    /// The platform handle (pid for local workers), when launched.
    pub handle: Option<String>,
    /// Jobs assigned now.
    pub assigned: usize,
    /// Jobs finished in all.
    pub jobs_done: u64,
    /// Seconds idle, when idle.
    pub idle_seconds: Option<f64>,
    /// Why its last worker stopped or failed.
    pub last_reason: Option<String>,
}

/// A status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusReport {
    /// Every slot.
    pub slots: Vec<SlotStatus>,
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// Jobs assigned to workers.
    pub running: usize,
    /// Outputs ready to be received.
    pub ready: usize,
}

/// Whether `addr` ends with a port (`host:port`, `[v6]:port`), as opposed to
/// a bare host name or address.
fn has_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => port.parse::<u16>().is_ok() && (addr.starts_with('[') || !host.contains(':')),
        None => false,
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    let host = if has_port(addr) { addr.rsplit_once(':').map_or(addr, |(h, _)| h) } else { addr };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The address agents are told, from an `advertise` setting (`host:port`,
/// `[v6]:port`, or a bare host or IPv6 address, which gets `port`): checked,
/// so that a typo fails at start and not when agents dial.
pub fn advertised_address(advertise: &str, port: u16) -> Result<String, String> {
    let a = advertise.trim();
    let full = if has_port(a) {
        a.to_owned()
    } else if a.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{a}]:{port}")
    } else {
        format!("{a}:{port}")
    };
    let host = host_of(&full);
    let port_ok = full.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_some_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'));
    if host_ok && port_ok && has_port(&full) {
        Ok(full)
    } else {
        Err(format!(
            "{advertise:?}: write HOST, HOST:PORT or [IPv6]:PORT with a port from 1 to 65535 (HOST alone takes the \
             listening port)"
        ))
    }
}

/// Whether agents given `addr` (`host:port`) would dial this machine's
/// loopback interface.
fn dials_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The controller: holds the scheduler, listens for agents, runs the loop.
/// Cheap to clone; every clone is the same controller.
///
/// Call [`Controller::close`] when done: it stops the workers in order and
/// waits until they are gone. A controller that is merely dropped keeps its
/// background tasks until the runtime shuts down; its workers then see the
/// connection drop and exit by themselves (and kill their jobs), so nothing
/// is left behind either way, only less gracefully.
///
/// ```no_run
/// # use std::sync::Arc;
/// # async fn demo(class: Arc<dyn crew_core::worker::Worker>) -> Result<(), Box<dyn std::error::Error>> {
/// use crew_core::controller::{AgentCommand, Controller, ControllerConfig, Recruit};
/// let controller = Controller::start(ControllerConfig::new(AgentCommand::crew("/usr/local/bin/crew"))).await?;
/// controller.recruit(Recruit::new(class, 4))?;
/// let id = controller.send(crew_core::JobSpec::shell("echo hello"))?;
/// let output = controller.receive_wait(None).await.expect("one job is pending");
/// assert_eq!(output.id, id);
/// controller.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller").field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

struct Shared {
    core: Mutex<Core>,
    outputs_ready: Notify,
    /// Wakes the timer task when deadlines may have moved earlier.
    timer_wake: Notify,
    addr: SocketAddr,
    advertise: String,
    /// What agents of classes that reach loopback dial, when the listener
    /// takes loopback connections and plaintext is allowed from there.
    loopback: Option<String>,
    /// Set when agent connections use TLS.
    tls: Option<ControllerTls>,
    config: ControllerConfig,
    epoch: Instant,
    stop: CancellationToken,
}

struct SlotRt {
    class: Arc<dyn Worker>,
    options: BTreeMap<String, String>,
    handle: Option<Handle>,
    /// The launch that started (or is starting) the slot's current worker;
    /// cleared when the slot is told to stop, so that a late launch result
    /// terminates what it started.
    launch: Option<u64>,
    conn: Option<Arc<Conn>>,
}

struct LaunchRt {
    secret: Secret,
    /// Slot of each index, and whether the index was used.
    members: Vec<(SlotId, bool)>,
}

struct Core {
    sched: Scheduler,
    slots: Vec<SlotRt>,
    launches: HashMap<u64, LaunchRt>,
    names: HashMap<String, JobId>,
    outputs: VecDeque<Output>,
    next_job: u64,
    next_launch: u64,
    next_conn: u64,
    class_counters: HashMap<String, u32>,
    closing: bool,
    actions: Vec<Action>,
}

/// Slots launched together: same class, same options.
type LaunchGroup = (Arc<dyn Worker>, BTreeMap<String, String>, Vec<SlotId>);

/// Handles of one class to probe, with their slots.
type ProbeBatch = (Arc<dyn Worker>, Vec<(SlotId, Handle)>);

/// One agent connection.
struct Conn {
    id: u64,
    slot: SlotId,
    /// The slot's name, for logs.
    name: String,
    stream: Arc<Link>,
    out: Mutex<BytesMut>,
    writer_wake: Notify,
    closed: CancellationToken,
    last_recv_ms: AtomicU64,
    last_sent_ms: AtomicU64,
    broken: AtomicBool,
    /// The writer task owns the buffer's head until it drained it (the
    /// socket was full); direct writes wait meanwhile, to keep frame order.
    pending_write: AtomicBool,
    /// Object lists of results in parts ([`AgentMsg::Objects`]), by job
    /// and attempt, until their `Done`; `true` when the list passed
    /// [`MAX_RESULT_OBJECTS`].
    objects: Mutex<HashMap<(JobId, u32), ObjectParts>>,
}

/// The parts of one result's object list received so far, and whether it
/// passed [`MAX_RESULT_OBJECTS`].
type ObjectParts = (Vec<crew_core::staging::StoredObject>, bool);

/// The most output objects one result may list; a job that uploaded more
/// ends `failed` with a reason (the controller's memory is the bound).
pub const MAX_RESULT_OBJECTS: usize = 1_000_000;

impl Conn {
    /// Queues a frame and writes as much as the socket takes now.
    fn send(&self, msg: &ControllerMsg, now_ms: u64) {
        if self.queue(msg, now_ms) {
            self.flush();
        }
    }

    /// Appends a frame to the outgoing buffer without writing; returns
    /// false when it could not be encoded (logged). Callers batch several
    /// frames and [`Conn::flush`] once.
    fn queue(&self, msg: &ControllerMsg, now_ms: u64) -> bool {
        let mut out = lock(&self.out);
        if let Err(e) = protocol::encode(msg, &mut out) {
            warn!(slot = %self.name, "dropping a frame that cannot be encoded: {e}");
            return false;
        }
        self.last_sent_ms.store(now_ms, Ordering::Relaxed);
        true
    }

    /// Writes what the socket takes now; the writer task gets the rest.
    fn flush(&self) {
        let mut out = lock(&self.out);
        if out.is_empty() || self.pending_write.load(Ordering::Relaxed) {
            return;
        }
        match self.stream.try_write(&out) {
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                debug!(slot = %self.name, "write failed: {e}");
                self.broken.store(true, Ordering::Relaxed);
                self.closed.cancel();
                return;
            }
        }
        if !out.is_empty() {
            self.pending_write.store(true, Ordering::Relaxed);
            self.writer_wake.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; keep serving rather than
    // cascading panics into every caller.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Controller {
    /// Binds the listener and starts the background tasks. Must be called
    /// within a Tokio runtime.
    pub async fn start(config: ControllerConfig) -> Result<Self, ControllerError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ControllerError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| ControllerError::Listen { addr: config.listen, source })?;
        let advertise = match &config.advertise {
            None => addr.to_string(),
            Some(a) => advertised_address(a, addr.port()).map_err(ControllerError::Advertise)?,
        };
        // Encrypted as soon as anything may cross a network: a listener
        // beyond loopback, or agents told to dial elsewhere (a proxy or a
        // port forward in front of a loopback listener).
        let tls = match config.tls {
            TlsMode::Always => true,
            TlsMode::Auto => !addr.ip().is_loopback() || !dials_loopback(&advertise),
        };
        let tls = if tls { Some(ControllerTls::generate()?) } else { None };
        // A wildcard listener takes loopback connections too; for `[::]`,
        // 127.0.0.1 (Linux binds it dual-stack by default, and loopback
        // often has no IPv6 in containers).
        let loopback = match (config.tls, addr.ip()) {
            (TlsMode::Always, _) => None,
            (_, ip) if ip.is_loopback() => Some(addr.to_string()),
            (_, ip) if ip.is_unspecified() => Some(format!("127.0.0.1:{}", addr.port())),
            _ => None,
        };
        if let Some(tls) = &tls {
            info!(%addr, fingerprint = tls.fingerprint(), "agent connections use TLS (agents pin this certificate)");
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                sched: Scheduler::new(),
                slots: Vec::new(),
                launches: HashMap::new(),
                names: HashMap::new(),
                outputs: VecDeque::new(),
                next_job: config.first_job_id.max(1),
                next_launch: 1,
                next_conn: 1,
                class_counters: HashMap::new(),
                closing: false,
                actions: Vec::new(),
            }),
            outputs_ready: Notify::new(),
            timer_wake: Notify::new(),
            addr,
            advertise,
            loopback,
            tls,
            config,
            epoch: Instant::now(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(shared.clone(), listener));
        tokio::spawn(timer_loop(shared.clone()));
        tokio::spawn(probe_loop(shared.clone()));
        info!(%addr, "controller listening");
        Ok(Self { shared })
    }

    /// The address the controller listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The address agents of classes that run elsewhere dial.
    pub fn advertised(&self) -> &str {
        &self.shared.advertise
    }

    /// The SHA-256 of the TLS certificate agents pin, when agent
    /// connections use TLS.
    pub fn tls_fingerprint(&self) -> Option<&str> {
        self.shared.tls.as_ref().map(ControllerTls::fingerprint)
    }

    /// The TLS mode the controller was started with.
    pub fn tls_mode(&self) -> TlsMode {
        self.shared.config.tls
    }

    /// What is wrong with recruiting `class` here, if something is: its
    /// workers run elsewhere but would be told a loopback address. The
    /// recruit goes ahead (the address may be tunnelled); callers show the
    /// warning to the user.
    pub fn reach_warning(&self, class: &dyn Worker) -> Option<String> {
        if class.capabilities().reaches_loopback {
            return None;
        }
        let address = &self.shared.advertise;
        let what = if dials_loopback(address) {
            "a loopback address"
        } else if host_of(address).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
            "a wildcard address"
        } else {
            return None;
        };
        Some(format!(
            "workers of class {} run elsewhere and cannot dial {address}, {what}: listen on an address they \
             reach and advertise it (crew.toml [daemon] listen/advertise, CREW_LISTEN/CREW_ADVERTISE, crew up \
             --listen/--advertise)",
            class.class(),
        ))
    }

    /// Adds slots (down until needed); returns their names.
    pub fn recruit(&self, req: Recruit) -> Result<Vec<String>, ControllerError> {
        if req.count == 0 {
            return Err(ControllerError::Recruit("the number of workers must be at least 1".into()));
        }
        if req.limits.launch_max == 0 {
            return Err(ControllerError::Recruit("the launch budget must be at least 1".into()));
        }
        if req.limits.tasks_max == Some(0) {
            return Err(ControllerError::Recruit("the task limit must be at least 1 (or none)".into()));
        }
        if req.limits.launch_timeout.is_zero() {
            return Err(ControllerError::Recruit("the launch timeout must be greater than zero".into()));
        }
        req.class.check_options(&req.options).map_err(|e| ControllerError::Recruit(e.to_string()))?;
        // Callers show it to the user (`reach_warning`); the log keeps it.
        if let Some(warning) = self.reach_warning(req.class.as_ref()) {
            info!("{warning}");
        }
        let shared = &self.shared;
        let mut core = lock(&shared.core);
        if core.closing {
            return Err(ControllerError::Closed);
        }
        let class = req.class.class().to_owned();
        let mut configs = Vec::with_capacity(req.count as usize);
        for _ in 0..req.count {
            let n = core.class_counters.entry(class.clone()).or_insert(0);
            *n += 1;
            let name = format!("{class}-{n}");
            configs.push(SlotConfig { name, class: class.clone(), tags: req.tags.clone(), limits: req.limits.clone() });
            core.slots.push(SlotRt {
                class: req.class.clone(),
                options: req.options.clone(),
                handle: None,
                launch: None,
                conn: None,
            });
        }
        let names = configs.iter().map(|c| c.name.clone()).collect();
        let now = Instant::now();
        core.sched.recruit(configs, now);
        shared.apply(&mut core);
        Ok(names)
    }

    /// Sends one job; returns its id.
    pub fn send(&self, spec: JobSpec) -> Result<JobId, ControllerError> {
        let mut ids = self.send_many(vec![spec])?;
        ids.pop().ok_or(ControllerError::Closed)
    }

    /// Sends many jobs at once, all or nothing: if one is refused, none is
    /// accepted.
    pub fn send_many(&self, specs: Vec<JobSpec>) -> Result<Vec<JobId>, ControllerError> {
        self.check_jobs(&specs)?;
        let shared = &self.shared;
        let mut core = lock(&shared.core);
        if core.closing {
            return Err(ControllerError::Closed);
        }
        Self::check_locked(&core, &specs)?;
        let now = Instant::now();
        let ids = Self::take_ids(&mut core, specs.len())?;
        for (id, spec) in ids.iter().copied().zip(specs) {
            let seed = job_seed(shared.config.seed, &spec.seed_key(id));
            if let Some(name) = &spec.name {
                core.names.insert(name.clone(), id);
            }
            core.sched.submit(id, Arc::new(spec), seed, now)?;
            if core.sched.has_actions() {
                shared.apply(&mut core);
            }
        }
        Ok(ids)
    }

    /// Checks jobs as [`Controller::send_many`] would, accepting nothing:
    /// for a program that records jobs durably before it hands them over
    /// (with ids from [`Controller::reserve_ids`], then
    /// [`Controller::restore`]), so that what it records is what the
    /// controller takes.
    pub fn check_jobs(&self, specs: &[JobSpec]) -> Result<(), ControllerError> {
        let mut seen = HashSet::new();
        for spec in specs {
            spec.validate()?;
            spec.check_size()?;
            self.check_data(spec)?;
            if let Some(name) = &spec.name {
                if !seen.insert(name.as_str()) {
                    return Err(ControllerError::DuplicateName(name.clone()));
                }
            }
        }
        let core = lock(&self.shared.core);
        if core.closing {
            return Err(ControllerError::Closed);
        }
        Self::check_locked(&core, specs)
    }

    /// Takes `n` job ids that no other job gets, for jobs handed over later
    /// with [`Controller::restore`].
    pub fn reserve_ids(&self, n: usize) -> Result<Vec<JobId>, ControllerError> {
        Self::take_ids(&mut lock(&self.shared.core), n)
    }

    fn take_ids(core: &mut Core, n: usize) -> Result<Vec<JobId>, ControllerError> {
        let first = core.next_job;
        let end = u64::try_from(n).ok().and_then(|n| first.checked_add(n)).ok_or_else(|| {
            ControllerError::InvalidJob(JobError("the job ids are used up (the journal holds an id near 2^64)".into()))
        })?;
        core.next_job = end;
        Ok((first..end).map(JobId).collect())
    }

    fn check_locked(core: &Core, specs: &[JobSpec]) -> Result<(), ControllerError> {
        for spec in specs {
            if let Some(name) = &spec.name {
                if core.names.contains_key(name) {
                    return Err(ControllerError::DuplicateName(name.clone()));
                }
            }
            core.sched.check_tags(&spec.tags)?;
        }
        Ok(())
    }

    /// Refuses a job whose data the workers could not get: inputs or outputs
    /// without a store, or inputs not staged yet.
    fn check_data(&self, spec: &JobSpec) -> Result<(), ControllerError> {
        if spec.has_data() && self.shared.config.store.is_none() {
            return Err(JobError(
                "the job has inputs or outputs, but the controller has no store to put them in".to_owned(),
            )
            .into());
        }
        if let Some(input) = spec.unstaged_input() {
            return Err(JobError(format!(
                "input {:?} is not staged: stage the job's inputs into the store first \
                 (crew_core::staging::Stager), so that workers can fetch them",
                input.name
            ))
            .into());
        }
        Ok(())
    }

    /// Accepts jobs a previous controller accepted (read back from a
    /// journal), keeping their ids and seeds; later sends are numbered after
    /// the largest id. All or nothing, like [`Controller::send_many`].
    pub fn restore(&self, jobs: Vec<RestoredJob>) -> Result<(), ControllerError> {
        for job in &jobs {
            job.spec.validate()?;
            job.spec.check_size()?;
            self.check_data(&job.spec)?;
        }
        let shared = &self.shared;
        let mut core = lock(&shared.core);
        if core.closing {
            return Err(ControllerError::Closed);
        }
        for job in &jobs {
            if let Some(name) = &job.spec.name {
                if core.names.contains_key(name) {
                    return Err(ControllerError::DuplicateName(name.clone()));
                }
            }
            core.sched.check_tags(&job.spec.tags)?;
        }
        let now = Instant::now();
        // Slots whose workers may come back with their jobs wait for them
        // first, so that nothing is dispatched meanwhile.
        let mut held = |name: &Option<String>| -> Option<SlotId> {
            let resume = shared.config.resume.as_ref()?;
            let slot = core.sched.slot_by_name(name.as_deref()?)?;
            let until = crew_core::clock::after(now, resume.window.saturating_add(shared.config.heartbeat * 2));
            core.sched.await_resume(slot, until);
            (core.sched.slot_state(slot) == SlotState::Resuming).then_some(slot)
        };
        let slots: Vec<Option<SlotId>> = jobs.iter().map(|j| held(&j.slot)).collect();
        for (job, slot) in jobs.into_iter().zip(slots) {
            core.next_job = core.next_job.max(job.id.0.saturating_add(1));
            let seed = job_seed(shared.config.seed, &job.spec.seed_key(job.id));
            if let Some(name) = &job.spec.name {
                core.names.insert(name.clone(), job.id);
            }
            match slot {
                Some(slot) => core.sched.restore_held(job.id, Arc::new(job.spec), seed, job.history, slot, now)?,
                None => core.sched.restore(job.id, Arc::new(job.spec), seed, job.history, now)?,
            }
        }
        self.shared.timer_wake.notify_one();
        shared.apply(&mut core);
        Ok(())
    }

    /// Takes one finished output, if any (non-blocking). Each output is
    /// delivered once.
    pub fn receive(&self) -> Option<Output> {
        lock(&self.shared.core).outputs.pop_front()
    }

    /// Takes every finished output available now.
    pub fn receive_all(&self) -> Vec<Output> {
        lock(&self.shared.core).outputs.drain(..).collect()
    }

    /// Waits for the next output. Returns `None` when no job is pending (so
    /// none will come), or when `timeout` passes first.
    pub async fn receive_wait(&self, timeout: Option<Duration>) -> Option<Output> {
        let deadline = timeout.map(|t| crew_core::clock::after_tokio(tokio::time::Instant::now(), t));
        loop {
            let notified = self.shared.outputs_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut core = lock(&self.shared.core);
                if let Some(o) = core.outputs.pop_front() {
                    return Some(o);
                }
                if core.sched.pending() == 0 {
                    return None;
                }
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return None;
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Jobs sent but not yet finished.
    pub fn pending(&self) -> usize {
        lock(&self.shared.core).sched.pending()
    }

    /// Job counts.
    pub fn counts(&self) -> Counts {
        lock(&self.shared.core).sched.counts()
    }

    /// The slots and job counts.
    pub fn status(&self) -> StatusReport {
        let core = lock(&self.shared.core);
        let now = Instant::now();
        let slots = core
            .sched
            .slots()
            .map(|v| {
                let rt = &core.slots[v.id.0 as usize];
                let state = match v.state {
                    SlotState::Down => "down",
                    SlotState::Launching => "launching",
                    SlotState::Up if v.assigned == 0 => "idle",
                    SlotState::Up => "busy",
                    SlotState::Stopping => "stopping",
                    SlotState::Broken => "broken",
                    SlotState::Resuming => "resuming",
                    _ => "unknown",
                };
                SlotStatus {
                    name: v.config.name.clone(),
                    class: v.config.class.clone(),
                    tags: v.config.tags.clone(),
                    state,
                    handle: rt.handle.as_ref().map(|h| h.id.clone()),
                    assigned: v.assigned,
                    jobs_done: v.jobs_done,
                    idle_seconds: v.idle_since.map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    last_reason: v.last_reason.map(str::to_owned),
                }
            })
            .collect();
        let counts = core.sched.counts();
        StatusReport { slots, queued: counts.queued, running: counts.assigned, ready: core.outputs.len() }
    }

    /// Starts down slots ahead of need; returns how many.
    pub fn launch(&self, filter: &SlotFilter, count: usize) -> usize {
        self.with_sched(|s, now| s.launch(filter, count, now))
    }

    /// Stops idle workers (or all with `all`); returns how many.
    pub fn shutdown(&self, filter: &SlotFilter, all: bool) -> usize {
        self.with_sched(|s, now| s.shutdown(filter, all, now))
    }

    /// Removes slots; returns how many.
    pub fn dismiss(&self, filter: &SlotFilter) -> usize {
        self.with_sched(|s, now| s.dismiss(filter, now))
    }

    /// Makes broken slots usable and relaunches stuck ones.
    pub fn restart(&self) -> usize {
        self.with_sched(|s, now| s.restart(now))
    }

    /// Cancels a job; false when it is unknown or already finished.
    pub fn cancel(&self, job: JobId) -> bool {
        self.with_sched(|s, now| s.cancel(job, now))
    }

    /// Cancels every pending job; returns how many were pending.
    pub fn cancel_all(&self) -> usize {
        let mut core = lock(&self.shared.core);
        let ids = core.sched.pending_ids();
        let now = Instant::now();
        for id in &ids {
            core.sched.cancel(*id, now);
        }
        self.shared.apply(&mut core);
        ids.len()
    }

    fn with_sched<R>(&self, f: impl FnOnce(&mut Scheduler, Instant) -> R) -> R {
        let mut core = lock(&self.shared.core);
        let r = f(&mut core.sched, Instant::now());
        self.shared.apply(&mut core);
        self.shared.timer_wake.notify_one();
        r
    }

    /// After a restart: expects the workers of these slots (up when the
    /// previous controller stopped) back for the reconnect window, before
    /// any queued job is dispatched, so that a job one of them runs, whose
    /// assignment the journal lost, does not start twice. Call it before
    /// [`Controller::restore`]. Does nothing without
    /// [`ControllerConfig::resume`].
    pub fn await_workers(&self, slots: &[String]) {
        let Some(resume) = &self.shared.config.resume else { return };
        let mut core = lock(&self.shared.core);
        let until =
            crew_core::clock::after(Instant::now(), resume.window.saturating_add(self.shared.config.heartbeat * 2));
        for name in slots {
            if let Some(slot) = core.sched.slot_by_name(name) {
                core.sched.await_resume(slot, until);
            }
        }
        drop(core);
        self.shared.timer_wake.notify_one();
    }

    /// True when agents may outlive this controller ([`ControllerConfig::resume`]).
    pub fn resumes(&self) -> bool {
        self.shared.config.resume.is_some()
    }

    /// Writes the address local agents dial to [`ResumeConfig::address_file`]
    /// (mode 0600, replaced atomically), so that agents that outlived the
    /// previous controller find this one. Call it once the jobs of the
    /// previous controller are restored: an agent that comes back earlier
    /// would find its slot unknown.
    pub fn publish_address(&self) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(resume) = &self.shared.config.resume else { return Ok(()) };
        let addr = self.shared.loopback.clone().unwrap_or_else(|| self.shared.advertise.clone());
        let tmp = resume.address_file.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{addr}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &resume.address_file)
    }

    /// Stops every worker and the controller's tasks, and waits (up to the
    /// stop grace plus a few seconds) until the classes report every agent
    /// gone. Outputs not yet received stay receivable.
    pub async fn close(&self) {
        let shared = &self.shared;
        let mut handles: Vec<(Arc<dyn Worker>, Handle)> = Vec::new();
        let conns: Vec<Arc<Conn>>;
        {
            let mut core = lock(&shared.core);
            core.closing = true;
            let now_ms = shared.now_ms();
            conns = core.slots.iter().filter_map(|s| s.conn.clone()).collect();
            for c in &conns {
                c.send(&ControllerMsg::Stop, now_ms);
            }
            for s in &mut core.slots {
                if let Some(h) = s.handle.clone() {
                    handles.push((s.class.clone(), h));
                }
                s.launch = None;
            }
            core.launches.clear();
        }
        // Give agents the grace to leave by themselves.
        let deadline = crew_core::clock::after_tokio(tokio::time::Instant::now(), shared.config.stop_grace);
        for c in &conns {
            let _ = tokio::time::timeout_at(deadline, c.closed.cancelled()).await;
        }
        shared.stop.cancel();
        terminate_all(&handles).await;
        // Wait until the classes say the agents are gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if all_gone(&handles).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for c in &conns {
            c.closed.cancel();
        }
    }
}

/// Identity of a class *instance*: two recruits may use two instances of
/// the same class, and each knows only the agents it started, so handles
/// are grouped by instance, never by class name.
fn instance(class: &Arc<dyn Worker>) -> usize {
    Arc::as_ptr(class).cast::<()>() as usize
}

async fn terminate_all(handles: &[(Arc<dyn Worker>, Handle)]) {
    let mut by_class: HashMap<usize, (Arc<dyn Worker>, Vec<Handle>)> = HashMap::new();
    for (class, h) in handles {
        by_class.entry(instance(class)).or_insert_with(|| (class.clone(), Vec::new())).1.push(h.clone());
    }
    for (class, hs) in by_class.into_values() {
        if let Err(e) = class.terminate(&hs).await {
            warn!(class = %class.class(), "terminating workers failed: {e}");
        }
    }
}

async fn all_gone(handles: &[(Arc<dyn Worker>, Handle)]) -> bool {
    for (class, h) in handles {
        match class.probe(std::slice::from_ref(h)).await {
            Ok(l) if matches!(l.first(), Some(Liveness::Exited { .. } | Liveness::Unknown)) => {}
            _ => return false,
        }
    }
    true
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Carries out the scheduler's pending actions. Called with the lock
    /// held, after every event.
    fn apply(self: &Arc<Self>, core: &mut Core) {
        let mut actions = std::mem::take(&mut core.actions);
        core.sched.drain_actions_into(&mut actions);
        let now_ms = self.now_ms();
        let mut delivered = false;
        // Connections written to, flushed once at the end (one write
        // system call per worker per event, however many frames).
        let mut dirty: Vec<Arc<Conn>> = Vec::new();
        let mut queue = |conn: &Arc<Conn>, msg: &ControllerMsg| {
            if conn.queue(msg, now_ms) && !dirty.iter().any(|c| Arc::ptr_eq(c, conn)) {
                dirty.push(conn.clone());
            }
        };
        for action in actions.drain(..) {
            match action {
                Action::Assign { slot, job, attempt } => {
                    tracing::trace!(%job, attempt, slot = slot.0, "assign");
                    if let Some(observer) = &self.config.observer {
                        observer.assigned(job, attempt, &core.sched.slot_config(slot).name);
                    }
                    let (Some(spec), Some(seed)) = (core.sched.job(job).cloned(), core.sched.job_seed(job)) else {
                        continue;
                    };
                    if let Some(conn) = &core.slots[slot.0 as usize].conn {
                        queue(conn, &ControllerMsg::Run(Box::new(RunJob { job, attempt, seed, spec })));
                    }
                }
                Action::Deliver(output) => {
                    if let Some(name) = &output.name {
                        if core.names.get(name) == Some(&output.id) {
                            core.names.remove(name);
                        }
                    }
                    core.outputs.push_back(*output);
                    delivered = true;
                }
                Action::Revoke { slot, job } => {
                    tracing::trace!(%job, slot = slot.0, "revoke");
                    if let Some(conn) = &core.slots[slot.0 as usize].conn {
                        queue(conn, &ControllerMsg::Revoke { job });
                    }
                }
                Action::Cancel { slot, job } => {
                    if let Some(conn) = &core.slots[slot.0 as usize].conn {
                        queue(conn, &ControllerMsg::Cancel { job });
                    }
                }
                Action::Launch(slots) => self.start_launches(core, slots),
                Action::Terminate { slot, reason } => self.terminate_slot(core, slot, &reason),
            }
        }
        for conn in dirty {
            conn.flush();
        }
        core.actions = actions;
        if delivered {
            self.outputs_ready.notify_waiters();
        }
    }

    fn start_launches(self: &Arc<Self>, core: &mut Core, slots: Vec<SlotId>) {
        if core.closing {
            return;
        }
        // One launch per class and option set, split by the class's batch
        // limit.
        let mut groups: Vec<LaunchGroup> = Vec::new();
        for slot in slots {
            let rt = &core.slots[slot.0 as usize];
            match groups.iter_mut().find(|(c, o, _)| Arc::ptr_eq(c, &rt.class) && *o == rt.options) {
                Some(g) => g.2.push(slot),
                None => groups.push((rt.class.clone(), rt.options.clone(), vec![slot])),
            }
        }
        for (class, options, slots) in groups {
            let max = class.capabilities().launch_batch_max.max(1);
            for chunk in slots.chunks(max) {
                let id = core.next_launch;
                core.next_launch += 1;
                let secret = Secret::random();
                let mut env = BTreeMap::new();
                // The pin is always set, empty for plaintext, so that one in
                // the controller's own environment never reaches an agent.
                let (connect, pin) = match (&self.loopback, class.capabilities().reaches_loopback) {
                    (Some(loopback), true) => (loopback.clone(), String::new()),
                    _ => (
                        self.advertise.clone(),
                        self.tls.as_ref().map(|t| t.fingerprint().to_owned()).unwrap_or_default(),
                    ),
                };
                if let (Some(resume), true) = (&self.config.resume, pin.is_empty()) {
                    env.insert(ENV_RESUME_FILE.to_owned(), resume.address_file.to_string_lossy().into_owned());
                }
                env.insert(ENV_CONNECT.to_owned(), connect);
                env.insert(ENV_TLS_SHA256.to_owned(), pin);
                env.insert(ENV_LAUNCH.to_owned(), id.to_string());
                env.insert(ENV_TOKEN.to_owned(), secret.expose().to_owned());
                let members = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, s)| LaunchMember { slot: core.sched.slot_config(*s).name.clone(), index: i as u32 })
                    .collect();
                let wall_time = core.sched.slot_config(chunk[0]).limits.wall_time;
                let spec = LaunchSpec {
                    program: self.config.agent.program.clone(),
                    program_name: self.config.agent.portable_name(),
                    args: self.config.agent.args.clone(),
                    env,
                    members,
                    options: options.clone(),
                    wall_time,
                };
                core.launches.insert(id, LaunchRt { secret, members: chunk.iter().map(|s| (*s, false)).collect() });
                for s in chunk {
                    core.slots[s.0 as usize].launch = Some(id);
                    core.slots[s.0 as usize].handle = None;
                }
                let shared = self.clone();
                let class = class.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    let result = class.launch(&spec).await;
                    shared.launch_done(id, &chunk, result);
                });
            }
        }
        self.timer_wake.notify_one();
    }

    fn launch_done(
        self: &Arc<Self>,
        launch: u64,
        slots: &[SlotId],
        result: Result<Vec<Handle>, crew_core::worker::WorkerError>,
    ) {
        let mut guard = lock(&self.core);
        let core = &mut *guard;
        let now = Instant::now();
        match result {
            Ok(handles) => {
                let mut stale = Vec::new();
                for (slot, handle) in slots.iter().zip(handles) {
                    let rt = &mut core.slots[slot.0 as usize];
                    if rt.launch == Some(launch) && !core.closing {
                        rt.handle = Some(handle);
                    } else {
                        stale.push((rt.class.clone(), handle));
                    }
                }
                if !stale.is_empty() {
                    tokio::spawn(async move { terminate_all(&stale).await });
                }
            }
            Err(e) => {
                warn!(launch, "launch failed: {e}");
                let reason = e.to_string();
                for slot in slots {
                    if core.slots[slot.0 as usize].launch == Some(launch) {
                        core.slots[slot.0 as usize].launch = None;
                        core.sched.launch_failed(*slot, &reason, now);
                    }
                }
                core.launches.remove(&launch);
            }
        }
        self.apply(core);
    }

    fn terminate_slot(self: &Arc<Self>, core: &mut Core, slot: SlotId, reason: &str) {
        let now_ms = self.now_ms();
        let rt = &mut core.slots[slot.0 as usize];
        debug!(slot = %core.sched.slot_config(slot).name, reason, "stopping worker");
        if let Some(launch) = rt.launch.take() {
            if let Some(l) = core.launches.get_mut(&launch) {
                // This member may no longer connect.
                for m in &mut l.members {
                    if m.0 == slot {
                        m.1 = true;
                    }
                }
            }
        }
        let handle = rt.handle.clone();
        let class = rt.class.clone();
        let conn = rt.conn.clone();
        if let Some(conn) = &conn {
            conn.send(&ControllerMsg::Stop, now_ms);
        }
        if let Some(handle) = handle {
            let grace = if conn.is_some() { self.config.stop_grace } else { Duration::ZERO };
            tokio::spawn(async move {
                if let Some(conn) = conn {
                    let _ = tokio::time::timeout(grace, conn.closed.cancelled()).await;
                }
                if let Err(e) = class.terminate(&[handle]).await {
                    warn!("terminating a worker failed: {e}");
                }
            });
        }
    }

    /// Validates a hello; returns the slot and its welcome.
    fn admit(
        self: &Arc<Self>,
        core: &mut Core,
        launch: &str,
        index: u32,
        token: &Secret,
        version: u32,
    ) -> Result<(SlotId, ControllerMsg), String> {
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version mismatch: the agent speaks {version}, the controller {PROTOCOL_VERSION}; use the same crew version on both sides"
            ));
        }
        let id: u64 = launch.parse().map_err(|_| "unknown launch".to_owned())?;
        let l = core.launches.get_mut(&id).ok_or("unknown or expired launch")?;
        // The launch secret (classes that start their own processes), or
        // the member's own secret: valid for that index only.
        if !l.secret.matches(token.expose()) && !l.secret.member_secret(index).matches(token.expose()) {
            return Err("invalid token".into());
        }
        let member = l.members.get_mut(index as usize).ok_or("invalid member index")?;
        if member.1 {
            return Err("this launch member already connected (tokens are single-use)".into());
        }
        member.1 = true;
        let slot = member.0;
        if l.members.iter().all(|m| m.1) {
            core.launches.remove(&id);
        }
        if core.slots[slot.0 as usize].launch != Some(id) {
            return Err("the slot no longer waits for this launch".into());
        }
        let cfg = core.sched.slot_config(slot);
        let welcome = ControllerMsg::Welcome {
            version: PROTOCOL_VERSION,
            slot: cfg.name.clone(),
            // The controller stops idle workers itself; the agent's own
            // limit only guards against a controller that vanished without
            // closing the connection.
            idle_timeout: cfg
                .limits
                .idle_timeout
                .map(|d| d.saturating_add(self.config.heartbeat.saturating_mul(self.config.heartbeat_misses))),
            tasks_max: cfg.limits.tasks_max,
            heartbeat: self.config.heartbeat,
            store: self.config.store.as_ref().map(|s| s.url()),
            resume: self
                .config
                .resume
                .as_ref()
                .map(|r| protocol::ResumeGrant { token: r.slot_token(&cfg.name), window: r.window }),
        };
        Ok((slot, welcome))
    }

    /// Validates the hello of an agent that comes back after a controller
    /// restart; returns the slot and its welcome.
    fn admit_resume(
        self: &Arc<Self>,
        core: &mut Core,
        name: &str,
        token: &Secret,
        version: u32,
        jobs: &[(JobId, u32)],
    ) -> Result<(SlotId, ControllerMsg), String> {
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version mismatch: the agent speaks {version}, the controller {PROTOCOL_VERSION}"
            ));
        }
        let resume = self.config.resume.as_ref().ok_or("this controller takes no workers back")?;
        let slot = core.sched.slot_by_name(name).ok_or("unknown slot")?;
        if !resume.slot_token(name).matches(token.expose()) {
            return Err("invalid reconnect credential".into());
        }
        if core.slots[slot.0 as usize].conn.is_some() || !core.sched.resumed(slot, jobs, Instant::now()) {
            return Err("the slot does not wait for its worker to come back".into());
        }
        let rt = &mut core.slots[slot.0 as usize];
        rt.launch = None;
        rt.handle = None;
        let cfg = core.sched.slot_config(slot);
        let welcome = ControllerMsg::Welcome {
            version: PROTOCOL_VERSION,
            slot: cfg.name.clone(),
            idle_timeout: cfg
                .limits
                .idle_timeout
                .map(|d| d.saturating_add(self.config.heartbeat.saturating_mul(self.config.heartbeat_misses))),
            tasks_max: cfg.limits.tasks_max,
            heartbeat: self.config.heartbeat,
            store: self.config.store.as_ref().map(|s| s.url()),
            resume: Some(protocol::ResumeGrant { token: resume.slot_token(&cfg.name), window: resume.window }),
        };
        Ok((slot, welcome))
    }

    /// Handles frames from a connected agent.
    fn on_messages(self: &Arc<Self>, conn: &Arc<Conn>, msgs: Vec<AgentMsg>) {
        let mut core = lock(&self.core);
        let slot = conn.slot;
        if core.slots[slot.0 as usize].conn.as_ref().is_none_or(|c| c.id != conn.id) {
            return;
        }
        let now = Instant::now();
        for msg in msgs {
            match msg {
                AgentMsg::Objects { job, attempt, objects } => {
                    let mut parts = lock(&conn.objects);
                    let (list, overflow) = parts.entry((job, attempt)).or_default();
                    if list.len() + objects.len() > MAX_RESULT_OBJECTS {
                        *overflow = true;
                    } else {
                        list.extend(objects);
                    }
                }
                AgentMsg::Done { job, attempt, result } => {
                    let parts = lock(&conn.objects).remove(&(job, attempt));
                    let Some(spec) = core.sched.job(job).cloned() else { continue };
                    let cfg = core.sched.slot_config(slot);
                    let mut r = *result;
                    if let Some((mut objects, overflow)) = parts {
                        if overflow || objects.len() + r.objects.len() > MAX_RESULT_OBJECTS {
                            r.status = Status::Failed;
                            r.error = Some(format!(
                                "the job uploaded more than {MAX_RESULT_OBJECTS} output files, more than one \
                                 record may list; narrow its output patterns, or archive the files into fewer"
                            ));
                            objects.clear();
                            r.objects.clear();
                        }
                        objects.append(&mut r.objects);
                        r.objects = objects;
                    }
                    let output = Output {
                        v: OUTPUT_FORMAT,
                        id: job,
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
                            .then(|| spec.cpu.map(|c| crew_core::job::cpu_limit_seconds(c) as f64))
                            .flatten(),
                        memory_limit_bytes: (r.status == Status::MemoryLimit).then_some(spec.memory).flatten(),
                        slot: Some(cfg.name.clone()),
                        class: Some(cfg.class.clone()),
                        attempt,
                        seed: core.sched.job_seed(job).unwrap_or(0),
                        tags: spec.tags.clone(),
                        objects: r.objects,
                    };
                    core.sched.finished(slot, job, output, now);
                }
                AgentMsg::Revoked { job, ok } => {
                    tracing::trace!(%job, ok, slot = slot.0, "revoked");
                    core.sched.revoked(slot, job, ok, now);
                }
                AgentMsg::Heartbeat => {}
                AgentMsg::Bye { reason } => {
                    debug!(slot = %core.sched.slot_config(slot).name, reason, "agent leaving");
                }
                AgentMsg::Hello { .. } | AgentMsg::Resume { .. } => {
                    warn!(slot = %core.sched.slot_config(slot).name, "second hello on a connection; closing it");
                    conn.closed.cancel();
                }
            }
        }
        self.apply(&mut core);
    }

    /// A connection ended.
    fn on_closed(self: &Arc<Self>, conn: &Arc<Conn>, reason: &str) {
        conn.closed.cancel();
        let mut core = lock(&self.core);
        let slot = conn.slot;
        let rt = &mut core.slots[slot.0 as usize];
        if rt.conn.as_ref().is_none_or(|c| c.id != conn.id) {
            return;
        }
        // The handle stays until the slot launches again, so that `close`
        // can still terminate a process on its way out.
        rt.conn = None;
        if let Some(observer) = &self.config.observer {
            observer.disconnected(&conn.name);
        }
        // A worker that stopped answering may still be running its job (a
        // stopped or partitioned agent): make sure it is gone before the
        // job runs elsewhere. Terminating an exited worker is a no-op.
        if let Some(handle) = rt.handle.clone() {
            let class = rt.class.clone();
            tokio::spawn(async move {
                if let Err(e) = class.terminate(&[handle]).await {
                    warn!("terminating a lost worker failed: {e}");
                }
            });
        }
        let now = Instant::now();
        core.sched.lost(slot, reason, now);
        self.apply(&mut core);
        self.timer_wake.notify_one();
    }
}

/// Connections waiting for their hello, by default
/// ([`ControllerConfig::max_handshakes`]).
pub const MAX_HANDSHAKES: usize = 64;

/// The largest hello frame read: a hello is a few short fields, and
/// nothing bigger is read from a peer that has not authenticated.
pub const MAX_HELLO: usize = 64 * 1024;

/// How much of what a rejected peer sent a log line may carry.
const LOGGED_PREFIX: usize = 32;

/// Connections waiting for their hello: the oldest is closed to make
/// room past the cap, so that a flood of silent connections cannot keep
/// a real agent out.
#[derive(Default)]
struct Handshakes {
    next: u64,
    waiting: BTreeMap<u64, (SocketAddr, CancellationToken)>,
}

/// One connection's place in [`Handshakes`]; dropped once its hello was
/// read (or it failed), which frees the place.
struct Waiting {
    all: Arc<Mutex<Handshakes>>,
    id: u64,
    cancelled: CancellationToken,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.all).waiting.remove(&self.id);
    }
}

/// At most `max` characters of `text` (a reason that may quote what a
/// peer sent), marked when cut.
fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}… (cut)")
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let cap = shared.config.max_handshakes.max(1);
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let waiting = {
                    let mut h = lock(&handshakes);
                    while h.waiting.len() >= cap {
                        let Some((_, (oldest, token))) = h.waiting.pop_first() else { break };
                        token.cancel();
                        warn!(
                            peer = %oldest,
                            "closed a worker connection: {cap} connections were waiting for their hello \
                             (the oldest makes room)"
                        );
                    }
                    let id = h.next;
                    h.next += 1;
                    let cancelled = CancellationToken::new();
                    h.waiting.insert(id, (peer, cancelled.clone()));
                    Waiting { all: handshakes.clone(), id, cancelled }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let token = waiting.cancelled.clone();
                    let link = tokio::select! {
                        () = token.cancelled() => return,
                        link = open_link(&shared, stream, peer) => link,
                    };
                    if let Some(link) = link {
                        serve_connection(shared, link, peer, waiting).await;
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep going.
                warn!("accepting a worker connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The first byte of a TLS connection (a handshake record); a crew frame
/// starts with the high byte of its length, 0 below 16 MiB.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Sorts a new connection out: plaintext as it is where allowed, TLS
/// unwrapped into a socket pair; `None` when it was refused (logged).
async fn open_link(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) -> Option<Link> {
    let Some(tls) = &shared.tls else { return Some(Link::Tcp(stream)) };
    let mut first = [0u8; 1];
    let limit = shared.config.hello_timeout;
    // One budget for the first byte and the TLS handshake.
    let deadline = crew_core::clock::after_tokio(tokio::time::Instant::now(), limit);
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(Ok(_)) => return None,
        Ok(Err(e)) => {
            debug!(%peer, "connection failed before its first byte: {e}");
            return None;
        }
        Err(_) => {
            warn!(%peer, "rejected a worker connection: nothing sent within {limit:?}");
            return None;
        }
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if shared.loopback.is_some() && peer.ip().to_canonical().is_loopback() {
            return Some(Link::Tcp(stream));
        }
        let reason = "this controller takes TLS connections only from there; the agent needs the \
                      certificate fingerprint in CREW_TLS_SHA256 (set by the controller at launch)";
        warn!(%peer, "rejected a plaintext worker connection: {reason}");
        let mut out = BytesMut::new();
        if protocol::encode(&ControllerMsg::Reject { reason: reason.to_owned() }, &mut out).is_ok() {
            let _ = stream.try_write(&out);
        }
        return None;
    }
    let tls_stream = match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer, "rejected a worker connection: TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            warn!(%peer, "rejected a worker connection: no TLS handshake within {limit:?}");
            return None;
        }
    };
    let (ours, theirs) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            warn!(%peer, "could not serve a TLS connection: {e}");
            return None;
        }
    };
    tokio::spawn(relay(tls_stream, ours, shared.stop.clone()));
    Some(Link::Unix(theirs))
}

/// Moves bytes between a TLS connection and its plaintext socket. It ends
/// when the controller's side closes (the agent is then told, by a TLS
/// close, and dropped whatever it does), when the connection fails, or when
/// the controller stops; an agent that half-closes only ends the way in.
async fn relay(tls: tokio_rustls::server::TlsStream<TcpStream>, plain: UnixStream, stop: CancellationToken) {
    use tokio::io::AsyncWriteExt;
    let (mut tls_r, mut tls_w) = tokio::io::split(tls);
    let (mut plain_r, mut plain_w) = plain.into_split();
    let inbound = async {
        let r = tokio::io::copy(&mut tls_r, &mut plain_w).await;
        let _ = plain_w.shutdown().await;
        r
    };
    let outbound = async {
        let r = tokio::io::copy(&mut plain_r, &mut tls_w).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), tls_w.shutdown()).await;
        r
    };
    let stopped = {
        tokio::pin!(inbound, outbound);
        let mut inbound_done = false;
        loop {
            tokio::select! {
                r = &mut outbound => {
                    if let Err(e) = r {
                        debug!("TLS relay ended: {e}");
                    }
                    break false;
                }
                r = &mut inbound, if !inbound_done => {
                    inbound_done = true;
                    if let Err(e) = r {
                        debug!("TLS relay ended: {e}");
                        break false;
                    }
                }
                _ = stop.cancelled() => break true,
            }
        }
    };
    if stopped {
        // The controller is gone: a TLS close, so that the agent reads an
        // end and not a broken connection.
        let _ = tokio::time::timeout(Duration::from_millis(200), tls_w.shutdown()).await;
    }
}

/// An agent connection as the controller reads and writes it: the TCP
/// socket itself, or the plaintext end of a TLS relay.
enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Link {
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.readable().await,
            Link::Unix(s) => s.readable().await,
        }
    }

    async fn writable(&self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.writable().await,
            Link::Unix(s) => s.writable().await,
        }
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.try_read_buf(buf),
            Link::Unix(s) => s.try_read_buf(buf),
        }
    }

    fn try_write(&self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.try_write(data),
            Link::Unix(s) => s.try_write(data),
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: Link, peer: SocketAddr, waiting: Waiting) {
    let stream = Arc::new(stream);
    let mut buf = BytesMut::with_capacity(4 * 1024);
    // The handshake: one hello within the timeout, of at most MAX_HELLO
    // bytes (checked on its length, before its bytes are read); closed
    // at once when too many others wait.
    let token = waiting.cancelled.clone();
    let hello = tokio::time::timeout(shared.config.hello_timeout, async {
        loop {
            if buf.len() >= 4 {
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if len > MAX_HELLO {
                    let prefix = &buf[..buf.len().min(LOGGED_PREFIX)];
                    return Err(format!(
                        "a hello of {len} bytes is larger than the limit of {MAX_HELLO} (it began {:?})",
                        String::from_utf8_lossy(prefix)
                    ));
                }
            }
            if token.is_cancelled() {
                return Err("too many connections were waiting for their hello".to_owned());
            }
            match protocol::decode::<AgentMsg>(&mut buf) {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            tokio::select! {
                r = stream.readable() => r.map_err(|e| e.to_string())?,
                () = token.cancelled() => {}
            }
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return Err("connection closed before the hello".to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    drop(waiting);
    let hello = match hello {
        Ok(Ok(m)) => m,
        Ok(Err(reason)) => {
            // The reason may quote what the peer sent: a short prefix only.
            warn!(%peer, "rejected a worker connection: {}", short(&reason, 200));
            return;
        }
        Err(_) => {
            warn!(%peer, "rejected a worker connection: no hello within {:?}", shared.config.hello_timeout);
            return;
        }
    };
    let (pid, host, resuming) = match &hello {
        AgentMsg::Hello { pid, host, .. } => (*pid, host.clone(), false),
        AgentMsg::Resume { pid, host, .. } => (*pid, host.clone(), true),
        _ => {
            warn!(%peer, "rejected a worker connection: the first frame was not a hello");
            return;
        }
    };
    let conn;
    {
        let mut core = lock(&shared.core);
        let (launch, index) = match &hello {
            AgentMsg::Hello { launch, index, .. } => (launch.clone(), *index),
            AgentMsg::Resume { slot, .. } => (format!("resume of {slot}"), 0),
            _ => return,
        };
        let admitted = if core.closing {
            Err("the controller is closing".to_owned())
        } else {
            match &hello {
                AgentMsg::Hello { version, launch, index, token, .. } => {
                    shared.admit(&mut core, launch, *index, token, *version)
                }
                AgentMsg::Resume { version, slot, token, jobs, .. } => {
                    shared.admit_resume(&mut core, slot, token, *version, jobs)
                }
                _ => return,
            }
        };
        let (slot, welcome) = match admitted {
            Ok(x) => x,
            Err(reason) => {
                drop(core);
                warn!(%peer, launch = %short(&launch, LOGGED_PREFIX), index, "rejected a worker connection: {reason}");
                let mut out = BytesMut::new();
                if protocol::encode(&ControllerMsg::Reject { reason }, &mut out).is_ok() {
                    let _ = stream.try_write(&out);
                }
                return;
            }
        };
        let id = core.next_conn;
        core.next_conn += 1;
        let now_ms = shared.now_ms();
        conn = Arc::new(Conn {
            id,
            slot,
            name: core.sched.slot_config(slot).name.clone(),
            stream: stream.clone(),
            out: Mutex::new(BytesMut::with_capacity(16 * 1024)),
            writer_wake: Notify::new(),
            closed: CancellationToken::new(),
            last_recv_ms: AtomicU64::new(now_ms),
            last_sent_ms: AtomicU64::new(now_ms),
            broken: AtomicBool::new(false),
            pending_write: AtomicBool::new(false),
            objects: Mutex::new(HashMap::new()),
        });
        let now = Instant::now();
        if !resuming && !core.sched.connected(slot, now) {
            drop(core);
            warn!(%peer, "rejected a worker connection: its slot is not waiting for a worker");
            return;
        }
        if let Some(observer) = &shared.config.observer {
            observer.connected(&core.sched.slot_config(slot).name);
        }
        if resuming {
            info!(slot = %core.sched.slot_config(slot).name, pid, host, "worker came back after a controller restart");
        } else {
            info!(slot = %core.sched.slot_config(slot).name, pid, host, "worker connected");
        }
        let rt = &mut core.slots[slot.0 as usize];
        // `launch` stays set: the launch call may not have returned its
        // handles yet, and must still recognise this slot as its own.
        rt.conn = Some(conn.clone());
        // Welcome first, then whatever the scheduler assigned on connect.
        conn.send(&welcome, now_ms);
        shared.apply(&mut core);
    }
    tokio::spawn(writer_loop(conn.clone()));
    // Frames that came with the hello.
    let reason = read_loop(&shared, &conn, buf).await;
    if !shared.stop.is_cancelled() {
        debug!(slot = %conn.name, "connection closed: {reason}");
    }
    shared.on_closed(&conn, &reason);
}

async fn read_loop(shared: &Arc<Shared>, conn: &Arc<Conn>, mut buf: BytesMut) -> String {
    loop {
        let mut msgs = Vec::new();
        loop {
            match protocol::decode::<AgentMsg>(&mut buf) {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => {
                    warn!(slot = %conn.name, "closing a worker connection: {e}");
                    return format!("protocol error: {e}");
                }
            }
        }
        if !msgs.is_empty() {
            shared.on_messages(conn, msgs);
        }
        tokio::select! {
            r = conn.stream.readable() => {
                if let Err(e) = r {
                    return format!("connection error: {e}");
                }
            }
            _ = conn.closed.cancelled() => {
                return if conn.broken.load(Ordering::Relaxed) { "connection broken".into() } else { "connection closed".into() };
            }
        }
        match conn.stream.try_read_buf(&mut buf) {
            Ok(0) => return "the worker closed the connection".into(),
            Ok(_) => conn.last_recv_ms.store(shared.now_ms(), Ordering::Relaxed),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return format!("connection error: {e}"),
        }
    }
}

async fn writer_loop(conn: Arc<Conn>) {
    loop {
        tokio::select! {
            _ = conn.writer_wake.notified() => {}
            _ = conn.closed.cancelled() => return,
        }
        loop {
            {
                let mut out = lock(&conn.out);
                if !out.is_empty() {
                    match conn.stream.try_write(&out) {
                        Ok(n) => out.advance(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            conn.broken.store(true, Ordering::Relaxed);
                            conn.closed.cancel();
                            return;
                        }
                    }
                }
                if out.is_empty() {
                    conn.pending_write.store(false, Ordering::Relaxed);
                    break;
                }
            }
            tokio::select! {
                r = conn.stream.writable() => if r.is_err() { conn.closed.cancel(); return; },
                _ = conn.closed.cancelled() => return,
            }
        }
    }
}

/// Scheduler deadlines, heartbeats and silent workers.
async fn timer_loop(shared: Arc<Shared>) {
    let hb = shared.config.heartbeat;
    let hb_ms = hb.as_millis() as u64;
    let lost_ms = hb_ms.saturating_mul(u64::from(shared.config.heartbeat_misses.max(1)));
    loop {
        let deadline = {
            let core = lock(&shared.core);
            core.sched.next_deadline()
        };
        let now = Instant::now();
        let mut wait = hb / 2;
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = shared.timer_wake.notified() => {}
        }
        let mut silent = Vec::new();
        {
            let mut core = lock(&shared.core);
            let now_ms = shared.now_ms();
            for rt in &core.slots {
                if let Some(conn) = &rt.conn {
                    if now_ms.saturating_sub(conn.last_recv_ms.load(Ordering::Relaxed)) > lost_ms {
                        silent.push(conn.clone());
                    } else if now_ms.saturating_sub(conn.last_sent_ms.load(Ordering::Relaxed)) >= hb_ms {
                        conn.send(&ControllerMsg::Heartbeat, now_ms);
                    }
                }
            }
            core.sched.tick(Instant::now());
            shared.apply(&mut core);
        }
        for conn in silent {
            warn!(slot = %conn.name, "worker stopped answering; treating it as lost");
            shared.on_closed(
                &conn,
                &format!("no heartbeat for {}", humantime::format_duration(Duration::from_millis(lost_ms))),
            );
        }
    }
}

/// Asks each class about its launched agents.
async fn probe_loop(shared: Arc<Shared>) {
    let mut last: HashMap<usize, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // Handles per class, for slots that are launching, up or stopping.
        let mut work: HashMap<usize, ProbeBatch> = HashMap::new();
        {
            let core = lock(&shared.core);
            for (i, rt) in core.slots.iter().enumerate() {
                let slot = SlotId(i as u32);
                let Some(h) = &rt.handle else { continue };
                if !matches!(core.sched.slot_state(slot), SlotState::Launching | SlotState::Up | SlotState::Stopping) {
                    continue;
                }
                let key = instance(&rt.class);
                let due = last.get(&key).is_none_or(|t| t.elapsed() >= rt.class.capabilities().probe_interval);
                if due {
                    work.entry(key).or_insert_with(|| (rt.class.clone(), Vec::new())).1.push((slot, h.clone()));
                }
            }
        }
        for (key, (class, items)) in work {
            last.insert(key, Instant::now());
            let max = class.capabilities().probe_batch_max.max(1);
            for chunk in items.chunks(max) {
                let handles: Vec<Handle> = chunk.iter().map(|(_, h)| h.clone()).collect();
                match class.probe(&handles).await {
                    Ok(lives) => shared.probed(chunk, lives),
                    Err(e) => warn!(class = %class.class(), "probing workers failed: {e}"),
                }
            }
        }
    }
}

impl Shared {
    fn probed(self: &Arc<Self>, items: &[(SlotId, Handle)], lives: Vec<Liveness>) {
        let mut closing = Vec::new();
        {
            let mut core = lock(&self.core);
            let now = Instant::now();
            for ((slot, handle), life) in items.iter().zip(lives) {
                let reason = match life {
                    Liveness::Exited { reason } => reason,
                    // A live connection is better evidence than a platform
                    // that lost track (eventual consistency, a class
                    // instance that did not start this agent): the
                    // heartbeat decides then.
                    Liveness::Unknown if core.slots[slot.0 as usize].conn.is_some() => continue,
                    Liveness::Unknown => "the platform no longer knows this worker".to_owned(),
                    Liveness::Starting | Liveness::Running => continue,
                };
                let rt = &mut core.slots[slot.0 as usize];
                if rt.handle.as_ref() != Some(handle) {
                    continue;
                }
                match &rt.conn {
                    // The process reason is better than the connection's.
                    Some(conn) => closing.push((conn.clone(), reason)),
                    None => {
                        rt.launch = None;
                        core.sched.lost(*slot, &reason, now);
                    }
                }
            }
            self.apply(&mut core);
        }
        for (conn, reason) in closing {
            self.on_closed(&conn, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{dials_loopback, has_port};

    #[test]
    fn agents_elsewhere_run_the_program_by_its_portable_name() {
        use super::AgentCommand;
        assert_eq!(AgentCommand::crew("/home/me/dl/crew-x86_64-linux").portable_name(), "crew");
        let own = AgentCommand { program: "/opt/app/bin/pipeline".into(), args: Vec::new(), name: None };
        assert_eq!(own.portable_name(), "pipeline");
    }

    #[test]
    fn advertise_settings_are_completed_and_checked() {
        use super::advertised_address as a;
        assert_eq!(a("h", 7000).as_deref(), Ok("h:7000"));
        assert_eq!(a("h:80", 7000).as_deref(), Ok("h:80"));
        assert_eq!(a("10.0.0.5", 7000).as_deref(), Ok("10.0.0.5:7000"));
        assert_eq!(a("2001:db8::1", 7000).as_deref(), Ok("[2001:db8::1]:7000"));
        assert_eq!(a("[::1]", 7000).as_deref(), Ok("[::1]:7000"));
        assert_eq!(a("[::1]:80", 7000).as_deref(), Ok("[::1]:80"));
        for bad in ["", "h:", "h:0", "h:70000", "h:port", "bad host", "h/x"] {
            assert!(a(bad, 7000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn advertised_addresses_with_and_without_a_port() {
        for addr in ["h:7000", "10.0.0.5:1", "[::1]:7000", "[2001:db8::1]:80"] {
            assert!(has_port(addr), "{addr}");
        }
        for addr in ["h", "10.0.0.5", "::1", "2001:db8::1", "[::1]", "h:port", "h:70000"] {
            assert!(!has_port(addr), "{addr}");
        }
    }

    #[test]
    fn loopback_addresses_are_recognised() {
        for addr in ["127.0.0.1:7000", "127.8.9.1:1", "[::1]:7000", "localhost:80"] {
            assert!(dials_loopback(addr), "{addr}");
        }
        for addr in ["10.0.0.5:7000", "[2001:db8::1]:7000", "crew.example.com:7000", "0.0.0.0:7000"] {
            assert!(!dials_loopback(addr), "{addr}");
        }
    }
}
