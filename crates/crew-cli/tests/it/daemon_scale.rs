//! The daemon at scale, in small: a job file streamed to the daemon is still
//! all or nothing; a streamed `receive` hands out each output once even when
//! its client is SIGKILLed in the middle; the journal of a finished session
//! shrinks, and a restart after compactions keeps every output not yet
//! received. (The sizes that matter — a million jobs — are measured by
//! `cargo xtask bench`, figure 10; these use thousands.)

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, crew, crew_ok, poll_until, run, signal, unique};

/// A file of `n` no-op job lines, with `bad` (1-based) replaced by `line`.
fn job_file(path: &Path, n: usize, bad: Option<(usize, &str)>) {
    let mut text = String::with_capacity(n * 20);
    for i in 1..=n {
        match bad {
            Some((at, line)) if at == i => text.push_str(line),
            _ => text.push_str(r#"{"builtin":"noop"}"#),
        }
        text.push('\n');
    }
    std::fs::write(path, text).expect("write the job file");
}

/// The job counts of `crew status --json`: queued, running, ready.
fn counts(d: &Path, mark: &str) -> (u64, u64, u64) {
    let s: serde_json::Value =
        serde_json::from_str(crew_ok(d, mark, &["status", "--json"]).stdout.trim()).expect("status JSON");
    let j = &s["jobs"];
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    (n("queued"), n("running"), n("ready"))
}

/// The ids in the journal's `received` records.
fn journaled_received(d: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(d.join(".crew/journal.jsonl")).expect("journal");
    let mut ids = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a journal record");
        if v["t"] == "received" {
            let list = v["ids"].as_array().expect("received ids");
            ids.extend(list.iter().map(|i| i.as_u64().expect("an id")));
        }
    }
    ids
}

fn ids_of(out: &str) -> Vec<u64> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a record")["id"].as_u64().expect("an id"))
        .collect()
}

