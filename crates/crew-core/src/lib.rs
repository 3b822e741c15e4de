//! crew-core: the model and the contracts of crew.
//!
//! crew runs jobs on heterogeneous, semi-persistent workers from one central
//! controller. This crate is what a backend author depends on — no
//! controller, no agent, no TLS, no journal:
//!
//! - the job model ([`job`]), output records ([`output`]), [`tags`] and
//!   [`seed`]s;
//! - the plugin contracts: [`worker::Worker`] (a backend class) and
//!   [`store::Store`] (where job data lives), with the local store;
//! - the wire [`protocol`] between controller and agents, and the [`plugin`]
//!   protocol between crew and a class on `PATH` (`crew-worker-NAME`);
//! - [`staging`]: job inputs and outputs through the store (content
//!   addressing, verified transfers);
//! - behind the `conformance` feature, the store conformance kit (the
//!   worker kit, which needs a controller, is the `crew-conformance`
//!   crate).
//!
//! The roles are crates of their own: `crew-scheduler` (the sans-I/O
//! scheduler), `crew-controller` (the async loop, worker sessions, the
//! journal), `crew-agent` (the worker-side loop), `crew-exec` (running one
//! job: processes, builtins, limits, the warden) and `crew-tls`. See
//! ARCHITECTURE.md at the repository root for the map and the glossary.

pub mod clock;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod job;
pub mod output;
pub mod percent;
pub mod plugin;
pub mod protocol;
pub mod seed;
pub mod staging;
pub mod store;
pub mod tags;
pub mod worker;

pub use job::{Command, JobId, JobLineRef, JobOptions, JobSpec};
pub use output::{Output, Status};
pub use tags::Tags;
