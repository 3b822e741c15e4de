//! `crew send`: one job from the command line, or a whole job file in one
//! request (all or nothing, like `crew run`'s file).
//!
//! Jobs travel in the job-line JSON form (README, "Job lines"), which the
//! daemon parses with the same `crew_core::job` code that checked them here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use crew_core::job::{Input, LineDefaults, parse_job_file, parse_job_value};
use crew_core::{Command, JobSpec, Tags};

use super::{Ctx, api, print_json};
use crate::{EXIT_OK, EXIT_USAGE, Failure};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  crew send -- Rscript fit.R --alpha 0.5\n  crew send --tags gpu --name fit-1 -- \
python3 train.py\n  crew send --input data.csv --output 'fit/*' -- Rscript fit.R\n  crew send --file jobs.txt\n  generate-jobs | crew send --file -")]
pub(crate) struct SendArgs {
    /// Job file: one job per line, a JSON object or a shell command line
    /// (`-` reads stdin); checked whole before anything is sent.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with_all = ["command", "name", "env", "cwd"])]
    file: Option<String>,
    /// The job's name (unique among jobs not yet received).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Tags a worker must have, comma separated (with --file: added to every job).
    #[arg(long, value_name = "T,..")]
    tags: Option<String>,
    /// Time limit of one attempt, e.g. 30s (with --file: for jobs without one).
    #[arg(long, value_name = "D")]
    timeout: Option<String>,
    /// Re-runs after a failure exit (with --file: for jobs without `retries`).
    #[arg(long, value_name = "N")]
    retries: Option<u32>,
    /// CPU-time limit of the job's processes, e.g. 10m (with --file: for
    /// jobs without `cpu`); past it the job ends `cpu_limit`.
    #[arg(long, value_name = "D")]
    cpu: Option<String>,
    /// Memory limit of the job's processes, e.g. 2GiB or 512M (with --file:
    /// for jobs without `memory`).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// An environment variable of the job, `KEY=VALUE` (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A variable the job takes from its worker's environment when set
    /// there (repeatable; with --file: added to every job). Jobs otherwise
    /// see only PATH, HOME, USER, LOGNAME, TMPDIR, LANG, their --env and the
    /// CREW_* job variables.
    #[arg(long = "env-inherit", value_name = "NAME")]
    env_inherit: Vec<String>,
    /// Working folder of the job on the worker.
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// An input file, `PATH[=NAME]`: put in the job's working folder as NAME
    /// (default: the file name) before it starts; relative paths are from
    /// here (repeatable; with --file: added to every job).
    #[arg(long, value_name = "PATH[=NAME]")]
    input: Vec<String>,
    /// Files to upload to the store when the job ends: a glob relative to
    /// its working folder, e.g. 'fit/*' (repeatable; with --file: added to
    /// every job). Get them with `crew fetch JOB`.
    #[arg(long, value_name = "GLOB")]
    output: Vec<String>,
    /// Print `{"ids": [...]}` instead of one id per line.
    #[arg(long)]
    json: bool,
    /// The program and its arguments, run directly (no shell); put them
    /// after `--`.
    #[arg(value_name = "CMD", trailing_var_arg = true, allow_hyphen_values = true, required_unless_present = "file")]
    command: Vec<String>,
}

use crate::wire::Sent;

pub(crate) fn send(ctx: &Ctx, args: SendArgs) -> Result<u8, Failure> {
    let timeout = super::duration_flag("--timeout", args.timeout.as_deref())?;
    let cpu = super::duration_flag("--cpu", args.cpu.as_deref())?;
    let memory = super::size_flag("--memory", args.memory.as_deref())?;
    let tags: Tags = match &args.tags {
        Some(t) => t.parse().map_err(|e| Failure::usage(anyhow::anyhow!("--tags: {e}")))?,
        None => Tags::new(),
    };
    let inputs = super::input_flags(&args.input)?;
    let body = match &args.file {
        Some(file) => {
            let mut defaults = LineDefaults::default();
            defaults.tags = tags;
            defaults.timeout = timeout;
            defaults.retries = args.retries;
            defaults.cpu = cpu;
            defaults.memory = memory;
            defaults.inputs = inputs;
            defaults.outputs = args.output.clone();
            defaults.env_inherit = args.env_inherit.clone();
            match file_body(file, &defaults)? {
                Some(body) => body,
                None => return Ok(EXIT_USAGE),
            }
        }
        None => one_job_body(&args, tags, (timeout, cpu, memory), inputs)?,
    };
    let sent: Sent = ctx.client()?.post_raw("/v1/jobs", body).map_err(api)?;
    if args.json {
        print_json(&sent)?;
    } else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for id in &sent.ids {
            writeln!(out, "{id}").map_err(Failure::internal)?;
        }
        out.flush().map_err(Failure::internal)?;
    }
    Ok(EXIT_OK)
}

