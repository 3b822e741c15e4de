//! `crew daemon`: the long-lived controller of one project folder.
//!
//! Role: own the folder (an exclusive `flock` on `daemon.lock`, so one
//! daemon per folder), run a [`Controller`] on one thread like `crew run`,
//! and serve the HTTP API of docs/api.md on the Unix socket `crew.sock`
//! (mode 0600: the file permission is the authentication). The routes live
//! in [`api`]; this module is the life cycle: start, serve, and stop cleanly
//! on `POST /v1/down`, SIGTERM or SIGINT (every worker stopped, the socket
//! and pid file removed, leftover processes killed as a child subreaper).

mod api;
pub(crate) use api::JOB_LINES;
#[cfg(any(test, fuzzing))]
pub(crate) use api::check_request;
mod dashboard;
mod http;
mod idset;
mod journal;
pub(crate) mod logfile;
mod outputs;
mod telemetry;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use crew_controller::journal::Journal;
use crew_controller::{AgentCommand, Controller, ControllerConfig};
use crew_core::store::Store;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use crate::{EXIT_OK, Failure};

/// `crew daemon`: runs the controller of a project folder in the foreground
/// and serves docs/api.md on `DIR/crew.sock`. Started by `crew up` (and by
/// any command that needs the daemon), detached; not usually run by hand.
#[derive(Args, Debug)]
pub(crate) struct DaemonArgs {
    /// The project folder (absolute), e.g. /home/me/work/.crew
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// The store (a URL, or an absolute folder), over `[daemon] store` and
    /// `CREW_STORE`.
    #[arg(long, value_name = "URL")]
    pub(crate) store: Option<String>,
    /// Where the controller listens for workers, over `[daemon] listen`
    /// and `CREW_LISTEN`.
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// The address workers dial, over `[daemon] advertise` and
    /// `CREW_ADVERTISE`.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub(crate) advertise: Option<String>,
    /// When worker connections use TLS, over `[daemon] tls` and `CREW_TLS`.
    #[arg(long, value_name = "MODE")]
    pub(crate) tls: Option<crew_controller::TlsMode>,
    /// Also serve the API on TCP at IP:PORT, over `[daemon] http` and
    /// `CREW_HTTP` (bearer token in DIR/http.token; TLS beyond loopback).
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) http: Option<std::net::SocketAddr>,
    /// A host name the TCP listener answers to besides IP addresses and
    /// localhost (repeatable), over `[daemon] http_hosts`.
    #[arg(long = "http-host", value_name = "NAME")]
    pub(crate) http_hosts: Vec<String>,
}

/// File names inside the project folder.
pub(crate) const SOCKET: &str = "crew.sock";
const LOCK: &str = "daemon.lock";
const PID: &str = "daemon.pid";
const JOURNAL: &str = "journal.jsonl";
const OUTPUTS: &str = "outputs.jsonl";
/// The key slot reconnect credentials derive from (0600, made once).
const AGENT_KEY: &str = "agent.key";
/// The address local agents dial, for those that outlived a daemon.
const WORKERS_ADDR: &str = "workers.addr";

pub(crate) fn main(args: DaemonArgs) -> Result<u8, Failure> {
    let dir = args.dir.clone();
    if !dir.is_absolute() {
        return Err(Failure::usage(anyhow::anyhow!("--dir must be an absolute path, not {}", dir.display())));
    }
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the project folder {}", dir.display()))
            .map_err(Failure::internal)?;
    }
    // Private, also when it was made by hand (or by an older crew) with the
    // usual 0755: the journal holds jobs' command lines and environments.
    // daemon.log is created 0600 by the command that starts the daemon.
    for (path, mode) in [(dir.clone(), 0o700), (dir.join("daemon.log"), 0o600)] {
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Failure::internal(
                    anyhow::Error::new(e).context(format!("cannot make {} private", path.display())),
                ));
            }
        }
    }
    // A bad configuration exits 3, not 2: `ensure_daemon` reads status 2 as
    // "another daemon holds the lock" and would wait for it to answer.
    let mut config = crate::config::Config::load(&dir).map_err(Failure::internal)?;
    if let Some(store) = args.store {
        config.daemon.store = Some(store);
    }
    if let Some(listen) = args.listen {
        config.daemon.listen = Some(listen);
    }
    if let Some(advertise) = args.advertise {
        config.daemon.advertise = Some(advertise);
    }
    if let Some(tls) = args.tls {
        config.daemon.tls = Some(tls);
    }
    if let Some(http) = args.http {
        config.daemon.http = Some(http);
    }
    if !args.http_hosts.is_empty() {
        config.daemon.http_hosts = args.http_hosts;
    }
    logfile::install(
        dir.join("daemon.log"),
        config.daemon.log_size.unwrap_or(logfile::LOG_SIZE),
        config.daemon.log_files.unwrap_or(logfile::LOG_FILES),
    );
    // Held (open) for the daemon's whole life; the kernel drops the lock
    // when the process exits, however it exits.
    let _lock = take_lock(&dir)?;
    let pid_path = dir.join(PID);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write {}", pid_path.display()))
        .map_err(Failure::internal)?;
    let store_url = config.store_url(&dir);
    let store: Arc<dyn Store> = crew_core::store::open_store(&store_url)
        .with_context(|| format!("cannot open the store {store_url}"))
        .map_err(Failure::internal)?;

    // Jobs sent without a working folder run in the project's root (the
    // folder that holds DIR), whichever command happened to start us.
    if let Some(root) = dir.parent() {
        std::env::set_current_dir(root)
            .with_context(|| format!("cannot enter the project root {}", root.display()))
            .map_err(Failure::internal)?;
    }
    let _ = crew_worker_local::become_subreaper();
    // One thread, as in `crew run`: the controller's work per request is
    // short and needs no hand-off between threads.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)?;
    // Before any request is served: an unusable store stops the daemon with
    // one clear line, like a bad configuration (exit 3, see above).
    if let Err(e) = rt.block_on(store.check()) {
        let _ = std::fs::remove_file(&pid_path);
        return Err(Failure::internal(
            anyhow::Error::new(e).context(format!("the store {} is not usable", store.url())),
        ));
    }
    let result = rt.block_on(serve(dir.clone(), store, config));
    drop(rt);
    let _ = std::fs::remove_file(&pid_path);
    crew_worker_local::kill_orphans();
    result.map(|()| EXIT_OK).map_err(Failure::internal)
}

