//! Jobs see a clean environment: the base variables, the names they inherit
//! from their worker, their own `env` and the `CREW_*` job variables;
//! nothing else of the process that started `crew run` or the daemon.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::support::{DEADLINE, Finished, Reaper, crew, run, unique};

/// The `NAME=value` lines a job printed with `env`, as a map.
fn env_of(record: &Value) -> HashMap<String, String> {
    record["stdout"]["text"]
        .as_str()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn by_name(out: &Finished) -> HashMap<String, Value> {
    out.records().into_iter().map(|r| (r["name"].as_str().unwrap_or("").to_owned(), r)).collect()
}

/// What every job sees whatever it inherits: the base it found (PATH at
/// least) and the five job variables.
fn assert_job_basics(env: &HashMap<String, String>, what: &str) {
    assert!(env.contains_key("PATH"), "{what}: {env:?}");
    for v in ["CREW_JOB_ID", "CREW_JOB_NAME", "CREW_SEED", "CREW_WORKER", "CREW_ATTEMPT"] {
        assert!(env.contains_key(v), "{what}: no {v}: {env:?}");
    }
    for v in ["CREW_TOKEN", "CREW_LAUNCH", "CREW_CONNECT", "CREW_INDEX", "CREW_PARENT_PID", "CREW_TLS_SHA256"] {
        assert!(!env.contains_key(v), "{what}: the agent's {v} reached the job: {env:?}");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a job file");
    path.to_str().expect("utf-8 path").to_owned()
}

#[test]
fn crew_run_jobs_inherit_only_what_they_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("env-run-");
    let _reaper = Reaper::new(&mark);
    let file = write(
        d,
        "jobs.txt",
        concat!(
            "{\"name\":\"plain\",\"command\":[\"env\"]}\n",
            "{\"name\":\"line\",\"command\":[\"env\"],\"env_inherit\":[\"FOO\",\"NOT_SET_ANYWHERE\"]}\n",
            "{\"name\":\"own\",\"command\":[\"env\"],\"env\":{\"FOO\":\"mine\"}}\n",
        ),
    );
    let mut cmd = crew(d, &mark, &["run", "--workers", "1", "--store", "store", "--json", &file]);
    cmd.env("FOO", "leak").env("HOME", "/home/of-the-run");
    let out = run(cmd, None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = by_name(&out);
    let plain = env_of(&r["plain"]);
    assert_job_basics(&plain, "plain");
    assert!(!plain.contains_key("FOO"), "FOO leaked into a job: {plain:?}");
    assert_eq!(plain.get("HOME").map(String::as_str), Some("/home/of-the-run"), "the base is inherited");
    assert_eq!(plain.get("CREW_JOB_NAME").map(String::as_str), Some("plain"));
    let line = env_of(&r["line"]);
    assert_job_basics(&line, "line");
    assert_eq!(line.get("FOO").map(String::as_str), Some("leak"), "{line:?}");
    assert!(!line.contains_key("NOT_SET_ANYWHERE"), "{line:?}");
    assert_eq!(env_of(&r["own"]).get("FOO").map(String::as_str), Some("mine"));

    // --env-inherit: for every job of the run.
    let file = write(d, "plain.txt", "env\n");
    let mut cmd =
        crew(d, &mark, &["run", "--workers", "1", "--store", "store", "--json", "--env-inherit", "FOO", &file]);
    cmd.env("FOO", "leak");
    let out = run(cmd, None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let env = env_of(&out.records()[0]);
    assert_job_basics(&env, "--env-inherit");
    assert_eq!(env.get("FOO").map(String::as_str), Some("leak"), "{env:?}");
}

#[test]
fn inheriting_an_agent_variable_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("env-refused-");
    let _reaper = Reaper::new(&mark);
    let file = write(d, "jobs.txt", "echo fine\n{\"command\":[\"env\"],\"env_inherit\":[\"CREW_TOKEN\"]}\n");
    let out = run(crew(d, &mark, &["run", "--store", "store", &file]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("jobs.txt:2: env_inherit: CREW_TOKEN belongs to the worker's agent"),
        "the message names the line and the variable\n{out}"
    );
    assert!(out.stdout.is_empty(), "nothing ran\n{out}");
    for args in [
        &["run", "--store", "store", "--env-inherit", "CREW_LAUNCH", &file][..],
        &["send", "--env-inherit", "CREW_TOKEN", "--", "env"][..],
    ] {
        let out = run(crew(d, &mark, args), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{args:?}\n{out}");
        assert!(out.stderr.contains("belongs to the worker's agent"), "{args:?}\n{out}");
    }
    assert!(!d.join(".crew/crew.sock").exists(), "a refused send starts no daemon");
}

#[test]
fn daemon_jobs_inherit_from_the_daemon_only_what_they_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("env-daemon-");
    let _reaper = Reaper::new(&mark);
    let down = || {
        let _ = run(crew(d, &mark, &["down"]), None, DEADLINE);
    };
    let _down = crate::support::OnDrop(&down);
    // The daemon is started by a command with variables of its own.
    let mut up = crew(d, &mark, &["up"]);
    up.env("DAEMON_ONLY", "daemon-secret").env("FOO", "from-daemon");
    let out = run(up, None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = run(crew(d, &mark, &["recruit", "--workers", "1", "--class", "local"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    for args in [
        &["send", "--name", "plain", "--", "env"][..],
        &["send", "--name", "named", "--env-inherit", "FOO", "--", "env"][..],
    ] {
        // The sender's own value is not what the job gets: names travel,
        // values are the worker's.
        let mut send = crew(d, &mark, args);
        send.env("FOO", "from-sender").env("DAEMON_ONLY", "from-sender");
        let out = run(send, None, DEADLINE);
        assert_eq!(out.code(), Some(0), "{out}");
    }
    let file = write(d, "jobs.txt", "{\"name\":\"line\",\"command\":[\"env\"],\"env_inherit\":[\"FOO\"]}\n");
    let out = run(crew(d, &mark, &["send", "--file", &file]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = run(crew(d, &mark, &["receive", "--wait", "--all", "--json"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = by_name(&out);
    assert_eq!(r.len(), 3, "{out}");
    let plain = env_of(&r["plain"]);
    assert_job_basics(&plain, "plain");
    assert!(!plain.contains_key("DAEMON_ONLY") && !plain.contains_key("FOO"), "{plain:?}");
    for name in ["named", "line"] {
        let env = env_of(&r[name]);
        assert_job_basics(&env, name);
        assert_eq!(env.get("FOO").map(String::as_str), Some("from-daemon"), "{name}: {env:?}");
        assert!(!env.contains_key("DAEMON_ONLY"), "{name}: {env:?}");
    }
    // The journal's jobs hold the names, never an inherited value (the
    // outputs journaled hold what the jobs printed, values included).
    let journal = std::fs::read_to_string(d.join(".crew/journal.jsonl")).expect("the journal");
    let jobs: Vec<&str> = journal.lines().filter(|l| l.contains("\"env_inherit\"")).collect();
    assert_eq!(jobs.len(), 3, "the jobs are journaled with their names to inherit:\n{journal}");
    assert_eq!(jobs.iter().filter(|l| l.contains("\"FOO\"")).count(), 2, "{jobs:?}");
    assert!(jobs.iter().all(|l| !l.contains("from-daemon") && !l.contains("from-sender")), "{jobs:?}");
}
