//! `crew run`: a one-shot controller that runs a file of jobs and exits.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit, TlsMode};
use crew_core::job::{InputSource, JobSpec, LineDefaults, parse_job_line};
use crew_core::staging::{StageError, Stager};
use crew_core::{Output, Tags};
use crew_scheduler::SlotLimits;

use crate::registry::Registry;
use crate::table::Printer;
use crate::{EXIT_INTERNAL, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, Failure};

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Job file: one job per line, a JSON object or a shell command line
    /// (`-` reads stdin). Blank lines and lines starting with # are skipped.
    #[arg(value_name = "FILE")]
    file: String,
    /// Number of workers (default: the number of CPUs).
    #[arg(long, short = 'w', value_name = "N")]
    workers: Option<u32>,
    /// Worker class.
    #[arg(long, default_value = "local", value_name = "CLASS")]
    class: String,
    /// A class option, `key=value` (repeatable), e.g. `--opt host=a,b` for
    /// `--class ssh`.
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// Tags of the workers, comma separated; jobs may ask for any subset.
    #[arg(long, value_name = "T,..", default_value = "")]
    tags: String,
    /// Default timeout of a job (e.g. 30s, 5m); a job's own `timeout` wins.
    #[arg(long, value_name = "D")]
    timeout: Option<String>,
    /// Default re-runs after a failure exit; a job's own `retries` wins.
    #[arg(long, value_name = "N")]
    retries: Option<u32>,
    /// Default CPU-time limit of a job's processes (e.g. 10m); a job's own
    /// `cpu` wins. Past it a job ends `cpu_limit`.
    #[arg(long, value_name = "D")]
    cpu: Option<String>,
    /// Default memory limit of a job's processes (e.g. 2GiB, 512M); a
    /// job's own `memory` wins.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Print JSON Lines (one output record per line) instead of a table.
    #[arg(long)]
    json: bool,
    /// Store for stdout/stderr larger than the inline cap: a folder,
    /// file:///abs/path, or s3://BUCKET/PREFIX[?region=R&endpoint=URL&profile=P].
    #[arg(long, value_name = "URL|DIR", default_value = ".crew/store")]
    store: String,
    /// Crew seed; per-job seeds (CREW_SEED) derive from it and job names.
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
    /// Jobs sent ahead to a busy worker, at least: more when its jobs are
    /// short (about 2 ms of them, at most 256); 0: one at a time.
    #[arg(long, default_value_t = 1, value_name = "N")]
    prefetch: u32,
    /// An input file of every job, `PATH[=NAME]`: put in the job's working
    /// folder as NAME (default: the file name) before it starts (repeatable).
    #[arg(long, value_name = "PATH[=NAME]")]
    input: Vec<String>,
    /// Files of every job to upload to the store when it ends: a glob
    /// relative to its working folder, e.g. 'fit/*' (repeatable).
    #[arg(long, value_name = "GLOB")]
    output: Vec<String>,
    /// A variable every job takes from its worker's environment when set
    /// there (repeatable); jobs otherwise see only PATH, HOME, USER,
    /// LOGNAME, TMPDIR, LANG, their `env` and the CREW_* job variables.
    #[arg(long = "env-inherit", value_name = "NAME")]
    env_inherit: Vec<String>,
    /// Where the controller listens for workers, IP:PORT (default
    /// 127.0.0.1:0, loopback and any free port). Workers of classes that run
    /// elsewhere (aws-batch, slurm) need an address they can reach, e.g. 0.0.0.0:7000.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// The address workers dial when it is not the listening one (a wildcard
    /// bind, NAT): HOST:PORT, or HOST for the listening port.
    #[arg(long, value_name = "HOST[:PORT]")]
    advertise: Option<String>,
    /// When worker connections use TLS: auto (beyond loopback) or always.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    tls: TlsMode,
}

