//! TLS on agent connections: a controller told to (or listening beyond
//! loopback) encrypts what its agents send and receive, agents accept only
//! the certificate they were told, and plaintext is refused from anywhere
//! but loopback. Real agents (`crew worker`), real sockets; a relay in the
//! middle records what crosses the wire.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit, TlsMode};
use crew_core::protocol::ControllerMsg;
use crew_core::{JobSpec, Status};
use crew_scheduler::SlotFilter;
use crew_worker_local::LocalWorker;
use tokio::net::{TcpListener, TcpStream};

use crate::controller::{attack, capture_logs, env_of, eventually, hello, logs};
use crate::support::{DEADLINE, MARK_VAR, Reaper, assert_none_marked, crew, crew_bin, marked_pids, run, unique};

/// `crew worker` carrying `mark`.
fn agent(mark: &str) -> AgentCommand {
    AgentCommand {
        program: "/usr/bin/env".to_owned(),
        args: vec![format!("{MARK_VAR}={mark}"), crew_bin().to_owned(), "worker".to_owned()],
        name: None,
    }
}

/// What a relay saw of each connection, both directions in one buffer.
type Wire = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP relay from `listener` to `target` that records every byte.
fn record_relay(listener: TcpListener, target: SocketAddr) -> Wire {
    let wire: Wire = Arc::new(Mutex::new(Vec::new()));
    let seen = wire.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else { continue };
            let index = {
                let mut w = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                w.push(Vec::new());
                w.len() - 1
            };
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::spawn(copy_recording(ir, ow, seen.clone(), index));
            tokio::spawn(copy_recording(or, iw, seen.clone(), index));
        }
    });
    wire
}

