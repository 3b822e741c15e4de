//! The routes of docs/api.md over a [`Controller`].
//!
//! Role: turn HTTP requests into controller calls and answers into the JSON
//! shapes and error codes of the contract, never panicking on input. The
//! daemon keeps its own list of *ready* outputs (taken from the controller
//! by [`drain`] as soon as they are delivered, and appended to the outputs
//! log, `DIR/outputs.jsonl`): that is what lets `receive` pick an output by
//! name, `pending` count jobs not yet received by a client (the controller
//! forgets a job once it delivered it), and `logs` answer after receive.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use crew_controller::journal::{Record, Replay};
use crew_controller::{Controller, ControllerError, Recruit, RestoredJob};
use crew_core::job::InputSource;
use crew_core::job::{LineDefaults, parse_duration, parse_job_line, parse_job_value};
use crew_core::staging::Stager;
use crew_core::store::{Store, StoreError, StoreKey};
use crew_core::{JobId, Output, Tags};
use crew_scheduler::{SlotFilter, SlotLimits, SubmitError};
use futures::{StreamExt, TryStreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::idset::IdSet;
use super::journal::JournalWriter;
use super::outputs::OutputsLog;
use super::telemetry::{self, Telemetry};
use crate::config::RecruitDefaults;
use crate::registry::{ClassError, Registry};
use crate::wire::{self, ErrorCode};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// The daemon's state, shared by every connection.
pub(crate) struct Daemon {
    controller: Controller,
    store: Arc<dyn Store>,
    dir: PathBuf,
    journal: JournalWriter,
    outputs: Mutex<OutputsLog>,
    /// What recruit requests get for the fields they leave out (crew.toml,
    /// `CREW_*` variables).
    defaults: RecruitDefaults,
    inner: Mutex<Inner>,
    /// Bumped whenever `ready` grows or the daemon starts stopping: wakes
    /// waiting `receive` calls.
    changed: watch::Sender<u64>,
    /// Told after each accepted send: wakes [`drain`] when it idles.
    sent: Notify,
    /// Told when outputs were held back (`Inner::held`): wakes [`drain`].
    retry: Notify,
    /// Told by `POST /v1/down`.
    down: Notify,
    stopping: AtomicBool,
    tmp_counter: AtomicU64,
    /// Stages the inputs of sent jobs into the store; its cache of file
    /// digests lives as long as the daemon.
    stager: Stager,
    /// Events, metrics and job times.
    telemetry: Arc<Telemetry>,
    /// The TCP listener of the API, once bound.
    http: std::sync::OnceLock<wire::HttpInfo>,
}

#[derive(Default)]
struct Inner {
    /// Outputs taken from the controller, not yet received by a client.
    ready: VecDeque<Ready>,
    /// Jobs sent and not yet received by a client (a bitmap: a bit a job).
    unreceived: IdSet,
    /// The names of the named ones among them.
    named: HashMap<JobId, String>,
    /// Jobs sent and not finished (not yet in `ready`), ordered: ids grow in
    /// send order, so "every job sent so far has finished" is a range query.
    unfinished: IdSet,
    /// The names among `unreceived`.
    names: HashSet<String>,
    /// Outputs taken from the controller whose `Delivered` record could
    /// not be written (a full disk): their jobs still count as unfinished,
    /// and [`drain`] journals them again until it works.
    held: Vec<Output>,
}

/// An output waiting to be received, kept as its JSON (what the journal,
/// the outputs log and the receive answer all write: serialized once, when
/// the controller delivers it, and smaller than the `Output` itself).
#[derive(Clone, Debug)]
struct Ready {
    id: JobId,
    name: Option<String>,
    json: Box<[u8]>,
}

impl Ready {
    fn new(o: &Output) -> Self {
        // Plain data: serializing cannot fail (`null` would show a bug).
        let json = serde_json::to_vec(o).unwrap_or_else(|_| b"null".to_vec());
        Self { id: o.id, name: o.name.clone(), json: json.into_boxed_slice() }
    }

    /// The output itself.
    fn output(&self) -> Result<Output, ApiError> {
        serde_json::from_slice(&self.json)
            .map_err(|e| ApiError::internal(format!("the output of job {} does not read back: {e}", self.id)))
    }
}

impl Inner {
    /// A job sent and not yet received (with its name, taken).
    fn add_unreceived(&mut self, id: JobId, name: Option<String>) {
        self.unreceived.insert(id);
        if let Some(n) = name {
            self.names.insert(n.clone());
            self.named.insert(id, n);
        }
    }

    /// A job received (or withdrawn): its name is free again.
    fn forget_unreceived(&mut self, id: JobId) {
        self.unreceived.remove(&id);
        if let Some(n) = self.named.remove(&id) {
            self.names.remove(&n);
        }
    }
}

impl Daemon {
    pub(crate) fn new(
        controller: Controller,
        store: Arc<dyn Store>,
        dir: PathBuf,
        journal: JournalWriter,
        outputs: OutputsLog,
        defaults: RecruitDefaults,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            telemetry,
            http: std::sync::OnceLock::new(),
            controller,
            stager: Stager::new(Arc::clone(&store)),
            store,
            dir,
            journal,
            outputs: Mutex::new(outputs),
            defaults,
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
            sent: Notify::new(),
            retry: Notify::new(),
            down: Notify::new(),
            stopping: AtomicBool::new(false),
            tmp_counter: AtomicU64::new(0),
        }
    }

    fn outputs_log(&self) -> MutexGuard<'_, OutputsLog> {
        self.outputs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave `Inner` half-updated in a way
        // that matters more than stopping to answer; keep serving.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the API's TCP listener, for `GET /v1/health`.
    pub(crate) fn set_http(&self, info: wire::HttpInfo) {
        let _ = self.http.set(info);
    }

    /// Resolves when `POST /v1/down` was called.
    pub(crate) async fn down_requested(&self) {
        self.down.notified().await;
    }

    /// Refuses new work from now on and wakes waiting receives.
    pub(crate) fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.send_modify(|n| *n += 1);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Journals `records` and waits until they are durable (one group
    /// commit); a journal that cannot be written fails the request (nothing
    /// may be acknowledged that a restart would lose).
    async fn journal(&self, records: &[Record]) -> Result<(), ApiError> {
        self.journal.write(records).await.map_err(|e| self.commit_error(&e))
    }

    /// The answer to a request whose records could not be made durable.
    fn commit_error(&self, e: &super::journal::CommitError) -> ApiError {
        if e.is_disk_full() {
            ApiError::new(
                ErrorCode::DiskFull,
                format!(
                    "the disk of the project folder {} is full: nothing was done; free some space (the daemon takes \
                     work again by itself once it can write its journal)",
                    self.dir.display()
                ),
            )
        } else {
            ApiError::internal(e.to_string())
        }
    }

    /// Makes what was journaled durable and stops the committer (a clean
    /// stop).
    pub(crate) async fn close_journal(&self) {
        // Every worker was stopped: none is to be expected back.
        if let Err(e) = self.journal.append(&[Record::Down { slot: None }]) {
            tracing::error!("{e}");
        }
        if let Err(e) = self.journal.close().await {
            tracing::error!("{e}");
        }
    }

    /// Rebuilds the state a journal described: slots, dismissals, jobs not
    /// finished (a job that was running counts a crash), outputs not yet
    /// received. Jobs that can no longer run, or that a client asked to
    /// cancel, end with an output that says why.
    pub(crate) async fn restore(&self, replay: Replay) {
        let registry = Registry::stock();
        for r in &replay.recruits {
            let class = match registry.get(&r.class) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("cannot recruit {} slot(s) again: {e}", r.count);
                    continue;
                }
            };
            let req = Recruit {
                class,
                count: r.count,
                tags: r.tags.clone(),
                limits: r.limits.clone(),
                options: r.options.clone(),
            };
            if let Err(e) = self.controller.recruit(req) {
                tracing::error!("cannot recruit {} {} slot(s) again: {e}", r.count, r.class);
            }
        }
        for f in &replay.dismissed {
            self.controller.dismiss(f);
        }
        // Workers that were up may come back (with the jobs they run).
        self.controller.await_workers(&replay.up.iter().cloned().collect::<Vec<_>>());
        // Served before any request: nothing sees these before the
        // journal has them.
        let ended = {
            let mut inner = self.lock();
            let mut ended = Vec::new();
            for (id, p) in replay.pending {
                let name = p.spec.name.clone();
                let tags = p.spec.tags.clone();
                let mut history = p.history;
                // A job left running is held for its slot's worker, which
                // may come back with it (no crash then); only a journal
                // that does not name the slot counts the crash now.
                let slot = if p.running { p.slot.clone() } else { None };
                if p.running && (slot.is_none() || !self.controller.resumes()) {
                    history.crashes += 1;
                }
                let slot = slot.filter(|_| self.controller.resumes());
                self.telemetry.restored(id, &p.spec);
                let job = RestoredJob { id, spec: p.spec, history, slot };
                let restored = if p.cancelled {
                    Err("it was cancelled by the user".to_owned())
                } else {
                    self.controller.restore(vec![job]).map_err(|e| e.to_string())
                };
                if restored.is_ok() {
                    inner.unfinished.insert(id);
                }
                if let Err(e) = restored {
                    let seed = crew_core::seed::job_seed(0, &name.clone().unwrap_or_else(|| id.to_string()));
                    let mut o = Output::without_run(
                        id,
                        name.clone(),
                        tags,
                        seed,
                        crew_core::Status::Cancelled,
                        if p.cancelled {
                            "cancelled by the user".to_owned()
                        } else {
                            format!("the job could not be resumed after the daemon restarted: {e}")
                        },
                    );
                    o.attempt = history.attempts;
                    ended.push(o);
                }
                inner.add_unreceived(id, name);
            }
            for o in replay.ready.iter().chain(&ended) {
                inner.add_unreceived(o.id, o.name.clone());
                inner.ready.push_back(Ready::new(o));
            }
            ended
        };
        if !ended.is_empty() {
            let records: Vec<Record> = ended.into_iter().map(|o| Record::Delivered { output: Box::new(o) }).collect();
            if let Err(e) = self.journal(&records).await {
                tracing::error!("{}", e.message);
            }
        }
        self.sent.notify_one();
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records outputs taken from the controller: the outputs log, the
    /// journal (durably: one group commit for the batch), then the ready
    /// list. Only then does the daemon count their jobs as finished, so
    /// that no one (`status`, `wait`, `receive`) is told a job ended before
    /// a restart would know it too.
    async fn take(&self, outputs: Vec<Output>) {
        if outputs.is_empty() {
            return;
        }
        // Serialized once: the journal, the outputs log and the answers
        // of receive all write these bytes.
        let ready: Vec<Ready> = outputs.iter().map(Ready::new).collect();
        let lines: Vec<&[u8]> = ready.iter().map(|r| &*r.json).collect();
        match self.journal.write_delivered(&lines).await {
            Ok(()) => {}
            Err(e) if e.is_disk_full() => {
                // Held back, not lost: counted unfinished until [`drain`]
                // can journal them (and only then receivable).
                tracing::warn!(jobs = outputs.len(), "outputs held until the journal can be written: {e}");
                self.lock().held.extend(outputs);
                self.retry.notify_one();
                return;
            }
            Err(e) => {
                // A poisoned journal: every request that needs it fails, and
                // `receive` cannot hand these out.
                tracing::error!(jobs = outputs.len(), "{e}");
            }
        }
        {
            let mut log = self.outputs_log();
            for r in &ready {
                if let Err(e) = log.append_json(r.id, r.name.as_deref(), &r.json) {
                    tracing::warn!(job = %r.id, "cannot record the output for `logs`: {e}");
                }
            }
        }
        {
            let mut inner = self.lock();
            for r in ready {
                inner.unfinished.remove(&r.id);
                inner.ready.push_back(r);
            }
        }
        // Told once receivable: a client that receives a job's output when
        // it hears the job ended (the Python executor does) finds it. The
        // drain runs on a thread of its own, so an event sent earlier could
        // reach a client before the output is in the ready list.
        self.telemetry.ended(&outputs);
        drop(outputs);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Reads a whole store object (through a private file, since the store
    /// streams); `None` when it does not exist.
    async fn read_object(&self, key: &StoreKey) -> Result<Option<Vec<u8>>, ApiError> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("tmp-read-{}-{n}", std::process::id()));
        let result = match self.store.get_file(key, &tmp).await {
            Ok(_) => std::fs::read(&tmp)
                .map(Some)
                .map_err(|e| ApiError::internal(format!("cannot read {}: {e}", tmp.display()))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(ApiError::internal(format!("cannot read {key:?} from the store: {e}"))),
        };
        let _ = std::fs::remove_file(&tmp);
        result
    }
}

/// Takes every output the controller delivers into the daemon's ready list,
/// for the daemon's whole life: until `stop`, once nothing more is
/// delivered (an output taken is always journaled first).
pub(crate) async fn drain(d: Arc<Daemon>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    loop {
        let held = std::mem::take(&mut d.lock().held);
        if !held.is_empty() {
            // Outputs a full disk held back: tried again (with what came
            // meanwhile) until their records are written.
            let mut batch = held;
            batch.extend(d.controller.receive_all());
            d.take(batch).await;
            if !d.lock().held.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(HELD_RETRY) => {}
                    _ = &mut stop => return,
                }
            }
            continue;
        }
        tokio::select! {
            biased;
            received = d.controller.receive_wait(None) => match received {
                Some(o) => {
                    // Everything delivered meanwhile goes in the same commit.
                    let mut batch = vec![o];
                    batch.extend(d.controller.receive_all());
                    d.take(batch).await;
                }
                // Nothing pending: sleep until the next send (a send made
                // since left a permit, so none is missed).
                None => tokio::select! {
                    () = d.sent.notified() => {}
                    () = d.retry.notified() => {}
                    _ = &mut stop => return,
                },
            },
            () = d.retry.notified() => {}
            _ = &mut stop => return,
        }
    }
}

