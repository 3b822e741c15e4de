//! The `Store` trait: where job inputs, outputs and large logs live.
//!
//! Keys are crew-relative ([`StoreKey`], e.g. `jobs/17/1/stdout`); a store
//! maps them under its own root or prefix, and a key can never name anything
//! outside it. Data is streamed both ways so that neither the controller nor
//! an agent holds a whole object in memory (DESIGN.md, principle 3).
//!
//! The local store (`LocalStore`) is a thin layer over `object_store`'s
//! local file system, so that it behaves like the S3 store that arrives with
//! its own crate.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

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
        let bad = |reason: &str| StoreError::InvalidKey {
            key: key.clone(),
            reason: reason.to_owned(),
        };
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

/// What a store knows of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: StoreKey,
    /// Its size in bytes.
    pub size: u64,
    /// An opaque version tag (ETag or equivalent) when the backend has one.
    pub e_tag: Option<String>,
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
}
