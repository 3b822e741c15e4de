//! The daemon's HTTP client: HTTP/1.1 over the project's Unix socket, JSON
//! in and out (docs/api.md is the contract).
//!
//! One [`Client`] is one connection, kept alive for the few requests of one
//! command (the health check and the command's own request share it). The
//! client is blocking on purpose: it owns a current-thread tokio runtime and
//! blocks on each request, because a command does one thing at a time and a
//! thread pool would only cost start-up time.

use std::fmt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An error answer of the daemon: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// The HTTP status.
    pub(crate) status: u16,
    /// The stable code (`unknown_class`, `no_matching_worker`, ...).
    pub(crate) code: crate::wire::ErrorCode,
    /// For people: what went wrong and how to fix it.
    pub(crate) message: String,
}

impl ApiError {
    /// True for a 4xx answer: the user's input was refused.
    pub(crate) fn is_client_error(&self) -> bool {
        (400..500).contains(&self.status)
    }
}

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// Nothing answers on the socket.
    Connect { socket: PathBuf, source: std::io::Error },
    /// The connection broke or spoke something other than HTTP.
    Http { path: String, source: hyper::Error },
    /// The daemon answered with an error.
    Api(ApiError),
    /// A success answer whose body is not what docs/api.md says.
    Decode { path: String, source: serde_json::Error },
    /// The local runtime could not start.
    Runtime(std::io::Error),
    /// A streamed answer could not be written out (a closed pipe).
    Output(std::io::Error),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { socket, source } => {
                write!(f, "cannot connect to the crew daemon at {}: {source}", socket.display())
            }
            ClientError::Http { path, source } => write!(f, "the request {path} to the crew daemon failed: {source}"),
            ClientError::Api(e) => f.write_str(&e.message),
            ClientError::Decode { path, source } => {
                write!(
                    f,
                    "the crew daemon's answer to {path} is not understood: {source} (is it another version of crew?)"
                )
            }
            ClientError::Runtime(e) => write!(f, "cannot start the I/O runtime: {e}"),
            ClientError::Output(e) => write!(f, "cannot write the daemon's answer out: {e}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } => Some(source),
            ClientError::Http { source, .. } => Some(source),
            ClientError::Decode { source, .. } => Some(source),
            ClientError::Runtime(e) | ClientError::Output(e) => Some(e),
            ClientError::Api(_) => None,
        }
    }
}

/// What [`Client::post_lines`] hands each line of an answer to.
pub(crate) type LineSink<'a> = dyn FnMut(Option<&[u8]>) -> Result<(), ClientError> + 'a;

