//! The pipeline file (`pipeline.toml`): parsing and checking, with every
//! error located as `FILE:LINE:COL`.
//!
//! The file has one table per target under `[targets.NAME]` (README,
//! "Pipelines", lists every key). Parsing checks each target alone (its
//! keys, names, paths, durations); what involves several targets (unknown
//! `after`, cycles, two targets with one output) is checked by
//! [`crate::plan`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crew_core::Tags;
use crew_core::job::{check_relative_path, parse_duration, parse_size};
use serde::Deserialize;
use toml::Spanned;

/// A place in the pipeline file, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// Where each line of a text starts, to turn byte offsets into lines and
/// columns without rescanning the text each time.
struct LineIndex<'a> {
    file: &'a str,
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { file, text, starts }
    }

    fn loc(&self, offset: usize) -> Loc {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line.saturating_sub(1)];
        let col = self.text.get(start..offset).map_or(0, |l| l.chars().count()) + 1;
        Loc { file: self.file.to_owned(), line, col }
    }
}

/// A pipeline file that cannot be used: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{loc}: {message}")]
pub struct FileError {
    /// Where the problem is.
    pub loc: Loc,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// What a target runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandDef {
    /// A program and its arguments, run directly.
    Argv(Vec<String>),
    /// A line for `sh -c`.
    Shell(String),
}

/// One declared input of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputDef {
    /// A file path relative to the pipeline's folder: another target's
    /// output (a dependency) or a source file.
    Path(String),
    /// Every output of a target, of all its branches when it is mapped
    /// (`{ target = "fit" }`, to combine branches).
    Target(String),
}

/// The values one map variable takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapValues {
    /// A static list.
    List(Vec<String>),
    /// The source files matching a glob (relative to the pipeline's
    /// folder), sorted.
    Glob(String),
    /// The non-empty lines of a file another target writes, known only
    /// once it is built (dynamic branching).
    Lines(String),
}

/// A target as declared.
#[derive(Clone, Debug)]
pub struct TargetDef {
    /// Its name (`[targets.NAME]`).
    pub name: String,
    /// Where it is declared.
    pub loc: Loc,
    /// What it runs.
    pub command: CommandDef,
    /// What it reads.
    pub inputs: Vec<InputDef>,
    /// What it writes: paths relative to its folder (glob patterns allowed;
    /// only literal paths can be named by other targets' inputs).
    pub outputs: Vec<String>,
    /// Declared environment: part of the target's identity.
    pub env: BTreeMap<String, String>,
    /// Variables passed through from the worker's environment: their names
    /// are part of the identity, their values are not.
    pub env_inherit: Vec<String>,
    /// The worker tags it needs.
    pub tags: Tags,
    /// Targets that must be built first, without data between them.
    pub after: Vec<String>,
    /// Wall-clock limit of one attempt.
    pub timeout: Option<Duration>,
    /// Re-runs after a failure exit.
    pub retries: u32,
    /// CPU-time limit of one attempt.
    pub cpu: Option<Duration>,
    /// Memory limit in bytes (`memory = "2GiB"`).
    pub memory: Option<u64>,
    /// Whether its outputs are copied into the working tree after a build.
    pub fetch: bool,
    /// Branching: variables and their values (sorted by variable name).
    pub map: Vec<(String, MapValues)>,
}

impl TargetDef {
    /// True when the target is mapped (has branches).
    pub fn is_mapped(&self) -> bool {
        !self.map.is_empty()
    }

    /// True when some branch values are known only at run time.
    pub fn is_dynamic(&self) -> bool {
        self.map.iter().any(|(_, v)| matches!(v, MapValues::Lines(_)))
    }
}

