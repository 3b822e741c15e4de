//! The agent: the worker-side loop (`crew worker`).
//!
//! It connects to the controller, authenticates with its launch id, index
//! and one-time secret, then runs the jobs it is sent one at a time, in
//! order, reporting each result. It exits when told to stop, when its idle
//! timeout or task limit is reached, on SIGTERM/SIGINT, or when the
//! controller goes away (the connection drops or falls silent) — killing
//! whatever job it runs first, so that no worker or job outlives its
//! controller.
//!
//! The loop runs jobs inline (no task per job): a builtin such as `noop`
//! completes on its first poll, and results are written in batches, one
//! write for every result ready at that moment.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crew_core::job::{Command, JobId};
use crew_core::output::{Status, Timestamp};
use crew_core::protocol::{self, AgentMsg, ControllerMsg, PROTOCOL_VERSION, RunJob};
use crew_core::worker::{
    ENV_CONNECT, ENV_INDEX, ENV_INDEX_BASE, ENV_LAUNCH, ENV_PARENT_PID, ENV_RESUME_FILE, ENV_TLS_SHA256, ENV_TOKEN,
    ENV_TOKEN_REF, ENV_TOKEN_STDIN, Secret, TOKEN_REF_FILE,
};
use crew_exec::builtins::Builtins;
use crew_exec::{ExecContext, JobResult};

/// Exit code of an agent that stopped normally.
pub const EXIT_OK: i32 = 0;
/// Exit code of an agent whose controller went away.
pub const EXIT_CONTROLLER_LOST: i32 = 3;
/// Exit code of an agent that could not start (bad configuration,
/// connection refused, rejected).
pub const EXIT_START_FAILED: i32 = 2;

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The controller's address (`host:port`).
    pub connect: String,
    /// The launch id.
    pub launch: String,
    /// The member index within the launch.
    pub index: u32,
    /// The launch secret.
    pub token: Secret,
    /// The SHA-256 of the controller's TLS certificate: when set, the
    /// connection uses TLS and accepts that certificate only.
    pub tls_sha256: Option<[u8; 32]>,
    /// Builtin functions this agent offers.
    pub builtins: Builtins,
}

/// Why an agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A required setting is missing or malformed.
    #[error("{0}")]
    Config(String),
    /// The controller could not be reached.
    #[error("could not connect to the controller at {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The controller refused this agent.
    #[error("the controller rejected this worker: {0}")]
    Rejected(String),
    /// The connection failed during the handshake.
    #[error("handshake failed: {0}")]
    Handshake(String),
}

/// How an agent ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// The controller said stop, or a signal asked us to.
    Stopped,
    /// Idle timeout reached.
    Idle,
    /// Task limit reached.
    TasksDone,
    /// The controller went away.
    ControllerLost(String),
}

impl AgentExit {
    /// The process exit code for this ending.
    pub fn code(&self) -> i32 {
        match self {
            AgentExit::ControllerLost(_) => EXIT_CONTROLLER_LOST,
            _ => EXIT_OK,
        }
    }
}

impl AgentConfig {
    /// Reads the connection settings from the environment:
    /// `CREW_CONNECT`, `CREW_LAUNCH`, `CREW_TOKEN`, `CREW_TLS_SHA256` (TLS
    /// with that certificate when set), and the index from
    /// `CREW_INDEX`, else `CREW_INDEX_BASE` + `AWS_BATCH_JOB_ARRAY_INDEX`
    /// (each 0 when unset).
    /// `connect` and `token`, when given, take precedence (command-line
    /// flag, stdin).
    pub fn from_env(connect: Option<String>, token: Option<Secret>, builtins: Builtins) -> Result<Self, AgentError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let connect = connect.or_else(|| var(ENV_CONNECT)).ok_or_else(|| {
            AgentError::Config(format!("no controller address: pass --connect ADDR or set {ENV_CONNECT}"))
        })?;
        let launch = var(ENV_LAUNCH).ok_or_else(|| {
            AgentError::Config(format!("no launch id: {ENV_LAUNCH} is not set (agents are started by a controller)"))
        })?;
        let index = index_from_env()?;
        let file_ref = var(ENV_TOKEN_REF).filter(|r| r.starts_with(TOKEN_REF_FILE));
        let token = match token.or_else(|| var(ENV_TOKEN).map(Secret::new)) {
            Some(t) => t,
            None if var(ENV_TOKEN_STDIN).as_deref() == Some("1") => token_from_stdin()?,
            None if file_ref.is_some() => take_file_secret(file_ref.as_deref().unwrap_or_default(), index)?,
            None => {
                return Err(AgentError::Config(format!(
                    "no token: set {ENV_TOKEN}, or {ENV_TOKEN_STDIN}=1 (or pass --token-stdin) and write it to stdin, \
                     or {ENV_TOKEN_REF}={TOKEN_REF_FILE}PREFIX"
                )));
            }
        };
        let tls_sha256 = match var(ENV_TLS_SHA256) {
            Some(pin) => Some(
                crew_tls::parse_fingerprint(&pin).map_err(|e| AgentError::Config(format!("{ENV_TLS_SHA256}: {e}")))?,
            ),
            None => None,
        };
        Ok(Self { connect, launch, index, token, tls_sha256, builtins })
    }
}

