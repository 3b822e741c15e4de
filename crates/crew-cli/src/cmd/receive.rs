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

use crate::client::ClientError;
use crate::wire::Received;

/// `crew receive`: records are printed as they arrive (the daemon streams
/// its answer one record a line), so that a million of them take no more
/// memory than one.
pub(crate) fn receive(ctx: &Ctx, args: ReceiveArgs) -> Result<u8, Failure> {
    let timeout = check_duration("--timeout", args.timeout)?;
    let body = crate::wire::ReceiveRequest {
        wait: args.wait,
        timeout: crate::wire::duration_value(timeout),
        all: args.all,
        name: args.name,
        ids: None,
    };
    let mut printer = Printer::new(args.json, std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()));
    let mut printed = 0u64;
    let mut pending = None;
    // An answer not in the streamed layout (an older daemon): read whole.
    let mut whole: Option<Vec<u8>> = None;
    let mut first = true;
    let bad = |what: &str| ClientError::Output(std::io::Error::other(format!("the daemon's answer is not {what}")));
    let mut each = |line: Option<&[u8]>| -> Result<(), ClientError> {
        let Some(line) = line else {
            // Printed as they arrive: a piece is out before the next one
            // is asked for.
            return printer.flush().map_err(|e| ClientError::Output(std::io::Error::other(e)));
        };
        if std::mem::take(&mut first) && line != b"{\"outputs\":[" {
            whole = Some(Vec::new());
        }
        if let Some(w) = &mut whole {
            w.extend_from_slice(line);
            w.push(b'\n');
            return Ok(());
        }
        if line == b"{\"outputs\":[" {
            return Ok(());
        }
        if let Some(rest) = line.strip_prefix(b"],") {
            #[derive(serde::Deserialize)]
            struct Tail {
                pending: u64,
            }
            let mut tail = b"{".to_vec();
            tail.extend_from_slice(rest);
            let t: Tail = serde_json::from_slice(&tail).map_err(|_| bad("a receive answer"))?;
            pending = Some(t.pending);
            return Ok(());
        }
        let record = line.strip_prefix(b",").unwrap_or(line);
        printer.print_json(record).map_err(|e| ClientError::Output(std::io::Error::other(e)))?;
        printed += 1;
        Ok(())
    };
    let result = ctx.client()?.post_lines("/v1/receive", &body, &mut each);
    // What arrived before a failure was received: it is printed whatever
    // happens next.
    printer.flush().map_err(Failure::internal)?;
    result.map_err(api)?;
    let pending = match whole {
        Some(bytes) => {
            let got: Received = serde_json::from_slice(&bytes).map_err(Failure::internal)?;
            for o in &got.outputs {
                printer.print(o).map_err(Failure::internal)?;
            }
            printer.flush().map_err(Failure::internal)?;
            printed += got.outputs.len() as u64;
            got.pending
        }
        None => pending.ok_or_else(|| Failure::internal(anyhow::anyhow!("the daemon's answer was cut off")))?,
    };
    if printed == 0 {
        if pending == 0 {
            eprintln!("crew: nothing to receive: every job sent has been received");
        } else {
            eprintln!("crew: no output ready yet ({pending} job(s) pending)");
        }
        return Ok(EXIT_JOB_FAILED);
    }
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
