//! Running Slurm's commands (`sbatch`, `squeue`, `sacct`, `scancel`):
//! bounded in time, with the class's extra environment, and their failures
//! as errors that quote Slurm and say what to check.

use std::process::Stdio;
use std::time::Duration;

use crew_core::worker::WorkerError;

use crate::CLASS;

/// How long one Slurm command may take: a busy controller answers within
/// seconds (Slurm's own `MessageTimeout` is 10 s); past this the call
/// counts as failed (and is retried).
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished command said.
pub(crate) struct Said {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `program args` with `env` added to this process's environment.
pub(crate) async fn run(program: &str, args: &[String], env: &[(String, String)]) -> Result<Said, WorkerError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (is Slurm's client installed and on PATH here? on a cluster, run crew on a login node, or `module \
             load slurm` first)"
        } else {
            ""
        };
        WorkerError::Platform {
            class: CLASS.to_owned(),
            message: format!("cannot run {program}: {e}{hint}"),
            retryable: false,
        }
    })?;
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(WorkerError::Platform {
                class: CLASS.to_owned(),
                message: format!("{program} failed: {e}"),
                retryable: true,
            });
        }
        Err(_) => {
            return Err(WorkerError::Platform {
                class: CLASS.to_owned(),
                message: format!(
                    "{program} did not answer within {}s (is slurmctld up? `scontrol ping` tells)",
                    COMMAND_TIMEOUT.as_secs()
                ),
                retryable: true,
            });
        }
    };
    Ok(Said {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Slurm's error lines in one line, at most 1,000 characters.
pub(crate) fn slurm_message(stderr: &str) -> String {
    let mut text: String = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    if text.is_empty() {
        text = "no message".to_owned();
    }
    if text.len() > 1000 {
        let mut cut = 1000;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Whether a Slurm failure may go away by itself (the controller busy or
/// unreachable) rather than needing a fix (a bad partition, account, limit).
pub(crate) fn transient(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "socket timed out",
        "unable to contact slurm controller",
        "connection refused",
        "temporarily unavailable",
        "slurmctld not responding",
        "try again",
        "communication connection failure",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// What to check for a refused submission, by Slurm's message.
pub(crate) fn sbatch_hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("partition") {
        "check the partition option; `sinfo -s` lists the partitions"
    } else if m.contains("account") || m.contains("association") {
        "check the account option; `sacctmgr show assoc user=$USER` lists yours"
    } else if m.contains("qos") {
        "check the qos option; `sacctmgr show qos` lists them"
    } else if m.contains("time limit") {
        "lower the time option below the partition's limit (`sinfo -s`)"
    } else if m.contains("memory") || m.contains("node configuration") || m.contains("gres") {
        "ask for resources a node of the partition has (memory, cpus, gres; `sinfo -N -l`)"
    } else if m.contains("limit") {
        "the submission is over a limit of the cluster: recruit fewer workers or ask the administrators"
    } else {
        "check the class options (partition, account, qos, time, memory, cpus, gres, extra)"
    }
}