/// Takes the exclusive lock of the folder, or fails with exit status 2
/// naming the daemon that holds it.
fn take_lock(dir: &Path) -> Result<File, Failure> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
        .map_err(Failure::internal)?;
    let begin = std::time::Instant::now();
    loop {
        // SAFETY: flock on a file descriptor we own and keep open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Failure::internal(anyhow::Error::new(err).context(format!("cannot lock {}", path.display()))));
        }
        let pid = std::fs::read_to_string(dir.join(PID)).map(|s| s.trim().to_owned()).unwrap_or_default();
        // A daemon killed a moment ago (a supervisor restarting it at once)
        // holds the lock until its last thread exited and its memory is
        // given back, after its pid already reads as a zombie: wait for it.
        // So does one stopping cleanly (it removed its pid file first),
        // and one starting (it writes the file next: then it is alive).
        if (pid.is_empty() || pid.parse::<u32>().is_ok_and(exiting)) && begin.elapsed() < LOCK_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        let pid = if pid.is_empty() { "unknown".to_owned() } else { pid };
        return Err(Failure::usage(anyhow::anyhow!(
            "a crew daemon (pid {pid}) is already running for {}; stop it first (crew down)",
            dir.display()
        )));
    }
}

/// Longest a starting daemon waits for the lock of one that is exiting.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether process `pid` is gone or exiting (a zombie, or dead): its
/// state, the field after the command name in `/proc/PID/stat`.
fn exiting(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'Z' | 'X' | 'x')),
    }
}

