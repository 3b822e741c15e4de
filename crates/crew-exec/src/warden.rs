//! The warden: a small process between an agent's starter and the agent,
//! so that nothing a job started outlives the agent.
//!
//! A job runs in its own process group, with a parent-death signal, and the
//! agent kills the group when the job ends ([`crate`]). That is not
//! enough when the agent itself is killed with SIGKILL: a process of the job
//! that left the group (`setsid`, a daemon that double-forks) is re-parented
//! to init and lives on. The warden closes that gap, in two layers:
//!
//! - **A child subreaper** (Linux `PR_SET_CHILD_SUBREAPER`): every orphan
//!   below the warden is re-parented to the warden instead of init. When the
//!   agent exits (however it exits), the warden kills its remaining children
//!   with SIGKILL, then whatever they leave behind (re-parented to it in
//!   turn), until it has no child left, and reaps them all. Works for any
//!   user, everywhere on Linux.
//! - **A cgroup v2** where this process may create one (root, or a delegated
//!   subtree): the agent is started inside a fresh cgroup
//!   `crew-agent-<warden pid>` beside the warden's own, and at the end the
//!   warden writes `cgroup.kill`, which kills every process of the cgroup at
//!   once (no race with a job forking while it is swept), then removes it.
//!   A cgroup left by a warden that was itself SIGKILLed is killed and
//!   removed by the next warden that starts.
//!
//! The warden forwards SIGTERM, SIGINT and SIGHUP to the agent, exits with
//! the agent's status (re-raising the signal that killed it), and follows
//! the agent's rule about its starter: when the agent must die with the
//! process that started it (a one-shot controller, see
//! [`outlives_starter`]), the warden arms the parent-death
//! signal and passes it on; an agent that may come back to a restarted
//! controller outlives it, and so does its warden. The agent dies with its
//! warden (SIGTERM, so it ends its job in order).
//!
//! Call [`supervise`] first thing in the agent's `main`, before any thread
//! starts: it returns in the re-executed child (and where
//! there is no warden: off Linux, or `CREW_WARDEN=off`), and never returns
//! in the warden.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable that tells the re-executed child it is the
/// agent (`agent`), or turns the warden off (`off`), or keeps it from using
/// a cgroup (`no-cgroup`).
pub const ENV_WARDEN: &str = "CREW_WARDEN";

/// Whether an agent started with this environment outlives the process
/// that started it: one that may come back to a restarted controller (a
/// resume file, no TLS). Otherwise it dies with its starter
/// (`CREW_PARENT_PID`), and so does its warden.
#[must_use]
pub fn outlives_starter() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    set(crew_core::worker::ENV_RESUME_FILE) && !set(crew_core::worker::ENV_TLS_SHA256)
}

/// How the warden keeps a job's processes from outliving the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Containment {
    /// A cgroup v2 of its own (the folder), killed as a whole.
    Cgroup(PathBuf),
    /// The subreaper sweep only.
    Subreaper,
}

/// Becomes the warden of an agent re-executed from this program, or
/// returns when this process is that agent (or when there is no warden
/// here): the caller goes on as the agent. In the warden it does not
/// return: it exits with the agent's status.
///
/// # Errors
/// When the agent cannot be started at all.
pub fn supervise() -> io::Result<()> {
    if let Ok("agent" | "off") = std::env::var(ENV_WARDEN).as_deref() {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        linux::warden()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(())
    }
}

/// Which containment this warden would use: a cgroup when one can be
/// created here (and `CREW_WARDEN` is not `no-cgroup`), else the subreaper.
/// Creates the cgroup folder (empty) when it can.
fn containment(me: u32) -> Containment {
    if std::env::var(ENV_WARDEN).as_deref() == Ok("no-cgroup") {
        return Containment::Subreaper;
    }
    let Some(parent) = own_cgroup() else { return Containment::Subreaper };
    sweep_stale(&parent);
    let dir = parent.join(format!("crew-agent-{me}"));
    match std::fs::create_dir(&dir) {
        Ok(()) if dir.join("cgroup.kill").exists() => Containment::Cgroup(dir),
        Ok(()) => {
            // A kernel without cgroup.kill (before 5.14): the sweep must do.
            let _ = std::fs::remove_dir(&dir);
            Containment::Subreaper
        }
        Err(_) => Containment::Subreaper,
    }
}

/// The folder of this process's cgroup v2, from /proc/self/cgroup (`0::PATH`)
/// and the cgroup2 mount in /proc/self/mountinfo.
fn own_cgroup() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mount-point options... - fstype ...
    let mount = mountinfo.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })?;
    let dir = mount.join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// Kills and removes the cgroups of wardens that are gone (SIGKILLed before
/// they could clean up).
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("crew-agent-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_cgroup(&entry.path());
    }
}

