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
//! `s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=P&retry_timeout=D&retry_init=D]`:
//! every store key lives under `PREFIX/`. [`Store::url`] writes the
//! resolved region and endpoint (and the retry settings) into the URL, so
//! that an agent opening it reaches the same bucket the same way;
//! credentials are never part of it.
//!
//! # Keys
//! The object key of a store key is `PREFIX/KEY`, byte for byte: UTF-8
//! names such as `ü.txt` or `a#b.txt` are stored as they are (S3 allows any
//! UTF-8 key), so that other tools find `s3://BUCKET/PREFIX/jobs/1/1/outputs/ü.txt`.
//! [`StoreKey`] already refuses what could escape the prefix or that S3
//! keys should not hold (empty, `.` and `..` segments, control characters,
//! backslashes), so no character needs a mapping. Objects listed that are
//! not valid store keys are skipped.
//!
//! # Memory, retries, integrity
//! Uploads of up to [`PART_SIZE`] go up in one PUT; longer ones as a
//! multipart upload of [`PART_SIZE`] parts with at most
//! [`PARTS_IN_FLIGHT`] parts uploading at once, so one upload holds at most
//! `(PARTS_IN_FLIGHT + 1) × PART_SIZE` (24 MiB) plus one chunk of its
//! source, whatever the object's size. Every operation is retried with
//! exponential backoff and jitter on throttling, 5xx, dropped connections
//! and bodies damaged on the way, for the store's retry timeout
//! ([`RETRY_TIMEOUT`] unless the URL says `retry_timeout=`; see the `retry`
//! module). Every upload carries a SHA-256 checksum that S3 verifies before
//! it accepts the object, so a body corrupted on the way is refused (and
//! sent again), never stored.

mod credentials;
mod error;
mod retry;
#[cfg(feature = "test-support")]
pub mod testing;
mod url;

pub use retry::{RETRY_INIT, RETRY_TIMEOUT};

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
use object_store::client::{HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutPayload, WriteMultipart};

use crate::error::Context;
use crate::retry::{PartRestarts, Retry};
use crate::url::S3Url;

/// The URL scheme of this store.
pub const SCHEME: &str = "s3";

/// Size of the parts of a multipart upload, and the largest object sent in
/// one PUT. S3 wants parts of at least 5 MiB (but the last); 8 MiB keeps an
/// upload's memory small while a 10,000-part upload still reaches 78 GiB.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts of one upload in flight at once.
pub const PARTS_IN_FLIGHT: usize = 2;

/// Timeout of one whole request (a part of [`PART_SIZE`] included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Timeout of establishing a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Store::check`] gives up on an unreachable endpoint after about this
/// long, instead of the minutes the normal retries allow.
pub const CHECK_RETRY_TIMEOUT: Duration = Duration::from_secs(3);

/// The first pause of the retries of [`Store::check`].
const CHECK_RETRY_INIT: Duration = Duration::from_millis(100);