pub(crate) fn main(args: RunArgs) -> Result<u8, Failure> {
    // Validate everything before anything runs.
    let tags: Tags = args.tags.parse().map_err(Failure::usage)?;
    let timeout = crate::cmd::duration_flag("--timeout", args.timeout.as_deref())?;
    let cpu = crate::cmd::duration_flag("--cpu", args.cpu.as_deref())?;
    let memory = crate::cmd::size_flag("--memory", args.memory.as_deref())?;
    let workers = match args.workers {
        Some(0) => return Err(Failure::usage(anyhow::anyhow!("--workers must be at least 1"))),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let options = crate::cmd::parse_opts(&args.opts)?;
    let class = Registry::stock().get(&args.class).map_err(crate::registry::ClassError::failure)?;
    class.check_options(&options).map_err(Failure::usage)?;
    let (label, text) = read_jobs(&args.file).map_err(Failure::usage)?;
    let inputs = crate::cmd::input_flags(&args.input)?;
    let mut defaults = LineDefaults::default();
    defaults.timeout = timeout;
    defaults.retries = args.retries;
    defaults.cpu = cpu;
    defaults.memory = memory;
    defaults.inputs = inputs;
    defaults.outputs = args.output;
    defaults.env_inherit = args.env_inherit;
    let checked = match check_file(&text, &defaults, &tags) {
        Ok(checked) => checked,
        Err(errors) => {
            for e in &errors {
                eprintln!("{label}:{e}");
            }
            return Ok(EXIT_USAGE);
        }
    };
    let store = crew_core::store::open_store(&args.store)
        .with_context(|| format!("cannot open the store {:?}", args.store))
        .map_err(Failure::usage)?;

    let _ = crew_worker_local::become_subreaper();
    // One thread: the controller's work per job is short, and on one
    // thread a result read from a worker, the next job written to it and
    // the record printed need no hand-off between threads.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)?;
    // Before any job is accepted: a missing bucket or refused credentials is
    // one clear line now, not a failure in the middle of the run.
    rt.block_on(store.check()).map_err(|e| crate::registry::store_failure(&store.url(), e))?;
    let code = rt.block_on(async move {
        // Inputs go to the store before anything starts (a missing file is
        // an error now, not in the middle of the run); the controller only
        // ever holds their keys. Files staged now are not read again.
        let stager = Stager::new(Arc::clone(&store));
        if checked.inputs {
            let mut feed = Feed::new(&text, &defaults);
            while !feed.done {
                match feed.next_chunk(&stager, CHUNK).await {
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("crew: cannot stage the jobs' inputs: {e}");
                        return Ok(if e.is_store_failure() { EXIT_INTERNAL } else { EXIT_USAGE });
                    }
                }
            }
        }
        let exe = std::env::current_exe().context("cannot find the crew executable")?;
        let mut config = ControllerConfig::new(AgentCommand::crew(exe.to_string_lossy()));
        config.seed = args.seed;
        config.store = Some(store);
        config.tls = args.tls;
        config.advertise = args.advertise;
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        let controller = Controller::start(config).await?;
        if let Some(warning) = controller.reach_warning(class.as_ref()) {
            eprintln!("crew: warning: {warning}");
        }
        let limits = SlotLimits { prefetch: args.prefetch, ..SlotLimits::default() };
        let mut recruit = Recruit::new(class, workers);
        recruit.tags = tags;
        recruit.limits = limits;
        recruit.options = options;
        controller.recruit(recruit)?;
        let feed = Feed::new(&text, &defaults);
        let code = collect(&controller, feed, &stager, checked.jobs, args.json).await;
        controller.close().await;
        code
    });
    drop(rt);
    crew_worker_local::kill_orphans();
    code.map_err(Failure::internal)
}

/// Jobs handed to the controller but not yet received, at most: `crew run`
/// reads its file in chunks and keeps about this many in the controller, so
/// that its memory does not grow with the file (a million lines, or a
/// hundred million, take the same). Far more than any window of workers
/// takes at once.
const IN_FLIGHT: usize = 64 * 1024;

/// Lines parsed and sent at once.
const CHUNK: usize = 4096;