/// Kills every process of a cgroup, waits (a little) until it is empty and
/// removes it. True when it is gone.
fn kill_cgroup(dir: &Path) -> bool {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if std::fs::remove_dir(dir).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills (SIGKILL, with their process groups) and reaps every child of
/// this process, then what they leave behind when this process is a child
/// subreaper, until none is left or `limit` has passed. Returns how many
/// children were killed. Call only when this process expects no live
/// child: it also reaps children other code may wait for.
pub fn kill_children(limit: Duration) -> usize {
    let me = std::process::id();
    let deadline = Instant::now() + limit;
    let mut killed = 0;
    loop {
        let children = children_of(me);
        if children.is_empty() || Instant::now() >= deadline {
            return killed;
        }
        killed += children.len();
        for &pid in &children {
            let Ok(p) = libc::pid_t::try_from(pid) else { continue };
            // SAFETY: signals to our own children, whose pids cannot be
            // reused before we reap them.
            unsafe {
                libc::kill(-p, libc::SIGKILL);
                libc::kill(p, libc::SIGKILL);
            }
        }
        for &pid in &children {
            let Ok(p) = libc::pid_t::try_from(pid) else { continue };
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            unsafe { libc::waitpid(p, &mut status, 0) };
        }
    }
}

/// The pids whose parent is `parent`, from /proc (empty where /proc is
/// missing).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain anything:
        // parse after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let _state = fields.next();
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// A path as a C string (for the child, prepared before the fork).
fn c_path(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("a path holds a NUL byte"))
}

#[cfg(target_os = "linux")]
mod linux {
    use std::os::unix::process::CommandExt;

    use super::*;

    /// The signals the warden waits for (blocked, taken with sigtimedwait).
    const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

    pub(super) fn warden() -> io::Result<()> {
        let me = std::process::id();
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
            // Without it the warden cannot follow escaped processes; the
            // agent still runs (as before there was a warden).
            return Ok(());
        }
        let starter = if outlives_starter() { None } else { starter_pid() };
        if let Some(parent) = starter {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) };
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                return Err(io::Error::other("the process that started this agent is gone"));
            }
        }
        let set = signal_set();
        // SAFETY: a valid, initialized set; the old mask is not needed.
        unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        let containment = containment(me);
        let procs = match &containment {
            Containment::Cgroup(dir) => Some(c_path(&dir.join("cgroup.procs"))?),
            Containment::Subreaper => None,
        };
        let program = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(&program);
        cmd.args(std::env::args_os().skip(1)).env(ENV_WARDEN, "agent");
        if starter.is_some() {
            // The agent's starter is now the warden.
            cmd.env(crew_core::worker::ENV_PARENT_PID, me.to_string());
        }
        let warden_pid = libc::pid_t::try_from(me).unwrap_or(0);
        // SAFETY: the hook runs in the forked child before exec and only
        // makes async-signal-safe system calls on data prepared before the
        // fork (a C string, a signal set); it never allocates.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != warden_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let Containment::Cgroup(dir) = &containment {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(io::Error::other(format!("could not start the agent {}: {e}", program.display())));
            }
        };
        let agent = child.id();
        let status = wait_for(agent, &set);
        sweep(&containment);
        exit_like(status)
    }

    /// The starter's pid when the agent's rule says to die with it.
    fn starter_pid() -> Option<libc::pid_t> {
        std::env::var(crew_core::worker::ENV_PARENT_PID).ok()?.parse().ok()
    }

    fn signal_set() -> libc::sigset_t {
        // SAFETY: sigemptyset/sigaddset initialize and fill a local set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in FORWARDED {
                libc::sigaddset(&mut set, sig);
            }
            libc::sigaddset(&mut set, libc::SIGCHLD);
            set
        }
    }

    /// Forwards signals to the agent and reaps children until the agent
    /// exits; returns its wait status.
    fn wait_for(agent: u32, set: &libc::sigset_t) -> libc::c_int {
        let agent = libc::pid_t::try_from(agent).unwrap_or(0);
        let tick = libc::timespec { tv_sec: 1, tv_nsec: 0 };
        loop {
            // Reap whatever has ended (the agent, or orphans re-parented
            // here while the agent runs).
            loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid status pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid == agent {
                    return status;
                }
                if pid <= 0 {
                    break;
                }
            }
            // SAFETY: a valid set and timeout; the info is not needed.
            let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &tick) };
            if FORWARDED.contains(&sig) {
                // SAFETY: a plain signal to our own (unreaped) child.
                unsafe { libc::kill(agent, sig) };
            }
        }
    }

    /// Kills everything left below the warden: the cgroup at once, then
    /// what the subreaper collected.
    fn sweep(containment: &Containment) {
        if let Containment::Cgroup(dir) = containment {
            kill_cgroup(dir);
        }
        kill_children(Duration::from_secs(10));
    }

    /// Exits as the agent did: its code, or the signal that killed it.
    fn exit_like(status: libc::c_int) -> ! {
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            // SAFETY: default disposition, unblocked, then the same signal
            // to ourselves; raise returns only for signals that do not end
            // the process.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(sig);
            }
            std::process::exit(128 + sig);
        }
        std::process::exit(libc::WEXITSTATUS(status))
    }
}
