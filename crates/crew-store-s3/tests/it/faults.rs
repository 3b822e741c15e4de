//! A fault-injecting HTTP proxy between the store and the emulator: for a
//! share of the requests it answers `503 SlowDown`, or drops the connection
//! before answering, in the middle of the request body, or in the middle of
//! the response body. Everything put and got through it must still succeed
//! and read back byte-identical; and every upload it sees must carry a
//! correct `x-amz-checksum-sha256` (moto stores that header but does not
//! verify it, unlike S3: the proxy checks what S3 would).
//!
//! Faults are injected only where the request did not reach the emulator
//! or its answer is a GET's body: moto answers a repeated
//! CompleteMultipartUpload with `NoSuchUpload` where S3 answers it again,
//! so a dropped answer to a request moto has carried out would test moto,
//! not the store.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use crew_core::store::{Store, StoreKey};
use crew_store_s3::S3Store;
use crew_store_s3::testing::{create_bucket, endpoint, store_url, unique_bucket};
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{content, key, sha256, sha256_of};

type Body = BoxBody<Bytes, std::io::Error>;

/// What the proxy did, by kind.
#[derive(Default, Debug)]
struct Stats {
    requests: AtomicU64,
    slow_downs: AtomicU64,
    drops_before_answer: AtomicU64,
    drops_mid_request: AtomicU64,
    drops_mid_response: AtomicU64,
    /// Uploads (PUT with a body) forwarded, and those whose checksum header
    /// was missing or wrong.
    uploads: AtomicU64,
    bad_checksums: AtomicU64,
}

struct Proxy {
    /// Faults per 1000 requests.
    per_mille: u64,
    upstream: SocketAddr,
    stats: Stats,
    seed: u64,
    /// Faults injected so far (which kind is next).
    faults: AtomicU64,
}

/// splitmix64: the proxy's decisions, reproducible from the seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn io_error(what: &str) -> std::io::Error {
    std::io::Error::other(what.to_owned())
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never: Infallible| match never {}).boxed()
}

impl Proxy {
    /// Starts the proxy on a free port; returns its URL.
    async fn start(self: &Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let proxy = Arc::clone(&proxy);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let proxy = Arc::clone(&proxy);
                        async move { proxy.handle(req).await }
                    });
                    // An error here is a dropped connection, on purpose.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
        let n = self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let declared: u64 =
            parts.headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        // Whether to fault is random; which fault takes turns among those
        // that fit the request, so that every kind happens in every run.
        // 0: 503 SlowDown, 1: drop before answering, 2: drop mid-request,
        // 3: drop mid-response.
        let kinds: &[u64] = if parts.method == hyper::Method::GET {
            &[0, 1, 3]
        } else if declared > 1 {
            &[0, 1, 2]
        } else {
            &[0, 1]
        };
        let fault = (mix(self.seed ^ n) % 1000 < self.per_mille).then(|| {
            let turn = self.faults.fetch_add(1, Ordering::Relaxed);
            kinds[(mix(turn) % kinds.len() as u64) as usize]
        });

        if fault == Some(2) {
            // Read about half the request body, then hang up.
            self.stats.drops_mid_request.fetch_add(1, Ordering::Relaxed);
            let mut body = body;
            let mut read = 0u64;
            while read < declared / 2 {
                match body.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
                    _ => break,
                }
            }
            return Err(io_error("injected: dropped mid-request"));
        }
        let body = body.collect().await.map_err(|e| io_error(&e.to_string()))?.to_bytes();
        match fault {
            Some(0) => {
                self.stats.slow_downs.fetch_add(1, Ordering::Relaxed);
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                           <Message>Please reduce your request rate.</Message></Error>";
                return Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .header("content-type", "application/xml")
                    .body(full(Bytes::from(xml)))
                    .map_err(|e| io_error(&e.to_string()));
            }
            Some(1) => {
                self.stats.drops_before_answer.fetch_add(1, Ordering::Relaxed);
                return Err(io_error("injected: dropped before answering"));
            }
            _ => {}
        }
        if parts.method == hyper::Method::PUT && !body.is_empty() {
            self.stats.uploads.fetch_add(1, Ordering::Relaxed);
            let sent = parts.headers.get("x-amz-checksum-sha256").and_then(|v| v.to_str().ok());
            if sent != Some(base64(&sha256(&body)).as_str()) {
                self.stats.bad_checksums.fetch_add(1, Ordering::Relaxed);
            }
        }

        // Forward, on a connection of its own.
        let stream = TcpStream::connect(self.upstream).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| io_error(&e.to_string()))?;
        tokio::spawn(conn);
        let mut upstream_req =
            Request::builder().method(parts.method.clone()).uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        for (name, value) in &parts.headers {
            upstream_req = upstream_req.header(name, value);
        }
        let upstream_req = upstream_req.body(Full::new(body)).map_err(|e| io_error(&e.to_string()))?;
        let answer = sender.send_request(upstream_req).await.map_err(|e| io_error(&e.to_string()))?;
        let (mut answer_parts, answer_body) = answer.into_parts();
        let answer_body = answer_body.collect().await.map_err(|e| io_error(&e.to_string()))?.to_bytes();
        answer_parts.headers.remove(hyper::header::TRANSFER_ENCODING);
        answer_parts.headers.remove(hyper::header::CONNECTION);
        answer_parts.headers.insert(hyper::header::CONTENT_LENGTH, answer_body.len().into());

        if fault == Some(3) && answer_body.len() > 1 {
            // Half the body, then the connection goes.
            self.stats.drops_mid_response.fetch_add(1, Ordering::Relaxed);
            let half = answer_body.slice(..answer_body.len() / 2);
            let frames =
                futures::stream::iter([Ok(Frame::data(half)), Err(io_error("injected: dropped mid-response"))]);
            return Ok(Response::from_parts(answer_parts, BodyExt::boxed(StreamBody::new(frames))));
        }
        Ok(Response::from_parts(answer_parts, full(answer_body)))
    }
}

/// Standard base64 with padding (the checksum header's encoding).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_is_standard() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_gets_through_faults_all_succeed_byte_exact_with_checksums() {
    let Some(endpoint) = endpoint("puts_and_gets_through_faults_all_succeed_byte_exact_with_checksums") else {
        return;
    };
    let bucket = unique_bucket("crew-faults");
    create_bucket(&endpoint, &bucket).unwrap();
    let upstream: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let seed = mix(std::process::id().into());
    eprintln!("fault proxy seed {seed:#x} (25% of requests faulted)");
    let proxy = Arc::new(Proxy { per_mille: 250, upstream, stats: Stats::default(), seed, faults: AtomicU64::new(0) });
    let proxy_url = proxy.start().await;
    let store = S3Store::open(&store_url(&proxy_url, &bucket, "faults")).await.unwrap();
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

    let s = &proxy.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!("fault proxy: {s:?}");
    assert!(load(&s.slow_downs) > 0, "{s:?}");
    assert!(load(&s.drops_before_answer) > 0, "{s:?}");
    assert!(load(&s.drops_mid_request) > 0, "{s:?}");
    assert!(load(&s.drops_mid_response) > 0, "{s:?}");
    assert!(load(&s.uploads) >= objects.len() as u64, "{s:?}");
    assert_eq!(load(&s.bad_checksums), 0, "uploads without a correct x-amz-checksum-sha256: {s:?}");
}
