//! The `aws-batch` worker class: crew agents as AWS Batch jobs.
//!
//! A class only starts agents, tells whether they live, and stops them
//! (`crew_core::worker`); this one does it with three Batch calls:
//!
//! - `launch` submits **one array job** for the N members of a launch
//!   (`arrayProperties.size = N`; Batch arrays hold 2 to 10,000 children),
//!   a plain job for one member, and several arrays past 10,000. The
//!   container command is the agent (`crew worker`), and the launch's
//!   environment (controller address, launch id) goes in as container
//!   environment overrides, never on the command line; the secret does
//!   not: each member gets its own, by reference, in an SSM SecureString
//!   read once by its agent ([`secrets`]). Each
//!   child learns its member index from `AWS_BATCH_JOB_ARRAY_INDEX` (plus
//!   `CREW_INDEX_BASE` for the arrays after the first); a plain job gets
//!   `CREW_INDEX`. Handles are Batch job ids: `<arrayJobId>:<index>` for
//!   array children.
//! - `probe` describes up to 100 jobs per DescribeJobs call and is rate
//!   limited: a job is described at most once per probe interval (2 s by
//!   default), and between rounds callers get the last answer. A round also
//!   refreshes every other live job this instance started, so a controller
//!   that probes handle by handle still costs one call per 100 jobs.
//! - `terminate` calls TerminateJob (reason "terminated by crew") on every
//!   handle, and on an array's parent when every child of it is asked for;
//!   a job that already ended, or that Batch does not know, is success.
//!
//! Options (`--opt key=value`, `[class.aws-batch]` in `crew.toml`) are
//! parsed by [`BatchOptions`]; [`AwsBatchWorker::new`] also takes defaults
//! from `CREW_AWS_*` variables. Clients come from aws-config's standard
//! chain (environment, profile, SSO, process credentials, IMDS/ECS), with
//! the `region` and `endpoint` options (or `AWS_ENDPOINT_URL`) on top.
//!
//! [`definition`] registers job definitions fit for the class (`crew
//! aws-batch register-definition`), with clients built the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_batch::Client;
use aws_sdk_batch::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_batch::types::{
    ArrayProperties, ContainerOverrides, JobDetail, JobStatus, JobTimeout, KeyValuePair, ResourceRequirement,
    ResourceType,
};
use crew_core::worker::{
    Capabilities, ENV_INDEX, ENV_INDEX_BASE, ENV_TOKEN, ENV_TOKEN_REF, Handle, LaunchMember, LaunchSpec, Liveness,
    Secret, Worker, WorkerError,
};
use futures::StreamExt;
use tracing::{debug, warn};

pub mod definition;
mod options;
pub mod secrets;
pub use definition::{DefinitionError, DefinitionRequest, register_definition};
pub use options::{BatchOptions, DEFAULT_WALL_GRACE, ENV_PREFIX, KEYS, env_defaults, env_name, parse_memory};
pub use secrets::{REF_SCHEME, SecretError, take_member_secret};

/// The class name.
pub const CLASS: &str = "aws-batch";
/// Most children of one Batch array job.
pub const ARRAY_SIZE_MAX: usize = 10_000;
/// Most job ids one DescribeJobs call takes.
pub const DESCRIBE_MAX: usize = 100;
/// The default probe interval: a job is described at most this often.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// The reason given to TerminateJob.
pub const TERMINATE_REASON: &str = "terminated by crew";
/// Ended jobs are forgotten this long after their end was seen.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How long a job this instance submitted counts as starting while
/// DescribeJobs does not list it yet.
const NEW_JOB_GRACE: Duration = Duration::from_secs(30);
/// TerminateJob calls in flight at once.
const TERMINATE_CONCURRENCY: usize = 8;

/// Which client a job belongs to: (region, endpoint) options.
type ClientKey = (Option<String>, Option<String>);

