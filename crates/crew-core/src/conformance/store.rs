//! The [`Store`] conformance suite: [`store`] checks an implementation
//! against every rule of the trait's contract.
//!
//! The checks favour what callers rely on and what backends get wrong:
//! exact round trips of objects of every size and of keys with odd characters
//! (`%`, `#`, spaces, unicode — backends that percent-encode keys for a file
//! system or an HTTP path must not let `%41` and `A` collide), streaming of a
//! large object (24 MiB goes up in small chunks and comes back checked with a
//! running checksum, never held in one buffer), atomicity of failed and
//! dropped uploads, `NotFound` meaning "no such object", idempotent deletes,
//! and listing by whole segments (`jobs/1` must not see `jobs/10/x`).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::store::{ByteStream, KEY_MAX_LEN, ObjectMeta, Store, StoreError, StoreKey};

/// Size of the large streamed object.
const LARGE_SIZE: u64 = 24 * 1024 * 1024;

/// Size of the file uploaded with `put_file`: a few MiB and not a multiple of
/// any usual part or buffer size.
const FILE_SIZE: u64 = 3 * 1024 * 1024 + 4099;

/// Runs every check of the [`Store`] contract against `store`; panics with a
/// message naming the broken rule at the first failure.
///
/// Needs a tokio runtime (`#[tokio::test]` provides one), a store it may
/// write to (under `crew-conformance/<unique run id>/`, removed at the end
/// when the checks pass) and a writable temporary folder
/// ([`std::env::temp_dir`]) for the files of `put_file` and `get_file`.
///
/// # Panics
/// On the first check that fails, like a failed assertion.
pub async fn store(store: &dyn Store) {
    let cx = Cx::new(store);
    tracing::info!(prefix = %cx.prefix, url = %store.url(), "store conformance: start");

    keys_are_validated();
    url_is_reported(&cx);
    bytes_round_trip(&cx).await;
    stream_round_trip(&cx).await;
    file_round_trip(&cx).await;
    large_streamed_object(&cx).await;
    missing_objects(&cx).await;
    failed_and_dropped_uploads(&cx).await;
    delete_is_idempotent(&cx).await;
    list_by_segment_prefix(&cx).await;
    odd_keys_round_trip(&cx).await;
    concurrent_puts(&cx).await;
    check_passes(&cx).await;
    clean_up(&cx).await;
}

/// What every check needs: the store, this run's key prefix, a scratch
/// folder.
struct Cx<'a> {
    store: &'a dyn Store,
    prefix: StoreKey,
    scratch: Scratch,
}

impl<'a> Cx<'a> {
    fn new(store: &'a dyn Store) -> Self {
        let run = run_id();
        let prefix = ok(StoreKey::new(format!("crew-conformance/{run}")), "build the run prefix");
        let scratch = Scratch::new(&run);
        Self { store, prefix, scratch }
    }

    /// The key `<prefix>/<rel>`.
    fn key(&self, rel: &str) -> StoreKey {
        ok(
            StoreKey::new(format!("{}/{rel}", self.prefix)),
            &format!("StoreKey::new must accept {rel:?} under the run prefix"),
        )
    }
}

/// A unique id for this run: time, process and randomness, so that runs in
/// parallel against one bucket never share keys.
fn run_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let random = getrandom::u64().unwrap_or_default();
    format!("{nanos:x}-{:x}-{random:016x}", std::process::id())
}

/// A scratch folder under the system temporary folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(run: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("crew-conformance-{run}"));
        ok(std::fs::create_dir_all(&dir), &format!("create the scratch folder {}", dir.display()));
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unwraps `result` or panics naming the step.
#[track_caller]
fn ok<T, E: Debug>(result: Result<T, E>, step: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("store conformance: {step}: unexpected error {e:?}"),
    }
}

/// Panics unless `result` is a [`StoreError::NotFound`].
#[track_caller]
fn expect_not_found<T: Debug>(result: Result<T, StoreError>, step: &str) {
    match result {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("store conformance: {step}: expected StoreError::NotFound, got {other:?}"),
    }
}

