//! The daemon's limits, through the real binary: a full disk (a real
//! tmpfs filled to the last byte) refuses new work with a clear error,
//! loses no accepted job, and passes by itself once space is freed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, crew, crew_ok, poll_until, run, unique};

/// A tmpfs mounted for the test, unmounted when dropped (also when the
/// test fails half-way).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `at`; `Err(reason)` where mounting is
    /// not allowed here (not root, or no permission), which skips the test.
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: mounting a tmpfs is not allowed".to_owned());
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).into_owned();
            if why.contains("ermission") || why.contains("not permitted") {
                return Err(format!("mount refused: {why}"));
            }
            panic!("mount -t tmpfs failed: {why}");
        }
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0x55u8; 16 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // Smaller writes for the last bytes of a page.
    for _ in 0..64 {
        if f.write(&[0u8; 64]).is_err() {
            break;
        }
    }
    n
}

#[test]
fn a_full_disk_refuses_new_work_loses_no_job_and_passes_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let project = d.join(".crew");
    std::fs::create_dir(&project).expect("mkdir .crew");
    let _tmpfs = match Tmpfs::mount(&project, "2m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let mark = unique("disk-full-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    crew_ok(d, &mark, &["recruit", "--workers", "2", "--class", "local"]);
    let mut accepted: Vec<u64> = Vec::new();
    let mut send = |args: &[&str]| -> Option<u64> {
        let mut all = vec!["send", "--"];
        all.extend_from_slice(args);
        let out = run(crew(d, &mark, &all), None, DEADLINE);
        if out.code() == Some(0) {
            let id = out.stdout.trim().parse().unwrap_or_else(|_| panic!("not an id: {out}"));
            accepted.push(id);
            return Some(id);
        }
        assert_eq!(out.code(), Some(3), "a refused send is exit 3\n{out}");
        assert!(out.stderr.contains("disk") && out.stderr.contains("full"), "says the disk is full\n{out}");
        None
    };
    for _ in 0..3 {
        send(&["true"]).expect("accepted before the disk is full");
    }
    // This one ends while the disk is full: its output waits, not lost.
    send(&["sleep", "2"]).expect("accepted before the disk is full");
    crew_ok(d, &mark, &["status"]);

    let filler = project.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0, "the disk took nothing");
    // The last pages of the files already there still take a few bytes:
    // a send or two may fit in them, then the disk is full for good.
    let mut refused = false;
    for _ in 0..20 {
        if send(&["true"]).is_none() {
            refused = true;
            break;
        }
    }
    assert!(refused, "a send on a full disk is refused");
    for _ in 0..2 {
        assert_eq!(send(&["true"]), None, "a send on a full disk is refused");
    }
    // The daemon is still up and answers.
    crew_ok(d, &mark, &["status"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(send(&["true"]), None, "still refused while the disk is full");

    std::fs::remove_file(&filler).expect("remove the filler");
    // Passes by itself: the next send works.
    let mut again = false;
    assert!(
        poll_until(Duration::from_secs(10), || {
            again = send(&["true"]).is_some();
            again
        }),
        "sends work again once space is freed"
    );
    for _ in 0..2 {
        send(&["true"]).expect("accepted after space came back");
    }
    crew_ok(d, &mark, &["wait", "--timeout", "60s"]);
    let out = crew_ok(d, &mark, &["receive", "--all", "--json"]);
    let mut ids: Vec<u64> = out.records().iter().map(|r| r["id"].as_u64().expect("an id")).collect();
    ids.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(ids, accepted, "every accepted job ends in exactly one record\n{out}");

    // The journal holds whole lines only.
    let journal = std::fs::read(project.join("journal.jsonl")).expect("read the journal");
    assert!(journal.is_empty() || journal.ends_with(b"\n"), "the journal ends with a whole line");
    for line in journal.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("a damaged journal line ({e}): {}", String::from_utf8_lossy(line)));
    }
}

