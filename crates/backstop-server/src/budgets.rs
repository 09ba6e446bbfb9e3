//! Rate limits the replicas of a shared store share: every [`EVERY`] this
//! replica reports what it spent of each upstream key's limit (and what the
//! upstream said) and of each client identity's, and takes its share of
//! what the fleet has left
//! (`RateLimit::share`). A store that cannot be reached for [`GRACE`]
//! leaves each replica its whole configured limit, as if alone: more 429s
//! from the upstream, never an outage; the log and
//! `backstop_rate_budgets_shared` say so.

use std::sync::Arc;
use std::time::Duration;

use backstop_store::{Budget, StoreError};
use backstop_upstream::ratelimit::{RateLimit, Report, Share};

use crate::generations::Generations;
use crate::{App, Snapshot};

/// How often the replica reports and takes its shares.
const EVERY: Duration = Duration::from_millis(250);
/// How long the shares may go unrenewed before each replica keeps its own
/// limits.
const GRACE: Duration = Duration::from_secs(2);

/// Every rate limit a snapshot holds, by the name replicas share it by:
/// each upstream key's, and each limited identity's.
fn limits(snapshot: &Snapshot) -> Vec<(String, &RateLimit)> {
    let upstreams = snapshot.upstreams.iter().flat_map(|u| u.rate_limits());
    let identities = snapshot.auth.iter().flat_map(|a| a.rate_limits());
    upstreams.chain(identities).collect()
}

/// Reports and takes shares once; whether the store shares budgets.
pub(crate) async fn sync(app: &App, gens: &Generations) -> Result<bool, StoreError> {
    let snapshot = app.snapshot();
    let limits = limits(&snapshot);
    let budgets: Vec<Budget> = limits
        .iter()
        .map(|(name, limit)| budget(name.clone(), limit.report()))
        .collect();
    let Some(shares) = gens.store.share_budgets(budgets).await? else {
        return Ok(false);
    };
    for ((_, limit), shared) in limits.iter().zip(shares) {
        limit.share(Some(&Share {
            level: shared.level,
            held_for: Duration::from_millis(shared.held_ms),
            replicas: shared.replicas,
        }));
    }
    Ok(true)
}

fn budget(name: String, report: Report) -> Budget {
    Budget {
        name,
        per_minute: report.per_minute,
        spent: report.spent,
        remaining: report.remaining,
        held_ms: u64::try_from(report.held_for.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Every limit as this replica's alone.
fn alone(app: &App) {
    for (_, limit) in limits(&app.snapshot()) {
        limit.share(None);
    }
}

/// Shares the budgets from now on, when the store is shared; the first
/// sharing is done before this returns, so the first request spends its
/// share, not the whole limit.
pub(crate) async fn spawn(app: Arc<App>) -> Option<tokio::task::JoinHandle<()>> {
    let gens = app.generations.clone()?;
    let first = tokio::time::timeout(GRACE, sync(&app, &gens)).await;
    match first.unwrap_or_else(|_| Err(StoreError::Unreachable("no answer".into()))) {
        Ok(false) => return None,
        Ok(true) => app.metrics.rate_budgets_shared.set(1),
        Err(e) => tracing::warn!("rate limits are not shared yet, each replica keeps its own: {e}"),
    }
    Some(tokio::spawn(async move {
        let mut shared = true;
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let synced = tokio::time::timeout(GRACE, sync(&app, &gens)).await;
            match synced.unwrap_or_else(|_| Err(StoreError::Unreachable("no answer".into()))) {
                Ok(_) => {
                    failing_since = None;
                    if !shared {
                        tracing::info!("rate limits are shared across replicas again");
                        shared = true;
                    }
                    app.metrics.rate_budgets_shared.set(1);
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if shared && since.elapsed() >= GRACE {
                        tracing::warn!(
                            "the store does not answer ({e}): each replica keeps its own rate \
                             limits until it does"
                        );
                        shared = false;
                        app.metrics.rate_budgets_shared.set(0);
                    }
                    if !shared {
                        alone(&app);
                    }
                }
            }
        }
    }))
}