/// A running checksum (64-bit FNV-1a) and length of a byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest {
    hash: u64,
    len: u64,
}

impl Digest {
    fn new() -> Self {
        Self { hash: 0xcbf2_9ce4_8422_2325, len: 0 }
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
}

/// Deterministic pseudo-random content of `total` bytes in chunks of varied
/// sizes (1 byte to 1 MiB and odd sizes), generated one chunk at a time.
struct Generator {
    state: u64,
    remaining: u64,
    turn: usize,
}

impl Generator {
    const SIZES: [usize; 8] = [1, 7, 4096, 65_536, 1_048_576, 300_007, 0, 131_071];

    fn new(seed: u64, total: u64) -> Self {
        Self { state: seed | 1, remaining: total, turn: 0 }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let size = Self::SIZES[self.turn % Self::SIZES.len()];
        self.turn += 1;
        let size = size.min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let mut chunk = Vec::with_capacity(size + 8);
        while chunk.len() < size {
            // xorshift64
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.extend_from_slice(&self.state.to_le_bytes());
        }
        chunk.truncate(size);
        self.remaining -= size as u64;
        Some(Bytes::from(chunk))
    }

    /// The digest of the whole content, computed without storing it.
    fn digest(seed: u64, total: u64) -> Digest {
        let mut generator = Self::new(seed, total);
        let mut digest = Digest::new();
        while let Some(chunk) = generator.next_chunk() {
            digest.update(&chunk);
        }
        digest
    }

    /// The content as a [`ByteStream`], produced lazily.
    fn stream(seed: u64, total: u64) -> ByteStream {
        futures::stream::unfold(Self::new(seed, total), |mut generator| async move {
            generator.next_chunk().map(|chunk| (Ok::<_, StoreError>(chunk), generator))
        })
        .boxed()
    }
}

/// A stream of the given chunks.
fn chunks(parts: &[&'static [u8]]) -> ByteStream {
    let parts: Vec<Result<Bytes, StoreError>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
    futures::stream::iter(parts).boxed()
}

/// Reads the object at `key` by streaming, returning its digest and the
/// largest chunk seen.
async fn read_digest(store: &dyn Store, key: &StoreKey) -> (Digest, usize) {
    let mut stream = ok(store.get(key).await, &format!("get {key}"));
    let mut digest = Digest::new();
    let mut largest = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = ok(chunk, &format!("read the stream of {key}"));
        largest = largest.max(chunk.len());
        digest.update(&chunk);
    }
    (digest, largest)
}

/// Reads a small object whole.
async fn read_all(store: &dyn Store, key: &StoreKey) -> Vec<u8> {
    let mut stream = ok(store.get(key).await, &format!("get {key}"));
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&ok(chunk, &format!("read the stream of {key}")));
    }
    out
}

/// The digest of a local file, read in chunks.
async fn file_digest(path: &Path) -> Digest {
    let mut file = ok(tokio::fs::File::open(path).await, &format!("open {}", path.display()));
    let mut buf = vec![0u8; 256 * 1024];
    let mut digest = Digest::new();
    loop {
        let n = ok(file.read(&mut buf).await, &format!("read {}", path.display()));
        if n == 0 {
            return digest;
        }
        digest.update(&buf[..n]);
    }
}

/// Writes generated content to a local file, chunk by chunk.
async fn write_generated(path: &Path, seed: u64, total: u64) {
    use tokio::io::AsyncWriteExt;
    let mut file = ok(tokio::fs::File::create(path).await, &format!("create {}", path.display()));
    let mut generator = Generator::new(seed, total);
    while let Some(chunk) = generator.next_chunk() {
        ok(file.write_all(&chunk).await, &format!("write {}", path.display()));
    }
    ok(file.flush().await, &format!("flush {}", path.display()));
}

