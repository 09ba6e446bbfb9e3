//! A client-side rate limit per upstream, kept in step with what the upstream
//! says. Token buckets for requests and tokens per minute (when configured)
//! refill continuously; every response's `x-ratelimit-remaining-*` and
//! `x-ratelimit-reset-*` headers (Go-style durations such as `6m0s`) pull the
//! buckets down to the upstream's own count, and an exhausted count, or a 429,
//! holds the target back until the reset or the `Retry-After`. A held-back
//! target is skipped, so requests go to the next target instead of being sent
//! to earn a 429.
//!
//! Replicas that share a store share each limit: every moment a replica
//! reports what it spent and what the upstream said ([`RateLimit::report`]),
//! and takes back its share of what the fleet has left
//! ([`RateLimit::share`]): its part of the level, refilled at its part of
//! the rate, and the fleet's hold.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use backstop_adapter::Headers;
use tokio::time::Instant;

/// One bucket: a capacity per minute, refilled continuously.
#[derive(Debug)]
struct Bucket {
    /// This replica's part of the capacity: all of it, unless replicas
    /// share it.
    per_minute: f64,
    /// The capacity configured, for the whole fleet.
    configured: f64,
    level: f64,
    at: Instant,
    /// Spent since the last report.
    spent: f64,
    /// The upstream's latest count, since the last report.
    remaining: Option<f64>,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        Bucket {
            per_minute: per_minute as f64,
            configured: per_minute as f64,
            level: per_minute as f64,
            at: now,
            spent: 0.0,
            remaining: None,
        }
    }

    fn take(&mut self, n: f64) {
        self.level -= n;
        self.spent += n;
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Time until `n` is available (zero when it is).
    fn wait_for(&self, n: f64) -> Duration {
        if self.level >= n {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((n - self.level) * 60.0 / self.per_minute.max(f64::MIN_POSITIVE))
    }
}

#[derive(Debug)]
struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// The upstream said to wait (remaining 0, or a 429) until then.
    held_until: Option<Instant>,
}

/// A target's rate limit.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<State>,
}