/// How often outputs held back by a full disk are journaled again.
const HELD_RETRY: Duration = Duration::from_millis(500);

/// A failed request: status, stable code, message for people.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self { status, code, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    fn invalid_option(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidOption, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    fn shutting_down() -> Self {
        Self::new(ErrorCode::ShuttingDown, "the crew daemon is stopping")
    }

    /// Maps a controller error of `send`/`recruit`.
    fn from_controller(e: ControllerError) -> Self {
        let message = e.to_string();
        match e {
            ControllerError::InvalidJob(_) => Self::new(ErrorCode::InvalidJob, message),
            ControllerError::Refused(SubmitError::NoMatchingSlot { .. } | SubmitError::AllBroken { .. }) => {
                Self::new(ErrorCode::NoMatchingWorker, message)
            }
            ControllerError::DuplicateName(_) => Self::new(ErrorCode::DuplicateName, message),
            ControllerError::Recruit(m) => Self::invalid_option(m),
            ControllerError::Closed => Self::shutting_down(),
            _ => Self::internal(message),
        }
    }
}

type Answer = Result<Value, ApiError>;

/// A response body: a JSON answer whole, or a captured stream piece by
/// piece.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The JSON error answer of `code` (for refusals made before routing).
pub(crate) fn error_response(code: ErrorCode, message: String) -> Response<Body> {
    let e = ApiError::new(code, message);
    let mut res =
        respond(e.status, &reply(&wire::ErrorAnswer { error: wire::ErrorDetail { code: e.code, message: e.message } }));
    if code == ErrorCode::Unauthorized {
        res.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
    }
    res
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut res = Response::new(Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed_unsync());
    *res.status_mut() = status;
    res.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    res
}