async fn copy_recording(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    wire: Wire,
    index: usize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wire.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[index].extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_always_the_wire_is_encrypted_agents_pin_the_certificate_and_plaintext_is_refused() {
    capture_logs();
    let mark = unique("tls-always-");
    let _reaper = Reaper::new(&mark);
    // Agents dial the relay, which forwards to the controller.
    let relay = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
    let relay_addr = relay.local_addr().expect("relay address");
    let mut config = ControllerConfig::new(agent(&mark));
    config.tls = TlsMode::Always;
    config.advertise = Some(relay_addr.to_string());
    config.hello_timeout = Duration::from_secs(2);
    let controller = Controller::start(config).await.expect("the controller starts");
    let fingerprint = controller.tls_fingerprint().expect("TLS is on").to_owned();
    assert_eq!(fingerprint.len(), 64);
    let wire = record_relay(relay, controller.addr());

    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 2)).expect("recruit");
    // Both workers up before the jobs, so that both connections carry some.
    assert_eq!(controller.launch(&SlotFilter::default(), 2), 2);
    let up = eventually(Duration::from_secs(20), || {
        controller.status().slots.iter().all(|s| s.state == crew_controller::SlotCondition::Idle)
    })
    .await;
    assert!(up, "the workers did not connect: {:?}", controller.status());
    let payload = unique("plain-payload-");
    let mut ids = Vec::new();
    for i in 0..10 {
        let job = JobSpec::shell(format!("echo {payload}-{i}; echo ${{CREW_TLS_SHA256:-unset}}"));
        ids.push(controller.send(job).expect("send"));
    }
    for _ in 0..ids.len() {
        let out = controller.receive_wait(Some(Duration::from_secs(30))).await.expect("an output");
        assert_eq!(out.status, Status::Succeeded, "{out:?}");
        let i = ids.iter().position(|id| *id == out.id).expect("one of ours");
        assert_eq!(out.stdout.text, format!("{payload}-{i}\nunset\n"), "the pin must not reach jobs");
    }

    // The agents were told the relay and the pin.
    let agents: Vec<u32> = marked_pids(&mark).into_iter().filter(|p| env_of(*p, "CREW_LAUNCH").is_some()).collect();
    assert!(!agents.is_empty(), "no agent found");
    for pid in &agents {
        assert_eq!(env_of(*pid, "CREW_TLS_SHA256").as_deref(), Some(fingerprint.as_str()));
        assert_eq!(env_of(*pid, "CREW_CONNECT"), Some(relay_addr.to_string()));
    }
    // Every connection through the relay was TLS from its first byte, and
    // neither the jobs' commands, their output nor a secret crossed in clear.
    let seen = wire.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    assert!(seen.len() >= 2, "expected a connection per agent, saw {}", seen.len());
    for bytes in seen.iter().filter(|b| !b.is_empty()) {
        assert_eq!(bytes.first(), Some(&0x16), "a connection did not start with a TLS handshake");
        assert!(!contains(bytes, payload.as_bytes()), "job data crossed the wire in clear");
        assert!(!contains(bytes, b"echo"), "a job's command crossed the wire in clear");
    }
    for pid in &agents {
        if let Some(token) = env_of(*pid, "CREW_TOKEN") {
            assert!(seen.iter().all(|b| !contains(b, token.as_bytes())), "the launch secret crossed in clear");
        }
    }

    // Plaintext is refused, even from loopback, with a reason the agent can
    // show.
    let (port, s) = attack(controller.addr(), hello("1", &"0".repeat(64)), Duration::from_secs(5)).await;
    assert!(s.end == "eof" || s.end == "reset", "{s:?}");
    assert!(
        matches!(s.frames.as_slice(), [ControllerMsg::Reject { reason }] if reason.contains("TLS")),
        "{:?}",
        s.frames
    );
    let peer = format!("peer=127.0.0.1:{port}");
    let logged = eventually(Duration::from_secs(2), || {
        logs().lines().any(|l| l.contains(&peer) && l.contains("rejected a plaintext worker connection"))
    })
    .await;
    assert!(logged, "no log line for {peer}:\n{}", logs());

    // An agent given another fingerprint refuses the controller's
    // certificate and says why; the controller logs the failed handshake.
    let wrong = "ab".repeat(32);
    let out = tokio::process::Command::new(crew_bin())
        .arg("worker")
        .env(MARK_VAR, &mark)
        .env("CREW_CONNECT", controller.addr().to_string())
        .env("CREW_LAUNCH", "1")
        .env("CREW_TOKEN", "0".repeat(64))
        .env("CREW_TLS_SHA256", &wrong)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("the agent gives up").expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("certificate") && stderr.contains("CREW_TLS_SHA256"), "{stderr}");
    let logged = eventually(Duration::from_secs(2), || logs().contains("TLS handshake failed")).await;
    assert!(logged, "no log line for the failed handshake:\n{}", logs());
    assert!(!logs().contains(&"0".repeat(64)), "a token reached the log");

    // A peer that completes the TLS handshake, then says nothing and keeps
    // its end open, is dropped after the hello timeout: it holds no task or
    // descriptor of the controller's beyond that.
    let pin = crew_tls::parse_fingerprint(&fingerprint).expect("pin");
    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    let baseline = fds();
    let tcp = TcpStream::connect(controller.addr()).await.expect("connect");
    let mut silent = crew_tls::connector(pin)
        .expect("connector")
        .connect(crew_tls::server_name(), tcp)
        .await
        .expect("the handshake");
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        silent.read_to_end(&mut sink).await
    })
    .await;
    assert!(ended.is_ok(), "a silent TLS peer was kept beyond the hello timeout");
    // Its connection, relay and socket pair are gone on the controller's
    // side while the peer still holds its own socket (this process's one
    // extra descriptor).
    let released = eventually(Duration::from_secs(5), || fds() <= baseline + 1).await;
    assert!(released, "the controller still holds {} descriptors for the silent peer", fds() - baseline - 1);
    drop(silent);

    // Garbage inside TLS meets the same decoder as in plaintext: closed and
    // logged, the connection's relay gone with it.
    let tcp = TcpStream::connect(controller.addr()).await.expect("connect");
    let peer_port = tcp.local_addr().expect("local address").port();
    let mut garbage = crew_tls::connector(pin)
        .expect("connector")
        .connect(crew_tls::server_name(), tcp)
        .await
        .expect("the handshake");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        garbage.write_all(b"\x00\x00\x00\x06\xc1\xc1\xc1\xc1\xc1\xc1").await.expect("send garbage");
        garbage.flush().await.expect("flush");
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the controller kept a connection that sent garbage");
    }
    let peer = format!("peer=127.0.0.1:{peer_port}");
    let logged = eventually(Duration::from_secs(2), || {
        logs()
            .lines()
            .any(|l| l.contains(&peer) && l.contains("rejected a worker connection") && l.contains("malformed"))
    })
    .await;
    assert!(logged, "no log line for the garbage from {peer}:\n{}", logs());
    drop(garbage);

    // The controller keeps serving its agents.
    let id = controller.send(JobSpec::shell("echo still")).expect("send");
    let out = controller.receive_wait(Some(Duration::from_secs(30))).await.expect("an output");
    assert_eq!((out.id, out.status, out.stdout.text.as_str()), (id, Status::Succeeded, "still\n"));
    controller.close().await;
    assert_none_marked(&mark, Duration::from_secs(3));
}

