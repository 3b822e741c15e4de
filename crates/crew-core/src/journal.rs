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
//! restarts; a long-lived daemon may also call [`Journal::compact`].

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
        }
    }

    /// The records that rebuild this state (what compaction writes).
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
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

/// An open journal, appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    dirty: bool,
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
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let tmp = path.with_extension("compacting");
        {
            let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io)?;
            let mut w = BufWriter::new(file);
            for r in replay.records() {
                write_record(&mut w, &r).map_err(io)?;
            }
            w.flush().map_err(io)?;
            w.get_ref().sync_data().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            // Make the rename itself durable.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::with_capacity(256 * 1024, file), dirty: false })
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
        *self = Self::rewrite(&self.path, replay)?;
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

fn read_into(path: &Path, file: File, replay: &mut Replay) -> Result<(), JournalError> {
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
        assert!(err.contains("line 2"), "{err}");
    }
}
