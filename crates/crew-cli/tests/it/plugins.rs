//! Worker classes from `PATH`: `crew-worker-NAME` plugins speaking the
//! plugin protocol (docs/plugin-protocol.md), as real processes.
//!
//! The plugins are the fixtures of `tests/fixtures/`: `crew-worker-pyfix`,
//! a whole class in Python that starts agents as local processes with the
//! agent command it is given, and three broken ones in shell (one exits at
//! once, one never answers, one prints a usage text). Each test puts the
//! plugins it wants in a folder of its own and that folder first on the
//! `PATH` of the `crew` it runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, crew, crew_ok, run, unique};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A folder holding the fixture plugins `names` (by symbolic link), for
/// the front of `PATH`.
fn plugin_dir(root: &Path, names: &[&str]) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    for n in names {
        let file = format!("crew-worker-{n}");
        std::os::unix::fs::symlink(fixture(&file), bin.join(&file)).expect("symlink a fixture");
    }
    bin
}

/// `crew ARGS` with `bin` first on its `PATH`.
fn crew_with(dir: &Path, mark: &str, bin: &Path, args: &[&str]) -> Command {
    let mut cmd = crew(dir, mark, args);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    cmd.env_remove("CREW_FIXTURE_MODE");
    cmd
}

#[test]
fn a_python_plugin_passes_the_worker_conformance_kit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("plugin-kit-");
    let _reaper = Reaper::new(&mark);
    let bin = plugin_dir(dir.path(), &["pyfix"]);
    let args = ["conformance", "--class", "pyfix", "--opt", "label=kit", "--json"];
    let out = run(crew_with(dir.path(), &mark, &bin, &args), None, Duration::from_secs(180));
    assert_eq!(out.code(), Some(0), "{out}");
    let verdict = &out.records()[0];
    assert_eq!(verdict["class"], "pyfix", "{out}");
    assert_eq!(verdict["passed"], true, "{out}");
    // The schema of its hello and its check_options are honoured.
    let bad = ["conformance", "--class", "pyfix", "--opt", "colour=red"];
    let out = run(crew_with(dir.path(), &mark, &bin, &bad), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("unknown option \"colour\"") && out.stderr.contains("label"), "{out}");
    let bad = ["conformance", "--class", "pyfix", "--opt", "label=UPPER"];
    let out = run(crew_with(dir.path(), &mark, &bin, &bad), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("lowercase"), "the plugin's own check_options message: {out}");
}

#[test]
fn crew_run_runs_jobs_through_a_plugin_and_the_secret_stays_off_argv_and_environ() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("plugin-run-");
    let _reaper = Reaper::new(&mark);
    let bin = plugin_dir(dir.path(), &["pyfix"]);
    let secrets = dir.path().join("secrets.txt");
    // A job looks for the secrets (patterns read from the file, so never
    // in an argv itself) in every process's argv and
    // environment that it can see (all of this test's, run as the same
    // user); the plugin wrote it to `secrets` before it started the agent.
    let scan = format!(
        "for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do \
         if tr '\\0' '\\n' < $f 2>/dev/null | grep -qFf {s}; then echo \"LEAK $f\"; fi; done; \
         grep -qFf {s} {s} && echo scanned",
        s = secrets.display()
    );
    let jobs = format!("echo one\necho two\n{}\n", serde_json::json!({"shell": scan}));
    std::fs::write(dir.path().join("jobs.txt"), jobs).expect("write");
    let mut cmd =
        crew_with(dir.path(), &mark, &bin, &["run", "--class", "pyfix", "--workers", "2", "--json", "jobs.txt"]);
    cmd.env("CREW_FIXTURE_SECRETS", &secrets);
    let out = run(cmd, None, Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();
    assert_eq!(records.len(), 3, "{out}");
    for r in &records {
        assert_eq!(r["status"], "succeeded", "{out}");
        assert_eq!(r["class"], "pyfix", "{out}");
    }
    let scanned = records.iter().find(|r| r["stdout"]["text"].as_str().is_some_and(|t| t.contains("scanned")));
    let text = scanned.and_then(|r| r["stdout"]["text"].as_str()).unwrap_or_default();
    assert!(text.contains("scanned"), "the scan did not run: {out}");
    assert!(!text.contains("LEAK"), "the launch secret shows in a process's argv or environment:\n{text}");
    let secret = std::fs::read_to_string(&secrets).expect("the plugin recorded the secret");
    assert_eq!(secret.lines().next().map(str::len), Some(64), "a real secret was handed over: {secret:?}");
    // The agents the plugin started are gone with the run.
    crate::support::assert_none_marked(&mark, Duration::from_secs(10));
}

