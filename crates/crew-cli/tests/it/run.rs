//! `crew run` end to end: output records, crashes, timeouts, signals, and
//! no process left behind.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    DEADLINE, Reaper, assert_none_marked, crew, describe, examples_jobs, marked_pids, pids_with_arg,
    pids_with_exact_arg, poll_until, run, signal, start, unique, unique_sleep,
};

/// Every field of the documented output record.
const FIELDS: [&str; 19] = [
    "v",
    "id",
    "name",
    "status",
    "exit_code",
    "signal",
    "error",
    "stdout",
    "stderr",
    "started",
    "finished",
    "wall_seconds",
    "cpu_seconds",
    "peak_rss_bytes",
    "slot",
    "class",
    "attempt",
    "seed",
    "tags",
];

const STATUSES: [&str; 6] = ["succeeded", "failed", "timed_out", "crashed", "cancelled", "launch_failed"];

/// Checks the shape of one record; returns it keyed by name for lookups.
fn check_record(r: &Value) {
    let obj = r.as_object().unwrap_or_else(|| panic!("a record is not an object: {r}"));
    for f in FIELDS {
        assert!(obj.contains_key(f), "field {f:?} missing in {r}");
    }
    assert_eq!(r["v"], 1, "{r}");
    assert!(r["id"].is_u64(), "{r}");
    assert!(STATUSES.contains(&r["status"].as_str().unwrap_or("")), "{r}");
    assert!(r["stdout"]["text"].is_string(), "{r}");
    assert!(r["stderr"]["text"].is_string(), "{r}");
    assert!(r["wall_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{r}");
    assert!(r["cpu_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{r}");
    assert!(r["peak_rss_bytes"].is_u64(), "{r}");
    assert!(r["attempt"].as_u64().is_some_and(|a| a >= 1), "{r}");
    assert!(r["seed"].is_u64(), "{r}");
    assert!(r["tags"].is_array(), "{r}");
    assert!(r["finished"].is_string(), "{r}");
    if r["status"] == "succeeded" {
        assert!(r["started"].is_string(), "{r}");
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["class"], "local", "{r}");
        assert!(r["slot"].as_str().is_some_and(|s| s.starts_with("local-")), "{r}");
    } else {
        assert!(r["error"].is_string(), "a record that did not succeed says why: {r}");
    }
}

/// Records by name (every record here must be named).
fn by_name(records: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for r in records {
        let name = r["name"].as_str().unwrap_or_else(|| panic!("unnamed record {r}")).to_owned();
        assert!(map.insert(name.clone(), r.clone()).is_none(), "two records for {name}");
    }
    map
}

fn job_lines(text: &str) -> usize {
    text.lines().filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).count()
}

fn write_jobs(dir: &Path, lines: &[String]) -> String {
    let path = dir.join("jobs.txt");
    std::fs::write(&path, lines.join("\n") + "\n").expect("cannot write the job file");
    path.to_string_lossy().into_owned()
}

