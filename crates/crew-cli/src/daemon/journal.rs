//! The daemon's side of the journal (`crew_controller::journal`): what is written
//! when, the group commit, and how a restarted daemon rebuilds its state.
//!
//! **Invariant:** every state change is durable before anyone outside is
//! told it happened. A request that accepted something (recruit, send,
//! dismiss, cancel) or handed outputs to a client (receive) is answered
//! only after its record is durable ([`JournalWriter::durable`]); a send's
//! jobs reach the controller (hence an agent) only after their `Accepted`
//! record is durable, and a cancel is journaled before the controller acts.
//! An output the controller delivered is journaled (`Delivered`) and made
//! durable by the next group commit before the daemon counts the job as
//! finished (`status`, `wait`) or lets a client receive it: a job whose end
//! a client could have seen never runs again after a crash. The window that
//! remains is a result that arrived less than one group commit before a
//! SIGKILL: that job runs again, counted as a crash.
//!
//! `Assigned` records are not waited for: the controller reports them under
//! its lock ([`AssignedBuffer`], which never touches the journal, so the
//! two locks never nest) and the next group commit writes them. Losing the
//! last few only means a job that was running is not counted a crash.
//!
//! Group commit: a committer thread flushes what was appended, syncs it
//! (`fdatasync`) outside the journal's lock, then releases every waiter
//! whose records that sync covered, so that one sync serves every record
//! appended meanwhile, however many requests and outputs they came from.
//! A failed write (a full disk) is all or nothing: the journal cuts off
//! what reached the file, every request whose records were in that write
//! fails ([`CommitError::is_disk_full`]: the daemon refuses the work with a
//! clear error), and the next commit tries again, so the daemon takes work
//! again by itself once there is space. A failed *sync* poisons the
//! journal: every later commit fails until the daemon is restarted, since
//! after a failed `fdatasync` the kernel may have dropped the pages it
//! could not write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crew_controller::journal::{Journal, Record};
use crew_controller::{Durable, Observer};
use crew_core::JobId;
use tokio::sync::watch;

/// A position in the journal: the records of one append, durable once the
/// committed sequence reaches it.
pub(crate) type Ticket = u64;

/// How far the journal is durable, published by the committer.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Appends up to this one are durable, but for those in `failed`.
    durable: Ticket,
    /// Appends whose write failed (first, last ticket, why), the newest
    /// last; the records were cut off the journal. A few thousand kept:
    /// a waiter looks its ticket up right after its append.
    failed: VecDeque<(Ticket, Ticket, CommitError)>,
    /// Set when a sync failed: nothing is durable from then on.
    poisoned: Option<String>,
    /// The last mark of `Journal::mark_idle` that the committer settled.
    settled: u64,
}

/// How often the committer looks whether a compaction is done.
const COMPACTION_LOOK: std::time::Duration = std::time::Duration::from_millis(100);

/// Longest the receive that emptied the daemon waits for the journal's
/// checkpoint (a few records and one sync; past this, the disk is failing
/// and the journal is compacted the long way).
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Failed writes remembered for their waiters.
const FAILED_KEPT: usize = 4096;

impl Progress {
    /// What became of the append `ticket`, if it is decided.
    fn outcome(&self, ticket: Ticket) -> Option<Result<(), CommitError>> {
        if let Some((_, _, why)) = self.failed.iter().rev().find(|(lo, hi, _)| (*lo..=*hi).contains(&ticket)) {
            return Some(Err(why.clone()));
        }
        if self.durable >= ticket {
            return Some(Ok(()));
        }
        self.poisoned.as_ref().map(|p| Err(CommitError::other(p.clone())))
    }
}

/// The journal, shared by the routes, the output drain, the observer and
/// the committer thread.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    journal: Mutex<Appending>,
    /// Assignments reported by the controller, appended by the committer.
    assigned: Arc<AssignedBuffer>,
    progress: watch::Sender<Progress>,
}

#[derive(Debug)]
struct Appending {
    journal: Journal,
    /// Appends so far (the last ticket handed out).
    appended: Ticket,
}

/// The controller's observer: buffers assignments without touching the
/// journal, and wakes the committer.
#[derive(Debug, Default)]
pub(crate) struct AssignedBuffer {
    jobs: Mutex<Vec<Noted>>,
    /// `Up` records buffered so far (counted after their push).
    ups: AtomicU64,
    /// How many of them are durable; a connecting worker's welcome waits
    /// on it ([`Observer::connected_durably`]).
    ups_durable: watch::Sender<u64>,
    /// Work for the committer: something was appended or buffered.
    work: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
}

