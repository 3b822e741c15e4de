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
        Self::start_with(work, mark, &[])
    }

    fn start_with(work: &Path, mark: &str, extra: &[&str]) -> Self {
        let dir = work.join(".crew");
        let log = std::fs::File::create(work.join("daemon.log")).expect("cannot create the daemon log");
        let mut args = vec!["daemon", "--dir", dir.to_str().expect("utf-8 temp dir")];
        args.extend_from_slice(extra);
        let mut cmd = crew(work, mark, &args);
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
    let mut chunked = false;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        }
        if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.trim().eq_ignore_ascii_case("chunked");
        }
        if k.eq_ignore_ascii_case("content-type") {
            assert_eq!(v.trim(), "application/json", "{method} {path}: content type");
        }
    }
    let body = if chunked { unchunked(rest)? } else { rest[..length?.min(rest.len())].to_owned() };
    Some((status, serde_json::from_str(&body).ok()?))
}

/// A chunked body (a streamed answer) whole; `None` when it is cut short.
fn unchunked(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
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

/// `GET /v1/events` read by hand: every line of the stream, sent to a
/// channel by a thread, until the daemon ends the stream.
fn subscribe(sock: &Path) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let mut s = UnixStream::connect(sock).expect("connect for events");
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: crew\r\n\r\n").expect("write");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = std::io::BufReader::new(s);
    // The head, then ": subscribed": from here on nothing is missed.
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("read the events head") > 0, "events: no answer; {head}");
        head.push_str(&line);
        if line.starts_with(": subscribed") {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// The `data:` objects of the events received so far, with their names.
fn events_so_far(rx: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<(String, Value)>) {
    let mut name = String::new();
    while let Ok(line) = rx.try_recv() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("event data {data:?}: {e}"));
            assert_eq!(v["type"], name.as_str(), "the event name is its type");
            seen.push((name.clone(), v));
        }
    }
}

/// `GET /metrics`, raw: the content type and the text.
fn scrape(sock: &Path) -> (String, String) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: crew\r\nConnection: close\r\n\r\n").expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let kind = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    (kind, body.to_owned())
}

/// The value of one sample (`name{labels}` as written) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

