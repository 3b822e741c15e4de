//! The dashboard in a real headless Chromium, driven over W3C WebDriver
//! (Debian's `chromium-driver`, installed by `cargo xtask services`; the
//! protocol spoken by hand over HTTP): it must show the slots and jobs that
//! `crew status --json` and the API report, a job's record and logs on a
//! click, and stay live; a screenshot is saved as a test artifact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{DEADLINE, Reaper, crew, poll_until, run, unique};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Self { child, port };
        let ready =
            poll_until(DEADLINE, || driver.call("GET", "/status", None).is_some_and(|v| v["value"]["ready"] == true));
        assert!(ready, "chromedriver did not become ready");
        driver
    }

    /// One WebDriver command; the JSON answer, or `None` when the driver
    /// cannot be reached.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Option<Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body.as_bytes()).ok()?;
        // The head, then exactly Content-Length bytes (chromedriver may
        // keep the connection open).
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).ok()? == 0 {
                return None;
            }
            raw.push(byte[0]);
        }
        let head = String::from_utf8(raw).ok()?;
        let length: usize = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .and_then(|(_, v)| v.trim().parse().ok())?;
        let mut body = vec![0u8; length];
        s.read_exact(&mut body).ok()?;
        serde_json::from_slice(&body).ok()
    }

    fn must(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let v = self.call(method, path, body).unwrap_or_else(|| panic!("WebDriver {method} {path}: no answer"));
        assert!(v["value"].get("error").is_none(), "WebDriver {method} {path}: {v}");
        v
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64(text: &str) -> Vec<u8> {
    let digit = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for d in text.bytes().filter_map(digit) {
        acc = (acc << 6) | u32::from(d);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// What the page shows: slots (name, state, current job), jobs (id,
/// state), whether it is live, and the detail pane's texts.
const READ_PAGE: &str = r#"
const rows = (id) => [...document.querySelectorAll('#' + id + ' tbody tr')];
return JSON.stringify({
  slots: rows('slots').map(r => [r.dataset.slot, r.dataset.state, r.cells[5].textContent]),
  jobs: rows('jobs').map(r => [Number(r.dataset.id), r.dataset.state]),
  live: document.getElementById('live').className,
  hash: location.hash,
  record: document.getElementById('detail-record').textContent,
  stdout: document.getElementById('detail-stdout').textContent,
  error: document.getElementById('error').textContent,
});"#;

#[test]
fn the_dashboard_shows_what_the_daemon_knows_in_a_real_browser() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium/chromedriver missing: `cargo xtask services` installs them"
        );
        eprintln!("skipped: no chromium/chromedriver (apt-get install chromium chromium-driver)");
        return;
    }
    let mark = unique("dashboard-");
    let _reaper = Reaper::new(&mark);
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let ok = |args: &[&str]| {
        let out = run(crew(w, &mark, args), None, DEADLINE);
        assert_eq!(out.code(), Some(0), "crew {args:?}: {out}");
        out
    };
    // `crew dashboard` starts the daemon with an HTTP listener.
    let url = ok(&["dashboard", "--json", "--no-open"]).records()[0]["url"].as_str().expect("a url").to_owned();
    assert!(url.starts_with("http://127.0.0.1:") && url.contains("/dashboard#token="), "{url}");
    ok(&["recruit", "--workers", "2", "--class", "local"]);
    for i in 1..=4 {
        ok(&["send", "--name", &format!("e{i}"), "--", "sh", "-c", &format!("echo out-{i}")]);
    }
    let long = ok(&["send", "--name", "long", "--", "sleep", "120"]).stdout.trim().parse::<u64>().expect("an id");
    // Settled: four ended, the long one running.
    let settled = poll_until(Duration::from_secs(60), || {
        let s = ok(&["status", "--json"]).records()[0].clone();
        s["jobs"]["ready"] == 4 && s["jobs"]["running"] == 1
    });
    assert!(settled, "the jobs did not settle");

    let driver = Driver::start();
    let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": CHROMIUM,
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"]
    }}}});
    let session =
        driver.must("POST", "/session", Some(&caps))["value"]["sessionId"].as_str().expect("a session").to_owned();
    let at = |p: &str| format!("/session/{session}{p}");
    driver.must("POST", &at("/url"), Some(&json!({"url": url})));
    let read = || -> Value {
        let v = driver.must("POST", &at("/execute/sync"), Some(&json!({"script": READ_PAGE, "args": []})));
        serde_json::from_str(v["value"].as_str().unwrap_or("{}")).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut page = read();
    while !(page["slots"].as_array().is_some_and(|s| s.len() == 2)
        && page["jobs"].as_array().is_some_and(|j| j.len() == 5)
        && page["live"] == "on")
    {
        assert!(Instant::now() < deadline, "the page did not show the daemon's state: {page}");
        std::thread::sleep(Duration::from_millis(200));
        page = read();
    }
    assert_eq!(page["hash"], "", "the token must leave the address bar: {page}");
    assert_eq!(page["error"], "", "{page}");

    // The same slots, in the same states, as `crew status --json`; the busy
    // one runs the long job.
    let status = ok(&["status", "--json"]).records()[0].clone();
    let mut want: Vec<(String, String)> = status["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or("").to_owned(), s["state"].as_str().unwrap_or("").to_owned()))
        .collect();
    let mut shown: Vec<(String, String)> = page["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| (s[0].as_str().unwrap_or("").to_owned(), s[1].as_str().unwrap_or("").to_owned()))
        .collect();
    want.sort();
    shown.sort();
    assert_eq!(shown, want, "{page}\n{status}");
    let busy: Vec<&Value> = page["slots"].as_array().expect("slots").iter().filter(|s| s[1] == "busy").collect();
    assert_eq!(busy.len(), 1, "{page}");
    assert_eq!(busy[0][2].as_str(), Some(format!("{long} (long)").as_str()), "{page}");
    // The jobs and their states, as the API has them.
    let mut jobs: Vec<(u64, String)> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| (j[0].as_u64().unwrap_or(0), j[1].as_str().unwrap_or("").to_owned()))
        .collect();
    jobs.sort();
    let finished: Vec<u64> = jobs.iter().filter(|(_, s)| s == "finished").map(|(id, _)| *id).collect();
    assert_eq!(finished.len(), 4, "{page}");
    assert!(jobs.contains(&(long, "running".to_owned())), "{page}");

    // A click shows a job's record and its logs.
    let first = finished[0];
    let click = format!("document.querySelector('#jobs tbody tr[data-id=\"{first}\"]').click(); return true;");
    driver.must("POST", &at("/execute/sync"), Some(&json!({"script": click, "args": []})));
    let shown = poll_until(DEADLINE, || {
        let p = read();
        p["record"].as_str().is_some_and(|r| r.contains("\"succeeded\""))
            && p["stdout"].as_str().is_some_and(|o| o.starts_with("out-"))
    });
    assert!(shown, "the job's record and logs were not shown: {}", read());

    // Live: a job sent now appears without a reload.
    ok(&["send", "--name", "later", "--", "true"]);
    let live = poll_until(DEADLINE, || read()["jobs"].as_array().is_some_and(|j| j.len() == 6));
    assert!(live, "a new job did not appear: {}", read());

    // The screenshot, kept as the test's artifact.
    let png = base64(driver.must("GET", &at("/screenshot"), None)["value"].as_str().expect("a screenshot"));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let artifact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &png).expect("save the screenshot");
    eprintln!("dashboard screenshot: {} ({} bytes)", artifact.display(), png.len());
    let _ = driver.call("DELETE", &at(""), None);
    ok(&["cancel", &long.to_string()]);
    ok(&["down"]);
}
