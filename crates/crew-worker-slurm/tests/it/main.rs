//! The `slurm` class against a real one-node Slurm that each test starts
//! ([`cluster`]): the worker conformance kit, one array for many slots,
//! a worker's job cancelled mid-job, a partition that does not exist, the
//! calls made for 100 jobs, and the stock `crew` binary (`crew up`,
//! `crew recruit --class slurm`, `crew down`, `crew run --class slurm`).
//!
//! The agents are this very test binary (`--exact agent_entry`), started
//! by slurmd as array tasks, except for the stock binary's tests, which
//! run `crew worker`.

mod class;
mod cluster;
mod stock;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crew_conformance::{WorkerKit, worker};
use crew_controller::AgentCommand;
use crew_exec::builtins::Builtins;
use crew_worker_slurm::SlurmWorker;

use cluster::Cluster;

/// Entry point of the agent processes; a no-op in a normal test run.
#[test]
#[ignore = "entry point of agent processes started by the tests"]
fn agent_entry() {
    crew_agent::run_if_agent(Builtins::standard());
}

/// This test binary as the agent.
pub(crate) fn test_agent() -> AgentCommand {
    let exe = std::env::current_exe().expect("test binary path").to_string_lossy().into_owned();
    AgentCommand {
        program: exe,
        args: ["--exact", "agent_entry", "--include-ignored", "--nocapture", "--test-threads=1", "-q"]
            .map(String::from)
            .to_vec(),
        name: None,
    }
}

/// The class on `cluster`: its commands through the counting shims, its
/// state in the cluster's folder, partition `debug`, probed every 500 ms.
pub(crate) fn class_on(cluster: &Cluster, extra: &[(&str, &str)]) -> SlurmWorker {
    let mut defaults: BTreeMap<String, String> = BTreeMap::from([
        ("state_dir".to_owned(), cluster.state_dir().display().to_string()),
        ("partition".to_owned(), "debug".to_owned()),
    ]);
    for (k, v) in extra {
        defaults.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut class = SlurmWorker::with_defaults(defaults).with_probe_interval(Duration::from_millis(500));
    for (k, v) in cluster.env() {
        class = class.with_command_env(k, v);
    }
    class
}

/// The stock `crew` binary of this build (`target/<profile>/crew`, next to
/// this test's `deps` folder), when it was built.
pub(crate) fn stock_crew() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let crew = exe.parent()?.parent()?.join("crew");
    crew.exists().then_some(crew)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_class_passes_the_worker_conformance_kit_on_a_real_slurm() {
    let Some(cluster) = Cluster::start() else { return };
    let mut kit = WorkerKit::local(test_agent());
    kit.launch_timeout = Duration::from_secs(60);
    kit.gone_timeout = Duration::from_secs(60);
    worker(std::sync::Arc::new(class_on(&cluster, &[])), kit).await;
    // The kit's launches were arrays: no more sbatch calls than launches,
    // and no job left behind.
    assert!(cluster.calls("sbatch") >= 1);
    class::until_queue_empty(&cluster).await;
}
