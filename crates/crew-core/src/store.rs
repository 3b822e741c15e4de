//! The `Store` trait: where job inputs, outputs and large logs live.
//!
//! Keys are crew-relative ([`StoreKey`], e.g. `jobs/17/1/stdout`); a store
//! maps them under its own root or prefix, and a key can never name anything
//! outside it. Data is streamed both ways so that neither the controller nor
//! an agent holds a whole object in memory (DESIGN.md, principle 3).
//!
//! The local store ([`LocalStore`]) is a thin layer over `object_store`'s
//! local file system, so that it behaves like the S3 store that arrives with
//! its own crate.
//!
//! Stores are opened by URL at run time ([`open_store`]): a
//! [`StoreRegistry`] maps URL schemes to constructors. `crew-core` registers
//! only `file`; a binary linking a backend crate registers that backend's
//! scheme, so `crew-core` never depends on a cloud SDK.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A validated, crew-relative object key: `/`-separated segments, each
/// non-empty, not `.` or `..`, without control characters or backslashes, and
/// no leading `/`. Construction is the only place keys are checked, so every
/// `StoreKey` in the program is safe to join under a store's prefix.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(String);

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({:?})", self.0)
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest key accepted, in bytes (S3's limit is 1024 including the prefix).
pub const KEY_MAX_LEN: usize = 900;

impl StoreKey {
    /// Validates `key`.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        let bad = |reason: &str| StoreError::InvalidKey { key: key.clone(), reason: reason.to_owned() };
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        if key.len() > KEY_MAX_LEN {
            return Err(bad("the key is longer than 900 bytes"));
        }
        if key.starts_with('/') {
            return Err(bad("the key is absolute (starts with /)"));
        }
        for seg in key.split('/') {
            if seg.is_empty() {
                return Err(bad("the key has an empty segment (// or a trailing /)"));
            }
            if seg == "." || seg == ".." {
                return Err(bad("the key has a . or .. segment"));
            }
            if seg.chars().any(|c| c.is_control() || c == '\\') {
                return Err(bad("the key has a control character or a backslash"));
            }
        }
        Ok(Self(key))
    }

    /// The key of a child: `self/segment`, validated.
    pub fn child(&self, segment: &str) -> Result<Self, StoreError> {
        Self::new(format!("{}/{}", self.0, segment))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a store knows of one object. Built with [`ObjectMeta::new`] and the
/// `with_` methods (it may grow fields).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectMeta {
    /// The object's key.
    pub key: StoreKey,
    /// Its size in bytes.
    pub size: u64,
    /// An opaque version tag (ETag or equivalent) when the backend has one.
    pub e_tag: Option<String>,
    /// When the object was last written, when the backend says (`list`,
    /// `head` and `get_file` do; puts do not).
    pub last_modified: Option<std::time::SystemTime>,
}

impl ObjectMeta {
    /// An object of `size` bytes at `key`, with no version tag or time.
    #[must_use]
    pub fn new(key: StoreKey, size: u64) -> Self {
        Self { key, size, e_tag: None, last_modified: None }
    }

    /// With its version tag (ETag), when the backend has one.
    #[must_use]
    pub fn with_e_tag(mut self, e_tag: Option<String>) -> Self {
        self.e_tag = e_tag;
        self
    }

    /// With the time it was last written, when the backend says.
    #[must_use]
    pub fn with_last_modified(mut self, at: Option<std::time::SystemTime>) -> Self {
        self.last_modified = at;
        self
    }
}

/// A stream of object bytes, as returned by [`Store::get`].
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

/// Errors of store operations. Backend errors are carried as text tagged with
/// the backend's name, so that callers match on meaning, not on a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The key is not acceptable (would escape the prefix, is malformed).
    #[error("invalid store key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No object under that key.
    #[error("no object {key} in the store")]
    NotFound {
        /// The missing key.
        key: String,
    },
    /// The store URL or configuration is not usable.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The backend refused our credentials.
    #[error("the {backend} store refused the credentials: {message}")]
    Unauthenticated {
        /// Which backend.
        backend: &'static str,
        /// What it said.
        message: String,
    },
    /// A local I/O error (reading a file to upload, writing a download).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Any other backend failure.
    #[error("{backend} store: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What happened.
        message: String,
        /// True when trying again may succeed (throttling, 5xx, a dropped
        /// connection).
        retryable: bool,
    },
}

impl StoreError {
    /// True when the same request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Backend { retryable: true, .. })
    }
}

