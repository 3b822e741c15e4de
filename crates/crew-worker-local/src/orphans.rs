//! Making sure no process of a run outlives it.
//!
//! Agents kill their jobs' process groups, and each agent has a warden
//! ([`crew_exec::warden`]) that kills what the agent's jobs leave behind
//! when the agent dies, even by SIGKILL. What is left is a warden killed
//! with SIGKILL itself: a one-shot controller (`crew run`, `crew make`, the
//! daemon) closes that by becoming a *child subreaper* (Linux): orphans of
//! its descendants are re-parented to it instead of init, so that at exit
//! it can find and kill them.

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
/// their process groups, and what they leave behind (re-parented here by
/// the subreaper). Returns how many children there were. Call only when
/// this process expects no live children (after its controller closed),
/// since it also reaps children other code may wait for.
pub fn kill_orphans() -> usize {
    crew_exec::warden::kill_children(std::time::Duration::from_secs(10))
}
