//! The engine: walks the plan in dependency order, decides what is up to
//! date, runs the rest as crew jobs through an [`Executor`], records what
//! was built and copies outputs into the working tree.
//!
//! One pass serves `crew make` and, with [`Options::dry_run`], `crew
//! outdated`/`crew why` (nothing is staged, sent or written; a target
//! whose upstream would run is reported as such without being evaluated).
//!
//! **Invariant:** nothing but declared content reaches an identity. The
//! engine reads the pipeline file, the working tree's source files (by
//! content), the store's records and the seed; it never reads its own
//! process's environment or current folder for anything that decides.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use crew_core::job::Input;
use crew_core::output::{Output, Status, StoredObject, Timestamp};
use crew_core::staging::{self, StageError};
use crew_core::store::{Store, StoreError, StoreKey};
use crew_core::{Command, JobId, JobSpec};
use serde::{Deserialize, Serialize};

use crate::file::CommandDef;
use crate::hashes::HashCache;
use crate::index::StoreIndex;
use crate::plan::{JobInput, NodeId, NodeKind, Plan};
use crate::record::{
    BuildInfo, CAS_PREFIX, Identity, OBJECTS_PREFIX, RECORD_FORMAT, Record, cas_key, differences, record_key,
};

/// Largest record read back, and largest `lines` file of a dynamic map.
const SMALL_MAX: usize = 16 * 1024 * 1024;

/// Runs jobs for the engine: an in-process controller, or a daemon.
#[async_trait::async_trait]
pub trait Executor: Send {
    /// Sends jobs; their ids, in order.
    async fn send(&mut self, jobs: Vec<JobSpec>) -> Result<Vec<JobId>, String>;
    /// The next output of a job sent here; `None` when none is pending.
    async fn next(&mut self) -> Option<Output>;
    /// Cancels every job sent here that has not ended (each still ends in
    /// an output, `cancelled`).
    async fn cancel_all(&mut self);
    /// How many jobs may be sent and not ended at once: beyond it, jobs
    /// wait in the engine, so that after a failure nothing new starts.
    fn capacity(&self) -> usize {
        usize::MAX
    }
}

/// How a build goes.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Build everything that does not depend on a failure, instead of
    /// stopping at the first one.
    pub keep_going: bool,
    /// Decide only: stage, send and write nothing.
    pub dry_run: bool,
    /// The crew seed; each job's seed derives from it and the target name.
    pub seed: u64,
    /// Folder for local caches (`.crew/pipeline`); none: no cache.
    pub state_dir: Option<PathBuf>,
    /// The no-op memo's key ([`crate::memo::MemoKey::digest`]): a run that
    /// ends in a no-op writes the memo under it (with `state_dir`).
    pub memo_key: Option<String>,
}

/// Where a node ended up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Not reached: not asked for, or the build stopped before it.
    Pending,
    /// Its record matches and its outputs are in the store.
    UpToDate,
    /// Built by this run.
    Built,
    /// A dry run found it would run, and why.
    Outdated {
        /// Why, in words.
        reasons: Vec<String>,
    },
    /// Its job ran and did not succeed.
    Failed {
        /// What happened.
        error: String,
    },
    /// Not run because something it needs failed.
    Skipped {
        /// The failed upstream.
        because: String,
    },
    /// Its job was cancelled (the build was stopped).
    Cancelled,
}

impl State {
    /// True when the node is up to date at the end of the run.
    pub fn is_done(&self) -> bool {
        matches!(self, State::UpToDate | State::Built)
    }

    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::UpToDate => "up_to_date",
            State::Built => "built",
            State::Outdated { .. } => "outdated",
            State::Failed { .. } => "failed",
            State::Skipped { .. } => "skipped",
            State::Cancelled => "cancelled",
        }
    }
}

