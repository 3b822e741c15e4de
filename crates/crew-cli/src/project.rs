//! The project folder (`.crew/` by default) and its daemon: finding the
//! folder, connecting to the daemon, and starting it when nothing answers.
//!
//! **Invariant:** at most one daemon serves a folder. Two commands may race
//! to start it; the daemon itself takes a lock and the loser exits with
//! status 2, so [`ensure_daemon`] never decides who wins: it only keeps
//! polling the health route until some daemon answers.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::Failure;
use crate::client::Client;

/// How long a started daemon has to answer its health route.
const START_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) use crate::wire::Health;

/// The project folder, absolute: `--dir`, else `$CREW_DIR` (clap reads
/// both into `flag`), else `./.crew`.
pub(crate) fn project_dir(flag: Option<PathBuf>) -> Result<PathBuf, Failure> {
    let dir = flag.unwrap_or_else(|| PathBuf::from(".crew"));
    if dir.is_absolute() {
        return Ok(dir);
    }
    let cwd = std::env::current_dir()
        .context("cannot find the current folder (was it removed?); give the project folder with --dir")
        .map_err(Failure::usage)?;
    Ok(cwd.join(dir))
}

/// The daemon's socket in `dir`.
pub(crate) fn socket(dir: &Path) -> PathBuf {
    dir.join("crew.sock")
}

/// Connects to the daemon of `dir` if one answers its health route.
pub(crate) fn try_connect(dir: &Path) -> Option<(Client, Health)> {
    let sock = socket(dir);
    // No socket file: no daemon, and no need to build a runtime to learn it.
    if !sock.exists() {
        return None;
    }
    let mut client = Client::connect(&sock).ok()?;
    let health: Health = client.get("/v1/health").ok()?;
    Some((client, health))
}

/// A connection to the daemon of `dir`, starting the daemon if needed.
pub(crate) fn ensure_daemon(dir: &Path) -> Result<(Client, Health), Failure> {
    ensure_daemon_with(dir, &DaemonOverrides::default())
}

/// Settings a daemon started now takes over its configuration (`crew up`
/// flags, passed on as `crew daemon` flags), for its life.
#[derive(Debug, Default)]
pub(crate) struct DaemonOverrides {
    /// The store: a URL or an absolute folder.
    pub(crate) store: Option<String>,
    /// Where the controller listens for workers.
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// The address workers dial.
    pub(crate) advertise: Option<String>,
    /// When worker connections use TLS.
    pub(crate) tls: Option<crew_controller::TlsMode>,
    /// Where the API also listens on TCP.
    pub(crate) http: Option<std::net::SocketAddr>,
    /// Host names that listener answers to.
    pub(crate) http_hosts: Vec<String>,
}

/// [`ensure_daemon`], starting the daemon with `overrides` over its
/// configuration when it is not running yet.
pub(crate) fn ensure_daemon_with(dir: &Path, overrides: &DaemonOverrides) -> Result<(Client, Health), Failure> {
    if let Some(found) = try_connect(dir) {
        return Ok(found);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the project folder {}", dir.display()))
        .map_err(Failure::usage)?;
    // A bad crew.toml or CREW_* variable is bad input (exit 2), said here
    // at once; the daemon, which reads the same, would exit 3.
    crate::config::Config::load(dir).map_err(Failure::usage)?;
    let log_path = dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))
        .map_err(Failure::internal)?;
    let log_start = log.metadata().map_or(0, |m| m.len());
    let log2 = log.try_clone().context("cannot duplicate the log file handle").map_err(Failure::internal)?;
    let exe = std::env::current_exe().context("cannot find the crew executable").map_err(Failure::internal)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon").arg("--dir").arg(dir).stdin(Stdio::null()).stdout(log).stderr(log2);
    if let Some(store) = &overrides.store {
        cmd.arg("--store").arg(store);
    }
    if let Some(listen) = overrides.listen {
        cmd.arg("--listen").arg(listen.to_string());
    }
    if let Some(advertise) = &overrides.advertise {
        cmd.arg("--advertise").arg(advertise);
    }
    if let Some(tls) = overrides.tls {
        cmd.arg("--tls").arg(tls.as_str());
    }
    if let Some(http) = overrides.http {
        cmd.arg("--http").arg(http.to_string());
    }
    for name in &overrides.http_hosts {
        cmd.arg("--http-host").arg(name);
    }
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our
    // session and terminal so that a Ctrl-C here never reaches it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the crew daemon").map_err(Failure::internal)?;

    let deadline = Instant::now() + START_DEADLINE;
    let mut exited = None;
    loop {
        if let Some(found) = try_connect(dir) {
            return Ok(found);
        }
        if exited.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                // Status 2: another daemon holds the lock; it will answer.
                if status.code() != Some(2) {
                    return Err(start_failure(&log_path, log_start, &format!("the crew daemon exited ({status})")));
                }
                exited = Some(status);
            }
        }
        if Instant::now() >= deadline {
            return Err(start_failure(
                &log_path,
                log_start,
                &format!("the crew daemon did not answer within {}s", START_DEADLINE.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_failure(log_path: &Path, from: u64, what: &str) -> Failure {
    let tail = log_tail(log_path, from, 15);
    let tail = if tail.is_empty() { "(it wrote nothing)".to_owned() } else { tail };
    Failure::internal(anyhow::anyhow!(
        "{what}; the end of {}:\n{tail}\n(fix the cause above, or run `crew daemon --dir {}` by hand to see it)",
        log_path.display(),
        log_path.parent().map_or_else(String::new, |d| d.display().to_string())
    ))
}

/// The last `lines` lines written to the log since byte `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = from.max(len.saturating_sub(16 * 1024));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// True while process `pid` exists.
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
