//! `crew make` and the other pipeline commands, end to end: the real
//! binary, real workers, the local store and the S3 emulator.

use std::path::Path;
use std::time::Duration;

use crate::support::{DEADLINE, Reaper, aws_crew, crew, poll_until, run, signal, start, unique};

const EXAMPLE: &str = r#"
[targets.raw]
command = ["sh", "-c", "seq 1 100 > raw.txt"]
outputs = ["raw.txt"]

[targets.total]
command = ["sh", "-c", "awk '{s+=$1} END {print s}' raw.txt data.csv > total.txt"]
inputs = ["raw.txt", "data.csv"]   # raw.txt is another target's output: a dependency; data.csv a source file
outputs = ["total.txt"]
env = { LC_ALL = "C" }            # declared environment: part of the target's identity
tags = ["big"]                    # routed like any job; timeout, retries, cpu, memory as in job lines
"#;

fn example(dir: &Path) {
    std::fs::write(dir.join("pipeline.toml"), EXAMPLE).expect("write pipeline");
    std::fs::write(dir.join("data.csv"), "1000\n2000\n").expect("write data");
}

/// The names of the targets that ran, from `crew make --json`.
fn ran(out: &crate::support::Finished) -> Vec<String> {
    let mut names: Vec<String> = out.records().iter().map(|r| r["name"].as_str().unwrap_or("?").to_owned()).collect();
    names.sort();
    names
}

fn make(dir: &Path, mark: &str, extra: &[&str]) -> crate::support::Finished {
    let mut args = vec!["make", "--json", "--workers", "2"];
    args.extend_from_slice(extra);
    run(crew(dir, mark, &args), None, DEADLINE)
}