/// The launch secret, from the first line of stdin ([`ENV_TOKEN_STDIN`]).
fn token_from_stdin() -> Result<Secret, AgentError> {
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line)
        .map_err(|e| AgentError::Config(format!("could not read the token from stdin: {e}")))?;
    match line.trim() {
        "" => Err(AgentError::Config(format!("{ENV_TOKEN_STDIN}=1 but stdin held no token"))),
        t => Ok(Secret::new(t)),
    }
}

/// Takes this member's launch secret from a one-time file
/// (`CREW_TOKEN_REF=file:PREFIX`, [`TOKEN_REF_FILE`]): `PREFIX<index>` is
/// claimed by a rename (of two readers only one wins), checked (a regular
/// file of this user that nobody else may read or write), read and
/// deleted, so that a second use of the reference fails.
pub fn take_file_secret(reference: &str, index: u32) -> Result<Secret, AgentError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let prefix = reference
        .strip_prefix(TOKEN_REF_FILE)
        .filter(|p| p.starts_with('/') && !p.ends_with('/'))
        .ok_or_else(|| {
            AgentError::Config(format!(
                "{ENV_TOKEN_REF} {reference:?} is not a file reference ({TOKEN_REF_FILE}/PATH/PREFIX)"
            ))
        })?;
    let path = PathBuf::from(format!("{prefix}{index}"));
    let claimed = PathBuf::from(format!("{prefix}{index}.taken-{}", std::process::id()));
    std::fs::rename(&path, &claimed).map_err(|e| match path.parent() {
        Some(dir) if !dir.is_dir() => AgentError::Config(format!(
            "the folder of the launch secret, {}, is not here ({e}): the controller wrote it on its machine, so \
             the class's state folder must be one this machine shares (Slurm: the state_dir option)",
            dir.display()
        )),
        _ => AgentError::Config(format!(
            "the launch secret {} is gone ({e}): each is read once, by its own member, and removed when its \
             worker ends; start the worker again from the controller (crew recruit)",
            path.display()
        )),
    })?;
    let read = (|| -> Result<Secret, String> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&claimed)
            .map_err(|e| e.to_string())?;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "refused: it must be a regular file of uid {uid} with mode 0600 (it is uid {}, mode {:o})",
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        let mut text = String::new();
        file.by_ref().take(1024).read_to_string(&mut text).map_err(|e| e.to_string())?;
        match text.trim() {
            "" => Err("it is empty".to_owned()),
            t => Ok(Secret::new(t)),
        }
    })();
    let _ = std::fs::remove_file(&claimed);
    read.map_err(|e| AgentError::Config(format!("the launch secret {}: {e}", path.display())))
}

/// The agent's index within its launch, from the environment: `CREW_INDEX`,
/// else `CREW_INDEX_BASE` + `AWS_BATCH_JOB_ARRAY_INDEX` (each 0 when unset).
/// For agent binaries that resolve [`crew_core::worker::ENV_TOKEN_REF`].
pub fn index_from_env() -> Result<u32, AgentError> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let number = |k: &str| -> Result<u32, AgentError> {
        var(k).map_or(Ok(0), |v| v.parse().map_err(|_| AgentError::Config(format!("{k} is not a number: {v:?}"))))
    };
    match var(ENV_INDEX) {
        Some(_) => number(ENV_INDEX),
        None => Ok(number(ENV_INDEX_BASE)?.saturating_add(number("AWS_BATCH_JOB_ARRAY_INDEX")?)),
    }
}

/// For programs that embed crew and use themselves as the agent
/// ([`crew_controller::AgentCommand::current_exe`]): call this first thing
/// in `main`. When the process was started as an agent (`CREW_CONNECT` and
/// `CREW_LAUNCH` are set), it runs the agent with `builtins` and exits the
/// process; otherwise it returns at once.
pub fn run_if_agent(builtins: Builtins) {
    if std::env::var_os(ENV_CONNECT).is_none() || std::env::var_os(ENV_LAUNCH).is_none() {
        return;
    }
    let code = match AgentConfig::from_env(None, None, builtins) {
        Ok(cfg) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => match rt.block_on(run(cfg)) {
                Ok(exit) => exit.code(),
                Err(e) => {
                    eprintln!("crew agent: {e}");
                    EXIT_START_FAILED
                }
            },
            Err(e) => {
                eprintln!("crew agent: could not start a runtime: {e}");
                EXIT_START_FAILED
            }
        },
        Err(e) => {
            eprintln!("crew agent: {e}");
            EXIT_START_FAILED
        }
    };
    std::process::exit(code);
}

type JobFuture<'a> = Pin<Box<dyn Future<Output = JobResult> + Send + 'a>>;

struct Running {
    job: JobId,
    attempt: u32,
    cancel: CancellationToken,
}

/// What outlives one connection: the job in hand and the results the
/// controller may not have recorded yet.
struct Session {
    running: Option<Running>,
    fut: Option<JobFuture<'static>>,
    tasks_done: u32,
    /// Results sent (or to send) lately, as encoded frames: re-sent after
    /// coming back to a restarted controller, which may have lost them
    /// (it ignores those it has).
    recent: VecDeque<Recent>,
    /// This agent may come back to a restarted controller.
    resumable: bool,
}

