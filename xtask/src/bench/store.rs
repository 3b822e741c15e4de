//! Figure 6: a job that writes a large output file, which its agent uploads
//! to the store, against writing the same bytes and copying them to the same
//! store without crew; and the peak memory of the controller (`crew run`) and
//! of the agent (`crew worker`) while it happens.
//!
//! The peak memory of a process is its `VmHWM` (the kernel's high-water mark
//! of its resident set), read from `/proc` every few milliseconds while
//! `crew run` runs: the mark only grows, so the last reading before a
//! process exits is its peak, and the agent lives until the run ends, well
//! after its upload.
//!
//! The local store is always measured; an S3 store too when
//! `CREW_BENCH_S3=s3://BUCKET/PREFIX` is set (with the usual AWS variables,
//! e.g. the emulator's from `cargo xtask emu env`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::report::{Row, Target, Unit};

/// How often the memory of the processes is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// Longest a run may take before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(600);

/// The store a figure-6 run uploads to.
pub(super) enum StoreUnderTest {
    /// A folder: the local store.
    Local(PathBuf),
    /// An S3 URL (`s3://bucket/prefix`).
    S3(String),
}

impl StoreUnderTest {
    fn url(&self) -> String {
        match self {
            StoreUnderTest::Local(dir) => dir.to_string_lossy().into_owned(),
            StoreUnderTest::S3(url) => url.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            StoreUnderTest::Local(_) => "local store",
            StoreUnderTest::S3(_) => "S3 store",
        }
    }
}

/// Peak resident memory, in MiB, of the controller and of its busiest agent
/// during one `crew run`, and its wall time in seconds.
struct RunFigures {
    wall: f64,
    controller_mib: f64,
    agent_mib: f64,
}

/// The command a job runs to write `bytes` bytes to `big.bin`.
fn writer_line(bytes: u64) -> String {
    format!("head -c {bytes} /dev/zero > big.bin")
}

