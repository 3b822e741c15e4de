//! `cargo xtask bench`: crew's performance figures, each against a baseline
//! measured in the same run.
//!
//! The machines this runs on are shared and noisy, so no figure is an absolute
//! time on its own: each is the median of `--runs` runs, measured alternately
//! with its baseline (crew, baseline, crew, baseline, ...) so that a burst of
//! load elsewhere hits both, and reported with the ratio of the two. The
//! table is a report, not a test: a missed target still exits 0; only a
//! bench that could not measure exits non-zero.
//!
//! Measuring a debug build of crew-core would measure the debug build, so
//! this runs in two steps. The `cargo xtask` alias builds xtask in debug
//! without the `bench` feature; there, `bench` builds `crew` and xtask in
//! release with the feature (printing the cargo command) and runs that
//! binary with the same arguments. The release binary does the measuring
//! ([`measure`]), and also serves as the echo peer of the raw-TCP baselines
//! ([`echo`]) through a hidden first argument.

#[cfg(feature = "bench")]
mod daemon;
#[cfg(feature = "bench")]
mod dispatch;
#[cfg(feature = "bench")]
mod echo;
#[cfg(feature = "bench")]
mod measure;
#[cfg(feature = "bench")]
mod pipeline;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod store;

use std::ffi::OsString;

use anyhow::{Context, bail};

/// The `bench --help` text.
const HELP: &str = "\
Usage: cargo xtask bench [--quick] [--runs N] [--only 1,2,..] [--json]

Measures crew against baselines measured in the same run and prints a table:
figure, crew value, baseline value, ratio, target, PASS/MISS. Each value is the
median of N runs. Exits 0 even when a target is missed.

Options:
  --quick     a tenth of the default sizes: a smoke test of the bench itself
  --runs N    runs per figure (default 5)
  --only L    only these figures, e.g. --only 1,5 (of 1 to 10; default all)
  --json      print one JSON object instead of the table
  -h, --help  print this help

Figure 7 (crew make on 10,001 generated targets against GNU make) needs `make`.
Figure 8 runs a million no-op jobs through `crew run` (--quick: 100,000) and
reports its time and peak memory; figure 9 is the scheduler's cost per
dispatch from 10 to 10,000 slots.

Figure 10 (the daemon with a million jobs: send, end to end, receive memory,
memory per queued job, restart) takes minutes a run; `--quick` uses 100,000.

Figure 6 (a job's 1 GiB output through the store) measures the local store;
set CREW_BENCH_S3=s3://BUCKET/PREFIX (and the AWS variables) to measure an S3
store too.
";

/// Validated options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    /// Smaller sizes, for a smoke test.
    pub(crate) quick: bool,
    /// Runs per figure; each value is their median.
    pub(crate) runs: usize,
    /// One JSON object on stdout instead of the table.
    pub(crate) json: bool,
    /// Which of the figures 1 to 10 to measure (index 0 is figure 1).
    pub(crate) figures: [bool; FIGURES],
}

/// How many figures there are (their sub-rows, like 2a and 2b, go together).
pub(crate) const FIGURES: usize = 10;

impl Options {
    /// Whether figure `n` (1-based) is to be measured.
    // Only the measuring build asks; the relaunching one passes the flags on.
    #[cfg_attr(not(feature = "bench"), allow(dead_code))]
    pub(crate) fn wants(&self, n: usize) -> bool {
        n.checked_sub(1).and_then(|i| self.figures.get(i)).is_some_and(|w| *w)
    }
}

impl Options {
    /// Parses the arguments after `bench`; `None` when help was asked for.
    fn parse(args: &[OsString]) -> anyhow::Result<Option<Self>> {
        let mut opts = Self { quick: false, runs: 5, json: false, figures: [true; FIGURES] };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let Some(arg) = arg.to_str() else {
                bail!("`cargo xtask bench`: an argument is not valid UTF-8: {arg:?}");
            };
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (arg, None),
            };
            match flag {
                "-h" | "--help" => return Ok(None),
                "--quick" => opts.quick = true,
                "--json" => opts.json = true,
                "--only" => {
                    let value = value_of(flag, inline, args.next(), "a list of figures, e.g. --only 1,5")?;
                    opts.figures = [false; FIGURES];
                    for item in value.split(',') {
                        match item.trim().parse::<usize>() {
                            Ok(n @ 1..=FIGURES) => opts.figures[n - 1] = true,
                            _ => bail!("--only: expected figure numbers from 1 to {FIGURES}, got {item:?}"),
                        }
                    }
                }
                "--runs" => {
                    let value = value_of(flag, inline, args.next(), "a number, e.g. --runs 5")?;
                    opts.runs = match value.parse::<usize>() {
                        Ok(n) if n >= 1 => n,
                        _ => bail!("--runs: expected a whole number of at least 1, got {value:?}"),
                    };
                }
                _ => bail!("`cargo xtask bench`: unknown argument {arg:?}\n\n{HELP}"),
            }
        }
        Ok(Some(opts))
    }
}

