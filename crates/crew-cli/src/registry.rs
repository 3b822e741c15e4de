//! The classes and store backends compiled into this binary, selected at
//! run time: classes by name, stores by URL scheme.
//!
//! One instance per class per process: a class instance tracks the agents
//! it started (the local class reaps and signals its own children), so every
//! recruit of a class in a daemon shares it. Store schemes go into
//! crew-core's process registry ([`register_stores`]), the one agents use to
//! open the store URL their controller sends.

use std::sync::{Arc, OnceLock};

use crew_core::store::StoreError;
use crew_core::worker::Worker;

use crate::Failure;

/// Registers the store backends of this binary beyond crew-core's `file`:
/// `s3`. Called once, first thing in `main`.
pub(crate) fn register_stores() {
    crew_store_s3::S3Store::register();
}

/// The failure of a store that did not pass [`crew_core::store::Store::check`]:
/// a configuration mistake (bad URL, missing bucket, no region) is bad input
/// (exit 2), anything else (unreachable, refused credentials) a failure to
/// start (exit 3).
pub(crate) fn store_failure(url: &str, error: StoreError) -> Failure {
    let usage = matches!(error, StoreError::Config(_) | StoreError::InvalidKey { .. });
    let error = anyhow::Error::new(error).context(format!("the store {url} is not usable"));
    if usage { Failure::usage(error) } else { Failure::internal(error) }
}

/// A class constructor.
type Make = fn() -> Arc<dyn Worker>;

/// A class's name, constructor, and its one instance once built.
type Entry = (&'static str, Make, OnceLock<Arc<dyn Worker>>);

/// Known classes, by name, each built once on first use.
pub(crate) struct Registry {
    classes: Vec<Entry>,
}

impl Registry {
    /// The classes of the stock `crew` binary.
    pub(crate) fn stock() -> &'static Self {
        static STOCK: OnceLock<Registry> = OnceLock::new();
        STOCK.get_or_init(|| Self {
            classes: vec![
                (crew_worker_local::CLASS, || Arc::new(crew_worker_local::LocalWorker::new()), OnceLock::new()),
                (crew_worker_aws::CLASS, || Arc::new(crew_worker_aws::AwsBatchWorker::new()), OnceLock::new()),
            ],
        })
    }

    /// The class called `name`, or an error that lists the known ones.
    pub(crate) fn get(&self, name: &str) -> anyhow::Result<Arc<dyn Worker>> {
        match self.classes.iter().find(|(n, _, _)| *n == name) {
            Some((_, make, instance)) => Ok(instance.get_or_init(make).clone()),
            None => {
                let known: Vec<&str> = self.classes.iter().map(|(n, _, _)| *n).collect();
                anyhow::bail!("unknown worker class {name:?}; known classes: {}", known.join(", "))
            }
        }
    }
}
