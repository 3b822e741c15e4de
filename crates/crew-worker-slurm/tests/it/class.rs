//! The class through a real controller on a real Slurm: one array for many
//! slots (over TLS beyond loopback), a worker's Slurm job cancelled
//! mid-job, a partition that does not exist, and the calls and launch
//! time of 100 jobs on 4 slots (printed for the closing note).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crew_controller::{Controller, ControllerConfig, Recruit, SlotCondition, TlsMode};
use crew_core::job::JobSpec;
use crew_core::output::{Output, Status};
use crew_scheduler::{SlotFilter, SlotLimits};
use crew_worker_slurm::SlurmWorker;

use crate::cluster::Cluster;
use crate::{class_on, test_agent};

/// Generous: a loaded 2-core machine runs these tests in parallel.
const DEADLINE: Duration = Duration::from_secs(120);

/// An address of this machine beyond loopback, if it has one.
pub(crate) fn outside_address() -> Option<String> {
    let out = std::process::Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .map(str::to_owned)
}

/// A controller whose agents connect over TLS: listening on every
/// address, advertising one beyond loopback when there is one.
async fn tls_controller() -> Controller {
    let mut config = ControllerConfig::new(test_agent());
    config.listen = "0.0.0.0:0".parse().expect("address");
    config.advertise = outside_address();
    config.tls = TlsMode::Always;
    config.stop_grace = Duration::from_secs(2);
    let controller = Controller::start(config).await.expect("controller starts");
    assert!(controller.tls_fingerprint().is_some(), "agents must use TLS");
    controller
}

async fn plain_controller() -> Controller {
    let mut config = ControllerConfig::new(test_agent());
    config.stop_grace = Duration::from_secs(2);
    Controller::start(config).await.expect("controller starts")
}

fn recruit(class: &SlurmWorker, count: u32) -> Recruit {
    let mut r = Recruit::new(Arc::new(class.clone()), count);
    r.limits = SlotLimits { launch_timeout: DEADLINE, ..SlotLimits::default() };
    r
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `squeue` lists nothing pending or running.
pub(crate) async fn until_queue_empty(cluster: &Cluster) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let q = cluster.queue();
        if q.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "Slurm jobs left behind: {q:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn idle(controller: &Controller) -> usize {
    controller.status().slots.iter().filter(|s| s.state == SlotCondition::Idle).count()
}

async fn receive(controller: &Controller, n: usize) -> Vec<Output> {
    let mut outs = Vec::new();
    for _ in 0..n {
        outs.push(controller.receive_wait(Some(DEADLINE)).await.expect("a job finished in time"));
    }
    outs
}

