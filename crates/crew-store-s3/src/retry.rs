//! How long and how often the S3 store tries again: one [`Retry`] per
//! store, from the URL's `retry_timeout=` and `retry_init=`.
//!
//! Three layers share one budget, the retry timeout of an operation:
//!
//! 1. **Requests** ([`Retry::request_config`]): `object_store` retries
//!    each request on throttling (429, 503 `SlowDown`), 5xx, a request
//!    timeout and dropped connections, with exponential backoff and
//!    decorrelated jitter. Its defaults (a first pause of 100 ms that
//!    barely grows, 10 tries) gave up within 2 to 5 seconds; here the
//!    growth factor is 3 (each pause is drawn between the first pause and
//!    three times the previous one: 1.5 times longer on average), the count
//!    of tries is no limit, and the last pause ends by the retry timeout,
//!    so the time is what bounds the retries.
//! 2. **Operations** ([`Retry::run`]): what `object_store` does not retry
//!    but is transient too (a 400 `BadDigest` or `XAmzContentSHA256Mismatch`:
//!    a body damaged on the way; a 400 `RequestTimeout`; a transport
//!    failure of a request that is not idempotent) runs the whole operation
//!    again, freshly signed, while the budget lasts.
//! 3. **Upload parts** ([`PartRestarts`]): a part of a multipart upload
//!    whose request retries are exhausted is started again the same way.
//!
//! An error that outlives the budget says how long it was retried and how
//! to wait longer.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use object_store::client::HttpErrorKind;
use object_store::retry::{RetryFailure, RetryPolicy};
use object_store::{BackoffConfig, RetryConfig};

use crate::url::show_duration;

/// Default of `retry_timeout=`: how long an operation is retried.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// Default of `retry_init=`: the first pause between retries.
pub const RETRY_INIT: Duration = Duration::from_millis(200);

/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Multiplier of the backoff (see the module docs).
const GROWTH: f64 = 3.0;

/// How many times a part that got a 400 (which may be a damaged body) is
/// started again: a 400 that is not transient costs only these few tries.
const PART_RESTARTS_ON_400: usize = 3;

/// The retry settings of one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retry {
    /// How long an operation is retried.
    pub(crate) timeout: Duration,
    /// The first pause.
    pub(crate) init: Duration,
}

impl Retry {
    /// The settings of `timeout` and `init`, the defaults where `None`.
    pub(crate) fn new(timeout: Option<Duration>, init: Option<Duration>) -> Self {
        let timeout = timeout.unwrap_or(RETRY_TIMEOUT);
        Self { timeout, init: init.unwrap_or(RETRY_INIT).min(timeout) }
    }

    /// The longest pause: an eighth of the timeout (so that several tries
    /// fit in the last stretch of an outage), at most [`MAX_PAUSE`].
    pub(crate) fn max_pause(&self) -> Duration {
        (self.timeout / 8).clamp(self.init, MAX_PAUSE)
    }

    /// The request retries `object_store` does: stops retrying once
    /// `timeout - max_pause` has passed, so that its last pause ends by the
    /// timeout.
    pub(crate) fn request_config(&self) -> RetryConfig {
        let budget = self.timeout.saturating_sub(self.max_pause());
        // Every pause is at least `init`: this many tries cannot all fit,
        // so the time is the limit.
        let tries = (self.timeout.as_secs_f64() / self.init.as_secs_f64()).ceil() as usize + 1;
        RetryConfig {
            backoff: BackoffConfig { init_backoff: self.init, max_backoff: self.max_pause(), base: GROWTH },
            max_retries: tries,
            retry_timeout: budget,
        }
    }

    /// The pause before try `n + 1` (`n` >= 1) of an operation: exponential
    /// with full jitter between `init` and the exponential bound.
    pub(crate) fn pause(&self, n: u32) -> Duration {
        let bound = self.init.as_secs_f64() * 2f64.powi(i32::try_from(n).unwrap_or(i32::MAX).min(30));
        let bound = bound.min(self.max_pause().as_secs_f64());
        let init = self.init.as_secs_f64();
        Duration::from_secs_f64(init + (bound - init).max(0.0) * random_fraction())
    }

