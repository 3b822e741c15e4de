//! Nothing a job started outlives its agent (issue 12, item 11): a job
//! starts one process that leaves its session (`setsid`) and one that
//! double-forks away from its parent, the agent is killed with SIGKILL, and
//! both must die. Once with the warden's cgroup (where this test may create
//! one, as root does) and once with its subreaper alone.

use std::path::Path;
use std::time::Duration;

use crate::support::{DEADLINE, Down, Reaper, crew, crew_ok, describe, poll_until, run, signal, unique, unique_sleep};

/// A live (not zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(')').expect("a stat line");
    rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("a ppid")
}

/// The cgroup v2 line of a process (`0::PATH`).
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_owned()
}

/// Whether this process may create a cgroup v2 beside its own (then the
/// warden must use one): tried for real, and removed.
fn may_create_cgroup() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let Some(mount) = info.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2").then(|| before.split_whitespace().nth(4).map(str::to_owned))?
    }) else {
        return false;
    };
    let own = cgroup_of(std::process::id());
    let probe = Path::new(&mount).join(own.trim_start_matches('/')).join(unique("crew-test-"));
    let ok = std::fs::create_dir(&probe).is_ok() && probe.join("cgroup.kill").exists();
    let _ = std::fs::remove_dir(&probe);
    ok
}

fn escaped_processes_die_with_their_agent(mode: Option<&str>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("warden-");
    let (s1, s2) = (unique_sleep(), unique_sleep());
    let _reaper = Reaper::new(&mark).and_arg(&s1).and_arg(&s2);
    let _down = Down { dir: d, mark: &mark };
    let mut up = crew(d, &mark, &["recruit", "--workers", "1", "--class", "local"]);
    if let Some(m) = mode {
        up.env("CREW_WARDEN", m);
    }
    let out = run(up, None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    // Runs once (a re-run after the crash exits at once).
    let shell = format!(
        "[ -e agent.pid ] && exit 0; \
         setsid sh -c 'echo $$ > session.pid; exec sleep {s1}' & \
         (sh -c 'echo $$ > forked.pid; exec sleep {s2}' &); \
         echo $PPID > agent.pid; sleep 60"
    );
    let line = serde_json::json!({ "name": "escapes", "shell": shell, "cwd": d }).to_string();
    std::fs::write(d.join("jobs.txt"), format!("{line}\n")).expect("write");
    crew_ok(d, &mark, &["send", "--file", "jobs.txt"]);

    let (agent, session, forked) = (d.join("agent.pid"), d.join("session.pid"), d.join("forked.pid"));
    assert!(
        poll_until(DEADLINE, || [&agent, &session, &forked].iter().all(|p| read_pid(p).is_some())),
        "the job did not start its processes"
    );
    let agent = read_pid(&agent).expect("agent pid");
    let escaped = [read_pid(&session).expect("session pid"), read_pid(&forked).expect("forked pid")];
    assert!(escaped.iter().all(|&p| alive(p)), "the job's processes are not running: {}", describe(&escaped));
    // The setsid one left the job's session: the agent's group kill cannot
    // reach it.
    let warden = parent_of(agent);
    let cgroup = cgroup_of(agent);
    if mode.is_none() && may_create_cgroup() {
        assert!(
            cgroup.ends_with(&format!("/crew-agent-{warden}")),
            "the agent is not in its warden's cgroup but in {cgroup:?}"
        );
    } else if mode.is_none() {
        eprintln!("this test may not create a cgroup here: the warden's subreaper alone was tested");
    } else {
        assert!(!cgroup.contains("crew-agent-"), "CREW_WARDEN=no-cgroup still used a cgroup: {cgroup:?}");
    }

    signal(agent, libc::SIGKILL);
    let mut left = Vec::new();
    let gone = poll_until(Duration::from_secs(10), || {
        left = escaped.iter().copied().filter(|&p| alive(p)).collect();
        left.is_empty()
    });
    assert!(gone, "processes of the job outlived its SIGKILLed agent: {}", describe(&left));
    // The warden is gone too (it ends as its agent did), and so is its
    // cgroup.
    assert!(poll_until(Duration::from_secs(10), || !alive(warden)), "the warden {warden} outlived its agent");
    if cgroup.contains("crew-agent-") {
        let mount_rel = cgroup.trim_start_matches('/');
        let gone = poll_until(Duration::from_secs(5), || {
            std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
                info.lines()
                    .filter_map(|l| {
                        let (before, after) = l.split_once(" - ")?;
                        (after.split_whitespace().next()? == "cgroup2").then(|| before.split_whitespace().nth(4))?
                    })
                    .all(|m| !Path::new(m).join(mount_rel).exists())
            })
        });
        assert!(gone, "the agent's cgroup {cgroup} was not removed");
    }
}

#[test]
fn processes_that_left_the_job_die_with_a_sigkilled_agent() {
    escaped_processes_die_with_their_agent(None);
}

#[test]
fn the_subreaper_alone_kills_them_too() {
    escaped_processes_die_with_their_agent(Some("no-cgroup"));
}
