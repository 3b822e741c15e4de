//! Figure 7: `crew make` on a generated chain-and-fan pipeline of 10,000
//! `true` targets, against GNU make on the equivalent Makefile.
//! (7a is answered by the no-op memo, `crew_pipeline::memo`; 7d is the same
//! no-op with the memo spent, for information.)
//!
//! The pipeline: a source file fans out to 100 chains of 100 targets each
//! (every target `after` the one before it), and one last target is
//! after every chain's end (fan-in): 10,001 targets. The Makefile has the
//! same rules; its recipes `touch` the target (make's record of a build is
//! the file's time, crew's is the record in its store). 7a: a no-op
//! (everything up to date) against `make -q`; 7b: a full build on 2
//! workers against `make -j2`, each from nothing; 7c: the peak memory of
//! `crew make` during 7b.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::ensure;

use super::measure::progress;
use super::report::{Row, Target, Unit};
use super::store::run_sampled;

/// Longest a run may take.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// Writes `pipeline.toml`, `Makefile` and the source file into `dir`;
/// `chains` × `length` targets plus the fan-in.
fn generate(dir: &Path, chains: usize, length: usize) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("seed.txt"), "seed\n")?;
    let mut toml = String::new();
    let mut make = String::from(".POSIX:\nall: end\n");
    let mut ends = Vec::new();
    for c in 0..chains {
        for i in 0..length {
            let name = format!("c{c}_{i}");
            if i == 0 {
                let _ = writeln!(toml, "[targets.{name}]\ncommand = [\"true\"]\ninputs = [\"seed.txt\"]\n");
                let _ = writeln!(make, "{name}: seed.txt\n\ttouch {name}");
            } else {
                let prev = format!("c{c}_{}", i - 1);
                let _ = writeln!(toml, "[targets.{name}]\ncommand = [\"true\"]\nafter = [\"{prev}\"]\n");
                let _ = writeln!(make, "{name}: {prev}\n\ttouch {name}");
            }
        }
        ends.push(format!("c{c}_{}", length - 1));
    }
    let quoted: Vec<String> = ends.iter().map(|e| format!("\"{e}\"")).collect();
    let _ = writeln!(toml, "[targets.end]\ncommand = [\"true\"]\nafter = [{}]\n", quoted.join(", "));
    let _ = writeln!(make, "end: {}\n\ttouch end", ends.join(" "));
    std::fs::write(dir.join("pipeline.toml"), toml)?;
    std::fs::write(dir.join("Makefile"), make)?;
    Ok(chains * length + 1)
}

/// Runs `cmd` in `dir`; its wall time and the peak memory (KiB) of the
/// process itself (not its children).
fn timed(mut cmd: Command, dir: &Path, expect_success: bool) -> anyhow::Result<(f64, u64)> {
    run_sampled(cmd.current_dir(dir), Stdio::null(), expect_success, PATIENCE)
}

/// Figure 7 (7a, 7b, 7c).
pub(super) fn pipeline(crew: &Path, dir: &Path, chains: usize, runs: usize) -> anyhow::Result<Vec<Row>> {
    let work = dir.join("pipeline7");
    let n = generate(&work, chains, 100)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.args(args);
        c
    };
    let crew_make = |store: &str| {
        let mut c = Command::new(crew);
        c.args(["make", "--workers", "2", "--store", store]);
        c
    };
    let (mut full_crew, mut full_make, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=runs {
        let store = format!("store-{i}");
        let _ = std::fs::remove_dir_all(work.join(".crew"));
        let (c, peak) = timed(crew_make(&store), &work, true)?;
        clean_stamps(&work, chains)?;
        let (m, _) = timed(make(&["-j2", "-s"]), &work, true)?;
        progress("7b", i, runs, format!("crew make {c:.3} s ({:.1} MiB), make -j2 {m:.3} s", peak as f64 / 1024.0));
        full_crew.push(c);
        full_make.push(m);
        rss.push(peak as f64 / 1024.0);
    }
    let store = format!("store-{runs}");
    let (mut noop_crew, mut noop_make) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let (c, _) = timed(crew_make(&store), &work, true)?;
        let (m, _) = timed(make(&["-q"]), &work, true)?;
        progress("7a", i, runs, format!("crew make (no-op) {c:.3} s, make -q {m:.3} s"));
        noop_crew.push(c);
        noop_make.push(m);
    }
    // 7d: the same no-op with the memo spent (a source rewritten with the
    // same bytes: a new mtime), so crew parses, plans and checks it all.
    let (mut full_check, mut full_check_make) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        std::fs::write(work.join("seed.txt"), "seed\n")?;
        let (c, _) = timed(crew_make(&store), &work, true)?;
        let (m, _) = timed(make(&["-q"]), &work, false)?;
        progress("7d", i, runs, format!("crew make (no-op, memo spent) {c:.3} s, make -q {m:.3} s"));
        full_check.push(c);
        full_check_make.push(m);
    }
    ensure!(work.join("end").is_file(), "make did not build the fan-in target");
    Ok(vec![
        Row {
            id: "7a",
            figure: format!("no-op crew make, {n} targets up to date"),
            unit: Unit::Seconds,
            crew: noop_crew,
            baseline: noop_make,
            baseline_is: "make -q on the equivalent Makefile".into(),
            target: Target::RatioAtMost(1.5),
        },
        Row {
            id: "7d",
            figure: format!("no-op crew make, {n} targets, its no-op memo spent (full parse, plan and check)"),
            unit: Unit::Seconds,
            crew: full_check,
            baseline: full_check_make,
            baseline_is: "make -q on the equivalent Makefile".into(),
            target: Target::Info,
        },
        Row {
            id: "7b",
            figure: format!("full crew make of {n} `true` targets, 2 workers"),
            unit: Unit::Seconds,
            crew: full_crew,
            baseline: full_make,
            baseline_is: "make -j2 on the equivalent Makefile (recipes: touch)".into(),
            target: Target::RatioAtMost(1.5),
        },
        Row {
            id: "7c",
            figure: "peak memory of crew make during 7b".into(),
            unit: Unit::Mib,
            crew: rss,
            baseline: Vec::new(),
            baseline_is: String::new(),
            target: Target::Below(50.0),
        },
    ])
}

/// Removes make's stamp files, so that its next run builds everything.
fn clean_stamps(work: &Path, chains: usize) -> anyhow::Result<()> {
    for c in 0..chains {
        for i in 0..100 {
            let _ = std::fs::remove_file(work.join(format!("c{c}_{i}")));
        }
    }
    let _ = std::fs::remove_file(work.join("end"));
    Ok(())
}
