//! Job definitions for crew workers: what `crew aws-batch
//! register-definition` registers, so that a user goes from an image to a
//! definition the class can submit without writing Batch JSON.
//!
//! A [`DefinitionRequest`] is checked whole ([`DefinitionRequest::check`])
//! before any call, with the rules of the class options where they overlap
//! (`cpus`, `memory`), plus what Batch would refuse later and less clearly:
//! names, fractional vCPUs on EC2, Fargate's vCPU/memory pairs, GPUs and a
//! missing execution role on Fargate. [`register_definition`] then makes one
//! RegisterJobDefinition call (type `container`); registering a name again
//! adds a revision, as Batch does.
//!
//! The definition's command is `crew worker`, which is also what the class
//! submits for every worker (the controller's agent program by its name, on
//! the image's `PATH`; the option `agent-command` names another), so the
//! image needs `crew` on its `PATH`. Its vCPUs and memory are defaults,
//! which the class options `cpus`/`memory` override per recruit.

use aws_sdk_batch::Client;
use aws_sdk_batch::types::{
    AssignPublicIp, ContainerProperties, FargatePlatformConfiguration, JobDefinitionType, NetworkConfiguration,
    PlatformCapability, ResourceRequirement, ResourceType,
};

use crate::options::{cpus_value, endpoint_ok, memory_mib};
use crate::{CLASS, load_client, sdk_error_text};

/// The definition name when none is given.
pub const DEFAULT_NAME: &str = "crew-worker";
/// The container command of a definition (the class overrides it at SubmitJob).
pub const DEFAULT_COMMAND: [&str; 2] = ["crew", "worker"];
/// vCPUs when none are given.
pub const DEFAULT_CPUS: &str = "1";
/// Memory in MiB when none is given (2 GiB: valid with 1 vCPU on Fargate too).
pub const DEFAULT_MEMORY_MIB: u64 = 2048;
/// The tag every definition gets, as the class tags its jobs.
pub const TAG: (&str, &str) = ("crew-class", CLASS);
/// Longest definition name Batch takes.
const NAME_MAX: usize = 128;
/// Least memory Batch gives a container on EC2, in MiB.
const EC2_MEMORY_MIN: u64 = 4;

/// Where the definition's jobs run: Batch's `platformCapabilities`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Platform {
    /// EC2 (and Spot) compute environments.
    #[default]
    Ec2,
    /// Fargate (and Fargate Spot) compute environments.
    Fargate,
}

impl Platform {
    /// The name Batch and the CLI use: `EC2`/`FARGATE` in lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Ec2 => "ec2",
            Platform::Fargate => "fargate",
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = DefinitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ec2" => Ok(Platform::Ec2),
            "fargate" => Ok(Platform::Fargate),
            _ => Err(invalid("platform", format!("{s:?} is not a platform; write ec2 or fargate"))),
        }
    }
}

/// What to register. [`DefinitionRequest::new`] fills the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefinitionRequest {
    /// The definition name: letters, digits, `-` and `_`, at most 128.
    pub name: String,
    /// The container image, with `crew` on its `PATH`.
    pub image: String,
    /// vCPUs, as Batch takes them (`1`, `0.25` on Fargate).
    pub cpus: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// GPUs (EC2 only); none when `None` or 0.
    pub gpus: Option<u32>,
    /// The IAM role the container's code runs as (`jobRoleArn`): the one
    /// that needs access to the store's bucket.
    pub job_role_arn: Option<String>,
    /// The IAM role ECS uses to pull the image and write logs
    /// (`executionRoleArn`); required on Fargate.
    pub execution_role_arn: Option<String>,
    /// EC2 or Fargate.
    pub platform: Platform,
    /// Fargate only: give each task a public IP address, which it needs to
    /// pull its image in a public subnet without a NAT gateway. Off by
    /// default: workers need only reach the controller, usually inside the
    /// VPC.
    pub assign_public_ip: bool,
}