/// Receives and prints every output while feeding the controller the jobs
/// of `feed`; on SIGINT/SIGTERM cancels what is left and still prints one
/// record per job.
async fn collect(
    controller: &Controller,
    mut feed: Feed<'_>,
    stager: &Stager,
    total: usize,
    json: bool,
) -> anyhow::Result<u8> {
    // Buffered: flushed after each batch of records, not once per line.
    let mut printer = Printer::new(json, std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut failed = 0usize;
    let mut received = 0usize;
    let mut sent = 0usize;
    let mut stopping = false;
    let mut feed_error = false;
    let mut print = |o: Output, printer: &mut Printer<_>, received: &mut usize| -> anyhow::Result<()> {
        if !o.succeeded() {
            failed += 1;
        }
        *received += 1;
        printer.print(&o)
    };
    loop {
        if printer.closed() && !stopping {
            // The reader of our output is gone (`crew run ... | head`):
            // nobody will see the rest, so stop the run like a signal would.
            stopping = true;
            controller.cancel_all();
        }
        // Keep the controller fed. Once stopping, the rest of the file is
        // sent and cancelled at once, so that every line still ends in one
        // record.
        while !feed.done && (stopping || sent - received < IN_FLIGHT) {
            match feed.next_chunk(stager, CHUNK).await {
                Ok(jobs) if jobs.is_empty() => break,
                Ok(jobs) => {
                    sent += jobs.len();
                    controller.send_many(jobs)?;
                    if stopping {
                        controller.cancel_all();
                    }
                }
                Err(e) => {
                    // Staged before the start, so only a file changed
                    // meanwhile gets here: stop like a signal would.
                    eprintln!("crew: cannot stage the jobs' inputs: {e}; stopping");
                    feed.done = true;
                    feed_error = true;
                    if !stopping {
                        stopping = true;
                        controller.cancel_all();
                    }
                }
            }
        }
        if feed.done && received == sent {
            break;
        }
        tokio::select! {
            o = controller.receive_wait(None) => match o {
                Some(o) => {
                    print(o, &mut printer, &mut received)?;
                    for o in controller.receive_all() {
                        print(o, &mut printer, &mut received)?;
                    }
                    printer.flush()?;
                }
                None => break,
            },
            _ = sigint.recv() => { if stopping { break } stopping = true; stop(controller); }
            _ = sigterm.recv() => { if stopping { break } stopping = true; stop(controller); }
        }
    }
    for o in controller.receive_all() {
        print(o, &mut printer, &mut received)?;
    }
    printer.summary(total, received, failed)?;
    Ok(if failed == 0 && received == total && !feed_error { EXIT_OK } else { EXIT_JOB_FAILED })
}

/// What the first pass over a job file found.
struct Checked {
    /// Jobs in the file.
    jobs: usize,
    /// Whether any has a local file as input (staged before the start).
    inputs: bool,
}

/// The first pass over a job file: every line parsed and checked (syntax,
/// size, duplicate names, tags the workers have), keeping no job, so that a
/// bad line anywhere stops the run before anything starts and a large file
/// costs no memory per line.
fn check_file(text: &str, defaults: &LineDefaults, tags: &Tags) -> Result<Checked, Vec<String>> {
    let mut errors = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut checked = Checked { jobs: 0, inputs: false };
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let line = i + 1;
        match parse_job_line(t, defaults).and_then(|spec| spec.check_size().map(|()| spec)) {
            Ok(spec) => {
                if let Some(name) = &spec.name {
                    if let Some(first) = names.insert(name.clone(), line) {
                        errors.push(format!("{line}: duplicate job name {name:?} (first used on line {first})"));
                        continue;
                    }
                }
                if !tags.satisfies(&spec.tags) {
                    errors.push(format!(
                        "{line}: no worker would have tags [{}]; the workers have [{tags}] (set them with --tags)",
                        spec.tags
                    ));
                    continue;
                }
                checked.jobs += 1;
                checked.inputs |= spec.opts.inputs.iter().any(|i| matches!(i.source, InputSource::Path(_)));
            }
            Err(reason) => errors.push(format!("{line}: {reason}")),
        }
    }
    if errors.is_empty() { Ok(checked) } else { Err(errors) }
}

/// The second pass: the file's jobs in chunks, parsed again (they were
/// checked) and their inputs staged (cached from the first staging).
struct Feed<'a> {
    lines: std::str::Lines<'a>,
    defaults: &'a LineDefaults,
    done: bool,
}

impl<'a> Feed<'a> {
    fn new(text: &'a str, defaults: &'a LineDefaults) -> Self {
        Self { lines: text.lines(), defaults, done: false }
    }

    /// The next jobs, at most `max`; empty at the end of the file.
    async fn next_chunk(&mut self, stager: &Stager, max: usize) -> Result<Vec<JobSpec>, StageError> {
        let mut jobs = Vec::with_capacity(max);
        while jobs.len() < max {
            let Some(line) = self.lines.next() else {
                self.done = true;
                break;
            };
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            // Checked by the first pass; a line that no longer parses
            // cannot happen (the text is the same), but is not dropped
            // silently either.
            match parse_job_line(t, self.defaults) {
                Ok(spec) => jobs.push(spec),
                Err(e) => return Err(StageError::Invalid(format!("a job line changed between passes: {e}"))),
            }
        }
        stager.stage(&mut jobs).await?;
        Ok(jobs)
    }
}

fn stop(controller: &Controller) {
    let n = controller.cancel_all();
    eprintln!("crew: stopping; cancelling {n} unfinished job(s)");
}

fn read_jobs(file: &str) -> anyhow::Result<(String, String)> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin().read_to_string(&mut text).context("cannot read the jobs from stdin")?;
        Ok(("<stdin>".to_owned(), text))
    } else {
        let path = PathBuf::from(file);
        text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the job file {file}"))?;
        Ok((file.to_owned(), text))
    }
}
