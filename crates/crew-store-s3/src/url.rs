//! The store URL:
//! `s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=P&retry_timeout=D&retry_init=D]`.
//!
//! Parsed strictly (an unknown option or a malformed bucket name is an
//! error, not ignored) because the URL crosses processes: the controller
//! writes it ([`S3Url::to_url`]) and every agent opens it again. It never
//! holds a secret: credentials come from the AWS chain of the process that
//! opens it, and an endpoint with `user:password@` is refused.

use std::time::Duration;

use crew_core::store::{StoreError, StoreKey};

/// The options a URL may carry, in the order [`S3Url::to_url`] writes them.
const OPTIONS: &[&str] = &["region", "endpoint", "profile", "retry_timeout", "retry_init"];

/// The shortest and longest `retry_timeout` accepted: a request is signed
/// once and retried as it is, and credentials are refreshed 5 minutes
/// before they expire, so a request retried longer could outlive them.
pub(crate) const RETRY_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));

/// The shortest and longest `retry_init` accepted.
pub(crate) const RETRY_INIT_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(60));

/// A parsed `s3://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct S3Url {
    /// The bucket name.
    pub(crate) bucket: String,
    /// The key prefix, without leading or trailing `/`; every store key is
    /// mapped under `prefix/`.
    pub(crate) prefix: Option<StoreKey>,
    /// `region=`: overrides the AWS region chain.
    pub(crate) region: Option<String>,
    /// `endpoint=`: overrides `AWS_ENDPOINT_URL`; `http://` or `https://`.
    pub(crate) endpoint: Option<String>,
    /// `profile=`: the AWS profile of the credential and region chain.
    pub(crate) profile: Option<String>,
    /// `retry_timeout=`: how long a failing operation is retried.
    pub(crate) retry_timeout: Option<Duration>,
    /// `retry_init=`: the first pause between retries.
    pub(crate) retry_init: Option<Duration>,
}

impl S3Url {
    /// Parses `url`.
    ///
    /// # Errors
    /// [`StoreError::Config`] naming what is wrong and the expected form.
    pub(crate) fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |why: String| {
            StoreError::Config(format!(
                "invalid S3 store URL {url:?}: {why} (expected s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=P&retry_timeout=2m&retry_init=200ms])"
            ))
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("s3") => rest,
            _ => return Err(bad("it does not start with s3://".into())),
        };
        if rest.contains('#') {
            return Err(bad("it has a fragment (#)".into()));
        }
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let (bucket, prefix) = match path.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix.trim_end_matches('/')),
            None => (path, ""),
        };
        check_bucket(bucket).map_err(bad)?;
        let prefix = if prefix.is_empty() {
            None
        } else {
            let decoded = crew_core::percent::decode_utf8(prefix)
                .ok_or_else(|| bad("the prefix has a malformed %-escape".into()))?;
            Some(StoreKey::new(decoded).map_err(|e| bad(format!("bad prefix: {e}")))?)
        };
        let mut parsed = Self {
            bucket: bucket.to_owned(),
            prefix,
            region: None,
            endpoint: None,
            profile: None,
            retry_timeout: None,
            retry_init: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = crew_core::percent::decode_utf8(value)
                .ok_or_else(|| bad(format!("option {name}: malformed %-escape")))?;
            if value.is_empty() {
                return Err(bad(format!("option {name} has no value")));
            }
            let duration_slot = match name {
                "retry_timeout" => Some((&mut parsed.retry_timeout, RETRY_TIMEOUT_RANGE)),
                "retry_init" => Some((&mut parsed.retry_init, RETRY_INIT_RANGE)),
                _ => None,
            };
            if let Some((slot, (min, max))) = duration_slot {
                let d = parse_duration(&value).map_err(|why| bad(format!("option {name}: {why}")))?;
                if d < min || d > max {
                    return Err(bad(format!(
                        "option {name}={value} is out of range ({} to {})",
                        show_duration(min),
                        show_duration(max)
                    )));
                }
                if slot.replace(d).is_some() {
                    return Err(bad(format!("option {name} is given twice")));
                }
                continue;
            }
            let slot = match name {
                "region" => &mut parsed.region,
                "endpoint" => {
                    check_endpoint(&value).map_err(bad)?;
                    &mut parsed.endpoint
                }
                "profile" => &mut parsed.profile,
                _ => return Err(bad(format!("unknown option {name:?} (known: {})", OPTIONS.join(", ")))),
            };
            if slot.replace(value).is_some() {
                return Err(bad(format!("option {name} is given twice")));
            }
        }
        if let (Some(init), Some(timeout)) = (parsed.retry_init, parsed.retry_timeout) {
            if init > timeout {
                return Err(bad(format!(
                    "retry_init ({}) is longer than retry_timeout ({})",
                    show_duration(init),
                    show_duration(timeout)
                )));
            }
        }
        Ok(parsed)
    }

    /// The URL again, canonical: the prefix and option values
    /// percent-encoded where needed, options in a fixed order.
    pub(crate) fn to_url(&self) -> String {
        let mut url = format!("s3://{}", self.bucket);
        if let Some(prefix) = &self.prefix {
            url.push('/');
            crew_core::percent::encode_into(&mut url, prefix.as_str(), |b| b == b'/');
        }
        let mut sep = '?';
        for (name, value) in [("region", &self.region), ("endpoint", &self.endpoint), ("profile", &self.profile)] {
            if let Some(value) = value {
                url.push(sep);
                sep = '&';
                url.push_str(name);
                url.push('=');
                crew_core::percent::encode_into(&mut url, value, |b| b"/:@".contains(&b));
            }
        }
        for (name, value) in [("retry_timeout", self.retry_timeout), ("retry_init", self.retry_init)] {
            if let Some(value) = value {
                url.push(sep);
                sep = '&';
                url.push_str(name);
                url.push('=');
                url.push_str(&show_duration(value));
            }
        }
        url
    }
}

