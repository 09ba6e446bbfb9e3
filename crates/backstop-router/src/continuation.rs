//! Streams that survive their backend: when a committed stream breaks
//! mid-answer (cut, stalled, malformed, or an error event), the answer so far
//! goes to the next target in the route that is serving, and the client's
//! stream goes on with that target's chunks under the same completion id. A
//! target that takes a prefill (the local model; an upstream when
//! configured) continues it as its own answer; any other gets it as an
//! assistant turn and an instruction to continue, and whatever it repeats of
//! the answer is cut at the seam. A continuation that ends at once while the
//! answer stops mid-sentence is no ending: the next target is tried. A
//! stream that cannot be finished ends with an error: a truncated answer is
//! never presented as complete. Each target's stream counts once on its
//! breaker: a success when it completes, a failure when it breaks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use backstop_adapter::continuation::{ends_a_thought, overlap};
use backstop_adapter::{Backend, BackendError, ChatChunk, ChunkStream, FailureKind, Request};
use futures_util::StreamExt;

use crate::breaker::{Attempt, CircuitBreaker, Outcome};
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
        crate::lock(&self.0)
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

/// The error a stream ends with when nobody could finish its answer.
fn unfinished(message: &str) -> BackendError {
    BackendError::new(FailureKind::StreamBroken, message)
}

/// What a stream has said so far, and who may finish it.
struct State {
    stream: ChunkStream,
    reporter: Reporter,
    /// The attempt of the target now streaming, settled when its stream
    /// ends: a success only when it completes, one failure when it breaks.
    attempt: Option<Attempt>,
    request: Request,
    successors: Vec<Successor>,
    /// The id the client saw first; continuation chunks keep it.
    id: Option<String>,
    /// Assistant text so far (choice 0), a prefill included.
    text: String,
    /// A tool call or a second choice was streamed: not continuable.
    continuable: bool,
    finished: bool,
    done: bool,
    /// Where the current target took over, while that matters.
    seam: Option<Seam>,
    /// Items ready for the client before the stream is read again.
    pending: VecDeque<Result<ChatChunk, BackendError>>,
}

/// The join between the answer so far and its continuation.
struct Seam {
    /// The answer when the current target took over.
    said: String,
    /// The continuation's text held back until its repeat of `said` can
    /// be cut; `None` once that is decided (or for a prefill, which
    /// needs no cut).
    held: Option<String>,
    /// The last chunk held back, to carry the text when it is let go.
    shape: Option<ChatChunk>,
    /// Text the continuation added, after the cut.
    added: String,
}

/// Continuation text held back before its repeat is judged.
const SEAM_WINDOW: usize = 64;

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

/// Wraps a committed stream so that its `attempt` is settled when it ends,
/// and a break mid-answer is continued by the first of `successors` that
/// takes it.
pub(crate) fn continuing(
    stream: ChunkStream,
    attempt: Option<Attempt>,
    request: &Request,
    successors: Vec<Successor>,
    reporter: Reporter,
) -> ChunkStream {
    let state = State {
        stream,
        reporter,
        attempt,
        request: request.clone(),
        continuable: request.chat.n.unwrap_or(1) == 1 && !successors.is_empty(),
        successors,
        id: None,
        // A stream that goes on from a prefill (a generation taken over)
        // has said that much already: a successor continues all of it.
        text: request.prefill.clone().unwrap_or_default(),
        finished: false,
        done: false,
        seam: None,
        pending: VecDeque::new(),
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        let item = s.next().await?;
        Some((item, s))
    }))
}

