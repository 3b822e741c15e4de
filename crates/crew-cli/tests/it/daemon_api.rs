//! `crew daemon` end to end through docs/api.md, spoken as plain HTTP/1.1
//! written by hand over a Unix socket (no HTTP library), which is what a
//! client in any language would do: routes, shapes, error codes, the
//! folder lock, and a clean `POST /v1/down` that leaves no process behind.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{DEADLINE, Reaper, assert_none_marked, crew, poll_until, run, unique};

/// The daemon child, killed if the test ends without stopping it.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    fn start(work: &Path, mark: &str) -> Self {
        let dir = work.join(".crew");
        let log = std::fs::File::create(work.join("daemon.log")).expect("cannot create the daemon log");
        let mut cmd = crew(work, mark, &["daemon", "--dir", dir.to_str().expect("utf-8 temp dir")]);
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("cannot start crew daemon");
        let daemon = Self { child, dir };
        let up = poll_until(DEADLINE, || {
            daemon.dir.join("crew.sock").exists() && request_opt(&daemon.sock(), "GET", "/v1/health", None).is_some()
        });
        assert!(up, "the daemon did not answer on its socket within {DEADLINE:?}; log:\n{}", daemon.log(work));
        daemon
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("crew.sock")
    }

    fn log(&self, work: &Path) -> String {
        std::fs::read_to_string(work.join("daemon.log")).unwrap_or_default()
    }

    /// Waits (with [`DEADLINE`]) for the daemon to exit.
    fn wait_exit(&mut self, work: &Path) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for the daemon") {
                return s;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit; log:\n{}", self.log(work));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A request that must answer `want`; returns the JSON body.
    fn call(&self, method: &str, path: &str, body: Option<&str>, want: u16) -> Value {
        let (status, body) = request(&self.sock(), method, path, body);
        assert_eq!(status, want, "{method} {path}: unexpected status; body: {body}");
        body
    }

    /// A request that must fail with `status` and `code`; returns the message.
    fn error(&self, method: &str, path: &str, body: Option<&str>, status: u16, code: &str) -> String {
        let v = self.call(method, path, body, status);
        assert_eq!(v["error"]["code"], code, "{method} {path}: {v}");
        v["error"]["message"].as_str().expect("an error message").to_owned()
    }
}

/// One HTTP/1.1 request by hand; `None` when the daemon cannot be reached.
fn request_opt(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Option<(u16, Value)> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(90))).ok()?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: crew\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut length = None;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        }
        if k.eq_ignore_ascii_case("content-type") {
            assert_eq!(v.trim(), "application/json", "{method} {path}: content type");
        }
    }
    let body = &rest[..length?.min(rest.len())];
    Some((status, serde_json::from_str(body).ok()?))
}

fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    request_opt(sock, method, path, body).unwrap_or_else(|| panic!("{method} {path}: no valid HTTP answer"))
}

fn jobs(list: &Value) -> String {
    json!({ "jobs": list }).to_string()
}

