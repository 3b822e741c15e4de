//! Shared helpers: running `crew` with a deadline, marking and finding the
//! processes a test started, and polling for conditions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// The environment variable that marks the processes of one test.
pub(crate) const MARK_VAR: &str = "CREW_TEST_MARK";

/// The `crew` binary under test.
pub(crate) fn crew_bin() -> &'static str {
    env!("CARGO_BIN_EXE_crew")
}

/// `examples/jobs.txt` of the repository.
pub(crate) fn examples_jobs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/jobs.txt")
}

/// A string no other test (or test run) uses.
pub(crate) fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}{}x{}x{}", std::process::id(), nanos, N.fetch_add(1, Ordering::Relaxed))
}

/// A number of seconds just above 29 whose text is unique, for `sleep`
/// commands that must be findable by their argument.
pub(crate) fn unique_sleep() -> String {
    let digits: String = unique("").chars().filter(char::is_ascii_digit).collect();
    format!("29.{digits}")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub(crate) fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids (other than this process) whose `/proc/PID/FILE` (NUL-separated)
/// has an entry containing `needle` (equal to it, with `exact`).
/// Unreadable entries are skipped.
fn pids_where(file: &str, needle: &str, exact: bool) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/{file}")).is_ok_and(|b| {
                b.split(|&c| c == 0).any(|e| {
                    let e = String::from_utf8_lossy(e);
                    if exact { e == needle } else { e.contains(needle) }
                })
            })
        })
        .collect()
}

/// Live processes whose environment has `CREW_TEST_MARK=mark`.
pub(crate) fn marked_pids(mark: &str) -> Vec<u32> {
    pids_where("environ", &format!("{MARK_VAR}={mark}"), true)
}

/// Live processes with an argument containing `needle`.
pub(crate) fn pids_with_arg(needle: &str) -> Vec<u32> {
    pids_where("cmdline", needle, false)
}

/// Live processes with an argument equal to `arg`.
pub(crate) fn pids_with_exact_arg(arg: &str) -> Vec<u32> {
    pids_where("cmdline", arg, true)
}

