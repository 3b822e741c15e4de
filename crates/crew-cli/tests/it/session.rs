//! The daemon commands end to end: a scripted session (`crew recruit`,
//! `send`, `receive`, `status`, `down`) against a real daemon in a temp
//! project folder.

use std::path::Path;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, assert_none_marked, crew, crew_ok, run, unique};

#[test]
fn a_scripted_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("session-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };

    let out = crew_ok(d, &mark, &["recruit", "--workers", "4", "--class", "local"]);
    assert_eq!(out.stdout.lines().count(), 4, "{out}");
    let out = crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local", "--tags", "gpu", "--json"]);
    let gpu_slots: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("recruit --json");
    let gpu_slot = gpu_slots["slots"][0].as_str().expect("a slot name").to_owned();

    let out = crew_ok(d, &mark, &["send", "--tags", "gpu", "--", "sh", "-c", "echo $CREW_WORKER"]);
    let gpu_id: u64 = out.stdout.trim().parse().expect("send prints the id");
    crew_ok(d, &mark, &["send", "--", "echo", "hi"]);

    let out = crew_ok(d, &mark, &["receive", "--wait", "--all", "--json"]);
    let records = out.records();
    assert_eq!(records.len(), 2, "{out}");
    let gpu = records.iter().find(|r| r["id"] == gpu_id).expect("the gpu job's output");
    assert_eq!(gpu["status"], "succeeded", "{out}");
    assert_eq!(gpu["stdout"]["text"].as_str().map(str::trim), Some(gpu_slot.as_str()), "{out}");
    assert_eq!(gpu["slot"].as_str(), Some(gpu_slot.as_str()), "{out}");

    let out = crew_ok(d, &mark, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("status --json");
    let slots = status["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 5, "{out}");
    let tagged = slots.iter().find(|s| s["name"] == gpu_slot.as_str()).expect("the gpu slot");
    assert!(tagged["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == "gpu")), "{out}");

    // Nothing is left to receive: exit status 1.
    let out = run(crew(d, &mark, &["receive"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");

    let out = run(crew(d, &mark, &["send", "--tags", "nope", "--", "true"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.starts_with("crew: ") && out.stderr.contains("nope") && out.stderr.contains("gpu"), "{out}");

    let out = run(crew(d, &mark, &["sendable", "--tags", "gpu"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = run(crew(d, &mark, &["sendable", "--tags", "nope"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");

    crew_ok(d, &mark, &["down"]);
    assert_none_marked(&mark, Duration::from_secs(10));
    // A second `down` finds nothing and says so, successfully.
    let out = crew_ok(d, &mark, &["down"]);
    assert!(out.stderr.contains("no daemon"), "{out}");
}

#[test]
fn one_slot_runs_jobs_in_one_agent_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("agent-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local", "--idle", "5m"]);
    let mut parents = Vec::new();
    for _ in 0..2 {
        crew_ok(d, &mark, &["send", "--", "sh", "-c", "echo $PPID"]);
        let out = crew_ok(d, &mark, &["receive", "--wait", "--json"]);
        let records = out.records();
        assert_eq!(records.len(), 1, "{out}");
        parents.push(records[0]["stdout"]["text"].as_str().unwrap_or_default().trim().to_owned());
    }
    assert!(!parents[0].is_empty(), "{parents:?}");
    assert_eq!(parents[0], parents[1], "two jobs on one slot ran under different agents");
    crew_ok(d, &mark, &["down"]);
    assert_none_marked(&mark, Duration::from_secs(10));
}

/// The figure: 1,000 `crew send` invocations in a loop, then one
/// `crew receive --all --wait` returns exactly those 1,000 outputs.
#[test]
fn a_thousand_sends_then_one_receive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("thousand-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    crew_ok(d, &mark, &["recruit", "--workers", "2", "--class", "local"]);
    let mut ids = Vec::new();
    for i in 0..1000 {
        let out = crew_ok(d, &mark, &["send", "--", "echo", &i.to_string()]);
        ids.push(out.stdout.trim().parse::<u64>().expect("an id"));
    }
    let out = run(crew(d, &mark, &["receive", "--wait", "--all", "--json"]), None, Duration::from_secs(120));
    assert_eq!(out.code(), Some(0), "{out}");
    let mut got: Vec<u64> = out.records().iter().filter_map(|r| r["id"].as_u64()).collect();
    got.sort_unstable();
    ids.sort_unstable();
    assert_eq!(got, ids);
    crew_ok(d, &mark, &["down"]);
    assert_none_marked(&mark, Duration::from_secs(10));
}

#[test]
fn a_bad_job_file_is_refused_whole_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("sendfile-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(d.join("jobs.txt"), "echo a\n{\"shell\":\"x\",\"bogus\":1}\n").expect("write");
    let out = run(crew(d, &mark, &["send", "--file", "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.starts_with("jobs.txt:2: ") && out.stderr.contains("bogus"), "{out}");
    assert!(!d.join(".crew").exists(), "a bad file started a daemon");
}

/// Two projects on one machine do not interfere: each folder has its own
/// daemon, slots and jobs, and stopping one leaves the other running.
#[test]
fn two_projects_do_not_interfere() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let mark = unique("two-projects-");
    let _reaper = Reaper::new(&mark);
    let _down_a = Down { dir: a.path(), mark: &mark };
    let _down_b = Down { dir: b.path(), mark: &mark };
    crew_ok(a.path(), &mark, &["recruit", "--workers", "1", "--class", "local"]);
    crew_ok(b.path(), &mark, &["recruit", "--workers", "2", "--class", "local", "--tags", "big"]);
    let pid = |dir: &Path| {
        let st: serde_json::Value =
            serde_json::from_str(&crew_ok(dir, &mark, &["status", "--json"]).stdout).expect("json");
        (st["pid"].as_u64(), st["slots"].as_array().map(Vec::len))
    };
    let (pa, na) = pid(a.path());
    let (pb, nb) = pid(b.path());
    assert_ne!(pa, pb, "one daemon per project");
    assert_eq!((na, nb), (Some(1), Some(2)));
    crew_ok(a.path(), &mark, &["send", "--", "echo", "from-a"]);
    crew_ok(b.path(), &mark, &["send", "--tags", "big", "--", "echo", "from-b"]);
    let got = |dir: &Path| {
        let out = run(crew(dir, &mark, &["receive", "--wait", "--all", "--json"]), None, DEADLINE);
        assert_eq!(out.code(), Some(0), "{out}");
        out.records()
            .iter()
            .map(|r| r["stdout"]["text"].as_str().unwrap_or_default().trim().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(got(a.path()), vec!["from-a"]);
    crew_ok(a.path(), &mark, &["down"]);
    // b still serves.
    crew_ok(b.path(), &mark, &["send", "--tags", "big", "--", "echo", "still-b"]);
    assert_eq!(got(b.path()), vec!["from-b", "still-b"]);
}

/// The scenario, through the CLI: kill the daemon with SIGKILL while
/// 100 jobs are queued or running; the next `crew receive --all --wait`
/// (which starts a new daemon) returns exactly 100 outputs, each job once.
/// The daemon compacts its journal as it goes (a tiny threshold here), so
/// the kill may land just before, during or after a compaction.
#[test]
fn sigkill_of_the_daemon_loses_no_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("sigkill-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    std::fs::create_dir_all(d.join(".crew")).expect("project folder");
    std::fs::write(d.join(".crew/crew.toml"), "[daemon]\njournal_compact = 2048\n").expect("crew.toml");
    crew_ok(d, &mark, &["recruit", "--workers", "2", "--class", "local"]);
    // Jobs through first, received: the journal compacts (on a thread of
    // the daemon's, installed at a later commit).
    let first: String = (0..10).map(|i| format!("{{\"builtin\": \"noop\", \"args\": {i}}}\n")).collect();
    std::fs::write(d.join("first.txt"), first).expect("write");
    let mut compacted = false;
    for _ in 0..30 {
        crew_ok(d, &mark, &["send", "--file", "first.txt"]);
        let pre = run(crew(d, &mark, &["receive", "--wait", "--all", "--json"]), None, DEADLINE);
        assert_eq!(pre.records().len(), 10, "{pre}");
        let log = std::fs::read_to_string(d.join(".crew/daemon.log")).unwrap_or_default();
        if log.contains("journal compacted") {
            compacted = true;
            break;
        }
    }
    assert!(compacted, "no compaction logged");
    let lines: String = (0..100).map(|i| format!("{{\"name\": \"j{i}\", \"shell\": \"sleep 0.1\"}}\n")).collect();
    std::fs::write(d.join("jobs.txt"), lines).expect("write");
    crew_ok(d, &mark, &["send", "--file", "jobs.txt"]);
    let status: serde_json::Value =
        serde_json::from_str(&crew_ok(d, &mark, &["status", "--json"]).stdout).expect("status json");
    let pid = status["pid"].as_u64().expect("the daemon's pid") as u32;
    crate::support::signal(pid, libc::SIGKILL);
    assert!(
        crate::support::poll_until(DEADLINE, || !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))),
        "the daemon did not die"
    );
    let out = run(crew(d, &mark, &["receive", "--wait", "--all", "--json"]), None, Duration::from_secs(120));
    assert_eq!(out.code(), Some(0), "{out}");
    let mut names: Vec<String> =
        out.records().iter().map(|r| r["name"].as_str().unwrap_or_default().to_owned()).collect();
    names.sort();
    let mut want: Vec<String> = (0..100).map(|i| format!("j{i}")).collect();
    want.sort();
    assert_eq!(names, want, "each of the 100 jobs exactly once");
    let again = run(crew(d, &mark, &["receive", "--all", "--json"]), None, DEADLINE);
    assert_eq!(again.records().len(), 0, "nothing is delivered twice: {again}");
}

/// The remaining commands through the CLI: `sendable`/`receivable` answer by
/// exit status, `wait`, `cancel`, `logs` (whole streams, also after
/// `receive`), `shutdown`, `dismiss`, `restart`.
#[test]
fn the_other_commands_do_what_they_say() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("other-commands-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let code = |args: &[&str]| run(crew(d, &mark, args), None, DEADLINE).code();
    crew_ok(d, &mark, &["recruit", "--workers", "2", "--class", "local", "--tags", "cpu"]);
    assert_eq!(code(&["sendable", "--tags", "cpu"]), Some(0));
    assert_eq!(code(&["sendable", "--tags", "gpu"]), Some(1));
    assert_eq!(code(&["receivable"]), Some(1), "nothing sent yet");

    // A long job, cancelled: it still ends in one `cancelled` output.
    let long = crew_ok(d, &mark, &["send", "--name", "long", "--", "sleep", "30"]).stdout.trim().to_owned();
    // A job whose stdout is larger than the inline cap.
    let big = crew_ok(d, &mark, &["send", "--", "sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo done >&2"])
        .stdout
        .trim()
        .to_owned();
    crew_ok(d, &mark, &["cancel", &long]);
    assert_eq!(code(&["cancel", "999999"]), Some(1), "an unknown id is a negative answer");
    crew_ok(d, &mark, &["wait", "--timeout", "60s"]);
    assert_eq!(code(&["receivable"]), Some(0));
    let out = run(crew(d, &mark, &["receive", "--all", "--json"]), None, DEADLINE);
    let records = out.records();
    let status_of = |id: &str| {
        records
            .iter()
            .find(|r| r["id"].as_u64().map(|n| n.to_string()).as_deref() == Some(id))
            .map(|r| r["status"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(status_of(&long).as_deref(), Some("cancelled"), "{out}");
    assert_eq!(status_of(&big).as_deref(), Some("succeeded"), "{out}");
    // `logs` after receive: the whole stdout, from the store.
    let logs = crew_ok(d, &mark, &["logs", &big]);
    assert_eq!(logs.stdout.len(), 100_000, "the whole stream, not the inline 64 KiB");
    assert_eq!(logs.stderr.trim(), "done");

    // Shutdown stops idle workers; the slots stay (down) and relaunch.
    crew_ok(d, &mark, &["shutdown"]);
    let st = || -> serde_json::Value {
        serde_json::from_str(&crew_ok(d, &mark, &["status", "--json"]).stdout).expect("status json")
    };
    assert!(
        crate::support::poll_until(DEADLINE, || st()["slots"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["state"] == "down"))),
        "{}",
        st()
    );
    assert_eq!(code(&["restart"]), Some(0));
    crew_ok(d, &mark, &["dismiss", "--slot", "local-2"]);
    assert_eq!(st()["slots"].as_array().map(Vec::len), Some(1), "{}", st());
    crew_ok(d, &mark, &["send", "--tags", "cpu", "--", "true"]);
    let got = run(crew(d, &mark, &["receive", "--wait", "--json"]), None, DEADLINE);
    assert_eq!(got.records()[0]["slot"], "local-1", "{got}");
}

#[test]
fn up_with_a_store_starts_the_daemon_on_it_and_refuses_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("up-store-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };

    let out = crew_ok(d, &mark, &["up", "--store", "elsewhere", "--json"]);
    let health: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("up --json");
    let store_root = d.join("elsewhere").canonicalize().expect("the store folder exists");
    assert_eq!(health["store"].as_str(), Some(format!("file://{}", store_root.display()).as_str()), "{out}");
    // Asking for the same store again is fine; another is refused.
    crew_ok(d, &mark, &["up", "--store", "elsewhere"]);
    let out = run(crew(d, &mark, &["up", "--store", "other"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("already runs with the store") && out.stderr.contains("crew down"), "{out}");
    // Job data goes to that store.
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    crew_ok(d, &mark, &["send", "--output", "o.txt", "--", "sh", "-c", "echo data > o.txt"]);
    let out = crew_ok(d, &mark, &["receive", "--wait", "--json"]);
    let record = &out.records()[0];
    assert_eq!(record["status"], "succeeded", "{out}");
    let key = record["objects"][0]["key"].as_str().expect("an output object");
    assert_eq!(std::fs::read_to_string(store_root.join(key)).expect("the object"), "data\n");
}
