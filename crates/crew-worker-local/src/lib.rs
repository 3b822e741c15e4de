//! The `local` worker class: crew agents as child processes on this machine.
//!
//! Like callr, each worker is a separate process started from the
//! controller's machine; unlike callr, it stays up between jobs. This crate
//! is also the reference implementation of [`crew_core::worker::Worker`]:
//! it is small because everything that is not "start, probe, stop a
//! process" lives in crew-core.
//!
//! - `launch` spawns one agent per member, each in its own process group
//!   (so a Ctrl-C at the terminal reaches the controller, which then stops
//!   the workers in order, rather than killing them mid-job), with the
//!   launch secret in its environment only, and the controller's pid in
//!   `CREW_PARENT_PID`, from which the agent arms a parent-death signal (on
//!   Linux) so that it never outlives a controller killed with SIGKILL.
//! - `probe` reaps exited agents and reports their exit status.
//! - `terminate` sends SIGTERM, then SIGKILL after a grace period.
//! - Dropping the class or a handle kills nothing.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use crew_core::worker::{Capabilities, ENV_INDEX, ENV_PARENT_PID, Handle, LaunchSpec, Liveness, Worker, WorkerError};
use tracing::{debug, warn};

mod orphans;
pub use orphans::{become_subreaper, kill_orphans};

/// The class name.
pub const CLASS: &str = "local";

/// The `local` class.
#[derive(Clone, Debug)]
pub struct LocalWorker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    grace: Duration,
    procs: Mutex<HashMap<u32, Proc>>,
}

/// What the class knows of one agent it started.
#[derive(Debug)]
enum Proc {
    /// Not reaped yet. Signals go through the pidfd when there is one, so
    /// they can never reach another process that reused the pid.
    Running(Option<OwnedFd>),
    /// Reaped by its waiter task; the reason is reported by the next probe.
    /// A probe that reported it, or a terminate, forgets the process, so the
    /// table does not grow with every relaunch of a long-lived controller.
    Exited(String),
}

impl Default for LocalWorker {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalWorker {
    /// A class with the default grace period (3 s between SIGTERM and
    /// SIGKILL).
    pub fn new() -> Self {
        Self::with_grace(Duration::from_secs(3))
    }

