//! The journal: a durable record of what a controller accepted, so that a
//! restarted controller (the daemon after SIGKILL) loses nothing.
//!
//! It is an append-only file of JSON lines, one [`Record`] per line. Lines
//! are written in batches and made durable with `fdatasync` by
//! [`Journal::commit`], which a daemon calls before it acknowledges a
//! request: a job whose id a client saw is on disk. Reading it back
//! ([`Journal::open`]) folds the records into a [`Replay`]: the slots
//! recruited, the jobs accepted and not finished (with their history), the
//! outputs finished and not received, and the next job id. A torn last line
//! (a crash in the middle of a write) is dropped; damage anywhere else is an
//! error that names the line, since silently skipping records could lose or
//! duplicate work.
//!
//! Why an append-only log and not an embedded database: the access pattern
//! is exactly "append, and read everything once at start", records are
//! small, JSON lines can be inspected with standard tools, and it costs no
//! dependency. The file is compacted when opened (the replay is written back
//! as a fresh journal, atomically by rename), so it does not grow across
//! restarts, and by [`Journal::compact_if_grown`], which a long-lived daemon
//! calls after its commits: once the file has grown past a threshold and to
//! twice its size after the last compaction, it is read back and rewritten
//! on a thread of its own, so that its size stays within a constant factor
//! of the live state (jobs
//! not finished, outputs not received) and the cost of compacting is
//! amortized over the records written since.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::job::{JobId, JobSpec};
use crate::output::Output;
use crate::scheduler::{History, SlotFilter, SlotLimits};
use crate::tags::Tags;

/// One line of the journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// Slots were recruited.
    Recruit {
        /// Their class.
        class: String,
        /// How many.
        count: u32,
        /// Their tags.
        tags: Tags,
        /// Their limits.
        limits: SlotLimits,
        /// Class options.
        #[serde(default)]
        options: BTreeMap<String, String>,
    },
    /// Slots were dismissed.
    Dismiss {
        /// Slots with these tags (all when absent).
        tags: Option<Tags>,
        /// Only this slot.
        slot: Option<String>,
    },
    /// Jobs were accepted.
    Accepted {
        /// The jobs, with their ids.
        jobs: Vec<(JobId, JobSpec)>,
    },
    /// A job was sent to a worker (not made durable by itself: losing one
    /// only means a job that was running is not counted a crash).
    Assigned {
        /// The job.
        job: JobId,
        /// Its attempt number.
        attempt: u32,
    },
    /// A job finished; its output waits to be received.
    Delivered {
        /// The output.
        output: Box<Output>,
    },
    /// Outputs were received by a client (each is delivered once).
    Received {
        /// Their job ids.
        ids: Vec<JobId>,
    },
    /// A job not finished, with its history (written by compaction).
    Pending {
        /// The job.
        id: JobId,
        /// What it runs.
        spec: JobSpec,
        /// Attempts started.
        attempts: u32,
        /// Crashes suffered.
        crashes: u32,
        /// Failed runs retried.
        failures: u32,
        /// On a worker when the record was written.
        running: bool,
    },
    /// The id the next accepted job gets (written by compaction, so that a
    /// journal whose jobs were all received still never reuses an id).
    NextJob {
        /// That id.
        next: u64,
    },
}

/// A recruit request as journaled.
#[derive(Clone, Debug, PartialEq)]
pub struct Recruited {
    /// The class.
    pub class: String,
    /// How many slots.
    pub count: u32,
    /// Their tags.
    pub tags: Tags,
    /// Their limits.
    pub limits: SlotLimits,
    /// Class options.
    pub options: BTreeMap<String, String>,
}

/// A job accepted and not finished.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingJob {
    /// What it runs.
    pub spec: JobSpec,
    /// Its history so far.
    pub history: History,
    /// True when it was on a worker when the journal ends: it was running
    /// when the controller stopped, and a restarted controller counts that
    /// attempt as a crash.
    pub running: bool,
}

/// The state a journal describes.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// Recruit requests, in order (dismissals already applied as filters in
    /// `dismissed`).
    pub recruits: Vec<Recruited>,
    /// Dismiss requests, in order, to apply after the recruits.
    pub dismissed: Vec<SlotFilter>,
    /// Jobs accepted and not finished, by id.
    pub pending: BTreeMap<JobId, PendingJob>,
    /// Outputs finished and not yet received, in the order they finished.
    pub ready: Vec<Output>,
    /// The id the next accepted job gets.
    pub next_job: u64,
}

