//! The in-process model: a quantized llama-family GGUF running on candle.
//!
//! [`LocalBackend`] serves the same schema as an upstream. Weights load once
//! on a thread of their own; engine threads (never the async runtime) run the
//! forward passes, one sequence each with its own KV cache, fed by a bounded
//! queue that refuses at once when full. This is the only crate that sees
//! candle.

mod backend;
mod engine;
mod generate;
mod hub;
pub mod llama;
mod model;
mod q4_1;
pub mod template;
pub mod tokenizer;

use std::path::PathBuf;

pub use backend::{LocalBackend, DROPPED_TURNS_HEADER};
pub use hub::{fetch_from_hub, sha256_file};
pub use model::LoadedModel;

/// Where the local model is and how to run it.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Target name, shown in `x-backstop-backend`.
    pub target: String,
    /// Model name clients see in responses and `/v1/models`.
    pub name: String,
    /// The GGUF file.
    pub model: PathBuf,
    /// A `tokenizer.json` to use instead of the GGUF's own vocabulary.
    pub tokenizer: Option<PathBuf>,
    /// Sequences generated at once, one engine thread each. Default 1 on CPU:
    /// candle already spreads every operation over all cores through one
    /// global, spinning thread pool, so two sequences at once contend for it
    /// rather than share it (batched decoding is the way to more throughput).
    pub workers: usize,
    /// Requests that may wait for a free engine thread.
    pub queue: usize,
    /// Cap on the context window (prompt plus answer), below the model's own.
    pub context: Option<usize>,
}

impl LocalConfig {
    /// Defaults for the model file at `model`, served as `name`.
    pub fn new(name: impl Into<String>, model: impl Into<PathBuf>) -> Self {
        LocalConfig {
            target: "local".into(),
            name: name.into(),
            model: model.into(),
            tokenizer: None,
            workers: 1,
            queue: 16,
            context: None,
        }
    }
}

/// Why the local model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The model file is missing, unreadable, or not a supported model.
    #[error("model: {0}")]
    Model(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
}