/// Measures figure 6 on `target`: `runs` alternations of crew and the
/// baseline; returns rows 6a (throughput), 6b and 6c (peak memory).
pub(super) fn large_output(
    crew: &Path,
    dir: &Path,
    target: &StoreUnderTest,
    bytes: u64,
    runs: usize,
    ids: [&'static str; 3],
) -> anyhow::Result<Vec<Row>> {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    let job = serde_json::json!({ "name": "big", "shell": writer_line(bytes), "outputs": ["big.bin"] });
    let file = dir.join("big.jsonl");
    std::fs::write(&file, format!("{job}\n")).with_context(|| format!("cannot write {}", file.display()))?;
    let (mut crew_rate, mut base_rate, mut controller, mut agent) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 1..=runs {
        let work = dir.join(format!("run-{i}"));
        std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        let store = match target {
            StoreUnderTest::Local(root) => StoreUnderTest::Local(root.join(format!("run-{i}"))),
            StoreUnderTest::S3(url) => StoreUnderTest::S3(format!("{url}/run-{i}-{}", std::process::id())),
        };
        let figures = crew_run(crew, &work, &store, &file, bytes)?;
        let baseline = plain_copy(&work, &store, bytes)?;
        let (c, b) = (mib / figures.wall, mib / baseline);
        super::measure::progress(
            ids[0],
            i,
            runs,
            format!(
                "crew {c:.0} MiB/s, plain copy {b:.0} MiB/s; peak RSS controller {:.1} MiB, agent {:.1} MiB",
                figures.controller_mib, figures.agent_mib
            ),
        );
        crew_rate.push(c);
        base_rate.push(b);
        controller.push(figures.controller_mib);
        agent.push(figures.agent_mib);
        let _ = std::fs::remove_dir_all(&work);
        if let StoreUnderTest::Local(root) = &store {
            let _ = std::fs::remove_dir_all(root);
        }
    }
    let size = if bytes >= 1 << 30 { format!("{} GiB", bytes >> 30) } else { format!("{} MiB", bytes >> 20) };
    let where_ = target.name();
    Ok(vec![
        Row {
            id: ids[0],
            figure: format!("a job writing {size} of output, uploaded to the {where_} (crew run, 1 worker)"),
            unit: Unit::MibPerSecond,
            crew: crew_rate,
            baseline: base_rate,
            baseline_is: format!(
                "`{}` then a plain copy of the file to the same {where_} ({}); ratio = crew / plain",
                writer_line(bytes),
                match target {
                    StoreUnderTest::Local(_) => "cp",
                    StoreUnderTest::S3(_) => "one streamed upload with object_store, 16 MiB parts",
                }
            ),
            target: Target::Info,
        },
        Row {
            id: ids[1],
            figure: format!("  peak RSS of the controller (crew run) during it ({where_})"),
            unit: Unit::Mib,
            crew: controller,
            baseline: Vec::new(),
            baseline_is: "none: the target is absolute".into(),
            target: Target::Below(64.0),
        },
        Row {
            id: ids[2],
            figure: format!("  peak RSS of the agent (crew worker) during it ({where_})"),
            unit: Unit::Mib,
            crew: agent,
            baseline: Vec::new(),
            baseline_is: "none: the target is absolute".into(),
            target: Target::Below(128.0),
        },
    ])
}

/// Runs `crew run --workers 1 --store URL --json FILE` in `work`, watching
/// the memory of it and of its agents; checks the output record.
fn crew_run(crew: &Path, work: &Path, store: &StoreUnderTest, file: &Path, bytes: u64) -> anyhow::Result<RunFigures> {
    let begin = Instant::now();
    let mut child = Command::new(crew)
        .args(["run", "--workers", "1", "--json", "--store", &store.url()])
        .arg(file)
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", crew.display()))?;
    let (mut controller, mut agent) = (0u64, 0u64);
    let status = loop {
        controller = controller.max(vm_hwm_kib(child.id()).unwrap_or(0));
        for pid in children(child.id()) {
            agent = agent.max(vm_hwm_kib(pid).unwrap_or(0));
        }
        if let Some(status) = child.try_wait().context("cannot wait for crew run")? {
            break status;
        }
        if begin.elapsed() > PATIENCE {
            let _ = child.kill();
            bail!("crew run did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let wall = begin.elapsed().as_secs_f64();
    let (stdout, stderr) = read_all(&mut child);
    ensure!(status.success(), "crew run failed ({status}): {}", stderr.trim());
    let record: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("crew run printed no output record: {stdout:?} {stderr:?}"))?;
    ensure!(record["status"] == "succeeded", "the job did not succeed: {record}");
    let size = record["objects"][0]["size"].as_u64();
    ensure!(size == Some(bytes), "the job's output object has size {size:?}, not {bytes}: {record}");
    ensure!(agent > 0, "no agent of crew run was seen: was the run too short to sample?");
    Ok(RunFigures { wall, controller_mib: controller as f64 / 1024.0, agent_mib: agent as f64 / 1024.0 })
}

/// The baseline: the same writer, then a plain copy of its file to the same
/// store; the wall time of both, in seconds.
fn plain_copy(work: &Path, store: &StoreUnderTest, bytes: u64) -> anyhow::Result<f64> {
    let begin = Instant::now();
    let mut line = writer_line(bytes);
    match store {
        StoreUnderTest::Local(root) => {
            let dest = root.join("plain");
            std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
            line.push_str(&format!(" && cp big.bin '{}'", dest.join("big.bin").display()));
            run_shell(&line, work)?;
        }
        StoreUnderTest::S3(url) => {
            run_shell(&line, work)?;
            upload_plainly(&work.join("big.bin"), &format!("{url}/plain/big.bin"))?;
        }
    }
    Ok(begin.elapsed().as_secs_f64())
}

/// Part size of the plain S3 upload.
const PLAIN_PART: usize = 16 * 1024 * 1024;

/// Uploads `file` to the S3 URL `s3://bucket/key` with `object_store` alone
/// (its AWS settings from the environment, as the AWS tools read them):
/// a streamed multipart upload, two parts in flight.
fn upload_plainly(file: &Path, url: &str) -> anyhow::Result<()> {
    use object_store::aws::AmazonS3Builder;
    use object_store::{ObjectStoreExt, WriteMultipart};

    let rest = url.strip_prefix("s3://").with_context(|| format!("{url} is not an s3:// URL"))?;
    let (bucket, key) = rest.split_once('/').with_context(|| format!("{url} names no key"))?;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
        builder = builder.with_endpoint(&endpoint).with_allow_http(endpoint.starts_with("http://"));
    }
    let s3 = builder.build().context("cannot configure the plain S3 client")?;
    let path = object_store::path::Path::from(key);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let upload = s3.put_multipart(&path).await.context("cannot start the plain upload")?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PLAIN_PART);
        let mut f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let mut buf = vec![0u8; PLAIN_PART];
        loop {
            let n = f.read(&mut buf).with_context(|| format!("cannot read {}", file.display()))?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await.context("the plain upload failed")?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.context("the plain upload failed")?;
        anyhow::Ok(())
    })
}

fn run_shell(line: &str, dir: &Path) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .args(["-c", line])
        .current_dir(dir)
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    ensure!(status.success(), "`{line}` failed ({status})");
    Ok(())
}

/// Both pipes of a finished child, read whole (they are small).
fn read_all(child: &mut Child) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (out, err)
}

/// Runs `cmd` (stdin closed, stdout to `out`) to its end, sampling its
/// `VmHWM` every few milliseconds: its wall time in seconds and the peak
/// memory (KiB) of the process itself, not of its children. Fails with its
/// stderr when it fails and `expect_success` holds, or when it runs past
/// `patience`.
///
/// Sampled, not `wait4`'s `ru_maxrss`: Linux carries the parent's
/// high-water mark into a child spawned with `vfork` (as std spawns) through
/// its `exec`, so a child's `ru_maxrss` is never below the bench's own.
pub(super) fn run_sampled(
    cmd: &mut Command,
    out: Stdio,
    expect_success: bool,
    patience: Duration,
) -> anyhow::Result<(f64, u64)> {
    let shown = format!("{cmd:?}");
    let begin = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    // Drained as it comes, so that a chatty child never blocks on a full pipe.
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut err = String::new();
            let _ = e.read_to_string(&mut err);
            err
        })
    });
    let mut peak = 0u64;
    let status = loop {
        peak = peak.max(vm_hwm_kib(child.id()).unwrap_or(0));
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if begin.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {patience:?}");
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let wall = begin.elapsed().as_secs_f64();
    let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    if expect_success && !status.success() {
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        bail!("{shown} failed ({status}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok((wall, peak))
}

/// `VmHWM` of `pid` in KiB, when the process still exists.
pub(super) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The children of `pid` (every thread's list).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return found };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_children() {
        let me = std::process::id();
        assert!(vm_hwm_kib(me).is_some_and(|k| k > 0));
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        assert!(children(me).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
