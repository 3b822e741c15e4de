//! The batch script of one launch, and the folder it lives in with the
//! launch's one-time secrets.
//!
//! **Invariant:** the script holds no secret. Slurm keeps a copy of every
//! batch script (in its state folder, shown by `scontrol write
//! batch_script`), and sbatch's options and environment are shown by
//! `scontrol show job` to whoever may see the job; so the script carries
//! only a reference (`CREW_TOKEN_REF=file:DIR/token.`) to files in a
//! private (0700) folder of the launch, one per member (0600), each holding
//! that member's own secret (`Secret::member_secret`), which its agent
//! claims, reads once and deletes (crew-agent `take_file_secret`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crew_core::worker::{
    ENV_INDEX, ENV_INDEX_BASE, ENV_PARENT_PID, ENV_RESUME_FILE, ENV_TOKEN, ENV_TOKEN_REF, ENV_TOKEN_STDIN, LaunchSpec,
    Secret, TOKEN_REF_FILE, is_secret_var,
};

use crate::options::SlurmOptions;

/// `text` as one word for a POSIX shell.
pub(crate) fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Slurm's `--array` list for member indices: ranges of consecutive ones
/// (`0-3,7,9-10`).
pub fn array_spec(indices: &[u32]) -> String {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

/// The log file of array task `task` of job `job`.
pub fn log_path(log_dir: &Path, job: &str, task: u32) -> PathBuf {
    log_dir.join(format!("crew-{job}_{task}.out"))
}

/// The batch script of a launch whose members' secrets are in files
/// `<token_prefix><index>`.
pub fn render(opts: &SlurmOptions, spec: &LaunchSpec, program: &str, token_prefix: Option<&Path>) -> String {
    let indices: Vec<u32> = spec.members.iter().map(|m| m.index).collect();
    let mut s = format!("#!{}\n", opts.shell);
    let mut sbatch = |line: String| {
        s.push_str("#SBATCH ");
        s.push_str(&line);
        s.push('\n');
    };
    sbatch(format!("--job-name={}", opts.job_name));
    sbatch(format!("--array={}", array_spec(&indices)));
    sbatch(format!("--output={}/crew-%A_%a.out", opts.log_dir.display()));
    if let Some(p) = &opts.partition {
        sbatch(format!("--partition={p}"));
    }
    if let Some(a) = &opts.account {
        sbatch(format!("--account={a}"));
    }
    if let Some(q) = &opts.qos {
        sbatch(format!("--qos={q}"));
    }
    if let Some(t) = opts.time_limit(spec.wall_time) {
        sbatch(format!("--time={t}"));
    }
    if let Some(m) = opts.memory_mib {
        sbatch(format!("--mem={m}M"));
    }
    if let Some(c) = opts.cpus {
        sbatch(format!("--cpus-per-task={c}"));
    }
    if let Some(g) = &opts.gres {
        sbatch(format!("--gres={g}"));
    }
    if let Some(n) = opts.nodes {
        sbatch(format!("--nodes={n}"));
    }
    if let Some(e) = &opts.export {
        sbatch(format!("--export={e}"));
    }
    for line in &opts.extra {
        sbatch(line.clone());
    }
    let first = spec.members.first().map_or("", |m| m.slot.as_str());
    let last = spec.members.last().map_or("", |m| m.slot.as_str());
    s.push_str(&format!(
        "# crew: the agents of slots {first} to {last}. No secret is written here: each agent takes its own \
         from a one-time file.\n"
    ));
    if let Some(p) = &opts.preamble {
        s.push_str(p.trim_end());
        s.push('\n');
    }
    // sbatch passes the submitter's environment on (`--export=ALL`): none
    // of the controller's own agent variables may reach the agent.
    s.push_str(&format!(
        "unset {ENV_TOKEN} {ENV_TOKEN_STDIN} {ENV_INDEX_BASE} {ENV_PARENT_PID} {ENV_RESUME_FILE} {ENV_TOKEN_REF}\n"
    ));
    for (k, v) in spec.env.iter().filter(|(k, _)| !is_secret_var(k) && k.as_str() != ENV_TOKEN) {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!(
        "{ENV_INDEX}=\"${{SLURM_ARRAY_TASK_ID:?crew: not started as a Slurm array task}}\"; export {ENV_INDEX}\n"
    ));
    if let Some(prefix) = token_prefix {
        s.push_str(&format!("export {ENV_TOKEN_REF}={}\n", quote(&format!("{TOKEN_REF_FILE}{}", prefix.display()))));
    }
    let words: Vec<String> = std::iter::once(program).chain(spec.args.iter().map(String::as_str)).map(quote).collect();
    s.push_str(&format!("exec {}\n", words.join(" ")));
    s
}

/// The folder of one launch under `state_dir`: its script and its
/// members' one-time secrets; private to this user.
#[derive(Debug)]
pub(crate) struct LaunchDir {
    pub(crate) path: PathBuf,
}

impl LaunchDir {
    /// Creates `state_dir` (0700 when new) and a fresh folder of the launch
    /// in it (0700).
    pub(crate) fn create(state_dir: &Path, launch: &str) -> std::io::Result<Self> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir)?;
        let launch: String = launch.chars().filter(char::is_ascii_alphanumeric).take(20).collect();
        let random = Secret::random();
        let path = state_dir.join(format!("launch-{launch}-{}", &random.expose()[..12]));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path })
    }

    /// The prefix of the members' secret files.
    pub(crate) fn token_prefix(&self) -> PathBuf {
        self.path.join("token.")
    }

    /// Writes a private file `name` (0600, never an existing one).
    pub(crate) fn write(&self, name: &str, text: &str) -> std::io::Result<PathBuf> {
        let path = self.path.join(name);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(path)
    }

    /// Writes the secret of each member in `indices`.
    pub(crate) fn write_secrets(&self, secret: &Secret, indices: &[u32]) -> std::io::Result<()> {
        for &i in indices {
            self.write(&format!("token.{i}"), secret.member_secret(i).expose())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use crew_core::worker::{LaunchMember, LaunchSpec};

    use super::{array_spec, render};
    use crate::options::SlurmOptions;

    #[test]
    fn arrays_are_ranges_of_the_member_indices() {
        assert_eq!(array_spec(&[0, 1, 2, 3]), "0-3");
        assert_eq!(array_spec(&[3]), "3");
        assert_eq!(array_spec(&[0, 1, 5, 7, 8, 9]), "0-1,5,7-9");
    }

    #[test]
    fn the_script_has_the_options_and_no_secret() {
        let token = "0123456789abcdef-the-launch-secret";
        let env = BTreeMap::from([
            ("CREW_TOKEN".to_owned(), token.to_owned()),
            ("CREW_CONNECT".to_owned(), "10.0.0.1:7000".to_owned()),
            ("CREW_LAUNCH".to_owned(), "4".to_owned()),
        ]);
        let spec = LaunchSpec::new(
            "/opt/crew",
            "crew",
            vec![LaunchMember::new("slurm-1", 0), LaunchMember::new("slurm-2", 1)],
        )
        .with_args(vec!["worker".into()])
        .with_env(env);
        let options = BTreeMap::from([
            ("partition".to_owned(), "debug".to_owned()),
            ("memory".to_owned(), "2G".to_owned()),
            ("state_dir".to_owned(), "/shared/crew".to_owned()),
            ("extra".to_owned(), "--constraint=avx2".to_owned()),
            ("preamble".to_owned(), "module load R".to_owned()),
        ]);
        let opts = SlurmOptions::parse(&BTreeMap::new(), &options).expect("valid");
        let s = render(&opts, &spec, "/opt/crew", Some(Path::new("/shared/crew/launch-4-x/token.")));
        assert!(!s.contains(token), "{s}");
        assert!(s.starts_with("#!/bin/bash\n"), "{s}");
        for line in [
            "#SBATCH --array=0-1\n",
            "#SBATCH --partition=debug\n",
            "#SBATCH --mem=2048M\n",
            "#SBATCH --constraint=avx2\n",
            "#SBATCH --output=/shared/crew/logs/crew-%A_%a.out\n",
            "module load R\n",
            "export CREW_CONNECT='10.0.0.1:7000'\n",
            "export CREW_TOKEN_REF='file:/shared/crew/launch-4-x/token.'\n",
            "exec '/opt/crew' 'worker'\n",
        ] {
            assert!(s.contains(line), "{line:?} missing from\n{s}");
        }
        // Every #SBATCH line comes before the first command.
        let last_directive = s.rfind("#SBATCH").expect("directives");
        assert!(s[..last_directive].lines().skip(1).all(|l| l.starts_with('#')), "{s}");
    }
}
