//! The graph as text: Graphviz `dot` or Mermaid, each node with its state.

use std::fmt::Write;

use crate::build::State;
use crate::plan::{NodeKind, Plan};

/// The output formats of `crew graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Graphviz.
    Dot,
    /// Mermaid (`flowchart LR`).
    Mermaid,
}

fn colour(state: &State) -> &'static str {
    match state {
        State::UpToDate | State::Built => "palegreen",
        State::Outdated { .. } => "lightgoldenrod",
        State::Failed { .. } => "salmon",
        _ => "lightgrey",
    }
}

/// Renders `plan` with each node's state (`states` in node order).
pub fn render(plan: &Plan, states: &[State], format: Format) -> String {
    let mut out = String::new();
    let state = |i: usize| states.get(i).cloned().unwrap_or(State::Pending);
    match format {
        Format::Dot => {
            out.push_str("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, style=filled];\n");
            for (i, n) in plan.nodes.iter().enumerate() {
                let s = state(i);
                let shape = if matches!(n.kind, NodeKind::Group { .. }) { ", shape=box3d" } else { "" };
                let _ = writeln!(
                    out,
                    "  n{i} [label=\"{}\\n{}\", fillcolor={}{shape}];",
                    n.label.replace('"', "\\\""),
                    s.name(),
                    colour(&s)
                );
            }
            for (i, n) in plan.nodes.iter().enumerate() {
                for d in &n.deps {
                    let _ = writeln!(out, "  n{d} -> n{i};");
                }
            }
            out.push_str("}\n");
        }
        Format::Mermaid => {
            out.push_str("flowchart LR\n");
            for (i, n) in plan.nodes.iter().enumerate() {
                let s = state(i);
                let _ = writeln!(out, "  n{i}[\"{}<br/>{}\"]:::{}", n.label.replace('"', "#quot;"), s.name(), s.name());
            }
            for (i, n) in plan.nodes.iter().enumerate() {
                for d in &n.deps {
                    let _ = writeln!(out, "  n{d} --> n{i}");
                }
            }
            out.push_str("  classDef up_to_date fill:#9f9\n  classDef built fill:#9f9\n  classDef outdated fill:#fd8\n  classDef failed fill:#f99\n");
        }
    }
    out
}
