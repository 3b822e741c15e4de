//! Managing worker slots: `crew recruit`, `launch`, `shutdown`, `dismiss`
//! and `restart`.

use clap::Args;

use super::{Ctx, api, check_duration, opt_tags, parse_tags, print_json};
use crate::{EXIT_OK, Failure};

#[derive(Args, Debug)]
pub(crate) struct RecruitArgs {
    /// Number of slots to add.
    #[arg(long, short = 'w', value_name = "N")]
    workers: u32,
    /// Worker class (`local`: processes on this machine; `aws-batch`: AWS
    /// Batch jobs; `slurm`: Slurm jobs; see the README for their options).
    #[arg(long, value_name = "CLASS")]
    class: String,
    /// Tags of the slots, comma separated; jobs may ask for any subset.
    #[arg(long, value_name = "T,..")]
    tags: Option<String>,
    /// Stop a worker idle this long (e.g. 5m).
    #[arg(long, value_name = "D")]
    idle: Option<String>,
    /// Stop a worker up this long, once its job ends (e.g. 2h).
    #[arg(long, value_name = "D")]
    wall: Option<String>,
    /// Stop a worker after this many jobs.
    #[arg(long, value_name = "N")]
    tasks_max: Option<u32>,
    /// Give up on a launch that does not connect back within this time.
    #[arg(long, value_name = "D")]
    launch_timeout: Option<String>,
    /// A class option, `key=value` (repeatable).
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// Print `{"slots": [...]}` instead of one slot name per line.
    #[arg(long)]
    json: bool,
}

use crate::wire::{self, Recruited};

pub(crate) fn recruit(ctx: &Ctx, args: RecruitArgs) -> Result<u8, Failure> {
    if args.workers == 0 {
        return Err(Failure::usage(anyhow::anyhow!("--workers must be at least 1")));
    }
    if args.tasks_max == Some(0) {
        return Err(Failure::usage(anyhow::anyhow!("--tasks-max must be at least 1 (leave it out for no limit)")));
    }
    let options = super::parse_opts(&args.opts)?;
    let body = wire::RecruitRequest {
        class: args.class,
        workers: args.workers,
        tags: opt_tags("--tags", args.tags.as_deref())?,
        idle: wire::duration_value(check_duration("--idle", args.idle)?),
        wall: wire::duration_value(check_duration("--wall", args.wall)?),
        tasks_max: args.tasks_max,
        launch_timeout: wire::duration_value(check_duration("--launch-timeout", args.launch_timeout)?),
        options: Some(options),
        ..Default::default()
    };
    let answer: Recruited = ctx.client()?.post("/v1/recruit", &body).map_err(api)?;
    for w in &answer.warnings {
        eprintln!("crew: warning: {w}");
    }
    if args.json {
        print_json(&answer)?;
    } else {
        for s in &answer.slots {
            println!("{s}");
        }
    }
    Ok(EXIT_OK)
}

#[derive(Args, Debug)]
pub(crate) struct LaunchArgs {
    /// Only slots having all these tags (comma separated).
    #[arg(long, value_name = "T,..")]
    tags: Option<String>,
    /// At most this many slots (default: every matching down slot).
    #[arg(long, short = 'w', value_name = "N")]
    workers: Option<u32>,
    /// Print `{"launched": N}`.
    #[arg(long)]
    json: bool,
}

pub(crate) fn launch(ctx: &Ctx, args: LaunchArgs) -> Result<u8, Failure> {
    let body = wire::LaunchRequest {
        tags: opt_tags("--tags", args.tags.as_deref())?,
        workers: args.workers.map(|n| n as usize),
    };
    count_command(ctx, "/v1/launch", &body, "launched", args.json)
}

#[derive(Args, Debug)]
pub(crate) struct ShutdownArgs {
    /// Stop busy workers too (their jobs are re-run elsewhere).
    #[arg(long)]
    all: bool,
    /// Only workers of slots having all these tags.
    #[arg(long, value_name = "T,..")]
    tags: Option<String>,
    /// Only the worker of this slot.
    #[arg(long, value_name = "SLOT")]
    slot: Option<String>,
    /// Print `{"stopped": N}`.
    #[arg(long)]
    json: bool,
}

pub(crate) fn shutdown(ctx: &Ctx, args: ShutdownArgs) -> Result<u8, Failure> {
    let body =
        wire::ShutdownRequest { all: args.all, tags: opt_tags("--tags", args.tags.as_deref())?, slot: args.slot };
    count_command(ctx, "/v1/shutdown", &body, "stopped", args.json)
}

#[derive(Args, Debug)]
pub(crate) struct DismissArgs {
    /// Remove the slots having all these tags.
    #[arg(long, value_name = "T,..", required_unless_present = "slot")]
    tags: Option<String>,
    /// Remove this slot.
    #[arg(long, value_name = "SLOT")]
    slot: Option<String>,
    /// Print `{"dismissed": N}`.
    #[arg(long)]
    json: bool,
}

pub(crate) fn dismiss(ctx: &Ctx, args: DismissArgs) -> Result<u8, Failure> {
    let tags = args.tags.as_deref().map(|t| parse_tags("--tags", t)).transpose()?;
    let body = wire::DismissRequest { tags, slot: args.slot };
    count_command(ctx, "/v1/dismiss", &body, "dismissed", args.json)
}

#[derive(Args, Debug)]
pub(crate) struct RestartArgs {
    /// Print `{"restarted": N}`.
    #[arg(long)]
    json: bool,
}

pub(crate) fn restart(ctx: &Ctx, args: RestartArgs) -> Result<u8, Failure> {
    count_command(ctx, "/v1/restart", &wire::Empty {}, "restarted", args.json)
}

/// POSTs `body`, whose answer is `{key: N}`; prints `key N` or the JSON.
fn count_command<B: serde::Serialize>(ctx: &Ctx, path: &str, body: &B, key: &str, json: bool) -> Result<u8, Failure> {
    let answer: serde_json::Value = ctx.client()?.post(path, body).map_err(api)?;
    if json {
        print_json(&answer)?;
    } else {
        let n = answer.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
        println!("{key} {n}");
    }
    Ok(EXIT_OK)
}
