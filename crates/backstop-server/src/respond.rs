//! Where every response gets Backstop's headers. (Errors become responses
//! in [`crate::error`].)

use backstop_adapter::Headers;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// Response body type: whole or streamed.
pub type Body = axum::body::Body;

/// Header naming the target that served (or last failed).
pub const BACKEND_HEADER: &str = "x-backstop-backend";
/// Header counting backend attempts.
pub const ATTEMPTS_HEADER: &str = "x-backstop-attempts";
/// What `x-backstop-backend` says when no backend was involved.
pub const NO_BACKEND: &str = "backstop";

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::from(bytes.into())
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
