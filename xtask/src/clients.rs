//! `cargo xtask clients`: the tests of the Python and R clients
//! (`clients/python`, `clients/r`) against the real daemon.
//!
//! Both suites start `crew up` in temporary project folders and run real
//! local workers, with `CREW_BIN` set to the `crew` under test: in `cargo
//! xtask ci` the one the Rust tests just built (`target/debug/crew`); run
//! alone, `$CREW_BIN` when set, else `cargo build -p crew-cli`'s.
//!
//! - **Python**: a venv in `target/clients/venv` (made once, with pytest and
//!   setuptools from PyPI), the package installed into it from its folder
//!   (so its `pyproject.toml` is what is tested), then `pytest`.
//! - **R**: R, R6, curl, jsonlite and testthat from Debian (`r-base-core`,
//!   `r-cran-*`, with `apt-get` as root, like [`crate::services`]) when
//!   missing; the package installed into `target/clients/rlib` with `R CMD
//!   INSTALL`, then testthat with `stop_on_failure`.
//!
//! Where Python or R cannot be had (no `python3`; not root, or no
//! `apt-get`) the suite says why and is skipped, except under `CI`, where
//! that is an error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The R packages the client and its tests need, as (R name, Debian package).
const R_PACKAGES: &[(&str, &str)] =
    &[("R6", "r-cran-r6"), ("curl", "r-cran-curl"), ("jsonlite", "r-cran-jsonlite"), ("testthat", "r-cran-testthat")];

/// `python -m pip install`, quietly.
const PIP_INSTALL: &[&str] = &["-m", "pip", "install", "-q", "--disable-pip-version-check"];

/// `cargo xtask clients`: runs both suites against `$CREW_BIN` when set,
/// else against the debug build of `crew` (built first, so it is current).
pub(crate) fn run_alone() -> anyhow::Result<()> {
    match std::env::var_os("CREW_BIN") {
        Some(path) if !path.is_empty() => run(Path::new(&path)),
        _ => {
            build_crew()?;
            run(&built_crew())
        }
    }
}

/// In `cargo xtask ci`, after the Rust tests: against the `crew` they just
/// built (crew-cli's integration tests need `target/debug/crew`, so nothing
/// is rebuilt with other features); built only if it is missing.
pub(crate) fn run_in_ci() -> anyhow::Result<()> {
    let crew = built_crew();
    if !crew.exists() {
        build_crew()?;
    }
    run(&crew)
}

/// `cargo build -p crew-cli --bin crew`.
fn build_crew() -> anyhow::Result<()> {
    let status =
        crate::cargo().args(["build", "-p", "crew-cli", "--bin", "crew"]).status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("`cargo build -p crew-cli --bin crew` failed: see its output above");
    }
    Ok(())
}

/// The `crew` of the workspace's debug build (`$CARGO_TARGET_DIR` honoured).
fn built_crew() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => crate::workspace_root().join(dir),
        _ => crate::workspace_root().join("target"),
    };
    target.join("debug").join("crew")
}

/// Runs the Python suite, then the R suite, against `crew`.
pub(crate) fn run(crew: &Path) -> anyhow::Result<()> {
    let crew = std::fs::canonicalize(crew).with_context(|| format!("no crew binary at {}", crew.display()))?;
    python(&crew)?;
    r(&crew)?;
    Ok(())
}

/// `target/clients`.
fn root() -> PathBuf {
    crate::workspace_root().join("target").join("clients")
}

/// Skips with `why`, or fails under `CI`.
fn skip(suite: &str, why: &str) -> anyhow::Result<()> {
    if std::env::var_os("CI").is_some() {
        bail!("the {suite} client tests cannot run: {why}");
    }
    eprintln!("xtask: skipping the {suite} client tests: {why}");
    Ok(())
}

/// Runs `command`; fails with `what` when it does not succeed.
fn check(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        let code = status.code().map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit code {c}"));
        bail!("{what} failed ({code}): see its output above");
    }
    Ok(())
}

/// Whether `command` runs and exits 0, quietly.
fn succeeds(command: &mut Command) -> bool {
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn python(crew: &Path) -> anyhow::Result<()> {
    if !succeeds(Command::new("python3").args(["-c", "import venv"])) {
        return skip("Python", "python3 with venv is not installed (Debian: apt-get install python3-venv)");
    }
    let venv = root().join("venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        eprintln!("xtask: making the Python venv for the client tests ({})", venv.display());
        std::fs::create_dir_all(root()).with_context(|| format!("cannot create {}", root().display()))?;
        check(Command::new("python3").arg("-m").arg("venv").arg(&venv), "python3 -m venv")?;
    }
    // Quick when already there (no download). setuptools 70.1 builds wheels
    // by itself (older ones, as bundled with Python 3.11, need `wheel`).
    check(
        Command::new(&python).args(PIP_INSTALL).args(["pytest", "setuptools>=70.1"]),
        "pip install pytest setuptools",
    )?;
    let package = crate::workspace_root().join("clients").join("python");
    check(
        Command::new(&python)
            .args(PIP_INSTALL)
            .args(["--no-build-isolation", "--no-deps", "--force-reinstall"])
            .arg(&package),
        "pip install clients/python",
    )?;
    eprintln!("xtask: running the Python client tests (pytest)");
    check(
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(package.join("tests"))
            .env("CREW_BIN", crew)
            .current_dir(&package),
        "pytest clients/python/tests",
    )
}

fn r(crew: &Path) -> anyhow::Result<()> {
    if !r_ready() {
        match install_r() {
            Ok(true) => {}
            Ok(false) => {
                return skip(
                    "R",
                    "R and its packages are missing and cannot be installed here (needs root and apt-get; \
                     Debian: apt-get install r-base-core r-cran-r6 r-cran-curl r-cran-jsonlite r-cran-testthat)",
                );
            }
            Err(e) => return Err(e),
        }
        if !r_ready() {
            bail!("R or one of R6, curl, jsonlite, testthat still does not load after installing them");
        }
    }
    let lib = root().join("rlib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let package = crate::workspace_root().join("clients").join("r");
    check(
        Command::new("R")
            .args(["CMD", "INSTALL", "--no-docs", "--no-html", "--no-multiarch", "-l"])
            .arg(&lib)
            .arg(&package)
            .stdout(Stdio::null()),
        "R CMD INSTALL clients/r",
    )?;
    eprintln!("xtask: running the R client tests (testthat)");
    check(
        Command::new("Rscript")
            .arg("-e")
            .arg(
                "testthat::test_dir('testthat', package = 'crewclient', load_package = 'installed', \
                 stop_on_failure = TRUE, reporter = 'summary')",
            )
            .env("R_LIBS", &lib)
            .env("CREW_BIN", crew)
            .env("CREW_README", crate::workspace_root().join("README.md"))
            .current_dir(package.join("tests")),
        "the R client tests (testthat)",
    )
}

/// Whether `Rscript` runs and loads every package of [`R_PACKAGES`].
fn r_ready() -> bool {
    let names: Vec<String> = R_PACKAGES.iter().map(|(name, _)| format!("'{name}'")).collect();
    let code = format!("for (p in c({})) if (!requireNamespace(p, quietly = TRUE)) quit(status = 1)", names.join(", "));
    succeeds(Command::new("Rscript").args(["-e", &code]))
}

/// Installs R and the packages from Debian; `false` when this machine
/// cannot (not root, no apt-get).
fn install_r() -> anyhow::Result<bool> {
    let mut packages = vec!["r-base-core"];
    packages.extend(R_PACKAGES.iter().map(|(_, package)| *package));
    crate::services::apt_install(&packages)
}