struct Recent {
    job: JobId,
    attempt: u32,
    /// When it was last written (None: not written yet).
    written: Option<Instant>,
    frames: BytesMut,
}

/// How long a written result is kept for a restarted controller: far
/// longer than the daemon takes to make a result durable (one group
/// commit).
const RECENT_KEEP: Duration = Duration::from_secs(2);
/// At most this many results, and this many bytes, are kept.
const RECENT_MAX: usize = 256;
const RECENT_MAX_BYTES: usize = 32 << 20;

/// How a connection ended.
enum Outcome {
    Exit(AgentExit),
    /// The controller went away; the job in hand still runs.
    Lost(String),
}

fn lost_reason(leaving: &Option<AgentExit>, resumable: bool, signalled: bool) -> Option<String> {
    match leaving {
        Some(AgentExit::ControllerLost(r)) if resumable && !signalled => Some(r.clone()),
        _ => None,
    }
}

/// Encodes a result into `out`, keeping a copy for a restarted controller.
fn done(
    out: &mut BytesMut,
    recent: &mut VecDeque<Recent>,
    resumable: bool,
    job: JobId,
    attempt: u32,
    result: JobResult,
) {
    if !resumable {
        push_done(out, job, attempt, result);
        return;
    }
    let mut frames = BytesMut::new();
    push_done(&mut frames, job, attempt, result);
    out.extend_from_slice(&frames);
    recent.push_back(Recent { job, attempt, written: None, frames });
}

/// Marks kept results written at `now` and forgets those written long ago.
fn prune_recent(recent: &mut VecDeque<Recent>, now: Instant) {
    for r in recent.iter_mut() {
        r.written.get_or_insert(now);
    }
    let mut bytes: usize = recent.iter().map(|r| r.frames.len()).sum();
    while let Some(r) = recent.front() {
        let old = r.written.is_some_and(|t| now.saturating_duration_since(t) > RECENT_KEEP);
        if !(old || recent.len() > RECENT_MAX || bytes > RECENT_MAX_BYTES) || r.written.is_none() {
            break;
        }
        bytes -= r.frames.len();
        recent.pop_front();
    }
}

/// A private scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        let tag: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("crew-agent-{}-{tag}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn connect(addr: &str) -> Result<TcpStream, AgentError> {
    // The controller is up before it launches us, but a busy machine may
    // delay the accept queue; retry briefly on refusal.
    let mut delay = Duration::from_millis(20);
    let started = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                debug!("connect to {addr} failed ({e}); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(source) => {
                return Err(AgentError::Connect { addr: addr.to_owned(), source });
            }
        }
    }
}

fn cancelled_result(why: &str) -> JobResult {
    let now = Timestamp::now();
    let mut r = JobResult::new(Status::Cancelled, now, now);
    r.error = Some(why.to_owned());
    r
}

/// Runs the agent until it is told to stop, runs out of work limits, or
/// loses its controller.
pub async fn run(cfg: AgentConfig) -> Result<AgentExit, AgentError> {
    // An agent that may come back to a restarted controller must outlive
    // it: no parent-death signal (it stops by itself when no controller
    // comes back within its window).
    if !crew_exec::warden::outlives_starter() || cfg.tls_sha256.is_some() {
        die_with_parent()?;
    }
    let mut stream = connect(&cfg.connect).await?;
    let _ = stream.set_nodelay(true);
    match cfg.tls_sha256 {
        None => {
            let (rd, wr) = stream.split();
            run_on(&cfg, rd, wr).await
        }
        Some(pin) => {
            let connector = crew_tls::connector(pin).map_err(|e| AgentError::Handshake(e.to_string()))?;
            let tls = tokio::time::timeout(HANDSHAKE_LIMIT, connector.connect(crew_tls::server_name(), stream))
                .await
                .map_err(|_| AgentError::Handshake(format!("no TLS handshake within {HANDSHAKE_LIMIT:?}")))?
                .map_err(|e| {
                    AgentError::Handshake(format!(
                        "TLS with the controller at {} failed: {e} (a certificate error means that what \
                         answers there is not the controller whose fingerprint is in {ENV_TLS_SHA256})",
                        cfg.connect
                    ))
                })?;
            let (rd, wr) = tokio::io::split(tls);
            run_on(&cfg, rd, wr).await
        }
    }
}

/// How long the controller has to answer the handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

