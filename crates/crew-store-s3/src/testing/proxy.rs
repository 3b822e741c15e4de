//! A fault-injecting HTTP proxy in front of the S3 emulator: for a share of
//! the requests it answers `503 SlowDown`, or drops the connection before
//! answering, in the middle of the request body, or in the middle of the
//! response body. It also checks that every upload carries a correct
//! `x-amz-checksum-sha256` (moto stores that header but does not verify it,
//! unlike S3: the proxy checks what S3 would).
//!
//! Faults are injected only where the request did not reach the emulator
//! or its answer is a GET's body: moto answers a repeated
//! CompleteMultipartUpload with `NoSuchUpload` where S3 answers it again,
//! so a dropped answer to a request moto has carried out would test moto,
//! not the store.
//!
//! Besides those random faults it plays scripted ones:
//! [`FaultProxy::schedule`] starts outages that last ([`Outage`]: every
//! request answered `503 SlowDown`, or every connection dropped) when a
//! request names a given path, one after another;
//! [`FaultProxy::damage_uploads`] answers uploads with the 400 S3 gives a
//! body damaged on the way; [`FaultProxy::wrong_region`] answers every
//! request as AWS answers one signed for another region than the bucket's.
//!
//! The proxy runs on a thread of its own with its own tokio runtime, so
//! that plain `#[test]`s (which spawn the `crew` binary) and async tests
//! can both use it; it stops when the [`FaultProxy`] is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

type Body = BoxBody<Bytes, std::io::Error>;

/// A kind of fault the proxy injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown`, the request not forwarded.
    SlowDown,
    /// The whole request read, not forwarded, the connection closed.
    DropBeforeAnswer,
    /// About half the request body read, then the connection closed (only
    /// requests with a body).
    DropMidRequest,
    /// The request forwarded, half the answer's body sent, then the
    /// connection closed (only GETs).
    DropMidResponse,
}

impl Fault {
    /// Every kind.
    pub const ALL: [Fault; 4] =
        [Fault::SlowDown, Fault::DropBeforeAnswer, Fault::DropMidRequest, Fault::DropMidResponse];
}

/// A fault that lasts: while it does, it is what every request meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outage {
    /// Every request answered `503 SlowDown`, not forwarded (throttling).
    SlowDown,
    /// Every connection closed without an answer, new ones as soon as they
    /// are accepted (the endpoint is down).
    Down,
}

/// How AWS answers a request signed for a region that is not the bucket's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WrongRegion {
    /// `301 PermanentRedirect` without `Location` (the bucket's region in
    /// the `x-amz-bucket-region` header and an `<Endpoint>` in the body), as
    /// the regions older than 2019 answer.
    Redirect,
    /// `400 AuthorizationHeaderMalformed` with `<Region>` in the body and
    /// the header, as the newer regions (and some requests) answer.
    AuthorizationHeaderMalformed,
}

/// The scripted faults: outages from a trigger on, damaged uploads, a
/// wrong region.
#[derive(Debug, Default)]
struct Script {
    /// A request whose URI contains this starts the outages.
    trigger: String,
    /// The outages, one after another, each for its duration.
    outages: Vec<(Outage, Duration)>,
    /// When the first outage began.
    started: Option<Instant>,
    /// Uploads whose URI contains this get a damaged-body 400...
    damage_trigger: String,
    /// ... this many more times.
    damage_left: u64,
    /// Every request answered as if signed for the wrong region: the
    /// bucket's region and how.
    wrong_region: Option<(String, WrongRegion)>,
}

impl Script {
    /// The outage now, if any; a request with `uri` may start them.
    fn outage(&mut self, uri: Option<&str>) -> Option<Outage> {
        if self.outages.is_empty() {
            return None;
        }
        let now = Instant::now();
        let started = match self.started {
            Some(at) => at,
            None if uri.is_some_and(|u| u.contains(self.trigger.as_str())) => *self.started.insert(now),
            None => return None,
        };
        let mut end = started;
        for (outage, lasting) in &self.outages {
            match end.checked_add(*lasting) {
                Some(at) if now >= at => end = at,
                _ => return Some(*outage),
            }
        }
        None
    }
}