#[test]
fn crew_classes_lists_built_in_and_path_classes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("plugin-list-");
    let _reaper = Reaper::new(&mark);
    let bin = plugin_dir(dir.path(), &["pyfix", "hangs"]);
    // A plugin named like a built-in class is listed as shadowed.
    std::os::unix::fs::symlink(fixture("crew-worker-pyfix"), bin.join("crew-worker-local")).expect("symlink");
    // Not executable: not a plugin.
    std::fs::write(bin.join("crew-worker-notes"), "text").expect("write");
    let out = run(crew_with(dir.path(), &mark, &bin, &["classes", "--json"]), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    let rows = out.records();
    let find = |name: &str, source: &str| rows.iter().find(|r| r["name"] == name && r["source"] == source).cloned();
    assert!(find("local", "built-in").is_some() && find("aws-batch", "built-in").is_some(), "{out}");
    let pyfix = find("pyfix", "path").unwrap_or_else(|| panic!("pyfix is not listed\n{out}"));
    assert_eq!(pyfix["path"].as_str(), Some(bin.join("crew-worker-pyfix").to_str().unwrap_or_default()), "{out}");
    assert!(find("hangs", "path").is_some(), "listing starts no plugin, so a hanging one is listed: {out}");
    assert_eq!(find("local", "path").map(|r| r["shadowed"].clone()), Some(serde_json::json!(true)), "{out}");
    assert!(find("notes", "path").is_none(), "{out}");
    assert!(out.elapsed < Duration::from_secs(5), "listing must not wait for plugins: {out}");
    let table = run(crew_with(dir.path(), &mark, &bin, &["classes"]), None, DEADLINE);
    assert!(table.stdout.starts_with("CLASS") && table.stdout.contains("pyfix"), "{table}");
    // One class with its options: a plugin's from its handshake.
    let one = run(crew_with(dir.path(), &mark, &bin, &["classes", "pyfix", "--json"]), None, DEADLINE);
    assert_eq!(one.code(), Some(0), "{one}");
    let row = &one.records()[0];
    assert_eq!(row["source"], "path", "{one}");
    assert_eq!(row["options"][0]["name"], "label", "{one}");
    let one = run(crew_with(dir.path(), &mark, &bin, &["classes", "hangs"]), None, Duration::from_secs(30));
    assert_eq!(one.code(), Some(3), "a plugin that hangs in its handshake is a broken class: {one}");
    // The kit runs against a built-in class too (the compiled-in one wins
    // over the plugin of the same name).
    let kit =
        run(crew_with(dir.path(), &mark, &bin, &["conformance", "--class", "local"]), None, Duration::from_secs(120));
    assert_eq!(kit.code(), Some(0), "{kit}");
    assert_eq!(kit.stdout, "local: passed the worker conformance kit\n", "{kit}");
}

