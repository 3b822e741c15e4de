//! The S3 store of crew: [`S3Store`] implements `crew_core::store::Store`
//! on `object_store`'s AWS backend, with credentials and region from the
//! AWS chain of `aws-config`, as the AWS CLI finds them.
//!
//! # The one big choice
//! `object_store` does the S3 protocol (signing, multipart uploads, retries
//! with backoff, resumed downloads) and is what [`crew_core::store::LocalStore`]
//! is built on, so both stores behave alike; `aws-config` does what
//! `object_store` does not: shared config files with profiles, SSO,
//! `credential_process`, role assumption, and the region chain. The cost is
//! the AWS runtime crates in the build of this crate (and of binaries that
//! link it), which is why this is its own crate and `crew-core` stays free
//! of any cloud SDK.
//!
//! # URLs
//! `s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=P]`: every store key
//! lives under `PREFIX/`. [`Store::url`] writes the resolved region and
//! endpoint into the URL, so that an agent opening it reaches the same
//! bucket; credentials are never part of it.
//!
//! # Memory, retries, integrity
//! Uploads of up to [`PART_SIZE`] go up in one PUT; longer ones as a
//! multipart upload of [`PART_SIZE`] parts with at most
//! [`PARTS_IN_FLIGHT`] parts uploading at once, so one upload holds at most
//! `(PARTS_IN_FLIGHT + 1) × PART_SIZE` (24 MiB) plus one chunk of its
//! source, whatever the object's size. Every request is retried with
//! exponential backoff on throttling, 5xx and dropped connections (PUTs and
//! parts included: their bodies are replayable), within [`RETRY_TIMEOUT`];
//! a part whose retries are exhausted is started again a few times. Every
//! upload carries a SHA-256 checksum that S3 verifies before it accepts the
//! object, so a body corrupted on the way is refused, never stored.

mod credentials;
mod error;
#[cfg(feature = "test-support")]
pub mod testing;
mod url;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use bytes::{Bytes, BytesMut};
use crew_core::store::{ByteStream, ObjectMeta, Store, StoreError, StoreKey};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::HttpErrorKind;
use object_store::path::Path as ObjPath;
use object_store::retry::{RetryFailure, RetryPolicy};
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::error::Context;
use crate::url::S3Url;

/// The URL scheme of this store.
pub const SCHEME: &str = "s3";

/// Size of the parts of a multipart upload, and the largest object sent in
/// one PUT. S3 wants parts of at least 5 MiB (but the last); 8 MiB keeps an
/// upload's memory small while a 10,000-part upload still reaches 78 GiB.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts of one upload in flight at once.
pub const PARTS_IN_FLIGHT: usize = 2;

/// How long one request may be retried before its error is returned.
/// Credentials are refreshed well before they expire (5 minutes), so a
/// retried request never outlives them.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// How many times a request is retried at most.
const MAX_RETRIES: usize = 10;

/// How many times a part whose own retries are exhausted is started again.
const PART_RESTARTS: usize = 3;

/// Timeout of one whole request (a part of [`PART_SIZE`] included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Timeout of establishing a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Store::check`] gives up on an unreachable endpoint after about this
/// long, instead of the minutes the normal retries allow.
pub const CHECK_RETRY_TIMEOUT: Duration = Duration::from_secs(3);

/// A crew store in an S3 bucket (or an S3-compatible service), under an
/// optional key prefix.
///
/// # Opening
/// [`S3Store::open`] (async) or [`S3Store::open_blocking`] take an `s3://`
/// URL (see the crate docs). Resolution, as the AWS CLI does it:
/// - **region**: `?region=`, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else
///   the profile's `region` in `~/.aws/config`, else the instance metadata;
///   none is an error that says how to set one;
/// - **endpoint**: `?endpoint=`, else `AWS_ENDPOINT_URL_S3`, else
///   `AWS_ENDPOINT_URL` (or `endpoint_url` in the profile), else AWS S3. An
///   explicit endpoint gets path-style requests, and plain `http://` is
///   allowed only when the endpoint says `http://`;
/// - **credentials**: the whole default chain of aws-config (environment,
///   shared files and profiles with `?profile=` or `AWS_PROFILE`, SSO, web
///   identity, `credential_process`, ECS and EC2 roles), loaded on the
///   first request and refreshed before they expire.
///
/// # Security
/// `Debug` and [`Store::url`] show the bucket, prefix, region, endpoint and
/// profile name, never a credential.
#[derive(Clone)]
pub struct S3Store {
    /// The URL with the resolved region and endpoint.
    url: S3Url,
    /// The endpoint as shown in messages.
    endpoint_text: String,
    /// Requests with the normal retries.
    client: Arc<AmazonS3>,
    /// The same bucket with short retries, for [`Store::check`].
    check_client: Arc<AmazonS3>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("url", &self.url.to_url()).finish()
    }
}

