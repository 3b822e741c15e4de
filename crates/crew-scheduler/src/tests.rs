//! Scheduler tests, driven through a simulated world ([`TestEnv`]).
//!
//! `TestEnv` owns a [`Scheduler`], a fake clock (`base` plus an offset that
//! tests advance) and a model of the world around the scheduler: which slots
//! are launching, up or stopping, the jobs each simulated agent holds in the
//! order it runs them, the messages still on their way to each agent, and
//! every delivered output. It applies every action the scheduler emits,
//! checks each one against the model (tags, capacity, attempt numbers, no
//! work after a cancel, exactly-once delivery, ...) and calls
//! `sanity_check()` after every event. Small tests drive it by hand; the
//! randomized simulation at the end drives it with a seeded PRNG.

#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Action, History, Scheduler, SlotConfig, SlotFilter, SlotId, SlotLimits, SlotState, SubmitError};
use crew_core::job::{JobId, JobSpec};
use crew_core::output::{Output, Status};
use crew_core::tags::Tags;

// ----- helpers -----------------------------------------------------------

fn tags(s: &str) -> Tags {
    s.parse().unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn prefetch(n: u32) -> SlotLimits {
    SlotLimits { prefetch: n, ..SlotLimits::default() }
}

fn spec(t: &str) -> JobSpec {
    JobSpec::shell("true").with_tags(tags(t))
}

fn spec_prio(t: &str, priority: i32) -> JobSpec {
    let mut s = spec(t);
    s.priority = priority;
    s
}

fn all() -> SlotFilter {
    SlotFilter::default()
}

fn by_tags(t: &str) -> SlotFilter {
    SlotFilter { tags: Some(tags(t)), slot: None }
}

/// A tiny deterministic PRNG (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A set of slot indices with O(1) insert, remove and random pick.
#[derive(Default)]
struct Pool {
    items: Vec<u32>,
    pos: Vec<usize>,
}

impl Pool {
    fn set(&mut self, id: u32, present: bool) {
        let i = id as usize;
        if self.pos.len() <= i {
            self.pos.resize(i + 1, usize::MAX);
        }
        match (self.pos[i] != usize::MAX, present) {
            (false, true) => {
                self.pos[i] = self.items.len();
                self.items.push(id);
            }
            (true, false) => {
                let p = self.pos[i];
                self.items.swap_remove(p);
                if let Some(&moved) = self.items.get(p) {
                    self.pos[moved as usize] = p;
                }
                self.pos[i] = usize::MAX;
            }
            _ => {}
        }
    }

    fn pick(&self, rng: &mut Rng) -> Option<SlotId> {
        if self.items.is_empty() { None } else { Some(SlotId(self.items[rng.below(self.items.len() as u64) as usize])) }
    }

    fn all(&self) -> Vec<SlotId> {
        let mut v: Vec<SlotId> = self.items.iter().map(|&i| SlotId(i)).collect();
        v.sort();
        v
    }
}

// ----- the simulated world ------------------------------------------------

/// An action as seen from outside, kept for assertions in the small tests.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Launch(Vec<SlotId>),
    Assign(SlotId, JobId, u32),
    Revoke(SlotId, JobId),
    Cancel(SlotId, JobId),
    Terminate(SlotId, String),
    Deliver(JobId, Status),
}

/// The real state of a slot's worker, as the world knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum World {
    Down,
    Launching,
    Up,
    Stopping,
}

/// A message on its way from the controller to an agent.
#[derive(Debug)]
enum Msg {
    Assign(JobId, u32),
    Revoke(JobId),
    Cancel(JobId),
}

#[derive(Debug)]
struct Agent {
    name: String,
    tags: Tags,
    limits: SlotLimits,
    world: World,
    dismissed: bool,
    /// Jobs the agent holds (with their attempt), in the order it runs them;
    /// the front one is running.
    held: VecDeque<(JobId, u32)>,
    /// Messages not yet received; the flag says whether the environment
    /// delivers it on its own (else a test or the simulation does).
    inbox: VecDeque<(Msg, bool)>,
    up_since: Instant,
    /// Jobs the agent reported since it connected (for `tasks_max`).
    done_since_up: u32,
    /// Increases at every launch (the simulation's connect schedule).
    launch_no: u64,
}

impl Agent {
    fn inbox_assigns(&self) -> usize {
        self.inbox.iter().filter(|(m, _)| matches!(m, Msg::Assign(..))).count()
    }

    /// The jobs the scheduler should believe the slot has, in its order.
    fn sched_view(&self) -> Vec<JobId> {
        let mut v: Vec<JobId> = self.held.iter().map(|(j, _)| *j).collect();
        v.extend(self.inbox.iter().filter_map(|(m, _)| match m {
            Msg::Assign(j, _) => Some(*j),
            _ => None,
        }));
        v
    }
}

#[derive(Debug)]
struct JobInfo {
    spec: Arc<JobSpec>,
    /// The attempt number of the last assignment that still counts.
    attempt: u32,
    crashes: u32,
    failures: u32,
    cancel_requested: bool,
}

#[derive(Debug, Default)]
struct Stats {
    launches: u64,
    assigns: u64,
    revokes: u64,
    revoked_ok: u64,
    revoked_refused: u64,
    cancels: u64,
    terminates: u64,
    lost_busy: u64,
    launch_failures: u64,
    refused: u64,
    delivered: HashMap<&'static str, u64>,
}

struct TestEnv {
    sched: Scheduler,
    base: Instant,
    offset: Duration,
    agents: Vec<Agent>,
    jobs: HashMap<JobId, JobInfo>,
    delivered: HashMap<JobId, Output>,
    next_job: u64,
    /// Actions taken from the scheduler, not yet applied to the world.
    outbox: Vec<Action>,
    /// Per mille of messages that reach their agent on their own.
    auto_per_mille: u64,
    rng: Rng,
    /// Every action, for the small tests (`None` in the big simulation).
    log: Option<Vec<Ev>>,
    /// Run the full checks every this many events / quiet points.
    check_every: u64,
    events: u64,
    quiet: u64,
    launching: Pool,
    up: Pool,
    busy: Pool,
    stopping: Pool,
    with_mail: Pool,
    auto_mail: Vec<SlotId>,
    /// Slots launched since the simulation last looked.
    new_launches: Vec<SlotId>,
    stats: Stats,
}

