//! A private one-node Slurm cluster for one test: its own munged (key and
//! socket in the test's folder), slurmctld and slurmd on free ports, with a
//! generated `slurm.conf` (no cgroup plugins), and logging shims for the
//! Slurm commands so that tests count the real calls a class makes.
//!
//! Each test starts its own (about a second): tests stay independent, run
//! in parallel (nextest runs each in its own process) and work with a plain
//! `cargo nextest run`, like the ssh example's private sshd. It needs root
//! and Debian's `slurmctld slurmd slurm-client munge` (`cargo xtask
//! services` installs them); without them a test says why and is skipped,
//! except under `CI`, where that is a failure.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemons and client commands a cluster needs.
const NEEDED: [&str; 7] = [
    "/usr/sbin/munged",
    "/usr/sbin/slurmctld",
    "/usr/sbin/slurmd",
    "/usr/bin/sbatch",
    "/usr/bin/squeue",
    "/usr/bin/sacct",
    "/usr/bin/scancel",
];

/// The Slurm commands the shims log.
pub(crate) const SHIMMED: [&str; 4] = ["sbatch", "squeue", "sacct", "scancel"];

/// A running one-node cluster; stopped (its jobs cancelled, its daemons
/// killed and reaped) when dropped.
pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn short_hostname() -> String {
    let out = Command::new("hostname").arg("-s").output().expect("hostname runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why a cluster cannot run here, if it cannot.
fn missing() -> Option<String> {
    if let Some(f) = NEEDED.iter().find(|f| !Path::new(f).exists()) {
        return Some(format!(
            "{f} is missing: `cargo xtask services` installs Slurm (apt-get install slurmctld slurmd slurm-client munge)"
        ));
    }
    if !is_root() {
        return Some("a test cluster's daemons run as root (slurmd starts jobs as their user)".to_owned());
    }
    None
}

/// Spawns a daemon in the foreground with every inherited descriptor
/// beyond stdio closed (a daemon holding a test runner's lock or pipe
/// would keep it open after the test), its output to `log`.
fn spawn(program: &str, args: &[&str], log: &Path, env: &[(&str, &Path)]) -> Child {
    let out = std::fs::File::create(log).expect("daemon log");
    let err = out.try_clone().expect("daemon log");
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

impl Cluster {
    /// Starts a cluster with a partition `debug` of one node with 16 CPUs
    /// (Slurm is told to trust the configuration over the hardware), or
    /// says why it cannot and returns `None` (a failure under `CI`).
    pub(crate) fn start() -> Option<Cluster> {
        Self::start_with("")
    }

    /// [`Self::start`] with more `slurm.conf` lines.
    pub(crate) fn start_with(extra_conf: &str) -> Option<Cluster> {
        if let Some(why) = missing() {
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // munged wants every folder above its socket searchable by all.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["munge", "run", "state", "spool", "log", "bin"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
        }
        let munge_key = d.join("munge/munge.key");
        let mut key = [0u8; 128];
        getrandom(&mut key);
        std::fs::write(&munge_key, key).expect("munge key");
        std::fs::set_permissions(&munge_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::set_permissions(d.join("munge"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let chown = Command::new("chown")
            .args(["-R", "munge:munge"])
            .arg(d.join("munge"))
            .arg(d.join("run"))
            .status()
            .expect("chown runs");
        assert!(chown.success(), "cannot give the munge folders to the munge user");
        let socket = d.join("run/munge.socket");
        let host = short_hostname();
        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let conf = d.join("slurm.conf");
        let dd = d.display();
        std::fs::write(
            &conf,
            format!(
                "ClusterName=crewtest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={socket}\nSlurmUser=root\nSlurmdUser=root\n\
                 StateSaveLocation={dd}/state\nSlurmdSpoolDir={dd}/spool\nSlurmctldPidFile={dd}/run/slurmctld.pid\n\
                 SlurmdPidFile={dd}/run/slurmd.pid\nSlurmctldLogFile={dd}/log/slurmctld.log\nSlurmdLogFile={dd}/log/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
                 MpiDefault=none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 SlurmdParameters=config_overrides\nSchedulerParameters=batch_sched_delay=0,sched_min_interval=0\n\
                 ReturnToService=2\nMailProg=/bin/true\nKillWait=5\nMaxArraySize=1001\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory=2000 State=UNKNOWN\n\
                 PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n{extra_conf}",
                socket = socket.display()
            ),
        )
        .expect("slurm.conf");
        let mut cluster = Cluster { dir, conf: conf.clone(), daemons: Vec::new() };
        let d = cluster.dir.path().to_owned();
        let munged = spawn(
            "runuser",
            &[
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                "--foreground",
                &format!("--socket={}", socket.display()),
                &format!("--key-file={}", munge_key.display()),
                &format!("--pid-file={}/run/munged.pid", d.display()),
                &format!("--seed-file={}/munge/seed", d.display()),
                &format!("--log-file={}/munge/munged.log", d.display()),
            ],
            &d.join("log/munged.out"),
            &[],
        );
        cluster.daemons.push(("munged", munged));
        cluster.wait("munged made its socket", || socket.exists());
        let env = [("SLURM_CONF", conf.as_path())];
        let conf_arg = conf.display().to_string();
        let ctld = spawn("/usr/sbin/slurmctld", &["-D", "-c", "-f", &conf_arg], &d.join("log/slurmctld.out"), &env);
        cluster.daemons.push(("slurmctld", ctld));
        let slurmd = spawn("/usr/sbin/slurmd", &["-D", "-f", &conf_arg], &d.join("log/slurmd.out"), &env);
        cluster.daemons.push(("slurmd", slurmd));
        cluster.write_shims();
        let conf = cluster.conf.clone();
        cluster.wait("the node is idle", || {
            let out = Command::new("/usr/bin/sinfo").env("SLURM_CONF", &conf).args(["-h", "-o", "%T"]).output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        });
        Some(cluster)
    }

    /// Waits (generously) until `f`, failing with the daemons' logs.
    fn wait(&mut self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            let ended = self.daemons.iter_mut().find_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => Some(format!("{name} ended ({status})")),
                _ => None,
            });
            if let Some(ended) = ended {
                panic!("{ended} before {what}:\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "the test cluster failed: not {what} within 60s:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemons' logs, for a failure message.
    pub(crate) fn logs(&self) -> String {
        let mut text = String::new();
        for name in ["munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"] {
            let body = std::fs::read_to_string(self.dir.path().join("log").join(name)).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(30).collect();
            text.push_str(&format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        text
    }

    /// Shims for the Slurm commands, first on the `PATH` of [`Self::env`]:
    /// each appends its name to `calls.log`, then runs the real command.
    fn write_shims(&self) {
        let bin = self.dir.path().join("bin");
        let log = self.dir.path().join("calls.log");
        for name in SHIMMED {
            let shim = bin.join(name);
            std::fs::write(
                &shim,
                format!("#!/bin/sh\necho {name} >> '{}'\nexec /usr/bin/{name} \"$@\"\n", log.display()),
            )
            .expect("shim");
            std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }

    /// The variables that point Slurm's commands at this cluster, through
    /// the shims: `SLURM_CONF` and `PATH`.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        let path = format!("{}:{}", self.dir.path().join("bin").display(), std::env::var("PATH").unwrap_or_default());
        vec![("SLURM_CONF".to_owned(), self.conf.display().to_string()), ("PATH".to_owned(), path)]
    }

    /// How many times each shimmed command ran so far.
    pub(crate) fn calls(&self, name: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.trim() == name)
            .count()
    }

    /// A Slurm command on this cluster (not counted).
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf).stdin(Stdio::null());
        c
    }

    /// `squeue` lines of the jobs pending or running (`%i %T`).
    pub(crate) fn queue(&self) -> Vec<String> {
        let out = self.command("/usr/bin/squeue").args(["-h", "-r", "-o", "%i %T"]).output().expect("squeue runs");
        assert!(out.status.success(), "squeue failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// A folder for a class's `state_dir`.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("crew")
    }
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).expect("/dev/urandom");
}

/// Whether process `pid` is gone or a zombie (killed daemons linger as
/// zombies for a moment here).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
        .unwrap_or(true)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // No job of this cluster outlives it.
        let _ = self.command("/usr/bin/scancel").args(["--full", "--user=root"]).status();
        for (_, child) in self.daemons.iter_mut().rev() {
            // SAFETY: a plain kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !gone(child.id()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // munged runs under runuser, which forwards the TERM; slurmstepd
        // processes of cancelled jobs end with their job.
    }
}
