//! `crew classes` (the worker classes this `crew` can use) and `crew
//! conformance` (the worker conformance kit against one of them, from the
//! command line, so that a plugin in any language can prove itself).
//!
//! **API boundary:** `crew classes --json` prints one JSON object per
//! class and line: `{"name", "source": "built-in" | "path", "path"?,
//! "shadowed"?}` (`shadowed`: a plugin whose name a compiled-in class
//! takes); `crew classes NAME --json` prints that class's object with
//! `"options": [{"name", "help", "required"}]`. `crew conformance --json` prints one object:
//! `{"class", "passed", "error"?}`.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use crew_conformance::WorkerKit;
use crew_controller::AgentCommand;
use crew_core::worker::OptionSpec;
use serde::Serialize;

use crate::registry::Registry;
use crate::{EXIT_JOB_FAILED, EXIT_OK, Failure};

#[derive(Args, Debug)]
#[command(after_help = "A class is compiled into this crew (built in, or added by a custom crew \
built with crew_cli::App::with_class) or is an executable crew-worker-NAME found on PATH, which \
crew starts and talks to over the plugin protocol (docs/plugin-protocol.md). Compiled-in classes \
win over plugins of the same name. Plugins are listed, not started, unless one is named: `crew classes NAME` \
starts it for its option schema. Check one with `crew conformance --class NAME`.")]
pub(crate) struct ClassesArgs {
    /// Show this class and its options (`--opt KEY=VALUE`).
    #[arg(value_name = "NAME")]
    class: Option<String>,
    /// Print JSON Lines (one class per line) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where a class comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Source {
    /// Compiled into this `crew`.
    #[serde(rename = "built-in")]
    BuiltIn,
    /// A `crew-worker-NAME` on `PATH`.
    #[serde(rename = "path")]
    Path,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::BuiltIn => "built-in",
            Self::Path => "path",
        }
    }
}

/// One line of `crew classes`.
#[derive(Debug, Serialize)]
struct ClassRow {
    name: String,
    source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<Vec<OptionSpec>>,
}

pub(crate) fn list(args: ClassesArgs) -> Result<u8, Failure> {
    if let Some(name) = &args.class {
        return show(name, args.json);
    }
    let compiled = Registry::stock().compiled_in();
    let mut rows: Vec<ClassRow> = compiled
        .iter()
        .map(|n| ClassRow { name: n.clone(), source: Source::BuiltIn, path: None, shadowed: false, options: None })
        .collect();
    for (name, path) in crate::plugin::plugins_on_path() {
        let shadowed = compiled.contains(&name);
        rows.push(ClassRow {
            name,
            source: Source::Path,
            path: Some(path.display().to_string()),
            shadowed,
            options: None,
        });
    }
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        rows.iter().try_for_each(|r| {
            serde_json::to_writer(&mut out, r).map_err(std::io::Error::other)?;
            writeln!(out)
        })
    } else {
        let mut text = format!("{:<16}  {:<8}  PATH\n", "CLASS", "SOURCE");
        for r in &rows {
            let path = r.path.as_deref().unwrap_or("-");
            let note = if r.shadowed { "  (shadowed by the compiled-in class)" } else { "" };
            text.push_str(&format!("{:<16}  {:<8}  {path}{note}\n", r.name, r.source.as_str()));
        }
        out.write_all(text.as_bytes())
    };
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::internal(e)),
        _ => Ok(EXIT_OK),
    }
}