/// The agent over an established connection (plain TCP or TLS).
async fn run_on<R, W>(cfg: &AgentConfig, mut rd: R, mut wr: W) -> Result<AgentExit, AgentError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        launch: cfg.launch.clone(),
        index: cfg.index,
        token: cfg.token.clone(),
        pid: std::process::id(),
        host: hostname(),
    };
    let (welcome, inbuf) = handshake(&mut rd, &mut wr, &hello).await?;
    let (slot, idle_timeout, tasks_max, heartbeat, store_url, grant) = welcome;
    info!(%slot, "agent connected");
    let scratch =
        Scratch::create().map_err(|e| AgentError::Config(format!("could not create a scratch folder: {e}")))?;
    let mut ctx = ExecContext::new(slot.clone(), scratch.0.clone()).with_builtins(cfg.builtins.clone());
    if let Some(url) = store_url {
        match crew_core::store::open_store(&url) {
            Ok(store) => ctx.store = Some(store),
            Err(e) => {
                warn!("cannot open the store {url}: {e}; large outputs will be truncated");
                ctx.store_problem = Some(format!("this worker could not open the store {url}: {e}"));
            }
        }
    }
    let ctx = Arc::new(ctx);
    let mut grant = grant.filter(|_| cfg.tls_sha256.is_none() && resume_file().is_some());
    let mut session =
        Session { running: None, fut: None, tasks_done: 0, recent: VecDeque::new(), resumable: grant.is_some() };
    let mut outcome =
        serve(&mut rd, &mut wr, inbuf, BytesMut::new(), &mut session, &ctx, idle_timeout, tasks_max, heartbeat).await;
    drop((rd, wr));
    let exit = loop {
        let lost = match outcome {
            Outcome::Exit(exit) => break exit,
            Outcome::Lost(lost) => lost,
        };
        let Some(g) = grant.clone() else { break AgentExit::ControllerLost(lost) };
        warn!(%slot, "lost the controller ({lost}); keeping the job in hand and trying to come back for {:?}", g.window);
        match reconnect(cfg, &slot, &g, &mut session, &lost).await {
            Ok((stream, welcome, inbuf)) => {
                let (_, idle_timeout, tasks_max, heartbeat, _, new_grant) = welcome;
                info!(%slot, "came back to a restarted controller");
                if new_grant.is_some() {
                    grant = new_grant;
                }
                let out: BytesMut = session.recent.iter().flat_map(|r| r.frames.iter().copied()).collect();
                let (mut rd, mut wr) = stream.into_split();
                outcome =
                    serve(&mut rd, &mut wr, inbuf, out, &mut session, &ctx, idle_timeout, tasks_max, heartbeat).await;
            }
            Err(exit) => break exit,
        }
    };
    info!(%slot, ?exit, "agent exiting");
    drop(scratch);
    Ok(exit)
}

/// The settings of a welcome: slot, idle timeout, task limit, heartbeat,
/// store, resume grant.
type Welcome = (String, Option<Duration>, Option<u32>, Duration, Option<String>, Option<protocol::ResumeGrant>);

/// Sends the first message and reads the controller's answer.
async fn handshake<R, W>(rd: &mut R, wr: &mut W, hello: &AgentMsg) -> Result<(Welcome, BytesMut), AgentError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(16 * 1024);
    protocol::encode(hello, &mut out).map_err(|e| AgentError::Handshake(e.to_string()))?;
    write_out(wr, &out).await.map_err(|e| AgentError::Handshake(e.to_string()))?;
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let welcome = tokio::time::timeout(HANDSHAKE_LIMIT, async {
        loop {
            if let Some(m) =
                protocol::decode::<ControllerMsg>(&mut inbuf).map_err(|e| AgentError::Handshake(e.to_string()))?
            {
                return Ok::<_, AgentError>(m);
            }
            let n = rd.read_buf(&mut inbuf).await.map_err(|e| AgentError::Handshake(e.to_string()))?;
            if n == 0 {
                return Err(AgentError::Handshake("the controller closed the connection".into()));
            }
        }
    })
    .await
    .map_err(|_| AgentError::Handshake(format!("no answer from the controller within {HANDSHAKE_LIMIT:?}")))??;
    match welcome {
        ControllerMsg::Welcome { version, slot, idle_timeout, tasks_max, heartbeat, store, resume } => {
            if version != PROTOCOL_VERSION {
                return Err(AgentError::Handshake(format!(
                    "protocol version mismatch: the controller speaks {version}, this agent {PROTOCOL_VERSION}"
                )));
            }
            Ok(((slot, idle_timeout, tasks_max, heartbeat, store, resume), inbuf))
        }
        ControllerMsg::Reject { reason } => Err(AgentError::Rejected(reason)),
        other => Err(AgentError::Handshake(format!("unexpected first message {other:?}"))),
    }
}

/// The file naming the controller to come back to, when set.
fn resume_file() -> Option<PathBuf> {
    std::env::var_os(ENV_RESUME_FILE).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Comes back to a restarted controller within the grant's window, while
/// the job in hand keeps running (its result is kept). When no controller
/// takes this agent back in time, or a signal asks it to stop, the job is
/// killed and the agent leaves.
async fn reconnect(
    cfg: &AgentConfig,
    slot: &str,
    grant: &protocol::ResumeGrant,
    session: &mut Session,
    lost: &str,
) -> Result<(TcpStream, Welcome, BytesMut), AgentExit> {
    let deadline = tokio::time::Instant::from_std(crew_core::clock::after(Instant::now(), grant.window));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let mut delay = Duration::from_millis(20);
    let mut stopped = false;
    loop {
        if tokio::time::Instant::now() >= deadline || stopped {
            break;
        }
        // The jobs named in the hello are fixed before the attempt starts:
        // a job that ends during the handshake has its result kept in
        // `recent`, sent once the controller has taken this worker back.
        let mut jobs: Vec<(JobId, u32)> = session.recent.iter().map(|r| (r.job, r.attempt)).collect();
        if let Some(r) = &session.running {
            jobs.push((r.job, r.attempt));
        }
        let attempt = come_back_once(cfg, slot, grant, jobs);
        tokio::pin!(attempt);
        // The attempt is never dropped halfway for a job that ends: once
        // the controller has admitted the hello, the slot is this
        // connection's, and an agent that hung up then would find itself
        // refused on every later try while its job ran twice.
        let answer = loop {
            tokio::select! {
                r = &mut attempt => break Some(r),
                result = in_hand(session) => kept_while_away(session, result),
                _ = recv_signal(&mut sigterm) => { stopped = true; break None; }
                _ = recv_signal(&mut sigint) => { stopped = true; break None; }
            }
        };
        match answer {
            Some(Ok(x)) => return Ok(x),
            Some(Err(e)) => debug!("coming back failed: {e}; retrying"),
            None => continue,
        }
        let pause = tokio::time::sleep(delay);
        tokio::pin!(pause);
        tokio::select! {
            () = &mut pause => {}
            result = in_hand(session) => kept_while_away(session, result),
            _ = recv_signal(&mut sigterm) => stopped = true,
            _ = recv_signal(&mut sigint) => stopped = true,
        }
        delay = (delay * 2).min(Duration::from_millis(250));
    }
    // Nobody took us back: the job must not outlive its controller.
    if let (Some(r), Some(f)) = (session.running.take(), session.fut.take()) {
        r.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), f).await;
    }
    if stopped {
        return Err(AgentExit::Stopped);
    }
    Err(AgentExit::ControllerLost(format!(
        "{lost}, and no controller took this worker back within {}",
        humantime::format_duration(grant.window)
    )))
}

