//! What the store holds for a pipeline, known cheaply: the records (their
//! hashes and outputs) and the keys of the build objects.
//!
//! Listing a store of 10,000 records and reading each one would make a
//! no-op `crew make` slow, so the index is cached in
//! `.crew/pipeline/index.json`, validated by one small object,
//! `pipeline/generation`, that every writer of records (`crew make`,
//! `crew clean`, `crew gc`) rewrites with a random value before its first
//! change and again after its last. A reader whose cache was made at the
//! generation the store still has uses it without listing; any other
//! generation (or none) means a listing, which reads again only the records
//! whose tag (size and ETag) changed. A writer that sees another writer's
//! generation at its end saves no generation, so that its next run lists.
//! The worst a race can do is a cache that misses a record written
//! concurrently: that target is built again, never wrongly kept.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use bytes::Bytes;
use crew_core::output::StoredObject;
use crew_core::staging;
use crew_core::store::{Store, StoreError, StoreKey};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::build::BuildError;
use crate::record::{OBJECTS_PREFIX, RECORDS_PREFIX, Record};

/// The key of the generation object.
pub const GENERATION_KEY: &str = "pipeline/generation";

/// Largest record read back.
const RECORD_MAX: usize = 16 * 1024 * 1024;

/// What the index keeps of a record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The record's store key.
    pub key: String,
    /// The record's size and ETag when read.
    pub tag: String,
    /// The identity hash.
    pub hash: String,
    /// The outputs.
    pub outputs: Vec<StoredObject>,
}

#[derive(Default, Serialize, Deserialize)]
struct Cache {
    generation: Option<String>,
    /// Label → summary.
    records: HashMap<String, Summary>,
    objects: Vec<String>,
}

/// The records and object keys of a store.
#[derive(Debug, Default)]
pub struct StoreIndex {
    /// Label → summary of its record.
    pub records: HashMap<String, Summary>,
    /// Keys under `pipeline/objects/`.
    pub objects: HashSet<String>,
    /// The generation seen when the index was loaded.
    seen: Option<String>,
    /// The generation this process wrote first, once it changes records.
    wrote: Option<String>,
    /// True when the index came from the cache as it is.
    cached: bool,
    cache_file: Option<PathBuf>,
}

fn tag_of(meta: &crew_core::store::ObjectMeta) -> Option<String> {
    meta.e_tag.as_ref().map(|e| format!("{}:{e}", meta.size))
}