/// The request body of the job given by flags, checked.
fn one_job_body(
    args: &SendArgs,
    tags: Tags,
    (timeout, cpu, memory): (Option<std::time::Duration>, Option<std::time::Duration>, Option<u64>),
    inputs: Vec<Input>,
) -> Result<Vec<u8>, Failure> {
    let mut env = BTreeMap::new();
    for e in &args.env {
        let Some((k, v)) = e.split_once('=') else {
            return Err(Failure::usage(anyhow::anyhow!("--env {e:?}: write KEY=VALUE")));
        };
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut spec = JobSpec::new(Command::Argv(args.command.clone()));
    spec.name = args.name.clone();
    spec.tags = tags;
    spec.env = env;
    spec.env_inherit = args.env_inherit.clone();
    spec.cwd = args.cwd.clone();
    spec.timeout = timeout;
    spec.cpu = cpu;
    spec.memory = memory;
    spec.retries = args.retries.unwrap_or(0);
    spec.inputs = inputs;
    spec.outputs = args.output.clone();
    // Check it exactly as the daemon will, so that a bad job is reported
    // before any daemon is started.
    let value = serde_json::to_value(spec.as_line()).map_err(Failure::internal)?;
    parse_job_value(value, &LineDefaults::default()).map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    body(std::slice::from_ref(&spec))
}

/// The request body of a job file; `None` when some line is bad (each one
/// reported as `FILE:LINE: reason`).
fn file_body(file: &str, defaults: &LineDefaults) -> Result<Option<Vec<u8>>, Failure> {
    let (label, text) = if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the jobs from stdin")
            .map_err(Failure::usage)?;
        ("<stdin>".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the job file {file}"))
            .map_err(Failure::usage)?;
        (file.to_owned(), text)
    };
    match parse_job_file(&text, defaults) {
        Ok(jobs) if jobs.is_empty() => {
            Err(Failure::usage(anyhow::anyhow!("{label} has no job (only blank lines and # comments)")))
        }
        Ok(mut jobs) => {
            // Relative input paths are from the sender's folder; the daemon
            // needs them absolute.
            for input in jobs.iter_mut().flat_map(|j| j.inputs.iter_mut()) {
                super::absolute_input(input)?;
            }
            body(&jobs).map(Some)
        }
        Err(errors) => {
            let mut err = std::io::stderr().lock();
            for e in &errors {
                let _ = writeln!(err, "{label}:{e}");
            }
            Ok(None)
        }
    }
}

/// `{"jobs": [...]}`, serialized once, straight from the parsed jobs.
fn body(jobs: &[JobSpec]) -> Result<Vec<u8>, Failure> {
    let body = crate::wire::SendRequest { jobs: jobs.iter().map(JobSpec::as_line).collect() };
    let mut out = Vec::with_capacity(64 + jobs.len() * 96);
    serde_json::to_writer(&mut out, &body).map_err(Failure::internal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every job-line field survives the trip to the wire form and back.
    #[test]
    fn the_wire_form_parses_back_to_the_same_job() {
        let text = concat!(
            "echo plain words\n",
            r#"{"name":"a","tags":["gpu","big"],"command":["x","y z"],"env":{"K":"V"},"env_inherit":["HOME","FOO"],"cwd":"/tmp","stdin":"in","timeout":"1m30s","cpu":"10m","memory":"2GiB","retries":2,"crashes_max":5,"priority":-3}"#,
            "\n",
            r#"{"builtin":"sleep","args":{"seconds":0.5},"timeout":0.25}"#,
            "\n",
            r#"{"shell":"echo $HOME | wc"}"#,
            "\n",
            r#"{"shell":"x","inputs":["/a/b.csv","/c=d/e=f",{"path":"/g","name":"in/h"},{"name":"s","key":"cas/sha256/x","size":2,"sha256":"0000000000000000000000000000000000000000000000000000000000000000"}],"outputs":["out/*","n.txt"]}"#,
            "\n",
        );
        let jobs = parse_job_file(text, &LineDefaults::default()).expect("good file");
        let wire = body(&jobs).expect("body");
        let value: serde_json::Value = serde_json::from_slice(&wire).expect("JSON");
        let back: Vec<JobSpec> = value["jobs"]
            .as_array()
            .expect("jobs array")
            .iter()
            .map(|v| parse_job_value(v.clone(), &LineDefaults::default()).expect("parses back"))
            .collect();
        assert_eq!(back, jobs);
    }
}
