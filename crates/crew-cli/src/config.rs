//! The daemon's configuration: `DIR/crew.toml`, then `CREW_*` variables.
//!
//! Role: give a project folder defaults that every command would otherwise
//! repeat (the store, the address workers dial, idle timeouts, per-class
//! options), read once when the daemon starts. Precedence, lowest first:
//! built-in defaults, `crew.toml`, environment variables, then the request
//! (`POST /v1/recruit` fields, i.e. the command line of `crew recruit`).
//!
//! Why a hand walk over a [`toml::Table`] instead of `serde` derive: every
//! error must read `FILE: key: reason` with the full dotted key
//! (`class.local.cores`), and a typo must be an error, not a silently
//! ignored key. The README ("Configuration") documents the format.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use crew_controller::{ControllerConfig, TlsMode};
use crew_core::job::parse_duration;
use toml::{Table, Value};

/// The configuration file inside the project folder.
pub(crate) const FILE: &str = "crew.toml";

/// The daemon's whole configuration, after the file and the environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Config {
    /// `[daemon]`: applied to the controller at start.
    pub(crate) daemon: DaemonSettings,
    /// `[recruit]` and `[class.NAME]`: defaults of recruit requests.
    pub(crate) recruit: RecruitDefaults,
}

/// `[daemon]`; `None` keeps the controller's own default.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DaemonSettings {
    /// Where the controller listens for workers (default 127.0.0.1:0).
    pub(crate) listen: Option<SocketAddr>,
    /// The address workers dial, when it differs from `listen`.
    pub(crate) advertise: Option<String>,
    /// When agent connections use TLS (default: beyond loopback).
    pub(crate) tls: Option<TlsMode>,
    /// The store: a URL (`s3://...`, `file:///...`), or a folder relative to
    /// the project folder (default `store`).
    pub(crate) store: Option<String>,
    /// The crew seed.
    pub(crate) seed: Option<u64>,
    /// The heartbeat interval.
    pub(crate) heartbeat: Option<Duration>,
    /// The journal size past which the running daemon compacts it.
    pub(crate) journal_compact_bytes: Option<u64>,
    /// How many of the newest outputs `crew logs` keeps.
    pub(crate) logs_keep: Option<u32>,
    /// The size past which `daemon.log` is rotated.
    pub(crate) log_size: Option<u64>,
    /// How many rotated `daemon.log.N` files are kept.
    pub(crate) log_files: Option<u32>,
    /// Where the API also listens on TCP (none by default).
    pub(crate) http: Option<SocketAddr>,
    /// Host names the TCP listener answers to, besides IP literals and
    /// `localhost`.
    pub(crate) http_hosts: Vec<String>,
}

/// `[recruit]` and `[class.NAME]`: what a recruit request gets for the
/// fields it leaves out (absent or `null`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RecruitDefaults {
    pub(crate) idle: Option<Duration>,
    pub(crate) wall: Option<Duration>,
    pub(crate) tasks_max: Option<u32>,
    pub(crate) launch_timeout: Option<Duration>,
    pub(crate) launch_max: Option<u32>,
    pub(crate) prefetch: Option<u32>,
    /// Class options by class name; a request's own `options` win per key.
    pub(crate) classes: BTreeMap<String, BTreeMap<String, String>>,
}

impl RecruitDefaults {
    /// The options of a recruit of `class`: this class's configured ones,
    /// overridden key by key by the request's.
    pub(crate) fn options(&self, class: &str, request: BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut options = self.classes.get(class).cloned().unwrap_or_default();
        options.extend(request);
        options
    }
}

impl Config {
    /// Reads `dir/crew.toml` (optional) and the `CREW_*` variables.
    pub(crate) fn load(dir: &Path) -> anyhow::Result<Self> {
        Self::load_with(dir, |name| std::env::var_os(name))
    }

