//! `crew.toml` and the `CREW_*` variables, end to end: defaults reach
//! recruit requests (the command line still wins), class options are merged
//! under a recruit's own, and a bad configuration stops the daemon from
//! starting with a message that names the file and key (or the variable).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{DEADLINE, Finished, Reaper, assert_none_marked, crew, poll_until, run, unique};

/// The configuration variables, removed so that the test's own environment
/// cannot change what it checks.
const VARS: &[&str] = &[
    "CREW_LISTEN",
    "CREW_ADVERTISE",
    "CREW_STORE",
    "CREW_PROJECT_SEED",
    "CREW_HEARTBEAT",
    "CREW_IDLE",
    "CREW_WALL",
    "CREW_TASKS_MAX",
    "CREW_LAUNCH_TIMEOUT",
    "CREW_LAUNCH_MAX",
    "CREW_PREFETCH",
];

/// `crew ARGS` in `dir` with a clean configuration environment.
fn cmd(dir: &Path, mark: &str, args: &[&str]) -> Command {
    let mut c = crew(dir, mark, args);
    for v in VARS {
        c.env_remove(v);
    }
    c
}

fn crew_ok(dir: &Path, mark: &str, args: &[&str]) -> Finished {
    let out = run(cmd(dir, mark, args), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "crew {}\n{out}", args.join(" "));
    out
}

/// Writes `dir/.crew/crew.toml`.
fn write_config(dir: &Path, text: &str) {
    let project = dir.join(".crew");
    std::fs::create_dir_all(&project).expect("create .crew");
    std::fs::write(project.join("crew.toml"), text).expect("write crew.toml");
}

/// Stops the daemon of `dir` when dropped.
struct Down<'a> {
    dir: &'a Path,
    mark: &'a str,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run(cmd(self.dir, self.mark, &["down"]), None, DEADLINE);
    }
}

fn slot(dir: &Path, mark: &str, name: &str) -> serde_json::Value {
    let out = crew_ok(dir, mark, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("status --json");
    status["slots"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name).cloned()).unwrap_or_default()
}

/// A project whose crew.toml says `[recruit] idle = "300ms"`, with one
/// launched slot recruited with `extra` arguments; returns the slot's name.
///
/// One recruit per daemon: slots of two recruits of the same class are
/// probed through one of the two class instances (see the report of the
/// `config` branch), which tells the other slot's worker is unknown.
fn one_idle_slot(d: &Path, mark: &str, extra: &[&str]) -> String {
    write_config(d, "# defaults of this project\n[recruit]\nidle = \"300ms\"\n");
    let mut args = vec!["recruit", "--workers", "1", "--class", "local"];
    args.extend_from_slice(extra);
    let name = crew_ok(d, mark, &args).stdout.trim().to_owned();
    crew_ok(d, mark, &["launch"]);
    name
}

#[test]
fn recruit_defaults_come_from_crew_toml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("config-idle-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let name = one_idle_slot(d, &mark, &[]);
    assert!(
        poll_until(Duration::from_secs(20), || {
            let s = slot(d, &mark, &name);
            s["state"] == "down" && s["last_reason"].as_str().is_some_and(|r| r.contains("idle"))
        }),
        "the slot with crew.toml's idle = 300ms was not stopped for being idle: {}",
        slot(d, &mark, &name)
    );
    crew_ok(d, &mark, &["down"]);
    assert_none_marked(&mark, Duration::from_secs(10));
}

#[test]
fn the_command_line_wins_over_crew_toml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("config-wins-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let name = one_idle_slot(d, &mark, &["--idle", "10m"]);
    assert!(
        poll_until(Duration::from_secs(20), || slot(d, &mark, &name)["state"] == "idle"),
        "the slot never came up: {}",
        slot(d, &mark, &name)
    );
    // Well past crew.toml's 300ms (plus the controller's probe and timer
    // granularity): still up.
    std::thread::sleep(Duration::from_millis(1500));
    let s = slot(d, &mark, &name);
    assert_eq!(s["state"], "idle", "--idle 10m did not win over crew.toml: {s}");
    crew_ok(d, &mark, &["down"]);
    assert_none_marked(&mark, Duration::from_secs(10));
}

#[test]
fn class_options_from_crew_toml_are_merged_into_recruits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("config-class-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    write_config(d, "[class.local]\nfoo = \"1\"\n");
    let out = run(cmd(d, &mark, &["recruit", "--workers", "1", "--class", "local"]), None, DEADLINE);
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("unknown option \"foo\""), "the local class did not get crew.toml's option: {out}");
}

#[test]
fn an_unknown_key_in_crew_toml_stops_the_daemon_from_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("config-bad-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    write_config(d, "[daemon]\nlisen = \"127.0.0.1:0\"\n");
    let out = run(cmd(d, &mark, &["up"]), None, DEADLINE);
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("crew.toml: daemon.lisen: unknown key"), "{out}");
    // Reported at once, not after the start deadline.
    assert!(out.elapsed < Duration::from_secs(8), "took {:?}: {out}", out.elapsed);
    assert!(!d.join(".crew/crew.sock").exists(), "a daemon is serving despite the bad crew.toml");
}

#[test]
fn a_bad_variable_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("config-env-");
    let _reaper = Reaper::new(&mark);
    let _down = Down { dir: d, mark: &mark };
    let mut c = cmd(d, &mark, &["up"]);
    c.env("CREW_IDLE", "bad");
    let out = run(c, None, DEADLINE);
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("CREW_IDLE=\"bad\": invalid duration"), "{out}");
}