/// The `aws-batch` class. Cheap to clone; clones share their state (the
/// jobs started, the probe cache, the clients).
#[derive(Clone, Debug)]
pub struct AwsBatchWorker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Option defaults from `CREW_AWS_*`, under the recruit's options.
    defaults: BTreeMap<String, String>,
    /// A client given by the embedder, used for every call.
    fixed: Option<Client>,
    /// Clients built from aws-config, per (region, endpoint).
    clients: tokio::sync::Mutex<HashMap<ClientKey, Client>>,
    /// What this instance knows of each job, by handle id.
    jobs: Mutex<HashMap<String, Known>>,
    /// Arrays this instance submitted: parent id → size.
    arrays: Mutex<HashMap<String, usize>>,
    /// SSM clients (launch secrets), per (region, endpoint).
    ssm: tokio::sync::Mutex<HashMap<ClientKey, aws_sdk_ssm::Client>>,
    /// The launch-secret parameter of each member not yet ended, by handle.
    secrets: Mutex<HashMap<String, (ClientKey, String)>>,
    /// One probe round at a time.
    round: tokio::sync::Mutex<()>,
    probe_interval: Duration,
}

#[derive(Clone, Debug)]
struct Known {
    client: ClientKey,
    life: Liveness,
    /// When `life` was read from Batch; `None`: never, or invalidated.
    at: Option<Instant>,
    /// When this instance submitted the job.
    submitted: Option<Instant>,
}

impl Known {
    fn live(&self) -> bool {
        matches!(self.life, Liveness::Starting | Liveness::Running)
    }
}

impl Default for AwsBatchWorker {
    fn default() -> Self {
        Self::new()
    }
}

impl AwsBatchWorker {
    /// A class whose option defaults come from the `CREW_AWS_*` variables
    /// (read now, once): `CREW_AWS_JOB_QUEUE`, `CREW_AWS_JOB_DEFINITION`,
    /// `CREW_AWS_CPUS`, `CREW_AWS_MEMORY`, `CREW_AWS_GPUS`,
    /// `CREW_AWS_REGION`, `CREW_AWS_ENDPOINT`, `CREW_AWS_SHARE_IDENTIFIER`,
    /// `CREW_AWS_SCHEDULING_PRIORITY`, `CREW_AWS_TAGS`,
    /// `CREW_AWS_WALL_GRACE`, `CREW_AWS_NAME_PREFIX`. Options given at
    /// recruit time (or in `crew.toml`) win over them.
    pub fn new() -> Self {
        Self::build(env_defaults(), None)
    }

    /// A class that makes every call with `client` (the `region` and
    /// `endpoint` options are then ignored), with no defaults from the
    /// environment. For embedders with their own SDK configuration, and for
    /// tests that observe the calls.
    pub fn with_client(client: Client) -> Self {
        Self::build(BTreeMap::new(), Some(client))
    }

    fn build(defaults: BTreeMap<String, String>, fixed: Option<Client>) -> Self {
        Self {
            inner: Arc::new(Inner {
                defaults,
                fixed,
                clients: tokio::sync::Mutex::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                arrays: Mutex::new(HashMap::new()),
                ssm: tokio::sync::Mutex::new(HashMap::new()),
                secrets: Mutex::new(HashMap::new()),
                round: tokio::sync::Mutex::new(()),
                probe_interval: DEFAULT_PROBE_INTERVAL,
            }),
        }
    }