/// A request body: whole, or streamed piece by piece.
type ReqBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn whole(bytes: Bytes) -> ReqBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// A connection to a crew daemon.
pub(crate) struct Client {
    rt: tokio::runtime::Runtime,
    sender: SendRequest<ReqBody>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon listening on `socket`.
    pub(crate) fn connect(socket: &Path) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ClientError::Runtime)?;
        let sender = rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|source| ClientError::Connect { socket: socket.to_owned(), source })?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ClientError::Http { path: "(handshake)".to_owned(), source })?;
            // The connection task runs whenever a request is being awaited.
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, ClientError>(sender)
        })?;
        Ok(Self { rt, sender })
    }

    /// `GET path`, decoding the JSON answer.
    pub(crate) fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        let body = self.request(Method::GET, path, None)?;
        decode(path, &body)
    }

    /// `POST path` with `body` as JSON, decoding the JSON answer.
    pub(crate) fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Decode { path: path.to_owned(), source })?;
        self.post_raw(path, bytes)
    }

    /// `POST path` with an already serialized JSON body.
    pub(crate) fn post_raw<T: DeserializeOwned>(&mut self, path: &str, body: Vec<u8>) -> Result<T, ClientError> {
        let answer = self.request(Method::POST, path, Some(body))?;
        decode(path, &answer)
    }

    /// `GET path`, writing the answer's body to `out` piece by piece as it
    /// arrives (a streamed log: flat memory whatever its size). Returns the
    /// bytes written.
    pub(crate) fn get_stream(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, ClientError> {
        let http = |source| ClientError::Http { path: path.to_owned(), source };
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(hyper::header::HOST, "crew")
            .body(whole(Bytes::new()))
            .map_err(|e| {
                ClientError::Api(ApiError {
                    status: 0,
                    code: crate::wire::ErrorCode::BadRequest,
                    message: format!("cannot build the request {path}: {e}"),
                })
            })?;
        let Self { rt, sender } = self;
        rt.block_on(async {
            sender.ready().await.map_err(http)?;
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body.collect().await.map_err(http)?.to_bytes();
                return Err(ClientError::Api(api_error(status, &bytes)));
            }
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(http)?.into_data() {
                    out.write_all(&data).map_err(ClientError::Output)?;
                    n += data.len() as u64;
                }
            }
            out.flush().map_err(ClientError::Output)?;
            Ok(n)
        })
    }

    /// `POST path` with a body streamed from `pieces` (of media type
    /// `content_type`), decoding the JSON answer. An `Err` piece aborts the
    /// request: the daemon sees a body cut short and does nothing with it.
    pub(crate) fn post_stream<T: DeserializeOwned>(
        &mut self,
        path: &str,
        content_type: &str,
        pieces: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    ) -> Result<T, ClientError> {
        let stream = futures::stream::unfold(pieces, |mut rx| async move {
            rx.recv().await.map(|piece| (piece.map(Frame::data), rx))
        });
        let body = StreamBody::new(stream).boxed_unsync();
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, "crew")
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(body)
            .map_err(|e| {
                ClientError::Api(ApiError {
                    status: 0,
                    code: crate::wire::ErrorCode::BadRequest,
                    message: format!("cannot build the request {path}: {e}"),
                })
            })?;
        let bytes = self.send(path, req)?;
        decode(path, &bytes)
    }

    /// `POST path` with `body` as JSON; the answer's body is handed to
    /// `each` line by line as it arrives (`Some(line)`, without its
    /// newline), so that a long answer is never held whole, and `None`
    /// after each piece that arrived (a moment to flush what was made of
    /// it).
    pub(crate) fn post_lines<B: Serialize + ?Sized>(
        &mut self,
        path: &str,
        body: &B,
        each: &mut LineSink<'_>,
    ) -> Result<(), ClientError> {
        let http = |source| ClientError::Http { path: path.to_owned(), source };
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Decode { path: path.to_owned(), source })?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, "crew")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(whole(Bytes::from(bytes)))
            .map_err(|e| {
                ClientError::Api(ApiError {
                    status: 0,
                    code: crate::wire::ErrorCode::BadRequest,
                    message: format!("cannot build the request {path}: {e}"),
                })
            })?;
        let Self { rt, sender } = self;
        rt.block_on(async {
            sender.ready().await.map_err(http)?;
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body.collect().await.map_err(http)?.to_bytes();
                return Err(ClientError::Api(api_error(status, &bytes)));
            }
            let mut partial: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map_err(http)?.into_data() else { continue };
                let mut rest: &[u8] = &data;
                while let Some(i) = rest.iter().position(|&b| b == b'\n') {
                    if partial.is_empty() {
                        each(Some(&rest[..i]))?;
                    } else {
                        partial.extend_from_slice(&rest[..i]);
                        each(Some(&partial))?;
                        partial.clear();
                    }
                    rest = &rest[i + 1..];
                }
                partial.extend_from_slice(rest);
                each(None)?;
            }
            if !partial.is_empty() {
                each(Some(&partial))?;
            }
            Ok(())
        })
    }

    /// Sends one request; a success answer's body, or the error it maps to.
    fn request(&mut self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, ClientError> {
        let mut req = Request::builder().method(method).uri(path).header(hyper::header::HOST, "crew");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(whole(Bytes::from(body.unwrap_or_default()))).map_err(|e| {
            ClientError::Api(ApiError {
                status: 0,
                code: crate::wire::ErrorCode::BadRequest,
                message: format!("cannot build the request {path}: {e}"),
            })
        })?;
        self.send(path, req)
    }

    /// Sends a request built; a success answer's body, or the error it
    /// maps to.
    fn send(&mut self, path: &str, req: Request<ReqBody>) -> Result<Bytes, ClientError> {
        let http = |source| ClientError::Http { path: path.to_owned(), source };
        let Self { rt, sender } = self;
        let (status, bytes) = rt.block_on(async {
            sender.ready().await.map_err(http)?;
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok::<_, ClientError>((status, bytes))
        })?;
        if status.is_success() { Ok(bytes) } else { Err(ClientError::Api(api_error(status, &bytes))) }
    }
}

fn decode<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Decode { path: path.to_owned(), source })
}

