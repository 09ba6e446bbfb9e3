//! The one place where failures become HTTP responses in OpenAI's error shape,
//! and where every response gets Backstop's headers.

use std::convert::Infallible;

use backstop_adapter::{ErrorBody, Headers, InvalidRequest};
use backstop_router::RouteError;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

/// Response body type: whole or streamed.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Header naming the target that served (or last failed).
pub const BACKEND_HEADER: &str = "x-backstop-backend";
/// Header counting backend attempts.
pub const ATTEMPTS_HEADER: &str = "x-backstop-attempts";
/// What `x-backstop-backend` says when no backend was involved.
pub const NO_BACKEND: &str = "backstop";

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// Who answered, for Backstop's own headers.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// Target name, or [`NO_BACKEND`].
    pub backend: &'a str,
    /// Backend attempts made.
    pub attempts: u32,
}

impl Served<'static> {
    /// A response no backend took part in.
    pub const NONE: Served<'static> = Served {
        backend: NO_BACKEND,
        attempts: 0,
    };
}

/// A response with Backstop's headers and the backend's passed-through ones.
pub fn response(
    status: u16,
    content_type: &'static str,
    body: Body,
    served: Served<'_>,
    passthrough: &Headers,
) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in passthrough {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    if let Ok(value) = HeaderValue::from_str(served.backend) {
        headers.insert(BACKEND_HEADER, value);
    }
    headers.insert(ATTEMPTS_HEADER, HeaderValue::from(served.attempts));
    resp
}

/// A JSON response.
pub fn json(
    status: u16,
    body: Vec<u8>,
    served: Served<'_>,
    passthrough: &Headers,
) -> Response<Body> {
    response(status, "application/json", full(body), served, passthrough)
}

fn error_json(
    status: u16,
    body: &Value,
    served: Served<'_>,
    passthrough: &Headers,
) -> Response<Body> {
    json(status, body.to_string().into_bytes(), served, passthrough)
}

/// An error Backstop words itself.
pub fn error(
    status: u16,
    kind: &str,
    message: impl Into<String>,
    code: Option<&str>,
) -> Response<Body> {
    let body = ErrorBody::new(message, kind, None, code);
    let value = serde_json::to_value(body).unwrap_or(Value::Null);
    error_json(status, &value, Served::NONE, &Headers::new())
}

/// 400 for a request the client got wrong.
pub fn invalid_request(e: &InvalidRequest) -> Response<Body> {
    let value = serde_json::to_value(e.to_body()).unwrap_or(Value::Null);
    error_json(400, &value, Served::NONE, &Headers::new())
}

/// The status and response for a request no target could serve.
pub fn route_error(e: &RouteError) -> (u16, Response<Body>) {
    match e {
        RouteError::NoRoute(model) => {
            let value = serde_json::to_value(ErrorBody::new(
                format!("The model `{model}` does not exist or no route serves it."),
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
            ))
            .unwrap_or(Value::Null);
            (404, error_json(404, &value, Served::NONE, &Headers::new()))
        }
        RouteError::Failed(_) => {
            let served = Served {
                backend: e.last_target().unwrap_or(NO_BACKEND),
                attempts: e.attempts(),
            };
            match e.last() {
                Some(last) => {
                    let status = last.http_status();
                    (
                        status,
                        error_json(status, &last.to_body(), served, &last.headers),
                    )
                }
                None => (
                    503,
                    error(
                        503,
                        "upstream_error",
                        "no target is configured for this route",
                        None,
                    ),
                ),
            }
        }
    }
}