    /// The same class with another probe interval (how stale a probe's
    /// answer may be). Call before sharing the class.
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.probe_interval = interval.max(Duration::from_millis(1));
        }
        self
    }

    /// Replaces the option defaults (instead of the `CREW_AWS_*` ones).
    pub fn with_defaults(mut self, defaults: BTreeMap<String, String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.defaults = defaults;
        }
        self
    }

    fn parse_options(&self, options: &BTreeMap<String, String>) -> Result<BatchOptions, WorkerError> {
        BatchOptions::parse(&self.inner.defaults, options)
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.inner.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn arrays(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner.arrays.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn secrets(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ClientKey, String)>> {
        self.inner.secrets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The SSM client for `key` (launch secrets), built once.
    async fn ssm(&self, key: &ClientKey) -> Result<aws_sdk_ssm::Client, WorkerError> {
        let mut clients = self.inner.ssm.lock().await;
        if let Some(c) = clients.get(key) {
            return Ok(c.clone());
        }
        let client = secrets::client(key.0.as_deref(), key.1.as_deref()).await.ok_or_else(|| WorkerError::Options {
            class: CLASS.to_owned(),
            message: "no AWS region: pass --opt region=..., or set AWS_REGION or a profile's region".to_owned(),
        })?;
        clients.insert(key.clone(), client.clone());
        Ok(client)
    }

    /// Deletes the launch-secret parameters left for `handles` (members
    /// that ended or are being stopped before their agent took theirs).
    async fn drop_secrets(&self, handles: impl Iterator<Item = &str>) {
        let mut by_client: HashMap<ClientKey, Vec<String>> = HashMap::new();
        {
            let mut secrets = self.secrets();
            for h in handles {
                if let Some((key, name)) = secrets.remove(h) {
                    by_client.entry(key).or_default().push(name);
                }
            }
        }
        for (key, names) in by_client {
            if let Ok(client) = self.ssm(&key).await {
                secrets::delete(&client, &names).await;
            }
        }
    }

    /// The client for `key`, built once from aws-config's standard chain.
    async fn client(&self, key: &ClientKey) -> Result<Client, WorkerError> {
        if let Some(c) = &self.inner.fixed {
            return Ok(c.clone());
        }
        let mut clients = self.inner.clients.lock().await;
        if let Some(c) = clients.get(key) {
            return Ok(c.clone());
        }
        let Some(client) = load_client(key.0.as_deref(), key.1.as_deref()).await else {
            return Err(WorkerError::Options {
                class: CLASS.to_owned(),
                message: "no AWS region: pass --opt region=..., or set AWS_REGION or a profile's region".to_owned(),
            });
        };
        clients.insert(key.clone(), client.clone());
        Ok(client)
    }

    fn client_key_of(&self, handle: &str) -> ClientKey {
        self.jobs().get(handle).map(|k| k.client.clone()).unwrap_or_default()
    }

    async fn submit(
        &self,
        client: &Client,
        opts: &BatchOptions,
        spec: &LaunchSpec,
        run: &[(String, u32)],
        secret: Option<(&ClientKey, &str)>,
    ) -> Result<Vec<Handle>, WorkerError> {
        let first = run[0].1;
        // Never the secret itself: a reference to each member's own.
        let mut env: Vec<(String, String)> =
            spec.env.iter().filter(|(k, _)| k.as_str() != ENV_TOKEN).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut parameters = Vec::new();
        if let (Some((key, prefix)), Some(token)) = (secret, spec.env.get(ENV_TOKEN)) {
            let ssm = self.ssm(key).await?;
            let indices: Vec<u32> = run.iter().map(|m| m.1).collect();
            parameters = secrets::put_member_secrets(&ssm, prefix, &Secret::new(token.clone()), &indices).await?;
            env.push((ENV_TOKEN_REF.to_owned(), format!("{REF_SCHEME}{prefix}")));
        }
        if run.len() == 1 {
            env.push((ENV_INDEX.to_owned(), first.to_string()));
        } else if first != 0 {
            env.push((ENV_INDEX_BASE.to_owned(), first.to_string()));
        }
        let command = agent_command(opts, spec);
        let mut resources = Vec::new();
        let mut resource = |kind: ResourceType, value: String| {
            resources.push(ResourceRequirement::builder().r#type(kind).value(value).build());
        };
        if let Some(c) = &opts.cpus {
            resource(ResourceType::Vcpu, c.clone());
        }
        if let Some(m) = opts.memory_mib {
            resource(ResourceType::Memory, m.to_string());
        }
        if let Some(g) = opts.gpus {
            resource(ResourceType::Gpu, g.to_string());
        }
        let environment = env
            .into_iter()
            .map(|(name, value)| KeyValuePair::builder().name(name).value(value).build())
            .collect::<Vec<_>>();
        let overrides = ContainerOverrides::builder()
            .set_command(Some(command))
            .set_environment(Some(environment))
            .set_resource_requirements((!resources.is_empty()).then_some(resources))
            .build();
        let name = job_name(&opts.name_prefix, &run[0].0, &run[run.len() - 1].0, run.len());
        let mut req = client
            .submit_job()
            .job_name(name)
            .job_queue(&opts.job_queue)
            .job_definition(&opts.job_definition)
            .container_overrides(overrides)
            .propagate_tags(true)
            .tags("crew-class", CLASS)
            .tags("crew-slot", run[0].0.clone())
            .set_share_identifier(opts.share_identifier.clone())
            .set_scheduling_priority_override(opts.scheduling_priority);
        if let Some(launch) = spec.env.get(crew_core::worker::ENV_LAUNCH) {
            req = req.tags("crew-launch", launch.clone());
        }
        for (k, v) in &opts.tags {
            req = req.tags(k.clone(), v.clone());
        }
        if run.len() > 1 {
            req = req.array_properties(ArrayProperties::builder().size(run.len() as i32).build());
        }
        if let Some(secs) = opts.attempt_seconds(spec.wall_time) {
            req = req.timeout(JobTimeout::builder().attempt_duration_seconds(secs).build());
        }
        let submitted = req.send().await.map_err(|e| platform("SubmitJob", e)).and_then(|out| {
            out.job_id().map(str::to_owned).ok_or_else(|| WorkerError::Platform {
                class: CLASS.to_owned(),
                message: "SubmitJob: the answer has no job id".to_owned(),
                retryable: false,
            })
        });
        let id = match submitted {
            Ok(id) => id,
            Err(e) => {
                if let Some((key, _)) = secret {
                    if let Ok(ssm) = self.ssm(key).await {
                        secrets::delete(&ssm, &parameters).await;
                    }
                }
                return Err(e);
            }
        };
        debug!(job = %id, members = run.len(), "submitted a Batch job");
        let handles: Vec<Handle> = if run.len() == 1 {
            vec![Handle::new(id)]
        } else {
            self.arrays().insert(id.clone(), run.len());
            (0..run.len()).map(|i| Handle::new(format!("{id}:{i}"))).collect()
        };
        if let Some((key, _)) = secret {
            let mut secrets = self.secrets();
            for (h, name) in handles.iter().zip(parameters) {
                secrets.insert(h.id.clone(), (key.clone(), name));
            }
        }
        Ok(handles)
    }

    /// Describes `ids` (all of one client), up to [`DESCRIBE_MAX`] per call,
    /// and records what Batch said.
    async fn describe(&self, key: &ClientKey, ids: &[String]) -> Result<(), WorkerError> {
        let client = self.client(key).await?;
        for chunk in ids.chunks(DESCRIBE_MAX) {
            let out = client
                .describe_jobs()
                .set_jobs(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| platform("DescribeJobs", e))?;
            let mut found: HashMap<&str, Liveness> = HashMap::new();
            for job in out.jobs() {
                if let Some(id) = job.job_id() {
                    found.insert(id, liveness(job));
                }
            }
            let now = Instant::now();
            let mut jobs = self.jobs();
            for id in chunk {
                let entry = jobs.entry(id.clone()).or_insert_with(|| Known {
                    client: key.clone(),
                    life: Liveness::Unknown,
                    at: None,
                    submitted: None,
                });
                entry.life = match found.remove(id.as_str()) {
                    Some(life) => life,
                    // DescribeJobs is eventually consistent: a job just
                    // submitted may not be listed yet.
                    None if entry.submitted.is_some_and(|t| now.duration_since(t) < NEW_JOB_GRACE) => {
                        Liveness::Starting
                    }
                    None => Liveness::Unknown,
                };
                entry.at = Some(now);
            }
        }
        Ok(())
    }

    async fn terminate_one(&self, id: &str) -> Result<(), WorkerError> {
        let client = self.client(&self.client_key_of(id)).await?;
        match client.terminate_job().job_id(id).reason(TERMINATE_REASON).send().await {
            Ok(_) => Ok(()),
            // Batch answers ClientException for a job it does not know;
            // terminating nothing is success.
            Err(SdkError::ServiceError(e)) if e.err().code() == Some("ClientException") => {
                debug!(job = id, "TerminateJob: {}", e.err().message().unwrap_or("client error"));
                Ok(())
            }
            Err(e) => Err(platform("TerminateJob", e)),
        }
    }
}

/// The members of a launch as runs of consecutive indices of at most
/// [`ARRAY_SIZE_MAX`]: each run is one array job (or one plain job), whose
/// children map their array index to `first index + array index`.
fn runs(members: &[LaunchMember]) -> Vec<Vec<(String, u32)>> {
    let mut runs: Vec<Vec<(String, u32)>> = Vec::new();
    for m in members {
        match runs.last_mut() {
            Some(run)
                if run.len() < ARRAY_SIZE_MAX && run.last().is_some_and(|(_, i)| i.checked_add(1) == Some(m.index)) =>
            {
                run.push((m.slot.clone(), m.index));
            }
            _ => runs.push(vec![(m.slot.clone(), m.index)]),
        }
    }
    runs
}

/// A Batch job name for the slots `first` to `last`: letters, digits, `-`
/// and `_`, starting with a letter or digit, at most 128 characters.
pub fn job_name(prefix: &str, first: &str, last: &str, count: usize) -> String {
    let raw = if count <= 1 { format!("{prefix}-{first}") } else { format!("{prefix}-{first}-to-{last}") };
    let mut name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'c');
    }
    name.truncate(128);
    name
}

/// What a job's Batch status means for its agent.
fn liveness(job: &JobDetail) -> Liveness {
    match job.status() {
        Some(JobStatus::Running) => Liveness::Running,
        Some(JobStatus::Succeeded | JobStatus::Failed) => Liveness::Exited { reason: exit_reason(job) },
        Some(JobStatus::Submitted | JobStatus::Pending | JobStatus::Runnable | JobStatus::Starting) | None => {
            Liveness::Starting
        }
        Some(other) => {
            warn!(status = other.as_str(), "unknown AWS Batch job status; taken as starting");
            Liveness::Starting
        }
    }
}

/// The end of a Batch job in AWS's words: status, `statusReason`, and the
/// container's `reason` and exit code.
fn exit_reason(job: &JobDetail) -> String {
    let status = job.status().map(|s| s.as_str()).unwrap_or("ended");
    let mut reason = format!("AWS Batch job {} {status}", job.job_id().unwrap_or("?"));
    let status_reason = job.status_reason().filter(|r| !r.is_empty());
    if let Some(r) = status_reason {
        reason.push_str(": ");
        reason.push_str(r);
    }
    if let Some(c) = job.container() {
        if let Some(r) = c.reason().filter(|r| !r.is_empty() && Some(*r) != status_reason) {
            reason.push_str(&format!(" (container: {r})"));
        }
        if let Some(code) = c.exit_code() {
            reason.push_str(&format!(", exit code {code}"));
        }
    }
    reason
}

/// A Batch client from aws-config's standard chain (environment, profile,
/// SSO, process credentials, IMDS/ECS) with `region` and `endpoint` on top
/// (`AWS_ENDPOINT_URL` also works), with bounded timeouts; `None` when no
/// region is found. The class's clients and [`definition::connect`] are
/// built here, so both read the same settings.
pub(crate) async fn load_client(region: Option<&str>, endpoint: Option<&str>) -> Option<Client> {
    sdk_config(region, endpoint).await.map(|c| Client::new(&c))
}

/// The SDK configuration behind [`load_client`] (and the SSM client of
/// [`secrets`]); `None` when no region is found.
pub(crate) async fn sdk_config(region: Option<&str>, endpoint: Option<&str>) -> Option<aws_config::SdkConfig> {
    // Bounded calls: a probe round holds the class's round lock.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(20))
        .operation_timeout(Duration::from_secs(60))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let config = loader.load().await;
    config.region()?;
    Some(config)
}

/// A failed SDK call as a class error, retryable when the same call may
/// succeed later (network, throttling, a Batch server error).
fn platform<E, R>(call: &str, e: SdkError<E, R>) -> WorkerError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let (message, retryable) = sdk_error_text(call, &e);
    WorkerError::Platform { class: CLASS.to_owned(), message, retryable }
}