/// What the proxy has seen and done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests received.
    pub requests: u64,
    /// `503 SlowDown` answers.
    pub slow_downs: u64,
    /// Connections dropped before answering.
    pub drops_before_answer: u64,
    /// Connections dropped in the middle of the request body.
    pub drops_mid_request: u64,
    /// Connections dropped in the middle of the response body.
    pub drops_mid_response: u64,
    /// Uploads (PUT with a body) forwarded.
    pub uploads: u64,
    /// Forwarded uploads whose `x-amz-checksum-sha256` was missing or wrong.
    pub bad_checksums: u64,
    /// Requests answered `503 SlowDown` by a scheduled outage.
    pub outage_slow_downs: u64,
    /// Requests and connections dropped by a scheduled outage.
    pub outage_drops: u64,
    /// Uploads answered with a damaged-body 400.
    pub damaged: u64,
    /// Requests answered as signed for the wrong region.
    pub wrong_region: u64,
}

impl FaultCounts {
    /// Faults injected, all kinds.
    pub fn faults(&self) -> u64 {
        self.slow_downs + self.drops_before_answer + self.drops_mid_request + self.drops_mid_response
    }

    /// Faults of `kind` injected.
    pub fn of(&self, kind: Fault) -> u64 {
        match kind {
            Fault::SlowDown => self.slow_downs,
            Fault::DropBeforeAnswer => self.drops_before_answer,
            Fault::DropMidRequest => self.drops_mid_request,
            Fault::DropMidResponse => self.drops_mid_response,
        }
    }
}

#[derive(Default, Debug)]
struct Stats {
    requests: AtomicU64,
    slow_downs: AtomicU64,
    drops_before_answer: AtomicU64,
    drops_mid_request: AtomicU64,
    drops_mid_response: AtomicU64,
    uploads: AtomicU64,
    bad_checksums: AtomicU64,
    outage_slow_downs: AtomicU64,
    outage_drops: AtomicU64,
    damaged: AtomicU64,
    wrong_region: AtomicU64,
}

struct Inner {
    /// Faults per 1000 requests.
    per_mille: u64,
    kinds: Vec<Fault>,
    upstream: SocketAddr,
    stats: Stats,
    seed: u64,
    /// Faults injected so far (which kind is next).
    faults: AtomicU64,
    /// The scripted faults.
    script: Mutex<Script>,
}

/// A running fault proxy; stops when dropped.
pub struct FaultProxy {
    url: String,
    inner: Arc<Inner>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy").field("url", &self.url).field("counts", &self.counts()).finish()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream`
    /// (`http://HOST:PORT`), faulting `per_mille` of every 1000 requests
    /// with the `kinds` that fit each request (in turns, so that every kind
    /// happens). Whether a request is faulted is reproducible from `seed`.
    ///
    /// # Errors
    /// A bad upstream URL, or no port to listen on.
    pub fn start(upstream: &str, per_mille: u64, kinds: &[Fault], seed: u64) -> Result<FaultProxy, String> {
        let host = upstream.strip_prefix("http://").ok_or("the upstream must be http://")?.trim_end_matches('/');
        let upstream: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(host)
            .map_err(|e| format!("bad upstream {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("bad upstream {host}"))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let inner = Arc::new(Inner {
            per_mille,
            kinds: kinds.to_vec(),
            upstream,
            stats: Stats::default(),
            seed,
            faults: AtomicU64::new(0),
            script: Mutex::new(Script::default()),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the proxy's runtime: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else { return };
                    tokio::select! {
                        () = accept_loop(listener, served) => {}
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_background();
            })
            .map_err(|e| format!("cannot start the proxy's thread: {e}"))?;
        Ok(FaultProxy { url: format!("http://{addr}"), inner, stop: Some(stop), thread: Some(thread) })
    }

    /// The proxy's URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What it has seen and done so far.
    pub fn counts(&self) -> FaultCounts {
        let s = &self.inner.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            requests: load(&s.requests),
            slow_downs: load(&s.slow_downs),
            drops_before_answer: load(&s.drops_before_answer),
            drops_mid_request: load(&s.drops_mid_request),
            drops_mid_response: load(&s.drops_mid_response),
            uploads: load(&s.uploads),
            bad_checksums: load(&s.bad_checksums),
            outage_slow_downs: load(&s.outage_slow_downs),
            outage_drops: load(&s.outage_drops),
            damaged: load(&s.damaged),
            wrong_region: load(&s.wrong_region),
        }
    }

