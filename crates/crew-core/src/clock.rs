//! Checked time arithmetic: a deadline is `now` plus a duration that came
//! from outside (a job's timeout, a slot's limits, a library caller's
//! configuration), and `Instant + Duration` panics on overflow. Every such
//! sum in crew goes through [`after`] (or [`after_tokio`]): a deadline too
//! far to represent becomes "far in the future" ([`FAR`] from now), which
//! is what it means.
//!
//! Durations people write are bounded where they are parsed
//! ([`crate::job::MAX_DURATION`]); this guards what arrives otherwise.

use std::time::{Duration, Instant};

/// What "never" is for a deadline that cannot be represented: 30 years.
pub const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `from + d`, or `from + FAR` when that overflows (never panics).
pub fn after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d).or_else(|| from.checked_add(FAR)).unwrap_or(from)
}

/// [`after`] for tokio's clock.
pub fn after_tokio(from: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    from.checked_add(d).or_else(|| from.checked_add(FAR)).unwrap_or(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_duration_is_far_not_a_panic() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert!(after(now, Duration::MAX) >= now + Duration::from_secs(365 * 24 * 3600));
        let t = tokio::time::Instant::now();
        assert!(after_tokio(t, Duration::MAX) > t);
    }
}
