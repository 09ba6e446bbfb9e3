//! A circuit breaker per target: closed, open, half-open.
//!
//! It opens on a run of consecutive failures, or when the failure rate over a
//! sliding window (with a minimum number of calls) reaches a threshold. An open
//! breaker refuses calls until its open period lapses; then one probe call is
//! let through (half-open): success closes it, failure opens it again for a
//! longer period (doubling per trip up to a cap, with jitter). Only failures
//! whose kind trips breakers count: client errors, auth failures, rate limits
//! and cancellations never do.
//!
//! [`CircuitBreaker::admit`] reads atomics only, so the hot path takes no
//! lock; recording an outcome takes a short one. Time is tokio's clock, so
//! tests drive every transition on paused time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use backstop_adapter::FailureKind;
use tokio::time::Instant;

/// When a breaker opens and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub consecutive_failures: u32,
    /// Failure rate (0..=1) over the window that opens the breaker.
    pub failure_rate: f64,
    /// Calls the window must hold before the rate counts.
    pub min_calls: usize,
    /// How far back the window looks.
    pub window: Duration,
    /// First open period.
    pub open_for: Duration,
    /// Longest open period, however often it trips.
    pub max_open_for: Duration,
    /// Fraction of the open period added or taken at random (0..1).
    pub jitter: f64,
    /// A streamed call still without its first token after this counts as
    /// a failure at once (it may still serve its client): a silent
    /// upstream trips the breaker without every caller waiting out its
    /// deadline. `None` turns it off.
    pub slow_call: Option<Duration>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(120),
            jitter: 0.2,
            slow_call: Some(Duration::from_secs(20)),
        }
    }
}

/// The breaker's state, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the open period lapses.
    Open,
    /// One probe call is in flight; its outcome decides.
    HalfOpen,
    /// Recovery was verified (by shadow traffic): a growing fraction of live
    /// calls is admitted, and any failure opens the breaker again.
    Recovering,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            3 => BreakerState::Recovering,
            _ => BreakerState::Closed,
        }
    }

    /// Stable lower-case name, for metrics and status pages.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Recovering => "recovering",
        }
    }
}

/// What an operator has forced, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// The breaker decides.
    No,
    /// Always refuse.
    Open,
    /// Always admit.
    Closed,
}

/// How a call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// It failed this way.
    Failure(FailureKind),
}

/// Calls and failures over the sliding window, kept in slices of a tenth of
/// it, so that recording costs the same at any request rate.
#[derive(Default)]
struct Window {
    /// (slice start, calls, failures), oldest first.
    slices: VecDeque<(Instant, u64, u64)>,
    calls: u64,
    failures: u64,
}

/// Slices per window.
const SLICES: u32 = 10;

impl Window {
    fn record(&mut self, now: Instant, failed: bool, length: Duration) {
        let horizon = now.checked_sub(length);
        while let Some(&(start, calls, failures)) = self.slices.front() {
            if horizon.is_some_and(|h| start + length / SLICES <= h) {
                self.slices.pop_front();
                self.calls -= calls;
                self.failures -= failures;
            } else {
                break;
            }
        }
        match self.slices.back_mut() {
            Some(slice) if now < slice.0 + length / SLICES => {
                slice.1 += 1;
                slice.2 += u64::from(failed);
            }
            _ => self.slices.push_back((now, 1, u64::from(failed))),
        }
        self.calls += 1;
        self.failures += u64::from(failed);
    }

    fn clear(&mut self) {
        *self = Window::default();
    }
}

struct Stats {
    consecutive: u32,
    window: Window,
    trips: u32,
    /// The latest failures that count, newest last.
    recent: VecDeque<(Instant, FailureKind)>,
    /// What the latest of them said.
    last_message: Option<String>,
}

