//! How a controller is set up: the agent command, the configuration, the
//! resume key, the TLS mode, the advertised address.

use super::*;

/// How the controller starts an agent: a program and its arguments. The
/// connection details and the secret are added to its environment.
#[derive(Clone, Debug)]
pub struct AgentCommand {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The program's name where classes start agents on other machines
    /// from their own `PATH` (an image), never the path it has here; `None`:
    /// the file name of `program`. [`AgentCommand::crew`] sets `crew`.
    pub name: Option<String>,
}

impl AgentCommand {
    /// `crew worker` from a given `crew` binary.
    pub fn crew(program: impl Into<String>) -> Self {
        Self { program: program.into(), args: vec!["worker".to_owned()], name: Some("crew".to_owned()) }
    }

    /// The program's name on other machines: [`AgentCommand::name`], else
    /// the file name of the program.
    pub fn portable_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::path::Path::new(&self.program)
                .file_name()
                .map_or_else(|| self.program.clone(), |n| n.to_string_lossy().into_owned())
        })
    }

    /// The running executable itself, which must call
    /// `crew_agent::run_if_agent` first thing in `main` (embedders).
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self { program: std::env::current_exe()?.to_string_lossy().into_owned(), args: Vec::new(), name: None })
    }
}

/// Settings of a controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where to listen for agents (loopback and a free port by default).
    pub listen: SocketAddr,
    /// The address agents dial, when it differs from the listening one (a
    /// NAT, a wildcard bind): `host:port`, or a bare host to which the bound
    /// port is added. Defaults to the bound address. Agents of classes that
    /// reach loopback dial loopback instead when the listener takes it.
    pub advertise: Option<String>,
    /// When agent connections use TLS.
    pub tls: TlsMode,
    /// How agents are started.
    pub agent: AgentCommand,
    /// The crew seed; per-job seeds derive from it and the job names.
    pub seed: u64,
    /// The store for large stdout/stderr and job data.
    pub store: Option<Arc<dyn Store>>,
    /// Heartbeat interval, both ways.
    pub heartbeat: Duration,
    /// A worker silent for this many heartbeat intervals is lost.
    pub heartbeat_misses: u32,
    /// Time a stopping worker gets before its class terminates it.
    pub stop_grace: Duration,
    /// Time an agent has to send its hello after connecting.
    pub hello_timeout: Duration,
    /// Connections that may wait for their hello (or TLS handshake) at
    /// once; past it, the listener takes no more until a place frees or
    /// the oldest has waited a second, which is then closed. Authenticated
    /// connections are bounded by the slots (one per launch member), so
    /// the worker port holds at most slots + this many connections.
    pub max_handshakes: usize,
    /// The id of the first job sent (a restarted controller continues its
    /// numbering).
    pub first_job_id: u64,
    /// Told of every job sent to a worker (for a journal); called with the
    /// controller's lock held, so it must be quick and must not call back
    /// into the controller.
    pub observer: Option<Arc<dyn Observer>>,
    /// When set, agents that dial loopback in plaintext may outlive this
    /// controller and come back to the next one (see [`ResumeConfig`]).
    pub resume: Option<ResumeConfig>,
}

/// How agents survive a restart of their controller (the daemon's).
///
/// Each slot's reconnect credential is an HMAC-SHA256 of its name under
/// `key`, so that a restarted controller with the same key recognises the
/// slot without any per-slot secret on disk; agents get it in their
/// `Welcome` (never in their environment or command line) and keep it in
/// memory. Agents find the restarted controller through `address_file`
/// (the path is in their environment, [`crew_core::worker::ENV_RESUME_FILE`]),
/// which [`Controller::publish_address`] writes.
#[derive(Clone, Debug)]
pub struct ResumeConfig {
    /// The key slot credentials derive from (kept private by the caller).
    pub key: Secret,
    /// Where the address agents dial is published.
    pub address_file: std::path::PathBuf,
    /// How long an agent whose controller went away keeps trying to come
    /// back (its job running) before it stops.
    pub window: Duration,
}

impl ResumeConfig {
    /// The reconnect credential of the slot `name`.
    pub fn slot_token(&self, name: &str) -> Secret {
        Secret::new(hmac_sha256_hex(self.key.expose().as_bytes(), format!("crew-resume-v1\0{name}").as_bytes()))
    }
}