/// What a process is, for failure messages.
pub(crate) fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd: Vec<String> = cmd.split(|&c| c == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            format!("{pid}: {}", cmd.join(" ").trim())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Asserts that no process carries `mark`, waiting up to `within` for the
/// last ones to exit.
pub(crate) fn assert_none_marked(mark: &str, within: Duration) {
    let mut left = Vec::new();
    let gone = poll_until(within, || {
        left = marked_pids(mark);
        left.is_empty()
    });
    assert!(gone, "processes of the run are still alive {within:?} after it ended: {}", describe(&left));
}

fn kill(pids: &[u32]) {
    for &pid in pids {
        if let Ok(p) = libc::pid_t::try_from(pid) {
            // SAFETY: a plain signal send; at worst the pid is gone.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// Sends `sig` to `pid`.
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    let p = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: a plain signal send to a child this test started.
    let rc = unsafe { libc::kill(p, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed: {}", std::io::Error::last_os_error());
}

/// Kills every process carrying `mark` (or an argument with `needle`) when
/// dropped: the clean-up of a test that fails half-way.
pub(crate) struct Reaper {
    marks: Vec<String>,
    args: Vec<String>,
}

impl Reaper {
    pub(crate) fn new(mark: &str) -> Self {
        Self { marks: vec![mark.to_owned()], args: Vec::new() }
    }

    /// Also kill processes with an argument containing `needle`.
    pub(crate) fn and_arg(mut self, needle: &str) -> Self {
        self.args.push(needle.to_owned());
        self
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for m in &self.marks {
            kill(&marked_pids(m));
        }
        for a in &self.args {
            kill(&pids_with_arg(a));
        }
    }
}

/// A finished `crew` process.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) elapsed: Duration,
}

impl Finished {
    pub(crate) fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The JSON Lines records of stdout.
    pub(crate) fn records(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON record ({e}): {l}\n{self}")))
            .collect()
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status: {}\n--- stdout\n{}--- stderr\n{}", self.status, self.stdout, self.stderr)
    }
}

/// `crew ARGS` with the emulator's AWS variables pointing at `endpoint`
/// (as `cargo xtask emu env` sets them) and no store, listen or profile
/// setting of the caller's environment.
pub(crate) fn aws_crew(dir: &Path, mark: &str, endpoint: &str, args: &[&str]) -> Command {
    let mut c = crew(dir, mark, args);
    c.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("CREW_STORE")
        .env_remove("CREW_LISTEN")
        .env_remove("CREW_ADVERTISE");
    c
}

/// Runs a closure when dropped: the clean-up (e.g. `crew down`) of a test
/// that may fail half-way.
pub(crate) struct OnDrop<'a>(pub(crate) &'a dyn Fn());

impl Drop for OnDrop<'_> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// `crew ARGS` in `dir`, its processes marked with `mark`. The jobs of
/// `crew run` and `crew send` carry the mark too (`--env-inherit`, since
/// jobs no longer inherit their worker's environment), so that the checks
/// for leftover processes see them.
pub(crate) fn crew(dir: &Path, mark: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(crew_bin());
    // The command comes first, or after the global `--dir DIR`.
    let at = if args.first() == Some(&"--dir") { 2 } else { 0 };
    if args.get(at).is_some_and(|c| *c == "run" || *c == "send") {
        cmd.args(&args[..=at]).args(["--env-inherit", MARK_VAR]).args(&args[at + 1..]);
    } else {
        cmd.args(args);
    }
    cmd.current_dir(dir)
        .env(MARK_VAR, mark)
        .env_remove("CREW_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A started `crew` process whose output is being collected.
pub(crate) struct Running {
    pub(crate) pid: u32,
    started: Instant,
    done: mpsc::Receiver<std::io::Result<std::process::Output>>,
}

/// Starts `cmd`, feeding `stdin` (if any) to it.
pub(crate) fn start(mut cmd: Command, stdin: Option<&str>) -> Running {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child: Child = cmd.spawn().expect("cannot start crew");
    if let Some(text) = stdin {
        let mut w = child.stdin.take().expect("piped stdin");
        w.write_all(text.as_bytes()).expect("cannot write crew's stdin");
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    Running { pid, started: Instant::now(), done: rx }
}

impl Running {
    /// Waits for the exit; past `deadline`, kills it and fails the test.
    pub(crate) fn wait(self, deadline: Duration) -> Finished {
        match self.done.recv_timeout(deadline.saturating_sub(self.started.elapsed())) {
            Ok(out) => {
                let out = out.expect("cannot wait for crew");
                Finished {
                    status: out.status,
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    elapsed: self.started.elapsed(),
                }
            }
            Err(_) => {
                kill(&[self.pid]);
                panic!("crew (pid {}) did not exit within {deadline:?}; killed it", self.pid);
            }
        }
    }
}

/// Runs `cmd` to its end, with `deadline`.
pub(crate) fn run(cmd: Command, stdin: Option<&str>, deadline: Duration) -> Finished {
    start(cmd, stdin).wait(deadline)
}

/// The default deadline of one `crew` command.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// `crew ARGS` in `dir` (its project folder: `dir/.crew`), to its end,
/// which must be a success.
pub(crate) fn crew_ok(dir: &Path, mark: &str, args: &[&str]) -> Finished {
    crew_ok_within(dir, mark, args, DEADLINE)
}

/// [`crew_ok`] with another deadline.
pub(crate) fn crew_ok_within(dir: &Path, mark: &str, args: &[&str], deadline: Duration) -> Finished {
    let out = run(crew(dir, mark, args), None, deadline);
    assert_eq!(out.code(), Some(0), "crew {}\n{out}", args.join(" "));
    out
}

/// Stops the daemon of `dir` when dropped, so a failing test does not leave
/// it running (the [`Reaper`] kills whatever is left after that).
pub(crate) struct Down<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) mark: &'a str,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run(crew(self.dir, self.mark, &["down"]), None, DEADLINE);
    }
}