/// Serves one request.
pub(crate) async fn handle(d: Arc<Daemon>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if method == Method::GET && !d.stopping() {
        match path.as_str() {
            "/metrics" => return Ok(metrics(&d)),
            "/v1/events" => return Ok(events(&d)),
            _ => {
                if let Some(res) = super::dashboard::asset(&path) {
                    return Ok(res);
                }
            }
        }
    }
    if method == Method::GET {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["v1", "jobs", id, "logs", which @ ("stdout" | "stderr")] = segments.as_slice() {
            if !d.stopping() {
                match stream_log(&d, id, which).await {
                    Ok(res) => return Ok(res),
                    Err(e) => {
                        return Ok(respond(
                            e.status,
                            &reply(&wire::ErrorAnswer {
                                error: wire::ErrorDetail { code: e.code, message: e.message },
                            }),
                        ));
                    }
                }
            }
        }
    }
    if method == Method::POST && path == "/v1/receive" && !d.stopping() {
        let answer = match body(req).await {
            Ok(r) => receive(&d, r).await,
            Err(e) => Err(e),
        };
        return Ok(answer.unwrap_or_else(|e| {
            respond(
                e.status,
                &reply(&wire::ErrorAnswer { error: wire::ErrorDetail { code: e.code, message: e.message } }),
            )
        }));
    }
    let answer = route(&d, req).await;
    Ok(match answer {
        Ok(body) => respond(StatusCode::OK, &body),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!("{method} {path}: {} {}", e.code, e.message);
            } else {
                tracing::debug!("{method} {path}: {} {}", e.code, e.message);
            }
            respond(
                e.status,
                &reply(&wire::ErrorAnswer { error: wire::ErrorDetail { code: e.code, message: e.message } }),
            )
        }
    })
}

async fn route(d: &Arc<Daemon>, req: Request<Incoming>) -> Answer {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if d.stopping() && !(method == Method::GET && path == "/v1/health") {
        return Err(ApiError::shutting_down());
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "health"]) => Ok(health(d)),
        (&Method::GET, ["v1", "status"]) => Ok(status(d)),
        (&Method::POST, ["v1", "recruit"]) => recruit(d, body(req).await?).await,
        (&Method::POST, ["v1", "launch"]) => launch(d, body(req).await?),
        (&Method::POST, ["v1", "jobs"]) if is_job_lines(&req) => send_lines(d, req).await,
        (&Method::POST, ["v1", "jobs"]) => send(d, body(req).await?).await,
        (&Method::GET, ["v1", "sendable"]) => sendable(d, &query),
        (&Method::GET, ["v1", "receivable"]) => Ok(receivable(d)),
        (&Method::POST, ["v1", "shutdown"]) => shutdown(d, body(req).await?),
        (&Method::POST, ["v1", "dismiss"]) => dismiss(d, body(req).await?).await,
        (&Method::POST, ["v1", "restart"]) => {
            let _: wire::Empty = body(req).await?;
            Ok(reply(&wire::Restarted { restarted: d.controller.restart() }))
        }
        (&Method::POST, ["v1", "cancel"]) => cancel(d, body(req).await?).await,
        (&Method::GET, ["v1", "jobs"]) => list_jobs(d, &query),
        (&Method::GET, ["v1", "jobs", job]) => job_info(d, job),
        (&Method::GET, ["v1", "jobs", id, "logs"]) => logs(d, id).await,
        (&Method::GET, ["v1", "jobs", job, "objects"]) => objects(d, job),
        (&Method::POST, ["v1", "down"]) => {
            let _: wire::Empty = body(req).await?;
            d.begin_stop();
            d.down.notify_one();
            Ok(reply(&wire::Done { ok: true }))
        }
        _ => Err(ApiError::not_found(format!("no route {method} {path}; see docs/api.md"))),
    }
}

/// Whether a request's body is job lines ([`JOB_LINES`]).
fn is_job_lines(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(JOB_LINES)))
}

/// Reads and parses a JSON body; an empty body is `{}`.
async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                ApiError::new(
                    ErrorCode::BodyTooLarge,
                    format!("the request body is larger than {MAX_BODY} bytes: send the jobs in smaller batches"),
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    parse_body(&bytes)
}

/// Parses a JSON body already read; an empty body is `{}`.
fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn health(d: &Daemon) -> Value {
    reply(&wire::Health {
        ok: true,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        dir: d.dir.clone(),
        store: d.store.url(),
        workers: workers(d),
        http: d.http.get().cloned(),
    })
}

fn status(d: &Daemon) -> Value {
    let report = d.controller.status();
    let (ready, unfinished) = {
        let inner = d.lock();
        (inner.ready.len(), inner.unfinished.len())
    };
    // A job the controller finished counts as running until its output is
    // durable in the journal (it would run again after a crash before).
    let running = report.running.max(unfinished.saturating_sub(report.queued));
    reply(&wire::Status {
        pid: std::process::id(),
        dir: d.dir.clone(),
        slots: report.slots,
        jobs: wire::JobCounts { queued: report.queued as u64, running: running as u64, ready: ready as u64 },
        workers: workers(d),
        http: d.http.get().cloned(),
    })
}

fn workers(d: &Daemon) -> wire::Workers {
    wire::Workers {
        listen: d.controller.addr().to_string(),
        advertise: d.controller.advertised().to_owned(),
        tls: d.controller.tls_mode(),
        tls_sha256: d.controller.tls_fingerprint().map(str::to_owned),
    }
}

/// An answer as the JSON value the routes return.
fn reply<T: serde::Serialize>(value: &T) -> Value {
    // Serializing these plain types cannot fail; `null` would show a bug.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// A duration option: a string (`"30s"`) or a number of seconds; `null` is
/// none.
fn duration(field: &str, v: &Value) -> Result<Option<Duration>, ApiError> {
    let text = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(ApiError::invalid_option(format!("{field}: expected a duration such as \"30s\", got {other}")));
        }
    };
    parse_duration(&text).map(Some).map_err(|e| ApiError::invalid_option(format!("{field}: {e}")))
}

fn tags(field: &str, v: Option<Vec<String>>) -> Result<Option<Tags>, ApiError> {
    v.map(|t| Tags::try_from(t).map_err(|e| ApiError::invalid_option(format!("{field}: {e}")))).transpose()
}