impl TestEnv {
    fn new() -> Self {
        Self {
            sched: Scheduler::new(),
            base: Instant::now(),
            offset: Duration::ZERO,
            agents: Vec::new(),
            jobs: HashMap::new(),
            delivered: HashMap::new(),
            next_job: 1,
            outbox: Vec::new(),
            auto_per_mille: 1000,
            rng: Rng(1),
            log: Some(Vec::new()),
            check_every: 1,
            events: 0,
            quiet: 0,
            launching: Pool::default(),
            up: Pool::default(),
            busy: Pool::default(),
            stopping: Pool::default(),
            with_mail: Pool::default(),
            auto_mail: Vec::new(),
            new_launches: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn now(&self) -> Instant {
        self.base + self.offset
    }

    fn take_log(&mut self) -> Vec<Ev> {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn agent(&self, slot: SlotId) -> &Agent {
        &self.agents[slot.0 as usize]
    }

    fn held(&self, slot: SlotId) -> Vec<JobId> {
        self.agent(slot).held.iter().map(|(j, _)| *j).collect()
    }

    fn refresh(&mut self, slot: SlotId) {
        let a = &self.agents[slot.0 as usize];
        let (w, busy, mail) = (a.world, !a.held.is_empty(), !a.inbox.is_empty());
        self.launching.set(slot.0, w == World::Launching);
        self.up.set(slot.0, w == World::Up);
        self.busy.set(slot.0, w == World::Up && busy);
        self.stopping.set(slot.0, w == World::Stopping);
        self.with_mail.set(slot.0, mail);
    }

    // ----- plumbing ------------------------------------------------------

    /// Runs one scheduler event, checks the scheduler's invariants and
    /// collects its actions (checking launches against the queue now).
    fn event<R>(&mut self, explicit_launch: bool, f: impl FnOnce(&mut Scheduler, Instant) -> R) -> R {
        let now = self.now();
        let r = f(&mut self.sched, now);
        self.events += 1;
        if self.events % self.check_every == 0 {
            self.sched.sanity_check();
        }
        let actions = self.sched.take_actions();
        if !explicit_launch {
            let queued = self.sched.counts().queued;
            for a in &actions {
                if let Action::Launch(ids) = a {
                    assert!(ids.len() <= queued, "launched {} slots for {queued} queued jobs", ids.len());
                }
            }
        }
        self.outbox.extend(actions);
        r
    }

    /// Applies actions and delivers automatic messages until quiet.
    fn pump(&mut self) {
        loop {
            if !self.outbox.is_empty() {
                for a in std::mem::take(&mut self.outbox) {
                    self.apply(a);
                }
                continue;
            }
            let Some(slot) = self.auto_mail.pop() else {
                break;
            };
            if self.agent(slot).inbox.front().is_some_and(|(_, auto)| *auto) {
                self.deliver_one(slot);
                self.auto_mail.push(slot);
            }
        }
        self.quiet += 1;
        if self.quiet % self.check_every == 0 {
            self.check_model();
        }
    }

    fn log(&mut self, ev: Ev) {
        if let Some(log) = &mut self.log {
            log.push(ev);
        }
    }

    fn send(&mut self, slot: SlotId, msg: Msg) {
        // A message behind one that waits must wait too (order is kept).
        let auto = self.agent(slot).inbox.iter().all(|(_, auto)| *auto) && self.rng.chance(self.auto_per_mille);
        self.agents[slot.0 as usize].inbox.push_back((msg, auto));
        if auto {
            self.auto_mail.push(slot);
        }
        self.refresh(slot);
    }

    /// The scheduler dropped the slot's jobs (worker lost or stopped): the
    /// first one counts as started, the others get their attempt back.
    fn drop_jobs(&mut self, slot: SlotId, crashed: bool) {
        let jobs = self.agent(slot).sched_view();
        for (i, job) in jobs.into_iter().enumerate() {
            let info = self.jobs.get_mut(&job).unwrap();
            if i > 0 {
                info.attempt -= 1;
            } else if crashed && !info.cancel_requested {
                info.crashes += 1;
            }
        }
        let a = &mut self.agents[slot.0 as usize];
        a.held.clear();
        a.inbox.clear();
    }

    fn apply(&mut self, action: Action) {
        let now = self.now();
        match action {
            Action::Launch(ids) => {
                for &slot in &ids {
                    let a = &mut self.agents[slot.0 as usize];
                    assert_eq!(a.world, World::Down, "launch of slot {} that is {:?}", a.name, a.world);
                    assert!(!a.dismissed, "launch of dismissed slot {}", a.name);
                    a.world = World::Launching;
                    a.launch_no += 1;
                    self.stats.launches += 1;
                    self.new_launches.push(slot);
                    self.refresh(slot);
                }
                self.log(Ev::Launch(ids));
            }
            Action::Assign { slot, job, attempt } => {
                let a = &self.agents[slot.0 as usize];
                let info = self.jobs.get_mut(&job).unwrap_or_else(|| panic!("assign of unknown job {job}"));
                assert_eq!(a.world, World::Up, "job {job} assigned to slot {} that is {:?}", a.name, a.world);
                assert!(!a.dismissed, "job {job} assigned to dismissed slot {}", a.name);
                assert!(!self.delivered.contains_key(&job), "job {job} assigned after delivery");
                assert!(
                    a.tags.satisfies(&info.spec.tags),
                    "job {job} [{}] assigned to slot {} [{}]",
                    info.spec.tags,
                    a.name,
                    a.tags
                );
                assert!(!info.cancel_requested, "job {job} assigned again after it was cancelled");
                assert_eq!(attempt, info.attempt + 1, "attempt number of job {job}");
                assert!(info.crashes < info.spec.crashes_max, "job {job} re-run after crashing too often");
                assert!(info.failures <= info.spec.retries, "job {job} re-run beyond its retries");
                info.attempt = attempt;
                let holding = a.held.len() + a.inbox_assigns() + 1;
                assert!(
                    holding <= super::max_held(&a.limits),
                    "slot {} holds {holding} jobs with prefetch {}",
                    a.name,
                    a.limits.prefetch
                );
                if let Some(max) = a.limits.tasks_max {
                    assert!(a.done_since_up as usize + holding <= max as usize, "slot {} over tasks_max", a.name);
                }
                if let Some(wall) = a.limits.wall_time {
                    assert!(now < a.up_since + wall, "slot {} got a job after its wall time", a.name);
                }
                self.stats.assigns += 1;
                self.send(slot, Msg::Assign(job, attempt));
                self.log(Ev::Assign(slot, job, attempt));
            }
            Action::Revoke { slot, job } => {
                let a = self.agent(slot);
                assert_eq!(a.world, World::Up, "revoke from slot {} that is {:?}", a.name, a.world);
                assert!(a.sched_view().iter().skip(1).any(|j| *j == job), "revoke of job {job} not prefetched");
                self.stats.revokes += 1;
                self.send(slot, Msg::Revoke(job));
                self.log(Ev::Revoke(slot, job));
            }
            Action::Cancel { slot, job } => {
                let a = self.agent(slot);
                assert_eq!(a.world, World::Up, "cancel on slot {} that is {:?}", a.name, a.world);
                assert!(a.sched_view().contains(&job), "cancel of job {job} not on slot {}", a.name);
                self.stats.cancels += 1;
                self.send(slot, Msg::Cancel(job));
                self.log(Ev::Cancel(slot, job));
            }
            Action::Terminate { slot, reason } => {
                match self.agent(slot).world {
                    World::Up => {
                        self.drop_jobs(slot, false);
                        self.agents[slot.0 as usize].world = World::Stopping;
                    }
                    // The launch is abandoned; the scheduler already counts
                    // the slot as down (a late exit would be ignored).
                    World::Launching => self.agents[slot.0 as usize].world = World::Down,
                    w => panic!("terminate of slot {} that is {w:?}", self.agent(slot).name),
                }
                self.stats.terminates += 1;
                self.refresh(slot);
                self.log(Ev::Terminate(slot, reason));
            }
            Action::Deliver(out) => {
                let job = out.id;
                let info = self.jobs.get(&job).unwrap_or_else(|| panic!("delivery of unknown job {job}"));
                assert!(!self.delivered.contains_key(&job), "job {job} delivered twice");
                // A cancelled job still prefetched on a worker being stopped
                // (its Terminate comes next) never started.
                let unstarted = out.status == Status::Cancelled
                    && info.cancel_requested
                    && self
                        .agents
                        .iter()
                        .any(|a| a.world == World::Up && a.sched_view().iter().skip(1).any(|j| *j == job));
                let expected = info.attempt - u32::from(unstarted);
                assert_eq!(out.attempt, expected, "attempt of delivered job {job} ({:?})", out.status);
                assert_eq!(out.tags, info.spec.tags);
                match out.status {
                    Status::Crashed => {
                        assert_eq!(info.crashes, info.spec.crashes_max, "crashes of job {job}")
                    }
                    Status::Failed if !info.cancel_requested => {
                        assert_eq!(info.failures, info.spec.retries + 1, "failures of job {job}");
                    }
                    Status::LaunchFailed => {
                        assert!(out.error.as_deref().unwrap_or("").contains("could be launched"), "{:?}", out.error);
                    }
                    _ => {}
                }
                *self.stats.delivered.entry(out.status.as_str()).or_default() += 1;
                self.log(Ev::Deliver(job, out.status));
                self.delivered.insert(job, *out);
            }
        }
    }

    /// The agent receives its next message.
    fn deliver_one(&mut self, slot: SlotId) {
        let Some((msg, _)) = self.agents[slot.0 as usize].inbox.pop_front() else {
            return;
        };
        self.refresh(slot);
        match msg {
            Msg::Assign(job, attempt) => {
                self.agents[slot.0 as usize].held.push_back((job, attempt));
                self.refresh(slot);
            }
            Msg::Revoke(job) => {
                let pos = self.agent(slot).held.iter().position(|(j, _)| *j == job);
                let ok = pos.is_some_and(|p| p > 0);
                if let (true, Some(p)) = (ok, pos) {
                    self.agents[slot.0 as usize].held.remove(p);
                    self.jobs.get_mut(&job).unwrap().attempt -= 1;
                    self.stats.revoked_ok += 1;
                    self.refresh(slot);
                } else {
                    self.stats.revoked_refused += 1;
                }
                self.event(false, |s, now| s.revoked(slot, job, ok, now));
            }
            Msg::Cancel(job) => {
                let pos = self.agent(slot).held.iter().position(|(j, _)| *j == job);
                if let Some(p) = pos {
                    let (_, attempt) = self.agents[slot.0 as usize].held.remove(p).unwrap();
                    self.report(slot, job, attempt, Status::Cancelled);
                }
            }
        }
    }

    /// The agent reports a job's result.
    fn report(&mut self, slot: SlotId, job: JobId, attempt: u32, status: Status) {
        let info = self.jobs.get_mut(&job).unwrap();
        if status == Status::Failed {
            info.failures += 1;
        }
        let mut out =
            Output::without_run(job, info.spec.name.clone(), info.spec.tags.clone(), job.0, status, String::new());
        out.error = (status != Status::Succeeded).then(|| format!("the job ended {status}"));
        out.attempt = attempt;
        let a = &mut self.agents[slot.0 as usize];
        out.slot = Some(a.name.clone());
        a.done_since_up += 1;
        self.refresh(slot);
        self.event(false, |s, now| s.finished(slot, job, out, now));
    }

    /// Checks the world against the scheduler's view of it.
    fn check_model(&mut self) {
        self.sched.sanity_check();
        assert_eq!(self.sched.pending(), self.jobs.len() - self.delivered.len(), "pending jobs");
        let counts = self.sched.counts();
        assert_eq!(counts.queued + counts.assigned, self.sched.pending());
        let mut seen = 0;
        for v in self.sched.slots() {
            seen += 1;
            let a = self.agent(v.id);
            let ok = matches!(
                (a.world, &v.state),
                (World::Down, SlotState::Down | SlotState::Broken)
                    | (World::Launching, SlotState::Launching)
                    | (World::Up, SlotState::Up)
                    | (World::Stopping, SlotState::Stopping)
            );
            assert!(ok, "slot {} is {:?} but the scheduler says {:?}", a.name, a.world, v.state);
            assert_eq!(v.assigned, a.held.len() + a.inbox_assigns(), "jobs of slot {}", a.name);
            for (j, _) in &a.held {
                assert!(!self.delivered.contains_key(j), "slot {} holds delivered job {j}", a.name);
            }
        }
        assert_eq!(seen, self.agents.iter().filter(|a| !a.dismissed).count(), "slots listed");
    }

    // ----- events --------------------------------------------------------

    fn recruit_many(&mut self, cfgs: Vec<SlotConfig>) -> Vec<SlotId> {
        let first = self.agents.len() as u32;
        for cfg in &cfgs {
            self.agents.push(Agent {
                name: cfg.name.clone(),
                tags: cfg.tags.clone(),
                limits: cfg.limits.clone(),
                world: World::Down,
                dismissed: false,
                held: VecDeque::new(),
                inbox: VecDeque::new(),
                up_since: self.now(),
                done_since_up: 0,
                launch_no: 0,
            });
        }
        let n = cfgs.len() as u32;
        let ids = self.event(false, |s, now| s.recruit(cfgs, now));
        assert_eq!(ids, (first..first + n).map(SlotId).collect::<Vec<_>>());
        self.pump();
        ids
    }

    fn recruit(&mut self, name: &str, t: &str, limits: SlotLimits) -> SlotId {
        let cfg = SlotConfig { name: name.to_owned(), class: "test".to_owned(), tags: tags(t), limits };
        self.recruit_many(vec![cfg])[0]
    }

    fn submit(&mut self, spec: JobSpec) -> Result<JobId, SubmitError> {
        let id = JobId(self.next_job);
        self.next_job += 1;
        let spec = Arc::new(spec);
        self.jobs
            .insert(id, JobInfo { spec: spec.clone(), attempt: 0, crashes: 0, failures: 0, cancel_requested: false });
        let r = self.event(false, |s, now| s.submit(id, spec, id.0, now));
        if r.is_err() {
            self.jobs.remove(&id);
            self.stats.refused += 1;
        }
        self.pump();
        r.map(|()| id)
    }

    fn job(&mut self, t: &str) -> JobId {
        self.submit(spec(t)).unwrap()
    }

    fn connect(&mut self, slot: SlotId) {
        assert_eq!(self.agent(slot).world, World::Launching, "connect of slot {}", self.agent(slot).name);
        let now = self.now();
        let a = &mut self.agents[slot.0 as usize];
        a.world = World::Up;
        a.up_since = now;
        a.done_since_up = 0;
        self.refresh(slot);
        assert!(self.event(false, |s, now| s.connected(slot, now)), "connected refused");
        self.pump();
    }

    fn connect_all(&mut self) {
        for slot in self.launching.all() {
            self.connect(slot);
        }
    }

    /// The slot's running job ends with `status`; returns it.
    fn finish(&mut self, slot: SlotId, status: Status) -> JobId {
        let (job, attempt) = self.agents[slot.0 as usize]
            .held
            .pop_front()
            .unwrap_or_else(|| panic!("slot {} runs nothing", self.agent(slot).name));
        self.report(slot, job, attempt, status);
        self.pump();
        job
    }

    /// The slot's worker dies (or, launching, exits before connecting).
    fn lose(&mut self, slot: SlotId) {
        match self.agent(slot).world {
            World::Up => {
                if !self.agent(slot).sched_view().is_empty() {
                    self.stats.lost_busy += 1;
                }
                self.drop_jobs(slot, true);
            }
            World::Launching => self.stats.launch_failures += 1,
            World::Stopping => {}
            World::Down => panic!("lose of a down slot"),
        }
        self.agents[slot.0 as usize].world = World::Down;
        self.refresh(slot);
        self.event(false, |s, now| s.lost(slot, "the connection dropped", now));
        self.pump();
    }

    /// Every stopping worker goes away.
    fn gone_all(&mut self) {
        for slot in self.stopping.all() {
            self.lose(slot);
        }
    }

    fn fail_launch(&mut self, slot: SlotId, reason: &str) {
        assert_eq!(self.agent(slot).world, World::Launching);
        self.agents[slot.0 as usize].world = World::Down;
        self.stats.launch_failures += 1;
        self.refresh(slot);
        self.event(false, |s, now| s.launch_failed(slot, reason, now));
        self.pump();
    }

    /// Delivers every message waiting for the slot's agent.
    fn deliver_mail(&mut self, slot: SlotId) {
        while !self.agent(slot).inbox.is_empty() {
            self.deliver_one(slot);
            self.pump();
        }
    }

    fn advance(&mut self, d: Duration) {
        self.offset += d;
        self.event(false, |s, now| s.tick(now));
        self.pump();
    }

    fn cancel(&mut self, job: JobId) -> bool {
        let r = self.event(false, |s, now| s.cancel(job, now));
        if r {
            if let Some(info) = self.jobs.get_mut(&job) {
                info.cancel_requested = true;
            }
        }
        self.pump();
        r
    }

    fn launch(&mut self, filter: &SlotFilter, count: usize) -> usize {
        let n = self.event(true, |s, now| s.launch(filter, count, now));
        self.pump();
        n
    }

    fn shutdown(&mut self, filter: &SlotFilter, all: bool) -> usize {
        let n = self.event(false, |s, now| s.shutdown(filter, all, now));
        self.pump();
        n
    }

    fn dismiss(&mut self, filter: &SlotFilter) -> usize {
        let n = self.event(false, |s, now| s.dismiss(filter, now));
        let listed: std::collections::HashSet<SlotId> = self.sched.slots().map(|v| v.id).collect();
        for (i, a) in self.agents.iter_mut().enumerate() {
            a.dismissed = !listed.contains(&SlotId(i as u32));
        }
        self.pump();
        n
    }

    fn restart(&mut self) -> usize {
        let n = self.event(false, |s, now| s.restart(now));
        self.pump();
        n
    }

    fn status_of(&self, job: JobId) -> Option<Status> {
        self.delivered.get(&job).map(|o| o.status)
    }

    /// Every accepted job was delivered exactly once, and nothing is left.
    fn assert_all_delivered(&mut self) {
        self.check_model();
        assert_eq!(self.sched.pending(), 0, "jobs left in the scheduler");
        assert_eq!(self.delivered.len(), self.jobs.len(), "delivered vs accepted");
        assert!(self.jobs.keys().all(|j| self.delivered.contains_key(j)));
    }
}

fn launches(log: &[Ev]) -> Vec<SlotId> {
    log.iter()
        .filter_map(|e| match e {
            Ev::Launch(ids) => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn assigns(log: &[Ev]) -> Vec<(SlotId, JobId, u32)> {
    log.iter()
        .filter_map(|e| match e {
            Ev::Assign(s, j, a) => Some((*s, *j, *a)),
            _ => None,
        })
        .collect()
}

fn terminates(log: &[Ev]) -> Vec<(SlotId, String)> {
    log.iter()
        .filter_map(|e| match e {
            Ev::Terminate(s, r) => Some((*s, r.clone())),
            _ => None,
        })
        .collect()
}

// ----- 1. tag matching ---------------------------------------------------

#[test]
fn tag_matching_and_best_fit() {
    let mut env = TestEnv::new();
    let plain = env.recruit("plain", "", prefetch(0));
    let gpu = env.recruit("gpu", "gpu", prefetch(0));
    let gpubig = env.recruit("gpubig", "gpu,big", prefetch(0));

    // A gpu job launches the gpu slot with the fewest tags.
    let g1 = env.job("gpu");
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![gpu])]);
    env.connect(gpu);
    assert_eq!(env.take_log(), vec![Ev::Assign(gpu, g1, 1)]);

    // Pre-warm the rest; an untagged job prefers the untagged idle worker.
    assert_eq!(env.launch(&all(), 10), 2);
    env.connect(gpubig);
    env.connect(plain);
    env.take_log();
    let u1 = env.job("");
    assert_eq!(env.take_log(), vec![Ev::Assign(plain, u1, 1)]);
    // Then the only idle one, even though it has more tags than needed.
    let u2 = env.job("");
    assert_eq!(env.take_log(), vec![Ev::Assign(gpubig, u2, 1)]);

    // A big job waits for the only slot with `big`, not for any other.
    let b1 = env.job("big");
    assert_eq!(env.take_log(), vec![]);
    env.finish(plain, Status::Succeeded);
    env.finish(gpu, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(u1, Status::Succeeded), Ev::Deliver(g1, Status::Succeeded)]);
    env.finish(gpubig, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(u2, Status::Succeeded), Ev::Assign(gpubig, b1, 1)]);
    env.finish(gpubig, Status::Succeeded);
    assert_eq!(env.delivered[&b1].slot.as_deref(), Some("gpubig"));

    // A job whose tags no slot has is refused, naming the known tag sets.
    let err = env.submit(spec("tpu")).unwrap_err();
    assert_eq!(err, SubmitError::NoMatchingSlot { wanted: tags("tpu"), known: "[], [big,gpu], [gpu]".to_owned() });
    let msg = err.to_string();
    assert!(msg.contains("[tpu]") && msg.contains("[big,gpu]") && msg.contains("[gpu]"), "{msg}");
    assert!(matches!(env.submit(spec("gpu,tpu")), Err(SubmitError::NoMatchingSlot { .. })));
    assert!(env.submit(spec("big")).is_ok());
    assert_eq!(assigns(&env.take_log()), vec![(gpubig, JobId(env.next_job - 1), 1)]);
    let pending = JobId(env.next_job - 1);
    let dup = env.event(false, |s, now| s.submit(pending, Arc::new(spec("")), 0, now));
    assert_eq!(dup, Err(SubmitError::Duplicate(pending)));
}

#[test]
fn no_slot_at_all_is_explained() {
    let mut env = TestEnv::new();
    let err = env.submit(spec("")).unwrap_err();
    assert!(err.to_string().contains("no worker is recruited"), "{err}");
}

#[test]
fn untagged_job_launches_untagged_slot_first() {
    let mut env = TestEnv::new();
    let gpu = env.recruit("gpu", "gpu", prefetch(0));
    let plain = env.recruit("plain", "", prefetch(0));
    env.job("");
    assert_eq!(launches(&env.take_log()), vec![plain]);
    env.job("gpu");
    assert_eq!(launches(&env.take_log()), vec![gpu]);
}

// ----- 2. dispatch, launches and queue order -----------------------------

#[test]
fn dispatch_to_idle_before_launch_and_one_launch_per_job() {
    let mut env = TestEnv::new();
    let s: Vec<SlotId> = (0..4).map(|i| env.recruit(&format!("s{i}"), "", prefetch(0))).collect();
    assert_eq!(env.take_log(), vec![], "no launch without jobs");

    let a = env.job("");
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![s[0]])]);
    // Many events later, still one launch for one job.
    for _ in 0..10 {
        env.advance(secs(1));
    }
    env.cancel(JobId(999));
    assert_eq!(env.take_log(), vec![]);
    env.connect(s[0]);
    assert_eq!(env.take_log(), vec![Ev::Assign(s[0], a, 1)]);

    // s0 is busy: the next job launches s1.
    let b = env.job("");
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![s[1]])]);
    // s0 falls idle before s1 connects: b goes there, no new launch.
    env.finish(s[0], Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(a, Status::Succeeded), Ev::Assign(s[0], b, 1)]);
    // s1 is still launching and absorbs the next job.
    let c = env.job("");
    assert_eq!(env.take_log(), vec![]);
    env.connect(s[1]);
    assert_eq!(env.take_log(), vec![Ev::Assign(s[1], c, 1)]);

    // An idle worker takes a job without any launch.
    env.finish(s[1], Status::Succeeded);
    env.take_log();
    let d = env.job("");
    assert_eq!(env.take_log(), vec![Ev::Assign(s[1], d, 1)]);

    // Three more jobs with two down slots: two launches, one queued.
    let more: Vec<JobId> = (0..3).map(|_| env.job("")).collect();
    let log = env.take_log();
    assert_eq!(launches(&log), vec![s[2], s[3]]);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(env.sched.counts().queued, 3);
    env.connect_all();
    assert_eq!(assigns(&env.take_log()), vec![(s[2], more[0], 1), (s[3], more[1], 1)]);
    assert_eq!(env.sched.counts().queued, 1);
}

