//! Figure 10: the daemon path with a million jobs (`crew up`; `crew recruit
//! --workers 2 --class local`; `crew send --file F`; `crew receive --all
//! --json`), as a user runs it, each run in a fresh project folder.
//!
//! - 10a: `crew send --file` of N `{"builtin":"noop"}` lines, until the
//!   daemon answered (every job validated, journaled durably, queued).
//! - 10b: end to end, N jobs sent and all received (`crew receive --all
//!   --wait --json > file`) on 2 local workers launched beforehand, in
//!   jobs/s, against `crew run --workers 2` of the same file measured
//!   alternately.
//! - 10c: the peak memory of that `crew receive` (flat: it prints records
//!   as they arrive).
//! - 10d: the daemon's memory per queued job: its RSS as the send of 10a
//!   returns (the jobs are all queued then; the workers they launch are
//!   not connected yet) less its RSS before the send, over N.
//! - 10e: a restart after the session of 10b: the daemon SIGKILLed as
//!   soon as the last receive returned, then `crew up` until `crew
//!   status` answers, against spawning `crew --version`. The last receive
//!   answers once the journal is a checkpoint of a few records (10f: its
//!   size then).
//!
//! Peak memory is the kernel's high-water mark, `VmHWM` of
//! `/proc/PID/status`, sampled every few milliseconds while the process
//! runs: the mark only grows, so the last sample before the exit is the
//! peak (short of the last few milliseconds). `wait4`'s `ru_maxrss` would
//! be exact but needs the child reaped by hand; the bench already reads
//! `VmHWM` elsewhere (figure 7c).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::measure::progress;
use super::report::{Row, Target, Unit};
use super::store::run_sampled;

/// Longest any one command may take.
const PATIENCE: Duration = Duration::from_secs(900);

/// A project folder of its own for one run.
struct Project<'a> {
    crew: &'a Path,
    dir: PathBuf,
}

