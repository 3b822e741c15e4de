//! The scheduler: a pure state machine that decides where jobs run.
//!
//! Events go in as method calls (a job submitted, a worker connected, a job
//! finished, a worker lost, a tick with the current time), and actions come
//! out ([`Action`]: launch slots, assign a job to a worker, terminate a
//! worker, deliver an output). There are no sockets, clocks or tasks in here:
//! `now` is always a parameter. That keeps the rules in one place, makes them
//! deterministic to test with thousands of simulated workers and a fake
//! clock, and keeps the async controller loop around it small.
//!
//! # The rules
//! - A queued job goes to the ready worker (connected, below its capacity)
//!   whose tags include the job's tags, preferring the least loaded and then
//!   the one with the fewest tags (keep specialised workers free for the jobs
//!   that need them).
//! - Failing that, a down slot whose tags match is launched: queued jobs are
//!   matched against slots already launching first, so one job never launches
//!   two workers.
//! - Otherwise the job waits, ordered by priority (higher first) then by
//!   arrival.
//! - A worker holds at most `1 + prefetch` jobs; the agent runs them in order.
//!   Its window widens when its jobs are short: the scheduler measures each
//!   worker's pace (jobs finished over the time it was busy) and sends it
//!   about 2 ms of work ahead, at most [`AHEAD_MAX`] jobs; one slow job
//!   narrows it back at once. `prefetch` 0 turns sending ahead off.
//!   A job is sent ahead to a busy worker only when no matching slot is down
//!   or launching (a worker that can start beats a queue behind a busy one).
//!   A worker that falls idle while no queued job fits it takes back a
//!   prefetched job that has not started from a busy worker (revocation), so
//!   prefetching never leaves a worker idle behind a long job.
//! - A job whose worker is lost goes back to the front of the queue, unless
//!   it has crashed `crashes_max` times: then it ends `crashed`.
//! - A launch that fails or does not connect within the launch timeout is
//!   retried until the slot's launch budget is spent; the slot is then broken,
//!   and queued jobs that no usable slot can run end `launch_failed`.
//!
//! **Invariant:** every accepted job is in exactly one place — the queue, or
//! the assigned list of exactly one slot — until exactly one `Deliver` action
//! carries its output, after which the scheduler forgets it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crew_core::clock::after;
use crew_core::job::{JobId, JobSpec};
use crew_core::output::{Output, Status};
use crew_core::tags::Tags;

mod queue;
mod table;
pub use table::JobTable;
#[cfg(test)]
mod tests;

use queue::Group;

/// Index of a slot in the scheduler (stable for the scheduler's life).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

/// Limits of one slot.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SlotLimits {
    /// Stop the worker after it has been idle this long (it is relaunched
    /// when jobs need it again). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Stop the worker after this many jobs (then relaunch when needed).
    pub tasks_max: Option<u32>,
    /// Soft wall time: after this long up, the worker takes no new jobs and
    /// stops once idle.
    pub wall_time: Option<Duration>,
    /// A launched worker that has not connected after this long is
    /// terminated and the launch counts as failed.
    pub launch_timeout: Duration,
    /// Consecutive failed launches after which the slot is broken.
    pub launch_max: u32,
    /// Jobs sent ahead to a busy worker, at least (0: one job at a time;
    /// more when its jobs are short, see the module's rules).
    pub prefetch: u32,
}

impl Default for SlotLimits {
    fn default() -> Self {
        Self {
            idle_timeout: None,
            tasks_max: None,
            wall_time: None,
            launch_timeout: Duration::from_secs(60),
            launch_max: 3,
            prefetch: 1,
        }
    }
}

/// A slot as recruited: name, class, tags and limits.
#[derive(Clone, Debug)]
pub struct SlotConfig {
    /// Unique name (`local-1`).
    pub name: String,
    /// Class name (`local`).
    pub class: String,
    /// Its tags.
    pub tags: Tags,
    /// Its limits.
    pub limits: SlotLimits,
}

/// The state of a slot, as shown by `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotState {
    /// Not running; launched when a job needs it.
    Down,
    /// Launched, waiting for the agent to connect.
    Launching,
    /// Connected; `jobs` assigned (0 = idle).
    Up,
    /// Asked to stop; waiting for it to go.
    Stopping,
    /// Its launch budget is spent; `restart` makes it usable again.
    Broken,
    /// After a controller restart: its worker may have outlived the old
    /// controller and is expected back (with the jobs it held) until a
    /// deadline; until then no queued job is dispatched to anyone, so that
    /// a job that worker still runs is not started twice.
    Resuming,
}

/// What the controller must do.
#[derive(Debug)]
pub enum Action {
    /// Start these slots (one launch per class; the controller may split
    /// them into arrays).
    Launch(Vec<SlotId>),
    /// Send the job to the slot's worker.
    Assign {
        /// The worker.
        slot: SlotId,
        /// The job.
        job: JobId,
        /// The attempt number (1-based).
        attempt: u32,
    },
    /// Ask the worker to give back a job it has not started.
    Revoke {
        /// The worker holding it.
        slot: SlotId,
        /// The job.
        job: JobId,
    },
    /// Ask the worker to cancel the job (kill it if running).
    Cancel {
        /// The worker.
        slot: SlotId,
        /// The job.
        job: JobId,
    },
    /// Stop the slot's worker (politely, then by the class's terminate).
    Terminate {
        /// The slot.
        slot: SlotId,
        /// Why, for logs and status.
        reason: String,
    },
    /// The job is over: hand its output to the user.
    Deliver(Box<Output>),
}

/// Why a job was refused at submit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No recruited slot has all of the job's tags.
    #[error("no recruited worker has tags [{wanted}]; the recruited tag sets are: {known}")]
    NoMatchingSlot {
        /// The job's tags.
        wanted: Tags,
        /// The tag sets of the recruited slots, for the message.
        known: String,
    },
    /// Slots match, but each of them is broken.
    #[error("every worker that could run a job with tags [{wanted}] failed to launch: {reason}")]
    AllBroken {
        /// The job's tags.
        wanted: Tags,
        /// The last launch failure.
        reason: String,
    },
    /// The id is already known.
    #[error("job {0} was already submitted")]
    Duplicate(JobId),
}

/// What happened to a job before: attempts started, crashes, failed runs
/// retried (see [`Scheduler::restore`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Attempts started.
    pub attempts: u32,
    /// Attempts whose worker died under the job.
    pub crashes: u32,
    /// Failed attempts already retried.
    pub failures: u32,
}

/// Which slots a command applies to.
#[derive(Clone, Debug, Default)]
pub struct SlotFilter {
    /// Slots whose tags include these (all slots when `None`).
    pub tags: Option<Tags>,
    /// Only the slot with this name.
    pub slot: Option<String>,
}

impl SlotFilter {
    fn matches(&self, cfg: &SlotConfig) -> bool {
        self.tags.as_ref().is_none_or(|t| cfg.tags.satisfies(t)) && self.slot.as_ref().is_none_or(|s| *s == cfg.name)
    }
}