#[test]
fn queue_is_fifo_within_priority_and_higher_first() {
    let mut env = TestEnv::new();
    let s = env.recruit("only", "", prefetch(0));
    let first = env.job("");
    env.connect(s);
    env.take_log();
    let a = env.submit(spec_prio("", 0)).unwrap();
    let b = env.submit(spec_prio("", 0)).unwrap();
    let c = env.submit(spec_prio("", 5)).unwrap();
    let d = env.submit(spec_prio("", -1)).unwrap();
    let e = env.submit(spec_prio("", 5)).unwrap();
    let f = env.submit(spec_prio("", 0)).unwrap();
    assert_eq!(env.take_log(), vec![]);
    let mut order = vec![env.finish(s, Status::Succeeded)];
    for _ in 0..6 {
        order.push(env.finish(s, Status::Succeeded));
    }
    assert_eq!(order, vec![first, c, e, a, b, f, d]);
    env.assert_all_delivered();
}

#[test]
fn priority_order_holds_across_tag_groups() {
    let mut env = TestEnv::new();
    let s = env.recruit("gpu", "gpu", prefetch(0));
    let first = env.job("gpu");
    env.connect(s);
    let low = env.submit(spec_prio("", 1)).unwrap();
    let high = env.submit(spec_prio("gpu", 3)).unwrap();
    let mid = env.submit(spec_prio("", 2)).unwrap();
    let order: Vec<JobId> = (0..4).map(|_| env.finish(s, Status::Succeeded)).collect();
    assert_eq!(order, vec![first, high, mid, low]);
}

