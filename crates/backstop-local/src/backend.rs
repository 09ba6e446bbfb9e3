//! The local model as a [`Backend`]: the same schema, ids, chunks, usage and
//! `[DONE]` as an upstream, with the local model's name.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use backstop_adapter::chat::Extra;
use backstop_adapter::{
    Backend, BackendError, BoxFuture, ChatChunk, ChatCompletion, ChunkChoice, ChunkStream, Delta,
    FailureKind, Headers, Message, Model, Reply, Request, Role, Usage,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::Engine;
use crate::generate::{Event, Job, Params, Prompt};
use crate::template::Turn;
use crate::LocalConfig;

/// Header telling the client how many old turns were left out to fit.
pub const DROPPED_TURNS_HEADER: &str = "x-backstop-context-dropped-turns";

/// The in-process model as a backend.
pub struct LocalBackend {
    name: String,
    model_name: String,
    /// Caps on answers and sampling (see [`LocalConfig`]).
    max_tokens: usize,
    continuation_tokens: usize,
    max_temperature: f64,
    engine: Engine,
}

/// New tokens for which the end of a turn is held back while a
/// continuation ends mid-sentence.
const HOLD_END: usize = 32;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn invalid(message: impl Into<String>) -> BackendError {
    BackendError::new(FailureKind::ClientError, message)
}

impl LocalBackend {
    /// Starts the engine (the model loads in the background).
    pub fn start(config: LocalConfig) -> Self {
        LocalBackend {
            name: config.target.clone(),
            model_name: config.name.clone(),
            max_tokens: config.max_tokens,
            continuation_tokens: config.continuation_tokens,
            max_temperature: config.max_temperature,
            engine: Engine::start(config),
        }
    }

    /// The job for a request, or why the local model cannot take it.
    fn job(
        &self,
        req: &Request,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Job, BackendError> {
        let chat = &req.chat;
        if chat.n.unwrap_or(1) > 1 {
            return Err(invalid(
                "the local model generates one choice: `n` must be 1",
            ));
        }
        // The local model is a chat: a hosted tool, or an input item only
        // the Responses API has, it cannot serve.
        if let Some(param) = req.api.responses().and_then(|r| r.untranslatable()) {
            return Err(invalid(format!(
                "the local model serves chats, which cannot take `{param}`"
            )));
        }
        let prompt = match req.api.legacy() {
            Some(legacy) if !legacy.prompt.is_string() && !legacy.prompt.is_array() => {
                return Err(invalid("`prompt` must be text for the local model"))
            }
            Some(_) => Prompt::Raw(
                chat.messages
                    .first()
                    .and_then(|m| m.content.as_ref())
                    .map(|c| c.to_text())
                    .unwrap_or_default(),
            ),
            None => Prompt::Chat(chat.messages.iter().map(Turn::from_message).collect()),
        };
        let extra_f64 = |key: &str| chat.extra.get(key).and_then(serde_json::Value::as_f64);
        let temperature = chat.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(invalid("`temperature` must be between 0 and 2"));
        }
        let top_p = chat.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid("`top_p` must be in (0, 1]"));
        }
        let seed = chat.seed.map(|s| s as u64).unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let prefill = req.prefill.clone().unwrap_or_default();
        let max_tokens = chat
            .max_completion_tokens
            .or(chat.max_tokens)
            .map(|n| n as usize);
        let cap = match (prefill.is_empty(), max_tokens) {
            (false, _) => self.continuation_tokens,
            (true, Some(asked)) => asked,
            (true, None) => self.max_tokens,
        };
        Ok(Job {
            prompt,
            params: Params {
                max_tokens,
                cap,
                deadline: req.deadline.map(Instant::from_std),
                hold_end: if prefill.is_empty() { 0 } else { HOLD_END },
                temperature: temperature.min(self.max_temperature),
                top_p,
                top_k: chat
                    .extra
                    .get("top_k")
                    .and_then(serde_json::Value::as_u64)
                    .filter(|k| *k >= 1)
                    .map(|k| k as usize),
                seed,
                repetition_penalty: extra_f64("repetition_penalty")
                    .filter(|p| *p > 0.0 && p.is_finite())
                    .unwrap_or(1.0) as f32,
                stop: chat
                    .stop
                    .as_ref()
                    .map(|s| {
                        s.sequences()
                            .into_iter()
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            prefill,
            events,
        })
    }

    /// Queues the request and waits until its prompt is accepted.
    async fn start_job(
        &self,
        req: &Request,
    ) -> Result<(mpsc::UnboundedReceiver<Event>, Headers), BackendError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.engine.submit(self.job(req, tx)?)?;
        match rx.recv().await {
            Some(Event::Started { dropped_turns }) => {
                let mut headers = Headers::new();
                if dropped_turns > 0 {
                    headers.push((DROPPED_TURNS_HEADER.into(), dropped_turns.to_string()));
                }
                Ok((rx, headers))
            }
            Some(Event::Failed(e)) => Err(e),
            _ => Err(BackendError::new(
                FailureKind::ServerError,
                "the local model stopped before it started",
            )),
        }
    }
}

/// Builds the chunks of one answer in the shape an upstream would send.
struct ChunkMaker {
    id: String,
    created: u64,
    model: String,
}

impl ChunkMaker {
    fn chunk(&self, delta: Delta, finish: Option<&str>, usage: Option<Usage>) -> ChatChunk {
        let choices = if usage.is_some() {
            Vec::new()
        } else {
            vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(String::from),
                logprobs: None,
                extra: Extra::new(),
            }]
        };
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
            extra: Extra::new(),
            native: None,
        }
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage {
        prompt_tokens: prompt_tokens as u64,
        completion_tokens: completion_tokens as u64,
        total_tokens: (prompt_tokens + completion_tokens) as u64,
        extra: Extra::new(),
    }
}