/// An error and its sources in one line, `a: b: c`, each message once
/// (`DisplayErrorContext` appends a `Debug` dump, too much for a user).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// A failed SDK call in one line that says what to check, and whether the
/// same call may succeed later (network, throttling, a Batch server error).
///
/// A credential chain that found nothing fails before anything is sent
/// (the SDK reports it as a dispatch failure, like a connection refused),
/// so the two are told apart by the cause's text.
pub(crate) fn sdk_error_text<E, R>(call: &str, e: &SdkError<E, R>) -> (String, bool)
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let retryable = match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(s) => matches!(
            s.err().code(),
            Some("ServerException" | "TooManyRequestsException" | "ThrottlingException" | "RequestLimitExceeded")
        ),
        _ => false,
    };
    if let Some(code) = e.code() {
        let mut message = format!("{call}: {code}: {}", e.message().unwrap_or("no message"));
        if matches!(
            code,
            "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "InvalidClientTokenId"
                | "IncompleteSignature"
        ) {
            message.push_str(
                " (AWS refused the credentials: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, \
                 or run `aws sso login` if the session expired)",
            );
        }
        return (message, retryable);
    }
    let cause = causes(e);
    let message = match e {
        SdkError::DispatchFailure(d) if d.is_other() && cause.to_ascii_lowercase().contains("credentials") => format!(
            "{call}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming \
             a profile of ~/.aws/config (`aws configure`, `aws sso login`), or run with an instance or container \
             role ({cause})"
        ),
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => format!(
            "{call}: cannot reach AWS Batch: {cause} (check the region, the endpoint if one is set, e.g. \
             AWS_ENDPOINT_URL, and the network)"
        ),
        SdkError::TimeoutError(_) => format!(
            "{call}: AWS Batch did not answer in time: {cause} (check the region, the endpoint if one is set, \
             e.g. AWS_ENDPOINT_URL, and the network)"
        ),
        _ => format!("{call}: {cause}"),
    };
    (message, retryable)
}

