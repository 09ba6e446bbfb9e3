//! Backstop's server: endpoints, configuration, metrics, and the wiring of
//! every other crate. The `backstop` binary is a thin `main` over [`run`].

mod admin;
mod auth;
mod budgets;
pub mod catalogue;
mod completions;
mod error;
mod fleet;
mod generations;
mod listener;
pub mod metrics;
mod respond;
mod responses;
mod routes;
mod targets;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use backstop_router::{Hop, Route, RouteTable, Router, TargetState};
use backstop_shadow::Shadows;
use backstop_upstream::{Upstream, UpstreamError};
use tokio::net::TcpListener;

pub use backstop_config::{Config, ConfigError, Limits};
pub use metrics::Metrics;
pub use respond::{ATTEMPTS_HEADER, BACKEND_HEADER};
pub use targets::Changes;

/// Everything a request handler needs, shared by all connections.
pub struct App {
    /// The configuration it started with. What cannot change without a
    /// restart is read from here: the addresses, the limits, the store and
    /// the shutdown grace.
    config: Config,
    /// What a reload replaces, as one snapshot: a request takes it once
    /// and finishes on it, whatever reloads meanwhile.
    snapshot: ArcSwap<Snapshot>,
    /// Every target and what it has learned; held while a reload puts a
    /// configuration in place, one reload at a time.
    targets: Mutex<targets::Targets>,
    /// Where a reload reads the configuration, when from a file.
    source: Option<ConfigSource>,
    metrics: Metrics,
    /// Completion requests in flight, up to `max_in_flight`.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes the requests in flight hold, up to `max_request_memory`.
    request_memory: Arc<tokio::sync::Semaphore>,
    /// The store of generations, unless turned off.
    generations: Option<Arc<generations::Generations>>,
    /// Shadow verification shared with the other replicas, when the store
    /// is shared.
    verifiers: Option<Arc<fleet::Verifiers>>,
}

/// What a configuration builds and a reload replaces.
pub(crate) struct Snapshot {
    /// The configuration it was built from.
    pub(crate) config: Config,
    pub(crate) router: Router,
    /// The upstream targets, for their keys' state.
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    /// Client authentication, when on.
    pub(crate) auth: Option<auth::Auth>,
    /// The shadow verifier, when on.
    pub(crate) shadows: Option<Arc<Shadows>>,
}

/// Where a reload reads the configuration: a file, and how to read it
/// (with the command line's overrides applied).
pub struct ConfigSource {
    path: PathBuf,
    /// Whether a change to the file reloads it.
    watch: bool,
    read: Box<ReadConfig>,
}

/// Reads and validates a configuration file.
type ReadConfig = dyn Fn(&Path) -> Result<Config, ConfigError> + Send + Sync;

impl ConfigSource {
    /// The file at `path`, read by `read`.
    pub fn new(
        path: impl Into<PathBuf>,
        read: impl Fn(&Path) -> Result<Config, ConfigError> + Send + Sync + 'static,
    ) -> Self {
        ConfigSource {
            path: path.into(),
            watch: true,
            read: Box::new(read),
        }
    }

