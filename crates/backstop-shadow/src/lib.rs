//! The shadow-traffic verifier: an upstream whose breaker opened gets traffic
//! back only on evidence.
//!
//! Once a target's open period has lapsed, its breaker admits no live call
//! (verification mode). Instead a sampled fraction of the live requests that
//! are routed past it is mirrored to it, fire-and-forget, with `max_tokens`
//! capped; when there is no live traffic, a synthetic prompt is sent at an
//! interval. Each shadow call is scored (status, content type, schema,
//! finish reason, time to first token and total time against SLOs, no 429).
//! When the last K shadows succeeded and at least N were scored with a
//! success ratio at or above the threshold, recovery is confirmed and live
//! traffic returns in steps (for example 10%, 50%, 100%); a failure during
//! the ramp opens the breaker again, for longer, and verification starts
//! over. A confirmation needs the breaker's own health checks to pass too.
//!
//! The client never waits for a shadow: the queue is bounded and drops when
//! full, and comparisons with the served answer (length ratio and word
//! overlap) are recorded, never gating.

mod score;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_adapter::{Api, Backend, Request};
use backstop_router::breaker::{BreakerState, CircuitBreaker};
use backstop_router::{lock, Mirror};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use score::{score, Scored, Similarity, Verdict};

/// How shadows are sampled, scored and turned into a return of traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// Fraction (0..=1) of the live requests routed past a verifying target
    /// that are mirrored to it.
    pub sample_rate: f64,
    /// Shadows of one target at least this far apart (probe discipline);
    /// the spacing doubles with each failed shadow, up to `max_interval`.
    pub min_interval: Duration,
    /// The longest spacing between shadows of a failing target.
    pub max_interval: Duration,
    /// Cap on a shadow's `max_tokens`, to save quota.
    pub max_tokens: u32,
    /// When not empty, only requests whose last message contains one of
    /// these strings are mirrored.
    pub allowlist: Vec<String>,
    /// Shadows waiting to be sent; more are dropped.
    pub queue: usize,
    /// Shadow calls in flight at once, all targets together.
    pub concurrency: usize,
    /// With no live shadow for this long, a synthetic one is sent.
    pub probe_interval: Duration,
    /// The synthetic prompts, used in turn.
    pub probes: Vec<String>,
    /// Model asked for by synthetic shadows.
    pub probe_model: String,
    /// Time to first token a healthy answer stays within.
    pub first_token_slo: Duration,
    /// Time for the whole (capped) answer.
    pub total_slo: Duration,
    /// Shadows scored before recovery can be confirmed; also the window the
    /// success ratio is taken over.
    pub window: usize,
    /// The last this many shadows must all have succeeded.
    pub last_k: usize,
    /// Success ratio over the window needed to confirm.
    pub threshold: f64,
    /// Fractions of live traffic admitted at each ramp stage; 1.0 last.
    pub ramp: Vec<f64>,
    /// Time at each ramp stage before the next.
    pub ramp_step: Duration,
}

impl Default for ShadowConfig {
    /// Chosen by measurement (`bench-outage 1 12`, benches/README.md): at
    /// one live request a second, a recovered upstream serves again within
    /// a few seconds and takes all its traffic back within about ten. While
    /// it verifies, every request routed past it is mirrored (capped at
    /// `max_tokens`, one at a time) and idle gaps are filled with probes; a
    /// failing one is tried at most every two seconds, so a recovery is
    /// seen within two; three clean answers in a row confirm it, and the
    /// ramp starts at half the traffic, so a relapse is found by live calls
    /// that fail over before their first byte.
    fn default() -> Self {
        ShadowConfig {
            sample_rate: 1.0,
            min_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(2),
            max_tokens: 16,
            allowlist: Vec::new(),
            queue: 64,
            concurrency: 4,
            probe_interval: Duration::from_millis(500),
            probes: vec!["Reply with the single word: ready".into()],
            probe_model: "gpt-4o-mini".into(),
            first_token_slo: Duration::from_secs(10),
            total_slo: Duration::from_secs(30),
            window: 3,
            last_k: 3,
            threshold: 1.0,
            ramp: vec![0.5, 1.0],
            ramp_step: Duration::from_secs(5),
        }
    }
}