/// A file of 60,000 jobs (over a megabyte: several pieces reach the daemon
/// before the end) whose last lines are bad: the daemon has accepted
/// nothing, and every bad line is reported with its number. A file bad in
/// its first lines does not even start the daemon.
#[test]
fn a_bad_line_late_in_a_streamed_job_file_accepts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("scale-send-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let early = d.join("early.txt");
    job_file(&early, 10, Some((3, r#"{"builtin":"noop","timeout":"soon"}"#)));
    let out = run(crew(d, &mark, &["send", "--file", "early.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("early.txt:3: "), "{out}");
    assert!(!d.join(".crew/daemon.pid").exists(), "a bad first piece started the daemon");

    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    let late = d.join("late.txt");
    job_file(&late, 60_000, Some((59_990, r#"{"builtin":"noop","name":"x","nope":1}"#)));
    let mut text = std::fs::read_to_string(&late).unwrap();
    text.push_str("{\"builtin\":\"noop\",\"name\":\"a\"}\n{\"builtin\":\"noop\",\"name\":\"a\"}\n");
    std::fs::write(&late, text).unwrap();
    let out = run(crew(d, &mark, &["send", "--file", "late.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("late.txt:59990: "), "{out}");
    assert!(out.stderr.contains("late.txt:60002: duplicate job name \"a\" (first used on line 60001)"), "{out}");
    assert_eq!(counts(d, &mark), (0, 0, 0), "a job of a refused file was accepted");

    // The same file without its bad lines goes whole.
    let good = d.join("good.txt");
    job_file(&good, 60_000, None);
    let out = crew_ok(d, &mark, &["send", "--file", "good.txt"]);
    let ids: Vec<u64> = out.stdout.lines().map(|l| l.parse().expect("an id")).collect();
    assert_eq!(ids.len(), 60_000);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "ids in file order");
}

/// A `receive --all` whose client is SIGKILLed in the middle of the answer
/// (it blocks on a full stdout pipe, so the daemon's stream stalls on it):
/// every output the daemon handed to that connection is journaled received
/// and never delivered again; every other one is received by the next
/// `receive`; what the killed client printed is among what was handed out.
#[test]
fn a_receive_killed_mid_stream_hands_out_each_output_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("scale-recv-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    const N: u64 = 20_000;
    crew_ok(d, &mark, &["recruit", "--workers", "2", "--class", "local"]);
    job_file(&d.join("jobs.txt"), N as usize, None);
    let sent = crew_ok(d, &mark, &["send", "--file", "jobs.txt"]);
    let all: BTreeSet<u64> = sent.stdout.lines().map(|l| l.parse().expect("an id")).collect();
    crate::support::crew_ok_within(d, &mark, &["wait"], Duration::from_secs(120));

    let mut cmd = crew(d, &mark, &["receive", "--all", "--json"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start crew receive");
    let mut stdout = child.stdout.take().expect("piped stdout");
    // The client fills its stdout pipe (64 KiB, a small share of the
    // answer) and blocks: the answer is stuck in the middle.
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("the first byte of the answer");
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    let mut printed = first.to_vec();
    stdout.read_to_end(&mut printed).expect("read what it printed");
    let printed = String::from_utf8_lossy(&printed);
    // Whole lines only: the last may be cut.
    let whole = match printed.rfind('\n') {
        Some(i) => &printed[..=i],
        None => "",
    };
    let p1: BTreeSet<u64> = ids_of(whole).into_iter().collect();
    assert!(!p1.is_empty(), "the client printed nothing before it was killed");

    // Handed out to the killed client: journaled received, once each.
    let handed = journaled_received(d);
    let h1: BTreeSet<u64> = handed.iter().copied().collect();
    assert_eq!(h1.len(), handed.len(), "an output was handed out twice");
    assert!(p1.is_subset(&h1), "the client printed an output that was not journaled received");
    assert!((h1.len() as u64) < N, "the whole answer was handed out to a client that was stuck");

    let again = crate::support::crew_ok_within(d, &mark, &["receive", "--all", "--json"], Duration::from_secs(60));
    let r2 = ids_of(&again.stdout);
    let r2s: BTreeSet<u64> = r2.iter().copied().collect();
    assert_eq!(r2s.len(), r2.len(), "the second receive printed an output twice");
    assert!(h1.is_disjoint(&r2s), "an output handed out to the killed client was delivered again");
    let union: BTreeSet<u64> = h1.union(&r2s).copied().collect();
    assert_eq!(union, all, "an output was lost: neither handed out before the kill nor received after it");
    let out = run(crew(d, &mark, &["receive", "--all", "--json"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "nothing is left: {out}");
}

/// A session of 5,000 jobs, all received: the journal shrinks to a few
/// records before the last receive answers; a SIGKILL right after it and
/// a restart then find nothing to do.
/// Before that, with compactions every few hundred kilobytes, a restart
/// after a SIGKILL keeps every output not yet received, once.
#[test]
fn the_journal_of_a_finished_session_shrinks_and_restarts_keep_unreceived_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("scale-journal-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    std::fs::create_dir_all(d.join(".crew")).unwrap();
    std::fs::write(d.join(".crew/crew.toml"), "[daemon]\njournal_compact = \"256KiB\"\n").unwrap();
    const N: usize = 5_000;
    crew_ok(d, &mark, &["recruit", "--workers", "2", "--class", "local"]);
    job_file(&d.join("jobs.txt"), N, None);
    crew_ok(d, &mark, &["send", "--file", "jobs.txt"]);
    crate::support::crew_ok_within(d, &mark, &["wait"], Duration::from_secs(120));
    let one = crew_ok(d, &mark, &["receive", "--json"]);
    let first = ids_of(&one.stdout);
    assert_eq!(first.len(), 1);
    kill_daemon(d, &mark);
    let out = crate::support::crew_ok_within(d, &mark, &["receive", "--all", "--json"], Duration::from_secs(60));
    let rest = ids_of(&out.stdout);
    let set: BTreeSet<u64> = rest.iter().copied().collect();
    assert_eq!(rest.len(), N - 1, "every output not received before the kill, once: {}", out.stderr);
    assert_eq!(set.len(), N - 1);
    assert!(!set.contains(&first[0]), "an output received before the kill came again");

    // Everything was received: the journal shrank to what a daemon with
    // no job holds (its recruit, its workers, the next id) before the last
    // receive answered, so a SIGKILL right after it restarts from that.
    let journal = d.join(".crew/journal.jsonl");
    let size = std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    assert!(size < 16 * 1024, "the journal of a finished session is {size} bytes when its last receive answers");
    kill_daemon(d, &mark);
    assert_eq!(counts(d, &mark), (0, 0, 0));
    let out = run(crew(d, &mark, &["receive", "--all", "--json"]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "nothing to receive after the restart: {out}");
    // Ids are not reused after the compaction.
    let next = crew_ok(d, &mark, &["send", "--", "true"]);
    assert_eq!(next.stdout.trim().parse::<usize>().expect("an id"), N + 1);
}

/// SIGKILLs the daemon of `dir` and waits until it is gone.
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
