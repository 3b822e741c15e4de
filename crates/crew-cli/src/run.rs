//! `crew run`: a one-shot controller that runs a file of jobs and exits.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit, TlsMode};
use crew_core::job::{LineDefaults, parse_job_file};
use crew_core::staging::Stager;
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
    let mut jobs = match parse_job_file(&text, &defaults) {
        Ok(jobs) => jobs,
        Err(errors) => {
            for e in &errors {
                eprintln!("{label}:{e}");
            }
            return Ok(EXIT_USAGE);
        }
    };
    let mut bad = false;
    for (i, job) in jobs.iter().enumerate() {
        if !tags.satisfies(&job.tags) {
            // Report with the line number of the job.
            let line = nth_job_line(&text, i);
            eprintln!(
                "{label}:{line}: no worker would have tags [{}]; the workers have [{tags}] (set them with --tags)",
                job.tags
            );
            bad = true;
        }
    }
    if bad {
        return Ok(EXIT_USAGE);
    }
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
        // Inputs go to the store before anything starts; the controller
        // only ever holds their keys.
        if let Err(e) = Stager::new(Arc::clone(&store)).stage(&mut jobs).await {
            eprintln!("crew: cannot stage the jobs' inputs: {e}");
            return Ok(if e.is_store_failure() { EXIT_INTERNAL } else { EXIT_USAGE });
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
        let total = jobs.len();
        controller.send_many(jobs)?;
        let code = collect(&controller, total, args.json).await;
        controller.close().await;
        code
    });
    drop(rt);
    crew_worker_local::kill_orphans();
    code.map_err(Failure::internal)
}

/// Receives and prints every output; on SIGINT/SIGTERM cancels what is left
/// and still prints one record per job.
async fn collect(controller: &Controller, total: usize, json: bool) -> anyhow::Result<u8> {
    // Buffered: flushed after each batch of records, not once per line.
    let mut printer = Printer::new(json, std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut failed = 0usize;
    let mut received = 0usize;
    let mut stopping = false;
    let mut print = |o: Output, printer: &mut Printer<_>| -> anyhow::Result<()> {
        if !o.succeeded() {
            failed += 1;
        }
        received += 1;
        printer.print(&o)
    };
    loop {
        if printer.closed() && !stopping {
            // The reader of our output is gone (`crew run ... | head`):
            // nobody will see the rest, so stop the run like a signal would.
            stopping = true;
            controller.cancel_all();
        }
        tokio::select! {
            o = controller.receive_wait(None) => match o {
                Some(o) => {
                    print(o, &mut printer)?;
                    for o in controller.receive_all() {
                        print(o, &mut printer)?;
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
        print(o, &mut printer)?;
    }
    printer.summary(total, received, failed)?;
    Ok(if failed == 0 && received == total { EXIT_OK } else { EXIT_JOB_FAILED })
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

/// The 1-based line number of the `n`-th job (skipping blanks and comments).
fn nth_job_line(text: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .nth(n)
        .map_or(0, |(i, _)| i + 1)
}
