//! `crew receive` (pop outputs and print them) and `crew wait` (block until
//! jobs finish, leaving their outputs in place).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;

use super::status::JobCounts;
use super::{Ctx, api, check_duration};
use crate::table::Printer;
use crate::{EXIT_JOB_FAILED, EXIT_OK, Failure};

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 some output was printed; 1 none was ready (or --timeout passed); \
2 bad input; 3 crew failed.")]
pub(crate) struct ReceiveArgs {
    /// Wait until there is something to receive (with --all: until every
    /// job sent so far has finished).
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (e.g. 30s).
    #[arg(long, value_name = "D", requires = "wait")]
    timeout: Option<String>,
    /// Every output ready now (default: at most one).
    #[arg(long)]
    all: bool,
    /// Only the output of the job with this name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Print output records as JSON Lines instead of a table.
    #[arg(long)]
    json: bool,
}

use crate::wire::Received;

pub(crate) fn receive(ctx: &Ctx, args: ReceiveArgs) -> Result<u8, Failure> {
    let timeout = check_duration("--timeout", args.timeout)?;
    let body = crate::wire::ReceiveRequest {
        wait: args.wait,
        timeout: crate::wire::duration_value(timeout),
        all: args.all,
        name: args.name,
        ids: None,
    };
    let got: Received = ctx.client()?.post("/v1/receive", &body).map_err(api)?;
    if got.outputs.is_empty() {
        if got.pending == 0 {
            eprintln!("crew: nothing to receive: every job sent has been received");
        } else {
            eprintln!("crew: no output ready yet ({} job(s) pending)", got.pending);
        }
        return Ok(EXIT_JOB_FAILED);
    }
    let mut printer = Printer::new(args.json, std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()));
    for o in &got.outputs {
        printer.print(o).map_err(Failure::internal)?;
    }
    printer.flush().map_err(Failure::internal)?;
    Ok(EXIT_OK)
}

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 done; 1 --timeout passed first; 2 bad input; 3 crew failed.")]
pub(crate) struct WaitArgs {
    /// Wait until every job sent has finished (the default).
    #[arg(long, conflicts_with = "one")]
    all: bool,
    /// Wait until one output is ready.
    #[arg(long)]
    one: bool,
    /// Give up after this long (e.g. 10m).
    #[arg(long, value_name = "D")]
    timeout: Option<String>,
}

pub(crate) fn wait(ctx: &Ctx, args: WaitArgs) -> Result<u8, Failure> {
    let timeout = super::duration_flag("--timeout", args.timeout.as_deref())?;
    let deadline = timeout.map(|t| crew_core::clock::after(Instant::now(), t));
    let mut client = ctx.client()?;
    let mut bar = std::io::stderr().is_terminal().then(Bar::default);
    let code = loop {
        let s: crate::wire::Status = client.get("/v1/status").map_err(api)?;
        let j = s.jobs;
        if let Some(bar) = &mut bar {
            bar.draw(&j);
        }
        let done = if args.one { j.ready > 0 || j.queued + j.running == 0 } else { j.queued + j.running == 0 };
        if done {
            break EXIT_OK;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break EXIT_JOB_FAILED;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(bar) = &mut bar {
        bar.clear();
    }
    if code != EXIT_OK {
        eprintln!("crew: jobs still unfinished after --timeout");
    }
    Ok(code)
}

/// A one-line progress bar on stderr (only drawn on a terminal).
#[derive(Default)]
struct Bar {
    drawn: bool,
}

impl Bar {
    fn draw(&mut self, j: &JobCounts) {
        const WIDTH: u64 = 30;
        let total = j.ready + j.running + j.queued;
        let filled = (j.ready * WIDTH).checked_div(total).unwrap_or(WIDTH);
        let line = format!(
            "\r[{}{}] {} done / {} running / {} queued",
            "#".repeat(filled as usize),
            "-".repeat((WIDTH - filled) as usize),
            j.ready,
            j.running,
            j.queued
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{line}\x1b[K");
        let _ = err.flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}