#[test]
fn the_example_builds_then_is_a_no_op_then_rebuilds_only_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-example-");
    let _reaper = Reaper::new(&mark);
    example(dir.path());
    let out = make(dir.path(), &mark, &[]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(ran(&out), ["raw", "total"], "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("total.txt")).expect("total.txt"), "8050\n");
    assert!(dir.path().join("raw.txt").is_file(), "outputs go to the working tree");

    // Nothing changed: nothing runs.
    let out = make(dir.path(), &mark, &[]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(ran(&out).is_empty(), "{out}");
    let o = run(crew(dir.path(), &mark, &["outdated"]), None, DEADLINE);
    assert_eq!(o.code(), Some(0), "{o}");

    // Touching a source without changing it changes nothing (content, not time).
    std::fs::write(dir.path().join("data.csv"), "1000\n2000\n").expect("rewrite");
    let out = make(dir.path(), &mark, &[]);
    assert!(ran(&out).is_empty(), "{out}");

    // One source changes: only what depends on it runs.
    std::fs::write(dir.path().join("data.csv"), "1000\n2000\n5\n").expect("edit");
    let o = run(crew(dir.path(), &mark, &["outdated", "--json"]), None, DEADLINE);
    assert_eq!(o.code(), Some(1), "{o}");
    assert_eq!(o.records().len(), 1, "{o}");
    assert_eq!(o.records()[0]["target"], "total", "{o}");
    let why = run(crew(dir.path(), &mark, &["why", "total"]), None, DEADLINE);
    assert!(why.stdout.contains("input data.csv changed"), "{why}");
    let out = make(dir.path(), &mark, &[]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(ran(&out), ["total"], "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("total.txt")).expect("total.txt"), "8055\n");

    // The declared env is part of the identity.
    let edited = EXAMPLE.replace("LC_ALL = \"C\"", "LC_ALL = \"POSIX\"");
    std::fs::write(dir.path().join("pipeline.toml"), edited).expect("edit pipeline");
    let why = run(crew(dir.path(), &mark, &["why", "total", "--json"]), None, DEADLINE);
    let answer: serde_json::Value = serde_json::from_str(&why.stdout).expect("json");
    assert_eq!(answer["reasons"][0], "env LC_ALL changed: \"C\" -> \"POSIX\"", "{why}");

    // A lost working-tree output comes back from the store without running.
    std::fs::write(dir.path().join("pipeline.toml"), EXAMPLE).expect("restore pipeline");
    std::fs::remove_file(dir.path().join("raw.txt")).expect("rm");
    let out = make(dir.path(), &mark, &[]);
    assert!(ran(&out).is_empty(), "{out}");
    assert!(dir.path().join("raw.txt").is_file());
    // An edited output is put back as built, and the user is told.
    std::fs::write(dir.path().join("total.txt"), "edited\n").expect("edit output");
    let out = make(dir.path(), &mark, &[]);
    assert!(ran(&out).is_empty(), "{out}");
    assert!(out.stderr.contains("total.txt in the working tree differed from the built output"), "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("total.txt")).expect("total.txt"), "8055\n");

    let g = run(crew(dir.path(), &mark, &["graph"]), None, DEADLINE);
    assert!(g.stdout.starts_with("digraph pipeline {") && g.stdout.contains("n0 -> n1"), "{g}");
    let g = run(crew(dir.path(), &mark, &["graph", "--format", "mermaid"]), None, DEADLINE);
    assert!(g.stdout.contains("up_to_date"), "{g}");

    // clean forgets: everything runs again; gc then finds the old builds.
    let c = run(crew(dir.path(), &mark, &["clean", "raw"]), None, DEADLINE);
    assert_eq!(c.code(), Some(0), "{c}");
    let out = make(dir.path(), &mark, &[]);
    assert_eq!(ran(&out), ["raw"], "same content of raw.txt: total stays up to date\n{out}");
    let gc = run(crew(dir.path(), &mark, &["gc", "--older-than", "0s", "--json"]), None, DEADLINE);
    let answer: serde_json::Value = serde_json::from_str(&gc.stdout).expect("json");
    assert!(answer["deleted"].as_u64().unwrap_or(0) >= 2, "the first raw build and total's first build: {gc}");
    let out = make(dir.path(), &mark, &[]);
    assert!(ran(&out).is_empty(), "gc kept what records reference\n{out}");
}

#[test]
fn up_to_date_does_not_depend_on_the_shell_the_folder_or_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-env-");
    let _reaper = Reaper::new(&mark);
    example(dir.path());
    std::fs::write(
        dir.path().join("pipeline.toml"),
        format!("{EXAMPLE}\n[targets.envdump]\ncommand = \"env | sort > env.txt\"\noutputs = [\"env.txt\"]\nenv = {{ DECLARED = \"yes\" }}\n"),
    )
    .expect("write");
    let mut c = crew(dir.path(), &mark, &["make", "--json", "--workers", "2"]);
    c.env("CREW_TEST_LEAK", "from-the-shell");
    let out = run(c, None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(ran(&out), ["envdump", "raw", "total"]);
    let env = std::fs::read_to_string(dir.path().join("env.txt")).expect("env.txt");
    assert!(env.contains("DECLARED=yes"), "{env}");
    assert!(!env.contains("CREW_TEST_LEAK"), "the shell's variables reach the job:\n{env}");

    // Another folder, other variables: nothing runs.
    let file = dir.path().join("pipeline.toml");
    let file = file.to_str().expect("utf-8");
    let mut c = crew(elsewhere.path(), &mark, &["make", "--json", "-f", file]);
    c.env("CREW_TEST_LEAK", "other").env("LC_ALL", "C.UTF-8").env("TZ", "Asia/Tokyo");
    let out = run(c, None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(ran(&out).is_empty(), "{out}");
    assert!(!elsewhere.path().join(".crew").exists(), "the cache lives beside the pipeline file");

    // Through the daemon, on its recruited slots: still nothing runs...
    let down = || {
        let _ = run(crew(dir.path(), &mark, &["down"]), None, DEADLINE);
    };
    let _down = crate::support::OnDrop(&down);
    let r = run(
        crew(dir.path(), &mark, &["recruit", "--workers", "2", "--class", "local", "--tags", "big"]),
        None,
        DEADLINE,
    );
    assert_eq!(r.code(), Some(0), "{r}");
    let out = run(crew(dir.path(), &mark, &["make", "--json", "--daemon"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(ran(&out).is_empty(), "{out}");
    // ... and what changes runs there, once.
    std::fs::write(dir.path().join("data.csv"), "1\n").expect("edit");
    let out = run(crew(dir.path(), &mark, &["make", "--json", "--daemon"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(ran(&out), ["total"], "{out}");
    assert!(out.records()[0]["slot"].as_str().unwrap_or("").starts_with("local-"), "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("total.txt")).expect("total"), "5051\n");
    let out = make(dir.path(), &mark, &[]);
    assert!(ran(&out).is_empty(), "built by the daemon, up to date without it\n{out}");
    // The daemon's jobs get crew seed 0: another seed would be a lie in the records.
    let out = run(crew(dir.path(), &mark, &["make", "--daemon", "--seed", "3"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--seed 3 cannot be used with --daemon"), "{out}");
    // A target no recruited slot can run is bad input, said by the daemon.
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).expect("read");
    std::fs::write(
        dir.path().join("pipeline.toml"),
        format!("{text}\n[targets.gpu]\ncommand = \"true\"\ntags = [\"gpu\"]\n"),
    )
    .expect("write");
    let out = run(crew(dir.path(), &mark, &["make", "--daemon"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("gpu"), "{out}");
}

#[test]
fn keep_going_builds_what_does_not_depend_on_the_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-keep-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(
        dir.path().join("pipeline.toml"),
        r#"
[targets.bad]
command = "echo oops >&2; exit 3"
[targets.after_bad]
command = "true"
after = ["bad"]
[targets.good1]
command = "touch g1"
outputs = ["g1"]
[targets.good2]
command = "touch g2"
outputs = ["g2"]
[targets.liar]
command = "true"
outputs = ["promised.txt"]
"#,
    )
    .expect("write");
    // One worker holds two jobs: bad and good1 go first (name order); the
    // failure stops the rest from starting.
    let out = run(crew(dir.path(), &mark, &["make", "--json", "--workers", "1"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(!ran(&out).contains(&"good2".to_owned()), "a target started after the failure: {out}");
    assert!(out.stderr.contains("target bad failed: failed: exited with status 3"), "{out}");

    let out = run(crew(dir.path(), &mark, &["make", "--json", "--workers", "1", "--keep-going"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(dir.path().join("g1").is_file() && dir.path().join("g2").is_file(), "{out}");
    assert!(out.stderr.contains("target after_bad not built: bad failed"), "{out}");
    assert!(out.stderr.contains("declared output promised.txt was not produced"), "{out}");
    assert!(!ran(&out).contains(&"after_bad".to_owned()), "{out}");
    let o = run(crew(dir.path(), &mark, &["outdated"]), None, DEADLINE);
    let listed: Vec<&str> = o.stdout.lines().map(|l| l.split(':').next().unwrap_or("")).collect();
    assert_eq!(listed, ["after_bad", "bad", "liar"], "{o}");
}

#[test]
fn dynamic_branches_and_a_combine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-dyn-");
    let _reaper = Reaper::new(&mark);
    std::fs::create_dir(dir.path().join("data")).expect("mkdir");
    for (name, n) in [("a", 1), ("b", 2)] {
        std::fs::write(dir.path().join(format!("data/{name}.csv")), format!("{n}\n")).expect("write");
    }
    std::fs::write(
        dir.path().join("pipeline.toml"),
        r#"
[targets.samples]
command = "printf 'x\ny\n\nz\n' > samples.txt"
outputs = ["samples.txt"]

[targets.fit]
command = "echo fit-{s} > fit_{s}.txt"
map = { s = { lines = "samples.txt" } }
outputs = ["fit_{s}.txt"]

[targets.double]
command = ["sh", "-c", "echo $(( $(cat {file}) * 2 )) > {file}.2"]
map = { file = "data/*.csv" }
inputs = ["{file}"]
outputs = ["{file}.2"]

[targets.all]
command = "cat fit_*.txt data/*.2 > all.txt"
inputs = [{ target = "fit" }, { target = "double" }]
outputs = ["all.txt"]
fetch = true
"#,
    )
    .expect("write");
    let o = run(crew(dir.path(), &mark, &["outdated", "--json"]), None, DEADLINE);
    assert_eq!(o.code(), Some(1), "{o}");
    let out = make(dir.path(), &mark, &[]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        ran(&out),
        ["all", "double[data/a.csv]", "double[data/b.csv]", "fit[x]", "fit[y]", "fit[z]", "samples"],
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("all.txt")).expect("all"), "fit-x\nfit-y\nfit-z\n2\n4\n");
    let out = make(dir.path(), &mark, &[]);
    assert!(ran(&out).is_empty(), "{out}");
    // A new source file: one new branch and the combine.
    std::fs::write(dir.path().join("data/c.csv"), "3\n").expect("write");
    let out = make(dir.path(), &mark, &[]);
    assert_eq!(ran(&out), ["all", "double[data/c.csv]"], "{out}");
    // One branch by name.
    let out = run(crew(dir.path(), &mark, &["make", "--json", "fit[y]"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn bad_pipelines_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-bad-");
    let _reaper = Reaper::new(&mark);
    let cases: &[(&str, &str)] = &[
        (
            "[targets.a]\ncommand = \"touch ran\"\ninputs = [\"b.out\"]\noutputs = [\"a.out\"]\n[targets.b]\ncommand = \"touch ran\"\ninputs = [\"a.out\"]\noutputs = [\"b.out\"]\n",
            "dependency cycle: ",
        ),
        ("[targets.a]\ncommand = \"touch ran\"\nafter = [\"nope\"]\n", "names target \"nope\", which does not exist"),
        (
            "[targets.a]\ncommand = \"touch ran\"\noutputs = [\"x\"]\n[targets.b]\ncommand = \"touch ran\"\noutputs = [\"x\"]\n",
            "output x is also declared by target a",
        ),
        ("[targets.a]\ncommand = \"touch ran\"\ninputs = [\"missing.csv\"]\n", "input missing.csv is neither a file"),
        ("[targets.a]\ncommand = \"touch ran\"\n\n[targets.b\ncommand = 1\n", "pipeline.toml:4:"),
        ("[targets.a]\ncommand = \"touch ran\"\nmap = { s = \"none/*.csv\" }\n", "map variable s has no values"),
        ("[targets.a]\ncommand = \"touch ran\"\nmap = { s = [] }\n", "pipeline.toml:3:"),
        ("[targets.a]\ncommand = \"touch ran\"\ntimeout = \"soon\"\n", "pipeline.toml:3:11: target a: timeout"),
    ];
    for (text, expected) in cases {
        std::fs::write(dir.path().join("pipeline.toml"), text).expect("write");
        let out = run(crew(dir.path(), &mark, &["make"]), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{text}\n{out}");
        assert!(out.stderr.contains(expected), "expected {expected:?}:\n{text}\n{out}");
        assert!(!dir.path().join("ran").exists(), "something ran: {text}");
    }
    std::fs::write(dir.path().join("pipeline.toml"), "[targets.a]\ncommand = \"true\"\n").expect("write");
    let out = run(crew(dir.path(), &mark, &["make", "nope"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no target \"nope\""), "{out}");
    let out = run(crew(dir.path(), &mark, &["make", "--class", "nope"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    std::fs::remove_file(dir.path().join("pipeline.toml")).expect("rm");
    let out = run(crew(dir.path(), &mark, &["make"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("cannot read the pipeline file"), "{out}");
}

#[test]
fn ctrl_c_cancels_running_targets_and_records_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-int-");
    let _reaper = Reaper::new(&mark);
    let started = dir.path().join("started");
    std::fs::write(
        dir.path().join("pipeline.toml"),
        format!(
            "[targets.slow]\ncommand = \"touch {} && sleep 30 && touch out\"\noutputs = [\"out\"]\n",
            started.display()
        ),
    )
    .expect("write");
    let running = start(crew(dir.path(), &mark, &["make", "--json", "--workers", "1"]), None);
    assert!(poll_until(Duration::from_secs(20), || started.exists()), "the target never started");
    signal(running.pid, libc::SIGINT);
    let out = running.wait(Duration::from_secs(15));
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(out.records()[0]["status"], "cancelled", "{out}");
    let o = run(crew(dir.path(), &mark, &["why", "slow"]), None, DEADLINE);
    assert!(o.stdout.contains("never built"), "{o}");
}

#[test]
fn a_second_checkout_on_the_same_bucket_runs_nothing() {
    let Some(endpoint) = crew_store_s3::testing::endpoint("a_second_checkout_on_the_same_bucket_runs_nothing") else {
        return;
    };
    let bucket = crew_store_s3::testing::unique_bucket("crew-make");
    crew_store_s3::testing::create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let store = format!("s3://{bucket}/pipe");
    let mark = unique("make-s3-");
    let _reaper = Reaper::new(&mark);
    let first = tempfile::tempdir().expect("tempdir");
    let second = tempfile::tempdir().expect("tempdir");
    example(first.path());
    example(second.path());
    let args = ["make", "--json", "--workers", "2", "--store", &store];
    let out = run(aws_crew(first.path(), &mark, &endpoint, &args), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(ran(&out), ["raw", "total"], "{out}");
    let out = run(aws_crew(second.path(), &mark, &endpoint, &args), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(ran(&out).is_empty(), "{out}");
    assert_eq!(std::fs::read_to_string(second.path().join("total.txt")).expect("materialized"), "8050\n");
    assert_eq!(std::fs::read_to_string(second.path().join("raw.txt")).expect("materialized").lines().count(), 100);
}

#[test]
fn target_limits_reach_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("make-limits-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(
        dir.path().join("pipeline.toml"),
        "[targets.spin]\ncommand = \"while :; do :; done\"\ncpu = \"1s\"\nmemory = \"512MiB\"\ntimeout = \"60s\"\n",
    )
    .expect("write");
    let out = run(crew(dir.path(), &mark, &["make", "--json"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(out.records()[0]["status"], "cpu_limit", "{out}");
    std::fs::write(dir.path().join("pipeline.toml"), "[targets.a]\ncommand = \"true\"\nmemory = \"lots\"\n")
        .expect("write");
    let out = run(crew(dir.path(), &mark, &["make"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("pipeline.toml:3:10: target a: memory"), "{out}");
}

#[test]
fn the_no_op_memo_never_hides_a_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    let store_arg = store.path().to_string_lossy().into_owned();
    let mark = unique("make-memo-");
    let _reaper = Reaper::new(&mark);
    example(dir.path());
    let with_store = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["--store", store_arg.as_str()];
        args.extend_from_slice(extra);
        args
    };
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert_eq!(ran(&out), ["raw", "total"], "{out}");
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert!(ran(&out).is_empty(), "{out}");
    let memo = dir.path().join(".crew/pipeline/noop.json");
    assert!(memo.is_file(), "a no-op leaves its memo");
    // The memo's answer, then each thing it rests on changed in turn.
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert!(ran(&out).is_empty() && out.stderr.contains("2 up to date"), "{out}");
    // A working-tree output lost after the memo: copied back.
    std::fs::remove_file(dir.path().join("total.txt")).expect("rm");
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert!(ran(&out).is_empty(), "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("total.txt")).expect("total.txt"), "8050\n");
    // Another checkout writes the same store (other data): this one's
    // memo is spent by the store's new generation, and total runs again.
    example(other.path());
    std::fs::write(other.path().join("data.csv"), "1\n").expect("other data");
    let out = make(other.path(), &mark, &with_store(&[]));
    assert_eq!(ran(&out), ["total"], "{out}");
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert_eq!(ran(&out), ["total"], "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("total.txt")).expect("total.txt"), "8050\n");
    // Another seed, or only some targets asked for: another key.
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert!(ran(&out).is_empty(), "{out}");
    let out = make(dir.path(), &mark, &with_store(&["--seed", "7", "raw"]));
    assert_eq!(ran(&out), ["raw"], "{out}");
    // A source edited in place to the same size and time still counts.
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert_eq!(ran(&out), ["raw"], "{out}");
    std::fs::write(dir.path().join("data.csv"), "1000\n2001\n").expect("edit");
    let out = make(dir.path(), &mark, &with_store(&[]));
    assert_eq!(ran(&out), ["total"], "{out}");
    assert!(!memo.is_file() || out.code() == Some(0), "{out}");
}