#[test]
fn examples_run_as_a_table_and_as_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("examples-");
    let _reaper = Reaper::new(&mark);
    let file = examples_jobs();
    let file = file.to_str().expect("utf-8 path");
    let jobs = job_lines(&std::fs::read_to_string(file).expect("examples/jobs.txt"));
    assert_eq!(jobs, 10, "examples/jobs.txt changed; update this test");

    // The table: a header and one row per job.
    let out = run(crew(dir.path(), &mark, &["run", "--workers", "4", "--store", "store", file]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or("");
    assert!(header.contains("STATUS") && header.contains("NAME"), "{out}");
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), jobs, "one row per job\n{out}");
    assert!(rows.iter().all(|r| r.contains("succeeded")), "{out}");
    let ids: HashSet<&str> = rows.iter().filter_map(|r| r.split_whitespace().next()).collect();
    assert_eq!(ids.len(), jobs, "row ids are unique\n{out}");
    assert!(out.stderr.contains("10 succeeded"), "{out}");
    assert_none_marked(&mark, Duration::from_secs(3));

    // JSON Lines, twice: same names, same seeds.
    let mut seeds: Vec<HashMap<String, u64>> = Vec::new();
    for _ in 0..2 {
        let out = run(
            crew(dir.path(), &mark, &["run", "--workers", "4", "--store", "store", "--json", file]),
            None,
            DEADLINE,
        );
        assert_eq!(out.code(), Some(0), "{out}");
        assert!(out.stderr.is_empty(), "--json writes nothing else: {out}");
        let records = out.records();
        assert_eq!(records.len(), jobs, "one record per job\n{out}");
        records.iter().for_each(check_record);
        let ids: HashSet<u64> = records.iter().filter_map(|r| r["id"].as_u64()).collect();
        assert_eq!(ids.len(), jobs, "ids are unique\n{out}");
        assert!(records.iter().all(|r| r["status"] == "succeeded" && r["attempt"] == 1), "{out}");
        let named: HashMap<String, Value> = records
            .iter()
            .filter(|r| r["name"].is_string())
            .map(|r| (r["name"].as_str().unwrap_or("").to_owned(), r.clone()))
            .collect();
        assert_eq!(named.len(), 8, "{out}");
        let seeded = &named["seeded"];
        assert_eq!(
            seeded["stdout"]["text"],
            format!("job {} has seed {}\n", seeded["id"], seeded["seed"]),
            "CREW_JOB_ID and CREW_SEED are the record's id and seed"
        );
        assert_eq!(named["argv"]["stdout"]["text"], "no shell here\n");
        assert_eq!(named["env"]["stdout"]["text"], "hello, world\n");
        assert_eq!(named["stdin"]["stdout"]["text"], "SHOUT\n");
        assert_eq!(named["echo"]["stdout"]["text"], "a builtin says hi\n");
        assert_eq!(named["count"]["stdout"]["text"], "500500\n");
        assert!(named["nap"]["wall_seconds"].as_f64().is_some_and(|s| s >= 0.2), "{}", named["nap"]);
        // Ids follow the file's order: the lowest is the first line.
        let first = records.iter().min_by_key(|r| r["id"].as_u64()).expect("records");
        assert!(first["name"].is_null(), "{first}");
        assert!(first["stdout"]["text"].as_str().is_some_and(|t| t.starts_with("hello from local-")), "{first}");
        seeds.push(named.iter().map(|(n, r)| (n.clone(), r["seed"].as_u64().unwrap_or(0))).collect());
        assert_none_marked(&mark, Duration::from_secs(3));
    }
    assert_eq!(seeds[0], seeds[1], "the same name gets the same seed in every run");
    let distinct: HashSet<u64> = seeds[0].values().copied().collect();
    assert_eq!(distinct.len(), seeds[0].len(), "different names get different seeds");
}

