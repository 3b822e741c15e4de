//! Running one attempt of one job on a worker: processes, builtins, capture,
//! limits.
//!
//! The agent calls [`run_job`] for every job it is given, one at a time, and
//! sends the [`JobResult`] back to the controller. Everything that touches the
//! operating system for a job is here, so that the rest of the agent is plain
//! async plumbing.
//!
//! # How a process job runs, and why
//!
//! - **Its own process group** (`setpgid(0, 0)` in the child), so that a
//!   timeout, a cancellation, or the end of the main process can signal the
//!   whole tree the job started (`kill(-pgid, ...)`), grandchildren included.
//!   A job never outlives its record: when the main process exits, whatever
//!   is left in its group is killed. (A process that moves itself to another
//!   group or session escapes this while the agent lives; the agent's
//!   [`crate::warden`] kills it when the agent ends.)
//! - **`PR_SET_PDEATHSIG(SIGKILL)`** on Linux, so that the job's main process
//!   dies with the agent even when the agent is SIGKILLed. The kernel sends
//!   it when the *thread* that forked the child exits; jobs are spawned from
//!   the async task that runs [`run_job`], i.e. on a runtime thread, which
//!   lives as long as the runtime.
//! - **stdout and stderr go to files** in the agent's scratch folder, not to
//!   pipes: a job that writes gigabytes neither blocks on a full pipe nor
//!   grows the agent's memory. The same two files are reused by every job
//!   (opened with `O_TRUNC` each time), since an agent runs one job at a
//!   time: no folder is created per job. (A process that escaped the job's
//!   group could still write into them.) After the job, the first
//!   [`ExecContext::inline_cap`] bytes are sent inline and, when there is
//!   more, the whole file goes to the store.
//! - **The agent reaps the child itself**: it learns that the main process
//!   exited from a pidfd polled by the runtime (Linux; elsewhere from
//!   `waitid(WNOWAIT)` on a blocking thread), kills what is left of the
//!   group, and only then reaps with `wait4`, which returns the CPU time and
//!   peak memory (`rusage`) that `tokio::process::Child::wait` throws away.
//!   Not reaping before the leftovers are killed keeps the group's id
//!   reserved, so a signal can never reach an unrelated process that reused
//!   the id. Nothing else in the agent may reap children (no
//!   `SIGCHLD` set to `SIG_IGN`, no `waitpid(-1)`).
//!
//! - **CPU and memory limits are rlimits** (`RLIMIT_CPU`, `RLIMIT_DATA`),
//!   set by [`crate::spawn`] in the child before it executes: per process,
//!   inherited by every process the job starts. The outcome is read back
//!   from how the main process ended (SIGXCPU, SIGKILL past the CPU time)
//!   and, for memory, from the job's failure and its stderr, since a
//!   memory rlimit makes allocations fail rather than kill.
//!
//! Builtins ([`crate::builtins`]) run in the agent itself; timeouts and
//! cancellation drop their future.
//!
//! **Invariant:** [`run_job`] never panics on anything a job does, and always
//! returns a result: a job that cannot start is a `failed` job, not an agent
//! error.

pub mod builtins;
#[cfg(target_os = "linux")]
mod spawn;
pub mod warden;

pub use crew_core::job::{BASE_ENV, cpu_limit_seconds};
pub use crew_core::output::JobResult;
pub use crew_core::worker::AGENT_ONLY_ENV;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use tokio_util::sync::CancellationToken;

use crate::builtins::{Builtin, BuiltinContext, BuiltinOutput, Builtins, call_catching};
use crew_core::job::{Command, JobId, JobSpec};
use crew_core::output::{Captured, Status, Timestamp};
use crew_core::staging;
use crew_core::store::{Store, StoreKey};

/// Default number of bytes of stdout (and of stderr) sent inline in a
/// [`JobResult`]: 64 KiB.
pub const INLINE_CAP: usize = 64 * 1024;

/// Default time between SIGTERM and SIGKILL when a job is stopped.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// The shell that runs [`Command::Shell`] lines. An absolute path, so that
/// starting a shell job costs one `execve` rather than a `PATH` search.
pub const SHELL: &str = "/bin/sh";

/// The environment of one attempt of a job, built from `agent` (a lookup
/// in the agent's own environment): [`BASE_ENV`] and the job's
/// `env_inherit` names where `agent` has them (never an
/// [`AGENT_ONLY_ENV`] name), then `spec.env`, then `CREW_JOB_ID`,
/// `CREW_JOB_NAME`, `CREW_SEED`, `CREW_WORKER` and `CREW_ATTEMPT`, which
/// win. Nothing else.
pub fn job_env(
    spec: &JobSpec,
    id: JobId,
    attempt: u32,
    seed: u64,
    worker: &str,
    agent: impl Fn(&str) -> Option<OsString>,
) -> BTreeMap<OsString, OsString> {
    let mut env = BTreeMap::new();
    for name in BASE_ENV.iter().copied().chain(spec.opts.env_inherit.iter().map(String::as_str)) {
        if AGENT_ONLY_ENV.contains(&name) {
            continue;
        }
        if let Some(value) = agent(name) {
            env.insert(OsString::from(name), value);
        }
    }
    for (k, v) in &spec.env {
        env.insert(OsString::from(k), OsString::from(v));
    }
    env.insert("CREW_JOB_ID".into(), id.to_string().into());
    env.insert("CREW_JOB_NAME".into(), spec.name.as_deref().unwrap_or("").into());
    env.insert("CREW_SEED".into(), seed.to_string().into());
    env.insert("CREW_WORKER".into(), worker.into());
    env.insert("CREW_ATTEMPT".into(), attempt.to_string().into());
    env
}

/// Names of the capture files in the scratch folder.
const STDOUT_FILE: &str = "stdout";
const STDERR_FILE: &str = "stderr";
const STDIN_FILE: &str = "stdin";

/// What [`run_job`] needs from the agent: the slot's name, a private folder,
/// limits, the store and the builtins.
#[derive(Clone, Debug)]
pub struct ExecContext {
    /// The slot's name, exported to jobs as `CREW_WORKER`.
    pub worker: String,
    /// A folder private to this agent, where the capture files live. It must
    /// exist; one job at a time may run with a given folder.
    pub scratch: PathBuf,
    /// Bytes of stdout (and of stderr) kept inline in the result; default
    /// [`INLINE_CAP`].
    pub inline_cap: usize,
    /// Where streams longer than `inline_cap` are uploaded whole; when
    /// `None`, they are only truncated.
    pub store: Option<Arc<dyn Store>>,
    /// Why the controller's store could not be opened here, when it could
    /// not: said in the error of every job that needs it and noted on
    /// streams that are truncated for want of it, so that the user sees the
    /// cause in the output records, not only in the worker's log.
    pub store_problem: Option<String>,
    /// The functions `Command::Builtin` jobs can call.
    pub builtins: Builtins,
    /// Time between SIGTERM and SIGKILL when a job times out or is cancelled;
    /// default [`DEFAULT_KILL_GRACE`].
    pub kill_grace: Duration,
}

impl ExecContext {
    /// A context for slot `worker` with capture files in `scratch` (which
    /// must exist), the standard builtins, no store and default limits.
    pub fn new(worker: impl Into<String>, scratch: impl Into<PathBuf>) -> Self {
        Self {
            worker: worker.into(),
            scratch: scratch.into(),
            inline_cap: INLINE_CAP,
            store: None,
            store_problem: None,
            builtins: Builtins::standard(),
            kill_grace: DEFAULT_KILL_GRACE,
        }
    }

    /// Sets the store large streams are uploaded to.
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Sets the builtins.
    pub fn with_builtins(mut self, builtins: Builtins) -> Self {
        self.builtins = builtins;
        self
    }

    /// Sets the inline cap.
    pub fn with_inline_cap(mut self, bytes: usize) -> Self {
        self.inline_cap = bytes;
        self
    }

    /// Sets the grace time between SIGTERM and SIGKILL.
    pub fn with_kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }
}

/// Runs attempt `attempt` of job `id` and reports how it ended.
///
/// - `Command::Argv` executes the program directly, `Command::Shell` runs
///   [`SHELL`]` -c line`, `Command::Builtin` calls `ctx.builtins`.
/// - The job's environment is [`job_env`]: [`BASE_ENV`] and the names in
///   `spec.env_inherit` taken from the agent's environment (never
///   [`AGENT_ONLY_ENV`]), plus `spec.env`, plus `CREW_JOB_ID`,
///   `CREW_JOB_NAME` (empty when unnamed), `CREW_SEED`, `CREW_WORKER` and
///   `CREW_ATTEMPT` (these five win over `spec.env`). Nothing else of the
///   agent's environment reaches the job.
/// - Anything that keeps the job from starting (program not found or not
///   executable, bad working folder, unusable scratch folder) makes it
///   `failed` with `exit_code: None` and an error saying why.
/// - `spec.timeout` and `cancel` stop the job: SIGTERM to its process group,
///   SIGKILL after `ctx.kill_grace`; it ends `timed_out` or `cancelled`.
/// - `spec.cpu` and `spec.memory` are rlimits of every process of the job
///   (`RLIMIT_CPU`, `RLIMIT_DATA`; per process, not for the tree): it ends
///   `cpu_limit` when its main process was killed by SIGXCPU (or by SIGKILL,
///   or exited 128 + either, past the limit's CPU time), `memory_limit`
///   when it failed and its stderr says an allocation failed; another
///   failure of a job with a memory limit names the limit in its error.
///   Builtins are not limited.
///
/// - A job with inputs or outputs ([`JobSpec::has_data`]) runs in its `cwd`
///   or, without one, in a fresh folder `work/<id>-<attempt>` of the scratch
///   folder, removed after the attempt. Its inputs are downloaded there
///   first (each checked against its size and SHA-256; a failure ends the
///   attempt `failed` before the job runs); when it ends `succeeded`,
///   `failed`, `timed_out`, `cpu_limit` or `memory_limit`, the files
///   matching its output patterns are
///   uploaded to `jobs/<id>/<attempt>/outputs/` with a manifest (see
///   [`crew_core::staging`]). A cancelled job uploads nothing: whoever cancelled
///   it does not want its results, and cancelling must be prompt.
///
/// # Cancellation
/// Prefer `cancel` to dropping the returned future: dropping it SIGKILLs the
/// job's process group at once, and no result is produced.
pub async fn run_job(
    ctx: &ExecContext,
    id: JobId,
    attempt: u32,
    seed: u64,
    spec: &JobSpec,
    cancel: CancellationToken,
) -> JobResult {
    if spec.has_data() {
        return run_with_data(ctx, id, attempt, seed, spec, cancel).await;
    }
    run_command(ctx, id, attempt, seed, spec, cancel).await
}

