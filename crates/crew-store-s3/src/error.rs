//! From `object_store` errors to [`StoreError`]s that say what is wrong and
//! what to do.
//!
//! `object_store` has already retried what was worth retrying (throttling,
//! 5xx, dropped connections) when an error reaches this module; the mapping
//! decides how the error reads and whether a caller may try again later:
//! `NotFound` keeps its meaning unless S3 said the *bucket* is missing;
//! 401/403 and a credential chain that found nothing are
//! `Unauthenticated`; 5xx, 429 and transport failures are retryable backend
//! errors; the rest are permanent.

use crew_core::store::StoreError;
use object_store::client::{HttpError, HttpErrorKind};

/// Name of this backend in [`StoreError`]s.
pub(crate) const BACKEND: &str = "s3";

/// What an error is about, for its message.
pub(crate) struct Context<'a> {
    /// `get`, `put`, ...
    pub(crate) op: &'a str,
    /// The store key (or prefix) concerned.
    pub(crate) key: &'a str,
    /// The bucket.
    pub(crate) bucket: &'a str,
    /// The endpoint as the user would recognise it.
    pub(crate) endpoint: &'a str,
}

/// Maps `error`, raised by `cx.op` on `cx.key`.
pub(crate) fn map(cx: &Context<'_>, error: object_store::Error) -> StoreError {
    if let Some(why) = find::<crate::credentials::NoCredentials>(&error) {
        return StoreError::Unauthenticated {
            backend: BACKEND,
            message: format!(
                "no AWS credentials for bucket {} ({}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or AWS_PROFILE (or ?profile= in the store URL) naming a profile of ~/.aws/config \
                 (`aws configure`, `aws sso login`), or run with an instance or container role",
                cx.bucket, why.0
            ),
        };
    }
    let text = chain_text(&error);
    if text.contains("NoSuchBucket") {
        return missing_bucket(cx.bucket, cx.endpoint);
    }
    match &error {
        object_store::Error::NotFound { .. } => return StoreError::NotFound { key: cx.key.to_owned() },
        object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. } => {
            return unauthenticated(cx, &text);
        }
        _ => {}
    }
    if let Some(kind) = transport_kind(&error) {
        let retryable = !matches!(kind, HttpErrorKind::Decode);
        if matches!(kind, HttpErrorKind::Connect) {
            // The transport error alone (`dns error: ...`, `Connection
            // refused`): the wrappers above it only repeat the request.
            let cause = find::<HttpError>(&error).map_or_else(|| text.clone(), |e| chain_text(e));
            return StoreError::Backend {
                backend: BACKEND,
                message: format!(
                    "cannot reach the S3 endpoint {}: {cause} (check the endpoint: AWS_ENDPOINT_URL or \
                     ?endpoint= in the store URL, and the network)",
                    cx.endpoint
                ),
                retryable,
            };
        }
        return StoreError::Backend { backend: BACKEND, message: format!("{} {}: {text}", cx.op, cx.key), retryable };
    }
    let status = status_in(&text);
    if matches!(status, Some(401 | 403))
        || text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
    {
        return unauthenticated(cx, &text);
    }
    let retryable = matches!(status, Some(429 | 500..=599)) || text.contains("SlowDown");
    StoreError::Backend { backend: BACKEND, message: format!("{} {}: {text}", cx.op, cx.key), retryable }
}

/// The error for a bucket S3 says does not exist.
pub(crate) fn missing_bucket(bucket: &str, endpoint: &str) -> StoreError {
    StoreError::Config(format!(
        "bucket {bucket} does not exist: create it or fix --store (the store URL; S3 endpoint: {endpoint})"
    ))
}

fn unauthenticated(cx: &Context<'_>, text: &str) -> StoreError {
    StoreError::Unauthenticated {
        backend: BACKEND,
        message: format!(
            "{} {} in bucket {}: {text} (check the AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             AWS_PROFILE or ?profile=, `aws sso login`; and that they may read and write the bucket)",
            cx.op, cx.key, cx.bucket
        ),
    }
}

/// The first error of type `T` in `error`'s source chain.
fn find<'a, T: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The kind of the transport failure in `error`'s source chain, if any.
fn transport_kind(error: &(dyn std::error::Error + 'static)) -> Option<HttpErrorKind> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return Some(http.kind());
        }
        current = e.source();
    }
    None
}

/// The HTTP status `object_store` wrote into its error text
/// (`... status code: 503 ...`); its retry error type is not public.
fn status_in(text: &str) -> Option<u16> {
    let (_, after) = text.split_once("status code: ")?;
    after.get(..3)?.parse().ok()
}

/// An error and its sources, joined with `: `, with repeats (wrappers that
/// print their source) removed.
pub(crate) fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context<'static> {
        Context { op: "put", key: "jobs/1/stdout", bucket: "bkt", endpoint: "http://127.0.0.1:9" }
    }

    fn source(text: &str) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(std::io::Error::other(text.to_owned()))
    }

    #[test]
    fn errors_keep_their_meaning_and_say_what_to_fix() {
        // moto checks no credentials, so 401/403 are only tested here.
        for e in [
            object_store::Error::PermissionDenied { path: "p".into(), source: source("AccessDenied") },
            object_store::Error::Unauthenticated { path: "p".into(), source: source("InvalidAccessKeyId") },
        ] {
            let mapped = map(&cx(), e);
            assert!(matches!(mapped, StoreError::Unauthenticated { .. }), "{mapped:?}");
            assert!(mapped.to_string().contains("check the AWS credentials"), "{mapped}");
        }
        let missing = map(&cx(), object_store::Error::NotFound { path: "p".into(), source: source("NoSuchBucket") });
        assert!(missing.to_string().contains("bucket bkt does not exist"), "{missing}");
        let gone = map(&cx(), object_store::Error::NotFound { path: "p".into(), source: source("NoSuchKey") });
        assert!(matches!(gone, StoreError::NotFound { ref key } if key == "jobs/1/stdout"), "{gone:?}");
        let busy = map(
            &cx(),
            object_store::Error::Generic {
                store: "S3",
                source: source("Server returned non-2xx status code: 503 Service Unavailable: SlowDown"),
            },
        );
        assert!(busy.is_retryable(), "{busy:?}");
        let refused = map(
            &cx(),
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(HttpError::new(HttpErrorKind::Connect, std::io::Error::other("refused"))),
            },
        );
        assert!(refused.is_retryable(), "{refused:?}");
        assert!(refused.to_string().contains("cannot reach the S3 endpoint http://127.0.0.1:9"), "{refused}");
        let bad = map(
            &cx(),
            object_store::Error::Generic {
                store: "S3",
                source: source("Server returned non-2xx status code: 400 Bad Request: InvalidArgument"),
            },
        );
        assert!(!bad.is_retryable(), "{bad:?}");
    }

    #[test]
    fn statuses_are_read_from_the_text() {
        assert_eq!(status_in("Server returned non-2xx status code: 503 Service Unavailable: x"), Some(503));
        assert_eq!(status_in("nothing here"), None);
    }
}
