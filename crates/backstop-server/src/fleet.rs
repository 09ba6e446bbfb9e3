//! Shadow verification shared by the replicas of a shared store: one
//! replica at a time verifies each target for all of them, and the others
//! follow the steps it reaches (`backstop_shadow::Fleet`), so the fleet
//! sends one replica's worth of shadow traffic. Every [`EVERY`] this
//! replica reports each target's state here (open, verifying, the step it
//! reached) and learns who verifies it and how many replicas have it open
//! (`backstop_breaker_open_replicas`). A store that does not answer for
//! [`GRACE`] leaves each replica to verify alone, as without a fleet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_router::lock;
use backstop_store::{Store, StoreError, Verification, Verifier};

use crate::App;

/// How often the replica reports and learns.
const EVERY: Duration = Duration::from_millis(250);
/// How long the fleet may go unheard before each replica verifies alone.
const GRACE: Duration = Duration::from_secs(2);

/// One target's state here, as last reported by its verifier.
#[derive(Clone)]
struct Here {
    open: bool,
    verifying: bool,
    /// A step reached, not yet told.
    publish: Option<f64>,
}

/// This replica's side of the fleet's verification.
#[derive(Default)]
pub(crate) struct Verifiers {
    here: Mutex<HashMap<String, Here>>,
    fleet: Mutex<HashMap<String, Verifier>>,
    /// The fleet went unheard past [`GRACE`]: each replica verifies alone.
    alone: std::sync::atomic::AtomicBool,
}

impl backstop_shadow::Fleet for Verifiers {
    fn report(&self, target: &str, open: bool, verifying: bool) {
        let mut here = lock(&self.here);
        let entry = here.entry(target.to_string()).or_insert(Here {
            open,
            verifying,
            publish: None,
        });
        entry.open = open;
        entry.verifying = verifying;
    }

    fn leads(&self, target: &str) -> bool {
        self.alone.load(std::sync::atomic::Ordering::Relaxed)
            || lock(&self.fleet).get(target).is_some_and(|v| v.leads)
    }

    fn reached(&self, target: &str) -> Option<(f64, u64)> {
        lock(&self.fleet).get(target).map(|v| (v.fraction, v.seq))
    }

    fn publish(&self, target: &str, fraction: f64) {
        if let Some(here) = lock(&self.here).get_mut(target) {
            here.publish = Some(fraction);
        }
    }
}

impl Verifiers {
    /// Reports every target's state and learns the fleet's.
    async fn sync(&self, app: &App, store: &dyn Store) -> Result<(), StoreError> {
        let here: Vec<(String, Here)> = lock(&self.here)
            .iter()
            .map(|(t, h)| (t.clone(), h.clone()))
            .collect();
        if here.is_empty() {
            return Ok(());
        }
        let reports = here
            .iter()
            .map(|(target, h)| Verification {
                target: target.clone(),
                open: h.open,
                verifying: h.verifying,
                publish: h.publish,
            })
            .collect();
        let Some(answers) = store.verifiers(reports).await? else {
            return Ok(());
        };
        {
            // Told: a step reached since is told next time.
            let mut now = lock(&self.here);
            for (target, sent) in &here {
                if let Some(h) = now.get_mut(target).filter(|h| h.publish == sent.publish) {
                    h.publish = None;
                }
            }
        }
        let mut fleet = lock(&self.fleet);
        for ((target, _), answer) in here.into_iter().zip(answers) {
            app.metrics
                .breaker_open_replicas
                .with_label_values(&[&target])
                .set(i64::from(answer.open_replicas));
            fleet.insert(target, answer);
        }
        Ok(())
    }
}

/// Shares verification from now on, when the store is shared and the
/// verifier runs.
pub(crate) fn spawn(app: Arc<App>, verifiers: Arc<Verifiers>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(gens) = app.generations.clone() else {
            return;
        };
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let synced = tokio::time::timeout(GRACE, verifiers.sync(&app, gens.store.as_ref()))
                .await
                .unwrap_or_else(|_| Err(StoreError::Unreachable("no answer".into())));
            let alone = &verifiers.alone;
            match synced {
                Ok(()) => {
                    failing_since = None;
                    if alone.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!("shadow verification is shared across replicas again");
                    }
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= GRACE
                        && !alone.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "the store does not answer ({e}): each replica verifies its targets \
                             alone until it does"
                        );
                    }
                }
            }
        }
    })
}
