//! `crew` as a command: validation before anything runs, exit statuses,
//! stdin, help, and `crew worker` started by hand.

use std::time::Duration;

use crate::support::{DEADLINE, Reaper, assert_none_marked, crew, run, unique};

#[test]
fn bad_lines_are_all_reported_and_nothing_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("badlines-");
    let _reaper = Reaper::new(&mark);
    let witness = dir.path().join("ran");
    let text = format!(
        "# a comment, then a good line that must not run\ntouch {}\n{}\n{}\n\n{}\n",
        witness.display(),
        r#"{"shell":"x","bogus":1}"#,
        r#"{"shell":"#,
        r#"{"command":[]}"#,
    );
    std::fs::write(dir.path().join("jobs.txt"), text).expect("write");
    let out = run(crew(dir.path(), &mark, &["run", "--workers", "1", "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("jobs.txt:")).collect();
    assert_eq!(errors.len(), 3, "one FILE:LINE: reason per bad line\n{out}");
    assert!(errors[0].starts_with("jobs.txt:3: ") && errors[0].contains("bogus"), "{out}");
    assert!(errors[1].starts_with("jobs.txt:4: ") && errors[1].contains("JSON"), "{out}");
    assert!(errors[2].starts_with("jobs.txt:6: ") && errors[2].contains("empty"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(!witness.exists(), "a good line of a bad file ran");
    assert!(!dir.path().join(".crew").exists(), "a bad file opened the store");
    assert_none_marked(&mark, Duration::from_secs(1));
}

#[test]
fn an_unknown_class_is_refused_with_the_known_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("class-");
    let _reaper = Reaper::new(&mark);
    let witness = dir.path().join("ran");
    std::fs::write(dir.path().join("jobs.txt"), format!("touch {}\n", witness.display())).expect("write");
    let out = run(crew(dir.path(), &mark, &["run", "--class", "warp-drive", "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("warp-drive") && out.stderr.contains("known classes: local"), "{out}");
    assert!(!witness.exists(), "a job ran");
}

#[test]
fn jobs_asking_for_tags_the_workers_lack_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("tags-");
    let _reaper = Reaper::new(&mark);
    let witness = dir.path().join("ran");
    let text = format!(
        "touch {}\n{}\n{}\n",
        witness.display(),
        r#"{"name":"needs-gpu","shell":"true","tags":["gpu"]}"#,
        r#"{"name":"has-cpu","shell":"true","tags":["cpu"]}"#
    );
    std::fs::write(dir.path().join("jobs.txt"), text).expect("write");
    let out = run(crew(dir.path(), &mark, &["run", "--tags", "cpu", "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("jobs.txt:")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].starts_with("jobs.txt:2: ") && errors[0].contains("gpu"), "{out}");
    assert!(!witness.exists(), "a job ran");
    assert_none_marked(&mark, Duration::from_secs(1));
}

#[test]
fn dash_reads_jobs_from_stdin_and_a_failing_job_makes_the_status_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("stdin-");
    let _reaper = Reaper::new(&mark);
    let out =
        run(crew(dir.path(), &mark, &["run", "--workers", "1", "--json", "-"]), Some("echo from-stdin\n"), DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();
    assert_eq!(records.len(), 1, "{out}");
    assert_eq!(records[0]["stdout"]["text"], "from-stdin\n", "{out}");

    let out = run(
        crew(dir.path(), &mark, &["run", "--workers", "2", "--json", "-"]),
        Some("true\n{\"name\":\"bad\",\"shell\":\"echo oops >&2; exit 3\"}\n"),
        DEADLINE,
    );
    assert_eq!(out.code(), Some(1), "{out}");
    let records = out.records();
    assert_eq!(records.len(), 2, "{out}");
    let bad = records.iter().find(|r| r["name"] == "bad").expect("the failing job's record");
    assert_eq!(bad["status"], "failed", "{out}");
    assert_eq!(bad["exit_code"], 3, "{out}");
    assert_eq!(bad["stderr"]["text"], "oops\n", "{out}");
    assert_none_marked(&mark, Duration::from_secs(3));
}

#[test]
fn help_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("help-");
    for sub in ["run", "worker"] {
        let out = run(crew(dir.path(), &mark, &[sub, "--help"]), None, DEADLINE);
        assert_eq!(out.code(), Some(0), "crew {sub} --help\n{out}");
        assert!(out.stdout.contains("Usage: crew"), "crew {sub} --help\n{out}");
    }
}

#[test]
fn a_worker_started_by_hand_says_what_it_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("worker-");
    let _reaper = Reaper::new(&mark);
    let mut cmd = crew(dir.path(), &mark, &["worker"]);
    for var in ["CREW_CONNECT", "CREW_LAUNCH", "CREW_TOKEN", "CREW_INDEX", "CREW_SLOT"] {
        cmd.env_remove(var);
    }
    let out = run(cmd, None, Duration::from_secs(10));
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    assert!(out.stderr.contains("CREW_CONNECT") && out.stderr.contains("--connect"), "{out}");
}
