//! The plan: the pipeline file turned into a graph of nodes.
//!
//! A plain target is one **job node**. A mapped target is a **group node**
//! whose dependencies are its branches (one job node each), so that a
//! target reading all of them (`{ target = "fit" }`) or ordered after them
//! waits for the group. Static maps (lists, globs of source files, lines of
//! a source file) are expanded here; a map over the lines of another
//! target's output is expanded by [`Plan::expand`] once that target is
//! built (dynamic branching), and its branches join the graph then.
//!
//! Dependencies come from inputs that are other targets' outputs (exact
//! paths), from `{ target = NAME }` inputs and from `after`. An input that
//! a dynamic target *could* write (its output templates, `{var}` standing
//! for any text) depends on that target's group, because which branch
//! writes it is known only at run time.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::file::{CommandDef, FileError, InputDef, Loc, MapValues, PipelineFile, TargetDef};

/// Index of a node in [`Plan::nodes`].
pub type NodeId = usize;

/// One input of a job node, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobInput {
    /// A file of the working tree, not written by any target.
    Source(String),
    /// A file another target writes (its producer is a dependency).
    Output(String),
    /// Every output of a node (a plain target, or all branches of a group).
    Node(NodeId),
}

/// A node that runs one job: a plain target or one branch.
#[derive(Clone, Debug)]
pub struct JobNode {
    /// Index of its target in [`PipelineFile::targets`].
    pub target: usize,
    /// Its branch values, by variable (empty for a plain target).
    pub branch: BTreeMap<String, String>,
    /// The command, values substituted.
    pub command: CommandDef,
    /// The inputs, values substituted.
    pub inputs: Vec<(String, JobInput)>,
    /// The output patterns, values substituted.
    pub outputs: Vec<String>,
    /// The declared environment, values substituted.
    pub env: BTreeMap<String, String>,
}

/// What a node is.
#[derive(Clone, Debug)]
pub enum NodeKind {
    /// Runs a job.
    Job(std::sync::Arc<JobNode>),
    /// The branches of a mapped target.
    Group {
        /// Index of its target.
        target: usize,
        /// False while a dynamic map waits for its values.
        expanded: bool,
    },
}

/// A node of the graph.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its name: the target's, or `name[value,..]` for a branch.
    pub label: String,
    /// What it is.
    pub kind: NodeKind,
    /// Nodes that must be done first.
    pub deps: Vec<NodeId>,
    /// Nodes ordered after it by `after` (not by data): their identities
    /// count in its own.
    pub after: Vec<NodeId>,
}

/// The graph of a pipeline.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The file it came from.
    pub file: PipelineFile,
    /// Every node; ids are indices.
    pub nodes: Vec<Node>,
    /// Per target (same index as `file.targets`): its node.
    pub target_node: Vec<NodeId>,
    /// Literal output path → the job node that writes it.
    pub producers: HashMap<String, NodeId>,
    by_label: HashMap<String, NodeId>,
}

/// Replaces each `{var}` of `vars` in `text` by a plain probe value, so that
/// a template can be checked like a path.
pub(crate) fn template_probe(text: &str, vars: &[&str]) -> String {
    let mut out = text.to_owned();
    for v in vars {
        out = out.replace(&format!("{{{v}}}"), "x");
    }
    out
}

fn substitute(text: &str, branch: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    for (var, value) in branch {
        out = out.replace(&format!("{{{var}}}"), value);
    }
    out
}