/// `crew classes NAME`: where the class comes from and its options.
fn show(name: &str, json: bool) -> Result<u8, Failure> {
    let class = Registry::stock().get(name).map_err(crate::registry::ClassError::failure)?;
    let builtin = Registry::stock().compiled_in().iter().any(|n| n == name);
    let path = if builtin {
        None
    } else {
        crate::plugin::plugins_on_path().into_iter().find(|(n, _)| n == name).map(|(_, p)| p.display().to_string())
    };
    let row = ClassRow {
        name: name.to_owned(),
        source: if builtin { Source::BuiltIn } else { Source::Path },
        path,
        shadowed: false,
        options: Some(class.options()),
    };
    if json {
        crate::cmd::print_json(&row)?;
        return Ok(EXIT_OK);
    }
    let mut text = format!(
        "class {} ({}{})\n",
        row.name,
        row.source.as_str(),
        row.path.as_ref().map_or(String::new(), |p| format!(": {p}"))
    );
    let options = row.options.unwrap_or_default();
    if options.is_empty() {
        text.push_str("no options listed\n");
    } else {
        let width = options.iter().map(|o| o.name.len()).max().unwrap_or(0).max(6);
        text.push_str(&format!("{:<width$}  {:<8}  HELP\n", "OPTION", "REQUIRED"));
        for o in &options {
            let required = if o.required { "yes" } else { "no" };
            text.push_str(&format!("{:<width$}  {required:<8}  {}\n", o.name, o.help));
        }
    }
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::internal(e)),
        _ => Ok(EXIT_OK),
    }
}

#[derive(Args, Debug)]
#[command(after_help = "The kit starts a controller in this process and agents (`crew worker`, this \
binary) through the class: it recruits and launches workers, runs jobs on them, probes and \
terminates them, kills one to see it replaced (unless --no-shell-jobs), and checks that a launch \
that cannot work ends `launch_failed`. It takes about half a minute for a local class. \
Exit status: 0 passed, 1 failed (the broken rule is printed), 2 unknown class or bad option, \
3 the class's plugin does not work.")]
pub(crate) struct ConformanceArgs {
    /// The class: compiled in, or `crew-worker-NAME` on PATH.
    #[arg(long, value_name = "NAME")]
    class: String,
    /// A class option, `key=value`, for every recruit (repeatable).
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// How long a worker may take from launch to connected.
    #[arg(long, value_name = "D", default_value = "20s")]
    launch_timeout: String,
    /// Skip the tests that run `sh` jobs on the workers (a class whose
    /// agents have no shell).
    #[arg(long)]
    no_shell_jobs: bool,
    /// Print one JSON object (`{"class", "passed", "error"?}`) instead of
    /// a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Verdict<'a> {
    class: &'a str,
    passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub(crate) fn conformance(args: ConformanceArgs) -> Result<u8, Failure> {
    let launch_timeout =
        crate::cmd::duration_flag("--launch-timeout", Some(&args.launch_timeout))?.unwrap_or(Duration::from_secs(20));
    let options = crate::cmd::parse_opts(&args.opts)?;
    let class = Registry::stock().get(&args.class).map_err(crate::registry::ClassError::failure)?;
    class.check_options(&options).map_err(Failure::usage)?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::internal(anyhow::anyhow!("cannot find the crew executable: {e}")))?;
    let mut kit = WorkerKit::local(AgentCommand::crew(exe.to_string_lossy()));
    kit.launch_timeout = launch_timeout;
    kit.gone_timeout = launch_timeout;
    kit.shell_jobs = !args.no_shell_jobs;
    kit.options = options;
    let _ = crew_worker_local::become_subreaper();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::internal)?;
    // The kit reports a broken rule by panicking, as a failed assertion
    // does in a test; here that is the verdict, printed once, by us.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ran = rt.block_on(rt.spawn(crew_conformance::worker(class, kit)));
    std::panic::set_hook(hook);
    let error = match ran {
        Ok(()) => None,
        Err(e) => Some(match e.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the kit failed".to_owned()),
            Err(e) => e.to_string(),
        }),
    };
    // Leave nothing running: the kit's controllers are closed, and this
    // runtime's tasks with them.
    rt.shutdown_timeout(Duration::from_secs(2));
    let passed = error.is_none();
    if args.json {
        crate::cmd::print_json(&Verdict { class: &args.class, passed, error })?;
    } else if let Some(e) = error {
        eprintln!("crew: the class {} failed the worker conformance kit: {e}", args.class);
    } else {
        println!("{}: passed the worker conformance kit", args.class);
    }
    Ok(if passed { EXIT_OK } else { EXIT_JOB_FAILED })
}
