//! The no-op memo: a `crew make` that found everything up to date writes
//! down what that answer rested on, so that the next one can give it
//! without parsing the pipeline, planning and hashing again (the idea of
//! Gradle's configuration cache, applied to a no-op).
//!
//! The answer "all N wanted targets are up to date" is a function of:
//! - the pipeline file's bytes, the pipeline's folder, the store's URL,
//!   the seed, the targets asked for and the worker tags (the **key**,
//!   a SHA-256 over them and crew's record format);
//! - the content of every file the run looked at in the working tree:
//!   the source inputs it hashed and the outputs it checked or copied
//!   there (kept by `stat`, like the hash cache: size, times, inode,
//!   device — any change, even a `touch`, spends the memo);
//! - what the store holds, which only `crew make`, `crew clean` and
//!   `crew gc` change, each bumping the store's generation object: the
//!   memo holds the generation it saw.
//!
//! A pipeline with a `glob` or `lines` map is never memoised (its plan
//! depends on folders and files read at plan time). When every part
//! holds, the memo's answer is the answer the full run would give; when
//! any does not, the full run happens and writes a new memo if it ends in
//! a no-op again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crew_core::store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::file::MapValues;
use crate::hashes::Stat;
use crate::plan::Plan;
use crate::record::{RECORD_FORMAT, hex};

/// The memo's file name in the state folder.
const FILE: &str = "noop.json";

/// What a memo keys on besides the file system and the store.
#[derive(Debug, Clone)]
pub struct MemoKey<'a> {
    /// The pipeline file's bytes.
    pub text: &'a [u8],
    /// The pipeline's folder, absolute.
    pub root: &'a Path,
    /// The store's URL.
    pub store: &'a str,
    /// The crew seed.
    pub seed: u64,
    /// The targets asked for, as given.
    pub targets: &'a [String],
    /// Everything else on the command line that changes the answer or its
    /// checks (e.g. the worker tags), as text.
    pub extra: &'a str,
}

impl MemoKey<'_> {
    /// The key as a hex SHA-256.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut put = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        put(b"crew-noop-memo");
        put(&RECORD_FORMAT.to_le_bytes());
        put(self.text);
        put(self.root.as_os_str().as_encoded_bytes());
        put(self.store.as_bytes());
        put(&self.seed.to_le_bytes());
        put(&(self.targets.len() as u64).to_le_bytes());
        for t in self.targets {
            put(t.as_bytes());
        }
        put(self.extra.as_bytes());
        hex(&h.finalize())
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    key: String,
    generation: String,
    files: BTreeMap<String, Stat>,
    up_to_date: usize,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// True when `plan` may be memoised: no map reads the file system at plan
/// time.
pub fn eligible(plan: &Plan) -> bool {
    plan.file.targets.iter().all(|t| t.map.iter().all(|(_, v)| matches!(v, MapValues::List(_))))
}

/// The number of targets up to date, when the memo in `state_dir` holds
/// for `key` (files under `root` unchanged, the store's generation the
/// same); `None` otherwise (the full run decides).
pub async fn check(state_dir: &Path, root: &Path, key: &str, store: &dyn Store) -> Option<usize> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    let saved: Saved = serde_json::from_slice(&bytes).ok()?;
    if saved.key != key {
        return None;
    }
    for (rel, stat) in &saved.files {
        let meta = std::fs::metadata(root.join(rel)).ok()?;
        if !meta.is_file() || Stat::of(&meta) != *stat {
            return None;
        }
    }
    let now = crate::index::generation(store).await.ok()??;
    (now == saved.generation).then_some(saved.up_to_date)
}

/// Writes the memo of a no-op run (best effort: a memo that cannot be
/// written only costs the full run next time).
pub(crate) fn write(
    state_dir: &Path,
    key: &str,
    generation: &str,
    files: &std::collections::HashMap<String, Stat>,
    up_to_date: usize,
) {
    let saved = Saved {
        key: key.to_owned(),
        generation: generation.to_owned(),
        files: files.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        up_to_date,
    };
    let file = path(state_dir);
    let tmp = file.with_extension("json.tmp");
    let written = std::fs::create_dir_all(state_dir)
        .and_then(|()| serde_json::to_vec(&saved).map_err(std::io::Error::other))
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &file));
    if let Err(e) = written {
        tracing::debug!(file = %file.display(), error = %e, "cannot write the no-op memo");
    }
}

/// Removes the memo (a run that was not a no-op).
pub(crate) fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(path(state_dir));
}
