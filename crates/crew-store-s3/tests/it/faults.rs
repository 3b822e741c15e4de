//! The store through a fault-injecting proxy in front of the emulator
//! (`crew_store_s3::testing::FaultProxy`): 503 SlowDown, connections
//! dropped before answering, mid-request and mid-response. Everything put
//! and got through it must still succeed and read back byte-identical; and
//! every upload it sees must carry a correct `x-amz-checksum-sha256`.

use bytes::Bytes;
use crew_core::store::{Store, StoreKey};
use crew_store_s3::S3Store;
use crew_store_s3::testing::{Fault, FaultProxy, create_bucket, endpoint, mix, store_url, unique_bucket};
use futures::StreamExt;

use crate::support::{content, key, sha256, sha256_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_gets_through_faults_all_succeed_byte_exact_with_checksums() {
    let Some(endpoint) = endpoint("puts_and_gets_through_faults_all_succeed_byte_exact_with_checksums") else {
        return;
    };
    let bucket = unique_bucket("crew-faults");
    create_bucket(&endpoint, &bucket).unwrap();
    let seed = mix(std::process::id().into());
    eprintln!("fault proxy seed {seed:#x} (25% of requests faulted)");
    let proxy = FaultProxy::start(&endpoint, 250, &Fault::ALL, seed).unwrap();
    let store = S3Store::open(&store_url(proxy.url(), &bucket, "faults")).await.unwrap();
    let direct = S3Store::open(&store_url(&endpoint, &bucket, "faults")).await.unwrap();

    // Many small and medium objects, eight at a time.
    let sizes: Vec<usize> = (0..48).map(|i| [0, 1, 1000, 64 * 1024, 300_007, 1 << 20][i % 6] + i).collect();
    let objects: Vec<(StoreKey, Bytes)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let body: Vec<u8> = (0..size).map(|j| (mix((i * 7919 + j) as u64) & 0xff) as u8).collect();
            (key(&format!("small/{i}")), Bytes::from(body))
        })
        .collect();
    futures::stream::iter(objects.iter())
        .for_each_concurrent(8, |(k, body)| {
            let store = &store;
            async move {
                let meta = store.put_bytes(k, body.clone()).await.unwrap_or_else(|e| panic!("put {k}: {e}"));
                assert_eq!(meta.size, body.len() as u64);
            }
        })
        .await;

    // Two multipart uploads (streamed) at once.
    const LARGE: usize = 20 * 1024 * 1024 + 12_345;
    let large: Vec<(StoreKey, [u8; 32])> = futures::future::join_all((0..2u64).map(|i| {
        let store = &store;
        async move {
            let k = key(&format!("large/{i}"));
            let (stream, digest) = content(0xfa17 + i, LARGE, 100_000);
            let meta = store.put_stream(&k, stream).await.unwrap_or_else(|e| panic!("put_stream {k}: {e}"));
            assert_eq!(meta.size, LARGE as u64);
            (k, digest)
        }
    }))
    .await;

    // Everything reads back identical, through the faults and directly.
    for (k, body) in &objects {
        let want = (sha256(body), body.len() as u64);
        assert_eq!(sha256_of(&store, k).await, want, "{k} through the proxy");
        assert_eq!(sha256_of(&direct, k).await, want, "{k} directly");
    }
    for (k, digest) in &large {
        assert_eq!(sha256_of(&store, k).await, (*digest, LARGE as u64), "{k} through the proxy");
        assert_eq!(sha256_of(&direct, k).await, (*digest, LARGE as u64), "{k} directly");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large");
        store.get_file(k, &path).await.unwrap_or_else(|e| panic!("get_file {k}: {e}"));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LARGE as u64);
    }
    let listed = store.list(&key("small")).await.unwrap();
    assert_eq!(listed.len(), objects.len());

    let s = proxy.counts();
    eprintln!("fault proxy: {s:?}");
    for kind in Fault::ALL {
        assert!(s.of(kind) > 0, "no {kind:?}: {s:?}");
    }
    assert!(s.uploads >= objects.len() as u64, "{s:?}");
    assert_eq!(s.bad_checksums, 0, "uploads without a correct x-amz-checksum-sha256: {s:?}");
}