// ----- 3. prefetch and revocation ----------------------------------------

#[test]
fn prefetch_bounds_jobs_held() {
    for pf in [1u32, 2] {
        let mut env = TestEnv::new();
        let s = env.recruit("w", "", prefetch(pf));
        let jobs: Vec<JobId> = (0..5).map(|_| env.job("")).collect();
        env.connect(s);
        let held = 1 + pf as usize;
        assert_eq!(env.held(s), jobs[..held].to_vec());
        assert_eq!(env.sched.counts().queued, 5 - held);
        assert_eq!(env.sched.counts().assigned, held);
        // Each finish makes room for exactly one more.
        env.finish(s, Status::Succeeded);
        assert_eq!(env.held(s), jobs[1..held + 1].to_vec());
        while env.sched.pending() > 0 {
            env.finish(s, Status::Succeeded);
        }
        env.assert_all_delivered();
    }
}

#[test]
fn short_jobs_widen_the_window_and_a_long_one_narrows_it() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(1));
    let jobs: Vec<JobId> = (0..700).map(|_| env.job("")).collect();
    env.connect(s);
    assert_eq!(env.held(s).len(), 2, "unmeasured: 1 + prefetch");
    // Jobs of 10 µs: once a period is measured, the worker is sent about
    // 2 ms of them ahead.
    for _ in 0..300 {
        env.offset += Duration::from_micros(10);
        env.finish(s, Status::Succeeded);
    }
    let held = env.held(s).len();
    assert!(held > 100 && held <= 1 + super::AHEAD_MAX as usize, "a worker of 10 µs jobs holds {held}");
    // One job of a second: the window is back to 1 + prefetch at once (the
    // jobs already sent stay; no more follow until it drains).
    env.offset += Duration::from_secs(1);
    env.finish(s, Status::Succeeded);
    let before = env.held(s).len();
    assert_eq!(before, held - 1, "no job sent after a slow one while over the window");
    while env.held(s).len() > 2 {
        env.offset += Duration::from_millis(500);
        env.finish(s, Status::Succeeded);
    }
    env.offset += Duration::from_millis(500);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.held(s).len(), 2, "slow jobs: 1 + prefetch again");
    assert!(env.sched.pending() > 0 && jobs.len() == 700);
}

#[test]
fn prefetch_zero_stays_one_job_at_a_time_however_short_the_jobs() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    for _ in 0..500 {
        env.job("");
    }
    env.connect(s);
    for _ in 0..400 {
        env.offset += Duration::from_micros(10);
        env.finish(s, Status::Succeeded);
        assert_eq!(env.held(s).len(), 1);
    }
}

#[test]
fn idle_worker_revokes_prefetched_job() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "", prefetch(1));
    let b = env.recruit("b", "", prefetch(1));
    assert_eq!(env.launch(&all(), 2), 2);
    env.connect(a);
    env.connect(b);
    let j1 = env.job("");
    let j2 = env.job("");
    // Both workers busy and no slot left to launch: j3 is sent ahead.
    let j3 = env.job("");
    assert_eq!(env.held(a), vec![j1, j3]);
    assert_eq!(env.held(b), vec![j2]);
    env.take_log();
    // b falls idle with nothing queued for it: it takes j3 back from a.
    env.finish(b, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(j2, Status::Succeeded), Ev::Revoke(a, j3), Ev::Assign(b, j3, 1)]);
    assert_eq!(env.held(a), vec![j1]);
    assert_eq!(env.held(b), vec![j3]);
    env.finish(a, Status::Succeeded);
    env.finish(b, Status::Succeeded);
    env.assert_all_delivered();
    assert_eq!(env.delivered[&j3].attempt, 1, "a revoked job never ran: it keeps attempt 1");
    assert_eq!(env.delivered[&j3].slot.as_deref(), Some("b"));
}

#[test]
fn prefetch_waits_for_a_slot_that_can_launch() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "", prefetch(1));
    let b = env.recruit("b", "", prefetch(1));
    env.launch(&SlotFilter { slot: Some("a".into()), ..SlotFilter::default() }, 1);
    env.connect(a);
    let j1 = env.job("");
    // b is down: j2 launches it instead of waiting behind j1 on a.
    let j2 = env.job("");
    assert_eq!(env.held(a), vec![j1]);
    assert_eq!(env.sched.slot_state(b), SlotState::Launching);
    env.connect(b);
    assert_eq!(env.held(b), vec![j2]);
    env.finish(a, Status::Succeeded);
    env.finish(b, Status::Succeeded);
    env.assert_all_delivered();
}

#[test]
fn only_fitting_prefetched_jobs_are_revoked() {
    let mut env = TestEnv::new();
    let g = env.recruit("g", "gpu", prefetch(1));
    let p = env.recruit("p", "", prefetch(1));
    env.launch(&all(), 2);
    env.connect(g);
    let j1 = env.job("gpu");
    let j2 = env.job("gpu");
    assert_eq!(env.held(g), vec![j1, j2]);
    env.take_log();
    env.connect(p);
    assert_eq!(env.take_log(), vec![], "the plain worker cannot run gpu jobs");
}

#[test]
fn refused_revoke_is_harmless() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "", prefetch(1));
    let b = env.recruit("b", "", prefetch(1));
    env.launch(&all(), 2);
    env.connect(a);
    env.connect(b);
    let j1 = env.job("");
    let j2 = env.job("");
    let j3 = env.job("");
    assert_eq!(env.held(a), vec![j1, j3]);
    assert_eq!(env.held(b), vec![j2]);
    env.take_log();
    // The revoke reaches a only after j1 ended and j3 started.
    env.auto_per_mille = 0;
    env.finish(b, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(j2, Status::Succeeded), Ev::Revoke(a, j3)]);
    env.finish(a, Status::Succeeded);
    env.deliver_mail(a);
    assert_eq!(env.stats.revoked_refused, 1);
    assert_eq!(env.take_log(), vec![Ev::Deliver(j1, Status::Succeeded)]);
    assert_eq!(env.held(a), vec![j3]);
    assert_eq!(env.held(b), vec![]);
    env.auto_per_mille = 1000;
    env.finish(a, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(j3, Status::Succeeded)]);
    // A stale reply later changes nothing.
    env.event(false, |s, now| s.revoked(a, j3, true, now));
    env.event(false, |s, now| s.revoked(a, j3, false, now));
    env.pump();
    assert_eq!(env.take_log(), vec![]);
    env.assert_all_delivered();
}

