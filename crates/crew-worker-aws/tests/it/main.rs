//! Integration tests of the `aws-batch` class against the AWS emulator
//! (moto with a Batch backend that runs each job's container command as a
//! local process; `tests/emulators/aws-emu`, started by `cargo xtask ci`).
//!
//! The tests find the emulator through `CREW_TEST_AWS_ENDPOINT`; without
//! it they print a skip line and pass, except under `CI`, where they fail.
//! They submit to the job queues `crew-q1` and `crew-q2` (only the
//! shutdown test uses `crew-q2`), which the emulator must pre-create
//! (`BATCH_LOCAL_QUEUES=crew-q1,crew-q2`), and register their own job
//! definitions.
//!
//! The agent of the Batch jobs is this very test binary (an absolute path,
//! so the emulator needs no `PATH`): started with `--exact agent_entry`,
//! libtest runs only [`agent_entry`], which turns the process into an agent.
//!
//! Emulator limits worked around: it checks no credentials, and it does not
//! reflect resource overrides in DescribeJobs, so neither is asserted here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_batch::Client;
use aws_sdk_batch::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_batch::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_batch::error::BoxError;
use aws_sdk_batch::types::{
    ContainerProperties, JobDefinitionType, JobStatus, KeyValuesPair, ResourceRequirement, ResourceType,
};
use crew_conformance::{WorkerKit, worker};
use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit};
use crew_core::worker::{Handle, Liveness, Worker};
use crew_core::{JobSpec, Status, Tags};
use crew_exec::builtins::Builtins;
use crew_scheduler::{SlotFilter, SlotLimits};
use crew_worker_aws::AwsBatchWorker;

mod definition;

/// The queue of most tests.
const QUEUE: &str = "crew-q1";
/// The queue of the shutdown test, which lists every job on it.
const QUEUE_CLOSE: &str = "crew-q2";

/// Entry point of the agent processes; a no-op in a normal test run.
#[test]
#[ignore = "entry point of agent processes started by the tests"]
fn agent_entry() {
    // As `crew worker` does: a secret by reference is taken first.
    if let Ok(reference) = std::env::var(crew_core::worker::ENV_TOKEN_REF) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let index = crew_agent::index_from_env().expect("an index");
        let token = rt.block_on(crew_worker_aws::take_member_secret(&reference, index)).expect("the member secret");
        let cfg = crew_agent::AgentConfig::from_env(None, Some(token), Builtins::standard()).expect("config");
        let code = rt.block_on(crew_agent::run(cfg)).map_or(1, |e| e.code());
        std::process::exit(code);
    }
    crew_agent::run_if_agent(Builtins::standard());
}

fn agent() -> AgentCommand {
    let exe = std::env::current_exe().expect("test binary path");
    AgentCommand {
        program: exe.to_string_lossy().into_owned(),
        args: ["--exact", "agent_entry", "--include-ignored", "--nocapture", "--test-threads=1", "-q"]
            .map(String::from)
            .to_vec(),
        name: None,
    }
}

/// The emulator's endpoint, or `None` (test skipped) when it is not set up.
fn endpoint(test: &str) -> Option<String> {
    match std::env::var("CREW_TEST_AWS_ENDPOINT").ok().filter(|v| !v.is_empty()) {
        Some(e) => Some(e),
        None if std::env::var_os("CI").is_some() => {
            panic!("{test}: CREW_TEST_AWS_ENDPOINT is not set; run `cargo xtask ci`, which starts the AWS emulator")
        }
        None => {
            eprintln!("skipped {test}: CREW_TEST_AWS_ENDPOINT is not set (`cargo xtask ci` starts the AWS emulator)");
            None
        }
    }
}

/// Batch calls seen on the wire, by operation.
#[derive(Debug, Default)]
struct Calls {
    submit: AtomicUsize,
    describe: AtomicUsize,
    /// Most job ids in one DescribeJobs call.
    describe_ids_max: AtomicUsize,
    terminate: AtomicUsize,
}

