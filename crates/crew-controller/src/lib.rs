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

mod config;
mod dispatch;
pub mod journal;
mod sessions;
mod timers;

pub use config::{AgentCommand, ControllerConfig, ResumeConfig, TlsMode, advertised_address};
use config::{dials_loopback, host_of};
use dispatch::{all_gone, instance, terminate_all};
use sessions::{Conn, accept_loop};
pub use sessions::{MAX_HANDSHAKES, MAX_HELLO, MAX_RESULT_OBJECTS};
use timers::{probe_loop, timer_loop};

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
use crew_core::output::{Output, Status};
use crew_core::protocol::{self, AgentMsg, ControllerMsg, PROTOCOL_VERSION, RunJob};
use crew_core::seed::job_seed_of;
use crew_core::store::Store;
use crew_core::tags::Tags;
use crew_core::worker::{
    ENV_CONNECT, ENV_LAUNCH, ENV_RESUME_FILE, ENV_TLS_SHA256, ENV_TOKEN, Handle, LaunchMember, LaunchSpec, Liveness,
    Secret, Worker,
};
use crew_scheduler::{Action, Counts, Scheduler, SlotConfig, SlotFilter, SlotId, SlotLimits, SlotState, SubmitError};
use crew_tls::ControllerTls;

/// What [`Observer::connected_durably`] returns: a wait that ends once the
/// observer has the connection on record.
pub type Durable = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// Hooks for a program that keeps its own record of the controller's work
/// (the daemon's journal).
pub trait Observer: Send + Sync + fmt::Debug {
    /// The job was sent to the worker of slot `slot` for its attempt
    /// `attempt`.
    fn assigned(&self, job: JobId, attempt: u32, slot: &str);
    /// Several jobs were sent to the worker of slot `slot` at once, each
    /// for its attempt: one call where a busy worker takes a batch
    /// (by default, [`Observer::assigned`] for each).
    fn assigned_many(&self, slot: &str, jobs: &[(JobId, u32)]) {
        for &(job, attempt) in jobs {
            self.assigned(job, attempt, slot);
        }
    }
    /// A worker connected (or came back) for the slot `slot`: a restarted
    /// controller expects it back ([`Controller::await_workers`]).
    fn connected(&self, _slot: &str) {}
    /// [`Observer::connected`], for an observer that must have the
    /// connection on record before the worker gets anything: the future it
    /// returns ends once it is, and the controller holds every frame to the
    /// worker (its welcome first) until then, without holding anything
    /// else up meanwhile. By default, `connected` and no wait.
    fn connected_durably(&self, slot: &str) -> Option<Durable> {
        self.connected(slot);
        None
    }
    /// The slot's worker went away.
    fn disconnected(&self, _slot: &str) {}
    /// The worker of slot `slot` (class `class`) was lost while up and not
    /// told to stop: it crashed (exited, was killed, or stopped answering),
    /// and the job it ran, if any, counts a crash.
    fn crashed(&self, _slot: &str, _class: &str, _reason: &str) {}
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

/// What a slot is doing, as a status report shows it: the scheduler's
/// [`SlotState`] with `up` told apart by whether the worker has a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SlotCondition {
    /// Not running; launched when a job needs it.
    Down,
    /// Launched, waiting for its agent to connect.
    Launching,
    /// Connected, without a job.
    Idle,
    /// Connected, running a job.
    Busy,
    /// Asked to stop; waiting for it to go.
    Stopping,
    /// Its launch budget is spent (`restart` makes it usable again).
    Broken,
    /// After a controller restart: its worker is expected back.
    Resuming,
}

impl SlotCondition {
    /// The word for it (as in JSON).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Launching => "launching",
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Stopping => "stopping",
            Self::Broken => "broken",
            Self::Resuming => "resuming",
        }
    }
}

impl fmt::Display for SlotCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slot in a status report.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct SlotStatus {
    /// Name.
    pub name: String,
    /// Class.
    pub class: String,
    /// Tags.
    pub tags: Tags,
    /// What it is doing.
    pub state: SlotCondition,
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

/// Where a job the controller holds is ([`Controller::job`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobPhase {
    /// Waiting for a worker.
    Queued,
    /// Sent to a worker, behind the job it runs (prefetched).
    Assigned,
    /// Running on a worker (or about to start there).
    Running,
}

/// A job the controller holds: not yet delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobInfo {
    /// Where it is.
    pub phase: JobPhase,
    /// The slot holding it, unless queued.
    pub slot: Option<String>,
    /// Attempts started so far (the current one when it runs).
    pub attempt: u32,
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
            let seed = job_seed_of(shared.config.seed, spec.name.as_deref(), id.0);
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
            let seed = job_seed_of(shared.config.seed, job.spec.name.as_deref(), job.id.0);
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
                    SlotState::Down => SlotCondition::Down,
                    SlotState::Launching => SlotCondition::Launching,
                    SlotState::Up if v.assigned == 0 => SlotCondition::Idle,
                    SlotState::Up => SlotCondition::Busy,
                    SlotState::Stopping => SlotCondition::Stopping,
                    SlotState::Broken => SlotCondition::Broken,
                    // Resuming, and whatever the scheduler grows next.
                    _ => SlotCondition::Resuming,
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

    /// Where job `id` is, while the controller holds it (until its output
    /// is delivered); `None` for a job it does not know or delivered.
    pub fn job(&self, id: JobId) -> Option<JobInfo> {
        let core = lock(&self.shared.core);
        let view = core.sched.job_view(id)?;
        let (phase, slot) = match view.place {
            crew_scheduler::JobPlace::Queued => (JobPhase::Queued, None),
            crew_scheduler::JobPlace::Waiting(s) => (JobPhase::Assigned, Some(s)),
            crew_scheduler::JobPlace::Running(s) => (JobPhase::Running, Some(s)),
            // A place a newer scheduler knows: as queued until mapped.
            _ => (JobPhase::Queued, None),
        };
        Some(JobInfo { phase, slot: slot.map(|s| core.sched.slot_config(s).name.clone()), attempt: view.attempt })
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
            // Bounded even when a class's probe is slow (a platform that
            // does not answer).
            if tokio::time::timeout_at(deadline, all_gone(&handles)).await.unwrap_or(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for c in &conns {
            c.closed.cancel();
        }
    }
}