/// Checks the metadata a put or head returned.
#[track_caller]
fn check_meta(meta: &ObjectMeta, key: &StoreKey, size: u64, step: &str) {
    assert_eq!(&meta.key, key, "store conformance: {step}: the metadata names another key");
    assert_eq!(meta.size, size, "store conformance: {step}: wrong size in the metadata of {key}");
}

/// `StoreKey::new` refuses every key that could escape a prefix or is
/// malformed, and accepts the odd but harmless ones.
fn keys_are_validated() {
    let long = "a".repeat(KEY_MAX_LEN + 1);
    let invalid: &[&str] = &[
        "", ".", "..", "../x", "a/../b", "a/..", "/abs", "/", "a//b", "a/", "a/./b", "./a", "a\0b", "a\nb", "a\rb",
        "a\tb", "a\u{7f}b", "a\u{85}b", "a\\b", "..\\x", "C:\\x", &long,
    ];
    for key in invalid {
        match StoreKey::new(*key) {
            Err(StoreError::InvalidKey { .. }) => {}
            other => panic!(
                "store conformance: StoreKey::new({key:?}) must be refused with \
                 StoreError::InvalidKey, got {other:?}"
            ),
        }
    }
    let valid_long = "a".repeat(KEY_MAX_LEN);
    let valid: &[&str] = &[
        "a",
        "jobs/17/1/stdout",
        "a b/c d",
        "100%",
        "%2e%2e/x",
        "...",
        ".hidden",
        "x#1",
        "ünïcødé/日本語",
        &valid_long,
    ];
    for key in valid {
        ok(StoreKey::new(*key), &format!("StoreKey::new({key:?})"));
    }
    let parent = ok(StoreKey::new("jobs/1"), "StoreKey::new(\"jobs/1\")");
    assert_eq!(
        ok(parent.child("out"), "StoreKey::child").as_str(),
        "jobs/1/out",
        "store conformance: StoreKey::child must join with /"
    );
    for bad in ["..", "", "a/../..", "x\0"] {
        assert!(parent.child(bad).is_err(), "store conformance: StoreKey::child({bad:?}) must be refused");
    }
}

/// `url()` names the store as a URL another process can open.
fn url_is_reported(cx: &Cx<'_>) {
    let url = cx.store.url();
    assert!(url.contains("://"), "store conformance: url() must return a URL (scheme://...), got {url:?}");
}

/// `put_bytes` then `get` and `head` give the same bytes and size back;
/// overwriting replaces the object whole; the empty object exists.
async fn bytes_round_trip(cx: &Cx<'_>) {
    let store = cx.store;
    let key = cx.key("bytes/hello");
    let meta = ok(store.put_bytes(&key, Bytes::from_static(b"hello, crew")).await, "put_bytes");
    check_meta(&meta, &key, 11, "put_bytes");
    assert_eq!(read_all(store, &key).await, b"hello, crew", "store conformance: get must return what put_bytes stored");
    check_meta(&ok(store.head(&key).await, "head"), &key, 11, "head");

    // Overwrite with a shorter object: no trace of the old one may remain.
    let meta = ok(store.put_bytes(&key, Bytes::from_static(b"bye")).await, "put_bytes (overwrite)");
    check_meta(&meta, &key, 3, "put_bytes (overwrite)");
    assert_eq!(
        read_all(store, &key).await,
        b"bye",
        "store conformance: an overwritten object must read as the new content only"
    );
    check_meta(&ok(store.head(&key).await, "head after overwrite"), &key, 3, "head after overwrite");

    let empty = cx.key("bytes/empty");
    let meta = ok(store.put_bytes(&empty, Bytes::new()).await, "put_bytes (empty)");
    check_meta(&meta, &empty, 0, "put_bytes (empty)");
    assert!(read_all(store, &empty).await.is_empty(), "store conformance: the empty object must read as empty");
    check_meta(&ok(store.head(&empty).await, "head (empty)"), &empty, 0, "head (empty)");
}