/// A template as literal parts and holes (`{var}`, any text).
fn template_parts(text: &str, vars: &[String]) -> Vec<Option<String>> {
    let mut parts: Vec<Option<String>> = Vec::new();
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for v in vars {
            let hole = format!("{{{v}}}");
            if rest.starts_with(&hole) {
                parts.push(None);
                rest = &rest[hole.len()..];
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        match parts.last_mut() {
            Some(Some(lit)) => lit.push(c),
            _ => parts.push(Some(c.to_string())),
        }
        rest = &rest[c.len_utf8()..];
    }
    parts
}

/// True when some text matches both templates (holes match any text).
fn could_match(a: &[Option<String>], b: &[Option<String>]) -> bool {
    // Each side as characters and holes.
    fn flatten(parts: &[Option<String>]) -> Vec<Option<char>> {
        let mut out = Vec::new();
        for p in parts {
            match p {
                Some(lit) => out.extend(lit.chars().map(Some)),
                None => out.push(None),
            }
        }
        out
    }
    let (a, b) = (flatten(a), flatten(b));
    // reach[i][j]: a[i..] and b[j..] can still match a common text.
    let mut memo = vec![vec![None; b.len() + 1]; a.len() + 1];
    fn go(a: &[Option<char>], b: &[Option<char>], i: usize, j: usize, memo: &mut Vec<Vec<Option<bool>>>) -> bool {
        if let Some(v) = memo[i][j] {
            return v;
        }
        let v = match (a.get(i), b.get(j)) {
            (None, None) => true,
            (Some(None), _) => go(a, b, i + 1, j, memo) || (j < b.len() && go(a, b, i, j + 1, memo)),
            (_, Some(None)) => go(a, b, i, j + 1, memo) || (i < a.len() && go(a, b, i + 1, j, memo)),
            (Some(Some(x)), Some(Some(y))) => x == y && go(a, b, i + 1, j + 1, memo),
            _ => false,
        };
        memo[i][j] = Some(v);
        v
    }
    go(&a, &b, 0, 0, &mut memo)
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

impl Plan {
    /// Builds the graph of `file`, checking everything that involves several
    /// targets: unknown names, two producers of one file, missing source
    /// files, maps without values, cycles.
    ///
    /// # Errors
    /// The first problem, located at the target that has it.
    pub fn new(file: PipelineFile) -> Result<Self, FileError> {
        let mut plan = Plan {
            nodes: Vec::new(),
            target_node: Vec::new(),
            producers: HashMap::new(),
            by_label: HashMap::new(),
            file,
        };
        let names: HashMap<String, usize> =
            plan.file.targets.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        // Nodes first, then the producers of every literal output.
        let mut pending_groups = Vec::new();
        for ti in 0..plan.file.targets.len() {
            let t = plan.file.targets[ti].clone();
            if !t.is_mapped() {
                let id = plan.push_job(ti, BTreeMap::new());
                plan.target_node.push(id);
                continue;
            }
            let group = plan.push(Node {
                label: t.name.clone(),
                kind: NodeKind::Group { target: ti, expanded: false },
                deps: Vec::new(),
                after: Vec::new(),
            });
            plan.target_node.push(group);
            // A map is static when none of its variables reads a target's
            // output; lines of a source file are read now.
            let dynamic_lines = t.map.iter().any(|(_, v)| match v {
                MapValues::Lines(f) => plan.file.targets.iter().any(|o| writes(o, f)),
                _ => false,
            });
            if !dynamic_lines {
                let values = plan.static_values(&t)?;
                pending_groups.push((group, values));
            }
        }
        for (group, values) in pending_groups {
            plan.add_branches(group, &values).map_err(|m| plan.error(group, m))?;
        }
        for id in 0..plan.nodes.len() {
            plan.register_outputs(id)?;
        }
        for id in 0..plan.nodes.len() {
            plan.link(id, &names)?;
        }
        plan.check_cycles()?;
        Ok(plan)
    }

    fn push(&mut self, node: Node) -> NodeId {
        let id = self.nodes.len();
        self.by_label.insert(node.label.clone(), id);
        self.nodes.push(node);
        id
    }

    fn push_job(&mut self, ti: usize, branch: BTreeMap<String, String>) -> NodeId {
        let t = &self.file.targets[ti];
        let label = if branch.is_empty() {
            t.name.clone()
        } else {
            format!("{}[{}]", t.name, branch.values().cloned().collect::<Vec<_>>().join(","))
        };
        let command = match &t.command {
            CommandDef::Argv(argv) => CommandDef::Argv(argv.iter().map(|a| substitute(a, &branch)).collect()),
            CommandDef::Shell(line) => CommandDef::Shell(substitute(line, &branch)),
        };
        let inputs = t
            .inputs
            .iter()
            .filter_map(|i| match i {
                InputDef::Path(p) => {
                    let p = substitute(p, &branch);
                    Some((p.clone(), JobInput::Source(p)))
                }
                InputDef::Target(_) => None,
            })
            .collect();
        let outputs = t.outputs.iter().map(|o| substitute(o, &branch)).collect();
        let env = t.env.iter().map(|(k, v)| (k.clone(), substitute(v, &branch))).collect();
        let job = JobNode { target: ti, branch, command, inputs, outputs, env };
        self.push(Node { label, kind: NodeKind::Job(std::sync::Arc::new(job)), deps: Vec::new(), after: Vec::new() })
    }

    fn error(&self, id: NodeId, message: String) -> FileError {
        let ti = self.target_of(id);
        let t = &self.file.targets[ti];
        FileError { loc: t.loc.clone(), message: format!("target {}: {message}", self.nodes[id].label) }
    }

    /// The target a node belongs to.
    pub fn target_of(&self, id: NodeId) -> usize {
        match &self.nodes[id].kind {
            NodeKind::Job(j) => j.target,
            NodeKind::Group { target, .. } => *target,
        }
    }

    /// The target definition of a node.
    pub fn def(&self, id: NodeId) -> &std::sync::Arc<TargetDef> {
        &self.file.targets[self.target_of(id)]
    }

    /// The node named `label` (a target or a branch).
    pub fn find(&self, label: &str) -> Option<NodeId> {
        self.by_label.get(label).copied()
    }

    /// The values of a map whose variables are all known now.
    fn static_values(&self, t: &TargetDef) -> Result<Vec<(String, Vec<String>)>, FileError> {
        let mut out = Vec::new();
        let root = &self.file.root;
        for (var, values) in &t.map {
            let list = match values {
                MapValues::List(l) => l.clone(),
                MapValues::Glob(pattern) => {
                    let (found, _) = crew_core::staging::expand_outputs(root, std::slice::from_ref(pattern))
                        .map_err(|e| self.target_error(t, format!("map {var} = {pattern:?}: {e}")))?;
                    found
                }
                MapValues::Lines(file) => {
                    let text = std::fs::read_to_string(root.join(file)).map_err(|e| {
                        self.target_error(
                            t,
                            format!("map {var}: cannot read {file}: {e} (it is neither a file here nor another target's output)"),
                        )
                    })?;
                    lines_of(&text)
                }
            };
            if list.is_empty() {
                let what = match values {
                    MapValues::Glob(p) => format!("no file matches {p:?}"),
                    MapValues::Lines(f) => format!("{f} has no non-empty line"),
                    MapValues::List(_) => "the list is empty".into(),
                };
                return Err(self.target_error(t, format!("map variable {var} has no values: {what}")));
            }
            out.push((var.clone(), list));
        }
        Ok(out)
    }

    fn target_error(&self, t: &TargetDef, message: String) -> FileError {
        FileError { loc: t.loc.clone(), message: format!("target {}: {message}", t.name) }
    }

    /// Adds the branches of group `group` for `values` (every variable of
    /// its map, each with its values): the cross product, in order.
    fn add_branches(&mut self, group: NodeId, values: &[(String, Vec<String>)]) -> Result<Vec<NodeId>, String> {
        let NodeKind::Group { target, .. } = self.nodes[group].kind else {
            return Err("not a mapped target".into());
        };
        let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for (var, list) in values {
            if list.is_empty() {
                return Err(format!("map variable {var} has no values"));
            }
            let mut next = Vec::with_capacity(combos.len() * list.len());
            for c in &combos {
                for v in list {
                    if v.is_empty() || v.chars().any(char::is_control) {
                        return Err(format!("map variable {var}: value {v:?} is empty or has a control character"));
                    }
                    let mut c = c.clone();
                    c.insert(var.clone(), v.clone());
                    next.push(c);
                }
            }
            combos = next;
        }
        let mut seen = std::collections::HashSet::new();
        let mut ids = Vec::with_capacity(combos.len());
        for branch in combos {
            let id = self.push_job(target, branch);
            if !seen.insert(self.nodes[id].label.clone()) {
                return Err(format!(
                    "two branches are both named {}: map values must be distinct",
                    self.nodes[id].label
                ));
            }
            ids.push(id);
        }
        self.nodes[group].deps.extend(ids.iter().copied());
        if let NodeKind::Group { expanded, .. } = &mut self.nodes[group].kind {
            *expanded = true;
        }
        Ok(ids)
    }

    fn register_outputs(&mut self, id: NodeId) -> Result<(), FileError> {
        let NodeKind::Job(job) = &self.nodes[id].kind else { return Ok(()) };
        for o in job.outputs.clone() {
            if has_wildcard(&o) {
                continue;
            }
            if let Some(&other) = self.producers.get(&o) {
                if other != id {
                    return Err(self.error(
                        id,
                        format!(
                            "output {o} is also declared by target {}: every file has one producer; rename one of them",
                            self.nodes[other].label
                        ),
                    ));
                }
            }
            self.producers.insert(o, id);
        }
        Ok(())
    }

    /// The group nodes of dynamic targets not expanded yet whose output
    /// templates could write `path`.
    fn dynamic_writers(&self, path: &str) -> Vec<NodeId> {
        let probe = template_parts(path, &[]);
        let mut out = Vec::new();
        for (ti, t) in self.file.targets.iter().enumerate() {
            let group = self.target_node[ti];
            if !matches!(self.nodes[group].kind, NodeKind::Group { expanded: false, .. }) {
                continue;
            }
            let vars: Vec<String> = t.map.iter().map(|(v, _)| v.clone()).collect();
            if t.outputs.iter().any(|o| could_match(&template_parts(o, &vars), &probe)) {
                out.push(group);
            }
        }
        out
    }

    /// Sets the dependencies of node `id`.
    fn link(&mut self, id: NodeId, names: &HashMap<String, usize>) -> Result<(), FileError> {
        let ti = self.target_of(id);
        let t = self.file.targets[ti].clone();
        let mut deps = self.nodes[id].deps.clone();
        let mut after = Vec::new();
        let lookup = |name: &str, what: &str| -> Result<NodeId, FileError> {
            names.get(name).map(|&i| self.target_node[i]).ok_or_else(|| {
                let mut known: Vec<&str> = names.keys().map(String::as_str).collect();
                known.sort_unstable();
                self.error(
                    id,
                    format!("{what} names target {name:?}, which does not exist (targets: {})", known.join(", ")),
                )
            })
        };
        for a in &t.after {
            let n = lookup(a, "after")?;
            deps.push(n);
            after.push(n);
        }
        match self.nodes[id].kind.clone() {
            NodeKind::Group { expanded: true, .. } => {}
            NodeKind::Group { expanded: false, .. } => {
                // A dynamic map waits for whatever can write its lines file
                // and its inputs, and for the targets it reads whole.
                let vars: Vec<String> = t.map.iter().map(|(v, _)| v.clone()).collect();
                for (_, values) in &t.map {
                    if let MapValues::Lines(f) = values {
                        deps.extend(self.writers_of_template(&template_parts(f, &[]), Some(id)));
                    }
                }
                for input in &t.inputs {
                    match input {
                        InputDef::Path(p) => deps.extend(self.writers_of_template(&template_parts(p, &vars), Some(id))),
                        InputDef::Target(name) => deps.push(lookup(name, "an input")?),
                    }
                }
            }
            NodeKind::Job(job) => {
                let mut inputs = Vec::with_capacity(job.inputs.len());
                for (name, input) in job.inputs.iter().cloned() {
                    let JobInput::Source(path) = input else {
                        inputs.push((name, input));
                        continue;
                    };
                    if let Some(&p) = self.producers.get(&path) {
                        deps.push(p);
                        inputs.push((name, JobInput::Output(path)));
                        continue;
                    }
                    let dynamic = self.dynamic_writers(&path);
                    if !dynamic.is_empty() {
                        deps.extend(dynamic);
                        inputs.push((name, JobInput::Output(path)));
                        continue;
                    }
                    if has_wildcard(&path) {
                        return Err(self.error(
                            id,
                            format!("input {path:?} is a pattern; name files, or use {{ target = \"NAME\" }} for all outputs of a target"),
                        ));
                    }
                    if !self.file.root.join(&path).is_file() {
                        return Err(self.error(
                            id,
                            format!("input {path} is neither a file in {} nor an output of a target: create it, or declare the target that writes it", display_root(&self.file.root)),
                        ));
                    }
                    inputs.push((name, JobInput::Source(path)));
                }
                for input in &t.inputs {
                    if let InputDef::Target(name) = input {
                        let n = lookup(name, "an input")?;
                        deps.push(n);
                        inputs.push((format!("{{target={name}}}"), JobInput::Node(n)));
                    }
                }
                if let NodeKind::Job(j) = &mut self.nodes[id].kind {
                    std::sync::Arc::make_mut(j).inputs = inputs;
                }
            }
        }
        deps.sort_unstable();
        deps.dedup();
        if deps.contains(&id) {
            return Err(self.error(id, format!("it depends on itself (cycle: {0} -> {0})", self.nodes[id].label)));
        }
        self.nodes[id].deps = deps;
        self.nodes[id].after = after;
        Ok(())
    }

    /// Nodes that write or could write files matching `template`.
    fn writers_of_template(&self, template: &[Option<String>], except: Option<NodeId>) -> Vec<NodeId> {
        let mut out = Vec::new();
        for (path, &node) in &self.producers {
            if Some(node) != except && could_match(template, &template_parts(path, &[])) {
                out.push(node);
            }
        }
        for (ti, t) in self.file.targets.iter().enumerate() {
            let group = self.target_node[ti];
            if Some(group) == except || !matches!(self.nodes[group].kind, NodeKind::Group { expanded: false, .. }) {
                continue;
            }
            let vars: Vec<String> = t.map.iter().map(|(v, _)| v.clone()).collect();
            if t.outputs.iter().any(|o| could_match(&template_parts(o, &vars), template)) {
                out.push(group);
            }
        }
        out
    }

    fn check_cycles(&self) -> Result<(), FileError> {
        // Iterative depth-first search; 0 new, 1 on the path, 2 done.
        let mut state = vec![0u8; self.nodes.len()];
        for start in 0..self.nodes.len() {
            if state[start] != 0 {
                continue;
            }
            let mut stack: Vec<(NodeId, usize)> = vec![(start, 0)];
            state[start] = 1;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if let Some(&dep) = self.nodes[node].deps.get(*next) {
                    *next += 1;
                    match state[dep] {
                        0 => {
                            state[dep] = 1;
                            stack.push((dep, 0));
                        }
                        1 => {
                            let from = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                            let mut path: Vec<&str> =
                                stack[from..].iter().map(|(n, _)| self.nodes[*n].label.as_str()).collect();
                            path.reverse();
                            path.insert(0, &self.nodes[dep].label);
                            path.reverse();
                            return Err(self.error(
                                dep,
                                format!(
                                    "dependency cycle: {} (each needs the next; break it by removing an input or an after)",
                                    path.join(" -> ")
                                ),
                            ));
                        }
                        _ => {}
                    }
                } else {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
        Ok(())
    }

    /// Expands dynamic group `group` with the values of its map variables
    /// that read files (`lines`: file → its text) and returns the new
    /// branch nodes, dependencies set.
    ///
    /// # Errors
    /// A map without values, duplicate outputs, a missing source file.
    pub fn expand(&mut self, group: NodeId, lines: &HashMap<String, String>) -> Result<Vec<NodeId>, String> {
        let t = self.def(group).clone();
        let mut values = Vec::new();
        for (var, v) in &t.map {
            let list = match v {
                MapValues::List(l) => l.clone(),
                MapValues::Glob(_) => {
                    self.static_values(&TargetDef { map: vec![(var.clone(), v.clone())], ..(*t).clone() })
                        .map_err(|e| e.message)?
                        .remove(0)
                        .1
                }
                MapValues::Lines(f) => {
                    let text = lines.get(f).ok_or_else(|| format!("the values file {f} was not read"))?;
                    let l = lines_of(text);
                    if l.is_empty() {
                        return Err(format!("map variable {var} has no values: {f} has no non-empty line"));
                    }
                    l
                }
            };
            values.push((var.clone(), list));
        }
        let ids = self.add_branches(group, &values)?;
        let names: HashMap<String, usize> =
            self.file.targets.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        for &id in &ids {
            self.register_outputs(id).map_err(|e| e.message)?;
        }
        for &id in &ids {
            self.link(id, &names).map_err(|e| e.message)?;
        }
        Ok(ids)
    }

    /// Every node needed to build `wanted` (and `wanted` themselves), as a
    /// mask over node ids.
    pub fn closure(&self, wanted: &[NodeId]) -> Vec<bool> {
        let mut mask = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = wanted.to_vec();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut mask[n], true) {
                continue;
            }
            stack.extend(self.nodes[n].deps.iter().copied());
        }
        mask
    }

    /// The nodes of the targets themselves (plain targets and groups): what
    /// `crew make` builds without target names.
    pub fn all_targets(&self) -> Vec<NodeId> {
        self.target_node.clone()
    }
}

fn writes(t: &TargetDef, file: &str) -> bool {
    let vars: Vec<String> = t.map.iter().map(|(v, _)| v.clone()).collect();
    t.outputs.iter().any(|o| could_match(&template_parts(o, &vars), &template_parts(file, &[])))
}

fn display_root(root: &Path) -> String {
    if root == Path::new(".") { "the pipeline's folder".into() } else { root.display().to_string() }
}

/// The values of a lines map: every line, trimmed, that is not empty.
pub fn lines_of(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// Where a node is declared.
pub fn loc_of(plan: &Plan, id: NodeId) -> &Loc {
    &plan.def(id).loc
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::file::parse;

    fn plan(text: &str, root: &Path) -> Result<Plan, FileError> {
        Plan::new(parse("pipeline.toml", text, root.to_path_buf())?)
    }

    #[test]
    fn templates_overlap() {
        let v = vec!["s".to_owned()];
        assert!(could_match(&template_parts("fit_{s}.rds", &v), &template_parts("fit_a.rds", &[])));
        assert!(!could_match(&template_parts("fit_{s}.rds", &v), &template_parts("fit_a.csv", &[])));
        assert!(could_match(&template_parts("a{s}", &v), &template_parts("{s}b", &v)));
        assert!(!could_match(&template_parts("a{s}", &v), &template_parts("b{s}", &v)));
    }

    #[test]
    fn dependencies_cycles_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.csv"), "1\n").unwrap();
        let p = plan(
            "[targets.raw]\ncommand = \"x\"\noutputs = [\"raw.txt\"]\n[targets.total]\ncommand = \"y\"\ninputs = [\"raw.txt\", \"data.csv\"]\noutputs = [\"t\"]\n",
            dir.path(),
        )
        .unwrap();
        let total = p.find("total").unwrap();
        assert_eq!(p.nodes[total].deps, vec![p.find("raw").unwrap()]);

        let e = plan("[targets.a]\ncommand = \"x\"\ninputs = [\"b\"]\noutputs = [\"a\"]\n[targets.b]\ncommand = \"y\"\ninputs = [\"a\"]\noutputs = [\"b\"]\n", dir.path()).unwrap_err();
        assert!(e.message.contains("cycle: a -> b -> a") || e.message.contains("cycle: b -> a -> b"), "{e}");
        let e = plan(
            "[targets.a]\ncommand = \"x\"\noutputs = [\"o\"]\n[targets.b]\ncommand = \"y\"\noutputs = [\"o\"]\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(e.message.contains("also declared"), "{e}");
        let e = plan("[targets.a]\ncommand = \"x\"\nafter = [\"nope\"]\n", dir.path()).unwrap_err();
        assert!(e.message.contains("\"nope\", which does not exist"), "{e}");
        let e = plan("[targets.a]\ncommand = \"x\"\ninputs = [\"missing.csv\"]\n", dir.path()).unwrap_err();
        assert!(e.message.contains("missing.csv is neither a file"), "{e}");
        assert_eq!(e.loc.line, 1);
        let e = plan("[targets.a]\ncommand = \"x\"\nmap = { f = \"none/*.csv\" }\n", dir.path()).unwrap_err();
        assert!(e.message.contains("no values"), "{e}");
    }

    #[test]
    fn static_and_dynamic_maps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/a.csv"), "1\n").unwrap();
        std::fs::write(dir.path().join("data/b.csv"), "2\n").unwrap();
        let text = r#"
[targets.list]
command = "printf 'x\ny\n' > list.txt"
outputs = ["list.txt"]
[targets.clean]
command = "cp {file} {file}.clean"
map = { file = "data/*.csv" }
inputs = ["{file}"]
outputs = ["{file}.clean"]
[targets.dyn]
command = "echo {v} > d_{v}"
map = { v = { lines = "list.txt" } }
outputs = ["d_{v}"]
[targets.use]
command = "cat d_x > u"
inputs = ["d_x", { target = "clean" }]
outputs = ["u"]
"#;
        let mut p = plan(text, dir.path()).unwrap();
        let clean = p.find("clean").unwrap();
        assert_eq!(p.nodes[clean].deps.len(), 2);
        assert!(p.find("clean[data/a.csv]").is_some());
        let dynamic = p.find("dyn").unwrap();
        assert_eq!(p.nodes[dynamic].deps, vec![p.find("list").unwrap()]);
        let user = p.find("use").unwrap();
        assert!(p.nodes[user].deps.contains(&dynamic) && p.nodes[user].deps.contains(&clean));
        let lines = HashMap::from([("list.txt".to_owned(), "x\n\ny\n".to_owned())]);
        let ids = p.expand(dynamic, &lines).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(p.nodes[ids[0]].label, "dyn[x]");
        assert_eq!(p.producers.get("d_y"), Some(&ids[1]));
        let _ = PathBuf::new();
    }
}
