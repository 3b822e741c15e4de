//! Job inputs and outputs through the store: staging, verified transfers,
//! output patterns and manifests.
//!
//! Data flows between the machine that sends a job, the store and the
//! worker, never through the controller, which holds only references (key,
//! size, SHA-256). The key layout:
//!
//! - `cas/sha256/<hex>`: an input, content-addressed. A file is hashed once
//!   and uploaded once, however many jobs read it ([`Stager`]).
//! - `jobs/<id>/<attempt>/outputs/<name>`: the files an attempt produced
//!   that match its output patterns ([`expand_outputs`], [`upload_hashed`]).
//! - `jobs/<id>/<attempt>/manifest.json`: the list of those objects with
//!   their sizes and SHA-256 ([`Manifest`]), so that outputs can be fetched
//!   from the store alone, without the controller.
//!
//! Every transfer streams (no whole-file buffer) and is checked: an upload
//! hashes the bytes it sends, a download ([`download_verified`]) goes to a
//! temporary file that is renamed into place only when its size and SHA-256
//! are the expected ones, so a corrupted or short transfer is an error, never
//! a wrong file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::job::{InputSource, JobId, JobSpec, check_relative_path};
use crate::output::Status;
use crate::store::{Store, StoreError, StoreKey};

/// The prefix of content-addressed inputs: `cas/sha256/<hex>`.
pub const CAS_PREFIX: &str = "cas/sha256";

/// The file name of an attempt's manifest: `jobs/<id>/<attempt>/manifest.json`.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The version of the manifest format, written as `"v"`. Version 2 adds
/// the manifest's own checksum ([`Manifest::sha256`]), required from it on;
/// version 1 manifests (written before) are read with the other checks only.
pub const MANIFEST_FORMAT: u32 = 2;

/// Largest manifest read back, in bytes.
const MANIFEST_MAX: usize = 64 * 1024 * 1024;

/// How much is read from a file at a time, to hash or to upload it.
const CHUNK: usize = 1024 * 1024;

/// One object a job produced, as listed in its output record and manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredObject {
    /// Its relative path in the job's working folder (`fit/model.rds`).
    pub name: String,
    /// Its store key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// The list of what one attempt of a job uploaded, written to
/// `jobs/<id>/<attempt>/manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Manifest {
    /// Format version, [`MANIFEST_FORMAT`].
    pub v: u32,
    /// The job's id.
    pub id: JobId,
    /// The job's name, when it has one (absent in manifests written before
    /// names were recorded): how `crew fetch --store URL NAME` finds a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The attempt.
    pub attempt: u32,
    /// How the attempt ended.
    pub status: Status,
    /// The uploaded outputs.
    pub objects: Vec<StoredObject>,
    /// The SHA-256 (hex) of the manifest's compact JSON without this field:
    /// set by [`Manifest::to_bytes`], checked by [`Manifest::from_bytes`],
    /// so that a truncated or altered manifest is refused, not trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl StoredObject {
    /// The object `key` of `size` bytes and SHA-256 `sha256` (lowercase
    /// hex), the file `name` of the job's folder.
    pub fn new(name: impl Into<String>, key: impl Into<String>, size: u64, sha256: impl Into<String>) -> Self {
        Self { name: name.into(), key: key.into(), size, sha256: sha256.into() }
    }
}

impl Manifest {
    /// The manifest of attempt `attempt` of job `id` (named `name`), which
    /// ended `status` having uploaded `objects`; sealed by
    /// [`Manifest::to_bytes`].
    pub fn new(id: JobId, name: Option<String>, attempt: u32, status: Status, objects: Vec<StoredObject>) -> Self {
        Self { v: MANIFEST_FORMAT, id, name, attempt, status, objects, sha256: None }
    }

    /// The checksum of this manifest (its compact JSON, `sha256` left out).
    fn checksum(&self) -> Result<String, serde_json::Error> {
        let body = Manifest { sha256: None, ..self.clone() };
        Ok(hex(&Sha256::digest(serde_json::to_vec(&body)?)))
    }

