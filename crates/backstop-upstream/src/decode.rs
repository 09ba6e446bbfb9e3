//! Decoding what an upstream sends, apart from how it arrives: event-stream
//! bytes into chunks of the one schema ([`ChunkDecoder`]), and JSON bodies
//! into completions. Pure functions of their input, so the fuzz targets
//! drive them directly. Every bound holds here: the size of an event, the
//! choice index, and the client's `max_tokens`.

use std::collections::VecDeque;

use backstop_adapter::sse::{SseDecoder, SseEvent};
use backstop_adapter::{
    BackendError, ChatChunk, ChatCompletion, Content, FailureKind, Headers, Wire,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What a stream may hold: the choices the client asked for, the tokens
/// each may have, and the size of one event.
pub struct StreamBounds {
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

/// Event-stream bytes into chunks, held to [`StreamBounds`]: an event past
/// the size limit, or a choice index at or past `n`, is a bad response; an
/// upstream that sends past the client's `max_tokens` has the choice ended
/// there with `finish_reason: "length"`.
pub struct ChunkDecoder {
    decoder: SseDecoder,
    events: VecDeque<SseEvent>,
    scratch: Vec<SseEvent>,
    wire: Wire,
    bounds: StreamBounds,
    /// Per choice index: whether it has sent its finish reason.
    finished: Vec<bool>,
    /// Per choice index: tokens passed on so far.
    tokens: Vec<u64>,
    /// Every choice has reached the client's cap.
    capped: bool,
    /// Chunks seen since.
    after_cap: u32,
    done: bool,
}

/// Chunks read (and dropped) after the cap while looking for the usage
/// chunk that follows the upstream's own end.
const AFTER_CAP: u32 = 64;

impl ChunkDecoder {
    /// A decoder for a stream in `wire`'s dialect.
    pub fn new(wire: Wire, bounds: StreamBounds) -> Self {
        let choices = bounds.choices.max(1) as usize;
        ChunkDecoder {
            decoder: SseDecoder::with_limit(bounds.max_event_bytes),
            events: VecDeque::new(),
            scratch: Vec::new(),
            wire,
            bounds,
            finished: Vec::with_capacity(choices),
            tokens: vec![0; choices],
            capped: false,
            after_cap: 0,
            done: false,
        }
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        if let Err(e) = self.decoder.feed(bytes, &mut self.scratch) {
            // What came before the oversized event is dropped with it: the
            // answer breaks where the client is.
            self.scratch.clear();
            self.events.clear();
            self.done = true;
            return Err(BackendError::new(
                FailureKind::BadResponse,
                format!("upstream sent {e}"),
            ));
        }
        self.events.extend(self.scratch.drain(..));
        Ok(())
    }

    /// The next chunk, or error, from what was fed; `None` when more bytes
    /// are needed or the stream is over ([`ChunkDecoder::is_done`]).
    pub fn next_chunk(&mut self) -> Option<Result<ChatChunk, BackendError>> {
        while !self.done {
            let event = self.events.pop_front()?;
            match self.parse(event) {
                Some(Ok(mut chunk)) => {
                    if self.capped {
                        // Past the cap nothing more reaches the client but
                        // the usage, which an upstream sends after its own
                        // end; it is looked for a little while.
                        self.after_cap += 1;
                        if chunk.usage.is_some() {
                            self.done = true;
                            chunk.choices.clear();
                            return Some(Ok(chunk));
                        }
                        if self.after_cap > AFTER_CAP {
                            self.done = true;
                            return None;
                        }
                        continue;
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
                None => {}
            }
        }
        None
    }

    /// Whether the stream is over: `[DONE]`, an error, or [`ChunkDecoder::end`].
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Ends the stream: nothing more is decoded.
    pub fn end(&mut self) {
        self.done = true;
        self.events.clear();
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
            let room = cap - *used;
            let count = |t: &str| crate::tokens::tokens_up_to(t, model, room as usize) as u64;
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
            *used += added;
            if *used > cap {
                if let Some(content) = &mut delta.content {
                    *content = crate::tokens::first_tokens(content, model, room as usize);
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
    pub fn all_finished(&self) -> bool {
        self.capped || (!self.finished.is_empty() && self.finished.iter().all(|f| *f))
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
        let parsed = self.wire.decode_chunk(data);
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

/// Parses a JSON body as `T`: malformed JSON, an OpenAI error object, or a
/// shape that is not `T` are each a classified failure.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, BackendError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
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

/// Holds each choice of a whole completion to the client's token cap: text
/// past it is cut and the choice ends with `finish_reason: "length"`, as a
/// stream's would ([`ChunkDecoder`]).
pub fn cap_completion(completion: &mut ChatCompletion, max_tokens: u64, model: &str) {
    for choice in &mut completion.choices {
        let Some(Content::Text(text)) = &mut choice.message.content else {
            continue;
        };
        // A token is at least a byte: a text this short is within the cap.
        if (text.len() as u64) <= max_tokens {
            continue;
        }
        let cut = crate::tokens::first_tokens(text, model, max_tokens as usize);
        if cut.len() < text.len() {
            tracing::warn!(
                index = choice.index,
                "upstream answered past the client's max_tokens ({max_tokens}): cut there"
            );
            *text = cut;
            choice.finish_reason = Some("length".into());
        }
    }
}

/// A completion in the one schema from a JSON body in `wire`'s dialect.
pub fn completion(body: &[u8], wire: Wire) -> Result<ChatCompletion, BackendError> {
    let value = json::<Value>(body)?;
    wire.decode_completion(value).map_err(|e| {
        BackendError::new(
            FailureKind::BadResponse,
            format!("upstream JSON is not in the OpenAI format: {e}"),
        )
    })
}

/// An OpenAI error object inside a successful response or stream.
/// A Responses stream's failure event counts too (`error`, whose fields are
/// the error's, and `response.failed`, whose response holds it).
pub(crate) fn embedded_error(value: &Value) -> Option<BackendError> {
    let error = match value.get("type").and_then(Value::as_str) {
        Some("error") => value,
        Some("response.failed") => value.pointer("/response/error")?,
        _ => value.get("error")?,
    };
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
