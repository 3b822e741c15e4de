//! `cargo xtask fuzz`: coverage-guided fuzzing of the parsers that take
//! outside input, with libFuzzer on the stable toolchain.
//!
//! The targets live in crew-cli (`crates/crew-cli/src/fuzz.rs`): built with
//! `--cfg fuzzing` and the SanitizerCoverage pass, the `crew` binary is a
//! libFuzzer binary over them (the target picked by `CREW_FUZZ_TARGET`).
//! The build goes to its own folder (`<target dir>/fuzz`, with an explicit
//! `--target` so that build scripts and proc macros are not instrumented),
//! so it never disturbs the normal build. Each target keeps its corpus in
//! `<target dir>/fuzz/corpus/<name>` (starting from the target's seeds,
//! which the fuzz binary writes there); a crash or a hang leaves its input in
//! `<target dir>/fuzz/artifacts/<name>/` and fails the run.
//!
//! `cargo xtask fuzz [--time SECS | --runs N] [TARGET...]`: every target by
//! default, 10 s each. CI runs `--time 5`.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};

/// The targets of crew-cli's `fuzz` module.
const TARGETS: &[&str] = &["frame", "job_line", "journal", "api", "config"];

/// The rustc flags of the instrumented build (what cargo-fuzz passes,
/// without a sanitizer: those need a nightly toolchain).
const RUSTFLAGS: &str = "--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks -Awarnings";

/// The longest input libFuzzer makes (`-max_len`, its own default when
/// the corpus is empty, made explicit so that a corpus holding a longer
/// file does not raise it). Every target's cost grows with the input (each
/// line of a job file is a job to validate and size, each journal line a
/// record to replay and compact), and 4 KiB already holds dozens of job
/// lines, journal records or TOML tables: longer inputs add time per run,
/// not new paths.
const MAX_LEN: usize = 4096;

/// How long one input may run before libFuzzer reports a hang (`-timeout`,
/// seconds): the slowest input of a long run takes milliseconds.
const TIMEOUT_SECS: u32 = 10;

/// The host triple the instrumented build names explicitly.
const HOST: &str = "x86_64-unknown-linux-gnu";

/// How long each target runs.
enum Budget {
    Seconds(u64),
    Runs(u64),
}

/// Parses the arguments, builds, and runs each target in turn.
pub(crate) fn run(args: &[OsString]) -> anyhow::Result<()> {
    let mut budget = Budget::Seconds(10);
    let mut targets = Vec::new();
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let mut number = |flag: &str| -> anyhow::Result<u64> {
            let v = args.next().with_context(|| format!("{flag} needs a number"))?;
            v.parse().with_context(|| format!("{flag}: {v:?} is not a number"))
        };
        match arg.as_str() {
            "--time" => budget = Budget::Seconds(number("--time")?),
            "--runs" => budget = Budget::Runs(number("--runs")?),
            "-h" | "--help" => {
                println!(
                    "Usage: cargo xtask fuzz [--time SECS | --runs N] [TARGET...]\nTargets: {}",
                    TARGETS.join(" ")
                );
                return Ok(());
            }
            t if TARGETS.contains(&t) => targets.push(arg.clone()),
            other => bail!("unknown fuzz target or option {other:?}: the targets are {}", TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    let dir = target_dir().join("fuzz");
    eprintln!("xtask: building the fuzz binary (libFuzzer, instrumented) into {}", dir.display());
    let status = crate::cargo()
        .args(["build", "--release", "--target", HOST, "-p", "crew-cli", "--bin", "crew"])
        .env("CARGO_TARGET_DIR", &dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .status()
        .context("cannot start cargo build")?;
    if !status.success() {
        bail!("the fuzz build failed: see cargo's output above (it needs a C++ compiler for libFuzzer)");
    }
    let binary = dir.join(HOST).join("release").join("crew");
    for t in &targets {
        let corpus = dir.join("corpus").join(t);
        let artifacts = dir.join("artifacts").join(t);
        std::fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
        std::fs::create_dir_all(&artifacts).with_context(|| format!("cannot create {}", artifacts.display()))?;
        let limit = match budget {
            Budget::Seconds(s) => format!("-max_total_time={s}"),
            Budget::Runs(n) => format!("-runs={n}"),
        };
        eprintln!("xtask: fuzzing {t} ({limit})");
        let status = std::process::Command::new(&binary)
            .env("CREW_FUZZ_TARGET", t)
            .env("CREW_FUZZ_SEEDS", &corpus)
            .arg(limit)
            .arg(format!("-max_len={MAX_LEN}"))
            .arg(format!("-timeout={TIMEOUT_SECS}"))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus)
            .status()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        if !status.success() {
            bail!(
                "fuzz target {t} found a crash or a hang: its input is in {}; add it as a regression test in \
                 crates/crew-cli/src/fuzz.rs and fix the code",
                artifacts.display()
            );
        }
    }
    Ok(())
}

/// Cargo's target folder: `CARGO_TARGET_DIR`, else `target` in the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| crate::workspace_root().join("target"), PathBuf::from)
}
