//! Content hashes of working-tree files, with a local cache.
//!
//! Whether a target is up to date depends on the *content* of its source
//! inputs, never their times. Hashing every source at every `crew make`
//! would cost a read of all of them, so the SHA-256 of each file is kept in
//! `.crew/pipeline/hashes.json` together with what `stat` says of it (size,
//! modification and change times to the nanosecond, inode, device). A file
//! whose `stat` is unchanged is not read again; any change, even a `touch`,
//! makes it hashed again, and the hash alone decides. The cache is an
//! accelerator only: deleting it changes no answer (a fresh checkout has
//! none and finds the same targets up to date).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::record::hex;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stat {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl Stat {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    stat: Stat,
    sha256: String,
}

/// The hashes of files under one folder, cached by `stat`.
#[derive(Debug)]
pub struct HashCache {
    root: PathBuf,
    file: Option<PathBuf>,
    entries: HashMap<String, Entry>,
    dirty: bool,
    /// Every file this run hashed or wrote, with its `stat` then (what a
    /// no-op memo must find unchanged).
    seen: HashMap<String, Stat>,
}

impl HashCache {
    /// A cache of files under `root`, kept in `file` (read now if it
    /// exists; a damaged cache is ignored).
    pub fn open(root: &Path, file: Option<PathBuf>) -> Self {
        let entries = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { root: root.to_path_buf(), file, entries, dirty: false, seen: HashMap::new() }
    }

    /// The SHA-256 and size of the regular file `rel` (relative to the
    /// root), from the cache when its `stat` is unchanged.
    ///
    /// # Errors
    /// The file is missing, not a regular file, or unreadable.
    pub fn hash(&mut self, rel: &str) -> std::io::Result<(String, u64)> {
        let path = self.root.join(rel);
        let meta = std::fs::metadata(&path)?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let stat = Stat::of(&meta);
        self.seen.insert(rel.to_owned(), stat.clone());
        if let Some(e) = self.entries.get(rel) {
            if e.stat == stat {
                return Ok((e.sha256.clone(), stat.size));
            }
        }
        let (sha, size) = hash_file(&path)?;
        // A file that changed while it was read is hashed again next time.
        let after = std::fs::metadata(&path).map(|m| Stat::of(&m)).ok();
        if after.as_ref() == Some(&stat) {
            self.entries.insert(rel.to_owned(), Entry { stat, sha256: sha.clone() });
            self.dirty = true;
        }
        Ok((sha, size))
    }

    /// Notes that `rel` was just written with content `sha256` (a verified
    /// download), so that it is not read again to be hashed.
    pub fn remember(&mut self, rel: &str, sha256: &str) {
        if let Ok(meta) = std::fs::metadata(self.root.join(rel)) {
            self.seen.insert(rel.to_owned(), Stat::of(&meta));
            self.entries.insert(rel.to_owned(), Entry { stat: Stat::of(&meta), sha256: sha256.to_owned() });
            self.dirty = true;
        }
    }

    /// True when `rel` exists and its content has SHA-256 `sha256`.
    pub fn matches(&mut self, rel: &str, sha256: &str) -> bool {
        self.hash(rel).is_ok_and(|(s, _)| s == sha256)
    }

    /// The files this run looked at (relative to the root) and their `stat`.
    pub(crate) fn seen(&self) -> &HashMap<String, Stat> {
        &self.seen
    }

    /// Writes the cache back if it changed (best effort: a cache that cannot
    /// be written only costs hashing again).
    pub fn save(&mut self) {
        let Some(file) = &self.file else { return };
        if !self.dirty {
            return;
        }
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&self.entries)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, file));
        match written {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::debug!(file = %file.display(), error = %e, "cannot write the hash cache"),
        }
    }
}

/// The SHA-256 (hex) and size of the file at `path`.
///
/// # Errors
/// The file cannot be read.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_decides_not_times() {
        let dir = tempfile::tempdir().unwrap();
        let cache_file = dir.path().join("c/hashes.json");
        std::fs::write(dir.path().join("a"), "one").unwrap();
        let mut c = HashCache::open(dir.path(), Some(cache_file.clone()));
        let (h1, n) = c.hash("a").unwrap();
        assert_eq!(n, 3);
        c.save();
        // Same content, new times: same hash.
        std::fs::write(dir.path().join("a"), "one").unwrap();
        let mut c = HashCache::open(dir.path(), Some(cache_file.clone()));
        assert_eq!(c.hash("a").unwrap().0, h1);
        // New content of the same size: another hash.
        std::fs::write(dir.path().join("a"), "two").unwrap();
        assert_ne!(c.hash("a").unwrap().0, h1);
        assert!(c.hash("missing").is_err());
    }
}