impl State {
    async fn next(&mut self) -> Option<Result<ChatChunk, BackendError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            let item = match self.stall_limit() {
                Some(limit) => match tokio::time::timeout(limit, self.stream.next()).await {
                    Ok(item) => item,
                    Err(_) => Some(Err(BackendError::new(
                        FailureKind::StreamStalled,
                        format!(
                            "the stream sent nothing for {} ms; the rest of the request's time \
                             is kept for the next target",
                            limit.as_millis()
                        ),
                    ))),
                },
                None => self.stream.next().await,
            };
            match &item {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if let Some(attempt) = self.attempt.take() {
                        attempt.fail(e.kind, &e.message);
                    }
                }
                None => self.settle(Outcome::Success),
            }
            match item {
                Some(Ok(chunk)) => {
                    let Some(mut chunk) = self.through_seam(chunk) else {
                        continue; // held back at the seam
                    };
                    if self.ends_too_soon(&chunk) {
                        let broke = unfinished("the continuation ended mid-sentence");
                        self.attempt = None; // it answered; not its breaker's business
                        match self.take_over(&broke).await {
                            Some(stream) => self.stream = stream,
                            None => {
                                self.done = true;
                                return Some(Err(unfinished(
                                    "the answer broke off mid-sentence and no target could \
                                     finish it",
                                )));
                            }
                        }
                        continue;
                    }
                    self.observe(&mut chunk);
                    return Some(Ok(chunk));
                }
                Some(Err(e)) if self.continuable && !self.finished && breaks_mid_answer(e.kind) => {
                    self.release_held();
                    match self.take_over(&e).await {
                        Some(stream) => self.stream = stream,
                        None => {
                            self.done = true;
                            self.pending.push_back(Err(e));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.release_held();
                    self.done = true;
                    self.pending.push_back(Err(e));
                }
                None => {
                    self.release_held();
                    self.done = true;
                }
            }
        }
    }

    /// A chunk of the current target as the client should see it: while
    /// its start may repeat the answer, the text is held back (`None`);
    /// once enough has come (or the answer ends), the repeat is cut and the
    /// rest goes out in this chunk.
    fn through_seam(&mut self, mut chunk: ChatChunk) -> Option<ChatChunk> {
        let Some(seam) = &mut self.seam else {
            return Some(chunk);
        };
        let Some(held) = &mut seam.held else {
            if let Some(text) = chunk.choices.first().and_then(|c| c.delta.content.as_ref()) {
                seam.added.push_str(text);
            }
            return Some(chunk);
        };
        let choice = chunk.choices.iter_mut().find(|c| c.index == 0);
        let ends =
            chunk.usage.is_some() || choice.as_ref().is_some_and(|c| c.finish_reason.is_some());
        if let Some(text) = choice.and_then(|c| c.delta.content.take()) {
            held.push_str(&text);
        }
        let cut = if held.len() >= SEAM_WINDOW || ends {
            overlap(&seam.said, held, ends)
        } else {
            None
        };
        let Some(cut) = cut else {
            seam.shape = Some(chunk);
            return None;
        };
        let rest = held.split_off(cut);
        seam.held = None;
        seam.added.push_str(&rest);
        match chunk.choices.iter_mut().find(|c| c.index == 0) {
            Some(choice) => choice.delta.content = Some(rest),
            None => {
                // A usage chunk: the text goes out just before it.
                if let Some(mut shape) = seam.shape.take() {
                    if let Some(choice) = shape.choices.iter_mut().find(|c| c.index == 0) {
                        choice.delta.content = Some(rest);
                    }
                    self.observe(&mut shape);
                    self.pending.push_back(Ok(shape));
                }
            }
        }
        Some(chunk)
    }

    /// Lets go of continuation text held at the seam, as it came, when the
    /// continuation ends without a verdict (it broke, or stopped short).
    fn release_held(&mut self) {
        let Some(seam) = &mut self.seam else { return };
        let (Some(held), Some(mut shape)) = (seam.held.take(), seam.shape.take()) else {
            return;
        };
        let cut = overlap(&seam.said, &held, true).unwrap_or(0);
        let rest = held[cut..].to_string();
        seam.added.push_str(&rest);
        if let Some(choice) = shape.choices.iter_mut().find(|c| c.index == 0) {
            choice.delta.content = Some(rest);
        }
        self.observe(&mut shape);
        self.pending.push_back(Ok(shape));
    }

    /// Whether this chunk ends a continuation that added nothing while the
    /// answer stops mid-sentence: that is not a whole answer.
    fn ends_too_soon(&self, chunk: &ChatChunk) -> bool {
        let Some(seam) = &self.seam else { return false };
        let stops = chunk
            .choices
            .iter()
            .any(|c| c.index == 0 && c.finish_reason.as_deref() == Some("stop"));
        stops && seam.added.trim().is_empty() && !ends_a_thought(&seam.said)
    }

    /// How long to wait for the next chunk before handing the answer on:
    /// half the time left before the request's deadline, while a target
    /// after this one could still finish it (the target's own idle
    /// deadline applies as well).
    fn stall_limit(&self) -> Option<std::time::Duration> {
        if !self.continuable || self.finished || self.successors.is_empty() {
            return None;
        }
        let deadline = tokio::time::Instant::from_std(self.request.deadline?);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        Some((left / 2).max(std::time::Duration::from_millis(1)))
    }

    /// Records how the current target's stream ended.
    fn settle(&mut self, outcome: Outcome) {
        if let Some(attempt) = self.attempt.take() {
            attempt.record(outcome);
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
            let attempt = next.breaker.clone().map(Attempt::new);
            self.reporter.serving.attempted();
            let started = next.backend.stream(&request).await;
            match started {
                Ok(reply) => {
                    self.attempt = attempt;
                    self.seam = Some(Seam {
                        said: self.text.clone(),
                        held: (!next.backend.continues()).then(String::new),
                        shape: None,
                        added: String::new(),
                    });
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
                Err(e) => {
                    if let Some(attempt) = attempt {
                        attempt.fail(e.kind, &e.message);
                    }
                    tracing::warn!(
                        to = next.backend.name(),
                        "could not continue a broken stream: {}",
                        e.message
                    );
                }
            }
        }
        None
    }
}