async fn recruit(d: &Daemon, r: wire::RecruitRequest) -> Answer {
    // Off the daemon's threads: a plugin's first use starts it and waits
    // for its handshake (up to 10 s for one that hangs).
    let name = r.class.clone();
    let class = tokio::task::spawn_blocking(move || Registry::stock().get(&name))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e {
            ClassError::Unknown { .. } => ApiError::new(ErrorCode::UnknownClass, e.to_string()),
            ClassError::Plugin(_) => ApiError::new(ErrorCode::ClassFailed, e.to_string()),
        })?;
    // A field left out (or null) takes the daemon's default (crew.toml,
    // `CREW_*`), then the built-in one.
    let def = &d.defaults;
    let mut limits = SlotLimits {
        idle_timeout: duration("idle", &r.idle)?.or(def.idle),
        wall_time: duration("wall", &r.wall)?.or(def.wall),
        tasks_max: r.tasks_max.or(def.tasks_max),
        ..SlotLimits::default()
    };
    if let Some(t) = duration("launch_timeout", &r.launch_timeout)?.or(def.launch_timeout) {
        limits.launch_timeout = t;
    }
    if let Some(n) = r.launch_max.or(def.launch_max) {
        if n == 0 {
            return Err(ApiError::invalid_option("launch_max: must be at least 1"));
        }
        limits.launch_max = n;
    }
    if let Some(n) = r.prefetch.or(def.prefetch) {
        limits.prefetch = n;
    }
    let warnings: Vec<String> = d.controller.reach_warning(class.as_ref()).into_iter().collect();
    let mut req = Recruit::new(class, r.workers);
    req.tags = tags("tags", r.tags)?.unwrap_or_default();
    req.limits = limits;
    req.options = def.options(&r.class, r.options.unwrap_or_default());
    let record = Record::Recruit {
        class: r.class,
        count: req.count,
        tags: req.tags.clone(),
        limits: req.limits.clone(),
        options: req.options.clone(),
    };
    let slots = d.controller.recruit(req).map_err(ApiError::from_controller)?;
    d.journal(&[record]).await?;
    Ok(reply(&wire::Recruited { slots, warnings }))
}

fn launch(d: &Daemon, r: wire::LaunchRequest) -> Answer {
    let filter = SlotFilter { tags: tags("tags", r.tags)?, slot: None };
    Ok(reply(&wire::Launched { launched: d.controller.launch(&filter, r.workers.unwrap_or(usize::MAX)) }))
}

async fn send(d: &Daemon, r: wire::SendRequest) -> Answer {
    let specs = specs_of(r)?;
    let ids = accept(d, specs).await?;
    Ok(reply(&wire::Sent { ids: ids.iter().map(|i| i.0).collect() }))
}

/// `POST /v1/jobs` with a body of job lines ([`JOB_LINES`]): parsed on a
/// thread of its own as the body arrives, so that neither the body nor a
/// JSON tree of it is ever held whole; accepted all or nothing, like a JSON
/// send. A body cut short (a client that found a bad line in its file, or
/// died) accepts nothing.
async fn send_lines(d: &Daemon, req: Request<Incoming>) -> Answer {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let parser = tokio::task::spawn_blocking(move || parse_job_lines(rx));
    let mut body = req.into_body();
    let mut cut = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if tx.send(data).await.is_err() {
                        // The parser stopped at a bad line: its error is the answer.
                        break;
                    }
                }
            }
            Err(e) => {
                cut = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let parsed = parser.await.map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(e) = cut {
        return Err(ApiError::bad_request(format!("cannot read the request body (nothing was accepted): {e}")));
    }
    let ids = accept(d, parsed?).await?;
    Ok(reply(&wire::Sent { ids: ids.iter().map(|i| i.0).collect() }))
}

/// The media type of a send whose body is job lines, one JSON object a line.
pub(crate) const JOB_LINES: &str = "application/x-ndjson";

/// The longest job line taken: a job is at most [`crew_core::job::MAX_JOB_BYTES`]
/// as MessagePack, and its JSON may be somewhat longer.
const MAX_JOB_LINE: usize = 2 * crew_core::job::MAX_JOB_BYTES;

/// Parses job lines as their bytes arrive; the first bad line is the
/// error (`line N: ...`, 1-based).
fn parse_job_lines(mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> Result<Vec<crew_core::JobSpec>, ApiError> {
    let defaults = LineDefaults::default();
    let mut specs = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut n = 0usize;
    let mut one = |line: &[u8], n: usize| -> Result<(), ApiError> {
        let invalid = |e: String| ApiError::new(ErrorCode::InvalidJob, format!("line {n}: {e}"));
        let text = std::str::from_utf8(line).map_err(|e| invalid(format!("not UTF-8: {e}")))?.trim();
        if text.is_empty() {
            return Ok(());
        }
        if !text.starts_with('{') {
            return Err(invalid("a job must be a JSON object".to_owned()));
        }
        let spec = parse_job_line(text, &defaults).map_err(|e| invalid(e.to_string()))?;
        specs.push(checked_spec(spec).map_err(|e| ApiError::new(e.code, format!("line {n}: {}", e.message)))?);
        Ok(())
    };
    while let Some(chunk) = rx.blocking_recv() {
        let mut rest: &[u8] = &chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            n += 1;
            if partial.is_empty() {
                one(&rest[..i], n)?;
            } else {
                partial.extend_from_slice(&rest[..i]);
                one(&partial, n)?;
                partial.clear();
            }
            rest = &rest[i + 1..];
        }
        partial.extend_from_slice(rest);
        if partial.len() > MAX_JOB_LINE {
            return Err(ApiError::new(
                ErrorCode::JobTooLarge,
                format!("line {}: longer than {MAX_JOB_LINE} bytes; pass large data as an input file", n + 1),
            ));
        }
    }
    if !partial.is_empty() {
        one(&partial, n + 1)?;
    }
    Ok(specs)
}

/// How many jobs one `accepted` journal record holds at most (a request
/// journals as several, written together).
const ACCEPTED_PER_RECORD: usize = 8192;

/// Stages, checks, numbers and journals jobs durably, then hands them to
/// the controller: all or nothing. Returns their ids.
async fn accept(d: &Daemon, mut specs: Vec<crew_core::JobSpec>) -> Result<Vec<JobId>, ApiError> {
    // Inputs go to the store before the jobs are accepted, so that the
    // journal records staged jobs (a restart stages nothing again).
    if specs.iter().any(crew_core::JobSpec::has_data) {
        if let Err(e) = d.stager.stage(&mut specs).await {
            return Err(if e.is_store_failure() {
                ApiError::internal(format!("cannot stage the jobs' inputs: {e}"))
            } else {
                ApiError::new(ErrorCode::InvalidInput, format!("cannot stage an input: {e}"))
            });
        }
    }
    // Checked, numbered and journaled durably before the controller (hence
    // any agent) sees them: the answer, and every run, follow the commit.
    let ids = {
        // The controller forgets a name once the job finished; the contract
        // keeps it taken until a client received the output. Names are
        // taken here, under the lock, so two sends cannot both pass.
        let mut inner = d.lock();
        for name in specs.iter().filter_map(|s| s.name.as_ref()) {
            if inner.names.contains(name) {
                return Err(ApiError::new(
                    ErrorCode::DuplicateName,
                    format!(
                        "a job named {name:?} is already pending; names must be unique among jobs not yet received"
                    ),
                ));
            }
        }
        d.controller.check_jobs(&specs).map_err(ApiError::from_controller)?;
        let ids = d.controller.reserve_ids(specs.len()).map_err(ApiError::from_controller)?;
        for (id, spec) in ids.iter().zip(&specs) {
            inner.add_unreceived(*id, spec.name.clone());
            inner.unfinished.insert(*id);
        }
        ids
    };
    let forget = |why: ApiError| {
        let mut inner = d.lock();
        for id in &ids {
            inner.forget_unreceived(*id);
            inner.unfinished.remove(id);
        }
        why
    };
    // One write of several records for a large request (a line of the
    // journal stays far under its record limit); replay takes them all or
    // none (`more`).
    if let Err(e) = d.journal.write_accepted(&ids, &specs, ACCEPTED_PER_RECORD).await {
        return Err(forget(d.commit_error(&e)));
    }
    // Told before the controller has them: a watcher hears of the jobs
    // before any of their attempts.
    let input_bytes: Vec<u64> = specs.iter().map(telemetry::input_bytes).collect();
    d.telemetry.sent(&ids, &input_bytes);
    let jobs =
        ids.iter().zip(specs).map(|(id, spec)| RestoredJob { id: *id, spec, history: Default::default(), slot: None });
    if let Err(e) = d.controller.restore(jobs.collect()) {
        // Refused after all (the controller closed, or the slots for the
        // tags went in between): journaled as withdrawn, so that a restart
        // does not run them.
        let withdrawn = d.journal(&[Record::Withdrawn { ids: ids.clone() }]).await;
        if let Err(w) = withdrawn {
            tracing::error!("jobs {ids:?} were refused but may run after a restart: {}", w.message);
        }
        return Err(forget(ApiError::from_controller(e)));
    }
    d.sent.notify_one();
    Ok(ids)
}