/// Parses a Go-style duration: `6m0s`, `1.5s`, `20ms`, `1h2m3s`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl RateLimit {
    /// A limit of these many requests and tokens per minute (`None`: only
    /// what the upstream's headers say).
    pub fn new(requests_per_minute: Option<u64>, tokens_per_minute: Option<u64>) -> Self {
        let now = Instant::now();
        RateLimit {
            state: Mutex::new(State {
                requests: requests_per_minute.map(|n| Bucket::new(n, now)),
                tokens: tokens_per_minute.map(|n| Bucket::new(n, now)),
                held_until: None,
            }),
        }
    }

    /// Whether the limit counts tokens (so callers need to estimate them).
    pub fn counts_tokens(&self) -> bool {
        self.lock().tokens.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one request and `tokens` from the buckets, or says how long
    /// until they would be there.
    pub fn acquire(&self, tokens: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut s = self.lock();
        if let Some(until) = s.held_until {
            if until > now {
                return Err(until - now);
            }
            s.held_until = None;
        }
        let tokens = tokens as f64;
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut s.requests {
            b.refill(now);
            wait = wait.max(b.wait_for(1.0));
        }
        if let Some(b) = &mut s.tokens {
            b.refill(now);
            // A request bigger than the whole bucket waits for a full one.
            wait = wait.max(b.wait_for(tokens.min(b.per_minute)));
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut s.requests {
            b.take(1.0);
        }
        if let Some(b) = &mut s.tokens {
            b.take(tokens.min(b.per_minute));
        }
        Ok(())
    }

    /// Takes `tokens` spent after the fact (a usage report) from the token
    /// bucket, which may go below zero: later requests wait until it has
    /// refilled past it.
    pub fn charge(&self, tokens: u64) {
        let now = Instant::now();
        if let Some(b) = &mut self.lock().tokens {
            b.refill(now);
            b.take(tokens as f64);
        }
    }

    /// Brings the buckets in step with a response's rate-limit headers; a
    /// 429 holds the target back for its `Retry-After` (a second without one).
    pub fn observe(&self, headers: &Headers, status: u16) {
        let now = Instant::now();
        let mut s = self.lock();
        let hold = |until: Instant, s: &mut State| {
            s.held_until = Some(s.held_until.map_or(until, |h| h.max(until)));
        };
        for (kind, bucket) in [("requests", 0), ("tokens", 1)] {
            let remaining = header(headers, &format!("x-ratelimit-remaining-{kind}"))
                .and_then(|v| v.trim().parse::<f64>().ok());
            let reset =
                header(headers, &format!("x-ratelimit-reset-{kind}")).and_then(parse_go_duration);
            let Some(remaining) = remaining else { continue };
            let slot = if bucket == 0 {
                &mut s.requests
            } else {
                &mut s.tokens
            };
            if let Some(b) = slot {
                b.refill(now);
                b.level = b.level.min(remaining);
                b.remaining = Some(remaining);
            }
            if remaining <= 0.0 {
                hold(now + reset.unwrap_or(Duration::from_secs(1)), &mut s);
            }
        }
        if status == 429 {
            let wait = header(headers, "retry-after-ms")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
                .or_else(|| {
                    header(headers, "retry-after")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .map(|s| Duration::from_secs_f64(s.max(0.0)))
                })
                .unwrap_or(Duration::from_secs(1));
            hold(now + wait, &mut s);
        }
    }
}

/// What one replica tells the fleet about a limit since its last report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Requests and tokens per minute configured (`None`: not counted).
    pub per_minute: [Option<f64>; 2],
    /// Requests and tokens spent.
    pub spent: [f64; 2],
    /// The upstream's latest count of requests and tokens left.
    pub remaining: [Option<f64>; 2],
    /// How long the upstream said to wait (a 429, or nothing left).
    pub held_for: Duration,
}

/// This replica's share of a limit the fleet shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    /// Requests and tokens the fleet has left.
    pub level: [Option<f64>; 2],
    /// How long the fleet waits (the upstream said so to one of them).
    pub held_for: Duration,
    /// Replicas sharing it, this one included.
    pub replicas: u32,
}

impl RateLimit {
    /// What this replica spent and heard since the last report.
    pub fn report(&self) -> Report {
        let now = Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        let held_for = s
            .held_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        let mut report = Report {
            per_minute: [None, None],
            spent: [0.0, 0.0],
            remaining: [None, None],
            held_for,
        };
        for (i, bucket) in [&mut s.requests, &mut s.tokens].into_iter().enumerate() {
            if let Some(b) = bucket {
                report.per_minute[i] = Some(b.configured);
                report.spent[i] = std::mem::take(&mut b.spent);
                report.remaining[i] = b.remaining.take();
            }
        }
        report
    }

    /// Takes this replica's share of what the fleet has left: its part of
    /// the level, refilled at its part of the rate; `None` (the fleet cannot
    /// be reached): the whole configured limit, as a replica alone.
    pub fn share(&self, share: Option<&Share>) {
        let now = Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        let part = share.map_or(1.0, |sh| 1.0 / f64::from(sh.replicas.max(1)));
        for (i, bucket) in [&mut s.requests, &mut s.tokens].into_iter().enumerate() {
            if let Some(b) = bucket {
                b.refill(now);
                b.per_minute = b.configured * part;
                b.level = match share.and_then(|sh| sh.level[i]) {
                    Some(level) => level * part,
                    None => b.level.min(b.per_minute),
                };
            }
        }
        if let Some(held_for) = share.map(|sh| sh.held_for).filter(|h| !h.is_zero()) {
            let until = now + held_for;
            s.held_until = Some(s.held_until.map_or(until, |h| h.max(until)));
        }
    }
}

#[cfg(test)]
mod tests;