/// Where crew keeps job data: a local folder or an object store bucket.
///
/// # Contract
/// - Keys are [`StoreKey`]s and are mapped under the store's own root or
///   prefix; nothing outside it can be read, written or deleted through the
///   trait.
/// - `put_file` and `put_stream` are atomic for readers: an object is either
///   absent, the old version, or the whole new one, never partial.
/// - `get` streams; implementations must not buffer a whole object.
/// - `list` returns every object whose key starts with `prefix/` (a whole
///   segment prefix), in no particular order.
/// - `delete` of a missing key succeeds (idempotent).
/// - `check` (provided) succeeds only when the store can be written, read
///   and deleted from, leaves nothing behind, and otherwise fails with an
///   error that says how to fix the setup.
///
/// # Cancellation
/// Any returned future may be dropped; a dropped `put_*` leaves no visible
/// object.
///
/// # Security
/// Implementations never log credentials; `Debug` shows the URL only.
///
/// # Implementing
/// Run `crew_core::conformance::store` (feature `conformance`) against your
/// implementation in your own tests; `LocalStore` does.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// The URL another process (an agent on a worker) uses to open the same
    /// store, e.g. `file:///abs/path` or `s3://bucket/prefix`.
    fn url(&self) -> String;

    /// Uploads the file at `path` to `key`, streaming it.
    async fn put_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError>;

    /// Uploads a stream of bytes to `key`.
    async fn put_stream(&self, key: &StoreKey, data: ByteStream) -> Result<ObjectMeta, StoreError>;

    /// Uploads a small object from memory.
    async fn put_bytes(&self, key: &StoreKey, data: Bytes) -> Result<ObjectMeta, StoreError>;

    /// Streams the object at `key`.
    async fn get(&self, key: &StoreKey) -> Result<ByteStream, StoreError>;

    /// Downloads the object at `key` into the file at `path` (created or
    /// truncated), streaming.
    async fn get_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError>;

    /// The object's metadata.
    async fn head(&self, key: &StoreKey) -> Result<ObjectMeta, StoreError>;

    /// Every object under `prefix/`.
    async fn list(&self, prefix: &StoreKey) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Deletes the object at `key`; succeeds when it is already absent.
    async fn delete(&self, key: &StoreKey) -> Result<(), StoreError>;

    /// Proves that the store is usable for crew before anything depends on
    /// it: by default it writes a tiny probe object under [`CHECK_PREFIX`]
    /// (`.crew/check/<random>`), reads it back, compares, and deletes it.
    ///
    /// Front ends call it before accepting any job (`crew run`, the
    /// daemon's start), so that a missing bucket, refused credentials or an
    /// unreachable endpoint is one clear line and not a failure in the middle
    /// of a run.
    ///
    /// # Errors
    /// The error of the step that failed. Its text must say what is wrong
    /// *and how to fix it* (`bucket X does not exist: create it or fix
    /// --store`, `cannot reach the S3 endpoint URL: ...`). Backends override
    /// this method to sharpen the messages or to bound its time (a check
    /// should answer within seconds, not retry for minutes).
    async fn check(&self) -> Result<(), StoreError> {
        check_by_probe(self).await
    }
}

/// Where [`Store::check`] writes its probe objects (a reserved prefix: crew
/// never writes anything else under it).
pub const CHECK_PREFIX: &str = ".crew/check";

/// The default [`Store::check`]: put, read back, compare and delete one
/// small probe object under [`CHECK_PREFIX`]. Public so that a backend that
/// overrides `check` (to bound its time, or to explain its errors better) can
/// still run the same probe.
///
/// # Errors
/// The first failing step's error; a probe that reads back other bytes is a
/// [`StoreError::Backend`].
pub async fn check_by_probe<S: Store + ?Sized>(store: &S) -> Result<(), StoreError> {
    let random = getrandom::u64().map_err(|e| StoreError::Io {
        context: "cannot draw a random name for the store check".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let key = StoreKey::new(format!("{CHECK_PREFIX}/{random:016x}"))?;
    let body = Bytes::from(format!("crew store check {random:016x}\n"));
    store.put_bytes(&key, body.clone()).await?;
    let mut stream = store.get(&key).await?;
    let mut read = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        read.extend_from_slice(&chunk?);
        if read.len() > body.len() {
            break;
        }
    }
    store.delete(&key).await?;
    if read != body {
        return Err(StoreError::Backend {
            backend: "store check",
            message: format!(
                "the probe object {key} read back {} bytes that differ from the {} written: the store \
                 does not return what was stored",
                read.len(),
                body.len()
            ),
            retryable: false,
        });
    }
    Ok(())
}

/// The file at `path` as a stream of chunks of up to 1 MiB, for uploading it
/// to `key` (named in errors): the `put_file` of a backend that uploads
/// streams. Opening happens now, so a missing file fails before any request.
pub async fn file_chunks(
    key: &StoreKey,
    path: &Path,
) -> Result<impl futures::Stream<Item = Result<Bytes, StoreError>> + Send + 'static, StoreError> {
    let file = tokio::fs::File::open(path).await.map_err(|source| StoreError::Io {
        context: format!("cannot open {} to upload it to {key}", path.display()),
        source,
    })?;
    let context = format!("cannot read {} to upload it to {key}", path.display());
    Ok(futures::stream::try_unfold(file, move |mut file| {
        let context = context.clone();
        async move {
            let mut buf = BytesMut::with_capacity(FILE_READ_CHUNK);
            while buf.len() < FILE_READ_CHUNK {
                let n = file
                    .read_buf(&mut buf)
                    .await
                    .map_err(|source| StoreError::Io { context: context.clone(), source })?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() { Ok(None) } else { Ok(Some((buf.freeze(), file))) }
        }
    }))
}

/// Writes the object `key`'s bytes (`stream`) to the file at `path`,
/// created or truncated, through a 1 MiB buffer: the `get_file` of a backend
/// that downloads streams. Call it once the object is known to exist, so a
/// missing object leaves an existing file alone.
pub async fn write_file<S>(key: &StoreKey, stream: S, path: &Path) -> Result<(), StoreError>
where
    S: futures::Stream<Item = Result<Bytes, StoreError>> + Send,
{
    let write_error =
        |source| StoreError::Io { context: format!("cannot write {} (downloading {key})", path.display()), source };
    let file = tokio::fs::File::create(path).await.map_err(write_error)?;
    let mut out = tokio::io::BufWriter::with_capacity(FILE_WRITE_BUFFER, file);
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?).await.map_err(write_error)?;
    }
    out.flush().await.map_err(write_error)
}