/// What the engine tells its caller as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run knows how many nodes it may touch (grows with dynamic maps).
    Total(usize),
    /// A target was found up to date.
    UpToDate(&'a str),
    /// A target's job was sent, and why it runs.
    Started(&'a str, &'a [String]),
    /// A target's job ended.
    Ended(&'a str, &'a Output),
    /// A target was not run because an upstream failed.
    Skipped(&'a str, &'a str),
    /// A mapped target's branches are known.
    Expanded(&'a str, usize),
    /// Something the user should know that is not a failure.
    Warning(String),
}

/// Why the engine could not work at all (as opposed to a target failing).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A transfer failed.
    #[error("{0}")]
    Stage(#[from] StageError),
    /// The executor could not take the jobs.
    #[error("cannot send the jobs: {0}")]
    Send(String),
}

impl BuildError {
    /// True when the store (not the pipeline) failed.
    pub fn is_store_failure(&self) -> bool {
        match self {
            BuildError::Store(_) => true,
            BuildError::Stage(e) => e.is_store_failure(),
            BuildError::Send(_) => false,
        }
    }
}

/// The end of a run: every node's state.
#[derive(Debug)]
pub struct Report {
    /// Node label → state, for every node of the plan (dynamic branches
    /// included once known), in plan order.
    pub states: Vec<(String, State)>,
    /// Number of jobs that ran.
    pub ran: usize,
    /// The labels that were asked for (after expanding names).
    pub wanted: Vec<String>,
    /// True when every wanted node is up to date at the end.
    pub all_done: bool,
}

/// The keys of every object under `prefix`.
async fn keys_under(store: &dyn Store, prefix: &str) -> Result<HashSet<String>, BuildError> {
    let listed = store.list(&StoreKey::new(prefix)?).await?;
    Ok(listed.into_iter().map(|m| m.key.as_str().to_owned()).collect())
}

/// A random name for this run's output prefix.
fn run_id() -> String {
    random_name()
}

/// A name no other process draws: the time and a random number.
pub(crate) fn random_name() -> String {
    let r = getrandom_u64();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{secs}-{r:016x}")
}

fn getrandom_u64() -> u64 {
    // The hash of a fresh random state: no extra dependency for a name.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish()
}

struct Engine<'a> {
    plan: &'a mut Plan,
    store: Arc<dyn Store>,
    opts: &'a Options,
    hashes: HashCache,
    index: StoreIndex,
    /// Staged source inputs known to be in the store (listed on first need).
    cas: Option<HashSet<String>>,
    run: String,
    states: Vec<State>,
    needed: Vec<bool>,
    remaining: Vec<usize>,
    dependents: Vec<Vec<NodeId>>,
    /// Per node: its outputs once done.
    outputs: Vec<Vec<StoredObject>>,
    /// Per node: its identity hash once known.
    idents: Vec<Option<String>>,
    /// Per running job: the node and its identity.
    running: HashMap<JobId, (NodeId, Identity)>,
    ready: VecDeque<NodeId>,
    stopping: bool,
    ran: usize,
}

