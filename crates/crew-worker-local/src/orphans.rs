//! Making sure no process of a run outlives it.
//!
//! Agents kill their jobs' process groups, and die with their controller.
//! One gap remains: when an agent itself is killed with SIGKILL, a job's
//! grandchildren (a job that started background processes) are orphaned.
//! A one-shot controller (`crew run`) closes it by becoming a *child
//! subreaper* (Linux): orphans of its descendants are re-parented to it
//! instead of init, so that at exit it can find and kill them.

/// Makes this process a child subreaper (Linux only; elsewhere a no-op).
/// Call once at start from a process that will call [`kill_orphans`] before
/// it exits.
pub fn become_subreaper() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills (SIGKILL) and reaps every remaining child of this process and
/// their process groups. Returns how many children there were. Call only
/// when this process expects no live children (after its controller
/// closed), since it also reaps children other code may wait for.
pub fn kill_orphans() -> usize {
    let me = std::process::id();
    let children = children_of(me);
    for &pid in &children {
        let Ok(p) = libc::pid_t::try_from(pid) else { continue };
        // SAFETY: plain signal sends; the targets are our own children,
        // whose pids cannot be reused before we reap them.
        unsafe {
            libc::kill(-p, libc::SIGKILL);
            libc::kill(p, libc::SIGKILL);
        }
    }
    for &pid in &children {
        let Ok(p) = libc::pid_t::try_from(pid) else { continue };
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        unsafe {
            libc::waitpid(p, &mut status, 0);
        }
    }
    children.len()
}

/// The pids whose parent is `parent`, from /proc (empty where /proc is
/// missing).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain spaces: parse
        // after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let mut fields = rest.split_whitespace();
        let _state = fields.next();
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}
