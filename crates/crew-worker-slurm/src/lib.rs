//! The `slurm` worker class: crew agents as Slurm jobs.
//!
//! A class only starts agents, tells whether they live, and stops them
//! (`crew_core::worker`); this one does it with Slurm's own commands, run
//! where the controller runs (a login node):
//!
//! - `launch` submits **one `sbatch --array`** for the N members of a
//!   launch (array task = member index), from a batch script written to a
//!   private file ([`script`]). The script holds no secret: each member
//!   takes its own from a one-time 0600 file (`CREW_TOKEN_REF=file:`), so
//!   neither argv, nor the environment, nor the copy of the script Slurm
//!   keeps carries one, and a member cannot pose as another once that one
//!   took its file. Handles are `<job>_<task>`.
//! - `probe` answers from a cache refreshed at most once per probe interval
//!   (3 s by default) with **one `squeue` call** for every live job this
//!   instance started; jobs squeue no longer lists (past Slurm's
//!   `MinJobAge`) are asked of `sacct` in one call. States map to
//!   [`Liveness`] with the reason in Slurm's words ([`state`]).
//! - `terminate` is **one `scancel`** for all handles (a whole array by its
//!   job id), shared by the terminate calls that come within 200 ms (a
//!   controller stopping its slots one by one); a job already ended or
//!   unknown is success, and one the class saw end costs no call.
//!
//! A launch Slurm refuses (a bad partition, over a limit) fails with
//! Slurm's message and what to check; the controller's launch budget
//! (`launch_max`, 3 by default) bounds the submissions of a slot.
//!
//! Options (`--opt key=value`, `[class.slurm]` in `crew.toml`) are parsed
//! by [`SlurmOptions`]; [`SlurmWorker::new`] also takes defaults from
//! `CREW_SLURM_*` variables.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use crew_core::worker::{
    Capabilities, ENV_LAUNCH, ENV_TOKEN, Handle, LaunchSpec, Liveness, Secret, Worker, WorkerError,
};
use tracing::{debug, warn};

mod command;
pub mod options;
pub mod script;
pub mod state;

pub use options::{KEYS, SlurmOptions, WALL_GRACE};

/// The class name.
pub const CLASS: &str = "slurm";
/// Most members of one launch: Slurm's default `MaxArraySize` is 1001,
/// so task ids 0 to 1000.
pub const ARRAY_MAX: usize = 1000;
/// The default probe interval: Slurm is asked at most this often.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(3);
/// Ended jobs are forgotten this long after their end was seen.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most job ids in one squeue, sacct or scancel call.
const IDS_PER_CALL: usize = 1000;
/// How long a terminate waits for others to share its scancel.
const CANCEL_GATHER: Duration = Duration::from_millis(200);

/// The prefix of the variables [`SlurmWorker::new`] reads option defaults
/// from (`CREW_SLURM_PARTITION`, ...).
pub const ENV_PREFIX: &str = "CREW_SLURM_";

/// The `slurm` class. Cheap to clone; clones share their state (the jobs
/// started, the probe cache).
#[derive(Clone, Debug)]
pub struct SlurmWorker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Option defaults, under the recruit's options.
    defaults: BTreeMap<String, String>,
    /// Variables added to the environment of every Slurm command.
    command_env: Vec<(String, String)>,
    /// What this instance knows of each job, by handle id.
    jobs: Mutex<HashMap<String, Known>>,
    /// The folder of each launch not yet ended, with its members' handles
    /// still alive.
    launches: Mutex<HashMap<PathBuf, Vec<String>>>,
    /// One probe round at a time.
    round: tokio::sync::Mutex<()>,
    probe_interval: Duration,
    /// Task ids to cancel in the next scancel, and who waits for it.
    cancels: Mutex<Cancels>,
}

#[derive(Debug, Default)]
struct Cancels {
    ids: Vec<String>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), String>>>,
    /// A scancel is due.
    scheduled: bool,
}