/// Builds (or, with `opts.dry_run`, evaluates) the nodes `wanted` of
/// `plan` and what they need, against `store`. `stop` ends the run early
/// (Ctrl-C): running jobs are cancelled and none of them is recorded.
///
/// # Errors
/// Only failures of the machinery (the store, sending jobs); a target that
/// fails is a [`State::Failed`] in the report.
pub async fn build(
    plan: &mut Plan,
    wanted: &[NodeId],
    store: Arc<dyn Store>,
    executor: Option<&mut dyn Executor>,
    opts: &Options,
    stop: Pin<&mut dyn std::future::Future<Output = ()>>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Report, BuildError> {
    let state_dir = opts.state_dir.clone();
    let index = StoreIndex::load(store.as_ref(), state_dir.as_ref().map(|d| d.join("index.json"))).await?;
    let hashes = HashCache::open(&plan.file.root, state_dir.as_ref().map(|d| d.join("hashes.json")));
    let n = plan.nodes.len();
    let needed = plan.closure(wanted);
    let wanted_labels: Vec<String> = wanted.iter().map(|&w| plan.nodes[w].label.clone()).collect();
    let mut engine = Engine {
        plan,
        store,
        opts,
        hashes,
        index,
        cas: None,
        run: run_id(),
        states: vec![State::Pending; n],
        needed,
        remaining: vec![0; n],
        dependents: vec![Vec::new(); n],
        outputs: vec![Vec::new(); n],
        idents: vec![None; n],
        running: HashMap::new(),
        ready: VecDeque::new(),
        stopping: false,
        ran: 0,
    };
    engine.link_from(0);
    let mut warned = false;
    let on_event = &mut |e: Event<'_>| {
        warned |= matches!(e, Event::Warning(_));
        on_event(e);
    };
    on_event(Event::Total(engine.needed.iter().filter(|&&b| b).count()));
    let result = engine.drive(executor, stop, on_event).await;
    engine.hashes.save();
    if !opts.dry_run {
        engine.index.finish(engine.store.as_ref()).await;
    }
    result?;
    let all_done = wanted.iter().all(|&w| engine.states[w].is_done());
    if let (false, Some(dir), Some(key)) = (opts.dry_run, &opts.state_dir, &opts.memo_key) {
        engine.memoise(dir, key, warned).await;
    }
    let states = engine.plan.nodes.iter().map(|n| n.label.clone()).zip(engine.states).collect();
    Ok(Report { states, ran: engine.ran, wanted: wanted_labels, all_done })
}