/// How many outputs one piece of a streamed receive answer holds: each
/// piece is journaled as received (one group commit) before it is written.
const RECEIVE_BATCH: usize = 2048;

/// `POST /v1/receive`. The answer is streamed, one output a line
/// (`{"outputs":[` / an output / `,`+output ... / `],"pending":N}`), in
/// pieces of at most [`RECEIVE_BATCH`] outputs: each piece is taken from
/// the ready list and journaled as received only when the connection takes
/// the previous one, so neither side holds the whole answer, and a client
/// that goes away mid-answer leaves every output not yet handed to its
/// connection ready, in order, for the next receive. The first piece is
/// journaled before the answer starts, so a journal that cannot be written
/// is still an error status.
async fn receive(d: &Arc<Daemon>, r: wire::ReceiveRequest) -> Result<Response<Body>, ApiError> {
    let timeout = duration("timeout", &r.timeout)?;
    let deadline = timeout.map(|t| crew_core::clock::after_tokio(tokio::time::Instant::now(), t));
    let mut changes = d.changed.subscribe();
    // With `all` and `wait`: the jobs sent so far, which must all be ready.
    let awaited: Option<JobId> = if r.all && r.wait { d.lock().unfinished.last() } else { None };
    if awaited.is_some() && r.ids.is_none() && r.name.is_none() {
        // Streamed as the jobs finish rather than once they all have: the
        // client prints records while the rest still run. (With nothing to
        // wait for, the answer is the one of `all` alone, below.)
        d.take(d.controller.receive_all()).await;
        let first: Vec<Ready> = {
            let mut inner = d.lock();
            let n = inner.ready.len().min(RECEIVE_BATCH);
            inner.ready.drain(..n).collect()
        };
        let first = hand_out(d, first).await?;
        return Ok(streamed_outputs(Arc::clone(d), first, Rest::Until { awaited, deadline }));
    }
    let mut last_chance = !r.wait;
    loop {
        changes.borrow_and_update();
        // Outputs the controller has that the drain task has not taken yet
        // (it may be a wake-up behind): what `status` counts as ready is
        // receivable now.
        d.take(d.controller.receive_all()).await;
        let taken = {
            let mut inner = d.lock();
            let ready_now = match (&r.ids, &r.name) {
                (Some(ids), _) => {
                    inner.ready.iter().any(|o| ids.contains(&o.id))
                        || !ids.iter().any(|id| inner.unreceived.contains(id))
                }
                (None, Some(n)) => inner.ready.iter().any(|o| o.name.as_ref() == Some(n)) || !inner.names.contains(n),
                (None, None) if r.all => awaited.is_none_or(|last| !inner.unfinished.any_up_to(last)),
                (None, None) => !inner.ready.is_empty() || inner.unreceived.is_empty(),
            };
            if ready_now || last_chance || d.stopping() {
                // The first piece, and how many more outputs follow it.
                let (outputs, more): (Vec<Ready>, usize) = match (&r.ids, &r.name) {
                    (Some(ids), _) => {
                        let wanted: std::collections::HashSet<JobId> = ids.iter().copied().collect();
                        let (mine, rest): (Vec<Ready>, Vec<Ready>) =
                            inner.ready.drain(..).partition(|o| wanted.contains(&o.id));
                        inner.ready.extend(rest);
                        (mine, 0)
                    }
                    (None, Some(n)) => match inner.ready.iter().position(|o| o.name.as_ref() == Some(n)) {
                        Some(i) => (inner.ready.remove(i).into_iter().collect(), 0),
                        None => (Vec::new(), 0),
                    },
                    (None, None) if r.all => {
                        let all = inner.ready.len();
                        let first = all.min(RECEIVE_BATCH);
                        (inner.ready.drain(..first).collect(), all - first)
                    }
                    (None, None) => (inner.ready.pop_front().into_iter().collect(), 0),
                };
                Some((outputs, more))
            } else {
                None
            }
        };
        if let Some((outputs, more)) = taken {
            let first = hand_out(d, outputs).await?;
            return Ok(streamed_outputs(Arc::clone(d), first, Rest::Count(more)));
        }
        let changed = changes.changed();
        match deadline {
            Some(t) => {
                if tokio::time::timeout_at(t, changed).await.is_err() {
                    last_chance = true;
                }
            }
            None => {
                let _ = changed.await;
            }
        }
    }
}

/// Journals outputs taken from the ready list as received (durably) and
/// forgets their jobs; returns their lines for the answer (each
/// output as one line, after a comma unless it is the answer's first). On
/// a failed journal write they go back to the front of the list, in order.
async fn hand_out(d: &Daemon, outputs: Vec<Ready>) -> Result<Vec<Ready>, ApiError> {
    if outputs.is_empty() {
        return Ok(outputs);
    }
    if let Err(e) = d.journal(&[Record::Received { ids: outputs.iter().map(|o| o.id).collect() }]).await {
        // Not received after all: put them back, in order.
        let mut inner = d.lock();
        for o in outputs.into_iter().rev() {
            inner.ready.push_front(o);
        }
        return Err(e);
    }
    d.telemetry.received(outputs.iter().map(|o| o.id));
    let idle = {
        let mut inner = d.lock();
        for o in &outputs {
            inner.forget_unreceived(o.id);
        }
        // Everything sent was received: the journal describes next to
        // nothing now; it shrinks to a checkpoint before the answer (a
        // daemon killed right after a session's last receive restarts from
        // a few records). Marked under the lock a send takes to add its
        // jobs, so none is between the check and its journal write.
        if inner.unreceived.is_empty() { d.journal.mark_idle() } else { None }
    };
    if let Some(mark) = idle {
        d.journal.settled(mark).await;
    }
    Ok(outputs)
}

/// The lines of `outputs` in a streamed receive answer; `first` when they
/// open it.
fn output_lines(outputs: &[Ready], mut first: bool) -> Bytes {
    let mut buf = Vec::with_capacity(outputs.iter().map(|o| o.json.len() + 2).sum());
    for o in outputs {
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.extend_from_slice(&o.json);
        buf.push(b'\n');
    }
    Bytes::from(buf)
}

/// What a streamed receive answer holds after its first piece.
#[derive(Clone, Copy, Debug)]
enum Rest {
    /// Up to this many outputs from the front of the ready list (those
    /// ready when the request came).
    Count(usize),
    /// Every output as it becomes ready, until no job up to `awaited` is
    /// unfinished (`receive --all --wait`), the deadline passed, or the
    /// daemon stops.
    Until { awaited: Option<JobId>, deadline: Option<tokio::time::Instant> },
}