/// `put_stream` of small and empty chunks stores their concatenation.
async fn stream_round_trip(cx: &Cx<'_>) {
    let store = cx.store;
    let key = cx.key("stream/small");
    let meta = ok(store.put_stream(&key, chunks(&[b"ab", b"", b"c", b"defg", b""])).await, "put_stream");
    check_meta(&meta, &key, 7, "put_stream");
    assert_eq!(
        read_all(store, &key).await,
        b"abcdefg",
        "store conformance: get must return the concatenated chunks of put_stream"
    );

    let empty = cx.key("stream/empty");
    let meta = ok(store.put_stream(&empty, chunks(&[])).await, "put_stream (no chunks)");
    check_meta(&meta, &empty, 0, "put_stream (no chunks)");
    check_meta(&ok(store.head(&empty).await, "head (empty stream)"), &empty, 0, "head (empty stream)");
}

/// `put_file` uploads a file of a few MiB; `get_file` downloads it, creating
/// the destination or truncating a longer one.
async fn file_round_trip(cx: &Cx<'_>) {
    let store = cx.store;
    let source = cx.scratch.path("upload.bin");
    write_generated(&source, 0x5eed_f11e, FILE_SIZE).await;
    let expected = Generator::digest(0x5eed_f11e, FILE_SIZE);

    let key = cx.key("file/upload.bin");
    let meta = ok(store.put_file(&key, &source).await, "put_file");
    check_meta(&meta, &key, FILE_SIZE, "put_file");
    let (digest, _) = read_digest(store, &key).await;
    assert_eq!(digest, expected, "store conformance: get must return the bytes of the file put_file uploaded");

    // Download into a new file.
    let fresh = cx.scratch.path("download-new.bin");
    let meta = ok(store.get_file(&key, &fresh).await, "get_file (new file)");
    check_meta(&meta, &key, FILE_SIZE, "get_file (new file)");
    assert_eq!(file_digest(&fresh).await, expected, "store conformance: get_file must write the object's bytes");

    // Download over a longer file: it must be truncated.
    let small = cx.key("file/small");
    ok(store.put_bytes(&small, Bytes::from_static(b"short")).await, "put_bytes");
    let meta = ok(store.get_file(&small, &fresh).await, "get_file (over a longer file)");
    check_meta(&meta, &small, 5, "get_file (over a longer file)");
    assert_eq!(
        ok(tokio::fs::read(&fresh).await, "read the downloaded file"),
        b"short",
        "store conformance: get_file must truncate an existing file"
    );

    // An empty file.
    let empty_file = cx.scratch.path("empty.bin");
    ok(tokio::fs::write(&empty_file, b"").await, "write an empty file");
    let empty = cx.key("file/empty");
    let meta = ok(store.put_file(&empty, &empty_file).await, "put_file (empty)");
    check_meta(&meta, &empty, 0, "put_file (empty)");

    // A missing source file is a local I/O error, and stores nothing.
    let missing_source = cx.scratch.path("does-not-exist");
    let nothing = cx.key("file/nothing");
    match store.put_file(&nothing, &missing_source).await {
        Err(StoreError::Io { .. }) => {}
        other => panic!(
            "store conformance: put_file of a missing local file must fail with \
             StoreError::Io, got {other:?}"
        ),
    }
    expect_not_found(store.head(&nothing).await, "head after a failed put_file");
}

/// A 24 MiB object goes up through `put_stream` in small chunks and comes
/// back streamed, checked with a running checksum, and through `get_file`.
async fn large_streamed_object(cx: &Cx<'_>) {
    let store = cx.store;
    let seed = 0x1a29_e0b1;
    let expected = Generator::digest(seed, LARGE_SIZE);
    let key = cx.key("large/object");
    let meta = ok(store.put_stream(&key, Generator::stream(seed, LARGE_SIZE)).await, "put_stream of 24 MiB");
    check_meta(&meta, &key, LARGE_SIZE, "put_stream of 24 MiB");
    check_meta(&ok(store.head(&key).await, "head of the large object"), &key, LARGE_SIZE, "head of the large object");
    let (digest, largest) = read_digest(store, &key).await;
    assert_eq!(digest, expected, "store conformance: the 24 MiB object read back differs from what was streamed up");
    assert!(
        (largest as u64) < LARGE_SIZE,
        "store conformance: get returned the whole 24 MiB object as one chunk; it must stream"
    );
    let local = cx.scratch.path("large.bin");
    let meta = ok(store.get_file(&key, &local).await, "get_file of the large object");
    check_meta(&meta, &key, LARGE_SIZE, "get_file of the large object");
    assert_eq!(
        file_digest(&local).await,
        expected,
        "store conformance: get_file of the 24 MiB object wrote other bytes"
    );
    let _ = tokio::fs::remove_file(&local).await;
    ok(store.delete(&key).await, "delete the large object");
}