/// Maps an error answer to an [`ApiError`]; a body that is not the
/// documented error object still gives a readable message.
fn api_error(status: StatusCode, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<crate::wire::ErrorAnswer>(body) {
        Ok(w) => ApiError { status: status.as_u16(), code: w.error.code, message: w.error.message },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(200).collect();
            let code = if status.is_server_error() {
                crate::wire::ErrorCode::Internal
            } else {
                crate::wire::ErrorCode::BadRequest
            };
            ApiError {
                status: status.as_u16(),
                code,
                message: format!(
                    "the crew daemon answered {status}{}",
                    if text.is_empty() { String::new() } else { format!(": {text}") }
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    use super::*;

    /// A request as the fake server saw it.
    #[derive(Debug)]
    struct Seen {
        head: String,
        body: String,
    }

    /// Serves one connection on a fresh socket: answers each request in
    /// `answers` (status line, body) in turn and reports what it read.
    fn fake_server(answers: Vec<(&'static str, &'static str)>) -> (tempfile::TempDir, PathBuf, mpsc::Receiver<Seen>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("crew.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else { return };
            let mut buf = Vec::new();
            for (status, body) in answers {
                // Read one request: the head, then content-length bytes.
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let req_body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
                buf.drain(..head_end + len);
                let _ = tx.send(Seen { head, body: req_body });
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        });
        (dir, sock, rx)
    }

    #[test]
    fn requests_are_json_http_on_one_connection() {
        let (_dir, sock, seen) = fake_server(vec![
            ("200 OK", r#"{"ok":true,"pid":42,"version":"0.1.0","dir":"/x"}"#),
            ("200 OK", r#"{"slots":["local-1","local-2"]}"#),
        ]);
        let mut client = Client::connect(&sock).expect("connect");
        let health: serde_json::Value = client.get("/v1/health").expect("health");
        assert_eq!(health["pid"], 42);
        let body = serde_json::json!({"class": "local", "workers": 2});
        let answer: serde_json::Value = client.post("/v1/recruit", &body).expect("recruit");
        assert_eq!(answer["slots"][1], "local-2");

        let get = seen.recv().expect("first request");
        assert!(get.head.starts_with("GET /v1/health HTTP/1.1\r\n"), "{get:?}");
        assert!(get.body.is_empty());
        let post = seen.recv().expect("second request on the same connection");
        assert!(post.head.starts_with("POST /v1/recruit HTTP/1.1\r\n"), "{post:?}");
        assert!(post.head.to_ascii_lowercase().contains("content-type: application/json"), "{post:?}");
        let sent: serde_json::Value = serde_json::from_str(&post.body).expect("a JSON body");
        assert_eq!(sent, body);
    }

    #[test]
    fn error_bodies_map_to_api_errors() {
        let (_dir, sock, _seen) = fake_server(vec![(
            "400 Bad Request",
            r#"{"error":{"code":"unknown_class","message":"unknown worker class \"gpu\"; known classes: local"}}"#,
        )]);
        let mut client = Client::connect(&sock).expect("connect");
        let err = client.post::<_, serde_json::Value>("/v1/recruit", &serde_json::json!({})).expect_err("an error");
        let ClientError::Api(api) = &err else { panic!("not an API error: {err:?}") };
        assert_eq!(api.status, 400);
        assert_eq!(api.code, crate::wire::ErrorCode::UnknownClass);
        assert!(api.is_client_error());
        assert_eq!(err.to_string(), "unknown worker class \"gpu\"; known classes: local");
    }

    #[test]
    fn an_unexpected_error_body_still_reads_well() {
        let (_dir, sock, _seen) = fake_server(vec![("502 Bad Gateway", "upstream gone")]);
        let mut client = Client::connect(&sock).expect("connect");
        let err = client.get::<serde_json::Value>("/v1/status").expect_err("an error");
        let ClientError::Api(api) = &err else { panic!("not an API error: {err:?}") };
        assert_eq!((api.status, api.code), (502, crate::wire::ErrorCode::Internal));
        assert!(!api.is_client_error());
        assert!(api.message.contains("502") && api.message.contains("upstream gone"), "{api:?}");
    }

    #[test]
    fn a_success_body_that_is_not_json_is_a_decode_error() {
        let (_dir, sock, _seen) = fake_server(vec![("200 OK", "not json")]);
        let mut client = Client::connect(&sock).expect("connect");
        let err = client.get::<serde_json::Value>("/v1/status").expect_err("an error");
        assert!(matches!(err, ClientError::Decode { .. }), "{err:?}");
        assert!(err.to_string().contains("/v1/status"), "{err}");
    }

    #[test]
    fn no_daemon_is_a_clear_connect_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("crew.sock");
        let err = Client::connect(&sock).expect_err("nothing listens");
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("cannot connect to the crew daemon") && text.contains("crew.sock"), "{text}");

        // A stale socket file (its listener gone) refuses the connection.
        drop(UnixListener::bind(&sock).expect("bind"));
        let err = Client::connect(&sock).expect_err("refused");
        assert!(
            matches!(&err, ClientError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
    }
}
