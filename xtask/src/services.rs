//! `cargo xtask services`: the real services some tests need, from Debian,
//! installed when missing (as CI runs, on a fresh machine, as root).
//!
//! Today: `openssh-server`, whose `sshd` the ssh worker example's tests
//! start on a free loopback port of their own (they never use the
//! system's); `chromium` with `chromium-driver`, the headless browser the
//! dashboard's test drives over WebDriver; and Slurm (`slurmctld slurmd slurm-client munge`, without
//! the recommends: no database, no cgroup tools), from which each test of
//! crew-worker-slurm starts a private one-node cluster (its own munged,
//! slurmctld and slurmd on free ports, a generated `slurm.conf`; see
//! `crates/crew-worker-slurm/tests/it/cluster.rs`) and stops it when it
//! ends. Installed with `apt-get` (after `apt-get update` when the
//! package lists are stale); elsewhere the tests that need it say so and
//! skip, except under `CI`, where a missing service is an error.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Each service: a file that shows it is installed, and its package.
const SERVICES: &[(&str, &str)] = &[
    ("/usr/sbin/sshd", "openssh-server"),
    // The dashboard's test loads the page in a real headless browser.
    ("/usr/bin/chromium", "chromium"),
    ("/usr/bin/chromedriver", "chromium-driver"),
    ("/usr/sbin/slurmctld", "slurmctld"),
    ("/usr/sbin/slurmd", "slurmd"),
    ("/usr/bin/sbatch", "slurm-client"),
    ("/usr/sbin/munged", "munge"),
];

/// Installs what is missing.
pub(crate) fn install() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        SERVICES.iter().filter(|(file, _)| !Path::new(file).exists()).map(|(_, package)| *package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !apt_install(&missing)? {
        let why =
            format!("the tests need {} (Debian: `sudo apt-get install {}`)", missing.join(", "), missing.join(" "));
        if std::env::var_os("CI").is_some() {
            bail!("{why}");
        }
        eprintln!("xtask: {why}; the tests that need them are skipped");
    }
    Ok(())
}

/// Installs Debian packages with `apt-get` (without recommends); `false`
/// when this machine cannot (not root, or no `apt-get`), an error when
/// `apt-get` fails.
pub(crate) fn apt_install(packages: &[&str]) -> anyhow::Result<bool> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        return Ok(false);
    }
    eprintln!("xtask: installing {} (apt-get)", packages.join(", "));
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        Ok(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| "cannot run apt-get")?
            .success())
    };
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(packages);
    // The package lists of a fresh machine may be stale: update, then
    // try once more.
    let installed = apt(&install)? || (apt(&["update", "-q"])? && apt(&install)?);
    if !installed {
        bail!("apt-get could not install {}", packages.join(", "));
    }
    Ok(true)
}