#[test]
fn one_revoke_at_a_time_per_busy_worker() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "", prefetch(2));
    let b = env.recruit("b", "", prefetch(0));
    let c = env.recruit("c", "", prefetch(0));
    env.launch(&all(), 3);
    env.connect(a);
    env.connect(b);
    env.connect(c);
    let jobs: Vec<JobId> = (0..5).map(|_| env.job("")).collect();
    assert_eq!(env.held(a), vec![jobs[0], jobs[3], jobs[4]]);
    assert_eq!(env.held(b), vec![jobs[1]]);
    assert_eq!(env.held(c), vec![jobs[2]]);
    env.auto_per_mille = 0;
    env.take_log();
    env.finish(b, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(jobs[1], Status::Succeeded), Ev::Revoke(a, jobs[4])]);
    // While that revoke is pending, c falls idle: a has one pending already.
    env.finish(c, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(jobs[2], Status::Succeeded)]);
    // a gives jobs[4] back (it goes to b), then the next revoke is for c.
    env.deliver_mail(a);
    assert_eq!(env.take_log(), vec![Ev::Assign(b, jobs[4], 1), Ev::Revoke(a, jobs[3]), Ev::Assign(c, jobs[3], 1)]);
    env.deliver_mail(b);
    env.deliver_mail(c);
    assert_eq!(env.take_log(), vec![]);
    for s in [a, b, c] {
        env.finish(s, Status::Succeeded);
    }
    env.assert_all_delivered();
}

// ----- 4. lost workers and crashes ----------------------------------------

#[test]
fn lost_worker_job_is_rerun() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    let j = env.job("");
    env.connect(s);
    assert_eq!(assigns(&env.take_log()), vec![(s, j, 1)]);
    env.lose(s);
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![s])], "requeued and relaunched");
    assert_eq!(env.sched.counts().queued, 1);
    env.connect(s);
    assert_eq!(assigns(&env.take_log()), vec![(s, j, 2)]);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(j), Some(Status::Succeeded));
    assert_eq!(env.delivered[&j].attempt, 2);
    env.assert_all_delivered();
}

#[test]
fn job_crashing_every_time_ends_crashed() {
    for crashes_max in [1u32, 3] {
        let mut env = TestEnv::new();
        let s = env.recruit("w", "", prefetch(0));
        let mut sp = spec("");
        sp.crashes_max = crashes_max;
        let j = env.submit(sp).unwrap();
        for attempt in 1..=crashes_max {
            env.connect(s);
            assert_eq!(assigns(&env.take_log()), vec![(s, j, attempt)]);
            env.lose(s);
        }
        let log = env.take_log();
        assert_eq!(log, vec![Ev::Deliver(j, Status::Crashed)], "no relaunch after the last crash");
        let out = &env.delivered[&j];
        assert_eq!(out.attempt, crashes_max);
        assert_eq!(out.slot.as_deref(), Some("w"));
        let err = out.error.as_deref().unwrap();
        assert!(err.contains(&format!("{crashes_max} time")) && err.contains("connection dropped"), "{err}");
        env.assert_all_delivered();
    }
}

#[test]
fn prefetched_jobs_of_lost_worker_do_not_count_a_crash() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(2));
    let mut sp = spec("");
    sp.crashes_max = 1;
    let jobs: Vec<JobId> = (0..3).map(|_| env.submit(sp.clone()).unwrap()).collect();
    env.connect(s);
    assert_eq!(env.held(s), jobs);
    env.take_log();
    env.lose(s);
    assert_eq!(env.take_log(), vec![Ev::Deliver(jobs[0], Status::Crashed), Ev::Launch(vec![s])]);
    env.connect(s);
    // The others kept their place and order, and never started: attempt 1.
    assert_eq!(assigns(&env.take_log()), vec![(s, jobs[1], 1), (s, jobs[2], 1)]);
    env.finish(s, Status::Succeeded);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(jobs[1]), Some(Status::Succeeded));
    assert_eq!(env.status_of(jobs[2]), Some(Status::Succeeded));
    env.assert_all_delivered();
}

#[test]
fn lost_jobs_go_back_to_the_front_of_the_queue() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(1));
    let jobs: Vec<JobId> = (0..4).map(|_| env.job("")).collect();
    env.connect(s);
    assert_eq!(env.held(s), jobs[..2].to_vec());
    env.lose(s);
    env.connect(s);
    assert_eq!(env.held(s), jobs[..2].to_vec());
    let order: Vec<JobId> = (0..4).map(|_| env.finish(s, Status::Succeeded)).collect();
    assert_eq!(order, jobs);
}

// ----- 5. retries ----------------------------------------------------------

#[test]
fn failed_job_is_retried_then_delivered_failed() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    let mut sp = spec("");
    sp.retries = 2;
    let j = env.submit(sp.clone()).unwrap();
    env.connect(s);
    for _ in 0..3 {
        env.finish(s, Status::Failed);
    }
    let log = env.take_log();
    assert_eq!(assigns(&log), vec![(s, j, 1), (s, j, 2), (s, j, 3)]);
    assert_eq!(log.last(), Some(&Ev::Deliver(j, Status::Failed)));
    assert_eq!(env.delivered[&j].attempt, 3);
    assert_eq!(env.sched.counts().assigned, 0, "no fourth attempt");

    // A retried job that then succeeds is delivered once, succeeded.
    let k = env.submit(sp).unwrap();
    env.finish(s, Status::Failed);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(k), Some(Status::Succeeded));
    assert_eq!(env.delivered[&k].attempt, 2);
    // Timeouts and plain failures without retries are not retried.
    let t = env.job("");
    env.finish(s, Status::TimedOut);
    assert_eq!(env.status_of(t), Some(Status::TimedOut));
    let f = env.job("");
    env.finish(s, Status::Failed);
    assert_eq!(env.status_of(f), Some(Status::Failed));
    env.assert_all_delivered();
}

// ----- 6. launch timeout and relaunch budget -------------------------------

#[test]
fn launch_timeout_relaunch_budget_and_restart() {
    let mut env = TestEnv::new();
    let g = env.recruit("g", "gpu", SlotLimits { launch_max: 2, ..prefetch(0) });
    let p = env.recruit("p", "", SlotLimits { launch_timeout: secs(3600), ..prefetch(0) });
    let gj = env.job("gpu");
    let uj = env.job("");
    assert_eq!(launches(&env.take_log()), vec![g, p]);
    assert_eq!(env.sched.next_deadline(), Some(env.now() + secs(60)));

    env.advance(secs(59));
    assert_eq!(env.take_log(), vec![]);
    env.advance(secs(1));
    let reason = "the worker did not connect within 1m".to_owned();
    assert_eq!(env.take_log(), vec![Ev::Terminate(g, reason.clone()), Ev::Launch(vec![g])]);
    assert_eq!(env.sched.slots().find(|v| v.id == g).unwrap().launch_failures, 1);

    env.advance(secs(60));
    let log = env.take_log();
    assert_eq!(log[0], Ev::Terminate(g, reason.clone()));
    assert_eq!(log[1], Ev::Deliver(gj, Status::LaunchFailed));
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(env.sched.slot_state(g), SlotState::Broken);
    let err = env.delivered[&gj].error.clone().unwrap();
    assert!(err.contains("[gpu]") && err.contains(&reason) && err.contains("2 launches in a row"), "{err}");
    // The untagged job could still run on p: it is not failed.
    assert_eq!(env.status_of(uj), None);
    env.connect(p);
    assert_eq!(assigns(&env.take_log()), vec![(p, uj, 1)]);
    env.finish(p, Status::Succeeded);

    // Only broken slots can run gpu jobs now.
    match env.submit(spec("gpu")) {
        Err(SubmitError::AllBroken { wanted, reason: r }) => {
            assert_eq!(wanted, tags("gpu"));
            assert!(r.contains(&reason), "{r}");
        }
        other => panic!("expected AllBroken, got {other:?}"),
    }
    // Untagged jobs are accepted: p can run them.
    let u2 = env.job("");
    assert_eq!(assigns(&env.take_log()), vec![(p, u2, 1)]);

    assert_eq!(env.restart(), 1);
    assert_eq!(env.sched.slot_state(g), SlotState::Down);
    let gj2 = env.job("gpu");
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![g])]);
    env.connect(g);
    env.finish(g, Status::Succeeded);
    env.finish(p, Status::Succeeded);
    assert_eq!(env.status_of(gj2), Some(Status::Succeeded));
    env.assert_all_delivered();
}

/// A worker its platform keeps in a queue (`still_queued`) is not given
/// up at the launch timeout: the timeout counts from the last word that it
/// was still queued.
#[test]
fn a_queued_launch_times_out_only_after_it_left_the_queue() {
    let mut env = TestEnv::new();
    let q = env.recruit("q", "", SlotLimits { launch_max: 1, ..prefetch(0) });
    let j = env.job("");
    assert_eq!(launches(&env.take_log()), vec![q]);
    for _ in 0..10 {
        env.advance(secs(50));
        let now = env.now();
        env.sched.still_queued(q, now);
        env.sched.sanity_check();
    }
    assert_eq!(env.take_log(), vec![], "500 s in the queue is no failed launch");
    assert_eq!(env.sched.next_deadline(), Some(env.now() + secs(60)));
    env.advance(secs(59));
    assert_eq!(env.take_log(), vec![]);
    env.advance(secs(1));
    let log = env.take_log();
    assert_eq!(log[0], Ev::Terminate(q, "the worker did not connect within 1m".to_owned()), "{log:?}");
    assert_eq!(env.status_of(j), Some(Status::LaunchFailed));
    env.assert_all_delivered();
}