    /// [`Config::load`] with the environment given (for tests).
    fn load_with(dir: &Path, env: impl Fn(&str) -> Option<OsString>) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
        };
        config.apply_env(env)?;
        Ok(config)
    }

    /// Parses the text of a `crew.toml` at `path` (named in errors).
    pub(crate) fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let file = path.display();
        let table: Table = text.parse().with_context(|| format!("{file}: not valid TOML"))?;
        let mut config = Self::default();
        let at = |key: &str, e: String| anyhow::anyhow!("{file}: {key}: {e}");
        for (name, value) in &table {
            match name.as_str() {
                "daemon" => {
                    let d = &mut config.daemon;
                    for (key, v) in section(name, value).map_err(|e| at(name, e))? {
                        let full = format!("daemon.{key}");
                        let err = |e: String| at(&full, e);
                        match key.as_str() {
                            "listen" => d.listen = Some(text_of(v).and_then(|s| parse_addr(&s)).map_err(err)?),
                            "advertise" => d.advertise = Some(string(v).map_err(err)?),
                            "tls" => d.tls = Some(string(v).and_then(|s| s.parse()).map_err(err)?),
                            "store" => d.store = Some(non_empty(string(v)).map_err(err)?),
                            "seed" => d.seed = Some(seed(v).map_err(err)?),
                            "heartbeat" => d.heartbeat = Some(duration(v).and_then(positive).map_err(err)?),
                            "journal_compact" => d.journal_compact_bytes = Some(bytes(v).map_err(err)?),
                            "logs_keep" => d.logs_keep = Some(count(v, 1).map_err(err)?),
                            "log_size" => d.log_size = Some(bytes(v).map_err(err)?),
                            "log_files" => d.log_files = Some(count(v, 1).map_err(err)?),
                            "http" => d.http = Some(text_of(v).and_then(|s| parse_addr(&s)).map_err(err)?),
                            "http_hosts" => d.http_hosts = strings(v).map_err(err)?,
                            _ => return Err(unknown(&file, &full, DAEMON_KEYS)),
                        }
                    }
                }
                "recruit" => {
                    let r = &mut config.recruit;
                    for (key, v) in section(name, value).map_err(|e| at(name, e))? {
                        let full = format!("recruit.{key}");
                        let err = |e: String| at(&full, e);
                        match key.as_str() {
                            "idle" => r.idle = Some(duration(v).map_err(err)?),
                            "wall" => r.wall = Some(duration(v).map_err(err)?),
                            "tasks_max" => r.tasks_max = Some(count(v, 1).map_err(err)?),
                            "launch_timeout" => r.launch_timeout = Some(duration(v).and_then(positive).map_err(err)?),
                            "launch_max" => r.launch_max = Some(count(v, 1).map_err(err)?),
                            "prefetch" => r.prefetch = Some(count(v, 0).map_err(err)?),
                            _ => return Err(unknown(&file, &full, RECRUIT_KEYS)),
                        }
                    }
                }
                "class" => {
                    for (class, options) in section(name, value).map_err(|e| at(name, e))? {
                        let full = format!("class.{class}");
                        let mut map = BTreeMap::new();
                        for (key, v) in section(&full, options).map_err(|e| at(&full, e))? {
                            let opt = text_of(v).map_err(|e| at(&format!("{full}.{key}"), e))?;
                            map.insert(key.clone(), opt);
                        }
                        config.recruit.classes.insert(class.clone(), map);
                    }
                }
                _ => return Err(unknown(&file, name, &["daemon", "recruit", "class"])),
            }
        }
        Ok(config)
    }

    /// Overrides the file's values with the `CREW_*` variables that are set
    /// and not empty.
    fn apply_env(&mut self, env: impl Fn(&str) -> Option<OsString>) -> anyhow::Result<()> {
        let var = |name: &str| -> anyhow::Result<Option<String>> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v.into_string().map(Some).map_err(|v| anyhow::anyhow!("{name}={v:?}: not valid UTF-8")),
            }
        };
        fn set<T>(
            name: &str,
            raw: Option<String>,
            parse: impl Fn(&str) -> Result<T, String>,
            slot: &mut Option<T>,
        ) -> anyhow::Result<()> {
            if let Some(raw) = raw {
                *slot = Some(parse(&raw).map_err(|e| anyhow::anyhow!("{name}={raw:?}: {e}"))?);
            }
            Ok(())
        }
        let dur = |s: &str| parse_duration(s).map_err(|e| e.to_string());
        let pos = |s: &str| dur(s).and_then(positive);
        let d = &mut self.daemon;
        set("CREW_LISTEN", var("CREW_LISTEN")?, parse_addr, &mut d.listen)?;
        set("CREW_ADVERTISE", var("CREW_ADVERTISE")?, |s| Ok(s.to_owned()), &mut d.advertise)?;
        set("CREW_TLS", var("CREW_TLS")?, |s| s.trim().parse(), &mut d.tls)?;
        set("CREW_STORE", var("CREW_STORE")?, |s| Ok(s.to_owned()), &mut d.store)?;
        // Not CREW_SEED: every job sees its own seed under that name, and a
        // daemon started from inside a job must not take it for the crew seed.
        set("CREW_PROJECT_SEED", var("CREW_PROJECT_SEED")?, parse_seed, &mut d.seed)?;
        set("CREW_HEARTBEAT", var("CREW_HEARTBEAT")?, pos, &mut d.heartbeat)?;
        set("CREW_JOURNAL_COMPACT", var("CREW_JOURNAL_COMPACT")?, parse_bytes, &mut d.journal_compact_bytes)?;
        set("CREW_LOGS_KEEP", var("CREW_LOGS_KEEP")?, |s| parse_count(s, 1), &mut d.logs_keep)?;
        set("CREW_LOG_SIZE", var("CREW_LOG_SIZE")?, parse_bytes, &mut d.log_size)?;
        set("CREW_LOG_FILES", var("CREW_LOG_FILES")?, |s| parse_count(s, 1), &mut d.log_files)?;
        set("CREW_HTTP", var("CREW_HTTP")?, parse_addr, &mut d.http)?;
        let r = &mut self.recruit;
        set("CREW_IDLE", var("CREW_IDLE")?, dur, &mut r.idle)?;
        set("CREW_WALL", var("CREW_WALL")?, dur, &mut r.wall)?;
        set("CREW_TASKS_MAX", var("CREW_TASKS_MAX")?, |s| parse_count(s, 1), &mut r.tasks_max)?;
        set("CREW_LAUNCH_TIMEOUT", var("CREW_LAUNCH_TIMEOUT")?, pos, &mut r.launch_timeout)?;
        set("CREW_LAUNCH_MAX", var("CREW_LAUNCH_MAX")?, |s| parse_count(s, 1), &mut r.launch_max)?;
        set("CREW_PREFETCH", var("CREW_PREFETCH")?, |s| parse_count(s, 0), &mut r.prefetch)?;
        Ok(())
    }

    /// The store to open: `[daemon] store` as given when it is a URL
    /// (`s3://bucket/prefix`, `file:///abs`), else a folder relative to
    /// `dir`; default `dir/store`.
    pub(crate) fn store_url(&self, dir: &Path) -> String {
        let store = self.daemon.store.as_deref().unwrap_or("store");
        if crew_core::store::url_scheme(store).is_some() {
            store.to_owned()
        } else {
            dir.join(store).to_string_lossy().into_owned()
        }
    }

    /// Applies `[daemon]` to the controller's configuration (the store is
    /// opened by the caller, see [`Config::store_url`]).
    pub(crate) fn apply(&self, c: &mut ControllerConfig) {
        let d = &self.daemon;
        if let Some(a) = d.listen {
            c.listen = a;
        }
        if let Some(a) = &d.advertise {
            c.advertise = Some(a.clone());
        }
        if let Some(t) = d.tls {
            c.tls = t;
        }
        if let Some(s) = d.seed {
            c.seed = s;
        }
        if let Some(h) = d.heartbeat {
            c.heartbeat = h;
        }
    }
}