/// A parsed pipeline file.
#[derive(Clone, Debug)]
pub struct PipelineFile {
    /// The file as named by the user.
    pub file: String,
    /// The folder relative paths are resolved against: the file's folder.
    pub root: PathBuf,
    /// The targets, by name order (shared: the plan and the engine hold
    /// them without copying).
    pub targets: Vec<std::sync::Arc<TargetDef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    targets: BTreeMap<String, Spanned<RawTarget>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawInput {
    Path(String),
    Table(RawInputTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInputTable {
    target: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMap {
    List(Vec<String>),
    Glob(String),
    Lines(RawLines),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLines {
    lines: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    command: Option<Spanned<RawCommand>>,
    #[serde(default)]
    inputs: Vec<Spanned<RawInput>>,
    #[serde(default)]
    outputs: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    env_inherit: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    timeout: Option<Spanned<RawDuration>>,
    retries: Option<u32>,
    cpu: Option<Spanned<RawDuration>>,
    memory: Option<Spanned<String>>,
    fetch: Option<bool>,
    map: Option<BTreeMap<String, Spanned<RawMap>>>,
}

/// Longest target name, in bytes.
pub const TARGET_NAME_MAX: usize = 128;

/// Checks a target name: letters, digits, `_`, `-` and `.`, not starting
/// with `.` or `-`.
pub fn check_target_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TARGET_NAME_MAX {
        return Err(format!("a target name has 1 to {TARGET_NAME_MAX} characters"));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("target name {name:?} cannot start with '.' or '-'"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("target name {name:?} has {c:?}: use letters, digits, '_', '-' and '.'"));
    }
    Ok(())
}

/// Reads and checks the pipeline file at `path`.
///
/// # Errors
/// The file cannot be read, or the first problem found in it.
pub fn load(path: &Path) -> Result<PipelineFile, FileError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        loc: Loc { file: label.clone(), line: 0, col: 0 },
        message: format!("cannot read the pipeline file: {e} (crew make reads pipeline.toml in the current folder; -f FILE for another)"),
    })?;
    let root = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parse(&label, &text, root)
}

/// Parses pipeline `text` (named `file` in errors) whose relative paths are
/// from `root`.
///
/// # Errors
/// The first problem found, located.
pub fn parse(file: &str, text: &str, root: PathBuf) -> Result<PipelineFile, FileError> {
    let lines = LineIndex::new(file, text);
    let raw: RawFile = toml::from_str(text).map_err(|e| FileError {
        loc: lines.loc(e.span().map_or(0, |s| s.start)),
        message: e.message().trim().to_owned(),
    })?;
    let mut targets = Vec::with_capacity(raw.targets.len());
    for (name, spanned) in raw.targets {
        let loc = lines.loc(spanned.span().start);
        let at = |span: std::ops::Range<usize>| lines.loc(span.start);
        let err = |loc: Loc, message: String| FileError { loc, message: format!("target {name}: {message}") };
        check_target_name(&name).map_err(|m| FileError { loc: loc.clone(), message: m })?;
        let t = spanned.into_inner();
        let Some(command) = t.command else {
            return Err(err(
                loc,
                "no command: add command = \"...\" (run by sh -c) or command = [\"prog\", \"arg\"]".into(),
            ));
        };
        let command_loc = at(command.span());
        let command = match command.into_inner() {
            RawCommand::Shell(line) if line.trim().is_empty() => {
                return Err(err(command_loc, "the command is empty".into()));
            }
            RawCommand::Argv(argv) if argv.first().is_none_or(|p| p.is_empty()) => {
                return Err(err(command_loc, "the command array is empty: give at least a program".into()));
            }
            RawCommand::Shell(line) => CommandDef::Shell(line),
            RawCommand::Argv(argv) => CommandDef::Argv(argv),
        };
        let mut map = Vec::new();
        for (var, values) in t.map.unwrap_or_default() {
            let vloc = at(values.span());
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err(vloc, format!("map variable {var:?}: use letters, digits and '_'")));
            }
            let values = match values.into_inner() {
                RawMap::List(list) if list.is_empty() => {
                    return Err(err(vloc, format!("map variable {var} has no values: list at least one")));
                }
                RawMap::List(list) => {
                    if let Some(v) = list.iter().find(|v| v.is_empty() || v.chars().any(char::is_control)) {
                        return Err(err(
                            vloc,
                            format!("map variable {var}: value {v:?} is empty or has a control character"),
                        ));
                    }
                    MapValues::List(list)
                }
                RawMap::Glob(pattern) => {
                    check_relative_path(&pattern)
                        .map_err(|e| err(vloc.clone(), format!("map {var} = {pattern:?}: {e}")))?;
                    MapValues::Glob(pattern)
                }
                RawMap::Lines(RawLines { lines }) => {
                    check_relative_path(&lines)
                        .map_err(|e| err(vloc.clone(), format!("map {var} lines {lines:?}: {e}")))?;
                    MapValues::Lines(lines)
                }
            };
            map.push((var, values));
        }
        let vars: Vec<&str> = map.iter().map(|(v, _)| v.as_str()).collect();
        let mut inputs = Vec::new();
        for input in t.inputs {
            let iloc = at(input.span());
            match input.into_inner() {
                RawInput::Path(p) => {
                    check_relative_path(&crate::plan::template_probe(&p, &vars))
                        .map_err(|e| err(iloc, format!("input {p:?}: {e}")))?;
                    inputs.push(InputDef::Path(p));
                }
                RawInput::Table(RawInputTable { target }) => {
                    check_target_name(&target)
                        .map_err(|m| err(iloc, format!("input {{ target = {target:?} }}: {m}")))?;
                    inputs.push(InputDef::Target(target));
                }
            }
        }
        let mut outputs = Vec::new();
        for output in t.outputs {
            let oloc = at(output.span());
            let o = output.into_inner();
            check_relative_path(&crate::plan::template_probe(&o, &vars))
                .map_err(|e| err(oloc, format!("output {o:?}: {e}")))?;
            outputs.push(o);
        }
        for (k, v) in &t.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(err(loc.clone(), format!("env {k:?}: a name is non-empty without '=' or NUL")));
            }
        }
        for k in &t.env_inherit {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(err(loc.clone(), format!("env_inherit {k:?}: a name is non-empty without '=' or NUL")));
            }
        }
        let tags = Tags::try_from_iter(t.tags).map_err(|e| err(loc.clone(), e.to_string()))?;
        let mut after = Vec::new();
        for a in t.after {
            let aloc = at(a.span());
            let a = a.into_inner();
            check_target_name(&a).map_err(|m| err(aloc, format!("after: {m}")))?;
            after.push(a);
        }
        let duration = |d: Option<Spanned<RawDuration>>, key: &str| -> Result<Option<Duration>, FileError> {
            let Some(d) = d else { return Ok(None) };
            let dloc = at(d.span());
            let parsed = match d.into_inner() {
                RawDuration::Seconds(s) => parse_duration(&s.to_string()),
                RawDuration::Text(t) => parse_duration(&t),
            };
            match parsed {
                Ok(d) if d.is_zero() => Err(err(dloc, format!("{key} must be greater than zero"))),
                Ok(d) => Ok(Some(d)),
                Err(e) => Err(err(dloc, format!("{key}: {e}"))),
            }
        };
        let timeout = duration(t.timeout, "timeout")?;
        let cpu = duration(t.cpu, "cpu")?;
        let memory = match t.memory {
            None => None,
            Some(m) => {
                let mloc = at(m.span());
                Some(parse_size(m.get_ref()).map_err(|e| err(mloc, format!("memory: {e}")))?)
            }
        };
        targets.push(std::sync::Arc::new(TargetDef {
            name,
            loc,
            command,
            inputs,
            outputs,
            env: t.env,
            env_inherit: t.env_inherit,
            tags,
            after,
            timeout,
            retries: t.retries.unwrap_or(0),
            cpu,
            memory,
            fetch: t.fetch.unwrap_or(true),
            map,
        }));
    }
    Ok(PipelineFile { file: file.to_owned(), root, targets })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<PipelineFile, FileError> {
        parse("pipeline.toml", text, PathBuf::from("."))
    }

    #[test]
    fn the_minimal_example_parses() {
        let p = parse_str(
            r#"
[targets.raw]
command = ["sh", "-c", "seq 1 100 > raw.txt"]
outputs = ["raw.txt"]

[targets.total]
command = ["sh", "-c", "awk '{s+=$1} END {print s}' raw.txt data.csv > total.txt"]
inputs = ["raw.txt", "data.csv"]
outputs = ["total.txt"]
env = { LC_ALL = "C" }
tags = ["big"]
"#,
        )
        .unwrap();
        assert_eq!(p.targets.len(), 2);
        let total = &p.targets[1];
        assert_eq!(total.name, "total");
        assert_eq!(total.inputs, vec![InputDef::Path("raw.txt".into()), InputDef::Path("data.csv".into())]);
        assert_eq!(total.env.get("LC_ALL").map(String::as_str), Some("C"));
        assert_eq!(total.loc.line, 6);
    }

    #[test]
    fn errors_are_located() {
        let e = parse_str("[targets.a]\ncommand = \"true\"\ntimeout = \"ten\"\n").unwrap_err();
        assert_eq!((e.loc.line, e.loc.col), (3, 11), "{e}");
        assert!(e.message.contains("timeout"), "{e}");
        let e = parse_str("[targets.a]\ncommand = \"true\"\noops = 1\n").unwrap_err();
        assert_eq!(e.loc.line, 3, "{e}");
        let e = parse_str("[targets.a]\ncommand = \"true\"\n[targets.a.x\n").unwrap_err();
        assert_eq!(e.loc.line, 3, "{e}");
        let e = parse_str("[targets.a]\noutputs = [\"x\"]\n").unwrap_err();
        assert!(e.message.contains("no command"), "{e}");
        let e = parse_str("[targets.a]\ncommand = \"true\"\nmap = { s = [] }\n").unwrap_err();
        assert!(e.message.contains("no values"), "{e}");
        let e = parse_str("[targets.a]\ncommand = \"true\"\noutputs = [\"../x\"]\n").unwrap_err();
        assert_eq!(e.loc.line, 3, "{e}");
        let e = parse_str("[targets.\"a b\"]\ncommand = \"true\"\n").unwrap_err();
        assert!(e.message.contains("target name"), "{e}");
    }

    #[test]
    fn maps_and_target_inputs() {
        let p = parse_str(
            r#"
[targets.fit]
command = "fit {sample}"
map = { sample = ["a", "b"], file = "data/*.csv", line = { lines = "list.txt" } }
inputs = ["x_{sample}.csv", { target = "prep" }]
outputs = ["fit_{sample}.rds"]
"#,
        )
        .unwrap();
        let t = &p.targets[0];
        assert!(t.is_dynamic());
        assert_eq!(t.map[0], ("file".into(), MapValues::Glob("data/*.csv".into())));
        assert_eq!(t.map[1], ("line".into(), MapValues::Lines("list.txt".into())));
        assert_eq!(t.inputs[1], InputDef::Target("prep".into()));
    }
}
