//! `crew_worker_aws::definition` against the emulator: what is registered
//! (read back with DescribeJobDefinitions), revisions, and workers that
//! actually run on a registered definition through the class.
//!
//! moto 5.2.5 stores and returns every field sent here (it validates few),
//! so the assertions read them back; it does not check that the roles exist
//! nor that Fargate's sizes are valid, which the request's own checks
//! (unit tests in `definition.rs`) cover.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_batch::Client;
use aws_sdk_batch::types::{AssignPublicIp, JobDefinition, PlatformCapability, ResourceType};
use crew_controller::Recruit;
use crew_core::{JobSpec, Status};
use crew_worker_aws::definition::{self, DefinitionRequest, Platform};
use crew_worker_aws::{AwsBatchWorker, register_definition};

use super::{QUEUE, endpoint, limits, start, unique};

const JOB_ROLE: &str = "arn:aws:iam::123456789012:role/crew-job";
const EXECUTION_ROLE: &str = "arn:aws:iam::123456789012:role/ecsTaskExecutionRole";

/// The definition `name`'s revision `revision`, as Batch describes it.
async fn described(client: &Client, name: &str, revision: i32) -> JobDefinition {
    let out = client.describe_job_definitions().job_definition_name(name).send().await.expect("DescribeJobDefinitions");
    out.job_definitions()
        .iter()
        .find(|d| d.revision() == Some(revision))
        .unwrap_or_else(|| panic!("no revision {revision} of {name}: {out:?}"))
        .clone()
}

