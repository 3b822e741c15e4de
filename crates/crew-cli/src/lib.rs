//! `crew`: run jobs on heterogeneous, semi-persistent workers.
//!
//! The `crew` command as a library, so that a third party's own `crew`
//! with extra worker classes is a few lines ([`App`]):
//!
//! ```no_run
//! # #[derive(Debug)] struct MyClass;
//! # impl MyClass { fn new() -> Self { MyClass } }
//! # #[async_trait::async_trait]
//! # impl crew_core::worker::Worker for MyClass {
//! #     fn class(&self) -> &str { "mine" }
//! #     fn capabilities(&self) -> crew_core::worker::Capabilities { crew_core::worker::Capabilities::local() }
//! #     async fn launch(&self, _: &crew_core::worker::LaunchSpec) -> Result<Vec<crew_core::worker::Handle>, crew_core::worker::WorkerError> { Ok(vec![]) }
//! #     async fn probe(&self, h: &[crew_core::worker::Handle]) -> Result<Vec<crew_core::worker::Liveness>, crew_core::worker::WorkerError> { Ok(vec![]) }
//! #     async fn terminate(&self, _: &[crew_core::worker::Handle]) -> Result<(), crew_core::worker::WorkerError> { Ok(()) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     crew_cli::App::new().with_class(MyClass::new()).run()
//! }
//! ```
//!
//! Everything else is private: flags are parsed and validated here, then
//! handed to the controller, the agent and the classes of the registry
//! (`registry.rs`: built in, added with [`App::with_class`], or an
//! executable `crew-worker-NAME` on `PATH`, `plugin.rs`). Exit codes are
//! documented in README.md and mapped in one place, [`App::run`].
//!
//! Built with `--cfg fuzzing` (`cargo xtask fuzz`), the `crew` binary is a
//! libFuzzer binary over the targets of `fuzz.rs` instead, with no `main`
//! of its own.

use std::process::ExitCode;
use std::sync::Arc;

use crew_core::worker::Worker;

use clap::{Parser, Subcommand};

mod aws_batch;
mod classes;
mod client;
mod cmd;
mod config;
mod daemon;
#[cfg(all(test, not(fuzzing)))]
mod fuzz;
/// The fuzz targets, public only in the fuzz build (`--cfg fuzzing`), for
/// the `crew` binary's libFuzzer entry point.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz;
mod make;
mod make_daemon;
mod plugin;
mod project;
mod registry;
mod run;
mod table;
mod wire;
mod worker;

/// Exit status: every job succeeded / the command did what was asked.
pub(crate) const EXIT_OK: u8 = 0;
/// Exit status: some job did not succeed.
pub(crate) const EXIT_JOB_FAILED: u8 = 1;
/// Exit status: bad input (flags, job file, unknown class).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status: crew itself failed (could not listen, spawn, ...).
pub(crate) const EXIT_INTERNAL: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "crew",
    version,
    about = "Run jobs on heterogeneous, semi-persistent workers",
    long_about = "crew runs jobs on worker processes that stay up between jobs (local \
processes today; cloud and cluster classes later), routing each job to a worker \
whose tags match, and returns one output record per job."
)]
struct Cli {
    /// The project folder of the daemon commands (default: ./.crew).
    #[arg(long, value_name = "DIR", env = "CREW_DIR")]
    dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every job of a file on fresh workers, print one output record per
    /// job, and exit (like GNU parallel).
    Run(run::RunArgs),
    /// Run the worker agent (started by a controller; not usually by hand).
    Worker(worker::WorkerArgs),
    /// Run the daemon of a project folder in the foreground (started by
    /// `crew up`; not usually by hand).
    #[command(hide = true)]
    Daemon(daemon::DaemonArgs),
    #[command(flatten)]
    Client(cmd::ClientCommand),
    /// Build a pipeline's targets (pipeline.toml) that are not up to date,
    /// on fresh workers or the daemon's (--daemon).
    Make(make::MakeArgs),
    /// List the targets `crew make` would run, and why (exit 1 if any).
    Outdated(make::OutdatedArgs),
    /// Say what changed for one target: which input, env var, command or
    /// upstream.
    Why(make::WhyArgs),
    /// Print the pipeline's graph with each target's state (dot or mermaid).
    Graph(make::GraphArgs),
    /// Forget targets' records (they build again); deletes no output.
    Clean(make::CleanArgs),
    /// Delete store objects that no current record references.
    Gc(make::GcArgs),
    /// Set up AWS Batch for the `aws-batch` class (e.g. register a job
    /// definition for crew workers).
    AwsBatch(aws_batch::AwsBatchArgs),
    /// List the worker classes: built in, and `crew-worker-NAME` on PATH.
    Classes(classes::ClassesArgs),
    /// Run the worker conformance kit against a class (built in or a
    /// `crew-worker-NAME` on PATH): agents started, jobs run, crashes
    /// replaced, terminate honoured.
    Conformance(classes::ConformanceArgs),
}

