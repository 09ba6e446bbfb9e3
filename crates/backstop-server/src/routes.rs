//! The HTTP surface: which endpoint serves which path (axum), the layers
//! every request passes (a request id, tracing, the header bound), and the
//! operational endpoints. The listener hands each request of a connection
//! to [`router`], with the connection's [`Surface`] as an extension.
//!
//! [`Surface`]: crate::listener::Surface

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use backstop_adapter::{Headers, ModelList};
use http::{HeaderName, StatusCode};
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, MakeClassifier, NeverClassifyEos, ServerErrorsAsFailures,
    ServerErrorsFailureClass,
};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::Caller;
use crate::error::ServerError;
use crate::respond::{self, Served};
use crate::{admin, auth, completions, responses, App};

/// The header that carries a request's id: the client's own, or one
/// Backstop makes; sent back on the response and logged with the request.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Every endpoint, with its layers.
pub(crate) fn router(app: Arc<App>) -> Router {
    let admin = Router::new()
        .route("/admin/breakers", get(admin::breakers))
        .route("/admin/status", get(admin::status))
        .route("/admin/breakers/{target}", post(admin::force_breaker))
        .route("/admin/reload", post(admin::reload))
        .route_layer(middleware::from_fn_with_state(app.clone(), admin::guard));
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    // The client API: behind a credential when authentication is on.
    let api = Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::legacy))
        .route("/v1/responses", post(completions::responses))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::client));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(admin)
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), header_bound))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new(Failures).make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(app)
}

/// Which responses the trace layer logs as failures (at ERROR): every 5xx
/// but the readiness probe's 503, which answers the probe's question (no
/// target can serve yet: the local model loading, every breaker open, the
/// shared store out of reach) rather than failing it. The probe's answer is
/// still traced, at DEBUG, as every response is.
#[derive(Debug, Clone, Copy)]
struct Failures;

impl MakeClassifier for Failures {
    type Classifier = Classify;
    type FailureClass = ServerErrorsFailureClass;
    type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;

    fn make_classifier<B>(&self, req: &http::Request<B>) -> Classify {
        Classify {
            probe: req.uri().path() == "/readyz",
        }
    }
}

/// [`Failures`]' judgement of one request's response.
#[derive(Debug, Clone, Copy)]
struct Classify {
    /// The request is the readiness probe.
    probe: bool,
}

impl ClassifyResponse for Classify {
    type FailureClass = ServerErrorsFailureClass;
    type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;

    fn classify_response<B>(
        self,
        res: &http::Response<B>,
    ) -> ClassifiedResponse<ServerErrorsFailureClass, Self::ClassifyEos> {
        if self.probe && res.status() == StatusCode::SERVICE_UNAVAILABLE {
            return ClassifiedResponse::Ready(Ok(()));
        }
        ServerErrorsAsFailures::new().classify_response(res)
    }

    fn classify_error<E: std::fmt::Display + 'static>(self, error: &E) -> ServerErrorsFailureClass {
        ServerErrorsAsFailures::new().classify_error(error)
    }
}

/// Refuses a request whose headers are past `max_header_bytes` (HTTP/2's
/// are bounded as they are decoded; this is the same bound, counted the
/// same way for both).
async fn header_bound(
    State(app): State<Arc<App>>,
    req: Request,
    next: Next,
) -> Result<Response, ServerError> {
    let bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let limit = app.config.limits.max_header_bytes;
    if bytes > limit {
        app.metrics
            .rejected
            .with_label_values(&["header_size"])
            .inc();
        return Err(ServerError::HeadersTooLarge { bytes, limit });
    }
    Ok(next.run(req).await)
}

async fn unknown_url(req: Request) -> ServerError {
    ServerError::UnknownUrl(req.method().clone(), req.uri().path().to_string())
}

async fn method_not_allowed(req: Request) -> ServerError {
    ServerError::MethodNotAllowed(req.method().clone(), req.uri().path().to_string())
}

fn plain_json(body: &'static [u8]) -> Response {
    respond::json(200, body.to_vec(), Served::NONE, &Headers::new())
}

async fn healthz() -> Response {
    plain_json(br#"{"status":"ok"}"#)
}

/// Ready while any target can serve: loaded (the local model), healthy by its
/// health checks, and its breaker neither open nor forced open.
async fn ready(State(app): State<Arc<App>>) -> Response {
    // Cut off from a shared store, a replica can keep no generation for
    // another to resume: the balancer should send its clients elsewhere.
    if app
        .generations
        .as_ref()
        .is_some_and(|gens| !gens.store.reachable())
    {
        return ServerError::StoreUnreachable.into_response();
    }
    let router = &app.snapshot().router;
    if router.table().targets().iter().any(|t| router.may_serve(t)) {
        plain_json(br#"{"status":"ready"}"#)
    } else {
        ServerError::NotReady.into_response()
    }
}

/// The models the caller may use (all, without authentication).
async fn models(State(app): State<Arc<App>>, caller: Option<Extension<Caller>>) -> Response {
    let mut data = app.snapshot().router.models().await;
    if let Some(Extension(caller)) = caller {
        data.retain(|m| caller.may_use(&m.id));
    }
    let list = ModelList {
        object: "list".into(),
        data,
    };
    respond::json(
        200,
        serde_json::to_vec(&list).unwrap_or_default(),
        Served::NONE,
        &Headers::new(),
    )
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.snapshot();
    app.metrics.observe_breakers(&snapshot.router);
    app.metrics.observe_keys(&snapshot.upstreams);
    app.metrics
        .request_memory
        .set(app.request_memory_held() as i64);
    respond::response(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        respond::full(app.metrics.render()),
        Served::NONE,
        &Headers::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the trace layer would log `status` for `path` as a failure.
    fn failure(path: &str, status: u16) -> bool {
        let req = http::Request::get(path).body(()).unwrap();
        let res = http::Response::builder().status(status).body(()).unwrap();
        match Failures.make_classifier(&req).classify_response(&res) {
            ClassifiedResponse::Ready(outcome) => outcome.is_err(),
            ClassifiedResponse::RequiresEos(_) => unreachable!("never waits for the end"),
        }
    }

    #[test]
    fn a_not_ready_probe_is_no_failure_and_every_other_5xx_is() {
        assert!(!failure("/readyz", 503));
        assert!(failure("/readyz", 500));
        assert!(failure("/v1/chat/completions", 503));
        assert!(failure("/healthz", 503));
        assert!(!failure("/v1/chat/completions", 429));
        assert!(!failure("/readyz", 200));
    }
}
