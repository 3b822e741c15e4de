//! `crew status`, `crew sendable` and `crew receivable`.

use clap::Args;

use super::{Ctx, api, parse_tags, print_json};
use crate::{EXIT_JOB_FAILED, EXIT_OK, Failure};

pub(crate) use crate::wire::JobCounts;
use crate::wire::Status;

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Print the daemon's status object (docs/api.md, `GET /v1/status`).
    #[arg(long)]
    json: bool,
}

pub(crate) fn status(ctx: &Ctx, args: StatusArgs) -> Result<u8, Failure> {
    let value: serde_json::Value = ctx.client()?.get("/v1/status").map_err(api)?;
    if args.json {
        print_json(&value)?;
        return Ok(EXIT_OK);
    }
    let s: Status = serde_json::from_value(value)
        .map_err(|e| Failure::internal(anyhow::anyhow!("the daemon's status is not understood: {e}")))?;
    if s.slots.is_empty() {
        println!("no slots (add some with `crew recruit --workers N --class local`)");
    } else {
        println!(
            "{:<14}  {:<8}  {:<16}  {:<9}  {:>8}  {:>6}  {:>8}  LAST",
            "SLOT", "CLASS", "TAGS", "STATE", "HANDLE", "DONE", "IDLE"
        );
        for slot in &s.slots {
            let tags = if slot.tags.is_empty() { "-".to_owned() } else { slot.tags.to_string() };
            println!(
                "{:<14}  {:<8}  {:<16}  {:<9}  {:>8}  {:>6}  {:>8}  {}",
                slot.name,
                slot.class,
                tags,
                slot.state,
                slot.handle.as_deref().unwrap_or("-"),
                slot.jobs_done,
                slot.idle_seconds.map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s")),
                slot.last_reason.as_deref().unwrap_or("-"),
            );
        }
    }
    println!("jobs: {} queued, {} running, {} ready", s.jobs.queued, s.jobs.running, s.jobs.ready);
    match &s.workers.tls_sha256 {
        Some(pin) => println!("workers dial {} (TLS, certificate sha256 {pin})", s.workers.advertise),
        None => println!("workers dial {} (loopback, plaintext)", s.workers.advertise),
    }
    if let Some(h) = &s.http {
        let scheme = if h.tls_sha256.is_some() { "https" } else { "http" };
        let pin = h.tls_sha256.as_deref().map_or(String::new(), |p| format!(", certificate sha256 {p}"));
        println!("API also on {scheme}://{} (bearer token in {}{pin})", h.listen, h.token_file.display());
    }
    Ok(EXIT_OK)
}

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 yes; 1 no; 2 bad input; 3 crew failed.")]
pub(crate) struct SendableArgs {
    /// The tags a job would ask for, comma separated.
    #[arg(long, value_name = "T,..", default_value = "")]
    tags: String,
}

pub(crate) fn sendable(ctx: &Ctx, args: SendableArgs) -> Result<u8, Failure> {
    // Tags are validated to a URL-safe alphabet, so they go in the query as they are.
    let tags = parse_tags("--tags", &args.tags)?.join(",");
    let answer: serde_json::Value = ctx.client()?.get(&format!("/v1/sendable?tags={tags}")).map_err(api)?;
    Ok(yes_no(&answer, "sendable"))
}

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 yes; 1 no; 3 crew failed.")]
pub(crate) struct ReceivableArgs {}

pub(crate) fn receivable(ctx: &Ctx, _args: ReceivableArgs) -> Result<u8, Failure> {
    let answer: serde_json::Value = ctx.client()?.get("/v1/receivable").map_err(api)?;
    Ok(yes_no(&answer, "receivable"))
}

fn yes_no(answer: &serde_json::Value, key: &str) -> u8 {
    if answer.get(key).and_then(serde_json::Value::as_bool) == Some(true) { EXIT_OK } else { EXIT_JOB_FAILED }
}
