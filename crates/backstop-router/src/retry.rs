//! When to try the same target again, and how long to wait first.
//!
//! A failed attempt is retried on the same target only while that target's
//! retry budget lasts and the failure is one a second try can fix: a 5xx, a
//! dropped connection, a bad answer, or a 429 whose `Retry-After` is short.
//! The wait is exponential backoff with full jitter, or exactly what the
//! upstream asked for (`retry-after-ms`, `retry-after`). `x-should-retry:
//! false`, a missed first-byte deadline, or a long `Retry-After` move the
//! request on to the next target instead; client errors are never retried.

use std::time::Duration;

use backstop_adapter::{BackendError, FailureKind};

/// Retry budget and backoff.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Extra attempts on the same target, per request.
    pub max_retries: u32,
    /// Backoff before the first retry (full jitter: a random wait up to it).
    pub backoff_base: Duration,
    /// Cap on the backoff, however many retries.
    pub backoff_max: Duration,
    /// Longest `Retry-After` worth waiting for; a longer one moves on.
    pub max_retry_after: Duration,
    /// A streaming target that sends no first chunk within this is abandoned
    /// for the next target (and the miss counts against its breaker).
    pub first_token_timeout: Duration,
    /// A failure that took longer than this (a timeout, a silent socket
    /// closed at last) is not tried again on the same target: the next one
    /// gets the time instead.
    pub retry_within: Duration,
    /// Hedge a first token that is late to the next target in the route
    /// even when that is an upstream (which costs quota); the local model
    /// is always a hedge.
    pub hedge: bool,
    /// Bounds on the hedge delay, which is learned from the target's
    /// recent times to first token (the upper bound before any is known).
    pub hedge_min: Duration,
    /// See `hedge_min`.
    pub hedge_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 1,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(5),
            first_token_timeout: Duration::from_secs(60),
            retry_within: Duration::from_secs(3),
            hedge: false,
            hedge_min: Duration::from_secs(3),
            hedge_max: Duration::from_secs(10),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try the same target again after this wait.
    Retry(Duration),
    /// Go on to the next target.
    MoveOn,
    /// Answer the client with this failure.
    Stop,
}

fn header<'a>(e: &'a BackendError, name: &str) -> Option<&'a str> {
    e.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// The wait the upstream asked for, if any.
pub fn retry_after(e: &BackendError) -> Option<Duration> {
    if let Some(ms) = header(e, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    header(e, "retry-after")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

impl RetryPolicy {
    /// The decision after attempt number `attempt` (0 for the first) failed.
    pub fn next(&self, e: &BackendError, attempt: u32) -> Next {
        if e.is_context_length_exceeded() {
            return Next::MoveOn; // another model may take the longer prompt
        }
        if !e.kind.retryable() {
            return Next::Stop;
        }
        let same_target_may_help = !e.kind.skipped()
            && !matches!(
                e.kind,
                FailureKind::FirstByteTimeout | FailureKind::Overloaded
            );
        let told_not_to = header(e, "x-should-retry") == Some("false");
        if attempt >= self.max_retries || !same_target_may_help || told_not_to {
            return Next::MoveOn;
        }
        match retry_after(e) {
            Some(wait) if wait <= self.max_retry_after => Next::Retry(wait),
            Some(_) => Next::MoveOn,
            None if e.kind == FailureKind::RateLimited => Next::MoveOn,
            None => Next::Retry(self.backoff(attempt)),
        }
    }

    /// Full-jitter exponential backoff before retry number `attempt + 1`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.backoff_max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests;
