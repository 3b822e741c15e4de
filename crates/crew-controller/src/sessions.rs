//! Worker sessions: the listener, the handshake (hello, resume, TLS), one
//! connection per agent with its reader and writer, and what its frames do.

use super::*;

/// One agent connection.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) slot: SlotId,
    /// The slot's name, for logs.
    pub(crate) name: String,
    pub(crate) stream: Arc<Link>,
    pub(crate) out: Mutex<BytesMut>,
    pub(crate) writer_wake: Notify,
    pub(crate) closed: CancellationToken,
    pub(crate) last_recv_ms: AtomicU64,
    pub(crate) last_sent_ms: AtomicU64,
    pub(crate) broken: AtomicBool,
    /// The writer task owns the buffer's head until it drained it (the
    /// socket was full); direct writes wait meanwhile, to keep frame order.
    pub(crate) pending_write: AtomicBool,
    /// Frames wait in `out` unwritten while set: until the observer has
    /// the connection on record ([`Observer::connected_durably`]).
    pub(crate) held: AtomicBool,
    /// Object lists of results in parts ([`AgentMsg::Objects`]), by job
    /// and attempt, until their `Done`; `true` when the list passed
    /// [`MAX_RESULT_OBJECTS`].
    pub(crate) objects: Mutex<HashMap<(JobId, u32), ObjectParts>>,
}

/// The parts of one result's object list received so far, and whether it
/// passed [`MAX_RESULT_OBJECTS`].
pub(crate) type ObjectParts = (Vec<crew_core::staging::StoredObject>, bool);

/// The most output objects one result may list; a job that uploaded more
/// ends `failed` with a reason (the controller's memory is the bound).
pub const MAX_RESULT_OBJECTS: usize = 1_000_000;

impl Conn {
    /// Queues a frame and writes as much as the socket takes now.
    pub(crate) fn send(&self, msg: &ControllerMsg, now_ms: u64) {
        if self.queue(msg, now_ms) {
            self.flush();
        }
    }

    /// Appends a frame to the outgoing buffer without writing; returns
    /// false when it could not be encoded (logged). Callers batch several
    /// frames and [`Conn::flush`] once.
    pub(crate) fn queue(&self, msg: &ControllerMsg, now_ms: u64) -> bool {
        let mut out = lock(&self.out);
        if let Err(e) = protocol::encode(msg, &mut out) {
            warn!(slot = %self.name, "dropping a frame that cannot be encoded: {e}");
            return false;
        }
        self.last_sent_ms.store(now_ms, Ordering::Relaxed);
        true
    }

    /// Writes what the socket takes now; the writer task gets the rest.
    pub(crate) fn flush(&self) {
        let mut out = lock(&self.out);
        if out.is_empty() || self.pending_write.load(Ordering::Relaxed) || self.held.load(Ordering::Relaxed) {
            return;
        }
        match self.stream.try_write(&out) {
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                debug!(slot = %self.name, "write failed: {e}");
                self.broken.store(true, Ordering::Relaxed);
                self.closed.cancel();
                return;
            }
        }
        if !out.is_empty() {
            self.pending_write.store(true, Ordering::Relaxed);
            self.writer_wake.notify_one();
        }
    }
}