/// What `crew run --class NAME` must say (and with which status) for each
/// broken plugin; all in parallel, each within its deadline.
#[test]
fn a_missing_crashing_hanging_or_garbled_plugin_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("plugin-broken-");
    let _reaper = Reaper::new(&mark);
    let bin = plugin_dir(dir.path(), &["crashy", "hangs", "garbled", "pyfix"]);
    let witness = dir.path().join("ran");
    std::fs::write(dir.path().join("jobs.txt"), format!("touch {}\n", witness.display())).expect("write");
    let cases: [(&str, i32, &[&str]); 4] = [
        ("nope", 2, &["crew-worker-nope", "on PATH", "known classes: local"]),
        ("crashy", 3, &["crew-worker-crashy", "exited (exit status: 7)"]),
        ("hangs", 3, &["crew-worker-hangs", "did not answer hello within 10s"]),
        (
            "garbled",
            3,
            &["crew-worker-garbled", "does not speak the crew plugin protocol", "Usage: crew-worker-garbled"],
        ),
    ];
    let runs: Vec<_> = cases
        .iter()
        .map(|(class, _, _)| {
            let cmd = crew_with(dir.path(), &mark, &bin, &["run", "--class", class, "jobs.txt"]);
            crate::support::start(cmd, None)
        })
        .collect();
    for ((class, code, says), running) in cases.iter().zip(runs) {
        let out = running.wait(DEADLINE);
        assert_eq!(out.code(), Some(*code), "{class}: {out}");
        for s in *says {
            assert!(out.stderr.contains(s), "{class}: the error should say {s:?}\n{out}");
        }
        assert!(out.stderr.lines().any(|l| l.starts_with("crew: ")), "{class}: one crew: line\n{out}");
    }
    assert!(!witness.exists(), "a job ran");
    // The crashing plugin said why on its stderr, which crew passes on.
    // A plugin that dies in the middle of the run: its launches fail with
    // its name, the jobs end launch_failed, crew exits 1 and does not hang.
    let mut cmd = crew_with(dir.path(), &mark, &bin, &["run", "--class", "pyfix", "--json", "jobs.txt"]);
    cmd.env("CREW_FIXTURE_MODE", "crash_on_launch");
    let out = run(cmd, None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    let records = out.records();
    assert_eq!(records[0]["status"], "launch_failed", "{out}");
    let error = records[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("crew-worker-pyfix") && error.contains("exit status: 9"), "{out}");
    assert!(!witness.exists(), "a job ran");
    // A plugin that asks for a 1.5 s launch limit in its hello and then
    // hangs in launch: crew gives up after 1.5 s (not its 120 s default),
    // and the job ends launch_failed.
    let mut cmd = crew_with(dir.path(), &mark, &bin, &["run", "--class", "pyfix", "--json", "jobs.txt"]);
    cmd.env("CREW_FIXTURE_MODE", "hang_on_launch");
    let out = run(cmd, None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    let records = out.records();
    assert_eq!(records[0]["status"], "launch_failed", "{out}");
    let error = records[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not answer launch within 1.5s"), "{out}");
    assert!(!witness.exists(), "a job ran");
    crate::support::assert_none_marked(&mark, Duration::from_secs(5));
}

#[test]
fn the_daemon_survives_broken_plugins_and_runs_jobs_through_a_good_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("plugin-daemon-");
    let _reaper = Reaper::new(&mark);
    let bin = plugin_dir(dir.path(), &["crashy", "hangs", "garbled", "pyfix"]);
    // The daemon finds plugins on its own PATH: the one of the command
    // that starts it.
    let up = run(crew_with(dir.path(), &mark, &bin, &["up"]), None, DEADLINE);
    assert_eq!(up.code(), Some(0), "{up}");
    let _down = Down { dir: dir.path(), mark: &mark };
    let cases: [(&str, i32, &str); 4] = [
        ("nope", 2, "crew-worker-nope"),
        ("crashy", 3, "crew-worker-crashy"),
        ("hangs", 3, "did not answer hello"),
        ("garbled", 3, "does not speak the crew plugin protocol"),
    ];
    for (class, code, says) in cases {
        let out = run(crew(dir.path(), &mark, &["recruit", "--workers", "1", "--class", class]), None, DEADLINE);
        assert_eq!(out.code(), Some(code), "{class}: {out}");
        assert!(out.stderr.contains(says), "{class}: {out}");
        let status = run(crew(dir.path(), &mark, &["status"]), None, DEADLINE);
        assert_eq!(status.code(), Some(0), "the daemon is gone after the {class} plugin:\n{status}");
    }
    let out = crew_ok(dir.path(), &mark, &["recruit", "--workers", "2", "--class", "pyfix", "--opt", "label=daemon"]);
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
    crew_ok(dir.path(), &mark, &["send", "--", "echo", "through-the-plugin"]);
    crew_ok(dir.path(), &mark, &["wait"]);
    let got = crew_ok(dir.path(), &mark, &["receive", "--json"]);
    let records = got.records();
    assert_eq!(records[0]["status"], "succeeded", "{got}");
    assert_eq!(records[0]["class"], "pyfix", "{got}");
    assert_eq!(records[0]["stdout"]["text"], "through-the-plugin\n", "{got}");
    let status = crew_ok(dir.path(), &mark, &["status", "--json"]);
    assert!(status.stdout.contains("daemon-"), "the plugin's handles show: {status}");
    // The plugin dies (SIGKILL): the daemon starts it again by itself (its
    // probes), and the slots launch through the new process.
    let plugin_pids = || -> Vec<u32> {
        let marked = crate::support::marked_pids(&mark);
        crate::support::pids_with_arg("crew-worker-pyfix").into_iter().filter(|p| marked.contains(p)).collect()
    };
    let first = plugin_pids();
    assert_eq!(first.len(), 1, "one plugin process for the class: {first:?}");
    crate::support::signal(first[0], libc::SIGKILL);
    let back = crate::support::poll_until(Duration::from_secs(20), || {
        let now = plugin_pids();
        now.len() == 1 && now[0] != first[0]
    });
    assert!(back, "the plugin was not started again: {:?}", plugin_pids());
    crew_ok(dir.path(), &mark, &["shutdown", "--all"]);
    crew_ok(dir.path(), &mark, &["send", "--", "echo", "after-restart"]);
    crew_ok(dir.path(), &mark, &["wait"]);
    let got = crew_ok(dir.path(), &mark, &["receive", "--json"]);
    let records = got.records();
    assert_eq!(records[0]["status"], "succeeded", "{got}");
    assert_eq!(records[0]["stdout"]["text"], "after-restart\n", "{got}");
    assert_eq!(plugin_pids().len(), 1, "still one plugin process");
}
