//! Reading upstream responses defensively: content types, bodies, error bodies
//! and event streams, each failure classified.

use std::collections::VecDeque;
use std::time::Duration;

use backstop_adapter::sse::{SseDecoder, SseEvent};
use backstop_adapter::{
    BackendError, ChatChunk, ChatCompletion, ChunkStream, FailureKind, Headers, TextCompletion,
};
use bytes::BytesMut;
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::timeout;

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
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            cause = cause.or(io_cause(io.kind()));
        }
        source = s.source();
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
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        BackendError::new(
            FailureKind::BadResponse,
            format!("upstream sent malformed JSON: {e}"),
        )
    })?;
    if let Some(err) = embedded_error(&value) {
        return Err(err);
    }
    serde_json::from_value(value).map_err(|e| {
        BackendError::new(
            FailureKind::BadResponse,
            format!("upstream JSON is not in the OpenAI format: {e}"),
        )
    })
}

/// Reads a completion in the one schema, from a chat or a legacy response.
pub(crate) async fn read_completion(
    response: reqwest::Response,
    legacy: bool,
    idle: Duration,
    max: usize,
) -> Result<ChatCompletion, BackendError> {
    if legacy {
        let text: TextCompletion = read_json(response, idle, max).await?;
        Ok(text.into())
    } else {
        read_json(response, idle, max).await
    }
}

/// An OpenAI error object inside a successful response or stream.
fn embedded_error(value: &Value) -> Option<BackendError> {
    let error = value.get("error")?;
    if error.is_null() {
        return None;
    }
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("error without message");
    Some(BackendError {
        kind: FailureKind::StreamError,
        message: format!("upstream sent an error inside a successful response: {message}"),
        status: Some(502),
        body: Some(serde_json::json!({ "error": error })),
        headers: Headers::new(),
    })
}

/// Turns a non-2xx response into its error: the upstream's own OpenAI error
/// body and status when it sent one, a clean error of the status's kind otherwise.
pub(crate) async fn error_from_status(response: reqwest::Response, idle: Duration) -> BackendError {
    let status = response.status().as_u16();
    let headers = passthrough_headers(response.headers());
    let kind = FailureKind::from_status(status);
    let (is_json, ct) = match content_type(&response) {
        Kind::Json => (true, "application/json".to_string()),
        Kind::EventStream => (false, "text/event-stream".to_string()),
        Kind::Other(ct) if ct.is_empty() => (false, "none".to_string()),
        Kind::Other(ct) => (false, ct),
    };
    let body = read_body(response, idle, 1 << 20).await.ok();
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

/// Decodes an upstream event stream into chunks, bounded by the idle deadline
/// once the first chunk has come (until then the router's first-token
/// deadline decides, since a long prompt may take a while).
pub(crate) struct ChunkReader {
    response: reqwest::Response,
    decoder: SseDecoder,
    events: VecDeque<SseEvent>,
    scratch: Vec<SseEvent>,
    legacy: bool,
    idle: Duration,
    /// Per choice index: whether it has sent its finish reason.
    finished: Vec<bool>,
    /// A chunk has been read.
    started: bool,
    done: bool,
}

impl ChunkReader {
    pub(crate) fn new(response: reqwest::Response, legacy: bool, idle: Duration) -> Self {
        ChunkReader {
            response,
            decoder: SseDecoder::new(),
            events: VecDeque::new(),
            scratch: Vec::new(),
            legacy,
            idle,
            finished: Vec::new(),
            started: false,
            done: false,
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
        self.done = true;
        Some(Err(BackendError::new(kind, message)))
    }

    async fn next(&mut self) -> Option<Result<ChatChunk, BackendError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.events.pop_front() {
                match self.parse(event) {
                    Some(Ok(chunk)) => {
                        self.started = true;
                        return Some(Ok(chunk));
                    }
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => continue,
                }
            }
            let finished = self.all_finished();
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
                    self.done = true;
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
                    self.done = true;
                    return None;
                }
                Ok(Ok(None)) => {
                    return self.fail(
                        FailureKind::StreamBroken,
                        "upstream stream ended before the answer was complete".into(),
                    )
                }
                Ok(Ok(Some(bytes))) => {
                    self.decoder.feed(&bytes, &mut self.scratch);
                    self.events.extend(self.scratch.drain(..));
                }
            }
        }
    }

    /// Whether every choice that appeared has finished.
    fn all_finished(&self) -> bool {
        !self.finished.is_empty() && self.finished.iter().all(|f| *f)
    }

    /// One event: a chunk, the end (`[DONE]`, returned as `None` with `done`
    /// set), or an error. Non-data events are skipped.
    fn parse(&mut self, event: SseEvent) -> Option<Result<ChatChunk, BackendError>> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.done = true;
            return None;
        }
        // The common case parses straight into the schema; only a chunk that
        // does not fit is looked at again as an error or a malformed event.
        let parsed = if self.legacy {
            serde_json::from_str::<TextCompletion>(data).map(ChatChunk::from)
        } else {
            serde_json::from_str::<ChatChunk>(data)
        };
        let chunk = match parsed {
            Ok(chunk) if event.event != "error" && !chunk.extra.contains_key("error") => Ok(chunk),
            other => {
                let value: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => {
                        return Some(Err(BackendError::new(
                            FailureKind::BadResponse,
                            format!("upstream sent a malformed stream chunk: {e}"),
                        )))
                    }
                };
                if let Some(err) = embedded_error(&value) {
                    return Some(Err(err));
                }
                if event.event == "error" {
                    return Some(Err(BackendError::new(
                        FailureKind::StreamError,
                        "upstream sent an error event".to_string(),
                    )));
                }
                other
            }
        };
        match chunk {
            Ok(chunk) => {
                for choice in &chunk.choices {
                    let i = choice.index as usize;
                    if self.finished.len() <= i {
                        self.finished.resize(i + 1, false);
                    }
                    self.finished[i] |= choice.finish_reason.is_some();
                }
                Some(Ok(chunk))
            }
            Err(e) => Some(Err(BackendError::new(
                FailureKind::BadResponse,
                format!("upstream stream chunk is not in the OpenAI format: {e}"),
            ))),
        }
    }
}