    /// A class with the given grace period.
    pub fn with_grace(grace: Duration) -> Self {
        Self { inner: Arc::new(Inner { grace, procs: Mutex::new(HashMap::new()) }) }
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Proc>> {
        self.inner.procs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `sig` to the agent `pid` if it is still running (not reaped).
    /// Returns whether it was running.
    fn signal(&self, pid: u32, sig: libc::c_int) -> bool {
        match self.procs().get(&pid) {
            Some(Proc::Running(pidfd)) => {
                send_signal(pid, pidfd.as_ref(), sig);
                true
            }
            _ => false,
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("the agent exited with status {code}"),
        (None, Some(sig)) => format!("the agent was killed by signal {sig}"),
        _ => "the agent ended".to_owned(),
    }
}

fn pid_of(handle: &Handle) -> Option<u32> {
    handle.id.parse().ok()
}

/// A pidfd for a child not yet reaped (Linux 5.3+); `None` elsewhere.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::pid_t::try_from(pid).ok()?, 0) };
        let fd = libc::c_int::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

fn send_signal(pid: u32, pidfd: Option<&OwnedFd>, sig: libc::c_int) {
    #[cfg(target_os = "linux")]
    if let Some(fd) = pidfd {
        // SAFETY: pidfd_send_signal takes an fd we own, a signal number and
        // a null siginfo.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0);
        }
        return;
    }
    let _ = pidfd;
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill has no memory-safety preconditions; the caller holds the
    // table lock and saw the process unreaped, so the pid is still ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[async_trait]
impl Worker for LocalWorker {
    fn class(&self) -> &str {
        CLASS
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::local()
    }

    fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(WorkerError::Options {
                class: CLASS.to_owned(),
                message: format!("unknown option {k:?}: the local class takes no options"),
            }),
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError> {
        let mut handles = Vec::with_capacity(spec.members.len());
        let mut started: Vec<u32> = Vec::new();
        for member in &spec.members {
            let mut cmd = tokio::process::Command::new(&spec.program);
            cmd.args(&spec.args)
                .envs(&spec.env)
                .env(ENV_INDEX, member.index.to_string())
                .env("CREW_SLOT", &member.slot)
                // The agent arms its own parent-death signal against this
                // pid (no pre-exec hook here: without one, the spawn uses
                // posix_spawn instead of copying this process's memory map,
                // which gets slower as the controller grows).
                .env(ENV_PARENT_PID, std::process::id().to_string())
                .stdin(std::process::Stdio::null())
                .process_group(0)
                .kill_on_drop(false);
            let spawned = cmd.spawn().and_then(|child| match child.id() {
                Some(pid) => Ok((child, pid)),
                None => Err(std::io::Error::other("a spawned agent has no pid")),
            });
            match spawned {
                Ok((mut child, pid)) => {
                    debug!(pid, slot = %member.slot, "local agent started");
                    self.procs().insert(pid, Proc::Running(pidfd_open(pid)));
                    // Reap it as soon as it exits, whoever asks or not.
                    let this = self.clone();
                    tokio::spawn(async move {
                        let reason = match child.wait().await {
                            Ok(status) => describe(status),
                            Err(e) => format!("the agent's status is unknown: {e}"),
                        };
                        debug!(pid, "{reason}");
                        this.procs().insert(pid, Proc::Exited(reason));
                    });
                    started.push(pid);
                    handles.push(Handle::new(pid.to_string()));
                }
                Err(e) => {
                    // All or nothing: stop what this launch started.
                    for pid in started {
                        self.signal(pid, libc::SIGKILL);
                    }
                    return Err(WorkerError::Platform {
                        class: CLASS.to_owned(),
                        message: format!("could not start the agent {:?}: {e}", spec.program),
                        retryable: false,
                    });
                }
            }
        }
        Ok(handles)
    }

    async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError> {
        let mut procs = self.procs();
        Ok(handles
            .iter()
            .map(|h| {
                let Some(pid) = pid_of(h) else { return Liveness::Unknown };
                match procs.get(&pid) {
                    None => Liveness::Unknown,
                    Some(Proc::Running(_)) => Liveness::Running,
                    Some(Proc::Exited(_)) => match procs.remove(&pid) {
                        Some(Proc::Exited(reason)) => Liveness::Exited { reason },
                        _ => Liveness::Unknown,
                    },
                }
            })
            .collect())
    }

    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError> {
        let mut pending = Vec::new();
        {
            let mut procs = self.procs();
            for pid in handles.iter().filter_map(pid_of) {
                match procs.get(&pid) {
                    Some(Proc::Running(pidfd)) => {
                        send_signal(pid, pidfd.as_ref(), libc::SIGTERM);
                        pending.push(pid);
                    }
                    // Terminated means forgotten: nobody will ask again.
                    Some(Proc::Exited(_)) => {
                        procs.remove(&pid);
                    }
                    None => {}
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        // Escalate in the background: terminate may return before the
        // processes are gone (the contract), and a probe tells.
        let this = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + this.inner.grace;
            loop {
                let alive: Vec<u32> = {
                    let procs = this.procs();
                    pending.iter().copied().filter(|pid| matches!(procs.get(pid), Some(Proc::Running(_)))).collect()
                };
                if alive.is_empty() {
                    let mut procs = this.procs();
                    for pid in &pending {
                        if matches!(procs.get(pid), Some(Proc::Exited(_))) {
                            procs.remove(pid);
                        }
                    }
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    for pid in alive {
                        warn!(pid, "local agent ignored SIGTERM; killing it");
                        this.signal(pid, libc::SIGKILL);
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Ok(())
    }
}