/// A job's working folder with its data: created (and removed) by the
/// agent, or the job's own `cwd`.
struct WorkDir {
    path: PathBuf,
    owned: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.owned {
            // Off the agent's loop: removing tens of thousands of output
            // files takes seconds (more on a loaded machine), and the
            // agent's heartbeats must go on meanwhile.
            let path = std::mem::take(&mut self.path);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || {
                        let _ = std::fs::remove_dir_all(&path);
                    });
                }
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
    }
}

/// [`run_job`] for a job with inputs or outputs.
async fn run_with_data(
    ctx: &ExecContext,
    id: JobId,
    attempt: u32,
    seed: u64,
    spec: &JobSpec,
    cancel: CancellationToken,
) -> JobResult {
    let started = Timestamp::now();
    let clock = Instant::now();
    let job = Job { ctx, id, attempt, seed, spec, started, clock };
    let Some(store) = ctx.store.clone() else {
        let why = match &ctx.store_problem {
            Some(problem) => format!("the job has inputs or outputs but this worker has no store: {problem}"),
            None => "the job has inputs or outputs but this worker has no store".to_owned(),
        };
        return job.ended(Outcome::failed(why));
    };
    let work = match &spec.opts.cwd {
        Some(cwd) => WorkDir { path: cwd.clone(), owned: false },
        None => {
            let path = ctx.scratch.join("work").join(format!("{id}-{attempt}"));
            let _ = std::fs::remove_dir_all(&path);
            if let Err(e) = std::fs::create_dir_all(&path) {
                return job
                    .ended(Outcome::failed(format!("could not create the working folder {}: {e}", path.display())));
            }
            WorkDir { path, owned: true }
        }
    };
    let fetched = tokio::select! {
        biased;
        () = cancel.cancelled() => return job.ended(Stop::Cancelled.outcome(spec)),
        r = fetch_inputs(store.as_ref(), &work.path, spec) => r,
    };
    if let Err(e) = fetched {
        return job.ended(Outcome::failed(e));
    }
    let mut local = spec.clone();
    local.opts.cwd = Some(work.path.clone());
    let mut result = run_command(ctx, id, attempt, seed, &local, cancel).await;
    if matches!(
        result.status,
        Status::Succeeded | Status::Failed | Status::TimedOut | Status::CpuLimit | Status::MemoryLimit
    ) {
        store_outputs(store.as_ref(), id, attempt, &work.path, spec, &mut result).await;
    }
    drop(work);
    result
}

/// Downloads every input of `spec` into `dir`, verified; the error names
/// the input and says why.
async fn fetch_inputs(store: &dyn Store, dir: &Path, spec: &JobSpec) -> Result<(), String> {
    for input in &spec.opts.inputs {
        let fail = |why: String| format!("could not fetch input {:?}: {why}", input.name);
        let crew_core::job::InputSource::Object { key, size, sha256 } = &input.source else {
            return Err(fail("it was not staged (a local path reached the worker)".to_owned()));
        };
        let key = StoreKey::new(key.as_str()).map_err(|e| fail(e.to_string()))?;
        let dest = staging::prepare_dest(dir, &input.name).map_err(|e| fail(e.to_string()))?;
        staging::download_verified(store, &key, sha256, *size, &dest).await.map_err(|e| fail(e.to_string()))?;
        // As between uploads (see store_outputs).
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Uploads the files matching the job's output patterns and the manifest;
/// a missing literal output or an upload failure makes the attempt `failed`.
async fn store_outputs(store: &dyn Store, id: JobId, attempt: u32, dir: &Path, spec: &JobSpec, result: &mut JobResult) {
    let mut problems = Vec::new();
    let mut objects = Vec::new();
    // Walking a large folder blocks: off the agent's runtime, whose
    // heartbeats must go on.
    let prefix = staging::attempts_prefix(spec, id);
    let (owned_dir, patterns) = (dir.to_path_buf(), spec.opts.outputs.clone());
    let expanded = tokio::task::spawn_blocking(move || staging::expand_outputs(&owned_dir, &patterns))
        .await
        .unwrap_or_else(|e| Err(staging::StageError::Invalid(format!("the output search did not finish: {e}"))));
    match expanded {
        Ok((found, missing)) => {
            if result.status == Status::Succeeded {
                for m in &missing {
                    problems.push(format!("declared output {m} was not produced"));
                }
            }
            for name in found {
                let uploaded = match staging::output_key_in(&prefix, attempt, &name) {
                    Ok(key) => staging::upload_hashed(store, &key, &dir.join(&name)).await,
                    Err(e) => Err(e.into()),
                };
                match uploaded {
                    Ok(mut object) => {
                        object.name = name;
                        objects.push(object);
                    }
                    Err(e) => problems.push(format!("could not upload output {name}: {e}")),
                }
                // A local store may complete an upload without ever
                // waiting: give the agent's loop its turn (heartbeats,
                // cancel, signals) between files, or tens of thousands of
                // outputs silence it until the controller counts it lost.
                tokio::task::yield_now().await;
            }
        }
        Err(e) => problems.push(format!("could not collect the outputs: {e}")),
    }
    if !problems.is_empty() {
        if result.status == Status::Succeeded {
            result.status = Status::Failed;
        }
        let text = problems.join("; ");
        result.error = Some(match result.error.take() {
            Some(e) => format!("{e}; {text}"),
            None => text,
        });
    }
    let manifest = staging::Manifest::new(id, spec.name.clone(), attempt, result.status, objects.clone());
    let written = match (staging::manifest_key_in(&prefix, attempt), manifest.to_bytes()) {
        (Ok(key), Ok(bytes)) => store.put_bytes(&key, Bytes::from(bytes)).await.map(drop).map_err(|e| e.to_string()),
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(e.to_string()),
    };
    if let Err(e) = written {
        if result.status == Status::Succeeded {
            result.status = Status::Failed;
        }
        let text = format!("could not write the manifest: {e}");
        result.error = Some(match result.error.take() {
            Some(e) => format!("{e}; {text}"),
            None => text,
        });
    }
    result.objects = objects;
}

async fn run_command(
    ctx: &ExecContext,
    id: JobId,
    attempt: u32,
    seed: u64,
    spec: &JobSpec,
    cancel: CancellationToken,
) -> JobResult {
    let job = Job { ctx, id, attempt, seed, spec, started: Timestamp::now(), clock: Instant::now() };
    match &spec.command {
        Command::Builtin { name, args } => run_builtin(&job, name, args, cancel).await,
        Command::Shell(line) => {
            let mut shell = std::process::Command::new(SHELL);
            shell.arg("-c").arg(line);
            match simple_command(line) {
                // A line the shell would only split on blanks and execute:
                // run it directly, saving the shell's exec and fork. If the
                // program cannot be started, the shell runs the line after
                // all, so that errors are the shell's (exit 127 and its
                // message), exactly as without the shortcut.
                Some(words) => {
                    let mut cmd = std::process::Command::new(words[0]);
                    cmd.args(&words[1..]);
                    run_process(&job, words[0], cmd, Some(shell), cancel).await
                }
                None => run_process(&job, SHELL, shell, None, cancel).await,
            }
        }
        Command::Argv(argv) => match argv.split_first() {
            Some((program, args)) => {
                let mut cmd = std::process::Command::new(program);
                cmd.args(args);
                run_process(&job, program, cmd, None, cancel).await
            }
            None => job.ended(Outcome::failed("the command is empty: give at least a program")),
        },
    }
}

/// One attempt being run: its identity and when it started.
struct Job<'a> {
    ctx: &'a ExecContext,
    id: JobId,
    attempt: u32,
    seed: u64,
    spec: &'a JobSpec,
    started: Timestamp,
    clock: Instant,
}

/// How an attempt ended, before the capture is attached.
struct Outcome {
    status: Status,
    exit_code: Option<i32>,
    signal: Option<i32>,
    error: Option<String>,
    stdout: Captured,
    stderr: Captured,
    cpu_seconds: f64,
    peak_rss_bytes: u64,
}

impl Outcome {
    fn new(status: Status, error: Option<String>) -> Self {
        Self {
            status,
            exit_code: None,
            signal: None,
            error,
            stdout: Captured::default(),
            stderr: Captured::default(),
            cpu_seconds: 0.0,
            peak_rss_bytes: 0,
        }
    }

    fn failed(error: impl Into<String>) -> Self {
        Self::new(Status::Failed, Some(error.into()))
    }

    /// Adds a problem to the error without changing the status.
    fn note(&mut self, problem: String) {
        match &mut self.error {
            Some(error) => {
                error.push_str("; ");
                error.push_str(&problem);
            }
            None => self.error = Some(problem),
        }
    }
}

impl Job<'_> {
    /// The result of an attempt that ended now.
    fn ended(&self, outcome: Outcome) -> JobResult {
        self.ended_at(outcome, Timestamp::now(), self.clock.elapsed())
    }

    fn ended_at(&self, o: Outcome, finished: Timestamp, wall: Duration) -> JobResult {
        let mut r = JobResult::new(o.status, self.started, finished);
        r.exit_code = o.exit_code;
        r.signal = o.signal;
        r.error = o.error;
        r.stdout = o.stdout;
        r.stderr = o.stderr;
        r.wall_seconds = wall.as_secs_f64();
        r.cpu_seconds = o.cpu_seconds;
        r.peak_rss_bytes = o.peak_rss_bytes;
        r
    }

    /// The store key of a whole stream: `jobs/<id>/<attempt>/<stream>`.
    fn stream_key(&self, stream: &str) -> Result<StoreKey, crew_core::store::StoreError> {
        StoreKey::new(format!("jobs/{}/{}/{stream}", self.id, self.attempt))
    }

    /// The store and key for a stream that is too long to inline, or `None`
    /// without a store.
    fn spill_target(&self, stream: &str, outcome: &mut Outcome) -> Option<(&Arc<dyn Store>, StoreKey)> {
        let Some(store) = self.ctx.store.as_ref() else {
            if let Some(problem) = &self.ctx.store_problem {
                outcome.note(format!("{stream} was truncated, not stored: {problem}"));
            }
            return None;
        };
        match self.stream_key(stream) {
            Ok(key) => Some((store, key)),
            Err(e) => {
                outcome.note(format!("could not upload {stream} to the store: {e}"));
                None
            }
        }
    }
}

