//! The `ssh` class against a real `sshd` on localhost that the test starts
//! (Debian's openssh-server, installed by `cargo xtask ci`), with a host
//! key and a client key generated here: the worker conformance kit, whose
//! agents are this very test binary (`--exact agent_entry`) started
//! through `ssh`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crew_conformance::{WorkerKit, worker};
use crew_controller::AgentCommand;
use crew_exec::builtins::Builtins;
use crew_worker_ssh::SshWorker;

/// Entry point of the agent processes; a no-op in a normal test run.
#[test]
#[ignore = "entry point of agent processes started by the tests"]
fn agent_entry() {
    crew_agent::run_if_agent(Builtins::standard());
}

const SSHD: &str = "/usr/sbin/sshd";

/// A private sshd on a free loopback port, killed when dropped.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen runs")
        .success();
    assert!(ok, "ssh-keygen failed for {}", path.display());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Starts sshd, or says why it cannot (then the test is skipped, except in
/// CI, where the set-up installs it).
fn sshd() -> Option<Sshd> {
    if !Path::new(SSHD).exists() {
        assert!(std::env::var_os("CI").is_none(), "{SSHD} is missing: `cargo xtask ci` installs openssh-server");
        eprintln!("skipped: {SSHD} is missing (apt-get install openssh-server)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    keygen(&d.join("host_key"));
    keygen(&d.join("client_key"));
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("authorized_keys");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd (sshd's privilege separation folder)");
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {0}/host_key\nPidFile {0}/sshd.pid\n\
         AuthorizedKeysFile {0}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nMaxStartups 100\nLogLevel ERROR\n",
        d.display()
    );
    std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
    let child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .spawn()
        .expect("sshd starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Sshd { child, port, dir })
}

/// The options that reach the test's sshd; `agent`, when given, is the
/// agent program every launch runs on the host.
fn options(sshd: &Sshd, agent: Option<&str>) -> BTreeMap<String, String> {
    let d: PathBuf = sshd.dir.path().to_owned();
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into());
    [
        ("host", "127.0.0.1".to_owned()),
        ("port", sshd.port.to_string()),
        ("user", user),
        ("identity", d.join("client_key").display().to_string()),
        ("known_hosts", d.join("known_hosts").display().to_string()),
    ]
    .into_iter()
    .chain(agent.map(|a| ("agent", a.to_owned())))
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_class_passes_the_worker_conformance_kit_against_a_real_sshd() {
    let Some(sshd) = sshd() else { return };
    let exe = std::env::current_exe().expect("test binary path").to_string_lossy().into_owned();
    // The agent's name on the host is this binary's path (same machine),
    // and no `agent` option overrides it: the kit's launch of a program
    // that does not exist must really fail, and fast.
    let agent = AgentCommand {
        program: exe.clone(),
        args: ["--exact", "agent_entry", "--include-ignored", "--nocapture", "--test-threads=1", "-q"]
            .map(String::from)
            .to_vec(),
        name: Some(exe.clone()),
    };
    let mut kit = WorkerKit::local(agent);
    kit.launch_timeout = Duration::from_secs(30);
    worker(SshWorker::with_defaults(options(&sshd, None)), kit).await;
}

#[test]
fn options_are_checked() {
    use crew_core::worker::Worker;
    let class = SshWorker::new();
    let opts = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    assert!(class.check_options(&opts(&[("host", "a,b"), ("port", "22")])).is_ok());
    for (bad, says) in [
        (opts(&[]), "no host"),
        (opts(&[("host", " , ")]), "no host"),
        (opts(&[("host", "a"), ("port", "ssh")]), "not a port"),
        (opts(&[("host", "a"), ("hots", "b")]), "unknown option \"hots\""),
    ] {
        let e = class.check_options(&bad).expect_err("refused").to_string();
        assert!(e.contains(says), "{e}");
    }
}

/// The stock `crew` binary of this build (`target/<profile>/crew`, next to
/// this test's `deps` folder), when it was built.
fn stock_crew() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let crew = exe.parent()?.parent()?.join("crew");
    crew.exists().then_some(crew)
}

/// Through the PATH protocol: the stock `crew` finds `crew-worker-ssh` on
/// `PATH` for `--class ssh`, and the kit passes from the command line with
/// `crew worker` as the remote agent.
#[test]
fn the_stock_crew_uses_the_ssh_class_as_a_path_plugin() {
    let Some(sshd) = sshd() else { return };
    let Some(crew) = stock_crew() else {
        assert!(std::env::var_os("CI").is_none(), "the crew binary was not built next to this test");
        eprintln!("skipped: build the crew binary first (cargo build -p crew-cli)");
        return;
    };
    let plugin = PathBuf::from(env!("CARGO_BIN_EXE_crew-worker-ssh"));
    let bin = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(&plugin, bin.path().join("crew-worker-ssh")).expect("symlink");
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let crew_cmd = |args: &[&str]| {
        let out = Command::new(&crew).args(args).env("PATH", &path).output().expect("crew runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = crew_cmd(&["classes", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"ssh\""), "crew classes does not list ssh: {stdout}");
    // Its options, from the plugin's handshake.
    let (code, stdout, stderr) = crew_cmd(&["classes", "ssh", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"source\":\"path\"") && stdout.contains("\"name\":\"host\""), "{stdout}");
    let mut args = vec!["conformance".to_owned(), "--class".into(), "ssh".into()];
    for (k, v) in options(&sshd, Some(&crew.display().to_string())) {
        args.push("--opt".into());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = crew_cmd(&args);
    assert_eq!(code, Some(0), "crew conformance --class ssh failed:\n{stdout}\n{stderr}");

    // `crew run --class ssh`: jobs on two ssh workers, which connect back
    // over TLS (pinned to the controller's certificate).
    let jobs = sshd.dir.path().join("jobs.txt");
    std::fs::write(&jobs, "echo one\necho two\necho three\n").expect("jobs");
    let mut run: Vec<String> =
        ["run", "--json", "--workers", "2", "--class", "ssh", "--tls", "always"].map(String::from).to_vec();
    for (k, v) in options(&sshd, Some(&crew.display().to_string())) {
        run.push("--opt".into());
        run.push(format!("{k}={v}"));
    }
    run.push(jobs.display().to_string());
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = crew_cmd(&run);
    assert_eq!(code, Some(0), "crew run --class ssh failed:\n{stdout}\n{stderr}");
    let records: Vec<&str> = stdout.lines().collect();
    assert_eq!(records.len(), 3, "{stdout}");
    assert!(
        records.iter().all(|r| r.contains("\"status\":\"succeeded\"") && r.contains("\"class\":\"ssh\"")),
        "{stdout}"
    );
    // A bad option is refused before anything runs.
    let (code, _, stderr) = crew_cmd(&["run", "--class", "ssh", "--opt", "hots=x", &jobs.display().to_string()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("hots"), "{stderr}");
}

/// The compiled-in way: the example `crew-ssh`
/// (`crew_cli::App::new().with_class(SshWorker::default()).run()`) has
/// `ssh` as a built-in class, and runs jobs on it with itself as the
/// remote agent, with no plugin on `PATH`.
#[test]
fn a_crew_built_with_the_ssh_class_runs_jobs_on_it() {
    let Some(sshd) = sshd() else { return };
    let exe = std::env::current_exe().expect("test path");
    let custom = exe.parent().and_then(Path::parent).map(|d| d.join("examples").join("crew-ssh"));
    let Some(custom) = custom.filter(|c| c.exists()) else {
        assert!(std::env::var_os("CI").is_none(), "the example crew-ssh was not built (cargo test builds examples)");
        eprintln!("skipped: build the example first (cargo build -p crew-worker-ssh --example crew-ssh)");
        return;
    };
    let run = |args: &[String]| {
        let out = Command::new(&custom).args(args).env_remove("CREW_DIR").output().expect("crew-ssh runs");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, stdout, stderr) = run(&["classes".into(), "ssh".into(), "--json".into()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"source\":\"built-in\"") && stdout.contains("\"name\":\"identity\""), "{stdout}");
    let jobs = sshd.dir.path().join("custom-jobs.txt");
    std::fs::write(&jobs, "echo a\necho b\n").expect("jobs");
    let mut args: Vec<String> = ["run", "--json", "--workers", "2", "--class", "ssh"].map(String::from).to_vec();
    for (k, v) in options(&sshd, Some(&custom.display().to_string())) {
        args.extend(["--opt".into(), format!("{k}={v}")]);
    }
    args.push(jobs.display().to_string());
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, Some(0), "crew-ssh run --class ssh failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.contains("\"status\":\"succeeded\"")).count(), 2, "{stdout}");
}