#[test]
fn failed_launches_break_the_slot() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "big", prefetch(0));
    let b = env.recruit("b", "big", prefetch(0));
    let j = env.job("big");
    assert_eq!(launches(&env.take_log()), vec![a]);
    env.fail_launch(a, "quota exceeded");
    // The next launch may pick a again (a is still usable).
    assert_eq!(launches(&env.take_log()), vec![a]);
    env.lose(a);
    assert_eq!(launches(&env.take_log()), vec![a]);
    env.fail_launch(a, "quota exceeded");
    // a is broken (3 failures), b takes over; the job is not failed.
    assert_eq!(env.sched.slot_state(a), SlotState::Broken);
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![b])]);
    for _ in 0..2 {
        env.fail_launch(b, "no capacity");
        assert_eq!(env.take_log(), vec![Ev::Launch(vec![b])]);
    }
    env.fail_launch(b, "no capacity");
    assert_eq!(env.sched.slot_state(b), SlotState::Broken);
    let log = env.take_log();
    assert_eq!(log, vec![Ev::Deliver(j, Status::LaunchFailed)]);
    let err = env.delivered[&j].error.clone().unwrap();
    assert!(err.contains("no capacity") && err.contains("slot b failed 3 launches"), "{err}");
    assert!(env.sched.slots().all(|v| v.last_reason.is_some()));
    env.assert_all_delivered();
}

#[test]
fn connecting_resets_the_failure_count() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    env.job("");
    for _ in 0..2 {
        env.fail_launch(s, "flaky");
    }
    env.connect(s);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.sched.slots().next().unwrap().launch_failures, 0);
    env.job("");
    env.lose(s);
    for _ in 0..2 {
        env.fail_launch(s, "flaky");
    }
    assert_eq!(env.sched.slot_state(s), SlotState::Launching, "2 failures after a success do not break it");
}

// ----- 7. idle timeout, tasks_max, wall time --------------------------------

#[test]
fn idle_timeout_stops_worker_and_slot_relaunches_later() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", SlotLimits { idle_timeout: Some(secs(30)), ..prefetch(0) });
    let j = env.job("");
    env.connect(s);
    env.advance(secs(100));
    assert_eq!(terminates(&env.take_log()), vec![], "a busy worker is not idle");
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(j), Some(Status::Succeeded));
    assert_eq!(env.sched.next_deadline(), Some(env.now() + secs(30)));
    env.take_log();
    env.advance(secs(29));
    assert_eq!(env.take_log(), vec![]);
    env.advance(secs(1));
    assert_eq!(env.take_log(), vec![Ev::Terminate(s, "idle for 30s".to_owned())]);
    assert_eq!(env.sched.slot_state(s), SlotState::Stopping);
    env.gone_all();
    assert_eq!(env.sched.slot_state(s), SlotState::Down);
    assert_eq!(env.take_log(), vec![]);
    assert_eq!(env.sched.next_deadline(), None);

    let k = env.job("");
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![s])]);
    env.connect(s);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(k), Some(Status::Succeeded));
    env.assert_all_delivered();
}

#[test]
fn job_arriving_while_worker_stops_relaunches_it() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", SlotLimits { idle_timeout: Some(secs(10)), ..prefetch(0) });
    env.launch(&all(), 1);
    env.connect(s);
    env.advance(secs(10));
    env.take_log();
    let j = env.job("");
    assert_eq!(env.take_log(), vec![], "the slot is stopping, not down");
    env.gone_all();
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![s])]);
    env.connect(s);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(j), Some(Status::Succeeded));
}

#[test]
fn tasks_max_stops_worker_after_n_jobs() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", SlotLimits { tasks_max: Some(2), ..prefetch(1) });
    let jobs: Vec<JobId> = (0..3).map(|_| env.job("")).collect();
    env.connect(s);
    assert_eq!(env.held(s), jobs[..2].to_vec());
    env.finish(s, Status::Succeeded);
    assert_eq!(env.held(s), vec![jobs[1]], "no third job for a worker with tasks_max 2");
    env.take_log();
    env.finish(s, Status::Succeeded);
    assert_eq!(
        env.take_log(),
        vec![Ev::Deliver(jobs[1], Status::Succeeded), Ev::Terminate(s, "reached its task limit (2)".to_owned())]
    );
    env.gone_all();
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![s])]);
    env.connect(s);
    assert_eq!(env.held(s), vec![jobs[2]]);
    env.finish(s, Status::Succeeded);
    env.assert_all_delivered();
}

#[test]
fn wall_time_no_new_jobs_then_stop_when_idle() {
    let mut env = TestEnv::new();
    let lim = SlotLimits { wall_time: Some(secs(100)), ..prefetch(0) };
    let busy = env.recruit("busy", "", lim.clone());
    let idle = env.recruit("idle", "", lim);
    env.launch(&all(), 2);
    env.connect(busy);
    env.connect(idle);
    let j1 = env.job("");
    assert_eq!(assigns(&env.take_log()), vec![(busy, j1, 1)]);
    assert_eq!(env.sched.next_deadline(), Some(env.now() + secs(100)));
    env.advance(secs(99));
    assert_eq!(env.take_log(), vec![]);
    env.advance(secs(1));
    // The idle one stops at once; the busy one finishes its job first.
    assert_eq!(env.take_log(), vec![Ev::Terminate(idle, "reached its wall time".to_owned())]);
    let j2 = env.job("");
    assert_eq!(env.take_log(), vec![], "no new job after the wall time");
    env.finish(busy, Status::Succeeded);
    assert_eq!(
        env.take_log(),
        vec![Ev::Deliver(j1, Status::Succeeded), Ev::Terminate(busy, "reached its wall time".to_owned())]
    );
    env.gone_all();
    let log = env.take_log();
    assert_eq!(launches(&log), vec![busy], "one launch for the one queued job");
    env.connect(busy);
    assert_eq!(assigns(&env.take_log()), vec![(busy, j2, 1)]);
    env.finish(busy, Status::Succeeded);
    env.assert_all_delivered();
}

// ----- 8. cancel -------------------------------------------------------------

#[test]
fn cancel_queued_and_running_jobs() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    let running = env.job("");
    let queued = env.job("");
    env.connect(s);
    env.take_log();

    assert!(env.cancel(queued));
    assert_eq!(env.take_log(), vec![Ev::Deliver(queued, Status::Cancelled)]);
    assert_eq!(env.delivered[&queued].attempt, 0);
    assert!(!env.cancel(queued), "already delivered");
    assert!(!env.cancel(JobId(12345)), "unknown");

    // A running job: the worker is asked, and its answer is delivered once.
    env.auto_per_mille = 0;
    assert!(env.cancel(running));
    assert_eq!(env.take_log(), vec![Ev::Cancel(s, running)]);
    env.deliver_mail(s);
    assert_eq!(env.take_log(), vec![Ev::Deliver(running, Status::Cancelled)]);
    assert_eq!(env.delivered[&running].attempt, 1);
    assert!(!env.cancel(running));
    env.assert_all_delivered();
}

/// A worker that does not end a cancelled job (stuck, or not answering):
/// the second cancel ends the job at once and stops that worker; the
/// worker's late answer changes nothing.
#[test]
fn a_second_cancel_ends_a_job_its_worker_does_not_end() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    let stuck = env.job("");
    env.connect(s);
    env.auto_per_mille = 0;
    env.deliver_mail(s);
    assert_eq!(env.held(s), vec![stuck]);
    env.take_log();
    assert!(env.cancel(stuck));
    assert_eq!(env.take_log(), vec![Ev::Cancel(s, stuck)]);
    assert_eq!(env.status_of(stuck), None, "asked, not ended yet");
    assert!(env.cancel(stuck), "still pending");
    let log = env.take_log();
    assert!(log.contains(&Ev::Deliver(stuck, Status::Cancelled)), "{log:?}");
    assert!(log.iter().any(|e| matches!(e, Ev::Terminate(slot, _) if *slot == s)), "{log:?}");
    assert_eq!(env.status_of(stuck), Some(Status::Cancelled));
    assert!(!env.cancel(stuck), "already delivered");
    env.gone_all();
    assert_eq!(env.status_of(stuck), Some(Status::Cancelled), "delivered once");
    env.assert_all_delivered();
}

#[test]
fn cancel_races_with_the_result() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    let j = env.job("");
    env.connect(s);
    env.auto_per_mille = 0;
    env.deliver_mail(s);
    assert!(env.cancel(j));
    // The job fails before the cancel arrives: no retry, delivered once.
    env.finish(s, Status::Failed);
    env.deliver_mail(s);
    assert_eq!(env.status_of(j), Some(Status::Failed));
    env.assert_all_delivered();
}

#[test]
fn cancelled_prefetched_job_of_lost_worker_is_not_rerun() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(1));
    let j1 = env.job("");
    let j2 = env.job("");
    env.connect(s);
    env.auto_per_mille = 0;
    env.deliver_mail(s);
    assert!(env.cancel(j2));
    // The worker dies before it reads the cancel.
    env.lose(s);
    assert_eq!(env.status_of(j2), Some(Status::Cancelled));
    env.auto_per_mille = 1000;
    env.connect(s);
    env.finish(s, Status::Succeeded);
    assert_eq!(env.status_of(j1), Some(Status::Succeeded));
    env.assert_all_delivered();
}

#[test]
fn cancel_after_revoke_is_not_lost() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "", prefetch(1));
    let b = env.recruit("b", "", prefetch(0));
    env.launch(&all(), 2);
    env.connect(a);
    env.connect(b);
    let j1 = env.job("");
    let j2 = env.job("");
    let j3 = env.job("");
    assert_eq!(env.held(a), vec![j1, j3]);
    assert_eq!(env.held(b), vec![j2]);
    env.take_log();
    env.auto_per_mille = 0;
    env.finish(b, Status::Succeeded);
    assert_eq!(env.take_log(), vec![Ev::Deliver(j2, Status::Succeeded), Ev::Revoke(a, j3)]);
    // The user cancels j3 while the revoke is on its way; a gives j3 back
    // and then finds nothing to cancel.
    assert!(env.cancel(j3));
    env.deliver_mail(a);
    assert_eq!(env.status_of(j3), Some(Status::Cancelled));
    env.deliver_mail(b);
    env.auto_per_mille = 1000;
    env.finish(a, Status::Succeeded);
    env.assert_all_delivered();
}