/// Why the wait for a job stopped before it ended by itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
}

impl Stop {
    fn outcome(self, spec: &JobSpec) -> Outcome {
        match self {
            Stop::TimedOut => Outcome::new(Status::TimedOut, Some(timed_out_message(spec))),
            Stop::Cancelled => Outcome::new(Status::Cancelled, Some("cancelled".to_owned())),
        }
    }
}

fn timed_out_message(spec: &JobSpec) -> String {
    match spec.timeout {
        Some(t) => format!("timed out after {}", humantime::format_duration(t)),
        None => "timed out".to_owned(),
    }
}

/// Completes after `timeout`, or never.
async fn deadline(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------
// Builtins

async fn run_builtin(job: &Job<'_>, name: &str, args: &serde_json::Value, cancel: CancellationToken) -> JobResult {
    let f = match job.ctx.builtins.lookup(name) {
        Ok(Builtin::Noop) if !cancel.is_cancelled() => {
            // The benchmarked path: nothing to allocate, nothing to wait for.
            return job.ended(Outcome::new(Status::Succeeded, None));
        }
        Ok(Builtin::Noop) => return job.ended(Stop::Cancelled.outcome(job.spec)),
        Ok(Builtin::Func(f)) => f,
        Err(e) => return job.ended(Outcome::failed(e.to_string())),
    };
    if cancel.is_cancelled() {
        return job.ended(Stop::Cancelled.outcome(job.spec));
    }
    // A child token, so that a timeout can tell the builtin's helpers to stop
    // without cancelling the caller's token.
    let token = cancel.child_token();
    let bctx = BuiltinContext {
        id: job.id,
        attempt: job.attempt,
        seed: job.seed,
        env: job.spec.env.clone(),
        cancel: token.clone(),
    };
    let ended = tokio::select! {
        // Cancellation first: the builtin sees it through its child token in
        // the same poll, and its own "cancelled" error must not win.
        biased;
        () = cancel.cancelled() => Err(Stop::Cancelled),
        r = call_catching(f, args.clone(), bctx) => Ok(r),
        () = deadline(job.spec.timeout) => Err(Stop::TimedOut),
    };
    // The builtin's future is dropped by now; stop whatever it left behind.
    token.cancel();
    let finished = Timestamp::now();
    let wall = job.clock.elapsed();
    let outcome = match ended {
        Ok(Ok(BuiltinOutput { stdout, stderr })) => {
            let mut o = Outcome::new(Status::Succeeded, None);
            o.stdout = capture_text(job, STDOUT_FILE, stdout, &mut o).await;
            o.stderr = capture_text(job, STDERR_FILE, stderr, &mut o).await;
            o
        }
        Ok(Err(e)) => Outcome::failed(e.message()),
        Err(stop) => stop.outcome(job.spec),
    };
    if outcome.status != Status::Succeeded {
        tracing::debug!(job = %job.id, builtin = name, status = %outcome.status, "builtin ended");
    }
    job.ended_at(outcome, finished, wall)
}

/// Captures a builtin's output: inline up to the cap, whole in the store when
/// longer.
async fn capture_text(job: &Job<'_>, stream: &str, text: String, outcome: &mut Outcome) -> Captured {
    let cap = job.ctx.inline_cap;
    if text.len() <= cap {
        let bytes = text.len() as u64;
        return Captured::inline(text, bytes, false);
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut captured = Captured::inline(text[..end].to_owned(), text.len() as u64, true);
    if let Some((store, key)) = job.spill_target(stream, outcome) {
        match store.put_bytes(&key, Bytes::from(text)).await {
            Ok(_) => captured.key = Some(key.as_str().to_owned()),
            Err(e) => upload_failed(job, stream, &e, outcome),
        }
    }
    captured
}

fn upload_failed(job: &Job<'_>, stream: &str, e: &crew_core::store::StoreError, outcome: &mut Outcome) {
    tracing::warn!(job = %job.id, attempt = job.attempt, stream, error = %e, "could not upload a job stream");
    outcome.note(format!("could not upload {stream} to the store: {e}"));
}

// ---------------------------------------------------------------------------
// Processes

/// Shell words that need no shell: a line of plain words (letters, digits
/// and `_-./:,+@%=`) separated by blanks, whose first word is neither an
/// assignment nor a shell builtin that has no program of the same meaning.
/// `/bin/sh -c LINE` would only split such a line and execute it.
fn simple_command(line: &str) -> Option<Vec<&str>> {
    const SHELL_ONLY: &[&str] = &[
        ".", ":", "alias", "bg", "break", "cd", "command", "continue", "eval", "exec", "exit", "export", "fc", "fg",
        "getopts", "hash", "jobs", "local", "read", "readonly", "return", "set", "shift", "times", "trap", "type",
        "ulimit", "umask", "unalias", "unset", "wait",
    ];
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:,+@%=".contains(c);
    if !line.chars().all(|c| plain(c) || c == ' ' || c == '\t') {
        return None;
    }
    let words: Vec<&str> = line.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
    let first = *words.first()?;
    if first.contains('=') || SHELL_ONLY.contains(&first) {
        return None;
    }
    Some(words)
}

async fn run_process(
    job: &Job<'_>,
    program: &str,
    mut cmd: std::process::Command,
    fallback: Option<std::process::Command>,
    cancel: CancellationToken,
) -> JobResult {
    if cancel.is_cancelled() {
        return job.ended(Stop::Cancelled.outcome(job.spec));
    }
    let scratch = &job.ctx.scratch;
    let files = match CaptureFiles::open(scratch) {
        Ok(f) => f,
        Err(e) => {
            return job
                .ended(Outcome::failed(format!("could not create the capture files in {}: {e}", scratch.display())));
        }
    };
    let stdin = match configure(job, &mut cmd, &files) {
        Ok(stdin) => stdin,
        Err(e) => return job.ended(Outcome::failed(format!("could not prepare the job: {e}"))),
    };

    let pid = match start(&mut cmd, &stdin, &files, job.spec) {
        Ok(pid) => pid,
        Err(e) => {
            let Some(mut shell) = fallback else {
                return job.ended(Outcome::failed(start_error(program, job.spec.opts.cwd.as_deref(), &e)));
            };
            let stdin = match configure(job, &mut shell, &files) {
                Ok(stdin) => stdin,
                Err(e) => return job.ended(Outcome::failed(format!("could not prepare the job: {e}"))),
            };
            match start(&mut shell, &stdin, &files, job.spec) {
                Ok(pid) => pid,
                Err(e) => return job.ended(Outcome::failed(start_error(SHELL, job.spec.opts.cwd.as_deref(), &e))),
            }
        }
    };
    // Close the parent's copies of the child's stdio now (we reap by pid).
    drop(cmd);
    drop(stdin);
    tracing::debug!(job = %job.id, attempt = job.attempt, pid, "job started");

    let group = Arc::new(Group::new(pid));
    // Kills the group if this future is dropped before the job is reaped.
    let guard = GroupGuard(Arc::clone(&group));
    let mut waiter = Group::waiter(&group);

    let stop = tokio::select! {
        biased;
        r = &mut waiter => Ok(r),
        () = cancel.cancelled() => Err(Stop::Cancelled),
        () = deadline(job.spec.timeout) => Err(Stop::TimedOut),
    };
    let (stop, waited) = match stop {
        Ok(r) => (None, r),
        Err(stop) => {
            tracing::debug!(job = %job.id, pid, "stopping the job: SIGTERM to its process group");
            group.signal(libc::SIGTERM);
            // A stopped process handles SIGTERM only once continued.
            group.signal(libc::SIGCONT);
            let r = match tokio::time::timeout(job.ctx.kill_grace, &mut waiter).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(job = %job.id, pid, "grace time over: SIGKILL to its process group");
                    group.signal(libc::SIGKILL);
                    waiter.await
                }
            };
            (Some(stop), r)
        }
    };
    drop(guard);
    let finished = Timestamp::now();
    let wall = job.clock.elapsed();

    // When the wait itself failed, the job's status is unknown: it failed,
    // unless it was being stopped anyway.
    let lost = |problem: String| {
        let mut o = stop.map_or_else(|| Outcome::new(Status::Failed, None), |s| s.outcome(job.spec));
        o.note(problem);
        o
    };
    let mut outcome = match waited {
        Ok(exit) => exit_outcome(stop, &exit, job.spec),
        Err(e) => lost(format!(
            "could not wait for the job's process {pid}: {e} (is something else in the agent reaping children?)"
        )),
    };
    tracing::debug!(job = %job.id, pid, status = %outcome.status, "job ended");

    outcome.stdout = collect(job, STDOUT_FILE, &files.stdout, &mut outcome).await;
    outcome.stderr = collect(job, STDERR_FILE, &files.stderr, &mut outcome).await;
    memory_verdict(job.spec, &mut outcome);
    job.ended_at(outcome, finished, wall)
}