#[test]
fn jobs_can_be_looked_at_one_by_one_watched_live_and_counted() {
    let mark = unique("daemon-jobs-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(work.path(), &mark);
    let events = subscribe(&d.sock());
    let mut seen = Vec::new();

    d.call("POST", "/v1/recruit", Some(r#"{"class": "local", "workers": 1}"#), 200);
    let slow = r#"{"name": "slow", "shell": "sleep 2"}"#;
    let body = format!(r#"{{"jobs": [{slow}, {{"shell": "exit 3"}}, {{"shell": "echo hi"}}]}}"#);
    let ids: Vec<u64> = d.call("POST", "/v1/jobs", Some(&body), 200)["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("an id"))
        .collect();
    let (a, b, c) = (ids[0], ids[1], ids[2]);

    // One worker: the first job runs, the others wait.
    let running = poll_until(DEADLINE, || d.call("GET", &format!("/v1/jobs/{a}"), None, 200)["state"] == "running");
    assert!(running, "job {a} never ran: {}", d.call("GET", &format!("/v1/jobs/{a}"), None, 200));
    let info = d.call("GET", &format!("/v1/jobs/{a}"), None, 200);
    assert_eq!((info["name"].as_str(), info["attempt"].as_u64()), (Some("slow"), Some(1)), "{info}");
    assert!(info["slot"].is_string() && info["sent"].is_string() && info["assigned"].is_string(), "{info}");
    assert!(info["finished"].is_null() && info["output"].is_null(), "{info}");
    assert_eq!(d.call("GET", "/v1/jobs/slow", None, 200)["id"], a, "by name");
    let waiting = d.call("GET", &format!("/v1/jobs/{c}"), None, 200);
    assert!(matches!(waiting["state"].as_str(), Some("queued" | "assigned")), "{waiting}");
    let queued = d.call("GET", "/v1/jobs?state=queued", None, 200);
    assert!(queued["jobs"].as_array().expect("jobs").iter().all(|j| j["state"] == "queued"), "{queued}");

    // Ended: the record is there before it is received, and after.
    let ended = poll_until(Duration::from_secs(60), || {
        d.call("GET", &format!("/v1/jobs/{c}"), None, 200)["state"] == "finished"
    });
    assert!(ended, "job {c} did not finish");
    let info = d.call("GET", &format!("/v1/jobs/{b}"), None, 200);
    assert_eq!((info["status"].as_str(), info["output"]["exit_code"].as_i64()), (Some("failed"), Some(3)), "{info}");
    d.call("POST", "/v1/receive", Some(&format!(r#"{{"ids": [{a}, {b}, {c}], "wait": true, "timeout": "60s"}}"#)), 200);
    let info = d.call("GET", &format!("/v1/jobs/{a}"), None, 200);
    assert_eq!((info["state"].as_str(), info["status"].as_str()), (Some("received"), Some("succeeded")), "{info}");
    assert!(info["started"].is_string() && info["finished"].is_string(), "{info}");
    assert_eq!(info["output"]["name"], "slow", "{info}");

    // Pages, in id order.
    let page = d.call("GET", "/v1/jobs?limit=2", None, 200);
    let listed: Vec<u64> =
        page["jobs"].as_array().expect("jobs").iter().map(|j| j["id"].as_u64().expect("id")).collect();
    assert_eq!(listed, vec![a, b], "{page}");
    assert!(page["jobs"][0]["output"].is_null(), "lists carry no records: {page}");
    let rest = d.call("GET", &format!("/v1/jobs?after={}&limit=2", page["next"]), None, 200);
    assert_eq!(rest["jobs"][0]["id"], c, "{rest}");
    assert!(rest["next"].is_null(), "{rest}");
    assert_eq!(d.call("GET", "/v1/jobs?state=received", None, 200)["jobs"].as_array().map(Vec::len), Some(3));
    d.error("GET", "/v1/jobs?state=done", None, 400, "bad_request");
    d.error("GET", "/v1/jobs?limit=0", None, 400, "bad_request");
    d.error("GET", "/v1/jobs/999", None, 404, "not_found");

    // A worker that dies under its job (SIGKILL of the agent): the job
    // runs again and succeeds; the crash is an event and a metric.
    let crash = r#"{"jobs": [{"shell": "if [ \"$CREW_ATTEMPT\" = 1 ]; then kill -9 $PPID; sleep 5; fi; echo again"}]}"#;
    let id = d.call("POST", "/v1/jobs", Some(crash), 200)["ids"][0].as_u64().expect("id");
    let out =
        d.call("POST", "/v1/receive", Some(&format!(r#"{{"ids": [{id}], "wait": true, "timeout": "60s"}}"#)), 200);
    assert_eq!(
        (out["outputs"][0]["status"].as_str(), out["outputs"][0]["attempt"].as_u64()),
        (Some("succeeded"), Some(2))
    );

    // The events said all of it, in order per job.
    assert!(poll_until(DEADLINE, || {
        events_so_far(&events, &mut seen);
        seen.iter().any(|(n, v)| n == "job_ended" && v["id"] == id)
    }));
    let of = |job: u64| -> Vec<&str> {
        seen.iter()
            .filter(|(_, v)| v["id"] == job || v["ids"].as_array().is_some_and(|ids| ids.contains(&json!(job))))
            .map(|(n, _)| n.as_str())
            .collect()
    };
    assert_eq!(of(a), ["jobs_sent", "job_assigned", "job_ended"], "{seen:?}");
    assert_eq!(of(id), ["jobs_sent", "job_assigned", "job_assigned", "job_ended"], "{seen:?}");
    let ended_b = seen.iter().find(|(n, v)| n == "job_ended" && v["id"] == b).map(|(_, v)| v["status"].clone());
    assert_eq!(ended_b, Some(json!("failed")));
    assert!(seen.iter().any(|(n, _)| n == "slot_up"), "{seen:?}");
    assert!(seen.iter().any(|(n, v)| n == "slot_crashed" && v["class"] == "local"), "{seen:?}");

    // The metrics count the same work.
    let (kind, text) = scrape(&d.sock());
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert_eq!(sample(&text, "crew_jobs_sent_total"), Some(4.0), "{text}");
    assert_eq!(sample(&text, "crew_jobs_finished_total{status=\"succeeded\"}"), Some(3.0), "{text}");
    assert_eq!(sample(&text, "crew_jobs_finished_total{status=\"failed\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "crew_jobs_queued"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "crew_jobs_running"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "crew_worker_crashes_total{class=\"local\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "crew_dispatch_latency_seconds_count"), Some(4.0), "{text}");
    let slots: f64 = text
        .lines()
        .filter(|l| l.starts_with("crew_slots{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(slots, 1.0, "one slot in all: {text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    d.call("POST", "/v1/down", None, 200);
}

/// One HTTP/1.1 request over `stream` (TCP or TLS): status, head, body.
fn http_over(
    stream: &mut (impl Read + Write),
    host: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> (u16, String, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("write the request");
    let mut raw = Vec::new();
    // A TLS peer may end without close_notify; what was read counts.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[test]
fn the_tcp_listener_needs_the_token_and_a_host_of_its_own() {
    let mark = unique("daemon-http-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_with(work.path(), &mark, &["--http", "127.0.0.1:0"]);
    let health = d.call("GET", "/v1/health", None, 200);
    let listen = health["http"]["listen"].as_str().expect("the HTTP listener in health").to_owned();
    assert!(health["http"]["tls_sha256"].is_null(), "loopback: plaintext: {health}");
    let token_file = PathBuf::from(health["http"]["token_file"].as_str().expect("token file"));
    assert_eq!(std::fs::metadata(&token_file).expect("token file").permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).expect("token").trim().to_owned();
    assert_eq!(token.len(), 64, "{token}");
    let port = listen.rsplit(':').next().expect("a port").to_owned();
    let ask = |host: &str, token: Option<&str>, path: &str| {
        let mut s = std::net::TcpStream::connect(&listen).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        http_over(&mut s, host, token, "GET", path)
    };
    let here = format!("127.0.0.1:{port}");
    let (status, head, body) = ask(&here, None, "/v1/status");
    assert_eq!(status, 401, "{head}\n{body}");
    assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer"), "{head}");
    assert!(body.contains("\"unauthorized\"") && body.contains("http.token"), "{body}");
    assert_eq!(ask(&here, Some(&"0".repeat(64)), "/v1/status").0, 401, "a wrong token");
    let (status, _, body) = ask(&here, Some(&token), "/v1/status");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"jobs\""), "{body}");
    assert_eq!(ask(&format!("localhost:{port}"), Some(&token), "/v1/health").0, 200);
    // A name that resolves here from a web page elsewhere (DNS rebinding),
    // another port, no Host: refused even with the token.
    for host in [format!("evil.example:{port}"), "127.0.0.1:1".to_owned(), String::new()] {
        let (status, _, body) = ask(&host, Some(&token), "/v1/status");
        assert_eq!(status, 403, "Host {host:?}: {body}");
        assert!(body.contains("\"bad_host\""), "{body}");
    }
    let (status, head, body) = ask(&here, Some(&token), "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(head.to_ascii_lowercase().contains("openmetrics"), "{head}");
    // `crew status` names it.
    let out = run(crew(work.path(), &mark, &["status"]), None, DEADLINE);
    assert!(out.stdout.contains(&format!("API also on http://{listen}")), "{out}");
    d.call("POST", "/v1/down", None, 200);
    let gone = poll_until(DEADLINE, || !token_file.exists());
    assert!(gone, "the token outlived its daemon");
}

#[test]
fn beyond_loopback_the_tcp_listener_speaks_only_tls() {
    let mark = unique("daemon-https-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_with(work.path(), &mark, &["--http", "0.0.0.0:0", "--http-host", "crew.lab"]);
    let health = d.call("GET", "/v1/health", None, 200);
    let port: u16 = health["http"]["listen"].as_str().and_then(|l| l.rsplit(':').next()?.parse().ok()).expect("port");
    let pin = health["http"]["tls_sha256"].as_str().expect("a certificate beyond loopback").to_owned();
    let token = std::fs::read_to_string(d.dir.join("http.token")).expect("token").trim().to_owned();
    // Plaintext gets no answer.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let (status, head, _) = http_over(&mut plain, &format!("127.0.0.1:{port}"), Some(&token), "GET", "/v1/health");
    assert_eq!(status, 0, "a plaintext request was answered: {head}");
    // TLS with the pinned certificate, and an allowed name as Host.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (status, body) = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let pin = crew_tls::parse_fingerprint(&pin).expect("a fingerprint");
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let mut tls = crew_tls::connector(pin).expect("connector").connect(crew_tls::server_name(), tcp).await.expect("TLS");
        let head = format!(
            "GET /v1/status HTTP/1.1\r\nHost: crew.lab:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    });
    assert_eq!(status, 200, "{body}");
    d.call("POST", "/v1/down", None, 200);
}
