//! Slurm's job states in crew's words: what a state means for a slot
//! ([`Liveness`]) and why a worker ended, as the reason a slot and the
//! record of a job that ran there carry; and the parsers of the `squeue`
//! and `sacct` lines the class asks for.

use crew_core::worker::Liveness;

/// What Slurm said about one array task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    /// `<job>_<task>`, as the class's handles.
    pub id: String,
    /// The job state (`RUNNING`, `CANCELLED`, ...), without sacct's
    /// ` by <uid>` suffix.
    pub state: String,
    /// Slurm's reason (`None` when there is none), or sacct's exit code.
    pub detail: Option<String>,
}

/// The `squeue -o` format the class asks for: task id, state, reason.
pub const SQUEUE_FORMAT: &str = "%i|%T|%r";

/// The `sacct -o` fields the class asks for.
pub const SACCT_FIELDS: &str = "JobID,State,ExitCode,Reason";

/// Parses `squeue -h -r -o '%i|%T|%r'` output; lines that are not array
/// tasks (`<job>_<task>`) are skipped.
pub fn parse_squeue(text: &str) -> Vec<TaskState> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.trim().splitn(3, '|');
            let id = f.next()?.trim();
            let state = f.next()?.trim();
            let reason = f.next().map(str::trim).filter(|r| !r.is_empty() && *r != "None" && *r != "(null)");
            is_task_id(id).then(|| TaskState {
                id: id.to_owned(),
                state: state.to_ascii_uppercase(),
                detail: reason.map(str::to_owned),
            })
        })
        .collect()
}

/// Parses `sacct -X -n -P -o JobID,State,ExitCode,Reason` output.
pub fn parse_sacct(text: &str) -> Vec<TaskState> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.trim().split('|').collect();
            let id = f.first()?.trim();
            // `CANCELLED by 1000`: the state is the first word.
            let state = f.get(1)?.split_whitespace().next()?;
            let exit = f.get(2).map(|s| s.trim()).filter(|s| !s.is_empty() && *s != "0:0");
            let reason = f.get(3).map(|s| s.trim()).filter(|s| !s.is_empty() && *s != "None");
            let detail = match (exit, reason) {
                (Some(e), Some(r)) => Some(format!("{r}, exit code {e}")),
                (Some(e), None) => Some(format!("exit code {e}")),
                (None, Some(r)) => Some(r.to_owned()),
                (None, None) => None,
            };
            is_task_id(id).then(|| TaskState { id: id.to_owned(), state: state.to_ascii_uppercase(), detail })
        })
        .collect()
}

/// `<digits>_<digits>`: an array task.
pub fn is_task_id(id: &str) -> bool {
    id.split_once('_').is_some_and(|(job, task)| {
        !job.is_empty()
            && !task.is_empty()
            && job.bytes().all(|b| b.is_ascii_digit())
            && task.bytes().all(|b| b.is_ascii_digit())
    })
}

/// What a state means for the agent in that job, with the reason in
/// Slurm's words for one that ended (`log` names the worker's log file).
pub fn liveness(task: &TaskState, log: Option<&str>) -> Liveness {
    let state = task.state.as_str();
    let ended = match state {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD" | "RESV_DEL_HOLD" | "SPECIAL_EXIT"
        | "STAGE_OUT" | "SIGNALING" => return Liveness::Starting,
        // Completing: the agent is ending; its final state follows within
        // Slurm's KillWait. Suspended or stopped: it lives, frozen (the
        // controller's heartbeat decides).
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED" | "RESIZING" => return Liveness::Running,
        "COMPLETED" => "the agent exited normally",
        "FAILED" => "the agent exited with an error or could not start",
        "CANCELLED" => "cancelled (by crew, scancel or an administrator)",
        "TIMEOUT" => "it reached its time limit (the time option, or the partition's)",
        "NODE_FAIL" => "its node failed",
        "OUT_OF_MEMORY" => "it ran out of memory (raise the memory option)",
        "PREEMPTED" => "it was preempted by a job of higher priority",
        "BOOT_FAIL" => "its node failed to boot",
        "DEADLINE" => "it reached its deadline",
        "REVOKED" => "it was revoked (a federated sibling started)",
        _ => "it ended",
    };
    let mut reason = format!("Slurm job {} {state}: {ended}", task.id);
    if let Some(d) = &task.detail {
        reason.push_str(&format!(" ({d})"));
    }
    if let Some(log) = log {
        reason.push_str(&format!("; its log: {log}"));
    }
    Liveness::Exited { reason }
}

#[cfg(test)]
mod tests {
    use crew_core::worker::Liveness;

    use super::{TaskState, is_task_id, liveness, parse_sacct, parse_squeue};

    fn task(state: &str) -> TaskState {
        TaskState { id: "12_3".into(), state: state.into(), detail: None }
    }

    #[test]
    fn every_slurm_state_has_a_slot_state_and_ended_ones_a_reason() {
        for s in ["PENDING", "CONFIGURING", "REQUEUED"] {
            assert_eq!(liveness(&task(s), None), Liveness::Starting, "{s}");
        }
        for s in ["RUNNING", "COMPLETING", "SUSPENDED"] {
            assert_eq!(liveness(&task(s), None), Liveness::Running, "{s}");
        }
        for (s, says) in [
            ("COMPLETED", "exited normally"),
            ("FAILED", "error"),
            ("CANCELLED", "cancelled"),
            ("TIMEOUT", "time limit"),
            ("NODE_FAIL", "node failed"),
            ("OUT_OF_MEMORY", "out of memory"),
            ("PREEMPTED", "preempted"),
            ("BOOT_FAIL", "boot"),
            ("DEADLINE", "deadline"),
            ("SOMETHING_NEW", "ended"),
        ] {
            let Liveness::Exited { reason } = liveness(&task(s), Some("/logs/crew-12_3.out")) else {
                panic!("{s} is an end")
            };
            assert!(reason.starts_with(&format!("Slurm job 12_3 {s}: ")), "{reason}");
            assert!(reason.contains(says) && reason.ends_with("its log: /logs/crew-12_3.out"), "{reason}");
        }
    }

    #[test]
    fn squeue_and_sacct_lines_parse() {
        let q = parse_squeue("12_0|RUNNING|None\n12_1|PENDING|Resources\n12_[2-3]|PENDING|Priority\n\ngarbage\n");
        assert_eq!(q.len(), 2);
        assert_eq!(q[1], TaskState { id: "12_1".into(), state: "PENDING".into(), detail: Some("Resources".into()) });
        let a = parse_sacct(
            "12_0|CANCELLED by 0|0:15|None\n12_1|OUT_OF_MEMORY|0:125|\n12_2|COMPLETED|0:0|\n13|FAILED|1:0|\n",
        );
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].state, "CANCELLED");
        assert_eq!(a[0].detail.as_deref(), Some("exit code 0:15"));
        assert_eq!(a[2].detail, None);
        assert!(is_task_id("1_0") && !is_task_id("1") && !is_task_id("_1") && !is_task_id("1_[0-3]"));
    }
}