impl<'a> Project<'a> {
    fn new(crew: &'a Path, root: &Path, name: &str) -> anyhow::Result<Self> {
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { crew, dir })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.crew);
        c.arg("--dir").arg(self.dir.join(".crew")).args(args).current_dir(&self.dir).stdin(Stdio::null());
        c.env_remove("CREW_DIR").env_remove("CREW_STORE").env_remove("CREW_LOG");
        c
    }

    /// Runs `crew ARGS` to success; its stdout.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cmd(args).output().with_context(|| format!("cannot start crew {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("crew {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The daemon's pid (starting it if needed).
    fn up(&self) -> anyhow::Result<u32> {
        let health: serde_json::Value = serde_json::from_str(self.ok(&["up", "--json"])?.trim())?;
        let pid = health["pid"].as_u64().context("no pid in `crew up --json`")?;
        Ok(u32::try_from(pid)?)
    }

    fn down(&self) {
        let _ = self.cmd(&["down"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// Resident memory of `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cmd` with stdout to `out`: its wall time and its peak memory (KiB).
fn timed(mut cmd: Command, out: Stdio) -> anyhow::Result<(f64, u64)> {
    run_sampled(&mut cmd, out, true, PATIENCE)
}

/// Waits until `pid` is gone (or a zombie).
fn wait_gone(pid: u32) -> anyhow::Result<()> {
    let begin = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        if stat.is_err() || stat.is_ok_and(|s| s.contains(") Z ")) {
            return Ok(());
        }
        ensure!(begin.elapsed() < PATIENCE, "process {pid} did not die");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Figure 10 (10a to 10e) with `n` jobs.
pub(super) fn daemon(crew: &Path, root: &Path, quick: bool, runs: usize) -> anyhow::Result<Vec<Row>> {
    let n: usize = if quick { 100_000 } else { 1_000_000 };
    let work = root.join("daemon10");
    std::fs::create_dir_all(&work)?;
    let file = work.join("noop.jobs");
    std::fs::write(&file, "{\"builtin\":\"noop\"}\n".repeat(n)).context("cannot write the job file")?;
    let file_arg = file.to_str().context("the scratch path is not UTF-8")?.to_owned();
    let (mut send, mut per_job) = (Vec::new(), Vec::new());
    let (mut e2e, mut run_rate, mut receive_rss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut restart, mut version, mut journal_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=runs {
        // 10a, 10d: the send alone, into a daemon whose 2 slots are not
        // launched yet.
        let p = Project::new(crew, &work, &format!("send-{i}"))?;
        let pid = p.up()?;
        p.ok(&["recruit", "--workers", "2", "--class", "local"])?;
        std::thread::sleep(Duration::from_millis(200));
        let idle = vm_rss_kib(pid).context("cannot read the daemon's memory")?;
        let (s, _) = timed(p.cmd(&["send", "--file", &file_arg]), Stdio::null())?;
        let queued = vm_rss_kib(pid).context("cannot read the daemon's memory")?;
        p.down();
        let _ = std::fs::remove_dir_all(&p.dir);
        let bytes = (queued.saturating_sub(idle) * 1024) as f64 / n as f64;
        progress("10a", i, runs, format!("send --file of {n} jobs {s:.3} s; daemon {bytes:.0} bytes a queued job"));
        send.push(s);
        per_job.push(bytes);

        // 10b, 10c: end to end on 2 local workers, then 10e.
        let p = Project::new(crew, &work, &format!("e2e-{i}"))?;
        let pid = p.up()?;
        p.ok(&["recruit", "--workers", "2", "--class", "local"])?;
        p.ok(&["launch"])?;
        wait_up(&p, 2)?;
        let out_path = p.dir.join("received.jsonl");
        let begin = Instant::now();
        timed(p.cmd(&["send", "--file", &file_arg]), Stdio::null())?;
        let out = std::fs::File::create(&out_path)?;
        let (_, peak) = timed(p.cmd(&["receive", "--all", "--wait", "--json"]), Stdio::from(out))?;
        let wall = begin.elapsed().as_secs_f64();
        let lines = count_lines(&out_path)?;
        ensure!(lines == n, "received {lines} records of {n}");
        let _ = std::fs::remove_file(&out_path);
        // The session is over: its last receive answered after the
        // journal became a checkpoint (10f), and the daemon is killed at
        // once.
        let journal = p.dir.join(".crew/journal.jsonl");
        journal_bytes.push(std::fs::metadata(&journal).map_or(0, |m| m.len()) as f64);
        let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
        ensure!(killed.success(), "cannot SIGKILL the daemon ({pid})");
        wait_gone(pid)?;
        let begin_up = Instant::now();
        p.up()?;
        p.ok(&["status"])?;
        let r = begin_up.elapsed().as_secs_f64();
        let v = {
            let b = Instant::now();
            let status = Command::new(crew).arg("--version").stdout(Stdio::null()).status()?;
            ensure!(status.success(), "crew --version failed");
            b.elapsed().as_secs_f64()
        };
        p.down();
        let _ = std::fs::remove_dir_all(&p.dir);
        let (crew_run, _) = timed(
            {
                let mut c = Command::new(crew);
                c.args(["run", "--workers", "2", &file_arg]).current_dir(&work).stdin(Stdio::null());
                c
            },
            Stdio::null(),
        )?;
        progress(
            "10b",
            i,
            runs,
            format!(
                "daemon {:.0} jobs/s (receive peak {:.1} MiB), crew run {:.0} jobs/s; restart {r:.3} s",
                n as f64 / wall,
                peak as f64 / 1024.0,
                n as f64 / crew_run
            ),
        );
        e2e.push(n as f64 / wall);
        run_rate.push(n as f64 / crew_run);
        receive_rss.push(peak as f64 / 1024.0);
        restart.push(r);
        version.push(v);
    }
    let scale = n as f64 / 1_000_000.0;
    Ok(vec![
        Row {
            id: "10a",
            figure: format!("crew send --file of {n} noop jobs, accepted"),
            unit: Unit::Seconds,
            crew: send,
            baseline: Vec::new(),
            baseline_is: String::new(),
            target: Target::Below(3.0 * scale),
        },
        Row {
            id: "10b",
            figure: format!("daemon end to end: send {n} noop jobs, receive --all --wait, 2 local workers"),
            unit: Unit::JobsPerSecond,
            crew: e2e,
            baseline: run_rate,
            baseline_is: "crew run --workers 2 of the same file".into(),
            target: Target::AtLeast(100_000.0),
        },
        Row {
            id: "10c",
            figure: format!("peak memory of crew receive --all --json of {n} records"),
            unit: Unit::Mib,
            crew: receive_rss,
            baseline: Vec::new(),
            baseline_is: String::new(),
            target: Target::Info,
        },
        Row {
            id: "10d",
            figure: format!("daemon memory per queued job (bytes, RSS after send of {n} less idle)"),
            unit: Unit::Bytes,
            crew: per_job,
            baseline: Vec::new(),
            baseline_is: String::new(),
            target: Target::Below(512.0),
        },
        Row {
            id: "10e",
            figure: format!(
                "daemon restart after the {n}-job session: SIGKILL as its last receive returns, crew up until status answers"
            ),
            unit: Unit::Seconds,
            crew: restart,
            baseline: version,
            baseline_is: "spawning crew --version".into(),
            target: Target::Below(2.0),
        },
        Row {
            id: "10f",
            figure: format!("journal of the {n}-job session when its last receive returns"),
            unit: Unit::Bytes,
            crew: journal_bytes,
            baseline: Vec::new(),
            baseline_is: String::new(),
            target: Target::Below(1024.0 * 1024.0),
        },
    ])
}

/// Waits until `count` workers are up and idle (`crew status --json`).
fn wait_up(p: &Project<'_>, count: usize) -> anyhow::Result<()> {
    let begin = Instant::now();
    loop {
        let status: serde_json::Value = serde_json::from_str(p.ok(&["status", "--json"])?.trim())?;
        let up = status["slots"].as_array().map_or(0, |s| s.iter().filter(|s| s["state"] == "idle").count());
        if up >= count {
            return Ok(());
        }
        ensure!(begin.elapsed() < PATIENCE, "the workers did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_lines(path: &Path) -> anyhow::Result<usize> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = 0;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(lines);
        }
        lines += buf[..got].iter().filter(|&&b| b == b'\n').count();
    }
}
