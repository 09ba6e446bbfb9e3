//! Active health checks: each checked target is probed at an interval, and the
//! results feed its breaker (`record_probe`): enough failures in a row take it
//! out of service, enough successes bring it back.

use std::sync::Arc;
use std::time::Duration;

use backstop_adapter::{Backend, Request};
use tokio::task::JoinHandle;

use crate::breaker::CircuitBreaker;
use crate::observer::Observer;

/// What a probe asks of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET /v1/models`: cheap, costs no tokens.
    Models,
    /// A one-token chat completion with this model: proves generation works.
    Completion(String),
}

/// How targets are probed.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// The probe; `None` turns active checks off.
    pub probe: Option<Probe>,
    /// Time between probes.
    pub interval: Duration,
    /// A probe slower than this failed.
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy target healthy.
    pub healthy_after: u32,
    /// Failures in a row that make a healthy target unhealthy.
    pub unhealthy_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe: Some(Probe::Models),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_after: 2,
            unhealthy_after: 3,
        }
    }
}

async fn probe_once(backend: &dyn Backend, probe: &Probe, timeout: Duration) -> bool {
    let outcome = match probe {
        Probe::Models => tokio::time::timeout(timeout, backend.models())
            .await
            .map(|r| r.is_ok()),
        Probe::Completion(model) => {
            let body = serde_json::json!({"model": model, "max_tokens": 1,
                "messages": [{"role": "user", "content": "ping"}]});
            let Ok(req) = Request::parse_chat(body.to_string().as_bytes()) else {
                return false;
            };
            tokio::time::timeout(timeout, backend.complete(&req))
                .await
                .map(|r| r.is_ok())
        }
    };
    outcome.unwrap_or(false)
}

/// Starts probing `backend` with `config`, feeding what it finds to
/// `breaker`; `None` when its probe is off. The task runs until its handle
/// is aborted.
pub fn spawn(
    backend: Arc<dyn Backend>,
    breaker: Arc<CircuitBreaker>,
    config: &HealthConfig,
    observer: Arc<dyn Observer>,
) -> Option<JoinHandle<()>> {
    let probe = config.probe.clone()?;
    let config = config.clone();
    Some(tokio::spawn(async move {
        // The first probe comes one interval after start, not in a burst at boot.
        let first = tokio::time::Instant::now() + config.interval;
        let mut ticks = tokio::time::interval_at(first, config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let ok = probe_once(backend.as_ref(), &probe, config.timeout).await;
            observer.probe(backend.name(), ok);
            let was = breaker.healthy();
            breaker.record_probe(ok, config.healthy_after, config.unhealthy_after);
            if was != breaker.healthy() {
                tracing::warn!(
                    target = backend.name(),
                    "health checks: target is now {}",
                    if breaker.healthy() {
                        "healthy"
                    } else {
                        "unhealthy"
                    }
                );
            }
        }
    }))
}