    /// The manifest as written to the store: pretty JSON carrying its own
    /// checksum.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let sealed = Manifest { sha256: Some(self.checksum()?), ..self.clone() };
        serde_json::to_vec_pretty(&sealed)
    }

    /// Reads the manifest of attempt `attempt` of job `id` stored at `key`,
    /// verified before it is trusted: it parses whole, its checksum matches
    /// (required from format 2 on), it names that job and attempt, and each
    /// of its objects has a sound relative name, a SHA-256 of 64 hex digits
    /// and a key under the attempt's own `outputs/` folder.
    pub fn from_bytes(bytes: &[u8], key: &StoreKey, id: JobId, attempt: u32) -> Result<Manifest, StageError> {
        let bad = |why: String| {
            StageError::Invalid(format!(
                "the manifest {key} of job {id} attempt {attempt} cannot be trusted: {why}; it was damaged or altered \
                 after the job wrote it: run the job again to write a sound one"
            ))
        };
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("it is not a whole manifest ({e})")))?;
        match (&manifest.sha256, manifest.v) {
            (_, v) if v == 0 || v > MANIFEST_FORMAT => {
                return Err(bad(format!("its format {v} is not one this crew reads (1 to {MANIFEST_FORMAT})")));
            }
            (None, v) if v >= 2 => return Err(bad("it has no checksum".to_owned())),
            (None, _) => {}
            (Some(want), _) => {
                let got = manifest.checksum().map_err(|e| bad(e.to_string()))?;
                if &got != want {
                    return Err(bad(format!("its checksum is {got}, it says {want}")));
                }
            }
        }
        if manifest.id != id || manifest.attempt != attempt {
            return Err(bad(format!("it names job {} attempt {}", manifest.id, manifest.attempt)));
        }
        let folder = key.as_str().strip_suffix(MANIFEST_FILE).unwrap_or(key.as_str());
        for o in &manifest.objects {
            check_relative_path(&o.name).map_err(|e| bad(format!("object {:?}: {e}", o.name)))?;
            if o.sha256.len() != 64 || !o.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(bad(format!("object {:?}: {:?} is not a SHA-256", o.name, o.sha256)));
            }
            if o.key != format!("{folder}outputs/{}", o.name) {
                return Err(bad(format!("object {:?}: its key {} is not in {folder}outputs/", o.name, o.key)));
            }
        }
        Ok(manifest)
    }
}

/// Why staging, a transfer or an output could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// A local file or folder could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file changed between hashing and uploading.
    #[error(
        "{path} changed while it was being staged (its content is no longer the one hashed); try again once it is stable"
    )]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A downloaded object is not the expected one.
    #[error(
        "checksum mismatch for {key}: expected {expected_size} bytes with SHA-256 {expected}, got {size} bytes with SHA-256 {actual}"
    )]
    Checksum {
        /// The object's key.
        key: String,
        /// The expected SHA-256.
        expected: String,
        /// The expected size.
        expected_size: u64,
        /// The SHA-256 of what was received.
        actual: String,
        /// The size of what was received (so far, when it was too long).
        size: u64,
    },
    /// Something unacceptable: a name that would leave its folder, a path
    /// that is not a regular file, a manifest that does not parse.
    #[error("{0}")]
    Invalid(String),
    /// An input of a job could not be staged.
    #[error("input {name:?} ({path}): {reason}")]
    Input {
        /// The input's name.
        name: String,
        /// The file.
        path: String,
        /// Why.
        reason: Box<StageError>,
    },
}

impl StageError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    /// True when the store itself failed (rather than a local file or the
    /// data): the caller's input was fine.
    pub fn is_store_failure(&self) -> bool {
        match self {
            StageError::Store(e) => !matches!(e, StoreError::InvalidKey { .. }),
            StageError::Input { reason, .. } => reason.is_store_failure(),
            _ => false,
        }
    }
}

/// The key of the content-addressed object with SHA-256 `hex`.
pub fn cas_key(hex: &str) -> Result<StoreKey, StoreError> {
    StoreKey::new(format!("{CAS_PREFIX}/{hex}"))
}

/// The key of output `name` of an attempt: `jobs/<id>/<attempt>/outputs/<name>`.
pub fn output_key(id: JobId, attempt: u32, name: &str) -> Result<StoreKey, StoreError> {
    StoreKey::new(format!("jobs/{id}/{attempt}/outputs/{name}"))
}

/// The key prefix of a job's attempts: its `output_prefix`, else `jobs/<id>`.
pub fn attempts_prefix(spec: &JobSpec, id: JobId) -> String {
    match &spec.opts.output_prefix {
        Some(prefix) => prefix.clone(),
        None => format!("jobs/{id}"),
    }
}

/// The key of output `name` of an attempt under `prefix` (see
/// [`attempts_prefix`]): `<prefix>/<attempt>/outputs/<name>`.
pub fn output_key_in(prefix: &str, attempt: u32, name: &str) -> Result<StoreKey, StoreError> {
    StoreKey::new(format!("{prefix}/{attempt}/outputs/{name}"))
}

/// The key of an attempt's manifest under `prefix`: `<prefix>/<attempt>/manifest.json`.
pub fn manifest_key_in(prefix: &str, attempt: u32) -> Result<StoreKey, StoreError> {
    StoreKey::new(format!("{prefix}/{attempt}/{MANIFEST_FILE}"))
}

/// The key of an attempt's manifest: `jobs/<id>/<attempt>/manifest.json`.
pub fn manifest_key(id: JobId, attempt: u32) -> Result<StoreKey, StoreError> {
    StoreKey::new(format!("jobs/{id}/{attempt}/{MANIFEST_FILE}"))
}

fn hex(digest: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(digest.len() * 2);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The SHA-256 (hex) and size of the file at `path`, read in chunks on a
/// blocking thread.
pub async fn hash_file(path: &Path) -> Result<(String, u64), StageError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let context = || format!("cannot read {}", owned.display());
        let mut file = std::fs::File::open(&owned).map_err(|e| StageError::io(context(), e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; CHUNK];
        let mut size = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    size += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StageError::io(context(), e)),
            }
        }
        Ok((hex(&hasher.finalize()), size))
    })
    .await
    .map_err(|e| StageError::io(format!("cannot hash {}", path.display()), io::Error::other(e)))?
}

