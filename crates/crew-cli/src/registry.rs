//! The classes compiled into this binary, selected by name at run time.

use std::sync::Arc;

use crew_core::worker::Worker;

/// A class constructor.
type Make = fn() -> Arc<dyn Worker>;

/// Known classes, by name.
pub(crate) struct Registry {
    classes: Vec<(&'static str, Make)>,
}

impl Registry {
    /// The classes of the stock `crew` binary.
    pub(crate) fn stock() -> Self {
        Self { classes: vec![(crew_worker_local::CLASS, || Arc::new(crew_worker_local::LocalWorker::new()))] }
    }

    /// The class called `name`, or an error that lists the known ones.
    pub(crate) fn get(&self, name: &str) -> anyhow::Result<Arc<dyn Worker>> {
        match self.classes.iter().find(|(n, _)| *n == name) {
            Some((_, make)) => Ok(make()),
            None => {
                let known: Vec<&str> = self.classes.iter().map(|(n, _)| *n).collect();
                anyhow::bail!("unknown worker class {name:?}; known classes: {}", known.join(", "))
            }
        }
    }
}
