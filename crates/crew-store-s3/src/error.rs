//! From `object_store` errors to [`StoreError`]s that say what is wrong and
//! what to do.
//!
//! `object_store` has already retried what was worth retrying (throttling,
//! 5xx, dropped connections) when an error reaches this module; the mapping
//! decides how the error reads and whether a caller may try again later:
//! `NotFound` keeps its meaning unless S3 said the *bucket* is missing;
//! 401/403 and a credential chain that found nothing are
//! `Unauthenticated`; 5xx, 429, transport failures and a body damaged on
//! the way (400 `BadDigest`, `XAmzContentSHA256Mismatch`) are retryable
//! backend errors; a wrong region (a 301 without `Location`, a 400
//! `AuthorizationHeaderMalformed`) is a configuration error that names the
//! bucket's region; the rest are permanent.

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
    /// The region requests are signed for.
    pub(crate) region: &'a str,
}

/// S3 error codes of a 400 that is transient: the body was damaged on the
/// way (its checksum or SHA-256 does not match), or it came too slowly.
const TRANSIENT_400: &[&str] =
    &["<Code>BadDigest</Code>", "<Code>XAmzContentSHA256Mismatch</Code>", "<Code>RequestTimeout</Code>"];

/// Whether an operation that failed with `error` is worth running again
/// (see the `retry` module): what [`map`] calls retryable.
pub(crate) fn worth_another_try(error: &object_store::Error) -> bool {
    if wrong_region(error).is_some() || find::<crate::credentials::NoCredentials>(error).is_some() {
        return false;
    }
    let text = chain_text(error);
    if TRANSIENT_400.iter().any(|code| text.contains(code)) {
        return true;
    }
    if text.contains("NoSuchBucket") || matches!(error, object_store::Error::NotFound { .. }) {
        return false;
    }
    if let Some(kind) = transport_kind(error) {
        return !matches!(kind, HttpErrorKind::Decode);
    }
    matches!(status_in(&text), Some(408 | 429 | 500..=599)) || text.contains("SlowDown")
}

/// `Some` when `error` says the request went to the wrong region: with the
/// bucket's region when the answer names it (a 400
/// `AuthorizationHeaderMalformed` has `<Region>`), `None` inside when it
/// does not (`object_store` drops the body and headers of a 301).
pub(crate) fn wrong_region(error: &object_store::Error) -> Option<Option<String>> {
    let text = chain_text(error);
    if text.contains("redirect without LOCATION") || text.contains("<Code>PermanentRedirect</Code>") {
        return Some(None);
    }
    if !text.contains("AuthorizationHeaderMalformed") {
        return None;
    }
    let named = between(&text, "<Region>", "</Region>").or_else(|| between(&text, "expecting '", "'"));
    Some(named.filter(|r| crate::url::plausible_region(r)).map(str::to_owned))
}

/// The text between the first `start` and the next `end`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let (_, after) = text.split_once(start)?;
    Some(after.split_once(end)?.0)
}

/// The error for requests signed for the wrong region: the bucket is in
/// `found` (when known).
pub(crate) fn wrong_region_error(cx: &Context<'_>, found: Option<&str>) -> StoreError {
    StoreError::Config(match found {
        Some(found) => format!(
            "bucket {} is in region {found}, not {}: add ?region={found} to the store URL, or set \
             AWS_REGION={found} when the URL has no region",
            cx.bucket, cx.region
        ),
        None => format!(
            "bucket {} is not in region {} (S3 redirected the request without saying where): add \
             ?region=REGION to the store URL, or set AWS_REGION when the URL has no region \
             (`aws s3api get-bucket-location --bucket {}` tells the bucket's region)",
            cx.bucket, cx.region, cx.bucket
        ),
    })
}

/// `error` with `note` appended to its message (backend errors only: the
/// others' messages say all there is).
pub(crate) fn with_note(error: StoreError, note: &str) -> StoreError {
    match error {
        StoreError::Backend { backend, message, retryable } => {
            StoreError::Backend { backend, message: format!("{message} {note}"), retryable }
        }
        other => other,
    }
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
    let retryable = matches!(status, Some(408 | 429 | 500..=599))
        || text.contains("SlowDown")
        || TRANSIENT_400.iter().any(|code| text.contains(code));
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
        Context { op: "put", key: "jobs/1/stdout", bucket: "bkt", endpoint: "http://127.0.0.1:9", region: "us-east-1" }
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
        let damaged = object_store::Error::Generic {
            store: "S3",
            source: source(
                "Server returned non-2xx status code: 400 Bad Request: <Error><Code>XAmzContentSHA256Mismatch</Code></Error>",
            ),
        };
        assert!(worth_another_try(&damaged));
        assert!(map(&cx(), damaged).is_retryable());
    }

    #[test]
    fn a_wrong_region_names_the_bucket_region_and_the_fix() {
        let malformed = object_store::Error::Generic {
            store: "S3",
            source: source(
                "Server returned non-2xx status code: 400 Bad Request: <Error><Code>AuthorizationHeaderMalformed</Code>\
                 <Message>The authorization header is malformed; the region 'us-east-1' is wrong; expecting \
                 'eu-west-1'</Message><Region>eu-west-1</Region></Error>",
            ),
        };
        assert_eq!(wrong_region(&malformed), Some(Some("eu-west-1".to_owned())));
        assert!(!worth_another_try(&malformed));
        let text = wrong_region_error(&cx(), Some("eu-west-1")).to_string();
        assert!(text.contains("bucket bkt is in region eu-west-1, not us-east-1"), "{text}");
        assert!(text.contains("?region=eu-west-1") && text.contains("AWS_REGION=eu-west-1"), "{text}");
        let redirect = object_store::Error::Generic {
            store: "S3",
            source: source(
                "Received redirect without LOCATION, this normally indicates an incorrectly configured region",
            ),
        };
        assert_eq!(wrong_region(&redirect), Some(None));
        // A region that is not one is not repeated.
        let odd = object_store::Error::Generic {
            store: "S3",
            source: source("AuthorizationHeaderMalformed <Region>eu west; rm -rf</Region>"),
        };
        assert_eq!(wrong_region(&odd), Some(None));
    }

    #[test]
    fn statuses_are_read_from_the_text() {
        assert_eq!(status_in("Server returned non-2xx status code: 503 Service Unavailable: x"), Some(503));
        assert_eq!(status_in("nothing here"), None);
    }
}
