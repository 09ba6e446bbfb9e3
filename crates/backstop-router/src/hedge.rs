//! Hedged first tokens: when a target has produced no first token after a
//! delay learned from its recent times to first token, the next target is
//! started too, and whichever answers first serves; the other is dropped,
//! which cancels it. While a call is pending past its breaker's slow-call
//! threshold it already counts as a failure there, so a silent upstream
//! trips its breaker without waiting out every deadline.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use backstop_adapter::{BackendError, BoxFuture, FailureKind, Reply};
use tokio::time::Instant;

use crate::breaker::Attempt;
use crate::lock;
use crate::retry::RetryPolicy;

/// Times to first token kept per target.
const SAMPLES: usize = 64;

/// The share of first tokens that come before the hedge delay.
const QUANTILE: f64 = 0.95;

/// The weight of each new time in the moving average.
const EWMA_WEIGHT: f64 = 0.2;

/// A target's recent times to first token: the last [`SAMPLES`], and their
/// exponentially weighted moving average.
#[derive(Default)]
pub struct FirstTokenTimes {
    samples: Mutex<VecDeque<Duration>>,
    /// Microseconds; 0 before the first.
    ewma: AtomicU64,
}

impl FirstTokenTimes {
    /// Notes one time to first token.
    pub fn record(&self, took: Duration) {
        let mut samples = lock(&self.samples);
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(took);
        let now = took.as_micros().max(1) as f64;
        let before = self.ewma.load(Ordering::Relaxed);
        let next = if before == 0 {
            now
        } else {
            before as f64 * (1.0 - EWMA_WEIGHT) + now * EWMA_WEIGHT
        };
        self.ewma.store(next.max(1.0) as u64, Ordering::Relaxed);
    }

    /// The moving average of its times to first token, in microseconds; 0
    /// before any is known.
    pub fn ewma_micros(&self) -> u64 {
        self.ewma.load(Ordering::Relaxed)
    }

    /// The recent time to first token that `q` (0..=1) of them were within.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted: Vec<Duration> = lock(&self.samples).iter().copied().collect();
        sorted.sort_unstable();
        let last = sorted.len().checked_sub(1)?;
        sorted
            .get((last as f64 * q.clamp(0.0, 1.0)).round() as usize)
            .copied()
    }

    /// How long to wait for this target's first token before hedging: a
    /// high percentile of its recent ones, within the policy's bounds (the
    /// upper bound before any is known).
    pub fn delay(&self, policy: &RetryPolicy) -> Duration {
        self.quantile(QUANTILE).map_or(policy.hedge_max, |d| {
            d.clamp(policy.hedge_min, policy.hedge_max)
        })
    }
}

/// A call's result: the reply and the time waited for it.
pub(crate) type Called<'r, T> = BoxFuture<'r, Result<(Reply<T>, Duration), BackendError>>;

/// A call under way, and its breaker's record of it.
pub(crate) struct Call<'r, T> {
    pub future: Called<'r, T>,
    pub pending: Option<Attempt>,
    /// When it counts as a slow call (a failure) if still pending.
    pub slow_at: Option<Instant>,
}

/// A finished call: its result, and its breaker's record still to settle.
pub(crate) type Ended<T> = (Result<(Reply<T>, Duration), BackendError>, Option<Attempt>);

/// How a call, perhaps hedged, ended.
pub(crate) struct Raced<T> {
    /// The first target's call; `None` when it was dropped (cancelled)
    /// because the hedge answered first.
    pub primary: Option<Ended<T>>,
    /// The hedge: `None` when none was started, `Some(None)` when it was
    /// dropped because the first target answered first.
    pub hedge: Option<Option<Ended<T>>>,
}

/// The hedge's delay and how to start it (`None`: its target cannot take it).
pub(crate) type Hedge<'r, T> = (
    Duration,
    Box<dyn FnOnce() -> Option<Call<'r, T>> + Send + 'r>,
);

/// Waits for `primary`; after the hedge's delay without an answer, starts
/// the hedge and takes whichever answers first. When one fails, the other
/// is still waited for.
pub(crate) async fn race<'r, T>(mut primary: Call<'r, T>, hedge: Option<Hedge<'r, T>>) -> Raced<T> {
    let (hedge_at, mut start_hedge) = match hedge {
        Some((delay, start)) => (Some(Instant::now() + delay), Some(start)),
        None => (None, None),
    };
    let mut second: Option<Call<'r, T>> = None;
    let mut primary_failed: Option<Ended<T>> = None;
    let mut hedge_failed: Option<Ended<T>> = None;
    loop {
        let running = primary_failed.is_none();
        let slow_at = primary
            .slow_at
            .filter(|_| running && primary.pending.is_some());
        let hedge_due = hedge_at.filter(|_| running && start_hedge.is_some());
        tokio::select! {
            result = &mut primary.future, if running => {
                let ended = (result, primary.pending.take());
                if ended.0.is_err() && second.is_some() {
                    primary_failed = Some(ended); // the hedge may still answer
                } else {
                    let hedge = match second {
                        Some(_) => Some(None),
                        None => hedge_failed.map(Some),
                    };
                    return Raced { primary: Some(ended), hedge };
                }
            }
            result = poll_some(second.as_mut().map(|s| &mut s.future)) => {
                let ended = (result, second.take().and_then(|s| s.pending));
                if ended.0.is_ok() || primary_failed.is_some() {
                    return Raced { primary: primary_failed, hedge: Some(Some(ended)) };
                }
                hedge_failed = Some(ended); // the first target may still answer
            }
            () = sleep_until_some(slow_at) => {
                if let Some(p) = primary.pending.take() {
                    p.fail(FailureKind::FirstByteTimeout, "its first byte was slower than the breaker's `slow_call_ms`");
                }
            }
            () = sleep_until_some(hedge_due) => {
                second = start_hedge.take().and_then(|start| start());
            }
        }
    }
}

/// Waits for the future if there is one, or forever.
async fn poll_some<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
