//! The classes and store backends of this binary, selected at run time:
//! classes by name (compiled in, added by an embedder with
//! [`crate::App::with_class`], or a `crew-worker-NAME` plugin on `PATH`),
//! stores by URL scheme.
//!
//! One instance per class per process: a class instance tracks the agents
//! it started (the local class reaps and signals its own children), so every
//! recruit of a class in a daemon shares it. Store schemes go into
//! crew-core's process registry ([`register_stores`]), the one agents use to
//! open the store URL their controller sends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crew_core::store::StoreError;
use crew_core::worker::Worker;

use crate::Failure;
use crate::plugin::PluginWorker;

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

/// Why `--class NAME` has no class.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClassError {
    /// Neither built in nor on `PATH`: bad input.
    #[error(
        "unknown worker class {name:?}: not compiled in, and no executable {prefix}{name} on PATH; known classes: {known} (install a class's plugin on PATH; `crew classes` lists them)",
        prefix = crew_core::plugin::PLUGIN_PREFIX
    )]
    Unknown { name: String, known: String },
    /// Its plugin is there but does not work (it crashed, hung, or spoke
    /// something else than the protocol): crew could not start the class.
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
}

impl ClassError {
    /// The exit status: 2 for a class that does not exist, 3 for a plugin
    /// that failed.
    pub(crate) fn failure(self) -> Failure {
        match self {
            ClassError::Unknown { .. } => Failure::usage(self),
            ClassError::Plugin(_) => Failure::internal(self),
        }
    }
}

/// A built-in class constructor.
type Make = fn() -> Arc<dyn Worker>;

/// A class's name, constructor, and its one instance once built.
type Entry = (String, Make, OnceLock<Arc<dyn Worker>>);

/// Known classes, by name, each built once on first use; PATH plugins
/// started on first use (and by themselves again if they die).
pub(crate) struct Registry {
    classes: Vec<Entry>,
    /// Classes an embedder added ([`crate::App::with_class`]).
    added: Vec<Arc<dyn Worker>>,
    plugins: Mutex<HashMap<String, Arc<PluginWorker>>>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Makes the process's registry the stock classes plus `added` (first
/// thing in [`crate::App::run`]; a second call changes nothing).
pub(crate) fn install(added: Vec<Arc<dyn Worker>>) {
    let _ = REGISTRY.set(Registry::new(added));
}

impl Registry {
    fn new(added: Vec<Arc<dyn Worker>>) -> Self {
        let stock: Vec<(&str, Make)> = vec![
            (crew_worker_local::CLASS, || Arc::new(crew_worker_local::LocalWorker::new())),
            (crew_worker_aws::CLASS, || Arc::new(crew_worker_aws::AwsBatchWorker::new())),
            (crew_worker_slurm::CLASS, || Arc::new(crew_worker_slurm::SlurmWorker::new())),
        ];
        let classes = stock
            .into_iter()
            .filter(|(n, _)| !added.iter().any(|a| a.class() == *n))
            .map(|(n, make)| (n.to_owned(), make, OnceLock::new()))
            .collect();
        Self { classes, added, plugins: Mutex::new(HashMap::new()) }
    }

    /// The process's classes ([`install`]ed, else the stock ones).
    pub(crate) fn stock() -> &'static Self {
        REGISTRY.get_or_init(|| Registry::new(Vec::new()))
    }

    /// The names of the classes compiled in: the built-in ones, then
    /// those added, each once.
    pub(crate) fn compiled_in(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for n in self.classes.iter().map(|(n, _, _)| n.as_str()).chain(self.added.iter().map(|c| c.class())) {
            if !names.iter().any(|m| m == n) {
                names.push(n.to_owned());
            }
        }
        names
    }

    /// The class called `name`: compiled in, else the plugin
    /// `crew-worker-NAME` on `PATH` (started, and its handshake done, on
    /// first use; a failed first start is tried again at the next use).
    pub(crate) fn get(&self, name: &str) -> Result<Arc<dyn Worker>, ClassError> {
        if let Some(c) = self.added.iter().find(|c| c.class() == name) {
            return Ok(c.clone());
        }
        if let Some((_, make, instance)) = self.classes.iter().find(|(n, _, _)| n == name) {
            return Ok(instance.get_or_init(make).clone());
        }
        let Some(path) = crate::plugin::find_on_path(name) else {
            return Err(ClassError::Unknown { name: name.to_owned(), known: self.compiled_in().join(", ") });
        };
        // One plugin process per class; the lock is held over the handshake
        // so that two first uses do not start two.
        let mut plugins = self.plugins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A cached one starts its process again by itself if it died.
        if let Some(p) = plugins.get(name) {
            return Ok(p.clone());
        }
        let plugin = Arc::new(PluginWorker::start(name, &path)?);
        plugins.insert(name.to_owned(), plugin.clone());
        Ok(plugin)
    }
}
