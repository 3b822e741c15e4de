//! What the daemon tells watchers: the event stream (`GET /v1/events`,
//! server-sent events), the Prometheus metrics (`GET /metrics`), and the
//! times of each job not yet received (`GET /v1/jobs/{job}`).
//!
//! Role: one place that hears every change — jobs accepted and ended
//! (from the API routes, after their records are durable), attempts
//! started and workers up, down or crashed (from the controller, as an
//! [`Observer`]) — and turns it into events, counters and times. Nothing
//! here can fail a request: a slow event reader only misses events (and is
//! told so), and metrics are plain counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crew_controller::{Durable, Observer, StatusReport};
use crew_core::output::Timestamp;
use crew_core::{JobId, JobSpec, Output};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

use crate::wire::Event;

/// Events kept for readers that fall behind; past that they are told
/// they lagged.
const EVENT_BACKLOG: usize = 4096;

/// The content type of `GET /metrics`.
pub(crate) const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    class: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

/// The times of a job not yet received.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Times {
    /// When it was accepted (none for a job from before a restart).
    pub(crate) sent: Option<Timestamp>,
    /// When its last attempt was given to a worker.
    pub(crate) assigned: Option<Timestamp>,
}

/// The times of the jobs not yet received, kept per send rather than per
/// job where they are shared: a queued job costs nothing here.
#[derive(Debug, Default)]
struct JobTimes {
    /// Each send by its first id: the ids it took (consecutive), when, and
    /// how many of them are not yet received.
    sends: BTreeMap<u64, Sent>,
    /// When each job's last attempt was given to a worker (jobs given one;
    /// dense, as jobs go out about in the order of their ids).
    assigned: crew_scheduler::JobTable<Timestamp>,
    /// The bytes of each job's inputs (jobs with some).
    input_bytes: HashMap<JobId, u64>,
}

#[derive(Debug)]
struct Sent {
    end: u64,
    at: Timestamp,
    instant: Instant,
    left: usize,
}

impl JobTimes {
    /// The send `id` was part of.
    fn send_of(&self, id: JobId) -> Option<&Sent> {
        self.sends.range(..=id.0).next_back().map(|(_, s)| s).filter(|s| id.0 < s.end)
    }

    fn received(&mut self, id: JobId) {
        self.assigned.remove(&id);
        self.input_bytes.remove(&id);
        let first = match self.sends.range_mut(..=id.0).next_back() {
            Some((first, s)) if id.0 < s.end => {
                s.left = s.left.saturating_sub(1);
                (s.left == 0).then_some(*first)
            }
            _ => None,
        };
        if let Some(first) = first {
            self.sends.remove(&first);
        }
    }
}

/// The daemon's events, metrics and job times.
pub(crate) struct Telemetry {
    events: broadcast::Sender<Arc<Event>>,
    times: Mutex<JobTimes>,
    registry: Registry,
    sent: Counter,
    finished: Family<StatusLabel, Counter>,
    queued: Gauge,
    running: Gauge,
    slots: Family<SlotLabels, Gauge>,
    /// The (class, state) pairs scraped before (the family cannot list
    /// them): a pair with no slot now reads 0 rather than vanishing.
    seen_slots: Mutex<std::collections::HashSet<SlotLabels>>,
    dispatch: Histogram,
    store_bytes: Family<DirectionLabel, Counter>,
    crashes: Family<ClassLabel, Counter>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("readers", &self.events.receiver_count()).finish_non_exhaustive()
    }
}

