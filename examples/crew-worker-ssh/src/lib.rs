//! `ssh`: crew workers on machines reached with `ssh`, written as a third
//! party would write a class — against crew-core's published API only.
//!
//! Each slot is one `ssh HOST` process on the controller's machine whose
//! remote command starts the agent (`crew worker`). The launch secret goes
//! down the session's stdin (`CREW_TOKEN_STDIN=1`), never into an argv or
//! an environment; the other `CREW_*` variables are not secret and go on
//! the remote command line. The remote shell kills the agent when the
//! session ends, so stopping a worker is stopping its `ssh`.
//!
//! Options (`--opt k=v`): `host` (a comma-separated list; slots go round
//! it), `user`, `port`, `identity` (a private key file), `known_hosts` (a
//! file; default ssh's own, new hosts accepted), `agent` (the agent program
//! on the hosts; default `crew`).

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use crew_core::worker::{
    Capabilities, ENV_TOKEN, ENV_TOKEN_STDIN, Handle, LaunchSpec, Liveness, OptionSpec, Worker, WorkerError,
    is_secret_var,
};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};

/// The class name.
pub const CLASS: &str = "ssh";
const OPTIONS: [(&str, &str); 6] = [
    ("host", "machines to start workers on, comma separated (slots go round them)"),
    ("user", "the login name (default: ssh's)"),
    ("port", "the ssh port (default: ssh's)"),
    ("identity", "a private key file"),
    ("known_hosts", "a known-hosts file (default: ssh's own; new hosts are accepted)"),
    ("agent", "the agent program on the hosts (default: crew)"),
];

/// The `ssh` class; options given to [`SshWorker::with_defaults`] apply
/// where a recruit leaves them out.
#[derive(Debug, Default)]
pub struct SshWorker {
    defaults: BTreeMap<String, String>,
    /// Local `ssh` processes by pid, with the stdin that keeps each session.
    sessions: Mutex<HashMap<u32, (Child, ChildStdin)>>,
    next_host: AtomicUsize,
}

impl SshWorker {
    /// The class with no default options (every recruit names its hosts).
    pub fn new() -> Arc<Self> {
        Self::with_defaults(BTreeMap::new())
    }

    /// The class with default options.
    pub fn with_defaults(defaults: BTreeMap<String, String>) -> Arc<Self> {
        Arc::new(Self { defaults, ..Self::default() })
    }

    fn error(message: String) -> WorkerError {
        WorkerError::Platform { class: CLASS.into(), message, retryable: false }
    }
}

/// `text` as one word for a POSIX shell.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[async_trait]
impl Worker for SshWorker {
    fn class(&self) -> &str {
        CLASS
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::remote(64, usize::MAX, Duration::from_millis(500))
    }

    fn options(&self) -> Vec<OptionSpec> {
        OPTIONS.iter().map(|(name, help)| OptionSpec::new(*name, *help)).collect()
    }

    fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
        let bad = |message: String| Err(WorkerError::Options { class: CLASS.into(), message });
        if let Some(k) = options.keys().find(|k| !OPTIONS.iter().any(|(name, _)| name == k)) {
            let names: Vec<&str> = OPTIONS.iter().map(|(name, _)| *name).collect();
            return bad(format!("unknown option {k:?}: the ssh class takes {}", names.join(", ")));
        }
        let merged: BTreeMap<_, _> = self.defaults.iter().chain(options).collect();
        if merged.get(&"host".to_owned()).is_none_or(|h| h.split(',').all(|h| h.trim().is_empty())) {
            return bad("no host: pass --opt host=HOST (several: host=a,b)".into());
        }
        match merged.get(&"port".to_owned()) {
            Some(p) if p.parse::<u16>().is_err() => bad(format!("port {p:?} is not a port number")),
            _ => Ok(()),
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError> {
        let mut opt = self.defaults.clone();
        opt.extend(spec.options.clone());
        let hosts: Vec<&str> = opt
            .get("host")
            .map(|h| h.split(',').map(str::trim).filter(|h| !h.is_empty()).collect())
            .unwrap_or_default();
        let token = spec.env.get(ENV_TOKEN).ok_or_else(|| Self::error("the launch has no secret".into()))?;
        let mut handles = Vec::new();
        for member in &spec.members {
            let host = hosts[self.next_host.fetch_add(1, Ordering::Relaxed) % hosts.len().max(1)];
            let mut words: Vec<String> = vec!["env".into(), format!("{ENV_TOKEN_STDIN}=1")];
            for (k, v) in spec.env.iter().filter(|(k, _)| !is_secret_var(k)) {
                words.push(quote(&format!("{k}={v}")));
            }
            words.push(quote(&format!("CREW_INDEX={}", member.index)));
            words.push(quote(&format!("CREW_SLOT={}", member.slot)));
            words.push(quote(opt.get("agent").unwrap_or(&spec.program_name)));
            words.extend(spec.args.iter().map(|a| quote(a)));
            // The token reaches the agent through a pipe; when the session
            // ends (its stdin, kept as fd 3, closes), the agent is told to
            // stop (a background job's own stdin is /dev/null).
            let remote = format!(
                "exec 3<&0; read -r t; printf '%s\\n' \"$t\" | {} & p=$!; (cat <&3 >/dev/null; kill $p) >/dev/null 2>&1 & wait $p",
                words.join(" ")
            );
            let mut cmd = tokio::process::Command::new("ssh");
            cmd.args(["-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"]);
            for (flag, key) in [("-l", "user"), ("-p", "port"), ("-i", "identity")] {
                if let Some(v) = opt.get(key) {
                    cmd.args([flag, v]);
                }
            }
            if let Some(file) = opt.get("known_hosts") {
                cmd.args(["-o", &format!("UserKnownHostsFile={file}")]);
            }
            cmd.args([host, &remote]).stdin(Stdio::piped()).stdout(Stdio::null()).kill_on_drop(true);
            let mut child = cmd.spawn().map_err(|e| Self::error(format!("could not run ssh: {e}")))?;
            let mut stdin = child.stdin.take().ok_or_else(|| Self::error("ssh has no stdin".into()))?;
            let pid = child.id().ok_or_else(|| Self::error("ssh ended at once".into()))?;
            stdin
                .write_all(format!("{}\n", token).as_bytes())
                .await
                .map_err(|e| Self::error(format!("ssh {host} took no token: {e}")))?;
            self.sessions.lock().map_err(|_| Self::error("poisoned".into()))?.insert(pid, (child, stdin));
            handles.push(Handle::new(pid.to_string()));
        }
        Ok(handles)
    }

    async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError> {
        let mut sessions = self.sessions.lock().map_err(|_| Self::error("poisoned".into()))?;
        Ok(handles
            .iter()
            .map(|h| {
                let Some((child, _)) = h.id.parse().ok().and_then(|pid: u32| sessions.get_mut(&pid)) else {
                    return Liveness::Unknown;
                };
                match child.try_wait() {
                    Ok(None) => Liveness::Running,
                    Ok(Some(status)) => Liveness::Exited { reason: format!("the ssh session ended ({status})") },
                    Err(e) => Liveness::Exited { reason: format!("the ssh session is lost: {e}") },
                }
            })
            .collect())
    }

    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError> {
        let mut sessions = self.sessions.lock().map_err(|_| Self::error("poisoned".into()))?;
        for h in handles {
            // Closing the session's stdin stops the agent; ssh goes with it.
            if let Some((mut child, stdin)) = h.id.parse().ok().and_then(|pid: u32| sessions.remove(&pid)) {
                drop(stdin);
                tokio::spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                });
            }
        }
        Ok(())
    }
}