impl Shared {
    /// Validates a hello; returns the slot and its welcome.
    pub(crate) fn admit(
        self: &Arc<Self>,
        core: &mut Core,
        launch: &str,
        index: u32,
        token: &Secret,
        version: u32,
    ) -> Result<(SlotId, ControllerMsg), String> {
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version mismatch: the agent speaks {version}, the controller {PROTOCOL_VERSION}; use the same crew version on both sides"
            ));
        }
        let id: u64 = launch.parse().map_err(|_| "unknown launch".to_owned())?;
        let l = core.launches.get_mut(&id).ok_or("unknown or expired launch")?;
        // The launch secret (classes that start their own processes), or
        // the member's own secret: valid for that index only.
        if !l.secret.matches(token.expose()) && !l.secret.member_secret(index).matches(token.expose()) {
            return Err("invalid token".into());
        }
        let member = l.members.get_mut(index as usize).ok_or("invalid member index")?;
        if member.1 {
            return Err("this launch member already connected (tokens are single-use)".into());
        }
        member.1 = true;
        let slot = member.0;
        if l.members.iter().all(|m| m.1) {
            core.launches.remove(&id);
        }
        if core.slots[slot.0 as usize].launch != Some(id) {
            return Err("the slot no longer waits for this launch".into());
        }
        let cfg = core.sched.slot_config(slot);
        let welcome = ControllerMsg::Welcome {
            version: PROTOCOL_VERSION,
            slot: cfg.name.clone(),
            // The controller stops idle workers itself; the agent's own
            // limit only guards against a controller that vanished without
            // closing the connection.
            idle_timeout: cfg
                .limits
                .idle_timeout
                .map(|d| d.saturating_add(self.config.heartbeat.saturating_mul(self.config.heartbeat_misses))),
            tasks_max: cfg.limits.tasks_max,
            heartbeat: self.config.heartbeat,
            store: self.config.store.as_ref().map(|s| s.url()),
            resume: self
                .config
                .resume
                .as_ref()
                .map(|r| protocol::ResumeGrant { token: r.slot_token(&cfg.name), window: r.window }),
        };
        Ok((slot, welcome))
    }

    /// Validates the hello of an agent that comes back after a controller
    /// restart; returns the slot and its welcome.
    pub(crate) fn admit_resume(
        self: &Arc<Self>,
        core: &mut Core,
        name: &str,
        token: &Secret,
        version: u32,
        jobs: &[(JobId, u32)],
    ) -> Result<(SlotId, ControllerMsg), String> {
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version mismatch: the agent speaks {version}, the controller {PROTOCOL_VERSION}"
            ));
        }
        let resume = self.config.resume.as_ref().ok_or("this controller takes no workers back")?;
        let slot = core.sched.slot_by_name(name).ok_or("unknown slot")?;
        if !resume.slot_token(name).matches(token.expose()) {
            return Err("invalid reconnect credential".into());
        }
        if core.slots[slot.0 as usize].conn.is_some() || !core.sched.resumed(slot, jobs, Instant::now()) {
            return Err("the slot does not wait for its worker to come back".into());
        }
        let rt = &mut core.slots[slot.0 as usize];
        rt.launch = None;
        rt.handle = None;
        let cfg = core.sched.slot_config(slot);
        let welcome = ControllerMsg::Welcome {
            version: PROTOCOL_VERSION,
            slot: cfg.name.clone(),
            idle_timeout: cfg
                .limits
                .idle_timeout
                .map(|d| d.saturating_add(self.config.heartbeat.saturating_mul(self.config.heartbeat_misses))),
            tasks_max: cfg.limits.tasks_max,
            heartbeat: self.config.heartbeat,
            store: self.config.store.as_ref().map(|s| s.url()),
            resume: Some(protocol::ResumeGrant { token: resume.slot_token(&cfg.name), window: resume.window }),
        };
        Ok((slot, welcome))
    }

    /// Handles frames from a connected agent.
    pub(crate) fn on_messages(self: &Arc<Self>, conn: &Arc<Conn>, msgs: Vec<AgentMsg>) {
        let mut core = lock(&self.core);
        let slot = conn.slot;
        if core.slots[slot.0 as usize].conn.as_ref().is_none_or(|c| c.id != conn.id) {
            return;
        }
        let now = Instant::now();
        for msg in msgs {
            match msg {
                AgentMsg::Objects { job, attempt, objects } => {
                    let mut parts = lock(&conn.objects);
                    let (list, overflow) = parts.entry((job, attempt)).or_default();
                    if list.len() + objects.len() > MAX_RESULT_OBJECTS {
                        *overflow = true;
                    } else {
                        list.extend(objects);
                    }
                }
                AgentMsg::Done { job, attempt, result } => {
                    let parts = {
                        let mut parts = lock(&conn.objects);
                        if parts.is_empty() { None } else { parts.remove(&(job, attempt)) }
                    };
                    let Some(spec) = core.sched.job(job).cloned() else { continue };
                    let cfg = core.sched.slot_config(slot);
                    let mut r = *result;
                    if let Some((mut objects, overflow)) = parts {
                        if overflow || objects.len() + r.objects.len() > MAX_RESULT_OBJECTS {
                            r.status = Status::Failed;
                            r.error = Some(format!(
                                "the job uploaded more than {MAX_RESULT_OBJECTS} output files, more than one \
                                 record may list; narrow its output patterns, or archive the files into fewer"
                            ));
                            objects.clear();
                            r.objects.clear();
                        }
                        objects.append(&mut r.objects);
                        r.objects = objects;
                    }
                    let mut output = Output::from_result(job, &spec, r);
                    output.slot = Some(cfg.name.clone());
                    output.class = Some(cfg.class.clone());
                    output.attempt = attempt;
                    output.seed = core.sched.job_seed(job).unwrap_or(0);
                    core.sched.finished(slot, job, output, now);
                }
                AgentMsg::Revoked { job, ok } => {
                    tracing::trace!(%job, ok, slot = slot.0, "revoked");
                    core.sched.revoked(slot, job, ok, now);
                }
                AgentMsg::Heartbeat => {}
                AgentMsg::Bye { reason } => {
                    debug!(slot = %core.sched.slot_config(slot).name, reason, "agent leaving");
                }
                AgentMsg::Hello { .. } | AgentMsg::Resume { .. } => {
                    warn!(slot = %core.sched.slot_config(slot).name, "second hello on a connection; closing it");
                    conn.closed.cancel();
                }
            }
        }
        self.apply(&mut core);
    }

    /// A connection ended.
    pub(crate) fn on_closed(self: &Arc<Self>, conn: &Arc<Conn>, reason: &str) {
        conn.closed.cancel();
        let mut core = lock(&self.core);
        let slot = conn.slot;
        let busy = core.sched.slot_state(slot) == SlotState::Up
            && core.sched.slots().nth(slot.0 as usize).is_some_and(|v| v.id == slot && v.assigned > 0);
        let rt = &mut core.slots[slot.0 as usize];
        if rt.conn.as_ref().is_none_or(|c| c.id != conn.id) {
            return;
        }
        // The handle stays until the slot launches again, so that `close`
        // can still terminate a process on its way out.
        rt.conn = None;
        if let Some(observer) = &self.config.observer {
            observer.disconnected(&conn.name);
        }
        // A worker of a remote platform that went under a job: ask the
        // platform why before the job counts a crash, so that the slot and
        // the job's record carry its words (a Slurm TIMEOUT or
        // OUT_OF_MEMORY, a Spot reclaim) rather than only "the connection
        // closed". Bounded: a platform that still says running after two
        // probe intervals leaves the connection's reason.
        let remote = !rt.class.capabilities().reaches_loopback;
        if let (Some(handle), true, true) = (rt.handle.clone(), remote, busy) {
            let shared = self.clone();
            let class = rt.class.clone();
            let reason = reason.to_owned();
            tokio::spawn(async move { shared.lost_after_probe(slot, class, handle, reason).await });
            return;
        }
        // A worker that stopped answering may still be running its job (a
        // stopped or partitioned agent): make sure it is gone before the
        // job runs elsewhere. Terminating an exited worker is a no-op.
        if let Some(handle) = rt.handle.clone() {
            let class = rt.class.clone();
            tokio::spawn(async move {
                if let Err(e) = class.terminate(&[handle]).await {
                    warn!("terminating a lost worker failed: {e}");
                }
            });
        }
        let now = Instant::now();
        self.note_crash(&core, slot, reason);
        core.sched.lost(slot, reason, now);
        self.apply(&mut core);
        self.timer_wake.notify_one();
    }
}

