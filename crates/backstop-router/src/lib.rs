//! Routes a request to a chain of backends and walks it.
//!
//! A [`RouteTable`] maps the requested model (exact name, prefix, or anything)
//! to an ordered chain of targets. Before the first byte reaches the client,
//! a retryable failure moves on to the next target; a failure that is the
//! client's fault stops the walk. Every failed attempt is kept, in order, so the
//! final error tells the whole story.

pub mod breaker;
mod continuation;
pub mod group;
pub use continuation::Serving;
pub mod health;
pub mod hedge;
pub mod observer;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backstop_adapter::{
    Backend, BackendError, ChatCompletion, ChunkStream, FailureKind, Model, Reply, Request,
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
    /// Whether `model` is one the pattern takes.
    pub fn matches(&self, model: &str) -> bool {
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
    /// The chain of targets, first preferred; a group's members side by
    /// side, in configured order.
    pub hops: Vec<Hop>,
    /// The groups among the hops, each tried in its policy's order.
    pub groups: Vec<group::Group>,
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
            groups: Vec::new(),
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
    /// The serving target counts this request as in flight until dropped.
    busy: Option<group::BusyGuard>,
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

/// Records a failed call on its breaker.
fn settle(pending: Option<Attempt>, e: &BackendError) {
    if let Some(pending) = pending {
        pending.fail(e.kind, &e.message);
    }
}

/// A call that gives up at `until`: the hop's share of the time, or the
/// request's `deadline` (set `started` into the walk).
fn bounded<'r, T: 'r>(
    call: hedge::Called<'r, T>,
    until: Instant,
    deadline: Instant,
    started: Instant,
) -> hedge::Called<'r, T> {
    Box::pin(async move {
        let began = Instant::now();
        match tokio::time::timeout_at(until, call).await {
            Ok(result) => result,
            Err(_) if until < deadline => Err(BackendError::new(
                FailureKind::FirstByteTimeout,
                format!(
                    "no answer within {} ms: the rest of the request's time is kept for the \
                     next target",
                    began.elapsed().as_millis()
                ),
            )),
            Err(_) => Err(BackendError::new(
                FailureKind::FirstByteTimeout,
                format!(
                    "the request's deadline of {} ms passed",
                    deadline.saturating_duration_since(started).as_millis()
                ),
            )),
        }
    })
}

/// A stream that ends at `deadline` if it has not ended before: with an
/// error, as the answer is not complete. The deadline wins over chunks that
/// are ready, so an upstream that never stops is cut all the same.
fn cut_at(stream: ChunkStream, deadline: Instant, started: Instant) -> ChunkStream {
    let sleep = Box::pin(tokio::time::sleep_until(deadline));
    Box::pin(futures_util::stream::unfold(
        Some((stream, sleep)),
        move |state| async move {
            let (mut stream, mut sleep) = state?;
            tokio::select! {
                biased;
                () = &mut sleep => {
                    let allowed = deadline.saturating_duration_since(started).as_millis();
                    let e = BackendError::new(
                        FailureKind::DeadlinePassed,
                        format!(
                            "the answer was still streaming at the request's deadline of \
                             {allowed} ms and was cut: it is not complete"
                        ),
                    );
                    Some((Err(e), None))
                }
                item = stream.next() => item.map(|item| (item, Some((stream, sleep)))),
            }
        },
    ))
}

/// Locks a mutex, taking its data even if a panicking holder poisoned it:
/// what these locks guard stays whole between statements.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// What the router learns of a target between requests: its breaker, and
/// its recent times to first token (the hedge delay). A reload hands the
/// same state to the next router for a target whose settings did not
/// change.
#[derive(Clone)]
pub struct TargetState {
    /// The target's circuit breaker.
    pub breaker: Arc<CircuitBreaker>,
    /// Its recent times to first token.
    pub first_tokens: Arc<hedge::FirstTokenTimes>,
    /// Its requests in flight.
    pub busy: Arc<group::Busy>,
}

impl TargetState {
    /// A fresh state: a closed breaker with these settings, no history.
    pub fn new(breaker: BreakerConfig) -> Self {
        TargetState {
            breaker: Arc::new(CircuitBreaker::new(breaker)),
            first_tokens: Arc::default(),
            busy: Arc::default(),
        }
    }
}

/// Walks route chains, skipping targets whose breaker is open.
#[derive(Clone)]
pub struct Router {
    table: RouteTable,
    breakers: HashMap<String, Arc<CircuitBreaker>>,
    /// Each target's state: its breaker again, its recent times to first
    /// token (the hedge delay, least-latency groups), its requests in flight
    /// (least-busy groups).
    states: HashMap<String, TargetState>,
    observer: Arc<dyn observer::Observer>,
    mirror: Option<Arc<dyn Mirror>>,
}

impl Router {
    /// A router over this table, with a breaker per target configured by
    /// `breaker_for(target name)`.
    pub fn new(table: RouteTable, breaker_for: impl Fn(&str) -> BreakerConfig) -> Self {
        Self::over(table, |name| TargetState::new(breaker_for(name)))
    }