#[derive(Clone, Debug)]
struct Known {
    life: Liveness,
    /// When `life` was read from Slurm; `None`: never, or invalidated.
    at: Option<Instant>,
    /// The worker's log file, for the reason of an end.
    log: Option<String>,
    /// Its launch folder (script, one-time secrets).
    dir: Option<PathBuf>,
    /// crew cancelled it.
    cancelled: bool,
}

impl Known {
    fn live(&self) -> bool {
        matches!(self.life, Liveness::Starting | Liveness::Running)
    }
}

impl Default for SlurmWorker {
    fn default() -> Self {
        Self::new()
    }
}

/// Option defaults from `CREW_SLURM_<KEY>` (`CREW_SLURM_PARTITION`, ...).
pub fn env_defaults() -> BTreeMap<String, String> {
    KEYS.iter()
        .filter_map(|k| {
            let v = std::env::var(format!("{ENV_PREFIX}{}", k.to_ascii_uppercase())).ok()?;
            (!v.is_empty()).then(|| ((*k).to_owned(), v))
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn platform(message: String, retryable: bool) -> WorkerError {
    WorkerError::Platform { class: CLASS.to_owned(), message, retryable }
}

impl SlurmWorker {
    /// A class whose option defaults come from the `CREW_SLURM_*`
    /// variables (read now, once), one per option: `CREW_SLURM_PARTITION`,
    /// `CREW_SLURM_ACCOUNT`, `CREW_SLURM_QOS`, `CREW_SLURM_TIME`,
    /// `CREW_SLURM_MEMORY`, `CREW_SLURM_CPUS`, `CREW_SLURM_GRES`,
    /// `CREW_SLURM_NODES`, `CREW_SLURM_LOG_DIR`, `CREW_SLURM_EXTRA`,
    /// `CREW_SLURM_PREAMBLE`, `CREW_SLURM_AGENT`, `CREW_SLURM_STATE_DIR`,
    /// `CREW_SLURM_JOB_NAME`, `CREW_SLURM_EXPORT`, `CREW_SLURM_SHELL`. Options given at recruit
    /// time (or in `crew.toml`) win over them.
    pub fn new() -> Self {
        Self::build(env_defaults())
    }

    /// A class with these option defaults instead of the `CREW_SLURM_*` ones.
    pub fn with_defaults(defaults: BTreeMap<String, String>) -> Self {
        Self::build(defaults)
    }

    fn build(defaults: BTreeMap<String, String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                defaults,
                command_env: Vec::new(),
                jobs: Mutex::new(HashMap::new()),
                launches: Mutex::new(HashMap::new()),
                round: tokio::sync::Mutex::new(()),
                probe_interval: DEFAULT_PROBE_INTERVAL,
                cancels: Mutex::new(Cancels::default()),
            }),
        }
    }

    /// The same class with another probe interval (how stale a probe's
    /// answer may be; Slurm is asked at most this often). Call before
    /// sharing the class.
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.probe_interval = interval.max(Duration::from_millis(1));
        }
        self
    }

    /// The same class with `name=value` in the environment of every Slurm
    /// command it runs (`SLURM_CONF` for another cluster, `PATH` for
    /// another Slurm). Call before sharing the class.
    pub fn with_command_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.command_env.push((name.into(), value.into()));
        }
        self
    }

    fn options(&self, options: &BTreeMap<String, String>) -> Result<SlurmOptions, WorkerError> {
        SlurmOptions::parse(&self.inner.defaults, options)
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<String, Known>> {
        lock(&self.inner.jobs)
    }

    async fn slurm(&self, program: &str, args: Vec<String>) -> Result<command::Said, WorkerError> {
        debug!(program, ?args, "running a Slurm command");
        command::run(program, &args, &self.inner.command_env).await
    }

    /// Submits the array of one launch; returns its Slurm job id.
    async fn submit(
        &self,
        opts: &SlurmOptions,
        spec: &LaunchSpec,
        dir: &script::LaunchDir,
    ) -> Result<String, WorkerError> {
        let indices: Vec<u32> = spec.members.iter().map(|m| m.index).collect();
        let io = |what: &str, e: std::io::Error| {
            platform(format!("cannot write {what} in {}: {e} (check the state_dir option)", dir.path.display()), false)
        };
        let token_prefix = match spec.env.get(ENV_TOKEN) {
            Some(token) => {
                dir.write_secrets(&Secret::new(token.clone()), &indices).map_err(|e| io("the launch secrets", e))?;
                Some(dir.token_prefix())
            }
            None => None,
        };
        let program = opts.agent.clone().unwrap_or_else(|| spec.program.clone());
        let text = script::render(opts, spec, &program, token_prefix.as_deref());
        let path = dir.write("job.sh", &text).map_err(|e| io("the job script", e))?;
        let said = self.slurm("sbatch", vec!["--parsable".into(), path.display().to_string()]).await?;
        if !said.ok {
            let message = command::slurm_message(&said.stderr);
            let retryable = command::transient(&message);
            return Err(platform(
                format!("sbatch refused the job: {message} ({})", command::sbatch_hint(&message)),
                retryable,
            ));
        }
        // `--parsable`: `<job id>` or `<job id>;<cluster>`.
        let job = said.stdout.trim().split(';').next().unwrap_or_default().trim().to_owned();
        if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
            return Err(platform(format!("sbatch answered no job id: {:?}", said.stdout.trim()), false));
        }
        Ok(job)
    }

    /// Forgets the one-time secrets of `handles` (ended, or being stopped),
    /// and the folder of a launch none of whose members is left.
    fn drop_secrets<'a>(&self, handles: impl Iterator<Item = &'a str>) {
        let mut done: Vec<PathBuf> = Vec::new();
        {
            let jobs = self.jobs();
            let mut launches = lock(&self.inner.launches);
            for h in handles {
                let Some(dir) = jobs.get(h).and_then(|k| k.dir.clone()) else { continue };
                if let Some(task) = h.split_once('_').map(|(_, t)| t) {
                    let _ = std::fs::remove_file(dir.join(format!("token.{task}")));
                }
                if let Some(left) = launches.get_mut(&dir) {
                    left.retain(|x| x != h);
                    if left.is_empty() {
                        launches.remove(&dir);
                        done.push(dir);
                    }
                }
            }
        }
        for dir in done {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(dir = %dir.display(), "could not remove a launch folder: {e}");
            }
        }
    }

    /// Cancels the array tasks `ids` with one scancel (per
    /// [`IDS_PER_CALL`]): a whole array by its job id when every task
    /// this instance started of it is asked for. Jobs already ended or
    /// unknown to Slurm are fine.
    async fn scancel(&self, mut ids: Vec<String>) -> Result<(), WorkerError> {
        ids.sort_unstable();
        ids.dedup();
        let mut targets: Vec<String> = Vec::new();
        {
            let jobs = self.jobs();
            let mut asked: BTreeMap<&str, usize> = BTreeMap::new();
            for id in &ids {
                if let Some((job, _)) = id.split_once('_') {
                    *asked.entry(job).or_default() += 1;
                }
            }
            for (job, n) in asked {
                let prefix = format!("{job}_");
                let ours = jobs.keys().filter(|k| k.starts_with(&prefix)).count();
                if ours > 0 && ours == n {
                    targets.push(job.to_owned());
                } else {
                    targets.extend(ids.iter().filter(|id| id.starts_with(&prefix)).cloned());
                }
            }
        }
        for chunk in targets.chunks(IDS_PER_CALL) {
            let said = self.slurm("scancel", chunk.to_vec()).await?;
            if !said.ok {
                let real: Vec<&str> = said
                    .stderr
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .filter(|l| !(l.contains("already completing or completed") || l.contains("Invalid job id")))
                    .collect();
                if !real.is_empty() {
                    let message = command::slurm_message(&real.join("\n"));
                    return Err(platform(format!("scancel failed: {message}"), true));
                }
            }
        }
        Ok(())
    }

    /// Asks Slurm about `ids` (task ids) in one squeue call, and about those
    /// squeue no longer lists in one sacct call; updates the cache.
    async fn refresh(&self, ids: &[String]) -> Result<(), WorkerError> {
        let mut found: HashMap<String, state::TaskState> = HashMap::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let mut jobs: Vec<&str> = chunk.iter().filter_map(|id| id.split_once('_').map(|(j, _)| j)).collect();
            jobs.sort_unstable();
            jobs.dedup();
            let args = vec![
                "--noheader".into(),
                "--array".into(),
                "--states=all".into(),
                format!("--format={}", state::SQUEUE_FORMAT),
                format!("--jobs={}", jobs.join(",")),
            ];
            let said = self.slurm("squeue", args).await?;
            // One unknown job alone makes squeue fail ("Invalid job id").
            if !said.ok && !said.stderr.contains("Invalid job id") {
                let message = command::slurm_message(&said.stderr);
                return Err(platform(format!("squeue failed: {message}"), true));
            }
            found.extend(state::parse_squeue(&said.stdout).into_iter().map(|t| (t.id.clone(), t)));
        }
        let missing: Vec<&String> = ids.iter().filter(|id| !found.contains_key(*id)).collect();
        let mut sacct_error: Option<String> = None;
        for chunk in missing.chunks(IDS_PER_CALL) {
            let list: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
            let args = vec![
                "--allocations".into(),
                "--noheader".into(),
                "--parsable2".into(),
                format!("--format={}", state::SACCT_FIELDS),
                format!("--jobs={}", list.join(",")),
            ];
            let said = self.slurm("sacct", args).await?;
            if said.ok {
                found.extend(state::parse_sacct(&said.stdout).into_iter().map(|t| (t.id.clone(), t)));
            } else {
                sacct_error = Some(command::slurm_message(&said.stderr));
            }
        }
        let now = Instant::now();
        let mut jobs = self.jobs();
        for id in ids {
            let k = jobs.entry(id.clone()).or_insert_with(|| Known {
                life: Liveness::Unknown,
                at: None,
                log: None,
                dir: None,
                cancelled: false,
            });
            k.at = Some(now);
            k.life = match found.get(id) {
                Some(t) => {
                    let mut t = t.clone();
                    if k.cancelled && t.state == "CANCELLED" {
                        t.detail = Some("stopped by crew".to_owned());
                    }
                    state::liveness(&t, k.log.as_deref())
                }
                // Not one of ours: Slurm does not know it.
                None if k.log.is_none() => Liveness::Unknown,
                None => Liveness::Exited {
                    reason: format!(
                        "Slurm job {id} is no longer listed by squeue{}",
                        match &sacct_error {
                            Some(e) => format!(" and sacct cannot tell how it ended ({e})"),
                            None => " nor sacct".to_owned(),
                        }
                    ),
                },
            };
        }
        Ok(())
    }
}

