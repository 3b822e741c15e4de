//! Per-job CPU-time and memory limits, and retries, end to end: real jobs
//! under `crew run` and the daemon, their records.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::support::{DEADLINE, Finished, Reaper, crew, run, unique};

fn by_name(out: &Finished) -> HashMap<String, Value> {
    out.records().into_iter().map(|r| (r["name"].as_str().unwrap_or("").to_owned(), r)).collect()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("write a job file");
    path.to_str().expect("utf-8 path").to_owned()
}

#[test]
fn limits_end_jobs_cpu_limit_or_memory_limit_and_retries_rerun_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limits-");
    let _reaper = Reaper::new(&mark);
    let counter = d.join("counter");
    let c = counter.to_str().expect("utf-8 path");
    let file = write(
        d,
        "jobs.txt",
        &[
            r#"{"name":"spin","shell":"while :; do :; done","cpu":"1s","retries":2}"#.to_owned(),
            r#"{"name":"hog","shell":"head -c 500M /dev/zero | tail","memory":"64MiB","retries":2}"#.to_owned(),
            r#"{"name":"fits","command":["python3","-c","print(len(bytearray(1 << 24)))"],"cpu":"30s","memory":"256MiB"}"#
                .to_owned(),
            format!(r#"{{"name":"flaky","shell":"n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo try $n; [ $n -ge 3 ]","retries":2}}"#),
            r#"{"name":"hopeless","shell":"exit 4","retries":1}"#.to_owned(),
        ],
    );
    let out = run(crew(d, &mark, &["run", "--workers", "2", "--store", "store", "--json", &file]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "some jobs did not succeed\n{out}");
    let r = by_name(&out);
    assert_eq!(r.len(), 5, "{out}");

    let spin = &r["spin"];
    assert_eq!(spin["status"], "cpu_limit", "{out}");
    assert_eq!(spin["attempt"], 1, "a limit is final, not retried\n{out}");
    assert_eq!(spin["cpu_limit_seconds"], 1.0, "{out}");
    assert!(spin["error"].as_str().is_some_and(|e| e.starts_with("CPU time limit of 1s reached")), "{out}");
    assert!(spin["wall_seconds"].as_f64().is_some_and(|w| w < 20.0), "{out}");

    let hog = &r["hog"];
    assert_eq!(hog["status"], "memory_limit", "{out}");
    assert_eq!(hog["attempt"], 1, "{out}");
    assert_eq!(hog["memory_limit_bytes"], 64 << 20, "{out}");
    assert!(hog["error"].as_str().is_some_and(|e| e.starts_with("memory limit of 64MiB reached")), "{out}");
    assert!(hog["cpu_limit_seconds"].is_null(), "{out}");

    let fits = &r["fits"];
    assert_eq!(
        (&fits["status"], &fits["stdout"]["text"]),
        (&Value::from("succeeded"), &Value::from("16777216\n")),
        "{out}"
    );
    assert!(fits.get("memory_limit_bytes").is_none() && fits.get("cpu_limit_seconds").is_none(), "{out}");

    let flaky = &r["flaky"];
    assert_eq!(flaky["status"], "succeeded", "{out}");
    assert_eq!(flaky["attempt"], 3, "{out}");
    assert_eq!(flaky["stdout"]["text"], "try 3\n", "{out}");
    assert_eq!(std::fs::read_to_string(&counter).expect("the counter").trim(), "3");
    let hopeless = &r["hopeless"];
    assert_eq!((&hopeless["status"], &hopeless["attempt"]), (&Value::from("failed"), &Value::from(2)), "{out}");
}

#[test]
fn limit_flags_are_defaults_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limit-flags-");
    let _reaper = Reaper::new(&mark);
    let file = write(
        d,
        "jobs.txt",
        &[
            r#"{"name":"spin","shell":"while :; do :; done"}"#.to_owned(),
            r#"{"name":"own","shell":"while :; do :; done","cpu":"2s"}"#.to_owned(),
        ],
    );
    let args = ["run", "--workers", "2", "--store", "store", "--json", "--cpu", "1s", "--memory", "512MiB", &file];
    let out = run(crew(d, &mark, &args), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    let r = by_name(&out);
    assert_eq!((&r["spin"]["status"], &r["spin"]["cpu_limit_seconds"]), (&Value::from("cpu_limit"), &Value::from(1.0)));
    assert_eq!((&r["own"]["status"], &r["own"]["cpu_limit_seconds"]), (&Value::from("cpu_limit"), &Value::from(2.0)));

    for (args, says) in [
        (&["run", "--memory", "2GB", &file][..], "--memory: invalid size \"2GB\""),
        (&["run", "--cpu", "soon", &file][..], "--cpu: invalid duration"),
        (&["send", "--memory", "100", "--", "true"][..], "the memory limit must be between 1MiB and 1PiB"),
        (&["send", "--cpu", "0", "--", "true"][..], "the cpu limit must be greater than zero"),
        (&["send", "--memory", "2000TiB", "--", "true"][..], "more than 1PiB"),
    ] {
        let out = run(crew(d, &mark, args), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{args:?}\n{out}");
        assert!(out.stderr.contains(says), "{args:?} should say {says:?}\n{out}");
    }
}

#[test]
fn the_daemon_passes_limits_to_its_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limit-daemon-");
    let _reaper = Reaper::new(&mark);
    let down = || {
        let _ = run(crew(d, &mark, &["down"]), None, DEADLINE);
    };
    let _down = crate::support::OnDrop(&down);
    let out = run(crew(d, &mark, &["recruit", "--workers", "1", "--class", "local"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = run(
        crew(d, &mark, &["send", "--name", "spin", "--cpu", "1s", "--", "sh", "-c", "while :; do :; done"]),
        None,
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let hog = ["send", "--name", "hog", "--memory", "64MiB", "--", "python3", "-c", "bytearray(1 << 30)"];
    let out = run(crew(d, &mark, &hog), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = run(crew(d, &mark, &["receive", "--wait", "--all", "--json"]), None, DEADLINE);
    let r = by_name(&out);
    assert_eq!(r["spin"]["status"], "cpu_limit", "{out}");
    assert_eq!(r["hog"]["status"], "memory_limit", "{out}");
    assert_eq!(r["hog"]["memory_limit_bytes"], 64 << 20, "{out}");
}
