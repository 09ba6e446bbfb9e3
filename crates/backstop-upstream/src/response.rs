//! Reading upstream responses defensively: content types, bodies, error bodies
//! and event streams, each failure classified.

use std::time::Duration;

use backstop_adapter::{
    BackendError, ChatChunk, ChatCompletion, ChunkStream, FailureKind, Headers, Wire,
};
use bytes::BytesMut;
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::timeout;

use crate::decode::{self, ChunkDecoder, StreamBounds};

/// Headers passed back to the client: rate limits, retry hints, request ids.
fn is_passthrough(name: &str) -> bool {
    name.starts_with("x-ratelimit-")
        || name.starts_with("openai-")
        || matches!(
            name,
            "retry-after" | "retry-after-ms" | "x-should-retry" | "x-request-id"
        )
}

/// The headers of `headers` that the client should see.
pub(crate) fn passthrough_headers(headers: &HeaderMap) -> Headers {
    headers
        .iter()
        .filter(|(name, _)| is_passthrough(name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// What a response body claims to be.
pub(crate) enum Kind {
    Json,
    EventStream,
    Other(String),
}

pub(crate) fn content_type(response: &reqwest::Response) -> Kind {
    let ct = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    match essence {
        "application/json" => Kind::Json,
        "text/event-stream" => Kind::EventStream,
        _ => Kind::Other(ct),
    }
}

pub(crate) fn unexpected_type(ct: &str) -> BackendError {
    let shown = if ct.is_empty() { "none" } else { ct };
    BackendError::new(
        FailureKind::BadResponse,
        format!("upstream answered with an unexpected content type ({shown})"),
    )
}

/// Whether an I/O error means this process is out of file descriptors (or
/// the system is): Backstop's own exhaustion, not the upstream's failure.
fn out_of_descriptors(io: &std::io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    matches!(io.raw_os_error(), Some(EMFILE | ENFILE))
}

/// Classifies a transport error from reqwest.
pub(crate) fn transport_error(e: reqwest::Error) -> BackendError {
    let (kind, what) = if e.is_connect() {
        (FailureKind::Connect, "cannot connect to the upstream")
    } else if e.is_timeout() {
        (
            FailureKind::FirstByteTimeout,
            "the upstream did not answer in time",
        )
    } else if e.is_body() || e.is_decode() {
        (
            FailureKind::StreamBroken,
            "the upstream's answer was cut off",
        )
    } else {
        (
            FailureKind::Connect,
            "the upstream closed the connection without answering",
        )
    };
    // Clients get Backstop's words; the library's, without any URL, go to
    // the log for operators.
    let e = e.without_url();
    let mut detail = e.to_string();
    let mut cause = None;
    let mut exhausted = false;
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            cause = cause.or(io_cause(io.kind()));
            exhausted |= out_of_descriptors(io);
        }
        source = s.source();
    }
    if exhausted {
        tracing::warn!("out of file descriptors connecting to an upstream: {detail}");
        return BackendError::new(
            FailureKind::Exhausted,
            "Backstop is out of file descriptors; the upstream was not reached",
        );
    }
    tracing::debug!(kind = kind.as_str(), "upstream transport error: {detail}");
    let message = match cause {
        Some(cause) => format!("{what} ({cause})"),
        None => what.to_string(),
    };
    BackendError::new(kind, message)
}

/// A few words for the I/O failures worth telling apart.
fn io_cause(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::UnexpectedEof => "connection closed early",
        K::TimedOut => "timed out",
        K::BrokenPipe => "connection closed",
        _ => return None,
    })
}

/// Reads a whole body, allowing at most `idle` between reads and `max` bytes.
pub(crate) async fn read_body(
    mut response: reqwest::Response,
    idle: Duration,
    max: usize,
) -> Result<BytesMut, BackendError> {
    let mut body = BytesMut::new();
    loop {
        match timeout(idle, response.chunk()).await {
            Err(_) => {
                return Err(BackendError::new(
                    FailureKind::StreamStalled,
                    format!("response body stalled for {} ms", idle.as_millis()),
                ))
            }
            Ok(Err(e)) => {
                let mut err = transport_error(e);
                err.kind = FailureKind::StreamBroken;
                return Err(err);
            }
            Ok(Ok(None)) => return Ok(body),
            Ok(Ok(Some(bytes))) => {
                if body.len() + bytes.len() > max {
                    return Err(BackendError::new(
                        FailureKind::BadResponse,
                        format!("response body larger than {max} bytes"),
                    ));
                }
                body.extend_from_slice(&bytes);
            }
        }
    }
}

/// Reads and parses a JSON body, insisting on `application/json`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    response: reqwest::Response,
    idle: Duration,
    max: usize,
) -> Result<T, BackendError> {
    match content_type(&response) {
        Kind::Json => {}
        Kind::EventStream => return Err(unexpected_type("text/event-stream")),
        Kind::Other(ct) => return Err(unexpected_type(&ct)),
    }
    let body = read_body(response, idle, max).await?;
    decode::json(&body)
}

