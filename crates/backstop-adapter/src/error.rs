//! Failures, each carrying its failover decision, and OpenAI's error shape.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Response headers worth passing back to the client (rate limits, retry hints).
pub type Headers = Vec<(String, String)>;

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

/// The inner object of an OpenAI error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Human-readable explanation.
    pub message: String,
    /// Error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code; a string from OpenAI, kept opaque.
    pub code: Option<Value>,
}

impl ErrorBody {
    /// An error body from its parts.
    pub fn new(
        message: impl Into<String>,
        kind: &str,
        param: Option<String>,
        code: Option<&str>,
    ) -> Self {
        ErrorBody {
            error: ApiError {
                message: message.into(),
                kind: kind.to_string(),
                param,
                code: code.map(|c| Value::String(c.to_string())),
            },
        }
    }
}

/// What went wrong with a backend call; decides retry, breaker and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection could not be made (refused, DNS, TLS handshake).
    Connect,
    /// No response headers within the time-to-first-byte deadline.
    FirstByteTimeout,
    /// A stream sent nothing for the idle deadline.
    StreamStalled,
    /// A stream or body was cut before it was complete.
    StreamBroken,
    /// The backend answered something that is not the OpenAI format.
    BadResponse,
    /// An error event inside a successful stream.
    StreamError,
    /// 429: rate limited or out of quota.
    RateLimited,
    /// 5xx from the backend.
    ServerError,
    /// 401 or 403: the key is wrong or lacks access.
    Auth,
    /// Any other 4xx: the request itself is at fault.
    ClientError,
    /// The backend cannot take more work right now (local queue full).
    Overloaded,
    /// The client went away.
    Cancelled,
    /// The target's circuit breaker is open: it was not tried.
    Unavailable,
    /// The target's rate limit (ours, kept in step with its headers) is
    /// spent: it was not tried.
    Throttled,
    /// Backstop itself ran out of a local resource (file descriptors, memory
    /// for buffers): not the target's failure.
    Exhausted,
    /// The request's deadline passed while its answer was still streaming:
    /// the answer was cut, and is not complete.
    DeadlinePassed,
}

impl FailureKind {
    /// Whether another attempt (here or on the next target) may succeed.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            FailureKind::ClientError
                | FailureKind::Auth
                | FailureKind::Cancelled
                | FailureKind::DeadlinePassed
        )
    }

    /// Whether the target was skipped without an attempt (breaker open, or
    /// its rate limit spent).
    pub fn skipped(self) -> bool {
        matches!(self, FailureKind::Unavailable | FailureKind::Throttled)
    }

    /// Whether the failure counts against the target's circuit breaker.
    pub fn trips_breaker(self) -> bool {
        !matches!(
            self,
            FailureKind::ClientError
                | FailureKind::Auth
                | FailureKind::Cancelled
                | FailureKind::RateLimited
                | FailureKind::Overloaded
                | FailureKind::Unavailable
                | FailureKind::Throttled
                | FailureKind::Exhausted
                | FailureKind::DeadlinePassed
        )
    }

    /// The HTTP status Backstop answers with when the backend sent no OpenAI
    /// error body of its own (a 5xx HTML page becomes a clean 502).
    pub fn default_status(self) -> u16 {
        match self {
            FailureKind::FirstByteTimeout
            | FailureKind::StreamStalled
            | FailureKind::DeadlinePassed => 504,
            FailureKind::RateLimited | FailureKind::Overloaded | FailureKind::Throttled => 429,
            FailureKind::Auth => 401,
            FailureKind::ClientError => 400,
            FailureKind::Cancelled => 499,
            FailureKind::Unavailable | FailureKind::Exhausted => 503,
            FailureKind::ServerError
            | FailureKind::Connect
            | FailureKind::StreamBroken
            | FailureKind::BadResponse
            | FailureKind::StreamError => 502,
        }
    }

    /// OpenAI `type` for an error of this kind that Backstop words itself.
    pub fn error_type(self) -> &'static str {
        match self {
            FailureKind::ClientError => "invalid_request_error",
            FailureKind::Auth => "authentication_error",
            FailureKind::RateLimited | FailureKind::Overloaded | FailureKind::Throttled => {
                "rate_limit_error"
            }
            FailureKind::Exhausted => "server_error",
            FailureKind::DeadlinePassed => "timeout_error",
            _ => "upstream_error",
        }
    }

    /// Stable snake_case name, used as a metric label and error code.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::FirstByteTimeout => "first_byte_timeout",
            FailureKind::StreamStalled => "stream_stalled",
            FailureKind::StreamBroken => "stream_broken",
            FailureKind::BadResponse => "bad_response",
            FailureKind::StreamError => "stream_error",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::ServerError => "server_error",
            FailureKind::Auth => "auth",
            FailureKind::ClientError => "client_error",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Unavailable => "circuit_open",
            FailureKind::Throttled => "rate_limit_held",
            FailureKind::Exhausted => "local_resources",
            FailureKind::DeadlinePassed => "deadline_passed",
        }
    }

    /// The kind an HTTP error status from a backend belongs to.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 => FailureKind::RateLimited,
            401 | 403 => FailureKind::Auth,
            400..=499 => FailureKind::ClientError,
            _ => FailureKind::ServerError,
        }
    }
}

/// A failed backend call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, in words (never the client's prompt).
    pub message: String,
    /// The backend's HTTP status, when it answered with one.
    pub status: Option<u16>,
    /// The backend's own OpenAI-shaped error body, passed on verbatim.
    pub body: Option<Value>,
    /// Headers to pass back to the client (rate limits, retry hints).
    pub headers: Headers,
}

impl BackendError {
    /// A failure Backstop words itself.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
            status: None,
            body: None,
            headers: Headers::new(),
        }
    }

    /// Whether the backend refused the prompt as too long for its model (its
    /// error code `context_length_exceeded`): another model may take it.
    pub fn is_context_length_exceeded(&self) -> bool {
        self.body
            .as_ref()
            .and_then(|b| b.pointer("/error/code"))
            .and_then(Value::as_str)
            == Some("context_length_exceeded")
    }

    /// The HTTP status to answer the client with.
    pub fn http_status(&self) -> u16 {
        match (self.status, &self.body) {
            // The backend's own status travels with its own error body.
            (Some(status), Some(_)) => status,
            _ => self.kind.default_status(),
        }
    }

    /// The OpenAI error body to show the client: the backend's own when it sent one.
    pub fn to_body(&self) -> Value {
        if let Some(body) = &self.body {
            return body.clone();
        }
        serde_json::to_value(ErrorBody::new(
            self.message.clone(),
            self.kind.error_type(),
            None,
            Some(self.kind.as_str()),
        ))
        .unwrap_or(Value::Null)
    }
}

/// A request the client got wrong: answered with a 400 before any backend is called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    /// What is wrong.
    pub message: String,
    /// The parameter at fault, as a path like `messages[0].role`.
    pub param: Option<String>,
}

impl InvalidRequest {
    /// The OpenAI error body for this error.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody::new(
            self.message.clone(),
            "invalid_request_error",
            self.param.clone(),
            None,
        )
    }
}