impl Engine<'_> {
    /// Writes the no-op memo when this run was one (nothing ran, every
    /// needed node up to date, nothing to warn about, the store unchanged),
    /// else removes it.
    async fn memoise(&self, dir: &Path, key: &str, warned: bool) {
        let noop = !warned
            && self.ran == 0
            && self.index.unchanged()
            && crate::memo::eligible(self.plan)
            && (0..self.states.len()).all(|i| !self.needed[i] || matches!(self.states[i], State::UpToDate));
        // The generation must be the one the run started from: a writer
        // that changed the store meanwhile spends the memo at once.
        let generation = match noop {
            true => crate::index::generation(self.store.as_ref())
                .await
                .ok()
                .flatten()
                .filter(|now| self.index.seen() == Some(now.as_str())),
            false => None,
        };
        match generation {
            Some(g) => {
                let fresh = (0..self.states.len())
                    .filter(|&i| self.needed[i] && matches!(self.plan.nodes[i].kind, NodeKind::Job(_)))
                    .count();
                crate::memo::write(dir, key, &g, self.hashes.seen(), fresh);
            }
            None => crate::memo::forget(dir),
        }
    }

    /// Counts the dependencies of nodes `from..` and queues those ready.
    fn link_from(&mut self, from: usize) {
        let n = self.plan.nodes.len();
        self.states.resize(n, State::Pending);
        self.needed.resize(n, false);
        self.remaining.resize(n, 0);
        self.dependents.resize(n, Vec::new());
        self.outputs.resize(n, Vec::new());
        self.idents.resize(n, None);
        for id in from..n {
            if !self.needed[id] {
                continue;
            }
            let mut count = 0;
            for &d in &self.plan.nodes[id].deps {
                self.dependents[d].push(id);
                if !self.finished(d) {
                    count += 1;
                }
            }
            self.remaining[id] = count;
            if count == 0 {
                self.ready.push_back(id);
            }
        }
    }

    fn finished(&self, id: NodeId) -> bool {
        !matches!(self.states[id], State::Pending)
    }

    /// Marks `id` finished in `state` and queues dependents now ready.
    fn finish(&mut self, id: NodeId, state: State) {
        self.states[id] = state;
        for i in 0..self.dependents[id].len() {
            let d = self.dependents[id][i];
            self.remaining[d] = self.remaining[d].saturating_sub(1);
            if self.remaining[d] == 0 && self.needed[d] {
                self.ready.push_back(d);
            }
        }
    }

    async fn drive(
        &mut self,
        mut executor: Option<&mut dyn Executor>,
        mut stop: Pin<&mut dyn std::future::Future<Output = ()>>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), BuildError> {
        let mut stop_seen = false;
        let capacity = executor.as_deref().map_or(usize::MAX, |e| e.capacity()).max(1);
        let mut queued: VecDeque<(NodeId, Identity, JobSpec, Vec<String>)> = VecDeque::new();
        loop {
            while let Some(id) = self.ready.pop_front() {
                if self.stopping {
                    continue;
                }
                if let Some(job) = self.visit(id, on_event).await? {
                    queued.push_back(job);
                }
            }
            if self.stopping {
                queued.clear();
            }
            let room = capacity.saturating_sub(self.running.len());
            let batch: Vec<_> = queued.drain(..room.min(queued.len())).collect();
            if !batch.is_empty() {
                let Some(exec) = executor.as_deref_mut() else {
                    return Err(BuildError::Send("no executor for a build".into()));
                };
                let specs: Vec<JobSpec> = batch.iter().map(|(_, _, s, _)| s.clone()).collect();
                let ids = exec.send(specs).await.map_err(BuildError::Send)?;
                for ((node, ident, _, reasons), job) in batch.into_iter().zip(ids) {
                    on_event(Event::Started(&self.plan.nodes[node].label, &reasons));
                    self.running.insert(job, (node, ident));
                }
                continue;
            }
            if self.running.is_empty() {
                return Ok(());
            }
            let Some(exec) = executor.as_deref_mut() else { return Ok(()) };
            let next = if stop_seen {
                exec.next().await
            } else {
                tokio::select! {
                    o = exec.next() => o,
                    () = &mut stop => {
                        stop_seen = true;
                        self.stopping = true;
                        exec.cancel_all().await;
                        continue;
                    }
                }
            };
            let Some(output) = next else {
                // The executor has nothing more: whatever is still running
                // is lost to us; say so rather than wait forever.
                for (_, (node, _)) in self.running.drain() {
                    self.states[node] = State::Failed { error: "the executor lost the job".into() };
                }
                return Ok(());
            };
            let Some((node, ident)) = self.running.remove(&output.id) else { continue };
            on_event(Event::Ended(&self.plan.nodes[node].label, &output));
            self.ended(node, ident, output, on_event).await?;
        }
    }

    /// Decides a ready node: finished at once (up to date, group, skipped,
    /// dry run) or a job to send.
    async fn visit(
        &mut self,
        id: NodeId,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Option<(NodeId, Identity, JobSpec, Vec<String>)>, BuildError> {
        // A failed or skipped dependency skips this node.
        let deps = self.plan.nodes[id].deps.clone();
        if let Some(&bad) = deps
            .iter()
            .find(|&&d| matches!(self.states[d], State::Failed { .. } | State::Skipped { .. } | State::Cancelled))
        {
            let because = match &self.states[bad] {
                State::Skipped { because } => because.clone(),
                _ => self.plan.nodes[bad].label.clone(),
            };
            on_event(Event::Skipped(&self.plan.nodes[id].label, &because));
            self.finish(id, State::Skipped { because });
            return Ok(None);
        }
        // A dry run cannot evaluate what follows a target that would run.
        if let Some(&up) = deps.iter().find(|&&d| matches!(self.states[d], State::Outdated { .. })) {
            let label = self.plan.nodes[id].label.clone();
            let mut reasons = Vec::new();
            if matches!(self.plan.nodes[id].kind, NodeKind::Job(_)) && !self.index.records.contains_key(&label) {
                reasons.push("never built".to_owned());
            }
            reasons.push(format!("upstream {} will run", self.plan.nodes[up].label));
            self.finish(id, State::Outdated { reasons });
            return Ok(None);
        }
        match self.plan.nodes[id].kind.clone() {
            NodeKind::Group { expanded: false, .. } => {
                self.expand(id, on_event).await;
                Ok(None)
            }
            NodeKind::Group { expanded: true, .. } => {
                let deps = &self.plan.nodes[id].deps;
                let branches: Vec<NodeId> = deps
                    .iter()
                    .copied()
                    .filter(|&d| matches!(&self.plan.nodes[d].kind, NodeKind::Job(j) if j.target == self.plan.target_of(id)))
                    .collect();
                let mut outs = Vec::new();
                let mut h = sha2::Sha256::default();
                for &b in &branches {
                    outs.extend(self.outputs[b].iter().cloned());
                    sha2::Digest::update(&mut h, self.idents[b].as_deref().unwrap_or("").as_bytes());
                }
                self.outputs[id] = outs;
                self.idents[id] = Some(crate::record::hex(&sha2::Digest::finalize(h)));
                let all_fresh = branches.iter().all(|&b| self.states[b] == State::UpToDate);
                self.finish(id, if all_fresh { State::UpToDate } else { State::Built });
                Ok(None)
            }
            NodeKind::Job(job) => self.visit_job(id, &job, on_event).await,
        }
    }

    async fn visit_job(
        &mut self,
        id: NodeId,
        job: &crate::plan::JobNode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Option<(NodeId, Identity, JobSpec, Vec<String>)>, BuildError> {
        let label = self.plan.nodes[id].label.clone();
        let def = self.plan.file.targets[job.target].clone();
        // Inputs: name → object (sources by content, upstream outputs by
        // their records).
        let mut inputs: BTreeMap<String, StoredObject> = BTreeMap::new();
        let mut sources: Vec<(String, String)> = Vec::new();
        let mut problem = None;
        for (_, input) in &job.inputs {
            let found: Vec<StoredObject> = match input {
                JobInput::Source(path) => match self.hashes.hash(path) {
                    Ok((sha, size)) => {
                        let key = cas_key(&sha)?.as_str().to_owned();
                        sources.push((path.clone(), sha.clone()));
                        vec![StoredObject::new(path.clone(), key, size, sha)]
                    }
                    Err(e) => {
                        problem = Some(format!("cannot read source input {path}: {e}"));
                        break;
                    }
                },
                JobInput::Output(path) => {
                    let obj = self
                        .plan
                        .producers
                        .get(path)
                        .and_then(|&p| self.outputs[p].iter().find(|o| &o.name == path))
                        .cloned();
                    match obj {
                        Some(o) => vec![o],
                        None => {
                            problem = Some(format!("input {path}: no target produced it"));
                            break;
                        }
                    }
                }
                JobInput::Node(n) => self.outputs[*n].clone(),
            };
            for o in found {
                if let Some(prev) = inputs.get(&o.name) {
                    if prev.sha256 != o.sha256 {
                        problem = Some(format!("two inputs are named {} with different contents", o.name));
                    }
                }
                inputs.insert(o.name.clone(), o);
            }
        }
        if let Some(error) = problem {
            on_event(Event::Warning(format!("target {label}: {error}")));
            self.fail(id, error);
            return Ok(None);
        }
        let after = self.plan.nodes[id]
            .after
            .iter()
            .map(|&a| (self.plan.nodes[a].label.clone(), self.idents[a].clone().unwrap_or_default()))
            .collect();
        let ident = Identity {
            v: RECORD_FORMAT,
            name: label.clone(),
            command: job.command.clone(),
            env: job.env.clone(),
            env_inherit: def.env_inherit.clone(),
            inputs: inputs.iter().map(|(k, v)| (k.clone(), v.sha256.clone())).collect(),
            outputs: job.outputs.clone(),
            seed: crew_core::seed::job_seed(self.opts.seed, &label),
            after,
        };
        let hash = ident.hash();
        self.idents[id] = Some(hash.clone());
        let reasons = match self.index.records.get(&label) {
            None => vec!["never built".to_owned()],
            Some(r) if r.hash != hash => match self.index.full_record(self.store.as_ref(), &label).await? {
                Some(full) => {
                    let d = differences(&full.identity, &ident);
                    if d.is_empty() { vec!["its identity changed".to_owned()] } else { d }
                }
                None => vec!["its record is gone".to_owned()],
            },
            Some(r) => {
                let missing: Vec<String> = r
                    .outputs
                    .iter()
                    .filter(|o| !self.index.objects.contains(&o.key))
                    .map(|o| format!("output {} is missing from the store", o.name))
                    .collect();
                if missing.is_empty() {
                    let outs = r.outputs.clone();
                    if !self.opts.dry_run && def.fetch {
                        self.materialize(&outs, true, on_event).await;
                    }
                    self.outputs[id] = outs;
                    on_event(Event::UpToDate(&label));
                    self.finish(id, State::UpToDate);
                    return Ok(None);
                }
                missing
            }
        };
        if self.opts.dry_run {
            self.finish(id, State::Outdated { reasons });
            return Ok(None);
        }
        // Stage the source inputs the store does not have yet.
        if self.cas.is_none() && !sources.is_empty() {
            self.cas = Some(keys_under(self.store.as_ref(), CAS_PREFIX).await?);
        }
        for (path, sha) in &sources {
            let key = cas_key(sha)?;
            if self.cas.as_ref().is_some_and(|c| c.contains(key.as_str())) {
                continue;
            }
            let uploaded = staging::upload_hashed(self.store.as_ref(), &key, &self.plan.file.root.join(path)).await?;
            if &uploaded.sha256 != sha {
                let error =
                    format!("source input {path} changed while it was staged; run crew make again once it is stable");
                self.fail(id, error);
                return Ok(None);
            }
            if let Some(c) = self.cas.as_mut() {
                c.insert(key.as_str().to_owned());
            }
        }
        let mut spec = JobSpec::new(match &job.command {
            CommandDef::Argv(argv) => Command::Argv(argv.clone()),
            CommandDef::Shell(line) => Command::Shell(line.clone()),
        });
        spec.name = Some(label.clone());
        spec.tags = def.tags.clone();
        spec.env = job.env.clone();
        spec.opts.env_inherit = def.env_inherit.clone();
        spec.timeout = def.timeout;
        spec.retries = def.retries;
        spec.opts.cpu = def.cpu;
        spec.opts.memory = def.memory;
        spec.opts.inputs = inputs.into_values().map(|o| Input::object(o.name, o.key, o.size, o.sha256)).collect();
        spec.opts.outputs = job.outputs.clone();
        spec.opts.output_prefix = Some(format!("{OBJECTS_PREFIX}/{hash}/{}", self.run));
        if let Err(e) = spec.validate() {
            let error = format!("cannot make a job of it: {e}");
            on_event(Event::Warning(format!("target {label}: {error}")));
            self.fail(id, error);
            return Ok(None);
        }
        Ok(Some((id, ident, spec, reasons)))
    }

    fn fail(&mut self, id: NodeId, error: String) {
        if !self.opts.keep_going {
            self.stopping = true;
        }
        self.finish(id, State::Failed { error });
    }

    /// Reads the values of a dynamic map and adds its branches.
    async fn expand(&mut self, id: NodeId, on_event: &mut dyn FnMut(Event<'_>)) {
        let def = self.plan.def(id).clone();
        let mut lines = HashMap::new();
        for (_, values) in &def.map {
            let crate::file::MapValues::Lines(file) = values else { continue };
            let obj =
                self.plan.producers.get(file).and_then(|&p| self.outputs[p].iter().find(|o| &o.name == file)).cloned();
            let text = match obj {
                Some(o) => match StoreKey::new(o.key.as_str()) {
                    Ok(key) => staging::read_small(self.store.as_ref(), &key, SMALL_MAX)
                        .await
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                None => Err(format!("no target produced {file}")),
            };
            match text {
                Ok(t) => {
                    lines.insert(file.clone(), t);
                }
                Err(e) => {
                    self.fail(id, format!("cannot read the map values: {e}"));
                    return;
                }
            }
        }
        let before = self.plan.nodes.len();
        match self.plan.expand(id, &lines) {
            Ok(branches) => {
                on_event(Event::Expanded(&def.name, branches.len()));
                for &b in &branches {
                    self.needed.resize(self.plan.nodes.len(), false);
                    self.needed[b] = true;
                }
                self.link_from(before);
                // The group now waits for its branches.
                let waiting = branches.iter().filter(|&&b| !self.finished(b)).count();
                self.remaining[id] = waiting;
                for &b in &branches {
                    self.dependents[b].push(id);
                }
                on_event(Event::Total(self.needed.iter().filter(|&&b| b).count()));
                if waiting == 0 {
                    self.ready.push_back(id);
                }
            }
            Err(e) => {
                on_event(Event::Warning(format!("target {}: {e}", def.name)));
                self.fail(id, e);
            }
        }
    }

    async fn ended(
        &mut self,
        id: NodeId,
        ident: Identity,
        output: Output,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), BuildError> {
        self.ran += 1;
        let label = self.plan.nodes[id].label.clone();
        match output.status {
            Status::Succeeded => {}
            Status::Cancelled => {
                self.finish(id, State::Cancelled);
                return Ok(());
            }
            status => {
                let error = match &output.error {
                    Some(e) => format!("{status}: {e}"),
                    None => match (output.exit_code, output.signal) {
                        (Some(c), _) => format!("{status}: exit code {c}"),
                        (_, Some(s)) => format!("{status}: killed by signal {s}"),
                        _ => status.to_string(),
                    },
                };
                self.fail(id, error);
                return Ok(());
            }
        }
        let def = self.plan.def(id).clone();
        let record = Record {
            v: RECORD_FORMAT,
            target: label.clone(),
            hash: ident.hash(),
            identity: ident,
            outputs: output.objects.clone(),
            build: BuildInfo {
                job: output.id.0,
                attempt: output.attempt,
                seconds: output.wall_seconds,
                slot: output.slot.clone(),
                at: Timestamp::now(),
            },
        };
        let key = record_key(&def.name, &label)?;
        if let Err(e) = self.index.write(self.store.as_ref(), &key, &record).await {
            self.fail(id, format!("built, but its record could not be written: {e}"));
            return Ok(());
        }
        if def.fetch {
            self.materialize(&output.objects, false, on_event).await;
        }
        self.outputs[id] = output.objects;
        self.finish(id, State::Built);
        Ok(())
    }

    /// Copies outputs into the working tree, each verified; files already
    /// there with the same content are left alone. With `warn_replaced`
    /// (the target was up to date), replacing a file that differs is said:
    /// someone edited a built output.
    async fn materialize(
        &mut self,
        objects: &[StoredObject],
        warn_replaced: bool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) {
        for o in objects {
            if self.hashes.matches(&o.name, &o.sha256) {
                continue;
            }
            let replaced = warn_replaced && self.plan.file.root.join(&o.name).exists();
            let done = async {
                let key = StoreKey::new(o.key.as_str())?;
                let dest = staging::prepare_dest(&self.plan.file.root, &o.name)?;
                staging::download_verified(self.store.as_ref(), &key, &o.sha256, o.size, &dest).await
            }
            .await;
            match done {
                Ok(()) => {
                    self.hashes.remember(&o.name, &o.sha256);
                    if replaced {
                        on_event(Event::Warning(format!(
                            "{} in the working tree differed from the built output: replaced by it",
                            o.name
                        )));
                    }
                }
                Err(e) => on_event(Event::Warning(format!("cannot copy output {} into the working tree: {e}", o.name))),
            }
        }
    }
}
