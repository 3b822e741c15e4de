//! crew-core: the heart of crew.
//!
//! crew runs jobs on heterogeneous, semi-persistent workers from one central
//! controller. This crate holds everything that does not depend on a
//! particular backend:
//!
//! - the job model ([`job`]), output records ([`output`]) and [`tags`];
//! - the plugin traits: [`worker::Worker`] (a backend class) and
//!   [`store::Store`] (where job data lives), with the local store;
//! - the [`scheduler`], a pure state machine (events in, actions out);
//! - the [`controller`], the async loop around the scheduler, and its library
//!   API (`recruit`, `send`, `receive`, ...);
//! - the wire [`protocol`] between controller and agents, and the [`agent`]
//!   that runs on workers ([`exec`] runs one job; [`builtins`] are functions
//!   compiled into the agent);
//! - [`staging`]: job inputs and outputs through the store (content
//!   addressing, verified transfers);
//! - [`tls`]: encrypted agent connections beyond loopback (a pinned,
//!   ephemeral certificate);
//! - behind the `conformance` feature, the test suite every `Worker` and
//!   `Store` implementation runs against itself.
//!
//! See ARCHITECTURE.md at the repository root for the code map and the
//! invariants.

pub mod agent;
pub mod builtins;
pub mod clock;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod controller;
pub mod exec;
pub mod job;
pub mod journal;
pub mod output;
pub mod protocol;
pub mod scheduler;
pub mod seed;
#[cfg(target_os = "linux")]
mod spawn;
pub mod staging;
pub mod store;
pub mod tags;
pub mod tls;
pub mod warden;
pub mod worker;

pub use job::{Command, JobId, JobSpec};
pub use output::{Output, Status};
pub use tags::Tags;
