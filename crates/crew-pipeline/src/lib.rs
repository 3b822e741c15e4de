//! crew pipelines: a DAG of targets run as crew jobs, up to date by
//! declared content alone, cached in a crew store.
//!
//! A pipeline file ([`file`]) declares targets: a command, its inputs and
//! outputs, its declared environment. [`plan`] turns it into a graph
//! (dependencies from inputs that are other targets' outputs, `after`, and
//! branches of mapped targets). [`build`] walks the graph: a target whose
//! [`record::Identity`] — command, declared env, inputs by content, output
//! patterns, seed, upstream identities for `after` — matches its
//! [`record::Record`] in the store, and whose outputs are in the store, is
//! up to date; the others run as crew jobs through an [`build::Executor`]
//! (an in-process controller, or a daemon), and their outputs are copied
//! into the working tree.
//!
//! The one design choice that matters most: **nothing but what a target
//! declares counts.** The environment of the process that runs `crew make`,
//! its current folder, the machine and the worker class never reach an
//! identity, and a job sees only its declared environment (plus a small
//! base, see `crew_exec`). A second checkout pointed at the same
//! store finds the same targets up to date.

pub mod build;
pub mod file;
pub mod graph;
pub mod hashes;
pub mod index;
pub mod memo;
pub mod plan;
pub mod record;

pub use build::{Event, Executor, Options, Report, State, build};
pub use file::{FileError, PipelineFile, load};
pub use plan::Plan;