impl Replay {
    /// Folds one record into the state.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Recruit { class, count, tags, limits, options } => {
                self.recruits.push(Recruited { class, count, tags, limits, options });
            }
            Record::Dismiss { tags, slot } => self.dismissed.push(SlotFilter { tags, slot }),
            Record::Accepted { jobs } => {
                for (id, spec) in jobs {
                    self.next_job = self.next_job.max(id.0 + 1);
                    self.pending.insert(id, PendingJob { spec, history: History::default(), running: false });
                }
            }
            Record::Assigned { job, attempt } => {
                // Crashes in between are not inferred (a retry after a
                // failure looks the same); the restart itself counts one for
                // a job left running (see `PendingJob::running`).
                if let Some(p) = self.pending.get_mut(&job) {
                    p.history.attempts = p.history.attempts.max(attempt);
                    p.running = true;
                }
            }
            Record::Delivered { output } => {
                self.pending.remove(&output.id);
                self.next_job = self.next_job.max(output.id.0 + 1);
                self.ready.push(*output);
            }
            Record::Received { ids } => {
                let ids: std::collections::HashSet<JobId> = ids.into_iter().collect();
                self.ready.retain(|o| !ids.contains(&o.id));
            }
            Record::Pending { id, spec, attempts, crashes, failures, running } => {
                self.next_job = self.next_job.max(id.0 + 1);
                self.pending.insert(id, PendingJob { spec, history: History { attempts, crashes, failures }, running });
            }
            Record::NextJob { next } => self.next_job = self.next_job.max(next),
        }
    }

    /// The records that rebuild this state (what compaction writes).
    pub fn records(&self) -> Vec<Record> {
        let mut out = vec![Record::NextJob { next: self.next_job }];
        for r in &self.recruits {
            out.push(Record::Recruit {
                class: r.class.clone(),
                count: r.count,
                tags: r.tags.clone(),
                limits: r.limits.clone(),
                options: r.options.clone(),
            });
        }
        for f in &self.dismissed {
            out.push(Record::Dismiss { tags: f.tags.clone(), slot: f.slot.clone() });
        }
        for (id, p) in &self.pending {
            out.push(Record::Pending {
                id: *id,
                spec: p.spec.clone(),
                attempts: p.history.attempts,
                crashes: p.history.crashes,
                failures: p.history.failures,
                running: p.running,
            });
        }
        for o in &self.ready {
            out.push(Record::Delivered { output: Box::new(o.clone()) });
        }
        out
    }
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line in the middle of the file does not parse.
    #[error(
        "journal {path}, line {line}: {message} (the file is damaged; move it aside to start afresh, losing its jobs)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// The parse error.
        message: String,
    },
}

/// The size a journal may reach before [`Journal::compact_if_grown`]
/// compacts it, by default.
pub const COMPACT_AFTER: u64 = 64 * 1024 * 1024;

/// An open journal, appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    dirty: bool,
    /// The file's size after the last compaction.
    base: u64,
    /// The size below which the file is never compacted.
    compact_after: u64,
    /// A compaction in progress on a thread of its own.
    compaction: Option<Compaction>,
}

/// A compaction in progress: a thread reads the journal up to `offset`
/// (whole, committed lines) and writes what it describes to the
/// `.compacting` file; records appended meanwhile are copied after it when
/// it is installed.
#[derive(Debug)]
struct Compaction {
    offset: u64,
    done: std::sync::mpsc::Receiver<Result<File, JournalError>>,
}

/// Where a compacted journal is written before it replaces the journal.
fn compacting_path(path: &Path) -> PathBuf {
    path.with_extension("compacting")
}

/// Writes the records of `replay` to the `.compacting` file next to `path`,
/// durably; returns it, open for appending at its end.
fn write_compacted(path: &Path, replay: &Replay) -> Result<File, JournalError> {
    let io = |source| JournalError::Io { path: path.to_path_buf(), source };
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(compacting_path(path)).map_err(io)?;
    let mut w = BufWriter::new(file);
    for r in replay.records() {
        write_record(&mut w, &r).map_err(io)?;
    }
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_data().map_err(io)?;
    Ok(file)
}