/// Where a job is, for a per-job query ([`Scheduler::job_view`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobPlace {
    /// Waiting for a worker.
    Queued,
    /// Sent to the slot's worker, behind another job there (prefetched).
    Waiting(SlotId),
    /// The first job of the slot's worker: running, or about to.
    Running(SlotId),
}

/// One job as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobView {
    /// Where it is.
    pub place: JobPlace,
    /// Attempts started so far (the current one when it runs).
    pub attempt: u32,
}

/// A view of one slot for `status`.
#[derive(Clone, Debug)]
pub struct SlotView<'a> {
    /// Its index.
    pub id: SlotId,
    /// Its configuration.
    pub config: &'a SlotConfig,
    /// Its state.
    pub state: SlotState,
    /// Jobs assigned to it now.
    pub assigned: usize,
    /// Jobs it finished, over all its launches.
    pub jobs_done: u64,
    /// Since when it is idle (Up with nothing assigned).
    pub idle_since: Option<Instant>,
    /// Why its last worker stopped or failed to start.
    pub last_reason: Option<&'a str>,
    /// Consecutive failed launches.
    pub launch_failures: u32,
}

/// Job counts, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting for a worker.
    pub queued: usize,
    /// Assigned to a worker (running or prefetched).
    pub assigned: usize,
}

#[derive(Debug)]
struct Slot {
    cfg: SlotConfig,
    state: SlotState,
    /// Jobs assigned, in the order the agent runs them; the front one is
    /// running (or about to).
    jobs: VecDeque<JobId>,
    /// When the current launch started, or the worker connected.
    since: Instant,
    idle_since: Option<Instant>,
    tasks_done: u32,
    jobs_done: u64,
    launch_failures: u32,
    last_reason: Option<String>,
    /// No new jobs: tasks_max reached or wall time passed; stops when idle.
    retiring: bool,
    dismissed: bool,
    /// A job being revoked from this slot (at most one at a time).
    revoking: Option<JobId>,
    /// While resuming: the deadline for its worker to come back.
    resume_until: Option<Instant>,
    /// Its worker came back holding more jobs than its capacity (results
    /// it re-sends); cleared once it holds no job.
    over: bool,
    /// What its worker's recent jobs took, for the adaptive window.
    pace: Pace,
}

/// How fast a slot's worker gets through its jobs, measured by the
/// scheduler's own clock: jobs finished over the time it was busy. It sets
/// how many jobs the worker is sent ahead ([`Pace::ahead`]): at least the
/// slot's `prefetch`, more when its jobs are short, so that a worker of
/// no-op jobs gets them by the hundred per round trip while a worker of long
/// jobs holds `1 + prefetch`.
#[derive(Debug, Default, Clone)]
struct Pace {
    /// Start of the current measuring period (the worker busy throughout).
    since: Option<Instant>,
    /// Jobs finished in it.
    done: u32,
    /// Estimated time per job, in nanoseconds (`None`: not measured yet).
    per_job_ns: Option<u64>,
}

/// Work sent ahead to a worker of short jobs: enough to keep it busy this
/// long without another word from the controller.
const AHEAD_WORK: Duration = Duration::from_millis(2);

/// The most jobs sent ahead to one worker, however short its jobs.
pub const AHEAD_MAX: u32 = 256;

/// The most jobs a worker with these limits may hold at once: its
/// capacity, which follows its pace, never passes this.
pub fn max_held(limits: &SlotLimits) -> usize {
    match limits.prefetch {
        0 => 1,
        p => 1 + AHEAD_MAX.max(p) as usize,
    }
}

/// The shortest period a pace is measured over (shorter ones say more about
/// the clock than about the jobs).
const PACE_PERIOD: Duration = Duration::from_millis(1);

impl Pace {
    /// A job was assigned to a worker that held `held` jobs before it.
    fn assigned(&mut self, held: usize, now: Instant) {
        if held == 0 {
            self.since = Some(now);
            self.done = 0;
        }
    }

    /// A job finished; `left` jobs are still on the worker.
    fn finished(&mut self, left: usize, now: Instant) {
        self.done += 1;
        let Some(since) = self.since else { return };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= PACE_PERIOD {
            let sample = (elapsed.as_nanos() / u128::from(self.done)).min(u128::from(u64::MAX)) as u64;
            // Slower jobs count at once (a long job must not find many
            // others queued behind it); faster ones are believed gradually.
            self.per_job_ns = Some(match self.per_job_ns {
                Some(old) if sample < old => (old.saturating_mul(3) / 4).saturating_add(sample / 4),
                _ => sample,
            });
            self.since = Some(now);
            self.done = 0;
        }
        if left == 0 {
            self.since = None;
        }
    }

    /// Jobs to send ahead with a `prefetch` of at least `prefetch` (0 turns
    /// sending ahead off).
    fn ahead(&self, prefetch: u32) -> u32 {
        match self.per_job_ns {
            Some(ns) if prefetch > 0 => {
                let fit = AHEAD_WORK.as_nanos() as u64 / ns.max(1);
                fit.clamp(u64::from(prefetch), u64::from(AHEAD_MAX.max(prefetch))) as u32
            }
            _ => prefetch,
        }
    }
}

impl Slot {
    fn capacity(&self) -> usize {
        let mut cap = 1 + self.pace.ahead(self.cfg.limits.prefetch) as usize;
        if let Some(max) = self.cfg.limits.tasks_max {
            cap = cap.min(max.saturating_sub(self.tasks_done) as usize);
        }
        cap
    }

    fn is_ready(&self) -> bool {
        self.state == SlotState::Up && !self.retiring && !self.dismissed && self.jobs.len() < self.capacity()
    }

    /// Could run jobs now or after a launch (for submit-time refusal).
    fn usable(&self) -> bool {
        !self.dismissed && self.state != SlotState::Broken
    }
}

#[derive(Debug)]
enum JobState {
    Queued(QueueKey),
    Assigned(SlotId),
}

type QueueKey = (Reverse<i32>, i64);

/// Whether `job` is queued under `key` (else a queue entry of it is a
/// tombstone).
fn queued_under(jobs: &JobTable<JobEntry>, job: JobId, key: QueueKey) -> bool {
    jobs.get(&job).is_some_and(|e| matches!(e.state, JobState::Queued(k) if k == key))
}

#[derive(Debug)]
struct JobEntry {
    spec: Arc<JobSpec>,
    seed: u64,
    state: JobState,
    /// Attempts started so far.
    attempt: u32,
    crashes: u32,
    failures: u32,
    cancel_requested: bool,
    last_slot: Option<SlotId>,
}

/// The scheduler. See the module documentation for the rules.
#[derive(Debug, Default)]
pub struct Scheduler {
    slots: Vec<Slot>,
    jobs: JobTable<JobEntry>,
    /// Queued jobs grouped by their tag set; within a group, by (priority
    /// desc, arrival).
    queue: BTreeMap<Tags, Group>,
    /// Ready slots grouped by tag set, ordered by (assigned, id).
    ready: BTreeMap<Tags, BTreeSet<(usize, SlotId)>>,
    /// Arrival counter: back of the queue counts up, front counts down.
    seq_back: i64,
    seq_front: i64,
    actions: Vec<Action>,
    /// Down, usable slots (launch balancing is skipped when zero).
    down: usize,
    /// Slots launching (prefetching waits for them rather than queueing
    /// behind a busy worker).
    launching: usize,
    /// Jobs assigned beyond the first on some slot (revocation is skipped
    /// when zero).
    prefetched: usize,
    /// Slots resuming: while any is, nothing is dispatched.
    resuming: usize,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    // ----- queries -------------------------------------------------------

