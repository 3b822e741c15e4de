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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use crew_core::worker::{Capabilities, ENV_INDEX, ENV_PARENT_PID, Handle, LaunchSpec, Liveness, Worker, WorkerError};
use tokio::process::Child;
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

#[derive(Debug)]
enum Proc {
    Running(Child),
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

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill has no memory-safety preconditions; a stale pid is
    // guarded against by only signalling children we have not reaped
    // (a zombie keeps its pid reserved).
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
            match cmd.spawn() {
                Ok(child) => {
                    let Some(pid) = child.id() else {
                        return Err(WorkerError::Platform {
                            class: CLASS.to_owned(),
                            message: "a spawned agent has no pid".to_owned(),
                            retryable: true,
                        });
                    };
                    debug!(pid, slot = %member.slot, "local agent started");
                    self.procs().insert(pid, Proc::Running(child));
                    started.push(pid);
                    handles.push(Handle { id: pid.to_string() });
                }
                Err(e) => {
                    // All or nothing: stop what this launch started.
                    for pid in started {
                        signal(pid, libc::SIGKILL);
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
                let Some(p) = procs.get_mut(&pid) else { return Liveness::Unknown };
                if let Proc::Running(child) = p {
                    match child.try_wait() {
                        Ok(None) => return Liveness::Running,
                        Ok(Some(status)) => {
                            debug!(pid, "{}", describe(status));
                            *p = Proc::Exited(describe(status));
                        }
                        Err(e) => *p = Proc::Exited(format!("the agent's status is unknown: {e}")),
                    }
                }
                match p {
                    Proc::Exited(reason) => Liveness::Exited { reason: reason.clone() },
                    Proc::Running(_) => Liveness::Running,
                }
            })
            .collect())
    }

    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError> {
        let mut pending = Vec::new();
        {
            let mut procs = self.procs();
            for h in handles {
                let Some(pid) = pid_of(h) else { continue };
                if let Some(Proc::Running(child)) = procs.get_mut(&pid) {
                    match child.try_wait() {
                        Ok(None) => {
                            signal(pid, libc::SIGTERM);
                            pending.push(pid);
                        }
                        Ok(Some(status)) => {
                            procs.insert(pid, Proc::Exited(describe(status)));
                        }
                        Err(e) => warn!(pid, "cannot check a local agent: {e}"),
                    }
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
                    let mut procs = this.procs();
                    pending
                        .iter()
                        .copied()
                        .filter(|pid| match procs.get_mut(pid) {
                            Some(Proc::Running(child)) => match child.try_wait() {
                                Ok(None) => true,
                                Ok(Some(status)) => {
                                    procs.insert(*pid, Proc::Exited(describe(status)));
                                    false
                                }
                                Err(_) => false,
                            },
                            _ => false,
                        })
                        .collect()
                };
                if alive.is_empty() {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    for pid in alive {
                        warn!(pid, "local agent ignored SIGTERM; killing it");
                        signal(pid, libc::SIGKILL);
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Ok(())
    }
}