impl Shared {
    /// [`Shared::on_closed`] for a remote worker that had a job: probes it
    /// until its platform reports its end (at most about two probe
    /// intervals), then terminates it and counts the loss with the
    /// platform's reason and the connection's.
    async fn lost_after_probe(self: Arc<Self>, slot: SlotId, class: Arc<dyn Worker>, handle: Handle, reason: String) {
        let interval = class.capabilities().probe_interval;
        let deadline = Instant::now() + (interval * 2).max(Duration::from_secs(2)) + Duration::from_secs(1);
        let mut why = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), class.probe(std::slice::from_ref(&handle))).await {
                Ok(Ok(lives)) => match lives.into_iter().next() {
                    Some(Liveness::Exited { reason }) => {
                        why = Some(reason);
                        break;
                    }
                    Some(Liveness::Running | Liveness::Starting) => {}
                    _ => break,
                },
                _ => break,
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(interval.clamp(Duration::from_millis(50), Duration::from_millis(500))).await;
        }
        // As for any lost worker: gone before the job runs elsewhere.
        let class2 = class.clone();
        let h = handle.clone();
        tokio::spawn(async move {
            if let Err(e) = class2.terminate(&[h]).await {
                warn!("terminating a lost worker failed: {e}");
            }
        });
        let mut core = lock(&self.core);
        let rt = &core.slots[slot.0 as usize];
        if rt.handle.as_ref() != Some(&handle) || rt.conn.is_some() {
            return;
        }
        let reason = match why {
            // Not twice when the platform's word closed the connection.
            Some(why) if !reason.contains(&why) => format!("{why} ({reason})"),
            _ => reason,
        };
        self.note_crash(&core, slot, &reason);
        core.sched.lost(slot, &reason, Instant::now());
        self.apply(&mut core);
        self.timer_wake.notify_one();
    }
}