/// The streamed answer of a receive: `first` (already journaled), then
/// the outputs `rest` says from the front of the ready list, a piece at a
/// time.
fn streamed_outputs(d: Arc<Daemon>, first: Vec<Ready>, rest: Rest) -> Response<Body> {
    let mut head = b"{\"outputs\":[\n".to_vec();
    let opened = !first.is_empty();
    head.extend_from_slice(&output_lines(&first, true));
    drop(first);
    if matches!(rest, Rest::Count(0)) {
        // All in one piece: a plain body with its length.
        let pending = d.lock().unreceived.len();
        head.extend_from_slice(format!("],\"pending\":{pending}}}\n").as_bytes());
        let mut res = Response::new(Full::new(Bytes::from(head)).map_err(|never| match never {}).boxed_unsync());
        res.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        return res;
    }
    struct State {
        d: Arc<Daemon>,
        rest: Rest,
        changes: watch::Receiver<u64>,
        opened: bool,
        done: bool,
    }
    let changes = d.changed.subscribe();
    let state = State { d, rest, changes, opened, done: false };
    let rest = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let batch: Vec<Ready> = loop {
            // Marked seen before the look, so that an output ready after
            // it wakes the wait below.
            s.changes.borrow_and_update();
            let (batch, waiting) = {
                let mut inner = s.d.lock();
                let n = match s.rest {
                    Rest::Count(more) => more,
                    Rest::Until { .. } => usize::MAX,
                };
                let n = n.min(RECEIVE_BATCH).min(inner.ready.len());
                let waiting = match s.rest {
                    Rest::Until { awaited: Some(last), deadline } => {
                        inner.unfinished.any_up_to(last)
                            && !s.d.stopping()
                            && deadline.is_none_or(|t| t > tokio::time::Instant::now())
                    }
                    _ => false,
                };
                (inner.ready.drain(..n).collect::<Vec<Ready>>(), waiting)
            };
            if !batch.is_empty() || !waiting {
                break batch;
            }
            let changed = s.changes.changed();
            match s.rest {
                Rest::Until { deadline: Some(t), .. } => {
                    let _ = tokio::time::timeout_at(t, changed).await;
                }
                _ => {
                    let _ = changed.await;
                }
            }
        };
        if batch.is_empty() {
            s.done = true;
            let pending = s.d.lock().unreceived.len();
            let tail = format!("],\"pending\":{pending}}}\n");
            return Some((Ok(hyper::body::Frame::data(Bytes::from(tail))), s));
        }
        if let Rest::Count(more) = &mut s.rest {
            *more -= batch.len();
        }
        match hand_out(&s.d, batch).await {
            Ok(batch) => {
                let lines = output_lines(&batch, !s.opened);
                s.opened = true;
                Some((Ok(hyper::body::Frame::data(lines)), s))
            }
            Err(e) => {
                // Cut the answer off: the client reports it; what it
                // printed was received, the rest is still ready.
                s.done = true;
                tracing::warn!("a streamed receive stopped: {}", e.message);
                Some((Err(std::io::Error::other(e.message)), s))
            }
        }
    });
    let head = futures::stream::once(async move { Ok(hyper::body::Frame::data(Bytes::from(head))) });
    let body = StreamBody::new(head.chain(rest)).boxed_unsync();
    let mut res = Response::new(body);
    res.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    res
}

/// The jobs of a send, parsed and checked (size, absolute input paths).
fn specs_of(r: wire::SendRequest) -> Result<Vec<crew_core::JobSpec>, ApiError> {
    let defaults = LineDefaults::default();
    let mut specs = Vec::with_capacity(r.jobs.len());
    for (i, v) in r.jobs.into_iter().enumerate() {
        let invalid = |e: String| ApiError::new(ErrorCode::InvalidJob, format!("job {i}: {e}"));
        let spec = parse_job_value(v, &defaults).map_err(|e| invalid(e.to_string()))?;
        specs.push(checked_spec(spec).map_err(|e| ApiError::new(e.code, format!("job {i}: {}", e.message)))?);
    }
    Ok(specs)
}

/// A parsed job, checked for what the API adds: its size, absolute input
/// paths.
fn checked_spec(spec: crew_core::JobSpec) -> Result<crew_core::JobSpec, ApiError> {
    spec.check_size().map_err(|e| ApiError::new(ErrorCode::JobTooLarge, e.to_string()))?;
    for input in &spec.opts.inputs {
        if let InputSource::Path(p) = &input.source {
            if !p.is_absolute() {
                return Err(ApiError::new(
                    ErrorCode::InvalidJob,
                    format!(
                        "input {:?}: the path {} is relative; the API needs absolute paths (the daemon's folder is \
                         not the sender's)",
                        input.name,
                        p.display()
                    ),
                ));
            }
        }
    }
    Ok(spec)
}

fn sendable(d: &Daemon, query: &str) -> Answer {
    let wanted = wanted_tags(query)?;
    let ok = d
        .controller
        .status()
        .slots
        .iter()
        .any(|s| s.state != crew_controller::SlotCondition::Broken && s.tags.satisfies(&wanted));
    Ok(reply(&wire::Sendable { sendable: ok }))
}

/// The tags of a `sendable` query (`tags=a,b`, percent-encoded).
fn wanted_tags(query: &str) -> Result<Tags, ApiError> {
    let mut wanted = Tags::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "tags" {
            let v = crew_core::percent::decode_query(v)
                .ok_or_else(|| ApiError::bad_request("tags: invalid percent-encoding"))?;
            wanted = v.parse().map_err(|e| ApiError::bad_request(format!("tags: {e}")))?;
        }
    }
    Ok(wanted)
}

fn receivable(d: &Daemon) -> Value {
    let ok = !d.lock().ready.is_empty() || d.controller.status().ready > 0;
    reply(&wire::Receivable { receivable: ok })
}

fn shutdown(d: &Daemon, r: wire::ShutdownRequest) -> Answer {
    let filter = SlotFilter { tags: tags("tags", r.tags)?, slot: r.slot };
    Ok(reply(&wire::Stopped { stopped: d.controller.shutdown(&filter, r.all) }))
}

async fn dismiss(d: &Daemon, r: wire::DismissRequest) -> Answer {
    let filter = SlotFilter { tags: tags("tags", r.tags)?, slot: r.slot };
    let n = d.controller.dismiss(&filter);
    d.journal(&[Record::Dismiss { tags: filter.tags, slot: filter.slot }]).await?;
    Ok(reply(&wire::Dismissed { dismissed: n }))
}

async fn cancel(d: &Daemon, r: wire::CancelRequest) -> Answer {
    // Journaled before the controller acts: a restart ends these jobs as
    // cancelled rather than running them again.
    let known: Vec<JobId> = {
        let inner = d.lock();
        r.ids.iter().map(|&id| JobId(id)).filter(|id| inner.unfinished.contains(id)).collect()
    };
    if !known.is_empty() {
        d.journal(&[Record::Cancel { ids: known }]).await?;
    }
    let (mut cancelled, mut unknown) = (Vec::new(), Vec::new());
    for id in r.ids {
        if d.controller.cancel(JobId(id)) { cancelled.push(id) } else { unknown.push(id) }
    }
    Ok(reply(&wire::Cancelled { cancelled, unknown }))
}

/// The finished output of job `id` (ready, or in the outputs log).
fn finished(d: &Daemon, id: &str) -> Result<Output, ApiError> {
    let Ok(id) = id.parse::<u64>() else {
        return Err(ApiError::not_found(format!("no job {id:?}: job ids are numbers")));
    };
    let ready = d.lock().ready.iter().find(|o| o.id.0 == id).cloned();
    match ready {
        Some(o) => o.output(),
        None => {
            let found = d.outputs_log().get(JobId(id)).map_err(|e| ApiError::internal(e.to_string()))?;
            found.ok_or_else(|| ApiError::not_found(format!("job {id} has no output yet (unknown, not finished, or older than the outputs kept for logs: [daemon] logs_keep)")))
        }
    }
}