#[derive(Debug)]
struct Count(Arc<Calls>);

impl Intercept for Count {
    fn name(&self) -> &'static str {
        "crew-test-count-calls"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let req = context.request();
        let path = req.uri().rsplit('/').next().unwrap_or_default().to_ascii_lowercase();
        match path.as_str() {
            "submitjob" => {
                self.0.submit.fetch_add(1, Ordering::SeqCst);
            }
            "describejobs" => {
                self.0.describe.fetch_add(1, Ordering::SeqCst);
                let ids = req
                    .body()
                    .bytes()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                    .and_then(|v| v["jobs"].as_array().map(Vec::len))
                    .unwrap_or(0);
                self.0.describe_ids_max.fetch_max(ids, Ordering::SeqCst);
            }
            "terminatejob" => {
                self.0.terminate.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }
}

/// A client of the emulator whose calls are counted in `calls`.
async fn client(endpoint: &str, calls: Arc<Calls>) -> Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let conf = aws_sdk_batch::config::Builder::from(&sdk).interceptor(Count(calls)).build();
    Client::from_conf(conf)
}

/// Registers a container job definition named `name` (the emulator ignores
/// the image) and returns its name.
async fn job_definition(client: &Client, name: &str) -> String {
    let resource = |t: ResourceType, v: &str| ResourceRequirement::builder().r#type(t).value(v).build();
    let props = ContainerProperties::builder()
        .image("public.ecr.aws/crew/crew:latest")
        .command("crew")
        .command("worker")
        .resource_requirements(resource(ResourceType::Vcpu, "1"))
        .resource_requirements(resource(ResourceType::Memory, "512"))
        .build();
    client
        .register_job_definition()
        .job_definition_name(name)
        .r#type(JobDefinitionType::Container)
        .container_properties(props)
        .send()
        .await
        .expect("RegisterJobDefinition");
    name.to_owned()
}

