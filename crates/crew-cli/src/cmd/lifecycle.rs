//! `crew up` and `crew down`: the daemon's life.

use std::time::{Duration, Instant};

use clap::Args;

use super::{Ctx, api, print_json};
use crate::client::ClientError;
use crate::{EXIT_OK, Failure, project};

/// How long `crew down` waits for the daemon's process to end.
const DOWN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    /// Print the daemon's health object (`{"ok", "pid", "version", "dir"}`).
    #[arg(long)]
    json: bool,
}

pub(crate) fn up(ctx: &Ctx, args: UpArgs) -> Result<u8, Failure> {
    let (_, health) = project::ensure_daemon(ctx.dir())?;
    if args.json {
        print_json(&health)?;
    } else {
        println!("{}", health.pid);
    }
    Ok(EXIT_OK)
}

#[derive(Args, Debug)]
pub(crate) struct DownArgs {}

pub(crate) fn down(ctx: &Ctx, _args: DownArgs) -> Result<u8, Failure> {
    let Some((mut client, health)) = project::try_connect(ctx.dir()) else {
        eprintln!("crew: no daemon is running for {}", ctx.dir().display());
        return Ok(EXIT_OK);
    };
    match client.post::<_, serde_json::Value>("/v1/down", &serde_json::json!({})) {
        Ok(_) => {}
        // Already stopping (another `crew down`): wait for it all the same.
        Err(ClientError::Api(e)) if e.code == "shutting_down" => {}
        Err(e) => return Err(api(e)),
    }
    drop(client);
    let deadline = Instant::now() + DOWN_DEADLINE;
    while project::alive(health.pid) {
        if Instant::now() >= deadline {
            return Err(Failure::internal(anyhow::anyhow!(
                "the crew daemon (pid {}) is still running {}s after it was asked to stop; see {} \
                 (or stop it with `kill {}`)",
                health.pid,
                DOWN_DEADLINE.as_secs(),
                ctx.dir().join("daemon.log").display(),
                health.pid
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(EXIT_OK)
}