    /// From the first request whose URI (path and query) contains
    /// `trigger` on (that request included; `""`: the next request), every
    /// request meets the `outages` one after another, each for its
    /// duration (`Duration::MAX`: for good). Replaces an earlier schedule.
    pub fn schedule(&self, trigger: &str, outages: &[(Outage, Duration)]) {
        let mut script = self.inner.script();
        script.trigger = trigger.to_owned();
        script.outages = outages.to_vec();
        script.started = None;
    }

    /// Answers the next `times` uploads (PUT with a body) whose URI
    /// contains `trigger` as S3 answers a body damaged on the way: `400
    /// XAmzContentSHA256Mismatch` and `400 BadDigest` in turns, the upload
    /// not forwarded.
    pub fn damage_uploads(&self, trigger: &str, times: u64) {
        let mut script = self.inner.script();
        script.damage_trigger = trigger.to_owned();
        script.damage_left = times;
    }

    /// From now on, answers every request as AWS answers one signed for
    /// another region than the bucket's, `region` (`None`: forward again).
    pub fn wrong_region(&self, region: Option<(&str, WrongRegion)>) {
        self.inner.script().wrong_region = region.map(|(r, how)| (r.to_owned(), how));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, proxy: Arc<Inner>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        if proxy.script().outage(None) == Some(Outage::Down) {
            proxy.stats.outage_drops.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move { proxy.handle(req).await }
            });
            // An error here is a dropped connection, on purpose.
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// splitmix64: the proxy's decisions, reproducible from the seed.
pub fn mix(mut x: u64) -> u64 {
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

/// An S3 error answer: `status`, an XML body with `code`, `message` and
/// `extra` elements, and `headers`.
fn s3_error(
    status: StatusCode,
    code: &str,
    message: &str,
    extra: &str,
    headers: &[(&str, &str)],
) -> Result<Response<Body>, std::io::Error> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>\
         {extra}<RequestId>FAULTPROXY0000001</RequestId><HostId>fault-proxy</HostId></Error>"
    );
    let mut answer = Response::builder().status(status).header("content-type", "application/xml");
    for (name, value) in headers {
        answer = answer.header(*name, *value);
    }
    answer.body(full(Bytes::from(xml))).map_err(|e| io_error(&e.to_string()))
}