fn resources(d: &JobDefinition) -> BTreeMap<String, String> {
    let container = d.container_properties().expect("container properties");
    container
        .resource_requirements()
        .iter()
        .map(|r| (r.r#type().map(ResourceType::as_str).unwrap_or("?").to_owned(), r.value().unwrap_or("?").to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_definition_has_image_command_resources_role_and_platform() {
    let Some(endpoint) = endpoint("a_registered_definition_has_image_command_resources_role_and_platform") else {
        return;
    };
    // The client as the CLI builds it: the class's own construction.
    let client = definition::connect(Some("us-east-1"), Some(&endpoint)).await.expect("a client");
    let name = unique("def");
    let request = DefinitionRequest {
        name: name.clone(),
        cpus: "2".into(),
        memory_mib: definition::parse_memory_mib("3GiB").expect("a size"),
        job_role_arn: Some(JOB_ROLE.into()),
        ..DefinitionRequest::new("public.ecr.aws/example/crew:1")
    };
    let first = register_definition(&client, &request).await.expect("RegisterJobDefinition");
    assert_eq!((first.name.as_str(), first.revision), (name.as_str(), 1));
    assert!(first.arn.starts_with("arn:aws:batch:") && first.arn.ends_with(&format!("/{name}:1")), "{first:?}");

    let d = described(&client, &name, 1).await;
    assert_eq!(d.r#type(), Some("container"));
    let c = d.container_properties().expect("container properties");
    assert_eq!(c.image(), Some("public.ecr.aws/example/crew:1"));
    assert_eq!(c.command(), ["crew", "worker"]);
    assert_eq!(c.job_role_arn(), Some(JOB_ROLE));
    assert_eq!(c.execution_role_arn(), None);
    assert!(c.network_configuration().is_none(), "no Fargate settings on EC2: {c:?}");
    let r = resources(&d);
    assert_eq!((r.get("VCPU").map(String::as_str), r.get("MEMORY").map(String::as_str)), (Some("2"), Some("3072")));
    assert!(!r.contains_key("GPU"), "a GPU only when asked for: {r:?}");
    assert_eq!(d.platform_capabilities(), [PlatformCapability::Ec2]);
    assert_eq!(d.propagate_tags(), Some(true));
    let tags = d.tags().cloned().unwrap_or_default();
    assert_eq!(tags.get("crew-class").map(String::as_str), Some("aws-batch"), "{tags:?}");

    // The same name again: revision 2, with the new values.
    let again = DefinitionRequest { gpus: Some(1), ..request.clone() };
    let second = register_definition(&client, &again).await.expect("RegisterJobDefinition");
    assert_eq!(second.revision, 2, "{second:?}");
    assert!(second.arn.ends_with(&format!("/{name}:2")), "{second:?}");
    assert_eq!(resources(&described(&client, &name, 2).await).get("GPU").map(String::as_str), Some("1"));

    // Fargate: execution role, network configuration, platform version.
    let fargate_name = unique("def-fargate");
    let fargate = DefinitionRequest {
        name: fargate_name.clone(),
        cpus: "0.5".into(),
        memory_mib: 1024,
        execution_role_arn: Some(EXECUTION_ROLE.into()),
        platform: Platform::Fargate,
        ..DefinitionRequest::new("public.ecr.aws/example/crew:1")
    };
    assert_eq!(register_definition(&client, &fargate).await.expect("RegisterJobDefinition").revision, 1);
    let d = described(&client, &fargate_name, 1).await;
    assert_eq!(d.platform_capabilities(), [PlatformCapability::Fargate]);
    let c = d.container_properties().expect("container properties");
    assert_eq!(c.execution_role_arn(), Some(EXECUTION_ROLE));
    assert_eq!(c.network_configuration().and_then(|n| n.assign_public_ip()), Some(&AssignPublicIp::Disabled));
    assert_eq!(c.fargate_platform_configuration().and_then(|f| f.platform_version()), Some("LATEST"));
    let r = resources(&d);
    assert_eq!((r.get("VCPU").map(String::as_str), r.get("MEMORY").map(String::as_str)), (Some("0.5"), Some("1024")));

    // A request that fails its checks sends nothing: no revision 3.
    let bad = DefinitionRequest { cpus: "0.5".into(), ..request };
    let e = register_definition(&client, &bad).await.expect_err("0.5 vCPU on EC2");
    assert!(e.to_string().starts_with("cpus: "), "{e}");
    let out = client.describe_job_definitions().job_definition_name(&name).send().await.expect("describe");
    assert_eq!(out.job_definitions().len(), 2, "{out:?}");
}

/// Workers on a definition registered by the helper: the class submits with
/// it (replacing its `crew worker` command by this test binary, the agent),
/// building its client from the `region`/`endpoint` options as the CLI did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_on_a_definition_registered_by_the_helper() {
    let Some(endpoint) = endpoint("workers_run_on_a_definition_registered_by_the_helper") else { return };
    let client = definition::connect(Some("us-east-1"), Some(&endpoint)).await.expect("a client");
    let name = unique("def-workers");
    let registered =
        register_definition(&client, &DefinitionRequest { name: name.clone(), ..DefinitionRequest::new("crew:test") })
            .await
            .expect("RegisterJobDefinition");
    let defaults: BTreeMap<String, String> = [
        ("job-queue", QUEUE),
        ("job-definition", registered.name.as_str()),
        ("region", "us-east-1"),
        ("endpoint", endpoint.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let class = AwsBatchWorker::new().with_defaults(defaults);
    let controller = start().await;
    let mut recruit = Recruit::new(Arc::new(class), 2);
    recruit.limits = limits();
    controller.recruit(recruit).expect("recruit");
    controller
        .send_many(
            (0..4)
                .map(|i| {
                    let mut job = JobSpec::shell(format!("echo {i} $AWS_BATCH_JOB_ID"));
                    job.opts.env_inherit.push("AWS_BATCH_JOB_ID".to_owned());
                    job
                })
                .collect(),
        )
        .expect("send");
    for _ in 0..4 {
        let o = controller.receive_wait(Some(Duration::from_secs(60))).await.expect("an output");
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        assert_eq!(o.class.as_deref(), Some("aws-batch"));
        assert!(o.stdout.text.split_whitespace().nth(1).is_some(), "not run by a Batch job: {o:?}");
    }
    // The Batch jobs were submitted with the registered definition.
    let handle = controller.status().slots.iter().find_map(|s| s.handle.clone()).expect("a Batch job id");
    let out = client.describe_jobs().jobs(&handle).send().await.expect("DescribeJobs");
    let job_definition = out.jobs().first().and_then(|j| j.job_definition()).unwrap_or_default().to_owned();
    assert!(job_definition.contains(&format!("job-definition/{name}:")), "{job_definition} is not {name}");
    controller.close().await;
}