/// An IPv4 address of this machine that is not loopback, if it has one.
fn non_loopback_ipv4() -> Option<IpAddr> {
    let mut found = None;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, which is freed below and read only
    // in between; each entry's address is checked for null and family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = &*(addr as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && found.is_none() {
                    found = Some(IpAddr::V4(ip));
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_local_workers_keep_plaintext_on_loopback_and_other_peers_need_tls() {
    capture_logs();
    let mark = unique("tls-auto-");
    let _reaper = Reaper::new(&mark);
    let mut config = ControllerConfig::new(agent(&mark));
    config.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    config.advertise = Some("crew-host.example".to_owned());
    config.hello_timeout = Duration::from_secs(2);
    let controller = Controller::start(config).await.expect("the controller starts");
    let port = controller.addr().port();
    assert!(controller.tls_fingerprint().is_some(), "TLS is on beyond loopback");
    // A bare host gets the bound port.
    assert_eq!(controller.advertised(), format!("crew-host.example:{port}"));

    // Local workers reach loopback: they dial it, in plaintext.
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit");
    let id = controller.send(JobSpec::shell("echo local")).expect("send");
    let out = controller.receive_wait(Some(Duration::from_secs(30))).await.expect("an output");
    assert_eq!((out.id, out.status, out.stdout.text.as_str()), (id, Status::Succeeded, "local\n"));
    let agents: Vec<u32> = marked_pids(&mark).into_iter().filter(|p| env_of(*p, "CREW_LAUNCH").is_some()).collect();
    assert!(!agents.is_empty(), "no agent found");
    for pid in &agents {
        assert_eq!(env_of(*pid, "CREW_CONNECT"), Some(format!("127.0.0.1:{port}")));
        assert_eq!(env_of(*pid, "CREW_TLS_SHA256").as_deref(), Some(""), "plaintext, whatever the environment says");
    }

    // A plaintext hello from loopback reaches the hello check (and fails it
    // there, for its token).
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let (_, s) = attack(loopback, hello("999999", &"0".repeat(64)), Duration::from_secs(5)).await;
    assert!(
        matches!(s.frames.as_slice(), [ControllerMsg::Reject { reason }] if reason.contains("unknown")),
        "{:?}",
        s.frames
    );
    // From this machine's network address, plaintext is refused.
    match non_loopback_ipv4() {
        Some(ip) => {
            let (_, s) =
                attack(SocketAddr::new(ip, port), hello("999999", &"0".repeat(64)), Duration::from_secs(5)).await;
            assert!(
                matches!(s.frames.as_slice(), [ControllerMsg::Reject { reason }] if reason.contains("TLS")),
                "{ip}: {:?}",
                s.frames
            );
        }
        None => eprintln!("this machine has no IPv4 address but loopback: the non-loopback peer case is not tested"),
    }
    controller.close().await;
    assert_none_marked(&mark, Duration::from_secs(3));

    // A loopback listener whose agents are told another address (a proxy,
    // a port forward) encrypts too; a malformed address stops the start.
    let mut config = ControllerConfig::new(agent(&mark));
    config.advertise = Some("crew-host.example:7000".to_owned());
    let proxied = Controller::start(config).await.expect("the controller starts");
    assert!(proxied.tls_fingerprint().is_some(), "agents dial beyond loopback: TLS");
    proxied.close().await;
    let mut config = ControllerConfig::new(agent(&mark));
    config.advertise = Some("crew-host.example:0".to_owned());
    let err = Controller::start(config).await.expect_err("port 0 cannot be dialled");
    assert!(err.to_string().contains("invalid advertised address"), "{err}");
}

#[test]
fn crew_up_takes_the_workers_address_and_refuses_to_change_it_while_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("tls-up-");
    let _reaper = Reaper::new(&mark);
    let crew_in = |args: &[&str]| {
        let mut c = crew(d, &mark, args);
        c.env_remove("CREW_LISTEN").env_remove("CREW_ADVERTISE").env_remove("CREW_TLS");
        run(c, None, DEADLINE)
    };
    let up = crew_in(&["up", "--listen", "0.0.0.0:0", "--advertise", "crew-host.example", "--json"]);
    assert_eq!(up.code(), Some(0), "{up}");
    let health: serde_json::Value = serde_json::from_str(up.stdout.trim()).expect("up --json");
    let listen: SocketAddr = health["listen"].as_str().and_then(|a| a.parse().ok()).expect("listen");
    assert!(listen.ip().is_unspecified() && listen.port() != 0, "{up}");
    assert_eq!(health["advertise"], format!("crew-host.example:{}", listen.port()).as_str(), "{up}");
    let fingerprint = health["tls_sha256"].as_str().expect("TLS beyond loopback");
    assert_eq!(fingerprint.len(), 64, "{up}");
    let status = crew_in(&["status"]);
    let line = format!("workers dial crew-host.example:{} (TLS, certificate sha256 {fingerprint})", listen.port());
    assert!(status.stdout.contains(&line), "{status}");

    // The same again is fine; another address is refused, saying what runs.
    assert_eq!(crew_in(&["up", "--listen", "0.0.0.0:0", "--advertise", "crew-host.example"]).code(), Some(0));
    let other = crew_in(&["up", "--listen", "127.0.0.1:0"]);
    assert_eq!(other.code(), Some(2), "{other}");
    assert!(other.stderr.contains("listening on 0.0.0.0") && other.stderr.contains("crew down"), "{other}");
    let other = crew_in(&["up", "--advertise", "elsewhere.example"]);
    assert_eq!(other.code(), Some(2), "{other}");
    assert!(other.stderr.contains("crew-host.example"), "{other}");
    let bad = crew_in(&["up", "--tls", "sometimes"]);
    assert_eq!(bad.code(), Some(2), "{bad}");
    assert!(bad.stderr.contains("auto") && bad.stderr.contains("always"), "{bad}");

    // Local workers still work (over loopback), and a loopback daemon
    // refuses to be taken for one that encrypts.
    assert_eq!(crew_in(&["recruit", "-w", "1", "--class", "local"]).code(), Some(0));
    assert_eq!(crew_in(&["send", "--", "echo", "hi"]).code(), Some(0));
    let got = crew_in(&["receive", "--wait", "--json"]);
    assert_eq!(got.records().first().map(|r| r["stdout"]["text"].clone()), Some("hi\n".into()), "{got}");
    assert_eq!(crew_in(&["down"]).code(), Some(0));
    assert_eq!(crew_in(&["up"]).code(), Some(0));
    let status = crew_in(&["status"]);
    assert!(status.stdout.contains("(loopback, plaintext)"), "{status}");
    let refused = crew_in(&["up", "--tls", "always"]);
    assert_eq!(refused.code(), Some(2), "{refused}");
    assert!(refused.stderr.contains("plaintext"), "{refused}");
    assert_eq!(crew_in(&["down"]).code(), Some(0));
    assert_none_marked(&mark, Duration::from_secs(5));
}