#[test]
fn daemon_serves_the_api_over_plain_http_and_stops_on_down() {
    let mark = unique("daemon-api-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(work.path(), &mark);

    // Health and the socket's permissions.
    let h = d.call("GET", "/v1/health", None, 200);
    assert_eq!(h["ok"], true);
    assert_eq!(h["pid"], d.child.id());
    assert_eq!(h["dir"], d.dir.to_str().expect("utf-8"));
    let mode = std::fs::metadata(d.sock()).expect("socket metadata").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    // A second daemon on the same folder refuses, naming the first.
    let second = run(crew(work.path(), &mark, &["daemon", "--dir", d.dir.to_str().expect("utf-8")]), None, DEADLINE);
    assert_eq!(second.code(), Some(2), "{second}");
    assert!(second.stderr.contains(&d.child.id().to_string()), "{second}");

    // Recruit 2 plain slots and 1 gpu slot.
    let r = d.call("POST", "/v1/recruit", Some(r#"{"class": "local", "workers": 2}"#), 200);
    assert_eq!(r["slots"], json!(["local-1", "local-2"]));
    let r = d.call(
        "POST",
        "/v1/recruit",
        Some(r#"{"class": "local", "workers": 1, "tags": ["gpu"], "idle": "5m", "launch_timeout": 60}"#),
        200,
    );
    let gpu_slot = r["slots"][0].as_str().expect("a slot name").to_owned();
    let s = d.call("GET", "/v1/status", None, 200);
    assert_eq!(s["slots"].as_array().map(Vec::len), Some(3), "{s}");
    assert_eq!(s["pid"], d.child.id());
    assert!(s["jobs"]["queued"].is_number() && s["jobs"]["ready"].is_number(), "{s}");
    assert_eq!(d.call("GET", "/v1/sendable?tags=gpu", None, 200)["sendable"], true);
    assert_eq!(d.call("GET", "/v1/sendable?tags=gpu%2Cbig", None, 200)["sendable"], false);

    // Send 5 jobs, one with the gpu tag and one with a large stdout.
    let five = json!([
        {"builtin": "echo", "args": "one"},
        {"shell": "echo two"},
        {"command": ["true"]},
        {"name": "gpu", "builtin": "echo", "args": "g", "tags": ["gpu"]},
        {"name": "big", "shell": "head -c 100000 /dev/zero | tr '\\0' x"},
    ]);
    let ids = d.call("POST", "/v1/jobs", Some(&jobs(&five)), 200);
    let ids: Vec<u64> = ids["ids"].as_array().expect("ids").iter().filter_map(Value::as_u64).collect();
    assert_eq!(ids.len(), 5);

    // Receive them all at once.
    let got = d.call("POST", "/v1/receive", Some(r#"{"wait": true, "all": true, "timeout": "60s"}"#), 200);
    let outputs = got["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 5, "{got}");
    assert_eq!(got["pending"], 0);
    for o in outputs {
        assert_eq!(o["status"], "succeeded", "{o}");
    }
    let by_name = |n: &str| outputs.iter().find(|o| o["name"] == n).unwrap_or_else(|| panic!("no output {n}: {got}"));
    assert_eq!(by_name("gpu")["slot"], gpu_slot.as_str());
    let big = by_name("big");
    assert_eq!(big["stdout"]["truncated"], true, "{big}");
    let big_id = big["id"].as_u64().expect("id");

    // Nothing more.
    let again = d.call("POST", "/v1/receive", Some("{}"), 200);
    assert_eq!(again, json!({"outputs": [], "pending": 0}));
    assert_eq!(d.call("GET", "/v1/receivable", None, 200)["receivable"], false);

    // The whole stdout of the large job, from the store.
    let logs = d.call("GET", &format!("/v1/jobs/{big_id}/logs"), None, 200);
    let stdout = logs["stdout"].as_str().expect("stdout");
    assert_eq!(stdout.len(), 100_000);
    assert!(stdout.bytes().all(|b| b == b'x'));
    assert_eq!(logs["id"], big_id);
    d.error("GET", "/v1/jobs/99999/logs", None, 404, "not_found");

    // Names stay taken until received; receive by name.
    let dup = jobs(&json!([{"name": "dup", "builtin": "noop"}]));
    d.call("POST", "/v1/jobs", Some(&dup), 200);
    d.error("POST", "/v1/jobs", Some(&dup), 409, "duplicate_name");
    let one = d.call("POST", "/v1/receive", Some(r#"{"wait": true, "name": "dup", "timeout": 60}"#), 200);
    assert_eq!(one["outputs"][0]["name"], "dup", "{one}");
    assert_eq!(one["pending"], 0);
    d.call("POST", "/v1/jobs", Some(&dup), 200);
    let rest = d.call("POST", "/v1/receive", Some(r#"{"wait": true, "all": true}"#), 200);
    assert_eq!(rest["outputs"].as_array().map(Vec::len), Some(1), "{rest}");

    // Errors.
    d.error("POST", "/v1/jobs", Some("{not json"), 400, "bad_request");
    d.error("POST", "/v1/recruit", Some(r#"{"class": "local"}"#), 400, "bad_request");
    let m = d.error("POST", "/v1/jobs", Some(&jobs(&json!([{"builtin": "noop"}, {"bogus": 1}]))), 400, "invalid_job");
    assert!(m.starts_with("job 1:"), "{m}");
    let m = d.error("POST", "/v1/recruit", Some(r#"{"class": "gpu-cloud", "workers": 1}"#), 400, "unknown_class");
    assert!(m.contains("local"), "{m}");
    d.error("POST", "/v1/recruit", Some(r#"{"class": "local", "workers": 1, "idle": "soon"}"#), 400, "invalid_option");
    let m = d.error(
        "POST",
        "/v1/jobs",
        Some(&jobs(&json!([{"builtin": "noop", "tags": ["tpu"]}]))),
        422,
        "no_matching_worker",
    );
    assert!(m.contains("gpu"), "{m}");
    d.error("GET", "/v1/nothing", None, 404, "not_found");
    d.error("DELETE", "/v1/jobs", None, 404, "not_found");
    // Inputs: absolute paths only, readable files only; unsafe names refused.
    let m = d.error(
        "POST",
        "/v1/jobs",
        Some(&jobs(&json!([{"shell": "true", "inputs": ["rel/x.csv"]}]))),
        400,
        "invalid_job",
    );
    assert!(m.starts_with("job 0: ") && m.contains("absolute"), "{m}");
    let missing = work.path().join("missing.csv");
    let m = d.error(
        "POST",
        "/v1/jobs",
        Some(&jobs(&json!([{"shell": "true", "inputs": [missing.to_str().expect("utf-8")]}]))),
        400,
        "invalid_input",
    );
    assert!(m.contains("missing.csv"), "{m}");
    let m = d.error(
        "POST",
        "/v1/jobs",
        Some(&jobs(&json!([{"shell": "true", "outputs": ["../../etc/passwd"]}]))),
        400,
        "invalid_job",
    );
    assert!(m.contains(".."), "{m}");
    // Outputs of a finished job, by id or name: none here, but the store is named.
    let o = d.call("GET", &format!("/v1/jobs/{big_id}/objects"), None, 200);
    assert_eq!(o["objects"], json!([]), "{o}");
    assert!(o["store"].as_str().is_some_and(|s| s.starts_with("file:///")), "{o}");
    assert_eq!(d.call("GET", "/v1/jobs/big/objects", None, 200)["id"], big_id);
    d.error("GET", "/v1/jobs/nobody/objects", None, 404, "not_found");
    assert_eq!(d.call("POST", "/v1/receive", None, 200)["pending"], 0, "no job of a refused request was accepted");

    // Down: the answer, then the daemon exits 0 with nothing left.
    assert_eq!(d.call("POST", "/v1/down", None, 200), json!({"ok": true}));
    let mut d = d;
    let status = d.wait_exit(work.path());
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log(work.path()));
    assert!(!d.sock().exists(), "the socket is left behind");
    assert!(!d.dir.join("daemon.pid").exists(), "the pid file is left behind");
    assert_none_marked(&mark, Duration::from_secs(10));
}

#[test]
fn daemon_stops_cleanly_on_sigterm_and_replaces_a_stale_socket() {
    let mark = unique("daemon-term-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    // A stale socket file left by a daemon that died.
    let dir = work.path().join(".crew");
    std::fs::create_dir_all(&dir).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(dir.join("crew.sock")).expect("bind a stale socket"));
    let mut d = Daemon::start(work.path(), &mark);
    d.call("POST", "/v1/recruit", Some(r#"{"class": "local", "workers": 1}"#), 200);
    d.call("POST", "/v1/launch", Some("{}"), 200);
    assert!(
        poll_until(DEADLINE, || d.call("GET", "/v1/status", None, 200)["slots"][0]["state"] == "idle"),
        "the worker never came up"
    );
    crate::support::signal(d.child.id(), libc::SIGTERM);
    let status = d.wait_exit(work.path());
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log(work.path()));
    assert!(!d.sock().exists(), "the socket is left behind");
    assert_none_marked(&mark, Duration::from_secs(10));
}

/// The journal: a daemon killed with SIGKILL while 100 jobs are queued or
/// running loses none. Started again on the same folder, it still has its
/// slots, gets the jobs that were running back from their workers (not
/// run again, no crash counted), runs the queued ones, keeps outputs finished but not received, and delivers each
/// job exactly once.
#[test]
fn a_daemon_killed_with_sigkill_loses_nothing() {
    let mark = unique("daemon-kill-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(work.path(), &mark);
    d.call("POST", "/v1/recruit", Some(r#"{"class": "local", "workers": 2}"#), 200);
    // 5 quick jobs first, left unreceived; then 100 slower ones.
    let quick: Vec<Value> = (0..5).map(|i| json!({"name": format!("quick-{i}"), "builtin": "noop"})).collect();
    let ids = d.call("POST", "/v1/jobs", Some(&jobs(&json!(quick))), 200)["ids"].clone();
    assert_eq!(ids.as_array().map(Vec::len), Some(5));
    assert!(
        poll_until(DEADLINE, || d.call("GET", "/v1/status", None, 200)["jobs"]["ready"] == 5),
        "the quick jobs did not finish"
    );
    // The slow jobs read an input, staged once when they are sent.
    let input = work.path().join("in.txt");
    std::fs::write(&input, "staged once\n").expect("write the input");
    let input = input.to_str().expect("utf-8").to_owned();
    let slow: Vec<Value> = (0..100)
        .map(|i| json!({"name": format!("slow-{i}"), "shell": "sleep 0.2; cat in.txt", "inputs": [input]}))
        .collect();
    d.call("POST", "/v1/jobs", Some(&jobs(&json!(slow))), 200);
    assert!(
        poll_until(DEADLINE, || d.call("GET", "/v1/status", None, 200)["jobs"]["running"].as_u64() >= Some(2)),
        "no slow job started"
    );
    crate::support::signal(d.child.id(), libc::SIGKILL);
    let status = d.wait_exit(work.path());
    assert_eq!(status.code(), None, "killed by a signal");

    // The same folder, a new daemon; the journal holds the staged jobs, so
    // the local input file is not needed any more.
    drop(d);
    std::fs::remove_file(&input).expect("remove the input");
    let log_before = std::fs::read_to_string(work.path().join("daemon.log")).unwrap_or_default();
    let d = Daemon::start(work.path(), &mark);
    let st = d.call("GET", "/v1/status", None, 200);
    assert_eq!(st["slots"].as_array().map(Vec::len), Some(2), "slots recruited before the kill: {st}");
    let got = d.call("POST", "/v1/receive", Some(r#"{"wait": true, "all": true, "timeout": "120s"}"#), 200);
    let outputs = got["outputs"].as_array().expect("outputs").clone();
    assert_eq!(got["pending"], 0, "{got}");
    let mut names: Vec<String> = outputs.iter().map(|o| o["name"].as_str().unwrap_or("").to_owned()).collect();
    names.sort();
    let mut want: Vec<String> =
        (0..5).map(|i| format!("quick-{i}")).chain((0..100).map(|i| format!("slow-{i}"))).collect();
    want.sort();
    assert_eq!(names, want, "every job exactly once\nlog before:\n{log_before}\nlog:\n{}", d.log(work.path()));
    for o in &outputs {
        assert_eq!(o["status"], "succeeded", "{o}");
        if o["name"].as_str().is_some_and(|n| n.starts_with("slow-")) {
            assert_eq!(o["stdout"]["text"], "staged once\n", "{o}");
        }
    }
    // The jobs that were running were kept by their workers, which came
    // back to the new daemon: none ran again as a later attempt.
    let rerun: Vec<&Value> = outputs.iter().filter(|o| o["attempt"].as_u64() != Some(1)).collect();
    assert!(rerun.is_empty(), "jobs run again after the kill: {rerun:?}");
    // Nothing more to receive, even after another restart of the daemon.
    let again = d.call("POST", "/v1/receive", Some(r#"{"all": true}"#), 200);
    assert_eq!(again["outputs"].as_array().map(Vec::len), Some(0), "{again}");
    d.call("POST", "/v1/down", Some("{}"), 200);
}
