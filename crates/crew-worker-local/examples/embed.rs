//! Embedding crew in a Rust program: the controller runs in this process,
//! and this same executable is the agent of its local workers (so the
//! builtin registered here is available on them).
//!
//! Run with `cargo run -p crew-worker-local --example embed`.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit};
use crew_core::{JobSpec, Status};
use crew_exec::builtins::{BuiltinError, BuiltinOutput, Builtins};
use crew_worker_local::LocalWorker;

fn builtins() -> Builtins {
    Builtins::standard().with("square", |args, _ctx| async move {
        let x = args.as_f64().ok_or_else(|| BuiltinError::msg("square takes a number"))?;
        Ok(BuiltinOutput::stdout(format!("{}", x * x)))
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    // When the controller starts this executable as an agent, this call
    // runs the agent and never returns.
    crew_agent::run_if_agent(builtins());

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let controller = Controller::start(ControllerConfig::new(AgentCommand::current_exe()?)).await?;
        controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 4))?;
        let mut jobs: Vec<JobSpec> = (1..=8).map(|i| JobSpec::builtin("square", serde_json::json!(i))).collect();
        jobs.push(JobSpec::shell("echo hello from $CREW_WORKER").with_name("greeting"));
        let n = jobs.len();
        controller.send_many(jobs)?;
        let mut failed = 0;
        for _ in 0..n {
            let Some(o) = controller.receive_wait(Some(Duration::from_secs(60))).await else { break };
            println!(
                "job {:>2} {:<9} on {:<8} {}",
                o.id,
                o.status,
                o.slot.as_deref().unwrap_or("-"),
                o.stdout.text.trim()
            );
            if o.status != Status::Succeeded {
                failed += 1;
            }
        }
        controller.close().await;
        if failed > 0 {
            return Err(format!("{failed} job(s) failed").into());
        }
        Ok::<_, Box<dyn Error>>(())
    })
}