    /// The same source, reloaded on a change to the file or not (it is by
    /// default); SIGHUP and `POST /admin/reload` reload it either way.
    pub fn watched(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the file.
    pub fn read(&self) -> Result<Config, ConfigError> {
        (self.read)(&self.path)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An upstream client could not be built.
    #[error("target `{name}`: {source}")]
    Upstream {
        /// The target.
        name: String,
        /// Why.
        source: UpstreamError,
    },
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] backstop_store::StoreError),
    /// The JWKS file could not be read.
    #[error("{0}")]
    Jwks(#[from] auth::JwksError),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a reload left the running configuration as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Backstop was started without a file.
    #[error("Backstop was started without --config: there is no file to reload")]
    NoFile,
    /// The file does not parse or validate.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        source: ConfigError,
    },
    /// A target or the authenticator could not be built from it.
    #[error("{0}")]
    Start(#[from] StartError),
    /// The reload stopped before it finished (the server is shutting down).
    #[error("the reload stopped before it finished")]
    Stopped,
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    /// `applied`, or `unchanged` when the file says what runs already.
    pub outcome: &'static str,
    /// Targets kept with their state, started afresh, and removed.
    pub targets: Changes,
    /// Settings that changed but take effect only at a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Builds what a configuration describes over the targets of `plan`,
/// carrying the shadow verifier over from `previous` when its settings did
/// not change. Nothing here fails: whatever can is built before.
fn build_snapshot(
    config: Config,
    plan: &targets::Plan,
    auth: Option<auth::Auth>,
    metrics: &Metrics,
    previous: Option<&Snapshot>,
    verifiers: Option<&Arc<fleet::Verifiers>>,
) -> Snapshot {
    let routes = config
        .routes
        .iter()
        .map(|route| Route {
            models: route.models.clone(),
            hops: route
                .hops
                .iter()
                .filter_map(|(name, retry)| {
                    Some(Hop {
                        backend: plan.backend(name)?,
                        retry: retry.clone(),
                    })
                })
                .collect(),
            groups: route.groups.clone(),
            deadline: route.deadline,
        })
        .collect();
    let mut router = Router::over(RouteTable::new(routes), |name| {
        plan.members.get(name).map_or_else(
            || TargetState::new(config.breakers.get(name).cloned().unwrap_or_default()),
            |m| m.state.clone(),
        )
    })
    .with_observer(Arc::new(metrics.clone()));
    // Upstream targets return to service on shadow evidence.
    let checked: Vec<_> = config
        .targets
        .iter()
        .filter_map(|t| {
            let breaker = router.breakers().get(&t.name)?.clone();
            Some((t.name.clone(), plan.backend(&t.name)?, breaker))
        })
        .collect();
    let earlier = previous.and_then(|p| p.shadows.clone());
    let shadows = match (&config.shadow, earlier) {
        (Some(shadow), Some(earlier)) if !checked.is_empty() && earlier.config() == shadow => {
            earlier.reconcile(checked);
            Some(earlier)
        }
        (shadow, earlier) => {
            // New settings: verification starts over, on the same breakers.
            if let Some(earlier) = earlier {
                earlier.stop();
            }
            match shadow {
                Some(shadow) if !checked.is_empty() => Some(Shadows::new(
                    shadow.clone(),
                    checked,
                    Arc::new(metrics.clone()),
                )),
                _ => None,
            }
        }
    };
    if let Some(shadows) = &shadows {
        if let Some(verifiers) = verifiers {
            shadows.join(verifiers.clone());
        }
        router = router.with_mirror(shadows.clone());
    }
    let upstreams = config
        .targets
        .iter()
        .filter_map(|t| plan.members.get(&t.name)?.upstream.clone())
        .collect();
    Snapshot {
        config,
        router,
        upstreams,
        auth,
        shadows,
    }
}

/// The settings that differ between `running` and `next` and are read only
/// at start.
fn restart_needed(running: &Config, next: &Config) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if running.listen != next.listen {
        needed.push("server.listen");
    }
    if running.admin_listen != next.admin_listen {
        needed.push("server.admin_listen");
    }
    if running.shutdown_grace != next.shutdown_grace {
        needed.push("server.shutdown_grace");
    }
    // Unless configured, max_connections is fitted to the descriptors at
    // start: not a change.
    let mut limits = next.limits.clone();
    if !limits.max_connections_set {
        limits.max_connections = running.limits.max_connections;
    }
    if running.limits != limits {
        needed.push("limits");
    }
    if running.store != next.store {
        needed.push("store");
    }
    needed
}

impl App {
    /// Builds the backends and routes a configuration describes.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        let metrics = Metrics::new()?;
        let mut targets = targets::Targets::default();
        let plan = targets.plan(&config)?;
        let auth = config
            .auth
            .as_ref()
            .map(|a| auth::Auth::new(a, None))
            .transpose()?;
        let generations = match &config.store {
            Some(store) => Some(Arc::new(generations::Generations::open(store).await?)),
            None => None,
        };
        let verifiers = generations
            .as_ref()
            .filter(|gens| gens.store.shared())
            .map(|_| Arc::new(fleet::Verifiers::default()));
        let snapshot = build_snapshot(
            config.clone(),
            &plan,
            auth,
            &metrics,
            None,
            verifiers.as_ref(),
        );
        targets.commit(plan);
        Ok(App {
            generations,
            verifiers,
            snapshot: ArcSwap::from_pointee(snapshot),
            targets: Mutex::new(targets),
            source: None,
            metrics,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.limits.max_in_flight)),
            request_memory: Arc::new(tokio::sync::Semaphore::new(
                config
                    .limits
                    .max_request_memory
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            config,
        })
    }