/// An error with the exit status it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) error: anyhow::Error,
}

impl Failure {
    pub(crate) fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self { code: EXIT_USAGE, error: error.into() }
    }

    pub(crate) fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self { code: EXIT_INTERNAL, error: error.into() }
    }
}

fn init_logging(default: &str) {
    init_logging_to(default, std::io::stderr);
}

fn init_logging_to<W>(default: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // aws-config warns about every credential provider of the chain that
    // found nothing; the store's own error says what matters, in one line.
    let filter = tracing_subscriber::EnvFilter::try_from_env("CREW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},aws_config=error")));
    // Colours only for a person at a terminal, not in daemon.log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

/// The `crew` command, with the worker classes of the stock binary and
/// any added with [`App::with_class`].
///
/// One `App` runs per process: [`App::run`] installs its classes as the
/// process's registry (agents, the daemon and `crew run` all find them
/// there) and parses the process's arguments.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct App {
    classes: Vec<Arc<dyn Worker>>,
}

impl App {
    /// The stock `crew`: the `local`, `aws-batch` and `slurm` classes, and any
    /// `crew-worker-NAME` on `PATH`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a worker class, selected by its [`Worker::class`] name with
    /// `--class`. A class of the same name as a built-in one replaces it;
    /// classes compiled in win over `crew-worker-NAME` on `PATH`.
    pub fn with_class(mut self, class: impl Worker) -> Self {
        self.classes.push(Arc::new(class));
        self
    }

    /// Parses the process's arguments, runs the command and returns its
    /// exit status (README.md, "Exit status": 0 done, 1 a job did not
    /// succeed, 2 bad input, 3 crew failed; `crew worker` exits with the
    /// agent's own statuses). Errors are printed to stderr first.
    pub fn run(self) -> ExitCode {
        registry::install(self.classes);
        registry::register_stores();
        let cli = Cli::parse();

        let result = match cli.command {
            Command::Run(args) => {
                init_logging("warn");
                run::main(args)
            }
            Command::Worker(args) => {
                init_logging("warn");
                worker::main(args)
            }
            Command::Daemon(args) => {
                init_logging_to("info", || daemon::logfile::Writer);
                daemon::main(args)
            }
            Command::Client(command) => cmd::main(cli.dir, command),
            Command::Make(args) => {
                init_logging("warn");
                make::make(cli.dir, args)
            }
            Command::Outdated(args) => {
                init_logging("warn");
                make::outdated(args)
            }
            Command::Why(args) => {
                init_logging("warn");
                make::why(args)
            }
            Command::Graph(args) => {
                init_logging("warn");
                make::graph(args)
            }
            Command::Clean(args) => {
                init_logging("warn");
                make::clean(args)
            }
            Command::Gc(args) => {
                init_logging("warn");
                make::gc(args)
            }
            Command::AwsBatch(args) => {
                init_logging("warn");
                aws_batch::main(args)
            }
            Command::Classes(args) => classes::list(args),
            Command::Conformance(args) => {
                init_logging("warn");
                classes::conformance(args)
            }
        };
        match result {
            Ok(code) => ExitCode::from(code),
            Err(f) => {
                eprintln!("crew: {:#}", f.error);
                ExitCode::from(f.code)
            }
        }
    }
}
