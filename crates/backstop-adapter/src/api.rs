//! The API dialects a client or a target speaks, over the one schema.
//!
//! A request knows its [`Api`]: what the client spoke, with what only that
//! dialect carries. A body on the wire is in a [`Wire`] dialect, which reads
//! answers into the one schema and writes them back out. A dialect's types
//! and conversions live in its own module (`chat`, `legacy`, `responses`);
//! this is the one place that dispatches between them. A [`Writer`] writes
//! one answer back out in the client's dialect.

use serde_json::Value;

use crate::chat::{ChatChunk, ChatCompletion, ChatWriter};
use crate::legacy::TextCompletion;
use crate::request::{Legacy, Request};
use crate::responses::{self, ResponseWriter, Responses};
use crate::sse;

/// The dialect a client spoke.
#[derive(Debug, Clone, PartialEq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`, with its prompt and legacy-only fields.
    Legacy(Legacy),
    /// `POST /v1/responses`, with its input and Responses-only fields.
    Responses(Box<Responses>),
}

impl Api {
    /// The dialect's wire format.
    pub fn wire(&self) -> Wire {
        match self {
            Api::Chat => Wire::Chat,
            Api::Legacy(_) => Wire::Legacy,
            Api::Responses(_) => Wire::Responses,
        }
    }

    /// The legacy request's own part, for a legacy request.
    pub fn legacy(&self) -> Option<&Legacy> {
        match self {
            Api::Legacy(legacy) => Some(legacy),
            _ => None,
        }
    }

    /// The Responses request's own part, for a Responses request.
    pub fn responses(&self) -> Option<&Responses> {
        match self {
            Api::Responses(responses) => Some(responses),
            _ => None,
        }
    }

    /// The first field a chat cannot carry, for a request of `n` choices
    /// that goes to a target as a chat.
    pub fn untranslatable(&self, n: u32) -> Option<&'static str> {
        match self {
            Api::Chat => None,
            Api::Legacy(legacy) => legacy.untranslatable(n),
            Api::Responses(responses) => responses.untranslatable(),
        }
    }
}

/// A dialect's wire format: its endpoint, and how its answers read into
/// the one schema and are written from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Chat completions: `chat.completion` objects and chunks.
    Chat,
    /// Legacy completions: `text_completion` objects and chunks.
    Legacy,
    /// Responses: `response` objects and typed events.
    Responses,
}

impl Wire {
    /// The endpoint, under an OpenAI-compatible base URL.
    pub fn path(self) -> &'static str {
        match self {
            Wire::Chat => "/chat/completions",
            Wire::Legacy => "/completions",
            Wire::Responses => "/responses",
        }
    }

    /// A whole answer in this dialect, in the one schema.
    pub fn decode_completion(self, body: Value) -> serde_json::Result<ChatCompletion> {
        match self {
            Wire::Chat => serde_json::from_value(body),
            Wire::Legacy => serde_json::from_value::<TextCompletion>(body).map(Into::into),
            Wire::Responses => responses::decode::completion(body),
        }
    }

    /// One stream event's data in this dialect, in the one schema.
    pub fn decode_chunk(self, data: &str) -> serde_json::Result<ChatChunk> {
        match self {
            Wire::Chat => serde_json::from_str(data),
            Wire::Legacy => serde_json::from_str::<TextCompletion>(data).map(Into::into),
            Wire::Responses => responses::decode::chunk(data),
        }
    }
}

/// Writes one answer back out in the dialect the client spoke: a whole
/// body, or a stream's events and its end.
#[derive(Debug)]
pub enum Writer {
    /// Chat completions, whose stream may go on from another run's.
    Chat(ChatWriter),
    /// Legacy completions.
    Legacy,
    /// Responses, which number their events and end with the response.
    Responses(Box<ResponseWriter>),
}

impl Writer {
    /// The writer for `req`'s answer. A Responses answer is response `id`,
    /// made at `created_at` (Unix seconds).
    pub fn new(req: &Request, id: impl FnOnce() -> String, created_at: u64) -> Self {
        match req.api.wire() {
            Wire::Chat => Writer::Chat(ChatWriter::default()),
            Wire::Legacy => Writer::Legacy,
            Wire::Responses => {
                Writer::Responses(Box::new(ResponseWriter::new(req, id(), created_at)))
            }
        }
    }

    /// A whole answer.
    pub fn completion(&mut self, completion: ChatCompletion) -> serde_json::Result<Vec<u8>> {
        match self {
            Writer::Chat(_) => serde_json::to_vec(&completion),
            Writer::Legacy => serde_json::to_vec(&TextCompletion::from(completion)),
            Writer::Responses(w) => serde_json::to_vec(&w.completion(completion)),
        }
    }

    /// One stream chunk, as SSE onto `out`.
    pub fn chunk(&mut self, mut chunk: ChatChunk, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            Writer::Chat(w) => {
                w.stamp(&mut chunk);
                sse::encode_json(&chunk, out)
            }
            Writer::Legacy => sse::encode_json(&TextCompletion::from(chunk), out),
            Writer::Responses(w) => w.chunk(chunk, out),
        }
    }

    /// The end of a complete stream onto `out`.
    pub fn end(&mut self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            Writer::Chat(_) | Writer::Legacy => {
                out.extend_from_slice(b"data: [DONE]\n\n");
                Ok(())
            }
            Writer::Responses(w) => w.end(out),
        }
    }

    /// The end of a stream that failed onto `out`: `body` is the OpenAI
    /// error body, `{"error": {...}}`.
    pub fn fail(&mut self, body: &Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            Writer::Chat(_) | Writer::Legacy => sse::encode_json(body, out),
            Writer::Responses(w) => w.fail(body.get("error").unwrap_or(body), out),
        }
    }
}