/// Where a target is in its return to service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Closed: serving all its traffic.
    Serving,
    /// Open, its open period running: nothing is sent to it.
    Cooling,
    /// Open period over: shadows are scored.
    Verifying,
    /// Confirmed: live traffic returns at this stage's fraction.
    Ramping,
}

impl Phase {
    /// Stable name for the status view.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Cooling => "cooling",
            Phase::Verifying => "verifying",
            Phase::Ramping => "ramping",
        }
    }
}

/// What the verifier reports as it works (metrics).
pub trait ShadowObserver: Send + Sync {
    /// A shadow call to `target` ended so (`dropped` when the queue was full).
    fn shadow(&self, target: &str, outcome: &str);
    /// Recovery of `target` was confirmed.
    fn confirmed(&self, target: &str);
    /// `target` now admits this fraction of live traffic.
    fn ramp(&self, target: &str, fraction: f64);
    /// A shadow answer compared with the served one.
    fn similarity(&self, target: &str, similarity: Similarity);
}

/// The replicas one verifier works for, when several share a store: one
/// replica at a time verifies each target (sends its shadows and probes,
/// and decides when it is back), and the others follow the steps it
/// reaches. What it answers is what the fleet said when last asked; the
/// server keeps it current a few times a second.
pub trait Fleet: Send + Sync {
    /// Tells the fleet whether `target` is open (`open`) and whether it is
    /// verifying or ramping here (`verifying`): a replica verifies for the
    /// fleet only while it is.
    fn report(&self, target: &str, open: bool, verifying: bool);
    /// Whether this replica verifies `target` for the fleet.
    fn leads(&self, target: &str) -> bool;
    /// The fraction of live traffic the verifying replica reached for
    /// `target`, with how many times it has said so (a follower acts on a
    /// new one only).
    fn reached(&self, target: &str) -> Option<(f64, u64)>;
    /// Tells the fleet this replica, verifying `target`, reached `fraction`.
    fn publish(&self, target: &str, fraction: f64);
}

/// One target's verification state.
struct Target {
    backend: Arc<dyn Backend>,
    breaker: Arc<CircuitBreaker>,
    window: Mutex<VecDeque<Verdict>>,
    /// Nanoseconds after `base` of the last shadow sent (live or synthetic).
    last_sent: AtomicU64,
    /// A shadow is in flight (one at a time per target).
    in_flight: AtomicUsize,
    /// Nanoseconds the next shadow waits after the last: `min_interval`,
    /// doubled per failed shadow up to `max_interval`.
    spacing: AtomicU64,
    confirmations: AtomicU64,
    similarity: Mutex<Option<Similarity>>,
    ramp: Mutex<Option<(usize, Instant)>>,
    /// The fleet's word on it when it last opened: a follower acts only on
    /// what the verifying replica says after that.
    heard: AtomicU64,
}

impl Target {
    fn phase(&self) -> Phase {
        match self.breaker.state() {
            BreakerState::Closed => Phase::Serving,
            BreakerState::Recovering => Phase::Ramping,
            _ if self.breaker.open_remaining().is_zero() => Phase::Verifying,
            _ => Phase::Cooling,
        }
    }
}

/// A shadow call waiting to be sent.
struct Job {
    target: Arc<Target>,
    name: String,
    request: Request,
    /// The served answer's text, for the comparison (live shadows only).
    served: Option<oneshot::Receiver<String>>,
}

/// The verifier for every checked target.
pub struct Shadows {
    config: ShadowConfig,
    /// The checked targets, by name; [`Shadows::reconcile`] changes them.
    targets: Mutex<HashMap<String, Arc<Target>>>,
    queue: mpsc::Sender<Job>,
    observer: Arc<dyn ShadowObserver>,
    base: Instant,
    next_probe: AtomicUsize,
    /// The queue's receiving end until [`Shadows::start`], then the
    /// dispatcher and each target's control loop.
    tasks: Mutex<Tasks>,
    /// The replicas it verifies for, when they share a store.
    fleet: std::sync::OnceLock<Arc<dyn Fleet>>,
}

