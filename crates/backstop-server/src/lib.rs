//! Backstop's server: endpoints, configuration, metrics, and the wiring of
//! every other crate. The `backstop` binary is a thin `main` over [`run`].

mod admin;
mod auth;
pub mod catalogue;
mod completions;
mod error;
mod generations;
mod listener;
pub mod metrics;
mod respond;
mod responses;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use backstop_adapter::Backend;
use backstop_local::LocalBackend;
use backstop_router::{Hop, Route, RouteTable, Router};
use backstop_shadow::{Jobs, Shadows};
use backstop_upstream::{Upstream, UpstreamError};
use tokio::net::TcpListener;

pub use backstop_config::{Config, ConfigError, Limits};
pub use metrics::Metrics;
pub use respond::{ATTEMPTS_HEADER, BACKEND_HEADER};

/// Everything a request handler needs, shared by all connections.
pub struct App {
    config: Config,
    router: Router,
    metrics: Metrics,
    /// Completion requests in flight, up to `max_in_flight`.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes the requests in flight hold, up to `max_request_memory`.
    request_memory: Arc<tokio::sync::Semaphore>,
    /// The shadow verifier, when on; its queue until the server starts it.
    shadows: Option<(Arc<Shadows>, Mutex<Option<Jobs>>)>,
    /// The store of generations, unless turned off.
    generations: Option<Arc<generations::Generations>>,
    /// Client authentication, when on.
    auth: Option<auth::Auth>,
    /// The upstream targets, for their keys' state.
    upstreams: Vec<Arc<Upstream>>,
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

impl App {
    /// Builds the backends and routes a configuration describes.
    pub fn new(config: Config) -> Result<Self, StartError> {
        let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
        let mut upstreams = Vec::new();
        for target in &config.targets {
            let upstream =
                Upstream::new(target.clone()).map_err(|source| StartError::Upstream {
                    name: target.name.clone(),
                    source,
                })?;
            let upstream = Arc::new(upstream);
            upstreams.push(upstream.clone());
            backends.push(upstream);
        }
        if let Some(local) = &config.local {
            backends.push(Arc::new(LocalBackend::start(local.clone())));
        }
        let routes = config
            .routes
            .iter()
            .map(|route| Route {
                models: route.models.clone(),
                hops: route
                    .hops
                    .iter()
                    .filter_map(|(name, retry)| {
                        let backend = backends.iter().find(|b| b.name() == name)?.clone();
                        Some(Hop {
                            backend,
                            retry: retry.clone(),
                        })
                    })
                    .collect(),
                deadline: route.deadline,
            })
            .collect();
        let metrics = Metrics::new()?;
        let mut router = Router::new(RouteTable::new(routes), |name| {
            config.breakers.get(name).cloned().unwrap_or_default()
        })
        .with_observer(Arc::new(metrics.clone()));
        // Upstream targets return to service on shadow evidence.
        let checked: Vec<_> = config
            .targets
            .iter()
            .filter_map(|t| {
                let backend = backends.iter().find(|b| b.name() == t.name)?.clone();
                let breaker = router.breakers().get(&t.name)?.clone();
                Some((t.name.clone(), backend, breaker))
            })
            .collect();
        let shadows = match &config.shadow {
            Some(shadow) if !checked.is_empty() => {
                let (shadows, jobs) =
                    Shadows::new(shadow.clone(), checked, Arc::new(metrics.clone()));
                router = router.with_mirror(shadows.clone());
                Some((shadows, Mutex::new(Some(jobs))))
            }
            _ => None,
        };
        let generations = match &config.store {
            Some(store) => Some(Arc::new(generations::Generations::open(store)?)),
            None => None,
        };
        let auth = config.auth.as_ref().map(auth::Auth::new).transpose()?;
        Ok(App {
            auth,
            upstreams,
            generations,
            router,
            metrics,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.limits.max_in_flight)),
            request_memory: Arc::new(tokio::sync::Semaphore::new(
                config
                    .limits
                    .max_request_memory
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            config,
            shadows,
        })
    }

    /// Bytes charged now to the requests in flight.
    pub fn request_memory_held(&self) -> usize {
        let budget = self.config.limits.max_request_memory;
        budget.min(tokio::sync::Semaphore::MAX_PERMITS) - self.request_memory.available_permits()
    }

    /// The configuration the app runs.
    pub fn config(&self) -> &Config {
        &self.config
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
    let mut checks = app.router.spawn_health_checks(&app.config.health);
    if let Some((shadows, jobs)) = &app.shadows {
        let jobs = backstop_router::lock(jobs).take();
        if let Some(jobs) = jobs {
            checks.extend(shadows.spawn(jobs));
        }
    }
    if let Some(gens) = &app.generations {
        checks.push(gens.spawn_sweeper());
    }
    match &app.config.auth {
        Some(auth) => tracing::info!("authentication is on: {}", auth::describe(auth)),
        None => tracing::warn!(
            "authentication is off: anyone who reaches {addr} can use it ([auth] turns it on)"
        ),
    }
    responses::recover(&app).await;
    let task = tokio::spawn(async move {
        listener::serve(client, admin, app, shutdown, grace).await;
        for check in checks {
            check.abort();
        }
    });
    Ok(Running {
        addr,
        admin_addr,
        task,
    })
}