/// A process's resident memory in KiB (`VmRSS`), if it still runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn a_huge_log_streams_with_flat_memory_while_the_daemon_answers() {
    use std::io::Read;
    const SIZE: u64 = 200 * 1024 * 1024;
    // Far below the log's size: the log is never held whole, neither by
    // the daemon nor by `crew logs`.
    const BOUND_KIB: u64 = 100 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("big-log-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    let job = format!("head -c {SIZE} /dev/zero | tr '\\0' x");
    let id = crew_ok(d, &mark, &["send", "--", "sh", "-c", &job]).stdout.trim().to_owned();
    crate::support::crew_ok_within(d, &mark, &["wait", "--timeout", "120s"], Duration::from_secs(150));
    let daemon: u32 =
        std::fs::read_to_string(d.join(".crew/daemon.pid")).expect("daemon.pid").trim().parse().expect("a pid");

    let mut logs = crew(d, &mark, &["logs", &id]).spawn().expect("start crew logs");
    let client = logs.id();
    let mut stdout = logs.stdout.take().expect("piped");
    let (mut total, mut buf) = (0u64, vec![0u8; 64 * 1024]);
    let (mut peak_daemon, mut peak_client, mut statuses) = (0u64, 0u64, 0);
    let mut wrong = None;
    loop {
        let n = stdout.read(&mut buf).expect("read crew logs");
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != b'x') {
            wrong.get_or_insert(total + i as u64);
        }
        total += n as u64;
        // Every ~16 MiB: memory samples, and the daemon still answers.
        if total / (16 << 20) != (total - n as u64) / (16 << 20) {
            peak_daemon = peak_daemon.max(rss_kib(daemon).unwrap_or(0));
            peak_client = peak_client.max(rss_kib(client).unwrap_or(0));
            if total < SIZE {
                let status = run(crew(d, &mark, &["status", "--json"]), None, DEADLINE);
                assert_eq!(status.code(), Some(0), "status answers during the stream\n{status}");
                statuses += 1;
            }
        }
    }
    let end = logs.wait().expect("wait for crew logs");
    assert!(end.success(), "crew logs: {end}");
    assert_eq!(total, SIZE, "the whole log, byte for byte");
    assert_eq!(wrong, None, "the log's content");
    assert!(statuses >= 3, "status was asked during the stream ({statuses} times)");
    assert!(peak_daemon > 0 && peak_client > 0, "memory was sampled");
    assert!(peak_daemon < BOUND_KIB, "the daemon's memory stays flat: {peak_daemon} KiB during a {SIZE}-byte log");
    assert!(peak_client < BOUND_KIB, "crew logs' memory stays flat: {peak_client} KiB");
    eprintln!("streamed {total} bytes; peak RSS: daemon {peak_daemon} KiB, crew logs {peak_client} KiB");
}

/// The number of open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn silent_and_oversized_worker_connections_are_capped_and_logged_short() {
    use std::io::Read;
    const OPENED: usize = 200;
    const CAP: usize = 64; // crew_controller::MAX_HANDSHAKES
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("conn-cap-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    crew_ok(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    let status: serde_json::Value =
        serde_json::from_str(&crew_ok(d, &mark, &["status", "--json"]).stdout).expect("status json");
    let listen = status["workers"]["listen"].as_str().expect("the worker port").to_owned();
    let daemon: u32 = std::fs::read_to_string(d.join(".crew/daemon.pid")).expect("pid").trim().parse().expect("a pid");
    let before = fds(daemon);

    // Many connections that never say hello.
    let silent: Vec<std::net::TcpStream> =
        (0..OPENED).map(|_| std::net::TcpStream::connect(&listen).expect("connect")).collect();
    let closed = |conns: &[std::net::TcpStream]| {
        conns
            .iter()
            .filter(|c| {
                c.set_nonblocking(true).expect("nonblocking");
                match (&**c).read(&mut [0u8; 1]) {
                    Ok(0) => true,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            })
            .count()
    };
    assert!(
        // Well within the hello timeout (10 s), which would close them all.
        poll_until(Duration::from_secs(4), || closed(&silent) >= OPENED - CAP),
        "the daemon closes silent connections past the cap ({} of {OPENED} closed)",
        closed(&silent)
    );
    let held = fds(daemon);
    assert!(held <= before + CAP + 8, "the daemon holds at most the cap: {held} fds (before: {before})");
    // It still answers, and a real agent still gets in and runs a job.
    crew_ok(d, &mark, &["status"]);
    let ran = d.join("ran");
    crew_ok(d, &mark, &["send", "--", "touch", &ran.display().to_string()]);
    crew_ok(d, &mark, &["wait", "--timeout", "30s"]);
    assert!(ran.exists(), "the job ran on a real agent while silent connections were open");
    drop(silent);

    // A hello over the limit is dropped on its length; the log line quotes
    // a short prefix only.
    let mut big = std::net::TcpStream::connect(&listen).expect("connect");
    let body = vec![b'A'; 1024 * 1024];
    big.write_all(&(body.len() as u32).to_be_bytes()).expect("write the length");
    let _ = big.write_all(&body);
    big.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut rest = Vec::new();
    let _ = big.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing answered to an oversized hello");
    // One under the limit that does not decode: refused, logged short.
    let mut bad = std::net::TcpStream::connect(&listen).expect("connect");
    let junk = vec![b'B'; 60 * 1024];
    bad.write_all(&(junk.len() as u32).to_be_bytes()).expect("write the length");
    bad.write_all(&junk).expect("write the junk");
    bad.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let _ = bad.read_to_end(&mut Vec::new());

    let log = d.join(".crew/daemon.log");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        poll_until(Duration::from_secs(5), || text().contains("larger than the limit")),
        "the oversized hello is logged\n{}",
        text()
    );
    let text = text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("rejected a worker connection")).collect();
    assert!(lines.iter().any(|l| l.contains("larger than the limit")), "{text}");
    for l in &lines {
        assert!(l.len() < 600, "a rejection line is short: {} bytes: {l}", l.len());
        assert!(!l.contains(&"A".repeat(40)) && !l.contains(&"B".repeat(40)), "no long quote: {l}");
    }
}

