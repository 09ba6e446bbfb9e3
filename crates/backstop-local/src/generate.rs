//! One sequence's generation: prompt fitting, prefill, sampling, stop
//! sequences and UTF-8-safe streaming of text deltas.

use crate::llama::{Cache, Segment};
use backstop_adapter::continuation::ends_a_thought;
use backstop_adapter::{BackendError, FailureKind};
use candle_core::Tensor;
use candle_transformers::utils::apply_repeat_penalty;
use tokio::sync::mpsc;

use crate::model::LoadedModel;
use crate::sampler::Sampler;
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
    /// The client's cap on the whole answer (a prefill included).
    pub max_tokens: Option<usize>,
    /// The local model's own cap on new tokens, whatever the client asked;
    /// both are clamped to what fits in the context.
    pub cap: usize,
    /// When generation stops, the answer cut short (`length`); a job still
    /// queued then fails.
    pub deadline: Option<tokio::time::Instant>,
    /// While the answer so far (a prefill included) ends mid-sentence, the
    /// end of turn is held back for up to this many new tokens: a
    /// continuation that would end at once must finish the sentence.
    pub hold_end: usize,
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
    /// Where events go; when the receiver is gone the job stops. Unbounded:
    /// the engine steps every sequence together and must never wait for
    /// one client that reads slowly (an answer is at most a context's
    /// worth of small pieces).
    pub events: mpsc::UnboundedSender<Event>,
}

fn failed(kind: FailureKind, message: String) -> Event {
    Event::Failed(BackendError::new(kind, message))
}