const DAEMON_KEYS: &[&str] = &[
    "listen",
    "advertise",
    "tls",
    "store",
    "seed",
    "heartbeat",
    "journal_compact",
    "logs_keep",
    "log_size",
    "log_files",
    "http",
    "http_hosts",
];
const RECRUIT_KEYS: &[&str] = &["idle", "wall", "tasks_max", "launch_timeout", "launch_max", "prefetch"];

fn unknown(file: &impl std::fmt::Display, key: &str, known: &[&str]) -> anyhow::Error {
    anyhow::anyhow!("{file}: {key}: unknown key (known here: {})", known.join(", "))
}

fn section<'a>(key: &str, v: &'a Value) -> Result<&'a Table, String> {
    v.as_table().ok_or_else(|| format!("expected a table ([{key}]), got a {}", v.type_str()))
}

fn non_empty(s: Result<String, String>) -> Result<String, String> {
    s.and_then(|s| if s.is_empty() { Err("must not be empty".to_owned()) } else { Ok(s) })
}

fn string(v: &Value) -> Result<String, String> {
    v.as_str().map(str::to_owned).ok_or_else(|| format!("expected a string, got a {}", v.type_str()))
}

/// An array of non-empty strings.
fn strings(v: &Value) -> Result<Vec<String>, String> {
    let items = v.as_array().ok_or_else(|| format!("expected an array of strings, got a {}", v.type_str()))?;
    items.iter().map(|i| non_empty(string(i))).collect()
}

