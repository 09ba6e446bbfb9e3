//! Routes a request to a chain of backends and walks it.
//!
//! A [`RouteTable`] maps the requested model (exact name, prefix, or anything)
//! to an ordered chain of targets. Before the first byte reaches the client,
//! a retryable failure moves on to the next target; a failure that is the
//! client's fault stops the walk. Every failed attempt is kept, in order, so the
//! final error tells the whole story.

pub mod breaker;
mod continuation;
pub use continuation::Serving;
pub mod health;
pub mod observer;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backstop_adapter::{
    Backend, BackendError, BoxFuture, ChatCompletion, ChunkStream, FailureKind, Model, Reply,
    Request,
};
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::breaker::{Attempt, BreakerConfig, CircuitBreaker, Outcome};
use crate::retry::{Next, RetryPolicy};

/// Takes requests routed past a target whose breaker refused them, to mirror
/// them there (the shadow verifier). Must not block: the client is waiting.
pub trait Mirror: Send + Sync {
    /// Offers a request routed past `target`; when it is mirrored, returns
    /// where to send the served answer's text, for comparison.
    fn offer(&self, target: &str, req: &Request) -> Option<tokio::sync::oneshot::Sender<String>>;
}

/// Which requested models a route takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelMatch {
    /// Exactly this name.
    Exact(String),
    /// Any name starting with this.
    Prefix(String),
    /// Any model.
    Any,
}

impl ModelMatch {
    fn matches(&self, model: &str) -> bool {
        match self {
            ModelMatch::Exact(name) => model == name,
            ModelMatch::Prefix(prefix) => model.starts_with(prefix.as_str()),
            ModelMatch::Any => true,
        }
    }
}

/// One target of a route's chain, with the retry policy its attempts follow.
#[derive(Clone)]
pub struct Hop {
    /// The target.
    pub backend: Arc<dyn Backend>,
    /// Retries and the first-token deadline for attempts on it in this route.
    pub retry: RetryPolicy,
}

/// A model pattern and the targets that serve it, tried in order.
#[derive(Clone)]
pub struct Route {
    /// Which requests the route takes.
    pub models: ModelMatch,
    /// The chain of targets, first preferred.
    pub hops: Vec<Hop>,
    /// Whole-request deadline: no attempt starts after it, and a request that
    /// has not committed by then fails with a 504.
    pub deadline: Duration,
}

/// The default whole-request deadline: long generations from large models
/// take minutes.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);

impl Route {
    /// A route over these targets, each with the default retry policy, and
    /// the default deadline.
    pub fn new(models: ModelMatch, targets: impl IntoIterator<Item = Arc<dyn Backend>>) -> Self {
        Route {
            models,
            hops: targets
                .into_iter()
                .map(|backend| Hop {
                    backend,
                    retry: RetryPolicy::default(),
                })
                .collect(),
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// The same route with this retry policy on every hop.
    pub fn with_retry(mut self, retry: &RetryPolicy) -> Self {
        for hop in &mut self.hops {
            hop.retry = retry.clone();
        }
        self
    }

    /// The same route with this deadline.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }
}

/// Routes in priority order: exact names first, then the longest prefix, then
/// the catch-all, whatever order they were configured in.
#[derive(Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// A table of these routes.
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by_key(|r| match &r.models {
            ModelMatch::Exact(_) => (0, 0),
            ModelMatch::Prefix(p) => (1, usize::MAX - p.len()),
            ModelMatch::Any => (2, 0),
        });
        RouteTable { routes }
    }

    /// The route for a requested model.
    pub fn resolve(&self, model: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.models.matches(model))
    }

    /// Every distinct target, in first-seen order.
    pub fn targets(&self) -> Vec<Arc<dyn Backend>> {
        let mut seen: Vec<Arc<dyn Backend>> = Vec::new();
        for hop in self.routes.iter().flat_map(|r| r.hops.iter()) {
            if !seen.iter().any(|s| Arc::ptr_eq(s, &hop.backend)) {
                seen.push(hop.backend.clone());
            }
        }
        seen
    }
}