/// Missing objects are `NotFound` for get, get_file and head, and a "folder"
/// (a prefix of other keys) is not an object.
async fn missing_objects(cx: &Cx<'_>) {
    let store = cx.store;
    let missing = cx.key("missing/never-written");
    expect_not_found(store.get(&missing).await.map(|_| ()), "get of a missing key");
    expect_not_found(store.head(&missing).await, "head of a missing key");
    let dest = cx.scratch.path("missing.bin");
    expect_not_found(store.get_file(&missing, &dest).await, "get_file of a missing key");

    let inner = cx.key("missing/folder/inner");
    ok(store.put_bytes(&inner, Bytes::from_static(b"x")).await, "put_bytes");
    let folder = cx.key("missing/folder");
    expect_not_found(store.head(&folder).await, "head of a key that is only a prefix of others");
    expect_not_found(store.get(&folder).await.map(|_| ()), "get of a key that is only a prefix of others");
}

/// A failed or dropped upload leaves no object, or the previous one intact.
async fn failed_and_dropped_uploads(cx: &Cx<'_>) {
    let store = cx.store;
    let failing = || -> ByteStream {
        futures::stream::iter(vec![
            Ok(Bytes::from_static(b"partial ")),
            Err(StoreError::Io {
                context: "conformance: the source fails on purpose".into(),
                source: std::io::Error::other("injected failure"),
            }),
        ])
        .boxed()
    };

    // A failing stream: an error, and no object.
    let fresh = cx.key("atomic/failed-new");
    assert!(
        store.put_stream(&fresh, failing()).await.is_err(),
        "store conformance: put_stream must fail when its stream fails"
    );
    expect_not_found(store.head(&fresh).await, "head after a failed put_stream (no object may appear)");

    // A failing stream over an existing object: the old object stays whole.
    let existing = cx.key("atomic/failed-over");
    ok(store.put_bytes(&existing, Bytes::from_static(b"old")).await, "put_bytes");
    assert!(
        store.put_stream(&existing, failing()).await.is_err(),
        "store conformance: put_stream must fail when its stream fails"
    );
    assert_eq!(
        read_all(store, &existing).await,
        b"old",
        "store conformance: a failed put_stream must leave the previous object intact"
    );

    // A put_stream dropped mid-way: no object, and the old one intact.
    for (key, before) in [(cx.key("atomic/dropped-new"), None), (cx.key("atomic/dropped-over"), Some(&b"old"[..]))] {
        if let Some(before) = before {
            ok(store.put_bytes(&key, Bytes::copy_from_slice(before)).await, "put_bytes");
        }
        drop_mid_upload(store, &key).await;
        let listed = ok(store.list(&cx.key("atomic")).await, "list after a drop");
        match before {
            None => {
                expect_not_found(store.head(&key).await, "head after a dropped put_stream (no object may appear)");
                assert!(
                    listed.iter().all(|m| m.key != key),
                    "store conformance: a dropped put_stream left {key} visible in list"
                );
            }
            Some(before) => assert_eq!(
                read_all(store, &key).await,
                before,
                "store conformance: a dropped put_stream must leave the previous object intact"
            ),
        }
    }
}