/// HMAC-SHA256 (RFC 2104) as lowercase hex.
pub(crate) fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// When agent connections use TLS; `"auto"` or `"always"` in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS when the controller listens beyond loopback; plaintext from
    /// loopback peers stays allowed (local workers dial loopback).
    #[default]
    Auto,
    /// TLS for every agent connection, loopback ones included.
    Always,
}

impl TlsMode {
    /// The mode's name, as [`str::parse`] takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            _ => Err(format!("{s:?} is not a TLS mode: use auto (TLS beyond loopback) or always")),
        }
    }
}

impl ControllerConfig {
    /// Defaults, with the given agent command.
    pub fn new(agent: AgentCommand) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            tls: TlsMode::Auto,
            agent,
            seed: 0,
            store: None,
            heartbeat: Duration::from_secs(2),
            heartbeat_misses: 5,
            stop_grace: Duration::from_secs(3),
            hello_timeout: Duration::from_secs(10),
            max_handshakes: MAX_HANDSHAKES,
            first_job_id: 1,
            observer: None,
            resume: None,
        }
    }
}

/// Whether `addr` ends with a port (`host:port`, `[v6]:port`), as opposed to
/// a bare host name or address.
pub(crate) fn has_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => port.parse::<u16>().is_ok() && (addr.starts_with('[') || !host.contains(':')),
        None => false,
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
pub(crate) fn host_of(addr: &str) -> &str {
    let host = if has_port(addr) { addr.rsplit_once(':').map_or(addr, |(h, _)| h) } else { addr };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The address agents are told, from an `advertise` setting (`host:port`,
/// `[v6]:port`, or a bare host or IPv6 address, which gets `port`): checked,
/// so that a typo fails at start and not when agents dial.
pub fn advertised_address(advertise: &str, port: u16) -> Result<String, String> {
    let a = advertise.trim();
    let full = if has_port(a) {
        a.to_owned()
    } else if a.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{a}]:{port}")
    } else {
        format!("{a}:{port}")
    };
    let host = host_of(&full);
    let port_ok = full.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_some_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'));
    if host_ok && port_ok && has_port(&full) {
        Ok(full)
    } else {
        Err(format!(
            "{advertise:?}: write HOST, HOST:PORT or [IPv6]:PORT with a port from 1 to 65535 (HOST alone takes the \
             listening port)"
        ))
    }
}

/// Whether agents given `addr` (`host:port`) would dial this machine's
/// loopback interface.
pub(crate) fn dials_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::{dials_loopback, has_port};

    #[test]
    fn agents_elsewhere_run_the_program_by_its_portable_name() {
        use super::AgentCommand;
        assert_eq!(AgentCommand::crew("/home/me/dl/crew-x86_64-linux").portable_name(), "crew");
        let own = AgentCommand { program: "/opt/app/bin/pipeline".into(), args: Vec::new(), name: None };
        assert_eq!(own.portable_name(), "pipeline");
    }

    #[test]
    fn advertise_settings_are_completed_and_checked() {
        use super::advertised_address as a;
        assert_eq!(a("h", 7000).as_deref(), Ok("h:7000"));
        assert_eq!(a("h:80", 7000).as_deref(), Ok("h:80"));
        assert_eq!(a("10.0.0.5", 7000).as_deref(), Ok("10.0.0.5:7000"));
        assert_eq!(a("2001:db8::1", 7000).as_deref(), Ok("[2001:db8::1]:7000"));
        assert_eq!(a("[::1]", 7000).as_deref(), Ok("[::1]:7000"));
        assert_eq!(a("[::1]:80", 7000).as_deref(), Ok("[::1]:80"));
        for bad in ["", "h:", "h:0", "h:70000", "h:port", "bad host", "h/x"] {
            assert!(a(bad, 7000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn advertised_addresses_with_and_without_a_port() {
        for addr in ["h:7000", "10.0.0.5:1", "[::1]:7000", "[2001:db8::1]:80"] {
            assert!(has_port(addr), "{addr}");
        }
        for addr in ["h", "10.0.0.5", "::1", "2001:db8::1", "[::1]", "h:port", "h:70000"] {
            assert!(!has_port(addr), "{addr}");
        }
    }

    #[test]
    fn loopback_addresses_are_recognised() {
        for addr in ["127.0.0.1:7000", "127.8.9.1:1", "[::1]:7000", "localhost:80"] {
            assert!(dials_loopback(addr), "{addr}");
        }
        for addr in ["10.0.0.5:7000", "[2001:db8::1]:7000", "crew.example.com:7000", "0.0.0.0:7000"] {
            assert!(!dials_loopback(addr), "{addr}");
        }
    }
}