// ---------------------------------------------------------------------------
// The local store
// ---------------------------------------------------------------------------

/// Name of the local backend in [`StoreError`]s.
const LOCAL: &str = "local";

/// Size of the parts [`LocalStore`] hands to `object_store`'s multipart
/// upload: the most one upload holds in memory per part in flight.
const UPLOAD_PART_SIZE: usize = 5 * 1024 * 1024;

/// Parts of one upload in flight at once; with [`UPLOAD_PART_SIZE`] this
/// bounds the memory of an upload whatever the object's size.
const UPLOAD_CONCURRENCY: usize = 2;

/// How much `put_file` reads from the source file at a time.
const FILE_READ_CHUNK: usize = 1024 * 1024;

/// Buffer of `get_file` between the object stream and the file.
const FILE_WRITE_BUFFER: usize = 1024 * 1024;

/// A store in a folder of the local file system, over `object_store`'s
/// `LocalFileSystem` so that it behaves like the object-store backends:
/// uploads are staged and renamed into place (atomic for readers), listing
/// hides unfinished uploads, and empty folders disappear with their last
/// object.
///
/// # Layout on disk
/// Each key segment is one path component, percent-encoded the way
/// `object_store::path::Path` encodes a segment (`%`, `#`, `?`, non-ASCII
/// characters and a few others become `%XX`), so that no odd byte of a key
/// ever reaches the file system and a key can never be mistaken for one of
/// `object_store`'s staging files (`name#1`). Listing decodes the names again;
/// files that no key encodes to (put there by hand) are skipped.
///
/// Because a folder cannot also be a file, the store cannot hold both `a` and
/// `a/b` at once (an object store can); crew's key layout never needs that.
///
/// # Security
/// Besides [`StoreKey`]'s checks, every operation first resolves the deepest
/// existing ancestor of its target and refuses it if it lies outside the root
/// (a symbolic link in the store folder pointing elsewhere), since
/// `LocalFileSystem` follows symbolic links. This check and the operation are
/// not one atomic step: whoever can write symbolic links into the store folder
/// while crew runs is trusted.
#[derive(Clone)]
pub struct LocalStore {
    /// The canonical, absolute root folder.
    root: PathBuf,
    inner: Arc<LocalFileSystem>,
}

impl fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStore").field("url", &self.url()).finish()
    }
}

impl LocalStore {
    /// Opens the store in the folder `root`, creating the folder (and its
    /// parents) if needed. A relative `root` is resolved against the current
    /// directory.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the folder cannot be created or resolved,
    /// [`StoreError::Config`] when its absolute path is not valid UTF-8 (it
    /// could not be written as a URL for agents) or `object_store` refuses it.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref();
        std::fs::create_dir_all(root).map_err(|source| StoreError::Io {
            context: format!("cannot create the store folder {}", root.display()),
            source,
        })?;
        let root = std::fs::canonicalize(root).map_err(|source| StoreError::Io {
            context: format!("cannot resolve the store folder {}", root.display()),
            source,
        })?;
        if root.to_str().is_none() {
            return Err(StoreError::Config(format!("the store folder {} is not valid UTF-8", root.display())));
        }
        let inner = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| StoreError::Config(format!("cannot open the store folder {}: {e}", root.display())))?
            .with_automatic_cleanup(true);
        Ok(Self { root, inner: Arc::new(inner) })
    }

    /// Opens the store named by a `file://` URL, as returned by
    /// [`Store::url`]: `file:///abs/path` or `file://localhost/abs/path`,
    /// percent-encoded.
    ///
    /// # Errors
    /// [`StoreError::Config`] when `url` is not such a URL, else as
    /// [`LocalStore::new`].
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        Self::new(file_url_to_path(url)?)
    }

    /// The canonical, absolute root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuses `target` (an absolute path under the root) when its deepest
    /// existing ancestor, `target` itself included, resolves outside the root.
    async fn check_inside_root(&self, key: &StoreKey, target: PathBuf) -> Result<(), StoreError> {
        let root = self.root.clone();
        let key = key.as_str().to_owned();
        tokio::task::spawn_blocking(move || resolves_inside(&root, &target, &key)).await.map_err(|e| {
            StoreError::Backend {
                backend: LOCAL,
                message: format!("the symbolic link check did not finish: {e}"),
                retryable: false,
            }
        })?
    }

    /// The object_store location of `key`, checked against symbolic links
    /// leading out of the root. `whole` checks the target itself too (reads,
    /// writes), otherwise only its folder (delete, which removes a link
    /// without following it).
    async fn location(&self, key: &StoreKey, whole: bool) -> Result<ObjPath, StoreError> {
        let location = key_to_location(key);
        let fs_path = self.inner.path_to_filesystem(&location).map_err(|e| backend_error("resolve", key, e))?;
        let target = if whole {
            fs_path
        } else {
            match fs_path.parent() {
                Some(parent) => parent.to_path_buf(),
                None => fs_path,
            }
        };
        self.check_inside_root(key, target).await?;
        Ok(location)
    }

    /// Streams `data` into a multipart upload to `key`; aborts the upload
    /// (leaving no object) when `data` fails.
    async fn upload<S>(&self, key: &StoreKey, data: S) -> Result<ObjectMeta, StoreError>
    where
        S: futures::Stream<Item = Result<Bytes, StoreError>> + Send,
    {
        let location = self.location(key, true).await?;
        let upload = self.inner.put_multipart(&location).await.map_err(|e| backend_error("put", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_SIZE);
        let mut size: u64 = 0;
        let mut data = std::pin::pin!(data);
        while let Some(chunk) = data.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    abort_upload(writer, key).await;
                    return Err(e);
                }
            };
            if let Err(e) = writer.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                abort_upload(writer, key).await;
                return Err(backend_error("put", key, e));
            }
            size += chunk.len() as u64;
            writer.put(chunk);
        }
        let done = writer.finish().await.map_err(|e| backend_error("put", key, e))?;
        Ok(ObjectMeta::new(key.clone(), size).with_e_tag(done.e_tag))
    }
}

