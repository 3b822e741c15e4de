//! `crew aws-batch register-definition` through the real binary: the JSON
//! and text answers and revisions against the AWS emulator (skipped
//! without it, failing under `CI`), and, without any AWS, the exit statuses
//! of refused flags (2, nothing sent) and of an AWS that cannot be used
//! (3: no region, no credentials, nothing listening at the endpoint).
//!
//! moto checks no credentials, so "credentials refused" is not tested; a
//! chain that finds none is (it fails before anything is sent).

use std::path::Path;
use std::process::Command;

use crate::aws_batch::endpoint;
use crate::support::{DEADLINE, Finished, aws_crew, crew, run, unique};

fn register(cmd: Command) -> Finished {
    run(cmd, None, DEADLINE)
}

/// `crew ARGS` with no AWS setting of the caller's environment (the
/// emulator's variables are exported under `cargo xtask ci`) and an empty
/// home, so that the credential chain and the region come from `vars` only.
fn bare_crew(dir: &Path, mark: &str, vars: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = crew(dir, mark, args);
    for (k, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if k.starts_with("AWS_") || k.starts_with("CREW_AWS_") {
            c.env_remove(k);
        }
    }
    c.env("HOME", dir).env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

#[test]
fn aws_batch_help_lists_register_definition_and_says_crew_must_be_on_the_image_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("aws-help-");
    let out = register(crew(dir.path(), &mark, &["aws-batch", "--help"]));
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("register-definition"), "{out}");
    let out = register(crew(dir.path(), &mark, &["aws-batch", "register-definition", "--help"]));
    assert_eq!(out.code(), Some(0), "{out}");
    for flag in
        ["--image", "--name", "--cpus", "--memory", "--gpus", "--role", "--execution-role", "--platform", "--json"]
    {
        assert!(out.stdout.contains(flag), "{flag} is not in the help: {out}");
    }
    assert!(out.stdout.contains("`crew` on its PATH"), "the help must say where the image needs crew: {out}");
    let out = register(crew(dir.path(), &mark, &["aws-batch"]));
    assert_eq!(out.code(), Some(2), "a missing subcommand is a usage error: {out}");
}

#[test]
fn aws_register_definition_prints_json_then_a_new_revision_and_the_next_step() {
    let Some(endpoint) = endpoint("aws_register_definition_prints_json_then_a_new_revision_and_the_next_step") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("aws-def-");
    let name = unique("crew-cli-def-");
    let args = ["aws-batch", "register-definition", "--image", "x", "--name", &name];

    let mut json = args.to_vec();
    json.push("--json");
    let out = register(aws_crew(d, &mark, &endpoint, &json));
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "one JSON object: {out}");
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(v["name"], name.as_str(), "{out}");
    assert_eq!(v["revision"], 1, "{out}");
    let arn = v["arn"].as_str().unwrap_or_default();
    assert!(arn.starts_with("arn:aws:batch:") && arn.ends_with(&format!("/{name}:1")), "{out}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(3), "name, revision, arn: {out}");

    // Again, in text, with the region and endpoint as flags (not variables).
    let mut text = args.to_vec();
    text.extend(["--region", "us-east-1", "--endpoint", &endpoint, "--cpus", "2", "--memory", "4GiB"]);
    let mut cmd = aws_crew(d, &mark, &endpoint, &text);
    cmd.env_remove("AWS_ENDPOINT_URL").env_remove("AWS_REGION");
    let out = register(cmd);
    assert_eq!(out.code(), Some(0), "{out}");
    let first = out.stdout.lines().next().unwrap_or_default();
    assert!(first.starts_with(&format!("registered job definition {name}:2 (arn:aws:batch:")), "{out}");
    let hint = format!(
        "crew recruit --class aws-batch --workers 4 --opt job-queue=QUEUE --opt job-definition={name} \
         --opt region=us-east-1 --opt endpoint={endpoint}"
    );
    assert!(out.stdout.contains(&hint), "the next step is missing: {out}");
}

#[test]
fn aws_register_definition_refuses_bad_flags_with_exit_2_before_any_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("aws-def-bad-");
    // No region and no credentials: a flag that passed its checks would
    // fail with 3, not 2.
    let cases: [(&[&str], &str); 7] = [
        (&["--image", "x", "--memory", "4GB?"], "--memory: \"4GB?\" is not a size"),
        (&["--image", "x", "--platform", "fargate"], "--execution-role: missing: Fargate needs an execution role"),
        (&["--image", ""], "--image: \"\" is not an image reference"),
        (&["--image", "x", "--name", "crew worker"], "--name: \"crew worker\" is not a job definition name"),
        (&["--image", "x", "--cpus", "0"], "--cpus: \"0\" is not a positive number"),
        (&["--image", "x", "--platform", "arm"], "--platform: \"arm\" is not a platform; write ec2 or fargate"),
        (
            &["--image", "x", "--platform", "fargate", "--execution-role", "arn:aws:iam::1:role/e", "--memory", "1GiB"],
            "--memory: 1024 MiB does not go with 1 vCPU on Fargate (2048 to 8192 MiB",
        ),
    ];
    for (flags, message) in cases {
        let mut args = vec!["aws-batch", "register-definition"];
        args.extend_from_slice(flags);
        let out = register(bare_crew(dir.path(), &mark, &[], &args));
        assert_eq!(out.code(), Some(2), "{args:?}: {out}");
        assert!(out.stderr.contains(message), "{args:?}: expected {message:?} in: {out}");
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out}");
        assert!(out.stdout.is_empty(), "{out}");
    }
}

#[test]
fn aws_register_definition_exits_3_without_region_credentials_or_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("aws-def-env-");
    let args = ["aws-batch", "register-definition", "--image", "x"];

    let out = register(bare_crew(d, &mark, &[], &args));
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains("no AWS region: pass --region"), "{out}");

    // A port nothing listens on (free a moment ago).
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a port").port();
    let closed = format!("http://127.0.0.1:{port}");
    let region = [("AWS_REGION", "us-east-1")];
    let mut with_endpoint = args.to_vec();
    with_endpoint.extend(["--endpoint", &closed]);
    let out = register(bare_crew(d, &mark, &region, &with_endpoint));
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains("no AWS credentials: set AWS_ACCESS_KEY_ID"), "{out}");

    let creds = [("AWS_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")];
    let out = register(bare_crew(d, &mark, &creds, &with_endpoint));
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains("RegisterJobDefinition: cannot reach AWS Batch"), "{out}");
    assert!(out.stderr.contains("Connection refused") && out.stderr.contains("check the region"), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out}");
}
