//! `crew-worker-ssh`: the `ssh` class as a plugin of the stock `crew`
//! binary. Put it on `PATH` and use `--class ssh` (docs/plugin-protocol.md).

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    crew_core::plugin::serve(crew_worker_ssh::SshWorker::new()).await
}