/// The value of a flag: after `=`, or the next argument.
fn value_of(flag: &str, inline: Option<String>, next: Option<&OsString>, what: &str) -> anyhow::Result<String> {
    match inline {
        Some(v) => Ok(v),
        None => next.and_then(|v| v.to_str()).map(str::to_owned).with_context(|| format!("{flag} needs {what}")),
    }
}

/// Runs `cargo xtask bench` with the arguments after `bench`.
pub(crate) fn run(args: &[OsString]) -> anyhow::Result<()> {
    #[cfg(feature = "bench")]
    if args.first().is_some_and(|a| a == echo::PEER_ARG) {
        return echo::peer_main(&args[1..]);
    }
    let Some(opts) = Options::parse(args)? else {
        print!("{HELP}");
        return Ok(());
    };
    #[cfg(feature = "bench")]
    {
        measure::run(opts)
    }
    #[cfg(not(feature = "bench"))]
    {
        let _ = opts;
        relaunch_in_release(args)
    }
}

/// Builds `crew` and the measuring xtask in release, then runs the latter.
#[cfg(not(feature = "bench"))]
fn relaunch_in_release(args: &[OsString]) -> anyhow::Result<()> {
    // One cargo invocation for both, so that they share one build of
    // crew-core (same profile, same unified features).
    let build = ["build", "--release", "-p", "crew-cli", "-p", "xtask", "--features", "xtask/bench"];
    let shown = format!("cargo {}", build.join(" "));
    eprintln!("xtask: running `{shown}`");
    let status = crate::cargo().args(build).status().with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed: see the compiler's output above");
    }
    let exe = release_dir().join(format!("xtask{}", std::env::consts::EXE_SUFFIX));
    eprintln!("xtask: running `{} bench{}`", exe.display(), shown_args(args));
    let status = std::process::Command::new(&exe)
        .arg("bench")
        .args(args)
        .status()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// ` a b c`, for showing a command line.
#[cfg(not(feature = "bench"))]
fn shown_args(args: &[OsString]) -> String {
    args.iter().map(|a| format!(" {}", a.to_string_lossy())).collect()
}

/// Cargo's release folder: `$CARGO_TARGET_DIR/release` when set (relative
/// paths are from the workspace root, where xtask runs cargo), else
/// `target/release` in the workspace.
#[cfg(not(feature = "bench"))]
fn release_dir() -> std::path::PathBuf {
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_BUILD_TARGET_DIR"))
        .map_or_else(|| root.join("target"), |t| root.join(t));
    target.join("release")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Option<Options>> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Options::parse(&args)
    }

    #[test]
    fn options_default_and_flags() {
        let o = parse(&[]).unwrap().unwrap();
        assert!(!o.quick && !o.json && o.runs == 5);
        let o = parse(&["--quick", "--runs", "3", "--json"]).unwrap().unwrap();
        assert!(o.quick && o.json && o.runs == 3);
        assert_eq!(parse(&["--runs=7"]).unwrap().unwrap().runs, 7);
        assert!(parse(&["--help"]).unwrap().is_none());
        let o = parse(&["--only", "1,5"]).unwrap().unwrap();
        assert!(o.wants(1) && !o.wants(2) && o.wants(5) && !o.wants(6));
        assert!(parse(&["--only=3"]).unwrap().unwrap().wants(3));
    }

    #[test]
    fn options_refuse_bad_input() {
        assert!(parse(&["--runs", "0"]).is_err());
        assert!(parse(&["--runs", "x"]).is_err());
        assert!(parse(&["--runs"]).is_err());
        assert!(parse(&["--fast"]).is_err());
        assert!(parse(&["--only", "11"]).is_err());
        assert!(parse(&["--only", "1,x"]).is_err());
    }
}