impl DefinitionRequest {
    /// A request for `image` with the defaults: name `crew-worker`, 1 vCPU,
    /// 2 GiB, no GPU, no roles, EC2.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            image: image.into(),
            cpus: DEFAULT_CPUS.to_owned(),
            memory_mib: DEFAULT_MEMORY_MIB,
            gpus: None,
            job_role_arn: None,
            execution_role_arn: None,
            platform: Platform::Ec2,
            assign_public_ip: false,
        }
    }

    /// Checks everything that can be checked without AWS; the error names
    /// the field at fault (`name`, `image`, `cpus`, `memory`, `gpus`,
    /// `role`, `execution-role`, `platform`, `assign-public-ip`).
    pub fn check(&self) -> Result<(), DefinitionError> {
        let name = &self.name;
        if name.is_empty()
            || name.len() > NAME_MAX
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "name",
                format!("{name:?} is not a job definition name: 1 to 128 letters, digits, - and _"),
            ));
        }
        let image = self.image.trim();
        if image.is_empty() || image.chars().any(char::is_whitespace) {
            return Err(invalid(
                "image",
                format!(
                    "{:?} is not an image reference (e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/crew:1)",
                    self.image
                ),
            ));
        }
        let Some(cpus) = cpus_value(&self.cpus) else {
            return Err(invalid(
                "cpus",
                format!("{:?} is not a positive number of vCPUs (e.g. 2, or 0.25 on Fargate)", self.cpus),
            ));
        };
        for (field, arn) in [("role", &self.job_role_arn), ("execution-role", &self.execution_role_arn)] {
            if let Some(arn) = arn {
                if !(arn.starts_with("arn:") && arn.contains(":iam::") && arn.contains(":role/")) {
                    return Err(invalid(
                        field,
                        format!("{arn:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
                    ));
                }
            }
        }
        let gpus = self.gpus.unwrap_or(0);
        match self.platform {
            Platform::Ec2 => {
                if cpus < 1.0 {
                    return Err(invalid(
                        "cpus",
                        format!("{} vCPU is for Fargate; on EC2 a job has at least 1 vCPU", self.cpus),
                    ));
                }
                if self.memory_mib < EC2_MEMORY_MIN {
                    return Err(invalid(
                        "memory",
                        format!("{} MiB is too little; Batch gives at least 4 MiB", self.memory_mib),
                    ));
                }
                if self.assign_public_ip {
                    return Err(invalid(
                        "assign-public-ip",
                        "only applies to Fargate; on EC2 the compute environment's subnets decide".to_owned(),
                    ));
                }
            }
            Platform::Fargate => {
                if self.execution_role_arn.is_none() {
                    return Err(invalid(
                        "execution-role",
                        "missing: Fargate needs an execution role, with which ECS pulls the image and \
                         writes logs (e.g. arn:aws:iam::ACCOUNT:role/ecsTaskExecutionRole, with the \
                         AmazonECSTaskExecutionRolePolicy managed policy)"
                            .to_owned(),
                    ));
                }
                if gpus > 0 {
                    return Err(invalid("gpus", "Fargate has no GPUs; use --platform ec2".to_owned()));
                }
                check_fargate_size(&self.cpus, cpus, self.memory_mib)?;
            }
        }
        Ok(())
    }

    /// The resource requirements: VCPU, MEMORY and (when asked) GPU.
    fn resources(&self) -> Vec<ResourceRequirement> {
        let resource =
            |kind: ResourceType, value: String| ResourceRequirement::builder().r#type(kind).value(value).build();
        let mut resources = vec![
            resource(ResourceType::Vcpu, self.cpus.clone()),
            resource(ResourceType::Memory, self.memory_mib.to_string()),
        ];
        if let Some(g) = self.gpus.filter(|g| *g > 0) {
            resources.push(resource(ResourceType::Gpu, g.to_string()));
        }
        resources
    }

    fn container(&self) -> ContainerProperties {
        let mut props = ContainerProperties::builder()
            .image(self.image.trim())
            .set_command(Some(DEFAULT_COMMAND.map(String::from).to_vec()))
            .set_resource_requirements(Some(self.resources()))
            .set_job_role_arn(self.job_role_arn.clone())
            .set_execution_role_arn(self.execution_role_arn.clone());
        if self.platform == Platform::Fargate {
            let ip = if self.assign_public_ip { AssignPublicIp::Enabled } else { AssignPublicIp::Disabled };
            props = props
                .network_configuration(NetworkConfiguration::builder().assign_public_ip(ip).build())
                // LATEST: the platform version AWS recommends now.
                .fargate_platform_configuration(
                    FargatePlatformConfiguration::builder().platform_version("LATEST").build(),
                );
        }
        props.build()
    }
}

