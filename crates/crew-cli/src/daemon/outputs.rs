//! Every output the daemon delivered, for `crew logs`: an append-only file
//! of JSON lines (`DIR/outputs.jsonl`) and an in-memory index from job id to
//! line.
//!
//! Why not one store object per output: at tens of thousands of outputs per
//! second, one file creation each is the bottleneck (measured: 100,000
//! outputs took 55 s that way); one buffered append each costs nothing.
//! The file is not the record of truth — the journal is — so it is not
//! synced: after a crash, `logs` may not know a job whose output the
//! journal re-delivers, and the line is written again then.
//!
//! It keeps the newest outputs only (`[daemon] logs_keep`, 100,000 by
//! default): once it indexes twice that many, the older lines are cut off
//! (the newest are copied to a new file, a byte copy without parsing), so
//! that a daemon that runs millions of jobs keeps a bounded file and index.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crew_core::{JobId, Output};

/// How many of the newest outputs `logs` keeps, by default.
pub(crate) const KEEP: usize = 100_000;

/// The outputs file and its index.
#[derive(Debug)]
pub(crate) struct OutputsLog {
    /// Outputs kept (at most twice as many between two trims).
    keep: usize,
    path: PathBuf,
    out: BufWriter<File>,
    reader: File,
    /// Where each job's line starts, and its length (without the newline).
    index: HashMap<JobId, (u64, usize)>,
    /// The last job of each name.
    names: HashMap<String, JobId>,
    /// The file's length, including what is still buffered.
    end: u64,
}