/// Connections waiting for their hello, by default
/// ([`ControllerConfig::max_handshakes`]).
pub const MAX_HANDSHAKES: usize = 64;

/// The largest hello frame read: a hello is a few short fields, and
/// nothing bigger is read from a peer that has not authenticated.
pub const MAX_HELLO: usize = 64 * 1024;

/// How much of what a rejected peer sent a log line may carry.
pub(crate) const LOGGED_PREFIX: usize = 32;

/// Connections waiting for their hello. Past the cap, the listener takes
/// no more from the kernel's queue until a place frees or the oldest has
/// waited [`HANDSHAKE_GRACE`], which is then closed to make room: a burst
/// of real agents (a hundred launched at once) waits its turn and loses
/// none, while a flood of silent connections cannot keep a real agent
/// out for long.
#[derive(Default)]
pub(crate) struct Handshakes {
    pub(crate) next: u64,
    pub(crate) waiting: BTreeMap<u64, (SocketAddr, Instant, CancellationToken)>,
    /// Told when a place frees.
    pub(crate) freed: Arc<Notify>,
}

/// How long a connection holds its place at the cap before a newer one
/// may take it (at most the hello timeout): long enough for an agent whose
/// hello is on its way, short enough that silent connections give way.
pub(crate) const HANDSHAKE_GRACE: Duration = Duration::from_secs(1);

/// One connection's place in [`Handshakes`]; dropped once its hello was
/// read (or it failed), which frees the place.
pub(crate) struct Waiting {
    pub(crate) all: Arc<Mutex<Handshakes>>,
    pub(crate) id: u64,
    pub(crate) cancelled: CancellationToken,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut all = lock(&self.all);
        if all.waiting.remove(&self.id).is_some() {
            all.freed.notify_one();
        }
    }
}

/// At most `max` characters of `text` (a reason that may quote what a
/// peer sent), marked when cut.
pub(crate) fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}… (cut)")
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let freed = lock(&handshakes).freed.clone();
    let cap = shared.config.max_handshakes.max(1);
    let grace = HANDSHAKE_GRACE.min(shared.config.hello_timeout);
    loop {
        // A place for one more connection first (see `Handshakes`).
        loop {
            let wait = {
                let mut h = lock(&handshakes);
                if h.waiting.len() < cap {
                    break;
                }
                let Some((_, &(_, since, _))) = h.waiting.first_key_value() else { break };
                let waited = since.elapsed();
                if waited >= grace {
                    if let Some((_, (oldest, _, token))) = h.waiting.pop_first() {
                        token.cancel();
                        warn!(
                            peer = %oldest,
                            "closed a worker connection: {cap} connections were waiting for their hello, \
                             this one for {waited:.1?} (the oldest makes room)"
                        );
                    }
                    continue;
                }
                grace - waited
            };
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                () = freed.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let waiting = {
                    let mut h = lock(&handshakes);
                    let id = h.next;
                    h.next += 1;
                    let cancelled = CancellationToken::new();
                    h.waiting.insert(id, (peer, Instant::now(), cancelled.clone()));
                    Waiting { all: handshakes.clone(), id, cancelled }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let token = waiting.cancelled.clone();
                    let link = tokio::select! {
                        () = token.cancelled() => return,
                        link = open_link(&shared, stream, peer) => link,
                    };
                    if let Some(link) = link {
                        serve_connection(shared, link, peer, waiting).await;
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep going.
                warn!("accepting a worker connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The first byte of a TLS connection (a handshake record); a crew frame
/// starts with the high byte of its length, 0 below 16 MiB.
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Sorts a new connection out: plaintext as it is where allowed, TLS
/// unwrapped into a socket pair; `None` when it was refused (logged).
pub(crate) async fn open_link(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) -> Option<Link> {
    let Some(tls) = &shared.tls else { return Some(Link::Tcp(stream)) };
    let mut first = [0u8; 1];
    let limit = shared.config.hello_timeout;
    // One budget for the first byte and the TLS handshake.
    let deadline = crew_core::clock::after_tokio(tokio::time::Instant::now(), limit);
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(Ok(_)) => return None,
        Ok(Err(e)) => {
            debug!(%peer, "connection failed before its first byte: {e}");
            return None;
        }
        Err(_) => {
            warn!(%peer, "rejected a worker connection: nothing sent within {limit:?}");
            return None;
        }
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if shared.loopback.is_some() && peer.ip().to_canonical().is_loopback() {
            return Some(Link::Tcp(stream));
        }
        let reason = "this controller takes TLS connections only from there; the agent needs the \
                      certificate fingerprint in CREW_TLS_SHA256 (set by the controller at launch)";
        warn!(%peer, "rejected a plaintext worker connection: {reason}");
        let mut out = BytesMut::new();
        if protocol::encode(&ControllerMsg::Reject { reason: reason.to_owned() }, &mut out).is_ok() {
            let _ = stream.try_write(&out);
        }
        return None;
    }
    let tls_stream = match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer, "rejected a worker connection: TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            warn!(%peer, "rejected a worker connection: no TLS handshake within {limit:?}");
            return None;
        }
    };
    let (ours, theirs) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            warn!(%peer, "could not serve a TLS connection: {e}");
            return None;
        }
    };
    tokio::spawn(relay(tls_stream, ours, shared.stop.clone()));
    Some(Link::Unix(theirs))
}