/// One target's breaker.
pub struct CircuitBreaker {
    config: BreakerConfig,
    base: Instant,
    state: AtomicU8,
    /// Nanoseconds after `base` when an open breaker may probe.
    open_until: AtomicU64,
    /// A half-open probe is in flight.
    probing: AtomicBool,
    forced: AtomicU8,
    stats: Mutex<Stats>,
    /// What active health checks say; an unhealthy target is not admitted.
    healthy: AtomicBool,
    /// Consecutive probe results of the same kind: positive for successes,
    /// negative for failures.
    probe_streak: std::sync::atomic::AtomicI32,
    /// Recovery is verified elsewhere (shadow traffic): a lapsed open period
    /// admits no live probe.
    verified: AtomicBool,
    /// While recovering, the fraction of calls admitted (f64 bits).
    admitted: AtomicU64,
    /// Nanoseconds after `base` when it last opened.
    opened_at: AtomicU64,
    /// The state last published to `listener` (forced states included).
    published: AtomicU8,
    /// Told of every change of state, whoever caused it.
    listener: OnceLock<Listener>,
}

/// What a breaker tells of its changes of state.
pub type Listener = Box<dyn Fn(BreakerState) + Send + Sync>;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const RECOVERING: u8 = 3;
/// Failure kinds kept for the status view.
const RECENT: usize = 8;

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            base: Instant::now(),
            state: AtomicU8::new(CLOSED),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            forced: AtomicU8::new(0),
            stats: Mutex::new(Stats {
                consecutive: 0,
                window: Window::default(),
                trips: 0,
                recent: VecDeque::new(),
                last_message: None,
            }),
            healthy: AtomicBool::new(true),
            probe_streak: std::sync::atomic::AtomicI32::new(0),
            verified: AtomicBool::new(false),
            admitted: AtomicU64::new(0),
            opened_at: AtomicU64::new(0),
            published: AtomicU8::new(CLOSED),
            listener: OnceLock::new(),
        }
    }

    /// Tells `listener` of every change of state from now on: trips,
    /// probes, closes, verified recovery and operators' forcing alike. Only
    /// the first listener set is kept.
    pub fn on_transition(&self, listener: Listener) {
        let _ = self.listener.set(listener);
    }

    /// The state as it acts: what an operator forced, else its own.
    fn acting(&self) -> u8 {
        match self.forced() {
            Forced::Open => OPEN,
            Forced::Closed => CLOSED,
            Forced::No => self.state.load(Ordering::Acquire),
        }
    }

    /// Publishes the state if it changed since last published; each change
    /// is told once, however many threads saw it.
    fn publish(&self) {
        let now = self.acting();
        if self.published.swap(now, Ordering::AcqRel) != now {
            if let Some(listener) = self.listener.get() {
                listener(BreakerState::from_u8(now));
            }
        }
    }

    /// After how long a pending streamed call counts as a failure.
    pub fn slow_call(&self) -> Option<Duration> {
        self.config.slow_call
    }

    /// Whether active health checks consider the target healthy.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Feeds one health-check result: `unhealthy_after` failures in a row
    /// take the target out of service, `healthy_after` successes in a row
    /// bring it back.
    pub fn record_probe(&self, ok: bool, healthy_after: u32, unhealthy_after: u32) {
        let streak = self.probe_streak.load(Ordering::Acquire);
        let streak = match (ok, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.probe_streak.store(streak, Ordering::Release);
        if ok && streak >= healthy_after as i32 {
            self.healthy.store(true, Ordering::Release);
        } else if !ok && -streak >= unhealthy_after as i32 {
            self.healthy.store(false, Ordering::Release);
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// The state now (an open breaker whose period lapsed reads half-open,
    /// unless its recovery is verified elsewhere: then it stays open until
    /// [`CircuitBreaker::recover`] lets traffic back).
    pub fn state(&self) -> BreakerState {
        let state = self.state.load(Ordering::Acquire);
        if state == OPEN
            && !self.verified.load(Ordering::Acquire)
            && self.nanos(Instant::now()) >= self.open_until.load(Ordering::Acquire)
        {
            return BreakerState::HalfOpen;
        }
        BreakerState::from_u8(state)
    }

    /// Hands recovery to a verifier: once the open period lapses no live
    /// call is admitted until [`CircuitBreaker::recover`] says so.
    pub fn set_verified(&self, on: bool) {
        self.verified.store(on, Ordering::Release);
    }

    /// Whether its recovery is verified elsewhere (see
    /// [`CircuitBreaker::set_verified`]).
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    /// Lets `fraction` (0..=1) of live calls through an open or recovering
    /// breaker, chosen at random; any failure among them opens it again.
    /// A fraction of 1 closes it.
    pub fn recover(&self, fraction: f64) {
        if fraction >= 1.0 {
            self.close();
        } else {
            self.admitted
                .store(fraction.max(0.0).to_bits(), Ordering::Release);
            self.state.store(RECOVERING, Ordering::Release);
        }
        self.publish();
    }

    /// While recovering, the fraction of calls admitted; 1 when closed, 0
    /// when open.
    pub fn admitted_fraction(&self) -> f64 {
        match self.state.load(Ordering::Acquire) {
            CLOSED => 1.0,
            RECOVERING => f64::from_bits(self.admitted.load(Ordering::Acquire)),
            _ => 0.0,
        }
    }

    /// How long ago it last opened, while it is not closed.
    pub fn open_since(&self) -> Option<Duration> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return None;
        }
        let at = self.opened_at.load(Ordering::Acquire);
        Some(Duration::from_nanos(
            self.nanos(Instant::now()).saturating_sub(at),
        ))
    }

    /// The latest failures that count against it, newest last, with how
    /// long ago each was.
    pub fn recent_failures(&self) -> Vec<(FailureKind, Duration)> {
        let now = Instant::now();
        crate::lock(&self.stats)
            .recent
            .iter()
            .map(|(at, kind)| (*kind, now.saturating_duration_since(*at)))
            .collect()
    }

    /// What the latest failure that counts against it said: the cause a
    /// client refused while it is open is told.
    pub fn last_failure(&self) -> Option<String> {
        crate::lock(&self.stats).last_message.clone()
    }

    /// Opens it again at once with its open period already over, so that
    /// verification starts afresh (an operator's restart).
    pub fn reopen_lapsed(&self) {
        self.open_until
            .store(self.nanos(Instant::now()), Ordering::Release);
        self.opened_at
            .store(self.nanos(Instant::now()), Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        self.publish();
    }

    /// What an operator forced.
    pub fn forced(&self) -> Forced {
        match self.forced.load(Ordering::Acquire) {
            1 => Forced::Open,
            2 => Forced::Closed,
            _ => Forced::No,
        }
    }

    /// Whether the target may take calls now (or soon, as a probe): not
    /// forced open, and healthy with its breaker not open; or forced closed.
    pub fn may_serve(&self) -> bool {
        match self.forced() {
            Forced::Open => false,
            Forced::Closed => true,
            Forced::No => self.healthy() && self.state() != BreakerState::Open,
        }
    }

    /// Forces the breaker open or closed, or hands it back to its own rules
    /// (closed, with a clean history).
    pub fn force(&self, forced: Forced) {
        let v = match forced {
            Forced::No => 0,
            Forced::Open => 1,
            Forced::Closed => 2,
        };
        self.forced.store(v, Ordering::Release);
        if forced == Forced::No {
            self.close();
        }
        self.publish();
    }

    /// Whether a call may go to the target now. In half-open state only one
    /// probe is admitted until its outcome is recorded.
    pub fn admit(&self) -> bool {
        match self.forced() {
            Forced::Open => return false,
            Forced::Closed => return true,
            Forced::No => {}
        }
        if !self.healthy() {
            return false;
        }
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            RECOVERING => {
                rand::random::<f64>() < f64::from_bits(self.admitted.load(Ordering::Acquire))
            }
            OPEN => {
                if self.verified.load(Ordering::Acquire)
                    || self.nanos(Instant::now()) < self.open_until.load(Ordering::Acquire)
                {
                    return false;
                }
                // The open period lapsed: the first caller becomes the probe.
                if self
                    .probing
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.state.store(HALF_OPEN, Ordering::Release);
                    self.publish();
                    true
                } else {
                    false
                }
            }
            _ => false, // half-open: the probe is out
        }
    }

    /// Records how an admitted call ended.
    pub fn record(&self, outcome: Outcome) {
        self.settle(outcome);
        self.publish();
    }

    fn settle(&self, outcome: Outcome) {
        let failed = match outcome {
            Outcome::Success => false,
            Outcome::Failure(kind) if kind.trips_breaker() => true,
            Outcome::Failure(_) => {
                // Not the target's fault: a probe that ends so proves nothing.
                self.probing.store(false, Ordering::Release);
                if self.state.load(Ordering::Acquire) == HALF_OPEN {
                    self.state.store(OPEN, Ordering::Release);
                }
                return;
            }
        };
        let now = Instant::now();
        let mut stats = crate::lock(&self.stats);
        if let Outcome::Failure(kind) = outcome {
            if stats.recent.len() == RECENT {
                stats.recent.pop_front();
            }
            stats.recent.push_back((now, kind));
        }
        let state = self.state.load(Ordering::Acquire);
        if state == OPEN {
            return; // a call admitted before the breaker opened says nothing new
        }
        if state == RECOVERING {
            drop(stats);
            if failed {
                self.trip(now);
            }
            return;
        }
        if state == HALF_OPEN {
            drop(stats);
            if failed {
                self.trip(now);
            } else {
                self.close();
            }
            return;
        }
        stats.consecutive = if failed { stats.consecutive + 1 } else { 0 };
        stats.window.record(now, failed, self.config.window);
        let (calls, failures) = (stats.window.calls, stats.window.failures);
        let rate_trips = calls >= self.config.min_calls as u64
            && failures as f64 >= self.config.failure_rate * calls as f64;
        let run_trips = stats.consecutive >= self.config.consecutive_failures;
        drop(stats);
        if failed && (rate_trips || run_trips) {
            self.trip(now);
        }
    }

    /// Opens the breaker for the next, longer period.
    fn trip(&self, now: Instant) {
        let mut stats = crate::lock(&self.stats);
        stats.trips = stats.trips.saturating_add(1);
        stats.consecutive = 0;
        stats.window.clear();
        let doubling = 2u32.saturating_pow(stats.trips.saturating_sub(1).min(20));
        let period = self
            .config
            .open_for
            .saturating_mul(doubling)
            .min(self.config.max_open_for);
        let jitter = self.config.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * rand::random::<f64>() - 1.0);
        let period = period.mul_f64(factor.max(0.0));
        self.open_until
            .store(self.nanos(now + period), Ordering::Release);
        self.opened_at.store(self.nanos(now), Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
    }

    fn close(&self) {
        let mut stats = crate::lock(&self.stats);
        stats.trips = 0;
        stats.consecutive = 0;
        stats.window.clear();
        self.probing.store(false, Ordering::Release);
        self.state.store(CLOSED, Ordering::Release);
    }

    /// How often it has tripped since it last closed.
    pub fn trips(&self) -> u32 {
        crate::lock(&self.stats).trips
    }

    /// How long until an open breaker may probe (zero when not open).
    pub fn open_remaining(&self) -> Duration {
        if self.state.load(Ordering::Acquire) != OPEN {
            return Duration::ZERO;
        }
        let until = self.open_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.nanos(Instant::now())))
    }
}

