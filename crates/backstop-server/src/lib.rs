//! Backstop's server: endpoints, configuration, metrics, and the wiring of
//! every other crate. The `backstop` binary is a thin `main` over [`run`].

mod api;
pub mod catalogue;
pub mod config;
pub mod metrics;
mod respond;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backstop_adapter::Backend;
use backstop_local::LocalBackend;
use backstop_router::{Hop, Route, RouteTable, Router};
use backstop_shadow::{Jobs, Shadows};
use backstop_upstream::{Upstream, UpstreamError};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use config::{Config, ConfigError};
pub use metrics::Metrics;
pub use respond::{ATTEMPTS_HEADER, BACKEND_HEADER};

/// Everything a request handler needs, shared by all connections.
pub struct App {
    config: Config,
    router: Router,
    metrics: Metrics,
    /// The shadow verifier, when on; its queue until the server starts it.
    shadows: Option<(Arc<Shadows>, Mutex<Option<Jobs>>)>,
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
        for target in &config.targets {
            let upstream =
                Upstream::new(target.clone()).map_err(|source| StartError::Upstream {
                    name: target.name.clone(),
                    source,
                })?;
            backends.push(Arc::new(upstream));
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
        Ok(App {
            router,
            metrics,
            config,
            shadows,
        })
    }

    /// The configuration the app runs.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// A running server's address and handle.
pub struct Running {
    /// The address it listens on (the real port when bound to port 0).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the server has shut down.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the configured address and serves until `shutdown` resolves, then
/// stops accepting and lets in-flight requests finish within the grace period.
pub async fn run(
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    let addr = app.config.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    let grace = app.config.shutdown_grace;
    let task = tokio::spawn(serve(listener, Arc::new(app), shutdown, grace));
    Ok(Running { addr, task })
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut checks = app.router.spawn_health_checks(&app.config.health);
    if let Some((shadows, jobs)) = &app.shadows {
        let jobs = jobs.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(jobs) = jobs {
            checks.extend(shadows.spawn(jobs));
        }
    }
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = hyper::service::service_fn(move |req| api::handle(req, app.clone()));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                connections.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    for check in checks {
        check.abort();
    }
    tracing::info!(
        "shutting down: waiting up to {} s for in-flight requests",
        grace.as_secs()
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: closing the remaining connections");
    }
}
