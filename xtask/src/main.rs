//! `cargo xtask`: crew's project automation, in Rust so that it runs the same
//! on every machine with nothing to install beyond cargo.
//!
//! The `xtask` alias in `.cargo/config.toml` runs this binary. Each subcommand
//! lives in its own module; `main` only dispatches on the first argument, so
//! adding one is a module and a line in [`SUBCOMMANDS`]. What plain
//! `cargo test` can do stays in `cargo test`; xtask holds what needs several
//! cargo runs in sequence (CI) or a measurement (benchmarks).
//!
//! Dependencies are kept to `anyhow` and std so that the first `cargo xtask`
//! builds in seconds; the benchmark's own dependencies (crew-core, tokio)
//! sit behind the `bench` feature, which only its release build turns on.

mod bench;
mod ci;
mod clients;
mod emu;
mod fuzz;
mod services;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// The subcommands and their one-line help, in the order `--help` lists them.
const SUBCOMMANDS: &[(&str, &str)] = &[
    ("ci", "run what CI runs: fmt check, clippy -D warnings, the tests against the AWS emulator, the clients' tests"),
    ("clients", "the Python and R clients' tests against the real daemon (installs pytest, R when missing)"),
    ("bench", "measure crew against baselines (release build); `bench --help` for options"),
    ("emu", "the local AWS emulator of the tests: `emu install|start|stop|env`"),
    ("fuzz", "coverage-guided fuzzing (libFuzzer): `fuzz [--time SECS | --runs N] [TARGET...]`"),
    (
        "services",
        "install the real services the tests need when missing (openssh-server, Slurm and munge; Debian, as root)",
    ),
];

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(first) = args.next() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    let rest: Vec<OsString> = args.collect();
    let result = match first.to_str() {
        Some("-h" | "--help" | "help") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some("ci") => no_arguments("ci", &rest).and_then(|()| ci::run()),
        Some("clients") => no_arguments("clients", &rest).and_then(|()| clients::run_alone()),
        Some("bench") => bench::run(&rest),
        Some("emu") => emu::run(&rest),
        Some("fuzz") => fuzz::run(&rest),
        Some("services") => no_arguments("services", &rest).and_then(|()| services::install()),
        _ => {
            eprintln!("error: unknown subcommand {:?}\n\n{}", first.to_string_lossy(), usage());
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `--help` text.
fn usage() -> String {
    let mut text = String::from("Usage: cargo xtask <SUBCOMMAND>\n\nSubcommands:\n");
    for (name, help) in SUBCOMMANDS {
        text.push_str(&format!("  {name:<10}{help}\n"));
    }
    text.push_str("\nOptions:\n  -h, --help  print this help\n");
    text
}

/// Fails when a subcommand that takes no arguments got some.
fn no_arguments(subcommand: &str, rest: &[OsString]) -> anyhow::Result<()> {
    if let Some(extra) = rest.first() {
        anyhow::bail!("`cargo xtask {subcommand}` takes no arguments, got {:?}", extra.to_string_lossy());
    }
    Ok(())
}

/// The workspace root: the parent of this crate's folder.
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map(PathBuf::from).unwrap_or(manifest_dir)
}

/// A `cargo` command run from the workspace root, with the cargo that runs
/// xtask (`$CARGO`) when there is one.
fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    command
}
