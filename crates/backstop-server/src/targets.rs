//! The registry of targets: every upstream and the local model a
//! configuration names, kept apart from the route table that uses them, so
//! that a reload can keep what each target has learned.
//!
//! A target whose settings (its own, its breaker's, its health checks')
//! did not change keeps its backend (the upstream's connection pool, keys
//! and rate limits, or the loaded model), its breaker, its first-token
//! history and its health checks. A changed or new one starts fresh. A
//! removed one stops being probed at once and drains: the requests still
//! using it hold it until they end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use backstop_adapter::Backend;
use backstop_config::Config;
use backstop_local::{LocalBackend, LocalConfig};
use backstop_router::breaker::BreakerConfig;
use backstop_router::health::{self, HealthConfig};
use backstop_router::observer::Observer;
use backstop_router::{lock, TargetState};
use backstop_upstream::{Upstream, UpstreamConfig};
use tokio::task::JoinHandle;

use crate::StartError;

/// What a target is: a reload that finds these equal keeps the target.
#[derive(PartialEq)]
enum Settings {
    Upstream(Box<UpstreamConfig>, BreakerConfig, Option<HealthConfig>),
    Local(Box<LocalConfig>, BreakerConfig),
}

/// One target and what it has learned.
pub(crate) struct Member {
    settings: Settings,
    pub(crate) backend: Arc<dyn Backend>,
    /// The same target as an upstream, for its keys' state.
    pub(crate) upstream: Option<Arc<Upstream>>,
    pub(crate) state: TargetState,
    /// Its health checks, once started.
    health: Mutex<Option<JoinHandle<()>>>,
}

impl Member {
    fn new(settings: Settings) -> Result<Self, StartError> {
        let (backend, upstream, breaker): (Arc<dyn Backend>, _, _) = match &settings {
            Settings::Upstream(config, breaker, _) => {
                let upstream = Arc::new(Upstream::new((**config).clone()).map_err(|source| {
                    StartError::Upstream {
                        name: config.name.clone(),
                        source,
                    }
                })?);
                (upstream.clone(), Some(upstream), breaker.clone())
            }
            Settings::Local(config, breaker) => (
                Arc::new(LocalBackend::start((**config).clone())),
                None,
                breaker.clone(),
            ),
        };
        Ok(Member {
            settings,
            backend,
            upstream,
            state: TargetState::new(breaker),
            health: Mutex::new(None),
        })
    }

    fn stop_health(&self) {
        if let Some(health) = lock(&self.health).take() {
            health.abort();
        }
    }
}

/// Which targets a reload kept, started and removed, by name.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Changes {
    /// Unchanged: kept with their state.
    pub kept: Vec<String>,
    /// New or changed: started afresh.
    pub started: Vec<String>,
    /// Gone: draining.
    pub removed: Vec<String>,
}

/// Every target, by name.
#[derive(Default)]
pub(crate) struct Targets {
    members: HashMap<String, Arc<Member>>,
}

/// Each target's settings in `config`, in its order (upstreams, then the
/// local model).
fn settings(config: &Config) -> Vec<(String, Settings)> {
    let breaker = |name: &str| config.breakers.get(name).cloned().unwrap_or_default();
    let mut all: Vec<(String, Settings)> = config
        .targets
        .iter()
        .map(|t| {
            let health = config
                .health
                .iter()
                .find(|(name, _)| *name == t.name)
                .map(|(_, h)| h.clone());
            let settings = Settings::Upstream(Box::new(t.clone()), breaker(&t.name), health);
            (t.name.clone(), settings)
        })
        .collect();
    if let Some(local) = &config.local {
        let settings = Settings::Local(Box::new(local.clone()), breaker(&local.target));
        all.push((local.target.clone(), settings));
    }
    all
}

impl Targets {
    /// The targets `config` names: those whose settings did not change as
    /// they are, the rest built afresh. Nothing is changed here: a target
    /// that cannot be built fails the whole plan.
    pub(crate) fn plan(&self, config: &Config) -> Result<Plan, StartError> {
        let mut members = HashMap::new();
        let mut changes = Changes::default();
        for (name, settings) in settings(config) {
            let member = match self.members.get(&name) {
                Some(m) if m.settings == settings => {
                    changes.kept.push(name.clone());
                    m.clone()
                }
                _ => {
                    changes.started.push(name.clone());
                    Arc::new(Member::new(settings)?)
                }
            };
            members.insert(name, member);
        }
        changes.removed = self
            .members
            .keys()
            .filter(|name| !members.contains_key(*name))
            .cloned()
            .collect();
        changes.removed.sort();
        Ok(Plan { members, changes })
    }

    /// Puts a plan in place: targets it no longer has (or has anew) stop
    /// being probed; the requests using them finish with them.
    pub(crate) fn commit(&mut self, plan: Plan) -> Changes {
        for (name, old) in &self.members {
            let kept = plan
                .members
                .get(name)
                .is_some_and(|new| Arc::ptr_eq(new, old));
            if !kept {
                old.stop_health();
            }
        }
        self.members = plan.members;
        plan.changes
    }

    /// Starts the health checks of every target that has them and whose
    /// checks are not running yet.
    pub(crate) fn start_health(&self, observer: &Arc<dyn Observer>) {
        for member in self.members.values() {
            let Settings::Upstream(_, _, Some(config)) = &member.settings else {
                continue;
            };
            let mut running = lock(&member.health);
            if running.is_none() {
                *running = health::spawn(
                    member.backend.clone(),
                    member.state.breaker.clone(),
                    config,
                    observer.clone(),
                );
            }
        }
    }

    /// Stops every health check (at shutdown).
    pub(crate) fn stop_health(&self) {
        for member in self.members.values() {
            member.stop_health();
        }
    }
}

/// The targets of a configuration about to be put in place.
pub(crate) struct Plan {
    pub(crate) members: HashMap<String, Arc<Member>>,
    pub(crate) changes: Changes,
}

impl Plan {
    /// A target's backend, by name.
    pub(crate) fn backend(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.members.get(name).map(|m| m.backend.clone())
    }
}