impl OutputsLog {
    /// Opens (or creates) the file and indexes the lines already in it; a
    /// torn last line is cut off.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path)?;
        // Private even when an older daemon created it with another mode.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut index = HashMap::new();
        let mut names = HashMap::new();
        let mut end = 0u64;
        {
            let mut reader = BufReader::new(&file);
            reader.seek(SeekFrom::Start(0))?;
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                #[derive(serde::Deserialize)]
                struct Id {
                    id: JobId,
                    #[serde(default)]
                    name: Option<String>,
                }
                if let Ok(Id { id, name }) = serde_json::from_slice::<Id>(&line) {
                    index.insert(id, (end, n - 1));
                    if let Some(name) = name {
                        names.insert(name, id);
                    }
                }
                end += n as u64;
            }
        }
        file.set_len(end)?;
        let reader = File::open(path)?;
        Ok(Self {
            keep: KEEP,
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(256 * 1024, file),
            reader,
            index,
            names,
            end,
        })
    }

    /// Appends an output (buffered), whole or not at all: a failed write
    /// (a full disk) leaves no part of its line behind, so the index stays
    /// true and later lines are whole.
    #[cfg(test)]
    pub(crate) fn append(&mut self, output: &Output) -> std::io::Result<()> {
        let json = serde_json::to_vec(output).map_err(std::io::Error::other)?;
        self.append_json(output.id, output.name.as_deref(), &json)
    }

    /// [`OutputsLog::append`] of an output already serialized (`json`,
    /// one line without its newline).
    pub(crate) fn append_json(&mut self, id: JobId, name: Option<&str>, json: &[u8]) -> std::io::Result<()> {
        let len = json.len() + 1;
        if self.out.buffer().len() + len > self.out.capacity() {
            // On failure the buffer keeps what was not written (whole
            // lines but for the front of the first, whose start is in the
            // file), and nothing of this line went anywhere.
            self.out.flush()?;
        }
        if len > self.out.capacity() {
            // Straight to the file (the buffer is empty): cut back if cut short.
            let mut line = Vec::with_capacity(len);
            line.extend_from_slice(json);
            line.push(b'\n');
            if let Err(e) = self.out.get_mut().write_all(&line) {
                let _ = self.out.get_ref().set_len(self.end);
                return Err(e);
            }
        } else {
            // Fits in the buffer: no I/O.
            self.out.write_all(json)?;
            self.out.write_all(b"\n")?;
        }
        self.index.insert(id, (self.end, json.len()));
        if let Some(name) = name {
            self.names.insert(name.to_owned(), id);
        }
        self.end += len as u64;
        if self.index.len() > self.keep.saturating_mul(2) {
            self.trim()?;
        }
        Ok(())
    }

    /// Sets how many of the newest outputs are kept (at least 1).
    pub(crate) fn set_keep(&mut self, keep: usize) {
        self.keep = keep.max(1);
    }

    /// Keeps the newest `keep` outputs: the file from the first of their
    /// lines on is copied to a new file that replaces it.
    fn trim(&mut self) -> std::io::Result<()> {
        let mut offsets: Vec<u64> = self.index.values().map(|&(offset, _)| offset).collect();
        offsets.sort_unstable();
        let Some(&cut) = offsets.len().checked_sub(self.keep).and_then(|i| offsets.get(i)) else { return Ok(()) };
        self.out.flush()?;
        let tmp = self.path.with_extension("trimming");
        {
            let mut from = File::open(&self.path)?;
            from.seek(SeekFrom::Start(cut))?;
            let mut to = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            std::io::copy(&mut from, &mut to)?;
        }
        std::fs::rename(&tmp, &self.path)?;
        let file = OpenOptions::new().read(true).append(true).open(&self.path)?;
        self.out = BufWriter::with_capacity(256 * 1024, file);
        self.reader = File::open(&self.path)?;
        self.index.retain(|_, &mut (offset, _)| offset >= cut);
        for (offset, _) in self.index.values_mut() {
            *offset -= cut;
        }
        let index = &self.index;
        self.names.retain(|_, id| index.contains_key(id));
        self.end -= cut;
        Ok(())
    }

    /// The id of the last delivered job named `name`.
    /// The ids of the records kept, in no order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = JobId> + '_ {
        self.index.keys().copied()
    }

    pub(crate) fn id_of(&self, name: &str) -> Option<JobId> {
        self.names.get(name).copied()
    }

    /// The output of `job`, if it was delivered.
    pub(crate) fn get(&mut self, job: JobId) -> std::io::Result<Option<Output>> {
        let Some(&(offset, len)) = self.index.get(&job) else { return Ok(None) };
        self.out.flush()?;
        let mut buf = vec![0; len];
        self.reader.read_exact_at(&mut buf, offset)?;
        serde_json::from_slice(&buf).map(Some).map_err(|e| {
            std::io::Error::other(format!("{}: the line of job {job} is unreadable: {e}", self.path.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crew_core::{Status, Tags};

    #[test]
    fn appends_index_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outputs.jsonl");
        let out = |id| Output::without_run(JobId(id), None, Tags::new(), 0, Status::Succeeded, format!("job {id}"));
        {
            let mut log = OutputsLog::open(&path).unwrap();
            for id in 1..=3 {
                log.append(&out(id)).unwrap();
            }
            assert_eq!(log.get(JobId(2)).unwrap().unwrap().error.as_deref(), Some("job 2"));
            assert!(log.get(JobId(9)).unwrap().is_none());
        }
        // A torn line at the end is cut off on open.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"v\":1,\"id\":4").unwrap();
        let mut log = OutputsLog::open(&path).unwrap();
        assert_eq!(log.get(JobId(3)).unwrap().unwrap().id, JobId(3));
        assert!(log.get(JobId(4)).unwrap().is_none());
        log.append(&out(5)).unwrap();
        assert_eq!(log.get(JobId(5)).unwrap().unwrap().error.as_deref(), Some("job 5"));
        assert_eq!(log.get(JobId(1)).unwrap().unwrap().error.as_deref(), Some("job 1"));
    }

    #[test]
    fn only_the_newest_outputs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outputs.jsonl");
        let out = |id: u64| {
            let mut o = Output::without_run(JobId(id), None, Tags::new(), 0, Status::Succeeded, format!("job {id}"));
            o.name = Some(format!("n{id}"));
            o
        };
        let mut log = OutputsLog::open(&path).unwrap();
        log.set_keep(10);
        for id in 1..=100 {
            log.append(&out(id)).unwrap();
            assert!(log.index.len() <= 20, "{} indexed", log.index.len());
        }
        assert_eq!(log.get(JobId(100)).unwrap().unwrap().error.as_deref(), Some("job 100"));
        assert_eq!(log.get(JobId(91)).unwrap().unwrap().error.as_deref(), Some("job 91"));
        assert!(log.get(JobId(1)).unwrap().is_none());
        assert_eq!(log.id_of("n95"), Some(JobId(95)));
        assert_eq!(log.id_of("n1"), None);
        drop(log);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!((10..=20).contains(&lines), "{lines} lines kept");
        // What is left reads back whole.
        let mut log = OutputsLog::open(&path).unwrap();
        assert_eq!(log.index.len(), lines);
        assert_eq!(log.get(JobId(100)).unwrap().unwrap().id, JobId(100));
    }
}