/// The files left in the class's launch folders.
fn launch_files(cluster: &Cluster) -> Vec<String> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(cluster.state_dir()).into_iter().flatten().flatten() {
        if dir.file_name().to_string_lossy().starts_with("launch-") {
            for f in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                files.push(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jobs_on_four_slots_from_one_array_over_tls() {
    let Some(cluster) = Cluster::start() else { return };
    let class = class_on(&cluster, &[("preamble", "PREAMBLE_MARK=set-on-the-node\nexport PREAMBLE_MARK")]);
    let controller = tls_controller().await;
    let names = controller.recruit(recruit(&class, 4)).expect("recruit");
    assert_eq!(controller.launch(&SlotFilter::default(), 4), 4);
    until("four workers connected", || idle(&controller) == 4).await;
    assert_eq!(cluster.calls("sbatch"), 1, "four slots recruited at once are one sbatch --array");
    let tasks = cluster.queue();
    assert_eq!(tasks.len(), 4, "{tasks:?}");
    let job = tasks[0].split('_').next().expect("an array task").to_owned();
    assert!(tasks.iter().all(|t| t.starts_with(&format!("{job}_")) && t.ends_with("RUNNING")), "{tasks:?}");

    // The script Slurm keeps has the array and no secret; every one-time
    // secret was taken by its agent.
    let script = cluster
        .command("/usr/bin/scontrol")
        .args(["write", "batch_script", &job, "-"])
        .output()
        .expect("scontrol runs");
    let script = String::from_utf8_lossy(&script.stdout);
    assert!(script.contains("#SBATCH --array=0-3") && script.contains("#SBATCH --partition=debug"), "{script}");
    assert!(script.contains("CREW_TOKEN_REF='file:") && !script.contains("CREW_TOKEN="), "{script}");
    let left = launch_files(&cluster);
    assert!(!left.iter().any(|f| f.starts_with("token.")), "secrets left after the agents took them: {left:?}");

    let jobs: Vec<JobSpec> = (0..20)
        .map(|i| {
            // The script's preamble ran before the agent, on the node.
            let mut j = JobSpec::shell(format!("echo job {i} $PREAMBLE_MARK"));
            j.opts.env_inherit = vec!["PREAMBLE_MARK".into()];
            j
        })
        .collect();
    controller.send_many(jobs).expect("send");
    let outs = receive(&controller, 20).await;
    for o in &outs {
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        assert!(o.stdout.text.trim_end().ends_with(" set-on-the-node"), "{o:?}");
        assert_eq!(o.class.as_deref(), Some("slurm"));
        assert!(o.slot.as_ref().is_some_and(|s| names.contains(s)), "{o:?}");
    }
    assert_eq!(cluster.calls("sbatch"), 1, "no other submission");
    controller.close().await;
    until_queue_empty(&cluster).await;
    // The launch's folder goes once its members ended.
    let deadline = Instant::now() + DEADLINE;
    while !launch_files(&cluster).is_empty() {
        // The class learns of the ends by probing.
        let _ = crew_core::worker::Worker::probe(&class, &[]).await;
        assert!(Instant::now() < deadline, "launch files left: {:?}", launch_files(&cluster));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let handles: Vec<crew_core::worker::Handle> =
            (0..4).map(|i| crew_core::worker::Handle::new(format!("{job}_{i}"))).collect();
        let _ = crew_core::worker::Worker::probe(&class, &handles).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cancelled_mid_job_is_a_crash_and_the_job_runs_elsewhere() {
    let Some(cluster) = Cluster::start() else { return };
    let class = class_on(&cluster, &[]);
    let controller = plain_controller().await;
    controller.recruit(recruit(&class, 2)).expect("recruit");
    assert_eq!(controller.launch(&SlotFilter::default(), 2), 2);
    until("two workers connected", || idle(&controller) == 2).await;
    let marks = cluster.dir.path().join("marks");
    std::fs::create_dir(&marks).expect("mkdir");
    // The first attempt names its Slurm task and waits; the second ends.
    let line = format!(
        "if [ \"$CREW_ATTEMPT\" = 1 ]; then echo \"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\" > {0}/task.tmp; \
         mv {0}/task.tmp {0}/task; exec sleep 300; fi; echo survived",
        marks.display()
    );
    let mut spec = JobSpec::shell(line);
    spec.opts.env_inherit = vec!["SLURM_ARRAY_JOB_ID".into(), "SLURM_ARRAY_TASK_ID".into()];
    let id = controller.send(spec).expect("send");
    let task_file = marks.join("task");
    until("the job runs", || task_file.exists()).await;
    let task = std::fs::read_to_string(&task_file).expect("task").trim().to_owned();
    let first_slot = controller
        .status()
        .slots
        .iter()
        .find(|s| s.handle.as_deref() == Some(task.as_str()))
        .map(|s| s.name.clone())
        .unwrap_or_else(|| panic!("no slot has handle {task}: {:?}", controller.status().slots));
    let cancel = cluster.command("/usr/bin/scancel").arg(&task).status().expect("scancel runs");
    assert!(cancel.success());
    let o = controller.receive_wait(Some(DEADLINE)).await.expect("the job ran again");
    assert_eq!(o.id, id);
    assert_eq!(o.status, Status::Succeeded, "{o:?}");
    assert_eq!(o.attempt, 2, "the cancel counted as a crash: {o:?}");
    assert_eq!(o.stdout.text.trim(), "survived");
    assert_ne!(o.slot.as_deref(), Some(first_slot.as_str()), "it ran elsewhere: {o:?}");
    // The slot tells why its worker went, in Slurm's words.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = controller.status();
        let slot = status.slots.iter().find(|s| s.name == first_slot).expect("slot");
        if slot.last_reason.as_deref().is_some_and(|r| r.contains("CANCELLED")) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot's reason does not say CANCELLED: {slot:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A job that may not crash again ends `crashed`, its record giving
    // Slurm's reason.
    let line = format!(
        "echo \"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\" > {0}/task2.tmp; mv {0}/task2.tmp {0}/task2; exec sleep 300",
        marks.display()
    );
    let mut spec = JobSpec::shell(line);
    spec.opts.env_inherit = vec!["SLURM_ARRAY_JOB_ID".into(), "SLURM_ARRAY_TASK_ID".into()];
    spec.crashes_max = 1;
    let id = controller.send(spec).expect("send");
    let task_file = marks.join("task2");
    until("the second job runs", || task_file.exists()).await;
    let task = std::fs::read_to_string(&task_file).expect("task").trim().to_owned();
    let cancel = cluster.command("/usr/bin/scancel").arg(&task).status().expect("scancel runs");
    assert!(cancel.success());
    let o = controller.receive_wait(Some(DEADLINE)).await.expect("the job ended");
    assert_eq!(o.id, id);
    assert_eq!(o.status, Status::Crashed, "{o:?}");
    let error = o.error.unwrap_or_default();
    assert!(error.contains(&format!("Slurm job {task} CANCELLED")), "the record does not give Slurm's reason: {error}");
    controller.close().await;
    until_queue_empty(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_does_not_exist_is_a_clear_error_and_bounded_relaunches() {
    let Some(cluster) = Cluster::start() else { return };
    let class = class_on(&cluster, &[("partition", "nosuchpartition")]);
    let controller = plain_controller().await;
    let mut r = recruit(&class, 1);
    r.limits.launch_max = 2;
    controller.recruit(r).expect("recruit");
    controller.send(JobSpec::builtin("noop", serde_json::Value::Null)).expect("send");
    let o = controller.receive_wait(Some(DEADLINE)).await.expect("the job ended");
    assert_eq!(o.status, Status::LaunchFailed, "{o:?}");
    let error = o.error.unwrap_or_default();
    assert!(
        error.contains("sbatch refused the job") && error.contains("Invalid partition") && error.contains("sinfo"),
        "{error}"
    );
    // Give a runaway loop time to show, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.calls("sbatch"), 2, "one submission per allowed launch (launch_max 2), no more");
    assert!(cluster.queue().is_empty());
    assert!(launch_files(&cluster).is_empty(), "a refused launch leaves no files: {:?}", launch_files(&cluster));
    controller.close().await;
}

/// The closing note's figures: launch → ready for 4 slots, and the Slurm
/// calls for 100 jobs on them with the class's default probe interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_launch_to_ready_and_slurm_calls_for_100_jobs() {
    let Some(cluster) = Cluster::start() else { return };
    let mut class = SlurmWorker::with_defaults(
        [
            ("state_dir".to_owned(), cluster.state_dir().display().to_string()),
            ("partition".to_owned(), "debug".to_owned()),
        ]
        .into(),
    );
    for (k, v) in cluster.env() {
        class = class.with_command_env(k, v);
    }
    let controller = tls_controller().await;
    controller.recruit(recruit(&class, 4)).expect("recruit");
    let started = Instant::now();
    assert_eq!(controller.launch(&SlotFilter::default(), 4), 4);
    until("four workers connected", || idle(&controller) == 4).await;
    let ready = started.elapsed();
    // Jobs of 0.3 s: about 8 s of work on 4 workers, so that the probe's
    // rate limit shows (calls follow time, not jobs).
    let jobs: Vec<JobSpec> = (0..100).map(|i| JobSpec::shell(format!("sleep 0.3; echo {i}"))).collect();
    controller.send_many(jobs).expect("send");
    let outs = receive(&controller, 100).await;
    assert!(outs.iter().all(|o| o.status == Status::Succeeded));
    controller.close().await;
    let elapsed = started.elapsed();
    let (sbatch, squeue, sacct, scancel) =
        (cluster.calls("sbatch"), cluster.calls("squeue"), cluster.calls("sacct"), cluster.calls("scancel"));
    println!(
        "figures: launch -> ready for 4 slots: {:.2} s; then 100 jobs on them; {:.2} s from launch to closed, with \
         {sbatch} sbatch, {squeue} squeue, {sacct} sacct, {scancel} scancel calls",
        ready.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    assert_eq!(sbatch, 1);
    // Closing stops the four slots one by one: one scancel, or two when a
    // loaded machine spreads their stops over more than the class's 200 ms.
    assert!(scancel <= 2, "{scancel} scancel calls to stop 4 workers");
    // One squeue per probe interval (3 s) at most, plus the rounds of
    // close (a fresh look at terminated jobs).
    let bound = (elapsed.as_secs_f64() / crew_worker_slurm::DEFAULT_PROBE_INTERVAL.as_secs_f64()).ceil() as usize + 3;
    assert!(squeue <= bound, "{squeue} squeue calls in {elapsed:?}: the probe is not rate-limited");
    until_queue_empty(&cluster).await;
}

/// Jobs Slurm no longer lists (past `MinJobAge`) are asked of `sacct`, in
/// one call for all of them; this cluster keeps no accounting, so their end
/// is reported with sacct's message. Handles that are not the class's own
/// are `Unknown`, and a refused request for resources no node has is a
/// clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_slurm_forgot_are_asked_of_sacct_in_one_call() {
    use crew_core::worker::{Handle, LaunchMember, LaunchSpec, Liveness, Worker};
    let Some(cluster) = Cluster::start_with("MinJobAge=2\n") else { return };
    let class = class_on(&cluster, &[]);
    // Agents that exit at once, with secrets they never take.
    let members = (0..4).map(|i| LaunchMember::new(format!("slurm-{}", i + 1), i)).collect();
    let env = [("CREW_LAUNCH".to_owned(), "1".to_owned()), ("CREW_TOKEN".to_owned(), "s3cr3t".to_owned())].into();
    let spec = LaunchSpec::new("/bin/true", "true", members).with_env(env);
    let handles = class.launch(&spec).await.expect("launch");
    assert_eq!(handles.len(), 4);
    let job = handles[0].id.split('_').next().expect("job id").to_owned();
    // Wait, without asking through the class, until Slurm forgot them.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let out = cluster
            .command("/usr/bin/squeue")
            .args(["-h", "-r", "-t", "all", "-o", "%i", "-j", &job])
            .output()
            .expect("squeue runs");
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Slurm did not purge job {job} past MinJobAge");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (squeue, sacct) = (cluster.calls("squeue"), cluster.calls("sacct"));
    let mut asked = handles.clone();
    asked.push(Handle::new("999999_0"));
    asked.push(Handle::new("not-a-slurm-handle"));
    let lives = class.probe(&asked).await.expect("probe");
    assert_eq!((cluster.calls("squeue") - squeue, cluster.calls("sacct") - sacct), (1, 1), "one call each");
    for life in &lives[..4] {
        let Liveness::Exited { reason } = life else { panic!("{lives:?}") };
        assert!(reason.contains("no longer listed by squeue") && reason.contains("sacct"), "{reason}");
    }
    assert_eq!(lives[4..], [Liveness::Unknown, Liveness::Unknown]);
    // Their secrets and script are gone with them.
    assert!(launch_files(&cluster).is_empty(), "{:?}", launch_files(&cluster));

    let big = class_on(&cluster, &[("memory", "100G")]);
    let members = vec![LaunchMember::new("slurm-9", 0)];
    let e = big.launch(&LaunchSpec::new("/bin/true", "true", members)).await.expect_err("refused").to_string();
    assert!(e.contains("sbatch refused the job") && e.contains("memory"), "{e}");
}

/// A worker that reaches its Slurm time limit under a job: Slurm ends it
/// (TIMEOUT), and the job's record says so. Slow: Slurm counts time limits
/// in whole minutes and checks them every 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_past_its_time_limit_ends_timeout_in_the_record() {
    let Some(cluster) = Cluster::start() else { return };
    let class = class_on(&cluster, &[("time", "1")]);
    let controller = plain_controller().await;
    let mut r = recruit(&class, 1);
    r.limits.launch_max = 1;
    controller.recruit(r).expect("recruit");
    let mut spec = JobSpec::shell("exec sleep 600");
    spec.crashes_max = 1;
    let id = controller.send(spec).expect("send");
    let o = controller.receive_wait(Some(Duration::from_secs(300))).await.expect("the job ended");
    assert_eq!(o.id, id);
    assert_eq!(o.status, Status::Crashed, "{o:?}");
    let error = o.error.unwrap_or_default();
    assert!(error.contains("TIMEOUT") && error.contains("time limit"), "{error}");
    controller.close().await;
    until_queue_empty(&cluster).await;
}

/// Idle workers leave by themselves and dismissed ones are stopped: no
/// Slurm job of theirs stays behind, with the controller still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_dismissed_workers_leave_no_slurm_job() {
    let Some(cluster) = Cluster::start() else { return };
    let class = class_on(&cluster, &[]);
    let controller = plain_controller().await;
    let mut idling = recruit(&class, 2);
    idling.limits.idle_timeout = Some(Duration::from_secs(2));
    let idle_names = controller.recruit(idling).expect("recruit");
    let kept = controller.recruit(recruit(&class, 2)).expect("recruit");
    assert_eq!(controller.launch(&SlotFilter::default(), 4), 4);
    until("four workers connected", || idle(&controller) == 4).await;
    // The idle ones go after 2 s: two Slurm jobs left, the kept ones.
    let deadline = Instant::now() + DEADLINE;
    while cluster.queue().len() != 2 {
        assert!(Instant::now() < deadline, "idle workers still in Slurm: {:?}", cluster.queue());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = controller.status();
    for s in status.slots.iter().filter(|s| idle_names.contains(&s.name)) {
        assert_eq!(s.state, SlotCondition::Down, "{s:?}");
    }
    for name in &kept {
        let filter = SlotFilter { slot: Some(name.clone()), ..SlotFilter::default() };
        assert_eq!(controller.dismiss(&filter), 1);
    }
    until_queue_empty(&cluster).await;
    controller.close().await;
}

/// The launch secret and the members' own are in no process's command line
/// or environment, nor in what Slurm keeps or logs; only in the members'
/// private files, which go when they are stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launch_secret_is_in_no_argv_environment_script_or_log() {
    use std::os::unix::fs::PermissionsExt;

    use crew_core::worker::{LaunchMember, LaunchSpec, Secret, Worker};
    let Some(cluster) = Cluster::start() else { return };
    let class = class_on(&cluster, &[]);
    let secret = Secret::random();
    let secrets = [
        secret.expose().to_owned(),
        secret.member_secret(0).expose().to_owned(),
        secret.member_secret(1).expose().to_owned(),
    ];
    // Agents that hold on without taking their secrets.
    let members = vec![LaunchMember::new("slurm-1", 0), LaunchMember::new("slurm-2", 1)];
    let env = [
        ("CREW_LAUNCH".to_owned(), "7".to_owned()),
        ("CREW_CONNECT".to_owned(), "127.0.0.1:9".to_owned()),
        ("CREW_TOKEN".to_owned(), secret.expose().to_owned()),
    ]
    .into();
    let spec = LaunchSpec::new("/bin/sleep", "sleep", members).with_args(vec!["120".into()]).with_env(env);
    let handles = class.launch(&spec).await.expect("launch");
    let job = handles[0].id.split('_').next().expect("job id").to_owned();
    let deadline = Instant::now() + DEADLINE;
    while cluster.queue().iter().filter(|l| l.ends_with("RUNNING")).count() < 2 {
        assert!(Instant::now() < deadline, "the tasks did not start: {:?}", cluster.queue());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaks = |what: &str, text: &[u8]| {
        let text = String::from_utf8_lossy(text);
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret shows in {what}");
        }
    };
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            for file in ["cmdline", "environ"] {
                if let Ok(bytes) = std::fs::read(entry.path().join(file)) {
                    leaks(&format!("{}/{file}", entry.path().display()), &bytes);
                }
            }
        }
    }
    for args in [vec!["show", "job", "-d", &job], vec!["write", "batch_script", &job, "-"]] {
        let out = cluster.command("/usr/bin/scontrol").args(&args).output().expect("scontrol runs");
        assert!(out.status.success(), "scontrol {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        leaks(&format!("scontrol {args:?}"), &out.stdout);
    }
    // The members' files: private, one each, in a private folder.
    let dir = std::fs::read_dir(cluster.state_dir())
        .expect("state_dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("launch-"))
        .expect("the launch folder")
        .path();
    assert_eq!(std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777, 0o700);
    for (i, name) in ["token.0", "token.1"].iter().enumerate() {
        let path = dir.join(name);
        assert_eq!(std::fs::metadata(&path).expect("token file").permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("token"), secrets[i + 1], "each member's own secret");
    }
    class.terminate(&handles).await.expect("terminate");
    assert!(!dir.exists(), "stopped members' secrets are removed");
    until_queue_empty(&cluster).await;
    for entry in std::fs::read_dir(cluster.dir.path().join("log")).expect("logs").flatten() {
        leaks(&entry.path().display().to_string(), &std::fs::read(entry.path()).expect("log"));
    }
    for entry in std::fs::read_dir(cluster.state_dir().join("logs")).expect("worker logs").flatten() {
        leaks(&entry.path().display().to_string(), &std::fs::read(entry.path()).expect("log"));
    }
}

/// A worker that waits in Slurm's queue longer than the launch timeout is
/// not given up (nor submitted again): the timeout counts from when Slurm
/// starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_queued_past_the_launch_timeout_is_waited_for() {
    let Some(cluster) = Cluster::start() else { return };
    // Held in the queue (reason BeginTime) for 20 s.
    let class = class_on(&cluster, &[("extra", "--begin=now+20")]);
    let controller = plain_controller().await;
    let mut r = recruit(&class, 1);
    r.limits.launch_timeout = Duration::from_secs(5);
    r.limits.launch_max = 1;
    controller.recruit(r).expect("recruit");
    let started = Instant::now();
    let id = controller.send(JobSpec::shell("echo ran")).expect("send");
    let o = controller.receive_wait(Some(DEADLINE)).await.expect("the job ran");
    assert_eq!(o.id, id);
    assert_eq!(o.status, Status::Succeeded, "{o:?}");
    assert!(started.elapsed() >= Duration::from_secs(15), "the worker was held in the queue");
    assert_eq!(cluster.calls("sbatch"), 1, "no resubmission while queued");
    controller.close().await;
    until_queue_empty(&cluster).await;
}
