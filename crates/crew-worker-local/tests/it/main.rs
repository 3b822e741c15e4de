//! Integration tests of the `local` class: the conformance kit with real
//! agent processes.
//!
//! The agent is this very test binary: when the controller starts it with
//! `--exact agent_entry`, libtest runs only [`agent_entry`], which turns
//! the process into an agent (the embedding route of
//! `crew_core::agent::run_if_agent`).

use std::sync::Arc;

use crew_core::builtins::Builtins;
use crew_core::conformance::{WorkerKit, worker};
use crew_core::controller::AgentCommand;
use crew_worker_local::LocalWorker;

/// Entry point of the agent processes; a no-op in a normal test run.
#[test]
#[ignore = "entry point of agent processes started by the tests"]
fn agent_entry() {
    crew_core::agent::run_if_agent(Builtins::standard());
}

fn agent() -> AgentCommand {
    let exe = std::env::current_exe().expect("test binary path");
    AgentCommand {
        program: exe.to_string_lossy().into_owned(),
        args: ["--exact", "agent_entry", "--include-ignored", "--nocapture", "--test-threads=1", "-q"]
            .map(String::from)
            .to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_class_passes_the_worker_conformance_kit() {
    worker(Arc::new(LocalWorker::with_grace(std::time::Duration::from_secs(1))), WorkerKit::local(agent())).await;
}