    /// The same app, reloading its configuration from `source` on SIGHUP,
    /// when the file changes, and on `POST /admin/reload`.
    pub fn with_source(mut self, source: ConfigSource) -> Self {
        self.source = Some(source);
        self
    }

    /// Bytes charged now to the requests in flight.
    pub fn request_memory_held(&self) -> usize {
        let budget = self.config.limits.max_request_memory;
        budget.min(tokio::sync::Semaphore::MAX_PERMITS) - self.request_memory.available_permits()
    }

    /// The configuration the app started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The snapshot a request runs on, from its start to its end.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// [`App::reload`] on the blocking pool: reading, validating and
    /// building targets (TLS roots, a model to load) take CPU that must not
    /// hold up the requests of an async worker.
    pub async fn reload_in_background(self: &Arc<Self>) -> Result<Reloaded, ReloadError> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || app.reload())
            .await
            .unwrap_or_else(|_| Err(ReloadError::Stopped))
    }

    /// Reads the configuration file again and puts it in place (see
    /// [`App::apply`]); a file that does not validate changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = match &self.source {
            None => Err(ReloadError::NoFile),
            Some(source) => source.read().map_err(|e| ReloadError::Invalid {
                path: source.path.display().to_string(),
                source: e,
            }),
        }
        .and_then(|config| self.apply(config));
        if let Err(e) = &result {
            self.metrics
                .config_reloads
                .with_label_values(&["rejected"])
                .inc();
            tracing::error!("configuration not reloaded, the running one stays: {e}");
        }
        result
    }

    /// Puts `config` in place as one snapshot. Requests in flight finish on
    /// the one they started with. Targets whose settings did not change keep
    /// their state (breaker, health, rate limits, keys, connection pool,
    /// shadow verification); changed or new ones start fresh; removed ones
    /// drain. Settings read only at start are reported, not applied.
    pub fn apply(&self, config: Config) -> Result<Reloaded, ReloadError> {
        let mut targets = backstop_router::lock(&self.targets);
        let running = self.snapshot();
        let restart_needed = restart_needed(&self.config, &config);
        // What is read only at start stays as it started.
        let config = Config {
            listen: self.config.listen,
            admin_listen: self.config.admin_listen,
            shutdown_grace: self.config.shutdown_grace,
            limits: self.config.limits.clone(),
            store: self.config.store.clone(),
            ..config
        };
        if config == running.config {
            self.metrics
                .config_reloads
                .with_label_values(&["unchanged"])
                .inc();
            tracing::info!("configuration reloaded: unchanged");
            return Ok(Reloaded {
                outcome: "unchanged",
                targets: targets::Changes::default(),
                restart_needed,
            });
        }
        let auth = config
            .auth
            .as_ref()
            .map(|a| auth::Auth::new(a, running.auth.as_ref()))
            .transpose()
            .map_err(StartError::from)?;
        let plan = targets.plan(&config)?;
        let snapshot = build_snapshot(
            config,
            &plan,
            auth,
            &self.metrics,
            Some(&running),
            self.verifiers.as_ref(),
        );
        let changes = targets.commit(plan);
        targets.start_health(&(Arc::new(self.metrics.clone()) as _));
        if let Some(shadows) = &snapshot.shadows {
            shadows.start();
        }
        self.metrics.forget_targets(&changes.removed);
        self.snapshot.store(Arc::new(snapshot));
        self.metrics
            .config_reloads
            .with_label_values(&["applied"])
            .inc();
        tracing::info!(
            kept = ?changes.kept,
            started = ?changes.started,
            removed = ?changes.removed,
            "configuration reloaded"
        );
        if !restart_needed.is_empty() {
            tracing::warn!(
                "these settings changed but take effect only at a restart: {}",
                restart_needed.join(", ")
            );
        }
        Ok(Reloaded {
            outcome: "applied",
            targets: changes,
            restart_needed,
        })
    }
}

