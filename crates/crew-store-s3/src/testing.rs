//! Helpers for tests against the S3 emulator (feature `test-support`; not
//! part of the store's API).
//!
//! Every test that needs S3 starts with [`endpoint`]: outside CI a missing
//! emulator skips the test with a line that says how to run it; in CI
//! (`CI` set) it fails, so that a broken setup cannot pass as green.
//!
//! [`FaultProxy`] sits between a store (or the `crew` binary) and the
//! emulator and injects 503s and dropped connections, outages that last,
//! damaged uploads and wrong-region answers. [`list_keys`] reads a
//! bucket's raw object keys, as any other S3 client sees them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

mod proxy;

pub use proxy::{Fault, FaultCounts, FaultProxy, Outage, WrongRegion, mix};

/// The variable `cargo xtask ci` and `cargo xtask emu env` set to the
/// emulator's URL.
pub const ENDPOINT_VAR: &str = "CREW_TEST_S3_ENDPOINT";

/// The emulator's URL (`http://127.0.0.1:PORT`), or `None` after printing
/// a skip line when there is none.
///
/// # Panics
/// When there is none and `CI` is set.
pub fn endpoint(test: &str) -> Option<String> {
    match std::env::var(ENDPOINT_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let how = "run through `cargo xtask ci` or start the emulator with `cargo xtask emu start` \
                       (then `eval \"$(cargo xtask emu env)\"`)";
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("{test}: {ENDPOINT_VAR} is not set but CI is: {how}");
            }
            eprintln!("skipped {test}: no S3 emulator ({ENDPOINT_VAR} is not set); {how}");
            None
        }
    }
}

/// A bucket name no other test (or run) uses.
pub fn unique_bucket(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{:x}-{}", std::process::id(), nanos & 0xffff_ffff_ffff, N.fetch_add(1, Ordering::Relaxed))
}

/// Creates `bucket` at the emulator `endpoint` with a plain, unsigned
/// `PUT /bucket` (the emulator checks no signature; `object_store` cannot
/// create buckets, and an SDK for this alone would cost minutes of build).
///
/// # Errors
/// The emulator's answer when it is not `200`, or the I/O error.
pub fn create_bucket(endpoint: &str, bucket: &str) -> Result<(), String> {
    let host = endpoint.strip_prefix("http://").ok_or("the emulator endpoint must be http://")?.trim_end_matches('/');
    let mut stream = TcpStream::connect(host).map_err(|e| format!("cannot connect to {host}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let request = format!("PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send to {host}: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("cannot read the answer of {host}: {e}"))?;
    if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!("creating bucket {bucket} failed: {}", answer.lines().next().unwrap_or("no answer")))
    }
}

/// The raw object keys under `prefix` in `bucket` at the emulator
/// `endpoint`, from a plain, unsigned ListObjectsV2 (`GET
/// /bucket?list-type=2&prefix=...`; at most 1000 keys), XML entities
/// decoded: what `aws s3 ls` or any other S3 client sees.
///
/// # Errors
/// The emulator's answer when it is not `200`, or the I/O error.
pub fn list_keys(endpoint: &str, bucket: &str, prefix: &str) -> Result<Vec<String>, String> {
    let host = endpoint.strip_prefix("http://").ok_or("the emulator endpoint must be http://")?.trim_end_matches('/');
    let mut stream = TcpStream::connect(host).map_err(|e| format!("cannot connect to {host}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut query = String::new();
    for b in prefix.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            query.push(char::from(b));
        } else {
            query.push_str(&format!("%{b:02X}"));
        }
    }
    // HTTP/1.0: the answer comes whole, never chunked.
    let request = format!("GET /{bucket}?list-type=2&prefix={query} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send to {host}: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("cannot read the answer of {host}: {e}"))?;
    let answer = String::from_utf8(answer).map_err(|e| format!("the listing is not UTF-8: {e}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("the listing has no body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("listing {bucket} failed: {}", head.lines().next().unwrap_or("no answer")));
    }
    let mut keys = Vec::new();
    for piece in body.split("<Key>").skip(1) {
        let raw = piece.split_once("</Key>").ok_or("a <Key> without its end")?.0;
        keys.push(
            raw.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&#x27;", "'")
                .replace("&amp;", "&"),
        );
    }
    Ok(keys)
}

/// The store URL of `prefix` in `bucket` at `endpoint`, with the
/// emulator's region.
pub fn store_url(endpoint: &str, bucket: &str, prefix: &str) -> String {
    format!("s3://{bucket}/{prefix}?region=us-east-1&endpoint={endpoint}")
}
