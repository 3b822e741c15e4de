//! The daemon commands (`crew up`, `crew send`, `crew receive`, ...): thin
//! clients of the daemon API (docs/api.md), one module per command or small
//! group. Flags are validated here, before any request, so that a typo
//! neither starts a daemon nor reaches it.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use crew_core::Tags;
use crew_core::job::parse_duration;
use crew_core::job::{Input, InputSource};
use serde::Serialize;

use crate::client::{Client, ClientError};
use crate::{EXIT_INTERNAL, EXIT_USAGE, Failure, project};

mod dashboard;
mod fetch;
mod jobs;
mod lifecycle;
mod receive;
mod send;
mod status;
mod workers;

/// The commands that talk to the daemon of a project folder.
#[derive(Subcommand, Debug)]
pub(crate) enum ClientCommand {
    /// Start the project's daemon if it is not running; print its pid.
    Up(lifecycle::UpArgs),
    /// Stop every worker and the daemon, and wait until the daemon is gone.
    Down(lifecycle::DownArgs),
    /// Add worker slots of a class (they start when jobs need them).
    Recruit(workers::RecruitArgs),
    /// Start down slots now instead of when jobs need them.
    Launch(workers::LaunchArgs),
    /// Send a job (`-- CMD ARGS..`) or a file of jobs (`--file`); print ids.
    Send(send::SendArgs),
    /// Print finished outputs (each once) as a table or JSON Lines.
    Receive(receive::ReceiveArgs),
    /// Block until every job (or one) has finished, without receiving.
    Wait(receive::WaitArgs),
    /// Show the slots and the job counts.
    Status(status::StatusArgs),
    /// Print (and on a desktop, open) the URL of the live dashboard:
    /// slots, jobs, throughput and latency, each job's record and logs.
    Dashboard(dashboard::DashboardArgs),
    /// Exit 0 if a recruited, usable slot has all these tags, else 1.
    Sendable(status::SendableArgs),
    /// Exit 0 if an output is ready to be received, else 1.
    Receivable(status::ReceivableArgs),
    /// Stop workers (idle ones unless --all); their slots stay.
    Shutdown(workers::ShutdownArgs),
    /// Remove slots.
    Dismiss(workers::DismissArgs),
    /// Relaunch stuck slots and make broken ones usable again.
    Restart(workers::RestartArgs),
    /// Cancel jobs by id.
    Cancel(jobs::CancelArgs),
    /// Print a finished job's whole stdout and stderr.
    Logs(jobs::LogsArgs),
    /// Download a finished job's outputs from the store (checked) into a folder.
    Fetch(fetch::FetchArgs),
}

/// Runs a daemon command against the project folder `dir` (from `--dir`
/// or `$CREW_DIR`).
pub(crate) fn main(dir: Option<PathBuf>, command: ClientCommand) -> Result<u8, Failure> {
    let dir = project::project_dir(dir)?;
    let ctx = Ctx { dir };
    match command {
        ClientCommand::Up(a) => lifecycle::up(&ctx, a),
        ClientCommand::Down(a) => lifecycle::down(&ctx, a),
        ClientCommand::Recruit(a) => workers::recruit(&ctx, a),
        ClientCommand::Launch(a) => workers::launch(&ctx, a),
        ClientCommand::Send(a) => send::send(&ctx, a),
        ClientCommand::Receive(a) => receive::receive(&ctx, a),
        ClientCommand::Wait(a) => receive::wait(&ctx, a),
        ClientCommand::Status(a) => status::status(&ctx, a),
        ClientCommand::Dashboard(a) => dashboard::dashboard(&ctx, a),
        ClientCommand::Sendable(a) => status::sendable(&ctx, a),
        ClientCommand::Receivable(a) => status::receivable(&ctx, a),
        ClientCommand::Shutdown(a) => workers::shutdown(&ctx, a),
        ClientCommand::Dismiss(a) => workers::dismiss(&ctx, a),
        ClientCommand::Restart(a) => workers::restart(&ctx, a),
        ClientCommand::Cancel(a) => jobs::cancel(&ctx, a),
        ClientCommand::Logs(a) => jobs::logs(&ctx, a),
        ClientCommand::Fetch(a) => fetch::fetch(&ctx, a),
    }
}

