//! The store through a fault-injecting proxy in front of the emulator
//! (`crew_store_s3::testing::FaultProxy`): 503 SlowDown, connections
//! dropped before answering, mid-request and mid-response. Everything put
//! and got through it must still succeed and read back byte-identical; and
//! every upload it sees must carry a correct `x-amz-checksum-sha256`.
//! Then the scripted faults: damaged uploads (400 BadDigest and
//! XAmzContentSHA256Mismatch), throttling and outages that last, and the
//! answers of AWS to a request signed for the wrong region (moto never
//! gives those).

use std::time::{Duration, Instant};

use bytes::Bytes;
use crew_core::store::{Store, StoreError, StoreKey};
use crew_store_s3::S3Store;
use crew_store_s3::testing::{
    Fault, FaultProxy, Outage, WrongRegion, create_bucket, endpoint, mix, store_url, unique_bucket,
};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_upload_is_sent_again_whole_or_as_a_part() {
    let Some(endpoint) = endpoint("a_damaged_upload_is_sent_again_whole_or_as_a_part") else { return };
    let bucket = unique_bucket("crew-damaged");
    create_bucket(&endpoint, &bucket).unwrap();
    let proxy = FaultProxy::start(&endpoint, 0, &[], 1).unwrap();
    let store = S3Store::open(&store_url(proxy.url(), &bucket, "damaged")).await.unwrap();
    let direct = S3Store::open(&store_url(&endpoint, &bucket, "damaged")).await.unwrap();

    // One PUT: its first two tries are answered 400 XAmzContentSHA256Mismatch
    // and 400 BadDigest, as S3 answers a body damaged on the way.
    proxy.damage_uploads("/small", 2);
    let body = Bytes::from_static(b"a body that got damaged twice on the way");
    store.put_bytes(&key("small"), body.clone()).await.unwrap();
    assert_eq!(proxy.counts().damaged, 2);
    assert_eq!(sha256_of(&direct, &key("small")).await, (sha256(&body), body.len() as u64));

    // A part of a multipart upload.
    proxy.damage_uploads("partNumber=2", 1);
    const LARGE: usize = 2 * crew_store_s3::PART_SIZE + 4_321;
    let (stream, digest) = content(0xdada, LARGE, 1 << 20);
    store.put_stream(&key("large"), stream).await.unwrap();
    assert_eq!(proxy.counts().damaged, 3);
    assert_eq!(sha256_of(&direct, &key("large")).await, (digest, LARGE as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_an_outage_are_ridden_out_and_a_lasting_outage_ends_in_a_clear_error() {
    let test = "throttling_and_an_outage_are_ridden_out_and_a_lasting_outage_ends_in_a_clear_error";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-outage");
    create_bucket(&endpoint, &bucket).unwrap();
    let proxy = FaultProxy::start(&endpoint, 0, &[], 1).unwrap();
    // 4 s of 503s, then 3 s down, ridden out. A retry timeout of 20 s keeps
    // every pause under 2.5 s (an eighth of it), so that some try falls in
    // the 3 s down (the default's pauses, up to 15 s, may jump over it).
    let riding = format!("{}&retry_timeout=20s&retry_init=50ms", store_url(proxy.url(), &bucket, "outage"));
    let store = S3Store::open(&riding).await.unwrap();
    proxy.schedule("", &[(Outage::SlowDown, Duration::from_secs(4)), (Outage::Down, Duration::from_secs(3))]);
    let body = Bytes::from(vec![7u8; 100_000]);
    store.put_bytes(&key("through"), body.clone()).await.unwrap();
    let seen = proxy.counts();
    assert!(seen.outage_slow_downs >= 2 && seen.outage_drops >= 1, "{seen:?}");
    assert_eq!(sha256_of(&store, &key("through")).await, (sha256(&body), body.len() as u64));

    // Down for good, with a retry timeout of 2 s (which the URL carries).
    let url = format!("{}&retry_timeout=2s&retry_init=50ms", store_url(proxy.url(), &bucket, "outage"));
    let short = S3Store::open(&url).await.unwrap();
    assert!(short.url().ends_with("&retry_timeout=2s&retry_init=50ms"), "{}", short.url());
    proxy.schedule("", &[(Outage::Down, Duration::MAX)]);
    let start = Instant::now();
    let err = short.put_bytes(&key("never"), body.clone()).await.unwrap_err();
    let took = start.elapsed();
    let text = err.to_string();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        text.contains("gave up after retrying for") && text.contains("retry_timeout=2s in the store URL"),
        "{text}"
    );
    // Retried for the retry timeout, not the default two minutes.
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(30), "{took:?}");
    assert!(proxy.counts().outage_drops > seen.outage_drops + 3, "{:?}", proxy.counts());
}

#[tokio::test]
async fn a_wrong_region_names_the_bucket_region_and_the_fix() {
    let Some(endpoint) = endpoint("a_wrong_region_names_the_bucket_region_and_the_fix") else { return };
    let bucket = unique_bucket("crew-region");
    create_bucket(&endpoint, &bucket).unwrap();
    let proxy = FaultProxy::start(&endpoint, 0, &[], 1).unwrap();
    let store = S3Store::open(&store_url(proxy.url(), &bucket, "region")).await.unwrap();
    for how in [WrongRegion::Redirect, WrongRegion::AuthorizationHeaderMalformed] {
        proxy.wrong_region(Some(("eu-west-1", how)));
        let err = store.check().await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Config(_)), "{how:?}: {err:?}");
        assert!(text.contains(&format!("bucket {bucket} is in region eu-west-1, not us-east-1")), "{how:?}: {text}");
        assert!(text.contains("?region=eu-west-1") && text.contains("AWS_REGION=eu-west-1"), "{how:?}: {text}");
        let err = store.get(&key("any")).await.err().unwrap();
        assert!(err.to_string().contains("is in region eu-west-1"), "{how:?}: {err}");
    }
    proxy.wrong_region(None);
    store.check().await.unwrap();
}
