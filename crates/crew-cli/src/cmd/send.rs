//! `crew send`: one job from the command line, or a whole job file in one
//! request (all or nothing, like `crew run`'s file).
//!
//! Jobs travel in the job-line JSON form (README, "Job lines"), which the
//! daemon parses with the same `crew_core::job` code that checked them here.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use crew_core::job::{Input, LineDefaults, parse_job_line, parse_job_value};
use crew_core::{Command, JobSpec, Tags};

use super::{Ctx, api, print_json};
use crate::daemon::JOB_LINES;
use crate::{EXIT_OK, EXIT_USAGE, Failure};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  crew send -- Rscript fit.R --alpha 0.5\n  crew send --tags gpu --name fit-1 -- \
python3 train.py\n  crew send --input data.csv --output 'fit/*' -- Rscript fit.R\n  crew send --file jobs.txt\n  generate-jobs | crew send --file -")]
pub(crate) struct SendArgs {
    /// Job file: one job per line, a JSON object or a shell command line
    /// (`-` reads stdin); checked whole before anything is sent.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with_all = ["command", "name", "env", "cwd"])]
    file: Option<String>,
    /// The job's name (unique among jobs not yet received).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Tags a worker must have, comma separated (with --file: added to every job).
    #[arg(long, value_name = "T,..")]
    tags: Option<String>,
    /// Time limit of one attempt, e.g. 30s (with --file: for jobs without one).
    #[arg(long, value_name = "D")]
    timeout: Option<String>,
    /// Re-runs after a failure exit (with --file: for jobs without `retries`).
    #[arg(long, value_name = "N")]
    retries: Option<u32>,
    /// CPU-time limit of the job's processes, e.g. 10m (with --file: for
    /// jobs without `cpu`); past it the job ends `cpu_limit`.
    #[arg(long, value_name = "D")]
    cpu: Option<String>,
    /// Memory limit of the job's processes, e.g. 2GiB or 512M (with --file:
    /// for jobs without `memory`).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// An environment variable of the job, `KEY=VALUE` (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A variable the job takes from its worker's environment when set
    /// there (repeatable; with --file: added to every job). Jobs otherwise
    /// see only PATH, HOME, USER, LOGNAME, TMPDIR, LANG, their --env and the
    /// CREW_* job variables.
    #[arg(long = "env-inherit", value_name = "NAME")]
    env_inherit: Vec<String>,
    /// Working folder of the job on the worker.
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// An input file, `PATH[=NAME]`: put in the job's working folder as NAME
    /// (default: the file name) before it starts; relative paths are from
    /// here (repeatable; with --file: added to every job).
    #[arg(long, value_name = "PATH[=NAME]")]
    input: Vec<String>,
    /// Files to upload to the store when the job ends: a glob relative to
    /// its working folder, e.g. 'fit/*' (repeatable; with --file: added to
    /// every job). Get them with `crew fetch JOB`.
    #[arg(long, value_name = "GLOB")]
    output: Vec<String>,
    /// Print `{"ids": [...]}` instead of one id per line.
    #[arg(long)]
    json: bool,
    /// The program and its arguments, run directly (no shell); put them
    /// after `--`.
    #[arg(value_name = "CMD", trailing_var_arg = true, allow_hyphen_values = true, required_unless_present = "file")]
    command: Vec<String>,
}

use crate::wire::Sent;

pub(crate) fn send(ctx: &Ctx, args: SendArgs) -> Result<u8, Failure> {
    let timeout = super::duration_flag("--timeout", args.timeout.as_deref())?;
    let cpu = super::duration_flag("--cpu", args.cpu.as_deref())?;
    let memory = super::size_flag("--memory", args.memory.as_deref())?;
    let tags: Tags = match &args.tags {
        Some(t) => t.parse().map_err(|e| Failure::usage(anyhow::anyhow!("--tags: {e}")))?,
        None => Tags::new(),
    };
    let inputs = super::input_flags(&args.input)?;
    let sent: Sent = match &args.file {
        Some(file) => {
            let mut defaults = LineDefaults::default();
            defaults.tags = tags;
            defaults.timeout = timeout;
            defaults.retries = args.retries;
            defaults.cpu = cpu;
            defaults.memory = memory;
            defaults.inputs = inputs;
            defaults.outputs = args.output.clone();
            defaults.env_inherit = args.env_inherit.clone();
            match send_file(ctx, file, defaults)? {
                Some(sent) => sent,
                None => return Ok(EXIT_USAGE),
            }
        }
        None => {
            let body = one_job_body(&args, tags, (timeout, cpu, memory), inputs)?;
            ctx.client()?.post_raw("/v1/jobs", body).map_err(api)?
        }
    };
    if args.json {
        print_json(&sent)?;
    } else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for id in &sent.ids {
            writeln!(out, "{id}").map_err(Failure::internal)?;
        }
        out.flush().map_err(Failure::internal)?;
    }
    Ok(EXIT_OK)
}