/// Bucket names as S3 allows them (3-63 characters: lowercase letters,
/// digits, `.` and `-`, starting and ending with a letter or digit); also
/// what keeps a bucket name from smuggling a path or host into a request.
fn check_bucket(bucket: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("the bucket name is missing".into());
    }
    let ok_chars = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ok_ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !ok_chars
        || !ok_ends(bucket.bytes().next())
        || !ok_ends(bucket.bytes().last())
    {
        return Err(format!(
            "{bucket:?} is not a valid bucket name (3-63 characters: lowercase letters, digits, . and -)"
        ));
    }
    Ok(())
}

/// Whether `region` looks like a region name (`eu-west-1`): what is
/// shown from an S3 answer is checked first, so that a message never
/// carries whatever a server sent.
pub(crate) fn plausible_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An endpoint must be an `http://` or `https://` URL without credentials.
pub(crate) fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .ok_or_else(|| format!("the endpoint {endpoint:?} must start with https:// or http://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(format!("the endpoint {endpoint:?} has no host"));
    }
    if authority.contains('@') {
        // Never let a secret into a URL that is logged and sent to agents.
        return Err("the endpoint must not contain user:password@; credentials come from the AWS chain".into());
    }
    Ok(())
}

/// Parses a duration: a whole number with a unit, `ms`, `s`, `m` or `h`
/// (`500ms`, `30s`, `5m`, `1h`); nothing else, so that a typo is an error.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let how = || format!("{text:?} is not a duration (a whole number and ms, s, m or h: 500ms, 30s, 5m)");
    let n: u64 = number.parse().map_err(|_| how())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(how)
}

/// A duration as [`parse_duration`] reads it, in the largest unit that
/// keeps it whole.
pub(crate) fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms % 3_600_000 == 0 && ms > 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 && ms > 0 => format!("{}m", ms / 60_000),
        _ if ms % 1_000 == 0 && ms > 0 => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_back() {
        let u = S3Url::parse("s3://my-bucket/runs/a%20b/?profile=dev&region=eu-west-1&endpoint=http://127.0.0.1:9000")
            .unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix.as_ref().map(StoreKey::as_str), Some("runs/a b"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.profile.as_deref(), Some("dev"));
        let url = u.to_url();
        assert_eq!(url, "s3://my-bucket/runs/a%20b?region=eu-west-1&endpoint=http://127.0.0.1:9000&profile=dev");
        assert_eq!(S3Url::parse(&url).unwrap(), u);
        let bare = S3Url::parse("S3://bkt").unwrap();
        assert_eq!((bare.prefix.clone(), bare.to_url()), (None, "s3://bkt".to_owned()));
        let timed = S3Url::parse("s3://bkt?retry_init=1500ms&retry_timeout=300s").unwrap();
        assert_eq!(timed.retry_timeout, Some(Duration::from_secs(300)));
        assert_eq!(timed.retry_init, Some(Duration::from_millis(1500)));
        assert_eq!(timed.to_url(), "s3://bkt?retry_timeout=5m&retry_init=1500ms");
        assert_eq!(S3Url::parse(&timed.to_url()).unwrap(), timed);
        let odd = S3Url::parse("s3://bkt/x?profile=a%26b%3Dc").unwrap();
        assert_eq!(odd.profile.as_deref(), Some("a&b=c"));
        assert_eq!(S3Url::parse(&odd.to_url()).unwrap(), odd);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for (url, want) in [
            ("file:///x", "does not start with s3://"),
            ("s3://", "bucket name is missing"),
            ("s3://Bucket/x", "not a valid bucket name"),
            ("s3://b/x", "not a valid bucket name"),
            ("s3://bkt/../x", "bad prefix"),
            ("s3://bkt/a//b", "bad prefix"),
            ("s3://bkt?colour=red", "unknown option \"colour\""),
            ("s3://bkt?region=", "has no value"),
            ("s3://bkt?region=a&region=b", "given twice"),
            ("s3://bkt?endpoint=ftp://x", "must start with https:// or http://"),
            ("s3://bkt?endpoint=http://user:pw@host", "must not contain user:password@"),
            ("s3://bkt#x", "fragment"),
            ("s3://bkt?retry_timeout=5", "is not a duration"),
            ("s3://bkt?retry_timeout=5min", "is not a duration"),
            ("s3://bkt?retry_timeout=-5s", "is not a duration"),
            ("s3://bkt?retry_timeout=1.5s", "is not a duration"),
            ("s3://bkt?retry_timeout=500ms", "out of range (1s to 5m)"),
            ("s3://bkt?retry_timeout=301s", "out of range (1s to 5m)"),
            ("s3://bkt?retry_init=0ms", "out of range (10ms to 1m)"),
            ("s3://bkt?retry_init=1s&retry_init=2s", "given twice"),
            ("s3://bkt?retry_init=30s&retry_timeout=10s", "retry_init (30s) is longer than retry_timeout (10s)"),
            ("s3://bkt?retry_timeout=99999999999999999h", "is not a duration"),
            ("s3://bkt/%zz", "malformed"),
        ] {
            let e = S3Url::parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
    }
}
