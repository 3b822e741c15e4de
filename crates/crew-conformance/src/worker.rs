//! The worker conformance kit: what every `Worker` class must do.
//!
//! The kit drives the class both directly (probe, terminate, unknown
//! handles) and through a real [`Controller`] with real agents, because the
//! contract that matters to users is end to end: agents the class starts
//! connect back, run jobs, die and get replaced, and leave nothing running
//! once terminated.
//!
//! It needs the agent command for the class's workers — for a class that
//! starts processes on this machine, the `crew` binary (`crew worker`) or a
//! test binary that calls [`crew_agent::run_if_agent`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit};
use crew_core::job::JobSpec;
use crew_core::output::Status;
use crew_core::worker::{Handle, Liveness, Worker};
use crew_scheduler::{SlotFilter, SlotLimits};

/// Options of the worker kit: start from [`WorkerKit::local`] and change
/// what differs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerKit {
    /// How agents are started.
    pub agent: AgentCommand,
    /// How long a worker may take from launch to connected.
    pub launch_timeout: Duration,
    /// How long terminated workers may take to be reported gone.
    pub gone_timeout: Duration,
    /// Tests of job behaviour through a shell (`sh -c`), which need agents
    /// that can run `/bin/sh`.
    pub shell_jobs: bool,
    /// The class options of every recruit (`--opt key=value`), checked by
    /// the class first.
    pub options: BTreeMap<String, String>,
}

impl WorkerKit {
    /// Defaults for a class that starts processes on this machine.
    pub fn local(agent: AgentCommand) -> Self {
        Self {
            agent,
            launch_timeout: Duration::from_secs(20),
            gone_timeout: Duration::from_secs(20),
            shell_jobs: true,
            options: BTreeMap::new(),
        }
    }
}

async fn until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "worker conformance: timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start(kit: &WorkerKit) -> Controller {
    let mut config = ControllerConfig::new(kit.agent.clone());
    config.stop_grace = Duration::from_secs(2);
    Controller::start(config).await.unwrap_or_else(|e| panic!("worker conformance: controller did not start: {e}"))
}

/// `count` slots of `class` with the kit's limits and options.
fn recruit(class: Arc<dyn Worker>, count: u32, kit: &WorkerKit) -> Recruit {
    let mut recruit = Recruit::new(class, count);
    recruit.limits = limits(kit);
    recruit.options = kit.options.clone();
    recruit
}

fn limits(kit: &WorkerKit) -> SlotLimits {
    SlotLimits { launch_timeout: kit.launch_timeout, ..SlotLimits::default() }
}

/// Runs the whole kit against `class`. Panics, naming the broken rule, on
/// the first failure. Needs a Tokio runtime with timers and I/O.
pub async fn worker(class: Arc<dyn Worker>, kit: WorkerKit) {
    capabilities_are_sane(class.as_ref());
    if let Err(e) = class.check_options(&kit.options) {
        panic!("worker conformance: the class refused the kit's options: {e}");
    }
    unknown_handles_are_not_errors(class.as_ref()).await;
    agents_connect_run_and_terminate(class.clone(), &kit).await;
    if kit.shell_jobs {
        a_killed_worker_is_replaced(class.clone(), &kit).await;
    }
    a_failing_launch_ends_launch_failed(class, &kit).await;
}

fn capabilities_are_sane(class: &dyn Worker) {
    let caps = class.capabilities();
    assert!(caps.launch_batch_max >= 1, "worker conformance: launch_batch_max must be at least 1");
    assert!(caps.probe_batch_max >= 1, "worker conformance: probe_batch_max must be at least 1");
    assert!(!caps.probe_interval.is_zero(), "worker conformance: probe_interval must not be zero");
    assert!(!class.class().is_empty(), "worker conformance: the class needs a name");
}

async fn unknown_handles_are_not_errors(class: &dyn Worker) {
    let bogus = vec![Handle::new("crew-conformance-no-such-worker")];
    let lives = class
        .probe(&bogus)
        .await
        .unwrap_or_else(|e| panic!("worker conformance: probing an unknown handle must not fail: {e}"));
    assert_eq!(lives.len(), 1, "worker conformance: probe must return one liveness per handle");
    assert!(
        matches!(lives[0], Liveness::Unknown | Liveness::Exited { .. }),
        "worker conformance: an unknown handle must probe as Unknown or Exited, got {:?}",
        lives[0]
    );
    class
        .terminate(&bogus)
        .await
        .unwrap_or_else(|e| panic!("worker conformance: terminating an unknown handle must succeed: {e}"));
}