/// Aborts a failed upload; its own failure is only logged, the caller reports
/// the error that caused the abort.
async fn abort_upload(writer: WriteMultipart, key: &StoreKey) {
    if let Err(e) = writer.abort().await {
        tracing::warn!(%key, error = %e, "could not clean up an aborted upload");
    }
}

#[async_trait]
impl Store for LocalStore {
    fn url(&self) -> String {
        path_to_file_url(&self.root)
    }

    async fn put_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
        let chunks = file_chunks(key, path).await?;
        self.upload(key, chunks).await
    }

    async fn put_stream(&self, key: &StoreKey, data: ByteStream) -> Result<ObjectMeta, StoreError> {
        self.upload(key, data).await
    }

    async fn put_bytes(&self, key: &StoreKey, data: Bytes) -> Result<ObjectMeta, StoreError> {
        let location = self.location(key, true).await?;
        let size = data.len() as u64;
        let done = self.inner.put(&location, PutPayload::from(data)).await.map_err(|e| backend_error("put", key, e))?;
        Ok(ObjectMeta::new(key.clone(), size).with_e_tag(done.e_tag))
    }

    async fn get(&self, key: &StoreKey) -> Result<ByteStream, StoreError> {
        let location = self.location(key, true).await?;
        let found = self.inner.get(&location).await.map_err(|e| backend_error("get", key, e))?;
        let key = key.clone();
        Ok(found.into_stream().map_err(move |e| backend_error("read", &key, e)).boxed())
    }

    async fn get_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
        let location = self.location(key, true).await?;
        // Open the object before touching the destination, so that a missing
        // object leaves an existing file alone.
        let found = self.inner.get(&location).await.map_err(|e| backend_error("get", key, e))?;
        let meta = ObjectMeta::new(key.clone(), found.meta.size)
            .with_e_tag(found.meta.e_tag.clone())
            .with_last_modified(Some(found.meta.last_modified.into()));
        let stream = found.into_stream().map_err(|e| backend_error("read", key, e));
        write_file(key, stream, path).await?;
        Ok(meta)
    }

    async fn head(&self, key: &StoreKey) -> Result<ObjectMeta, StoreError> {
        let location = self.location(key, true).await?;
        let meta = self.inner.head(&location).await.map_err(|e| backend_error("head", key, e))?;
        Ok(ObjectMeta::new(key.clone(), meta.size)
            .with_e_tag(meta.e_tag)
            .with_last_modified(Some(meta.last_modified.into())))
    }

    async fn list(&self, prefix: &StoreKey) -> Result<Vec<ObjectMeta>, StoreError> {
        // The folder of the prefix is walked, so `jobs/1` never sees
        // `jobs/10/x`: segment-prefix semantics come with the layout.
        let location = self.location(prefix, true).await?;
        let listed: Vec<object_store::ObjectMeta> =
            self.inner.list(Some(&location)).try_collect().await.map_err(|e| backend_error("list", prefix, e))?;
        let root = self.root.clone();
        let inner = Arc::clone(&self.inner);
        let prefix_for_task = prefix.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::with_capacity(listed.len());
            for meta in listed {
                let Some(key) = location_to_key(&meta.location) else {
                    tracing::debug!(
                        location = %meta.location,
                        "skipping a file in the store folder that no key names"
                    );
                    continue;
                };
                let inside = inner
                    .path_to_filesystem(&meta.location)
                    .map_err(|e| backend_error("list", &prefix_for_task, e))
                    .and_then(|path| resolves_inside(&root, &path, key.as_str()));
                if let Err(e) = inside {
                    tracing::warn!(%key, error = %e, "skipping a listed object");
                    continue;
                }
                found.push(
                    ObjectMeta::new(key, meta.size)
                        .with_e_tag(meta.e_tag)
                        .with_last_modified(Some(meta.last_modified.into())),
                );
            }
            found
        })
        .await
        .map_err(|e| StoreError::Backend {
            backend: LOCAL,
            message: format!("list {prefix}: the listing task did not finish: {e}"),
            retryable: false,
        })
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), StoreError> {
        let location = self.location(key, false).await?;
        match self.inner.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => {
                // A folder (a prefix of other keys) is no object: deleting
                // it deletes nothing, as on an object store.
                let is_folder = match self.inner.path_to_filesystem(&location) {
                    Ok(path) => tokio::fs::symlink_metadata(path).await.is_ok_and(|m| m.is_dir()),
                    Err(_) => false,
                };
                if is_folder { Ok(()) } else { Err(backend_error("delete", key, e)) }
            }
        }
    }
}

