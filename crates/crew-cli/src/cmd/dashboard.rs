//! `crew dashboard`: the URL of the daemon's dashboard, and the page opened
//! in a browser on a desktop.

use std::io::IsTerminal;

use clap::Args;

use super::{Ctx, print_json};
use crate::{EXIT_OK, Failure, project};

#[derive(Args, Debug)]
#[command(after_help = "The dashboard is served by the daemon's HTTP listener: a daemon started \
now gets one on 127.0.0.1 (a free port); a daemon already running needs one (`crew up --http \
127.0.0.1:PORT`). The URL carries the API token after `#`, which browsers never send to a \
server; treat it as a password. Exit status: 0 done; 2 no HTTP listener; 3 crew failed.")]
pub(crate) struct DashboardArgs {
    /// Only print the URL (by default it is also opened in the desktop's
    /// browser when there is a desktop).
    #[arg(long)]
    no_open: bool,
    /// Print `{"url": ...}`.
    #[arg(long)]
    json: bool,
}

pub(crate) fn dashboard(ctx: &Ctx, args: DashboardArgs) -> Result<u8, Failure> {
    let overrides = project::DaemonOverrides {
        http: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        ..project::DaemonOverrides::default()
    };
    let (_, health) = project::ensure_daemon_with(ctx.dir(), &overrides)?;
    let Some(http) = health.http else {
        return Err(Failure::usage(anyhow::anyhow!(
            "the daemon of {} runs without an HTTP listener, which the dashboard needs: stop it with `crew down` \
             (its jobs stay in its journal), then `crew dashboard` again (or `crew up --http 127.0.0.1:PORT`)",
            ctx.dir().display()
        )));
    };
    let listen: std::net::SocketAddr = http
        .listen
        .parse()
        .map_err(|e| Failure::internal(anyhow::anyhow!("the daemon's HTTP address {:?}: {e}", http.listen)))?;
    // A listener on every address is reached here through loopback.
    let host = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let token = std::fs::read_to_string(&http.token_file)
        .map_err(|e| Failure::internal(anyhow::anyhow!("cannot read {}: {e}", http.token_file.display())))?;
    let scheme = if http.tls_sha256.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{host}:{}/dashboard#token={}", listen.port(), token.trim());
    if args.json {
        print_json(&serde_json::json!({ "url": url }))?;
    } else {
        println!("{url}");
        if let Some(pin) = &http.tls_sha256 {
            eprintln!("crew: the listener's certificate is self-signed: its SHA-256 is {pin}");
        }
    }
    if !args.no_open && desktop() {
        open(ctx, &url);
    }
    Ok(EXIT_OK)
}

/// A desktop session with a person at the terminal.
fn desktop() -> bool {
    (std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some())
        && std::io::stdout().is_terminal()
}

/// Opens `url` in the desktop's browser through a private page that
/// forwards to it, so that the token never appears in a command line.
fn open(ctx: &Ctx, url: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let page = ctx.dir().join("dashboard.html");
    let _ = std::fs::remove_file(&page);
    let quoted = serde_json::to_string(url).unwrap_or_default();
    let written = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&page).and_then(|mut f| {
        writeln!(f, "<!doctype html><meta charset=utf-8><script>location.replace({quoted})</script>")
    });
    if written.is_err() {
        return;
    }
    match std::process::Command::new("xdg-open")
        .arg(&page)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(_) => {}
        Err(_) => eprintln!("crew: cannot open a browser (no xdg-open): open the URL above"),
    }
}
