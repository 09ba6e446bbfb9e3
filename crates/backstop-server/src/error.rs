//! The server's own errors: one enum, and the one place where each becomes
//! an HTTP status and OpenAI's error JSON. (A connection that never got as
//! far as a request is answered by the listener, on the wire.)

use axum::response::{IntoResponse, Response};
use backstop_adapter::{ErrorBody, Headers, InvalidRequest};
use backstop_router::RouteError;
use http::Method;
use serde_json::Value;

use crate::respond::{self, Served, NO_BACKEND};

/// Why the server answers with an error.
#[derive(Debug)]
pub enum ServerError {
    /// The client's request is wrong: a 400 naming the parameter.
    Invalid(InvalidRequest),
    /// Refused at one of Backstop's bounds before any backend.
    Rejected(Rejection),
    /// The request's headers are past `max_header_bytes`: a 431.
    HeadersTooLarge {
        /// Their size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// No endpoint has this path: a 404.
    UnknownUrl(Method, String),
    /// The endpoint does not take this method: a 405.
    MethodNotAllowed(Method, String),
    /// An admin request without the admin token, where one is set: a 401.
    AdminToken,
    /// A client credential not accepted (authentication on): a 401.
    Unauthenticated(crate::auth::Refusal),
    /// A model the caller may not ask for: a 403.
    ModelNotAllowed(String),
    /// The caller has spent its own rate limit: a 429 after which to retry.
    RateLimited {
        /// Its name.
        identity: String,
        /// How long until a request would be allowed.
        wait: std::time::Duration,
    },
    /// An admin request from where admin is not served: a 403.
    Forbidden(&'static str),
    /// An admin POST without a JSON body: a 415.
    NotJson,
    /// No target can serve: `/readyz`'s 503.
    NotReady,
    /// The shared store does not answer: `/readyz`'s 503.
    StoreUnreachable,
    /// An admin request names no target: a 404.
    UnknownTarget(String),
    /// Verification restarted for a target not under it: a 409.
    NotVerified(String),
    /// A reload that changed nothing, and why: a 400 (the running
    /// configuration stays).
    Reload(crate::ReloadError),
    /// No stored response has this id: a 404.
    UnknownResponse(String),
    /// A response that cannot be cancelled: not a background one, or one
    /// already finished (as OpenAI answers: a 400).
    NotCancellable(String),
    /// A request with this `Idempotency-Key` is still being answered: a 409.
    InProgress,
    /// The store failed: a 500.
    Store(String),
    /// No target served the request: the last backend's own answer.
    Route(RouteError),
    /// An answer could not be written: a 500.
    Encode(String),
}

/// Why a request was refused before it reached a backend: the status, the
/// label of `backstop_rejected_total`, and the message.
#[derive(Debug)]
pub struct Rejection {
    /// 400, 408, 413; 429 or 503 for Backstop's own bounds.
    pub status: u16,
    /// The label of `backstop_rejected_total`.
    pub reason: &'static str,
    /// What the client is told.
    pub message: String,
}

impl From<InvalidRequest> for ServerError {
    fn from(e: InvalidRequest) -> Self {
        ServerError::Invalid(e)
    }
}

impl From<Rejection> for ServerError {
    fn from(r: Rejection) -> Self {
        ServerError::Rejected(r)
    }
}

impl From<RouteError> for ServerError {
    fn from(e: RouteError) -> Self {
        ServerError::Route(e)
    }
}

impl ServerError {
    /// A 400 with no one parameter at fault.
    pub fn invalid(message: impl Into<String>) -> Self {
        ServerError::Invalid(InvalidRequest {
            message: message.into(),
            param: None,
        })
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ServerError::Invalid(_) => 400,
            ServerError::Rejected(r) => r.status,
            ServerError::HeadersTooLarge { .. } => 431,
            ServerError::UnknownUrl(..)
            | ServerError::UnknownTarget(_)
            | ServerError::UnknownResponse(_) => 404,
            ServerError::NotCancellable(_) => 400,
            ServerError::InProgress => 409,
            ServerError::Store(_) => 500,
            ServerError::MethodNotAllowed(..) => 405,
            ServerError::AdminToken | ServerError::Unauthenticated(_) => 401,
            ServerError::ModelNotAllowed(_) => 403,
            ServerError::RateLimited { .. } => 429,
            ServerError::Forbidden(_) => 403,
            ServerError::NotJson => 415,
            ServerError::NotReady | ServerError::StoreUnreachable => 503,
            ServerError::NotVerified(_) => 409,
            ServerError::Reload(crate::ReloadError::Stopped) => 503,
            ServerError::Reload(_) => 400,
            ServerError::Route(RouteError::NoRoute(_)) => 404,
            ServerError::Route(e) => e.last().map_or(503, |last| last.http_status()),
            ServerError::Encode(_) => 500,
        }
    }

    /// The error body: `(type, message, param, code)`.
    fn body(&self) -> (&'static str, String, Option<String>, Option<&'static str>) {
        let invalid = "invalid_request_error";
        match self {
            ServerError::Invalid(e) => (invalid, e.message.clone(), e.param.clone(), None),
            ServerError::Rejected(r) if r.status == 503 => {
                ("server_error", r.message.clone(), None, Some("overloaded"))
            }
            ServerError::Rejected(r) if r.status == 429 => {
                ("rate_limit_error", r.message.clone(), None, Some(r.reason))
            }
            ServerError::Rejected(r) => {
                let code = (r.status == 413).then_some("request_too_large");
                (invalid, r.message.clone(), None, code)
            }
            ServerError::HeadersTooLarge { bytes, limit } => (
                invalid,
                format!("the request's headers are {bytes} bytes; at most {limit} are accepted"),
                None,
                Some("headers_too_large"),
            ),
            ServerError::UnknownUrl(method, path) => (
                invalid,
                format!("Unknown request URL: {method} {path}"),
                None,
                Some("unknown_url"),
            ),
            ServerError::MethodNotAllowed(method, path) => (
                invalid,
                format!("{method} is not allowed on {path}"),
                None,
                Some("method_not_allowed"),
            ),
            ServerError::AdminToken => (
                "authentication_error",
                "the admin endpoints need the admin token as a bearer token".into(),
                None,
                Some("invalid_admin_token"),
            ),
            ServerError::Unauthenticated(refusal) => (
                invalid,
                refusal.message().into(),
                None,
                Some("invalid_api_key"),
            ),
            ServerError::ModelNotAllowed(model) => (
                "permission_error",
                format!("This credential may not use the model `{model}`."),
                Some("model".into()),
                Some("model_not_allowed"),
            ),
            ServerError::RateLimited { identity, wait } => (
                "rate_limit_error",
                format!(
                    "Rate limit reached for `{identity}`: retry in {} ms.",
                    wait.as_millis()
                ),
                None,
                Some("rate_limit_exceeded"),
            ),
            ServerError::Forbidden(why) => {
                ("permission_error", why.to_string(), None, Some("forbidden"))
            }
            ServerError::NotJson => (
                invalid,
                "admin requests must have Content-Type: application/json".into(),
                None,
                Some("unsupported_media_type"),
            ),
            ServerError::StoreUnreachable => (
                "server_error",
                "the store does not answer: this replica keeps no generation for now (another \
                 replica may)"
                    .into(),
                None,
                Some("store_unreachable"),
            ),
            ServerError::NotReady => (
                "server_error",
                "no target can serve (is the local model still loading, or is every breaker \
                 open?)"
                    .into(),
                None,
                Some("not_ready"),
            ),
            ServerError::UnknownTarget(target) => (
                invalid,
                format!("no target is named `{target}`"),
                None,
                Some("unknown_target"),
            ),
            ServerError::NotVerified(target) => (
                invalid,
                format!(
                    "target `{target}` is not under shadow verification (it is serving, or \
                     the verifier is off)"
                ),
                None,
                Some("not_verified"),
            ),
            ServerError::Reload(e) => {
                let (kind, code) = match e {
                    crate::ReloadError::NoFile => (invalid, "no_config_file"),
                    crate::ReloadError::Stopped => ("server_error", "reload_stopped"),
                    _ => (invalid, "invalid_config"),
                };
                (kind, e.to_string(), None, Some(code))
            }
            ServerError::UnknownResponse(id) => (
                invalid,
                format!("No response found with id '{id}'."),
                None,
                Some("not_found"),
            ),
            ServerError::NotCancellable(why) => (invalid, why.clone(), None, None),
            ServerError::InProgress => (
                invalid,
                "a request with this Idempotency-Key is still being answered; retry shortly".into(),
                None,
                Some("idempotency_key_in_use"),
            ),
            ServerError::Store(why) => ("server_error", why.clone(), None, None),
            ServerError::Route(RouteError::NoRoute(model)) => (
                invalid,
                format!("The model `{model}` does not exist or no route serves it."),
                Some("model".into()),
                Some("model_not_found"),
            ),
            ServerError::Route(_) => (
                "upstream_error",
                "no target is configured for this route".into(),
                None,
                None,
            ),
            ServerError::Encode(why) => ("server_error", why.clone(), None, None),
        }
    }
}

impl ServerError {
    /// The OpenAI error body, `{"error": {...}}`: a backend's own for its
    /// failure.
    pub fn to_body(&self) -> Value {
        if let ServerError::Route(e @ RouteError::Failed(_)) = self {
            if let Some(last) = e.last() {
                return last.to_body();
            }
        }
        let (kind, message, param, code) = self.body();
        serde_json::to_value(ErrorBody::new(message, kind, param, code)).unwrap_or(Value::Null)
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = self.to_body().to_string().into_bytes();
        // A backend's failure is its own answer: its status, body and
        // headers, with who failed last.
        if let ServerError::Route(e @ RouteError::Failed(_)) = &self {
            if let Some(last) = e.last() {
                let served = Served {
                    backend: e.last_target().unwrap_or(NO_BACKEND),
                    attempts: e.attempts(),
                };
                return respond::json(status, body, served, &last.headers);
            }
        }
        let wait = match &self {
            ServerError::RateLimited { wait, .. } => Some(*wait),
            _ => None,
        };
        let mut resp = respond::json(status, body, Served::NONE, &Headers::new());
        if status == 401 {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(wait) = wait {
            // Whole seconds, rounded up, and OpenAI's own milliseconds.
            let headers = resp.headers_mut();
            let secs = wait.as_millis().div_ceil(1000).max(1);
            headers.insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(secs as u64),
            );
            headers.insert(
                "retry-after-ms",
                http::HeaderValue::from(wait.as_millis().max(1) as u64),
            );
        } else if status == 503 || status == 429 {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}