/// Maps an `object_store` error of operation `op` on `key`: `NotFound` keeps
/// its meaning, everything else becomes a permanent backend error (the local
/// file system has no transient failures worth retrying blindly).
fn backend_error(op: &str, key: &StoreKey, error: object_store::Error) -> StoreError {
    match error {
        object_store::Error::NotFound { .. } => StoreError::NotFound { key: key.as_str().to_owned() },
        other => StoreError::Backend { backend: LOCAL, message: format!("{op} {key}: {other}"), retryable: false },
    }
}

/// Resolves the deepest existing ancestor of `target` (itself included), the
/// file of `key`, and fails when it lies outside `root`. Blocking.
fn resolves_inside(root: &Path, target: &Path, key: &str) -> Result<(), StoreError> {
    let mut probe = target;
    loop {
        match std::fs::canonicalize(probe) {
            Ok(resolved) if resolved.starts_with(root) => return Ok(()),
            Ok(resolved) => {
                return Err(StoreError::InvalidKey {
                    key: key.to_owned(),
                    reason: format!(
                        "{} leads outside the store folder (to {}) through a symbolic link",
                        probe.display(),
                        resolved.display()
                    ),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match probe.parent() {
                Some(parent) if parent.starts_with(root) => probe = parent,
                // Past the root: nothing under it exists yet, and the root
                // itself was resolved when the store was opened.
                _ => return Ok(()),
            },
            Err(source) => {
                return Err(StoreError::Io { context: format!("cannot resolve {}", probe.display()), source });
            }
        }
    }
}

/// The `object_store` location of a key: one percent-encoded path part per
/// segment (see [`LocalStore`], "Layout on disk").
fn key_to_location(key: &StoreKey) -> ObjPath {
    ObjPath::from(key.as_str())
}

/// The key a location encodes, or `None` when none does: a part that does not
/// decode, a decoded name [`StoreKey`] refuses, or a non-canonical encoding
/// (`%61` for `a`) that would alias another key.
fn location_to_key(location: &ObjPath) -> Option<StoreKey> {
    let mut segments = Vec::new();
    for part in location.parts() {
        let bytes = crate::percent::decode(part.as_ref())?;
        segments.push(String::from_utf8(bytes).ok()?);
    }
    let key = StoreKey::new(segments.join("/")).ok()?;
    (key_to_location(&key) == *location).then_some(key)
}

/// Whether `b` may appear unescaped in the path of a `file://` URL (RFC 3986
/// `pchar` and `/`, minus nothing that needs care).
fn is_url_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

/// `file://` followed by the absolute path `path`, percent-encoded.
fn path_to_file_url(path: &Path) -> String {
    let text = path.to_string_lossy();
    let mut url = String::with_capacity(text.len() + 7);
    url.push_str("file://");
    for &b in text.as_bytes() {
        if is_url_path_byte(b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// The absolute path a `file://` URL names.
fn file_url_to_path(url: &str) -> Result<PathBuf, StoreError> {
    let bad = |why: &str| StoreError::Config(format!("invalid file URL {url:?}: {why}"));
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("file") => rest,
        _ => return Err(bad("it does not start with file://")),
    };
    let path = match rest.find('/') {
        Some(0) => rest,
        Some(at) if rest[..at].eq_ignore_ascii_case("localhost") => &rest[at..],
        Some(_) => {
            return Err(bad("a file URL names a folder on this machine: file:///abs/path"));
        }
        None => return Err(bad("it has no absolute path: file:///abs/path")),
    };
    if path.contains(['?', '#']) {
        return Err(bad("it has a query or fragment (write ? as %3F, # as %23)"));
    }
    let bytes = crate::percent::decode(path).ok_or_else(|| bad("malformed %-escape"))?;
    let path = String::from_utf8(bytes).map_err(|_| bad("the path is not valid UTF-8"))?;
    if path.contains('\0') {
        return Err(bad("the path contains a NUL byte"));
    }
    Ok(PathBuf::from(path))
}

// ---------------------------------------------------------------------------
// Opening a store by URL
// ---------------------------------------------------------------------------

/// Builds a store from its URL (the whole URL, scheme included).
pub type StoreConstructor = Arc<dyn Fn(&str) -> Result<Arc<dyn Store>, StoreError> + Send + Sync>;

/// The store backends a build of crew knows, by URL scheme.
///
/// `crew-core` registers only `file` ([`LocalStore`]); a binary that links a
/// backend crate (S3, ...) registers its scheme at start-up, so `crew-core`
/// never depends on a cloud SDK:
///
/// ```
/// # use std::sync::Arc;
/// # use crew_core::store::{LocalStore, Store, StoreRegistry};
/// let mut stores = StoreRegistry::default();
/// stores.register("mem", |url: &str| {
///     // A real backend parses `url` here.
///     let _ = url;
///     Ok(Arc::new(LocalStore::new(std::env::temp_dir().join("crew-doc-mem"))?) as Arc<dyn Store>)
/// });
/// assert!(stores.schemes().any(|s| s == "mem"));
/// ```
#[derive(Clone)]
pub struct StoreRegistry {
    constructors: BTreeMap<String, StoreConstructor>,
}

impl fmt::Debug for StoreRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRegistry").field("schemes", &self.constructors.keys().collect::<Vec<_>>()).finish()
    }
}

impl Default for StoreRegistry {
    /// A registry with the backends of `crew-core`: `file`.
    fn default() -> Self {
        let mut registry = Self::empty();
        registry.register("file", |url: &str| Ok(Arc::new(LocalStore::from_url(url)?) as Arc<dyn Store>));
        registry
    }
}

impl StoreRegistry {
    /// A registry that knows no scheme.
    pub fn empty() -> Self {
        Self { constructors: BTreeMap::new() }
    }

    /// Registers (or replaces) the constructor of the URL scheme `scheme`
    /// (matched case-insensitively, given without `://`).
    pub fn register<F>(&mut self, scheme: &str, constructor: F) -> &mut Self
    where
        F: Fn(&str) -> Result<Arc<dyn Store>, StoreError> + Send + Sync + 'static,
    {
        self.constructors.insert(scheme.to_ascii_lowercase(), Arc::new(constructor));
        self
    }

    /// The registered schemes, in order.
    pub fn schemes(&self) -> impl Iterator<Item = &str> {
        self.constructors.keys().map(String::as_str)
    }

    /// Opens the store `url` names: `scheme://...` goes to the scheme's
    /// constructor; anything without a scheme is a local folder (relative
    /// paths are resolved against the current directory) and goes to the
    /// `file` constructor as a `file://` URL.
    ///
    /// # Errors
    /// [`StoreError::Config`] for an empty URL or a scheme this registry does
    /// not know (the message lists the ones it does), else whatever the
    /// constructor returns.
    pub fn open(&self, url: &str) -> Result<Arc<dyn Store>, StoreError> {
        if url.is_empty() {
            return Err(StoreError::Config(
                "the store URL is empty: give a folder or a URL such as file:///abs/path".into(),
            ));
        }
        let (scheme, url) = match url_scheme(url) {
            Some(scheme) => (scheme.to_ascii_lowercase(), url.to_owned()),
            None => {
                let path = std::path::absolute(url).map_err(|source| StoreError::Io {
                    context: format!("cannot resolve the store folder {url}"),
                    source,
                })?;
                ("file".to_owned(), path_to_file_url(&path))
            }
        };
        match self.constructors.get(&scheme) {
            Some(constructor) => constructor(&url),
            None => Err(StoreError::Config(format!(
                "unsupported store URL scheme {scheme}:// in {url:?}; this build of crew \
                 supports {} (a plain path is a local folder)",
                self.supported()
            ))),
        }
    }

    /// The registered schemes as text for error messages.
    fn supported(&self) -> String {
        if self.constructors.is_empty() {
            return "no URL scheme".to_owned();
        }
        self.schemes().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ")
    }
}

/// The scheme of `url` when it starts with `scheme://` (RFC 3986 scheme
/// characters); `None` for a plain path. How [`StoreRegistry::open`] tells
/// a store URL from a folder, for front ends that must do the same (a
/// relative folder in a configuration file is relative to that file).
pub fn url_scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .then_some(scheme)
}

/// The registry of this process, used by [`open_store`].
fn process_registry() -> &'static std::sync::RwLock<StoreRegistry> {
    static REGISTRY: std::sync::OnceLock<std::sync::RwLock<StoreRegistry>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| std::sync::RwLock::new(StoreRegistry::default()))
}