/// A backend's reply with who served it and what it took.
#[derive(Debug)]
pub struct Served<T> {
    /// The reply.
    pub reply: Reply<T>,
    /// Name of the target that served.
    pub backend: String,
    /// The failed attempts before it, in order.
    pub failed: Vec<(String, BackendError)>,
    /// Time spent waiting on backends: every failed attempt, plus the serving
    /// backend's own wait (for a stream, until its first chunk).
    pub backend_time: Duration,
    /// For a stream, who serves it as it goes on: the target and attempts
    /// change when a broken stream is continued by another target.
    pub serving: Serving,
    /// Shadows of this request waiting for the served answer's text.
    pub mirrored: Vec<tokio::sync::oneshot::Sender<String>>,
}

impl<T> Served<T> {
    /// Attempts made, the successful one included (targets skipped for an
    /// open breaker are not attempts).
    pub fn attempts(&self) -> u32 {
        attempts(&self.failed) + 1
    }
}

fn attempts(failed: &[(String, BackendError)]) -> u32 {
    failed.iter().filter(|(_, e)| !e.kind.skipped()).count() as u32
}

/// Why no target served a request.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No route takes the requested model.
    #[error("no route serves model `{0}`")]
    NoRoute(String),
    /// Every attempt failed; the failures in order, last one decisive.
    #[error("all {} attempts failed", .0.len())]
    Failed(Vec<(String, BackendError)>),
}

impl RouteError {
    /// The last failure, which decides the client's status.
    pub fn last(&self) -> Option<&BackendError> {
        match self {
            RouteError::Failed(attempts) => attempts.last().map(|(_, e)| e),
            RouteError::NoRoute(_) => None,
        }
    }

    /// How many attempts were made.
    pub fn attempts(&self) -> u32 {
        match self {
            RouteError::Failed(failed) => attempts(failed),
            RouteError::NoRoute(_) => 0,
        }
    }

    /// The name of the last target tried.
    pub fn last_target(&self) -> Option<&str> {
        match self {
            RouteError::Failed(attempts) => attempts.last().map(|(name, _)| name.as_str()),
            RouteError::NoRoute(_) => None,
        }
    }
}

/// Walks route chains, skipping targets whose breaker is open.
#[derive(Clone)]
pub struct Router {
    table: RouteTable,
    breakers: HashMap<String, Arc<CircuitBreaker>>,
    observer: Arc<dyn observer::Observer>,
    mirror: Option<Arc<dyn Mirror>>,
}

impl Router {
    /// A router over this table, with a breaker per target configured by
    /// `breaker_for(target name)`.
    pub fn new(table: RouteTable, breaker_for: impl Fn(&str) -> BreakerConfig) -> Self {
        let breakers = table
            .targets()
            .iter()
            .map(|t| {
                (
                    t.name().to_string(),
                    Arc::new(CircuitBreaker::new(breaker_for(t.name()))),
                )
            })
            .collect();
        Router {
            table,
            breakers,
            observer: Arc::new(observer::Silent),
            mirror: None,
        }
    }

    /// The same router, reporting its work to `observer`: every breaker
    /// tells it of its own changes of state, whoever caused them (the walk,
    /// a continuation, the shadow verifier, an operator).
    pub fn with_observer(mut self, observer: Arc<dyn observer::Observer>) -> Self {
        for (name, breaker) in &self.breakers {
            let (name, observer) = (name.clone(), observer.clone());
            breaker.on_transition(Box::new(move |state| {
                observer.transition(&name, state.as_str());
            }));
        }
        self.observer = observer;
        self
    }