/// The job in hand, finishing (pending for ever when there is none).
async fn in_hand(session: &mut Session) -> JobResult {
    match session.fut.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A job that finished while the agent was away from its controller: its
/// result waits in `recent` for the controller that takes the agent back.
fn kept_while_away(session: &mut Session, result: JobResult) {
    session.fut = None;
    if let Some(r) = session.running.take() {
        let mut sink = BytesMut::new();
        done(&mut sink, &mut session.recent, true, r.job, r.attempt, result);
        session.tasks_done += 1;
    }
}

/// One try at coming back: connects to the controller named in the resume
/// file (or the launch address) and sends a resume hello naming `jobs`.
async fn come_back_once(
    cfg: &AgentConfig,
    slot: &str,
    grant: &protocol::ResumeGrant,
    jobs: Vec<(JobId, u32)>,
) -> Result<(TcpStream, Welcome, BytesMut), String> {
    let addr = resume_file()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| cfg.connect.clone());
    let mut stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("no answer from {addr}"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let hello = AgentMsg::Resume {
        version: PROTOCOL_VERSION,
        slot: slot.to_owned(),
        token: grant.token.clone(),
        pid: std::process::id(),
        host: hostname(),
        jobs,
    };
    let (mut rd, mut wr) = stream.split();
    let answer = tokio::time::timeout(Duration::from_secs(5), handshake(&mut rd, &mut wr, &hello))
        .await
        .map_err(|_| format!("no welcome from {addr}"))?
        .map_err(|e| e.to_string())?;
    Ok((stream, answer.0, answer.1))
}

/// Writes `out` whole and flushes it (a TLS stream holds written data until
/// flushed; for TCP the flush is free).
async fn write_out<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

#[allow(clippy::too_many_arguments)]
async fn serve<R, W>(
    rd: &mut R,
    wr: &mut W,
    mut inbuf: BytesMut,
    mut out: BytesMut,
    session: &mut Session,
    ctx: &Arc<ExecContext>,
    idle_timeout: Option<Duration>,
    tasks_max: Option<u32>,
    heartbeat: Duration,
) -> Outcome
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut queue: VecDeque<Box<RunJob>> = VecDeque::new();
    let Session { running, fut, tasks_done, recent, resumable } = session;
    let resumable = *resumable;
    // One clock reading per turn of the loop, taken when the wait ends:
    // the heartbeat and idle clocks need no finer time than that.
    let mut now = Instant::now();
    let mut last_recv = now;
    let mut last_sent = now;
    let mut idle_since = Some(now);
    let silent_limit = heartbeat.saturating_mul(5);
    // The one timer of the loop. A wake-up later than the one it is set for
    // leaves it set: it then goes off early, finds nothing due, and is set
    // again, so that it moves once a heartbeat rather than once a frame.
    let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(crew_core::clock::after(now, heartbeat)));
    tokio::pin!(timer);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    // Set when the agent must leave: the job in hand is cancelled first.
    let mut leaving: Option<AgentExit> = None;
    // A signal (a platform stopping this worker: TerminateJob, a Spot
    // reclaim) is not a cancel: the job in hand goes unreported, so the
    // controller counts a crash and runs it elsewhere.
    let mut signalled = false;

    loop {
        // Frames already received.
        loop {
            match protocol::decode::<ControllerMsg>(&mut inbuf) {
                Ok(Some(msg)) => match msg {
                    ControllerMsg::Run(run) => queue.push_back(run),
                    ControllerMsg::Revoke { job } => {
                        let ok = match queue.iter().position(|r| r.job == job) {
                            Some(pos) => {
                                queue.remove(pos);
                                true
                            }
                            None => false,
                        };
                        push(&mut out, &AgentMsg::Revoked { job, ok });
                    }
                    ControllerMsg::Cancel { job } => {
                        if let Some(pos) = queue.iter().position(|r| r.job == job) {
                            if let Some(run) = queue.remove(pos) {
                                done(
                                    &mut out,
                                    recent,
                                    resumable,
                                    run.job,
                                    run.attempt,
                                    cancelled_result("cancelled before it started"),
                                );
                            }
                        } else if let Some(r) = &*running {
                            if r.job == job {
                                r.cancel.cancel();
                            }
                        }
                    }
                    ControllerMsg::Heartbeat => {}
                    ControllerMsg::Stop => {
                        leaving.get_or_insert(AgentExit::Stopped);
                    }
                    ControllerMsg::Welcome { .. } | ControllerMsg::Reject { .. } => {
                        warn!("ignoring an unexpected handshake message");
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    leaving.get_or_insert(AgentExit::ControllerLost(format!("bad frame from the controller: {e}")));
                    break;
                }
            }
        }
        if let Some(lost) = lost_reason(&leaving, resumable, signalled) {
            return Outcome::Lost(lost);
        }
        if leaving.is_some() {
            if let Some(r) = &*running {
                r.cancel.cancel();
            }
            queue.clear();
        }
        // Start queued jobs; those that complete on their first poll
        // (builtins such as noop) are reported at once.
        while fut.is_none() && leaving.is_none() {
            let Some(run) = queue.pop_front() else { break };
            // Report what is finished before starting a process: a job may
            // kill this agent, and results still in `out` would die with it
            // (the controller would then charge the finished job a crash and
            // run it again). Builtins run in-process, so their results still
            // go out in batches.
            if !out.is_empty() && !matches!(run.spec.command, Command::Builtin { .. }) {
                if let Err(e) = write_out(wr, &out).await {
                    queue.push_front(run);
                    leaving = Some(AgentExit::ControllerLost(format!("write failed: {e}")));
                    out.clear();
                    break;
                }
                out.clear();
                last_sent = Instant::now();
            }
            let (job, attempt) = (run.job, run.attempt);
            let cancel = CancellationToken::new();
            let token = cancel.clone();
            let ctx = ctx.clone();
            let mut f: JobFuture<'static> =
                Box::pin(
                    async move { crew_exec::run_job(&ctx, run.job, run.attempt, run.seed, &run.spec, token).await },
                );
            idle_since = None;
            match (&mut f).now_or_never() {
                Some(result) => {
                    done(&mut out, recent, resumable, job, attempt, result);
                    *tasks_done += 1;
                }
                None => {
                    *fut = Some(f);
                    *running = Some(Running { job, attempt, cancel });
                }
            }
        }
        if fut.is_none() && queue.is_empty() && leaving.is_none() {
            if idle_since.is_none() {
                idle_since = Some(now);
            }
            if tasks_max.is_some_and(|m| *tasks_done >= m) {
                push(&mut out, &AgentMsg::Bye { reason: format!("task limit {tasks_done} reached") });
                leaving = Some(AgentExit::TasksDone);
            }
        }
        if let Some(lost) = lost_reason(&leaving, resumable, signalled) {
            return Outcome::Lost(lost);
        }
        if fut.is_none() {
            if let Some(exit) = leaving.take() {
                let _ = write_out(wr, &out).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
                return Outcome::Exit(exit);
            }
        }
        if !out.is_empty() {
            if let Err(e) = write_out(wr, &out).await {
                leaving = Some(AgentExit::ControllerLost(format!("write failed: {e}")));
                out.clear();
                continue;
            }
            out.clear();
            last_sent = now;
            prune_recent(recent, last_sent);
        }
        // Wait for the next thing to happen.
        let mut wake =
            crew_core::clock::after(last_sent, heartbeat).min(crew_core::clock::after(last_recv, silent_limit));
        if let (Some(idle), Some(since)) = (idle_timeout, idle_since) {
            wake = wake.min(crew_core::clock::after(since, idle));
        }
        let wake = tokio::time::Instant::from_std(wake.max(now));
        if wake < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(wake);
        }
        let mut received = false;
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => match r {
                Ok(0) => leaving = Some(AgentExit::ControllerLost("the controller closed the connection".into())),
                Ok(_) => received = true,
                Err(e) => leaving = Some(AgentExit::ControllerLost(format!("read failed: {e}"))),
            },
            result = async { match fut.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                *fut = None;
                // A platform that stops a worker may signal every process
                // of it at once (Slurm: scancel, a time limit, preemption),
                // so the job can die of the signal before this agent sees
                // its own. That is the worker going, not the job failing:
                // wait a moment for our own signal before reporting it.
                if !signalled && running.is_some() && killed_by_stop_signal(&result) {
                    tokio::select! {
                        _ = recv_signal(&mut sigterm) => { leaving.get_or_insert(AgentExit::Stopped); signalled = true; }
                        _ = recv_signal(&mut sigint) => { leaving.get_or_insert(AgentExit::Stopped); signalled = true; }
                        _ = tokio::time::sleep(STOP_SIGNAL_GRACE) => {}
                    }
                }
                if let Some(r) = running.take().filter(|_| !signalled) {
                    done(&mut out, recent, resumable, r.job, r.attempt, result);
                    *tasks_done += 1;
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if now >= crew_core::clock::after(last_recv, silent_limit) {
                    leaving.get_or_insert(AgentExit::ControllerLost(format!(
                        "no word from the controller for {}", humantime::format_duration(silent_limit)
                    )));
                } else if let (Some(idle), Some(since)) = (idle_timeout, idle_since) {
                    if fut.is_none() && queue.is_empty() && now >= crew_core::clock::after(since, idle) {
                        push(&mut out, &AgentMsg::Bye { reason: "idle timeout".into() });
                        leaving.get_or_insert(AgentExit::Idle);
                    }
                }
                if now >= crew_core::clock::after(last_sent, heartbeat) && out.is_empty() {
                    push(&mut out, &AgentMsg::Heartbeat);
                }
            }
            _ = recv_signal(&mut sigterm) => { leaving.get_or_insert(AgentExit::Stopped); signalled = true; }
            _ = recv_signal(&mut sigint) => { leaving.get_or_insert(AgentExit::Stopped); signalled = true; }
        }
        now = Instant::now();
        if received {
            last_recv = now;
        }
        if let Some(lost) = lost_reason(&leaving, resumable, signalled) {
            return Outcome::Lost(lost);
        }
        if let (Some(exit), Some(r)) = (&leaving, &*running) {
            debug!(?exit, job = %r.job, "cancelling the running job before leaving");
            r.cancel.cancel();
        }
    }
}