/// How long the question "which region is this bucket in?" may take.
const REGION_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The retries of `client`.
    retry: Retry,
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
        let build = |retry: Retry| -> Result<Arc<AmazonS3>, StoreError> {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&resolved.bucket)
                .with_region(&region)
                .with_credentials(credentials.clone())
                .with_retry(retry.request_config())
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
        let retry = Retry::new(resolved.retry_timeout, resolved.retry_init);
        let client = build(retry)?;
        let check_client = build(Retry::new(Some(CHECK_RETRY_TIMEOUT), Some(CHECK_RETRY_INIT)))?;
        Ok(Self { url: resolved, endpoint_text, client, retry, check_client })
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

    /// The object location of `key`: the object key `prefix/key`, as it is
    /// (`ObjPath::parse` keeps the text; `ObjPath::from` would
    /// percent-encode non-ASCII and a few other characters into the key).
    fn location(&self, key: &StoreKey) -> Result<ObjPath, StoreError> {
        let parsed = match &self.url.prefix {
            Some(prefix) => ObjPath::parse(format!("{prefix}/{key}")),
            None => ObjPath::parse(key.as_str()),
        };
        // StoreKey refuses all that `parse` refuses; kept as an error, not
        // a panic, should the two ever drift apart.
        parsed
            .map_err(|e| StoreError::InvalidKey { key: key.to_string(), reason: format!("not an S3 object key: {e}") })
    }

    /// The key of a listed location, or `None` when it is outside the
    /// prefix or not a valid store key (written by something other than
    /// crew).
    fn key_of(&self, location: &ObjPath) -> Option<StoreKey> {
        let raw: &str = location.as_ref();
        let rest = match &self.url.prefix {
            Some(prefix) => raw.strip_prefix(prefix.as_str())?.strip_prefix('/')?,
            None => raw,
        };
        StoreKey::new(rest).ok()
    }

    fn cx<'a>(&'a self, op: &'a str, key: &'a StoreKey) -> Context<'a> {
        Context {
            op,
            key: key.as_str(),
            bucket: &self.url.bucket,
            endpoint: &self.endpoint_text,
            region: self.region(),
        }
    }

    /// Maps an error of `op` on `key`, which was tried for `tried`: a wrong
    /// region names the bucket's region (asking S3 for it when the error
    /// does not say), an error that outlived the retries says so.
    async fn fail(&self, op: &str, key: &StoreKey, e: object_store::Error, tried: Duration) -> StoreError {
        if let Some(said) = error::wrong_region(&e) {
            let found = match said {
                Some(region) => Some(region),
                None => self.bucket_region().await,
            };
            return error::wrong_region_error(&self.cx(op, key), found.as_deref());
        }
        let mapped = error::map(&self.cx(op, key), e);
        if mapped.is_retryable() { error::with_note(mapped, &self.retry.gave_up(tried)) } else { mapped }
    }

    /// Runs `call` (one store operation on `key`) with the operation
    /// retries of the `retry` module, and maps its final error.
    async fn call<T, F, Fut>(&self, op: &str, key: &StoreKey, call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, object_store::Error>>,
    {
        match self.retry.run(op, error::worth_another_try, call).await {
            Ok(done) => Ok(done),
            Err((e, tried)) => Err(self.fail(op, key, e, tried).await),
        }
    }

    /// The region S3 says the bucket is in (the `x-amz-bucket-region` header
    /// of an unsigned HEAD of the bucket, which AWS answers in every region
    /// whatever the status), or `None` when it does not say.
    async fn bucket_region(&self) -> Option<String> {
        let base = match &self.url.endpoint {
            Some(endpoint) => endpoint.trim_end_matches('/').to_owned(),
            None => format!("https://s3.{}.amazonaws.com", self.region()),
        };
        let options = ClientOptions::new()
            .with_allow_http(base.starts_with("http://"))
            .with_timeout(REGION_PROBE_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT);
        let client = ReqwestConnector::default().connect(&options).ok()?;
        let request = http::Request::builder()
            .method(http::Method::HEAD)
            .uri(format!("{base}/{}", self.url.bucket))
            .body(HttpRequestBody::empty())
            .ok()?;
        let answer = match client.execute(request).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::debug!(error = %e, "could not ask S3 for the bucket's region");
                return None;
            }
        };
        let region = answer.headers().get("x-amz-bucket-region")?.to_str().ok()?.trim().to_owned();
        url::plausible_region(&region).then_some(region)
    }

    /// Uploads `data`: one PUT when it ends within [`PART_SIZE`], else a
    /// multipart upload (aborted, leaving no object, when `data` fails).
    async fn upload<S>(&self, key: &StoreKey, data: S) -> Result<ObjectMeta, StoreError>
    where
        S: futures::Stream<Item = Result<Bytes, StoreError>> + Send,
    {
        let location = self.location(key)?;
        let mut data = std::pin::pin!(data);
        let mut first = BytesMut::new();
        while first.len() < PART_SIZE {
            match data.next().await {
                Some(chunk) => first.extend_from_slice(&chunk?),
                None => {
                    let size = first.len() as u64;
                    let payload = PutPayload::from(first.freeze());
                    let done = self.call("put", key, || self.client.put(&location, payload.clone())).await?;
                    return Ok(ObjectMeta::new(key.clone(), size).with_e_tag(done.e_tag));
                }
            }
        }
        let restarts = Arc::new(PartRestarts(self.retry));
        let upload = self
            .call("put", key, || {
                let options = PutMultipartOptions::default().with_retry_policy(restarts.clone());
                self.client.put_multipart_opts(&location, options)
            })
            .await?;
        let started = std::time::Instant::now();
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
                return Err(self.fail("put", key, e, started.elapsed()).await);
            }
            size += chunk.len() as u64;
            writer.put(chunk);
        }
        let done = match writer.finish().await {
            Ok(done) => done,
            Err(e) => return Err(self.fail("put", key, e, started.elapsed()).await),
        };
        Ok(ObjectMeta::new(key.clone(), size).with_e_tag(done.e_tag))
    }
}

