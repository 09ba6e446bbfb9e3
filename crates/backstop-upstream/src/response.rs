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

/// What a stream may hold: the choices the client asked for, the tokens
/// each may have, and the size of one event.
pub(crate) struct StreamBounds {
    /// `n`: a chunk for a choice index at or past it is malformed.
    pub choices: u32,
    /// The client's token cap on each choice, after what a prefill already
    /// said; none when the client set none.
    pub max_tokens: Option<u64>,
    /// The model whose tokenizer counts them.
    pub model: String,
    /// Largest event-stream line or event.
    pub max_event_bytes: usize,
}

/// Decodes an upstream event stream into chunks, bounded by the idle deadline
/// once the first chunk has come (until then the router's first-token
/// deadline decides, since a long prompt may take a while), and by
/// [`StreamBounds`]: an upstream that sends past the client's `max_tokens`
/// has the choice ended there with `finish_reason: "length"`.
pub(crate) struct ChunkReader {
    response: reqwest::Response,
    decoder: SseDecoder,
    events: VecDeque<SseEvent>,
    scratch: Vec<SseEvent>,
    legacy: bool,
    idle: Duration,
    bounds: StreamBounds,
    /// Per choice index: whether it has sent its finish reason.
    finished: Vec<bool>,
    /// Per choice index: tokens passed on so far.
    tokens: Vec<u64>,
    /// Every choice has reached the client's cap.
    capped: bool,
    /// A chunk has been read.
    started: bool,
    done: bool,
}

impl ChunkReader {
    pub(crate) fn new(
        response: reqwest::Response,
        legacy: bool,
        idle: Duration,
        bounds: StreamBounds,
    ) -> Self {
        let choices = bounds.choices.max(1) as usize;
        ChunkReader {
            response,
            decoder: SseDecoder::with_limit(bounds.max_event_bytes),
            events: VecDeque::new(),
            scratch: Vec::new(),
            legacy,
            idle,
            bounds,
            finished: Vec::with_capacity(choices),
            tokens: vec![0; choices],
            capped: false,
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
                    Some(Ok(mut chunk)) => {
                        self.started = true;
                        if self.capped {
                            // Past the cap only the usage may still come.
                            self.done = true;
                            let usage = chunk.choices.is_empty() && chunk.usage.is_some();
                            return usage.then_some(Ok(chunk));
                        }
                        let had_choices = !chunk.choices.is_empty();
                        if self.bounds.max_tokens.is_some() {
                            self.capped = self.cap(&mut chunk);
                        }
                        if had_choices && chunk.choices.is_empty() && chunk.usage.is_none() {
                            continue; // only text past a choice's cap
                        }
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
                    if let Err(e) = self.decoder.feed(&bytes, &mut self.scratch) {
                        // What came before the oversized event is dropped
                        // with it: the answer breaks where the client is.
                        self.scratch.clear();
                        return self.fail(FailureKind::BadResponse, format!("upstream sent {e}"));
                    }
                    self.events.extend(self.scratch.drain(..));
                }
            }
        }
    }

    /// Holds each choice of `chunk` to the client's token cap: text past it
    /// is cut, the choice ends there with `finish_reason: "length"`, and
    /// what the upstream sends for it afterwards is dropped. Whether every
    /// choice has now reached its cap.
    fn cap(&mut self, chunk: &mut ChatChunk) -> bool {
        let Some(cap) = self.bounds.max_tokens else {
            return false;
        };
        let model = &self.bounds.model;
        let tokens = &mut self.tokens;
        chunk.choices.retain_mut(|choice| {
            let used = &mut tokens[choice.index as usize];
            if *used >= cap {
                return false; // already ended here
            }
            let delta = &mut choice.delta;
            let count = |t: &str| super::tokens::text_tokens(t, model) as u64;
            let arguments = delta
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|c| c.function.as_ref()?.arguments.as_deref());
            let texts: Vec<&str> = delta
                .content
                .as_deref()
                .into_iter()
                .chain(arguments)
                .collect();
            if texts.iter().all(|t| t.is_empty()) {
                return true;
            }
            // A piece of text is at least a token, whatever it encodes to.
            let added = texts.into_iter().map(count).sum::<u64>().max(1);
            let room = cap - *used;
            *used += added;
            if *used > cap {
                if let Some(content) = &mut delta.content {
                    *content = super::tokens::first_tokens(content, model, room as usize);
                }
                delta.tool_calls = None;
                *used = cap;
            }
            if *used >= cap && choice.finish_reason.is_none() {
                tracing::warn!(
                    index = choice.index,
                    "upstream streamed past the client's max_tokens ({cap}): the choice ends there"
                );
                choice.finish_reason = Some("length".into());
            }
            true
        });
        tokens.iter().all(|used| *used >= cap)
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
                    if choice.index >= self.bounds.choices.max(1) {
                        return Some(Err(BackendError::new(
                            FailureKind::BadResponse,
                            format!(
                                "upstream sent choice index {} for a request of {} choice(s)",
                                choice.index,
                                self.bounds.choices.max(1)
                            ),
                        )));
                    }
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