/// Moves bytes between a TLS connection and its plaintext socket. It ends
/// when the controller's side closes (the agent is then told, by a TLS
/// close, and dropped whatever it does), when the connection fails, or when
/// the controller stops; an agent that half-closes only ends the way in.
pub(crate) async fn relay(tls: tokio_rustls::server::TlsStream<TcpStream>, plain: UnixStream, stop: CancellationToken) {
    use tokio::io::AsyncWriteExt;
    let (mut tls_r, mut tls_w) = tokio::io::split(tls);
    let (mut plain_r, mut plain_w) = plain.into_split();
    let inbound = async {
        let r = tokio::io::copy(&mut tls_r, &mut plain_w).await;
        let _ = plain_w.shutdown().await;
        r
    };
    let outbound = async {
        let r = tokio::io::copy(&mut plain_r, &mut tls_w).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), tls_w.shutdown()).await;
        r
    };
    let stopped = {
        tokio::pin!(inbound, outbound);
        let mut inbound_done = false;
        loop {
            tokio::select! {
                r = &mut outbound => {
                    if let Err(e) = r {
                        debug!("TLS relay ended: {e}");
                    }
                    break false;
                }
                r = &mut inbound, if !inbound_done => {
                    inbound_done = true;
                    if let Err(e) = r {
                        debug!("TLS relay ended: {e}");
                        break false;
                    }
                }
                _ = stop.cancelled() => break true,
            }
        }
    };
    if stopped {
        // The controller is gone: a TLS close, so that the agent reads an
        // end and not a broken connection.
        let _ = tokio::time::timeout(Duration::from_millis(200), tls_w.shutdown()).await;
    }
}

/// An agent connection as the controller reads and writes it: the TCP
/// socket itself, or the plaintext end of a TLS relay.
pub(crate) enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Link {
    pub(crate) async fn readable(&self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.readable().await,
            Link::Unix(s) => s.readable().await,
        }
    }

    pub(crate) async fn writable(&self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.writable().await,
            Link::Unix(s) => s.writable().await,
        }
    }

    pub(crate) fn try_read_buf(&self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.try_read_buf(buf),
            Link::Unix(s) => s.try_read_buf(buf),
        }
    }

    /// Reads what the socket holds into `buf` (with room for at least
    /// [`READ_ROOM`] more bytes). A read that did not fill the room drained
    /// the socket (a stream socket returns all it has, up to the room), so
    /// its read readiness is cleared then, without the further `recv` that
    /// would only return `EWOULDBLOCK`: one system call less per frame on
    /// a single-job round trip, as tokio's own `AsyncRead` does. The
    /// readiness cleared is the one seen before the read (`try_io` takes it
    /// first): an event for bytes that arrived after the read is kept.
    pub(crate) fn read_some(&self, buf: &mut BytesMut) -> std::io::Result<usize> {
        buf.reserve(READ_ROOM);
        let room = buf.capacity() - buf.len();
        let mut got = 0;
        let r = match self {
            Link::Tcp(s) => {
                s.try_io(tokio::io::Interest::READABLE, || drained_if_short(s.try_read_buf(buf), room, &mut got))
            }
            Link::Unix(s) => {
                s.try_io(tokio::io::Interest::READABLE, || drained_if_short(s.try_read_buf(buf), room, &mut got))
            }
        };
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            r => r,
        }
    }

    pub(crate) fn try_write(&self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.try_write(data),
            Link::Unix(s) => s.try_write(data),
        }
    }
}

