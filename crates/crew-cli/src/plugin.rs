//! Worker classes from `PATH`: crew's side of the plugin protocol.
//!
//! `--class NAME` for a class that is not compiled in starts the executable
//! `crew-worker-NAME` found on `PATH` (as git finds its subcommands) and
//! speaks `crew_core::plugin`'s protocol (docs/plugin-protocol.md) with it
//! over its stdin and stdout: one long-lived process per class and
//! process, requests with ids, each with a timeout. [`PluginWorker`] is
//! that class as a `Worker`.
//!
//! Two threads per plugin, none per request: a writer (so that a plugin
//! that stops reading never blocks a caller) and a reader that hands each
//! answer to whoever waits for its id; a third waits for the process to
//! end. A plugin that is missing, crashes, hangs or writes something else
//! than answers fails the requests in flight and later ones with an error
//! that names it; nothing else in crew depends on it, so a daemon goes on.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use crew_core::plugin::{
    CheckOptionsParams, ErrorBody, HandlesParams, HelloParams, HelloResult, LaunchParams, LaunchResult, MAX_LINE,
    OptionSpec, PLUGIN_PREFIX, PLUGIN_PROTOCOL_VERSION, ProbeResult, Request, Response, TIMEOUT_MAX, TIMEOUT_MIN,
    WireTimeouts,
};
use crew_core::worker::{Capabilities, Handle, LaunchSpec, Liveness, Worker, WorkerError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long a plugin may take to answer `hello` after it was started.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `check_options` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a launch may take (a platform's submit call).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a terminate may take.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(60);

/// A plugin that did not work: what it is and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("the worker class plugin {program} ({path}) {what}")]
pub(crate) struct PluginError {
    program: String,
    path: String,
    what: String,
}

/// True when `name` can be a class name of a plugin: ASCII letters,
/// digits, `-` and `_`, not starting with `-` (no path can be built from
/// it).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The executable `crew-worker-NAME` of the first folder of `PATH` that
/// has one.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    if !valid_name(name) {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(format!("{PLUGIN_PREFIX}{name}"))).find(|p| is_executable(p))
}

/// Every plugin on `PATH`: class name and executable, the first of each
/// name (as [`find_on_path`] finds it), sorted by name.
pub(crate) fn plugins_on_path() -> Vec<(String, PathBuf)> {
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let Some(path) = std::env::var_os("PATH") else { return Vec::new() };
    for dir in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_prefix(PLUGIN_PREFIX)) else { continue };
            if valid_name(name) && !found.contains_key(name) && is_executable(&entry.path()) {
                found.insert(name.to_owned(), entry.path());
            }
        }
    }
    found.into_iter().collect()
}

/// Why a request got no result.
enum Failed {
    /// The plugin is gone or broken (why, in words that follow its name).
    Dead(String),
    /// No answer in time.
    Timeout(Duration),
    /// The plugin answered with an error.
    Error(ErrorBody),
}

type Waiter = Box<dyn FnOnce(Result<Value, Failed>) + Send>;

/// What the threads and the callers share.
struct Conn {
    state: Mutex<State>,
    pid: u32,
}

struct State {
    /// Set once the plugin is gone or broken: why.
    dead: Option<String>,
    /// The process was reaped: its pid may belong to another now.
    reaped: bool,
    waiting: HashMap<u64, Waiter>,
}

impl Conn {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the plugin dead (the first reason stays) and fails every
    /// request in flight.
    fn die(&self, why: String) {
        let (why, waiting) = {
            let mut s = self.lock();
            let why = s.dead.get_or_insert(why).clone();
            (why, s.waiting.drain().map(|(_, w)| w).collect::<Vec<Waiter>>())
        };
        for w in waiting {
            w(Err(Failed::Dead(why.clone())));
        }
    }

