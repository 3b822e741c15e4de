//! The conformance kits: the public test suites every crew backend runs
//! against itself.
//!
//! - [`worker()`]: what every `Worker` class must do, checked end to end
//!   through a real controller and real agents (this crate's own code);
//! - [`store()`]: what every `Store` must do (crew-core's kit, behind its
//!   `conformance` feature, re-exported here).
//!
//! A backend crate adds this crate to its `[dev-dependencies]` and calls
//! one function per trait from a test; each panics with a message naming
//! the broken rule, like a failed assertion.

pub mod worker;

pub use crew_core::conformance::store;
pub use worker::{WorkerKit, worker};