/// The stream's state: the event source and what is left to send.
struct LocalStream {
    events: mpsc::UnboundedReceiver<Event>,
    maker: ChunkMaker,
    include_usage: bool,
    pending_usage: Option<Usage>,
    started: bool,
    done: bool,
}

impl LocalStream {
    async fn next(&mut self) -> Option<Result<ChatChunk, BackendError>> {
        if let Some(usage) = self.pending_usage.take() {
            return Some(Ok(self.maker.chunk(Delta::default(), None, Some(usage))));
        }
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            let delta = Delta {
                role: Some(Role::Assistant),
                content: Some(String::new()),
                ..Delta::default()
            };
            return Some(Ok(self.maker.chunk(delta, None, None)));
        }
        match self.events.recv().await {
            Some(Event::Text(text)) => {
                let delta = Delta {
                    content: Some(text),
                    ..Delta::default()
                };
                Some(Ok(self.maker.chunk(delta, None, None)))
            }
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                self.done = true;
                if self.include_usage {
                    self.pending_usage = Some(usage(prompt_tokens, completion_tokens));
                }
                Some(Ok(self.maker.chunk(
                    Delta::default(),
                    Some(finish_reason),
                    None,
                )))
            }
            Some(Event::Failed(e)) => {
                self.done = true;
                Some(Err(e))
            }
            Some(Event::Started { .. }) | None => {
                self.done = true;
                Some(Err(BackendError::new(
                    FailureKind::StreamBroken,
                    "the local model stopped mid-answer",
                )))
            }
        }
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
        Box::pin(async move {
            let started = Instant::now();
            let (mut events, headers) = self.start_job(req).await?;
            let mut text = String::new();
            let (finish, usage) = loop {
                match events.recv().await {
                    Some(Event::Text(t)) => text.push_str(&t),
                    Some(Event::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    }) => break (finish_reason, usage(prompt_tokens, completion_tokens)),
                    Some(Event::Failed(e)) => return Err(e),
                    Some(Event::Started { .. }) | None => {
                        return Err(BackendError::new(
                            FailureKind::StreamBroken,
                            "the local model stopped mid-answer",
                        ))
                    }
                }
            };
            let completion = ChatCompletion {
                id: next_id(),
                object: "chat.completion".into(),
                created: unix_now(),
                model: self.model_name.clone(),
                choices: vec![backstop_adapter::Choice {
                    index: 0,
                    message: Message::text(Role::Assistant, text),
                    finish_reason: Some(finish.to_string()),
                    logprobs: None,
                    extra: Extra::new(),
                }],
                usage: Some(usage),
                system_fingerprint: None,
                extra: Extra::new(),
                native: None,
            };
            Ok(Reply {
                body: completion,
                headers,
                waited: started.elapsed(),
            })
        })
    }

    fn stream<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
        Box::pin(async move {
            let started = Instant::now();
            let (events, headers) = self.start_job(req).await?;
            let state = LocalStream {
                events,
                maker: ChunkMaker {
                    id: next_id(),
                    created: unix_now(),
                    model: self.model_name.clone(),
                },
                include_usage: req.chat.include_usage(),
                pending_usage: None,
                started: false,
                done: false,
            };
            let body: ChunkStream =
                Box::pin(futures_util::stream::unfold(state, |mut s| async move {
                    let item = s.next().await?;
                    Some((item, s))
                }));
            Ok(Reply {
                body,
                headers,
                waited: started.elapsed(),
            })
        })
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        let model = Model {
            id: self.model_name.clone(),
            object: "model".into(),
            created: 0,
            owned_by: "backstop-local".into(),
        };
        Box::pin(async move { Ok(vec![model]) })
    }

    fn ready(&self) -> bool {
        self.engine.is_ready()
    }

    fn continues(&self) -> bool {
        true
    }

    fn hedges_free(&self) -> bool {
        true
    }
}

fn next_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("chatcmpl-local-{:x}{n:04x}", unix_now())
}
