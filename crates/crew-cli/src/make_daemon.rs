//! `crew make --daemon`: a pipeline's jobs on the project daemon's slots.
//!
//! Jobs go to `POST /v1/jobs` as job lines with staged inputs (the
//! pipeline stages them itself) and an `output_prefix`; their outputs come
//! back from one long-polling `POST /v1/receive {"ids": [...]}`, which
//! leaves other clients' outputs alone. The HTTP client is blocking, so
//! each request runs on a thread of its own, off the build's runtime.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crew_core::job::InputSource;
use crew_core::{Command, JobId, JobSpec, Output};
use crew_pipeline::build::Executor;
use serde_json::{Value, json};

use crate::client::Client;
use crate::project;

pub(crate) struct DaemonExecutor {
    dir: PathBuf,
    /// Jobs sent and not yet received.
    pending: Arc<Mutex<HashSet<JobId>>>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<Output, String>>,
    tx: tokio::sync::mpsc::UnboundedSender<Result<Output, String>>,
    receiving: bool,
    /// The daemon refused jobs as bad input (a 4xx answer: no slot with a
    /// target's tags, ...), rather than failing.
    pub(crate) refused: bool,
}

impl DaemonExecutor {
    pub(crate) fn new(dir: PathBuf) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Self { dir, pending: Arc::new(Mutex::new(HashSet::new())), rx, tx, receiving: false, refused: false }
    }

    /// Starts the receiving thread once: it long-polls for outputs of the
    /// pending jobs until none is left.
    fn start_receiving(&mut self) {
        if self.receiving {
            return;
        }
        self.receiving = true;
        let (dir, pending, tx) = (self.dir.clone(), Arc::clone(&self.pending), self.tx.clone());
        std::thread::spawn(move || {
            let mut client = None;
            loop {
                let ids: Vec<JobId> = pending.lock().map(|p| p.iter().copied().collect()).unwrap_or_default();
                if ids.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    if tx.is_closed() {
                        return;
                    }
                    continue;
                }
                if client.is_none() {
                    match Client::connect(&project::socket(&dir)) {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
                let Some(c) = client.as_mut() else { return };
                let body = json!({"ids": ids, "wait": true, "timeout": "2s"});
                match c.post::<_, crate::wire::Received>("/v1/receive", &body) {
                    Ok(a) => {
                        for o in a.outputs {
                            if let Ok(mut p) = pending.lock() {
                                p.remove(&o.id);
                            }
                            if tx.send(Ok(o)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot receive from the daemon: {e}")));
                        return;
                    }
                }
            }
        });
    }
}

/// A job as a job line of the daemon's API.
fn job_line(spec: &JobSpec) -> Value {
    let mut line = json!({"name": spec.name, "tags": spec.tags.iter().collect::<Vec<_>>(), "env": spec.env,
        "env_inherit": spec.env_inherit, "retries": spec.retries, "outputs": spec.outputs, "output_prefix": spec.output_prefix});
    match &spec.command {
        Command::Argv(argv) => line["command"] = json!(argv),
        Command::Shell(s) => line["shell"] = json!(s),
        Command::Builtin { name, args } => {
            line["builtin"] = json!(name);
            line["args"] = args.clone();
        }
    }
    if let Some(t) = spec.timeout {
        line["timeout"] = json!(t.as_secs_f64());
    }
    if let Some(c) = spec.cpu {
        line["cpu"] = json!(c.as_secs_f64());
    }
    if let Some(m) = spec.memory {
        line["memory"] = json!(m);
    }
    let inputs: Vec<Value> = spec
        .inputs
        .iter()
        .filter_map(|i| match &i.source {
            InputSource::Object { key, size, sha256 } => {
                Some(json!({"name": i.name, "key": key, "size": size, "sha256": sha256}))
            }
            InputSource::Path(_) => None,
        })
        .collect();
    line["inputs"] = json!(inputs);
    line
}

#[async_trait::async_trait]
impl Executor for DaemonExecutor {
    async fn send(&mut self, jobs: Vec<JobSpec>) -> Result<Vec<JobId>, String> {
        let body = json!({"jobs": jobs.iter().map(job_line).collect::<Vec<_>>()});
        let dir = self.dir.clone();
        let (done, answer) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let r = Client::connect(&project::socket(&dir))
                .and_then(|mut c| c.post::<_, crate::wire::Sent>("/v1/jobs", &body))
                .map(|a| a.ids.into_iter().map(JobId).collect::<Vec<JobId>>())
                .map_err(|e| {
                    let refused = matches!(&e, crate::client::ClientError::Api(a) if a.is_client_error());
                    (e.to_string(), refused)
                });
            let _ = done.send(r);
        });
        let ids = match answer.await.map_err(|_| "the request thread died".to_owned())? {
            Ok(ids) => ids,
            Err((message, refused)) => {
                self.refused |= refused;
                return Err(message);
            }
        };
        if let Ok(mut p) = self.pending.lock() {
            p.extend(ids.iter().copied());
        }
        self.start_receiving();
        Ok(ids)
    }

    async fn next(&mut self) -> Option<Output> {
        if self.pending.lock().map(|p| p.is_empty()).unwrap_or(true) && self.rx.is_empty() {
            return None;
        }
        match self.rx.recv().await? {
            Ok(o) => Some(o),
            Err(e) => {
                eprintln!("crew: {e}");
                None
            }
        }
    }

    async fn cancel_all(&mut self) {
        let ids: Vec<JobId> = self.pending.lock().map(|p| p.iter().copied().collect()).unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        let dir = self.dir.clone();
        let (done, answer) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let r = Client::connect(&project::socket(&dir))
                .and_then(|mut c| c.post::<_, Value>("/v1/cancel", &json!({"ids": ids})));
            let _ = done.send(r.map(drop).map_err(|e| e.to_string()));
        });
        if let Ok(Err(e)) = answer.await {
            eprintln!("crew: cannot cancel the running targets: {e}");
        }
    }
}
