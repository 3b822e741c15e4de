//! `crew worker`: the agent, as started by a controller.

use std::io::BufRead;

use clap::Args;
use crew_agent::AgentConfig;
use crew_core::worker::{ENV_TOKEN_REF, Secret, TOKEN_REF_FILE};
use crew_exec::builtins::Builtins;

use crate::{EXIT_USAGE, Failure};

#[derive(Args, Debug)]
#[command(after_help = "The agent reads its connection from the environment its controller sets: \
CREW_CONNECT (the address), CREW_LAUNCH and CREW_TOKEN (the launch and its one-time secret; \
or CREW_TOKEN_REF=ssm:PREFIX, an SSM SecureString PREFIX<index> read once and deleted, \
or CREW_TOKEN_REF=file:/PATH/PREFIX, a file PREFIX<index> of mode 0600 read once and deleted), \
CREW_INDEX (or CREW_INDEX_BASE plus AWS_BATCH_JOB_ARRAY_INDEX), and CREW_TLS_SHA256: when set, \
the connection uses TLS and accepts only the certificate with that SHA-256. \
The agent runs under a warden process that kills every process its jobs started when the agent \
ends, even by SIGKILL (in a cgroup v2 of its own where one can be created, else as a child \
subreaper); CREW_WARDEN=no-cgroup keeps it to the subreaper, CREW_WARDEN=off runs without it.")]
pub(crate) struct WorkerArgs {
    /// The controller's address (default: $CREW_CONNECT).
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Read the token from the first line of stdin instead of $CREW_TOKEN.
    #[arg(long)]
    token_stdin: bool,
}

pub(crate) fn main(args: WorkerArgs) -> Result<u8, Failure> {
    // First, before any thread: the agent runs as the child of a warden
    // that kills whatever its jobs leave behind when it dies (in the
    // warden, this call does not return).
    crew_exec::warden::supervise().map_err(|e| Failure { code: start_failed(), error: e.into() })?;
    let token = if args.token_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Failure::usage(anyhow::anyhow!("could not read the token from stdin: {e}")))?;
        Some(Secret::new(line.trim()))
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)?;
    // A secret by reference (the aws-batch class): this member's own,
    // taken once; the reference is useless after.
    // `file:` references (the slurm class) are taken by `AgentConfig::from_env`.
    let reference = std::env::var(ENV_TOKEN_REF).ok().filter(|v| !v.is_empty() && !v.starts_with(TOKEN_REF_FILE));
    let token = match (token, reference) {
        (Some(t), _) => Some(t),
        (None, Some(reference)) => {
            let index = crew_agent::index_from_env().map_err(Failure::usage)?;
            let taken = rt.block_on(crew_worker_aws::take_member_secret(&reference, index));
            Some(taken.map_err(|e| Failure { code: start_failed(), error: e.into() })?)
        }
        (None, None) => None,
    };
    let cfg = AgentConfig::from_env(args.connect, token, Builtins::standard()).map_err(Failure::usage)?;
    match rt.block_on(crew_agent::run(cfg)) {
        Ok(exit) => Ok(u8::try_from(exit.code()).unwrap_or(EXIT_USAGE)),
        Err(e) => Err(Failure { code: start_failed(), error: e.into() }),
    }
}

/// The exit code of an agent that could not start.
fn start_failed() -> u8 {
    u8::try_from(crew_agent::EXIT_START_FAILED).unwrap_or(EXIT_USAGE)
}
