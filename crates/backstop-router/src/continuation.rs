//! Streams that survive their backend: when a committed stream breaks
//! mid-answer (cut, stalled, malformed, or an error event), the answer so far
//! is handed as a prefill to the next target that can continue one (the local
//! model always can; an upstream when configured), and the client's stream
//! goes on with that target's chunks under the same completion id. A stream
//! that cannot be continued ends with its error: a truncated answer is never
//! presented as complete. Either way the break counts against the breaker of
//! the target whose stream broke.

use std::sync::{Arc, Mutex, PoisonError};

use backstop_adapter::{Backend, BackendError, ChatChunk, ChunkStream, FailureKind, Request};
use futures_util::StreamExt;

use crate::breaker::{CircuitBreaker, Outcome};
use crate::observer::Observer;

/// Who to tell about a continuation, and who is streaming now.
pub(crate) struct Reporter {
    pub observer: Arc<dyn Observer>,
    pub serving: Serving,
}

/// Who is serving a stream now, and the attempts it has taken so far: a
/// broken stream continued by another target changes both. Shared between
/// the stream and whoever sends it to the client.
#[derive(Debug, Clone)]
pub struct Serving(Arc<Mutex<(String, u32)>>);

impl Serving {
    pub(crate) fn new(backend: &str, attempts: u32) -> Self {
        Serving(Arc::new(Mutex::new((backend.to_string(), attempts))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (String, u32)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The target streaming now (the last one, once the stream has ended).
    pub fn backend(&self) -> String {
        self.lock().0.clone()
    }

    /// Attempts so far, continuations included.
    pub fn attempts(&self) -> u32 {
        self.lock().1
    }

    fn attempted(&self) {
        self.lock().1 += 1;
    }

    fn hand_over(&self, to: &str) {
        self.lock().0 = to.to_string();
    }
}

/// A target that may continue a broken stream.
pub(crate) struct Successor {
    pub backend: Arc<dyn Backend>,
    pub breaker: Option<Arc<CircuitBreaker>>,
}

/// What a stream has said so far, and who may finish it.
struct State {
    stream: ChunkStream,
    reporter: Reporter,
    /// The breaker of the target now streaming: a break counts against it.
    breaker: Option<Arc<CircuitBreaker>>,
    request: Request,
    successors: Vec<Successor>,
    /// The id the client saw first; continuation chunks keep it.
    id: Option<String>,
    /// Assistant text sent so far (choice 0).
    text: String,
    /// A tool call or a second choice was streamed: not continuable.
    continuable: bool,
    finished: bool,
    done: bool,
}

/// Failures of a committed stream that another backend can make good.
fn breaks_mid_answer(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::StreamBroken
            | FailureKind::StreamStalled
            | FailureKind::BadResponse
            | FailureKind::StreamError
            | FailureKind::ServerError
    )
}

/// Wraps a committed stream so that a break mid-answer counts against
/// `breaker` and is continued by the first of `successors` that takes it.
pub(crate) fn continuing(
    stream: ChunkStream,
    breaker: Option<Arc<CircuitBreaker>>,
    request: &Request,
    successors: Vec<Successor>,
    reporter: Reporter,
) -> ChunkStream {
    let state = State {
        stream,
        reporter,
        breaker,
        request: request.clone(),
        continuable: request.chat.n.unwrap_or(1) == 1 && !successors.is_empty(),
        successors,
        id: None,
        text: String::new(),
        finished: false,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        let item = s.next().await?;
        Some((item, s))
    }))
}

impl State {
    async fn next(&mut self) -> Option<Result<ChatChunk, BackendError>> {
        if self.done {
            return None;
        }
        loop {
            let item = self.stream.next().await;
            if let (Some(Err(e)), Some(b)) = (&item, &self.breaker) {
                b.record(Outcome::Failure(e.kind));
            }
            match item {
                Some(Ok(mut chunk)) => {
                    self.observe(&mut chunk);
                    return Some(Ok(chunk));
                }
                Some(Err(e)) if self.continuable && !self.finished && breaks_mid_answer(e.kind) => {
                    match self.take_over(&e).await {
                        Some(stream) => self.stream = stream,
                        None => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    return None;
                }
            }
        }
    }

    /// Notes what a chunk adds, and gives it the stream's first id.
    fn observe(&mut self, chunk: &mut ChatChunk) {
        match &self.id {
            None => self.id = Some(chunk.id.clone()),
            Some(id) => chunk.id.clone_from(id),
        }
        for choice in &chunk.choices {
            if choice.index != 0 || choice.delta.tool_calls.is_some() {
                self.continuable = false;
            }
            if let Some(text) = &choice.delta.content {
                self.text.push_str(text);
            }
            if choice.finish_reason.is_some() {
                self.finished = true;
            }
        }
    }

    /// The first successor that starts a continuation of the text so far.
    async fn take_over(&mut self, broke: &BackendError) -> Option<ChunkStream> {
        let mut request = self.request.clone();
        request.prefill = Some(self.text.clone());
        while !self.successors.is_empty() {
            let next = self.successors.remove(0);
            if next.breaker.as_ref().is_some_and(|b| !b.admit()) {
                continue;
            }
            self.reporter.serving.attempted();
            let started = next.backend.stream(&request).await;
            if let Some(b) = &next.breaker {
                b.record(match &started {
                    Ok(_) => Outcome::Success,
                    Err(e) => Outcome::Failure(e.kind),
                });
            }
            match started {
                Ok(reply) => {
                    self.breaker = next.breaker.clone();
                    let to = next.backend.name();
                    let from = self.reporter.serving.backend();
                    self.reporter.observer.continued(&from, to);
                    self.reporter.serving.hand_over(to);
                    tracing::warn!(
                        to = next.backend.name(),
                        kind = broke.kind.as_str(),
                        "stream broke mid-answer after {} bytes of text: continuing",
                        self.text.len()
                    );
                    // The client already has the role; the successor's first
                    // chunk repeats it, which clients accept.
                    return Some(reply.body);
                }
                Err(e) => tracing::warn!(
                    to = next.backend.name(),
                    "could not continue a broken stream: {}",
                    e.message
                ),
            }
        }
        None
    }
}
