//! The in-process model: a quantized llama-family GGUF running on candle.
//!
//! [`LocalBackend`] serves the same schema as an upstream. Weights load once
//! on a thread of their own; the engine thread (never the async runtime) runs
//! the forward passes, every active sequence batched into one step, each
//! with its own KV cache, fed by a bounded queue that refuses at once when
//! full. This is the only crate that sees
//! candle.
//!
//! Without the default `engine` feature the crate is only [`LocalConfig`]
//! and [`LocalError`]: what the config crate needs, without candle.

#[cfg(feature = "engine")]
mod backend;
#[cfg(feature = "engine")]
mod engine;
#[cfg(feature = "engine")]
mod generate;
#[cfg(feature = "engine")]
mod hub;
#[cfg(feature = "engine")]
mod linear;
#[cfg(feature = "engine")]
pub mod llama;
#[cfg(feature = "engine")]
mod model;
#[cfg(feature = "engine")]
mod q4_1;
#[cfg(feature = "engine")]
mod q4k;
#[cfg(feature = "engine")]
mod q6k;
#[cfg(feature = "engine")]
mod q8_0;
#[cfg(feature = "engine")]
mod rows;
#[cfg(feature = "engine")]
mod sampler;
#[cfg(feature = "engine")]
pub mod template;
#[cfg(feature = "engine")]
mod tiled;
#[cfg(feature = "engine")]
pub mod tokenizer;

use std::path::PathBuf;

#[cfg(feature = "engine")]
pub use backend::{LocalBackend, DROPPED_TURNS_HEADER};
#[cfg(feature = "engine")]
pub use hub::{fetch_from_hub, sha256_file};
#[cfg(feature = "engine")]
pub use model::LoadedModel;

/// Fixes, for the whole process, how many threads candle's matrix products
/// use. Call it first thing in `main`, before any other thread starts: it
/// sets an environment variable.
///
/// candle 0.11 works that number out again on every f32 matrix product
/// (attention has two per layer and sequence), by reading `/proc/cpuinfo`
/// unless `RAYON_NUM_THREADS` is set: measured here, a fifth of the default
/// model's decode time. This sets `RAYON_NUM_THREADS`, when it is not set,
/// to the number candle works out, once.
#[cfg(feature = "engine")]
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Where the local model is and how to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    /// Target name, shown in `x-backstop-backend`.
    pub target: String,
    /// Model name clients see in responses and `/v1/models`.
    pub name: String,
    /// The GGUF file.
    pub model: PathBuf,
    /// A `tokenizer.json` to use instead of the GGUF's own vocabulary.
    pub tokenizer: Option<PathBuf>,
    /// Sequences generated at once, batched into one forward pass per step:
    /// they share each step's weight reads, so more sequences add
    /// throughput, and each one's pace slows less than in proportion.
    pub batch: usize,
    /// Requests that may wait for a place in the batch.
    pub queue: usize,
    /// Cap on the context window (prompt plus answer), below the model's own.
    pub context: Option<usize>,
    /// New tokens for a request that gives no `max_tokens`: the last
    /// resort answers within a client's deadline rather than rambling to
    /// the end of its context.
    pub max_tokens: usize,
    /// New tokens for the continuation of an answer another target broke
    /// off (a client's smaller `max_tokens` still wins).
    pub continuation_tokens: usize,
    /// Highest sampling temperature used, whatever the client asked: a
    /// small fallback model must not be sampled as hot as a large one.
    pub max_temperature: f64,
    /// How each sequence's keys and values are kept.
    pub kv_cache: KvCache,
}

/// How the attention keys and values of a sequence are kept on the CPU
/// (on a GPU they stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCache {
    /// Half precision: half the memory a sequence holds and a decode step
    /// reads, as llama.cpp's default; the logits stay as close to the f32
    /// reference as the quantized weights leave them.
    #[default]
    F16,
    /// Single precision.
    F32,
}

impl LocalConfig {
    /// Defaults for the model file at `model`, served as `name`.
    pub fn new(name: impl Into<String>, model: impl Into<PathBuf>) -> Self {
        LocalConfig {
            target: "local".into(),
            name: name.into(),
            model: model.into(),
            tokenizer: None,
            batch: 4,
            queue: 16,
            context: None,
            max_tokens: 512,
            continuation_tokens: 256,
            max_temperature: 0.5,
            kv_cache: KvCache::default(),
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