/// What every command knows: the project folder.
pub(crate) struct Ctx {
    dir: PathBuf,
}

impl Ctx {
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection to the daemon, started if needed.
    pub(crate) fn client(&self) -> Result<Client, Failure> {
        project::ensure_daemon(&self.dir).map(|(c, _)| c)
    }
}

/// Maps a request failure to the exit status: 2 when the daemon refused the
/// user's input (4xx), 3 otherwise (5xx, connection, protocol).
pub(crate) fn api(e: ClientError) -> Failure {
    let code = match &e {
        ClientError::Api(a) if a.is_client_error() => EXIT_USAGE,
        _ => EXIT_INTERNAL,
    };
    Failure { code, error: e.into() }
}

/// Class options from `--opt key=value` flags.
pub(crate) fn parse_opts(opts: &[String]) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    let mut options = std::collections::BTreeMap::new();
    for o in opts {
        let Some((k, v)) = o.split_once('=') else {
            return Err(Failure::usage(anyhow::anyhow!("--opt {o:?}: write key=value")));
        };
        options.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(options)
}

/// Validated comma-separated tags (`""` is none).
pub(crate) fn parse_tags(flag: &str, text: &str) -> Result<Vec<String>, Failure> {
    let tags: Tags = text.parse().map_err(|e| Failure::usage(anyhow::anyhow!("{flag}: {e}")))?;
    Ok(tags.iter().map(str::to_owned).collect())
}

/// Tags as the API wants them: absent when none were given.
pub(crate) fn opt_tags(flag: &str, text: Option<&str>) -> Result<Option<Vec<String>>, Failure> {
    text.map(|t| parse_tags(flag, t)).transpose()
}

/// A duration flag, parsed (a usage error naming the flag when malformed).
pub(crate) fn duration_flag(flag: &str, text: Option<&str>) -> Result<Option<std::time::Duration>, Failure> {
    text.map(|t| parse_duration(t).map_err(|e| Failure::usage(anyhow::anyhow!("{flag}: {e}")))).transpose()
}

/// A size flag (`2GiB`, `512M`, bytes), parsed.
pub(crate) fn size_flag(flag: &str, text: Option<&str>) -> Result<Option<u64>, Failure> {
    text.map(|t| crew_core::job::parse_size(t).map_err(|e| Failure::usage(anyhow::anyhow!("{flag}: {e}")))).transpose()
}

/// A duration flag, checked here and passed on as written.
pub(crate) fn check_duration(flag: &str, text: Option<String>) -> Result<Option<String>, Failure> {
    if let Some(t) = &text {
        parse_duration(t).map_err(|e| Failure::usage(anyhow::anyhow!("{flag}: {e}")))?;
    }
    Ok(text)
}

/// `--input PATH[=NAME]` flags, parsed, with relative paths made absolute
/// against the current folder (the daemon needs absolute paths).
pub(crate) fn input_flags(flags: &[String]) -> Result<Vec<Input>, Failure> {
    let mut inputs = Vec::with_capacity(flags.len());
    for flag in flags {
        let mut input = Input::parse(flag).map_err(|e| Failure::usage(anyhow::anyhow!("--input {flag:?}: {e}")))?;
        crate::cmd::absolute_input(&mut input)?;
        inputs.push(input);
    }
    Ok(inputs)
}

/// Makes a local input path absolute, against the current folder.
pub(crate) fn absolute_input(input: &mut Input) -> Result<(), Failure> {
    if let InputSource::Path(path) = &mut input.source {
        if path.is_relative() {
            *path = std::path::absolute(&*path).map_err(|e| {
                Failure::usage(anyhow::anyhow!("input {}: cannot resolve the path: {e}", path.display()))
            })?;
        }
    }
    Ok(())
}

/// Prints `value` as one line of JSON on stdout.
pub(crate) fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(Failure::internal)?;
    writeln!(out).map_err(Failure::internal)
}