    /// Kills the plugin, if it was not reaped yet (never another process
    /// that took its pid).
    fn kill(&self) {
        let s = self.lock();
        if !s.reaped {
            let pid = libc::pid_t::try_from(self.pid).unwrap_or(0);
            if pid > 0 {
                // SAFETY: kill(2) with our own unreaped child's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// One running plugin process: its connection and its stdin.
struct Process {
    conn: Arc<Conn>,
    /// Lines to the plugin's stdin; dropped with the process value, which
    /// closes the plugin's stdin: its signal to exit.
    to_plugin: Mutex<std::sync::mpsc::Sender<Vec<u8>>>,
    next_id: AtomicU64,
}

impl Process {
    /// Why it is dead, if it is.
    fn dead(&self) -> Option<String> {
        self.conn.lock().dead.clone()
    }

    /// Registers `waiter` under a fresh id and sends the request.
    fn send(&self, method: &str, params: Value, waiter: Waiter) -> Result<u64, Failed> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line =
            serde_json::to_vec(&Request::new(id, method, params)).map_err(|e| Failed::Dead(e.to_string()))?;
        line.push(b'\n');
        {
            let mut s = self.conn.lock();
            if let Some(why) = &s.dead {
                return Err(Failed::Dead(why.clone()));
            }
            s.waiting.insert(id, waiter);
        }
        let sent = self.to_plugin.lock().unwrap_or_else(std::sync::PoisonError::into_inner).send(line);
        if sent.is_err() {
            // The writer is gone: the reader or waiter thread says why.
            let w = self.conn.lock().waiting.remove(&id);
            if let Some(w) = w {
                w(Err(Failed::Dead("stopped reading its input".to_owned())));
            }
        }
        Ok(id)
    }

    fn forget(&self, id: u64) {
        self.conn.lock().waiting.remove(&id);
    }

    /// A request from synchronous code (the handshake, `check_options`):
    /// blocks this thread; the answer comes from the reader thread, never
    /// from the caller's runtime.
    fn call_blocking(&self, method: &str, params: Value, timeout: Duration) -> Result<Value, Failed> {
        let (tx, rx) = std::sync::mpsc::channel();
        let id = self.send(
            method,
            params,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                self.forget(id);
                Err(Failed::Timeout(timeout))
            }
        }
    }

    /// A request from async code.
    async fn call(&self, method: &str, params: Value, timeout: Duration) -> Result<Value, Failed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self.send(
            method,
            params,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Failed::Dead("dropped a request".to_owned())),
            Err(_) => {
                self.forget(id);
                Err(Failed::Timeout(timeout))
            }
        }
    }
}

/// Starts the plugin at `path` for class `name` and does the handshake (at
/// most [`HELLO_TIMEOUT`]).
fn start_process(name: &str, path: &Path) -> Result<(Process, HelloResult), PluginError> {
    let error = |what: String| PluginError {
        program: format!("{PLUGIN_PREFIX}{name}"),
        path: path.display().to_string(),
        what,
    };
    let mut command = Command::new(path);
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // Its own process group: a Ctrl-C meant for crew does not kill it
    // before crew has stopped its workers through it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|e| error(format!("could not be started: {e}")))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(error("could not be started: no pipes".to_owned()));
    };
    let conn = Arc::new(Conn {
        state: Mutex::new(State { dead: None, reaped: false, waiting: HashMap::new() }),
        pid: child.id(),
    });
    let (to_plugin, lines) = std::sync::mpsc::channel::<Vec<u8>>();
    if let Err(e) = spawn_threads(&conn, child, stdin, stdout, lines) {
        conn.kill();
        return Err(error(format!("could not be started: {e}")));
    }
    let process = Process { conn, to_plugin: Mutex::new(to_plugin), next_id: AtomicU64::new(1) };
    let hello =
        serde_json::to_value(HelloParams::new(name, env!("CARGO_PKG_VERSION"))).map_err(|e| error(e.to_string()))?;
    let reply = process.call_blocking("hello", hello, HELLO_TIMEOUT).and_then(|v| {
        serde_json::from_value::<HelloResult>(v)
            .map_err(|e| Failed::Dead(format!("answered hello with a result that does not fit the protocol: {e}")))
    });
    let reply = match reply {
        Ok(r) => r,
        Err(f) => {
            process.conn.kill();
            return Err(error(match f {
                Failed::Dead(why) => format!("failed before it answered hello: {why}"),
                Failed::Timeout(t) => format!("did not answer hello within {t:?} and was stopped"),
                Failed::Error(e) => format!("refused hello: {}", e.message),
            }));
        }
    };
    if reply.protocol != PLUGIN_PROTOCOL_VERSION {
        process.conn.kill();
        return Err(error(format!(
            "speaks plugin protocol version {}; this crew speaks version {PLUGIN_PROTOCOL_VERSION} (update one of them)",
            reply.protocol
        )));
    }
    Ok((process, reply))
}

