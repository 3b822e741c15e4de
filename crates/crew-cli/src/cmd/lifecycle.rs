//! `crew up` and `crew down`: the daemon's life.

use std::time::{Duration, Instant};

use clap::Args;

use super::{Ctx, api, print_json};
use crate::client::ClientError;
use crate::{EXIT_OK, Failure, project};

/// How long `crew down` waits for the daemon's process to end.
const DOWN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    /// Print the daemon's health object (`{"ok", "pid", "version", "dir",
    /// "store", "listen", "advertise", "tls", "tls_sha256"}`).
    #[arg(long)]
    json: bool,
    /// The store of the daemon started now: a folder (relative to the
    /// current folder) or a URL (`s3://bucket/prefix`, `file:///abs`). Over
    /// `[daemon] store` in crew.toml and `CREW_STORE`, for this daemon's
    /// life; a daemon started later by another command uses the
    /// configuration again. Refused when the daemon already runs with
    /// another store.
    #[arg(long, value_name = "URL|DIR")]
    store: Option<String>,
    /// Where the controller of the daemon started now listens for workers,
    /// IP:PORT (e.g. 0.0.0.0:7000 for cloud workers), over `[daemon] listen`
    /// and `CREW_LISTEN`. Refused when the daemon already listens elsewhere.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// The address its workers dial, HOST[:PORT] (HOST alone: the listening
    /// port), over `[daemon] advertise` and `CREW_ADVERTISE`.
    #[arg(long, value_name = "HOST[:PORT]")]
    advertise: Option<String>,
    /// When its worker connections use TLS: auto (beyond loopback) or
    /// always, over `[daemon] tls` and `CREW_TLS`.
    #[arg(long, value_name = "MODE")]
    tls: Option<crew_controller::TlsMode>,
    /// Also serve the API on TCP at IP:PORT (127.0.0.1:PORT for clients
    /// on this machine; another address for other machines, then with
    /// TLS), over `[daemon] http` and `CREW_HTTP`. Every request needs the
    /// bearer token in .crew/http.token (new at each start).
    #[arg(long, value_name = "IP:PORT")]
    http: Option<std::net::SocketAddr>,
    /// A host name clients use to reach that listener, besides IP
    /// addresses and localhost (repeatable), over `[daemon] http_hosts`.
    #[arg(long = "http-host", value_name = "NAME")]
    http_hosts: Vec<String>,
}

pub(crate) fn up(ctx: &Ctx, args: UpArgs) -> Result<u8, Failure> {
    let store = match &args.store {
        None => None,
        Some(s) if s.is_empty() => return Err(Failure::usage(anyhow::anyhow!("--store must not be empty"))),
        Some(s) if crew_core::store::url_scheme(s).is_some() => Some(s.clone()),
        Some(s) => Some(
            std::path::absolute(s)
                .map_err(|e| Failure::usage(anyhow::anyhow!("--store {s}: cannot make the path absolute: {e}")))?
                .to_string_lossy()
                .into_owned(),
        ),
    };
    let overrides = project::DaemonOverrides {
        store: store.clone(),
        listen: args.listen,
        advertise: args.advertise.clone(),
        tls: args.tls,
        http: args.http,
        http_hosts: args.http_hosts.clone(),
    };
    let (_, health) = project::ensure_daemon_with(ctx.dir(), &overrides)?;
    if let Some(differs) = workers_setting_differs(&overrides, &health) {
        return Err(Failure::usage(anyhow::anyhow!(
            "the daemon of {} already runs with {differs}: stop it with `crew down` first (its jobs stay \
             in its journal), then `crew up` again",
            ctx.dir().display()
        )));
    }
    if let Some(wanted) = &store {
        if !same_store(wanted, &health.store) {
            return Err(Failure::usage(anyhow::anyhow!(
                "the daemon of {} already runs with the store {}, not {wanted}: stop it with `crew down` \
                 first (its jobs stay in its journal), then `crew up --store {wanted}`",
                ctx.dir().display(),
                health.store
            )));
        }
    }
    if args.json {
        print_json(&health)?;
    } else {
        println!("{}", health.pid);
    }
    Ok(EXIT_OK)
}

/// What differs between the worker settings asked of `crew up` and those
/// of the running daemon, if anything.
fn workers_setting_differs(wanted: &project::DaemonOverrides, health: &project::Health) -> Option<String> {
    let listen: Option<std::net::SocketAddr> = health.workers.listen.parse().ok();
    if let (Some(want), Some(have)) = (wanted.listen, listen) {
        if want.ip() != have.ip() || (want.port() != 0 && want.port() != have.port()) {
            return Some(format!("its controller listening on {have}, not {want}"));
        }
    }
    if let (Some(want), Some(have)) = (&wanted.advertise, Some(&health.workers.advertise)) {
        let port = listen.map(|a| a.port()).unwrap_or_default();
        if crew_controller::advertised_address(want, port).ok().as_ref() != Some(have) {
            return Some(format!("workers told to dial {have}, not {want}"));
        }
    }
    if let Some(want) = wanted.http {
        let have: Option<std::net::SocketAddr> = health.http.as_ref().and_then(|h| h.listen.parse().ok());
        match have {
            None => return Some(format!("no HTTP listener, not --http {want}")),
            Some(have) if want.ip() != have.ip() || (want.port() != 0 && want.port() != have.port()) => {
                return Some(format!("its HTTP listener on {have}, not {want}"));
            }
            Some(_) => {}
        }
    }
    if let (Some(want), have) = (wanted.tls, health.workers.tls) {
        if want != have {
            let now = if health.workers.tls_sha256.is_some() { "encrypted beyond loopback" } else { "in plaintext" };
            return Some(format!("--tls {have} (worker connections {now}), not --tls {want}"));
        }
    }
    None
}

/// Whether the store a user asked for (`wanted`: a URL or an absolute
/// folder) is the one a running daemon reports (`running`: its store's URL,
/// which may spell the same store with more detail: a resolved region, a
/// `file://` form).
fn same_store(wanted: &str, running: &str) -> bool {
    if crew_core::store::url_scheme(wanted).is_none() {
        let Ok(wanted) = std::fs::canonicalize(wanted) else { return false };
        return crew_core::store::LocalStore::from_url(running).is_ok_and(|s| s.root() == wanted);
    }
    let base = |u: &str| u.split('?').next().unwrap_or(u).trim_end_matches('/').to_owned();
    base(wanted) == base(running)
}

#[derive(Args, Debug)]
pub(crate) struct DownArgs {}

pub(crate) fn down(ctx: &Ctx, _args: DownArgs) -> Result<u8, Failure> {
    let Some((mut client, health)) = project::try_connect(ctx.dir()) else {
        eprintln!("crew: no daemon is running for {}", ctx.dir().display());
        return Ok(EXIT_OK);
    };
    match client.post::<_, serde_json::Value>("/v1/down", &crate::wire::Empty {}) {
        Ok(_) => {}
        // Already stopping (another `crew down`): wait for it all the same.
        Err(ClientError::Api(e)) if e.code == crate::wire::ErrorCode::ShuttingDown => {}
        Err(e) => return Err(api(e)),
    }
    drop(client);
    let deadline = Instant::now() + DOWN_DEADLINE;
    while project::alive(health.pid) {
        if Instant::now() >= deadline {
            return Err(Failure::internal(anyhow::anyhow!(
                "the crew daemon (pid {}) is still running {}s after it was asked to stop; see {} \
                 (or stop it with `kill {}`)",
                health.pid,
                DOWN_DEADLINE.as_secs(),
                ctx.dir().join("daemon.log").display(),
                health.pid
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(EXIT_OK)
}
