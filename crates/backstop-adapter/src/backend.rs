//! The interface every backend implements: the upstream HTTP client, the local
//! model, and test doubles alike.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;

use crate::chat::{ChatChunk, ChatCompletion, Model};
use crate::error::{BackendError, Headers};
use crate::request::Request;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A stream of chunks in the one schema; an `Err` item ends it.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, BackendError>> + Send>>;

/// A backend's answer with what the server needs to know about it.
#[derive(Debug)]
pub struct Reply<T> {
    /// The completion, or the stream of chunks.
    pub body: T,
    /// Headers to pass back to the client (rate limits, retry hints).
    pub headers: Headers,
    /// Time spent waiting on the backend itself: until the whole body for a
    /// completion, until the response headers for a stream. Backstop's own
    /// overhead is the total minus this.
    pub waited: Duration,
}

/// Something that can answer completions in the one schema.
pub trait Backend: Send + Sync {
    /// The target's name, shown to clients in `x-backstop-backend`.
    fn name(&self) -> &str;

    /// Answers a request with one complete response.
    fn complete<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>>;

    /// Answers a request with a stream of chunks. The future resolves once the
    /// backend has committed to answering (its headers arrived).
    fn stream<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>>;

    /// The models this backend serves.
    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>>;

    /// Whether the backend can serve now (a local model that is still
    /// loading cannot).
    fn ready(&self) -> bool {
        true
    }

    /// Whether the backend can continue a partial answer given as a prefill
    /// (see [`Request::prefill`]), so a broken stream can be finished here.
    fn continues(&self) -> bool {
        false
    }

    /// Whether a late first token elsewhere may be hedged to this backend
    /// without asking: it costs no money or quota (the local model).
    fn hedges_free(&self) -> bool {
        false
    }
}