/// Fargate takes a few vCPU values, each with its own memory sizes
/// (Batch's `ResourceRequirement` documentation): checked exactly here, so
/// that a wrong pair is one line naming the valid sizes before any call,
/// not a refusal from AWS later (at registration or at the first SubmitJob).
fn check_fargate_size(text: &str, cpus: f64, memory: u64) -> Result<(), DefinitionError> {
    // (vCPUs, least MiB, most MiB, step)
    const SIZES: [(f64, u64, u64, u64); 7] = [
        (0.25, 512, 2048, 512),
        (0.5, 1024, 4096, 1024),
        (1.0, 2048, 8192, 1024),
        (2.0, 4096, 16384, 1024),
        (4.0, 8192, 30720, 1024),
        (8.0, 16384, 61440, 4096),
        (16.0, 32768, 122880, 8192),
    ];
    let Some(&(_, least, most, step)) = SIZES.iter().find(|s| s.0 == cpus) else {
        return Err(invalid("cpus", format!("{text} vCPU is not a Fargate size; write 0.25, 0.5, 1, 2, 4, 8 or 16")));
    };
    // 0.25 vCPU: 512, 1024 or 2048 MiB (not 1536).
    let fits = (least..=most).contains(&memory) && (memory - least) % step == 0 && (cpus != 0.25 || memory != 1536);
    if !fits {
        let sizes = if cpus == 0.25 {
            "512, 1024 or 2048 MiB".to_owned()
        } else {
            format!("{least} to {most} MiB in steps of {step}")
        };
        return Err(invalid("memory", format!("{memory} MiB does not go with {text} vCPU on Fargate ({sizes})")));
    }
    Ok(())
}

/// A size flag for a definition: `2GiB`, `2048MiB`, `512M`, or a number of
/// MiB, by the rule of the class's `memory` option.
pub fn parse_memory_mib(text: &str) -> Result<u64, DefinitionError> {
    memory_mib(text.trim()).ok_or_else(|| {
        invalid(
            "memory",
            format!("{text:?} is not a size; write MiB or GiB (e.g. 2GiB, 4096MiB, 512M, or a number of MiB)"),
        )
    })
}

/// What Batch answered: the definition's name, its new revision, its ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The definition name.
    pub name: String,
    /// The revision this registration made (1 for a new name).
    pub revision: i32,
    /// The revision's ARN.
    pub arn: String,
}

/// Why a definition could not be registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// A field of the request is wrong; nothing was sent.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field (as the CLI flag names it, without `--`).
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// aws-config found no region.
    #[error("no AWS region: give one (--region), or set AWS_REGION or a profile's region")]
    NoRegion,
    /// AWS refused the call, or could not be reached.
    #[error("{message}")]
    Aws {
        /// What happened, in AWS's words, and what to check.
        message: String,
        /// True when the same call may succeed later (network, throttling).
        retryable: bool,
    },
}

impl DefinitionError {
    /// True when the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DefinitionError::Aws { retryable: true, .. })
    }
}

fn invalid(field: &'static str, reason: String) -> DefinitionError {
    DefinitionError::Invalid { field, reason }
}

/// A Batch client as the class builds its own: aws-config's standard chain
/// with `region` and `endpoint` on top (`AWS_ENDPOINT_URL` also works).
pub async fn connect(region: Option<&str>, endpoint: Option<&str>) -> Result<Client, DefinitionError> {
    if let Some(e) = endpoint {
        if !endpoint_ok(e) {
            return Err(invalid("endpoint", format!("{e:?} is not a URL (e.g. http://127.0.0.1:5000)")));
        }
    }
    load_client(region, endpoint).await.ok_or(DefinitionError::NoRegion)
}