    /// A router over this table, with each target's state from
    /// `state_for(target name)`: fresh, or kept from an earlier router.
    pub fn over(table: RouteTable, state_for: impl Fn(&str) -> TargetState) -> Self {
        let states: HashMap<String, TargetState> = table
            .targets()
            .iter()
            .map(|t| (t.name().to_string(), state_for(t.name())))
            .collect();
        let breakers = states
            .iter()
            .map(|(name, s)| (name.clone(), s.breaker.clone()))
            .collect();
        Router {
            table,
            breakers,
            states,
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
        let (served, attempt) = self
            .walk(req, false, |hop, req| {
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
    ///
    /// The whole stream is bounded by the request's deadline (the route's,
    /// or the client's when sooner): a stream still going then is cut with
    /// a [`FailureKind::DeadlinePassed`] error, never ended as if complete.
    pub async fn stream(&self, req: &Request) -> Result<Served<ChunkStream>, RouteError> {
        let started = Instant::now();
        self.walk(req, true, |hop, req| {
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
            let body = continuation::continuing(
                body,
                attempt,
                req,
                successors,
                continuation::Reporter {
                    observer: self.observer.clone(),
                    serving: served.serving.clone(),
                },
            );
            let body = match self.table.resolve(&req.chat.model) {
                Some(route) => cut_at(body, self.deadline(route, req, started), started),
                None => body,
            };
            // The serving target is busy with it until the stream is done.
            let busy = served.busy.take();
            served.reply.body = Box::pin(body.map(move |item| {
                let _ = &busy;
                item
            }));
            served
        })
    }

    /// The targets after `serving` in the request's route, to continue a
    /// partial answer: as a prefill where they take one, otherwise through
    /// a continuation prompt. When `serving` is in a group, the group's
    /// other members come first, wherever they stand in it.
    fn successors(&self, req: &Request, serving: &str) -> Vec<continuation::Successor> {
        let Some(route) = self.table.resolve(&req.chat.model) else {
            return Vec::new();
        };
        let Some(at) = route.hops.iter().position(|h| h.backend.name() == serving) else {
            return Vec::new();
        };
        let peers = route
            .groups
            .iter()
            .map(|g| g.start..g.start + g.members.len())
            .find(|span| span.contains(&at))
            .unwrap_or(at..at + 1);
        peers
            .clone()
            .filter(|&i| i != at)
            .chain(peers.end.max(at + 1)..route.hops.len())
            .filter_map(|i| route.hops.get(i))
            .map(|hop| &hop.backend)
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
    /// The request's deadline is its route's, or sooner where the client
    /// gave one ([`Request::deadline`], which backends see too). A target
    /// with a usable target after it gets at most half the time left, so the
    /// next one still has time to answer; and a failure that took longer
    /// than [`RetryPolicy::retry_within`] moves on rather than waiting again.
    /// With `first_tokens` (streams), a target's first attempt is hedged to
    /// the next target (see [`hedge`]), and a wait past the breaker's
    /// slow-call threshold counts as a failure there.
    async fn walk<'a, T: 'a, F>(
        &'a self,
        req: &'a Request,
        first_tokens: bool,
        call: F,
    ) -> Result<(Served<T>, Option<Attempt>), RouteError>
    where
        F: for<'r> Fn(&'r Hop, &'r Request) -> hedge::Called<'r, T> + Sync,
    {
        let route = self
            .table
            .resolve(&req.chat.model)
            .ok_or_else(|| RouteError::NoRoute(req.chat.model.clone()))?;
        let mut failed = Vec::new();
        let mut mirrored = Vec::new();
        let mut backend_time = Duration::ZERO;
        let started_walk = Instant::now();
        let deadline = self.deadline(route, req, started_walk);
        let hops = self.order(route, req);
        // Hops before this were tried already, by a hedge.
        let mut next_hop = 0;
        'targets: for (i, hop) in hops.iter().copied().enumerate() {
            if i < next_hop {
                continue;
            }
            let name = hop.backend.name();
            let breaker = self.breakers.get(name);
            let hop_deadline = self.hop_deadline(&hops, i, deadline);
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
                    let cause = breaker
                        .and_then(|b| b.last_failure())
                        .map(|m| format!("; it last failed with: {m}"))
                        .unwrap_or_default();
                    let e = BackendError::new(
                        FailureKind::Unavailable,
                        format!(
                            "target `{name}` is unavailable: its circuit breaker is open{cause}"
                        ),
                    );
                    failed.push((name.to_string(), e));
                    continue 'targets;
                }
                let started = Instant::now();
                let busy = self.states.get(name).map(|s| s.busy.enter());
                let primary = hedge::Call {
                    future: bounded(call(hop, req), hop_deadline, deadline, started_walk),
                    pending: breaker.cloned().map(Attempt::new),
                    slow_at: breaker
                        .and_then(|b| b.slow_call())
                        .filter(|_| first_tokens)
                        .map(|after| started + after),
                };
                let hedge = if first_tokens && attempt == 0 {
                    self.hedge(&hops, i, req, deadline, started_walk, &call)
                } else {
                    None
                };
                let raced = hedge::race(primary, hedge).await;
                let hedge_name = hops.get(i + 1).map_or("", |h| h.backend.name());
                let (served_by, reply, waited, pending) = match raced {
                    hedge::Raced {
                        primary: Some((Ok((reply, waited)), pending)),
                        hedge,
                    } => {
                        if let Some(Some((Err(e), hedge_pending))) = hedge {
                            settle(hedge_pending, &e);
                            failed.push((hedge_name.to_string(), e));
                        }
                        (i, reply, waited, pending)
                    }
                    hedge::Raced {
                        primary,
                        hedge: Some(Some((Ok((reply, waited)), pending))),
                    } => {
                        if let Some((Err(e), primary_pending)) = primary {
                            settle(primary_pending, &e);
                            failed.push((name.to_string(), e));
                        }
                        self.observer.hedge_won(name, hedge_name);
                        (i + 1, reply, waited, pending)
                    }
                    hedge::Raced { primary, hedge } => {
                        if let Some(Some((Err(e), hedge_pending))) = hedge {
                            // Both failed: the walk goes on after the hedge.
                            if let Some((Err(first), primary_pending)) = primary {
                                settle(primary_pending, &first);
                                failed.push((name.to_string(), first));
                            }
                            settle(hedge_pending, &e);
                            failed.push((hedge_name.to_string(), e));
                            next_hop = i + 2;
                            continue 'targets;
                        }
                        let Some((Err(e), primary_pending)) = primary else {
                            continue 'targets; // not reached: someone answered
                        };
                        settle(primary_pending, &e);
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
                                continue;
                            }
                            Next::Retry(_) => continue 'targets,
                        }
                    }
                };
                let backend = hops[served_by].backend.name();
                if first_tokens {
                    if let Some(state) = self.states.get(backend) {
                        state.first_tokens.record(waited);
                    }
                }
                let served = Served {
                    reply,
                    backend: backend.to_string(),
                    serving: Serving::new(backend, attempts(&failed) + 1),
                    failed,
                    backend_time: backend_time + waited,
                    mirrored,
                    // A hedge that served was not counted.
                    busy: busy.filter(|_| served_by == i),
                };
                return Ok((served, pending));
            }
        }
        Err(RouteError::Failed(failed))
    }

