//! `crew aws-batch ...`: helpers for setting up the `aws-batch` class,
//! which talk to AWS, not to a daemon. Today: `register-definition`, a job
//! definition fit for crew workers.
//!
//! The work is `crew_worker_aws::definition`'s (checks, the call, the error
//! texts); this module parses flags, maps errors to exit statuses (a
//! refused flag 2; AWS unreachable, no region or credentials, a refused
//! call 3) and prints.

use anyhow::anyhow;
use clap::{Args, Subcommand};
use crew_worker_aws::definition::{self, DefinitionError, DefinitionRequest, Platform, Registered};
use serde::Serialize;

use crate::cmd::print_json;
use crate::{EXIT_OK, Failure};

#[derive(Args, Debug)]
pub(crate) struct AwsBatchArgs {
    #[command(subcommand)]
    command: AwsBatchCommand,
}

#[derive(Subcommand, Debug)]
enum AwsBatchCommand {
    /// Register a job definition for crew workers (a new revision when the
    /// name exists); print its name:revision and ARN.
    RegisterDefinition(RegisterArgs),
}

#[derive(Args, Debug)]
#[command(after_help = "The definition's command is `crew worker`, which is also what crew submits for every \
worker (the recruit option agent-command names another): the image needs `crew` on its PATH. Its vCPUs \
and memory are defaults, which `--opt cpus=`/`--opt memory=` of `crew recruit` override.\n\n\
Examples:\n  crew aws-batch register-definition --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/crew:1 \\\n      \
--role arn:aws:iam::123456789012:role/crew-job\n  crew aws-batch register-definition --image IMAGE --platform fargate \
--cpus 0.5 --memory 1GiB \\\n      --execution-role arn:aws:iam::123456789012:role/ecsTaskExecutionRole --json\n\n\
Exit status: 0 registered; 2 a flag is wrong (nothing was sent); 3 AWS could not be reached or refused \
(no region, no credentials, no permission).")]
struct RegisterArgs {
    /// The container image, with `crew` on its PATH.
    #[arg(long, value_name = "IMAGE")]
    image: String,
    /// The definition name (letters, digits, - and _; at most 128).
    #[arg(long, value_name = "NAME", default_value = definition::DEFAULT_NAME)]
    name: String,
    /// vCPUs per worker (at least 1 on EC2; on Fargate 0.25, 0.5, 1, 2, 4, 8 or 16).
    #[arg(long, value_name = "N", default_value = definition::DEFAULT_CPUS)]
    cpus: String,
    /// Memory per worker: 2GiB, 4096MiB, 512M, or a number of MiB (GB/MB are refused).
    #[arg(long, value_name = "SIZE", default_value = "2GiB")]
    memory: String,
    /// GPUs per worker (EC2 only).
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// The IAM role the worker's jobs run as (jobRoleArn): give it access to
    /// the store's S3 bucket.
    #[arg(long, value_name = "ARN")]
    role: Option<String>,
    /// The IAM role ECS uses to pull the image and write logs
    /// (executionRoleArn); required with --platform fargate.
    #[arg(long, value_name = "ARN")]
    execution_role: Option<String>,
    /// The compute environments the definition is for.
    #[arg(long, value_name = "ec2|fargate", default_value = "ec2")]
    platform: String,
    /// Fargate: give each task a public IP (needed to pull the image in a
    /// public subnet without a NAT gateway).
    #[arg(long)]
    assign_public_ip: bool,
    /// The AWS region (default: the standard chain's: AWS_REGION, profile).
    #[arg(long, value_name = "R", env = "CREW_AWS_REGION")]
    region: Option<String>,
    /// The Batch endpoint URL, if not AWS's (VPC endpoints, emulators;
    /// AWS_ENDPOINT_URL also works).
    #[arg(long, value_name = "URL", env = "CREW_AWS_ENDPOINT")]
    endpoint: Option<String>,
    /// Print one JSON object `{"name", "revision", "arn"}` instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Printed<'a> {
    name: &'a str,
    revision: i32,
    arn: &'a str,
}

pub(crate) fn main(args: AwsBatchArgs) -> Result<u8, Failure> {
    match args.command {
        AwsBatchCommand::RegisterDefinition(a) => register(a),
    }
}

fn register(args: RegisterArgs) -> Result<u8, Failure> {
    let platform: Platform = args.platform.parse().map_err(failure)?;
    let request = DefinitionRequest {
        name: args.name.clone(),
        image: args.image.clone(),
        cpus: args.cpus.trim().to_owned(),
        memory_mib: definition::parse_memory_mib(&args.memory).map_err(failure)?,
        gpus: args.gpus,
        job_role_arn: args.role.clone(),
        execution_role_arn: args.execution_role.clone(),
        platform,
        assign_public_ip: args.assign_public_ip,
    };
    // Every flag is checked before the credential chain is even read.
    request.check().map_err(failure)?;
    let region = args.region.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let endpoint = args.endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)?;
    let registered = rt.block_on(async {
        let client = definition::connect(region, endpoint).await?;
        definition::register_definition(&client, &request).await
    });
    let registered = registered.map_err(failure)?;
    if args.json {
        print_json(&Printed { name: &registered.name, revision: registered.revision, arn: &registered.arn })?;
    } else {
        print!("{}", human(&registered, region, endpoint));
    }
    Ok(EXIT_OK)
}

/// The text of a registration: what was made, and the recruit that uses it.
fn human(r: &Registered, region: Option<&str>, endpoint: Option<&str>) -> String {
    let mut next =
        format!("crew recruit --class aws-batch --workers 4 --opt job-queue=QUEUE --opt job-definition={}", r.name);
    if let Some(region) = region {
        next.push_str(&format!(" --opt region={region}"));
    }
    if let Some(endpoint) = endpoint {
        next.push_str(&format!(" --opt endpoint={endpoint}"));
    }
    format!(
        "registered job definition {}:{} ({})\nnext, with your job queue (the latest revision is used):\n  {next}\n",
        r.name, r.revision, r.arn
    )
}

/// A wrong flag is bad input (2), naming the flag; the rest is AWS's (3).
fn failure(e: DefinitionError) -> Failure {
    match e {
        DefinitionError::Invalid { field, reason } => Failure::usage(anyhow!("--{field}: {reason}")),
        DefinitionError::NoRegion => Failure::internal(anyhow!(
            "no AWS region: pass --region, or set AWS_REGION (or CREW_AWS_REGION) or a profile's region"
        )),
        e => Failure::internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_names_the_definition_and_the_settings_given() {
        let r = Registered {
            name: "crew-worker".into(),
            revision: 3,
            arn: "arn:aws:batch:x:1:job-definition/crew-worker:3".into(),
        };
        let text = human(&r, Some("eu-west-1"), None);
        assert!(text.starts_with("registered job definition crew-worker:3 (arn:aws:batch:"), "{text}");
        assert!(text.contains("--opt job-definition=crew-worker --opt region=eu-west-1\n"), "{text}");
    }
}