impl Journal {
    /// Opens (or creates) the journal at `path`, reads it back, and compacts
    /// it. Returns the journal, ready to append, and the state it held.
    pub fn open(path: impl AsRef<Path>) -> Result<(Self, Replay), JournalError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| JournalError::Io { path: path.clone(), source };
        let mut replay = Replay { next_job: 1, ..Replay::default() };
        match File::open(&path) {
            Ok(file) => read_into(&path, file, &mut replay)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let journal = Self::rewrite(&path, &replay)?;
        Ok((journal, replay))
    }

    /// Writes `replay` as a fresh journal next to `path` and renames it over
    /// `path` (atomic), then opens it for appending.
    fn rewrite(path: &Path, replay: &Replay) -> Result<Self, JournalError> {
        let file = write_compacted(path, replay)?;
        Self::install(path, file)
    }

    /// Renames the compacted file `file` (at [`compacting_path`]) over
    /// `path` and appends to it from now on. The descriptor follows the
    /// file, so nothing can fail between the rename and the switch (which
    /// would leave appends going to the replaced file).
    fn install(path: &Path, file: File) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let base = file.metadata().map_err(io)?.len();
        std::fs::rename(compacting_path(path), path).map_err(io)?;
        if let Some(dir) = path.parent() {
            // Make the rename itself durable.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(256 * 1024, file),
            dirty: false,
            base,
            compact_after: COMPACT_AFTER,
            compaction: None,
        })
    }

    /// Sets the size below which [`Journal::compact_if_grown`] leaves the
    /// file alone (default [`COMPACT_AFTER`]).
    pub fn set_compact_after(&mut self, bytes: u64) {
        self.compact_after = bytes;
    }

    /// Commits, then keeps the file within a factor of what it describes:
    /// once it is larger than the threshold and than twice its size after
    /// the last compaction, a thread reads it back and writes what it
    /// describes (as a restart would) to a new file; a later call, when
    /// that is done, copies the records appended meanwhile after it and
    /// puts it in the journal's place. Only that copy and the rename happen
    /// in the caller, so a daemon is not held up by a large journal. Returns
    /// whether a compaction was installed. On an error the journal goes on
    /// as it is (appending works) and the next attempt waits until the file
    /// doubled again.
    pub fn compact_if_grown(&mut self) -> Result<bool, JournalError> {
        self.commit()?;
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let size = self.out.get_ref().metadata().map_err(io)?.len();
        if let Some(c) = &self.compaction {
            let result = match c.done.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(false),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Err(io(std::io::Error::other("the compaction thread ended without an answer")))
                }
                Ok(compacted) => compacted.and_then(|file| self.install_compacted(file, c.offset)),
            };
            self.compaction = None;
            return match result {
                Ok(mut fresh) => {
                    fresh.compact_after = self.compact_after;
                    *self = fresh;
                    Ok(true)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(compacting_path(&self.path));
                    self.base = size;
                    Err(e)
                }
            };
        }
        if size < self.compact_after.max(self.base.saturating_mul(2)) {
            return Ok(false);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let path = self.path.clone();
        let spawned = std::thread::Builder::new().name("crew-journal-compaction".into()).spawn(move || {
            let compacted = (|| {
                let io = |source| JournalError::Io { path: path.clone(), source };
                let mut replay = Replay { next_job: 1, ..Replay::default() };
                // Only what was committed when it started: whole lines.
                let prefix = std::io::Read::take(File::open(&path).map_err(io)?, size);
                read_into(&path, prefix, &mut replay)?;
                write_compacted(&path, &replay)
            })();
            let _ = tx.send(compacted);
        });
        match spawned {
            Ok(_) => {
                self.compaction = Some(Compaction { offset: size, done: rx });
                Ok(false)
            }
            Err(e) => {
                self.base = size;
                Err(io(e))
            }
        }
    }

    /// Copies what was appended after `offset` to the compacted `file`,
    /// makes it durable and puts it in the journal's place.
    fn install_compacted(&self, mut file: File, offset: u64) -> Result<Self, JournalError> {
        use std::io::{Seek, SeekFrom};
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let mut old = File::open(&self.path).map_err(io)?;
        old.seek(SeekFrom::Start(offset)).map_err(io)?;
        std::io::copy(&mut old, &mut file).map_err(io)?;
        file.sync_data().map_err(io)?;
        Self::install(&self.path, file)
    }

    /// Waits for a compaction in progress and installs it (tests, and a
    /// daemon that wants a small journal before it stops).
    pub fn finish_compaction(&mut self) -> Result<bool, JournalError> {
        if let Some(c) = &self.compaction {
            // Block until the thread answered; the answer stays in the
            // channel for compact_if_grown.
            let answer = c.done.recv();
            let (tx, rx) = std::sync::mpsc::channel();
            if let Ok(a) = answer {
                let _ = tx.send(a);
            }
            let offset = c.offset;
            self.compaction = Some(Compaction { offset, done: rx });
            return self.compact_if_grown();
        }
        Ok(false)
    }

    /// Appends a record (buffered; durable after [`Journal::commit`]).
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        self.dirty = true;
        write_record(&mut self.out, record).map_err(|source| JournalError::Io { path: self.path.clone(), source })
    }

    /// Makes every appended record durable (write + fdatasync).
    pub fn commit(&mut self) -> Result<(), JournalError> {
        if !self.dirty {
            return Ok(());
        }
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_data().map_err(io)?;
        self.dirty = false;
        Ok(())
    }

    /// Replaces the file with the records of `replay` (after committing).
    pub fn compact(&mut self, replay: &Replay) -> Result<(), JournalError> {
        self.commit()?;
        let compact_after = self.compact_after;
        *self = Self::rewrite(&self.path, replay)?;
        self.compact_after = compact_after;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn write_record(w: &mut impl Write, record: &Record) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, record).map_err(std::io::Error::other)?;
    w.write_all(b"\n")
}