/// The shortest time between two starts of a class's plugin after it died,
/// so that a plugin that keeps dying is not started at every probe.
const RESTART_GAP: Duration = Duration::from_secs(5);

/// The one process of a class, started again when it died.
struct Supervisor {
    name: String,
    program: String,
    exe: PathBuf,
    process: Mutex<Arc<Process>>,
    last_start: Mutex<std::time::Instant>,
    /// Held while a dead process is replaced, so that callers arriving
    /// meanwhile wait for the new one instead of failing.
    starting: Mutex<()>,
}

impl Supervisor {
    fn current(&self) -> Arc<Process> {
        self.process.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The live process: a dead one is started again (blocking, up to the
    /// handshake's timeout) unless it was started less than
    /// [`RESTART_GAP`] ago, then the reason it died.
    fn live_blocking(&self) -> Result<Arc<Process>, Failed> {
        let p = self.current();
        if p.dead().is_none() {
            return Ok(p);
        }
        let _one = self.starting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = self.current();
        let Some(why) = p.dead() else { return Ok(p) };
        {
            let mut last = self.last_start.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < RESTART_GAP {
                return Err(Failed::Dead(why));
            }
            *last = std::time::Instant::now();
        }
        match start_process(&self.name, &self.exe) {
            Ok((fresh, _)) => {
                let fresh = Arc::new(fresh);
                *self.process.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh.clone();
                tracing::warn!("the worker class plugin {} {why}; started it again", self.program);
                Ok(fresh)
            }
            Err(e) => Err(Failed::Dead(format!("{why}; starting it again failed: it {}", e.what))),
        }
    }
}

/// How long each request may take: crew's defaults, or what the plugin
/// asked for in its handshake (kept within `TIMEOUT_MIN..=TIMEOUT_MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timeouts {
    check_options: Duration,
    launch: Duration,
    probe: Duration,
    terminate: Duration,
}

impl Timeouts {
    fn asked(asked: Option<&WireTimeouts>) -> Self {
        let pick = |ms: Option<u64>, default: Duration| {
            ms.map_or(default, |ms| Duration::from_millis(ms).clamp(TIMEOUT_MIN, TIMEOUT_MAX))
        };
        let a = asked.cloned().unwrap_or_default();
        Self {
            check_options: pick(a.check_options_ms, CHECK_TIMEOUT),
            launch: pick(a.launch_ms, LAUNCH_TIMEOUT),
            probe: pick(a.probe_ms, PROBE_TIMEOUT),
            terminate: pick(a.terminate_ms, TERMINATE_TIMEOUT),
        }
    }
}

/// A worker class served by a `crew-worker-NAME` process: one process at a
/// time, started again (at most every [`RESTART_GAP`]) at the first
/// request after it died. Its capabilities and options are those of the
/// first handshake.
pub(crate) struct PluginWorker {
    name: String,
    program: String,
    exe: PathBuf,
    caps: Capabilities,
    options: Vec<OptionSpec>,
    timeouts: Timeouts,
    supervisor: Arc<Supervisor>,
}

impl std::fmt::Debug for PluginWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWorker").field("program", &self.program).field("exe", &self.exe).finish_non_exhaustive()
    }
}

impl PluginWorker {
    /// Starts the plugin at `path` for class `name` and does the
    /// handshake (at most [`HELLO_TIMEOUT`]).
    pub(crate) fn start(name: &str, path: &Path) -> Result<Self, PluginError> {
        let (process, hello) = start_process(name, path)?;
        let program = format!("{PLUGIN_PREFIX}{name}");
        Ok(Self {
            name: name.to_owned(),
            program: program.clone(),
            exe: path.to_path_buf(),
            caps: hello.capabilities.to_capabilities(),
            timeouts: Timeouts::asked(hello.timeouts.as_ref()),
            options: hello.options,
            supervisor: Arc::new(Supervisor {
                name: name.to_owned(),
                program,
                exe: path.to_path_buf(),
                process: Mutex::new(Arc::new(process)),
                last_start: Mutex::new(std::time::Instant::now()),
                starting: Mutex::new(()),
            }),
        })
    }

