//! Launch secrets by reference: one SSM SecureString parameter per member.
//!
//! Role: keep the launch secret out of SubmitJob (and so out of
//! DescribeJobs, the job's environment and the console). For each member
//! of a launch the class writes the member's own secret
//! ([`Secret::member_secret`], valid for that index only) to a SecureString
//! parameter `/crew/launch-<launch>-<random>/<index>` and gives the job only
//! the reference `CREW_TOKEN_REF=ssm:/crew/launch-<launch>-<random>/`. The
//! agent (`crew worker`, [`take_member_secret`]) reads its parameter once
//! and deletes it; the class deletes what is left when a member ends or is
//! terminated. A member that read another's parameter could only pose as
//! that one index, and only before its owner took it (the owner then fails
//! to connect, which shows).

use aws_sdk_ssm::Client;
use aws_sdk_ssm::types::ParameterType;
use crew_core::worker::{Secret, WorkerError};

use crate::CLASS;

/// The scheme of the references this module writes and reads.
pub const REF_SCHEME: &str = "ssm:";

/// Why a member secret could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The reference is not one this crew reads.
    #[error("CREW_TOKEN_REF {0:?} is not a reference this crew reads (ssm:PREFIX)")]
    Reference(String),
    /// No region or client.
    #[error("cannot reach SSM to read the launch secret: no AWS region (set AWS_REGION)")]
    NoRegion,
    /// The parameter is not there (already taken, or the launch ended).
    #[error(
        "the launch secret {0} is gone: each is read once, by its own member, and removed when the launch ends; \
         start the worker again from the controller (crew recruit)"
    )]
    Gone(String),
    /// SSM failed.
    #[error("SSM {call} {name}: {message}")]
    Ssm {
        /// The call.
        call: &'static str,
        /// The parameter.
        name: String,
        /// What SSM said.
        message: String,
    },
}

/// An SSM client from aws-config's standard chain, as the Batch client.
pub(crate) async fn client(region: Option<&str>, endpoint: Option<&str>) -> Option<Client> {
    crate::sdk_config(region, endpoint).await.map(|c| Client::new(&c))
}

/// A fresh parameter prefix for launch `launch`: not guessable, so that
/// nothing else's parameters are hit.
pub(crate) fn prefix(launch: &str) -> String {
    let random = Secret::random();
    let launch: String = launch.chars().filter(|c| c.is_ascii_alphanumeric()).take(20).collect();
    format!("/crew/launch-{launch}-{}/", &random.expose()[..16])
}

/// Writes the secret of each member in `indices` under `prefix`; returns
/// the parameter names (in the order of `indices`).
pub(crate) async fn put_member_secrets(
    client: &Client,
    prefix: &str,
    secret: &Secret,
    indices: &[u32],
) -> Result<Vec<String>, WorkerError> {
    let mut names = Vec::with_capacity(indices.len());
    for &index in indices {
        let name = format!("{prefix}{index}");
        client
            .put_parameter()
            .name(&name)
            .value(secret.member_secret(index).expose())
            .r#type(ParameterType::SecureString)
            .overwrite(false)
            .description("crew: one agent's launch secret, read once")
            .send()
            .await
            .map_err(|e| {
                let (message, retryable) = crate::sdk_error_text("PutParameter", &e);
                WorkerError::Platform { class: CLASS.to_owned(), message, retryable }
            })?;
        names.push(name);
    }
    Ok(names)
}

/// Deletes parameters, ignoring those already gone (taken by their agent).
pub(crate) async fn delete(client: &Client, names: &[String]) {
    for name in names {
        match client.delete_parameter().name(name).send().await {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_not_found()) => {}
            Err(e) => {
                let (message, _) = crate::sdk_error_text("DeleteParameter", &e);
                tracing::warn!(parameter = %name, "could not delete a launch secret: {message}");
            }
        }
    }
}

/// For the agent: takes the secret of member `index` from `reference`
/// (`ssm:PREFIX`): reads `PREFIX<index>` with decryption, then deletes it,
/// so a second use of the reference fails.
pub async fn take_member_secret(reference: &str, index: u32) -> Result<Secret, SecretError> {
    let prefix = reference
        .strip_prefix(REF_SCHEME)
        .filter(|p| p.starts_with('/') && p.ends_with('/'))
        .ok_or_else(|| SecretError::Reference(reference.to_owned()))?;
    let name = format!("{prefix}{index}");
    let client = client(None, None).await.ok_or(SecretError::NoRegion)?;
    let ssm =
        |call: &'static str, name: &str, message: String| SecretError::Ssm { call, name: name.to_owned(), message };
    let out = match client.get_parameter().name(&name).with_decryption(true).send().await {
        Ok(out) => out,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_not_found()) => {
            return Err(SecretError::Gone(name));
        }
        Err(e) => return Err(ssm("GetParameter", &name, crate::sdk_error_text("GetParameter", &e).0)),
    };
    let value =
        out.parameter().and_then(|p| p.value()).map(Secret::new).ok_or_else(|| SecretError::Gone(name.clone()))?;
    // Removed before use: if two readers raced, only one delete succeeds
    // and only that one goes on.
    match client.delete_parameter().name(&name).send().await {
        Ok(_) => Ok(value),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_not_found()) => Err(SecretError::Gone(name)),
        Err(e) => Err(ssm("DeleteParameter", &name, crate::sdk_error_text("DeleteParameter", &e).0)),
    }
}