/// Sets the job's stdio, environment, folder, process group and parent-death
/// signal on `cmd`.
fn configure(job: &Job<'_>, cmd: &mut std::process::Command, files: &CaptureFiles) -> io::Result<File> {
    cmd.stdout(files.stdout.try_clone()?);
    cmd.stderr(files.stderr.try_clone()?);
    let stdin = match &job.spec.opts.stdin {
        Some(data) => stdin_file(&job.ctx.scratch, data.as_bytes())?,
        None => File::open("/dev/null")?,
    };
    cmd.stdin(stdin.try_clone()?);

    // The whole environment, not changes to the agent's (see `job_env`).
    cmd.env_clear();
    cmd.envs(job_env(job.spec, job.id, job.attempt, job.seed, &job.ctx.worker, |name| std::env::var_os(name)));

    if let Some(cwd) = &job.spec.opts.cwd {
        cmd.current_dir(cwd);
    }
    cmd.process_group(0);
    Ok(stdin)
}

/// Starts the prepared command: on Linux through [`crate::spawn`] (a vfork
/// that also arms the leader's parent-death signal and sets the job's
/// rlimits), elsewhere through std, refusing a job with limits (which it
/// could not apply).
fn start(
    cmd: &mut std::process::Command,
    stdin: &File,
    files: &CaptureFiles,
    spec: &JobSpec,
) -> io::Result<libc::pid_t> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let limits =
            crate::spawn::Limits { cpu_seconds: spec.opts.cpu.map(cpu_limit_seconds), data_bytes: spec.opts.memory };
        crate::spawn::spawn(cmd, [stdin.as_raw_fd(), files.stdout.as_raw_fd(), files.stderr.as_raw_fd()], limits)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (stdin, files);
        if spec.cpu.is_some() || spec.memory.is_some() {
            return Err(io::Error::other("cpu and memory limits are applied on Linux workers only"));
        }
        let child = cmd.spawn()?;
        libc::pid_t::try_from(child.id()).map_err(|_| io::Error::other("the job's process id does not fit a pid_t"))
    }
}

/// Writes the job's stdin to a scratch file and opens it for the job: a file
/// rather than a pipe, so that no task has to feed it and a job that never
/// reads its stdin cannot block anything.
fn stdin_file(scratch: &Path, data: &[u8]) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(scratch.join(STDIN_FILE))?;
    // Positional write: the offset the job reads from stays at 0.
    file.write_all_at(data, 0)?;
    Ok(file)
}

/// The error of a job that could not be started, naming the working folder
/// when that is what is wrong.
fn start_error(program: &str, cwd: Option<&Path>, e: &io::Error) -> String {
    if let Some(cwd) = cwd {
        // Checked only after a failure, so that starting a job costs no
        // extra system call.
        if !cwd.is_dir() {
            return format!(
                "could not start {program:?}: the working folder {:?} does not exist or is not a folder ({e})",
                cwd.display().to_string()
            );
        }
    }
    format!("could not start {program:?}: {e}")
}

/// The two capture files, truncated, shared with the job.
struct CaptureFiles {
    stdout: File,
    stderr: File,
}

impl CaptureFiles {
    fn open(scratch: &Path) -> io::Result<Self> {
        let open =
            // Private: a job's output is nobody else's business.
            |name: &str| {
                OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(scratch.join(name))
            };
        Ok(Self { stdout: open(STDOUT_FILE)?, stderr: open(STDERR_FILE)? })
    }
}

/// Reads a capture file after the job: inline up to the cap, and the whole
/// file to the store when longer.
async fn collect(job: &Job<'_>, stream: &str, file: &File, outcome: &mut Outcome) -> Captured {
    let (text, bytes) = match read_head(file, job.ctx.inline_cap) {
        Ok(read) => read,
        Err(e) => {
            outcome.note(format!("could not read the job's {stream}: {e}"));
            return Captured::default();
        }
    };
    let mut captured = Captured::inline(text, bytes, bytes > job.ctx.inline_cap as u64);
    if captured.truncated {
        if let Some((store, key)) = job.spill_target(stream, outcome) {
            match store.put_file(&key, &job.ctx.scratch.join(stream)).await {
                Ok(_) => captured.key = Some(key.as_str().to_owned()),
                Err(e) => upload_failed(job, stream, &e, outcome),
            }
        }
    }
    captured
}