/// The largest spilled stream `GET /v1/jobs/{id}/logs` (one JSON answer)
/// reads whole; larger ones are streamed by `logs/stdout`, `logs/stderr`.
const MAX_LOGS_JSON: u64 = 64 * 1024 * 1024;

/// `GET /v1/jobs/{id}/logs/{stdout,stderr}`: one captured stream, as raw
/// bytes in a chunked body read from the store piece by piece (the store
/// reads off the daemon's thread; hyper asks for the next piece only once
/// the last one was written), so that a log of any size passes through a
/// bounded buffer and the daemon keeps answering meanwhile.
async fn stream_log(d: &Daemon, id: &str, which: &str) -> Result<Response<Body>, ApiError> {
    let output = finished(d, id)?;
    let c = if which == "stdout" { &output.stdout } else { &output.stderr };
    let body: Body = match (&c.key, c.truncated) {
        (Some(key), true) => {
            let key = StoreKey::new(key.clone()).map_err(|e| ApiError::internal(format!("bad store key: {e}")))?;
            let stream = match d.store.get(&key).await {
                Ok(s) => s,
                Err(StoreError::NotFound { .. }) => {
                    return Err(ApiError::internal(format!("the stream {} is missing from the store", key.as_str())));
                }
                Err(e) => return Err(ApiError::internal(format!("cannot read {key:?} from the store: {e}"))),
            };
            let t = d.telemetry.clone();
            let frames = stream
                .inspect_ok(move |b| t.streamed(b.len() as u64))
                .map_ok(hyper::body::Frame::data)
                .map_err(|e| std::io::Error::other(e.to_string()));
            StreamBody::new(frames).boxed_unsync()
        }
        _ => Full::new(Bytes::from(c.text.clone())).map_err(|never| match never {}).boxed_unsync(),
    };
    let mut res = Response::new(body);
    res.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/octet-stream"));
    Ok(res)
}

async fn logs(d: &Daemon, id: &str) -> Answer {
    let output = finished(d, id)?;
    let id = output.id.0;
    for (name, c) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        if c.truncated && c.bytes > MAX_LOGS_JSON {
            return Err(ApiError::new(
                ErrorCode::LogTooLarge,
                format!(
                    "the {name} of job {id} is {} bytes, more than one JSON answer carries ({MAX_LOGS_JSON}); read it \
                     streamed: GET /v1/jobs/{id}/logs/{name} (crew logs without --json)",
                    c.bytes
                ),
            ));
        }
    }
    let stdout = whole(d, &output.stdout).await?;
    let stderr = whole(d, &output.stderr).await?;
    Ok(reply(&wire::Logs { id: output.id.0, stdout, stderr }))
}

/// `GET /v1/jobs/{job}/objects`: the outputs a finished job uploaded, by id
/// or name, and the store they are in (so that a client fetches them from
/// the store itself, never through the daemon).
fn objects(d: &Daemon, job: &str) -> Answer {
    let job = crew_core::percent::decode_utf8(job)
        .ok_or_else(|| ApiError::bad_request("invalid percent-encoding in the job"))?;
    let id = job.parse::<u64>().ok().map(JobId);
    let ready = d
        .lock()
        .ready
        .iter()
        .find(|o| Some(o.id) == id || (id.is_none() && o.name.as_deref() == Some(job.as_str())))
        .cloned();
    let output = match ready {
        Some(o) => o.output()?,
        None => {
            let mut log = d.outputs_log();
            let id = match id {
                Some(id) => Some(id),
                None => log.id_of(&job),
            };
            let found = match id {
                Some(id) => log.get(id).map_err(|e| ApiError::internal(e.to_string()))?,
                None => None,
            };
            found
                .ok_or_else(|| ApiError::not_found(format!("job {job} has no output yet (unknown, not finished, or older than the outputs kept: [daemon] logs_keep)")))?
        }
    };
    Ok(reply(&wire::Objects {
        id: output.id.0,
        name: output.name,
        status: output.status,
        attempt: output.attempt,
        store: d.store.url(),
        objects: output.objects,
    }))
}

/// A captured stream, whole: inline, or from the store when truncated.
async fn whole(d: &Daemon, c: &crew_core::output::Captured) -> Result<String, ApiError> {
    match (&c.key, c.truncated) {
        (Some(key), true) => {
            let key = StoreKey::new(key.clone()).map_err(|e| ApiError::internal(format!("bad store key: {e}")))?;
            let bytes = d
                .read_object(&key)
                .await?
                .ok_or_else(|| ApiError::internal(format!("the stream {} is missing from the store", key.as_str())))?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => Ok(c.text.clone()),
    }
}

/// The input side of one request, without a daemon: the route, the query,
/// the body and every check of its fields that [`route`] makes before it
/// touches the controller. What the `api` fuzz target drives (see
/// `crate::fuzz`); an error is a refused request, a panic a bug.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_request(method: &Method, path: &str, query: &str, body: &[u8]) -> Result<(), String> {
    checked_request(method, path, query, body).map_err(|e| format!("{} {}", e.code, e.message))
}

#[cfg(any(test, fuzzing))]
fn checked_request(method: &Method, path: &str, query: &str, body: &[u8]) -> Result<(), ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["v1", "health" | "status" | "receivable" | "events"] | ["metrics"]) => Ok(()),
        (&Method::GET, ["v1", "jobs"]) => page_query(query).map(drop),
        (&Method::GET, ["v1", "jobs", job]) => crew_core::percent::decode_utf8(job)
            .map(drop)
            .ok_or_else(|| ApiError::bad_request("invalid percent-encoding in the job")),
        (&Method::POST, ["v1", "recruit"]) => {
            let r: wire::RecruitRequest = parse_body(body)?;
            for (field, v) in [("idle", &r.idle), ("wall", &r.wall), ("launch_timeout", &r.launch_timeout)] {
                duration(field, v)?;
            }
            tags("tags", r.tags)?;
            Ok(())
        }
        (&Method::POST, ["v1", "launch"]) => tags("tags", parse_body::<wire::LaunchRequest>(body)?.tags).map(drop),
        (&Method::POST, ["v1", "jobs"]) => specs_of(parse_body(body)?).map(drop),
        (&Method::POST, ["v1", "receive"]) => {
            duration("timeout", &parse_body::<wire::ReceiveRequest>(body)?.timeout).map(drop)
        }
        (&Method::GET, ["v1", "sendable"]) => wanted_tags(query).map(drop),
        (&Method::POST, ["v1", "shutdown"]) => tags("tags", parse_body::<wire::ShutdownRequest>(body)?.tags).map(drop),
        (&Method::POST, ["v1", "dismiss"]) => tags("tags", parse_body::<wire::DismissRequest>(body)?.tags).map(drop),
        (&Method::POST, ["v1", "cancel"]) => parse_body::<wire::CancelRequest>(body).map(drop),
        (&Method::POST, ["v1", "restart" | "down"]) => parse_body::<wire::Empty>(body).map(drop),
        (&Method::GET, ["v1", "jobs", id, "logs"]) => {
            id.parse::<u64>().map(drop).map_err(|_| ApiError::not_found("job ids are numbers"))
        }
        (&Method::GET, ["v1", "jobs", job, "objects"]) => crew_core::percent::decode_utf8(job)
            .map(drop)
            .ok_or_else(|| ApiError::bad_request("invalid percent-encoding")),
        _ => Err(ApiError::not_found(format!("no route {method} {path}"))),
    }
}

