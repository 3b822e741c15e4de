//! The `aws-batch` class through the stock binary: `crew recruit --class
//! aws-batch --opt ...`, jobs on Batch workers (the `crew` binary run by the
//! AWS emulator as each Batch job's container command), `crew down`, on a
//! job definition made by `crew aws-batch register-definition`.
//!
//! Needs the emulator (`cargo xtask ci` starts it and sets
//! `CREW_TEST_AWS_ENDPOINT`, with the queue `crew-q1`); skipped without it,
//! failing under `CI`.

use std::path::Path;

use crate::support::{DEADLINE, Finished, Reaper, aws_crew, crew, run, unique};

pub(crate) fn endpoint(test: &str) -> Option<String> {
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

fn crew_in(dir: &Path, mark: &str, args: &[&str]) -> Finished {
    run(crew(dir, mark, args), None, DEADLINE)
}

/// A project folder, a mark for the test's processes (reaped at the end),
/// and a job definition registered as a user makes it: with the helper.
struct Setup {
    dir: tempfile::TempDir,
    mark: String,
    _reaper: Reaper,
    def: String,
}

fn setup(endpoint: &str, what: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique(&format!("{what}-"));
    let reaper = Reaper::new(&mark);
    let def = unique(&format!("crew-{what}-def-"));
    let register = ["aws-batch", "register-definition", "--image", "crew", "--name", &def, "--memory", "512MiB"];
    let out = run(aws_crew(dir.path(), &mark, endpoint, &register), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains(&format!("--opt job-definition={def}")), "{out}");
    Setup { dir, mark, _reaper: reaper, def }
}

/// The stdout of the `n` output records `out` printed, after checking that
/// the command exited 0 and every job succeeded on an aws-batch worker.
fn succeeded_on_batch(out: &Finished, n: usize) -> Vec<String> {
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();
    assert_eq!(records.len(), n, "{out}");
    records
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "succeeded", "{out}");
            assert_eq!(r["class"], "aws-batch", "{out}");
            r["stdout"]["text"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

#[test]
fn recruit_aws_batch_workers_and_run_jobs_on_them() {
    let Some(endpoint) = endpoint("recruit_aws_batch_workers_and_run_jobs_on_them") else { return };
    let setup = setup(&endpoint, "aws-batch");
    let (d, mark, def) = (setup.dir.path(), setup.mark.clone(), setup.def.clone());
    let opt_def = format!("job-definition={def}");
    let opt_endpoint = format!("endpoint={endpoint}");

    // Mistakes are reported at recruit time, with the valid forms.
    let out = crew_in(
        d,
        &mark,
        &[
            "recruit",
            "-w",
            "2",
            "--class",
            "aws-batch",
            "--opt",
            "job-queue=crew-q1",
            "--opt",
            &opt_def,
            "--opt",
            "memory=4GB?",
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("memory: \"4GB?\"") && out.stderr.contains("4GiB"), "{out}");
    let out = crew_in(d, &mark, &["recruit", "-w", "2", "--class", "aws-batch", "--opt", "queue=x"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("unknown option \"queue\"") && out.stderr.contains("job-queue"), "{out}");

    let recruit = [
        "recruit",
        "--workers",
        "3",
        "--class",
        "aws-batch",
        "--tags",
        "cloud",
        "--opt",
        "job-queue=crew-q1",
        "--opt",
        &opt_def,
        "--opt",
        "cpus=1",
        "--opt",
        "memory=512MiB",
        "--opt",
        &opt_endpoint,
    ];
    let out = crew_in(d, &mark, &recruit);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.stdout.lines().count(), 3, "{out}");
    // The daemon listens on loopback, which Batch workers cannot dial (the
    // emulator's can): accepted, with a warning that says what to set.
    assert!(
        out.stderr.contains("crew: warning:") && out.stderr.contains("aws-batch") && out.stderr.contains("advertise"),
        "{out}"
    );
    // Started together: one array job of three.
    let out = crew_in(d, &mark, &["launch", "--tags", "cloud", "--workers", "3"]);
    assert_eq!(out.code(), Some(0), "{out}");
    for i in 0..6 {
        let out = crew_in(
            d,
            &mark,
            &[
                "send",
                "--tags",
                "cloud",
                "--env-inherit",
                "AWS_BATCH_JOB_ID",
                "--",
                "sh",
                "-c",
                &format!("echo {i} $AWS_BATCH_JOB_ID"),
            ],
        );
        assert_eq!(out.code(), Some(0), "{out}");
    }
    let out = run(crew(d, &mark, &["receive", "--wait", "--all", "--json"]), None, DEADLINE * 3);
    for text in succeeded_on_batch(&out, 6) {
        assert!(text.split_whitespace().nth(1).is_some_and(|id| id.contains(':')), "not on a Batch array child: {out}");
    }
    let out = crew_in(d, &mark, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("status --json");
    for s in status["slots"].as_array().expect("slots") {
        if s["state"] == "idle" || s["state"] == "busy" {
            assert!(s["handle"].as_str().is_some_and(|h| h.contains(':')), "a Batch child id as handle: {out}");
        }
    }
    let out = crew_in(d, &mark, &["down"]);
    assert_eq!(out.code(), Some(0), "{out}");
}

/// `crew run` on Batch workers, the controller listening beyond loopback as
/// it must for them: the workers are given the certificate's fingerprint
/// and connect with TLS; every job ends succeeded on a Batch array child.
#[test]
fn crew_run_on_aws_batch_workers_over_tls() {
    let Some(endpoint) = endpoint("crew_run_on_aws_batch_workers_over_tls") else { return };
    let setup = setup(&endpoint, "aws-batch-run");
    let (d, mark, def) = (setup.dir.path(), setup.mark.clone(), setup.def.clone());
    // Each job tells which Batch job it runs in, that it does not see the
    // pin, and whether its worker (the shell's parent) was given one.
    let lines: String = (0..6)
        .map(|i| {
            format!(
                "echo {i} $AWS_BATCH_JOB_ID ${{CREW_TLS_SHA256:-hidden}} \
                 $(tr '\\0' '\\n' < /proc/$PPID/environ | grep -c '^CREW_TLS_SHA256=[0-9a-f]\\{{64\\}}$')\n"
            )
        })
        .collect();
    std::fs::write(d.join("jobs.txt"), lines).expect("jobs file");
    let mut cmd = aws_crew(
        d,
        &mark,
        &endpoint,
        &[
            "run",
            "--class",
            "aws-batch",
            "--workers",
            "2",
            "--listen",
            "0.0.0.0:0",
            "--advertise",
            "127.0.0.1",
            "--env-inherit",
            "AWS_BATCH_JOB_ID",
            "--json",
            "jobs.txt",
        ],
    );
    cmd.env("CREW_AWS_JOB_QUEUE", "crew-q1").env("CREW_AWS_JOB_DEFINITION", &def).env("CREW_AWS_ENDPOINT", &endpoint);
    let out = run(cmd, None, DEADLINE * 3);
    for text in succeeded_on_batch(&out, 6) {
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words.len(), 4, "not in a Batch job: {out}");
        assert_eq!(words[2], "hidden", "the pin reached a job: {out}");
        assert_eq!(words[3], "1", "the worker was not given the pin: {out}");
    }
    // Said once, as a line of crew's, not also as a log line.
    assert_eq!(out.stderr.matches("cannot dial 127.0.0.1").count(), 1, "{out}");
    assert!(out.stderr.contains("crew: warning:"), "{out}");
}

/// The launch secret reaches Batch workers by reference only: each agent's
/// environment holds `CREW_TOKEN_REF` (an SSM parameter prefix), never
/// `CREW_TOKEN`; the jobs see neither, nor the worker's AWS credentials; the
/// reference cannot be used a second time once its agent took its secret.
/// (That no log line carries a secret, at trace level with the SDK's
/// logging, is checked with a known secret in crew-worker-aws's
/// `submitted_jobs_carry_command_environment_index_timeout_and_tags`.)
#[test]
fn batch_workers_get_the_launch_secret_by_reference_and_jobs_see_no_credentials() {
    let test = "batch_workers_get_the_launch_secret_by_reference_and_jobs_see_no_credentials";
    let Some(endpoint) = endpoint(test) else { return };
    let setup = setup(&endpoint, "aws-batch-secret");
    let (d, mark, def) = (setup.dir.path(), setup.mark.clone(), setup.def.clone());
    // Each job prints its worker's environment, then its own.
    let line = "tr '\\0' '\\n' < /proc/$PPID/environ | sed 's/^/agent /'; env | sed 's/^/job /'\n";
    std::fs::write(d.join("jobs.txt"), line.repeat(2)).expect("jobs file");
    let mut cmd = aws_crew(
        d,
        &mark,
        &endpoint,
        &["run", "--class", "aws-batch", "--workers", "2", "--listen", "0.0.0.0:0", "--advertise", "127.0.0.1"],
    );
    cmd.args(["--json", "jobs.txt"]);
    cmd.env("CREW_AWS_JOB_QUEUE", "crew-q1")
        .env("CREW_AWS_JOB_DEFINITION", &def)
        .env("CREW_AWS_ENDPOINT", &endpoint)
        .env("CREW_LOG", "trace");
    let out = run(cmd, None, DEADLINE * 3);
    let mut references = Vec::new();
    for text in succeeded_on_batch(&out, 2) {
        let agent: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("agent ")).collect();
        let job: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("job ")).collect();
        assert!(!agent.is_empty() && !job.is_empty(), "{out}");
        assert!(!agent.iter().any(|l| l.starts_with("CREW_TOKEN=")), "the secret is in the agent's environment: {out}");
        let reference = agent.iter().find_map(|l| l.strip_prefix("CREW_TOKEN_REF=")).expect("a reference");
        assert!(reference.starts_with("ssm:/crew/launch-"), "{reference}");
        let index = agent.iter().find_map(|l| l.strip_prefix("AWS_BATCH_JOB_ARRAY_INDEX=")).unwrap_or("0");
        references.push((reference.to_owned(), index.to_owned()));
        for l in &job {
            assert!(!l.starts_with("AWS_") && !l.starts_with("CREW_TOKEN"), "a job sees {l:?}: {out}");
        }
    }
    assert!(!out.stderr.contains("CREW_TOKEN="), "{out}");
    // A second use of a reference: the secret is gone.
    for (reference, index) in references {
        let mut worker = aws_crew(d, &mark, &endpoint, &["worker"]);
        worker
            .env("CREW_TOKEN_REF", &reference)
            .env("AWS_BATCH_JOB_ARRAY_INDEX", &index)
            .env("CREW_CONNECT", "127.0.0.1:9")
            .env("CREW_LAUNCH", "1")
            .env_remove("CREW_TOKEN")
            .env_remove("CREW_INDEX");
        let again = run(worker, None, DEADLINE);
        assert_ne!(again.code(), Some(0), "{again}");
        assert!(again.stderr.contains("is gone"), "{again}");
    }
}
