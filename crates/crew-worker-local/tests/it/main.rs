//! Integration tests of the `local` class: the conformance kit with real
//! agent processes.
//!
//! The agent is this very test binary: when the controller starts it with
//! `--exact agent_entry`, libtest runs only [`agent_entry`], which turns
//! the process into an agent (the embedding route of
//! `crew_agent::run_if_agent`).

use std::sync::Arc;

use crew_conformance::{WorkerKit, worker};
use crew_controller::AgentCommand;
use crew_exec::builtins::Builtins;
use crew_worker_local::LocalWorker;

/// Entry point of the agent processes; a no-op in a normal test run.
#[test]
#[ignore = "entry point of agent processes started by the tests"]
fn agent_entry() {
    crew_agent::run_if_agent(Builtins::standard());
}

fn agent() -> AgentCommand {
    let exe = std::env::current_exe().expect("test binary path");
    AgentCommand {
        program: exe.to_string_lossy().into_owned(),
        args: ["--exact", "agent_entry", "--include-ignored", "--nocapture", "--test-threads=1", "-q"]
            .map(String::from)
            .to_vec(),
        name: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_class_passes_the_worker_conformance_kit() {
    worker(Arc::new(LocalWorker::with_grace(std::time::Duration::from_secs(1))), WorkerKit::local(agent())).await;
}

/// Records every assignment it is told of.
#[derive(Debug, Default)]
struct Assignments(std::sync::Mutex<Vec<(crew_core::JobId, u32)>>);

impl crew_controller::Observer for Assignments {
    fn assigned(&self, job: crew_core::JobId, attempt: u32, _slot: &str) {
        self.0.lock().expect("not poisoned").push((job, attempt));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_jobs_keep_ids_seeds_and_attempts() {
    use crew_controller::{Controller, ControllerConfig, Recruit, RestoredJob};
    use crew_core::{JobId, JobSpec, Status};
    use crew_scheduler::History;

    let observer = Arc::new(Assignments::default());
    let mut config = ControllerConfig::new(agent());
    config.seed = 5;
    config.first_job_id = 40;
    config.observer = Some(observer.clone());
    let controller = Controller::start(config).await.expect("start");
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit");
    let restored = RestoredJob {
        id: JobId(41),
        spec: JobSpec::shell("echo $CREW_SEED $CREW_ATTEMPT").with_name("fit"),
        history: History { attempts: 1, crashes: 1, failures: 0 },
        slot: None,
    };
    controller.restore(vec![restored]).expect("restore");
    let o = controller.receive_wait(Some(std::time::Duration::from_secs(20))).await.expect("an output");
    assert_eq!((o.id, o.status, o.attempt), (JobId(41), Status::Succeeded, 2));
    assert_eq!(o.seed, crew_core::seed::job_seed(5, "fit"), "the seed derives from the name, as before the restart");
    assert_eq!(o.stdout.text.trim(), format!("{} 2", o.seed));
    // New jobs are numbered after the restored ones.
    let id = controller.send(JobSpec::builtin("noop", serde_json::Value::Null)).expect("send");
    assert_eq!(id, JobId(42));
    controller.receive_wait(Some(std::time::Duration::from_secs(20))).await.expect("an output");
    assert_eq!(*observer.0.lock().expect("not poisoned"), vec![(JobId(41), 2), (JobId(42), 1)]);
    controller.close().await;
}

/// Two recruits with two instances of the same class: each instance knows
/// only its own agents, so the controller must probe and terminate through
/// the instance that launched each slot (it once grouped by class name, and
/// the second recruit's workers were probed as unknown and dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_a_class_keep_their_own_workers() {
    use crew_controller::{Controller, ControllerConfig, Recruit};
    use crew_scheduler::SlotFilter;

    let controller = Controller::start(ControllerConfig::new(agent())).await.expect("start");
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit a");
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit b");
    assert_eq!(controller.launch(&SlotFilter::default(), 2), 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while controller.status().slots.iter().filter(|s| s.state == crew_controller::SlotCondition::Idle).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", controller.status());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Several probe intervals later, both are still up.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let st = controller.status();
    assert!(st.slots.iter().all(|s| s.state == crew_controller::SlotCondition::Idle), "a worker was dropped: {st:?}");
    controller.close().await;
    for s in &st.slots {
        let pid = s.handle.clone().expect("a pid");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "agent {pid} outlived close");
    }
}
