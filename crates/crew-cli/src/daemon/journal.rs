//! The daemon's side of the journal (`crew_core::journal`): what is written
//! when, and how a restarted daemon rebuilds its state.
//!
//! **Invariant:** a request that accepted something (recruit, send, dismiss)
//! or handed outputs to a client (receive) is answered only after its record
//! is durable (`commit`). Outputs taken from the controller are appended
//! before they can be received, so the commit of a `Received` record also
//! makes their `Delivered` records durable: an output is never received
//! without being journaled as delivered, hence never delivered twice.
//! Assignments are appended without a commit of their own: losing the last
//! few only means a job that was running is not counted a crash.

use std::sync::{Arc, Mutex, MutexGuard};

use crew_core::JobId;
use crew_core::controller::Observer;
use crew_core::journal::{Journal, JournalError, Record};

/// The journal, shared by the routes, the output drain and the observer.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    journal: Mutex<Journal>,
    /// Assignments reported by the controller (under its lock), appended at
    /// the next write.
    assigned: Arc<AssignedBuffer>,
}

/// The controller's observer: buffers assignments without touching the
/// journal, so that the controller's lock and the journal's never nest.
#[derive(Debug, Default)]
pub(crate) struct AssignedBuffer(Mutex<Vec<(JobId, u32)>>);

impl Observer for AssignedBuffer {
    fn assigned(&self, job: JobId, attempt: u32) {
        lock(&self.0).push((job, attempt));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl JournalWriter {
    pub(crate) fn new(journal: Journal, assigned: Arc<AssignedBuffer>) -> Self {
        Self { journal: Mutex::new(journal), assigned }
    }

    /// Appends records (after the buffered assignments), optionally making
    /// everything durable.
    pub(crate) fn write(&self, records: &[Record], commit: bool) -> Result<(), JournalError> {
        let assigned: Vec<(JobId, u32)> = std::mem::take(&mut *lock(&self.assigned.0));
        let mut j = lock(&self.journal);
        for r in records {
            j.append(r)?;
        }
        for (job, attempt) in assigned {
            j.append(&Record::Assigned { job, attempt })?;
        }
        if !commit {
            return Ok(());
        }
        j.commit()?;
        // Keeps a long-lived daemon's journal within a factor of its live
        // state. The records are durable already: a failure here is the
        // compaction's only, and the request stands.
        let started = std::time::Instant::now();
        match j.compact_if_grown() {
            Ok(true) => tracing::info!(elapsed = ?started.elapsed(), "journal compacted"),
            Ok(false) => {}
            Err(e) => tracing::warn!("could not compact the journal (it keeps growing; retried later): {e}"),
        }
        Ok(())
    }
}
