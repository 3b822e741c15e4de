//! The controller as a library, with the `crew` binary as its agent:
//! hostile connections, and job timeouts that must not leave processes.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit};
use crew_core::protocol::{self, AgentMsg, ControllerMsg, PROTOCOL_VERSION};
use crew_core::worker::Secret;
use crew_core::{JobSpec, Status};
use crew_scheduler::SlotFilter;
use crew_worker_local::LocalWorker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{MARK_VAR, Reaper, assert_none_marked, crew_bin, describe, pids_with_arg, unique, unique_sleep};

/// Everything `tracing` logged in this test binary.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once: it is global, since the
/// controller logs from runtime threads).
pub(crate) fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
}

pub(crate) fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
}

/// Polls `cond` (async) every 20 ms until it holds or `timeout` passes.
pub(crate) async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A controller whose agents (`crew worker`) carry `mark` in their
/// environment; the agent of slot `local-2` waits `delay_2` before it
/// starts, so that its launch stays open for a while.
async fn controller(mark: &str, delay_2: Duration) -> Controller {
    let script = format!("case \"$CREW_SLOT\" in local-2) sleep {};; esac; exec \"$0\" worker", delay_2.as_secs_f64());
    let agent = AgentCommand {
        program: "/usr/bin/env".to_owned(),
        args: vec![format!("{MARK_VAR}={mark}"), "sh".to_owned(), "-c".to_owned(), script, crew_bin().to_owned()],
        name: None,
    };
    let mut config = ControllerConfig::new(agent);
    config.hello_timeout = Duration::from_millis(500);
    Controller::start(config).await.expect("the controller starts")
}

/// The value of `var` in the environment of `pid`.
pub(crate) fn env_of(pid: u32, var: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{var}=");
    environ.split(|&c| c == 0).find_map(|e| {
        let e = String::from_utf8_lossy(e);
        e.strip_prefix(&prefix).map(str::to_owned)
    })
}

/// What a hostile client saw: the frames it received before the end.
#[derive(Debug)]
pub(crate) struct Seen {
    pub(crate) frames: Vec<ControllerMsg>,
    pub(crate) end: String,
}

/// Connects, sends `payload`, and reads until the controller closes the
/// connection (or `limit` passes: then `end` says so).
pub(crate) async fn attack(addr: std::net::SocketAddr, payload: Vec<u8>, limit: Duration) -> (u16, Seen) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the controller");
    let port = stream.local_addr().expect("local address").port();
    if !payload.is_empty() {
        stream.write_all(&payload).await.expect("send the payload");
    }
    let mut buf = BytesMut::new();
    let end = match tokio::time::timeout(limit, async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) => return "eof".to_owned(),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset".to_owned(),
                Err(e) => return format!("error: {e}"),
            }
        }
    })
    .await
    {
        Ok(end) => end,
        Err(_) => format!("still open after {limit:?}"),
    };
    let mut frames = Vec::new();
    while let Ok(Some(m)) = protocol::decode::<ControllerMsg>(&mut buf) {
        frames.push(m);
    }
    (port, Seen { frames, end })
}