/// What an upload stream hashed, read back after the upload.
type Hashed = Arc<Mutex<Option<(String, u64)>>>;

/// Uploads the file at `path` to `key`, hashing the bytes as they are sent.
/// With `expected`, the upload fails (and leaves no object: the stream
/// errors before the store commits it) when the bytes are not those.
async fn upload_checked(
    store: &dyn Store,
    key: &StoreKey,
    path: &Path,
    expected: Option<(&str, u64)>,
) -> Result<(String, u64), StageError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| StageError::io(format!("cannot open {} to upload it", path.display()), e))?;
    let hashed: Hashed = Arc::new(Mutex::new(None));
    let expected_owned = expected.map(|(h, s)| (h.to_owned(), s));
    let context = format!("cannot read {} to upload it to {key}", path.display());
    struct State {
        file: tokio::fs::File,
        hasher: Option<Sha256>,
        size: u64,
    }
    let state = State { file, hasher: Some(Sha256::new()), size: 0 };
    let out = Arc::clone(&hashed);
    let stream = futures::stream::try_unfold(state, move |mut st| {
        let context = context.clone();
        let out = Arc::clone(&out);
        let expected = expected_owned.clone();
        async move {
            let Some(hasher) = st.hasher.as_mut() else { return Ok(None) };
            let mut buf = BytesMut::with_capacity(CHUNK);
            while buf.len() < CHUNK {
                let n = st
                    .file
                    .read_buf(&mut buf)
                    .await
                    .map_err(|source| StoreError::Io { context: context.clone(), source })?;
                if n == 0 {
                    break;
                }
            }
            if !buf.is_empty() {
                hasher.update(&buf);
                st.size += buf.len() as u64;
                return Ok(Some((buf.freeze(), st)));
            }
            // The end: the digest decides whether the upload may complete.
            let digest = hex(&st.hasher.take().map(Sha256::finalize).unwrap_or_default());
            let size = st.size;
            *out.lock().unwrap_or_else(PoisonError::into_inner) = Some((digest.clone(), size));
            if let Some((want, want_size)) = expected {
                if want != digest || want_size != size {
                    return Err(StoreError::Io {
                        context,
                        source: io::Error::other("the file changed while it was being uploaded"),
                    });
                }
            }
            Ok(None)
        }
    });
    let result = store.put_stream(key, stream.boxed()).await;
    let computed = hashed.lock().unwrap_or_else(PoisonError::into_inner).clone();
    match (result, computed, expected) {
        (Err(_), Some((h, s)), Some((want, want_size))) if h != want || s != want_size => {
            Err(StageError::Changed { path: path.to_path_buf() })
        }
        (Err(e), _, _) => Err(e.into()),
        (Ok(_), Some(done), _) => Ok(done),
        (Ok(meta), None, _) => Err(StageError::Store(StoreError::Backend {
            backend: "staging",
            message: format!(
                "the upload of {} to {} ended before the file did ({} bytes)",
                path.display(),
                key,
                meta.size
            ),
            retryable: true,
        })),
    }
}

/// Uploads the file at `path` to `key`, streaming, and returns the object
/// with the size and SHA-256 of the bytes uploaded (`name` is left empty for
/// the caller).
pub async fn upload_hashed(store: &dyn Store, key: &StoreKey, path: &Path) -> Result<StoredObject, StageError> {
    let (sha256, size) = upload_checked(store, key, path, None).await?;
    Ok(StoredObject { name: String::new(), key: key.as_str().to_owned(), size, sha256 })
}

/// A random tag for temporary file names.
fn random_tag() -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    hex(&bytes)
}