    /// The actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Moves the pending actions into `out` (keeps allocations warm).
    pub fn drain_actions_into(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    /// The slot's configuration.
    pub fn slot_config(&self, slot: SlotId) -> &SlotConfig {
        &self.slots[slot.0 as usize].cfg
    }

    /// The slot's state.
    pub fn slot_state(&self, slot: SlotId) -> SlotState {
        self.slots[slot.0 as usize].state.clone()
    }

    /// The slot with this name.
    pub fn slot_by_name(&self, name: &str) -> Option<SlotId> {
        self.slots.iter().position(|s| s.cfg.name == name && !s.dismissed).map(|i| SlotId(i as u32))
    }

    /// Every slot not dismissed.
    pub fn slots(&self) -> impl Iterator<Item = SlotView<'_>> {
        self.slots.iter().enumerate().filter(|(_, s)| !s.dismissed).map(|(i, s)| SlotView {
            id: SlotId(i as u32),
            config: &s.cfg,
            state: s.state.clone(),
            assigned: s.jobs.len(),
            jobs_done: s.jobs_done,
            idle_since: if s.state == SlotState::Up && s.jobs.is_empty() { s.idle_since } else { None },
            last_reason: s.last_reason.as_deref(),
            launch_failures: s.launch_failures,
        })
    }

    /// The job's spec, while the scheduler knows it.
    pub fn job(&self, id: JobId) -> Option<&Arc<JobSpec>> {
        self.jobs.get(&id).map(|j| &j.spec)
    }

    /// Where the job is and its attempt, while the scheduler knows it
    /// (until its output is delivered).
    pub fn job_view(&self, id: JobId) -> Option<JobView> {
        let j = self.jobs.get(&id)?;
        let place = match j.state {
            JobState::Queued(_) => JobPlace::Queued,
            JobState::Assigned(slot) => {
                if self.slots[slot.0 as usize].jobs.front() == Some(&id) {
                    JobPlace::Running(slot)
                } else {
                    JobPlace::Waiting(slot)
                }
            }
        };
        Some(JobView { place, attempt: j.attempt })
    }

    /// The job's seed, while the scheduler knows it.
    pub fn job_seed(&self, id: JobId) -> Option<u64> {
        self.jobs.get(&id).map(|j| j.seed)
    }

    /// True when actions wait to be taken.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Ids of every job not yet delivered. Jobs waiting behind another on a
    /// worker come before the job each worker runs first, so that cancelling
    /// in this order tells a worker to drop its waiting jobs before its
    /// running one ends (else it could start the next one in between).
    pub fn pending_ids(&self) -> Vec<JobId> {
        let heads: Vec<JobId> = self.slots.iter().filter_map(|s| s.jobs.front().copied()).collect();
        let mut ids: Vec<JobId> = self.jobs.keys().filter(|j| !heads.contains(j)).collect();
        ids.extend(heads.into_iter().filter(|j| self.jobs.contains_key(j)));
        ids
    }

    /// Checks that some usable slot could run a job with these tags (what
    /// `submit` checks first), without submitting anything.
    pub fn check_tags(&self, tags: &Tags) -> Result<(), SubmitError> {
        self.check_satisfiable(tags)
    }

    /// Jobs not yet delivered.
    pub fn pending(&self) -> usize {
        self.jobs.len()
    }

    /// Queued and assigned counts.
    pub fn counts(&self) -> Counts {
        let queued = self.queue.values().map(Group::len).sum();
        Counts { queued, assigned: self.jobs.len() - queued }
    }