#[test]
fn cancel_of_running_job_on_stopped_worker() {
    let mut env = TestEnv::new();
    let s = env.recruit("w", "", prefetch(0));
    let j = env.job("");
    env.connect(s);
    env.auto_per_mille = 0;
    env.deliver_mail(s);
    assert!(env.cancel(j));
    env.take_log();
    assert_eq!(env.shutdown(&all(), true), 1);
    assert_eq!(env.status_of(j), Some(Status::Cancelled));
    env.gone_all();
    assert_eq!(launches(&env.take_log()), vec![], "nothing to run");
    env.assert_all_delivered();
}

// ----- 9. shutdown and dismiss ----------------------------------------------

#[test]
fn shutdown_stops_idle_workers_unless_all() {
    let mut env = TestEnv::new();
    let busy = env.recruit("busy", "", prefetch(0));
    let idle = env.recruit("idle", "", prefetch(0));
    env.launch(&all(), 2);
    env.connect(busy);
    env.connect(idle);
    let mut sp = spec("");
    sp.crashes_max = 1;
    let j = env.submit(sp).unwrap();
    assert_eq!(env.held(busy), vec![j]);
    env.take_log();

    assert_eq!(env.shutdown(&all(), false), 1);
    assert_eq!(env.take_log(), vec![Ev::Terminate(idle, "shut down by the user".to_owned())]);
    assert_eq!(env.held(busy), vec![j]);

    assert_eq!(env.shutdown(&all(), true), 1);
    assert_eq!(env.take_log(), vec![Ev::Terminate(busy, "shut down by the user".to_owned())]);
    assert_eq!(env.sched.counts().queued, 1);
    env.gone_all();
    assert_eq!(env.take_log(), vec![Ev::Launch(vec![busy])], "one launch for the requeued job");
    env.connect(busy);
    // No crash counted (crashes_max is 1): it runs again, as attempt 2.
    assert_eq!(env.held(busy), vec![j]);
    env.finish(busy, Status::Succeeded);
    assert_eq!(env.status_of(j), Some(Status::Succeeded));
    assert_eq!(env.delivered[&j].attempt, 2);
    env.assert_all_delivered();
}

#[test]
fn shutdown_filter_and_launching_slots() {
    let mut env = TestEnv::new();
    let g = env.recruit("g", "gpu", prefetch(0));
    let p = env.recruit("p", "", prefetch(0));
    env.launch(&all(), 2);
    env.connect(p);
    env.take_log();
    assert_eq!(env.shutdown(&by_tags("gpu"), false), 0, "launching is only stopped with all");
    assert_eq!(env.shutdown(&by_tags("gpu"), true), 1);
    assert_eq!(env.take_log(), vec![Ev::Terminate(g, "shut down by the user".to_owned())]);
    assert_eq!(env.sched.slot_state(g), SlotState::Down);
    assert_eq!(env.sched.slot_state(p), SlotState::Up);
    let named = SlotFilter { tags: None, slot: Some("p".to_owned()) };
    assert_eq!(env.shutdown(&named, false), 1);
    assert_eq!(env.sched.slot_state(p), SlotState::Stopping);
}

#[test]
fn dismiss_removes_slots_and_cancels_orphaned_jobs() {
    let mut env = TestEnv::new();
    let g = env.recruit("g", "gpu", prefetch(0));
    let p = env.recruit("p", "", prefetch(0));
    let g1 = env.job("gpu");
    let g2 = env.job("gpu");
    let u1 = env.job("");
    env.connect_all();
    assert_eq!(env.held(g), vec![g1]);
    assert_eq!(env.held(p), vec![u1]);
    env.take_log();

    assert_eq!(env.dismiss(&by_tags("gpu")), 1);
    let log = env.take_log();
    assert!(log.contains(&Ev::Terminate(g, "dismissed by the user".to_owned())), "{log:?}");
    assert_eq!(env.status_of(g1), Some(Status::Cancelled), "its running job has nowhere to go");
    assert_eq!(env.status_of(g2), Some(Status::Cancelled));
    let err = env.delivered[&g2].error.clone().unwrap();
    assert!(err.contains("[gpu]") && err.contains("dismissed"), "{err}");
    assert_eq!(env.status_of(u1), None, "untagged job untouched");
    assert_eq!(env.sched.slot_by_name("g"), None);
    assert_eq!(env.sched.slot_by_name("p"), Some(p));
    assert_eq!(env.sched.slots().count(), 1);
    // The stopped worker goes; nothing is relaunched for the dismissed slot.
    env.gone_all();
    assert_eq!(env.take_log(), vec![]);
    assert!(matches!(env.submit(spec("gpu")), Err(SubmitError::NoMatchingSlot { .. })));
    // Untagged jobs keep running on p.
    let u2 = env.job("");
    env.finish(p, Status::Succeeded);
    env.finish(p, Status::Succeeded);
    assert_eq!(env.status_of(u2), Some(Status::Succeeded));
    assert_eq!(env.dismiss(&all()), 1);
    assert!(env.submit(spec("")).is_err());
    env.assert_all_delivered();
}

#[test]
fn dismiss_keeps_jobs_other_slots_can_run() {
    let mut env = TestEnv::new();
    let a = env.recruit("a", "gpu", prefetch(0));
    let b = env.recruit("b", "gpu", prefetch(0));
    let j = env.job("gpu");
    env.connect(a);
    let named = SlotFilter { tags: None, slot: Some("a".to_owned()) };
    env.take_log();
    assert_eq!(env.dismiss(&named), 1);
    assert_eq!(env.take_log(), vec![Ev::Terminate(a, "dismissed by the user".to_owned()), Ev::Launch(vec![b])]);
    env.connect(b);
    env.finish(b, Status::Succeeded);
    assert_eq!(env.status_of(j), Some(Status::Succeeded));
    env.gone_all();
    env.assert_all_delivered();
}

// ----- 10. randomized simulation --------------------------------------------

struct SimConfig {
    seed: u64,
    slots: usize,
    jobs: usize,
    check_every: u64,
}

