//! Backstop's one schema.
//!
//! Every backend's requests, responses, stream chunks, usage and errors are
//! expressed in these types, so a client cannot tell which backend answered
//! except by the model name and headers. The crate also holds the SSE codec and
//! the [`Backend`] trait. It has no async runtime and no HTTP dependency.

pub mod api;
pub mod backend;
pub mod chat;
pub mod continuation;
pub mod error;
pub mod legacy;
pub mod request;
pub mod responses;
pub mod sse;

pub use api::{Api, Wire, Writer};
pub use backend::{Backend, BoxFuture, ChunkStream, Reply};
pub use chat::{
    ChatChunk, ChatCompletion, ChatRequest, ChatWriter, Choice, ChunkChoice, Content, Delta,
    Message, Model, ModelList, Role, Usage,
};
pub use error::{ApiError, BackendError, ErrorBody, FailureKind, Headers, InvalidRequest};
pub use legacy::{Echo, TextChoice, TextCompletion};
pub use request::{Legacy, Outgoing, Request};
pub use responses::{ResponseWriter, Responses};
pub use sse::{SseDecoder, SseEvent};
