//! `crew cancel` and `crew logs`: acting on jobs by id.

use clap::Args;

use super::{Ctx, api, print_json};
use crate::{EXIT_JOB_FAILED, EXIT_OK, Failure};

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 every job was cancelled; 1 some id is unknown or already finished; \
2 bad input; 3 crew failed.")]
pub(crate) struct CancelArgs {
    /// Job ids (as printed by `crew send`).
    #[arg(value_name = "JOB", required = true)]
    ids: Vec<u64>,
    /// Print `{"cancelled": [...], "unknown": [...]}`.
    #[arg(long)]
    json: bool,
}

use crate::wire::Cancelled;

pub(crate) fn cancel(ctx: &Ctx, args: CancelArgs) -> Result<u8, Failure> {
    let answer: Cancelled =
        ctx.client()?.post("/v1/cancel", &crate::wire::CancelRequest { ids: args.ids }).map_err(api)?;
    if args.json {
        print_json(&answer)?;
    } else {
        for id in &answer.cancelled {
            println!("cancelled {id}");
        }
        for id in &answer.unknown {
            eprintln!("crew: job {id} is unknown or already finished");
        }
    }
    Ok(if answer.unknown.is_empty() { EXIT_OK } else { EXIT_JOB_FAILED })
}

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    /// The job id.
    #[arg(value_name = "JOB")]
    id: u64,
    /// Print `{"id", "stdout", "stderr"}` instead of the two streams.
    #[arg(long)]
    json: bool,
}

use crate::wire::Logs;

pub(crate) fn logs(ctx: &Ctx, args: LogsArgs) -> Result<u8, Failure> {
    let mut client = ctx.client()?;
    if args.json {
        let logs: Logs = client.get(&format!("/v1/jobs/{}/logs", args.id)).map_err(api)?;
        print_json(&logs)?;
        return Ok(EXIT_OK);
    }
    // Streamed, printed as it arrives: flat memory on both sides.
    client.get_stream(&format!("/v1/jobs/{}/logs/stdout", args.id), &mut std::io::stdout().lock()).map_err(api)?;
    client.get_stream(&format!("/v1/jobs/{}/logs/stderr", args.id), &mut std::io::stderr().lock()).map_err(api)?;
    Ok(EXIT_OK)
}