/// Reads the folder's agent key, making it (random, 0600) on first use.
fn agent_key(path: &Path) -> anyhow::Result<crew_core::worker::Secret> {
    match std::fs::read_to_string(path) {
        Ok(key) if key.trim().len() >= 32 => return Ok(crew_core::worker::Secret::new(key.trim())),
        Ok(_) => tracing::warn!("{} is too short; making a new key", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
    }
    let key = crew_core::worker::Secret::random();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(key.expose().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key)
}

/// Starts the controller, serves the socket until told to stop, then
/// closes the controller and removes the socket.
async fn serve(dir: PathBuf, store: Arc<dyn Store>, settings: crate::config::Config) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the crew executable")?;
    // The journal first: the controller continues its job numbering.
    let (mut journal, replay) = Journal::open(dir.join(JOURNAL))?;
    for skipped in &replay.skipped {
        tracing::error!(
            "journal {}: {skipped}: the record was skipped (damaged); the rest was recovered",
            dir.join(JOURNAL).display()
        );
    }
    if let Some(bytes) = settings.daemon.journal_compact_bytes {
        journal.set_compact_after(bytes);
    }
    let assigned = Arc::new(journal::AssignedBuffer::default());
    let mut config = ControllerConfig::new(AgentCommand::crew(exe.to_string_lossy()));
    settings.apply(&mut config);
    config.store = Some(store.clone());
    config.first_job_id = replay.next_job;
    let telemetry = Arc::new(telemetry::Telemetry::new());
    config.observer = Some(Arc::new(telemetry::Observers(vec![assigned.clone(), telemetry.clone()])));
    // Local agents outlive a daemon that dies (SIGKILL, a crash) for one
    // heartbeat window and come back to the next one with their jobs. The
    // stale address goes first, so that none comes back before this
    // daemon restored its jobs.
    let addr_file = dir.join(WORKERS_ADDR);
    match std::fs::remove_file(&addr_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot remove {}", addr_file.display()))),
    }
    config.resume = Some(crew_controller::ResumeConfig {
        key: agent_key(&dir.join(AGENT_KEY))?,
        address_file: addr_file,
        window: config.heartbeat.saturating_mul(config.heartbeat_misses.max(1)),
    });
    let controller = Controller::start(config).await?;

    let sock = dir.join(SOCKET);
    // Safe to remove: we hold the lock, so no live daemon serves it.
    match std::fs::remove_file(&sock) {
        Ok(()) => tracing::info!("removed a stale socket {}", sock.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot remove the stale socket {}", sock.display())));
        }
    }
    // Created 0600 by the kernel (under a 0177 umask), so that no other
    // user can connect between bind and chmod. The umask is the process's:
    // restored at once (a file another thread creates meanwhile is only
    // more private).
    // SAFETY: umask only swaps the process's file mode mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&sock);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    let listener = bound.with_context(|| format!("cannot listen on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", sock.display()))?;

    let mut outputs = outputs::OutputsLog::open(&dir.join(OUTPUTS))
        .with_context(|| format!("cannot open {}", dir.join(OUTPUTS).display()))?;
    if let Some(keep) = settings.daemon.logs_keep {
        outputs.set_keep(keep as usize);
    }
    let state = Arc::new(api::Daemon::new(
        controller.clone(),
        store,
        dir.clone(),
        journal::JournalWriter::new(journal, assigned).context("cannot start the journal's committer")?,
        outputs,
        settings.recruit,
        telemetry,
    ));
    // The TCP listener, if asked for: bound before the daemon says it is
    // ready, so that `crew up` finds it in the health answer.
    let http = match settings.daemon.http {
        Some(addr) => {
            let listener = http::HttpListener::bind(&dir, addr, &settings.daemon.http_hosts).await?;
            state.set_http(listener.info());
            tracing::info!(listen = %listener.info().listen, tls = listener.info().tls_sha256.is_some(), "HTTP API listening");
            Some(listener)
        }
        None => {
            // A token of an earlier daemon opens nothing now.
            let _ = std::fs::remove_file(dir.join(http::TOKEN_FILE));
            None
        }
    };
    let (jobs, ready) = (replay.pending.len(), replay.ready.len());
    state.restore(replay).await;
    controller.publish_address().context("cannot publish the workers' address")?;
    if jobs + ready > 0 {
        tracing::info!(jobs, outputs = ready, "resumed from the journal");
    }
    let drain = Drain::start(state.clone()).context("cannot start the output drain")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tracing::info!(pid = std::process::id(), socket = %sock.display(), controller = %controller.addr(), "crew daemon ready");
    let _ = std::io::stderr().flush();

    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(move |req| api::handle(state.clone(), req));
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!("connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            accepted = async {
                match &http {
                    Some(h) => h.accept().await,
                    None => std::future::pending().await,
                }
            } => match (accepted, &http) {
                (Ok((stream, peer)), Some(h)) => h.serve(&state, &mut conns, stream, peer),
                (Err(e), _) => {
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                (Ok(_), None) => {}
            },
            () = state.down_requested() => { tracing::info!("stopping: asked by POST /v1/down"); break; }
            _ = sigint.recv() => { tracing::info!("stopping: SIGINT"); break; }
            _ = sigterm.recv() => { tracing::info!("stopping: SIGTERM"); break; }
        }
    }
    state.begin_stop();
    drop(listener);
    drop(http);
    let _ = std::fs::remove_file(dir.join(http::TOKEN_FILE));
    // Connection tasks keep running (on this thread) while the workers stop.
    controller.close().await;
    // Every answer in flight (the one to `POST /v1/down` at least) is
    // finished before the runtime goes; idle keep-alive connections are not
    // waited for long.
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(2), async { while conns.join_next().await.is_some() {} })
            .await;
    conns.abort_all();
    drain.stop().await;
    state.close_journal().await;
    let _ = std::fs::remove_file(&sock);
    tracing::info!("crew daemon stopped");
    Ok(())
}

/// The output drain ([`api::drain`]) on a thread and runtime of its own:
/// each output is serialized, journaled and written to the outputs log
/// there, beside the runtime thread that talks to the workers and the
/// clients (a third of that thread's time when it did it too).
struct Drain {
    stop: tokio::sync::oneshot::Sender<()>,
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl Drain {
    fn start(state: Arc<api::Daemon>) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("crew-drain".into()).spawn(move || {
            rt.block_on(api::drain(state, stop_rx));
            let _ = stopped_tx.send(());
        })?;
        Ok(Self { stop, stopped })
    }

    /// Stops the drain once it took what the controller delivered.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.stopped.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live process is not exiting; a zombie (a child exited and not
    /// reaped) and a pid that does not exist are.
    #[test]
    fn a_zombie_or_missing_process_is_exiting_and_a_live_one_is_not() {
        assert!(!exiting(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        let begin = std::time::Instant::now();
        while !exiting(pid) {
            assert!(begin.elapsed() < std::time::Duration::from_secs(10), "the child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") Z "));
        child.wait().unwrap();
        assert!(exiting(pid));
    }
}
