//! Running jobs survive a daemon restart (issue 12, item 2): local agents
//! outlive a daemon killed with SIGKILL, keep their job running, come back
//! to the restarted daemon and deliver the result, so each job runs once.
//! Real daemon, real agents, real SIGKILLs; jobs count their own runs by
//! appending their name to a file.
//!
//! The default run is a short drill (120 jobs, 5 kills);
//! `CREW_DRILL_JOBS=500 CREW_DRILL_KILLS=20 cargo nextest run -p crew-cli -E
//! 'test(running_jobs_survive)'` runs the full drill (about 15 s),
//! and `CREW_DRILL_LOG=FILE` keeps the daemon's log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, crew, poll_until, run, signal, unique};

fn crew_ok(dir: &Path, mark: &str, args: &[&str]) -> crate::support::Finished {
    crate::support::crew_ok_within(dir, mark, args, Duration::from_secs(180))
}

/// Starts the daemon of `dir` if needed, SIGKILLs it and waits until it is
/// gone (or a zombie).
fn kill_daemon(dir: &Path, mark: &str) {
    let up: serde_json::Value =
        serde_json::from_str(crew_ok(dir, mark, &["up", "--json"]).stdout.trim()).expect("json");
    let pid = up["pid"].as_u64().expect("the daemon's pid") as u32;
    signal(pid, libc::SIGKILL);
    assert!(
        poll_until(DEADLINE, || !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))),
        "the daemon did not die"
    );
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The drill: jobs that each append one line, four local workers, the
/// daemon SIGKILLed (and started again by the next command) many times
/// while they run. No line may be missing and every job has exactly one
/// output record; no line may appear twice (jobs running at a kill are
/// kept by their agents, not run again).
#[test]
fn running_jobs_survive_daemon_sigkills_and_run_once() {
    let jobs = env_number("CREW_DRILL_JOBS", 120);
    let kills = env_number("CREW_DRILL_KILLS", 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("drill-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let file = d.join("lines");
    let lines: String = (0..jobs)
        .map(|i| format!("{{\"name\": \"j{i}\", \"shell\": \"echo j{i} >> {}; sleep 0.05\"}}\n", file.display()))
        .collect();
    std::fs::write(d.join("jobs.txt"), lines).expect("write");
    crew_ok(d, &mark, &["recruit", "--workers", "4", "--class", "local"]);
    crew_ok(d, &mark, &["send", "--file", "jobs.txt"]);
    // Spread the kills over the run: 4 workers do about 60 jobs a second.
    let pause = Duration::from_millis((jobs as u64 * 1000 / 60 / (kills as u64 + 1)).clamp(150, 2000));
    for _ in 0..kills {
        std::thread::sleep(pause);
        kill_daemon(d, &mark);
        // Started again at once, as a supervisor would: the workers come
        // back within their window (a daemon down for longer than the
        // window has its running jobs re-run, counted as crashes).
        crew_ok(d, &mark, &["up"]);
    }
    crew_ok(d, &mark, &["wait"]);
    let out = run(crew(d, &mark, &["receive", "--all", "--json"]), None, Duration::from_secs(180));
    let mut records: BTreeMap<String, usize> = BTreeMap::new();
    let mut retried = 0;
    for r in out.records() {
        assert_eq!(r["status"], "succeeded", "{r}");
        if r["attempt"].as_u64() != Some(1) {
            retried += 1;
        }
        *records.entry(r["name"].as_str().expect("a name").to_owned()).or_insert(0) += 1;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&file).unwrap_or_default().lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    let names: Vec<String> = (0..jobs).map(|i| format!("j{i}")).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !counts.contains_key(*n)).collect();
    let twice: Vec<&String> = names.iter().filter(|n| counts.get(*n).is_some_and(|c| *c > 1)).collect();
    let records_wrong: Vec<(&String, usize)> =
        names.iter().map(|n| (n, records.get(n).copied().unwrap_or(0))).filter(|(_, c)| *c != 1).collect();
    if let Ok(keep) = std::env::var("CREW_DRILL_LOG") {
        let _ = std::fs::copy(d.join(".crew/daemon.log"), keep);
    }
    eprintln!(
        "drill: {jobs} jobs, {kills} daemon SIGKILLs: {} lines missing, {} lines twice, {retried} records not attempt 1",
        missing.len(),
        twice.len()
    );
    assert!(missing.is_empty(), "lines missing: {missing:?}");
    assert!(records_wrong.is_empty(), "jobs without exactly one output record: {records_wrong:?}");
    if !twice.is_empty() {
        // What the daemons said of losses and resumes, to tell a slow
        // machine (an agent back after its window) from a bug.
        let log = std::fs::read_to_string(d.join(".crew/daemon.log")).unwrap_or_default();
        let said: Vec<&str> = log
            .lines()
            .filter(|l| ["resum", "lost", "crash", "window", "WARN", "ERROR"].iter().any(|w| l.contains(w)))
            .take(60)
            .collect();
        panic!("jobs that ran twice: {twice:?}; the daemon log said:\n{}", said.join("\n"));
    }
}

/// One job running when the daemon is SIGKILLed: it is not killed, not run
/// again and not counted a crash; its output comes from the restarted
/// daemon with attempt 1.
#[test]
fn a_job_running_at_a_daemon_sigkill_finishes_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("survive-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let file = d.join("runs");
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    let script = format!("echo start >> {f}; sleep 2; echo end >> {f}", f = file.display());
    crew_ok(d, &mark, &["send", "--", "sh", "-c", &script]);
    assert!(poll_until(DEADLINE, || std::fs::read_to_string(&file).is_ok_and(|s| s.contains("start"))));
    kill_daemon(d, &mark);
    let out = crew_ok(d, &mark, &["receive", "--wait", "--json", "--timeout", "60s"]);
    let records = out.records();
    assert_eq!(records.len(), 1, "{out}");
    assert_eq!(records[0]["status"], "succeeded", "{out}");
    assert_eq!(records[0]["attempt"], 1, "the attempt went on, not a new one: {out}");
    assert_eq!(std::fs::read_to_string(&file).expect("runs"), "start\nend\n", "the job ran once, whole");
}