/// What the controller reported, in order, for the committer to journal.
#[derive(Debug)]
enum Noted {
    /// Jobs (with their attempts) sent to one slot at once: one
    /// [`Record::Assigned`] each.
    Assigned {
        slot: String,
        jobs: Vec<(JobId, u32)>,
    },
    Record(Record),
}

/// Longest a connecting worker's welcome waits for its `Up` record (past it
/// the journal is failing, and the daemon says so elsewhere).
const UP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl AssignedBuffer {
    /// The committer made the first `ups` `Up` records durable.
    fn ups_done(&self, ups: u64) {
        self.ups_durable.send_if_modified(|done| {
            let more = ups > *done;
            if more {
                *done = ups;
            }
            more
        });
    }

    /// Buffers the `Up` record of `slot`; how many `Up` records must be
    /// durable for it to be.
    fn note_up(&self, slot: &str) -> u64 {
        lock(&self.jobs).push(Noted::Record(Record::Up { slot: slot.to_owned() }));
        let want = self.ups.fetch_add(1, Ordering::SeqCst) + 1;
        self.poke();
        want
    }

    fn poke(&self) {
        *lock(&self.work) = true;
        self.wake.notify_one();
    }
}

impl Observer for AssignedBuffer {
    fn assigned(&self, job: JobId, attempt: u32, slot: &str) {
        self.assigned_many(slot, &[(job, attempt)]);
    }

    fn assigned_many(&self, slot: &str, jobs: &[(JobId, u32)]) {
        lock(&self.jobs).push(Noted::Assigned { slot: slot.to_owned(), jobs: jobs.to_vec() });
        self.poke();
    }

    /// Buffers the `Up` record without waiting for it (the controller
    /// calls [`Observer::connected_durably`]).
    fn connected(&self, slot: &str) {
        self.note_up(slot);
    }

    /// Buffers the `Up` record; the wait returned ends once it is durable.
    /// The controller sends the worker nothing (its welcome first) until
    /// then, hence no job, so a daemon SIGKILLed after a job was sent
    /// knows the slot was up and, restarted, waits for that worker to come
    /// back with the job instead of running it a second time elsewhere.
    /// Nothing else waits meanwhile (the controller's lock is not held);
    /// a group commit a connection is cheap.
    fn connected_durably(&self, slot: &str) -> Option<Durable> {
        let want = self.note_up(slot);
        let mut durable = self.ups_durable.subscribe();
        let slot = slot.to_owned();
        Some(Box::pin(async move {
            let recorded = tokio::time::timeout(UP_WAIT, durable.wait_for(|done| *done >= want)).await;
            if !matches!(recorded, Ok(Ok(_))) {
                tracing::warn!(slot, "the journal did not record the worker's connection within {UP_WAIT:?}");
            }
        }))
    }