/// A string, or a number or boolean taken as its text (`cores = 4`).
fn text_of(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("expected a string, got a {}", other.type_str())),
    }
}

/// A duration: a string (`"30s"`) or a number of seconds.
fn duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::String(_) | Value::Integer(_) | Value::Float(_) => {
            parse_duration(&text_of(v)?).map_err(|e| e.to_string())
        }
        other => Err(format!("expected a duration such as \"30s\", got a {}", other.type_str())),
    }
}

fn positive(d: Duration) -> Result<Duration, String> {
    if d.is_zero() { Err("must be more than 0".to_owned()) } else { Ok(d) }
}

fn count(v: &Value, min: u32) -> Result<u32, String> {
    match v {
        Value::Integer(i) => parse_count(&i.to_string(), min),
        other => Err(format!("expected a whole number, got a {}", other.type_str())),
    }
}

fn parse_count(s: &str, min: u32) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= min => Ok(n),
        Ok(n) => Err(format!("{n} is too small: at least {min}")),
        Err(_) => Err(format!("expected a whole number from {min} to {}, got {s:?}", u32::MAX)),
    }
}

/// The seed: an integer, or a string of digits for the values above what
/// TOML integers hold (2^63 - 1).
fn seed(v: &Value) -> Result<u64, String> {
    match v {
        Value::Integer(i) => u64::try_from(*i).map_err(|_| format!("expected a seed from 0 to {}", u64::MAX)),
        Value::String(s) => parse_seed(s),
        other => Err(format!("expected a whole number, got a {}", other.type_str())),
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| format!("expected a seed from 0 to {}, got {s:?}", u64::MAX))
}

/// A size: a number of bytes, or a number with KiB, MiB or GiB.
fn bytes(v: &Value) -> Result<u64, String> {
    match v {
        Value::Integer(i) => u64::try_from(*i).map_err(|_| format!("expected a size, got {i}")),
        Value::String(s) => parse_bytes(s),
        other => Err(format!("expected a size such as \"64MiB\", got a {}", other.type_str())),
    }
}

