//! Starting a job's process quickly on Linux, with a parent-death signal.
//!
//! `std::process::Command` starts a child with `posix_spawn` (a `vfork`:
//! the child borrows the parent's memory until it executes) unless a
//! pre-exec hook is set, and then with a full `fork`, which costs about
//! 0.7 ms per job here. A job's leader needs one thing done between the two
//! that `posix_spawn` cannot do: arm `PR_SET_PDEATHSIG`, so that a job never
//! outlives an agent killed with SIGKILL (its work is being re-run
//! elsewhere). This module does what `posix_spawn` does — `clone` with
//! `CLONE_VM | CLONE_VFORK` on a private stack, all signals blocked around
//! it, caught signals reset to their defaults in the child — plus that one
//! `prctl`.
//!
//! The job's resource limits ([`Limits`]: `RLIMIT_CPU`, `RLIMIT_DATA`) are
//! set in the child too, with `setrlimit`, a plain system call, so that the
//! job's first instruction already runs under them.
//!
//! The child runs in the parent's memory: it only reads what was prepared
//! before (C strings, file descriptors) and makes system calls; it never
//! allocates, locks or unwinds. A failure before `execve` is reported
//! through a shared integer, and the child exits with status 127.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// What the child needs, prepared in the parent.
struct Prepared {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
}

/// Resource limits of a job's leader, inherited by the processes it
/// starts (each one gets its own allowance: an rlimit is per process).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `RLIMIT_CPU` soft limit in seconds: SIGXCPU when reached, then
    /// SIGKILL [`CPU_KILL_AFTER`] seconds of CPU later (the hard limit).
    pub(crate) cpu_seconds: Option<u64>,
    /// `RLIMIT_DATA` in bytes (soft and hard): heap and private writable
    /// mappings; an allocation beyond it fails.
    pub(crate) data_bytes: Option<u64>,
}

/// Seconds of CPU time between SIGXCPU (the soft limit) and SIGKILL (the
/// hard one), for a process that catches or ignores SIGXCPU.
pub(crate) const CPU_KILL_AFTER: u64 = 2;

impl Limits {
    /// The `rlimit`s to set: CPU, then data; `None` for no limit.
    fn rlimits(&self) -> (Option<libc::rlimit>, Option<libc::rlimit>) {
        let cpu = self.cpu_seconds.map(|s| libc::rlimit {
            rlim_cur: s as libc::rlim_t,
            rlim_max: s.saturating_add(CPU_KILL_AFTER) as libc::rlim_t,
        });
        let data = self.data_bytes.map(|b| libc::rlimit { rlim_cur: b as libc::rlim_t, rlim_max: b as libc::rlim_t });
        (cpu, data)
    }
}

struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    parent: libc::pid_t,
    mask: libc::sigset_t,
    cpu: Option<libc::rlimit>,
    data: Option<libc::rlimit>,
    error: libc::c_int,
}

fn cstring(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command"))
}

/// The program's path: as given when it has a `/`, else the first
/// executable file of that name in `PATH` (of the job's environment).
fn resolve(program: &std::ffi::OsStr, env: &BTreeMap<OsString, OsString>) -> io::Result<CString> {
    if program.as_bytes().contains(&b'/') {
        return cstring(program.as_bytes().to_vec());
    }
    let path =
        env.get(std::ffi::OsStr::new("PATH")).map_or(b"/usr/local/bin:/usr/bin:/bin".as_slice(), |p| p.as_bytes());
    for dir in path.split(|b| *b == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let mut candidate = dir.to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(program.as_bytes());
        let c = cstring(candidate)?;
        // SAFETY: access reads a valid NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
            && !Path::new(std::ffi::OsStr::from_bytes(c.as_bytes())).is_dir()
        {
            return Ok(c);
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

fn prepare(cmd: &std::process::Command) -> io::Result<Prepared> {
    // Exactly the variables set on `cmd`: nothing of this process's own
    // environment (jobs get a clean one, see `exec::job_env`).
    let env: BTreeMap<OsString, OsString> =
        cmd.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))).collect();
    let path = resolve(cmd.get_program(), &env)?;
    let mut argv = vec![cstring(cmd.get_program().as_bytes().to_vec())?];
    for a in cmd.get_args() {
        argv.push(cstring(a.as_bytes().to_vec())?);
    }
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in env {
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend_from_slice(&v.into_vec());
        envp.push(cstring(kv)?);
    }
    let cwd = cmd.get_current_dir().map(|d| cstring(d.as_os_str().as_bytes().to_vec())).transpose()?;
    Ok(Prepared { path, argv, envp, cwd })
}

extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's ChildArgs, which outlives the
    // child's use of it (the parent is suspended until exec or exit). Only
    // async-signal-safe system calls follow; nothing allocates.
    unsafe {
        let a = &mut *arg.cast::<ChildArgs>();
        let fail = |a: &mut ChildArgs| -> ! {
            a.error = *libc::__errno_location();
            if a.error == 0 {
                a.error = libc::EINVAL;
            }
            libc::_exit(127)
        };
        // Handlers belong to the parent's runtime: reset caught signals
        // (and SIGPIPE, which Rust ignores) to their defaults.
        for sig in 1..libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && (old.sa_sigaction != libc::SIG_DFL || sig == libc::SIGPIPE)
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
            fail(a);
        }
        // The agent may have died before the signal was armed.
        if libc::getppid() != a.parent {
            *libc::__errno_location() = libc::ESRCH;
            fail(a);
        }
        if libc::setpgid(0, 0) == -1 {
            fail(a);
        }
        for (target, fd) in a.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            if *fd == target {
                // dup2 onto itself keeps close-on-exec: clear it.
                if libc::fcntl(target, libc::F_SETFD, 0) == -1 {
                    fail(a);
                }
            } else if libc::dup2(*fd, target) == -1 {
                fail(a);
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) == -1 {
            fail(a);
        }
        if let Some(cpu) = &a.cpu {
            if libc::setrlimit(libc::RLIMIT_CPU, cpu) == -1 {
                fail(a);
            }
        }
        if let Some(data) = &a.data {
            if libc::setrlimit(libc::RLIMIT_DATA, data) == -1 {
                fail(a);
            }
        }
        if libc::pthread_sigmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut()) != 0 {
            fail(a);
        }
        libc::execve(a.path, a.argv, a.envp);
        fail(a)
    }
}

/// Starts `cmd` (program, arguments, environment and folder are read from
/// it; the environment is exactly the variables set on `cmd`, as after
/// `env_clear`: nothing is inherited from this process) in a new process
/// group, with `stdio` as its stdin, stdout
/// and stderr, a SIGKILL parent-death signal and `limits`. Returns its pid.
/// Errors are those of starting it (`NotFound` for a program that is not
/// there).
pub(crate) fn spawn(cmd: &std::process::Command, stdio: [RawFd; 3], limits: Limits) -> io::Result<libc::pid_t> {
    let p = prepare(cmd)?;
    let (cpu, data) = limits.rlimits();
    let argv: Vec<*const libc::c_char> =
        p.argv.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        p.envp.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    // The child only makes system calls: a small stack does. Below glibc's
    // 128 KiB mmap threshold, it comes from the heap rather than an
    // mmap/munmap pair per job.
    const STACK: usize = 64 * 1024;
    let mut stack = vec![0u8; STACK];
    // SAFETY: the arithmetic stays within `stack`; the top is aligned down
    // to 16 bytes as the ABI wants.
    let top = unsafe { stack.as_mut_ptr().add(STACK) };
    let top = ((top as usize) & !0xf) as *mut libc::c_void;
    // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask write
    // only to the sets given.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let mut args = ChildArgs {
        path: p.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: p.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdio,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        mask: old,
        cpu,
        data,
        error: 0,
    };
    // SAFETY: `child` only reads `args` and the prepared strings, which all
    // live until clone returns; CLONE_VFORK suspends this thread until the
    // child has executed or exited, so nothing here changes meanwhile.
    let pid = unsafe {
        libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast::<libc::c_void>(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(stack);
    if pid == -1 {
        return Err(clone_error);
    }
    // SAFETY: a volatile read of a field the child may have written.
    let error = unsafe { std::ptr::read_volatile(&args.error) };
    if error != 0 {
        let mut status = 0;
        // SAFETY: reaps the child that failed before exec.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
        }
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn wait(pid: libc::pid_t) -> libc::c_int {
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn starts_in_its_own_group_with_env_folder_and_stdio() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ $(cut -d' ' -f5 /proc/$$/stat) $CREW_SPAWN_TEST; pwd; trap")
            .env("CREW_SPAWN_TEST", "hello")
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(dir.path());
        let pid = spawn(&cmd, [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()], Limits::default()).unwrap();
        assert_eq!(wait(pid), 0);
        let text = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let mut lines = text.lines();
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(first[0], first[1], "the leader of its own process group");
        assert_eq!(first[0], pid.to_string());
        assert_eq!(first[2], "hello");
        assert_eq!(lines.next().unwrap(), dir.path().canonicalize().unwrap().to_str().unwrap());
        assert_eq!(lines.next(), None, "no trap inherited");
    }

    #[test]
    fn the_environment_is_only_what_the_command_sets() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut cmd = std::process::Command::new("/usr/bin/env");
        cmd.env_clear().env("ONLY", "this");
        let pid = spawn(&cmd, [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()], Limits::default()).unwrap();
        assert_eq!(wait(pid), 0);
        assert_eq!(std::fs::read_to_string(dir.path().join("out")).unwrap(), "ONLY=this\n");
    }

    #[test]
    fn limits_are_set_before_the_program_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "ulimit -St; ulimit -Ht; ulimit -Sd; ulimit -Hd"]);
        let limits = Limits { cpu_seconds: Some(7), data_bytes: Some(256 << 20) };
        let pid = spawn(&cmd, [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()], limits).unwrap();
        assert_eq!(wait(pid), 0);
        let text = std::fs::read_to_string(dir.path().join("out")).unwrap();
        assert_eq!(text, format!("7\n{}\n262144\n262144\n", 7 + CPU_KILL_AFTER));
    }

    #[test]
    fn a_missing_program_is_not_found_and_exit_codes_pass_through() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fds = [null.as_raw_fd(); 3];
        let e = spawn(&std::process::Command::new("crew-no-such-program-xyz"), fds, Limits::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = spawn(&std::process::Command::new("/nonexistent/prog"), fds, Limits::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let status = wait(spawn(&cmd, fds, Limits::default()).unwrap());
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3);
        // SIGPIPE is back to its default: a writer to a closed pipe dies.
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "yes | head -c 1 >/dev/null; kill -0 $$"]);
        assert_eq!(wait(spawn(&cmd, fds, Limits::default()).unwrap()), 0);
    }
}