    /// The live process from synchronous code.
    fn live_blocking(&self) -> Result<Arc<Process>, Failed> {
        self.supervisor.live_blocking()
    }

    /// The live process from async code: a restart runs on a blocking
    /// thread, and is installed even if this future is dropped meanwhile.
    async fn live(&self) -> Result<Arc<Process>, Failed> {
        let p = self.supervisor.current();
        if p.dead().is_none() {
            return Ok(p);
        }
        let supervisor = self.supervisor.clone();
        tokio::task::spawn_blocking(move || supervisor.live_blocking())
            .await
            .map_err(|e| Failed::Dead(format!("could not be started again: {e}")))?
    }

    /// A request from synchronous code.
    fn call_blocking<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
        timeout: Duration,
    ) -> Result<R, Failed> {
        let params = serde_json::to_value(params).map_err(|e| Failed::Dead(e.to_string()))?;
        let answer = self.live_blocking()?.call_blocking(method, params, timeout);
        self.decode(method, answer)
    }

    /// A request from async code.
    async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
        timeout: Duration,
    ) -> Result<R, WorkerError> {
        let params = serde_json::to_value(params).map_err(|e| self.fail(method, Failed::Dead(e.to_string())))?;
        let process = self.live().await.map_err(|f| self.fail(method, f))?;
        let answer = process.call(method, params, timeout).await;
        self.decode(method, answer).map_err(|f| self.fail(method, f))
    }

    fn decode<R: DeserializeOwned>(&self, method: &str, value: Result<Value, Failed>) -> Result<R, Failed> {
        serde_json::from_value(value?)
            .map_err(|e| Failed::Dead(format!("answered {method} with a result that does not fit the protocol: {e}")))
    }

    /// A failed request as a class error that names the plugin.
    fn fail(&self, method: &str, f: Failed) -> WorkerError {
        let (message, retryable) = match f {
            Failed::Error(e) => return e.into_worker_error(&self.name),
            Failed::Dead(why) => {
                (format!("the worker class plugin {} ({}) {why}", self.program, self.exe.display()), false)
            }
            Failed::Timeout(t) => (
                format!(
                    "the worker class plugin {} ({}) did not answer {method} within {t:?}",
                    self.program,
                    self.exe.display(),
                ),
                true,
            ),
        };
        WorkerError::Platform { class: self.name.clone(), message, retryable }
    }
}

/// Starts the writer, reader and waiter threads of a plugin.
fn spawn_threads(
    conn: &Arc<Conn>,
    mut child: Child,
    mut stdin: std::process::ChildStdin,
    stdout: ChildStdout,
    lines: std::sync::mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let name = |what: &str| format!("crew-plugin-{what}");
    std::thread::Builder::new().name(name("writer")).spawn(move || {
        for line in lines {
            if stdin.write_all(&line).and_then(|()| stdin.flush()).is_err() {
                break;
            }
        }
    })?;
    let (read_done, read_ended) = std::sync::mpsc::channel::<()>();
    let reader_conn = conn.clone();
    let reader = std::thread::Builder::new().name(name("reader")).spawn(move || {
        if let Some(why) = read_answers(&reader_conn, stdout) {
            reader_conn.kill();
            reader_conn.die(why);
        }
        let _ = read_done.send(());
    });
    let waiter_conn = conn.clone();
    let waiter = std::thread::Builder::new().name(name("waiter")).spawn(move || {
        let pid = libc::pid_t::try_from(waiter_conn.pid).unwrap_or(0);
        // Wait for the end without reaping, so that `kill` can never hit
        // another process that took the pid.
        // SAFETY: waitid on our own child, with a zeroed siginfo to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: as above; `info` outlives the call.
            let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        // Its last answers may still be in the pipe: give the reader a
        // moment to hand them out (it may never see the end, if the plugin
        // left its stdout to processes that live on).
        let _ = read_ended.recv_timeout(Duration::from_secs(1));
        let status = {
            let mut s = waiter_conn.lock();
            s.reaped = true;
            drop(s);
            child.wait()
        };
        let why = match status {
            Ok(s) => format!("exited ({s}); its messages, if any, are on crew's stderr or in daemon.log"),
            Err(e) => format!("ended, and could not be waited for: {e}"),
        };
        waiter_conn.die(why);
    });
    reader.and(waiter).map(|_| ())
}