/// Downloads `key` to `dest`, checking that it is `size` bytes with SHA-256
/// `sha256`: the bytes go to a temporary file beside `dest`, renamed over
/// `dest` only when both match. On any error nothing is left at `dest` (an
/// existing file there is left alone).
pub async fn download_verified(
    store: &dyn Store,
    key: &StoreKey,
    sha256: &str,
    size: u64,
    dest: &Path,
) -> Result<(), StageError> {
    let folder = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = folder.join(format!(".{file_name}.crew-part-{}", random_tag()));
    let result = download_to(store, key, sha256, size, &tmp).await;
    let result = match result {
        Ok(()) => tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| StageError::io(format!("cannot move the download of {key} to {}", dest.display()), e)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

async fn download_to(store: &dyn Store, key: &StoreKey, sha256: &str, size: u64, tmp: &Path) -> Result<(), StageError> {
    let mut stream = store.get(key).await?;
    let write_error = |e| StageError::io(format!("cannot write {} (downloading {key})", tmp.display()), e);
    let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(tmp).await.map_err(write_error)?;
    let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mismatch = |actual: String, got: u64| StageError::Checksum {
        key: key.as_str().to_owned(),
        expected: sha256.to_owned(),
        expected_size: size,
        actual,
        size: got,
    };
    while let Some(chunk) = stream.next().await {
        let chunk: Bytes = chunk?;
        got += chunk.len() as u64;
        if got > size {
            return Err(mismatch("(not computed: too long)".to_owned(), got));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(write_error)?;
    }
    out.flush().await.map_err(write_error)?;
    let actual = hex(&hasher.finalize());
    if got != size || actual != sha256 {
        return Err(mismatch(actual, got));
    }
    Ok(())
}

/// The path of `name` (a relative path, checked) under `root`, with its
/// parent folders created. Refuses a name that leaves `root`, and any
/// existing component on the way that is not a real folder (a symbolic
/// link is never followed out).
pub fn prepare_dest(root: &Path, name: &str) -> Result<PathBuf, StageError> {
    check_relative_path(name).map_err(|e| StageError::Invalid(format!("{name:?}: {e}")))?;
    let mut path = root.to_path_buf();
    let segments: Vec<&str> = name.split('/').collect();
    let (last, folders) = segments.split_last().ok_or_else(|| StageError::Invalid(format!("{name:?}: empty")))?;
    for seg in folders {
        path.push(seg);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StageError::Invalid(format!(
                    "{name:?}: {} exists and is not a folder (symbolic links are not followed)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&path)
                    .map_err(|e| StageError::io(format!("cannot create {}", path.display()), e))?;
            }
            Err(e) => return Err(StageError::io(format!("cannot inspect {}", path.display()), e)),
        }
    }
    path.push(last);
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if m.is_dir() {
            return Err(StageError::Invalid(format!("{name:?}: {} is a folder", path.display())));
        }
    }
    Ok(path)
}

// ---------------------------------------------------------------------------
// Staging inputs

/// What identifies a file's content without reading it again: same path,
/// device, inode, size and modification time means same bytes (as `make`
/// and `rsync` assume).
#[derive(Clone, PartialEq, Eq, Hash)]
struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

/// Stages job inputs: hashes each input file (SHA-256), uploads it once to
/// `cas/sha256/<hex>` (not at all when the store already has that object
/// with that content: same size, then the same SHA-256 of the bytes read
/// back), and turns the input into an [`InputSource::Object`].
///
/// A cache keyed by (canonical path, device, inode, size, mtime) spares
/// re-hashing a file sent again (the daemon keeps one `Stager` for its whole
/// life); within one call, each distinct file is hashed and uploaded once,
/// so 1,000 jobs sharing a 1 GB input cost one hash and one upload.
pub struct Stager {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<FileId, (String, u64)>>,
}

impl fmt::Debug for Stager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stager").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Stager {
    /// A stager uploading to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, cache: Mutex::new(HashMap::new()) }
    }

    /// Stages every input of `jobs` given as a local path (relative paths
    /// are resolved against the current folder). Inputs already staged are
    /// left as they are. On error, the jobs may be partly staged; what was
    /// uploaded stays (it is content-addressed, so harmless).
    pub async fn stage(&self, jobs: &mut [JobSpec]) -> Result<(), StageError> {
        // Files already in the store, by digest, within this call.
        let mut present: HashSet<String> = HashSet::new();
        // Per distinct path in this call: its staged form.
        let mut done: HashMap<PathBuf, (String, u64)> = HashMap::new();
        // Jobs without inputs are only read: a write would box their
        // options (see `Opts`).
        for job in jobs.iter_mut().filter(|j| !j.opts.inputs.is_empty()) {
            for input in &mut job.opts.inputs {
                let InputSource::Path(path) = &input.source else { continue };
                let staged = match done.get(path) {
                    Some(s) => s.clone(),
                    None => {
                        let s = self.stage_file(path, &mut present).await.map_err(|reason| StageError::Input {
                            name: input.name.clone(),
                            path: path.display().to_string(),
                            reason: Box::new(reason),
                        })?;
                        done.insert(path.clone(), s.clone());
                        s
                    }
                };
                let (sha256, size) = staged;
                let key = cas_key(&sha256)?.as_str().to_owned();
                input.source = InputSource::Object { key, size, sha256 };
            }
        }
        Ok(())
    }

    async fn stage_file(&self, path: &Path, present: &mut HashSet<String>) -> Result<(String, u64), StageError> {
        let canonical = std::fs::canonicalize(path).map_err(|e| StageError::io("cannot resolve the path", e))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| StageError::io("cannot read the file", e))?;
        if !meta.is_file() {
            return Err(StageError::Invalid("not a regular file".to_owned()));
        }
        let id = FileId {
            path: canonical.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        };
        let cached = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned();
        let (digest, size) = match cached {
            Some(c) => c,
            None => hash_file(&canonical).await?,
        };
        if !present.contains(&digest) {
            let key = cas_key(&digest)?;
            if !holds(self.store.as_ref(), &key, &digest, size).await? {
                tracing::debug!(path = %canonical.display(), %key, size, "uploading an input");
                upload_checked(self.store.as_ref(), &key, &canonical, Some((&digest, size))).await?;
            }
            present.insert(digest.clone());
        }
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).insert(id, (digest.clone(), size));
        Ok((digest, size))
    }
}