async fn agents_connect_run_and_terminate(class: Arc<dyn Worker>, kit: &WorkerKit) {
    let controller = start(kit).await;
    let names = controller.recruit(recruit(class.clone(), 3, kit)).expect("worker conformance: recruit failed");
    assert_eq!(controller.launch(&SlotFilter::default(), 3), 3, "worker conformance: three slots should launch");
    until("three launched workers connect", kit.launch_timeout, || {
        controller.status().slots.iter().filter(|s| s.state == crew_controller::SlotCondition::Idle).count() == 3
    })
    .await;
    let handles: Vec<Handle> = controller
        .status()
        .slots
        .iter()
        .map(|s| Handle::new(s.handle.clone().expect("worker conformance: a connected slot has a handle")))
        .collect();
    // A class may answer probes from a cache refreshed every probe
    // interval, so Running may show up one interval after the connection.
    let deadline = Instant::now() + kit.launch_timeout;
    loop {
        let lives = class.probe(&handles).await.expect("worker conformance: probe failed");
        assert_eq!(lives.len(), handles.len(), "worker conformance: probe must return one liveness per handle");
        if lives.iter().all(|l| *l == Liveness::Running) {
            break;
        }
        assert!(
            Instant::now() < deadline && lives.iter().all(|l| matches!(l, Liveness::Running | Liveness::Starting)),
            "worker conformance: a connected agent must probe as Running, got {lives:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Jobs run on the class's workers and say so.
    let jobs: Vec<JobSpec> = (0..9).map(|i| JobSpec::builtin("echo", serde_json::json!(format!("job {i}")))).collect();
    controller.send_many(jobs).expect("worker conformance: send failed");
    for _ in 0..9 {
        let o = controller
            .receive_wait(Some(Duration::from_secs(30)))
            .await
            .expect("worker conformance: a job did not finish within 30s");
        assert_eq!(o.status, Status::Succeeded, "worker conformance: job failed: {o:?}");
        assert_eq!(o.class.as_deref(), Some(class.class()), "worker conformance: wrong class in output");
        assert!(o.slot.as_ref().is_some_and(|s| names.contains(s)), "worker conformance: unknown slot in output");
    }
    // Terminate directly: every agent goes, and terminate is idempotent.
    class.terminate(&handles).await.expect("worker conformance: terminate failed");
    let deadline = Instant::now() + kit.gone_timeout;
    loop {
        let lives = class.probe(&handles).await.expect("worker conformance: probe failed");
        if lives.iter().all(|l| matches!(l, Liveness::Exited { .. } | Liveness::Unknown)) {
            break;
        }
        assert!(Instant::now() < deadline, "worker conformance: terminated agents still alive: {lives:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    class.terminate(&handles).await.expect("worker conformance: terminating twice must succeed");
    controller.close().await;
}

async fn a_killed_worker_is_replaced(class: Arc<dyn Worker>, kit: &WorkerKit) {
    let controller = start(kit).await;
    controller.recruit(recruit(class, 2, kit)).expect("worker conformance: recruit failed");
    // The job kills its own agent (its parent) on the first attempt only.
    let line = r#"if [ "$CREW_ATTEMPT" = 1 ]; then kill -9 $PPID; sleep 5; fi; echo survived"#;
    let id = controller.send(JobSpec::shell(line)).expect("worker conformance: send failed");
    let o = controller
        .receive_wait(Some(kit.launch_timeout * 3))
        .await
        .expect("worker conformance: the crashed job was not re-run in time");
    assert_eq!(o.id, id);
    assert_eq!(o.status, Status::Succeeded, "worker conformance: the re-run job must succeed: {o:?}");
    assert_eq!(o.attempt, 2, "worker conformance: the re-run must be attempt 2");
    assert_eq!(o.stdout.text.trim(), "survived");
    controller.close().await;
}

async fn a_failing_launch_ends_launch_failed(class: Arc<dyn Worker>, kit: &WorkerKit) {
    let mut bad = kit.clone();
    bad.agent = AgentCommand { program: "/nonexistent/crew-conformance-agent".into(), args: vec![], name: None };
    let controller = start(&bad).await;
    let mut one = recruit(class, 1, kit);
    one.limits = SlotLimits { launch_max: 2, launch_timeout: kit.launch_timeout, ..SlotLimits::default() };
    controller.recruit(one).expect("worker conformance: recruit failed");
    controller.send(JobSpec::builtin("noop", serde_json::Value::Null)).expect("worker conformance: send failed");
    let o = controller
        .receive_wait(Some(kit.launch_timeout * 3))
        .await
        .expect("worker conformance: a job on a class that cannot launch must end, not hang");
    assert_eq!(o.status, Status::LaunchFailed, "worker conformance: expected launch_failed: {o:?}");
    let err = o.error.unwrap_or_default();
    assert!(!err.is_empty(), "worker conformance: launch_failed needs a reason");
    controller.close().await;
}