// ---------------------------------------------------------------------------
// Per-job state, events, metrics

/// Where job `id` is and what is known of it; `None` for a job this daemon
/// does not know (or whose record left the outputs log).
fn info_of(d: &Daemon, id: JobId, with_output: bool) -> Option<wire::JobInfo> {
    let times = d.telemetry.job_times(id);
    let from_output = |o: Output, state: wire::JobState| wire::JobInfo {
        id: o.id.0,
        name: o.name.clone(),
        state,
        slot: o.slot.clone(),
        attempt: o.attempt,
        sent: times.sent,
        assigned: times.assigned,
        started: o.started,
        finished: Some(o.finished),
        status: Some(o.status),
        output: with_output.then_some(o),
    };
    let (unfinished, ready, name) = {
        let inner = d.lock();
        let ready =
            if inner.unfinished.contains(&id) { None } else { inner.ready.iter().find(|o| o.id == id).cloned() };
        let ready = ready.and_then(|r| r.output().ok());
        (inner.unfinished.contains(&id), ready, inner.named.get(&id).cloned())
    };
    if unfinished {
        // Held by the controller; or ended and not yet durable, which
        // counts as running until it is.
        let (state, slot, attempt) = match d.controller.job(id) {
            Some(j) => {
                let state = match j.phase {
                    crew_controller::JobPhase::Queued => wire::JobState::Queued,
                    crew_controller::JobPhase::Assigned => wire::JobState::Assigned,
                    _ => wire::JobState::Running,
                };
                (state, j.slot, j.attempt)
            }
            None => (wire::JobState::Running, None, 0),
        };
        return Some(wire::JobInfo {
            id: id.0,
            name,
            state,
            slot,
            attempt,
            sent: times.sent,
            assigned: if state == wire::JobState::Queued { None } else { times.assigned },
            started: None,
            finished: None,
            status: None,
            output: None,
        });
    }
    if let Some(o) = ready {
        return Some(from_output(o, wire::JobState::Finished));
    }
    let received = d.outputs_log().get(id).ok().flatten()?;
    Some(from_output(received, wire::JobState::Received))
}

/// `GET /v1/jobs/{job}`: by id, or by name among jobs not yet received
/// (then among records kept).
fn job_info(d: &Daemon, job: &str) -> Answer {
    let job = crew_core::percent::decode_utf8(job)
        .ok_or_else(|| ApiError::bad_request("invalid percent-encoding in the job"))?;
    let id = match job.parse::<u64>() {
        Ok(n) => Some(JobId(n)),
        Err(_) => {
            let pending = d.lock().named.iter().find(|(_, n)| **n == job).map(|(id, _)| *id);
            pending.or_else(|| d.outputs_log().id_of(&job))
        }
    };
    let info = id.and_then(|id| info_of(d, id, true)).ok_or_else(|| {
        ApiError::not_found(format!("no job {job:?}: not sent to this daemon, or its record is no longer kept"))
    })?;
    Ok(reply(&info))
}

/// Most jobs in one page of `GET /v1/jobs`, and the default.
const PAGE_MAX: usize = 1000;
const PAGE_DEFAULT: usize = 100;

/// The query of `GET /v1/jobs`: the state wanted, the id to start after,
/// the page size.
fn page_query(query: &str) -> Result<(Option<wire::JobState>, u64, usize), ApiError> {
    let (mut state, mut after, mut limit) = (None, 0u64, PAGE_DEFAULT);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = crew_core::percent::decode_query(v)
            .ok_or_else(|| ApiError::bad_request(format!("{k}: invalid percent-encoding")))?;
        match k {
            "state" => {
                let s = wire::JobState::ALL.into_iter().find(|s| s.as_str() == v).ok_or_else(|| {
                    let names: Vec<&str> = wire::JobState::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::bad_request(format!("state: {v:?} is not a job state ({})", names.join(", ")))
                })?;
                state = Some(s);
            }
            "after" => after = v.parse().map_err(|_| ApiError::bad_request(format!("after: {v:?} is not a job id")))?,
            "limit" => {
                limit = v.parse::<usize>().ok().filter(|n| (1..=PAGE_MAX).contains(n)).ok_or_else(|| {
                    ApiError::bad_request(format!("limit: {v:?} is not a number from 1 to {PAGE_MAX}"))
                })?;
            }
            _ => return Err(ApiError::bad_request(format!("unknown query parameter {k:?}: use state, after, limit"))),
        }
    }
    Ok((state, after, limit))
}

/// `GET /v1/jobs?state=S&after=ID&limit=N`: the jobs in a state (or all
/// known), in id order, one page at a time.
fn list_jobs(d: &Daemon, query: &str) -> Answer {
    let (state, after, limit) = page_query(query)?;
    use wire::JobState as S;
    // The candidates, in id order, after `after`.
    let mut ids: BTreeSet<JobId> = BTreeSet::new();
    {
        let inner = d.lock();
        if matches!(state, None | Some(S::Queued | S::Assigned | S::Running)) {
            ids.extend(inner.unfinished.iter_from(JobId(after.saturating_add(1))));
        }
        if matches!(state, None | Some(S::Finished)) {
            ids.extend(inner.ready.iter().map(|o| o.id).filter(|id| id.0 > after));
        }
    }
    if matches!(state, None | Some(S::Received)) {
        ids.extend(d.outputs_log().ids().filter(|id| id.0 > after));
    }
    let mut jobs = Vec::new();
    let mut next = None;
    for id in ids {
        let Some(info) = info_of(d, id, false) else { continue };
        if state.is_some_and(|s| s != info.state) {
            continue;
        }
        if jobs.len() == limit {
            next = jobs.last().map(|j: &wire::JobInfo| j.id);
            break;
        }
        jobs.push(info);
    }
    Ok(reply(&wire::JobList { jobs, next }))
}

/// `GET /metrics`.
fn metrics(d: &Daemon) -> Response<Body> {
    let report = d.controller.status();
    let unfinished = d.lock().unfinished.len();
    let running = report.running.max(unfinished.saturating_sub(report.queued));
    let text = d.telemetry.metrics(&report, running);
    let mut res = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed_unsync());
    res.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(telemetry::METRICS_CONTENT_TYPE));
    res
}

/// `GET /v1/events`: server-sent events until the daemon stops or the
/// client goes.
fn events(d: &Arc<Daemon>) -> Response<Body> {
    let state = (d.telemetry.subscribe(), d.changed.subscribe(), d.clone(), true);
    let stream = futures::stream::unfold(state, |(mut rx, mut stop, d, first)| async move {
        if first {
            // Headers and a first line go out at once: the client knows it
            // is subscribed, and misses nothing from here on.
            let hello = Bytes::from_static(b": subscribed\n\n");
            return Some((Ok::<_, std::io::Error>(hyper::body::Frame::data(hello)), (rx, stop, d, false)));
        }
        loop {
            if d.stopping() {
                return None;
            }
            let chunk = tokio::select! {
                got = rx.recv() => match got {
                    Ok(event) => telemetry::sse(&event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        telemetry::sse(&wire::Event::Lagged { missed })
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
                () = tokio::time::sleep(telemetry::KEEPALIVE) => Bytes::from_static(b": keepalive\n\n"),
                // Bumped when outputs are ready and when the daemon stops:
                // look at `stopping` again.
                changed = stop.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    continue;
                }
            };
            return Some((Ok(hyper::body::Frame::data(chunk)), (rx, stop, d, false)));
        }
    });
    let mut res = Response::new(StreamBody::new(stream).boxed_unsync());
    let headers = res.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/event-stream"));
    headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    res
}
