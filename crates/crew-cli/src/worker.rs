//! `crew worker`: the agent, as started by a controller.

use std::io::BufRead;

use clap::Args;
use crew_core::agent::{self, AgentConfig};
use crew_core::builtins::Builtins;
use crew_core::worker::Secret;

use crate::{EXIT_USAGE, Failure};

#[derive(Args, Debug)]
#[command(after_help = "The agent reads its connection from the environment its controller sets: \
CREW_CONNECT (the address), CREW_LAUNCH and CREW_TOKEN (the launch and its one-time secret), \
CREW_INDEX (or CREW_INDEX_BASE plus AWS_BATCH_JOB_ARRAY_INDEX), and CREW_TLS_SHA256: when set, \
the connection uses TLS and accepts only the certificate with that SHA-256.")]
pub(crate) struct WorkerArgs {
    /// The controller's address (default: $CREW_CONNECT).
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Read the token from the first line of stdin instead of $CREW_TOKEN.
    #[arg(long)]
    token_stdin: bool,
}

pub(crate) fn main(args: WorkerArgs) -> Result<u8, Failure> {
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
    let cfg = AgentConfig::from_env(args.connect, token, Builtins::standard()).map_err(Failure::usage)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)?;
    match rt.block_on(agent::run(cfg)) {
        Ok(exit) => Ok(u8::try_from(exit.code()).unwrap_or(EXIT_USAGE)),
        Err(e) => Err(Failure { code: u8::try_from(agent::EXIT_START_FAILED).unwrap_or(EXIT_USAGE), error: e.into() }),
    }
}
