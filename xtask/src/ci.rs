//! `cargo xtask ci`: the checks CI runs, in order, stopping at the first
//! failure with what to do about it.
//!
//! One command for CI and for people, so that "green locally" means "green in
//! CI": formatting first (cheapest), then clippy with warnings as errors,
//! then the tests of the whole workspace with every feature (the conformance
//! kit included), then the Python and R clients' tests against the `crew`
//! those built ([`crate::clients`]), then the embedding example, then five
//! seconds of coverage-guided fuzzing per target ([`crate::fuzz`]). Tests run under
//! `cargo nextest` when it is installed (faster, one process per test) and
//! under `cargo test` otherwise.
//!
//! The services the tests need are installed first when missing
//! ([`crate::services`]: openssh-server, Slurm and munge; the Slurm tests
//! start a private one-node cluster each). The tests run against the local
//! AWS emulator ([`crate::emu`]): CI
//! installs it, starts it on a free port, runs the tests with its variables
//! (`AWS_ENDPOINT_URL`, dummy credentials, `CREW_TEST_S3_ENDPOINT`, ...)
//! and stops it afterwards, also when a step fails. An emulator already
//! running (`cargo xtask emu start`) is used and left running.

use std::process::Stdio;

use anyhow::{Context, bail};

/// One step: the cargo arguments and what to tell the user when it fails.
struct Step {
    args: &'static [&'static str],
    on_failure: &'static str,
}

const FMT: Step =
    Step { args: &["fmt", "--all", "--", "--check"], on_failure: "the code is not formatted: run `cargo fmt --all`" };

const CLIPPY: Step = Step {
    args: &["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"],
    on_failure: "clippy found problems (warnings count as errors): see its output above",
};

const NEXTEST: Step = Step {
    args: &["nextest", "run", "--workspace", "--all-features"],
    on_failure: "tests failed: see nextest's summary above",
};

const EXAMPLE: Step = Step {
    args: &["run", "--quiet", "-p", "crew-worker-local", "--example", "embed"],
    on_failure: "the embedding example failed: see its output above",
};

const TEST: Step =
    Step { args: &["test", "--workspace", "--all-features"], on_failure: "tests failed: see the failures above" };

/// Runs every step in order; fails at the first that fails.
pub(crate) fn run() -> anyhow::Result<()> {
    run_step(&FMT, &[])?;
    run_step(&CLIPPY, &[])?;
    crate::services::install()?;
    let emulator = Emulator::up()?;
    if nextest_available() {
        run_step(&NEXTEST, &emulator.env)?;
    } else {
        eprintln!("xtask: cargo-nextest is not installed; running the tests with cargo test");
        run_step(&TEST, &emulator.env)?;
    }
    drop(emulator);
    // The clients against the `crew` the tests just built (crew-cli's
    // integration tests build target/debug/crew), so nothing is rebuilt.
    crate::clients::run_in_ci()?;
    run_step(&EXAMPLE, &[])?;
    // A short coverage-guided run of every fuzz target (the long runs are
    // `cargo xtask fuzz --runs N` by hand).
    crate::fuzz::run(&["--time".into(), "5".into()])?;
    eprintln!("xtask: ci passed");
    Ok(())
}

/// The emulator for the tests; stopped on drop (a failed step included)
/// when this run started it.
struct Emulator {
    env: crate::emu::Env,
    started: bool,
}

impl Emulator {
    fn up() -> anyhow::Result<Self> {
        if crate::emu::running() {
            eprintln!("xtask: using the AWS emulator already running (left running afterwards)");
            return Ok(Self { env: crate::emu::env()?, started: false });
        }
        crate::emu::install()?;
        // Owned before it starts, so that a start that fails half-way is
        // cleaned up too.
        let mut emulator = Self { env: Vec::new(), started: true };
        emulator.env = crate::emu::start(None)?;
        Ok(emulator)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if self.started {
            if let Err(e) = crate::emu::stop() {
                eprintln!("xtask: could not stop the AWS emulator: {e:#}");
            }
        }
    }
}

/// Runs one step with the variables `env` added, its output going straight
/// to the terminal.
fn run_step(step: &Step, env: &[(String, String)]) -> anyhow::Result<()> {
    let shown = format!("cargo {}", step.args.join(" "));
    eprintln!("xtask: running `{shown}`");
    let status = crate::cargo()
        .args(step.args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        let code = status.code().map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit code {c}"));
        bail!("`{shown}` failed ({code}): {}", step.on_failure);
    }
    Ok(())
}

/// Whether `cargo nextest --version` works.
fn nextest_available() -> bool {
    crate::cargo()
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
