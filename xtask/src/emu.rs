//! `cargo xtask emu install|start|stop|env`: the local AWS emulator (moto
//! 5.2.5 with a Batch backend that runs jobs as local processes) that the
//! S3 tests run against.
//!
//! A thin wrapper over `tests/emulators/aws-emu/aws-emu.sh`, which does the
//! work and can be used by hand; xtask adds what the script leaves to its
//! caller: everything lives in `target/aws-emu` (venv, log, pid and port
//! files: `cargo clean` removes it), and `start` picks a free port, so that
//! CI runs never collide with another server on the machine.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// The Batch job queues the emulator creates at start (`crew-worker-aws`'s
/// tests use them).
const BATCH_QUEUES: &str = "crew-q1,crew-q2";

/// The variables the emulator's tests read, as `(name, value)`.
pub(crate) type Env = Vec<(String, String)>;

/// `cargo xtask emu SUBCOMMAND`.
pub(crate) fn run(args: &[OsString]) -> anyhow::Result<()> {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["install"] => install(),
        ["start"] => start(None).map(drop),
        ["start", "--port", port] => {
            let port: u16 = port.parse().with_context(|| format!("--port {port:?}: expected a port number"))?;
            start(Some(port)).map(drop)
        }
        ["stop"] => stop(),
        ["env"] => {
            let env = env()?;
            for (name, value) in env {
                println!("export {name}={value}");
            }
            Ok(())
        }
        ["-h" | "--help"] | [] => {
            print!("{}", usage());
            Ok(())
        }
        _ => bail!("unknown arguments {args:?}\n\n{}", usage()),
    }
}

fn usage() -> &'static str {
    "Usage: cargo xtask emu <install|start [--port N]|stop|env>\n\n\
     install  create the Python venv with moto (target/aws-emu/venv; pip, from PyPI)\n\
     start    start the emulator on 127.0.0.1 (a free port unless --port)\n\
     stop     stop it\n\
     env      print the variables of the running emulator: eval \"$(cargo xtask emu env)\"\n"
}

/// The emulator's folder: `target/aws-emu` of the workspace.
fn root() -> PathBuf {
    crate::workspace_root().join("target").join("aws-emu")
}

/// The script, with the folder set.
fn script() -> Command {
    let path = crate::workspace_root().join("tests/emulators/aws-emu/aws-emu.sh");
    let mut command = Command::new("bash");
    command.arg(path).env("AWS_EMU_ROOT", root()).current_dir(crate::workspace_root());
    command
}

fn run_script(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot run the emulator script ({what})"))?;
    if !status.success() {
        bail!("the emulator script failed ({what}): see its output above ({} has the log)", root().display());
    }
    Ok(())
}

/// Creates the venv with moto (idempotent: quick when it exists).
pub(crate) fn install() -> anyhow::Result<()> {
    eprintln!("xtask: installing the AWS emulator (moto) into {}", root().join("venv").display());
    run_script(script().arg("install"), "install")
}

/// Whether the emulator of `target/aws-emu` runs (its pid file names a live
/// process).
pub(crate) fn running() -> bool {
    let Ok(pid) = std::fs::read_to_string(root().join("aws-emu.pid")) else { return false };
    let Ok(pid) = pid.trim().parse::<i32>() else { return false };
    // Signal 0: only checks that the process exists.
    Command::new("kill").args(["-0", &pid.to_string()]).status().is_ok_and(|s| s.success())
}

/// Starts the emulator on `port` (a free one when `None`); returns its
/// variables.
pub(crate) fn start(port: Option<u16>) -> anyhow::Result<Env> {
    let port = match port {
        Some(port) => port,
        None => free_port()?,
    };
    let mut command = script();
    command.arg("start").env("AWS_EMU_PORT", port.to_string());
    // The job queues the aws-batch tests submit to, unless told otherwise.
    if std::env::var_os("BATCH_LOCAL_QUEUES").is_none() {
        command.env("BATCH_LOCAL_QUEUES", BATCH_QUEUES);
    }
    // The "images" of the emulator's jobs: the aws-batch class starts the
    // agent by its program's name (`crew worker`), found on the PATH of
    // the container; here, the debug builds (the `crew` binary, and the
    // test binaries that are their own agents).
    if std::env::var_os("BATCH_LOCAL_PATH").is_none() {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| crate::workspace_root().join("target"), std::path::PathBuf::from);
        let debug = target.join("debug");
        let path = std::env::join_paths([debug.clone(), debug.join("deps")]).context("the target folder's path")?;
        command.env("BATCH_LOCAL_PATH", path);
    }
    run_script(&mut command, "start")?;
    env()
}

/// Stops the emulator (nothing to do when it is not running).
pub(crate) fn stop() -> anyhow::Result<()> {
    run_script(script().arg("stop"), "stop")
}

/// The variables of the running emulator.
pub(crate) fn env() -> anyhow::Result<Env> {
    let port = std::fs::read_to_string(root().join("aws-emu.port"))
        .ok()
        .map(|p| p.trim().to_owned())
        .filter(|_| running())
        .context("the emulator is not running: start it with `cargo xtask emu start`")?;
    let endpoint = format!("http://127.0.0.1:{port}");
    Ok([
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("CREW_TEST_S3_ENDPOINT", endpoint.as_str()),
        ("CREW_TEST_AWS_ENDPOINT", endpoint.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect())
}

/// A port nothing listens on now (the kernel's pick; released at once, so
/// another process could take it first, in which case `start` fails).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr().context("cannot find a free port")?.port())
}