fn read_into(path: &Path, file: impl std::io::Read, replay: &mut Replay) -> Result<(), JournalError> {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        if line.last() != Some(&b'\n') {
            // A torn last line: the write that was cut short by a crash.
            return Ok(());
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => replay.apply(record),
            Err(e) => {
                return Err(JournalError::Damaged { path: path.to_path_buf(), line: n, message: e.to_string() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{OUTPUT_FORMAT, Status};

    fn output(id: u64) -> Output {
        let mut o = Output::without_run(JobId(id), None, Tags::new(), 0, Status::Succeeded, String::new());
        o.v = OUTPUT_FORMAT;
        o.error = None;
        o
    }

    fn recruit() -> Record {
        Record::Recruit {
            class: "local".into(),
            count: 2,
            tags: "gpu".parse().unwrap(),
            limits: SlotLimits::default(),
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn replay_folds_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, r) = Journal::open(&path).unwrap();
            assert_eq!(r.next_job, 1);
            j.append(&recruit()).unwrap();
            let jobs = (1..=4).map(|i| (JobId(i), JobSpec::shell(format!("echo {i}")))).collect();
            j.append(&Record::Accepted { jobs }).unwrap();
            j.append(&Record::Assigned { job: JobId(1), attempt: 1 }).unwrap();
            j.append(&Record::Assigned { job: JobId(2), attempt: 1 }).unwrap();
            j.append(&Record::Delivered { output: Box::new(output(1)) }).unwrap();
            j.append(&Record::Delivered { output: Box::new(output(3)) }).unwrap();
            j.append(&Record::Received { ids: vec![JobId(3)] }).unwrap();
            // Job 2 runs again (after a crash or a failure).
            j.append(&Record::Assigned { job: JobId(2), attempt: 2 }).unwrap();
            j.commit().unwrap();
        }
        for _ in 0..2 {
            // Twice: the second time reads the compacted file.
            let (_j, r) = Journal::open(&path).unwrap();
            assert_eq!(r.recruits.len(), 1);
            assert_eq!(r.recruits[0].count, 2);
            assert_eq!(r.next_job, 5);
            assert_eq!(r.ready.iter().map(|o| o.id).collect::<Vec<_>>(), vec![JobId(1)]);
            assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), vec![JobId(2), JobId(4)]);
            let two = &r.pending[&JobId(2)];
            assert!(two.running);
            assert_eq!(two.history, History { attempts: 2, crashes: 0, failures: 0 });
            assert!(!r.pending[&JobId(4)].running);
        }
    }

    #[test]
    fn ids_are_never_reused_after_everything_was_received() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            j.append(&Record::Accepted { jobs: vec![(JobId(1), JobSpec::shell("true"))] }).unwrap();
            j.append(&Record::Delivered { output: Box::new(output(1)) }).unwrap();
            j.append(&Record::Received { ids: vec![JobId(1)] }).unwrap();
            j.commit().unwrap();
        }
        // Compacted at every open: nothing is left but the counter.
        for _ in 0..3 {
            let (_j, r) = Journal::open(&path).unwrap();
            assert!(r.pending.is_empty() && r.ready.is_empty());
            assert_eq!(r.next_job, 2);
        }
    }

    #[test]
    fn a_long_lived_journal_stays_within_a_factor_of_its_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let threshold = 64 * 1024;
        let (mut j, _) = Journal::open(&path).unwrap();
        j.set_compact_after(threshold);
        j.append(&recruit()).unwrap();
        let mut compactions = 0;
        let mut largest = 0;
        // 5,000 jobs go through; the last 10 stay pending, and the 10
        // before them finished without being received.
        for i in 1..=5_000u64 {
            j.append(&Record::Accepted { jobs: vec![(JobId(i), JobSpec::shell(format!("echo {i}")))] }).unwrap();
            j.append(&Record::Assigned { job: JobId(i), attempt: 1 }).unwrap();
            if i <= 4_990 {
                j.append(&Record::Delivered { output: Box::new(output(i)) }).unwrap();
            }
            if i <= 4_980 {
                j.append(&Record::Received { ids: vec![JobId(i)] }).unwrap();
            }
            if j.compact_if_grown().unwrap() {
                compactions += 1;
            }
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        j.finish_compaction().unwrap();
        assert!(compactions >= 3, "only {compactions} compactions");
        // Records keep coming while a compaction runs on its thread.
        assert!(largest < 8 * threshold, "the file reached {largest} bytes");
        drop(j);
        assert!(!compacting_path(&path).exists(), "a compaction was left half-done");
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.recruits.len(), 1);
        assert_eq!(r.next_job, 5_001);
        assert_eq!(r.pending.keys().map(|id| id.0).collect::<Vec<_>>(), (4_991..=5_000).collect::<Vec<_>>());
        assert!(r.pending.values().all(|p| p.running && p.history.attempts == 1));
        assert_eq!(r.ready.iter().map(|o| o.id.0).collect::<Vec<_>>(), (4_981..=4_990).collect::<Vec<_>>());
    }

    #[test]
    fn a_compaction_cut_short_leaves_the_journal_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.set_compact_after(1024);
        for i in 1..=200u64 {
            j.append(&Record::Accepted { jobs: vec![(JobId(i), JobSpec::shell(format!("echo {i}")))] }).unwrap();
        }
        // A compaction starts; more records come; the process "dies" before
        // the next commit installs it (the thread's file is left behind).
        assert!(!j.compact_if_grown().unwrap(), "started, not installed");
        for i in 1..=150u64 {
            j.append(&Record::Delivered { output: Box::new(output(i)) }).unwrap();
        }
        j.commit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(j);
        std::fs::write(compacting_path(&path), b"{\"t\":\"received\",\"ids\":[1]}\ntorn").unwrap();
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.keys().map(|id| id.0).collect::<Vec<_>>(), (151..=200).collect::<Vec<_>>());
        assert_eq!(r.ready.len(), 150, "what the half-done compaction file said is not taken");
        assert_eq!(r.next_job, 201);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, _) = Journal::open(&path).unwrap();
            j.append(&Record::Accepted { jobs: vec![(JobId(1), JobSpec::shell("true"))] }).unwrap();
            j.commit().unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"t":"accepted","jobs":[[2,{"comm"#).unwrap();
        drop(f);
        let (_j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), vec![JobId(1)]);

        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        f.write_all(b"{\"t\":\"received\",\"ids\":[]}\n").unwrap();
        drop(f);
        let err = Journal::open(&path).unwrap_err().to_string();
        // Line 1 is the counter, line 2 the pending job.
        assert!(err.contains("line 3"), "{err}");
    }
}
