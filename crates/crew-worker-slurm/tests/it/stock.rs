//! The stock `crew` binary with its built-in `slurm` class on a real
//! Slurm: `crew up`, `crew recruit --workers 4 --class slurm --opt
//! partition=debug`, jobs over TLS beyond loopback, `crew down` leaving
//! `squeue` empty; and `crew run --class slurm`. The agents are `crew
//! worker`, started by slurmd from the class's batch script.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::class::{outside_address, until_queue_empty};
use crate::cluster::Cluster;
use crate::stock_crew;

fn crew(crew: &Path, dir: &Path, cluster: &Cluster, args: &[&str]) -> Output {
    let mut cmd = Command::new(crew);
    cmd.args(args).current_dir(dir).stdin(Stdio::null()).env_remove("CREW_LOG");
    for (k, v) in cluster.env() {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("crew {args:?} did not run: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stops the project's daemon when dropped, so that a failed test leaves
/// no daemon behind (it would outlive the cluster it was given).
struct Down<'a> {
    crew: &'a Path,
    dir: &'a Path,
    cluster: &'a Cluster,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = crew(self.crew, self.dir, self.cluster, &["down"]);
    }
}

/// The stock binary, or `None` (skipped, a failure under `CI`).
fn stock() -> Option<std::path::PathBuf> {
    let found = stock_crew();
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "the crew binary was not built next to this test");
        eprintln!("skipped: build the crew binary first (cargo build -p crew-cli)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crew_up_recruit_slurm_workers_and_down_leaves_squeue_empty() {
    let Some(crew_bin) = stock() else { return };
    let Some(cluster) = Cluster::start() else { return };
    let project = tempfile::tempdir().expect("tempdir");
    let p = project.path();
    let advertise = outside_address().map(|a| format!("advertise = \"{a}\"\n")).unwrap_or_default();
    std::fs::write(
        p.join("crew.toml"),
        format!(
            "[daemon]\nlisten = \"0.0.0.0:0\"\n{advertise}tls = \"always\"\n\n[class.slurm]\nstate_dir = \"{}\"\n",
            cluster.state_dir().display()
        ),
    )
    .expect("crew.toml");
    let up = crew(&crew_bin, p, &cluster, &["up"]);
    let _down = Down { crew: &crew_bin, dir: p, cluster: &cluster };
    assert!(up.status.success(), "{}", text(&up));
    let recruit =
        crew(&crew_bin, p, &cluster, &["recruit", "--workers", "4", "--class", "slurm", "--opt", "partition=debug"]);
    assert!(recruit.status.success(), "{}", text(&recruit));
    let launch = crew(&crew_bin, p, &cluster, &["launch", "--workers", "4"]);
    assert!(launch.status.success(), "{}", text(&launch));
    std::fs::write(p.join("jobs.txt"), (0..12).map(|i| format!("echo job {i}\n")).collect::<String>()).expect("jobs");
    let send = crew(&crew_bin, p, &cluster, &["send", "--file", "jobs.txt"]);
    assert!(send.status.success(), "{}", text(&send));
    let wait = crew(&crew_bin, p, &cluster, &["wait"]);
    assert!(wait.status.success(), "{}", text(&wait));
    let received = crew(&crew_bin, p, &cluster, &["receive", "--all", "--json"]);
    assert!(received.status.success(), "{}", text(&received));
    let records = String::from_utf8_lossy(&received.stdout).into_owned();
    assert_eq!(records.lines().count(), 12, "{}", text(&received));
    assert!(
        records.lines().all(|r| r.contains("\"status\":\"succeeded\"") && r.contains("\"class\":\"slurm\"")),
        "{records}"
    );
    assert_eq!(cluster.calls("sbatch"), 1, "four slots, one array");
    assert_eq!(cluster.queue().len(), 4, "four workers in Slurm");
    let down = crew(&crew_bin, p, &cluster, &["down"]);
    assert!(down.status.success(), "{}", text(&down));
    until_queue_empty(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crew_run_class_slurm() {
    let Some(crew_bin) = stock() else { return };
    let Some(cluster) = Cluster::start() else { return };
    let project = tempfile::tempdir().expect("tempdir");
    let p = project.path();
    std::fs::write(p.join("jobs.txt"), "echo one\necho two\necho three\n").expect("jobs");
    let state = format!("state_dir={}", cluster.state_dir().display());
    let mut args =
        vec!["run", "--json", "--workers", "2", "--class", "slurm", "--opt", "partition=debug", "--opt", &state];
    let listen;
    if let Some(a) = outside_address() {
        listen = a;
        args.extend(["--listen", "0.0.0.0:0", "--advertise", &listen, "--tls", "always"]);
    }
    args.push("jobs.txt");
    let out = crew(&crew_bin, p, &cluster, &args);
    assert!(out.status.success(), "{}", text(&out));
    let records = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(records.lines().count(), 3, "{}", text(&out));
    assert!(
        records.lines().all(|r| r.contains("\"status\":\"succeeded\"") && r.contains("\"class\":\"slurm\"")),
        "{records}"
    );
    until_queue_empty(&cluster).await;
    // The worker conformance kit from the command line, with `crew
    // worker` (and its warden) as the agent.
    let kit =
        crew(&crew_bin, p, &cluster, &["conformance", "--class", "slurm", "--opt", "partition=debug", "--opt", &state]);
    assert!(kit.status.success(), "crew conformance --class slurm failed: {}", text(&kit));
    until_queue_empty(&cluster).await;
    // A bad option is refused before anything is submitted.
    let sbatch = cluster.calls("sbatch");
    let bad = crew(&crew_bin, p, &cluster, &["run", "--class", "slurm", "--opt", "memory=4000", "jobs.txt"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no unit"), "{}", text(&bad));
    assert_eq!(cluster.calls("sbatch"), sbatch, "nothing submitted");
}