/// A running server's addresses and handle.
pub struct Running {
    /// The address it listens on (the real port when bound to port 0).
    pub addr: SocketAddr,
    /// The address of the admin endpoints.
    pub admin_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the server has shut down.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    Ok((listener, bound))
}

/// Binds the configured addresses and serves until `shutdown` resolves,
/// then stops accepting and lets in-flight requests finish within the
/// grace period.
pub async fn run(
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    let (client, addr) = bind(app.config.listen).await?;
    let (admin, admin_addr) = bind(app.config.admin_listen).await?;
    let grace = app.config.shutdown_grace;
    let app = Arc::new(app);
    backstop_router::lock(&app.targets).start_health(&(Arc::new(app.metrics.clone()) as _));
    if let Some(shadows) = &app.snapshot().shadows {
        shadows.start();
    }
    let mut tasks = vec![reload_on_signal(app.clone())];
    if let Some(source) = app.source.as_ref().filter(|s| s.watch) {
        tasks.push(watch(app.clone(), source.path.clone()));
    }
    if let Some(gens) = &app.generations {
        tasks.push(gens.spawn_sweeper());
    }
    match &app.snapshot().config.auth {
        Some(auth) => tracing::info!("authentication is on: {}", auth::describe(auth)),
        None => tracing::warn!(
            "authentication is off: anyone who reaches {addr} can use it ([auth] turns it on)"
        ),
    }
    responses::recover(&app).await;
    if let Some(gens) = &app.generations {
        // A claim is one indexed query: made often, a dead replica's work
        // moves on within a second of its lease running out.
        let every = (gens.lease / 2).min(std::time::Duration::from_secs(1));
        tasks.push(responses::spawn_takeover(app.clone(), every));
    }
    tasks.extend(budgets::spawn(app.clone()).await);
    if let Some(verifiers) = &app.verifiers {
        tasks.push(fleet::spawn(app.clone(), verifiers.clone()));
    }
    let task = tokio::spawn(async move {
        listener::serve(client, admin, app.clone(), shutdown, grace).await;
        for task in tasks {
            task.abort();
        }
        backstop_router::lock(&app.targets).stop_health();
        if let Some(shadows) = &app.snapshot().shadows {
            shadows.stop();
        }
    });
    Ok(Running {
        addr,
        admin_addr,
        task,
    })
}

/// Reloads the configuration on each SIGHUP (Unix). Without a file, says
/// so rather than ending the process, as SIGHUP otherwise would. The
/// handler is in place when this returns, before the server says it
/// listens: a SIGHUP sent as soon as it does must not end it.
fn reload_on_signal(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let hangups = signal(SignalKind::hangup());
        tokio::spawn(async move {
            let Ok(mut hangups) = hangups else {
                return;
            };
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = app.reload_in_background().await;
            }
        })
    }
    #[cfg(not(unix))]
    tokio::spawn(async move { drop(app) })
}

/// How often the configuration file is looked at for a change.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the configuration when its file changes: its modification time,
/// size or identity (an editor's or a mounted volume's swap of the file),
/// looked at every [`WATCH_EVERY`]. A file caught half-written fails to
/// validate and changes nothing; the next look reloads it whole.
fn watch(app: Arc<App>, path: PathBuf) -> tokio::task::JoinHandle<()> {
    async fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
        let meta = tokio::fs::metadata(path).await.ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some((meta.modified().ok()?, meta.len(), inode))
    }
    tokio::spawn(async move {
        let mut seen = stamp(&path).await;
        let mut ticks = tokio::time::interval(WATCH_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = stamp(&path).await;
            if now.is_some() && now != seen {
                seen = now;
                tracing::info!(path = %path.display(), "the configuration file changed: reloading");
                let _ = app.reload_in_background().await;
            }
        }
    })
}