/// The first `cap` bytes of `file` as text, and its total size.
fn read_head(file: &File, cap: usize) -> io::Result<(String, u64)> {
    let len = file.metadata()?.len();
    if len == 0 || cap == 0 {
        return Ok((String::new(), len));
    }
    let want = usize::try_from(len).map_or(cap, |len| len.min(cap));
    let mut buf = vec![0; want];
    let mut filled = 0;
    while filled < want {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    if (filled as u64) < len {
        // Cut where the stream was cut, not inside a character.
        let keep = filled - incomplete_tail(&buf);
        buf.truncate(keep);
    }
    let text = match String::from_utf8(buf) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    Ok((text, len))
}

/// The length of a UTF-8 sequence begun but not finished at the end of `buf`
/// (0 when the end is complete, or not UTF-8 anyway).
fn incomplete_tail(buf: &[u8]) -> usize {
    for back in 1..=buf.len().min(3) {
        let b = buf[buf.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: keep looking for the start
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// The job's process group, and whether its leader has been reaped. Once it
/// has, the group id may be reused by the system and must not be signalled.
struct Group {
    pgid: libc::pid_t,
    reaped: Mutex<bool>,
}

/// How the main process ended, and what it used.
struct Exit {
    status: libc::c_int,
    usage: libc::rusage,
}

impl Group {
    fn new(pgid: libc::pid_t) -> Self {
        Self { pgid, reaped: Mutex::new(false) }
    }

    /// Sends `signal` to the whole group, unless it is already reaped.
    fn signal(&self, signal: libc::c_int) {
        let reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        if !*reaped {
            kill_group(self.pgid, signal);
        }
    }

    /// A future that resolves once the main process has exited, what is
    /// left of its group is killed, and the main process is reaped. On
    /// Linux it waits on a pidfd in the runtime (no thread, no hand-off);
    /// elsewhere, or when pidfds are unavailable, on a blocking thread.
    fn waiter(group: &Arc<Self>) -> Pin<Box<dyn Future<Output = io::Result<Exit>> + Send>> {
        let group = Arc::clone(group);
        #[cfg(target_os = "linux")]
        if let Some(fd) = pidfd_open(group.pgid) {
            // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it
            // (open, same description) until it is dropped.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            if let Ok(fd) = registered {
                return Box::pin(async move {
                    // Readable means the process has exited (it is a zombie
                    // until reaped below).
                    let ready = fd.readable().await.map(drop);
                    group.finish(ready.and_then(|()| group.reap()))
                });
            }
        }
        Box::pin(async move {
            tokio::task::spawn_blocking(move || group.wait_and_reap())
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        })
    }

    /// Blocks until the main process exits, kills what is left in its group,
    /// and reaps it. Runs on a blocking thread.
    fn wait_and_reap(&self) -> io::Result<Exit> {
        let result = self.wait_exited().and_then(|()| self.reap());
        self.finish(result)
    }

    /// After a failed wait, kills what may be left once and never signals
    /// the id again.
    fn finish(&self, result: io::Result<Exit>) -> io::Result<Exit> {
        if result.is_err() {
            // Something else reaped the leader (or waiting is impossible):
            // kill what may be left once, then never signal the id again,
            // since the system may reuse it.
            let mut reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
            if !*reaped {
                kill_group(self.pgid, libc::SIGKILL);
                *reaped = true;
            }
        }
        result
    }

    /// Blocks until the main process exits, without reaping it: the zombie
    /// leader keeps the group id reserved while the leftovers are killed.
    fn wait_exited(&self) -> io::Result<()> {
        loop {
            // SAFETY: siginfo_t is plain data, valid when zeroed.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes only to `info`, which lives across the call.
            let r =
                unsafe { libc::waitid(libc::P_PID, self.pgid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Kills what is left of the group of an exited main process, then
    /// reaps it with its resource usage.
    fn reap(&self) -> io::Result<Exit> {
        let mut reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        // Background children must not outlive the job.
        kill_group(self.pgid, libc::SIGKILL);
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain data, valid when zeroed.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4 writes only to `status` and `usage`, which live
            // across the call. The child is a zombie, so it returns at once.
            let r = unsafe { libc::wait4(self.pgid, &mut status, 0, &mut usage) };
            if r == self.pgid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        *reaped = true;
        Ok(Exit { status, usage })
    }
}

/// Kills the group if the job's future is dropped before its leader is
/// reaped; the blocking waiter then reaps it.
struct GroupGuard(Arc<Group>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.0.signal(libc::SIGKILL);
    }
}

/// A pidfd for `pid` (Linux 5.3+), or `None` where unavailable.
#[cfg(target_os = "linux")]
fn pidfd_open(pid: libc::pid_t) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = libc::c_int::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the fd was just returned by the kernel and is owned by no one
    // else.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `kill(-pgid, signal)`; a group already gone is not an error.
fn kill_group(pgid: libc::pid_t, signal: libc::c_int) {
    // pgid is always a spawned child's pid (> 1), so -pgid names exactly its
    // group, never "every process" (-1).
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill has no memory effects.
    let r = unsafe { libc::kill(-pgid, signal) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %e, "could not signal a job's process group");
        }
    }
}

/// Turns the main process's wait status into an outcome.
fn exit_outcome(stop: Option<Stop>, exit: &Exit, spec: &JobSpec) -> Outcome {
    let mut o = match stop {
        Some(stop) => stop.outcome(spec),
        None => Outcome::new(Status::Succeeded, None),
    };
    if libc::WIFEXITED(exit.status) {
        let code = libc::WEXITSTATUS(exit.status);
        o.exit_code = Some(code);
        if stop.is_none() && code != 0 {
            o.status = Status::Failed;
            o.error = Some(format!("exited with status {code}"));
        }
    } else if libc::WIFSIGNALED(exit.status) {
        let signal = libc::WTERMSIG(exit.status);
        o.signal = Some(signal);
        if stop.is_none() {
            o.status = Status::Failed;
            o.error = Some(match signal_name(signal) {
                Some(name) => format!("killed by signal {signal} ({name})"),
                None => format!("killed by signal {signal}"),
            });
        }
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    o.cpu_seconds = seconds(exit.usage.ru_utime) + seconds(exit.usage.ru_stime);
    if stop.is_none() && o.status == Status::Failed {
        if let Some(limit) = spec.opts.cpu.map(cpu_limit_seconds) {
            // The leader killed by the limit's signals, or a shell whose
            // child was (128 + signal); the CPU time of the leader and of
            // the children it waited for says the limit was reached.
            let by = |sig: libc::c_int| o.signal == Some(sig) || o.exit_code == Some(128 + sig);
            // SIGKILL comes at the hard limit, CPU_KILL_AFTER seconds past
            // the soft one: plenty of margin for sampled CPU times.
            let reached = o.cpu_seconds >= limit as f64;
            if by(libc::SIGXCPU) || (by(libc::SIGKILL) && reached) {
                o.status = Status::CpuLimit;
                o.error = Some(format!(
                    "CPU time limit of {} reached ({})",
                    format_secs(limit),
                    o.error.take().unwrap_or_default()
                ));
            }
        }
    }
    let maxrss = u64::try_from(exit.usage.ru_maxrss).unwrap_or(0);
    // Linux reports KiB; macOS and the BSDs differ (bytes on macOS).
    o.peak_rss_bytes = if cfg!(target_os = "macos") { maxrss } else { maxrss.saturating_mul(1024) };
    o
}

fn format_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// A size as users write it: `64MiB`, `2GiB`, or bytes when not a whole
/// number of KiB.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// What programs write to stderr when an allocation failed (Python, GNU
/// tools, C and C++ runtimes, R, Java), looked for in the first 64 KiB of
/// a failed job's stderr when it had a memory limit: with an rlimit, a
/// failed allocation is the only trace of the limit.
const ALLOCATION_FAILED: &[&str] = &[
    "MemoryError",
    "memory exhausted",
    "Cannot allocate memory",
    "cannot allocate memory",
    "out of memory",
    "Out of memory",
    "std::bad_alloc",
    "cannot allocate vector",
    "OutOfMemoryError",
];

/// With a memory limit, a failed job whose stderr says an allocation failed
/// ends `memory_limit`; any other failed job names the limit in its error.
fn memory_verdict(spec: &JobSpec, outcome: &mut Outcome) {
    let Some(limit) = spec.opts.memory else { return };
    if outcome.status != Status::Failed {
        return;
    }
    let said = ALLOCATION_FAILED.iter().find(|needle| outcome.stderr.text.contains(*needle));
    match said {
        Some(needle) => {
            let why = outcome.error.take().unwrap_or_default();
            outcome.status = Status::MemoryLimit;
            outcome.error = Some(format!(
                "memory limit of {} reached: an allocation failed (stderr says {needle:?}; {why})",
                format_size(limit)
            ));
        }
        None => outcome.note(format!(
            "the job had a memory limit of {} per process; if it ran out, raise `memory`",
            format_size(limit)
        )),
    }
}

/// The name of a signal, for error messages.
fn signal_name(signal: libc::c_int) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (a workspace clippy.toml could say `allow-unwrap-in-tests`)
mod tests {
    use super::*;
    use crate::builtins::BuiltinOutput;
    use async_trait::async_trait;
    use crew_core::store::{ByteStream, ObjectMeta, StoreError};
    use serde_json::json;

    fn context() -> (tempfile::TempDir, ExecContext) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ExecContext::new("local-1", dir.path());
        (dir, ctx)
    }

    async fn run(ctx: &ExecContext, spec: &JobSpec) -> JobResult {
        run_job(ctx, JobId(17), 1, 42, spec, CancellationToken::new()).await
    }

    fn argv(args: &[&str]) -> JobSpec {
        JobSpec::new(Command::Argv(args.iter().map(|s| (*s).to_owned()).collect()))
    }

    /// Processes of group `pgid` that are not zombies (the init of some
    /// containers never reaps orphans, so zombies may linger).
    fn live_members(pgid: i32) -> Vec<i32> {
        let mut live = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which may contain spaces).
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let fields: Vec<&str> = rest.split(' ').collect();
            // state, ppid, pgrp
            if fields[2].parse::<i32>() == Ok(pgid) && fields[0] != "Z" {
                live.push(pid);
            }
        }
        live
    }

    /// Waits (generously) for the group to be empty of live processes.
    async fn assert_group_gone(pgid: i32) {
        let t = Instant::now();
        while !live_members(pgid).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10), "group {pgid} still has {:?}", live_members(pgid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn first_line_pid(r: &JobResult) -> i32 {
        r.stdout.text.lines().next().unwrap().trim().parse().unwrap()
    }

    #[test]
    fn simple_lines_skip_the_shell() {
        assert_eq!(simple_command("sleep 0.05"), Some(vec!["sleep", "0.05"]));
        assert_eq!(simple_command("  true "), Some(vec!["true"]));
        assert_eq!(
            simple_command("python3 fit.py --alpha=0.5 data/x.csv"),
            Some(vec!["python3", "fit.py", "--alpha=0.5", "data/x.csv"])
        );
        for needs_shell in [
            "echo $HOME",
            "a | b",
            "a; b",
            "a && b",
            "echo 'x y'",
            "echo \"x\"",
            "ls *.txt",
            "X=1 env",
            "cd /tmp",
            "exit 3",
            "echo ~",
            "a > f",
            "a\nb",
            "echo x # c",
            "",
        ] {
            assert_eq!(simple_command(needs_shell), None, "{needs_shell:?}");
        }
    }

    #[tokio::test]
    async fn a_simple_line_behaves_as_under_the_shell() {
        let (_d, ctx) = context();
        let r = run(&ctx, &JobSpec::shell("printf %s:%s a b")).await;
        assert_eq!((r.status, r.stdout.text.as_str()), (Status::Succeeded, "a:b"));
        // A missing program: the shell's answer, not a start error.
        let r = run(&ctx, &JobSpec::shell("crew-no-such-program-xyz arg")).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.exit_code, Some(127));
        assert!(r.stderr.text.contains("not found"), "{:?}", r.stderr.text);
    }

    #[tokio::test]
    async fn exit_codes() {
        let (_d, ctx) = context();
        let r = run(&ctx, &JobSpec::shell("exit 0")).await;
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!((r.exit_code, r.signal, r.error), (Some(0), None, None));

        let r = run(&ctx, &JobSpec::shell("exit 3")).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.error.as_deref(), Some("exited with status 3"));
        assert!(r.wall_seconds >= 0.0 && r.finished >= r.started);

        let r = run(&ctx, &argv(&["false"])).await;
        assert_eq!((r.status, r.exit_code), (Status::Failed, Some(1)));
    }

    #[tokio::test]
    async fn killed_by_a_signal() {
        let (_d, ctx) = context();
        let r = run(&ctx, &JobSpec::shell("kill -9 $$")).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!((r.exit_code, r.signal), (None, Some(9)));
        assert_eq!(r.error.as_deref(), Some("killed by signal 9 (SIGKILL)"));
        let r = run(&ctx, &JobSpec::shell("kill -USR1 $$")).await;
        assert_eq!(r.signal, Some(libc::SIGUSR1));
        assert!(r.error.unwrap().contains("(SIGUSR1)"));
    }

    #[tokio::test]
    async fn argv_runs_without_a_shell() {
        let (_d, ctx) = context();
        let r = run(&ctx, &argv(&["printf", "%s|%s", "a b", "$HOME"])).await;
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.stdout.text, "a b|$HOME");
        assert_eq!(r.stdout.bytes, 9);
    }

    #[tokio::test]
    async fn environment() {
        let (_d, ctx) = context();
        let mut spec = JobSpec::shell(
            "echo \"$CREW_JOB_ID|$CREW_JOB_NAME|$CREW_SEED|$CREW_WORKER|$CREW_ATTEMPT|$FOO|${PATH:+path}\"",
        )
        .with_name("nm");
        spec.env.insert("FOO".into(), "bar baz".into());
        let r = run_job(&ctx, JobId(17), 2, 42, &spec, CancellationToken::new()).await;
        assert_eq!(r.stdout.text, "17|nm|42|local-1|2|bar baz|path\n");

        let r = run(&ctx, &JobSpec::shell("echo \"[${CREW_JOB_NAME-unset}]\"")).await;
        assert_eq!(r.stdout.text, "[]\n");
    }

    /// Runs `token_child` in a fresh copy of this test binary whose own
    /// environment has the agent's secrets: the test process's environment
    /// cannot be changed safely while other tests run.
    #[test]
    fn agent_secrets_do_not_reach_jobs() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["tests::token_child", "--exact", "--ignored", "--test-threads=1"])
            .env("CREW_EXEC_TEST_CHILD", "1")
            .env("CREW_TOKEN", "s3cret")
            .env("CREW_LAUNCH", "l")
            .env("CREW_CONNECT", "127.0.0.1:1")
            .env("CREW_INDEX", "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "{stdout}");
    }

    #[tokio::test]
    #[ignore = "run by agent_secrets_do_not_reach_jobs in a child process"]
    async fn token_child() {
        if std::env::var_os("CREW_EXEC_TEST_CHILD").is_none() {
            return;
        }
        assert_eq!(std::env::var("CREW_TOKEN").unwrap(), "s3cret");
        let (_d, ctx) = context();
        let line = "echo \"${CREW_TOKEN-none}|${CREW_LAUNCH-none}|${CREW_CONNECT-none}|${CREW_INDEX-none}|$CREW_EXEC_TEST_CHILD\"";
        // Named in env_inherit (which validation refuses), the agent's own
        // variables are still skipped; the other name is inherited.
        let mut spec = JobSpec::shell(line);
        spec.opts.env_inherit = ["CREW_EXEC_TEST_CHILD", "CREW_TOKEN", "CREW_LAUNCH", "CREW_CONNECT", "CREW_INDEX"]
            .map(str::to_owned)
            .to_vec();
        let r = run(&ctx, &spec).await;
        assert_eq!(r.stdout.text, "none|none|none|none|1\n");
    }

    #[tokio::test]
    async fn working_folder() {
        let (_d, ctx) = context();
        let dir = tempfile::tempdir().unwrap();
        let mut spec = argv(&["pwd", "-P"]);
        spec.opts.cwd = Some(dir.path().to_owned());
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.stdout.text.trim_end(), dir.path().canonicalize().unwrap().to_str().unwrap());

        let missing = dir.path().join("missing");
        spec.opts.cwd = Some(missing.clone());
        let r = run(&ctx, &spec).await;
        assert_eq!((r.status, r.exit_code, r.signal), (Status::Failed, None, None));
        let error = r.error.unwrap();
        assert!(error.starts_with("could not start \"pwd\": "), "{error}");
        assert!(error.contains(missing.to_str().unwrap()), "{error}");
    }

    #[tokio::test]
    async fn program_that_cannot_start() {
        let (_d, ctx) = context();
        let r = run(&ctx, &argv(&["crew-no-such-program-xyz", "a"])).await;
        assert_eq!((r.status, r.exit_code, r.signal), (Status::Failed, None, None));
        let error = r.error.unwrap();
        assert!(error.starts_with("could not start \"crew-no-such-program-xyz\": "), "{error}");
        assert!(error.contains("No such file"), "{error}");

        // Not executable.
        let r = run(&ctx, &argv(&["/etc/passwd"])).await;
        assert_eq!((r.status, r.exit_code), (Status::Failed, None));
        assert!(r.error.unwrap().starts_with("could not start \"/etc/passwd\": "));

        let r = run(&ctx, &JobSpec::new(Command::Argv(vec![]))).await;
        assert_eq!(r.status, Status::Failed);
    }

    #[tokio::test]
    async fn stdin_bytes_or_dev_null() {
        let (_d, ctx) = context();
        let mut spec = argv(&["cat"]).with_timeout(Duration::from_secs(20));
        spec.opts.stdin = Some("hello\nworld\n".into());
        let r = run(&ctx, &spec).await;
        assert_eq!(r.stdout.text, "hello\nworld\n");
        spec.opts.stdin = Some("x".into());
        assert_eq!(run(&ctx, &spec).await.stdout.text, "x");
        spec.opts.stdin = None;
        let r = run(&ctx, &spec).await;
        assert_eq!((r.status, r.stdout.text.as_str()), (Status::Succeeded, ""));
    }

    #[tokio::test]
    async fn capture_and_truncation() {
        let (_d, ctx) = context();
        let ctx = ctx.with_inline_cap(10);
        let r = run(&ctx, &JobSpec::shell("printf 0123456789abcdef; printf err >&2")).await;
        assert_eq!(r.stdout.text, "0123456789");
        assert_eq!((r.stdout.bytes, r.stdout.truncated, r.stdout.key.as_deref()), (16, true, None));
        assert_eq!(r.stderr.text, "err");
        assert_eq!((r.stderr.bytes, r.stderr.truncated), (3, false));
        assert_eq!(r.status, Status::Succeeded);

        // The files are reused: nothing of the previous job shows.
        let r = run(&ctx, &JobSpec::shell("printf ab")).await;
        assert_eq!((r.stdout.text.as_str(), r.stdout.bytes, r.stdout.truncated), ("ab", 2, false));
        assert_eq!((r.stderr.text.as_str(), r.stderr.bytes), ("", 0));

        // A cut never splits a character: "é" is two bytes.
        let r = run(&ctx, &JobSpec::shell("printf 012345678é")).await;
        assert_eq!((r.stdout.text.as_str(), r.stdout.bytes), ("012345678", 11));
        // Invalid UTF-8 is replaced.
        let r = run(&ctx, &JobSpec::shell("printf 'a\\377b'")).await;
        assert_eq!(r.stdout.text, "a\u{fffd}b");

        let (_d, ctx) = context();
        let r = run(&ctx, &JobSpec::shell("head -c 1000000 /dev/zero")).await;
        assert_eq!((r.stdout.bytes, r.stdout.truncated, r.stdout.text.len()), (1_000_000, true, INLINE_CAP));
    }

    #[test]
    fn incomplete_tails() {
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("aé".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"aé".as_bytes()[..2]), 1);
        assert_eq!(incomplete_tail(&"a€".as_bytes()[..3]), 2);
        assert_eq!(incomplete_tail(&"a😀".as_bytes()[..4]), 3);
        assert_eq!(incomplete_tail("a😀".as_bytes()), 0);
        assert_eq!(incomplete_tail(b"a\xff"), 0);
    }

    /// Fault injection: a store whose every operation fails, as a full disk
    /// or a revoked credential would.
    #[derive(Debug, Default)]
    struct FailingStore;

    fn disk_on_fire() -> StoreError {
        StoreError::Backend { backend: "failing", message: "disk on fire".into(), retryable: false }
    }

    #[async_trait]
    impl Store for FailingStore {
        fn url(&self) -> String {
            "failing://".into()
        }
        async fn put_file(&self, _key: &StoreKey, _path: &Path) -> Result<ObjectMeta, StoreError> {
            Err(disk_on_fire())
        }
        async fn put_stream(&self, _key: &StoreKey, _data: ByteStream) -> Result<ObjectMeta, StoreError> {
            Err(disk_on_fire())
        }
        async fn put_bytes(&self, _key: &StoreKey, _data: Bytes) -> Result<ObjectMeta, StoreError> {
            Err(disk_on_fire())
        }
        async fn get(&self, _key: &StoreKey) -> Result<ByteStream, StoreError> {
            Err(disk_on_fire())
        }
        async fn get_file(&self, _key: &StoreKey, _path: &Path) -> Result<ObjectMeta, StoreError> {
            Err(disk_on_fire())
        }
        async fn head(&self, _key: &StoreKey) -> Result<ObjectMeta, StoreError> {
            Err(disk_on_fire())
        }
        async fn list(&self, _prefix: &StoreKey) -> Result<Vec<ObjectMeta>, StoreError> {
            Err(disk_on_fire())
        }
        async fn delete(&self, _key: &StoreKey) -> Result<(), StoreError> {
            Err(disk_on_fire())
        }
    }

    /// A context with a local store, and that store.
    fn data_context() -> (tempfile::TempDir, ExecContext, Arc<crew_core::store::LocalStore>) {
        let (dir, ctx) = context();
        let store = Arc::new(crew_core::store::LocalStore::new(dir.path().join("store")).unwrap());
        let ctx = ctx.with_store(store.clone());
        (dir, ctx, store)
    }

    /// A job reading `data` as `in/data.bin`, staged.
    async fn staged(dir: &Path, store: &Arc<crew_core::store::LocalStore>, line: &str, outputs: &[&str]) -> JobSpec {
        let data = dir.join("data.bin");
        std::fs::write(&data, b"twelve bytes").unwrap();
        let mut spec = JobSpec::shell(line);
        spec.opts.inputs.push(crew_core::job::Input::path("in/data.bin", &data));
        spec.opts.outputs = outputs.iter().map(|s| (*s).to_owned()).collect();
        let stager = staging::Stager::new(store.clone());
        stager.stage(std::slice::from_mut(&mut spec)).await.unwrap();
        spec
    }

    #[tokio::test]
    async fn inputs_in_outputs_out() {
        let (d, ctx, store) = data_context();
        let spec = staged(
            d.path(),
            &store,
            "mkdir -p out && wc -c < in/data.bin > count.txt && cp in/data.bin out/copy.bin && pwd",
            &["count.txt", "out/*"],
        )
        .await;
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        let names: Vec<&str> = r.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["count.txt", "out/copy.bin"]);
        let copy = &r.objects[1];
        assert_eq!(copy.key, "jobs/17/1/outputs/out/copy.bin");
        assert_eq!(copy.size, 12);
        assert_eq!(std::fs::read(store.root().join(&copy.key)).unwrap(), b"twelve bytes");
        let manifest: staging::Manifest =
            serde_json::from_slice(&std::fs::read(store.root().join("jobs/17/1/manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest.objects, r.objects);
        assert_eq!(manifest.status, Status::Succeeded);
        // It ran in a folder of its own, removed after.
        let workdir = PathBuf::from(r.stdout.text.trim());
        assert!(workdir.starts_with(&ctx.scratch), "{workdir:?}");
        // Removed off the agent's loop, so a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while workdir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!workdir.exists());
    }

    #[tokio::test]
    async fn a_missing_literal_output_fails_a_job_and_failed_jobs_still_upload() {
        let (d, ctx, store) = data_context();
        let spec = staged(d.path(), &store, "echo partial > log.txt", &["log.txt", "result.rds", "fit/*"]).await;
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.error.as_deref(), Some("declared output result.rds was not produced"));
        assert_eq!(r.objects.len(), 1);
        let spec = staged(d.path(), &store, "echo partial > log.txt; exit 3", &["log.txt", "result.rds"]).await;
        let r = run_job(&ctx, JobId(18), 1, 0, &spec, CancellationToken::new()).await;
        assert_eq!((r.status, r.exit_code), (Status::Failed, Some(3)));
        assert_eq!(r.error.as_deref(), Some("exited with status 3"));
        assert_eq!(std::fs::read(store.root().join("jobs/18/1/outputs/log.txt")).unwrap(), b"partial\n");
    }

    #[tokio::test]
    async fn a_corrupt_input_fails_the_attempt_before_the_job_runs() {
        let (d, ctx, store) = data_context();
        let spec = staged(d.path(), &store, "touch ran", &[]).await;
        let crew_core::job::InputSource::Object { key, .. } = &spec.opts.inputs[0].source else { panic!() };
        std::fs::write(store.root().join(key), b"twelve bytez").unwrap();
        let mut spec = spec;
        spec.opts.cwd = Some(d.path().join("cwd"));
        std::fs::create_dir(d.path().join("cwd")).unwrap();
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        let error = r.error.unwrap();
        assert!(error.starts_with("could not fetch input \"in/data.bin\": checksum mismatch"), "{error}");
        assert!(!d.path().join("cwd/ran").exists());
        assert!(!d.path().join("cwd/in/data.bin").exists());
    }

    #[tokio::test]
    async fn outputs_never_leave_the_working_folder() {
        let (d, ctx, store) = data_context();
        std::fs::write(d.path().join("secret"), b"secret").unwrap();
        let line = format!("ln -s {} leak.txt && ln -s {} up", d.path().join("secret").display(), d.path().display());
        let spec = staged(d.path(), &store, &line, &["*.txt", "up/*", "**"]).await;
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        let names: Vec<&str> = r.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["in/data.bin"]);
        // An unsafe pattern that got past validation is refused here too.
        let mut spec = staged(d.path(), &store, "true", &[]).await;
        spec.opts.outputs.push("../../etc/passwd".into());
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        assert!(r.error.unwrap().contains(".. segment"));
        assert!(r.objects.is_empty());
    }

    #[tokio::test]
    async fn an_output_upload_failure_fails_the_job_with_the_reason() {
        let (_d, ctx) = context();
        let ctx = ctx.with_store(Arc::new(FailingStore));
        let mut spec = JobSpec::shell("echo x > a.txt");
        spec.opts.outputs.push("a.txt".into());
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        let error = r.error.unwrap();
        assert!(error.starts_with("could not upload output a.txt: "), "{error}");
        assert!(error.contains("disk on fire"), "{error}");
        assert!(r.objects.is_empty());
    }

    #[tokio::test]
    async fn data_jobs_need_a_store() {
        let (_d, ctx) = context();
        let mut spec = JobSpec::shell("true");
        spec.opts.outputs.push("x".into());
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        assert!(r.error.unwrap().contains("no store"));
        // A worker that could not open the controller's store says why.
        let (_d, mut ctx) = context();
        ctx.store_problem = Some("could not open the store nosuch://x: unsupported".into());
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        let error = r.error.unwrap_or_default();
        assert!(error.contains("no store: could not open the store nosuch://x"), "{error}");
        let long = JobSpec::shell(format!("head -c {} /dev/zero", INLINE_CAP + 10));
        let r = run(&ctx, &long).await;
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert!(r.stdout.truncated);
        assert!(r.error.unwrap_or_default().contains("stdout was truncated, not stored: could not open"));
    }

    #[tokio::test]
    async fn long_streams_go_to_the_store() {
        let (_d, ctx) = context();
        let root = tempfile::tempdir().unwrap();
        let store = Arc::new(crew_core::store::LocalStore::new(root.path()).unwrap());
        let object = |key: &str| std::fs::read(store.root().join(key)).ok();
        let ctx = ctx.with_inline_cap(4).with_store(store.clone());
        let r =
            run_job(&ctx, JobId(9), 3, 1, &JobSpec::shell("printf 0123456789; printf e >&2"), CancellationToken::new())
                .await;
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.error, None);
        assert_eq!(r.stdout.text, "0123");
        assert_eq!(r.stdout.key.as_deref(), Some("jobs/9/3/stdout"));
        assert_eq!(object("jobs/9/3/stdout").unwrap(), b"0123456789");
        assert_eq!((r.stderr.key, object("jobs/9/3/stderr")), (None, None));

        // Builtin output is capped and uploaded the same way.
        let r = run_job(&ctx, JobId(10), 1, 1, &JobSpec::builtin("echo", json!("abcdefgh")), CancellationToken::new())
            .await;
        assert_eq!((r.stdout.text.as_str(), r.stdout.bytes, r.stdout.truncated), ("abcd", 9, true));
        assert_eq!(object("jobs/10/1/stdout").unwrap(), b"abcdefgh\n");

        // A failed upload is noted; the status stays what the job said.
        let (_d, ctx) = context();
        let ctx = ctx.with_inline_cap(4).with_store(Arc::new(FailingStore));
        let r = run(&ctx, &JobSpec::shell("printf 0123456789; exit 2")).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.stdout.key, None);
        assert!(r.stdout.truncated);
        let error = r.error.unwrap();
        assert!(error.starts_with("exited with status 2; could not upload stdout"), "{error}");
        assert!(error.contains("disk on fire"), "{error}");
        let r = run(&ctx, &JobSpec::shell("printf 0123456789")).await;
        assert_eq!(r.status, Status::Succeeded);
        assert!(r.error.unwrap().starts_with("could not upload stdout"));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let (_d, ctx) = context();
        let spec = JobSpec::shell("echo $$; sleep 30 & sleep 30").with_timeout(Duration::from_secs(1));
        let t = Instant::now();
        let r = run(&ctx, &spec).await;
        let elapsed = t.elapsed();
        assert_eq!(r.status, Status::TimedOut);
        assert_eq!(r.error.as_deref(), Some("timed out after 1s"));
        assert_eq!(r.signal, Some(libc::SIGTERM));
        assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(1) + DEFAULT_KILL_GRACE + Duration::from_secs(5), "{elapsed:?}");
        assert_group_gone(first_line_pid(&r)).await;
    }

    #[tokio::test]
    async fn sigterm_ignored_means_sigkill_after_the_grace() {
        let (_d, ctx) = context();
        let ctx = ctx.with_kill_grace(Duration::from_millis(300));
        let spec =
            JobSpec::shell("trap '' TERM; echo $$; sleep 30 & sleep 30").with_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::TimedOut);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert_eq!(r.error.as_deref(), Some("timed out after 300ms"));
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        assert_group_gone(first_line_pid(&r)).await;
    }

    #[tokio::test]
    async fn a_stopped_job_still_stops_on_sigterm() {
        let (_d, ctx) = context();
        let ctx = ctx.with_kill_grace(Duration::from_secs(20));
        let spec = JobSpec::shell("echo $$; kill -STOP $$").with_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let r = run(&ctx, &spec).await;
        assert_eq!((r.status, r.signal), (Status::TimedOut, Some(libc::SIGTERM)));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_group_gone(first_line_pid(&r)).await;
    }

    #[tokio::test]
    #[ignore = "a rough throughput check, run by hand"]
    async fn throughput() {
        let (_d, ctx) = context();
        let spec = JobSpec::shell("true");
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(run(&ctx, &spec).await.status, Status::Succeeded);
        }
        println!("sh -c true: {:?} per job", t.elapsed() / 1000);
        let spec = JobSpec::builtin("noop", serde_json::Value::Null);
        let t = Instant::now();
        for _ in 0..100_000 {
            assert_eq!(run(&ctx, &spec).await.status, Status::Succeeded);
        }
        println!("noop: {:?} per job", t.elapsed() / 100_000);
    }

    #[tokio::test]
    async fn leftover_background_processes_are_killed() {
        let (_d, ctx) = context();
        let t = Instant::now();
        let r = run(&ctx, &JobSpec::shell("echo $$; sleep 30 & exit 0")).await;
        assert_eq!(r.status, Status::Succeeded);
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_group_gone(first_line_pid(&r)).await;
    }

    #[tokio::test]
    async fn cancellation() {
        let (_d, ctx) = context();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.cancel();
        });
        let t = Instant::now();
        let r = run_job(&ctx, JobId(1), 1, 1, &JobSpec::shell("echo $$; sleep 30 & sleep 30"), cancel.clone()).await;
        assert_eq!(r.status, Status::Cancelled);
        assert_eq!(r.error.as_deref(), Some("cancelled"));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_group_gone(first_line_pid(&r)).await;

        // Already cancelled: nothing starts.
        let r = run_job(&ctx, JobId(2), 1, 1, &JobSpec::shell("exit 0"), cancel).await;
        assert_eq!(r.status, Status::Cancelled);
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_group() {
        let (_d, ctx) = context();
        let spec = JobSpec::shell("echo $$; sleep 30 & sleep 30");
        let fut = run(&ctx, &spec);
        // Long enough for the job to start and print its pid.
        let _ = tokio::time::timeout(Duration::from_millis(500), fut).await;
        let text = std::fs::read_to_string(ctx.scratch.join(STDOUT_FILE)).unwrap();
        let pgid: i32 = text.trim().parse().unwrap();
        assert_group_gone(pgid).await;
    }

    #[tokio::test]
    async fn cpu_time_and_memory() {
        let (_d, ctx) = context();
        let r = run(&ctx, &JobSpec::shell("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")).await;
        assert_eq!(r.status, Status::Succeeded);
        assert!(r.cpu_seconds > 0.0, "{}", r.cpu_seconds);
        assert!(r.peak_rss_bytes > 100 * 1024, "{}", r.peak_rss_bytes);
        assert!(r.wall_seconds > 0.0);
    }

    #[tokio::test]
    async fn builtins_as_jobs() {
        let (_d, ctx) = context();
        let r = run(&ctx, &JobSpec::builtin("noop", serde_json::Value::Null)).await;
        assert_eq!((r.status, r.error, r.exit_code), (Status::Succeeded, None, None));

        let r = run(&ctx, &JobSpec::builtin("echo", json!({"a": 1}))).await;
        assert_eq!((r.status, r.stdout.text.as_str(), r.stdout.bytes), (Status::Succeeded, "{\"a\":1}\n", 8));

        let r = run(&ctx, &JobSpec::builtin("sleep", json!(0.05))).await;
        assert_eq!(r.status, Status::Succeeded);
        assert!(r.wall_seconds >= 0.05);

        let r = run(&ctx, &JobSpec::builtin("sleep", json!("x"))).await;
        assert_eq!(r.status, Status::Failed);
        assert!(r.error.unwrap().starts_with("sleep takes"));

        let t = Instant::now();
        let r = run(&ctx, &JobSpec::builtin("sleep", json!(60)).with_timeout(Duration::from_millis(200))).await;
        assert_eq!((r.status, r.error.as_deref()), (Status::TimedOut, Some("timed out after 200ms")));
        assert!(t.elapsed() < Duration::from_secs(10));

        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.cancel();
        });
        let r = run_job(&ctx, JobId(1), 1, 1, &JobSpec::builtin("sleep", json!({"seconds": 60})), cancel.clone()).await;
        assert_eq!(r.status, Status::Cancelled);
        let r = run_job(&ctx, JobId(1), 1, 1, &JobSpec::builtin("noop", serde_json::Value::Null), cancel).await;
        assert_eq!(r.status, Status::Cancelled);

        let r = run(&ctx, &JobSpec::builtin("nope", serde_json::Value::Null)).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.error.as_deref(), Some("unknown builtin \"nope\"; this agent knows: echo, noop, sleep"));
    }

    #[tokio::test]
    async fn custom_builtins() {
        let (_d, ctx) = context();
        let seen = Arc::new(Mutex::new(None::<bool>));
        let seen2 = seen.clone();
        let builtins = Builtins::standard()
            .with("ctx", |args, ctx| async move {
                Ok(BuiltinOutput::stdout(format!(
                    "{args} {} {} {} {:?}",
                    ctx.id,
                    ctx.attempt,
                    ctx.seed,
                    ctx.env.get("K")
                ))
                .with_stderr("warn"))
            })
            .with("fail", |_args, _ctx| async move { Err("no luck".into()) })
            .with("boom", |_args, _ctx| async move {
                if true {
                    panic!("kaboom");
                }
                Ok(BuiltinOutput::empty())
            })
            .with("watch", move |_args, ctx| {
                let seen = seen2.clone();
                async move {
                    // Hands the token to a task that outlives the future.
                    tokio::spawn(async move {
                        ctx.cancel.cancelled().await;
                        *seen.lock().unwrap() = Some(true);
                    });
                    std::future::pending::<()>().await;
                    Ok(BuiltinOutput::empty())
                }
            });
        let ctx = ctx.with_builtins(builtins);
        let mut spec = JobSpec::builtin("ctx", json!([1]));
        spec.env.insert("K".into(), "V".into());
        let r = run_job(&ctx, JobId(3), 2, 7, &spec, CancellationToken::new()).await;
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.stdout.text, "[1] 3 2 7 Some(\"V\")");
        assert_eq!(r.stderr.text, "warn");

        let r = run(&ctx, &JobSpec::builtin("fail", json!(null))).await;
        assert_eq!((r.status, r.error.as_deref()), (Status::Failed, Some("no luck")));

        let r = run(&ctx, &JobSpec::builtin("boom", json!(null))).await;
        assert_eq!((r.status, r.error.as_deref()), (Status::Failed, Some("the builtin panicked: kaboom")));

        let r = run(&ctx, &JobSpec::builtin("watch", json!(null)).with_timeout(Duration::from_millis(100))).await;
        assert_eq!(r.status, Status::TimedOut);
        let t = Instant::now();
        while seen.lock().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "the builtin's token was not cancelled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn job_environment_is_the_base_the_inherited_names_the_job_env_and_crew_variables() {
        let agent = |name: &str| -> Option<OsString> {
            match name {
                "PATH" => Some("/bin".into()),
                "HOME" => Some("/home/w".into()),
                "FOO" => Some("from-worker".into()),
                "SECRET" => Some("not for jobs".into()),
                "CREW_TOKEN" => Some("0".repeat(64).into()),
                "CREW_JOB_ID" => Some("999".into()),
                "K" => Some("worker's".into()),
                _ => None,
            }
        };
        let mut spec = JobSpec::shell("env");
        spec.name = Some("n".into());
        spec.opts.env_inherit = vec!["FOO".into(), "MISSING".into(), "CREW_TOKEN".into(), "K".into()];
        spec.env.insert("K".into(), "job's".into());
        spec.env.insert("CREW_SEED".into(), "the job cannot set this".into());
        let env = job_env(&spec, JobId(5), 2, 77, "local-3", agent);
        let env: Vec<(String, String)> =
            env.into_iter().map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap())).collect();
        let want: Vec<(String, String)> = [
            ("CREW_ATTEMPT", "2"),
            ("CREW_JOB_ID", "5"),
            ("CREW_JOB_NAME", "n"),
            ("CREW_SEED", "77"),
            ("CREW_WORKER", "local-3"),
            ("FOO", "from-worker"),
            ("HOME", "/home/w"),
            ("K", "job's"),
            ("PATH", "/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, want);
        // Nothing at all from an empty agent environment but the job's own.
        let env = job_env(&JobSpec::shell("env"), JobId(1), 1, 1, "w", |_| None);
        assert_eq!(env.len(), 5, "{env:?}");
    }

    #[tokio::test]
    async fn a_process_job_sees_only_its_environment() {
        let (_d, ctx) = context();
        // Cargo sets this in the environment of every test process.
        let ambient = "CARGO_MANIFEST_DIR";
        assert!(std::env::var_os(ambient).is_some(), "run under cargo");
        let r = run(&ctx, &argv(&["/usr/bin/env"])).await;
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        let names: Vec<&str> = r.stdout.text.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
        assert!(!names.contains(&ambient), "{names:?}");
        assert!(names.contains(&"PATH") && names.contains(&"CREW_JOB_ID"), "{names:?}");
        assert!(names.iter().all(|n| BASE_ENV.contains(n) || n.starts_with("CREW_")), "{names:?}");
        let mut spec = argv(&["/usr/bin/env"]);
        spec.opts.env_inherit.push(ambient.to_owned());
        let r = run(&ctx, &spec).await;
        let want = format!("{ambient}={}", std::env::var(ambient).unwrap());
        assert!(r.stdout.text.lines().any(|l| l == want), "{}", r.stdout.text);
    }

    #[tokio::test]
    async fn a_process_past_its_cpu_limit_ends_cpu_limit() {
        let (_d, ctx) = context();
        // The job's leader spins: killed by SIGXCPU after 1 s of CPU.
        let mut spin = JobSpec::shell("while :; do :; done");
        spin.opts.cpu = Some(Duration::from_millis(500));
        let t = Instant::now();
        let r = run(&ctx, &spin).await;
        assert_eq!((r.status, r.signal), (Status::CpuLimit, Some(libc::SIGXCPU)), "{r:?}");
        let error = r.error.unwrap_or_default();
        assert!(error.starts_with("CPU time limit of 1s reached (killed by signal"), "{error}");
        assert!(r.cpu_seconds > 0.5, "{}", r.cpu_seconds);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        // A child of the leader spins; the shell reports 128 + SIGXCPU.
        let mut child = JobSpec::shell("sh -c 'while :; do :; done'; exit $?");
        child.opts.cpu = Some(Duration::from_secs(1));
        let r = run(&ctx, &child).await;
        assert_eq!((r.status, r.exit_code), (Status::CpuLimit, Some(128 + libc::SIGXCPU)), "{r:?}");
        // SIGXCPU ignored: SIGKILL at the hard limit, 2 s of CPU later.
        let mut deaf = JobSpec::shell("trap '' XCPU; while :; do :; done");
        deaf.opts.cpu = Some(Duration::from_secs(1));
        let r = run(&ctx, &deaf).await;
        assert_eq!((r.status, r.signal), (Status::CpuLimit, Some(libc::SIGKILL)), "{r:?}");
        // An rlimit is per process: a shell that goes on after its child
        // was killed decides the job's status itself.
        let mut goes_on = JobSpec::shell("sh -c 'while :; do :; done'; echo after");
        goes_on.opts.cpu = Some(Duration::from_secs(1));
        let r = run(&ctx, &goes_on).await;
        assert_eq!((r.status, r.stdout.text.as_str()), (Status::Succeeded, "after\n"), "{r:?}");
    }

    #[tokio::test]
    async fn an_allocation_past_the_memory_limit_ends_memory_limit() {
        let (_d, ctx) = context();
        for line in ["python3 -c 'bytearray(512 * 1024 * 1024)'", "head -c 500M /dev/zero | tail"] {
            let mut spec = JobSpec::shell(line);
            spec.opts.memory = Some(64 << 20);
            let r = run(&ctx, &spec).await;
            assert_eq!(r.status, Status::MemoryLimit, "{line}: {r:?}");
            let error = r.error.unwrap_or_default();
            assert!(error.starts_with("memory limit of 64MiB reached: an allocation failed"), "{line}: {error}");
            assert!(r.peak_rss_bytes < 128 << 20, "{line}: {}", r.peak_rss_bytes);
        }
        // Another failure names the limit, in case it was the cause.
        let mut spec = JobSpec::shell("exit 3");
        spec.opts.memory = Some(64 << 20);
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(
            r.error.as_deref(),
            Some(
                "exited with status 3; the job had a memory limit of 64MiB per process; if it ran out, raise `memory`"
            )
        );
    }

    #[tokio::test]
    async fn a_job_stopped_by_a_limit_still_uploads_its_outputs() {
        let (d, ctx, store) = data_context();
        let mut spec = staged(d.path(), &store, "echo partial > log.txt; while :; do :; done", &["log.txt"]).await;
        spec.opts.cpu = Some(Duration::from_secs(1));
        let r = run(&ctx, &spec).await;
        assert_eq!(r.status, Status::CpuLimit, "{r:?}");
        let names: Vec<&str> = r.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["log.txt"]);
    }

    #[tokio::test]
    async fn a_job_within_its_limits_succeeds() {
        let (_d, ctx) = context();
        let mut spec = JobSpec::shell("python3 -c 'b = bytearray(16 * 1024 * 1024); print(len(b))'");
        spec.opts.memory = Some(256 << 20);
        spec.opts.cpu = Some(Duration::from_secs(30));
        let r = run(&ctx, &spec).await;
        assert_eq!((r.status, r.stdout.text.as_str(), r.error), (Status::Succeeded, "16777216\n", None));
    }

    #[test]
    fn limit_formats() {
        assert_eq!(cpu_limit_seconds(Duration::from_millis(1)), 1);
        assert_eq!(cpu_limit_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(cpu_limit_seconds(Duration::from_secs(600)), 600);
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(3 << 29), "1536MiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(2 << 30), "2GiB");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGKILL), Some("SIGKILL"));
        assert_eq!(signal_name(libc::SIGTERM), Some("SIGTERM"));
        assert_eq!(signal_name(1000), None);
    }
}