    /// Runs `op` until it succeeds, fails with an error `transient` does not
    /// accept, or the next try would start after the request budget
    /// (`timeout - max_pause`, when `object_store` stops retrying a
    /// request): an error whose request retries ran out is not retried
    /// again, so a lasting outage ends about `timeout` after it began.
    /// Returns the last error and how long the operation was tried.
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        transient: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, (E, Duration)>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            match op().await {
                Ok(done) => return Ok(done),
                Err(e) => {
                    n += 1;
                    let pause = self.pause(n);
                    let budget = self.timeout.saturating_sub(self.max_pause());
                    if !transient(&e) || start.elapsed() + pause > budget {
                        return Err((e, start.elapsed()));
                    }
                    tracing::info!(operation = what, attempt = n, pause = ?pause, error = %e, "trying an S3 operation again");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// What an error that outlived the retries adds: how long, and how to
    /// wait longer.
    pub(crate) fn gave_up(&self, tried: Duration) -> String {
        format!(
            "(gave up after retrying for {:.1}s; retry_timeout={} in the store URL sets how long to retry)",
            tried.as_secs_f64(),
            show_duration(self.timeout)
        )
    }
}

/// A random number in `[0, 1)`; 0.5 if the system has no randomness.
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// Starts a part of a multipart upload again when its request retries are
/// exhausted by a transient failure (throttling, 5xx, a transport failure)
/// while the store's retry timeout lasts, and a few times after a 400 (a
/// `BadDigest` of a damaged body cannot be told from other 400s here).
#[derive(Debug)]
pub(crate) struct PartRestarts(pub(crate) Retry);

#[async_trait]
impl RetryPolicy for PartRestarts {
    async fn retry(&self, context: object_store::retry::RetryContext) -> bool {
        let transient = match context.failure {
            RetryFailure::Status(status) if status.as_u16() == 400 => context.attempt <= PART_RESTARTS_ON_400,
            RetryFailure::Status(status) => status.is_server_error() || matches!(status.as_u16(), 408 | 429),
            RetryFailure::Transport(kind) => !matches!(kind, HttpErrorKind::Decode),
            _ => false,
        };
        let pause = self.0.pause(u32::try_from(context.attempt).unwrap_or(u32::MAX));
        if !transient || context.elapsed + pause > self.0.timeout {
            return false;
        }
        tracing::info!(attempt = context.attempt, failure = ?context.failure, "starting an upload part again");
        tokio::time::sleep(pause).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_bounds_the_retries_not_a_count() {
        let r = Retry::new(None, None);
        assert_eq!((r.timeout, r.init, r.max_pause()), (RETRY_TIMEOUT, RETRY_INIT, Duration::from_secs(15)));
        let c = r.request_config();
        assert_eq!(c.retry_timeout + r.max_pause(), RETRY_TIMEOUT);
        // Even with every pause at its shortest, the count is not reached.
        assert!(c.max_retries as u32 * RETRY_INIT >= RETRY_TIMEOUT, "{c:?}");
        assert_eq!(c.backoff.base, GROWTH);
        // Short timeouts keep a pause of at least init.
        let short = Retry::new(Some(Duration::from_secs(1)), Some(Duration::from_millis(500)));
        assert_eq!(short.max_pause(), Duration::from_millis(500));
        assert_eq!(short.request_config().retry_timeout, Duration::from_millis(500));
        let long = Retry::new(Some(Duration::from_secs(300)), None);
        assert_eq!(long.max_pause(), MAX_PAUSE);
        assert_eq!(long.request_config().retry_timeout, Duration::from_secs(270));
        assert_eq!(Retry::new(Some(Duration::from_secs(1)), Some(Duration::from_secs(5))).init, Duration::from_secs(1));
    }

    #[test]
    fn pauses_grow_within_their_bounds() {
        let r = Retry::new(Some(Duration::from_secs(80)), Some(Duration::from_millis(100)));
        for n in 1..40 {
            let p = r.pause(n);
            let bound = (Duration::from_millis(100) * 2u32.saturating_pow(n.min(20))).min(r.max_pause());
            assert!(p >= r.init && p <= bound, "pause {n}: {p:?} not in {:?}..={bound:?}", r.init);
        }
        // The bound grows: late pauses can be long, the first never is.
        assert!(r.pause(1) <= Duration::from_millis(200));
        assert!((0..50).any(|_| r.pause(12) > Duration::from_secs(2)));
    }

    #[tokio::test]
    async fn operations_stop_at_a_permanent_error_or_when_the_time_is_up() {
        let r = Retry::new(Some(Duration::from_secs(1)), Some(Duration::from_millis(10)));
        let mut tries = 0;
        let permanent: Result<(), _> = r
            .run(
                "t",
                |e: &String| e == "transient",
                || {
                    tries += 1;
                    async { Err::<(), _>("permanent".to_owned()) }
                },
            )
            .await;
        assert_eq!((tries, permanent.map_err(|(e, _)| e)), (1, Err("permanent".to_owned())));
        let mut tries = 0;
        let healed = r
            .run(
                "t",
                |e: &String| e == "transient",
                || {
                    tries += 1;
                    let t = tries;
                    async move { if t < 3 { Err("transient".to_owned()) } else { Ok(t) } }
                },
            )
            .await;
        assert_eq!(healed.map_err(|(e, _)| e), Ok(3));
        let start = Instant::now();
        let gave_up: Result<(), _> =
            r.run("t", |_: &String| true, || async { Err::<(), _>("transient".to_owned()) }).await;
        let (_, tried) = gave_up.unwrap_err();
        // It was tried until the next try would start past the budget.
        assert!(tried + 2 * r.max_pause() >= r.timeout && start.elapsed() >= tried, "{tried:?}");
        assert!(r.gave_up(tried).contains("retry_timeout=1s in the store URL"));
    }
}