/// A call its breaker admitted, whose outcome is still to come: for a
/// stream, when it ends. Dropped without an outcome (the client left), it
/// counts as cancelled, which is neither success nor failure and frees a
/// half-open probe's place.
pub struct Attempt {
    breaker: Arc<CircuitBreaker>,
    settled: bool,
}

impl Attempt {
    /// An admitted call on `breaker`.
    pub fn new(breaker: Arc<CircuitBreaker>) -> Self {
        Attempt {
            breaker,
            settled: false,
        }
    }

    /// Records how the call ended: once, whatever happens after.
    pub fn record(mut self, outcome: Outcome) {
        self.settled = true;
        self.breaker.record(outcome);
    }

    /// Records that the call failed, and what it said.
    pub fn fail(self, kind: FailureKind, message: &str) {
        if kind.trips_breaker() {
            /// A message is kept to this many characters.
            const KEPT: usize = 300;
            let kept = match message.char_indices().nth(KEPT) {
                Some((end, _)) => format!("{}…", &message[..end]),
                None => message.to_string(),
            };
            crate::lock(&self.breaker.stats).last_message = Some(kept);
        }
        self.record(Outcome::Failure(kind));
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker
                .record(Outcome::Failure(FailureKind::Cancelled));
        }
    }
}

#[cfg(test)]
mod tests;