/// An error's own words, without the backtrace candle appends when
/// `RUST_BACKTRACE` is set: what reaches a client is one line.
pub fn describe(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A failure of the model's computation.
pub fn model_failure(e: candle_core::Error) -> Event {
    failed(
        FailureKind::ServerError,
        format!("local model failed: {}", describe(&e)),
    )
}

/// Sampling failed on logits the model computed soundly: the client's
/// parameters are at fault, not the model (a 400, not retried, and not
/// counted against the target).
fn sampling_failure(e: candle_core::Error) -> Event {
    let mut e = BackendError::new(
        FailureKind::ClientError,
        format!(
            "the local model cannot sample with these parameters (temperature, top_p, top_k, \
             repetition_penalty): {}",
            describe(&e)
        ),
    );
    e.status = Some(400);
    Event::Failed(e)
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
            if ids.is_empty() {
                let mut e = BackendError::new(
                    FailureKind::ClientError,
                    "`prompt` is empty: the local model needs text to continue",
                );
                e.status = Some(400);
                return Err(Event::Failed(e));
            }
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

fn sampler(params: &Params) -> Sampler {
    // Below f32's range a mass keeps nothing; any mass under the most likely
    // token's probability (at least 1/vocabulary) keeps just that token.
    let top_p = (params.top_p < 1.0).then_some(params.top_p.max(1e-6));
    Sampler::new(params.seed, params.temperature, top_p, params.top_k)
}

/// Whether every logit is a finite number.
fn finite(logits: &candle_core::Tensor) -> candle_core::Result<bool> {
    Ok(logits
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite()))
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

/// What one token did to a sequence.
enum Step {
    /// It goes on.
    Going,
    /// The answer is complete, for this reason (`stop` or `length`).
    Finished(&'static str),
    /// The client is gone: nothing more to send.
    Left,
}

/// One job in the engine, from its prompt to its last event: the engine
/// runs its [`Sequence::segment`] in each step and hands it the step's
/// logits.
pub struct Sequence {
    events: mpsc::UnboundedSender<Event>,
    params: Params,
    sampler: Sampler,
    /// Prefill tokens, counted as answer rather than prompt.
    answered: usize,
    prompt: Vec<u32>,
    /// Prompt tokens run so far, and in the step under way.
    fed: usize,
    feeding: usize,
    max_new: usize,
    generated: Vec<u32>,
    /// The text of `generated`, decoded a token at a time (the window from
    /// `prefix` to `read` is re-decoded with each new token, so that a
    /// character or a word split across tokens comes out whole).
    text: String,
    prefix: usize,
    read: usize,
    /// Whether the prefill ends mid-sentence (see [`Params::hold_end`]).
    prefill_open: bool,
    /// Bytes of the answer's text already sent.
    sent: usize,
    cache: Cache,
}

impl Sequence {
    /// Fits the job's prompt, reports it started, and gives it a KV cache
    /// big enough for prompt and answer: one of `free` if one is, else a new
    /// one. `None` when the job ended here (its failure is sent, or its
    /// client is gone).
    pub fn start(model: &LoadedModel, job: Job, free: &mut Vec<Cache>) -> Option<Sequence> {
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
        let fail = |event: Event| {
            let _ = events.send(event);
            None
        };
        let (ids, dropped_turns) = match fit_prompt(model, &prompt, &prefill) {
            Ok(fitted) => fitted,
            Err(event) => return fail(event),
        };
        let room = model.context - ids.len();
        let max_new = params
            .max_tokens
            .map_or(room, |m| m.saturating_sub(answered))
            .min(params.cap)
            .min(room);
        let need = ids.len() + max_new;
        let cache = match free.iter().position(|c| c.capacity() >= need) {
            Some(i) => {
                let mut cache = free.swap_remove(i);
                cache.clear();
                cache
            }
            None => match model
                .llama
                .cache(need.next_multiple_of(256).min(model.context))
            {
                Ok(cache) => cache,
                Err(e) => return fail(model_failure(e)),
            },
        };
        if events.send(Event::Started { dropped_turns }).is_err() {
            free.push(cache);
            return None;
        }
        Some(Sequence {
            sampler: sampler(&params),
            events,
            params,
            answered,
            prompt: ids,
            fed: 0,
            feeding: 0,
            max_new,
            generated: Vec::new(),
            text: String::new(),
            prefix: 0,
            read: 0,
            prefill_open: !ends_a_thought(&prefill),
            sent: 0,
            cache,
        })
    }

    /// What this sequence runs in the next step: the rest of its prompt (at
    /// most `limit` tokens of it), then its last sampled token.
    pub fn segment(&mut self, limit: usize) -> Segment<'_> {
        let tokens = if self.fed < self.prompt.len() {
            self.feeding = (self.prompt.len() - self.fed).min(limit.max(1));
            &self.prompt[self.fed..self.fed + self.feeding]
        } else {
            // A sequence goes on only with a token to feed (a prompt is
            // never empty), so this is its last one.
            let last = self.generated.len().saturating_sub(1);
            &self.generated[last..]
        };
        Segment {
            tokens,
            cache: &mut self.cache,
        }
    }

    /// Takes the logits of this sequence's last step (`[vocab]`): samples
    /// and sends the next piece of the answer. Whether it goes on; when it
    /// does not, its last event is sent and its cache can be reused.
    /// `step` is how long this step took: a sequence that could not run
    /// another before its deadline ends now.
    pub fn advance(
        &mut self,
        model: &LoadedModel,
        logits: Tensor,
        step: std::time::Duration,
    ) -> bool {
        if self.feeding > 0 {
            self.fed += std::mem::take(&mut self.feeding);
            if self.fed < self.prompt.len() {
                return !self.events.is_closed();
            }
        }
        match self.next(model, logits, step) {
            Ok(Step::Going) => true,
            Ok(Step::Finished(reason)) => {
                self.finish(model, reason);
                false
            }
            Ok(Step::Left) => false,
            Err(event) => {
                self.send(event);
                false
            }
        }
    }

    /// Ends the sequence with a failure of the step.
    pub fn fail(&self, event: Event) {
        self.send(event);
    }

    /// The KV cache, for the next sequence.
    pub fn into_cache(self) -> Cache {
        self.cache
    }

    fn send(&self, event: Event) -> bool {
        let event = match event {
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => Event::Done {
                finish_reason,
                prompt_tokens: prompt_tokens.saturating_sub(self.answered),
                completion_tokens: completion_tokens + self.answered.min(prompt_tokens),
            },
            other => other,
        };
        self.events.send(event).is_ok()
    }

    fn decode(&self, model: &LoadedModel, ids: &[u32]) -> Result<String, Event> {
        model
            .tokenizer
            .decode(ids)
            .map_err(|e| failed(FailureKind::ServerError, e.to_string()))
    }

    /// Adds a token's text to the answer once it decodes to whole
    /// characters: the cost of a token does not grow with the answer.
    fn push(&mut self, model: &LoadedModel, id: u32) -> Result<(), Event> {
        self.generated.push(id);
        let before = self.decode(model, &self.generated[self.prefix..self.read])?;
        let all = self.decode(model, &self.generated[self.prefix..])?;
        if let Some(new) = all.get(before.len()..) {
            if !new.is_empty() && !new.ends_with('\u{FFFD}') && all.starts_with(&before) {
                self.text.push_str(new);
                self.prefix = self.read;
                self.read = self.generated.len();
            }
        }
        Ok(())
    }

    /// The answer's whole text, with the tokens not yet whole characters,
    /// less a character they leave unfinished (an answer cut at its token
    /// limit mid-character ends before it, not with U+FFFD).
    fn flush(&mut self, model: &LoadedModel) -> Result<(), Event> {
        let before = self.decode(model, &self.generated[self.prefix..self.read])?;
        let all = self.decode(model, &self.generated[self.prefix..])?;
        if let Some(rest) = all.get(before.len()..) {
            self.text.push_str(rest.trim_end_matches('\u{FFFD}'));
        }
        self.read = self.generated.len();
        self.prefix = self.read;
        Ok(())
    }

    /// Whether an end of turn now would leave a sentence unfinished.
    fn holds_end(&self) -> bool {
        self.generated.len() < self.params.hold_end
            && if self.text.is_empty() {
                self.prefill_open
            } else {
                !ends_a_thought(&self.text)
            }
    }

    /// One token, or the failure to end with.
    fn next(
        &mut self,
        model: &LoadedModel,
        mut logits: Tensor,
        step: std::time::Duration,
    ) -> Result<Step, Event> {
        if self.events.is_closed() {
            return Ok(Step::Left);
        }
        if self.max_new == 0
            || self
                .params
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() + step >= d)
        {
            return Ok(Step::Finished("length"));
        }
        let raw = logits.clone();
        // A sampling failure is the parameters' fault when the model's own
        // logits are sound.
        let sampling = |e: candle_core::Error| match finite(&raw) {
            Ok(true) => sampling_failure(e),
            Ok(false) => failed(
                FailureKind::ServerError,
                "local model failed: its logits are not finite".into(),
            ),
            Err(e) => model_failure(e),
        };
        if self.params.repetition_penalty != 1.0 {
            let start = self.generated.len().saturating_sub(REPEAT_WINDOW);
            logits = apply_repeat_penalty(
                &logits,
                self.params.repetition_penalty,
                &self.generated[start..],
            )
            .map_err(model_failure)?;
        }
        let mut next = self.sampler.sample(&logits).map_err(sampling)?;
        if model.tokenizer.is_stop(next) && self.holds_end() {
            let masked = model
                .tokenizer
                .without_stops(&logits)
                .map_err(model_failure)?;
            next = self.sampler.sample(&masked).map_err(sampling)?;
        }
        if model.tokenizer.is_stop(next) {
            return Ok(Step::Finished("stop"));
        }
        self.push(model, next)?;
        let (end, stopped) = sendable(&self.text[self.sent..], &self.params.stop);
        let end = self.sent + end;
        if let Some(piece) = self.text.get(self.sent..end).filter(|p| !p.is_empty()) {
            if !self.send(Event::Text(piece.to_string())) {
                return Ok(Step::Left);
            }
            self.sent = end;
        }
        Ok(if stopped {
            Step::Finished("stop")
        } else if self.generated.len() >= self.max_new {
            Step::Finished("length")
        } else {
            Step::Going
        })
    }

    fn finish(&mut self, model: &LoadedModel, finish_reason: &'static str) {
        // Text held back for a stop string that never completed belongs to
        // the answer.
        if let Err(event) = self.flush(model) {
            self.send(event);
            return;
        }
        let rest = &self.text[self.sent..];
        let end = self
            .params
            .stop
            .iter()
            .filter_map(|s| rest.find(s.as_str()))
            .min()
            .map_or(self.text.len(), |at| self.sent + at);
        if let Some(piece) = self.text.get(self.sent..end).filter(|p| !p.is_empty()) {
            self.send(Event::Text(piece.to_string()));
        }
        self.send(Event::Done {
            finish_reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
        });
    }
}

#[cfg(test)]
mod tests;