    /// How long hop `i` may take: the rest of the request's time, or half
    /// of it while a later target could still answer.
    fn hop_deadline(&self, hops: &[&Hop], i: usize, deadline: Instant) -> Instant {
        if self.can_follow(&hops[i + 1..]) {
            let now = Instant::now();
            now + deadline.saturating_duration_since(now) / 2
        } else {
            deadline
        }
    }

    /// The hedge of hop `i`'s first attempt, where one is allowed: to the
    /// next target, when hop `i` allows hedging ([`RetryPolicy::hedge`]) or
    /// the next costs nothing to ask (the local model), after hop `i`'s
    /// learned hedge delay.
    fn hedge<'r, T: 'r, F>(
        &'r self,
        hops: &'r [&'r Hop],
        i: usize,
        req: &'r Request,
        deadline: Instant,
        started_walk: Instant,
        call: &'r F,
    ) -> Option<hedge::Hedge<'r, T>>
    where
        F: for<'c> Fn(&'c Hop, &'c Request) -> hedge::Called<'c, T> + Sync,
    {
        let hop = hops[i];
        let next = *hops.get(i + 1)?;
        if !(hop.retry.hedge || next.backend.hedges_free()) {
            return None;
        }
        let delay = self
            .states
            .get(hop.backend.name())?
            .first_tokens
            .delay(&hop.retry);
        let start = move || {
            let breaker = self.breakers.get(next.backend.name());
            if !next.backend.ready() || breaker.is_some_and(|b| !b.admit()) {
                return None;
            }
            self.observer
                .hedged(hop.backend.name(), next.backend.name());
            let hop_deadline = self.hop_deadline(hops, i + 1, deadline);
            Some(hedge::Call {
                future: bounded(call(next, req), hop_deadline, deadline, started_walk),
                pending: breaker.cloned().map(Attempt::new),
                slow_at: None,
            })
        };
        Some((delay, Box::new(start)))
    }