impl S3Store {
    /// Opens the store `url` names, resolving region, endpoint and the
    /// credential chain (credentials themselves are fetched on the first
    /// request).
    ///
    /// # Errors
    /// [`StoreError::Config`] for a malformed URL or when no region is
    /// found.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let given = S3Url::parse(url)?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(profile) = &given.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(region) = &given.region {
            loader = loader.region(RegionProviderChain::first_try(aws_config::Region::new(region.clone())));
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(ToString::to_string).filter(|r| !r.is_empty()).ok_or_else(|| {
            StoreError::Config(format!(
                "no AWS region for the store {url}: set AWS_REGION, `region` in the AWS profile \
                 (~/.aws/config), or add ?region=REGION to the store URL"
            ))
        })?;
        let endpoint = match &given.endpoint {
            Some(endpoint) => Some(endpoint.clone()),
            None => std::env::var("AWS_ENDPOINT_URL_S3")
                .ok()
                .filter(|e| !e.is_empty())
                .or_else(|| sdk.endpoint_url().map(str::to_owned)),
        };
        if let Some(endpoint) = &endpoint {
            url::check_endpoint(endpoint)
                .map_err(|why| StoreError::Config(format!("bad S3 endpoint (AWS_ENDPOINT_URL?): {why}")))?;
        }
        let chain = sdk.credentials_provider().ok_or_else(|| {
            StoreError::Config("aws-config has no credential provider (the default chain was disabled)".into())
        })?;
        let credentials = Arc::new(credentials::ChainCredentials::new(chain));
        let resolved = S3Url { region: Some(region.clone()), endpoint: endpoint.clone(), ..given };
        let endpoint_text = endpoint.clone().unwrap_or_else(|| format!("AWS S3 in {region}"));
        let build = |retry: RetryConfig| -> Result<Arc<AmazonS3>, StoreError> {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&resolved.bucket)
                .with_region(&region)
                .with_credentials(credentials.clone())
                .with_retry(retry)
                .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
                .with_client_options(
                    ClientOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(CONNECT_TIMEOUT),
                );
            if let Some(endpoint) = &endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            builder
                .build()
                .map(Arc::new)
                .map_err(|e| StoreError::Config(format!("cannot set up the S3 client for {url}: {e}")))
        };
        let client = build(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        })?;
        let check_client = build(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: CHECK_RETRY_TIMEOUT,
        })?;
        Ok(Self { url: resolved, endpoint_text, client, check_client })
    }

    /// [`S3Store::open`] for synchronous callers (store constructors of a
    /// [`crew_core::store::StoreRegistry`]): resolves on a thread of its own,
    /// so it may be called from inside a tokio runtime too (it blocks the
    /// calling thread meanwhile: a few milliseconds, unless the region comes
    /// from the instance metadata).
    ///
    /// # Errors
    /// As [`S3Store::open`].
    pub fn open_blocking(url: &str) -> Result<Self, StoreError> {
        let url = url.to_owned();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| {
                        StoreError::Io { context: "cannot start a runtime to open the S3 store".into(), source }
                    })?;
                    rt.block_on(Self::open(&url))
                })
                .join()
                .unwrap_or_else(|_| Err(StoreError::Config("opening the S3 store panicked".into())))
        })
    }

    /// Registers the `s3` scheme in this process's store registry
    /// ([`crew_core::store::register_scheme`]), so that
    /// [`crew_core::store::open_store`] (and agents given an `s3://` URL by
    /// their controller) open an [`S3Store`].
    pub fn register() {
        crew_core::store::register_scheme(
            SCHEME,
            |url: &str| Ok(Arc::new(Self::open_blocking(url)?) as Arc<dyn Store>),
        );
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.url.bucket
    }

    /// The resolved region.
    pub fn region(&self) -> &str {
        self.url.region.as_deref().unwrap_or_default()
    }

    /// The object location of `key`: `prefix/key`, each segment a path part
    /// (`object_store` percent-encodes the few characters it does not allow
    /// in a part, so every key has exactly one location and back).
    fn location(&self, key: &StoreKey) -> ObjPath {
        match &self.url.prefix {
            Some(prefix) => ObjPath::from(format!("{prefix}/{key}").as_str()),
            None => ObjPath::from(key.as_str()),
        }
    }

    /// The key of a listed location, or `None` when it is outside the
    /// prefix or no key maps to it (written by something other than crew).
    fn key_of(&self, location: &ObjPath) -> Option<StoreKey> {
        let mut parts = location.parts();
        if let Some(prefix) = &self.url.prefix {
            for segment in prefix.as_str().split('/') {
                if parts.next()?.as_ref() != ObjPath::from(segment).as_ref() {
                    return None;
                }
            }
        }
        let mut segments = Vec::new();
        for part in parts {
            segments.push(String::from_utf8(percent_decode(part.as_ref())?).ok()?);
        }
        let key = StoreKey::new(segments.join("/")).ok()?;
        (self.location(&key) == *location).then_some(key)
    }

    fn cx<'a>(&'a self, op: &'a str, key: &'a StoreKey) -> Context<'a> {
        Context { op, key: key.as_str(), bucket: &self.url.bucket, endpoint: &self.endpoint_text }
    }

    fn err(&self, op: &str, key: &StoreKey, e: object_store::Error) -> StoreError {
        error::map(&self.cx(op, key), e)
    }

    /// Uploads `data`: one PUT when it ends within [`PART_SIZE`], else a
    /// multipart upload (aborted, leaving no object, when `data` fails).
    async fn upload<S>(&self, key: &StoreKey, data: S) -> Result<ObjectMeta, StoreError>
    where
        S: futures::Stream<Item = Result<Bytes, StoreError>> + Send,
    {
        let location = self.location(key);
        let mut data = std::pin::pin!(data);
        let mut first = BytesMut::new();
        while first.len() < PART_SIZE {
            match data.next().await {
                Some(chunk) => first.extend_from_slice(&chunk?),
                None => {
                    let size = first.len() as u64;
                    let done = self
                        .client
                        .put(&location, PutPayload::from(first.freeze()))
                        .await
                        .map_err(|e| self.err("put", key, e))?;
                    return Ok(ObjectMeta { key: key.clone(), size, e_tag: done.e_tag, last_modified: None });
                }
            }
        }
        let options = PutMultipartOptions::default().with_retry_policy(Arc::new(PartRestarts));
        let upload = self.client.put_multipart_opts(&location, options).await.map_err(|e| self.err("put", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut size = first.len() as u64;
        writer.put(first.freeze());
        while let Some(chunk) = data.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    abort_upload(writer, key).await;
                    return Err(e);
                }
            };
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                abort_upload(writer, key).await;
                return Err(self.err("put", key, e));
            }
            size += chunk.len() as u64;
            writer.put(chunk);
        }
        let done = writer.finish().await.map_err(|e| self.err("put", key, e))?;
        Ok(ObjectMeta { key: key.clone(), size, e_tag: done.e_tag, last_modified: None })
    }
}