    fn disconnected(&self, slot: &str) {
        lock(&self.jobs).push(Noted::Record(Record::Down { slot: Some(slot.to_owned()) }));
        self.poke();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why records could not be made durable (a request that needed them
/// fails with this).
#[derive(Clone, Debug)]
pub(crate) struct CommitError {
    why: String,
    disk_full: bool,
}

impl CommitError {
    fn other(why: impl Into<String>) -> Self {
        Self { why: why.into(), disk_full: false }
    }

    /// The write failed for want of space: nothing of it was kept, and a
    /// later write may succeed once space is freed.
    pub(crate) fn is_disk_full(&self) -> bool {
        self.disk_full
    }
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write the journal: {}", self.why)
    }
}

impl JournalWriter {
    /// Starts the committer thread over `journal`.
    pub(crate) fn new(journal: Journal, assigned: Arc<AssignedBuffer>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            journal: Mutex::new(Appending { journal, appended: 0 }),
            assigned,
            progress: watch::channel(Progress::default()).0,
        });
        let committer = shared.clone();
        std::thread::Builder::new().name("crew-journal-commit".into()).spawn(move || {
            // A committer that died would leave every waiter waiting:
            // poison instead, so that requests fail with the reason.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| committer.run())).is_err() {
                committer.poison("the journal's committer failed");
            }
        })?;
        Ok(Self { shared })
    }

    /// Appends records (after the buffered assignments); they become
    /// durable with the next group commit. Returns the ticket to wait for.
    pub(crate) fn append(&self, records: &[Record]) -> Result<Ticket, CommitError> {
        let ticket = {
            let mut a = lock(&self.shared.journal);
            if let Some(why) = &self.shared.progress.borrow().poisoned {
                return Err(CommitError::other(why.clone()));
            }
            self.shared.append_assigned(&mut a);
            for r in records {
                // Serializing is all that can fail here (no I/O), and
                // then nothing of the record was appended.
                a.journal.append(r).map_err(|e| CommitError::other(e.to_string()))?;
            }
            a.appended += 1;
            a.appended
        };
        self.shared.assigned.poke();
        Ok(ticket)
    }

    /// Appends the `accepted` records of one send — jobs `ids` and
    /// `specs`, `per_record` a record, all but the last marked `more` —
    /// and waits until they are durable. Serialized from the jobs
    /// themselves, without copies.
    pub(crate) async fn write_accepted(
        &self,
        ids: &[JobId],
        specs: &[crew_core::JobSpec],
        per_record: usize,
    ) -> Result<(), CommitError> {
        let ticket = {
            let mut a = lock(&self.shared.journal);
            if let Some(why) = &self.shared.progress.borrow().poisoned {
                return Err(CommitError::other(why.clone()));
            }
            self.shared.append_assigned(&mut a);
            a.journal.append_accepted(ids, specs, per_record).map_err(|e| CommitError::other(e.to_string()))?;
            a.appended += 1;
            a.appended
        };
        self.shared.assigned.poke();
        self.durable(ticket).await
    }

    /// Appends `delivered` records of outputs already serialized (see
    /// `Journal::append_delivered`) and waits until they are durable.
    pub(crate) async fn write_delivered(&self, outputs: &[&[u8]]) -> Result<(), CommitError> {
        let ticket = {
            let mut a = lock(&self.shared.journal);
            if let Some(why) = &self.shared.progress.borrow().poisoned {
                return Err(CommitError::other(why.clone()));
            }
            self.shared.append_assigned(&mut a);
            for json in outputs {
                a.journal.append_delivered(json);
            }
            a.appended += 1;
            a.appended
        };
        self.shared.assigned.poke();
        self.durable(ticket).await
    }

    /// Waits until the records of `ticket` are durable.
    pub(crate) async fn durable(&self, ticket: Ticket) -> Result<(), CommitError> {
        let mut rx = self.shared.progress.subscribe();
        let p = rx
            .wait_for(|p| p.outcome(ticket).is_some())
            .await
            .map_err(|_| CommitError::other("the journal's committer stopped"))?;
        p.outcome(ticket).unwrap_or_else(|| Err(CommitError::other("the journal's committer stopped")))
    }

    /// Appends records and waits until they are durable.
    pub(crate) async fn write(&self, records: &[Record]) -> Result<(), CommitError> {
        let ticket = self.append(records)?;
        self.durable(ticket).await
    }

    /// The daemon's state just became empty: every job sent was received
    /// (the caller holds the lock that adds jobs, so no send is between
    /// its check and its journal write). The committer replaces the
    /// journal with a checkpoint of the few records that describe what is
    /// left (see `Journal::mark_idle`). Returns what [`JournalWriter::settled`]
    /// waits for, or `None` when the journal is small and left alone.
    pub(crate) fn mark_idle(&self) -> Option<u64> {
        // Records the controller reported and the committer has not
        // appended yet are left to it (appended here they would have no
        // ticket, and a failed write would drop them unseen): a worker's
        // `Up` goes into the checkpoint's `meta` whenever it is appended;
        // an assignment after the mark voids it, which only costs the
        // compaction the long way.
        let mark = lock(&self.shared.journal).journal.mark_idle();
        if mark.is_some() {
            self.shared.assigned.poke();
        }
        mark
    }

    /// Waits until the committer settled `mark` (its checkpoint durable,
    /// or found void), for at most [`SETTLE_WAIT`]: the last receive of a
    /// session answers after the journal shrank, so that a daemon killed
    /// right after it restarts from a few records.
    pub(crate) async fn settled(&self, mark: u64) {
        let mut rx = self.shared.progress.subscribe();
        let settled = rx.wait_for(|p| p.settled >= mark || p.poisoned.is_some());
        if tokio::time::timeout(SETTLE_WAIT, settled).await.is_err() {
            tracing::warn!("the journal's checkpoint took more than {SETTLE_WAIT:?}; answering without it");
        }
    }

    /// Makes everything appended so far durable and stops the committer.
    pub(crate) async fn close(&self) -> Result<(), CommitError> {
        let result = self.write(&[]).await;
        self.shared.assigned.stop.store(true, Ordering::SeqCst);
        self.shared.assigned.poke();
        result
    }
}

impl Shared {
    fn append_assigned(&self, a: &mut Appending) {
        let noted: Vec<Noted> = std::mem::take(&mut *lock(&self.assigned.jobs));
        for n in noted {
            let appended = match n {
                Noted::Assigned { slot, jobs } => a.journal.append_assigned(&slot, &jobs),
                Noted::Record(record) => a.journal.append(&record),
            };
            if let Err(e) = appended {
                // Cannot happen (a small record buffered in memory); losing
                // it is covered by the dispatch barrier after a restart.
                tracing::warn!("cannot journal an assignment: {e}");
            }
        }
    }

