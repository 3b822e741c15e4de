//! The optional TCP listener of the API (`crew up --http IP:PORT`), for
//! clients on other machines and for browsers.
//!
//! Role: the same routes as the Unix socket, behind what a network needs
//! and a socket's file mode gave for free. Every request carries the bearer
//! token the daemon writes to `DIR/http.token` (0600, new at each start);
//! its `Host` must name this listener (an IP literal, `localhost`, or a
//! name the user allowed, with the listener's port), so that a web page a
//! browser loads from elsewhere cannot reach the API through a name that
//! resolves here (DNS rebinding); and beyond loopback the connection is TLS
//! (a self-signed certificate made at start, whose SHA-256 clients pin, as
//! workers do).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::api::{self, Daemon};
use crate::wire::{ErrorCode, HttpInfo};

/// The token file inside the project folder.
pub(crate) const TOKEN_FILE: &str = "http.token";

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A bound listener, with what checks its requests.
pub(crate) struct HttpListener {
    listener: TcpListener,
    tls: Option<crew_tls::ControllerTls>,
    gate: Arc<Gate>,
    info: HttpInfo,
}

/// What every request must show.
struct Gate {
    token: String,
    port: u16,
    /// Host names allowed besides IP literals and `localhost`, lowercase.
    names: Vec<String>,
}

impl HttpListener {
    /// Binds `addr`, makes the token (written to `dir/http.token`) and, for
    /// an address beyond loopback, the TLS certificate.
    pub(crate) async fn bind(dir: &Path, addr: SocketAddr, names: &[String]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen for HTTP on {addr}"))?;
        let bound = listener.local_addr().context("the HTTP listener has no address")?;
        let tls = if bound.ip().is_loopback() {
            None
        } else {
            Some(crew_tls::ControllerTls::generate().context("cannot make the HTTP listener's TLS certificate")?)
        };
        let token = new_token()?;
        write_private(&dir.join(TOKEN_FILE), &token)?;
        let info = HttpInfo {
            listen: bound.to_string(),
            token_file: dir.join(TOKEN_FILE),
            tls_sha256: tls.as_ref().map(|t| t.fingerprint().to_owned()),
        };
        let names = names.iter().map(|n| n.trim().to_ascii_lowercase()).filter(|n| !n.is_empty()).collect();
        Ok(Self { listener, tls, gate: Arc::new(Gate { token, port: bound.port(), names }), info })
    }

    /// What `GET /v1/health` says of it.
    pub(crate) fn info(&self) -> HttpInfo {
        self.info.clone()
    }

    /// The next connection.
    pub(crate) async fn accept(&self) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
        self.listener.accept().await
    }

    /// Serves a connection [`HttpListener::accept`] took, on a task of
    /// `conns`.
    pub(crate) fn serve(
        &self,
        daemon: &Arc<Daemon>,
        conns: &mut tokio::task::JoinSet<()>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) {
        let _ = stream.set_nodelay(true);
        let daemon = daemon.clone();
        let gate = self.gate.clone();
        let acceptor = self.tls.as_ref().map(|t| t.acceptor().clone());
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (daemon, gate) = (daemon.clone(), gate.clone());
                async move {
                    match gate.check(&req) {
                        Ok(()) => api::handle(daemon, req).await,
                        Err((code, message)) => {
                            tracing::debug!(%peer, "HTTP request refused: {message}");
                            Ok(api::error_response(code, message))
                        }
                    }
                }
            });
            let served = match acceptor {
                None => {
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                }
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "HTTP TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "HTTP TLS handshake took too long");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
        });
    }
}

impl Gate {
    /// The request's `Host` and token, checked; the refusal otherwise.
    fn check(&self, req: &Request<Incoming>) -> Result<(), (ErrorCode, String)> {
        let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !self.host_allowed(host) {
            return Err((
                ErrorCode::BadHost,
                format!(
                    "the Host {host:?} does not name this listener: use an IP address or localhost with port {}, or \
                     allow the name with `crew up --http-host NAME` ([daemon] http_hosts)",
                    self.port
                ),
            ));
        }
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.trim().as_bytes(), self.token.as_bytes()) {
            return Err((
                ErrorCode::Unauthorized,
                "a bearer token is needed: send `Authorization: Bearer TOKEN` with the token in the project \
                 folder's http.token (new at each daemon start)"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// `host` is `NAME:PORT` with this listener's port, and NAME an IP
    /// literal, `localhost`, or an allowed name.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let (name, port) = match host.rsplit_once(':') {
            // `[::1]:8750`, `127.0.0.1:8750`, `name:8750`; a bare IPv6
            // literal has colons but no brackets, and no port.
            Some((name, port)) if !name.contains(':') || name.starts_with('[') => (name, port),
            _ => return false,
        };
        if port.parse::<u16>().ok() != Some(self.port) {
            return false;
        }
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().is_ok() || bare == "localhost" || self.names.iter().any(|n| n == bare)
    }
}

/// Compares without stopping at the first difference (no timing hint of
/// how much of a guess was right).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes, hex.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot make the HTTP token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to `path`, readable by its owner only from its first byte
/// (a new file, created 0600, renamed over the old one).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(names: &[&str]) -> Gate {
        Gate { token: "t".into(), port: 8750, names: names.iter().map(|n| (*n).to_owned()).collect() }
    }

    #[test]
    fn hosts_are_ip_literals_localhost_or_allowed_names_with_the_port() {
        let g = gate(&["crew.lab"]);
        for ok in ["127.0.0.1:8750", "localhost:8750", "LOCALHOST:8750", "[::1]:8750", "10.1.2.3:8750", "crew.lab:8750"]
        {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in
            ["", "127.0.0.1", "127.0.0.1:8751", "evil.example:8750", "::1", "crew.lab", "localhost:x", "a:b:8750"]
        {
            assert!(!g.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab") && !same(b"", b"a"));
        let t = new_token().unwrap();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token().unwrap());
    }
}
