//! Shared helpers: a fresh bucket and its store, deterministic content,
//! SHA-256 of streams.

use bytes::Bytes;
use crew_core::store::{ByteStream, Store, StoreError, StoreKey};
use crew_store_s3::S3Store;
use crew_store_s3::testing::{create_bucket, store_url, unique_bucket};
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// A fresh bucket at `endpoint` and the store of `prefix` in it.
pub(crate) async fn fresh_store(endpoint: &str, prefix: &str) -> (String, S3Store) {
    let bucket = unique_bucket("crew-it");
    create_bucket(endpoint, &bucket).unwrap();
    let store = S3Store::open(&store_url(endpoint, &bucket, prefix)).await.unwrap();
    (bucket, store)
}

pub(crate) fn key(s: &str) -> StoreKey {
    StoreKey::new(s).unwrap()
}

/// Deterministic pseudo-random content: `total` bytes in chunks of `chunk`,
/// produced lazily, and its SHA-256.
pub(crate) fn content(seed: u64, total: usize, chunk: usize) -> (ByteStream, [u8; 32]) {
    let mut hasher = Sha256::new();
    let mut state = seed | 1;
    let mut chunks = Vec::new();
    let mut left = total;
    // The digest is computed on a first pass; the stream regenerates.
    while left > 0 {
        let n = left.min(chunk);
        let bytes = generate(&mut state, n);
        hasher.update(&bytes);
        left -= n;
        chunks.push(n);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    let stream = futures::stream::unfold((seed | 1, chunks.into_iter()), |(mut state, mut sizes)| async move {
        let n = sizes.next()?;
        let bytes = generate(&mut state, n);
        Some((Ok::<_, StoreError>(Bytes::from(bytes)), (state, sizes)))
    })
    .boxed();
    (stream, digest)
}

fn generate(state: &mut u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// SHA-256 and length of the object at `key`, streamed.
pub(crate) async fn sha256_of(store: &dyn Store, key: &StoreKey) -> ([u8; 32], u64) {
    let mut stream = store.get(key).await.unwrap();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (hasher.finalize().into(), len)
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The peak resident memory of this process (`VmHWM`), in bytes.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