#[async_trait]
impl Worker for AwsBatchWorker {
    fn class(&self) -> &str {
        CLASS
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::remote(ARRAY_SIZE_MAX, DESCRIBE_MAX, self.inner.probe_interval)
    }

    fn options(&self) -> Vec<crew_core::worker::OptionSpec> {
        options::specs()
    }

    fn check_options(&self, options: &BTreeMap<String, String>) -> Result<(), WorkerError> {
        self.parse_options(options).map(|_| ())
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Handle>, WorkerError> {
        let opts = self.parse_options(&spec.options)?;
        if spec.members.is_empty() {
            return Ok(Vec::new());
        }
        let key: ClientKey = (opts.region.clone(), opts.endpoint.clone());
        let client = self.client(&key).await?;
        let runs = runs(&spec.members);
        let launch = spec.env.get(crew_core::worker::ENV_LAUNCH).map_or("", String::as_str);
        let prefix = secrets::prefix(launch);
        let secret = spec.env.contains_key(ENV_TOKEN).then_some((&key, prefix.as_str()));
        let mut handles = Vec::with_capacity(spec.members.len());
        for run in &runs {
            match self.submit(&client, &opts, spec, run, secret).await {
                Ok(hs) => handles.extend(hs),
                Err(e) => {
                    // All or nothing: stop what this launch already started.
                    if !handles.is_empty() {
                        let _ = self.terminate(&handles).await;
                    }
                    return Err(e);
                }
            }
        }
        let now = Instant::now();
        let mut jobs = self.jobs();
        for h in &handles {
            jobs.insert(
                h.id.clone(),
                Known { client: key.clone(), life: Liveness::Starting, at: None, submitted: Some(now) },
            );
        }
        Ok(handles)
    }

    async fn probe(&self, handles: &[Handle]) -> Result<Vec<Liveness>, WorkerError> {
        let _round = self.inner.round.lock().await;
        let now = Instant::now();
        let interval = self.inner.probe_interval;
        let stale = |k: &Known| k.at.is_none_or(|at| now.duration_since(at) >= interval);
        let mut wanted: HashMap<ClientKey, Vec<String>> = HashMap::new();
        {
            let mut jobs = self.jobs();
            jobs.retain(|_, k| k.live() || k.at.is_none_or(|at| now.duration_since(at) < FORGET_AFTER));
            let mut requested_stale = false;
            for h in handles {
                let k = jobs.entry(h.id.clone()).or_insert_with(|| Known {
                    client: ClientKey::default(),
                    life: Liveness::Unknown,
                    at: None,
                    submitted: None,
                });
                // An ended job stays ended: no need to ask again.
                if stale(k) && !matches!(k.life, Liveness::Exited { .. }) {
                    requested_stale = true;
                    wanted.entry(k.client.clone()).or_default().push(h.id.clone());
                }
            }
            if requested_stale {
                // Refresh every other live job in the same round (the
                // requested ones are deduplicated below).
                for (id, k) in jobs.iter() {
                    if k.live() && stale(k) {
                        wanted.entry(k.client.clone()).or_default().push(id.clone());
                    }
                }
            }
        }
        for (key, mut ids) in wanted {
            ids.sort_unstable();
            ids.dedup();
            self.describe(&key, &ids).await?;
        }
        let lives: Vec<Liveness> = {
            let jobs = self.jobs();
            handles.iter().map(|h| jobs.get(&h.id).map_or(Liveness::Unknown, |k| k.life.clone())).collect()
        };
        // A member that ended no longer needs its secret, taken or not.
        let ended = handles.iter().zip(&lives).filter(|(_, l)| matches!(l, Liveness::Exited { .. }));
        self.drop_secrets(ended.map(|(h, _)| h.id.as_str())).await;
        Ok(lives)
    }

    async fn terminate(&self, handles: &[Handle]) -> Result<(), WorkerError> {
        let mut ids: Vec<String> = handles.iter().map(|h| h.id.clone()).collect();
        // An array whose every child is asked for: its parent too (on AWS
        // that also stops children not started yet).
        {
            let arrays = self.arrays();
            let mut children: HashMap<&str, usize> = HashMap::new();
            for h in handles {
                if let Some((parent, _)) = h.id.rsplit_once(':') {
                    *children.entry(parent).or_default() += 1;
                }
            }
            for (parent, n) in children {
                if arrays.get(parent) == Some(&n) {
                    ids.push(parent.to_owned());
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        {
            // The next probe asks Batch again.
            let mut jobs = self.jobs();
            for id in &ids {
                if let Some(k) = jobs.get_mut(id) {
                    if k.live() {
                        k.at = None;
                    }
                }
            }
        }
        self.drop_secrets(handles.iter().map(|h| h.id.as_str())).await;
        let this = self;
        let results: Vec<Result<(), WorkerError>> = futures::stream::iter(ids)
            .map(|id| async move { this.terminate_one(&id).await })
            .buffer_unordered(TERMINATE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// The container command of the agent: the `agent-command` option, else
/// the agent program by its portable name (`crew`: the image has its own
/// copy on its `PATH`, not at the controller's path) and its arguments.
fn agent_command(opts: &BatchOptions, spec: &LaunchSpec) -> Vec<String> {
    if let Some(words) = &opts.agent_command {
        return words.clone();
    }
    std::iter::once(spec.program_name.clone()).chain(spec.args.iter().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::{ARRAY_SIZE_MAX, LaunchMember, job_name, runs};

    #[test]
    fn launches_split_into_arrays_of_at_most_10000() {
        let members = |idx: &mut dyn Iterator<Item = u32>| -> Vec<LaunchMember> {
            idx.map(|index| LaunchMember::new(format!("aws-batch-{index}"), index)).collect()
        };
        let sizes = |m: &[LaunchMember]| runs(m).iter().map(|r| (r[0].1, r.len())).collect::<Vec<_>>();
        assert_eq!(sizes(&members(&mut (0..1))), vec![(0, 1)]);
        assert_eq!(sizes(&members(&mut (0..20))), vec![(0, 20)]);
        assert_eq!(
            sizes(&members(&mut (0..25_001))),
            vec![(0, ARRAY_SIZE_MAX), (10_000, ARRAY_SIZE_MAX), (20_000, 5_001)]
        );
        assert_eq!(sizes(&members(&mut (0..10_001))), vec![(0, ARRAY_SIZE_MAX), (10_000, 1)]);
        assert_eq!(sizes(&members(&mut [0, 1, 5, 6, 7].into_iter())), vec![(0, 2), (5, 3)]);
    }

    #[test]
    fn job_names_are_valid_for_batch() {
        assert_eq!(job_name("crew", "aws-batch-1", "aws-batch-1", 1), "crew-aws-batch-1");
        assert_eq!(job_name("crew", "aws-batch-1", "aws-batch-20", 20), "crew-aws-batch-1-to-aws-batch-20");
        assert_eq!(job_name("crew", "a.b c", "x", 1), "crew-a-b-c");
        let long = "s".repeat(300);
        assert_eq!(job_name("crew", &long, &long, 2).len(), 128);
    }
}