/// How long a job killed by SIGTERM, SIGINT or SIGHUP waits for the same
/// signal to reach its agent before it is reported as failed.
const STOP_SIGNAL_GRACE: Duration = Duration::from_secs(1);

/// The job failed by a signal a platform stops a worker with (not by the
/// agent's own cancel or time limit, which have statuses of their own).
fn killed_by_stop_signal(result: &JobResult) -> bool {
    result.status == Status::Failed && matches!(result.signal, Some(libc::SIGTERM | libc::SIGINT | libc::SIGHUP))
}

async fn recv_signal(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn push(out: &mut BytesMut, msg: &AgentMsg) {
    if let Err(e) = protocol::encode(msg, out) {
        warn!("could not encode a message for the controller: {e}");
    }
}

/// The longest error message a result carries whole; the rest is cut (an
/// error can quote a job's own output).
const ERROR_MAX: usize = 64 * 1024;

/// The bytes of object list (estimated) per [`AgentMsg::Objects`] frame:
/// half a frame, so that the estimate's error never matters.
const OBJECTS_PER_FRAME_BYTES: usize = protocol::MAX_FRAME / 2;

/// Sends a result. A result always reaches the controller: an error
/// message is capped; an object list too long for one frame goes ahead in
/// [`AgentMsg::Objects`] frames; and should the rest still not fit, the
/// job is reported `failed` with the reason, never dropped (which would
/// leave it running forever in the controller's eyes).
fn push_done(out: &mut BytesMut, job: JobId, attempt: u32, mut result: JobResult) {
    if let Some(e) = &mut result.error {
        if e.len() > ERROR_MAX {
            let total = e.len();
            truncate_utf8(e, ERROR_MAX);
            e.push_str(&format!(" ... (cut: {total} bytes in all)"));
        }
    }
    let msg = AgentMsg::Done { job, attempt, result: Box::new(result) };
    let Err(e) = protocol::encode(&msg, out) else { return };
    let AgentMsg::Done { result, .. } = msg else { return };
    let mut r = *result;
    debug!(%job, objects = r.objects.len(), "result too large for one frame ({e}): sending its objects ahead");
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for o in std::mem::take(&mut r.objects) {
        let size = o.name.len() + o.key.len() + o.sha256.len() + 64;
        if bytes + size > OBJECTS_PER_FRAME_BYTES && !chunk.is_empty() {
            push(out, &AgentMsg::Objects { job, attempt, objects: std::mem::take(&mut chunk) });
            bytes = 0;
        }
        bytes += size;
        chunk.push(o);
    }
    if !chunk.is_empty() {
        push(out, &AgentMsg::Objects { job, attempt, objects: chunk });
    }
    let msg = AgentMsg::Done { job, attempt, result: Box::new(r) };
    let Err(e) = protocol::encode(&msg, out) else { return };
    let AgentMsg::Done { result, .. } = msg else { return };
    let mut r = *result;
    warn!(%job, "result too large for a frame even without its objects: {e}");
    truncate_utf8(&mut r.stdout.text, 1024);
    truncate_utf8(&mut r.stderr.text, 1024);
    if let Some(error) = &mut r.error {
        truncate_utf8(error, 1024);
    }
    r.status = crew_core::output::Status::Failed;
    r.error = Some(format!("the job's result could not be sent to the controller: {e}"));
    push(out, &AgentMsg::Done { job, attempt, result: Box::new(r) });
}

/// When started by a class that set `CREW_PARENT_PID`, exit (by SIGTERM, so
/// the running job is killed in order) when that process dies.
fn die_with_parent() -> Result<(), AgentError> {
    let Some(parent) = std::env::var(ENV_PARENT_PID).ok().filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let parent: libc::pid_t =
        parent.parse().map_err(|_| AgentError::Config(format!("{ENV_PARENT_PID} is not a process id: {parent:?}")))?;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches
        // no memory.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) } == -1 {
            warn!("cannot arm the parent-death signal: {}", std::io::Error::last_os_error());
        }
    }
    // The parent may have died before the signal was armed.
    // SAFETY: getppid has no preconditions and cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Err(AgentError::Config("the process that started this agent is gone".into()));
    }
    Ok(())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crew_core::output::{Status, Timestamp};

    /// A secret by file reference is taken once, by its own index, from a
    /// private file of this user only, and the file is gone after.
    #[test]
    fn file_secrets_are_taken_once_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("token.");
        let reference = format!("file:{}", prefix.display());
        let write = |index: u32, text: &str, mode: u32| {
            let path = dir.path().join(format!("token.{index}"));
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write(3, "the-secret\n", 0o600);
        assert_eq!(take_file_secret(&reference, 3).expect("taken").expose(), "the-secret");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "the file is gone");
        let again = take_file_secret(&reference, 3).expect_err("a second use fails").to_string();
        assert!(again.contains("is gone"), "{again}");
        write(4, "open-to-all", 0o644);
        let open = take_file_secret(&reference, 4).expect_err("refused").to_string();
        assert!(open.contains("mode 0600") && !open.contains("open-to-all"), "{open}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "a refused file is removed too");
        write(5, "", 0o600);
        assert!(take_file_secret(&reference, 5).expect_err("empty").to_string().contains("empty"));
        let elsewhere = take_file_secret("file:/nonexistent-crew-dir/token.", 0).expect_err("no folder").to_string();
        assert!(elsewhere.contains("is not here") && elsewhere.contains("state_dir"), "{elsewhere}");
        for bad in ["ssm:/x/", "file:relative/token.", "file:/dir/"] {
            let e = take_file_secret(bad, 0).expect_err("not a file reference").to_string();
            assert!(e.contains("not a file reference"), "{bad}: {e}");
        }
    }

    /// The agent's configuration holds its launch secret: `{:?}` (and
    /// `{:#?}`) never shows it.
    #[test]
    fn the_config_redacts_its_token_in_debug() {
        let secret = crew_core::worker::Secret::random();
        let config = AgentConfig {
            connect: "127.0.0.1:7000".into(),
            launch: "1".into(),
            index: 0,
            token: secret.clone(),
            tls_sha256: None,
            builtins: crew_exec::builtins::Builtins::default(),
        };
        for text in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!text.contains(secret.expose()), "the secret shows in {text}");
            assert!(text.contains("127.0.0.1:7000"), "{text}");
        }
    }

    fn result(objects: usize, error: Option<String>) -> JobResult {
        let t = Timestamp(std::time::SystemTime::UNIX_EPOCH);
        let long = "n".repeat(150);
        let mut r = JobResult::new(Status::Succeeded, t, t);
        r.exit_code = Some(0);
        r.error = error;
        r.objects = (0..objects)
            .map(|i| {
                crew_core::staging::StoredObject::new(
                    format!("out/{long}-{i}"),
                    format!("jobs/1/1/outputs/out/{long}-{i}"),
                    6,
                    "ab".repeat(32),
                )
            })
            .collect();
        r
    }

    /// Decodes every frame of `out`, as the controller would.
    fn frames(mut out: BytesMut) -> Vec<AgentMsg> {
        let mut msgs = Vec::new();
        while let Some(m) = protocol::decode::<AgentMsg>(&mut out).expect("every frame decodes") {
            msgs.push(m);
        }
        assert!(out.is_empty());
        msgs
    }

    #[test]
    fn a_result_with_forty_thousand_objects_goes_in_parts_and_whole() {
        let started = std::time::Instant::now();
        let mut out = BytesMut::new();
        push_done(&mut out, JobId(1), 1, result(40_000, None));
        let encoded = started.elapsed();
        assert!(out.len() > protocol::MAX_FRAME, "the list must not fit one frame for this test");
        let msgs = frames(out);
        eprintln!("encoded in {encoded:?}, decoded in {:?}", started.elapsed() - encoded);
        assert!(msgs.len() >= 3, "{} frames", msgs.len());
        let mut names = Vec::new();
        for m in &msgs[..msgs.len() - 1] {
            let AgentMsg::Objects { job, attempt, objects } = m else { panic!("objects first: {m:?}") };
            assert_eq!((*job, *attempt), (JobId(1), 1));
            names.extend(objects.iter().map(|o| o.name.clone()));
        }
        let Some(AgentMsg::Done { result, .. }) = msgs.last() else { panic!("done last") };
        assert_eq!(result.status, Status::Succeeded);
        names.extend(result.objects.iter().map(|o| o.name.clone()));
        let want: Vec<String> = result_names(40_000);
        assert_eq!(names, want, "every object, in order");
    }

    fn result_names(n: usize) -> Vec<String> {
        result(n, None).objects.into_iter().map(|o| o.name).collect()
    }

    #[test]
    fn a_huge_error_message_is_cut_and_the_result_still_goes() {
        let mut out = BytesMut::new();
        push_done(&mut out, JobId(2), 1, result(1, Some("e".repeat(20 << 20))));
        let msgs = frames(out);
        assert_eq!(msgs.len(), 1);
        let AgentMsg::Done { result, .. } = &msgs[0] else { panic!("done") };
        let error = result.error.as_deref().expect("the error");
        assert!(error.len() < ERROR_MAX + 100 && error.ends_with(&format!("(cut: {} bytes in all)", 20 << 20)));
        assert_eq!(result.objects.len(), 1);
    }
}