/// Starts a `put_stream` whose source stalls after one chunk, waits until
/// the store has taken that chunk, then drops the upload.
async fn drop_mid_upload(store: &dyn Store, key: &StoreKey) {
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    let stalled = futures::stream::once(async { Ok(Bytes::from(vec![7u8; 64 * 1024])) })
        .chain(futures::stream::once(async move {
            let _ = taken_tx.send(());
            futures::future::pending::<Result<Bytes, StoreError>>().await
        }))
        .boxed();
    let upload = store.put_stream(key, stalled);
    tokio::select! {
        result = upload => panic!(
            "store conformance: put_stream of a stalled stream finished ({result:?}) \
             before its stream ended"
        ),
        _ = taken_rx => {}
    }
}

/// Deleting twice, or a key never written, succeeds; deleting a "folder"
/// key succeeds and leaves the objects under it.
async fn delete_is_idempotent(cx: &Cx<'_>) {
    let store = cx.store;
    let key = cx.key("delete/once");
    ok(store.put_bytes(&key, Bytes::from_static(b"x")).await, "put_bytes");
    ok(store.delete(&key).await, "delete");
    expect_not_found(store.head(&key).await, "head after delete");
    expect_not_found(store.get(&key).await.map(|_| ()), "get after delete");
    ok(store.delete(&key).await, "delete again (must be idempotent)");
    ok(store.delete(&cx.key("delete/never-written")).await, "delete of a key never written");

    let inner = cx.key("delete/folder/inner");
    ok(store.put_bytes(&inner, Bytes::from_static(b"x")).await, "put_bytes");
    ok(
        store.delete(&cx.key("delete/folder")).await,
        "delete of a key that is only a prefix of others (no such object)",
    );
    check_meta(
        &ok(store.head(&inner).await, "head after deleting its prefix"),
        &inner,
        1,
        "deleting a prefix key must not delete the objects under it",
    );

    // Delete of a key in a folder whose last object was just deleted, then
    // a put into the same folder again.
    ok(store.delete(&inner).await, "delete");
    ok(store.put_bytes(&inner, Bytes::from_static(b"yy")).await, "put_bytes after deleting the folder's last object");
    check_meta(&ok(store.head(&inner).await, "head"), &inner, 2, "head");
}

/// `list` returns exactly the objects under `prefix/`, by whole segments.
async fn list_by_segment_prefix(cx: &Cx<'_>) {
    let store = cx.store;
    let objects =
        [("list/1/a", 1usize), ("list/1/b/c", 2), ("list/1/b/d", 3), ("list/10/x", 4), ("list/1x", 5), ("list/2", 6)];
    for (rel, size) in objects {
        ok(store.put_bytes(&cx.key(rel), Bytes::from(vec![b'z'; size])).await, &format!("put_bytes {rel}"));
    }
    let check = |listed: Vec<ObjectMeta>, prefix: &str, expected: &[&str]| {
        let mut got: Vec<(String, u64)> = listed.iter().map(|m| (m.key.as_str().to_owned(), m.size)).collect();
        got.sort();
        let mut want: Vec<(String, u64)> = expected
            .iter()
            .map(|rel| {
                let size = objects.iter().find(|(r, _)| r == rel).map_or(0, |(_, s)| *s as u64);
                (cx.key(rel).as_str().to_owned(), size)
            })
            .collect();
        want.sort();
        assert_eq!(
            got, want,
            "store conformance: list({prefix:?}) must return exactly the objects under \
             {prefix:?}/ (whole segments), with their sizes"
        );
    };
    check(ok(store.list(&cx.key("list/1")).await, "list"), "list/1", &["list/1/a", "list/1/b/c", "list/1/b/d"]);
    check(ok(store.list(&cx.key("list/1/b")).await, "list"), "list/1/b", &["list/1/b/c", "list/1/b/d"]);
    check(ok(store.list(&cx.key("list")).await, "list"), "list", &objects.map(|(rel, _)| rel));
    check(ok(store.list(&cx.key("list/nothing")).await, "list"), "list/nothing", &[]);
    check(ok(store.list(&cx.key("list/2")).await, "list"), "list/2 (an object, not a prefix)", &[]);
    check(ok(store.list(&cx.key("list/1/a")).await, "list"), "list/1/a (an object, not a prefix)", &[]);
}

