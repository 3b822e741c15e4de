//! The store against the emulator: the conformance kit, the prefix and the
//! URL, a large multipart object, and the errors of a bad setup.

use std::time::{Duration, Instant};

use bytes::Bytes;
use crew_core::store::{Store, StoreError};
use crew_store_s3::testing::{endpoint, store_url, unique_bucket};
use crew_store_s3::{CHECK_RETRY_TIMEOUT, PART_SIZE, S3Store};

use crate::support::{content, fresh_store, key, peak_rss, sha256_of};

#[tokio::test]
async fn conformance_kit_passes_on_a_fresh_bucket_with_a_prefix() {
    let Some(endpoint) = endpoint("conformance_kit_passes_on_a_fresh_bucket_with_a_prefix") else { return };
    let (_, store) = fresh_store(&endpoint, "runs/conformance").await;
    store.check().await.unwrap();
    crew_core::conformance::store(&store).await;
}

#[tokio::test]
async fn keys_live_under_the_prefix_and_the_url_reopens_the_same_store() {
    let Some(endpoint) = endpoint("keys_live_under_the_prefix_and_the_url_reopens_the_same_store") else { return };
    let (bucket, store) = fresh_store(&endpoint, "a/b c").await;
    let k = key("jobs/1/stdout");
    store.put_bytes(&k, Bytes::from_static(b"spilled")).await.unwrap();

    // The URL carries the resolved region and endpoint, no secret.
    let url = store.url();
    assert_eq!(url, format!("s3://{bucket}/a/b%20c?region=us-east-1&endpoint={endpoint}"));
    assert_eq!(format!("{store:?}"), format!("S3Store {{ url: {url:?} }}"));
    let again = S3Store::open(&url).await.unwrap();
    assert_eq!(again.url(), url);
    assert_eq!(crate::support::sha256_of(&again, &k).await.0, crate::support::sha256(b"spilled"));

    // Seen from the bucket's root, the object is under the prefix.
    let root = S3Store::open(&store_url(&endpoint, &bucket, "")).await.unwrap();
    assert_eq!(root.head(&key("a/b c/jobs/1/stdout")).await.unwrap().size, 7);
    let listed = store.list(&key("jobs")).await.unwrap();
    assert_eq!(listed.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), ["jobs/1/stdout"]);

    // The store registry opens it by URL, on any thread.
    S3Store::register();
    let opened = crew_core::store::open_store(&url).unwrap();
    assert_eq!(opened.url(), url);
    opened.check().await.unwrap();
}

#[tokio::test]
async fn a_large_object_goes_up_in_parts_and_comes_back_byte_exact_with_bounded_memory() {
    let Some(endpoint) = endpoint("a_large_object_goes_up_in_parts") else { return };
    let (_, store) = fresh_store(&endpoint, "large").await;
    const SIZE: usize = 40 * 1024 * 1024;
    let (stream, digest) = content(0x1a29e, SIZE, 256 * 1024);
    let k = key("big/object");
    let start = Instant::now();
    let meta = store.put_stream(&k, stream).await.unwrap();
    let up = start.elapsed();
    assert_eq!(meta.size, SIZE as u64);
    // A multipart upload: S3 ETags of those end in -PARTS.
    let parts = SIZE.div_ceil(PART_SIZE);
    assert!(meta.e_tag.as_deref().is_some_and(|t| t.trim_matches('"').ends_with(&format!("-{parts}"))), "{meta:?}");
    let start = Instant::now();
    let (read, len) = sha256_of(&store, &k).await;
    let down = start.elapsed();
    assert_eq!((read, len), (digest, SIZE as u64));
    let mib = SIZE as f64 / (1024.0 * 1024.0);
    eprintln!(
        "40 MiB through the emulator: up {:.1} MiB/s ({up:.2?}), down {:.1} MiB/s ({down:.2?}); peak RSS {} MiB",
        mib / up.as_secs_f64(),
        mib / down.as_secs_f64(),
        peak_rss().unwrap_or(0) / (1024 * 1024)
    );
    // Under nextest each test is its own process, so the peak is this
    // test's: the object (40 MiB) would not fit under the bound if it were
    // held whole on top of the upload's parts and the runtime.
    if std::env::var_os("NEXTEST_EXECUTION_MODE").is_some_and(|m| m == "process-per-test") {
        let peak = peak_rss().unwrap_or(0);
        assert!(peak < 64 * 1024 * 1024, "peak RSS {peak} bytes: the upload or download is not bounded");
    }
    // get_file too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    store.get_file(&k, &path).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);
    store.delete(&k).await.unwrap();
}