/// A size (`64MiB`, `1G`, bytes), by the rule every size of crew follows
/// (`crew_core::job::parse_size`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    crew_core::job::parse_size(s).map_err(|e| e.to_string())
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!(
            "expected an IP address and port such as 127.0.0.1:0 or 0.0.0.0:7000 (port 0: any free port), got {s:?}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/p/crew.toml"), text).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn a_full_file_parses() -> Result<(), String> {
        let c = parse(
            "[daemon]\nlisten = \"0.0.0.0:7000\"\nadvertise = \"h:7000\"\ntls = \"always\"\nstore = \"s\"\nseed = 7\nheartbeat = 1\n\
             [recruit]\nidle = \"5m\"\nwall = 60\ntasks_max = 3\nlaunch_timeout = \"10s\"\nlaunch_max = 2\nprefetch = 0\n\
             [class.local]\ncores = 4\nname = \"x\"\n",
        )?;
        assert_eq!(c.daemon.listen, Some(SocketAddr::from(([0, 0, 0, 0], 7000))));
        assert_eq!(c.daemon.seed, Some(7));
        assert_eq!(c.daemon.tls, Some(TlsMode::Always));
        assert_eq!(parse("[daemon]\njournal_compact = \"8MiB\"\n")?.daemon.journal_compact_bytes, Some(8 << 20));
        assert_eq!(parse("[daemon]\njournal_compact = 4096\n")?.daemon.journal_compact_bytes, Some(4096));
        assert_eq!(parse("[daemon]\nlogs_keep = 5\n")?.daemon.logs_keep, Some(5));
        assert_eq!(parse("[daemon]\nlog_size = \"1MiB\"\n")?.daemon.log_size, Some(1 << 20));
        assert_eq!(parse("[daemon]\nlog_files = 2\n")?.daemon.log_files, Some(2));
        assert!(parse("[daemon]\nlog_files = 0\n").is_err(), "at least one rotated file");
        let h = parse("[daemon]\nhttp = \"127.0.0.1:8750\"\nhttp_hosts = [\"crew.lab\"]\n")?.daemon;
        assert_eq!(
            (h.http, h.http_hosts),
            (Some(SocketAddr::from(([127, 0, 0, 1], 8750))), vec!["crew.lab".to_owned()])
        );
        assert!(parse("[daemon]\nhttp_hosts = \"crew.lab\"\n").expect_err("a list").contains("daemon.http_hosts"));
        assert!(parse("[daemon]\nhttp = \"nowhere\"\n").expect_err("an address").contains("daemon.http"));
        assert!(parse("[daemon]\nlogs_keep = 0\n").is_err(), "at least one output is kept");
        let err = parse("[daemon]\njournal_compact = \"8MB\"\n").expect_err("MB is refused");
        assert!(err.contains("daemon.journal_compact") && err.contains("MiB"), "{err}");
        let err = parse("[daemon]\ntls = \"off\"\n").expect_err("no such mode");
        assert!(err.contains("daemon.tls") && err.contains("auto"), "{err}");
        assert_eq!(c.recruit.idle, Some(Duration::from_secs(300)));
        assert_eq!(c.recruit.wall, Some(Duration::from_secs(60)));
        assert_eq!(c.recruit.prefetch, Some(0));
        assert_eq!(c.store_url(Path::new("/p")), "/p/s");
        assert_eq!(Config::default().store_url(Path::new("/p")), "/p/store");
        let s3 = parse("[daemon]\nstore = \"s3://bkt/runs?region=eu-west-1\"\n")?;
        assert_eq!(s3.store_url(Path::new("/p")), "s3://bkt/runs?region=eu-west-1");
        let file = parse("[daemon]\nstore = \"file:///srv/crew\"\n")?;
        assert_eq!(file.store_url(Path::new("/p")), "file:///srv/crew");
        let merged = c.recruit.options("local", BTreeMap::from([("name".to_owned(), "y".to_owned())]));
        assert_eq!(merged.get("cores").map(String::as_str), Some("4"));
        assert_eq!(merged.get("name").map(String::as_str), Some("y"));
        Ok(())
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        for (text, want) in [
            ("[daemon]\nlisen = 1\n", "/p/crew.toml: daemon.lisen: unknown key"),
            ("[recruit]\nidle = \"soon\"\n", "/p/crew.toml: recruit.idle: invalid duration"),
            ("[recruit]\ntasks_max = 0\n", "/p/crew.toml: recruit.tasks_max: 0 is too small"),
            ("[class.local]\nx = [1]\n", "/p/crew.toml: class.local.x: expected a string"),
            ("colour = 1\n", "/p/crew.toml: colour: unknown key"),
            ("[daemon\n", "/p/crew.toml: not valid TOML"),
        ] {
            let got = parse(text).err().unwrap_or_default();
            assert!(got.starts_with(want), "{text:?}: {got}");
        }
    }

    #[test]
    fn the_environment_overrides_the_file_and_names_bad_variables() {
        let dir = Path::new("/nonexistent-crew-dir");
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
        };
        let c = Config::load_with(dir, env(&[("CREW_IDLE", "2s"), ("CREW_PREFETCH", "")])).map_err(|e| e.to_string());
        assert_eq!(c.map(|c| (c.recruit.idle, c.recruit.prefetch)), Ok((Some(Duration::from_secs(2)), None)));
        let e = Config::load_with(dir, env(&[("CREW_IDLE", "bad")])).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("CREW_IDLE=\"bad\": invalid duration"), "{e}");
    }
}
