//! The raw-TCP baselines: what a request and its answer cost over loopback
//! between two processes when nothing of crew is in the way.
//!
//! The peer is this same binary started with [`PEER_ARG`]: it dials the
//! address it is given (as an agent dials its controller), then answers every
//! length-prefixed frame with a frame of a fixed size. Both ends use Tokio as
//! crew does (a current-thread runtime in the peer, like the agent), and the
//! frame sizes are those of a `noop` job's `Run` and `Done` frames, so that
//! the ratio against crew shows what crew adds on top of the transport:
//! encoding, the scheduler, locks and wake-ups.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::BytesMut;
use crew_core::job::JobId;
use crew_core::output::Timestamp;
use crew_core::protocol::{self, AgentMsg, ControllerMsg, RunJob};
use crew_core::{JobSpec, Status};
use crew_exec::JobResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The hidden first argument of `xtask bench` that makes it an echo peer:
/// `xtask bench __echo-peer ADDR REPLY_BYTES`.
pub(super) const PEER_ARG: &str = "__echo-peer";

/// Frames larger than this are refused (a peer never sends them).
const MAX_FRAME: usize = 1 << 20;

/// Bytes on the wire (length prefix included) of a `noop` job's `Run` frame
/// and of its `Done` frame.
pub(super) fn noop_frame_sizes() -> anyhow::Result<(usize, usize)> {
    let mut run = BytesMut::new();
    protocol::encode(
        &ControllerMsg::Run(Box::new(RunJob {
            job: JobId(12_345),
            attempt: 1,
            seed: u64::MAX / 3,
            spec: Arc::new(JobSpec::builtin("noop", serde_json::Value::Null)),
        })),
        &mut run,
    )
    .context("cannot encode a run frame")?;
    let now = Timestamp::now();
    let mut result = JobResult::new(Status::Succeeded, now, now);
    result.wall_seconds = 1e-6;
    let mut done = BytesMut::new();
    protocol::encode(&AgentMsg::Done { job: JobId(12_345), attempt: 1, result: Box::new(result) }, &mut done)
        .context("cannot encode a done frame")?;
    Ok((run.len(), done.len()))
}

/// The peer's `main`: dial, then answer every frame until the other end
/// closes.
pub(super) fn peer_main(args: &[OsString]) -> anyhow::Result<()> {
    let [addr, reply] = args else {
        bail!("usage: xtask bench {PEER_ARG} ADDR REPLY_BYTES");
    };
    let addr: SocketAddr =
        addr.to_str().and_then(|a| a.parse().ok()).with_context(|| format!("{PEER_ARG}: not an address: {addr:?}"))?;
    let reply: usize = reply
        .to_str()
        .and_then(|r| r.parse().ok())
        .filter(|r| (4..=MAX_FRAME).contains(r))
        .with_context(|| format!("{PEER_ARG}: not a frame size: {reply:?}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    rt.block_on(async move {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let answer = frame(reply);
        let mut buf = Vec::new();
        loop {
            match read_frame(&mut r, &mut buf).await {
                Ok(()) => w.write_all(&answer).await?,
                // The other end closed: the run is over.
                Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(is_eof) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
}

fn is_eof(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::UnexpectedEof
}

/// A frame of `size` bytes on the wire: a big-endian length, then zeros.
fn frame(size: usize) -> Vec<u8> {
    let payload = size.saturating_sub(4);
    let mut f = Vec::with_capacity(4 + payload);
    f.extend_from_slice(&(payload as u32).to_be_bytes());
    f.resize(4 + payload, 0);
    f
}

/// Reads one frame into `buf`.
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let len = r.read_u32().await? as usize;
    ensure!(len <= MAX_FRAME, "frame of {len} bytes: too large");
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// Peers started by this process, with their connections.
struct Peers {
    children: Vec<tokio::process::Child>,
    streams: Vec<TcpStream>,
}

impl Peers {
    /// Starts `count` peers answering with `reply`-byte frames and accepts
    /// their connections.
    async fn start(count: usize, reply: usize) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.context("cannot listen on loopback")?;
        let addr = listener.local_addr()?;
        let exe = std::env::current_exe().context("cannot find the xtask executable")?;
        let mut peers = Self { children: Vec::new(), streams: Vec::new() };
        for _ in 0..count {
            let child = tokio::process::Command::new(&exe)
                .args(["bench", PEER_ARG, &addr.to_string(), &reply.to_string()])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start the echo peer {}", exe.display()))?;
            peers.children.push(child);
        }
        for _ in 0..count {
            let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
                .await
                .context("an echo peer did not connect within 10 s")??;
            stream.set_nodelay(true)?;
            peers.streams.push(stream);
        }
        Ok(peers)
    }

    /// Closes the connections and waits for the peers to exit.
    async fn finish(mut self) -> anyhow::Result<()> {
        self.streams.clear();
        for child in &mut self.children {
            let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .context("an echo peer did not exit")??;
            ensure!(status.success(), "an echo peer failed ({status})");
        }
        Ok(())
    }
}

/// Request/response round trips, one at a time, with one peer.
pub(super) struct PingPong {
    peers: Peers,
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    req: Vec<u8>,
    buf: Vec<u8>,
}

impl PingPong {
    /// Starts a peer answering `request`-byte frames with `reply`-byte ones.
    pub(super) async fn start(request: usize, reply: usize) -> anyhow::Result<Self> {
        let mut peers = Peers::start(1, reply).await?;
        let Some(stream) = peers.streams.pop() else { bail!("no echo peer connected") };
        let (r, w) = stream.into_split();
        Ok(Self { peers, r: BufReader::new(r), w, req: frame(request), buf: Vec::new() })
    }

    /// One round trip: its time.
    pub(super) async fn trip(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.w.write_all(&self.req).await?;
        read_frame(&mut self.r, &mut self.buf).await?;
        Ok(t.elapsed())
    }

    /// Closes the connection and waits for the peer to exit.
    pub(super) async fn finish(self) -> anyhow::Result<()> {
        drop((self.r, self.w));
        self.peers.finish().await
    }
}

/// Messages per second through `peers` connections, each keeping `window`
/// requests outstanding (a job running and `window - 1` sent ahead), `n`
/// messages in all.
pub(super) async fn pipelined_rate(
    peers: usize,
    window: usize,
    n: usize,
    request: usize,
    reply: usize,
) -> anyhow::Result<f64> {
    let mut started = Peers::start(peers, reply).await?;
    let per_peer = n / peers;
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for stream in started.streams.drain(..) {
        tasks.push(tokio::spawn(pump(stream, window, per_peer, request)));
    }
    for t in tasks {
        t.await.context("a pump task panicked")??;
    }
    let elapsed = begin.elapsed();
    started.finish().await?;
    Ok((per_peer * peers) as f64 / elapsed.as_secs_f64())
}

/// Sends `count` requests over `stream`, never more than `window` unanswered.
async fn pump(stream: TcpStream, window: usize, count: usize, request: usize) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let req = frame(request);
    let mut buf = Vec::new();
    let mut sent = 0;
    while sent < window.min(count) {
        w.write_all(&req).await?;
        sent += 1;
    }
    for _ in 0..count {
        read_frame(&mut r, &mut buf).await?;
        if sent < count {
            w.write_all(&req).await?;
            sent += 1;
        }
    }
    Ok(())
}
