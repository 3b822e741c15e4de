//! The pipeline commands: `crew make`, `crew outdated`, `crew why`,
//! `crew graph`, `crew clean`, `crew gc` (over `crew_pipeline`).
//!
//! Paths in the pipeline file are relative to its folder, and the default
//! store is `.crew/store` there, so the answers do not depend on the folder
//! a command runs from. `crew make` runs its jobs on an in-process
//! controller (the workers of `crew run`) or, with `--daemon`, on the
//! project daemon's slots.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit};
use crew_core::store::{Store, StoreKey};
use crew_core::{JobId, JobSpec, Output, Tags};
use crew_pipeline::build::{Event, Executor, Options, Report, State};
use crew_pipeline::plan::NodeKind;
use crew_pipeline::record::{CAS_PREFIX, OBJECTS_PREFIX, RECORDS_PREFIX};
use crew_pipeline::{Plan, graph};

use crate::registry::Registry;
use crate::table::Printer;
use crate::{EXIT_JOB_FAILED, EXIT_OK, Failure};

/// Where the pipeline is and where its cache lives.
#[derive(Args, Debug)]
pub(crate) struct PipelineArgs {
    /// The pipeline file; its folder is the pipeline's root (relative
    /// paths, the default store).
    #[arg(short = 'f', long = "file", value_name = "FILE", default_value = "pipeline.toml")]
    file: PathBuf,
    /// The store that holds records and outputs: a folder, file:///abs/path
    /// or s3://BUCKET/PREFIX[?region=R&endpoint=URL&profile=P]
    /// (default: .crew/store in the pipeline's folder).
    #[arg(long, value_name = "URL|DIR")]
    store: Option<String>,
    /// Crew seed: each target's CREW_SEED derives from it and the target's
    /// name, and it is part of every target's identity.
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
}

#[derive(Args, Debug)]
pub(crate) struct MakeArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Targets to build (and what they need); default: all. A mapped
    /// target's branches are named `name[value]`.
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// Number of workers (default: the number of CPUs).
    #[arg(long, short = 'w', value_name = "N")]
    workers: Option<u32>,
    /// Worker class.
    #[arg(long, default_value = "local", value_name = "CLASS")]
    class: String,
    /// Tags of the workers (default: every tag a target asks for).
    #[arg(long, value_name = "T,..")]
    tags: Option<String>,
    /// Build everything that does not depend on a failure, instead of
    /// stopping at the first one.
    #[arg(long, short = 'k')]
    keep_going: bool,
    /// Run the jobs on the project daemon's recruited slots (crew recruit)
    /// instead of workers of this command.
    #[arg(long)]
    daemon: bool,
    /// Print JSON Lines (one output record per target that ran).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct OutdatedArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Targets to look at (and what they need); default: all.
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// Print JSON Lines: {"target", "reasons"} per target that would run.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct WhyArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The target (or branch, `name[value]`).
    #[arg(value_name = "TARGET")]
    target: String,
    /// Print a JSON object: {"target", "state", "reasons"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct GraphArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Output format: dot (Graphviz) or mermaid.
    #[arg(long, default_value = "dot", value_name = "FORMAT")]
    format: String,
}

#[derive(Args, Debug)]
pub(crate) struct CleanArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Targets to forget (a mapped target: all its branches); default: all.
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct GcArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Only list what would be deleted.
    #[arg(long)]
    dry_run: bool,
    /// Keep unreferenced objects younger than this (a `crew make` running
    /// now may be writing them): e.g. 1h, 30m, 0s.
    #[arg(long, default_value = "1h", value_name = "D")]
    older_than: String,
    /// Print a JSON object: {"deleted", "bytes", "kept_young"}.
    #[arg(long)]
    json: bool,
}

/// A loaded pipeline: its plan, its store, its state folder.
struct Loaded {
    plan: Plan,
    store: Arc<dyn Store>,
    state_dir: PathBuf,
}