/// A unique name for this test run.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("crew-test-{what}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// The class (counting its calls), with its queue and a fresh definition.
async fn class(endpoint: &str, test: &str, queue: &str) -> (AwsBatchWorker, Client, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let client = client(endpoint, calls.clone()).await;
    let def = job_definition(&client, &unique(test)).await;
    let defaults: BTreeMap<String, String> =
        [("job-queue", queue), ("job-definition", def.as_str()), ("cpus", "1"), ("memory", "512M")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    let class = AwsBatchWorker::with_client(client.clone()).with_defaults(defaults);
    (class, client, calls)
}

async fn start() -> Controller {
    let mut config = ControllerConfig::new(agent());
    config.stop_grace = Duration::from_secs(2);
    Controller::start(config).await.expect("the controller starts")
}

fn limits() -> SlotLimits {
    SlotLimits { launch_timeout: Duration::from_secs(60), ..SlotLimits::default() }
}

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_batch_class_passes_the_worker_conformance_kit() {
    let Some(endpoint) = endpoint("aws_batch_class_passes_the_worker_conformance_kit") else { return };
    let (class, _, _) = class(&endpoint, "conformance", QUEUE).await;
    let mut kit = WorkerKit::local(agent());
    kit.launch_timeout = Duration::from_secs(30);
    kit.gone_timeout = Duration::from_secs(30);
    worker(Arc::new(class), kit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_workers_are_one_array_job_probed_in_one_call_per_round() {
    let Some(endpoint) = endpoint("twenty_workers_are_one_array_job_probed_in_one_call_per_round") else { return };
    let (class, _, calls) = class(&endpoint, "array", QUEUE).await;
    let class = Arc::new(class);
    let controller = start().await;
    let mut recruit = Recruit::new(class.clone(), 20);
    recruit.limits = limits();
    controller.recruit(recruit).expect("recruit");
    assert_eq!(controller.launch(&SlotFilter::default(), 20), 20);
    until("20 workers connect", Duration::from_secs(90), || {
        controller.status().slots.iter().filter(|s| s.state == crew_controller::SlotCondition::Idle).count() == 20
    })
    .await;
    assert_eq!(calls.submit.load(Ordering::SeqCst), 1, "20 workers must be one SubmitJob (one array job)");
    let handles: Vec<Handle> =
        controller.status().slots.iter().map(|s| Handle::new(s.handle.clone().expect("a handle"))).collect();
    let parent = handles[0].id.rsplit_once(':').expect("an array child id").0.to_owned();
    let mut indices: Vec<u32> = handles
        .iter()
        .map(|h| {
            let (p, i) = h.id.rsplit_once(':').expect("an array child id");
            assert_eq!(p, parent, "every worker is a child of the one array job");
            i.parse().expect("an index")
        })
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..20).collect::<Vec<u32>>());

    // Jobs run on them.
    let jobs: Vec<JobSpec> = (0..40).map(|i| JobSpec::builtin("echo", serde_json::json!(i))).collect();
    controller.send_many(jobs).expect("send");
    for _ in 0..40 {
        let o = controller.receive_wait(Some(Duration::from_secs(30))).await.expect("an output");
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        assert_eq!(o.class.as_deref(), Some("aws-batch"));
    }

    // The controller's probe rounds: one DescribeJobs each (20 ids < 100).
    let before = calls.describe.load(Ordering::SeqCst);
    let watched = Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let rounds = calls.describe.load(Ordering::SeqCst) - before;
    let most = watched.elapsed().as_secs() as usize / 2 + 1;
    assert!(rounds <= most, "{rounds} DescribeJobs calls in 7 s; at most one per 2 s probe round ({most})");
    assert!(calls.describe_ids_max.load(Ordering::SeqCst) <= 100, "a DescribeJobs call took more than 100 ids");

    // Direct probes: one call for all 20, then the cache until the next round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = calls.describe.load(Ordering::SeqCst);
    let lives = class.probe(&handles).await.expect("probe");
    assert!(lives.iter().all(|l| *l == Liveness::Running), "{lives:?}");
    for h in &handles {
        class.probe(std::slice::from_ref(h)).await.expect("probe");
    }
    let used = calls.describe.load(Ordering::SeqCst) - before;
    assert!(used <= 1, "probing 20 workers, then each again at once, took {used} DescribeJobs calls");
    controller.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_terminated_mid_job_has_its_crew_job_rerun() {
    let Some(endpoint) = endpoint("a_batch_job_terminated_mid_job_has_its_crew_job_rerun") else { return };
    let (class, client, _) = class(&endpoint, "terminated", QUEUE).await;
    let controller = start().await;
    let mut recruit = Recruit::new(Arc::new(class), 2);
    recruit.limits = limits();
    controller.recruit(recruit).expect("recruit");
    let marker = std::env::temp_dir().join(unique("marker"));
    // The first attempt says which Batch job runs it, then waits to be killed.
    let line = format!(
        r#"if [ "$CREW_ATTEMPT" = 1 ]; then echo "$AWS_BATCH_JOB_ID" > {m}.tmp && mv {m}.tmp {m}; sleep 60; fi; echo "$AWS_BATCH_JOB_ID""#,
        m = marker.display()
    );
    let mut job = JobSpec::shell(line);
    job.opts.env_inherit.push("AWS_BATCH_JOB_ID".to_owned());
    let id = controller.send(job).expect("send");
    let deadline = Instant::now() + Duration::from_secs(60);
    let batch_job = loop {
        if let Ok(s) = std::fs::read_to_string(&marker) {
            break s.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = std::fs::remove_file(&marker);
    client.terminate_job().job_id(&batch_job).reason("test: spot reclaim").send().await.expect("TerminateJob");
    let o = controller.receive_wait(Some(Duration::from_secs(90))).await.expect("the job ends");
    assert_eq!(o.id, id);
    assert_eq!(o.status, Status::Succeeded, "{o:?}");
    assert_eq!(o.attempt, 2, "the re-run is attempt 2: {o:?}");
    assert_ne!(o.stdout.text.trim(), batch_job, "the re-run must be on another Batch job");
    controller.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_aws_refuses_or_cannot_start_end_launch_failed_with_the_reason() {
    let Some(endpoint) = endpoint("launches_aws_refuses_or_cannot_start_end_launch_failed_with_the_reason") else {
        return;
    };
    let (class, _, calls) = class(&endpoint, "fail", QUEUE).await;
    let class = Arc::new(class);

    // SubmitJob refused: a job definition that does not exist.
    let controller = start().await;
    let mut recruit = Recruit::new(class.clone(), 1);
    recruit.limits = SlotLimits { launch_max: 2, ..limits() };
    recruit.options.insert("job-definition".into(), unique("no-such-definition"));
    controller.recruit(recruit).expect("recruit");
    controller.send(JobSpec::builtin("noop", serde_json::Value::Null)).expect("send");
    let o = controller.receive_wait(Some(Duration::from_secs(60))).await.expect("the job ends");
    assert_eq!(o.status, Status::LaunchFailed, "{o:?}");
    let err = o.error.unwrap_or_default();
    assert!(err.contains("SubmitJob") && err.contains("does not exist"), "the AWS reason is missing: {err}");
    assert_eq!(calls.submit.load(Ordering::SeqCst), 2, "two launches (the relaunch budget), no more");
    controller.close().await;

    // Submitted, but the container cannot start: a program that does not exist.
    let mut config =
        ControllerConfig::new(AgentCommand { program: "/nonexistent/crew-agent".into(), args: vec![], name: None });
    config.stop_grace = Duration::from_secs(1);
    let controller = Controller::start(config).await.expect("start");
    let mut recruit = Recruit::new(class.clone(), 1);
    recruit.limits = SlotLimits { launch_max: 2, ..limits() };
    recruit.tags = Tags::try_from_iter(["broken"]).expect("tags");
    controller.recruit(recruit).expect("recruit");
    let job =
        JobSpec::builtin("noop", serde_json::Value::Null).with_tags(Tags::try_from_iter(["broken"]).expect("tags"));
    controller.send(job).expect("send");
    let o = controller.receive_wait(Some(Duration::from_secs(60))).await.expect("the job ends");
    assert_eq!(o.status, Status::LaunchFailed, "{o:?}");
    let err = o.error.unwrap_or_default();
    assert!(err.contains("AWS Batch job") && err.contains("FAILED"), "the Batch status is missing: {err}");
    assert!(err.contains("CannotStartContainerError"), "the AWS reason is missing: {err}");
    assert_eq!(calls.submit.load(Ordering::SeqCst), 4, "two more launches, no more");
    controller.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_batch_job_runs_after_close() {
    let Some(endpoint) = endpoint("no_batch_job_runs_after_close") else { return };
    let (class, client, _) = class(&endpoint, "close", QUEUE_CLOSE).await;
    // Job names unique to this run, so that other runs' jobs do not count.
    let prefix = unique("close").replace('-', "");
    let class = Arc::new(class);
    let controller = start().await;
    let mut recruit = Recruit::new(class.clone(), 4);
    recruit.limits = limits();
    recruit.options.insert("name-prefix".into(), prefix.clone());
    controller.recruit(recruit).expect("recruit");
    assert_eq!(controller.launch(&SlotFilter::default(), 4), 4);
    until("4 workers connect", Duration::from_secs(60), || {
        controller.status().slots.iter().filter(|s| s.state == crew_controller::SlotCondition::Idle).count() == 4
    })
    .await;
    // One worker busy with a long job, three idle, and a launch in flight.
    controller.send(JobSpec::shell("sleep 60")).expect("send");
    let mut late = Recruit::new(class.clone(), 3);
    late.limits = limits();
    late.tags = Tags::try_from_iter(["late"]).expect("tags");
    late.options.insert("name-prefix".into(), prefix.clone());
    controller.recruit(late).expect("recruit");
    let job = JobSpec::builtin("noop", serde_json::Value::Null).with_tags(Tags::try_from_iter(["late"]).expect("tags"));
    controller.send(job).expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    controller.close().await;

    // Ended now, or within a few seconds (the emulator's steps are 0.2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jobs = our_jobs(&client, QUEUE_CLOSE, &prefix).await;
        let active: Vec<_> =
            jobs.iter().filter(|(_, s)| !matches!(s, JobStatus::Succeeded | JobStatus::Failed)).collect();
        if active.is_empty() {
            assert!(jobs.len() >= 4, "the workers' Batch jobs should be listed as ended: {jobs:?}");
            break;
        }
        assert!(Instant::now() < deadline, "Batch jobs still active after close: {active:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Batch jobs on `queue` whose names start with `prefix` (array
/// children included, array parents left out: their status follows their
/// children's), as (id, status).
async fn our_jobs(client: &Client, queue: &str, prefix: &str) -> Vec<(String, JobStatus)> {
    let filter = KeyValuesPair::builder().name("JOB_NAME").values(format!("{prefix}*")).build();
    let out = client.list_jobs().job_queue(queue).filters(filter).send().await.expect("ListJobs");
    let ids: Vec<String> = out.job_summary_list().iter().filter_map(|j| j.job_id().map(str::to_owned)).collect();
    let mut jobs = Vec::new();
    for chunk in ids.chunks(100) {
        let described = client.describe_jobs().set_jobs(Some(chunk.to_vec())).send().await.expect("DescribeJobs");
        for j in described.jobs() {
            if j.array_properties().is_some_and(|a| a.size().is_some() && a.index().is_none()) {
                continue;
            }
            if let (Some(id), Some(status)) = (j.job_id(), j.status()) {
                jobs.push((id.to_owned(), status.clone()));
            }
        }
    }
    jobs
}

/// A `tracing` writer into a shared buffer: every log line of the test,
/// the SDK's own at trace level included.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What SubmitJob is given: the agent command without the secret, a
/// reference to each member's own secret and the member index in the
/// environment, the attempt timeout, tags. The secret is in no
/// DescribeJobs answer and in no log line, at trace level, of the class or
/// of the agent's side ([`crew_worker_aws::take_member_secret`]); a
/// member's secret is its own, taken once; what is left is deleted when the
/// members are stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_jobs_carry_command_environment_index_timeout_and_tags() {
    use crew_core::worker::{LaunchMember, LaunchSpec, Secret};
    let Some(endpoint) = endpoint("submitted_jobs_carry_command_environment_index_timeout_and_tags") else {
        return;
    };
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let (class, client, calls) = class(&endpoint, "submit", QUEUE).await;
    let secret = Secret::random();
    let env: BTreeMap<String, String> =
        [("CREW_CONNECT", "127.0.0.1:9"), ("CREW_LAUNCH", "7"), ("CREW_TOKEN", secret.expose())]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    let options: BTreeMap<String, String> = [("wall-grace", "1m"), ("tags", "team=genomics")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let spec = |members: Vec<LaunchMember>| {
        LaunchSpec::new("/bin/true", "true", members)
            .with_args(vec!["worker".into()])
            .with_env(env.clone())
            .with_options(options.clone())
            .with_wall_time(Some(Duration::from_secs(60)))
    };
    let member = |index: u32| LaunchMember::new(format!("aws-batch-{index}"), index);
    // Members 5 and 6 of a launch: one array whose children add 5.
    let array = class.launch(&spec(vec![member(5), member(6)])).await.expect("launch");
    // Member 9 alone: a plain job told its index.
    let single = class.launch(&spec(vec![member(9)])).await.expect("launch");
    assert_eq!(calls.submit.load(Ordering::SeqCst), 2);
    assert_eq!(array.len(), 2);
    let parent = array[0].id.rsplit_once(':').expect("an array child").0.to_owned();
    let out = client.describe_jobs().jobs(&parent).jobs(&single[0].id).send().await.expect("DescribeJobs");
    assert_eq!(out.jobs().len(), 2, "{out:?}");
    let answer = format!("{out:?}");
    let mut references = BTreeMap::new();
    for job in out.jobs() {
        let container = job.container().expect("a container job");
        // The program by its name, for the image's PATH; the secret never
        // goes on the command line.
        assert_eq!(container.command(), ["true", "worker"]);
        let env: BTreeMap<&str, &str> =
            container.environment().iter().filter_map(|kv| Some((kv.name()?, kv.value()?))).collect();
        assert_eq!(env.get("CREW_TOKEN"), None, "the secret itself is never submitted");
        let reference = env.get("CREW_TOKEN_REF").expect("a reference to the secret");
        assert!(reference.starts_with("ssm:/crew/launch-7-"), "{reference}");
        references.insert(job.job_id().unwrap_or_default().to_owned(), (*reference).to_owned());
        assert_eq!(env.get("CREW_LAUNCH"), Some(&"7"));
        if job.job_id() == Some(parent.as_str()) {
            assert_eq!(env.get("CREW_INDEX_BASE"), Some(&"5"), "{env:?}");
            assert_eq!(env.get("CREW_INDEX"), None);
            assert_eq!(job.job_name(), Some("crew-aws-batch-5-to-aws-batch-6"));
        } else {
            assert_eq!(env.get("CREW_INDEX"), Some(&"9"), "{env:?}");
            assert_eq!(job.job_name(), Some("crew-aws-batch-9"));
        }
        assert_eq!(job.timeout().and_then(|t| t.attempt_duration_seconds()), Some(120), "wall time + grace");
        let tags = job.tags().cloned().unwrap_or_default();
        assert_eq!(tags.get("team").map(String::as_str), Some("genomics"), "{tags:?}");
        assert_eq!(tags.get("crew-launch").map(String::as_str), Some("7"), "{tags:?}");
    }
    // Nothing secret in what DescribeJobs answers.
    let members: Vec<Secret> = [5, 6, 9].map(|i| secret.member_secret(i)).to_vec();
    for s in std::iter::once(&secret).chain(&members) {
        assert!(!answer.contains(s.expose()), "DescribeJobs shows a secret");
    }
    // Each member takes its own secret, once; 5's cannot be taken as 6's.
    let array_ref = &references[&parent];
    let five = crew_worker_aws::take_member_secret(array_ref, 5).await.expect("member 5's secret");
    assert_eq!(five, members[0]);
    assert_ne!(five, members[1], "a member's secret is its own");
    let again = crew_worker_aws::take_member_secret(array_ref, 5).await.expect_err("a second use");
    assert!(again.to_string().contains("is gone"), "{again}");
    let nine = crew_worker_aws::take_member_secret(&references[&single[0].id], 9).await.expect("member 9's secret");
    assert_eq!(nine, members[2]);
    // Stopping the members deletes what their agents did not take (6's).
    class.terminate(&array).await.expect("terminate");
    let six = crew_worker_aws::take_member_secret(array_ref, 6).await.expect_err("6's secret is deleted");
    assert!(six.to_string().contains("is gone"), "{six}");
    // A command of the user's choosing.
    let mut custom = spec(vec![member(0)]);
    custom.options.insert("agent-command".into(), "/opt/crew/bin/crew  worker".into());
    let handles = class.launch(&custom).await.expect("launch");
    let out = client.describe_jobs().jobs(&handles[0].id).send().await.expect("DescribeJobs");
    let command = out.jobs()[0].container().map(|c| c.command().to_vec()).unwrap_or_default();
    assert_eq!(command, ["/opt/crew/bin/crew", "worker"]);
    class.terminate(&handles).await.expect("terminate");
    class.terminate(&single).await.expect("terminate");
    // No log line, at any level, carries a secret.
    let text = String::from_utf8_lossy(&log.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned();
    assert!(text.contains("TRACE"), "the SDK's trace logging was captured");
    for s in std::iter::once(&secret).chain(&members) {
        assert!(!text.contains(s.expose()), "a secret is in the log");
    }
}