/// Aborts a failed multipart upload; its own failure is only logged.
async fn abort_upload(writer: WriteMultipart, key: &StoreKey) {
    if let Err(e) = writer.abort().await {
        tracing::warn!(%key, error = %e, "could not abort a failed multipart upload (a bucket lifecycle rule removes it)");
    }
}

/// Starts a part again, with a growing pause, when its request retries are
/// exhausted by throttling, 5xx or a transport failure.
#[derive(Debug, Default)]
struct PartRestarts;

#[async_trait]
impl RetryPolicy for PartRestarts {
    async fn retry(&self, context: object_store::retry::RetryContext) -> bool {
        let transient = match context.failure {
            RetryFailure::Status(status) => status.is_server_error() || status.as_u16() == 429,
            RetryFailure::Transport(kind) => !matches!(kind, HttpErrorKind::Decode),
            _ => false,
        };
        if !transient || context.attempt > PART_RESTARTS {
            return false;
        }
        tracing::info!(attempt = context.attempt, failure = ?context.failure, "starting an upload part again");
        tokio::time::sleep(Duration::from_secs(1) * u32::try_from(context.attempt).unwrap_or(1)).await;
        true
    }
}

/// Decodes `%XX` escapes; `None` when malformed.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[async_trait]
impl Store for S3Store {
    fn url(&self) -> String {
        self.url.to_url()
    }