/// Whether the store holds `key` with exactly the content `sha256` of
/// `size` bytes. The size comes first (a `head`, cheap); an object of the
/// right size is then read and hashed, so that one of the same size but
/// other bytes (damaged, or written by someone else) is not taken for the
/// input and is uploaded over.
async fn holds(store: &dyn Store, key: &StoreKey, sha256: &str, size: u64) -> Result<bool, StageError> {
    match store.head(key).await {
        Ok(m) if m.size == size => {}
        Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let mut stream = match store.get(key).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        got += chunk.len() as u64;
        if got > size {
            break;
        }
        hasher.update(&chunk);
    }
    let same = got == size && hex(&hasher.finalize()) == sha256;
    if !same {
        tracing::warn!(%key, "the store's object has the size of the input but other content: uploading the input over it");
    }
    Ok(same)
}

// ---------------------------------------------------------------------------
// Outputs

/// One segment of an output pattern.
#[derive(Debug, PartialEq, Eq)]
enum Seg<'a> {
    /// `**`: any number of folders (zero included).
    Any,
    /// A name, possibly with `*` and `?`.
    Name(&'a str),
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// True when `pattern` has no wildcard: it names one file, which a
/// succeeded job must produce.
pub fn is_literal(pattern: &str) -> bool {
    !has_wildcard(pattern)
}

/// Matches one name against a segment pattern with `*` (any run of
/// characters) and `?` (one character).
fn segment_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The regular files under `root` matched by `patterns` (checked relative
/// paths; see [`JobOptions::outputs`](crate::job::JobOptions::outputs)), as sorted relative paths, and the
/// literal patterns that matched nothing. Symbolic links are neither
/// followed nor matched, so nothing outside `root` is ever matched.
pub fn expand_outputs(root: &Path, patterns: &[String]) -> Result<(Vec<String>, Vec<String>), StageError> {
    let mut found = BTreeSet::new();
    let mut missing = Vec::new();
    for pattern in patterns {
        check_relative_path(pattern).map_err(|e| StageError::Invalid(format!("output {pattern:?}: {e}")))?;
        let segs: Vec<Seg<'_>> = pattern.split('/').map(|s| if s == "**" { Seg::Any } else { Seg::Name(s) }).collect();
        let mut hit = false;
        expand(root, &mut Vec::new(), &segs, &mut found, &mut hit)?;
        if !hit && is_literal(pattern) {
            missing.push(pattern.clone());
        }
    }
    Ok((found.into_iter().collect(), missing))
}

fn expand(
    dir: &Path,
    rel: &mut Vec<String>,
    pat: &[Seg<'_>],
    out: &mut BTreeSet<String>,
    hit: &mut bool,
) -> Result<(), StageError> {
    let Some((first, rest)) = pat.split_first() else { return Ok(()) };
    let entries = |dir: &Path| -> Result<Vec<(String, std::fs::FileType)>, StageError> {
        let read = match std::fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StageError::io(format!("cannot list {}", dir.display()), e)),
        };
        let mut v = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| StageError::io(format!("cannot list {}", dir.display()), e))?;
            // Names that are not UTF-8 cannot be store keys; skip them.
            let Ok(name) = entry.file_name().into_string() else { continue };
            let kind = entry.file_type().map_err(|e| StageError::io(format!("cannot inspect {name}"), e))?;
            v.push((name, kind));
        }
        Ok(v)
    };
    match first {
        Seg::Any => {
            // Zero folders, then one more folder and `**` again.
            if rest.is_empty() {
                // `**` at the end: every file below.
                for (name, kind) in entries(dir)? {
                    rel.push(name.clone());
                    if kind.is_file() {
                        out.insert(rel.join("/"));
                    } else if kind.is_dir() {
                        expand(&dir.join(&name), rel, pat, out, hit)?;
                    }
                    rel.pop();
                }
                return Ok(());
            }
            expand(dir, rel, rest, out, hit)?;
            for (name, kind) in entries(dir)? {
                if kind.is_dir() {
                    rel.push(name.clone());
                    expand(&dir.join(&name), rel, pat, out, hit)?;
                    rel.pop();
                }
            }
        }
        Seg::Name(p) if !has_wildcard(p) => {
            // A literal segment: look it up directly (no listing of a big
            // working folder), without following a symbolic link.
            let path = dir.join(p);
            let Ok(meta) = std::fs::symlink_metadata(&path) else { return Ok(()) };
            rel.push((*p).to_owned());
            if rest.is_empty() {
                if meta.is_file() {
                    out.insert(rel.join("/"));
                    *hit = true;
                }
            } else if meta.is_dir() {
                expand(&path, rel, rest, out, hit)?;
            }
            rel.pop();
        }
        Seg::Name(p) => {
            for (name, kind) in entries(dir)? {
                if !segment_matches(p, &name) {
                    continue;
                }
                rel.push(name.clone());
                if rest.is_empty() {
                    if kind.is_file() {
                        out.insert(rel.join("/"));
                    }
                } else if kind.is_dir() {
                    expand(&dir.join(&name), rel, rest, out, hit)?;
                }
                rel.pop();
            }
        }
    }
    Ok(())
}