/// Keys with spaces, unicode, `%` escapes that look decoded, `#`, `?` and
/// other characters round-trip exactly and list as themselves.
async fn odd_keys_round_trip(cx: &Cx<'_>) {
    let store = cx.store;
    let odd = [
        "odd/with space/file name.txt",
        "odd/ lead and trail ",
        "odd/ünïcødé/日本語/ファイル",
        "odd/emoji 🦀",
        "odd/100%",
        "odd/100%25",
        "odd/%41",
        "odd/A",
        "odd/%2F",
        "odd/%2e%2e",
        "odd/name#1",
        "odd/name#",
        "odd/a?b=c&d",
        "odd/a+b",
        "odd/~tilde",
        "odd/quotes '\"`",
        "odd/[brackets]{braces}<angles>|pipe^caret*star",
        "odd/-leading-dash",
        "odd/.hidden",
        "odd/...",
        "odd/trailing.",
    ];
    for rel in odd {
        let key = cx.key(rel);
        let body = Bytes::copy_from_slice(key.as_str().as_bytes());
        let meta = ok(store.put_bytes(&key, body.clone()).await, &format!("put_bytes {rel:?}"));
        check_meta(&meta, &key, body.len() as u64, &format!("put_bytes {rel:?}"));
    }
    for rel in odd {
        let key = cx.key(rel);
        assert_eq!(
            read_all(store, &key).await,
            key.as_str().as_bytes(),
            "store conformance: key {rel:?} must read back its own object (keys must not \
             collide after encoding)"
        );
        check_meta(
            &ok(store.head(&key).await, &format!("head {rel:?}")),
            &key,
            key.as_str().len() as u64,
            &format!("head {rel:?}"),
        );
    }
    let mut listed: Vec<String> =
        ok(store.list(&cx.key("odd")).await, "list odd keys").into_iter().map(|m| m.key.as_str().to_owned()).collect();
    listed.sort();
    let mut want: Vec<String> = odd.iter().map(|rel| cx.key(rel).as_str().to_owned()).collect();
    want.sort();
    assert_eq!(listed, want, "store conformance: list must return odd keys exactly as they were written");
    let file_key = cx.key("odd/with space/file name.txt");
    let dest = cx.scratch.path("odd.bin");
    ok(store.get_file(&file_key, &dest).await, "get_file of a key with spaces");
    for rel in odd {
        ok(store.delete(&cx.key(rel)).await, &format!("delete {rel:?}"));
    }
    assert!(
        ok(store.list(&cx.key("odd")).await, "list after deletes").is_empty(),
        "store conformance: list must be empty once every object under the prefix is deleted"
    );
}

/// Uploads running at once to different keys all land.
async fn concurrent_puts(cx: &Cx<'_>) {
    let store = cx.store;
    let keys: Vec<StoreKey> = (0..16).map(|i| cx.key(&format!("concurrent/{i}"))).collect();
    let puts = keys.iter().enumerate().map(|(i, key)| {
        let body = Bytes::from(vec![b'c'; i * 1000 + 1]);
        put_checked(store, key, body)
    });
    futures::future::join_all(puts).await;
    let listed = ok(store.list(&cx.key("concurrent")).await, "list");
    assert_eq!(listed.len(), keys.len(), "store conformance: every concurrent put must land");
}

/// `put_bytes` with the check of its metadata.
async fn put_checked(store: &dyn Store, key: &StoreKey, body: Bytes) {
    let size = body.len() as u64;
    let meta = ok(store.put_bytes(key, body).await, "concurrent put_bytes");
    check_meta(&meta, key, size, "concurrent put_bytes");
}

/// `check` succeeds on a usable store (the one every other check just
/// used).
async fn check_passes(cx: &Cx<'_>) {
    ok(cx.store.check().await, "check of a usable store");
}