/// Adds (or replaces) a URL scheme in this process's registry, the one
/// [`open_store`] uses, and so the one an agent uses to open the store URL
/// its controller sends. A binary linking a backend crate calls it once at
/// start-up (`crew` registers `s3` this way), before any store is opened.
pub fn register_scheme<F>(scheme: &str, constructor: F)
where
    F: Fn(&str) -> Result<Arc<dyn Store>, StoreError> + Send + Sync + 'static,
{
    let mut registry = process_registry().write().unwrap_or_else(std::sync::PoisonError::into_inner);
    registry.register(scheme, constructor);
}

/// Opens the store `url` names with this process's registry: the backends
/// of `crew-core` ([`StoreRegistry::default`]: `file:///abs/path` or a plain
/// path, a relative one resolved against the current directory) plus the
/// schemes added with [`register_scheme`].
///
/// # Errors
/// See [`StoreRegistry::open`].
pub fn open_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    // Cloned (a map of `Arc`s) so that no lock is held while a constructor
    // runs.
    let registry = process_registry().read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    registry.open(url)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// Every regular file and symbolic link under `dir`, recursively, not
    /// following links.
    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    fn key(s: &str) -> StoreKey {
        StoreKey::new(s).unwrap()
    }

    async fn read(store: &dyn Store, key: &StoreKey) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stream = store.get(key).await.unwrap();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn local_store_passes_the_conformance_kit() {
        let dir = tempdir();
        let store = LocalStore::new(dir.path().join("store")).unwrap();
        crate::conformance::store(&store).await;
        // The kit removed everything, folders included.
        assert!(walk(store.root()).is_empty());
    }

    #[tokio::test]
    async fn check_probes_and_leaves_nothing() {
        let dir = tempdir();
        let store = LocalStore::new(dir.path().join("store")).unwrap();
        store.check().await.unwrap();
        assert!(walk(store.root()).is_empty());
    }

    #[tokio::test]
    async fn new_creates_the_folder_and_url_names_it() {
        let dir = tempdir();
        let root = dir.path().join("a").join("b c");
        let store = LocalStore::new(&root).unwrap();
        assert!(root.is_dir());
        let canonical = std::fs::canonicalize(&root).unwrap();
        assert_eq!(store.root(), canonical);
        let url = store.url();
        assert!(url.starts_with("file:///"), "{url}");
        assert!(url.ends_with("/a/b%20c"), "{url}");
        assert_eq!(format!("{store:?}"), format!("LocalStore {{ url: {url:?} }}"));
    }

    #[tokio::test]
    async fn url_round_trips_through_open_store() {
        let dir = tempdir();
        let root = dir.path().join("odd name 100% #1 ?ü");
        let first = LocalStore::new(&root).unwrap();
        let url = first.url();
        let second = open_store(&url).unwrap();
        assert_eq!(second.url(), url);
        let k = key("jobs/1/stdout");
        first.put_bytes(&k, Bytes::from_static(b"shared")).await.unwrap();
        assert_eq!(read(second.as_ref(), &k).await, b"shared");
        // A plain absolute path opens the same store.
        let third = open_store(root.to_str().unwrap()).unwrap();
        assert_eq!(third.url(), url);
        // So does file://localhost/...
        let localhost = url.replacen("file://", "file://localhost", 1);
        assert_eq!(open_store(&localhost).unwrap().url(), url);
    }

    #[tokio::test]
    async fn relative_paths_resolve_against_the_current_dir() {
        let here = std::env::current_dir().unwrap();
        let dir = tempfile::tempdir_in(&here).unwrap();
        let name = dir.path().file_name().unwrap().to_str().unwrap();
        let relative = format!("{name}/store");
        let store = open_store(&relative).unwrap();
        let expected = std::fs::canonicalize(here.join(&relative)).unwrap();
        assert_eq!(store.url(), path_to_file_url(&expected));
        let direct = LocalStore::new(&relative).unwrap();
        assert_eq!(direct.root(), expected);
    }

    #[test]
    fn unsupported_schemes_say_what_is_supported() {
        for url in ["s3://bucket/prefix", "gs://bucket", "S3://x", "foo+bar.baz-1://x"] {
            let err = open_store(url).unwrap_err();
            let StoreError::Config(message) = &err else {
                panic!("{url}: expected a Config error, got {err:?}");
            };
            let scheme = url.split("://").next().unwrap().to_ascii_lowercase();
            assert!(message.contains(&format!("{scheme}://")), "{message}");
            assert!(message.contains("supports file://"), "{message}");
        }
        assert!(matches!(open_store(""), Err(StoreError::Config(_))));
    }

    #[test]
    fn bad_file_urls_are_config_errors() {
        for url in [
            "file://otherhost/x",
            "file://",
            "file:///a%zz",
            "file:///a%",
            "file:///a?b",
            "file:///a#b",
            "file:///a%00b",
            "file:///%FF",
        ] {
            assert!(matches!(LocalStore::from_url(url), Err(StoreError::Config(_))), "{url}");
        }
    }

    #[test]
    fn plain_paths_and_urls_are_told_apart() {
        assert_eq!(url_scheme("s3://b"), Some("s3"));
        assert_eq!(url_scheme("File:///x"), Some("File"));
        assert_eq!(url_scheme("a:b/c"), None);
        assert_eq!(url_scheme("dir/x://y"), None);
        assert_eq!(url_scheme("1a://x"), None);
        assert_eq!(url_scheme("://x"), None);
        assert_eq!(url_scheme("/abs/path"), None);
    }

    #[tokio::test]
    async fn registry_takes_more_schemes() {
        let dir = tempdir();
        let root = dir.path().join("mem");
        let mut registry = StoreRegistry::default();
        let for_closure = root.clone();
        registry.register("MEM", move |url: &str| {
            assert_eq!(url, "mem://anything");
            Ok(Arc::new(LocalStore::new(&for_closure)?) as Arc<dyn Store>)
        });
        assert_eq!(registry.schemes().collect::<Vec<_>>(), ["file", "mem"]);
        let store = registry.open("mem://anything").unwrap();
        assert!(store.url().ends_with("/mem"));
        let err = StoreRegistry::empty().open("file:///tmp").unwrap_err();
        assert!(err.to_string().contains("supports no URL scheme"), "{err}");
    }

    #[tokio::test]
    async fn keys_are_encoded_on_disk() {
        let dir = tempdir();
        let store = LocalStore::new(dir.path()).unwrap();
        store.put_bytes(&key("a b/100%/ü/x#1"), Bytes::from_static(b"1")).await.unwrap();
        let file = store.root().join("a b").join("100%25").join("%C3%BC").join("x%231");
        assert_eq!(std::fs::read(file).unwrap(), b"1");
    }

    #[tokio::test]
    async fn files_no_key_names_are_skipped_by_list() {
        let dir = tempdir();
        let store = LocalStore::new(dir.path()).unwrap();
        store.put_bytes(&key("l/ok"), Bytes::from_static(b"1")).await.unwrap();
        for foreign in ["%zz", "%61", "half%4", "staging#3"] {
            std::fs::write(store.root().join("l").join(foreign), b"x").unwrap();
        }
        let listed = store.list(&key("l")).await.unwrap();
        let keys: Vec<_> = listed.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["l/ok"]);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn no_key_reaches_outside_the_root() {
        let dir = tempdir();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        let root = dir.path().join("root");
        let store = LocalStore::new(&root).unwrap();

        // Keys that a naive join or a decoding layer could turn into escapes.
        let tricky = [
            "%2e%2e/escaped",
            "%2E%2E/%2E%2E/escaped",
            "..%2f..%2fescaped",
            "..%5c..%5cescaped",
            "...",
            "..../escaped",
            "\u{2025}/escaped",
            "\u{ff0e}\u{ff0e}\u{ff0f}escaped",
            "a\u{2215}..\u{2215}escaped",
            "~/escaped",
            "$HOME/escaped",
            " ../escaped",
            ".. /escaped",
        ];
        for k in tricky {
            let k = key(k);
            store.put_bytes(&k, Bytes::from_static(b"x")).await.unwrap();
            store.put_stream(&k, futures::stream::iter([Ok(Bytes::from_static(b"y"))]).boxed()).await.unwrap();
            assert_eq!(read(&store, &k).await, b"y");
            store.delete(&k).await.unwrap();
        }
        assert_eq!(walk(&outside), [outside.join("secret")]);
        for path in walk(dir.path()) {
            assert!(path.starts_with(&root) || path.starts_with(&outside), "{}", path.display());
        }

        // Symbolic links inside the root that lead out of it.
        let canonical_root = store.root().to_path_buf();
        std::os::unix::fs::symlink(&outside, canonical_root.join("evil")).unwrap();
        std::fs::create_dir(canonical_root.join("jobs")).unwrap();
        std::os::unix::fs::symlink(&outside, canonical_root.join("jobs").join("evil")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), canonical_root.join("link")).unwrap();
        let escape = |r: Result<(), StoreError>, what: &str| {
            assert!(matches!(r, Err(StoreError::InvalidKey { .. })), "{what}: {r:?}");
        };
        let source = dir.path().join("source");
        std::fs::write(&source, b"payload").unwrap();
        for k in ["evil/new", "evil/secret", "link", "jobs/evil/new"] {
            let k = key(k);
            escape(store.put_bytes(&k, Bytes::from_static(b"x")).await.map(drop), "put_bytes");
            escape(store.put_file(&k, &source).await.map(drop), "put_file");
            escape(
                store.put_stream(&k, futures::stream::iter([Ok(Bytes::from_static(b"y"))]).boxed()).await.map(drop),
                "put_stream",
            );
            escape(store.get(&k).await.map(drop), "get");
            escape(store.head(&k).await.map(drop), "head");
            escape(store.get_file(&k, &dir.path().join("dest")).await.map(drop), "get_file");
        }
        escape(store.delete(&key("evil/secret")).await, "delete");
        escape(store.list(&key("evil")).await.map(drop), "list");
        // A listing above a link does not follow it out.
        let listed = store.list(&key("jobs")).await.unwrap();
        assert!(listed.is_empty(), "{listed:?}");
        // Deleting the link itself removes the link, not its target.
        store.delete(&key("link")).await.unwrap();
        assert_eq!(walk(&outside), [outside.join("secret")]);
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    }
}