    /// The committer: waits for work, flushes under the lock, syncs outside
    /// it, publishes how far the journal is durable; compacts now and then.
    fn run(&self) {
        // The last append whose write was tried: a failed write holds the
        // appends after it up to the current one.
        let mut tried: Ticket = 0;
        loop {
            // A compaction in progress is installed once done, even when
            // nothing else happens (an idle daemon): look every 100 ms.
            let compacting = lock(&self.journal).journal.compacting();
            {
                let mut work = lock(&self.assigned.work);
                while !*work && !self.assigned.stop.load(Ordering::SeqCst) {
                    if compacting {
                        let (w, _) = self
                            .assigned
                            .wake
                            .wait_timeout(work, COMPACTION_LOOK)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        work = w;
                        break;
                    }
                    work = self.assigned.wake.wait(work).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if !*work && (!compacting || self.assigned.stop.load(Ordering::SeqCst)) {
                    return;
                }
                *work = false;
            }
            if self.progress.borrow().poisoned.is_some() {
                continue;
            }
            // Taken before the buffer is drained: every `Up` counted here
            // was pushed before it was counted, so this sync covers it.
            let ups = self.assigned.ups.load(Ordering::SeqCst);
            let flushed = {
                let mut a = lock(&self.journal);
                self.append_assigned(&mut a);
                let ticket = a.appended;
                (ticket, a.journal.flush())
            };
            let (ticket, handle) = match flushed {
                (ticket, Ok(h)) => (ticket, h),
                (ticket, Err(e)) => {
                    // Cut back already: these appends are refused, the
                    // next ones are tried afresh.
                    let error = CommitError { why: e.to_string(), disk_full: e.is_disk_full() };
                    if error.disk_full {
                        tracing::warn!("{error}; the work is refused until there is space again");
                    } else {
                        tracing::error!("{error}; the work is refused");
                    }
                    let first = tried + 1;
                    tried = ticket;
                    if first > ticket {
                        // Only assignments were in it (they are lost: a
                        // running job is then not counted a crash).
                        continue;
                    }
                    self.progress.send_modify(|p| {
                        match p.failed.back_mut() {
                            Some((_, hi, why)) if *hi + 1 == first && why.disk_full == error.disk_full => {
                                *hi = ticket;
                                *why = error;
                            }
                            _ => p.failed.push_back((first, ticket, error)),
                        }
                        while p.failed.len() > FAILED_KEPT {
                            p.failed.pop_front();
                        }
                    });
                    continue;
                }
            };
            tried = ticket;
            if let Some(handle) = handle {
                if let Err(e) = handle.sync_data() {
                    self.poison(&format!("cannot sync the journal: {e}"));
                    continue;
                }
            }
            let compact = {
                let mut a = lock(&self.journal);
                if a.appended == ticket {
                    a.journal.synced();
                }
                a.journal.compaction_due()
            };
            self.progress.send_modify(|p| p.durable = p.durable.max(ticket));
            self.assigned.ups_done(ups);
            if compact {
                // Keeps a long-lived daemon's journal within a factor of
                // its live state. The records are durable already: a
                // failure here is the compaction's only.
                // Only with nothing appended since the sync: a failed write
                // inside it would drop records whose tickets this loop
                // never saw fail.
                let started = std::time::Instant::now();
                let mut a = lock(&self.journal);
                let compacted = if a.appended == ticket {
                    Some(a.journal.compact_if_grown())
                } else {
                    // Appended meanwhile (the next turn comes at once): a
                    // receive waiting for a checkpoint those appends made
                    // void is let go now.
                    a.journal.settle_if_void();
                    None
                };
                let settled = a.journal.settled();
                self.progress.send_if_modified(|p| {
                    let news = settled > p.settled;
                    p.settled = p.settled.max(settled);
                    news
                });
                let Some(compacted) = compacted else { continue };
                match compacted {
                    Ok(true) => {
                        tracing::info!(elapsed = ?started.elapsed(), "journal compacted");
                        if a.journal.compaction_due() {
                            // Another one was asked for meanwhile.
                            *lock(&self.assigned.work) = true;
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("could not compact the journal (it keeps growing; retried later): {e}");
                    }
                }
            }
        }
    }

    fn poison(&self, why: &str) {
        let why = format!("{why} (nothing more can be made durable: restart the daemon once the cause is fixed)");
        tracing::error!("{why}");
        self.progress.send_modify(|p| p.poisoned = Some(why));
    }
}