fn load(args: &PipelineArgs, store_override: Option<String>) -> Result<Loaded, Failure> {
    let file = crew_pipeline::load(&args.file).map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    let root = std::fs::canonicalize(&file.root)
        .with_context(|| format!("cannot resolve the pipeline's folder {}", file.root.display()))
        .map_err(Failure::usage)?;
    let plan = Plan::new(file).map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    let url = match store_override.or_else(|| args.store.clone()) {
        Some(s) => s,
        None => root.join(".crew/store").to_string_lossy().into_owned(),
    };
    let store = crew_core::store::open_store(&url)
        .with_context(|| format!("cannot open the store {url:?}"))
        .map_err(Failure::usage)?;
    Ok(Loaded { plan, store, state_dir: root.join(".crew/pipeline") })
}

/// The nodes named on the command line (default: every target).
fn wanted(plan: &Plan, names: &[String]) -> Result<Vec<usize>, Failure> {
    if names.is_empty() {
        return Ok(plan.all_targets());
    }
    let mut out = Vec::new();
    for n in names {
        // A branch of a dynamic target is known only once the target that
        // lists the values has run: build the whole target then.
        let dynamic_group = n
            .split_once('[')
            .filter(|_| n.ends_with(']'))
            .and_then(|(base, _)| plan.find(base))
            .filter(|&g| matches!(plan.nodes[g].kind, NodeKind::Group { expanded: false, .. }));
        match plan.find(n).or(dynamic_group) {
            Some(id) => out.push(id),
            None => {
                let known: Vec<&str> = plan.file.targets.iter().map(|t| t.name.as_str()).collect();
                return Err(Failure::usage(anyhow::anyhow!(
                    "no target {n:?} in {} (targets: {})",
                    plan.file.file,
                    known.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)
}

fn build_failure(e: crew_pipeline::build::BuildError) -> Failure {
    Failure::internal(e)
}

/// Evaluates without running anything.
fn evaluate(l: &mut Loaded, wanted: &[usize], seed: u64) -> Result<Report, Failure> {
    let rt = runtime()?;
    let opts = Options { dry_run: true, seed, state_dir: Some(l.state_dir.clone()), keep_going: true, memo_key: None };
    let store = Arc::clone(&l.store);
    rt.block_on(async {
        let stop = std::pin::pin!(std::future::pending::<()>());
        crew_pipeline::build(&mut l.plan, wanted, store, None, &opts, stop, &mut |_| {}).await
    })
    .map_err(build_failure)
}

// ---------------------------------------------------------------------------
// crew make

/// Jobs on an in-process controller, started when the first job is sent.
struct LocalExecutor {
    controller: Option<Controller>,
    store: Arc<dyn Store>,
    class: String,
    workers: u32,
    tags: Tags,
    seed: u64,
}

#[async_trait::async_trait]
impl Executor for LocalExecutor {
    async fn send(&mut self, jobs: Vec<JobSpec>) -> Result<Vec<JobId>, String> {
        if self.controller.is_none() {
            let class = Registry::stock().get(&self.class).map_err(|e| e.to_string())?;
            let exe = std::env::current_exe().map_err(|e| format!("cannot find the crew executable: {e}"))?;
            let mut config = ControllerConfig::new(AgentCommand::crew(exe.to_string_lossy()));
            config.seed = self.seed;
            config.store = Some(Arc::clone(&self.store));
            let controller = Controller::start(config).await.map_err(|e| e.to_string())?;
            if let Some(warning) = controller.reach_warning(class.as_ref()) {
                eprintln!("crew: warning: {warning}");
            }
            let mut recruit = Recruit::new(class, self.workers);
            recruit.tags = self.tags.clone();
            controller.recruit(recruit).map_err(|e| e.to_string())?;
            self.controller = Some(controller);
        }
        let controller = self.controller.as_ref().ok_or("no controller")?;
        controller.send_many(jobs).map_err(|e| e.to_string())
    }

    async fn next(&mut self) -> Option<Output> {
        self.controller.as_ref()?.receive_wait(None).await
    }

    async fn cancel_all(&mut self) {
        if let Some(c) = &self.controller {
            c.cancel_all();
        }
    }

    fn capacity(&self) -> usize {
        // Each worker runs one job and holds one more (prefetch 1).
        self.workers as usize * 2
    }
}

/// Progress on a terminal: one line on stderr, redrawn.
struct Progress {
    on: bool,
    total: usize,
    done: usize,
    running: usize,
}

impl Progress {
    fn draw(&self) {
        if !self.on {
            return;
        }
        let width = 30;
        let filled = (self.done * width).checked_div(self.total).unwrap_or(0).min(width);
        eprint!(
            "\r[{}{}] {}/{} targets, {} running ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.done,
            self.total,
            self.running
        );
        let _ = std::io::stderr().flush();
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r{}\r", " ".repeat(70));
        }
    }
}

pub(crate) fn make(global_dir: Option<PathBuf>, args: MakeArgs) -> Result<u8, Failure> {
    let workers = match args.workers {
        Some(0) => return Err(Failure::usage(anyhow::anyhow!("--workers must be at least 1"))),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let explicit_tags: Option<Tags> = match &args.tags {
        Some(t) => Some(t.parse().map_err(Failure::usage)?),
        None => None,
    };
    if !args.daemon {
        // An unknown class is bad input, before anything is read.
        Registry::stock().get(&args.class).map_err(crate::registry::ClassError::failure)?;
    }
    if args.daemon && args.pipeline.seed != 0 {
        // The daemon derives every job's CREW_SEED from crew seed 0; a
        // target's identity must name the seed its job really got.
        return Err(Failure::usage(anyhow::anyhow!(
            "--seed {} cannot be used with --daemon: the daemon's jobs get crew seed 0 (leave --seed out, or build without --daemon)",
            args.pipeline.seed
        )));
    }
    // With --daemon the daemon's store holds the cache: its agents upload there.
    let (daemon, store_override) = if args.daemon {
        let dir = match global_dir {
            Some(d) => crate::project::project_dir(Some(d))?,
            None => {
                let root = args.pipeline.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                crate::project::project_dir(Some(root.join(".crew")))?
            }
        };
        let (_, health) = crate::project::ensure_daemon(&dir)?;
        if let Some(s) = &args.pipeline.store {
            let given = crew_core::store::open_store(s).map_err(Failure::usage)?.url();
            if given != health.store {
                return Err(Failure::usage(anyhow::anyhow!(
                    "--store {s} is not the daemon's store ({}); with --daemon the daemon's store holds the cache (start the daemon with crew up --store)",
                    health.store
                )));
            }
        }
        (Some(dir), Some(health.store))
    } else {
        (None, None)
    };
    let rt = runtime()?;
    let memo_key = noop_memo_key(&args, store_override.as_deref());
    if let Some((key, root, store)) = &memo_key {
        let state_dir = root.join(".crew/pipeline");
        if let Some(n) = rt.block_on(crew_pipeline::memo::check(&state_dir, root, key, store.as_ref())) {
            eprintln!("crew: 0 job(s) ran; 0 built, {n} up to date, 0 failed");
            return Ok(EXIT_OK);
        }
    }
    let mut l = load(&args.pipeline, store_override)?;
    let wanted = wanted(&l.plan, &args.targets)?;
    let needed_tags: Tags = {
        let mut all = Vec::new();
        for t in &l.plan.file.targets {
            all.extend(t.tags.iter().map(str::to_owned));
        }
        Tags::try_from_iter(all).map_err(Failure::usage)?
    };
    let worker_tags = match explicit_tags {
        Some(t) => {
            if let Some(bad) = l.plan.file.targets.iter().find(|d| !t.satisfies(&d.tags)) {
                return Err(Failure::usage(anyhow::anyhow!(
                    "{}: target {} needs tags [{}]; the workers have [{t}] (set them with --tags, or leave --tags out)",
                    bad.loc,
                    bad.name,
                    bad.tags
                )));
            }
            t
        }
        None => needed_tags,
    };
    let _ = crew_worker_local::become_subreaper();
    rt.block_on(l.store.check()).map_err(|e| crate::registry::store_failure(&l.store.url(), e))?;
    let opts = Options {
        keep_going: args.keep_going,
        dry_run: false,
        seed: args.pipeline.seed,
        state_dir: Some(l.state_dir.clone()),
        memo_key: memo_key.map(|(key, ..)| key),
    };
    let json = args.json;
    let mut local = LocalExecutor {
        controller: None,
        store: Arc::clone(&l.store),
        class: args.class.clone(),
        workers,
        tags: worker_tags,
        seed: args.pipeline.seed,
    };
    let mut remote = daemon.clone().map(crate::make_daemon::DaemonExecutor::new);
    let result = rt.block_on(async {
        let executor: &mut dyn Executor = match remote.as_mut() {
            Some(r) => r,
            None => &mut local,
        };
        let mut printer = Printer::new(json, std::io::BufWriter::new(std::io::stdout().lock()));
        let mut progress = Progress { on: !json && std::io::stderr().is_terminal(), total: 0, done: 0, running: 0 };
        let mut warnings = Vec::new();
        let stop = async {
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
                _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("\ncrew: stopping; cancelling the running targets (none of them is recorded)");
        };
        let stop = std::pin::pin!(stop);
        let store = Arc::clone(&l.store);
        let report = crew_pipeline::build(&mut l.plan, &wanted, store, Some(executor), &opts, stop, &mut |event| {
            match event {
                Event::Total(n) => progress.total = n,
                Event::UpToDate(_) | Event::Skipped(..) | Event::Expanded(..) => progress.done += 1,
                Event::Started(..) => progress.running += 1,
                Event::Ended(_, output) => {
                    progress.running = progress.running.saturating_sub(1);
                    progress.done += 1;
                    progress.clear();
                    let _ = printer.print(output);
                    let _ = printer.flush();
                }
                Event::Warning(w) => warnings.push(w),
            }
            progress.draw();
        })
        .await;
        progress.clear();
        let _ = printer.flush();
        for w in warnings {
            eprintln!("crew: {w}");
        }
        if let Some(c) = local.controller.take() {
            c.close().await;
        }
        report
    });
    drop(rt);
    crew_worker_local::kill_orphans();
    let refused = remote.as_ref().is_some_and(|r| r.refused);
    let report = result.map_err(|e| if refused { Failure::usage(e) } else { build_failure(e) })?;
    Ok(summarize(&report, &l.plan))
}

/// The key of the no-op memo of this `crew make` (with the pipeline's
/// folder and its store), or `None` when the file or the store cannot be
/// reached (the full run then says why).
fn noop_memo_key(args: &MakeArgs, store_override: Option<&str>) -> Option<(String, PathBuf, Arc<dyn Store>)> {
    let text = std::fs::read(&args.pipeline.file).ok()?;
    let parent = args.pipeline.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let root = std::fs::canonicalize(parent).ok()?;
    let url = match store_override.or(args.pipeline.store.as_deref()) {
        Some(s) => s.to_owned(),
        None => root.join(".crew/store").to_string_lossy().into_owned(),
    };
    let store = crew_core::store::open_store(&url).ok()?;
    let key = crew_pipeline::memo::MemoKey {
        text: &text,
        root: &root,
        store: &store.url(),
        seed: args.pipeline.seed,
        targets: &args.targets,
        extra: args.tags.as_deref().unwrap_or(""),
    }
    .digest();
    Some((key, root, store))
}

/// Prints the end of a build on stderr and picks the exit status.
fn summarize(report: &Report, plan: &Plan) -> u8 {
    let (mut jobs, mut built, mut fresh, mut failed, mut pending) = (0, 0, 0, 0, 0);
    for (i, (label, state)) in report.states.iter().enumerate() {
        // A mapped target is counted by its branches.
        if matches!(plan.nodes.get(i).map(|n| &n.kind), Some(NodeKind::Group { .. })) {
            continue;
        }
        jobs += 1;
        match state {
            State::Built => built += 1,
            State::UpToDate => fresh += 1,
            State::Pending => pending += 1,
            State::Failed { error } => {
                failed += 1;
                eprintln!("crew: target {label} failed: {error}");
            }
            State::Skipped { because } => eprintln!("crew: target {label} not built: {because} failed"),
            State::Outdated { .. } | State::Cancelled => {}
        }
    }
    let other = jobs - built - fresh - failed - pending;
    eprintln!(
        "crew: {} job(s) ran; {built} built, {fresh} up to date, {failed} failed{}",
        report.ran,
        if other > 0 { format!(", {other} not built") } else { String::new() }
    );
    if report.all_done { EXIT_OK } else { EXIT_JOB_FAILED }
}

// ---------------------------------------------------------------------------
// crew outdated, why, graph

pub(crate) fn outdated(args: OutdatedArgs) -> Result<u8, Failure> {
    let mut l = load(&args.pipeline, None)?;
    let wanted = wanted(&l.plan, &args.targets)?;
    let report = evaluate(&mut l, &wanted, args.pipeline.seed)?;
    let mut out = std::io::stdout().lock();
    let mut any = false;
    for (label, state) in &report.states {
        let State::Outdated { reasons } = state else { continue };
        any = true;
        if args.json {
            let line = serde_json::json!({"target": label, "reasons": reasons});
            writeln!(out, "{line}").map_err(Failure::internal)?;
        } else {
            writeln!(out, "{label}: {}", reasons.join("; ")).map_err(Failure::internal)?;
        }
    }
    if !any && !args.json {
        eprintln!("crew: every target is up to date");
    }
    Ok(if any { EXIT_JOB_FAILED } else { EXIT_OK })
}

pub(crate) fn why(args: WhyArgs) -> Result<u8, Failure> {
    let mut l = load(&args.pipeline, None)?;
    let wanted = wanted(&l.plan, std::slice::from_ref(&args.target))?;
    let report = evaluate(&mut l, &wanted, args.pipeline.seed)?;
    let state = report.states.get(wanted[0]).map(|(_, s)| s.clone()).unwrap_or(State::Pending);
    let reasons = match &state {
        State::Outdated { reasons } => reasons.clone(),
        State::UpToDate => Vec::new(),
        State::Pending => vec!["its branches are known only when the target that lists them has run".to_owned()],
        other => vec![other.name().to_owned()],
    };
    if args.json {
        crate::cmd::print_json(&serde_json::json!({"target": args.target, "state": state.name(), "reasons": reasons}))?;
    } else if state == State::UpToDate {
        println!("{} is up to date", args.target);
    } else {
        println!("{} would run:", args.target);
        for r in &reasons {
            println!("  - {r}");
        }
    }
    Ok(EXIT_OK)
}

pub(crate) fn graph(args: GraphArgs) -> Result<u8, Failure> {
    let format = match args.format.as_str() {
        "dot" => graph::Format::Dot,
        "mermaid" => graph::Format::Mermaid,
        other => return Err(Failure::usage(anyhow::anyhow!("--format {other:?}: use dot or mermaid"))),
    };
    let mut l = load(&args.pipeline, None)?;
    let wanted = l.plan.all_targets();
    let report = evaluate(&mut l, &wanted, args.pipeline.seed)?;
    let states: Vec<State> = report.states.into_iter().map(|(_, s)| s).collect();
    print!("{}", graph::render(&l.plan, &states, format));
    Ok(EXIT_OK)
}

// ---------------------------------------------------------------------------
// crew clean, gc

pub(crate) fn clean(args: CleanArgs) -> Result<u8, Failure> {
    let l = load(&args.pipeline, None)?;
    let mut prefixes = Vec::new();
    let mut keys = Vec::new();
    if args.targets.is_empty() {
        prefixes.push(RECORDS_PREFIX.to_owned());
    } else {
        for name in &args.targets {
            let id = wanted(&l.plan, std::slice::from_ref(name))?[0];
            let def = l.plan.def(id);
            match &l.plan.nodes[id].kind {
                NodeKind::Group { .. } => prefixes.push(format!("{RECORDS_PREFIX}/{}", def.name)),
                NodeKind::Job(_) => keys.push(
                    crew_pipeline::record::record_key(&def.name, &l.plan.nodes[id].label).map_err(Failure::internal)?,
                ),
            }
        }
    }
    let rt = runtime()?;
    let n = rt
        .block_on(async {
            for p in prefixes {
                for m in l.store.list(&StoreKey::new(p)?).await? {
                    keys.push(m.key);
                }
            }
            for k in &keys {
                l.store.delete(k).await?;
            }
            // Every index cached elsewhere is stale now.
            crew_pipeline::index::bump(l.store.as_ref()).await?;
            Ok::<_, crew_core::store::StoreError>(keys.len())
        })
        .map_err(|e| crate::registry::store_failure(&l.store.url(), e))?;
    eprintln!("crew: forgot {n} record(s); the next crew make builds those targets again");
    Ok(EXIT_OK)
}

pub(crate) fn gc(args: GcArgs) -> Result<u8, Failure> {
    let older = crew_core::job::parse_duration(&args.older_than)
        .map_err(|e| Failure::usage(anyhow::anyhow!("--older-than: {e}")))?;
    let l = load(&args.pipeline, None)?;
    let rt = runtime()?;
    let store = Arc::clone(&l.store);
    let (deleted, bytes, young) = rt
        .block_on(async move {
            let records =
                crew_pipeline::index::read_all_records(store.as_ref()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            // What records reference: their builds' folders and the staged
            // sources of their inputs.
            let mut keep_prefixes = HashSet::new();
            let mut keep_keys = HashSet::new();
            for r in &records {
                for o in &r.outputs {
                    if let Some((folder, _)) = o.key.split_once("/outputs/") {
                        keep_prefixes.insert(format!("{folder}/"));
                    }
                    keep_keys.insert(o.key.clone());
                }
                for sha in r.identity.inputs.values() {
                    keep_keys.insert(format!("{CAS_PREFIX}/{sha}"));
                }
            }
            let now = SystemTime::now();
            let (mut deleted, mut bytes, mut young) = (0usize, 0u64, 0usize);
            for prefix in [OBJECTS_PREFIX, CAS_PREFIX] {
                for m in store.list(&StoreKey::new(prefix)?).await? {
                    let k = m.key.as_str();
                    if keep_keys.contains(k) || keep_prefixes.iter().any(|p| k.starts_with(p.as_str())) {
                        continue;
                    }
                    let age = m.last_modified.and_then(|t| now.duration_since(t).ok()).unwrap_or(Duration::ZERO);
                    if age < older {
                        young += 1;
                        continue;
                    }
                    if args.dry_run {
                        println!("{k}");
                    } else {
                        store.delete(&m.key).await?;
                    }
                    deleted += 1;
                    bytes += m.size;
                }
            }
            if deleted > 0 && !args.dry_run {
                crew_pipeline::index::bump(store.as_ref()).await?;
            }
            Ok::<_, anyhow::Error>((deleted, bytes, young))
        })
        .map_err(Failure::internal)?;
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    if args.json {
        crate::cmd::print_json(
            &serde_json::json!({"deleted": deleted, "bytes": bytes, "kept_young": young, "dry_run": args.dry_run}),
        )?;
    } else {
        eprintln!(
            "crew: {verb} {deleted} object(s), {bytes} bytes; kept {young} unreferenced object(s) younger than {}",
            args.older_than
        );
    }
    Ok(EXIT_OK)
}
