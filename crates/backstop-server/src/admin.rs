//! The admin endpoints: breakers and shadow verification, for operators.
//! They answer on the admin listener, or with the admin token; with
//! authentication on, to a credential of the admin scope.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use backstop_adapter::Headers;
use backstop_router::breaker::{CircuitBreaker, Forced};
use http::Method;
use http_body_util::{BodyExt, Limited};

use crate::error::ServerError;
use crate::listener::Surface;
use crate::respond::{self, Served};
use crate::App;

/// Whether an admin request may go on. With authentication on, only with a
/// credential of the `admin` scope (or the admin token), on either
/// listener. Without it, on the admin listener, or with the admin token
/// (required on both when one is configured). Never from a web page (a
/// browser sends `Origin` or `Sec-Fetch-Site` with a cross-site request);
/// and a POST only with a JSON body, which a page cannot send without a
/// preflight.
pub(crate) async fn guard(
    State(app): State<Arc<App>>,
    req: Request,
    next: Next,
) -> Result<Response, ServerError> {
    let surface = req
        .extensions()
        .get::<Surface>()
        .copied()
        .unwrap_or(Surface::Client);
    let headers = req.headers();
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let snapshot = app.snapshot();
    let admin_token = match (&snapshot.config.admin_token, token) {
        (Some(want), Some(got)) => constant_time_eq(want.as_bytes(), got.as_bytes()),
        _ => false,
    };
    match (&snapshot.auth, &snapshot.config.admin_token) {
        _ if admin_token => {}
        (Some(auth), _) => {
            let caller = crate::auth::authenticate(&app, auth, headers)?;
            crate::auth::require(
                &app,
                caller.0.config.scopes.admin,
                "the admin endpoints need a credential with the admin scope",
            )?;
        }
        (None, Some(_)) => return Err(ServerError::AdminToken),
        (None, None) if surface == Surface::Admin => {}
        (None, None) => {
            return Err(ServerError::Forbidden(
                "the admin endpoints are served on the admin listener (server.admin_listen), \
                 or here with server.admin_token_env set",
            ))
        }
    }
    let cross_site = headers.contains_key(http::header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|site| site != "none" && site != "same-origin");
    if cross_site {
        return Err(ServerError::Forbidden(
            "the admin endpoints do not take requests from web pages",
        ));
    }
    if req.method() == Method::POST {
        let json = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ServerError::NotJson);
        }
    }
    Ok(next.run(req).await)
}

/// Compares two secrets in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn breaker_json(target: &str, b: &CircuitBreaker) -> serde_json::Value {
    serde_json::json!({
        "target": target,
        "state": b.state().as_str(),
        "forced": match b.forced() {
            Forced::No => "auto",
            Forced::Open => "open",
            Forced::Closed => "closed",
        },
        "trips": b.trips(),
        "healthy": b.healthy(),
        "open_remaining_ms": b.open_remaining().as_millis() as u64,
    })
}

/// `GET /admin/breakers`: every target's breaker.
pub(crate) async fn breakers(State(app): State<Arc<App>>) -> Response {
    let list = app
        .snapshot()
        .router
        .breakers()
        .iter()
        .map(|(t, b)| breaker_json(t, b))
        .collect();
    per_target("breakers", list)
}

/// `{key: [...]}` of per-target objects, sorted by target, as a 200.
fn per_target(key: &str, mut list: Vec<serde_json::Value>) -> Response {
    list.sort_by(|a, b| a["target"].as_str().cmp(&b["target"].as_str()));
    let body = serde_json::json!({ key: list });
    respond::json(
        200,
        body.to_string().into_bytes(),
        Served::NONE,
        &Headers::new(),
    )
}

/// `GET /admin/status`: every target's breaker with when it opened and its
/// latest failures, and for targets under shadow verification the window,
/// confirmations, ramp stage and last comparison.
pub(crate) async fn status(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.snapshot();
    let shadows = snapshot
        .shadows
        .as_ref()
        .map(|s| s.status())
        .unwrap_or_default();
    let list = snapshot
        .router
        .breakers()
        .iter()
        .map(|(t, b)| {
            let mut v = breaker_json(t, b);
            v["open_since_ms"] = serde_json::json!(b.open_since().map(|d| d.as_millis() as u64));
            v["recent_failures"] = b
                .recent_failures()
                .iter()
                .map(|(kind, ago)| {
                    serde_json::json!({"kind": kind.as_str(), "ago_ms": ago.as_millis() as u64})
                })
                .collect();
            v["last_failure"] = serde_json::json!(b.last_failure());
            v["admitted_fraction"] = serde_json::json!(b.admitted_fraction());
            v["shadow"] = serde_json::to_value(shadows.get(t)).unwrap_or_default();
            v
        })
        .collect();
    per_target("targets", list)
}

/// `POST /admin/reload`: reads the configuration file again and puts it in
/// place; what changed, or why nothing did.
pub(crate) async fn reload(State(app): State<Arc<App>>) -> Result<Response, ServerError> {
    tracing::info!("POST /admin/reload: reloading the configuration");
    let reloaded = app
        .reload_in_background()
        .await
        .map_err(ServerError::Reload)?;
    let body = serde_json::to_vec(&reloaded).unwrap_or_default();
    Ok(respond::json(200, body, Served::NONE, &Headers::new()))
}

/// `POST /admin/breakers/{target}` with `{"force": "open" | "closed" | "auto"}`,
/// or `{"verification": "restart"}` to start shadow verification over.
pub(crate) async fn force_breaker(
    State(app): State<Arc<App>>,
    Path(target): Path<String>,
    req: Request,
) -> Result<Response, ServerError> {
    let target = target.as_str();
    let snapshot = app.snapshot();
    let Some(breaker) = snapshot.router.breakers().get(target) else {
        return Err(ServerError::UnknownTarget(target.to_string()));
    };
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        Limited::new(req.into_body(), 4096).collect(),
    );
    let bytes = match read.await {
        Ok(Ok(c)) => c.to_bytes(),
        _ => return Err(ServerError::invalid("cannot read the request body")),
    };
    let body = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default();
    if body["verification"] == "restart" {
        let restarted = snapshot.shadows.as_ref().is_some_and(|s| s.restart(target));
        if !restarted {
            return Err(ServerError::NotVerified(target.to_string()));
        }
        tracing::warn!(target = target, "shadow verification restarted");
        let body = breaker_json(target, breaker).to_string().into_bytes();
        return Ok(respond::json(200, body, Served::NONE, &Headers::new()));
    }
    let force = body
        .get("force")
        .and_then(|f| f.as_str())
        .map(str::to_string);
    let forced = match force.as_deref() {
        Some("open") => Forced::Open,
        Some("closed") => Forced::Closed,
        Some("auto") => Forced::No,
        _ => {
            return Err(ServerError::invalid(
                "body must be {\"force\": \"open\" | \"closed\" | \"auto\"} or {\"verification\": \"restart\"}",
            ))
        }
    };
    breaker.force(forced);
    tracing::warn!(
        target = target,
        "breaker forced {}",
        force.unwrap_or_default()
    );
    let body = breaker_json(target, breaker).to_string().into_bytes();
    Ok(respond::json(200, body, Served::NONE, &Headers::new()))
}