    /// When the walk gives up: the route's deadline, or the client's
    /// ([`Request::deadline`]) when sooner, plus a grace of a twentieth of
    /// the time (at most half a second). The grace lets an answer that a
    /// backend cut short at the client's deadline (the local model stops
    /// generating then) still be taken; the client's own margin covers it.
    fn deadline(&self, route: &Route, req: &Request, now: Instant) -> Instant {
        let own = now + route.deadline;
        match req.deadline.map(Instant::from_std) {
            Some(client) => {
                let grace =
                    (client.saturating_duration_since(now) / 20).min(Duration::from_millis(500));
                own.min(client + grace)
            }
            None => own,
        }
    }

    /// Whether any of `hops` could take the request now: it is ready, and
    /// its breaker is not open.
    fn can_follow(&self, hops: &[&Hop]) -> bool {
        hops.iter().any(|hop| self.may_serve(&hop.backend))
    }

    /// The route's chain in the order this request tries it: as configured,
    /// but each group's members in its policy's order, those of the
    /// request's region first.
    fn order<'r>(&self, route: &'r Route, req: &Request) -> Vec<&'r Hop> {
        let mut hops: Vec<&Hop> = route.hops.iter().collect();
        for g in &route.groups {
            let span = g.start..(g.start + g.members.len()).min(hops.len());
            let candidates = route.hops[span.clone()]
                .iter()
                .zip(&g.members)
                .zip(span.clone())
                .map(|((hop, member), index)| group::Candidate {
                    index,
                    weight: member.weight,
                    state: self.states.get(hop.backend.name()),
                    up: self.may_serve(&hop.backend),
                })
                .collect();
            let home: Vec<bool> = g
                .members
                .iter()
                .map(|m| req.region.is_none() || m.region == req.region)
                .collect();
            for (at, index) in span.zip(group::order(g.policy, candidates, &home)) {
                hops[at] = &route.hops[index];
            }
        }
        hops
    }

    /// Whether `target` could take a request now: it is ready, and its
    /// breaker lets calls through (see [`CircuitBreaker::may_serve`]).
    pub fn may_serve(&self, target: &Arc<dyn Backend>) -> bool {
        target.ready()
            && self
                .breakers
                .get(target.name())
                .is_none_or(|b| b.may_serve())
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