/// Aborts a failed multipart upload; its own failure is only logged.
async fn abort_upload(writer: WriteMultipart, key: &StoreKey) {
    if let Err(e) = writer.abort().await {
        tracing::warn!(%key, error = %e, "could not abort a failed multipart upload (a bucket lifecycle rule removes it)");
    }
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
        let location = self.location(key)?;
        let payload = PutPayload::from(data);
        let done = self.call("put", key, || self.client.put(&location, payload.clone())).await?;
        Ok(ObjectMeta::new(key.clone(), size).with_e_tag(done.e_tag))
    }

    async fn get(&self, key: &StoreKey) -> Result<ByteStream, StoreError> {
        let location = self.location(key)?;
        let found = self.call("get", key, || self.client.get(&location)).await?;
        let cx = (self.url.bucket.clone(), self.endpoint_text.clone(), key.clone(), self.region().to_owned());
        Ok(found
            .into_stream()
            .map_err(move |e| {
                let (bucket, endpoint, key, region) = &cx;
                error::map(&Context { op: "read", key: key.as_str(), bucket, endpoint, region }, e)
            })
            .boxed())
    }

    async fn get_file(&self, key: &StoreKey, path: &Path) -> Result<ObjectMeta, StoreError> {
        // The object first, so that a missing one leaves the file alone.
        let location = self.location(key)?;
        let found = self.call("get", key, || self.client.get(&location)).await?;
        let meta = ObjectMeta::new(key.clone(), found.meta.size)
            .with_e_tag(found.meta.e_tag.clone())
            .with_last_modified(Some(found.meta.last_modified.into()));
        let stream = found.into_stream().map_err(|e| error::map(&self.cx("read", key), e));
        crew_core::store::write_file(key, stream, path).await?;
        Ok(meta)
    }

    async fn head(&self, key: &StoreKey) -> Result<ObjectMeta, StoreError> {
        let location = self.location(key)?;
        let meta = self.call("head", key, || self.client.head(&location)).await?;
        Ok(ObjectMeta::new(key.clone(), meta.size)
            .with_e_tag(meta.e_tag)
            .with_last_modified(Some(meta.last_modified.into())))
    }

    async fn list(&self, prefix: &StoreKey) -> Result<Vec<ObjectMeta>, StoreError> {
        // `object_store` lists under `location/`: whole segments.
        let location = self.location(prefix)?;
        let listed: Vec<object_store::ObjectMeta> =
            self.call("list", prefix, || self.client.list(Some(&location)).try_collect()).await?;
        let mut found = Vec::with_capacity(listed.len());
        for meta in listed {
            match self.key_of(&meta.location) {
                Some(key) => found.push(
                    ObjectMeta::new(key, meta.size)
                        .with_e_tag(meta.e_tag)
                        .with_last_modified(Some(meta.last_modified.into())),
                ),
                None => tracing::debug!(location = %meta.location, "skipping an object no store key names"),
            }
        }
        Ok(found)
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), StoreError> {
        let location = self.location(key)?;
        self.call("delete", key, || async {
            match self.client.delete(&location).await {
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                other => other,
            }
        })
        .await
    }

    /// Writes, reads back and deletes a probe object like the default
    /// check, with short retries: an unreachable endpoint is reported within
    /// seconds ([`CHECK_RETRY_TIMEOUT`]), a missing bucket, refused
    /// credentials or a wrong region with what to fix.
    async fn check(&self) -> Result<(), StoreError> {
        // The same store through the client with short retries.
        let checker = Self {
            client: Arc::clone(&self.check_client),
            retry: Retry::new(Some(CHECK_RETRY_TIMEOUT), Some(CHECK_RETRY_INIT)),
            ..self.clone()
        };
        crew_core::store::check_by_probe(&checker).await
    }
}

// S3 refuses parts under 5 MiB (but the last); the crate docs state the
// memory bound of an upload as 24 MiB.
const _: () = assert!(PART_SIZE >= 5 * 1024 * 1024 && (PARTS_IN_FLIGHT + 1) * PART_SIZE == 24 * 1024 * 1024);