    async fn put_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
        let chunks = crew_core::store::file_chunks(key, path).await?;
        self.upload(key, chunks).await
    }

    async fn put_stream(&self, key: &StoreKey, data: ByteStream) -> Result<ObjectMeta, StoreError> {
        self.upload(key, data).await
    }

    async fn put_bytes(&self, key: &StoreKey, data: Bytes) -> Result<ObjectMeta, StoreError> {
        let size = data.len() as u64;
        if data.len() > PART_SIZE {
            return self.upload(key, futures::stream::iter([Ok(data)])).await;
        }
        let done =
            self.client.put(&self.location(key), PutPayload::from(data)).await.map_err(|e| self.err("put", key, e))?;
        Ok(ObjectMeta { key: key.clone(), size, e_tag: done.e_tag, last_modified: None })
    }

    async fn get(&self, key: &StoreKey) -> Result<ByteStream, StoreError> {
        let found = self.client.get(&self.location(key)).await.map_err(|e| self.err("get", key, e))?;
        let cx = (self.url.bucket.clone(), self.endpoint_text.clone(), key.clone());
        Ok(found
            .into_stream()
            .map_err(move |e| {
                let (bucket, endpoint, key) = &cx;
                error::map(&Context { op: "read", key: key.as_str(), bucket, endpoint }, e)
            })
            .boxed())
    }

    async fn get_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
        // The object first, so that a missing one leaves the file alone.
        let found = self.client.get(&self.location(key)).await.map_err(|e| self.err("get", key, e))?;
        let meta = ObjectMeta {
            key: key.clone(),
            size: found.meta.size,
            e_tag: found.meta.e_tag.clone(),
            last_modified: Some(found.meta.last_modified.into()),
        };
        let stream = found.into_stream().map_err(|e| self.err("read", key, e));
        crew_core::store::write_file(key, stream, path).await?;
        Ok(meta)
    }

    async fn head(&self, key: &StoreKey) -> Result<ObjectMeta, StoreError> {
        let meta = self.client.head(&self.location(key)).await.map_err(|e| self.err("head", key, e))?;
        Ok(ObjectMeta {
            key: key.clone(),
            size: meta.size,
            e_tag: meta.e_tag,
            last_modified: Some(meta.last_modified.into()),
        })
    }

    async fn list(&self, prefix: &StoreKey) -> Result<Vec<ObjectMeta>, StoreError> {
        // `object_store` lists under `location/`: whole segments.
        let location = self.location(prefix);
        let listed: Vec<object_store::ObjectMeta> =
            self.client.list(Some(&location)).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        let mut found = Vec::with_capacity(listed.len());
        for meta in listed {
            match self.key_of(&meta.location) {
                Some(key) => found.push(ObjectMeta {
                    key,
                    size: meta.size,
                    e_tag: meta.e_tag,
                    last_modified: Some(meta.last_modified.into()),
                }),
                None => tracing::debug!(location = %meta.location, "skipping an object no store key names"),
            }
        }
        Ok(found)
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), StoreError> {
        match self.client.delete(&self.location(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// Writes, reads back and deletes a probe object like the default
    /// check, with short retries: an unreachable endpoint is reported within
    /// seconds ([`CHECK_RETRY_TIMEOUT`]), a missing bucket, refused
    /// credentials or a wrong region with what to fix.
    async fn check(&self) -> Result<(), StoreError> {
        // The same store through the client with short retries.
        let checker = Self { client: Arc::clone(&self.check_client), ..self.clone() };
        crew_core::store::check_by_probe(&checker).await
    }
}

// S3 refuses parts under 5 MiB (but the last); the crate docs state the
// memory bound of an upload as 24 MiB.
const _: () = assert!(PART_SIZE >= 5 * 1024 * 1024 && (PARTS_IN_FLIGHT + 1) * PART_SIZE == 24 * 1024 * 1024);