/// Reads a completion in the one schema, from a response in `wire`'s dialect.
pub(crate) async fn read_completion(
    response: reqwest::Response,
    wire: Wire,
    idle: Duration,
    max: usize,
) -> Result<ChatCompletion, BackendError> {
    match content_type(&response) {
        Kind::Json => {}
        Kind::EventStream => return Err(unexpected_type("text/event-stream")),
        Kind::Other(ct) => return Err(unexpected_type(&ct)),
    }
    let body = read_body(response, idle, max).await?;
    decode::completion(&body, wire)
}

/// Replaces every occurrence of each secret in `body` (an upstream that
/// echoes the `Authorization` header must not hand the key to a client).
fn scrub(body: &mut BytesMut, secrets: &[&str]) {
    const REDACTED: &[u8] = b"[redacted]";
    for secret in secrets
        .iter()
        .map(|s| s.as_bytes())
        .filter(|s| !s.is_empty())
    {
        let mut at = 0;
        while let Some(i) = body[at..].windows(secret.len()).position(|w| w == secret) {
            let start = at + i;
            let tail = body.split_off(start + secret.len());
            body.truncate(start);
            body.extend_from_slice(REDACTED);
            at = body.len();
            body.unsplit(tail);
        }
    }
}

/// Turns a non-2xx response into its error: the upstream's own OpenAI error
/// body and status when it sent one, a clean error of the status's kind
/// otherwise. `secrets` (the target's keys) are scrubbed from the body.
pub(crate) async fn error_from_status(
    response: reqwest::Response,
    idle: Duration,
    secrets: &[&str],
) -> BackendError {
    let status = response.status().as_u16();
    let headers = passthrough_headers(response.headers());
    let kind = FailureKind::from_status(status);
    let (is_json, ct) = match content_type(&response) {
        Kind::Json => (true, "application/json".to_string()),
        Kind::EventStream => (false, "text/event-stream".to_string()),
        Kind::Other(ct) if ct.is_empty() => (false, "none".to_string()),
        Kind::Other(ct) => (false, ct),
    };
    let mut body = read_body(response, idle, 1 << 20).await.ok();
    if let Some(body) = &mut body {
        scrub(body, secrets);
    }
    let parsed = body
        .filter(|_| is_json)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .filter(|v| v.get("error").is_some_and(Value::is_object));
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("upstream answered {status} with content type {ct}"));
    BackendError {
        kind,
        message,
        status: Some(status),
        body: parsed,
        headers,
    }
}

/// After every choice has sent its finish reason only a usage chunk and
/// `[DONE]` may follow, at once; an upstream silent this long after that has
/// finished, and its stream is closed cleanly instead of waiting out the idle
/// deadline.
const AFTER_FINISH: Duration = Duration::from_millis(500);

/// Reads an upstream event stream into chunks (decoded and bounded by
/// [`ChunkDecoder`]), within the idle deadline once the first chunk has
/// come (until then the router's first-token deadline decides, since a long
/// prompt may take a while).
pub(crate) struct ChunkReader {
    response: reqwest::Response,
    decoder: ChunkDecoder,
    idle: Duration,
    /// A chunk has been read.
    started: bool,
}

impl ChunkReader {
    pub(crate) fn new(
        response: reqwest::Response,
        wire: Wire,
        idle: Duration,
        bounds: StreamBounds,
    ) -> Self {
        ChunkReader {
            response,
            decoder: ChunkDecoder::new(wire, bounds),
            idle,
            started: false,
        }
    }

    pub(crate) fn into_stream(self) -> ChunkStream {
        Box::pin(futures_util::stream::unfold(
            self,
            |mut reader| async move {
                let item = reader.next().await?;
                Some((item, reader))
            },
        ))
    }

    fn fail(
        &mut self,
        kind: FailureKind,
        message: String,
    ) -> Option<Result<ChatChunk, BackendError>> {
        self.decoder.end();
        Some(Err(BackendError::new(kind, message)))
    }

    async fn next(&mut self) -> Option<Result<ChatChunk, BackendError>> {
        loop {
            if let Some(item) = self.decoder.next_chunk() {
                self.started |= item.is_ok();
                return Some(item);
            }
            if self.decoder.is_done() {
                return None;
            }
            let finished = self.decoder.all_finished();
            let wait = if finished {
                self.idle.min(AFTER_FINISH)
            } else {
                self.idle
            };
            let read = self.response.chunk();
            let read = if self.started {
                timeout(wait, read).await
            } else {
                Ok(read.await)
            };
            match read {
                Err(_) if finished => {
                    // The answer is complete; the upstream just never said `[DONE]`.
                    self.decoder.end();
                    return None;
                }
                Err(_) => {
                    let ms = self.idle.as_millis();
                    return self.fail(
                        FailureKind::StreamStalled,
                        format!("upstream stream sent nothing for {ms} ms"),
                    );
                }
                Ok(Err(e)) => {
                    let message = transport_error(e).message;
                    return self.fail(FailureKind::StreamBroken, message);
                }
                Ok(Ok(None)) if finished => {
                    // A finish reason was sent; only the `[DONE]` marker is missing.
                    self.decoder.end();
                    return None;
                }
                Ok(Ok(None)) => {
                    return self.fail(
                        FailureKind::StreamBroken,
                        "upstream stream ended before the answer was complete".into(),
                    )
                }
                Ok(Ok(Some(bytes))) => {
                    if let Err(e) = self.decoder.feed(&bytes) {
                        return Some(Err(e));
                    }
                }
            }
        }
    }
}