impl Inner {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        // A panic while holding it cannot leave the script half-changed.
        self.script.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The scripted answer to a request, if any: an outage, a wrong
    /// region, a damaged upload.
    fn scripted(
        &self,
        parts: &hyper::http::request::Parts,
        declared: u64,
    ) -> Option<Result<Response<Body>, std::io::Error>> {
        let uri = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut script = self.script();
        match script.outage(Some(uri)) {
            Some(Outage::SlowDown) => {
                self.stats.outage_slow_downs.fetch_add(1, Ordering::Relaxed);
                return Some(s3_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SlowDown",
                    "Please reduce your request rate.",
                    "",
                    &[],
                ));
            }
            Some(Outage::Down) => {
                self.stats.outage_drops.fetch_add(1, Ordering::Relaxed);
                return Some(Err(io_error("injected: the endpoint is down")));
            }
            None => {}
        }
        if let Some((region, how)) = &script.wrong_region {
            self.stats.wrong_region.fetch_add(1, Ordering::Relaxed);
            let bucket = uri.trim_start_matches('/').split(['/', '?']).next().unwrap_or("");
            return Some(match how {
                WrongRegion::Redirect => s3_error(
                    StatusCode::MOVED_PERMANENTLY,
                    "PermanentRedirect",
                    "The bucket you are attempting to access must be addressed using the specified endpoint. \
                     Please send all future requests to this endpoint.",
                    &format!("<Endpoint>{bucket}.s3.{region}.amazonaws.com</Endpoint><Bucket>{bucket}</Bucket>"),
                    &[("x-amz-bucket-region", region)],
                ),
                WrongRegion::AuthorizationHeaderMalformed => s3_error(
                    StatusCode::BAD_REQUEST,
                    "AuthorizationHeaderMalformed",
                    &format!(
                        "The authorization header is malformed; the region 'us-east-1' is wrong; expecting '{region}'"
                    ),
                    &format!("<Region>{region}</Region>"),
                    &[("x-amz-bucket-region", region)],
                ),
            });
        }
        if parts.method == hyper::Method::PUT
            && declared > 0
            && script.damage_left > 0
            && uri.contains(script.damage_trigger.as_str())
        {
            script.damage_left -= 1;
            let n = self.stats.damaged.fetch_add(1, Ordering::Relaxed);
            return Some(if n % 2 == 0 {
                s3_error(
                    StatusCode::BAD_REQUEST,
                    "XAmzContentSHA256Mismatch",
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                    "",
                    &[],
                )
            } else {
                s3_error(
                    StatusCode::BAD_REQUEST,
                    "BadDigest",
                    "The Content-MD5 or checksum value that you specified did not match what the server received.",
                    "",
                    &[],
                )
            });
        }
        None
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
        let n = self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let declared: u64 =
            parts.headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        // Whether to fault is random; which fault takes turns among those
        // that fit the request, so that every kind happens in every run.
        let fits = |kind: &&Fault| match kind {
            Fault::SlowDown | Fault::DropBeforeAnswer => true,
            Fault::DropMidRequest => parts.method != hyper::Method::GET && declared > 1,
            Fault::DropMidResponse => parts.method == hyper::Method::GET,
        };
        let kinds: Vec<Fault> = self.kinds.iter().filter(fits).copied().collect();
        let fault = (!kinds.is_empty() && mix(self.seed ^ n) % 1000 < self.per_mille).then(|| {
            let turn = self.faults.fetch_add(1, Ordering::Relaxed);
            kinds[(mix(turn) % kinds.len() as u64) as usize]
        });

        if fault == Some(Fault::DropMidRequest) {
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
        if let Some(answer) = self.scripted(&parts, declared) {
            return answer;
        }
        match fault {
            Some(Fault::SlowDown) => {
                self.stats.slow_downs.fetch_add(1, Ordering::Relaxed);
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                           <Message>Please reduce your request rate.</Message></Error>";
                return Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .header("content-type", "application/xml")
                    .body(full(Bytes::from(xml)))
                    .map_err(|e| io_error(&e.to_string()));
            }
            Some(Fault::DropBeforeAnswer) => {
                self.stats.drops_before_answer.fetch_add(1, Ordering::Relaxed);
                return Err(io_error("injected: dropped before answering"));
            }
            _ => {}
        }
        if parts.method == hyper::Method::PUT && !body.is_empty() {
            self.stats.uploads.fetch_add(1, Ordering::Relaxed);
            let sent = parts.headers.get("x-amz-checksum-sha256").and_then(|v| v.to_str().ok());
            let digest: [u8; 32] = Sha256::digest(&body).into();
            if sent != Some(base64(&digest).as_str()) {
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

        if fault == Some(Fault::DropMidResponse) && answer_body.len() > 1 {
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

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