/// The request body of the job given by flags, checked.
fn one_job_body(
    args: &SendArgs,
    tags: Tags,
    (timeout, cpu, memory): (Option<std::time::Duration>, Option<std::time::Duration>, Option<u64>),
    inputs: Vec<Input>,
) -> Result<Vec<u8>, Failure> {
    let mut env = BTreeMap::new();
    for e in &args.env {
        let Some((k, v)) = e.split_once('=') else {
            return Err(Failure::usage(anyhow::anyhow!("--env {e:?}: write KEY=VALUE")));
        };
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut spec = JobSpec::new(Command::Argv(args.command.clone()));
    spec.name = args.name.clone();
    spec.tags = tags;
    spec.env = env;
    spec.opts.env_inherit = args.env_inherit.clone();
    spec.opts.cwd = args.cwd.clone();
    spec.timeout = timeout;
    spec.opts.cpu = cpu;
    spec.opts.memory = memory;
    spec.retries = args.retries.unwrap_or(0);
    spec.opts.inputs = inputs;
    spec.opts.outputs = args.output.clone();
    // Check it exactly as the daemon will, so that a bad job is reported
    // before any daemon is started.
    let value = serde_json::to_value(spec.as_line()).map_err(Failure::internal)?;
    parse_job_value(value, &LineDefaults::default()).map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    body(std::slice::from_ref(&spec))
}

/// How many bytes of job lines go to the daemon in one piece.
const PIECE: usize = 256 * 1024;

/// What reading a job file found.
#[derive(Default)]
struct FileCheck {
    jobs: usize,
    /// Bad lines: number, reason.
    errors: Vec<(usize, String)>,
    /// The file could not be read.
    unreadable: Option<anyhow::Error>,
}

/// Sends a job file as job lines, streamed: a thread reads and checks it
/// line by line and hands the daemon pieces as it goes, so that neither
/// the file nor its jobs are ever held whole. All or nothing: a bad line
/// (each one reported as `FILE:LINE: reason`), a file that cannot be read
/// or one without a job cuts the request off, and the daemon accepts
/// nothing of a body cut short. A file whose problems show in its first
/// piece is refused before any daemon is contacted (or started). `None`
/// when some line is bad.
fn send_file(ctx: &Ctx, file: &str, defaults: LineDefaults) -> Result<Option<Sent>, Failure> {
    let (label, reader): (String, Box<dyn BufRead + Send>) = if file == "-" {
        ("<stdin>".to_owned(), Box::new(std::io::BufReader::with_capacity(PIECE, std::io::stdin())))
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("cannot read the job file {file}"))
            .map_err(Failure::usage)?;
        (file.to_owned(), Box::new(std::io::BufReader::with_capacity(PIECE, f)))
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let reading = std::thread::spawn(move || check_and_pipe(reader, &defaults, &tx));
    // The first piece (or the end of a small file) before connecting.
    let first = rx.blocking_recv();
    let sent = match first {
        Some(Ok(piece)) => {
            let (relay, relayed) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
            // The first piece goes first; the rest follows from the reader.
            let _ = relay.try_send(Ok(piece));
            let forward = std::thread::spawn(move || {
                while let Some(p) = rx.blocking_recv() {
                    if relay.blocking_send(p).is_err() {
                        break;
                    }
                }
            });
            let sent =
                ctx.client().and_then(|mut c| c.post_stream::<Sent>("/v1/jobs", JOB_LINES, relayed).map_err(api));
            let _ = forward.join();
            Some(sent)
        }
        _ => None,
    };
    let check = reading.join().map_err(|_| Failure::internal(anyhow::anyhow!("the job file reader failed")))?;
    if let Some(e) = check.unreadable {
        return Err(Failure::usage(e.context(format!("cannot read the job file {label}"))));
    }
    if !check.errors.is_empty() {
        let mut err = std::io::stderr().lock();
        for (n, reason) in &check.errors {
            let _ = writeln!(err, "{label}:{n}: {reason}");
        }
        return Ok(None);
    }
    if check.jobs == 0 {
        return Err(Failure::usage(anyhow::anyhow!("{label} has no job (only blank lines and # comments)")));
    }
    match sent {
        Some(sent) => sent.map(Some),
        None => Err(Failure::internal(anyhow::anyhow!("the job file reader stopped early"))),
    }
}

/// Reads job lines, checks each one as the daemon will (and names unique
/// within the file), and sends them on in pieces of about [`PIECE`] bytes.
/// At the first problem it sends an error instead (the request is cut
/// off), then goes on reading to report every bad line.
fn check_and_pipe(
    mut reader: Box<dyn BufRead + Send>,
    defaults: &LineDefaults,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> FileCheck {
    let mut check = FileCheck::default();
    let mut names: HashMap<String, usize> = HashMap::new();
    // A line may go as it is when the daemon would read the same job from
    // it: JSON, and nothing of the sender's to add.
    let verbatim_ok = defaults.tags.is_empty()
        && defaults.timeout.is_none()
        && defaults.retries.is_none()
        && defaults.cpu.is_none()
        && defaults.memory.is_none()
        && defaults.inputs.is_empty()
        && defaults.outputs.is_empty()
        && defaults.env_inherit.is_empty();
    let mut piece: Vec<u8> = Vec::with_capacity(PIECE + 4096);
    let mut open = true;
    let cut = |open: &mut bool| {
        if std::mem::take(open) {
            let _ = tx.blocking_send(Err(std::io::Error::other("a bad job line: the request is cut off")));
        }
    };
    let mut line = String::new();
    let mut n = 0usize;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                check.unreadable = Some(e.into());
                cut(&mut open);
                return check;
            }
        }
        n += 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let parsed = parse_job_line(t, defaults).and_then(|spec| spec.check_size().map(|()| spec));
        let mut spec = match parsed {
            Ok(spec) => spec,
            Err(reason) => {
                check.errors.push((n, reason.to_string()));
                cut(&mut open);
                continue;
            }
        };
        if let Some(name) = &spec.name {
            if let Some(first) = names.insert(name.clone(), n) {
                check.errors.push((n, format!("duplicate job name {name:?} (first used on line {first})")));
                cut(&mut open);
                continue;
            }
        }
        check.jobs += 1;
        if !open {
            continue;
        }
        if verbatim_ok && spec.opts.inputs.is_empty() && t.starts_with('{') {
            piece.extend_from_slice(t.as_bytes());
        } else {
            // Relative input paths are from the sender's folder; the
            // daemon needs them absolute.
            let inputs = if spec.opts.inputs.is_empty() { &mut [][..] } else { &mut spec.opts.inputs[..] };
            for input in inputs {
                if let Err(e) = super::absolute_input(input) {
                    check.errors.push((n, format!("{:#}", e.error)));
                    cut(&mut open);
                    break;
                }
            }
            if !open {
                continue;
            }
            if let Err(e) = serde_json::to_writer(&mut piece, &spec.as_line()) {
                check.unreadable = Some(e.into());
                cut(&mut open);
                return check;
            }
        }
        piece.push(b'\n');
        if piece.len() >= PIECE {
            let full = std::mem::replace(&mut piece, Vec::with_capacity(PIECE + 4096));
            if tx.blocking_send(Ok(Bytes::from(full))).is_err() {
                // The request ended (refused, or the daemon went): its
                // answer says why; only the check goes on.
                open = false;
            }
        }
    }
    if check.jobs == 0 {
        cut(&mut open);
    }
    if open && !piece.is_empty() {
        let _ = tx.blocking_send(Ok(Bytes::from(piece)));
    }
    check
}

