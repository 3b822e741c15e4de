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

use crew_core::{JobId, JobSpec, Output};
use crew_pipeline::build::Executor;

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
                let body = crate::wire::ReceiveRequest {
                    ids: Some(ids),
                    wait: true,
                    timeout: "2s".into(),
                    ..Default::default()
                };
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

#[async_trait::async_trait]
impl Executor for DaemonExecutor {
    async fn send(&mut self, jobs: Vec<JobSpec>) -> Result<Vec<JobId>, String> {
        // Owned bytes: the request runs on a thread of its own.
        let body = serde_json::to_value(crate::wire::SendRequest { jobs: jobs.iter().map(JobSpec::as_line).collect() })
            .map_err(|e| format!("cannot write the jobs as JSON: {e}"))?;
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
            let r = Client::connect(&project::socket(&dir)).and_then(|mut c| {
                c.post::<_, crate::wire::Cancelled>(
                    "/v1/cancel",
                    &crate::wire::CancelRequest { ids: ids.iter().map(|i| i.0).collect() },
                )
            });
            let _ = done.send(r.map(drop).map_err(|e| e.to_string()));
        });
        if let Ok(Err(e)) = answer.await {
            eprintln!("crew: cannot cancel the running targets: {e}");
        }
    }
}