    /// The same router, offering requests routed past a refused target to
    /// `mirror`.
    pub fn with_mirror(mut self, mirror: Arc<dyn Mirror>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// Each target's breaker, by target name.
    pub fn breakers(&self) -> &HashMap<String, Arc<CircuitBreaker>> {
        &self.breakers
    }

    /// The route table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// Answers with one complete response.
    pub async fn complete(&self, req: &Request) -> Result<Served<ChatCompletion>, RouteError> {
        let req = &self.timed(req)?;
        let (served, attempt) = self
            .walk(req, |hop, req| {
                Box::pin(async move {
                    let reply = hop.backend.complete(req).await?;
                    let waited = reply.waited;
                    Ok((reply, waited))
                })
            })
            .await?;
        if let Some(attempt) = attempt {
            attempt.record(Outcome::Success);
        }
        Ok(served)
    }

    /// Answers with a stream. A target has committed only once its first chunk
    /// arrived: until then any failure moves on to the next target, so the
    /// client never sees a stream that breaks before it starts. After that, a
    /// break mid-answer is continued by a later target of the route. The
    /// attempt counts on the target's breaker when its stream ends.
    pub async fn stream(&self, req: &Request) -> Result<Served<ChunkStream>, RouteError> {
        let req = &self.timed(req)?;
        self.walk(req, |hop, req| {
            Box::pin(async move {
                let started = Instant::now();
                let mut reply = hop.backend.stream(req).await?;
                let first_token = hop.retry.first_token_timeout;
                let first = match tokio::time::timeout(first_token, reply.body.next()).await {
                    Err(_) => {
                        return Err(BackendError::new(
                            FailureKind::FirstByteTimeout,
                            format!("no first token within {} ms", first_token.as_millis()),
                        ))
                    }
                    Ok(Some(Ok(chunk))) => chunk,
                    Ok(Some(Err(e))) => return Err(e),
                    Ok(None) => {
                        return Err(BackendError::new(
                            backstop_adapter::FailureKind::StreamBroken,
                            "stream ended before its first chunk",
                        ))
                    }
                };
                let waited = started.elapsed();
                let rest =
                    std::mem::replace(&mut reply.body, Box::pin(futures_util::stream::empty()));
                reply.body =
                    Box::pin(futures_util::stream::once(async move { Ok(first) }).chain(rest));
                Ok((reply, waited))
            })
        })
        .await
        .map(|(mut served, attempt)| {
            let successors = self.successors(req, &served.backend);
            let body = std::mem::replace(
                &mut served.reply.body,
                Box::pin(futures_util::stream::empty()),
            );
            served.reply.body = continuation::continuing(
                body,
                attempt,
                req,
                successors,
                continuation::Reporter {
                    observer: self.observer.clone(),
                    serving: served.serving.clone(),
                },
            );
            served
        })
    }

    /// The targets after `serving` in the request's route, to continue a
    /// partial answer: as a prefill where they take one, otherwise through
    /// a continuation prompt.
    fn successors(&self, req: &Request, serving: &str) -> Vec<continuation::Successor> {
        let Some(route) = self.table.resolve(&req.chat.model) else {
            return Vec::new();
        };
        route
            .hops
            .iter()
            .map(|hop| &hop.backend)
            .skip_while(|t| t.name() != serving)
            .skip(1)
            .map(|t| continuation::Successor {
                backend: t.clone(),
                breaker: self.breakers.get(t.name()).cloned(),
            })
            .collect()
    }

    /// Tries each target of the request's route in turn. `call` answers with
    /// the reply and the time it waited on the backend. A failed attempt is
    /// recorded on its target's breaker here; the serving one comes back
    /// unsettled, for the caller to record once its answer is whole.
    ///
    /// The request's deadline is set by [`Router::timed`]. A target
    /// with a usable target after it gets at most half the time left, so the
    /// next one still has time to answer; and a failure that took longer
    /// than [`RetryPolicy::retry_within`] moves on rather than waiting again.
    async fn walk<'a, T, F>(
        &'a self,
        req: &'a Request,
        call: F,
    ) -> Result<(Served<T>, Option<Attempt>), RouteError>
    where
        F: for<'r> Fn(
            &'r Hop,
            &'r Request,
        ) -> BoxFuture<'r, Result<(Reply<T>, Duration), BackendError>>,
    {
        let route = self
            .table
            .resolve(&req.chat.model)
            .ok_or_else(|| RouteError::NoRoute(req.chat.model.clone()))?;
        let mut failed = Vec::new();
        let mut mirrored = Vec::new();
        let mut backend_time = Duration::ZERO;
        let started_walk = Instant::now();
        let deadline = req
            .deadline
            .map_or(started_walk + route.deadline, Instant::from_std);
        'targets: for (i, hop) in route.hops.iter().enumerate() {
            let name = hop.backend.name();
            let breaker = self.breakers.get(name);
            let hop_deadline = if self.can_follow(&route.hops[i + 1..]) {
                let now = Instant::now();
                now + deadline.saturating_duration_since(now) / 2
            } else {
                deadline
            };
            for attempt in 0.. {
                if Instant::now() >= hop_deadline {
                    if hop_deadline == deadline {
                        break 'targets; // the last failure says the deadline passed
                    }
                    continue 'targets;
                }
                if breaker.is_some_and(|b| !b.admit()) {
                    if let Some(tx) = self.mirror.as_ref().and_then(|m| m.offer(name, req)) {
                        mirrored.push(tx);
                    }
                    let e = BackendError::new(
                        FailureKind::Unavailable,
                        format!("target `{name}` is unavailable: its circuit breaker is open"),
                    );
                    failed.push((name.to_string(), e));
                    continue 'targets;
                }
                let pending = breaker.cloned().map(Attempt::new);
                let started = Instant::now();
                let result = match tokio::time::timeout_at(hop_deadline, call(hop, req)).await {
                    Ok(result) => result,
                    Err(_) if hop_deadline < deadline => Err(BackendError::new(
                        FailureKind::FirstByteTimeout,
                        format!(
                            "no answer within {} ms: the rest of the request's time is kept \
                             for the next target",
                            started.elapsed().as_millis()
                        ),
                    )),
                    Err(_) => Err(BackendError::new(
                        FailureKind::FirstByteTimeout,
                        format!(
                            "the request's deadline of {} ms passed",
                            deadline.saturating_duration_since(started_walk).as_millis()
                        ),
                    )),
                };
                let e = match result {
                    Ok((reply, waited)) => {
                        let serving = Serving::new(name, attempts(&failed) + 1);
                        let served = Served {
                            reply,
                            backend: name.to_string(),
                            failed,
                            backend_time: backend_time + waited,
                            serving,
                            mirrored,
                        };
                        return Ok((served, pending));
                    }
                    Err(e) => e,
                };
                if let Some(pending) = pending {
                    pending.record(Outcome::Failure(e.kind));
                }
                let took = started.elapsed();
                backend_time += took;
                let next = match hop.retry.next(&e, attempt) {
                    Next::Retry(_) if took > hop.retry.retry_within => Next::MoveOn,
                    next => next,
                };
                failed.push((name.to_string(), e));
                match next {
                    Next::Stop => break 'targets,
                    Next::MoveOn => continue 'targets,
                    Next::Retry(wait) if Instant::now() + wait < hop_deadline => {
                        tokio::time::sleep(wait).await;
                    }
                    Next::Retry(_) => continue 'targets,
                }
            }
        }
        Err(RouteError::Failed(failed))
    }

    /// The request with its deadline: the route's, or the client's budget
    /// when that is sooner. Backends see it in [`Request::deadline`], so
    /// the local model stops generating in time.
    fn timed(&self, req: &Request) -> Result<Request, RouteError> {
        let route = self
            .table
            .resolve(&req.chat.model)
            .ok_or_else(|| RouteError::NoRoute(req.chat.model.clone()))?;
        let own = Instant::now() + route.deadline;
        let deadline = req
            .deadline
            .map_or(own, |client| own.min(Instant::from_std(client)));
        let mut req = req.clone();
        req.deadline = Some(deadline.into_std());
        Ok(req)
    }

    /// Whether any of `hops` could take the request now: it is ready, and
    /// its breaker is not open.
    fn can_follow(&self, hops: &[Hop]) -> bool {
        hops.iter().any(|hop| {
            hop.backend.ready()
                && self
                    .breakers
                    .get(hop.backend.name())
                    .is_none_or(|b| b.state() != breaker::BreakerState::Open)
        })
    }

    /// The models every target reports, without duplicates; a target that
    /// cannot list its models is skipped.
    pub async fn models(&self) -> Vec<Model> {
        let mut models: Vec<Model> = Vec::new();
        for target in self.table.targets() {
            if let Ok(list) = target.models().await {
                for m in list {
                    if !models.iter().any(|known| known.id == m.id) {
                        models.push(m);
                    }
                }
            }
        }
        models
    }
}

#[cfg(test)]
mod tests;