/// `{"jobs": [...]}`, serialized once, straight from the parsed jobs.
fn body(jobs: &[JobSpec]) -> Result<Vec<u8>, Failure> {
    let body = crate::wire::SendRequest { jobs: jobs.iter().map(JobSpec::as_line).collect() };
    let mut out = Vec::with_capacity(64 + jobs.len() * 96);
    serde_json::to_writer(&mut out, &body).map_err(Failure::internal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crew_core::job::parse_job_file;

    /// Every job-line field survives the trip to the wire form and back.
    #[test]
    fn the_wire_form_parses_back_to_the_same_job() {
        let text = concat!(
            "echo plain words\n",
            r#"{"name":"a","tags":["gpu","big"],"command":["x","y z"],"env":{"K":"V"},"env_inherit":["HOME","FOO"],"cwd":"/tmp","stdin":"in","timeout":"1m30s","cpu":"10m","memory":"2GiB","retries":2,"crashes_max":5,"priority":-3}"#,
            "\n",
            r#"{"builtin":"sleep","args":{"seconds":0.5},"timeout":0.25}"#,
            "\n",
            r#"{"shell":"echo $HOME | wc"}"#,
            "\n",
            r#"{"shell":"x","inputs":["/a/b.csv","/c=d/e=f",{"path":"/g","name":"in/h"},{"name":"s","key":"cas/sha256/x","size":2,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"}],"outputs":["out/*","n.txt"]}"#,
            "\n",
        );
        let jobs = parse_job_file(text, &LineDefaults::default()).expect("good file");
        let wire = body(&jobs).expect("body");
        let value: serde_json::Value = serde_json::from_slice(&wire).expect("JSON");
        let back: Vec<JobSpec> = value["jobs"]
            .as_array()
            .expect("jobs array")
            .iter()
            .map(|v| parse_job_value(v.clone(), &LineDefaults::default()).expect("parses back"))
            .collect();
        assert_eq!(back, jobs);
    }
}
