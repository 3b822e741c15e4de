//! The other way in: a `crew` of your own with the ssh class compiled in —
//! every stock command and class, plus `--class ssh`, with no plugin on
//! `PATH`. Build it with `cargo build --example crew-ssh`.

fn main() -> std::process::ExitCode {
    crew_cli::App::new().with_class(crew_worker_ssh::SshWorker::default()).run()
}
