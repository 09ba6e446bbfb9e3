//! The API dialects a client or a target speaks, over the one schema.
//!
//! A request knows its [`Api`]: what the client spoke, with what only that
//! dialect carries. A body on the wire is in a [`Wire`] dialect, which reads
//! answers into the one schema and writes them back out. A dialect's types
//! and conversions live in its own module (`chat`, `legacy`); this is the
//! one place that dispatches between them.

use serde_json::Value;

use crate::chat::{ChatChunk, ChatCompletion};
use crate::legacy::TextCompletion;
use crate::request::Legacy;
use crate::sse;

/// The dialect a client spoke.
#[derive(Debug, Clone, PartialEq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`, with its prompt and legacy-only fields.
    Legacy(Legacy),
}

impl Api {
    /// The dialect's wire format.
    pub fn wire(&self) -> Wire {
        match self {
            Api::Chat => Wire::Chat,
            Api::Legacy(_) => Wire::Legacy,
        }
    }

    /// The legacy request's own part, for a legacy request.
    pub fn legacy(&self) -> Option<&Legacy> {
        match self {
            Api::Legacy(legacy) => Some(legacy),
            Api::Chat => None,
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
}

impl Wire {
    /// The endpoint, under an OpenAI-compatible base URL.
    pub fn path(self) -> &'static str {
        match self {
            Wire::Chat => "/chat/completions",
            Wire::Legacy => "/completions",
        }
    }

    /// A whole answer in this dialect, in the one schema.
    pub fn decode_completion(self, body: Value) -> serde_json::Result<ChatCompletion> {
        match self {
            Wire::Chat => serde_json::from_value(body),
            Wire::Legacy => serde_json::from_value::<TextCompletion>(body).map(Into::into),
        }
    }

    /// One stream event's data in this dialect, in the one schema.
    pub fn decode_chunk(self, data: &str) -> serde_json::Result<ChatChunk> {
        match self {
            Wire::Chat => serde_json::from_str(data),
            Wire::Legacy => serde_json::from_str::<TextCompletion>(data).map(Into::into),
        }
    }

    /// A whole answer written in this dialect.
    pub fn encode_completion(self, completion: ChatCompletion) -> serde_json::Result<Vec<u8>> {
        match self {
            Wire::Chat => serde_json::to_vec(&completion),
            Wire::Legacy => serde_json::to_vec(&TextCompletion::from(completion)),
        }
    }

    /// A stream chunk written in this dialect as an SSE event onto `out`.
    pub fn encode_chunk(self, chunk: ChatChunk, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            Wire::Chat => sse::encode_json(&chunk, out),
            Wire::Legacy => sse::encode_json(&TextCompletion::from(chunk), out),
        }
    }
}