impl Telemetry {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let sent = Counter::default();
        registry.register("crew_jobs_sent", "Jobs the daemon accepted", sent.clone());
        let finished = Family::<StatusLabel, Counter>::default();
        registry.register(
            "crew_jobs_finished",
            "Jobs that ended, by status (once their record is durable)",
            finished.clone(),
        );
        let queued = Gauge::default();
        registry.register("crew_jobs_queued", "Jobs waiting for a worker", queued.clone());
        let running = Gauge::default();
        registry.register("crew_jobs_running", "Jobs given to workers and not ended", running.clone());
        let slots = Family::<SlotLabels, Gauge>::default();
        registry.register("crew_slots", "Slots by class and state", slots.clone());
        // 100 µs to ~3.6 h: local dispatch is sub-millisecond, a cloud
        // launch takes minutes.
        let dispatch = Histogram::new(exponential_buckets(0.0001, 2.0, 27));
        registry.register(
            "crew_dispatch_latency_seconds",
            "From a job's acceptance to its first attempt given to a worker",
            dispatch.clone(),
        );
        let store_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "crew_store_bytes",
            "Bytes to (up) and from (down) the store for jobs: inputs staged and outputs recorded; inputs each \
             attempt fetches and spilled logs the daemon streams",
            store_bytes.clone(),
        );
        let crashes = Family::<ClassLabel, Counter>::default();
        registry.register(
            "crew_worker_crashes",
            "Workers lost while up (not asked to stop), by class",
            crashes.clone(),
        );
        Self {
            events: broadcast::channel(EVENT_BACKLOG).0,
            times: Mutex::new(JobTimes::default()),
            registry,
            sent,
            finished,
            queued,
            running,
            slots,
            seen_slots: Mutex::new(std::collections::HashSet::new()),
            dispatch,
            store_bytes,
            crashes,
        }
    }

    fn times(&self) -> MutexGuard<'_, JobTimes> {
        self.times.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, event: Event) {
        // No reader: nothing to do (the error only says so).
        let _ = self.events.send(Arc::new(event));
    }

    /// A reader of the events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Jobs were accepted (their records are durable), with the bytes of
    /// each one's inputs ([`input_bytes`]).
    pub(crate) fn sent(&self, ids: &[JobId], inputs: &[u64]) {
        let (now, at) = (Timestamp::now(), Instant::now());
        let mut staged = 0u64;
        {
            let mut times = self.times();
            for (id, &input_bytes) in ids.iter().zip(inputs) {
                staged += input_bytes;
                if input_bytes > 0 {
                    times.input_bytes.insert(*id, input_bytes);
                }
            }
            // One entry per run of consecutive ids (a send takes one).
            let mut run: Option<(u64, u64)> = None;
            let close = |times: &mut JobTimes, (first, end): (u64, u64)| {
                times.sends.insert(first, Sent { end, at: now, instant: at, left: (end - first) as usize });
            };
            for id in ids {
                run = match run {
                    Some((first, end)) if end == id.0 => Some((first, end + 1)),
                    Some(r) => {
                        close(&mut times, r);
                        Some((id.0, id.0.saturating_add(1)))
                    }
                    None => Some((id.0, id.0.saturating_add(1))),
                };
            }
            if let Some(r) = run {
                close(&mut times, r);
            }
        }
        self.sent.inc_by(ids.len() as u64);
        self.bytes("up", staged);
        self.emit(Event::JobsSent { ids: ids.iter().map(|i| i.0).collect() });
    }

    /// A job restored from the journal (its acceptance time is unknown).
    pub(crate) fn restored(&self, id: JobId, spec: &JobSpec) {
        let bytes = input_bytes(spec);
        if bytes > 0 {
            self.times().input_bytes.insert(id, bytes);
        }
    }

    /// Jobs ended and their records are durable.
    pub(crate) fn ended(&self, outputs: &[Output]) {
        let uploaded: u64 = outputs.iter().flat_map(|o| &o.objects).map(|x| x.size).sum();
        // One counter update per status of the batch, not per job.
        let mut by_status: Vec<(crew_core::Status, u64)> = Vec::new();
        for o in outputs {
            match by_status.iter_mut().find(|(s, _)| *s == o.status) {
                Some((_, n)) => *n += 1,
                None => by_status.push((o.status, 1)),
            }
        }
        for (status, n) in by_status {
            self.finished.get_or_create(&StatusLabel { status: status.as_str().to_owned() }).inc_by(n);
        }
        // Events only for someone listening (the dashboard, a client
        // waiting): building one per job costs for nothing otherwise.
        if self.events.receiver_count() > 0 {
            let sent: Vec<Option<Instant>> = {
                let times = self.times();
                outputs.iter().map(|o| times.send_of(o.id).map(|s| s.instant)).collect()
            };
            for (o, sent) in outputs.iter().zip(sent) {
                self.emit(Event::JobEnded {
                    id: o.id.0,
                    name: o.name.clone(),
                    status: o.status,
                    slot: o.slot.clone(),
                    attempt: o.attempt,
                    wall_seconds: o.wall_seconds,
                    latency_seconds: sent.map(|at| at.elapsed().as_secs_f64()),
                });
            }
        }
        self.bytes("up", uploaded);
    }

    /// Records were received: their times are no longer needed.
    pub(crate) fn received(&self, ids: impl IntoIterator<Item = JobId>) {
        let mut times = self.times();
        for id in ids {
            times.received(id);
        }
    }

    /// The times of a job not yet received.
    pub(crate) fn job_times(&self, id: JobId) -> Times {
        let times = self.times();
        Times { sent: times.send_of(id).map(|s| s.at), assigned: times.assigned.get(&id).copied() }
    }

    /// The daemon streamed `n` bytes of a spilled log from the store.
    pub(crate) fn streamed(&self, n: u64) {
        self.bytes("down", n);
    }

    fn bytes(&self, direction: &str, n: u64) {
        if n > 0 {
            self.store_bytes.get_or_create(&DirectionLabel { direction: direction.to_owned() }).inc_by(n);
        }
    }

    /// The metrics now, in the OpenMetrics text format; the gauges are read
    /// from `report` at the time of the scrape.
    pub(crate) fn metrics(&self, report: &StatusReport, running: usize) -> String {
        self.queued.set(report.queued as i64);
        self.running.set(running as i64);
        // Every (class, state) pair seen: those with no slot now read 0
        // rather than vanish.
        let mut counts: HashMap<SlotLabels, i64> = HashMap::new();
        for s in &report.slots {
            *counts.entry(SlotLabels { class: s.class.clone(), state: s.state.as_str().to_owned() }).or_default() += 1;
        }
        {
            let mut seen = self.seen_slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for labels in seen.iter() {
                counts.entry(labels.clone()).or_default();
            }
            seen.extend(counts.keys().cloned());
        }
        for (labels, n) in counts {
            self.slots.get_or_create(&labels).set(n);
        }
        let mut text = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// The bytes of a job's staged inputs.
pub(crate) fn input_bytes(spec: &JobSpec) -> u64 {
    spec.opts
        .inputs
        .iter()
        .map(|i| match &i.source {
            crew_core::job::InputSource::Object { size, .. } => *size,
            crew_core::job::InputSource::Path(_) => 0,
        })
        .sum()
}

impl Observer for Telemetry {
    fn assigned(&self, job: JobId, attempt: u32, slot: &str) {
        self.assigned_many(slot, &[(job, attempt)]);
    }

    /// One clock reading and one lock for the batch.
    fn assigned_many(&self, slot: &str, jobs: &[(JobId, u32)]) {
        let (now, instant) = (Timestamp::now(), Instant::now());
        let mut waited: Vec<f64> = Vec::new();
        let mut input_bytes = 0u64;
        {
            let mut times = self.times();
            // The send of the last job looked up: a batch's jobs are
            // mostly of one send.
            let mut send: Option<(u64, u64, Instant)> = None;
            for &(job, attempt) in jobs {
                times.assigned.insert(job, now);
                if attempt == 1 {
                    if !send.is_some_and(|(first, end, _)| (first..end).contains(&job.0)) {
                        send = times
                            .sends
                            .range(..=job.0)
                            .next_back()
                            .filter(|(_, s)| job.0 < s.end)
                            .map(|(first, s)| (*first, s.end, s.instant));
                    }
                    if let Some((_, _, at)) = send {
                        waited.push(instant.saturating_duration_since(at).as_secs_f64());
                    }
                }
                if !times.input_bytes.is_empty() {
                    input_bytes += times.input_bytes.get(&job).copied().unwrap_or(0);
                }
            }
        }
        for w in waited {
            self.dispatch.observe(w);
        }
        self.bytes("down", input_bytes);
        if self.events.receiver_count() > 0 {
            for &(job, attempt) in jobs {
                self.emit(Event::JobAssigned { id: job.0, slot: slot.to_owned(), attempt });
            }
        }
    }

    fn connected(&self, slot: &str) {
        self.emit(Event::SlotUp { slot: slot.to_owned() });
    }

    fn disconnected(&self, slot: &str) {
        self.emit(Event::SlotDown { slot: slot.to_owned() });
    }

    fn crashed(&self, slot: &str, class: &str, reason: &str) {
        self.crashes.get_or_create(&ClassLabel { class: class.to_owned() }).inc();
        self.emit(Event::SlotCrashed { slot: slot.to_owned(), class: class.to_owned(), reason: reason.to_owned() });
    }
}

/// Tells every observer in turn (the journal's and the telemetry).
#[derive(Debug)]
pub(crate) struct Observers(pub(crate) Vec<Arc<dyn Observer>>);

impl Observer for Observers {
    fn assigned(&self, job: JobId, attempt: u32, slot: &str) {
        self.0.iter().for_each(|o| o.assigned(job, attempt, slot));
    }

    fn assigned_many(&self, slot: &str, jobs: &[(JobId, u32)]) {
        self.0.iter().for_each(|o| o.assigned_many(slot, jobs));
    }

    fn connected(&self, slot: &str) {
        self.0.iter().for_each(|o| o.connected(slot));
    }

    fn connected_durably(&self, slot: &str) -> Option<Durable> {
        let waits: Vec<Durable> = self.0.iter().filter_map(|o| o.connected_durably(slot)).collect();
        if waits.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            for wait in waits {
                wait.await;
            }
        }))
    }

    fn disconnected(&self, slot: &str) {
        self.0.iter().for_each(|o| o.disconnected(slot));
    }

    fn crashed(&self, slot: &str, class: &str, reason: &str) {
        self.0.iter().for_each(|o| o.crashed(slot, class, reason));
    }
}

/// How often an idle event stream says it is alive (a comment line), so
/// that proxies and clients can tell a quiet stream from a dead one.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(15);

/// One event as server-sent-event lines.
pub(crate) fn sse(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!("event: {}\ndata: {data}\n\n", event.kind()))
}