/// Checks `request`, then registers it with one RegisterJobDefinition call
/// (type `container`, tags propagated to the ECS tasks, tagged
/// `crew-class=aws-batch`).
pub async fn register_definition(client: &Client, request: &DefinitionRequest) -> Result<Registered, DefinitionError> {
    request.check()?;
    let capability = match request.platform {
        Platform::Ec2 => PlatformCapability::Ec2,
        Platform::Fargate => PlatformCapability::Fargate,
    };
    let out = client
        .register_job_definition()
        .job_definition_name(&request.name)
        .r#type(JobDefinitionType::Container)
        .container_properties(request.container())
        .platform_capabilities(capability)
        .propagate_tags(true)
        .tags(TAG.0, TAG.1)
        .send()
        .await
        .map_err(|e| {
            let (message, retryable) = sdk_error_text("RegisterJobDefinition", &e);
            DefinitionError::Aws { message, retryable }
        })?;
    let missing = || DefinitionError::Aws {
        message: "RegisterJobDefinition: the answer lacks the definition's name, revision or ARN".to_owned(),
        retryable: false,
    };
    Ok(Registered {
        name: out.job_definition_name().ok_or_else(missing)?.to_owned(),
        revision: out.revision().ok_or_else(missing)?,
        arn: out.job_definition_arn().ok_or_else(missing)?.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: &DefinitionRequest) -> String {
        match r.check() {
            Ok(()) => panic!("expected an error for {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_pass_on_both_platforms() {
        let mut r = DefinitionRequest::new("crew:1");
        assert!(r.check().is_ok());
        r.platform = Platform::Fargate;
        r.execution_role_arn = Some("arn:aws:iam::123456789012:role/exec".into());
        assert!(r.check().is_ok(), "1 vCPU with 2 GiB is a Fargate size");
    }

    #[test]
    fn bad_fields_are_named() {
        let base = DefinitionRequest::new("crew:1");
        let e = message(&DefinitionRequest { image: " ".into(), ..base.clone() });
        assert!(e.starts_with("image: "), "{e}");
        let e = message(&DefinitionRequest { name: "crew.worker".into(), ..base.clone() });
        assert!(e.starts_with("name: ") && e.contains("128"), "{e}");
        assert!(message(&DefinitionRequest { name: "n".repeat(129), ..base.clone() }).starts_with("name: "));
        assert!(DefinitionRequest { name: "n_1-X".repeat(25), ..base.clone() }.check().is_ok());
        let e = message(&DefinitionRequest { cpus: "0".into(), ..base.clone() });
        assert!(e.starts_with("cpus: ") && e.contains("positive"), "{e}");
        let e = message(&DefinitionRequest { cpus: "0.5".into(), ..base.clone() });
        assert!(e.contains("Fargate"), "{e}");
        let e = message(&DefinitionRequest { job_role_arn: Some("my-role".into()), ..base.clone() });
        assert!(e.starts_with("role: ") && e.contains("arn:aws:iam::"), "{e}");
        let e = message(&DefinitionRequest { assign_public_ip: true, ..base.clone() });
        assert!(e.starts_with("assign-public-ip: "), "{e}");
        let e = parse_memory_mib("4GB?").expect_err("refused").to_string();
        assert!(e.starts_with("memory: \"4GB?\"") && e.contains("2GiB"), "{e}");
        assert_eq!(parse_memory_mib("2GiB").ok(), Some(2048));
        assert!("arm".parse::<Platform>().is_err());
        assert_eq!("FARGATE".parse::<Platform>().ok(), Some(Platform::Fargate));
    }

    #[test]
    fn fargate_needs_an_execution_role_no_gpu_and_a_valid_size() {
        let fargate = DefinitionRequest {
            platform: Platform::Fargate,
            execution_role_arn: Some("arn:aws:iam::123456789012:role/exec".into()),
            ..DefinitionRequest::new("crew:1")
        };
        let e = message(&DefinitionRequest { execution_role_arn: None, ..fargate.clone() });
        assert!(e.starts_with("execution-role: missing") && e.contains("ecsTaskExecutionRole"), "{e}");
        assert!(message(&DefinitionRequest { gpus: Some(1), ..fargate.clone() }).starts_with("gpus: "));
        assert!(DefinitionRequest { gpus: Some(0), ..fargate.clone() }.check().is_ok());
        let size = |cpus: &str, memory_mib: u64| {
            DefinitionRequest { cpus: cpus.into(), memory_mib, ..fargate.clone() }.check().map_err(|e| e.to_string())
        };
        for (cpus, mib) in [("0.25", 512), ("0.25", 2048), ("0.5", 3072), ("2", 16384), ("8", 20480), ("16", 122880)] {
            assert!(size(cpus, mib).is_ok(), "{cpus} vCPU with {mib} MiB is a Fargate size");
        }
        let e = size("3", 8192).expect_err("3 vCPU");
        assert!(e.starts_with("cpus: ") && e.contains("0.25, 0.5, 1, 2, 4, 8 or 16"), "{e}");
        let e = size("1", 1024).expect_err("too little");
        assert!(e.starts_with("memory: ") && e.contains("2048 to 8192 MiB"), "{e}");
        assert!(size("0.25", 1536).is_err());
        assert!(size("8", 18432).is_err(), "8 vCPU goes in 4 GiB steps");
        assert!(size("1", 2500).is_err());
    }

    #[test]
    fn the_container_has_the_agent_command_and_resources() {
        let mut r = DefinitionRequest::new("crew:1");
        r.gpus = Some(2);
        let c = r.container();
        assert_eq!(c.command(), ["crew", "worker"]);
        let res: Vec<(String, String)> = c
            .resource_requirements()
            .iter()
            .map(|r| {
                (
                    r.r#type().map(|t| t.as_str().to_owned()).unwrap_or_default(),
                    r.value().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(res, [("VCPU".into(), "1".into()), ("MEMORY".into(), "2048".into()), ("GPU".into(), "2".into())]);
        assert!(c.network_configuration().is_none(), "EC2 has no network configuration");
    }
}