    /// The earliest time at which [`Scheduler::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.slots {
            match s.state {
                SlotState::Launching => consider(after(s.since, s.cfg.limits.launch_timeout)),
                SlotState::Resuming => {
                    if let Some(t) = s.resume_until {
                        consider(t);
                    }
                }
                SlotState::Up => {
                    if let (Some(idle), Some(since)) = (s.cfg.limits.idle_timeout, s.idle_since) {
                        if s.jobs.is_empty() {
                            consider(after(since, idle));
                        }
                    }
                    if let Some(wall) = s.cfg.limits.wall_time {
                        if !s.retiring {
                            consider(after(s.since, wall));
                        }
                    }
                }
                _ => {}
            }
        }
        next
    }

    // ----- events --------------------------------------------------------

    /// Adds `count` down slots; returns their ids.
    pub fn recruit(&mut self, configs: Vec<SlotConfig>, now: Instant) -> Vec<SlotId> {
        let mut ids = Vec::with_capacity(configs.len());
        for cfg in configs {
            let id = SlotId(self.slots.len() as u32);
            self.slots.push(Slot {
                cfg,
                state: SlotState::Down,
                jobs: VecDeque::new(),
                since: now,
                idle_since: None,
                tasks_done: 0,
                jobs_done: 0,
                launch_failures: 0,
                last_reason: None,
                retiring: false,
                dismissed: false,
                revoking: None,
                resume_until: None,
                over: false,
                pace: Pace::default(),
            });
            self.down += 1;
            ids.push(id);
        }
        self.balance_launches(now);
        ids
    }

    /// Accepts a job (validated by the caller) or refuses it when no usable
    /// slot could ever run it.
    pub fn submit(&mut self, id: JobId, spec: Arc<JobSpec>, seed: u64, now: Instant) -> Result<(), SubmitError> {
        self.restore(id, spec, seed, History::default(), now)
    }

    /// Accepts a job that already has a history: one a controller accepted
    /// before it restarted, with the attempts it started and the crashes it
    /// suffered then. A job whose crashes reach its `crashes_max` ends
    /// `crashed` at once; otherwise it is queued like a new job, and its next
    /// attempt is numbered after the earlier ones.
    pub fn restore(
        &mut self,
        id: JobId,
        spec: Arc<JobSpec>,
        seed: u64,
        history: History,
        now: Instant,
    ) -> Result<(), SubmitError> {
        if self.jobs.contains_key(&id) {
            return Err(SubmitError::Duplicate(id));
        }
        self.check_satisfiable(&spec.tags)?;
        let key = self.back_key(spec.priority);
        let crashed = history.crashes >= spec.crashes_max;
        if !crashed {
            self.queue.entry(spec.tags.clone()).or_default().insert(key, id);
        }
        self.jobs.insert(
            id,
            JobEntry {
                spec,
                seed,
                state: JobState::Queued(key),
                attempt: history.attempts,
                crashes: history.crashes,
                failures: history.failures,
                cancel_requested: false,
                last_slot: None,
            },
        );
        if crashed {
            let msg =
                format!("the job's workers died under it {} times (before the controller restarted)", history.crashes);
            self.deliver_without_run(id, Status::Crashed, msg);
        }
        self.settle(now);
        Ok(())
    }

    /// The class could not start these slots (the launch call failed).
    pub fn launch_failed(&mut self, slot: SlotId, reason: &str, now: Instant) {
        if self.slots[slot.0 as usize].state == SlotState::Launching {
            self.record_launch_failure(slot, reason.to_owned(), now);
            self.settle(now);
        }
    }

    /// The slot's agent connected and authenticated. Returns false when the
    /// slot was not waiting for a worker (the controller then rejects the
    /// connection).
    pub fn connected(&mut self, slot: SlotId, now: Instant) -> bool {
        let s = &mut self.slots[slot.0 as usize];
        if s.state != SlotState::Launching || s.dismissed {
            return false;
        }
        s.state = SlotState::Up;
        self.launching -= 1;
        s.over = false;
        s.pace = Pace::default();
        s.since = now;
        s.idle_since = Some(now);
        s.tasks_done = 0;
        s.launch_failures = 0;
        s.retiring = false;
        self.index_ready(slot);
        self.settle(now);
        true
    }

    /// The worker finished a job and reported its output. Stale reports (a
    /// job no longer assigned to that slot) are ignored.
    pub fn finished(&mut self, slot: SlotId, job: JobId, output: Output, now: Instant) {
        let Some(pos) = self.slots[slot.0 as usize].jobs.iter().position(|j| *j == job) else {
            return;
        };
        self.unindex_ready(slot);
        let s = &mut self.slots[slot.0 as usize];
        if s.jobs.len() >= 2 {
            self.prefetched -= 1;
        }
        s.jobs.remove(pos);
        s.pace.finished(s.jobs.len(), now);
        if s.revoking == Some(job) {
            s.revoking = None;
        }
        s.tasks_done += 1;
        s.jobs_done += 1;
        if s.jobs.is_empty() {
            s.idle_since = Some(now);
            s.over = false;
        }
        if let Some(max) = s.cfg.limits.tasks_max {
            if s.tasks_done >= max {
                s.retiring = true;
            }
        }
        let entry = self.jobs.get_mut(&job);
        let retry = match entry {
            Some(e) => !e.cancel_requested && output.status == Status::Failed && e.failures < e.spec.retries,
            None => false,
        };
        if retry {
            if let Some(e) = self.jobs.get_mut(&job) {
                e.failures += 1;
            }
            self.requeue_front(job);
        } else if self.jobs.remove(&job).is_some() {
            self.actions.push(Action::Deliver(Box::new(output)));
        }
        self.after_slot_change(slot, now);
        self.settle(now);
    }

    /// The worker gave back (`ok`) or could not give back (it had started
    /// it) a job the scheduler revoked.
    pub fn revoked(&mut self, slot: SlotId, job: JobId, ok: bool, now: Instant) {
        let s = &mut self.slots[slot.0 as usize];
        if s.revoking == Some(job) {
            s.revoking = None;
        }
        if !ok {
            return;
        }
        let Some(pos) = s.jobs.iter().position(|j| *j == job) else {
            return;
        };
        if s.jobs.len() >= 2 {
            self.prefetched -= 1;
        }
        self.unindex_ready(slot);
        self.slots[slot.0 as usize].jobs.remove(pos);
        if self.slots[slot.0 as usize].jobs.is_empty() {
            self.slots[slot.0 as usize].idle_since = Some(now);
        }
        self.unstart(job);
        self.requeue_front(job);
        self.after_slot_change(slot, now);
        self.settle(now);
    }

    /// The platform says the slot's launched worker still waits in its
    /// queue (a class that `queues_launches`): its launch timeout starts
    /// again from `now`, so that a worker is given up only when it runs
    /// but does not connect, however long the queue.
    pub fn still_queued(&mut self, slot: SlotId, now: Instant) {
        let s = &mut self.slots[slot.0 as usize];
        if s.state == SlotState::Launching && !s.dismissed && now > s.since {
            s.since = now;
        }
    }

    /// The slot's worker is gone: its connection dropped, it stopped
    /// answering, or its process exited. While launching, this is a failed
    /// launch; while up, the running job crashed.
    pub fn lost(&mut self, slot: SlotId, reason: &str, now: Instant) {
        let idx = slot.0 as usize;
        match self.slots[idx].state {
            SlotState::Launching => {
                self.record_launch_failure(slot, format!("the worker exited before connecting: {reason}"), now);
            }
            SlotState::Up => {
                self.unindex_ready(slot);
                let jobs: Vec<JobId> = self.slots[idx].jobs.drain(..).collect();
                self.prefetched -= jobs.len().saturating_sub(1);
                self.slots[idx].revoking = None;
                self.slots[idx].last_reason = Some(reason.to_owned());
                self.set_down(slot);
                // Requeue in reverse so that the original order is kept at
                // the front of the queue.
                for (i, job) in jobs.into_iter().enumerate().rev() {
                    if i == 0 {
                        self.crash(job, slot, reason);
                    } else {
                        self.unstart(job);
                        self.requeue_front(job);
                    }
                }
            }
            SlotState::Stopping => {
                if self.slots[idx].last_reason.is_none() {
                    self.slots[idx].last_reason = Some(reason.to_owned());
                }
                self.set_down(slot);
            }
            SlotState::Down | SlotState::Broken | SlotState::Resuming => {}
        }
        self.settle(now);
    }

    /// Time passed: launch timeouts, idle timeouts, wall times.
    pub fn tick(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let slot = SlotId(i as u32);
            let s = &self.slots[i];
            match s.state {
                SlotState::Launching if now >= after(s.since, s.cfg.limits.launch_timeout) => {
                    let reason = format!(
                        "the worker did not connect within {}",
                        humantime::format_duration(s.cfg.limits.launch_timeout)
                    );
                    self.actions.push(Action::Terminate { slot, reason: reason.clone() });
                    self.record_launch_failure(slot, reason, now);
                }
                SlotState::Resuming if s.resume_until.is_none_or(|t| now >= t) => {
                    self.give_up_resume(slot, "its worker did not come back after the controller restarted");
                }
                SlotState::Up => {
                    if let Some(wall) = s.cfg.limits.wall_time {
                        if !s.retiring && now >= after(s.since, wall) {
                            self.unindex_ready(slot);
                            self.slots[i].retiring = true;
                            self.after_slot_change(slot, now);
                        }
                    }
                    let s = &self.slots[i];
                    if let (Some(idle), Some(since)) = (s.cfg.limits.idle_timeout, s.idle_since) {
                        if s.state == SlotState::Up && s.jobs.is_empty() && now >= after(since, idle) {
                            let reason = format!("idle for {}", humantime::format_duration(idle));
                            self.stop(slot, reason);
                        }
                    }
                }
                _ => {}
            }
        }
        self.settle(now);
    }

    /// Cancels a job: a queued one ends at once, a running one is killed by
    /// its worker (which then reports it `cancelled`). Cancelling again a
    /// job whose worker has not ended it yet (a worker stuck, or not
    /// answering) ends it at once, `cancelled`, and stops that worker (its
    /// other jobs go back to the queue): whatever state a job is stuck in, a
    /// second cancel ends it. Returns false when the job is unknown (never
    /// sent, or already delivered).
    pub fn cancel(&mut self, job: JobId, now: Instant) -> bool {
        let Some(e) = self.jobs.get_mut(&job) else {
            return false;
        };
        match e.state {
            JobState::Queued(key) => {
                self.remove_from_queue(job, key);
                self.deliver_without_run(job, Status::Cancelled, "cancelled by the user".to_owned());
            }
            JobState::Assigned(slot) => {
                if e.cancel_requested {
                    let s = &self.slots[slot.0 as usize];
                    if s.state == SlotState::Up && s.jobs.contains(&job) {
                        self.stop(slot, format!("its worker did not end the cancelled job {job}: stopped"));
                    }
                } else {
                    e.cancel_requested = true;
                    self.actions.push(Action::Cancel { slot, job });
                }
            }
        }
        self.settle(now);
        true
    }

    /// Starts down slots ahead of need (pre-warm): at most `count` of those
    /// matching `filter`. Returns how many were launched.
    pub fn launch(&mut self, filter: &SlotFilter, count: usize, now: Instant) -> usize {
        let picked: Vec<SlotId> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SlotState::Down && !s.dismissed && filter.matches(&s.cfg))
            .take(count)
            .map(|(i, _)| SlotId(i as u32))
            .collect();
        for &slot in &picked {
            self.set_launching(slot, now);
        }
        if !picked.is_empty() {
            self.actions.push(Action::Launch(picked.clone()));
        }
        picked.len()
    }

    /// Stops workers: idle ones, or with `all` also busy ones (whose jobs go
    /// back to the queue without counting a crash) and launching ones.
    /// Returns how many were asked to stop.
    pub fn shutdown(&mut self, filter: &SlotFilter, all: bool, now: Instant) -> usize {
        let mut n = 0;
        for i in 0..self.slots.len() {
            let slot = SlotId(i as u32);
            let s = &self.slots[i];
            if s.dismissed || !filter.matches(&s.cfg) {
                continue;
            }
            let take = match s.state {
                SlotState::Up => all || s.jobs.is_empty(),
                SlotState::Launching => all,
                _ => false,
            };
            if take {
                self.stop(slot, "shut down by the user".to_owned());
                n += 1;
            }
        }
        self.settle(now);
        n
    }

    /// Removes slots for good (stopping their workers). Queued jobs that no
    /// remaining slot can run end `cancelled`. Returns how many slots.
    pub fn dismiss(&mut self, filter: &SlotFilter, now: Instant) -> usize {
        let mut n = 0;
        for i in 0..self.slots.len() {
            let slot = SlotId(i as u32);
            if self.slots[i].dismissed || !filter.matches(&self.slots[i].cfg) {
                continue;
            }
            if matches!(self.slots[i].state, SlotState::Up | SlotState::Launching) {
                self.stop(slot, "dismissed by the user".to_owned());
            }
            if self.slots[i].state == SlotState::Resuming {
                self.give_up_resume(slot, "dismissed by the user while its worker was expected back");
            }
            if self.slots[i].state == SlotState::Down {
                self.down -= 1;
            }
            self.slots[i].dismissed = true;
            n += 1;
        }
        self.fail_unsatisfiable(Status::Cancelled, |tags| {
            format!("every recruited worker with tags [{tags}] was dismissed")
        });
        self.settle(now);
        n
    }

    /// Makes broken slots usable again and relaunches slots stuck launching.
    /// Returns how many slots were reset.
    pub fn restart(&mut self, now: Instant) -> usize {
        let mut n = 0;
        for i in 0..self.slots.len() {
            let slot = SlotId(i as u32);
            match self.slots[i].state {
                SlotState::Broken if !self.slots[i].dismissed => {
                    self.slots[i].launch_failures = 0;
                    self.set_down(slot);
                    n += 1;
                }
                SlotState::Launching => {
                    self.actions.push(Action::Terminate { slot, reason: "restarted by the user".to_owned() });
                    self.set_down(slot);
                    n += 1;
                }
                _ => {}
            }
        }
        self.settle(now);
        n
    }

    /// After a controller restart: expects the worker of a down slot back
    /// until `until` (its jobs are added with [`Scheduler::restore_held`]).
    /// Until it comes back ([`Scheduler::resumed`]) or the deadline passes
    /// (its first job then counts a crash, as if its worker was lost), no
    /// queued job is dispatched. Returns false when the slot is not down.
    pub fn await_resume(&mut self, slot: SlotId, until: Instant) -> bool {
        let s = &mut self.slots[slot.0 as usize];
        if s.state != SlotState::Down || s.dismissed {
            return false;
        }
        s.state = SlotState::Resuming;
        s.resume_until = Some(until);
        self.down -= 1;
        self.resuming += 1;
        true
    }

    /// Like [`Scheduler::restore`], for a job that was on `slot`'s worker
    /// when the controller stopped (attempt `history.attempts`): it is held
    /// for that slot, which must be resuming, instead of being queued.
    pub fn restore_held(
        &mut self,
        id: JobId,
        spec: Arc<JobSpec>,
        seed: u64,
        history: History,
        slot: SlotId,
        now: Instant,
    ) -> Result<(), SubmitError> {
        if self.slots[slot.0 as usize].state != SlotState::Resuming {
            return self.restore(id, spec, seed, history, now);
        }
        if self.jobs.contains_key(&id) {
            return Err(SubmitError::Duplicate(id));
        }
        let s = &mut self.slots[slot.0 as usize];
        if !s.jobs.is_empty() {
            self.prefetched += 1;
        }
        if s.jobs.len() > s.cfg.limits.prefetch as usize {
            s.over = true;
        }
        s.jobs.push_back(id);
        self.jobs.insert(
            id,
            JobEntry {
                spec,
                seed,
                state: JobState::Assigned(slot),
                attempt: history.attempts,
                crashes: history.crashes,
                failures: history.failures,
                cancel_requested: false,
                last_slot: Some(slot),
            },
        );
        Ok(())
    }

    /// A worker that outlived the previous controller came back for `slot`
    /// (resuming, or down), holding `jobs` (running, or finished with a
    /// result it sends next), each with its attempt. Jobs held for the slot
    /// that it does not hold go back to the queue (never started: no
    /// attempt counted); queued jobs it holds, whose assignment the
    /// journal had not kept, are taken back from the queue. Returns false
    /// when the slot cannot take a worker now (the controller rejects it).
    pub fn resumed(&mut self, slot: SlotId, jobs: &[(JobId, u32)], now: Instant) -> bool {
        let idx = slot.0 as usize;
        match self.slots[idx].state {
            SlotState::Resuming => self.resuming -= 1,
            SlotState::Down if !self.slots[idx].dismissed => self.down -= 1,
            _ => return false,
        }
        let held: Vec<JobId> = std::mem::take(&mut self.slots[idx].jobs).into();
        self.prefetched -= held.len().saturating_sub(1);
        let s = &mut self.slots[idx];
        s.state = SlotState::Up;
        s.resume_until = None;
        s.over = false;
        s.since = now;
        s.tasks_done = 0;
        s.launch_failures = 0;
        s.retiring = false;
        s.revoking = None;
        let mut keep: VecDeque<JobId> = VecDeque::new();
        for &(job, attempt) in jobs {
            let Some(e) = self.jobs.get(&job) else { continue };
            match e.state {
                JobState::Assigned(x) if x == slot && held.contains(&job) && e.attempt == attempt => {}
                // Its assignment never reached the journal: the attempt is
                // newer than any the journal knows.
                // or the controller gave up on this worker while it still
                // ran the job (its crash is counted; it is not run twice).
                JobState::Queued(key) if attempt > e.attempt || (attempt == e.attempt && e.last_slot == Some(slot)) => {
                    self.remove_from_queue(job, key)
                }
                _ => continue,
            }
            if let Some(e) = self.jobs.get_mut(&job) {
                e.attempt = attempt;
                e.state = JobState::Assigned(slot);
                e.last_slot = Some(slot);
            }
            if !keep.contains(&job) {
                keep.push_back(job);
            }
        }
        for job in held.into_iter().rev() {
            if !keep.contains(&job) {
                self.unstart(job);
                self.requeue_front(job);
            }
        }
        self.prefetched += keep.len().saturating_sub(1);
        let cancels: Vec<JobId> =
            keep.iter().copied().filter(|j| self.jobs.get(j).is_some_and(|e| e.cancel_requested)).collect();
        for job in cancels {
            self.actions.push(Action::Cancel { slot, job });
        }
        let s = &mut self.slots[idx];
        s.over = keep.len() > 1 + s.cfg.limits.prefetch as usize;
        s.idle_since = keep.is_empty().then_some(now);
        s.jobs = keep;
        self.index_ready(slot);
        self.settle(now);
        true
    }

    // ----- internals -----------------------------------------------------

    /// A resuming slot's worker will not come back: as if it was lost
    /// while up (its first job crashed, the others never started).
    fn give_up_resume(&mut self, slot: SlotId, reason: &str) {
        let idx = slot.0 as usize;
        let jobs: Vec<JobId> = self.slots[idx].jobs.drain(..).collect();
        self.prefetched -= jobs.len().saturating_sub(1);
        self.resuming -= 1;
        let s = &mut self.slots[idx];
        s.state = SlotState::Down;
        s.resume_until = None;
        s.over = false;
        s.last_reason = Some(reason.to_owned());
        if !s.dismissed {
            self.down += 1;
        }
        for (i, job) in jobs.into_iter().enumerate().rev() {
            if i == 0 {
                self.crash(job, slot, reason);
            } else {
                self.unstart(job);
                self.requeue_front(job);
            }
        }
    }

    fn back_key(&mut self, priority: i32) -> QueueKey {
        self.seq_back += 1;
        (Reverse(priority), self.seq_back)
    }

    fn front_key(&mut self, priority: i32) -> QueueKey {
        self.seq_front -= 1;
        (Reverse(priority), self.seq_front)
    }

    fn check_satisfiable(&self, tags: &Tags) -> Result<(), SubmitError> {
        let mut broken_reason = None;
        for s in &self.slots {
            if s.dismissed || !s.cfg.tags.satisfies(tags) {
                continue;
            }
            if s.state != SlotState::Broken {
                return Ok(());
            }
            broken_reason = s.last_reason.clone();
        }
        if let Some(reason) = broken_reason {
            return Err(SubmitError::AllBroken { wanted: tags.clone(), reason });
        }
        let known: BTreeSet<String> =
            self.slots.iter().filter(|s| !s.dismissed).map(|s| format!("[{}]", s.cfg.tags)).collect();
        let known = if known.is_empty() {
            "none (no worker is recruited)".to_owned()
        } else {
            known.into_iter().collect::<Vec<_>>().join(", ")
        };
        Err(SubmitError::NoMatchingSlot { wanted: tags.clone(), known })
    }

    fn remove_from_queue(&mut self, job: JobId, key: QueueKey) {
        let Some(e) = self.jobs.get(&job) else { return };
        let tags = &e.spec.tags;
        if let Some(group) = self.queue.get_mut(tags) {
            group.remove(key, job, |j, k| queued_under(&self.jobs, j, k));
            if group.is_empty() {
                self.queue.remove(tags);
            }
        }
    }

    /// Puts a job taken back from a worker at the front of the queue; a job
    /// the user asked to cancel is not run again: it ends `cancelled`.
    fn requeue_front(&mut self, job: JobId) {
        let Some(e) = self.jobs.get(&job) else {
            return;
        };
        if e.cancel_requested {
            self.deliver_without_run(job, Status::Cancelled, "cancelled by the user".to_owned());
            return;
        }
        let priority = e.spec.priority;
        let key = self.front_key(priority);
        if let Some(e) = self.jobs.get_mut(&job) {
            e.state = JobState::Queued(key);
            self.queue.entry(e.spec.tags.clone()).or_default().insert(key, job);
        }
    }

    /// A job taken back from a worker that had not started it: that
    /// assignment does not count as an attempt.
    fn unstart(&mut self, job: JobId) {
        if let Some(e) = self.jobs.get_mut(&job) {
            e.attempt = e.attempt.saturating_sub(1);
        }
    }

    fn crash(&mut self, job: JobId, slot: SlotId, reason: &str) {
        let Some(e) = self.jobs.get_mut(&job) else { return };
        if e.cancel_requested {
            self.deliver_without_run(job, Status::Cancelled, format!("cancelled; its worker was lost: {reason}"));
            return;
        }
        e.crashes += 1;
        if e.crashes >= e.spec.crashes_max {
            let msg = format!(
                "the worker died under the job {} time{} (last: {} on slot {}: {reason})",
                e.crashes,
                if e.crashes == 1 { "" } else { "s" },
                "lost",
                self.slots[slot.0 as usize].cfg.name
            );
            self.deliver_without_run(job, Status::Crashed, msg);
        } else {
            self.requeue_front(job);
        }
    }

    /// Builds and delivers an output for a job that ends without a result
    /// from a worker. The job must not be in the queue or on a slot.
    fn deliver_without_run(&mut self, job: JobId, status: Status, error: String) {
        let Some(e) = self.jobs.remove(&job) else { return };
        let mut out = Output::without_run(job, e.spec.name.clone(), e.spec.tags.clone(), e.seed, status, error);
        out.attempt = e.attempt;
        if let Some(slot) = e.last_slot {
            let cfg = &self.slots[slot.0 as usize].cfg;
            out.slot = Some(cfg.name.clone());
            out.class = Some(cfg.class.clone());
        }
        self.actions.push(Action::Deliver(Box::new(out)));
    }

    fn record_launch_failure(&mut self, slot: SlotId, reason: String, _now: Instant) {
        let s = &mut self.slots[slot.0 as usize];
        s.launch_failures += 1;
        s.last_reason = Some(reason.clone());
        if s.launch_failures >= s.cfg.limits.launch_max {
            s.state = SlotState::Broken;
            self.launching -= 1;
            s.last_reason = Some(format!(
                "{reason} (slot {} failed {} launch{} in a row)",
                s.cfg.name,
                s.launch_failures,
                if s.launch_failures == 1 { "" } else { "es" }
            ));
            self.fail_unsatisfiable(Status::LaunchFailed, |_| String::new());
        } else {
            self.set_down(slot);
        }
    }

    /// Ends every queued job that no usable slot can run.
    fn fail_unsatisfiable(&mut self, status: Status, message: impl Fn(&Tags) -> String) {
        let dead: Vec<Tags> = self
            .queue
            .keys()
            .filter(|tags| !self.slots.iter().any(|s| s.usable() && s.cfg.tags.satisfies(tags)))
            .cloned()
            .collect();
        for tags in dead {
            let reason = if status == Status::LaunchFailed {
                let last = self
                    .slots
                    .iter()
                    .filter(|s| !s.dismissed && s.state == SlotState::Broken && s.cfg.tags.satisfies(&tags))
                    .filter_map(|s| s.last_reason.clone())
                    .next_back()
                    .unwrap_or_else(|| "no worker could be launched".to_owned());
                format!("no worker with tags [{tags}] could be launched: {last}")
            } else {
                message(&tags)
            };
            if let Some(group) = self.queue.remove(&tags) {
                let jobs: Vec<JobId> = group.iter(|j, k| queued_under(&self.jobs, j, k)).map(|(_, j)| j).collect();
                for job in jobs {
                    self.deliver_without_run(job, status, reason.clone());
                }
            }
        }
    }

    fn set_down(&mut self, slot: SlotId) {
        let s = &mut self.slots[slot.0 as usize];
        if s.state != SlotState::Down && !s.dismissed {
            self.down += 1;
        }
        if s.state == SlotState::Launching {
            self.launching -= 1;
        }
        s.state = SlotState::Down;
        s.idle_since = None;
        s.retiring = false;
    }

    fn set_launching(&mut self, slot: SlotId, now: Instant) {
        let s = &mut self.slots[slot.0 as usize];
        if s.state == SlotState::Down && !s.dismissed {
            self.down -= 1;
        }
        if s.state != SlotState::Launching {
            self.launching += 1;
        }
        s.state = SlotState::Launching;
        s.since = now;
    }

    /// Asks a slot's worker to stop; its jobs go back to the queue.
    fn stop(&mut self, slot: SlotId, reason: String) {
        let idx = slot.0 as usize;
        match self.slots[idx].state {
            SlotState::Up => {
                self.unindex_ready(slot);
                let jobs: Vec<JobId> = self.slots[idx].jobs.drain(..).collect();
                self.prefetched -= jobs.len().saturating_sub(1);
                self.slots[idx].revoking = None;
                for (i, job) in jobs.into_iter().enumerate().rev() {
                    if i > 0 {
                        self.unstart(job);
                    }
                    let cancelled = self.jobs.get(&job).is_some_and(|e| e.cancel_requested);
                    if cancelled {
                        self.deliver_without_run(job, Status::Cancelled, "cancelled by the user".to_owned());
                    } else {
                        self.requeue_front(job);
                    }
                }
                self.slots[idx].state = SlotState::Stopping;
                self.slots[idx].last_reason = Some(reason.clone());
                self.actions.push(Action::Terminate { slot, reason });
            }
            SlotState::Launching => {
                self.slots[idx].last_reason = Some(reason.clone());
                self.actions.push(Action::Terminate { slot, reason });
                self.set_down(slot);
            }
            _ => {}
        }
    }

    /// After a slot's jobs changed: stop it if it is retiring and idle,
    /// else re-index it if ready.
    fn after_slot_change(&mut self, slot: SlotId, _now: Instant) {
        let s = &self.slots[slot.0 as usize];
        if s.state != SlotState::Up {
            return;
        }
        if s.retiring && s.jobs.is_empty() {
            let reason = if s.cfg.limits.tasks_max.is_some_and(|m| s.tasks_done >= m) {
                format!("reached its task limit ({})", s.tasks_done)
            } else {
                "reached its wall time".to_owned()
            };
            self.stop(slot, reason);
        } else {
            self.index_ready(slot);
        }
    }

    fn index_ready(&mut self, slot: SlotId) {
        let s = &self.slots[slot.0 as usize];
        if s.is_ready() {
            self.ready.entry(s.cfg.tags.clone()).or_default().insert((s.jobs.len(), slot));
        }
    }

    fn unindex_ready(&mut self, slot: SlotId) {
        let s = &self.slots[slot.0 as usize];
        if let Some(set) = self.ready.get_mut(&s.cfg.tags) {
            set.remove(&(s.jobs.len(), slot));
            if set.is_empty() {
                self.ready.remove(&s.cfg.tags);
            }
        }
    }

    /// Dispatch, then launch what is still needed, then revoke for idle
    /// workers.
    fn settle(&mut self, now: Instant) {
        self.dispatch(now);
        if self.down > 0 && !self.queue.is_empty() {
            self.balance_launches(now);
        }
        if self.prefetched > 0 && !self.ready.is_empty() {
            self.steal();
        }
    }

    /// Assigns queued jobs to ready workers, highest priority first.
    fn dispatch(&mut self, now: Instant) {
        if self.queue.is_empty() || self.ready.is_empty() || self.resuming > 0 {
            return;
        }
        let mut blocked: BTreeSet<Tags> = BTreeSet::new();
        loop {
            // The best queued job among groups not known to be blocked.
            let mut best: Option<(QueueKey, &Tags)> = None;
            for (tags, group) in &self.queue {
                if blocked.contains(tags) {
                    continue;
                }
                if let Some(key) = group.first_key() {
                    if best.is_none_or(|(k, _)| key < k) {
                        best = Some((key, tags));
                    }
                }
            }
            let Some((_, tags)) = best else { break };
            let tags = tags.clone();
            // The best ready worker for it: least loaded, then fewest tags.
            let mut pick: Option<(usize, usize, SlotId)> = None;
            for (rtags, set) in &self.ready {
                if !rtags.satisfies(&tags) {
                    continue;
                }
                if let Some(&(load, slot)) = set.first() {
                    let cand = (load, rtags.len(), slot);
                    if pick.is_none_or(|p| cand < p) {
                        pick = Some(cand);
                    }
                }
            }
            let Some((load, _, slot)) = pick else {
                blocked.insert(tags);
                continue;
            };
            // Only idle workers are ready: sending ahead to a busy worker
            // must not win over a worker that is starting or could start,
            // or the job would wait behind another while a slot sits unused.
            if load > 0 && (self.down > 0 || self.launching > 0) && self.could_launch_for(&tags) {
                blocked.insert(tags);
                continue;
            }
            let Some(group) = self.queue.get_mut(&tags) else { break };
            let Some((_, job)) = group.pop_first(|j, k| queued_under(&self.jobs, j, k)) else { break };
            if group.is_empty() {
                self.queue.remove(&tags);
            }
            self.assign(slot, job, now);
            if self.ready.is_empty() {
                break;
            }
        }
    }

    /// True when a usable slot matching `tags` is down or launching.
    fn could_launch_for(&self, tags: &Tags) -> bool {
        self.slots.iter().any(|s| {
            !s.dismissed && matches!(s.state, SlotState::Down | SlotState::Launching) && s.cfg.tags.satisfies(tags)
        })
    }

    fn assign(&mut self, slot: SlotId, job: JobId, now: Instant) {
        self.unindex_ready(slot);
        let s = &mut self.slots[slot.0 as usize];
        if !s.jobs.is_empty() {
            self.prefetched += 1;
        }
        s.pace.assigned(s.jobs.len(), now);
        s.jobs.push_back(job);
        s.idle_since = None;
        let attempt = match self.jobs.get_mut(&job) {
            Some(e) => {
                e.attempt += 1;
                e.state = JobState::Assigned(slot);
                e.last_slot = Some(slot);
                e.attempt
            }
            None => 0,
        };
        self.actions.push(Action::Assign { slot, job, attempt });
        self.index_ready(slot);
    }

    /// Launches down slots for queued jobs that launching slots will not
    /// absorb.
    fn balance_launches(&mut self, now: Instant) {
        if self.down == 0 || self.queue.is_empty() {
            return;
        }
        let mut launching: Vec<SlotId> = Vec::new();
        let mut down: Vec<SlotId> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.dismissed {
                continue;
            }
            match s.state {
                SlotState::Launching => launching.push(SlotId(i as u32)),
                SlotState::Down => down.push(SlotId(i as u32)),
                _ => {}
            }
        }
        // Best fit: slots with fewer tags are used first.
        down.sort_by_key(|s| (self.slots[s.0 as usize].cfg.tags.len(), *s));
        launching.sort_by_key(|s| (self.slots[s.0 as usize].cfg.tags.len(), *s));
        let mut groups: Vec<(QueueKey, &Tags, usize)> =
            self.queue.iter().filter_map(|(t, g)| g.first_key().map(|k| (k, t, g.len()))).collect();
        groups.sort_by_key(|g| g.0);
        let mut to_launch = Vec::new();
        for (_, tags, mut need) in groups {
            launching.retain(|s| {
                if need > 0 && self.slots[s.0 as usize].cfg.tags.satisfies(tags) {
                    need -= 1;
                    false
                } else {
                    true
                }
            });
            down.retain(|s| {
                if need > 0 && self.slots[s.0 as usize].cfg.tags.satisfies(tags) {
                    need -= 1;
                    to_launch.push(*s);
                    false
                } else {
                    true
                }
            });
            if down.is_empty() {
                break;
            }
        }
        if to_launch.is_empty() {
            return;
        }
        for &slot in &to_launch {
            self.set_launching(slot, now);
        }
        self.actions.push(Action::Launch(to_launch));
    }

    /// For each idle ready worker with nothing queued for it, takes back a
    /// prefetched job that has not started from a busy worker.
    fn steal(&mut self) {
        let idle: Vec<(Tags, SlotId)> = self
            .ready
            .iter()
            .flat_map(|(t, set)| set.iter().take_while(|(load, _)| *load == 0).map(move |(_, s)| (t.clone(), *s)))
            .collect();
        if idle.is_empty() {
            return;
        }
        // What busy workers could give back: their last (prefetched) job,
        // grouped by its tags, the most loaded worker first. Built once, so
        // that many idle workers do not each scan every slot.
        type Offer = (Reverse<usize>, SlotId, JobId);
        let mut offers: BTreeMap<&Tags, BTreeSet<Offer>> = BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.state != SlotState::Up || s.jobs.len() < 2 || s.revoking.is_some() {
                continue;
            }
            let Some(&job) = s.jobs.back() else { continue };
            if let Some(e) = self.jobs.get(&job).filter(|e| !e.cancel_requested) {
                offers.entry(&e.spec.tags).or_default().insert((Reverse(s.jobs.len()), SlotId(i as u32), job));
            }
        }
        let mut revokes = Vec::new();
        for (tags, _) in idle {
            // Revoke the last prefetched job of the most loaded busy worker
            // whose job fits.
            let best = offers
                .iter()
                .filter(|(t, _)| tags.satisfies(t))
                .filter_map(|(t, set)| set.first().map(|o| (*o, *t)))
                .min_by_key(|(o, _)| *o);
            if let Some((offer, t)) = best {
                if let Some(set) = offers.get_mut(t) {
                    set.remove(&offer);
                }
                revokes.push((offer.1, offer.2));
            }
        }
        for (slot, job) in revokes {
            self.slots[slot.0 as usize].revoking = Some(job);
            self.actions.push(Action::Revoke { slot, job });
        }
    }

    /// Checks every internal invariant; panics with a description when one
    /// does not hold. For tests (the simulation calls it after every step).
    #[cfg(test)]
    pub fn sanity_check(&self) {
        let mut seen: std::collections::HashMap<JobId, &str> = std::collections::HashMap::new();
        for (tags, group) in &self.queue {
            assert!(!group.is_empty(), "empty queue group {tags}");
            let first = group.first_key().expect("a non-empty group has a first job");
            let mut live = 0;
            for (key, job) in group.iter(|j, k| queued_under(&self.jobs, j, k)) {
                if live == 0 {
                    assert_eq!(key, first, "the first job of {tags} is not at the front");
                }
                live += 1;
                let e = self.jobs.get(&job).unwrap_or_else(|| panic!("queued job {job} unknown"));
                assert_eq!(&e.spec.tags, tags, "job {job} queued under the wrong tags");
                assert!(seen.insert(job, "queue").is_none(), "job {job} twice");
            }
            assert_eq!(live, group.len(), "group {tags} miscounts its live jobs ({} tombstones)", group.stale());
        }
        let mut prefetched = 0;
        let mut down = 0;
        let launching = self.slots.iter().filter(|s| s.state == SlotState::Launching).count();
        assert_eq!(launching, self.launching, "launching count");
        for (i, s) in self.slots.iter().enumerate() {
            let slot = SlotId(i as u32);
            if !matches!(s.state, SlotState::Up | SlotState::Resuming) {
                assert!(s.jobs.is_empty(), "slot {} is {:?} with jobs", s.cfg.name, s.state);
            }
            if s.state == SlotState::Down && !s.dismissed {
                down += 1;
            }
            prefetched += s.jobs.len().saturating_sub(1);
            assert!(s.over || s.jobs.len() <= max_held(&s.cfg.limits), "slot {} over capacity", s.cfg.name);
            for job in &s.jobs {
                let e = self.jobs.get(job).unwrap_or_else(|| panic!("assigned job {job} unknown"));
                assert!(matches!(e.state, JobState::Assigned(x) if x == slot), "job {job} slot mismatch");
                assert!(s.cfg.tags.satisfies(&e.spec.tags), "job {job} on a slot without its tags");
                assert!(seen.insert(*job, "slot").is_none(), "job {job} twice");
            }
            let indexed = self.ready.get(&s.cfg.tags).is_some_and(|set| set.contains(&(s.jobs.len(), slot)));
            assert_eq!(indexed, s.is_ready(), "ready index wrong for slot {}", s.cfg.name);
        }
        let indexed: usize = self.ready.values().map(BTreeSet::len).sum();
        assert_eq!(indexed, self.slots.iter().filter(|s| s.is_ready()).count(), "stale ready entries");
        assert_eq!(seen.len(), self.jobs.len(), "a job is neither queued nor assigned");
        assert_eq!(prefetched, self.prefetched, "prefetched count");
        assert_eq!(down, self.down, "down count");
        let resuming = self.slots.iter().filter(|s| s.state == SlotState::Resuming).count();
        assert_eq!(resuming, self.resuming, "resuming count");
    }
}