/// Deletes everything the run wrote and checks that nothing is left.
async fn clean_up(cx: &Cx<'_>) {
    let store = cx.store;
    let left = ok(store.list(&cx.prefix).await, "list the run prefix");
    for meta in &left {
        ok(store.delete(&meta.key).await, &format!("delete {}", meta.key));
    }
    assert!(
        ok(store.list(&cx.prefix).await, "list the run prefix").is_empty(),
        "store conformance: objects remain under the run prefix after deleting them all"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    //! The kit must catch broken stores, not only pass good ones: each test
    //! wraps `LocalStore` with one contract violation.

    use std::path::Path;

    use async_trait::async_trait;
    use bytes::Bytes;

    use crate::store::{ByteStream, LocalStore, ObjectMeta, Store, StoreError, StoreKey};

    /// Which rule the wrapper breaks.
    #[derive(Debug, Clone, Copy)]
    enum Flaw {
        /// `delete` of a missing key fails.
        DeleteNotIdempotent,
        /// `list` matches a string prefix, not whole segments.
        StringPrefixList,
        /// `head` of a missing key is a backend error, not `NotFound`.
        HeadMissingIsBackendError,
    }

    #[derive(Debug)]
    struct Flawed {
        inner: LocalStore,
        flaw: Flaw,
        _dir: tempfile::TempDir,
    }

    impl Flawed {
        fn new(flaw: Flaw) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let inner = LocalStore::new(dir.path()).unwrap();
            Self { inner, flaw, _dir: dir }
        }
    }

    #[async_trait]
    impl Store for Flawed {
        fn url(&self) -> String {
            self.inner.url()
        }
        async fn put_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
            self.inner.put_file(key, path).await
        }
        async fn put_stream(&self, key: &StoreKey, data: ByteStream) -> Result<ObjectMeta, StoreError> {
            self.inner.put_stream(key, data).await
        }
        async fn put_bytes(&self, key: &StoreKey, data: Bytes) -> Result<ObjectMeta, StoreError> {
            self.inner.put_bytes(key, data).await
        }
        async fn get(&self, key: &StoreKey) -> Result<ByteStream, StoreError> {
            self.inner.get(key).await
        }
        async fn get_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
            self.inner.get_file(key, path).await
        }
        async fn head(&self, key: &StoreKey) -> Result<ObjectMeta, StoreError> {
            match (self.flaw, self.inner.head(key).await) {
                (Flaw::HeadMissingIsBackendError, Err(StoreError::NotFound { .. })) => {
                    Err(StoreError::Backend { backend: "flawed", message: "404".into(), retryable: false })
                }
                (_, result) => result,
            }
        }
        async fn list(&self, prefix: &StoreKey) -> Result<Vec<ObjectMeta>, StoreError> {
            match self.flaw {
                Flaw::StringPrefixList => {
                    // Lists the parent and filters by string prefix.
                    let Some((parent, _)) = prefix.as_str().rsplit_once('/') else {
                        return self.inner.list(prefix).await;
                    };
                    let all = self.inner.list(&StoreKey::new(parent)?).await?;
                    Ok(all
                        .into_iter()
                        .filter(|m| m.key.as_str().starts_with(prefix.as_str()))
                        .filter(|m| m.key != *prefix)
                        .collect())
                }
                _ => self.inner.list(prefix).await,
            }
        }
        async fn delete(&self, key: &StoreKey) -> Result<(), StoreError> {
            if matches!(self.flaw, Flaw::DeleteNotIdempotent) {
                self.inner.head(key).await?;
            }
            self.inner.delete(key).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "delete again (must be idempotent)")]
    async fn catches_a_delete_that_is_not_idempotent() {
        super::store(&Flawed::new(Flaw::DeleteNotIdempotent)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "whole segments")]
    async fn catches_a_string_prefix_list() {
        super::store(&Flawed::new(Flaw::StringPrefixList)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "expected StoreError::NotFound")]
    async fn catches_a_head_that_hides_not_found() {
        super::store(&Flawed::new(Flaw::HeadMissingIsBackendError)).await;
    }
}