pub(crate) async fn generation(store: &dyn Store) -> Result<Option<String>, StoreError> {
    match store.head(&StoreKey::new(GENERATION_KEY)?).await {
        Ok(meta) => Ok(tag_of(&meta)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Rewrites the generation object; its new tag.
pub async fn bump(store: &dyn Store) -> Result<Option<String>, StoreError> {
    let nonce = crate::build::random_name();
    store.put_bytes(&StoreKey::new(GENERATION_KEY)?, Bytes::from(nonce)).await?;
    generation(store).await
}

impl StoreIndex {
    /// Loads the index of `store`, from `cache_file` when the store's
    /// generation allows.
    ///
    /// # Errors
    /// The store failed.
    pub async fn load(store: &dyn Store, cache_file: Option<PathBuf>) -> Result<Self, BuildError> {
        let seen = generation(store).await?;
        let cache: Cache = cache_file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if seen.is_some() && cache.generation == seen {
            return Ok(Self {
                records: cache.records,
                objects: cache.objects.into_iter().collect(),
                seen,
                wrote: None,
                cached: true,
                cache_file,
            });
        }
        // List, reading only the records whose tag changed.
        let mut by_key: HashMap<String, (String, Summary)> =
            cache.records.into_iter().map(|(label, s)| (s.key.clone(), (label, s))).collect();
        let listed = store.list(&StoreKey::new(RECORDS_PREFIX)?).await?;
        let mut records = HashMap::with_capacity(listed.len());
        let mut to_read = Vec::new();
        for meta in listed {
            let tag = tag_of(&meta);
            match by_key.remove(meta.key.as_str()) {
                Some((label, s)) if tag.as_deref() == Some(s.tag.as_str()) => {
                    records.insert(label, s);
                }
                _ => to_read.push((meta.key, tag.unwrap_or_default())),
            }
        }
        let read: Vec<Option<(String, Summary)>> = futures::stream::iter(to_read)
            .map(|(key, tag)| async move {
                Ok::<_, BuildError>(read_record(store, &key).await?.map(|r| {
                    let summary = Summary { key: key.as_str().to_owned(), tag, hash: r.hash, outputs: r.outputs };
                    (r.target, summary)
                }))
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        records.extend(read.into_iter().flatten());
        let objects =
            store.list(&StoreKey::new(OBJECTS_PREFIX)?).await?.into_iter().map(|m| m.key.as_str().to_owned()).collect();
        let index = Self { records, objects, seen, wrote: None, cached: false, cache_file };
        index.save(index.seen.clone());
        Ok(index)
    }

    /// True when this process has written no record.
    pub fn unchanged(&self) -> bool {
        self.wrote.is_none()
    }

    /// The store's generation when the index was loaded.
    pub fn seen(&self) -> Option<&str> {
        self.seen.as_deref()
    }

    /// The whole record of `label` (for `crew why`), from the store.
    ///
    /// # Errors
    /// The store failed.
    pub async fn full_record(&self, store: &dyn Store, label: &str) -> Result<Option<Record>, BuildError> {
        let Some(s) = self.records.get(label) else { return Ok(None) };
        read_record(store, &StoreKey::new(s.key.as_str())?).await
    }

    /// Writes `record` under `key`, the generation first changed if this is
    /// this process's first change.
    ///
    /// # Errors
    /// The store failed.
    pub async fn write(&mut self, store: &dyn Store, key: &StoreKey, record: &Record) -> Result<(), BuildError> {
        if self.wrote.is_none() {
            self.wrote = Some(bump(store).await?.unwrap_or_default());
        }
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| staging::StageError::Invalid(e.to_string()))?;
        let meta = store.put_bytes(key, Bytes::from(bytes)).await?;
        for o in &record.outputs {
            self.objects.insert(o.key.clone());
        }
        self.records.insert(
            record.target.clone(),
            Summary {
                key: key.as_str().to_owned(),
                tag: tag_of(&meta).unwrap_or_default(),
                hash: record.hash.clone(),
                outputs: record.outputs.clone(),
            },
        );
        Ok(())
    }

    /// Ends a run: after changes, the generation is changed again and the
    /// cache saved under it, unless another writer changed it meanwhile.
    pub async fn finish(&mut self, store: &dyn Store) {
        let generation = match &self.wrote {
            // Read from the cache and unchanged: nothing to save.
            None if self.cached => return,
            None => self.seen.clone(),
            Some(first) => match generation(store).await {
                Ok(Some(now)) if &now == first => bump(store).await.ok().flatten(),
                _ => None,
            },
        };
        self.save(generation);
    }

    fn save(&self, generation: Option<String>) {
        let Some(file) = &self.cache_file else { return };
        let cache =
            Cache { generation, records: self.records.clone(), objects: self.objects.iter().cloned().collect() };
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&cache)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            tracing::debug!(file = %file.display(), error = %e, "cannot write the pipeline index cache");
        }
    }
}

/// Reads one record; `None` (with a warning) when it does not parse.
async fn read_record(store: &dyn Store, key: &StoreKey) -> Result<Option<Record>, BuildError> {
    let bytes = match staging::read_small(store, key, RECORD_MAX).await {
        Ok(b) => b,
        Err(staging::StageError::Store(StoreError::NotFound { .. })) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring a record that does not parse (the target will be built again)");
            Ok(None)
        }
    }
}

/// Every record of `store`, read whole (for `crew gc`).
///
/// # Errors
/// The store failed.
pub async fn read_all_records(store: &dyn Store) -> Result<Vec<Record>, BuildError> {
    let listed = store.list(&StoreKey::new(RECORDS_PREFIX)?).await?;
    let read: Vec<Option<Record>> = futures::stream::iter(listed)
        .map(|m| async move { read_record(store, &m.key).await })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    Ok(read.into_iter().flatten().collect())
}
