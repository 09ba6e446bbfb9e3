//! One sequence's generation: prompt fitting, prefill, sampling, stop
//! sequences and UTF-8-safe streaming of text deltas.

use crate::llama::Cache;
use backstop_adapter::{BackendError, FailureKind};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::utils::apply_repeat_penalty;
use tokio::sync::mpsc;

use crate::model::LoadedModel;
use crate::template::Turn;

/// Tokens looked back over for the repetition penalty.
const REPEAT_WINDOW: usize = 64;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Turn>),
    /// Raw text continued as is (legacy completions).
    Raw(String),
}

/// Sampling and stopping settings.
#[derive(Debug, Clone)]
pub struct Params {
    /// Cap on generated tokens; clamped to what fits in the context.
    pub max_tokens: Option<usize>,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass; 1 disables.
    pub top_p: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Seed of the sampler's random numbers.
    pub seed: u64,
    /// Penalty on recently generated tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Strings that end the answer; never part of it.
    pub stop: Vec<String>,
}

/// What a running sequence reports, in order.
#[derive(Debug)]
pub enum Event {
    /// The prompt was accepted; this many old turns were dropped to fit it.
    Started {
        /// Oldest turns left out so the prompt fits.
        dropped_turns: usize,
    },
    /// A piece of the answer (always whole UTF-8 characters).
    Text(String),
    /// The answer is complete.
    Done {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// Generation failed.
    Failed(BackendError),
}

/// A request for the engine.
pub struct Job {
    /// What to continue.
    pub prompt: Prompt,
    /// Assistant text already given (by a backend whose stream broke); the
    /// answer continues it and does not repeat it.
    pub prefill: String,
    /// How.
    pub params: Params,
    /// Where events go; when the receiver is gone the job stops.
    pub events: mpsc::Sender<Event>,
}

fn failed(kind: FailureKind, message: String) -> Event {
    Event::Failed(BackendError::new(kind, message))
}

fn model_failure(e: candle_core::Error) -> Event {
    failed(FailureKind::ServerError, format!("local model failed: {e}"))
}

/// Token ids of the prompt, dropping the oldest non-system turns until it
/// leaves room for at least one answer token.
fn fit_prompt(
    model: &LoadedModel,
    prompt: &Prompt,
    prefill: &str,
) -> Result<(Vec<u32>, usize), Event> {
    let tok = &model.tokenizer;
    let encode = |text: &str| {
        tok.encode(text)
            .map_err(|e| failed(FailureKind::ServerError, e.to_string()))
    };
    let limit = model.context.saturating_sub(1);
    let mut turns = match prompt {
        Prompt::Raw(text) => {
            let ids = encode(&format!("{text}{prefill}"))?;
            return if ids.len() <= limit {
                Ok((ids, 0))
            } else {
                Err(too_long(ids.len(), model.context))
            };
        }
        Prompt::Chat(turns) => turns.clone(),
    };
    let mut dropped = 0;
    loop {
        let mut text = model
            .template
            .render(&turns, tok.bos_text(), tok.eos_text())
            .map_err(|e| failed(FailureKind::ClientError, e.to_string()))?;
        text.push_str(prefill);
        let ids = encode(&text)?;
        if ids.len() <= limit {
            return Ok((ids, dropped));
        }
        // Keep system turns and the last turn; drop the oldest of the rest.
        let last = turns.len().saturating_sub(1);
        match turns.iter().take(last).position(|t| t.role != "system") {
            Some(i) => {
                turns.remove(i);
                dropped += 1;
            }
            None => return Err(too_long(ids.len(), model.context)),
        }
    }
}

fn too_long(tokens: usize, context: usize) -> Event {
    let mut e = BackendError::new(
        FailureKind::ClientError,
        format!(
            "This model's maximum context length is {context} tokens. However, your messages \
             resulted in {tokens} tokens even after dropping older turns ({} over).",
            tokens + 1 - context
        ),
    );
    e.body = Some(serde_json::json!({"error": {
        "message": e.message, "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}));
    e.status = Some(400);
    Event::Failed(e)
}

fn sampler(params: &Params) -> LogitsProcessor {
    let temperature = params.temperature;
    let sampling = if temperature <= 1e-7 {
        Sampling::ArgMax
    } else {
        let top_p = (params.top_p < 1.0).then_some(params.top_p);
        match (params.top_k, top_p) {
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (None, None) => Sampling::All { temperature },
        }
    };
    LogitsProcessor::from_sampling(params.seed, sampling)
}

/// Where the text that may be sent ends: before any stop string, and before a
/// tail that could still become one, or an unfinished character.
fn sendable(text: &str, stops: &[String]) -> (usize, bool) {
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return (at, true);
    }
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for stop in stops {
        for len in (1..stop.len()).rev() {
            if stop.is_char_boundary(len) && text[..end].ends_with(&stop[..len]) {
                end = end.min(text.len() - len);
                break;
            }
        }
    }
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (end, false)
}

/// Runs one job to its end on this thread. `cache` is the worker's own KV
/// cache, allocated (or grown) to hold this sequence before it starts.
pub fn run(model: &LoadedModel, cache: &mut Option<Cache>, job: Job) {
    let Job {
        prompt,
        prefill,
        params,
        events,
    } = job;
    // A prefill is answer the client already has: it comes out of
    // max_tokens, and usage counts it as completion, not prompt.
    let answered = match prefill.as_str() {
        "" => 0,
        text => model.tokenizer.encode(text).map_or(0, |ids| ids.len()),
    };
    let send = |event: Event| {
        let event = match event {
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => Event::Done {
                finish_reason,
                prompt_tokens: prompt_tokens.saturating_sub(answered),
                completion_tokens: completion_tokens + answered.min(prompt_tokens),
            },
            other => other,
        };
        events.blocking_send(event).is_ok()
    };
    let (ids, dropped_turns) = match fit_prompt(model, &prompt, &prefill) {
        Ok(fitted) => fitted,
        Err(event) => {
            send(event);
            return;
        }
    };
    if !send(Event::Started { dropped_turns }) {
        return;
    }
    let room = model.context - ids.len();
    let max_new = params
        .max_tokens
        .map_or(room, |m| m.saturating_sub(answered).min(room));
    let need = ids.len() + max_new;
    let cache = match cache {
        Some(c) if c.capacity() >= need => {
            c.clear();
            c
        }
        _ => match model
            .llama
            .cache(need.next_multiple_of(256).min(model.context))
        {
            Ok(c) => cache.insert(c),
            Err(e) => {
                send(model_failure(e));
                return;
            }
        },
    };
    if let Err(event) = generate(model, cache, &ids, max_new, &params, &send, &events) {
        send(event);
    }
}

fn generate(
    model: &LoadedModel,
    cache: &mut Cache,
    prompt: &[u32],
    max_new: usize,
    params: &Params,
    send: &impl Fn(Event) -> bool,
    events: &mpsc::Sender<Event>,
) -> Result<(), Event> {
    let tok = &model.tokenizer;
    let mut sampler = sampler(params);
    let mut logits = model.llama.forward(prompt, cache).map_err(model_failure)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut sent = 0;
    let finish = loop {
        if events.is_closed() {
            return Ok(()); // the client is gone: free the slot
        }
        if max_new == 0 {
            break "length";
        }
        if params.repetition_penalty != 1.0 {
            let start = generated.len().saturating_sub(REPEAT_WINDOW);
            logits = apply_repeat_penalty(&logits, params.repetition_penalty, &generated[start..])
                .map_err(model_failure)?;
        }
        let next = sampler.sample(&logits).map_err(model_failure)?;
        if tok.is_stop(next) {
            break "stop";
        }
        generated.push(next);
        let text = tok
            .decode(&generated)
            .map_err(|e| failed(FailureKind::ServerError, e.to_string()))?;
        let (end, stopped) = sendable(&text, &params.stop);
        if let Some(piece) = text.get(sent..end).filter(|p| !p.is_empty()) {
            if !send(Event::Text(piece.to_string())) {
                return Ok(());
            }
            sent = end;
        }
        if stopped {
            break "stop";
        }
        if generated.len() >= max_new {
            break "length";
        }
        logits = model.llama.forward(&[next], cache).map_err(model_failure)?;
    };
    // Text held back for a stop string that never completed belongs to the answer.
    let text = tok
        .decode(&generated)
        .map_err(|e| failed(FailureKind::ServerError, e.to_string()))?;
    let end = params
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    if let Some(piece) = text.get(sent..end).filter(|p| !p.is_empty()) {
        send(Event::Text(piece.to_string()));
    }
    send(Event::Done {
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        completion_tokens: generated.len(),
    });
    Ok(())
}

#[cfg(test)]
mod tests;