fn simulate(cfg: SimConfig) -> TestEnv {
    let mut env = TestEnv::new();
    env.log = None;
    env.check_every = cfg.check_every;
    env.rng = Rng(cfg.seed ^ 0xD1CE);
    env.auto_per_mille = 600;
    let mut rng = Rng(cfg.seed);
    let tag_sets = ["", "gpu", "big", "big,gpu"];
    let pick_tags = |rng: &mut Rng| match rng.below(10) {
        0..=4 => tag_sets[0],
        5..=6 => tag_sets[1],
        7..=8 => tag_sets[2],
        _ => tag_sets[3],
    };
    let configs: Vec<SlotConfig> = (0..cfg.slots)
        .map(|i| SlotConfig {
            name: format!("s{i}"),
            class: format!("c{}", i % 3),
            // The first four cover every tag set.
            tags: tags(if i < 4 { tag_sets[i] } else { pick_tags(&mut rng) }),
            limits: SlotLimits {
                idle_timeout: rng.chance(500).then(|| secs(30 + rng.below(300))),
                tasks_max: rng.chance(200).then(|| 1 + rng.below(8) as u32),
                wall_time: rng.chance(200).then(|| secs(600 + rng.below(3000))),
                launch_timeout: secs(60 + rng.below(120)),
                launch_max: 2 + rng.below(3) as u32,
                prefetch: rng.below(3) as u32,
            },
        })
        .collect();
    env.recruit_many(configs);

    // When each launch connects (or fails): (time, slot, launch number).
    let mut schedule: BinaryHeap<Reverse<(Duration, u32, u64)>> = BinaryHeap::new();
    let mut accepted: Vec<JobId> = Vec::new();
    let mut submitted = 0usize;
    let mut steps = 0u64;
    let max_steps = 40 * cfg.jobs as u64 + 100_000;
    while submitted < cfg.jobs || env.sched.pending() > 0 {
        steps += 1;
        assert!(steps < max_steps, "no progress: {:?} pending", env.sched.counts());
        let draining = submitted >= cfg.jobs;
        // Plan when every new launch connects (or fails).
        for slot in std::mem::take(&mut env.new_launches) {
            let a = env.agent(slot);
            if a.world != World::Launching {
                continue;
            }
            let delay = match rng.below(100) {
                0..=89 => secs(1 + rng.below(30)),
                90..=94 => secs(100 + rng.below(200)),
                _ => secs(100_000), // never connects by itself
            };
            let fail = !draining && rng.chance(30);
            let at = env.offset + if fail { secs(1 + rng.below(5)) } else { delay };
            let code = slot.0 | if fail { 1 << 31 } else { 0 };
            schedule.push(Reverse((at, code, a.launch_no)));
        }
        match rng.below(1000) {
            0..=99 if !draining => {
                for _ in 0..1 + rng.below(8) {
                    if submitted >= cfg.jobs {
                        break;
                    }
                    submitted += 1;
                    let mut sp = spec(pick_tags(&mut rng));
                    sp.priority = rng.below(5) as i32 - 2;
                    sp.retries = rng.below(3) as u32;
                    sp.crashes_max = 1 + rng.below(3) as u32;
                    if rng.chance(5) {
                        sp.tags = tags("tpu");
                    }
                    let wanted = sp.tags.clone();
                    match env.submit(sp) {
                        Ok(id) => accepted.push(id),
                        Err(SubmitError::NoMatchingSlot { .. }) => {
                            assert!(!env.sched.slots().any(|v| v.config.tags.satisfies(&wanted)));
                        }
                        Err(SubmitError::AllBroken { .. }) => {
                            assert!(
                                env.sched
                                    .slots()
                                    .filter(|v| v.config.tags.satisfies(&wanted))
                                    .all(|v| v.state == SlotState::Broken)
                            );
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            0..=399 => {
                if let Some(slot) = env.busy.pick(&mut env.rng) {
                    let status = match rng.below(100) {
                        0..=79 => Status::Succeeded,
                        80..=94 => Status::Failed,
                        _ => Status::TimedOut,
                    };
                    env.finish(slot, status);
                }
            }
            400..=599 => {
                if let Some(slot) = env.with_mail.pick(&mut env.rng) {
                    env.deliver_mail(slot);
                }
            }
            600..=749 => {
                // Time passes: due launches connect or fail, then a tick.
                env.offset += Duration::from_millis(200 + rng.below(2000));
                while let Some(&Reverse((at, code, no))) = schedule.peek() {
                    if at > env.offset {
                        break;
                    }
                    schedule.pop();
                    let slot = SlotId(code & !(1 << 31));
                    let a = env.agent(slot);
                    if a.world != World::Launching || a.launch_no != no {
                        continue;
                    }
                    if code & (1 << 31) == 0 {
                        env.connect(slot);
                    } else if rng.chance(500) {
                        env.fail_launch(slot, "the class refused");
                    } else {
                        env.lose(slot);
                    }
                }
                env.advance(Duration::ZERO);
            }
            750..=899 => {
                if let Some(slot) = env.stopping.pick(&mut env.rng) {
                    env.lose(slot);
                }
            }
            900..=909 if !draining || rng.chance(100) => {
                if let Some(slot) = env.up.pick(&mut env.rng) {
                    env.lose(slot);
                }
            }
            910..=929 if !accepted.is_empty() => {
                let job = accepted[rng.below(accepted.len() as u64) as usize];
                let known = !env.delivered.contains_key(&job);
                assert_eq!(env.cancel(job), known, "cancel of job {job}");
                if known {
                    let queued_cancel = env.delivered.get(&job).map(|o| o.status);
                    assert!(queued_cancel.is_none() || queued_cancel == Some(Status::Cancelled));
                }
            }
            930..=931 => {
                env.restart();
            }
            932 => {
                let all_ = rng.chance(300);
                env.shutdown(&by_tags(pick_tags(&mut rng)), all_);
            }
            933..=934 => {
                let n = rng.below(20) as usize;
                env.launch(&by_tags(pick_tags(&mut rng)), n);
            }
            935 if rng.chance(100) => {
                let name = format!("s{}", 4 + rng.below(cfg.slots as u64 - 4));
                env.dismiss(&SlotFilter { tags: None, slot: Some(name) });
            }
            _ => {}
        }
        if draining && steps % 500 == 0 {
            // Keep the end finite: broken slots come back.
            env.restart();
        }
    }
    env.check_every = 1;
    env.assert_all_delivered();
    eprintln!("seed {}: {} steps, {}s simulated, {:?}", cfg.seed, steps, env.offset.as_secs(), env.stats);
    env
}

#[test]
fn simulation_small_checked_every_step() {
    // Many slots: launching wins over prefetching; few slots: all are up
    // most of the time, so prefetching (and with it revocation) happens.
    // Every path must be exercised over the runs as a whole.
    let mut total = Stats::default();
    for (seed, slots) in [(1, 60), (2, 60), (3, 60), (4, 12), (5, 8)] {
        let env = simulate(SimConfig { seed, slots, jobs: 1500, check_every: 1 });
        let st = &env.stats;
        total.revoked_ok += st.revoked_ok;
        total.revoked_refused += st.revoked_refused;
        total.lost_busy += st.lost_busy;
        total.launch_failures += st.launch_failures;
        for (k, v) in &st.delivered {
            *total.delivered.entry(k).or_default() += v;
        }
    }
    let st = &total;
    assert!(st.revoked_ok > 0 && st.revoked_refused > 0, "revocation not exercised: {st:?}");
    assert!(st.lost_busy > 0 && st.launch_failures > 0, "{st:?}");
    assert!(st.delivered.get("crashed").copied().unwrap_or(0) > 0, "{st:?}");
    assert!(st.delivered.get("cancelled").copied().unwrap_or(0) > 0, "{st:?}");
}

#[test]
fn simulation_large() {
    let t0 = Instant::now();
    let env = simulate(SimConfig { seed: 42, slots: 2000, jobs: 20_000, check_every: 997 });
    eprintln!("large simulation: {:?}", t0.elapsed());
    let st = &env.stats;
    assert!(st.assigns >= 20_000, "{st:?}");
    assert!(st.revoked_ok > 0 && st.terminates > 0, "{st:?}");
}

#[test]
fn restored_jobs_keep_their_history() {
    let now = Instant::now();
    let mut s = Scheduler::new();
    let slot = s.recruit(
        vec![SlotConfig { name: "w".into(), class: "local".into(), tags: Tags::new(), limits: SlotLimits::default() }],
        now,
    )[0];
    let spec = |max: u32| {
        let mut j = JobSpec::shell("true");
        j.crashes_max = max;
        Arc::new(j)
    };
    // Crashed twice out of three allowed: it runs again, as attempt 3.
    s.restore(JobId(7), spec(3), 1, History { attempts: 2, crashes: 2, failures: 0 }, now).unwrap();
    // Crashed as often as allowed: it ends at once.
    s.restore(JobId(8), spec(2), 1, History { attempts: 2, crashes: 2, failures: 0 }, now).unwrap();
    s.sanity_check();
    let actions = s.take_actions();
    let delivered: Vec<(JobId, Status)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(o) => Some((o.id, o.status)),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![(JobId(8), Status::Crashed)]);
    assert!(actions.iter().any(|a| matches!(a, Action::Launch(v) if v == &vec![slot])));
    assert!(s.connected(slot, now));
    let assigned: Vec<(JobId, u32)> = s
        .take_actions()
        .iter()
        .filter_map(|a| match a {
            Action::Assign { job, attempt, .. } => Some((*job, *attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, vec![(JobId(7), 3)]);
    assert_eq!(s.restore(JobId(7), spec(3), 1, History::default(), now), Err(SubmitError::Duplicate(JobId(7))));
    s.sanity_check();
}

fn two_slots(s: &mut Scheduler, now: Instant) -> (SlotId, SlotId) {
    let cfg = |n: &str| SlotConfig { name: n.into(), class: "local".into(), tags: Tags::new(), limits: prefetch(1) };
    let ids = s.recruit(vec![cfg("a"), cfg("b")], now);
    (ids[0], ids[1])
}

fn output_of(job: JobId, attempt: u32) -> Output {
    let mut o = Output::without_run(job, None, Tags::new(), 0, Status::Succeeded, String::new());
    o.attempt = attempt;
    o.error = None;
    o
}

#[test]
fn a_held_job_is_delivered_once_when_its_worker_comes_back() {
    let now = Instant::now();
    let mut s = Scheduler::new();
    let (a, b) = two_slots(&mut s, now);
    assert!(s.await_resume(a, now + secs(10)));
    let spec = Arc::new(JobSpec::shell("true"));
    let history = History { attempts: 1, crashes: 0, failures: 0 };
    s.restore_held(JobId(1), spec.clone(), 1, history, a, now).unwrap();
    s.restore_held(JobId(2), spec.clone(), 1, history, a, now).unwrap();
    // A queued job whose assignment to `a` the journal lost (attempt 0).
    s.restore(JobId(3), spec.clone(), 1, History::default(), now).unwrap();
    s.sanity_check();
    // `b` is launched and connects, but nothing is dispatched while `a` may
    // come back with job 3.
    let _ = s.take_actions();
    s.connected(b, now);
    assert!(!s.take_actions().iter().any(|a| matches!(a, Action::Assign { .. })), "dispatched during the barrier");
    // `a` comes back running job 1 and with job 3's result; job 2 it never
    // started.
    assert!(s.resumed(a, &[(JobId(1), 1), (JobId(3), 1)], now));
    s.sanity_check();
    s.finished(a, JobId(3), output_of(JobId(3), 1), now);
    s.finished(a, JobId(1), output_of(JobId(1), 1), now);
    s.sanity_check();
    let actions = s.take_actions();
    let delivered: Vec<JobId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(o) => Some(o.id),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![JobId(3), JobId(1)]);
    // Job 2 went back to the queue unstarted: its next attempt is 1.
    let assigned: Vec<(JobId, u32)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Assign { job, attempt, .. } => Some((*job, *attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, vec![(JobId(2), 1)]);
}

#[test]
fn a_worker_that_does_not_come_back_in_time_crashes_its_job() {
    let now = Instant::now();
    let mut s = Scheduler::new();
    let (a, _b) = two_slots(&mut s, now);
    assert!(s.await_resume(a, now + secs(10)));
    let spec = Arc::new(JobSpec::shell("true"));
    s.restore_held(JobId(1), spec, 1, History { attempts: 1, crashes: 0, failures: 0 }, a, now).unwrap();
    assert_eq!(s.next_deadline(), Some(now + secs(10)));
    s.tick(now + secs(9));
    assert_eq!(s.slot_state(a), SlotState::Resuming);
    s.tick(now + secs(10));
    s.sanity_check();
    assert_eq!(s.slot_state(a), SlotState::Launching, "relaunched for its job");
    // A late worker is refused: the slot waits for a new launch.
    assert!(!s.resumed(a, &[(JobId(1), 1)], now + secs(11)));
    assert!(s.connected(a, now + secs(11)));
    let assigned: Vec<(JobId, u32)> = s
        .take_actions()
        .iter()
        .filter_map(|x| match x {
            Action::Assign { job, attempt, .. } => Some((*job, *attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, vec![(JobId(1), 2)], "a crash: a new attempt");
    s.sanity_check();
}
