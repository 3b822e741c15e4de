//! Limits and private state, through the real binary: durations over the
//! limit and jobs over the frame size are refused up front (exit 2, nothing
//! runs); the daemon's API answers 413 for such a job; the project folder
//! and the daemon's files are private.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, crew, crew_ok, run, unique};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// One HTTP/1.1 request on the daemon's socket; the status and body.
fn http(dir: &Path, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut s = std::os::unix::net::UnixStream::connect(dir.join(".crew/crew.sock")).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: crew\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // The daemon may answer (and close) before it read a refused body.
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status: u16 =
        text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"));
    let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(serde_json::Value::Null))
}

#[test]
fn a_duration_over_the_limit_is_refused_with_exit_2_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limits-dur-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let huge = "1000000000years";
    let ran = d.join("ran");
    let job = format!("touch {}", ran.display());
    std::fs::write(d.join("jobs.txt"), format!("{job}\n")).expect("write");

    let out = run(crew(d, &mark, &["run", "--timeout", huge, "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--timeout") && out.stderr.contains("10 years"), "{out}");
    let out = run(crew(d, &mark, &["send", "--timeout", huge, "--", "sh", "-c", &job]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("10 years"), "{out}");
    // Also as a number of seconds, and in a job line.
    let line =
        format!("{{\"shell\": \"{job}\", \"timeout\": 1e15}}\n{{\"shell\": \"{job}\", \"timeout\": \"{huge}\"}}\n");
    std::fs::write(d.join("lines.txt"), line).expect("write");
    let out = run(crew(d, &mark, &["run", "lines.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("lines.txt:1:") && out.stderr.contains("lines.txt:2:"), "{out}");
    let out = run(crew(d, &mark, &["send", "--file", "lines.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    // And in crew.toml: the daemon does not start, and says why.
    std::fs::create_dir_all(d.join(".crew")).expect("mkdir");
    std::fs::write(d.join(".crew/crew.toml"), format!("[recruit]\nidle = \"{huge}\"\n")).expect("write");
    let out = run(crew(d, &mark, &["up"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("recruit.idle") && out.stderr.contains("10 years"), "{out}");
    assert!(!ran.exists(), "a job ran");
}

/// A job over the frame size (a 9 MiB stdin) is refused by `crew send` and
/// `crew run` (exit 2, nothing runs) and by the API (413 `job_too_large`).
#[test]
fn a_job_over_the_frame_size_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limits-big-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let ran = d.join("ran");
    let stdin = "x".repeat(9 << 20);
    let small = format!("{{\"shell\": \"touch {}\"}}", ran.display());
    let big = format!("{{\"shell\": \"cat > /dev/null; touch {}\", \"stdin\": \"{stdin}\"}}", ran.display());
    std::fs::write(d.join("jobs.txt"), format!("{small}\n{big}\n")).expect("write");

    let out = run(crew(d, &mark, &["run", "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("jobs.txt:2: the job is too large"), "{out}");
    assert!(!out.stderr.contains("jobs.txt:1:"), "{out}");

    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    let out = run(crew(d, &mark, &["send", "--file", "jobs.txt"]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("jobs.txt:2: the job is too large") && out.stderr.contains("input file"), "{out}");

    // The API, as another client would call it: 413, nothing accepted.
    let body = format!("{{\"jobs\": [{small}, {big}]}}");
    let (status, answer) = http(d, "POST", "/v1/jobs", body.as_bytes());
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "job_too_large", "{answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.starts_with("job 1: ")), "{answer}");
    // A body over the API's limit is a 413 too.
    let (status, answer) = http(d, "POST", "/v1/jobs", &vec![b' '; (64 << 20) + 1]);
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large", "{answer}");

    // Nothing was accepted: nothing to wait for, nothing ran.
    let status: serde_json::Value =
        serde_json::from_str(&crew_ok(d, &mark, &["status", "--json"]).stdout).expect("status json");
    assert_eq!(status["jobs"]["queued"], 0, "{status}");
    assert_eq!(status["jobs"]["running"], 0, "{status}");
    crew_ok(d, &mark, &["send", "--", "true"]);
    crew_ok(d, &mark, &["wait"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!ran.exists(), "a job of a refused batch ran");
}

/// `.crew` 0700 (even when it was created 0755 before the daemon), the
/// journal, outputs log, daemon log and socket 0600.
#[test]
fn the_project_folder_and_the_daemons_files_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limits-modes-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let project = d.join(".crew");
    std::fs::create_dir(&project).expect("mkdir");
    std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    crew_ok(d, &mark, &["send", "--", "echo", "hi"]);
    crew_ok(d, &mark, &["wait"]);
    assert_eq!(mode(&project), 0o700, ".crew");
    for file in ["journal.jsonl", "outputs.jsonl", "daemon.log", "crew.sock"] {
        assert_eq!(mode(&project.join(file)), 0o600, "{file}");
    }
    // A fresh project folder is created private, too.
    let fresh = tempfile::tempdir().expect("tempdir");
    let _down2 = Down { dir: fresh.path(), mark: &mark };
    crew_ok(fresh.path(), &mark, &["up"]);
    assert_eq!(mode(&fresh.path().join(".crew")), 0o700);
    assert_eq!(mode(&fresh.path().join(".crew/journal.jsonl")), 0o600);
}

/// A job that writes 40,000 output files with long names: its result's
/// object list (about 16 MiB on the wire) does not fit one frame, so the
/// agent sends it in parts. The job succeeds, its record lists every file,
/// and `crew fetch` gets them all.
#[test]
fn a_result_listing_forty_thousand_outputs_is_delivered_and_fetched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("limits-many-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let long = "n".repeat(150);
    let script =
        format!("mkdir out && cd out && i=0; while [ $i -lt 40000 ]; do echo $i > {long}-$i; i=$((i+1)); done");
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    crew_ok(d, &mark, &["send", "--name", "many", "--output", "out/*", "--", "sh", "-c", &script]);
    let out = run(crew(d, &mark, &["receive", "--wait", "--json"]), None, Duration::from_secs(600));
    assert_eq!(out.code(), Some(0), "{}", &out.stderr);
    let records = out.records();
    assert_eq!(records.len(), 1, "{}", &out.stderr);
    let r = &records[0];
    assert_eq!(r["status"], "succeeded", "{}", r["error"]);
    let objects = r["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 40_000);
    let mut names: Vec<&str> = objects.iter().map(|o| o["name"].as_str().expect("a name")).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 40_000, "every file listed once");
    let to = d.join("fetched");
    let out =
        run(crew(d, &mark, &["fetch", "many", "--to", to.to_str().expect("utf-8")]), None, Duration::from_secs(600));
    assert_eq!(out.code(), Some(0), "{}", &out.stderr);
    let fetched = std::fs::read_dir(to.join("out")).expect("out/").count();
    assert_eq!(fetched, 40_000);
    let one = std::fs::read_to_string(to.join(format!("out/{long}-39999"))).expect("a fetched file");
    assert_eq!(one, "39999\n");
}