/// A hundred local workers launched at once all come up: their hellos
/// arrive faster than the daemon reads them, past the cap of connections
/// waiting for one (64), and the listener leaves the rest in the kernel's
/// queue rather than closing real agents to make room.
#[test]
fn a_hundred_workers_launched_at_once_all_connect() {
    const N: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("storm-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    crew_ok(d, &mark, &["recruit", "--workers", &N.to_string(), "--class", "local"]);
    crew_ok(d, &mark, &["launch"]);
    let states = || {
        let out = crew_ok(d, &mark, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("status json");
        let slots = status["slots"].as_array().expect("slots").clone();
        let count = |state: &str| slots.iter().filter(|s| s["state"] == state).count();
        (count("idle"), count("down"), slots.len())
    };
    let up = poll_until(Duration::from_secs(60), || states().0 == N);
    let log = std::fs::read_to_string(d.join(".crew/daemon.log")).unwrap_or_default();
    let (idle, down, slots) = states();
    assert!(up, "all {N} workers connect: {idle} idle, {down} down of {slots}\n{log}");
    assert!(
        !log.contains("closed a worker connection") && !log.contains("rejected a worker connection"),
        "no real agent was turned away\n{log}"
    );
}

#[test]
fn daemon_log_rotates_by_size_and_keeps_the_configured_files() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("log-rotate-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    std::fs::create_dir(d.join(".crew")).expect("mkdir");
    std::fs::write(d.join(".crew/crew.toml"), "[daemon]\nlog_size = 4096\nlog_files = 2\n").expect("crew.toml");
    crew_ok(d, &mark, &["up"]);
    let status: serde_json::Value =
        serde_json::from_str(&crew_ok(d, &mark, &["status", "--json"]).stdout).expect("status json");
    let listen = status["workers"]["listen"].as_str().expect("the worker port").to_owned();
    // Each rejected connection is one warning line in daemon.log.
    for _ in 0..100 {
        let mut c = std::net::TcpStream::connect(&listen).expect("connect");
        c.write_all(&[0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1]).expect("write");
        c.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let _ = c.read_to_end(&mut Vec::new());
    }
    let log = d.join(".crew/daemon.log");
    let rotated = |i: u32| d.join(format!(".crew/daemon.log.{i}"));
    assert!(poll_until(Duration::from_secs(5), || rotated(2).exists()), "daemon.log rotated twice or more");
    assert!(!rotated(3).exists(), "only log_files = 2 rotated files are kept");
    crew_ok(d, &mark, &["status"]);
    for p in [log.clone(), rotated(1), rotated(2)] {
        let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{} is private", p.display());
        assert!(meta.len() < 4096 + 1024, "{} is about the size limit: {} bytes", p.display(), meta.len());
    }
    // Logging goes on in the fresh file.
    let mut c = std::net::TcpStream::connect(&listen).expect("connect");
    c.write_all(&[0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1]).expect("write");
    let _ = c.read_to_end(&mut Vec::new());
    assert!(
        poll_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("rejected a worker connection"))),
        "the current daemon.log is written"
    );
}