/// Reads a whole small object (at most `limit` bytes).
pub async fn read_small(store: &dyn Store, key: &StoreKey, limit: usize) -> Result<Vec<u8>, StageError> {
    let mut stream = store.get(key).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > limit {
            return Err(StageError::Invalid(format!("{key} is larger than {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Manifests read at once by [`latest_manifest_named`].
const MANIFEST_READS: usize = 16;

/// The manifest of the highest attempt of the job named `name` with the
/// highest id (the last sent, as the daemon means a name), or `None` when
/// no manifest in the store names it. Lists every object under `jobs/`
/// and reads the latest manifest of each job: a cost that grows with the
/// store, for a command run by hand.
pub async fn latest_manifest_named(store: &dyn Store, name: &str) -> Result<Option<Manifest>, StageError> {
    let prefix = StoreKey::new("jobs")?;
    let listed = match store.list(&prefix).await {
        Ok(l) => l,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // The highest attempt of every job that wrote a manifest.
    let mut latest: HashMap<u64, u32> = HashMap::new();
    for meta in &listed {
        let Some(rest) = meta.key.as_str().strip_prefix("jobs/") else { continue };
        let mut parts = rest.split('/');
        let (Some(id), Some(attempt), Some(MANIFEST_FILE), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let (Ok(id), Ok(attempt)) = (id.parse::<u64>(), attempt.parse::<u32>()) {
            let best = latest.entry(id).or_insert(attempt);
            *best = (*best).max(attempt);
        }
    }
    let reads = futures::stream::iter(latest.into_iter().map(|(id, attempt)| async move {
        let key = manifest_key(JobId(id), attempt)?;
        let bytes = read_small(store, &key, MANIFEST_MAX).await?;
        Manifest::from_bytes(&bytes, &key, JobId(id), attempt)
    }))
    .buffer_unordered(MANIFEST_READS);
    let mut reads = std::pin::pin!(reads);
    let mut found: Option<Manifest> = None;
    while let Some(read) = reads.next().await {
        let manifest = read?;
        if manifest.name.as_deref() == Some(name) && found.as_ref().is_none_or(|f| f.id.0 < manifest.id.0) {
            found = Some(manifest);
        }
    }
    Ok(found)
}

/// The manifest of the highest attempt of job `id` found in the store, or
/// `None` when no attempt of it wrote one.
pub async fn latest_manifest(store: &dyn Store, id: JobId) -> Result<Option<Manifest>, StageError> {
    let prefix = StoreKey::new(format!("jobs/{id}"))?;
    let listed = match store.list(&prefix).await {
        Ok(l) => l,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let attempt = listed
        .iter()
        .filter_map(|m| {
            let rest = m.key.as_str().strip_prefix(prefix.as_str())?.strip_prefix('/')?;
            let (attempt, file) = rest.split_once('/')?;
            (file == MANIFEST_FILE).then(|| attempt.parse::<u32>().ok()).flatten()
        })
        .max();
    let Some(attempt) = attempt else { return Ok(None) };
    let key = manifest_key(id, attempt)?;
    let bytes = read_small(store, &key, MANIFEST_MAX).await?;
    Ok(Some(Manifest::from_bytes(&bytes, &key, id, attempt)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::job::Input;
    use crate::store::LocalStore;

    fn store(dir: &Path) -> Arc<dyn Store> {
        Arc::new(LocalStore::new(dir.join("store")).unwrap())
    }

    #[test]
    fn segments_match_like_a_shell() {
        assert!(segment_matches("*.csv", "a.csv"));
        assert!(segment_matches("*", ".hidden"));
        assert!(segment_matches("a?c", "abc"));
        assert!(!segment_matches("a?c", "ac"));
        assert!(segment_matches("a*b*c", "aXXbYYc"));
        assert!(!segment_matches("a*b*c", "aXXbYY"));
        assert!(segment_matches("**", "x"));
    }

    #[tokio::test]
    async fn stage_dedups_and_skips_what_the_store_has() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = dir.path().join("data.bin");
        std::fs::write(&data, vec![7u8; 3 * CHUNK + 5]).unwrap();
        let mut jobs: Vec<JobSpec> = (0..20)
            .map(|i| {
                let mut j = JobSpec::shell("true");
                j.opts.inputs.push(Input::path(format!("in{i}.bin"), &data));
                j
            })
            .collect();
        let stager = Stager::new(Arc::clone(&s));
        stager.stage(&mut jobs).await.unwrap();
        let listed = s.list(&StoreKey::new("cas").unwrap()).await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let (digest, size) = hash_file(&data).await.unwrap();
        for j in &jobs {
            assert_eq!(
                j.opts.inputs[0].source,
                InputSource::Object { key: format!("{CAS_PREFIX}/{digest}"), size, sha256: digest.clone() }
            );
            assert!(j.unstaged_input().is_none());
        }
        // A download checks size and digest.
        let dest = dir.path().join("copy");
        download_verified(s.as_ref(), &cas_key(&digest).unwrap(), &digest, size, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&data).unwrap());
    }

    #[tokio::test]
    async fn an_object_of_the_same_size_but_other_content_is_not_taken_for_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = dir.path().join("data.bin");
        std::fs::write(&data, b"the real input").unwrap();
        let (digest, size) = hash_file(&data).await.unwrap();
        let key = cas_key(&digest).unwrap();
        // Same length, other bytes, already at the input's key.
        s.put_bytes(&key, Bytes::from_static(b"a forged input")).await.unwrap();
        assert_eq!(s.head(&key).await.unwrap().size, size);
        assert!(!holds(s.as_ref(), &key, &digest, size).await.unwrap());
        let mut jobs = vec![JobSpec::shell("true")];
        jobs[0].opts.inputs.push(Input::path("in", &data));
        Stager::new(Arc::clone(&s)).stage(&mut jobs).await.unwrap();
        assert_eq!(read_small(s.as_ref(), &key, 100).await.unwrap(), b"the real input");
        assert!(holds(s.as_ref(), &key, &digest, size).await.unwrap());
        // A shorter or missing object is not it either.
        s.put_bytes(&key, Bytes::from_static(b"short")).await.unwrap();
        assert!(!holds(s.as_ref(), &key, &digest, size).await.unwrap());
        s.delete(&key).await.unwrap();
        assert!(!holds(s.as_ref(), &key, &digest, size).await.unwrap());
    }

    #[tokio::test]
    async fn a_truncated_or_tampered_manifest_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let id = JobId(9);
        let key = manifest_key(id, 2).unwrap();
        let manifest = Manifest {
            v: MANIFEST_FORMAT,
            id,
            name: Some("fit".to_owned()),
            attempt: 2,
            status: Status::Succeeded,
            objects: vec![StoredObject {
                name: "out/a.txt".to_owned(),
                key: "jobs/9/2/outputs/out/a.txt".to_owned(),
                size: 3,
                sha256: "ab".repeat(32),
            }],
            sha256: None,
        };
        let bytes = manifest.to_bytes().unwrap();
        let read = Manifest::from_bytes(&bytes, &key, id, 2).unwrap();
        assert_eq!(read.objects, manifest.objects);
        s.put_bytes(&key, Bytes::from(bytes.clone())).await.unwrap();
        assert_eq!(latest_manifest(s.as_ref(), id).await.unwrap().unwrap().objects, manifest.objects);
        let refused = |b: &[u8], id: JobId, attempt: u32| match Manifest::from_bytes(b, &key, id, attempt) {
            Err(e) => e.to_string(),
            Ok(m) => panic!("a bad manifest was trusted: {m:?}"),
        };
        // Truncated: not a whole manifest.
        let e = refused(&bytes[..bytes.len() / 2], id, 2);
        assert!(e.contains("cannot be trusted") && e.contains("not a whole manifest"), "{e}");
        // Tampered: a size changed, the checksum no longer matches.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let e = refused(text.replace("\"size\": 3", "\"size\": 4").as_bytes(), id, 2);
        assert!(e.contains("checksum"), "{e}");
        // The checksum removed from a current-format manifest.
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v.as_object_mut().unwrap().remove("sha256");
        assert!(refused(&serde_json::to_vec(&v).unwrap(), id, 2).contains("no checksum"));
        // Another job's or attempt's manifest put in its place.
        assert!(refused(&bytes, JobId(10), 2).contains("names job 9 attempt 2"));
        assert!(refused(&bytes, id, 1).contains("names job 9 attempt 2"));
        // Resealed, but with an object outside the attempt's folder.
        let mut outside = manifest.clone();
        outside.objects[0].key = "cas/sha256/x".to_owned();
        assert!(refused(&outside.to_bytes().unwrap(), id, 2).contains("is not in jobs/9/2/outputs/"));
        let mut escape = manifest.clone();
        escape.objects[0].name = "../x".to_owned();
        escape.objects[0].key = "jobs/9/2/outputs/../x".to_owned();
        assert!(refused(&escape.to_bytes().unwrap(), id, 2).contains("object \"../x\""));
        // Through the store: the reader says which manifest and why.
        s.put_bytes(&key, Bytes::from(bytes[..bytes.len() - 5].to_vec())).await.unwrap();
        let e = latest_manifest(s.as_ref(), id).await.unwrap_err().to_string();
        assert!(e.contains("jobs/9/2/manifest.json") && e.contains("run the job again"), "{e}");
    }

    #[tokio::test]
    async fn empty_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let mut jobs = vec![JobSpec::shell("true")];
        jobs[0].opts.inputs.push(Input::path("e", &empty));
        Stager::new(Arc::clone(&s)).stage(&mut jobs).await.unwrap();
        let InputSource::Object { key, size, sha256 } = &jobs[0].opts.inputs[0].source else { panic!() };
        assert_eq!(*size, 0);
        let dest = dir.path().join("back");
        download_verified(s.as_ref(), &StoreKey::new(key.as_str()).unwrap(), sha256, 0, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"");
        let obj = upload_hashed(s.as_ref(), &StoreKey::new("o/e").unwrap(), &empty).await.unwrap();
        assert_eq!((obj.size, obj.sha256.as_str()), (0, sha256.as_str()));
    }

    #[tokio::test]
    async fn a_corrupt_object_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let key = StoreKey::new("x/y").unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        let obj = upload_hashed(s.as_ref(), &key, &src).await.unwrap();
        assert_eq!(obj.size, 5);
        s.put_bytes(&key, Bytes::from_static(b"hellO")).await.unwrap();
        let dest = dir.path().join("out");
        let err = download_verified(s.as_ref(), &key, &obj.sha256, obj.size, &dest).await.unwrap_err();
        assert!(matches!(err, StageError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        s.put_bytes(&key, Bytes::from_static(b"hello!")).await.unwrap();
        let err = download_verified(s.as_ref(), &key, &obj.sha256, obj.size, &dest).await.unwrap_err();
        assert!(matches!(err, StageError::Checksum { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "only store/ and src remain");
    }

    #[tokio::test]
    async fn a_file_changed_during_upload_leaves_no_object() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let src = dir.path().join("src");
        std::fs::write(&src, b"new content").unwrap();
        let (digest, _) = hash_file(&src).await.unwrap();
        let key = cas_key(&digest).unwrap();
        // As if it had been hashed before it changed.
        let err = upload_checked(s.as_ref(), &key, &src, Some(("0".repeat(64).as_str(), 11))).await.unwrap_err();
        assert!(matches!(err, StageError::Changed { .. }), "{err}");
        assert!(matches!(s.head(&key).await, Err(StoreError::NotFound { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn outputs_expand_inside_the_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir_all(root.join("fit/deep")).unwrap();
        std::fs::write(root.join("count.txt"), b"1").unwrap();
        std::fs::write(root.join("fit/a.rds"), b"1").unwrap();
        std::fs::write(root.join("fit/deep/b.rds"), b"1").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("fit/link.rds")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("fit/up")).unwrap();
        let pats = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let (found, missing) = expand_outputs(&root, &pats(&["fit/*", "count.txt", "none.txt", "x/*"])).unwrap();
        assert_eq!(found, ["count.txt", "fit/a.rds"]);
        assert_eq!(missing, ["none.txt"]);
        let (found, _) = expand_outputs(&root, &pats(&["**"])).unwrap();
        assert_eq!(found, ["count.txt", "fit/a.rds", "fit/deep/b.rds"]);
        let (found, _) = expand_outputs(&root, &pats(&["**/*.rds", "fit/up/secret"])).unwrap();
        assert_eq!(found, ["fit/a.rds", "fit/deep/b.rds"]);
        let (_, missing) = expand_outputs(&root, &pats(&["fit/link.rds"])).unwrap();
        assert_eq!(missing, ["fit/link.rds"]);
        for bad in ["../secret", "/etc/passwd", "a/../../b"] {
            assert!(expand_outputs(&root, &pats(&[bad])).is_err(), "{bad}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn destinations_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        assert_eq!(prepare_dest(&root, "a/b/c.txt").unwrap(), root.join("a/b/c.txt"));
        assert!(root.join("a/b").is_dir());
        for bad in ["../x", "/abs", "a/../../b", "up/x", ""] {
            assert!(prepare_dest(&root, bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_name_finds_the_latest_manifest_of_the_last_job_so_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let write = |id: u64, attempt: u32, name: Option<&str>| {
            let store = Arc::clone(&store);
            let manifest = Manifest {
                v: MANIFEST_FORMAT,
                id: JobId(id),
                name: name.map(str::to_owned),
                attempt,
                status: Status::Succeeded,
                objects: Vec::new(),
                sha256: None,
            };
            async move {
                let bytes = manifest.to_bytes().unwrap();
                store.put_bytes(&manifest_key(JobId(id), attempt).unwrap(), bytes.into()).await.unwrap();
            }
        };
        assert!(latest_manifest_named(store.as_ref(), "fit").await.unwrap().is_none());
        write(1, 1, Some("fit")).await;
        write(2, 1, Some("plot")).await;
        write(2, 2, Some("plot")).await;
        write(3, 1, Some("fit")).await;
        write(4, 1, None).await;
        // An older manifest, without a name, still parses.
        store
            .put_bytes(
                &manifest_key(JobId(5), 1).unwrap(),
                Bytes::from_static(br#"{"v":1,"id":5,"attempt":1,"status":"succeeded","objects":[]}"#),
            )
            .await
            .unwrap();
        store.put_bytes(&StoreKey::new("jobs/3/1/outputs/manifest.json").unwrap(), Bytes::new()).await.unwrap();
        let fit = latest_manifest_named(store.as_ref(), "fit").await.unwrap().unwrap();
        assert_eq!((fit.id, fit.attempt), (JobId(3), 1));
        let plot = latest_manifest_named(store.as_ref(), "plot").await.unwrap().unwrap();
        assert_eq!((plot.id, plot.attempt), (JobId(2), 2));
        assert!(latest_manifest_named(store.as_ref(), "other").await.unwrap().is_none());
        assert_eq!(latest_manifest(store.as_ref(), JobId(5)).await.unwrap().unwrap().name, None);
    }
}