#[test]
fn a_job_that_kills_its_worker_is_rerun_and_one_that_always_does_ends_crashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("crash-");
    let _reaper = Reaper::new(&mark);
    // Pairs of a job that kills its worker once and one that always does.
    // One worker: each job waits (prefetched) behind the one before it, so
    // a crash also takes down a worker that holds a finished result or a
    // job not yet started; neither may be charged the crash. (Three pairs,
    // because whether a finished result is still held is a race.)
    const PAIRS: usize = 3;
    let mut lines = Vec::new();
    for n in 1..=PAIRS {
        let flag = dir.path().join(format!("crashed-{n}"));
        let flag = flag.to_str().expect("utf-8 path");
        lines.push(format!(
            r#"{{"name":"crash-once-{n}","shell":"if [ ! -e {flag} ]; then touch {flag}; kill -9 $PPID; fi; echo survived"}}"#
        ));
        lines.push(format!(r#"{{"name":"crash-always-{n}","shell":"kill -9 $PPID","crashes_max":2}}"#));
    }
    lines.push(r#"{"name":"after","shell":"echo fine"}"#.to_owned());
    let file = write_jobs(dir.path(), &lines);
    let out =
        run(crew(dir.path(), &mark, &["run", "--workers", "1", "--store", "store", "--json", &file]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "a crashed job makes the run fail\n{out}");
    let records = out.records();
    records.iter().for_each(check_record);
    let r = by_name(&records);
    assert_eq!(r.len(), 2 * PAIRS + 1, "{out}");
    for n in 1..=PAIRS {
        let once = &r[&format!("crash-once-{n}")];
        assert_eq!(once["status"], "succeeded", "crash-once-{n}\n{out}");
        assert_eq!(once["attempt"], 2, "crash-once-{n}\n{out}");
        assert_eq!(once["stdout"]["text"], "survived\n", "crash-once-{n}\n{out}");
        let always = &r[&format!("crash-always-{n}")];
        assert_eq!(always["status"], "crashed", "crash-always-{n}\n{out}");
        assert_eq!(always["attempt"], 2, "crash-always-{n}\n{out}");
    }
    assert_eq!(r["after"]["status"], "succeeded", "{out}");
    assert_eq!(r["after"]["attempt"], 1, "{out}");
    assert_none_marked(&mark, Duration::from_secs(3));
}

#[test]
fn a_timed_out_job_ends_timed_out_and_leaves_no_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("timeout-");
    let secs = unique_sleep();
    let _reaper = Reaper::new(&mark).and_arg(&secs);
    let file = write_jobs(
        dir.path(),
        &[
            r#"{"name":"slow","shell":"sleep 30","timeout":"1s"}"#.to_owned(),
            format!(r#"{{"name":"spawner","shell":"sh -c 'sleep {secs} & sleep {secs}'","timeout":"1s"}}"#),
            format!(r#"{{"name":"argv","command":["sh","-c","sleep {secs} & sleep {secs} & wait"],"timeout":1}}"#),
        ],
    );
    let out =
        run(crew(dir.path(), &mark, &["run", "--workers", "3", "--store", "store", "--json", &file]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    let records = out.records();
    records.iter().for_each(check_record);
    let r = by_name(&records);
    assert_eq!(r.len(), 3, "{out}");
    for (name, rec) in &r {
        assert_eq!(rec["status"], "timed_out", "{name}: {out}");
        let wall = rec["wall_seconds"].as_f64().unwrap_or(f64::MAX);
        assert!((1.0..3.0).contains(&wall), "{name} ended {wall} s after it started, not within 3 s\n{out}");
    }
    assert!(out.elapsed < Duration::from_secs(15), "the run took {:?}", out.elapsed);
    let mut left = Vec::new();
    let gone = poll_until(Duration::from_secs(2), || {
        left = pids_with_arg(&secs);
        left.is_empty()
    });
    assert!(gone, "background processes of timed-out jobs survived: {}", describe(&left));
    assert_none_marked(&mark, Duration::from_secs(3));
}

/// Stops a run of long jobs with `sig` once they run: exit status 1, one
/// `cancelled` record per job, nothing left.
fn stopped_by(sig: libc::c_int) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("signal-");
    let secs = unique_sleep();
    let _reaper = Reaper::new(&mark).and_arg(&secs);
    let started = dir.path().join("started");
    std::fs::create_dir(&started).expect("mkdir");
    let s = started.to_str().expect("utf-8 path");
    let lines: Vec<String> = (1..=3)
        .map(|n| format!(r#"{{"name":"long-{n}","shell":"touch {s}/{n}; sleep {secs}; echo finished"}}"#))
        .collect();
    let file = write_jobs(dir.path(), &lines);
    let running = start(crew(dir.path(), &mark, &["run", "--workers", "2", "--store", "store", "--json", &file]), None);
    let count = || std::fs::read_dir(&started).map_or(0, Iterator::count);
    assert!(poll_until(Duration::from_secs(20), || count() == 2), "two jobs did not start ({} did)", count());
    // The marks work: the running jobs carry them.
    let sleepers = || pids_with_exact_arg(&secs);
    assert!(poll_until(Duration::from_secs(5), || sleepers().len() == 2), "{}", describe(&sleepers()));
    let marked = marked_pids(&mark);
    assert!(sleepers().iter().all(|p| marked.contains(p)), "jobs inherit the mark (the helper passes --env-inherit)");
    signal(running.pid, sig);
    let out = running.wait(DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    let records = out.records();
    records.iter().for_each(check_record);
    let r = by_name(&records);
    assert_eq!(r.len(), 3, "one record per job\n{out}");
    for (name, rec) in &r {
        assert_eq!(rec["status"], "cancelled", "{name}: {out}");
        assert!(!rec["stdout"]["text"].as_str().unwrap_or("").contains("finished"), "{name}: {out}");
    }
    assert_eq!(count(), 2, "the third job never started");
    assert_none_marked(&mark, Duration::from_secs(3));
}

#[test]
fn sigterm_cancels_the_run_and_leaves_no_process() {
    stopped_by(libc::SIGTERM);
}

#[test]
fn sigint_cancels_the_run_and_leaves_no_process() {
    stopped_by(libc::SIGINT);
}

#[test]
fn a_file_larger_than_what_run_holds_gets_one_record_per_line_even_when_stopped() {
    // `crew run` feeds the controller in chunks, keeping at most 65,536
    // jobs in it: here two long jobs hold both workers, so the no-op jobs
    // behind them fill that and the rest of the file waits. A signal then
    // must still give every line of the file one record.
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("feed-");
    let secs = unique_sleep();
    let _reaper = Reaper::new(&mark).and_arg(&secs);
    let started = dir.path().join("started");
    std::fs::create_dir(&started).expect("mkdir");
    let s = started.to_str().expect("utf-8 path");
    let noops = 70_000;
    let mut lines: Vec<String> =
        (1..=2).map(|n| format!(r#"{{"name":"long-{n}","shell":"touch {s}/{n}; sleep {secs}"}}"#)).collect();
    lines.extend((0..noops).map(|_| r#"{"builtin":"noop"}"#.to_owned()));
    let file = write_jobs(dir.path(), &lines);
    let running = start(crew(dir.path(), &mark, &["run", "--workers", "2", "--store", "store", "--json", &file]), None);
    let count = || std::fs::read_dir(&started).map_or(0, Iterator::count);
    assert!(poll_until(Duration::from_secs(30), || count() == 2), "the long jobs did not start ({} did)", count());
    signal(running.pid, libc::SIGINT);
    let out = running.wait(DEADLINE);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    let records = out.records();
    assert_eq!(records.len(), noops + 2, "one record per line");
    let ids: HashSet<u64> = records.iter().map(|r| r["id"].as_u64().expect("id")).collect();
    assert_eq!(ids.len(), noops + 2, "no record twice");
    assert!(records.iter().all(|r| r["status"] == "cancelled"), "every job was still waiting or running");
    assert_none_marked(&mark, Duration::from_secs(3));
}

#[test]
fn a_bad_line_at_the_end_of_a_large_file_stops_the_run_before_any_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("badend-");
    let _reaper = Reaper::new(&mark);
    let started = dir.path().join("started");
    std::fs::create_dir(&started).expect("mkdir");
    let s = started.to_str().expect("utf-8 path");
    let mut lines: Vec<String> = (0..20_000).map(|n| format!("touch {s}/{n}")).collect();
    lines.push(r#"{"shell":"true","tags":["gpu"]}"#.to_owned());
    lines.push(r#"{"shel":"true"}"#.to_owned());
    let file = write_jobs(dir.path(), &lines);
    let out = run(crew(dir.path(), &mark, &["run", "--workers", "2", "--store", "store", &file]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains(":20001: no worker would have tags [gpu]"), "{}", out.stderr);
    assert!(out.stderr.contains(":20002: "), "{}", out.stderr);
    assert_eq!(std::fs::read_dir(&started).map_or(0, Iterator::count), 0, "no job ran");
}