#[async_trait]
impl Worker for SlurmWorker {
    fn class(&self) -> &str {
        CLASS
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::remote(ARRAY_MAX, IDS_PER_CALL, self.inner.probe_interval);
        // Clusters share their home and scratch folders; the class needs
        // it (its state_dir) and so may a store path.
        c.shares_filesystem = true;
        // A job may pend in Slurm's queue for hours: the launch timeout
        // counts from when it leaves the queue.
        c.queues_launches = true;
        c
    }

    fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
        self.options(options).map(|_| ())
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError> {
        let opts = self.options(&spec.options)?;
        if spec.members.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(m) = spec.members.iter().find(|m| m.index as usize > ARRAY_MAX) {
            return Err(platform(
                format!("member index {} is beyond a Slurm array (0 to {ARRAY_MAX})", m.index),
                false,
            ));
        }
        std::fs::create_dir_all(&opts.log_dir).map_err(|e| {
            platform(
                format!("cannot create the log folder {}: {e} (check the log_dir option)", opts.log_dir.display()),
                false,
            )
        })?;
        let launch = spec.env.get(ENV_LAUNCH).map_or("", String::as_str);
        let dir = script::LaunchDir::create(&opts.state_dir, launch).map_err(|e| {
            platform(
                format!(
                    "cannot create a launch folder in {}: {e} (check the state_dir option)",
                    opts.state_dir.display()
                ),
                false,
            )
        })?;
        let job = match self.submit(&opts, spec, &dir).await {
            Ok(job) => job,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir.path);
                return Err(e);
            }
        };
        debug!(job = %job, members = spec.members.len(), "submitted a Slurm array");
        let handles: Vec<Handle> = spec.members.iter().map(|m| Handle::new(format!("{job}_{}", m.index))).collect();
        lock(&self.inner.launches).insert(dir.path.clone(), handles.iter().map(|h| h.id.clone()).collect());
        let mut jobs = self.jobs();
        for (h, m) in handles.iter().zip(&spec.members) {
            jobs.insert(
                h.id.clone(),
                Known {
                    life: Liveness::Starting,
                    at: None,
                    log: Some(script::log_path(&opts.log_dir, &job, m.index).display().to_string()),
                    dir: Some(dir.path.clone()),
                    cancelled: false,
                },
            );
        }
        Ok(handles)
    }

    async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError> {
        let _round = self.inner.round.lock().await;
        let now = Instant::now();
        let interval = self.inner.probe_interval;
        let stale = |k: &Known| k.at.is_none_or(|at| now.duration_since(at) >= interval);
        let mut wanted: Vec<String> = Vec::new();
        {
            let mut jobs = self.jobs();
            jobs.retain(|_, k| k.live() || k.at.is_none_or(|at| now.duration_since(at) < FORGET_AFTER));
            let mut requested_stale = false;
            for h in handles {
                if !state::is_task_id(&h.id) {
                    continue;
                }
                match jobs.get(&h.id) {
                    // An ended job stays ended: no need to ask again.
                    Some(k) if matches!(k.life, Liveness::Exited { .. }) => {}
                    Some(k) if !stale(k) => {}
                    _ => {
                        requested_stale = true;
                        wanted.push(h.id.clone());
                    }
                }
            }
            if requested_stale {
                // Every other live job in the same call.
                wanted.extend(jobs.iter().filter(|(_, k)| k.live() && stale(k)).map(|(id, _)| id.clone()));
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            self.refresh(&wanted).await?;
        }
        let lives: Vec<Liveness> = {
            let jobs = self.jobs();
            handles.iter().map(|h| jobs.get(&h.id).map_or(Liveness::Unknown, |k| k.life.clone())).collect()
        };
        let ended = handles.iter().zip(&lives).filter(|(_, l)| matches!(l, Liveness::Exited { .. }));
        self.drop_secrets(ended.map(|(h, _)| h.id.as_str()));
        Ok(lives)
    }

    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError> {
        let mut ids: Vec<String> = handles.iter().filter(|h| state::is_task_id(&h.id)).map(|h| h.id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Jobs known to have ended need no call.
        {
            let mut jobs = self.jobs();
            ids.retain(|id| match jobs.get_mut(id) {
                Some(k) if matches!(k.life, Liveness::Exited { .. }) => false,
                Some(k) => {
                    k.cancelled = true;
                    // The next probe asks Slurm again.
                    k.at = None;
                    true
                }
                None => true,
            });
        }
        self.drop_secrets(ids.iter().map(String::as_str));
        if ids.is_empty() {
            return Ok(());
        }
        // Calls that come within a moment of each other (a controller
        // stopping its slots one by one) share one scancel.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let flush = {
            let mut c = lock(&self.inner.cancels);
            c.ids.extend(ids);
            c.waiters.push(tx);
            !std::mem::replace(&mut c.scheduled, true)
        };
        if flush {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(CANCEL_GATHER).await;
                let (ids, waiters) = {
                    let mut c = lock(&this.inner.cancels);
                    c.scheduled = false;
                    (std::mem::take(&mut c.ids), std::mem::take(&mut c.waiters))
                };
                let result = this.scancel(ids).await.map_err(|e| match e {
                    WorkerError::Platform { message, .. } => message,
                    other => other.to_string(),
                });
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            });
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(platform(message, true)),
            Err(_) => Err(platform("scancel was not run (the runtime is stopping)".to_owned(), true)),
        }
    }
}
