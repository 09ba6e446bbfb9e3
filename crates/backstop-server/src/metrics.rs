//! Prometheus metrics. Labels are low-cardinality: endpoint, target name,
//! status class or code, token kind; never prompts, keys or error text.

use backstop_adapter::BackendError;
use backstop_router::breaker::BreakerState;
use backstop_router::observer::Observer;
use backstop_router::{Router, Served};
use backstop_shadow::{ShadowObserver, Similarity};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric Backstop exports, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Client requests by endpoint, serving target and status class.
    pub requests: IntCounterVec,
    /// Whole request duration, to the end of the stream for streams.
    pub duration: HistogramVec,
    /// Time from the request's arrival to its first streamed token.
    pub ttft: HistogramVec,
    /// Time Backstop itself added: total minus time waiting on backends.
    pub overhead: Histogram,
    /// Responses from backends by target and status code (or failure kind).
    pub upstream_responses: IntCounterVec,
    /// Tokens by target and kind (`prompt`, `completion`), from backend usage.
    pub tokens: IntCounterVec,
    /// Requests being served now.
    pub in_flight: IntGauge,
    /// Each target's breaker: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// Each target's health by active checks: 1 healthy, 0 not.
    pub healthy: IntGaugeVec,
    /// Requests moved from one target to another, and why.
    pub failovers: IntCounterVec,
    /// Attempts repeated on the same target, and why.
    pub retries: IntCounterVec,
    /// Streams broken mid-answer and continued by another target.
    pub continuations: IntCounterVec,
    /// Late first tokens hedged to the next target, by pair.
    pub hedges: IntCounterVec,
    /// Hedges that answered first and served, by pair.
    pub hedge_wins: IntCounterVec,
    /// Active health probes by target and outcome.
    pub probes: IntCounterVec,
    /// Breaker state changes by target and new state.
    pub transitions: IntCounterVec,
    /// The upstream's own remaining rate-limit budget, from its headers.
    pub ratelimit_remaining: IntGaugeVec,
    /// Shadow calls by target and outcome (`ok`, a failure, `dropped`).
    pub shadow_requests: IntCounterVec,
    /// Recoveries confirmed by shadow traffic, by target.
    pub shadow_confirmations: IntCounterVec,
    /// Fraction of live traffic each verified target admits (ramp stage).
    pub shadow_ramp: prometheus::GaugeVec,
    /// Shadow answers compared with served ones, by target and measure.
    pub shadow_similarity: HistogramVec,
    /// Client connections open now.
    pub connections: IntGauge,
    /// Connections and requests turned away at a bound, by which.
    pub rejected: IntCounterVec,
    /// Connections closed by a deadline, by which.
    pub closed: IntCounterVec,
    /// Memory charged to the requests in flight, against
    /// `max_request_memory` (set at scrape time).
    pub request_memory: IntGauge,
    /// Authenticated requests, by identity (the names config gives).
    pub identity_requests: IntCounterVec,
    /// Tokens served, by identity and kind (prompt, completion).
    pub identity_tokens: IntCounterVec,
    /// Credentials refused, by why.
    pub auth_failures: IntCounterVec,
    /// Whether each upstream key is in use (set at scrape time).
    pub key_in_use: IntGaugeVec,
    /// `backstop_config_reloads_total{outcome}`.
    pub config_reloads: IntCounterVec,
    /// `backstop_breaker_open_replicas{target}`: replicas of a shared
    /// store whose breaker for the target is open now.
    pub breaker_open_replicas: IntGaugeVec,
    /// `backstop_rate_budgets_shared`: 1 while upstream rate limits are
    /// shared across replicas, 0 while each keeps its own.
    pub rate_budgets_shared: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
];

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "backstop_requests_total",
                "Client requests served, by endpoint, serving target and status class.",
            ),
            &["endpoint", "target", "status_class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "backstop_request_duration_seconds",
                "Client request duration, to the end of the stream for streams.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint", "stream"],
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "backstop_time_to_first_token_seconds",
                "Time from a streaming request's arrival to its first chunk sent.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["target"],
        )?;
        let overhead = Histogram::with_opts(
            HistogramOpts::new("backstop_overhead_seconds", "Latency Backstop added: total (or time to first token) minus time waiting on backends.")
                .buckets(OVERHEAD_BUCKETS.to_vec()),
        )?;
        let upstream_responses = IntCounterVec::new(
            Opts::new("backstop_upstream_responses_total", "Backend responses by target and HTTP status code, or failure kind when there was none."),
            &["target", "status"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "backstop_tokens_total",
                "Tokens reported by the serving backend, by target and kind (prompt, completion).",
            ),
            &["target", "kind"],
        )?;
        let in_flight = IntGauge::new(
            "backstop_in_flight_requests",
            "Client requests being served now.",
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "backstop_failovers_total",
                "Requests moved from one target to the next, by from, to and reason (failure kind).",
            ),
            &["from", "to", "reason"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "backstop_retries_total",
                "Attempts repeated on the same target, by target and reason (failure kind).",
            ),
            &["target", "reason"],
        )?;
        let hedges = IntCounterVec::new(
            Opts::new(
                "backstop_hedges_total",
                "Streams whose first token was late on one target and were hedged to the next.",
            ),
            &["from", "to"],
        )?;
        let hedge_wins = IntCounterVec::new(
            Opts::new(
                "backstop_hedge_wins_total",
                "Hedges whose target answered first and served the stream.",
            ),
            &["from", "to"],
        )?;
        let continuations = IntCounterVec::new(
            Opts::new(
                "backstop_stream_continuations_total",
                "Streams that broke mid-answer on one target and were continued by another.",
            ),
            &["from", "to"],
        )?;
        let probes = IntCounterVec::new(
            Opts::new(
                "backstop_health_probes_total",
                "Active health probes by target and outcome (ok, failed).",
            ),
            &["target", "outcome"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "backstop_breaker_transitions_total",
                "Circuit breaker state changes by target and the state entered.",
            ),
            &["target", "to"],
        )?;
        let ratelimit_remaining = IntGaugeVec::new(
            Opts::new(
                "backstop_ratelimit_remaining",
                "The upstream's remaining rate-limit budget by kind (requests, tokens), from its last x-ratelimit-remaining-* headers.",
            ),
            &["target", "kind"],
        )?;
        let healthy = IntGaugeVec::new(
            Opts::new(
                "backstop_target_healthy",
                "Whether active health checks consider a target healthy (1) or not (0).",
            ),
            &["target"],
        )?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "backstop_breaker_state",
                "Circuit breaker state per target: 0 closed, 1 half-open, 2 open.",
            ),
            &["target"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(overhead.clone()))?;
        registry.register(Box::new(upstream_responses.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(continuations.clone()))?;
        registry.register(Box::new(hedges.clone()))?;
        registry.register(Box::new(hedge_wins.clone()))?;
        registry.register(Box::new(probes.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(ratelimit_remaining.clone()))?;
        let shadow_requests = IntCounterVec::new(
            Opts::new(
                "backstop_shadow_requests_total",
                "Shadow calls to targets under verification, by outcome.",
            ),
            &["target", "outcome"],
        )?;
        let shadow_confirmations = IntCounterVec::new(
            Opts::new(
                "backstop_shadow_confirmations_total",
                "Recoveries confirmed by shadow traffic.",
            ),
            &["target"],
        )?;
        let shadow_ramp = prometheus::GaugeVec::new(
            Opts::new(
                "backstop_shadow_ramp_fraction",
                "Fraction of live traffic a verified target admits: 0 open, 1 fully back.",
            ),
            &["target"],
        )?;
        let shadow_similarity = HistogramVec::new(
            HistogramOpts::new(
                "backstop_shadow_similarity",
                "Shadow answer against the served one: length_ratio and token_overlap (0..1).",
            )
            .buckets(vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
            &["target", "measure"],
        )?;
        let connections =
            IntGauge::new("backstop_open_connections", "Client connections open now.")?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "backstop_rejected_total",
                "Connections and requests turned away at a bound, by reason (connections, in_flight, body_timeout, body_rate, body_size, json_values, request_memory, messages, header_size, background_queue, store, identity_rate_limit).",
            ),
            &["reason"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "backstop_connections_closed_total",
                "Client connections closed by a deadline, by reason (header_timeout, idle_timeout, send_timeout).",
            ),
            &["reason"],
        )?;
        let request_memory = IntGauge::new(
            "backstop_request_memory_bytes",
            "Memory charged to the requests in flight (each body, twice, plus 128 bytes per JSON value), against server.max_request_memory.",
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(request_memory.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        registry.register(Box::new(shadow_requests.clone()))?;
        registry.register(Box::new(shadow_confirmations.clone()))?;
        registry.register(Box::new(shadow_ramp.clone()))?;
        registry.register(Box::new(shadow_similarity.clone()))?;
        let identity_requests = IntCounterVec::new(
            Opts::new(
                "backstop_identity_requests_total",
                "Authenticated requests by identity (a name from [auth], never a secret).",
            ),
            &["identity"],
        )?;
        let identity_tokens = IntCounterVec::new(
            Opts::new(
                "backstop_identity_tokens_total",
                "Tokens served by identity and kind (prompt, completion).",
            ),
            &["identity", "kind"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "backstop_auth_failures_total",
                "Credentials refused, by reason (missing, unknown_key, malformed_token, unknown_kid, bad_signature, expired, not_yet_valid, wrong_claims, unknown_identity, forbidden_scope, forbidden_model).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(identity_requests.clone()))?;
        registry.register(Box::new(identity_tokens.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        let key_in_use = IntGaugeVec::new(
            Opts::new(
                "backstop_upstream_key_in_use",
                "Whether a target's upstream key is in use (1) or out after a 401 or 403 (0); keys by index, never value.",
            ),
            &["target", "key"],
        )?;
        registry.register(Box::new(key_in_use.clone()))?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "backstop_config_reloads_total",
                "Configuration reloads by outcome: applied, unchanged, or rejected (the running configuration stays).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(config_reloads.clone()))?;
        let rate_budgets_shared = IntGauge::new(
            "backstop_rate_budgets_shared",
            "Whether upstream rate limits are shared across the replicas of a shared store (1), or each replica keeps its own because the store does not answer (0); 0 without a shared store.",
        )?;
        registry.register(Box::new(rate_budgets_shared.clone()))?;
        let breaker_open_replicas = IntGaugeVec::new(
            Opts::new(
                "backstop_breaker_open_replicas",
                "Replicas of a shared store whose breaker for the target is open now (this one included), as the fleet last told it.",
            ),
            &["target"],
        )?;
        registry.register(Box::new(breaker_open_replicas.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            duration,
            ttft,
            overhead,
            upstream_responses,
            tokens,
            in_flight,
            breaker_state,
            healthy,
            failovers,
            retries,
            continuations,
            hedges,
            hedge_wins,
            probes,
            transitions,
            ratelimit_remaining,
            shadow_requests,
            shadow_confirmations,
            shadow_ramp,
            shadow_similarity,
            connections,
            rejected,
            closed,
            request_memory,
            identity_requests,
            identity_tokens,
            auth_failures,
            key_in_use,
            config_reloads,
            rate_budgets_shared,
            breaker_open_replicas,
        })
    }

    /// Drops the gauges of targets a reload removed, so that they do not
    /// report a state frozen at their removal.
    pub(crate) fn forget_targets(&self, removed: &[String]) {
        for target in removed {
            let _ = self.shadow_ramp.remove_label_values(&[target]);
            let _ = self.breaker_open_replicas.remove_label_values(&[target]);
        }
    }

    /// Reads each upstream key's state into its gauge (at scrape time).
    pub fn observe_keys(&self, upstreams: &[std::sync::Arc<backstop_upstream::Upstream>]) {
        // Only the targets configured now (a reload may have removed some).
        self.key_in_use.reset();
        for upstream in upstreams {
            for (index, in_use) in upstream.keys_in_use().into_iter().enumerate() {
                self.key_in_use
                    .with_label_values(&[&upstream.config().name, &index.to_string()])
                    .set(i64::from(in_use));
            }
        }
    }

    /// Reads every breaker's state into its gauge (done at scrape time, so
    /// the hot path never touches the gauge).
    pub fn observe_breakers(&self, router: &Router) {
        // Only the targets configured now (a reload may have removed some).
        self.breaker_state.reset();
        self.healthy.reset();
        for (target, breaker) in router.breakers() {
            let value = match breaker.state() {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen | BreakerState::Recovering => 1,
                BreakerState::Open => 2,
            };
            self.breaker_state.with_label_values(&[target]).set(value);
            self.healthy
                .with_label_values(&[target])
                .set(i64::from(breaker.healthy()));
        }
    }

    /// The name of every metric family Backstop exports, used or not yet.
    pub fn names(&self) -> Vec<String> {
        let collectors: [&dyn prometheus::core::Collector; 32] = [
            &self.requests,
            &self.duration,
            &self.ttft,
            &self.overhead,
            &self.upstream_responses,
            &self.tokens,
            &self.in_flight,
            &self.breaker_state,
            &self.healthy,
            &self.failovers,
            &self.retries,
            &self.continuations,
            &self.hedges,
            &self.hedge_wins,
            &self.probes,
            &self.transitions,
            &self.ratelimit_remaining,
            &self.shadow_requests,
            &self.shadow_confirmations,
            &self.shadow_ramp,
            &self.shadow_similarity,
            &self.connections,
            &self.rejected,
            &self.closed,
            &self.request_memory,
            &self.identity_requests,
            &self.identity_tokens,
            &self.auth_failures,
            &self.key_in_use,
            &self.config_reloads,
            &self.rate_budgets_shared,
            &self.breaker_open_replicas,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc())
            .map(|d| d.fq_name.clone())
            .collect()
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Counts a failed backend attempt by its status, or its kind without one.
    pub fn count_backend_failure(&self, target: &str, e: &BackendError) {
        let status = e.status.map(|s| s.to_string());
        let label = status.as_deref().unwrap_or(e.kind.as_str());
        self.upstream_responses
            .with_label_values(&[target, label])
            .inc();
    }

    /// Keeps the upstream's remaining budget from its rate-limit headers.
    pub fn observe_ratelimit(&self, target: &str, headers: &backstop_adapter::Headers) {
        for kind in ["requests", "tokens"] {
            let name = format!("x-ratelimit-remaining-{kind}");
            if let Some(n) = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&name))
                .and_then(|(_, v)| v.trim().parse::<i64>().ok())
            {
                self.ratelimit_remaining
                    .with_label_values(&[target, kind])
                    .set(n);
            }
        }
    }

    /// Counts every attempt of a served request: the failed ones, then the success.
    pub fn count_attempts<T>(&self, served: &Served<T>) {
        self.observe_ratelimit(&served.backend, &served.reply.headers);
        self.count_walk(&served.failed, Some(&served.backend));
        self.upstream_responses
            .with_label_values(&[&served.backend, "200"])
            .inc();
    }

    /// Counts a walk's failed attempts, and what followed each: a retry on the
    /// same target or a failover to the next (`then` is who served, if any).
    pub fn count_walk(&self, failed: &[(String, BackendError)], then: Option<&str>) {
        for (i, (target, e)) in failed.iter().enumerate() {
            if !e.kind.skipped() {
                self.count_backend_failure(target, e);
            }
            let next = failed.get(i + 1).map(|(n, _)| n.as_str()).or(then);
            match next {
                Some(n) if n == target && !e.kind.skipped() => {
                    self.retries
                        .with_label_values(&[target, e.kind.as_str()])
                        .inc();
                }
                Some(n) if n != target => {
                    self.failovers
                        .with_label_values(&[target, n, e.kind.as_str()])
                        .inc();
                }
                _ => {}
            }
        }
    }

    /// Counts a backend's usage report, for its target and, when the
    /// caller is known, its identity.
    pub fn count_usage(
        &self,
        target: &str,
        identity: Option<&str>,
        usage: &backstop_adapter::Usage,
    ) {
        let kinds = [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ];
        for (kind, n) in kinds {
            self.tokens.with_label_values(&[target, kind]).inc_by(n);
            if let Some(identity) = identity {
                self.identity_tokens
                    .with_label_values(&[identity, kind])
                    .inc_by(n);
            }
        }
    }
}

/// `2xx`, `4xx`, `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Observer for Metrics {
    fn continued(&self, from: &str, to: &str) {
        self.continuations.with_label_values(&[from, to]).inc();
    }

    fn probe(&self, target: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.probes.with_label_values(&[target, outcome]).inc();
    }

    fn transition(&self, target: &str, state: &'static str) {
        self.transitions.with_label_values(&[target, state]).inc();
    }

    fn hedged(&self, from: &str, to: &str) {
        self.hedges.with_label_values(&[from, to]).inc();
    }

    fn hedge_won(&self, from: &str, to: &str) {
        self.hedge_wins.with_label_values(&[from, to]).inc();
    }
}

impl ShadowObserver for Metrics {
    fn shadow(&self, target: &str, outcome: &str) {
        self.shadow_requests
            .with_label_values(&[target, outcome])
            .inc();
    }

    fn confirmed(&self, target: &str) {
        self.shadow_confirmations.with_label_values(&[target]).inc();
    }

    fn ramp(&self, target: &str, fraction: f64) {
        self.shadow_ramp.with_label_values(&[target]).set(fraction);
    }

    fn similarity(&self, target: &str, similarity: Similarity) {
        for (measure, value) in [
            ("length_ratio", similarity.length_ratio),
            ("token_overlap", similarity.token_overlap),
        ] {
            self.shadow_similarity
                .with_label_values(&[target, measure])
                .observe(value);
        }
    }
}