pub(crate) fn hello(launch: &str, token: &str) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let msg = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        launch: launch.to_owned(),
        index: 0,
        token: Secret::new(token),
        pid: std::process::id(),
        host: "intruder".to_owned(),
    };
    protocol::encode(&msg, &mut buf).expect("a hello encodes");
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_are_closed_and_logged_and_jobs_go_on() {
    capture_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("hostile-");
    let _reaper = Reaper::new(&mark);
    let controller = controller(&mark, Duration::from_secs(4)).await;
    let names = controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 2)).expect("recruit");
    assert_eq!(names, ["local-1", "local-2"]);
    let started = dir.path().join("started");
    let busy = JobSpec::shell(format!("touch '{}'; sleep 2; echo done", started.display())).with_name("busy");
    let busy = controller.send(busy).expect("send");
    assert!(eventually(Duration::from_secs(20), || started.exists()).await, "the job did not start");

    // Start local-2 ahead of need: its agent waits before it connects, so
    // its launch (and its secret) stays open during the attacks.
    let filter = SlotFilter { slot: Some("local-2".to_owned()), ..SlotFilter::default() };
    assert_eq!(controller.launch(&filter, 1), 1);
    let mut launch = None;
    let found = eventually(Duration::from_secs(5), || {
        launch = crate::support::marked_pids(&mark)
            .into_iter()
            .find(|&p| env_of(p, "CREW_SLOT").as_deref() == Some("local-2"))
            .and_then(|p| Some((env_of(p, "CREW_LAUNCH")?, env_of(p, "CREW_TOKEN")?)));
        launch.is_some()
    })
    .await;
    assert!(found, "the launch of local-2 did not start");
    let (launch, launch_secret) = launch.unwrap_or_default();
    // The secret of member 1 of that launch (as the aws-batch class hands
    // out): valid for index 1 only, so member 0 cannot be posed as with it.
    let other_member = Secret::new(launch_secret).member_secret(1);

    let addr = controller.addr();
    let limit = Duration::from_secs(5);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"\x00\x00\x00\x06\xc1\xc1\xc1\xc1\xc1\xc1".to_vec(), "malformed frame"),
        ("text", b"GET / HTTP/1.1\r\nHost: crew\r\n\r\n".to_vec(), "larger than the limit"),
        ("huge", b"\xff\xff\xff\xff\x00\x00".to_vec(), "larger than the limit"),
        ("wrong token", hello(&launch, &"0".repeat(64)), "invalid token"),
        ("another member's secret", hello(&launch, other_member.expose()), "invalid token"),
        ("unknown launch", hello("999999", &"0".repeat(64)), "unknown or expired launch"),
        ("silent", Vec::new(), "no hello within"),
    ];
    let mut tasks = Vec::new();
    for (what, payload, _) in &cases {
        let payload = payload.clone();
        let what = (*what).to_owned();
        tasks.push(tokio::spawn(async move { (what, attack(addr, payload, limit).await) }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("attack task"));
    }
    for ((what, (port, s)), (_, _, reason)) in seen.iter().zip(&cases) {
        assert!(s.end == "eof" || s.end == "reset", "{what}: the controller did not close the connection: {s:?}");
        assert!(
            s.frames.iter().all(|f| matches!(f, ControllerMsg::Reject { .. })),
            "{what}: the controller sent more than a rejection: {s:?}"
        );
        let peer = format!("peer=127.0.0.1:{port}");
        let logged = eventually(Duration::from_secs(2), || {
            logs()
                .lines()
                .any(|l| l.contains(&peer) && l.contains("rejected a worker connection") && l.contains(reason))
        })
        .await;
        assert!(logged, "{what}: no log line with {peer:?} and {reason:?}:\n{}", logs());
    }
    assert!(!logs().contains(&"0".repeat(64)), "a token reached the log");
    assert!(!logs().contains(other_member.expose()), "a member secret reached the log");

    // The running job was not disturbed.
    let out = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("the busy job's output");
    assert_eq!(out.id, busy);
    assert_eq!(out.status, Status::Succeeded, "{out:?}");
    assert_eq!(out.stdout.text, "done\n");
    assert_eq!(out.attempt, 1);

    // The wrong token did not use up local-2's launch: its agent connects.
    let up = eventually(Duration::from_secs(15), || {
        controller.status().slots.iter().any(|s| {
            s.name == "local-2"
                && (s.state == crew_controller::SlotCondition::Idle || s.state == crew_controller::SlotCondition::Busy)
        })
    })
    .await;
    assert!(up, "local-2 did not come up after the attacks: {:?}", controller.status());

    // The controller keeps serving.
    let again = controller.send(JobSpec::shell("echo again")).expect("send after the attacks");
    let out = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("an output");
    assert_eq!(out.id, again);
    assert_eq!(out.status, Status::Succeeded, "{out:?}");
    assert_eq!(out.stdout.text, "again\n");
    controller.close().await;
    assert_none_marked(&mark, Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_whole_job_while_the_worker_stays() {
    let mark = unique("timeout-lib-");
    let secs = unique_sleep();
    let _reaper = Reaper::new(&mark).and_arg(&secs);
    let controller = controller(&mark, Duration::ZERO).await;
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit");
    let job = JobSpec::shell(format!("sh -c 'sleep {secs} & sleep {secs}' & sleep {secs}; wait"))
        .with_timeout(Duration::from_secs(1));
    controller.send(job).expect("send");
    let out = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("an output");
    assert_eq!(out.status, Status::TimedOut, "{out:?}");
    assert!(out.wall_seconds < 3.0, "{out:?}");
    // Nothing of the job is left, though its worker (and `crew run`'s
    // orphan sweep) is still out of the picture.
    let mut left = Vec::new();
    let gone = eventually(Duration::from_secs(2), || {
        left = pids_with_arg(&secs);
        left.is_empty()
    })
    .await;
    assert!(gone, "processes of the timed-out job survived: {}", describe(&left));
    let slots = controller.status().slots;
    assert_eq!(slots[0].state, crew_controller::SlotCondition::Idle, "the worker stays up after a timeout: {slots:?}");
    controller.close().await;
    assert_none_marked(&mark, Duration::from_secs(3));
}

/// Workers are semi-persistent: jobs one after the other run in the same
/// agent process; an idle worker stops after its idle timeout (its process
/// gone) and is launched again when a job needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_persist_between_jobs_and_stop_when_idle() {
    let controller = Controller::start(ControllerConfig::new(AgentCommand::crew(crew_bin()))).await.expect("start");
    let mut recruit = Recruit::new(Arc::new(LocalWorker::new()), 1);
    recruit.limits.idle_timeout = Some(Duration::from_millis(600));
    controller.recruit(recruit).expect("recruit");
    let agent_of = |o: &crew_core::Output| -> u32 {
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        o.stdout.text.trim().parse().expect("a pid")
    };
    let mut pids = Vec::new();
    for _ in 0..3 {
        controller.send(JobSpec::shell("echo $PPID")).expect("send");
        let o = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("an output");
        pids.push(agent_of(&o));
    }
    assert!(pids.iter().all(|p| *p == pids[0]), "jobs ran in different agent processes: {pids:?}");
    let first = pids[0];
    // Idle for longer than the timeout: the slot goes down and the agent
    // process exits.
    assert!(
        eventually(Duration::from_secs(10), || {
            let st = controller.status();
            st.slots[0].state == crew_controller::SlotCondition::Down
                && st.slots[0].last_reason.as_deref().is_some_and(|r| r.contains("idle"))
        })
        .await,
        "the idle worker was not stopped: {:?}",
        controller.status()
    );
    assert!(
        eventually(Duration::from_secs(10), || !std::path::Path::new(&format!("/proc/{first}")).exists()).await,
        "the idle agent {first} is still there (running, or a zombie nobody reaped)"
    );
    // A new job relaunches the slot: a new agent process.
    controller.send(JobSpec::shell("echo $PPID")).expect("send");
    let o = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("an output");
    let second = agent_of(&o);
    assert_ne!(second, first, "the relaunched worker should be a new process");
    assert_eq!(o.attempt, 1);
    controller.close().await;
}

/// `send` refuses jobs whose data workers could not get: inputs not staged,
/// or inputs/outputs without a store; a staged job runs through the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refuses_unstaged_inputs_and_data_without_a_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.txt");
    std::fs::write(&data, b"abc").expect("write");
    let mut job = JobSpec::shell("cat in.txt");
    job.opts.inputs.push(crew_core::job::Input::path("in.txt", &data));

    let bare = Controller::start(ControllerConfig::new(AgentCommand::crew(crew_bin()))).await.expect("start");
    bare.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit");
    let mut outputs_only = JobSpec::shell("true");
    outputs_only.opts.outputs.push("x.txt".into());
    let err = bare.send(outputs_only).expect_err("no store").to_string();
    assert!(err.contains("no store"), "{err}");
    bare.close().await;

    let store: Arc<dyn crew_core::store::Store> =
        Arc::new(crew_core::store::LocalStore::new(dir.path().join("store")).expect("store"));
    let mut config = ControllerConfig::new(AgentCommand::crew(crew_bin()));
    config.store = Some(Arc::clone(&store));
    let controller = Controller::start(config).await.expect("start");
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit");
    let err = controller.send(job.clone()).expect_err("not staged").to_string();
    assert!(err.contains("\"in.txt\" is not staged"), "{err}");
    crew_core::staging::Stager::new(store).stage(std::slice::from_mut(&mut job)).await.expect("stage");
    controller.send(job).expect("send");
    let o = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("an output");
    assert_eq!(o.status, Status::Succeeded, "{o:?}");
    assert_eq!(o.stdout.text, "abc");
    controller.close().await;
}

/// A worker that cannot open the controller's store (here: its folder's
/// parent became a file after the controller opened it) says why in the
/// output record of a job that needs the store, not only in its own log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_store_says_why_in_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parent = dir.path().join("parent");
    let store: Arc<dyn crew_core::store::Store> =
        Arc::new(crew_core::store::LocalStore::new(parent.join("store")).expect("store"));
    let url = store.url();
    let mut config = ControllerConfig::new(AgentCommand::crew(crew_bin()));
    config.store = Some(store);
    let controller = Controller::start(config).await.expect("start");
    controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1)).expect("recruit");
    std::fs::remove_dir_all(&parent).expect("remove the store's folder");
    std::fs::write(&parent, b"not a folder").expect("a file in its place");
    let mut job = JobSpec::shell("echo x > x.txt");
    job.opts.outputs.push("x.txt".into());
    controller.send(job).expect("send");
    let o = controller.receive_wait(Some(Duration::from_secs(20))).await.expect("an output");
    assert_eq!(o.status, Status::Failed, "{o:?}");
    let error = o.error.unwrap_or_default();
    assert!(error.contains(&format!("this worker could not open the store {url}")), "{error}");
    controller.close().await;
}