#[tokio::test]
async fn a_missing_bucket_is_named_with_the_fix_and_reported_fast() {
    let Some(endpoint) = endpoint("a_missing_bucket_is_named_with_the_fix_and_reported_fast") else { return };
    let bucket = unique_bucket("crew-missing");
    let store = S3Store::open(&store_url(&endpoint, &bucket, "x")).await.unwrap();
    let start = Instant::now();
    let err = store.check().await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let text = err.to_string();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(text.contains(&format!("bucket {bucket} does not exist")), "{text}");
    assert!(text.contains("create it or fix --store"), "{text}");
    // Every operation says the same.
    let err = store.put_bytes(&key("k"), Bytes::from_static(b"x")).await.unwrap_err();
    assert!(err.to_string().contains(&format!("bucket {bucket} does not exist")), "{err}");
    let err = store.head(&key("k")).await.unwrap_err();
    // HEAD answers carry no body: a missing bucket looks like a missing object.
    assert!(matches!(err, StoreError::NotFound { .. } | StoreError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_reported_fast_and_says_so() {
    // A port nothing listens on; the emulator's variables give the
    // credentials, which are resolved before any connection.
    if endpoint("an_unreachable_endpoint_is_reported_fast_and_says_so").is_none() {
        return;
    }
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let store = S3Store::open(&store_url(&endpoint, "crew-nowhere", "x")).await.unwrap();
    let start = Instant::now();
    let err = store.check().await.unwrap_err();
    let took = start.elapsed();
    assert!(took < CHECK_RETRY_TIMEOUT + Duration::from_secs(3), "check took {took:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("cannot reach the S3 endpoint {endpoint}")), "{text}");
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn bad_urls_are_refused_before_any_request() {
    for (url, want) in [
        ("s3://Upper/x?region=us-east-1", "not a valid bucket name"),
        ("s3://bkt/x?region=us-east-1&colour=red", "unknown option"),
        ("s3://bkt/x?region=us-east-1&endpoint=http://u:p@h:1", "must not contain user:password@"),
    ] {
        let err = S3Store::open(url).await.unwrap_err().to_string();
        assert!(err.contains(want), "{url}: {err}");
    }
}

#[tokio::test]
async fn utf8_and_odd_names_are_stored_under_their_own_object_keys() {
    let Some(endpoint) = endpoint("utf8_and_odd_names_are_stored_under_their_own_object_keys") else { return };
    let (bucket, store) = fresh_store(&endpoint, "runs/ä b").await;
    let names = ["ü.txt", "a#b.txt", "100%.csv", "x?y=1&z", "[brackets] {braces} <angles> \"quotes\"", "日本/語.txt"];
    for (i, name) in names.iter().enumerate() {
        store.put_bytes(&key(&format!("jobs/1/1/outputs/{name}")), Bytes::from(vec![b'a'; i + 1])).await.unwrap();
    }
    // Any S3 client sees the names themselves, under the prefix.
    let mut raw = crew_store_s3::testing::list_keys(&endpoint, &bucket, "runs/").unwrap();
    raw.sort();
    let mut want: Vec<String> = names.iter().map(|n| format!("runs/ä b/jobs/1/1/outputs/{n}")).collect();
    want.sort();
    assert_eq!(raw, want);
    // And the store lists and reads them back by their keys.
    let mut listed: Vec<String> =
        store.list(&key("jobs/1")).await.unwrap().into_iter().map(|m| m.key.as_str().to_owned()).collect();
    listed.sort();
    let mut want: Vec<String> = names.iter().map(|n| format!("jobs/1/1/outputs/{n}")).collect();
    want.sort();
    assert_eq!(listed, want);
    for (i, name) in names.iter().enumerate() {
        let (_, len) = sha256_of(&store, &key(&format!("jobs/1/1/outputs/{name}"))).await;
        assert_eq!(len, i as u64 + 1, "{name}");
    }
}