/// Room a connection's read buffer has before each read.
const READ_ROOM: usize = 16 * 1024;

/// A read of `n` bytes that did not fill `room` drained the socket: said as
/// `WouldBlock` so that `try_io` clears the readiness; `got` keeps `n`.
fn drained_if_short(read: std::io::Result<usize>, room: usize, got: &mut usize) -> std::io::Result<usize> {
    let n = read?;
    *got = n;
    if n > 0 && n < room { Err(std::io::Error::from(std::io::ErrorKind::WouldBlock)) } else { Ok(n) }
}

pub(crate) async fn serve_connection(shared: Arc<Shared>, stream: Link, peer: SocketAddr, waiting: Waiting) {
    let stream = Arc::new(stream);
    let mut buf = BytesMut::with_capacity(4 * 1024);
    // The handshake: one hello within the timeout, of at most MAX_HELLO
    // bytes (checked on its length, before its bytes are read); closed
    // at once when too many others wait.
    let token = waiting.cancelled.clone();
    let hello = tokio::time::timeout(shared.config.hello_timeout, async {
        loop {
            if buf.len() >= 4 {
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if len > MAX_HELLO {
                    let prefix = &buf[..buf.len().min(LOGGED_PREFIX)];
                    return Err(format!(
                        "a hello of {len} bytes is larger than the limit of {MAX_HELLO} (it began {:?})",
                        String::from_utf8_lossy(prefix)
                    ));
                }
            }
            if token.is_cancelled() {
                return Err("too many connections were waiting for their hello".to_owned());
            }
            match protocol::decode::<AgentMsg>(&mut buf) {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            tokio::select! {
                r = stream.readable() => r.map_err(|e| e.to_string())?,
                () = token.cancelled() => {}
            }
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return Err("connection closed before the hello".to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    drop(waiting);
    let hello = match hello {
        Ok(Ok(m)) => m,
        Ok(Err(reason)) => {
            // The reason may quote what the peer sent: a short prefix only.
            warn!(%peer, "rejected a worker connection: {}", short(&reason, 200));
            return;
        }
        Err(_) => {
            warn!(%peer, "rejected a worker connection: no hello within {:?}", shared.config.hello_timeout);
            return;
        }
    };
    let (pid, host, resuming) = match &hello {
        AgentMsg::Hello { pid, host, .. } => (*pid, host.clone(), false),
        AgentMsg::Resume { pid, host, .. } => (*pid, host.clone(), true),
        _ => {
            warn!(%peer, "rejected a worker connection: the first frame was not a hello");
            return;
        }
    };
    let conn;
    let mut durable = None;
    {
        let mut core = lock(&shared.core);
        let (launch, index) = match &hello {
            AgentMsg::Hello { launch, index, .. } => (launch.clone(), *index),
            AgentMsg::Resume { slot, .. } => (format!("resume of {slot}"), 0),
            _ => return,
        };
        let admitted = if core.closing {
            Err("the controller is closing".to_owned())
        } else {
            match &hello {
                AgentMsg::Hello { version, launch, index, token, .. } => {
                    shared.admit(&mut core, launch, *index, token, *version)
                }
                AgentMsg::Resume { version, slot, token, jobs, .. } => {
                    shared.admit_resume(&mut core, slot, token, *version, jobs)
                }
                _ => return,
            }
        };
        let (slot, welcome) = match admitted {
            Ok(x) => x,
            Err(reason) => {
                drop(core);
                warn!(%peer, launch = %short(&launch, LOGGED_PREFIX), index, "rejected a worker connection: {reason}");
                let mut out = BytesMut::new();
                if protocol::encode(&ControllerMsg::Reject { reason }, &mut out).is_ok() {
                    let _ = stream.try_write(&out);
                }
                return;
            }
        };
        let id = core.next_conn;
        core.next_conn += 1;
        let now_ms = shared.now_ms();
        conn = Arc::new(Conn {
            id,
            slot,
            name: core.sched.slot_config(slot).name.clone(),
            stream: stream.clone(),
            out: Mutex::new(BytesMut::with_capacity(16 * 1024)),
            writer_wake: Notify::new(),
            closed: CancellationToken::new(),
            last_recv_ms: AtomicU64::new(now_ms),
            last_sent_ms: AtomicU64::new(now_ms),
            broken: AtomicBool::new(false),
            pending_write: AtomicBool::new(false),
            held: AtomicBool::new(false),
            objects: Mutex::new(HashMap::new()),
        });
        let now = Instant::now();
        if !resuming && !core.sched.connected(slot, now) {
            drop(core);
            warn!(%peer, "rejected a worker connection: its slot is not waiting for a worker");
            return;
        }
        if let Some(observer) = &shared.config.observer {
            durable = observer.connected_durably(&core.sched.slot_config(slot).name);
            conn.held.store(durable.is_some(), Ordering::Relaxed);
        }
        if resuming {
            info!(slot = %core.sched.slot_config(slot).name, pid, host, "worker came back after a controller restart");
        } else {
            info!(slot = %core.sched.slot_config(slot).name, pid, host, "worker connected");
        }
        let rt = &mut core.slots[slot.0 as usize];
        // `launch` stays set: the launch call may not have returned its
        // handles yet, and must still recognise this slot as its own.
        rt.conn = Some(conn.clone());
        // Welcome first, then whatever the scheduler assigned on connect.
        conn.send(&welcome, now_ms);
        shared.apply(&mut core);
    }
    tokio::spawn(writer_loop(conn.clone()));
    // The welcome and the first jobs go once the observer has the
    // connection on record (a restarted daemon then waits for this worker
    // to come back with its jobs rather than run them again elsewhere);
    // meanwhile the controller goes on with everything else.
    if let Some(durable) = durable {
        durable.await;
        conn.held.store(false, Ordering::Relaxed);
        conn.flush();
    }
    // Frames that came with the hello.
    let reason = read_loop(&shared, &conn, buf).await;
    if !shared.stop.is_cancelled() {
        debug!(slot = %conn.name, "connection closed: {reason}");
    }
    shared.on_closed(&conn, &reason);
}

pub(crate) async fn read_loop(shared: &Arc<Shared>, conn: &Arc<Conn>, mut buf: BytesMut) -> String {
    loop {
        let mut msgs = Vec::new();
        loop {
            match protocol::decode::<AgentMsg>(&mut buf) {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => {
                    warn!(slot = %conn.name, "closing a worker connection: {e}");
                    return format!("protocol error: {e}");
                }
            }
        }
        if !msgs.is_empty() {
            shared.on_messages(conn, msgs);
        }
        tokio::select! {
            r = conn.stream.readable() => {
                if let Err(e) = r {
                    return format!("connection error: {e}");
                }
            }
            _ = conn.closed.cancelled() => {
                return if conn.broken.load(Ordering::Relaxed) { "connection broken".into() } else { "connection closed".into() };
            }
        }
        match conn.stream.read_some(&mut buf) {
            Ok(0) => return "the worker closed the connection".into(),
            Ok(_) => conn.last_recv_ms.store(shared.now_ms(), Ordering::Relaxed),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return format!("connection error: {e}"),
        }
    }
}

pub(crate) async fn writer_loop(conn: Arc<Conn>) {
    loop {
        tokio::select! {
            _ = conn.writer_wake.notified() => {}
            _ = conn.closed.cancelled() => return,
        }
        loop {
            {
                let mut out = lock(&conn.out);
                if !out.is_empty() {
                    match conn.stream.try_write(&out) {
                        Ok(n) => out.advance(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            conn.broken.store(true, Ordering::Relaxed);
                            conn.closed.cancel();
                            return;
                        }
                    }
                }
                if out.is_empty() {
                    conn.pending_write.store(false, Ordering::Relaxed);
                    break;
                }
            }
            tokio::select! {
                r = conn.stream.writable() => if r.is_err() { conn.closed.cancel(); return; },
                _ = conn.closed.cancelled() => return,
            }
        }
    }
}
