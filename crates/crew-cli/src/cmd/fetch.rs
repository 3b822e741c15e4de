//! `crew fetch`: a finished job's outputs, from the store to a folder.
//!
//! The bytes come from the store, never through the daemon: with `--store`
//! the job's manifest (`jobs/<id>/<attempt>/manifest.json`, highest attempt;
//! by name, the manifests' `name`, the highest id of that name) says what to
//! fetch, which works for `crew run` results from any machine;
//! without it, the project's daemon gives the output record and its store's
//! URL (`GET /v1/jobs/{job}/objects`). Every file is checked (size and
//! SHA-256) before it appears under its name.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use crew_core::JobId;
use crew_core::staging::{self, StoredObject};
use crew_core::store::{Store, StoreKey};
use serde::Serialize;

use super::{Ctx, api, print_json};
use crate::{EXIT_OK, Failure};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  crew fetch 17 --to results/\n  crew fetch fit-1\n  \
crew fetch --store .crew/store 3 --to out/   (a `crew run` job, no daemon)\n\n\
Exit status: 0 every file fetched; 2 unknown job, a job without outputs, or a store that cannot work \
(malformed URL, missing bucket, no or wrong region); 3 the store is unreachable or refused the credentials, \
or a transfer or checksum failed.")]
pub(crate) struct FetchArgs {
    /// The job: its id (a number), or its name (the last job so named).
    #[arg(value_name = "JOB")]
    job: String,
    /// The folder to put the files in (relative paths kept; default: here).
    #[arg(long, value_name = "DIR", default_value = ".")]
    to: PathBuf,
    /// Read the job's manifest from this store (a folder or URL) instead of
    /// asking the project's daemon.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Print one JSON line per file fetched: name, key, size, sha256, path.
    #[arg(long)]
    json: bool,
}

use crate::wire::Objects;

#[derive(Serialize)]
struct Fetched<'a> {
    name: &'a str,
    key: &'a str,
    size: u64,
    sha256: &'a str,
    path: String,
}

pub(crate) fn fetch(ctx: &Ctx, args: FetchArgs) -> Result<u8, Failure> {
    let (daemon_id, url, objects) = match &args.store {
        Some(url) => (None, url.clone(), None),
        None => {
            let job = crew_core::percent::encode_component(&args.job);
            let answer: Objects = ctx.client()?.get(&format!("/v1/jobs/{job}/objects")).map_err(api)?;
            (Some(answer.id), answer.store, Some(answer.objects))
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::internal)?;
    rt.block_on(async {
        let store = crew_core::store::open_store(&url)
            .map_err(|e| Failure::usage(anyhow!("cannot open the store {url:?}: {e}")))?;
        let (id, objects) = match (daemon_id, objects) {
            (Some(id), Some(o)) => (id, o),
            _ => {
                let m = manifest_of(store.as_ref(), &url, &args.job).await?;
                (m.id.0, m.objects)
            }
        };
        if objects.is_empty() {
            return Err(Failure::usage(anyhow!("job {id} has no outputs in the store")));
        }
        std::fs::create_dir_all(&args.to)
            .map_err(|e| Failure::internal(anyhow!("cannot create {}: {e}", args.to.display())))?;
        for object in &objects {
            let path = fetch_one(store.as_ref(), &args.to, object).await?;
            if args.json {
                print_json(&Fetched {
                    name: &object.name,
                    key: &object.key,
                    size: object.size,
                    sha256: &object.sha256,
                    path: path.display().to_string(),
                })?;
            }
        }
        if !args.json {
            eprintln!("crew: fetched {} file(s) of job {id} into {}", objects.len(), args.to.display());
        }
        Ok(EXIT_OK)
    })
}

/// The latest manifest of `job` (an id when it is a number, else a name)
/// in the store at `url`. A store that cannot work fails as it fails
/// `crew run` (exit 2 for a configuration mistake, 3 otherwise).
async fn manifest_of(store: &dyn Store, url: &str, job: &str) -> Result<staging::Manifest, Failure> {
    let found = match job.parse::<u64>() {
        Ok(id) => staging::latest_manifest(store, JobId(id)).await,
        Err(_) => staging::latest_manifest_named(store, job).await,
    };
    match found {
        Ok(Some(m)) => Ok(m),
        Ok(None) => {
            let what = if job.parse::<u64>().is_ok() { format!("job {job}") } else { format!("no job named {job:?}") };
            Err(Failure::usage(anyhow!(if what.starts_with("no ") {
                format!(
                    "{what} has a manifest in the store {url} (unknown name, not finished, declared no outputs, \
                     or written by a crew that did not record names: use the job's id)"
                )
            } else {
                format!(
                    "{what} has no manifest in the store {url} (unknown job, not finished, or it declared no outputs)"
                )
            })))
        }
        Err(staging::StageError::Store(e)) => Err(crate::registry::store_failure(url, e)),
        Err(e) => Err(Failure::internal(anyhow!("cannot read the manifest of job {job}: {e}"))),
    }
}

/// Downloads one object to `dir/name`, verified; refuses a name that would
/// leave `dir`.
async fn fetch_one(store: &dyn Store, dir: &std::path::Path, object: &StoredObject) -> Result<PathBuf, Failure> {
    let dest = staging::prepare_dest(dir, &object.name)
        .map_err(|e| Failure::usage(anyhow!("refusing output {:?}: {e}", object.name)))?;
    let key = StoreKey::new(object.key.as_str())
        .map_err(|e| Failure::usage(anyhow!("refusing output {:?}: {e}", object.name)))?;
    staging::download_verified(store, &key, &object.sha256, object.size, &dest)
        .await
        .map_err(|e| Failure::internal(anyhow!("cannot fetch {}: {e}", object.name)))?;
    Ok(dest)
}