/// Reads answers until the end of the plugin's stdout (`None`) or
/// something that is not an answer (`Some(why)`).
fn read_answers(conn: &Conn, stdout: ChildStdout) -> Option<String> {
    let mut input = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut input).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(format!("could not be read from: {e}")),
        }
        if line.len() > MAX_LINE {
            return Some("wrote a line over 1 MiB on its stdout, which carries the protocol".to_owned());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Response>(text) {
            Ok(answer) => {
                let waiter = conn.lock().waiting.remove(&answer.id);
                // No waiter: an answer that came after its timeout.
                if let Some(w) = waiter {
                    w(match (answer.error, answer.result) {
                        (Some(e), _) => Err(Failed::Error(e)),
                        (None, Some(v)) => Ok(v),
                        (None, None) => Ok(Value::Object(Default::default())),
                    });
                }
            }
            Err(_) => {
                let shown: String = text.chars().take(80).collect();
                return Some(format!(
                    "does not speak the crew plugin protocol: it wrote {shown:?} on its stdout, which is not a JSON answer \
                     (docs/plugin-protocol.md; a plugin logs to stderr)"
                ));
            }
        }
    }
}

/// The arguments that make the agent read its secret from stdin, when the
/// agent is a `crew worker` (the stock binary or an [`crate::App`]).
fn token_stdin_args(spec: &LaunchSpec) -> Option<Vec<String>> {
    (spec.args.first().map(String::as_str) == Some("worker")).then(|| vec!["--token-stdin".to_owned()])
}

#[async_trait]
impl Worker for PluginWorker {
    fn class(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn options(&self) -> Vec<OptionSpec> {
        self.options.clone()
    }

    fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
        let invalid = |message: String| WorkerError::Options { class: self.name.clone(), message };
        if !self.options.is_empty() {
            if let Some(k) = options.keys().find(|k| !self.options.iter().any(|o| &o.name == *k)) {
                let known: Vec<&str> = self.options.iter().map(|o| o.name.as_str()).collect();
                return Err(invalid(format!("unknown option {k:?}; the class takes {}", known.join(", "))));
            }
            if let Some(o) = self.options.iter().find(|o| o.required && !options.contains_key(&o.name)) {
                return Err(invalid(format!("option {:?} is required ({})", o.name, o.help)));
            }
        }
        let params = CheckOptionsParams::new(options.clone());
        self.call_blocking::<_, Value>("check_options", &params, self.timeouts.check_options)
            .map(|_| ())
            .map_err(|f| self.fail("check_options", f))
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError> {
        let params = LaunchParams::from_spec(spec, token_stdin_args(spec));
        let result: LaunchResult = self.call("launch", &params, self.timeouts.launch).await?;
        if result.handles.len() != spec.members.len() {
            return Err(self.fail(
                "launch",
                Failed::Dead(format!(
                    "answered a launch of {} agents with {} handles",
                    spec.members.len(),
                    result.handles.len()
                )),
            ));
        }
        Ok(result.handles.into_iter().map(Handle::new).collect())
    }

    async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError> {
        let params = HandlesParams::new(handles);
        let result: ProbeResult = self.call("probe", &params, self.timeouts.probe).await?;
        if result.states.len() != handles.len() {
            return Err(self.fail(
                "probe",
                Failed::Dead(format!(
                    "answered a probe of {} handles with {} states",
                    handles.len(),
                    result.states.len()
                )),
            ));
        }
        Ok(result.states.into_iter().map(Liveness::from).collect())
    }

    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError> {
        let params = HandlesParams::new(handles);
        self.call::<_, Value>("terminate", &params, self.timeouts.terminate).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn plugin_names_cannot_make_paths() {
        for ok in ["ssh", "aws-batch", "my_class2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", "../x", "a/b", "a b", ".", "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