#[derive(Default)]
struct Tasks {
    jobs: Option<mpsc::Receiver<Job>>,
    started: bool,
    dispatch: Option<JoinHandle<()>>,
    control: HashMap<String, JoinHandle<()>>,
}

/// A target's verification, as the status view shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetStatus {
    /// Where it is in its return to service.
    pub phase: &'static str,
    /// The scored shadows in the window, oldest first.
    pub window: Vec<&'static str>,
    /// Successes in the window.
    pub successes: usize,
    /// Confirmations so far.
    pub confirmations: u64,
    /// Fraction of live traffic admitted (1 when serving, 0 when open).
    pub ramp_fraction: f64,
    /// The last comparison of a shadow answer with the served one.
    pub last_similarity: Option<(f64, f64)>,
}

impl Shadows {
    /// A verifier for these targets (name, backend, breaker). Their breakers
    /// switch to verification mode. Call [`Shadows::start`] to start it.
    pub fn new(
        config: ShadowConfig,
        targets: Vec<(String, Arc<dyn Backend>, Arc<CircuitBreaker>)>,
        observer: Arc<dyn ShadowObserver>,
    ) -> Arc<Self> {
        let (queue, jobs) = mpsc::channel(config.queue.max(1));
        let shadows = Arc::new(Shadows {
            config,
            targets: Mutex::new(HashMap::new()),
            queue,
            observer,
            base: Instant::now(),
            next_probe: AtomicUsize::new(0),
            tasks: Mutex::new(Tasks {
                jobs: Some(jobs),
                ..Tasks::default()
            }),
            fleet: std::sync::OnceLock::new(),
        });
        shadows.reconcile(targets);
        shadows
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ShadowConfig {
        &self.config
    }

    /// Verifies for these replicas from now on (once; later calls do
    /// nothing): it sends shadows for a target only while it verifies that
    /// target for them, and otherwise follows the steps of the one that
    /// does.
    pub fn join(&self, fleet: Arc<dyn Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// Whether this replica verifies `name` (always, alone).
    fn leads(&self, name: &str) -> bool {
        self.fleet.get().is_none_or(|f| f.leads(name))
    }

    /// Checks these targets from now on: a target it checks already, with
    /// the same breaker, keeps its verification as it stands; one with a
    /// new breaker (its settings changed) starts afresh; one not listed is
    /// no longer checked, and its breaker leaves verification mode.
    pub fn reconcile(
        self: &Arc<Self>,
        targets: Vec<(String, Arc<dyn Backend>, Arc<CircuitBreaker>)>,
    ) {
        let mut checked = lock(&self.targets);
        let mut tasks = lock(&self.tasks);
        let mut next = HashMap::new();
        for (name, backend, breaker) in targets {
            let kept = checked
                .remove(&name)
                .filter(|t| Arc::ptr_eq(&t.breaker, &breaker));
            let target = match kept {
                Some(target) => target,
                None => {
                    if let Some(task) = tasks.control.remove(&name) {
                        task.abort();
                    }
                    breaker.set_verified(true);
                    self.observer.ramp(&name, breaker.admitted_fraction());
                    Arc::new(Target {
                        backend,
                        breaker,
                        window: Mutex::new(VecDeque::new()),
                        last_sent: AtomicU64::new(0),
                        in_flight: AtomicUsize::new(0),
                        spacing: AtomicU64::new(self.config.min_interval.as_nanos() as u64),
                        confirmations: AtomicU64::new(0),
                        similarity: Mutex::new(None),
                        ramp: Mutex::new(None),
                        heard: AtomicU64::new(0),
                    })
                }
            };
            if tasks.started && !tasks.control.contains_key(&name) {
                let task = tokio::spawn(control(self.clone(), name.clone(), target.clone()));
                tasks.control.insert(name.clone(), task);
            }
            next.insert(name, target);
        }
        for (name, gone) in checked.drain() {
            gone.breaker.set_verified(false);
            if let Some(task) = tasks.control.remove(&name) {
                task.abort();
            }
        }
        *checked = next;
    }

    /// Stops verifying: every checked breaker leaves verification mode
    /// (back to its own half-open probe) and the tasks end.
    pub fn stop(&self) {
        for target in lock(&self.targets).values() {
            target.breaker.set_verified(false);
        }
        let mut tasks = lock(&self.tasks);
        for (_, task) in tasks.control.drain() {
            task.abort();
        }
        if let Some(task) = tasks.dispatch.take() {
            task.abort();
        }
    }

    fn target(&self, name: &str) -> Option<Arc<Target>> {
        lock(&self.targets).get(name).cloned()
    }
}

impl Shadows {
    fn nanos(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Queues a shadow of `request` to `name` if its interval allows, one at
    /// a time per target; a full queue drops it.
    fn enqueue(
        &self,
        name: &str,
        target: &Arc<Target>,
        mut request: Request,
        served: Option<oneshot::Receiver<String>>,
    ) -> bool {
        let now = self.nanos();
        let last = target.last_sent.load(Ordering::Acquire);
        let spacing = target.spacing.load(Ordering::Acquire);
        if (last != 0 && now.saturating_sub(last) < spacing)
            || target.in_flight.load(Ordering::Acquire) > 0
            || target
                .last_sent
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        let cap = self.config.max_tokens;
        request.chat.max_tokens = Some(request.chat.max_tokens.map_or(cap, |m| m.min(cap)));
        if request.chat.max_completion_tokens.is_some() {
            request.chat.max_completion_tokens = request.chat.max_tokens;
        }
        request.chat.stream = Some(true);
        request.prefill = None;
        let job = Job {
            target: target.clone(),
            name: name.to_string(),
            request,
            served,
        };
        target.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(job).is_err() {
            target.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.observer.shadow(name, "dropped");
            return false;
        }
        true
    }

    fn allowed(&self, request: &Request) -> bool {
        if self.config.allowlist.is_empty() {
            return true;
        }
        let last = request
            .chat
            .messages
            .last()
            .and_then(|m| m.content.as_ref())
            .map(|c| c.to_text())
            .unwrap_or_default();
        self.config
            .allowlist
            .iter()
            .any(|a| last.contains(a.as_str()))
    }

    /// Starts the workers and the per-target control loops; they run until
    /// [`Shadows::stop`]. Once only; later calls do nothing.
    pub fn start(self: &Arc<Self>) {
        // The same order of locks as `reconcile`.
        let targets = lock(&self.targets);
        let mut tasks = lock(&self.tasks);
        let Some(jobs) = tasks.jobs.take() else {
            return;
        };
        tasks.started = true;
        tasks.dispatch = Some(tokio::spawn(dispatch(self.clone(), jobs)));
        for (name, target) in targets.iter() {
            let task = tokio::spawn(control(self.clone(), name.clone(), target.clone()));
            tasks.control.insert(name.clone(), task);
        }
    }

    /// Every checked target's verification state.
    pub fn status(&self) -> HashMap<String, TargetStatus> {
        lock(&self.targets)
            .iter()
            .map(|(name, t)| {
                let window: Vec<&'static str> =
                    lock(&t.window).iter().map(|v| v.as_str()).collect();
                let successes = window.iter().filter(|v| **v == "ok").count();
                let status = TargetStatus {
                    phase: t.phase().as_str(),
                    successes,
                    window,
                    confirmations: t.confirmations.load(Ordering::Acquire),
                    ramp_fraction: t.breaker.admitted_fraction(),
                    last_similarity: lock(&t.similarity).map(|s| (s.length_ratio, s.token_overlap)),
                };
                (name.clone(), status)
            })
            .collect()
    }

    /// Starts `name`'s verification over, now: its window is emptied, any
    /// remaining open period or ramp is cut short, and shadows start afresh.
    /// False for a target the verifier does not check or that is serving.
    pub fn restart(&self, name: &str) -> bool {
        let Some(t) = self.target(name) else {
            return false;
        };
        if t.phase() == Phase::Serving {
            return false;
        }
        t.breaker.reopen_lapsed();
        lock(&t.window).clear();
        *lock(&t.ramp) = None;
        t.spacing.store(
            self.config.min_interval.as_nanos() as u64,
            Ordering::Release,
        );
        self.observer.ramp(name, 0.0);
        true
    }
}

/// Whether a window of verdicts (oldest first) confirms recovery: at least
/// `window` scored, the last `last_k` all ok, and the success ratio at or
/// above `threshold`.
fn confirmed(config: &ShadowConfig, window: &VecDeque<Verdict>) -> bool {
    let n = window.len();
    let ok = window.iter().filter(|v| **v == Verdict::Ok).count();
    n >= config.window
        && window
            .iter()
            .rev()
            .take(config.last_k)
            .all(|v| *v == Verdict::Ok)
        && ok as f64 >= config.threshold * n as f64
}

impl Mirror for Shadows {
    fn offer(&self, target: &str, req: &Request) -> Option<oneshot::Sender<String>> {
        let t = self.target(target)?;
        // Legacy bodies go upstream as they came, so their answers could not
        // be capped: only chat requests are mirrored.
        if t.phase() != Phase::Verifying
            || !self.leads(target)
            || req.api != Api::Chat
            || rand::random::<f64>() >= self.config.sample_rate
            || !self.allowed(req)
        {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(target, &t, req.clone(), Some(rx))
            .then_some(tx)
    }
}

/// Sends queued shadows, a bounded number at once.
async fn dispatch(shadows: Arc<Shadows>, mut jobs: mpsc::Receiver<Job>) {
    let permits = Arc::new(Semaphore::new(shadows.config.concurrency.max(1)));
    while let Some(job) = jobs.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let shadows = shadows.clone();
        tokio::spawn(async move {
            run(&shadows, job).await;
            drop(permit);
        });
    }
}

/// One shadow call: scored into the window, compared with the served answer.
async fn run(shadows: &Shadows, job: Job) {
    let Job {
        target,
        name,
        request,
        served,
    } = job;
    let scored = score(
        target.backend.as_ref(),
        &request,
        shadows.config.first_token_slo,
        shadows.config.total_slo,
    )
    .await;
    target.in_flight.fetch_sub(1, Ordering::AcqRel);
    shadows.observer.shadow(&name, scored.verdict.as_str());
    // A failing upstream is shadowed less and less often: backed off, not hammered.
    let min = shadows.config.min_interval.as_nanos() as u64;
    let max = (shadows.config.max_interval.as_nanos() as u64).max(min);
    let spacing = if scored.verdict == Verdict::Ok {
        min
    } else {
        target
            .spacing
            .load(Ordering::Acquire)
            .saturating_mul(2)
            .clamp(min, max)
    };
    target.spacing.store(spacing, Ordering::Release);
    if target.phase() == Phase::Verifying {
        let mut window = lock(&target.window);
        window.push_back(scored.verdict);
        while window.len() > shadows.config.window {
            window.pop_front();
        }
    }
    if let (Some(served), Verdict::Ok) = (served, scored.verdict) {
        if let Ok(text) = served.await {
            let similarity = Similarity::of(&text, &scored.text);
            *lock(&target.similarity) = Some(similarity);
            shadows.observer.similarity(&name, similarity);
        }
    }
}

/// One target's loop: synthetic shadows when live ones are scarce,
/// confirmation, the ramp's steps, and a clean window after each trip.
async fn control(shadows: Arc<Shadows>, name: String, target: Arc<Target>) {
    let config = &shadows.config;
    let tick = config
        .min_interval
        .min(config.ramp_step)
        .min(Duration::from_millis(250))
        .max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was = Phase::Serving;
    loop {
        ticks.tick().await;
        let phase = target.phase();
        let fleet = shadows.fleet.get();
        if phase == Phase::Cooling && was != Phase::Cooling {
            // Opened (again): evidence from before says nothing about after.
            lock(&target.window).clear();
            *lock(&target.ramp) = None;
            shadows.observer.ramp(&name, 0.0);
        }
        let opened = (phase == Phase::Cooling && was != Phase::Cooling)
            || (phase != Phase::Serving && was == Phase::Serving);
        if let Some((_, seq)) = fleet.filter(|_| opened).and_then(|f| f.reached(&name)) {
            // What the fleet said before this opening is about another.
            target.heard.store(seq, Ordering::Release);
        }
        if let Some(fleet) = fleet {
            fleet.report(
                &name,
                phase != Phase::Serving,
                matches!(phase, Phase::Verifying | Phase::Ramping),
            );
            if matches!(phase, Phase::Verifying | Phase::Ramping) && !fleet.leads(&name) {
                follow(&shadows, &name, &target, fleet.as_ref());
                was = target.phase();
                continue;
            }
        }
        match phase {
            Phase::Verifying => {
                let idle = shadows
                    .nanos()
                    .saturating_sub(target.last_sent.load(Ordering::Acquire));
                if idle >= config.probe_interval.as_nanos() as u64 && !config.probes.is_empty() {
                    let i = shadows.next_probe.fetch_add(1, Ordering::AcqRel);
                    let prompt = &config.probes[i % config.probes.len()];
                    let body = serde_json::json!({"model": config.probe_model, "stream": true,
                        "messages": [{"role": "user", "content": prompt}]});
                    if let Ok(req) = Request::parse_chat(body.to_string().as_bytes()) {
                        shadows.enqueue(&name, &target, req, None);
                    }
                }
                let confirmed = confirmed(config, &lock(&target.window));
                if confirmed && target.breaker.healthy() {
                    target.confirmations.fetch_add(1, Ordering::AcqRel);
                    shadows.observer.confirmed(&name);
                    tracing::info!(target = %name, "shadow traffic confirmed recovery: traffic returns");
                    step(&shadows, &name, &target, 0);
                }
            }
            Phase::Ramping => {
                let mut ramp = lock(&target.ramp);
                if ramp.is_none() {
                    // Ramping on another replica's word, and now verifying
                    // for the fleet: on from the stage reached.
                    let admitted = target.breaker.admitted_fraction();
                    let stage = config.ramp.iter().position(|f| *f >= admitted).unwrap_or(0);
                    *ramp = Some((stage, Instant::now()));
                }
                let due = ramp
                    .filter(|(_, since)| since.elapsed() >= config.ramp_step)
                    .map(|(stage, _)| stage + 1);
                drop(ramp);
                if let Some(next) = due {
                    step(&shadows, &name, &target, next);
                }
            }
            Phase::Serving | Phase::Cooling => {}
        }
        was = target.phase();
    }
}

/// Moves `target` to ramp stage `stage` (past the last: fully back), and
/// tells the fleet.
fn step(shadows: &Shadows, name: &str, target: &Target, stage: usize) {
    let fraction = shadows.config.ramp.get(stage).copied().unwrap_or(1.0);
    target.breaker.recover(fraction);
    *lock(&target.ramp) = (fraction < 1.0).then(|| (stage, Instant::now()));
    lock(&target.window).clear();
    shadows.observer.ramp(name, fraction);
    if let Some(fleet) = shadows.fleet.get() {
        fleet.publish(name, fraction);
    }
}

/// A replica that does not verify `target` takes each step the verifying
/// replica reached since `target` opened here; its own breaker still
/// decides whether it opens again.
fn follow(shadows: &Shadows, name: &str, target: &Target, fleet: &dyn Fleet) {
    let Some((fraction, seq)) = fleet.reached(name) else {
        return;
    };
    if seq <= target.heard.load(Ordering::Acquire) || fraction <= 0.0 {
        return;
    }
    target.heard.store(seq, Ordering::Release);
    target.breaker.recover(fraction);
    *lock(&target.ramp) = None;
    lock(&target.window).clear();
    shadows.observer.ramp(name, fraction);
    tracing::info!(
        target = %name,
        fraction,
        "following the verifying replica: traffic returns"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_adapter::{BackendError, BoxFuture, ChatCompletion, ChunkStream, Model, Reply};
    use backstop_router::breaker::BreakerConfig;

    /// A target never called: these tests watch the verifier's state.
    struct Idle;

    impl Backend for Idle {
        fn name(&self) -> &str {
            "idle"
        }
        fn complete<'a>(
            &'a self,
            _: &'a Request,
        ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
            Box::pin(std::future::pending())
        }
        fn stream<'a>(
            &'a self,
            _: &'a Request,
        ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
            Box::pin(std::future::pending())
        }
        fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
            Box::pin(std::future::pending())
        }
    }

    struct Quiet;

    impl ShadowObserver for Quiet {
        fn shadow(&self, _: &str, _: &str) {}
        fn confirmed(&self, _: &str) {}
        fn ramp(&self, _: &str, _: f64) {}
        fn similarity(&self, _: &str, _: Similarity) {}
    }

    #[tokio::test]
    async fn a_reconcile_keeps_the_verification_of_targets_whose_breaker_is_the_same() {
        let backend: Arc<dyn Backend> = Arc::new(Idle);
        let breaker = || Arc::new(CircuitBreaker::new(BreakerConfig::default()));
        let (a, b) = (breaker(), breaker());
        let shadows = Shadows::new(
            ShadowConfig::default(),
            vec![
                ("a".into(), backend.clone(), a.clone()),
                ("b".into(), backend.clone(), b.clone()),
            ],
            Arc::new(Quiet),
        );
        shadows.start();
        let evidence = |name: &str| {
            let target = shadows.target(name).unwrap();
            lock(&target.window).push_back(Verdict::Ok);
        };
        evidence("a");
        evidence("b");
        // a as it was; b with a new breaker (its settings changed); c new.
        let (b2, c) = (breaker(), breaker());
        shadows.reconcile(vec![
            ("a".into(), backend.clone(), a.clone()),
            ("b".into(), backend.clone(), b2.clone()),
            ("c".into(), backend.clone(), c.clone()),
        ]);
        let status = shadows.status();
        assert_eq!(status["a"].window, ["ok"], "kept");
        assert!(status["b"].window.is_empty(), "started afresh");
        assert!(status["c"].window.is_empty());
        assert!(a.is_verified() && b2.is_verified() && c.is_verified());
        assert_eq!(lock(&shadows.tasks).control.len(), 3);
        // c removed: its breaker leaves verification, its loop ends.
        shadows.reconcile(vec![("a".into(), backend.clone(), a.clone())]);
        assert!(!c.is_verified());
        assert_eq!(shadows.status().len(), 1);
        assert_eq!(lock(&shadows.tasks).control.len(), 1);
        shadows.stop();
        assert!(!a.is_verified());
        assert!(lock(&shadows.tasks).control.is_empty());
    }

    #[test]
    fn confirmation_needs_a_full_window_a_clean_tail_and_the_ratio() {
        let config = ShadowConfig {
            window: 5,
            last_k: 2,
            threshold: 0.8,
            ..ShadowConfig::default()
        };
        let window = |v: &[bool]| -> VecDeque<Verdict> {
            v.iter()
                .map(|ok| if *ok { Verdict::Ok } else { Verdict::Failed })
                .collect()
        };
        assert!(confirmed(&config, &window(&[true; 5])));
        assert!(!confirmed(&config, &window(&[true; 4])), "too few");
        assert!(confirmed(
            &config,
            &window(&[false, true, true, true, true])
        ));
        assert!(
            !confirmed(&config, &window(&[true, true, true, true, false])),
            "tail"
        );
        assert!(
            !confirmed(&config, &window(&[false, false, true, true, true])),
            "ratio"
        );
    }
}
