use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backstop_adapter::{BoxFuture, FailureKind, Headers};
use serde_json::json;

use super::*;
use crate::breaker::BreakerConfig;
use crate::retry::RetryPolicy;
use backstop_adapter::ChatChunk;
use futures_util::StreamExt;

/// A backend that fails with `fail` (when set) and counts its calls; its
/// streams send `script` (text pieces, or a failure that ends them).
struct Fake {
    name: &'static str,
    fail: Option<FailureKind>,
    calls: AtomicU32,
    script: Vec<Result<&'static str, FailureKind>>,
    continues: bool,
    prefill: std::sync::Mutex<Option<String>>,
    /// How many calls still fail (when `fail` is set).
    failures_left: AtomicU32,
    /// Headers the failures carry.
    fail_headers: Vec<(String, String)>,
    /// When each call came.
    at: std::sync::Mutex<Vec<tokio::time::Instant>>,
}

fn flaky(name: &'static str, kind: FailureKind, times: u32, headers: &[(&str, &str)]) -> Arc<Fake> {
    Arc::new(Fake {
        name,
        fail: Some(kind),
        calls: AtomicU32::new(0),
        script: Vec::new(),
        continues: false,
        prefill: std::sync::Mutex::new(None),
        failures_left: AtomicU32::new(times),
        fail_headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        at: std::sync::Mutex::new(Vec::new()),
    })
}

fn fake(name: &'static str, fail: Option<FailureKind>) -> Arc<Fake> {
    streaming(name, fail, Vec::new(), false)
}

fn streaming(
    name: &'static str,
    fail: Option<FailureKind>,
    script: Vec<Result<&'static str, FailureKind>>,
    continues: bool,
) -> Arc<Fake> {
    Arc::new(Fake {
        name,
        fail,
        calls: AtomicU32::new(0),
        script,
        continues,
        prefill: std::sync::Mutex::new(None),
        failures_left: AtomicU32::new(u32::MAX),
        fail_headers: Vec::new(),
        at: std::sync::Mutex::new(Vec::new()),
    })
}

impl Fake {
    /// The scripted failure for this call, if it is to fail.
    fn failure(&self) -> Option<BackendError> {
        self.at.lock().unwrap().push(tokio::time::Instant::now());
        let kind = self.fail?;
        let left = self.failures_left.load(Ordering::SeqCst);
        if left == 0 {
            return None;
        }
        self.failures_left
            .store(left.saturating_sub(1), Ordering::SeqCst);
        let mut e = BackendError::new(kind, "scripted");
        e.headers = self.fail_headers.clone();
        Some(e)
    }
}

fn chunk(id: &str, text: Option<&str>, finish: Option<&str>) -> ChatChunk {
    serde_json::from_value(json!({
        "id": id, "created": 0, "model": id,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}))
    .unwrap()
}

impl Backend for Fake {
    fn name(&self) -> &str {
        self.name
    }

    fn complete<'a>(
        &'a self,
        _req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = match self.failure() {
            Some(e) => Err(e),
            None => Ok(Reply {
                body: serde_json::from_value(json!({
                    "id": "x", "created": 0, "model": self.name,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}]}))
                .unwrap(),
                headers: Headers::new(),
                waited: Duration::ZERO,
            }),
        };
        Box::pin(async move { result })
    }

    fn stream<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.prefill.lock().unwrap() = req.prefill.clone();
        let id = self.name;
        let mut items: Vec<Result<ChatChunk, BackendError>> = self
            .script
            .iter()
            .map(|step| match step {
                Ok(text) => Ok(chunk(id, Some(text), None)),
                Err(kind) => Err(BackendError::new(*kind, "scripted")),
            })
            .collect();
        if !matches!(items.last(), Some(Err(_))) {
            items.push(Ok(chunk(id, None, Some("stop"))));
        }
        let result = match self.failure() {
            Some(e) => Err(e),
            None => Ok(Reply {
                body: Box::pin(futures_util::stream::iter(items)) as ChunkStream,
                headers: Headers::new(),
                waited: Duration::ZERO,
            }),
        };
        Box::pin(async move { result })
    }

    fn continues(&self) -> bool {
        self.continues
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        let model = Model {
            id: self.name.to_string(),
            object: "model".into(),
            created: 0,
            owned_by: "test".into(),
        };
        Box::pin(async move { Ok(vec![model]) })
    }
}

impl Router {
    fn new_default(table: RouteTable) -> Self {
        Router::new(table, |_| BreakerConfig::default())
    }
}

fn no_retries() -> RetryPolicy {
    RetryPolicy {
        max_retries: 0,
        ..RetryPolicy::default()
    }
}

fn req(model: &str) -> Request {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    Request::parse_chat(body.to_string().as_bytes()).unwrap()
}

fn route(models: ModelMatch, targets: &[Arc<Fake>]) -> Route {
    Route::new(
        models,
        targets.iter().map(|t| t.clone() as Arc<dyn Backend>),
    )
}

#[tokio::test]
async fn exact_beats_longest_prefix_beats_catch_all() {
    let (a, b, c, d) = (
        fake("a", None),
        fake("b", None),
        fake("c", None),
        fake("d", None),
    );
    let router = Router::new_default(RouteTable::new(vec![
        route(ModelMatch::Any, &[a]),
        route(ModelMatch::Prefix("gpt-".into()), &[b]),
        route(ModelMatch::Prefix("gpt-4o".into()), &[c]),
        route(ModelMatch::Exact("gpt-4o-mini".into()), &[d]),
    ]));
    for (model, served) in [
        ("gpt-4o-mini", "d"),
        ("gpt-4o", "c"),
        ("gpt-3.5", "b"),
        ("x", "a"),
    ] {
        assert_eq!(router.complete(&req(model)).await.unwrap().backend, served);
    }
    assert_eq!(router.models().await.len(), 4);
}

#[tokio::test]
async fn retryable_failures_move_down_the_chain() {
    let (a, b, c) = (
        fake("a", Some(FailureKind::ServerError)),
        fake("b", Some(FailureKind::FirstByteTimeout)),
        fake("c", None),
    );
    let router = Router::new(
        RouteTable::new(vec![
            route(ModelMatch::Any, &[a, b, c.clone()]).with_retry(&no_retries())
        ]),
        |_| BreakerConfig::default(),
    );
    let served = router.complete(&req("m")).await.unwrap();
    assert_eq!((served.backend.as_str(), served.attempts()), ("c", 3));
    assert_eq!(c.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client_errors_stop_the_walk_and_failures_are_kept_in_order() {
    let (a, b, c) = (
        fake("a", Some(FailureKind::Connect)),
        fake("b", Some(FailureKind::ClientError)),
        fake("c", None),
    );
    let router = Router::new(
        RouteTable::new(vec![
            route(ModelMatch::Any, &[a, b, c.clone()]).with_retry(&no_retries())
        ]),
        |_| BreakerConfig::default(),
    );
    let err = router.complete(&req("m")).await.unwrap_err();
    assert_eq!(err.attempts(), 2);
    assert_eq!(err.last_target(), Some("b"));
    assert_eq!(err.last().unwrap().kind, FailureKind::ClientError);
    assert_eq!(c.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_target_with_an_open_breaker_is_skipped_without_an_attempt() {
    let (a, b) = (fake("a", Some(FailureKind::ServerError)), fake("b", None));
    let router = Router::new(
        RouteTable::new(vec![
            route(ModelMatch::Any, &[a.clone(), b]).with_retry(&no_retries())
        ]),
        |_| BreakerConfig {
            consecutive_failures: 2,
            ..BreakerConfig::default()
        },
    );
    for _ in 0..2 {
        assert_eq!(router.complete(&req("m")).await.unwrap().attempts(), 2);
    }
    assert_eq!(
        router.breakers()["a"].state(),
        crate::breaker::BreakerState::Open
    );
    let served = router.complete(&req("m")).await.unwrap();
    assert_eq!((served.backend.as_str(), served.attempts()), ("b", 1));
    assert_eq!(a.calls.load(Ordering::SeqCst), 2, "not called while open");
    assert_eq!(served.failed[0].1.kind, FailureKind::Unavailable);
}

async fn stream_text(router: &Router) -> (String, Vec<String>, Option<FailureKind>) {
    stream_text_of(router, &req("m")).await
}

async fn stream_text_of(
    router: &Router,
    request: &Request,
) -> (String, Vec<String>, Option<FailureKind>) {
    let mut body = router.stream(request).await.unwrap().reply.body;
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(item) = body.next().await {
        match item {
            Ok(c) => {
                ids.push(c.id.clone());
                text.extend(c.choices.iter().filter_map(|c| c.delta.content.clone()));
            }
            Err(e) => return (text, ids, Some(e.kind)),
        }
    }
    (text, ids, None)
}

#[tokio::test]
async fn a_stream_broken_mid_answer_is_continued_by_a_target_that_takes_a_prefill() {
    let first = streaming(
        "up",
        None,
        vec![Ok("The answer"), Ok(" is"), Err(FailureKind::StreamBroken)],
        false,
    );
    let local = streaming("local", None, vec![Ok(" 4.")], true);
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[first, local.clone()],
    )]));
    let (text, ids, err) = stream_text(&router).await;
    assert_eq!(err, None);
    assert_eq!(text, "The answer is 4.");
    assert!(
        ids.iter().all(|id| id == "up"),
        "one completion id: {ids:?}"
    );
    assert_eq!(
        local.prefill.lock().unwrap().as_deref(),
        Some("The answer is")
    );
}

#[tokio::test]
async fn a_stream_that_began_from_a_prefill_is_continued_from_all_of_it() {
    // A generation taken over goes on from "Once upon"; its stream breaks
    // again, and the next target gets the whole answer, not what this
    // stream added.
    let first = streaming(
        "up",
        None,
        vec![Ok(" a time"), Err(FailureKind::StreamBroken)],
        true,
    );
    let local = streaming("local", None, vec![Ok(", there was.")], true);
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[first, local.clone()],
    )]));
    let mut request = req("m");
    request.prefill = Some("Once upon".into());
    let (text, _, err) = stream_text_of(&router, &request).await;
    assert_eq!(err, None);
    assert_eq!(text, " a time, there was.");
    assert_eq!(
        local.prefill.lock().unwrap().as_deref(),
        Some("Once upon a time")
    );
}

#[tokio::test]
async fn a_target_without_prefill_continues_and_its_repeat_is_cut_at_the_seam() {
    let first = streaming(
        "up",
        None,
        vec![
            Ok("The quick brown fox"),
            Ok(" jumps over"),
            Err(FailureKind::StreamBroken),
        ],
        false,
    );
    // It repeats the last words, in pieces, before going on.
    let plain = streaming(
        "plain",
        None,
        vec![Ok("fox jum"), Ok("ps over"), Ok(" the lazy dog.")],
        false,
    );
    let local = streaming("local", None, vec![Ok("never")], true);
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[first, plain.clone(), local.clone()],
    )]));
    let (text, _, err) = stream_text(&router).await;
    assert_eq!(err, None);
    assert_eq!(text, "The quick brown fox jumps over the lazy dog.");
    assert_eq!(plain.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        local.calls.load(Ordering::SeqCst),
        0,
        "the first healthy target finished it"
    );
}

#[tokio::test]
async fn a_continuation_that_ends_at_once_mid_sentence_goes_to_the_next_target() {
    let first = streaming(
        "up",
        None,
        vec![Ok("The answer is"), Err(FailureKind::StreamBroken)],
        false,
    );
    let quits = streaming("quits", None, vec![], false);
    let local = streaming("local", None, vec![Ok(" 4.")], true);
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[first.clone(), quits.clone(), local],
    )]));
    assert_eq!(
        stream_text(&router).await,
        ("The answer is 4.".into(), vec!["up".into(); 3], None)
    );
    assert_eq!(quits.calls.load(Ordering::SeqCst), 1);
    // Without anyone after it, the stream ends in an error, never `stop`.
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[first, quits],
    )]));
    let (text, _, err) = stream_text(&router).await;
    assert_eq!(
        (text.as_str(), err),
        ("The answer is", Some(FailureKind::StreamBroken))
    );
}

#[tokio::test]
async fn a_break_mid_answer_counts_against_the_breaker_of_the_target_that_broke() {
    let first = streaming(
        "up",
        None,
        vec![Ok("a"), Err(FailureKind::StreamBroken)],
        false,
    );
    let local = streaming("local", None, vec![Ok("b")], true);
    let router = Router::new(
        RouteTable::new(vec![
            route(ModelMatch::Any, &[first, local]).with_retry(&no_retries())
        ]),
        |_| BreakerConfig {
            consecutive_failures: 1,
            ..BreakerConfig::default()
        },
    );
    assert_eq!(stream_text(&router).await.0, "ab");
    assert_eq!(
        router.breakers()["up"].state(),
        crate::breaker::BreakerState::Open
    );
    assert_eq!(
        router.breakers()["local"].state(),
        crate::breaker::BreakerState::Closed
    );
}

/// An upstream whose every stream breaks after one piece, with the local
/// model next, under the default breaker.
fn always_breaking() -> (Router, Arc<Fake>) {
    let up = streaming(
        "up",
        None,
        vec![Ok("a"), Err(FailureKind::StreamBroken)],
        false,
    );
    let local = streaming("local", None, vec![Ok("b")], true);
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[up.clone(), local],
    )]));
    (router, up)
}

#[tokio::test(start_paused = true)]
async fn an_always_breaking_upstream_opens_its_breaker_after_the_configured_count() {
    let (router, up) = always_breaking();
    let threshold = BreakerConfig::default().consecutive_failures;
    for _ in 0..threshold {
        assert_eq!(
            stream_text(&router).await,
            ("ab".into(), vec!["up".into(); 3], None)
        );
    }
    assert_eq!(
        router.breakers()["up"].state(),
        crate::breaker::BreakerState::Open
    );
    // The next clients are served without the broken upstream.
    for _ in 0..3 {
        assert_eq!(stream_text(&router).await.0, "b");
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), threshold);
}

#[tokio::test(start_paused = true)]
async fn concurrent_breaking_streams_open_the_breaker_too() {
    let (router, up) = always_breaking();
    let threshold = BreakerConfig::default().consecutive_failures;
    // Every stream commits before any breaks: all count once, at the break.
    let mut bodies = Vec::new();
    for _ in 0..threshold {
        bodies.push(router.stream(&req("m")).await.unwrap().reply.body);
    }
    assert_eq!(
        router.breakers()["up"].state(),
        crate::breaker::BreakerState::Closed
    );
    for mut body in bodies {
        while body.next().await.is_some() {}
    }
    assert_eq!(
        router.breakers()["up"].state(),
        crate::breaker::BreakerState::Open
    );
    assert_eq!(stream_text(&router).await.0, "b");
    assert_eq!(up.calls.load(Ordering::SeqCst), threshold);
}

#[tokio::test(start_paused = true)]
async fn a_stream_the_client_leaves_frees_a_half_open_probe() {
    let up = streaming("up", None, vec![Ok("a"), Ok("b")], false);
    let router = Router::new(RouteTable::new(vec![route(ModelMatch::Any, &[up])]), |_| {
        BreakerConfig {
            consecutive_failures: 1,
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    });
    let b = router.breakers()["up"].clone();
    assert!(b.admit());
    b.record(crate::breaker::Outcome::Failure(FailureKind::ServerError));
    tokio::time::advance(BreakerConfig::default().open_for).await;
    // The probe commits, then its client leaves before the end.
    let body = router.stream(&req("m")).await.unwrap().reply.body;
    assert_eq!(b.state(), crate::breaker::BreakerState::HalfOpen);
    drop(body);
    assert!(b.admit(), "a new probe may go");
}

/// Collects every published transition, and hedges.
#[derive(Default)]
struct Transitions(std::sync::Mutex<Vec<(String, &'static str)>>);

impl observer::Observer for Transitions {
    fn continued(&self, _from: &str, _to: &str) {}
    fn probe(&self, _target: &str, _ok: bool) {}
    fn transition(&self, target: &str, state: &'static str) {
        self.0.lock().unwrap().push((target.to_string(), state));
    }
    fn hedged(&self, from: &str, _to: &str) {
        self.0.lock().unwrap().push((from.to_string(), "hedged"));
    }
    fn hedge_won(&self, _from: &str, to: &str) {
        self.0.lock().unwrap().push((to.to_string(), "hedge_won"));
    }
}

#[tokio::test(start_paused = true)]
async fn every_change_of_state_is_published_whoever_made_it() {
    let (router, _) = always_breaking();
    let seen = Arc::new(Transitions::default());
    let router = router.with_observer(seen.clone());
    let threshold = BreakerConfig::default().consecutive_failures;
    for _ in 0..threshold {
        stream_text(&router).await; // opened by continuations
    }
    let b = router.breakers()["up"].clone();
    b.force(crate::breaker::Forced::Closed); // an operator
    b.force(crate::breaker::Forced::No);
    b.recover(0.5); // a verifier
    b.recover(1.0);
    let seen: Vec<_> = seen.0.lock().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(seen, ["open", "closed", "recovering", "closed"]);
}

#[tokio::test]
async fn without_a_successor_a_broken_stream_ends_in_its_error() {
    let first = streaming(
        "up",
        None,
        vec![Ok("The"), Err(FailureKind::StreamStalled)],
        false,
    );
    let router = Router::new_default(RouteTable::new(vec![route(ModelMatch::Any, &[first])]));
    let (text, _, err) = stream_text(&router).await;
    assert_eq!(
        (text.as_str(), err),
        ("The", Some(FailureKind::StreamStalled))
    );
}

#[tokio::test(start_paused = true)]
async fn a_server_error_is_retried_on_the_same_target_after_a_jittered_backoff() {
    let (a, b) = (
        flaky("a", FailureKind::ServerError, 1, &[]),
        fake("b", None),
    );
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        &[a.clone(), b.clone()],
    )]));
    let served = router.complete(&req("m")).await.unwrap();
    assert_eq!((served.backend.as_str(), served.attempts()), ("a", 2));
    let at = a.at.lock().unwrap().clone();
    assert!(
        at[1] - at[0] <= Duration::from_millis(100),
        "{:?}",
        at[1] - at[0]
    );
    assert_eq!(b.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_429_waits_exactly_as_long_as_the_upstream_asked() {
    let a = flaky(
        "a",
        FailureKind::RateLimited,
        1,
        &[("retry-after-ms", "1500")],
    );
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Any,
        std::slice::from_ref(&a),
    )]));
    router.complete(&req("m")).await.unwrap();
    let at = a.at.lock().unwrap().clone();
    assert_eq!(at[1] - at[0], Duration::from_millis(1500));
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_or_should_retry_false_moves_on_at_once() {
    for headers in [[("retry-after", "120")], [("x-should-retry", "false")]] {
        let (a, b) = (
            flaky("a", FailureKind::ServerError, 1, &headers),
            fake("b", None),
        );
        let router = Router::new_default(RouteTable::new(vec![route(
            ModelMatch::Any,
            &[a.clone(), b],
        )]));
        let started = tokio::time::Instant::now();
        let served = router.complete(&req("m")).await.unwrap();
        assert_eq!(served.backend, "b");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn the_request_deadline_bounds_every_attempt() {
    struct Slow;
    impl Backend for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn complete<'a>(
            &'a self,
            _: &'a Request,
        ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(BackendError::new(FailureKind::Connect, "late"))
            })
        }
        fn stream<'a>(
            &'a self,
            _: &'a Request,
        ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
            Box::pin(async { Err(BackendError::new(FailureKind::Connect, "no")) })
        }
        fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }
    let router = Router::new(
        RouteTable::new(vec![Route::new(
            ModelMatch::Any,
            [Arc::new(Slow) as Arc<dyn Backend>],
        )
        .with_deadline(Duration::from_secs(30))]),
        |_| BreakerConfig::default(),
    );
    let started = tokio::time::Instant::now();
    let err = router.complete(&req("m")).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(err.last().unwrap().kind, FailureKind::FirstByteTimeout);
    assert_eq!(err.last().unwrap().http_status(), 504);
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_a_first_token_in_time_is_abandoned_for_the_next_target() {
    let silent = Arc::new(Silent);
    let b = streaming("b", None, vec![Ok("hi")], false);
    let router = Router::new(
        RouteTable::new(vec![Route::new(
            ModelMatch::Any,
            [silent as Arc<dyn Backend>, b as Arc<dyn Backend>],
        )
        .with_retry(&RetryPolicy {
            first_token_timeout: Duration::from_secs(2),
            ..RetryPolicy::default()
        })]),
        |_| BreakerConfig::default(),
    );
    let started = tokio::time::Instant::now();
    let served = router.stream(&req("m")).await.unwrap();
    assert_eq!(served.backend, "b");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "abandoned, not retried"
    );
    assert_eq!(served.failed[0].1.kind, FailureKind::FirstByteTimeout);
}

/// Answers streams at once with headers, then never sends a chunk.
struct Silent;

impl Backend for Silent {
    fn name(&self) -> &str {
        "silent"
    }
    fn complete<'a>(
        &'a self,
        _: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
        Box::pin(async { Err(BackendError::new(FailureKind::Connect, "no")) })
    }
    fn stream<'a>(
        &'a self,
        _: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
        Box::pin(async {
            Ok(Reply {
                body: Box::pin(futures_util::stream::pending()) as ChunkStream,
                headers: Headers::new(),
                waited: Duration::ZERO,
            })
        })
    }
    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

#[tokio::test]
async fn an_unrouted_model_is_named() {
    let router = Router::new_default(RouteTable::new(vec![route(
        ModelMatch::Exact("only".into()),
        &[fake("a", None)],
    )]));
    let err = router.complete(&req("other")).await.unwrap_err();
    assert!(matches!(err, RouteError::NoRoute(m) if m == "other"));
}

#[tokio::test(start_paused = true)]
async fn a_stall_is_handed_on_while_the_next_target_has_time_to_finish() {
    let local = streaming("local", None, vec![Ok(" answer.")], true);
    let stalls: Arc<dyn Backend> = Arc::new(Delayed {
        stall: true,
        ..Arc::into_inner(delayed("stalls", 0, "Half an", false)).unwrap()
    });
    let router = Router::new_default(RouteTable::new(vec![Route::new(
        ModelMatch::Any,
        [stalls, local.clone() as Arc<dyn Backend>],
    )]));
    let mut request = req("m");
    let start = tokio::time::Instant::now();
    request.deadline = Some((start + Duration::from_secs(20)).into_std());
    let mut body = router.stream(&request).await.unwrap().reply.body;
    let mut text = String::new();
    while let Some(item) = body.next().await {
        text.extend(
            item.unwrap()
                .choices
                .iter()
                .filter_map(|c| c.delta.content.clone()),
        );
    }
    assert_eq!(text, "Half an answer.");
    // Half the time left went to the stalled stream, the rest to the next.
    let handed_on = start.elapsed();
    assert!(handed_on <= Duration::from_secs(10), "{handed_on:?}");
    assert_eq!(local.prefill.lock().unwrap().as_deref(), Some("Half an"));
}

/// Answers `text` after `delay`, then finishes (or, with `stall`, sends
/// nothing more, ever); a hedge target for free when `free`. Counts the
/// calls it was dropped from before answering (cancelled).
struct Delayed {
    name: &'static str,
    delay: Duration,
    text: &'static str,
    stall: bool,
    free: bool,
    calls: AtomicU32,
    cancelled: Arc<AtomicU32>,
}

fn delayed(name: &'static str, delay_s: u64, text: &'static str, free: bool) -> Arc<Delayed> {
    Arc::new(Delayed {
        name,
        delay: Duration::from_secs(delay_s),
        text,
        stall: false,
        free,
        calls: AtomicU32::new(0),
        cancelled: Arc::default(),
    })
}

/// Counts a cancellation when dropped unfinished.
struct Unfinished(Arc<AtomicU32>, bool);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Backend for Delayed {
    fn name(&self) -> &str {
        self.name
    }

    fn complete<'a>(
        &'a self,
        _req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
        Box::pin(async { Err(BackendError::new(FailureKind::ServerError, "streams only")) })
    }

    fn stream<'a>(
        &'a self,
        _req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let mut guard = Unfinished(self.cancelled.clone(), false);
            tokio::time::sleep(self.delay).await;
            guard.1 = true;
            let text = futures_util::stream::iter([Ok(chunk(self.name, Some(self.text), None))]);
            let end = Ok(chunk(self.name, None, Some("stop")));
            let body: ChunkStream = if self.stall {
                Box::pin(text.chain(futures_util::stream::pending()))
            } else {
                Box::pin(text.chain(futures_util::stream::iter([end])))
            };
            Ok(Reply {
                body,
                headers: Headers::new(),
                waited: Duration::ZERO,
            })
        })
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn hedges_free(&self) -> bool {
        self.free
    }
}

fn chain(targets: &[Arc<Delayed>]) -> (Router, Arc<Transitions>) {
    let seen = Arc::new(Transitions::default());
    let router = Router::new_default(RouteTable::new(vec![Route::new(
        ModelMatch::Any,
        targets.iter().map(|t| t.clone() as Arc<dyn Backend>),
    )]))
    .with_observer(seen.clone());
    (router, seen)
}

async fn served_text(router: &Router) -> (String, String) {
    let served = router.stream(&req("m")).await.unwrap();
    let mut body = served.reply.body;
    let mut text = String::new();
    while let Some(item) = body.next().await {
        text.extend(
            item.unwrap()
                .choices
                .iter()
                .filter_map(|c| c.delta.content.clone()),
        );
    }
    (served.backend, text)
}

#[tokio::test(start_paused = true)]
async fn a_late_first_token_is_hedged_to_the_local_model_and_the_loser_cancelled() {
    let up = delayed("up", 30, "upstream", false);
    let local = delayed("local", 0, "local", true);
    let (router, seen) = chain(&[up.clone(), local.clone()]);
    let start = tokio::time::Instant::now();
    assert_eq!(served_text(&router).await, ("local".into(), "local".into()));
    // Nothing known of `up` yet: the hedge waited the upper bound.
    assert_eq!(start.elapsed(), RetryPolicy::default().hedge_max);
    assert_eq!(
        up.cancelled.load(Ordering::SeqCst),
        1,
        "the slow call was dropped"
    );
    let seen = seen.0.lock().unwrap().clone();
    assert!(
        seen.contains(&("up".into(), "hedged")) && seen.contains(&("local".into(), "hedge_won"))
    );
}

#[tokio::test(start_paused = true)]
async fn the_hedge_delay_follows_the_targets_recent_first_tokens() {
    let fast = delayed("up", 0, "upstream", false);
    let local = delayed("local", 0, "local", true);
    let (router, _) = chain(&[fast.clone(), local.clone()]);
    for _ in 0..5 {
        assert_eq!(
            served_text(&router).await.0,
            "up",
            "no hedge when the answer comes first"
        );
    }
    assert_eq!(local.calls.load(Ordering::SeqCst), 0);
    // The same target, now slow: hedged after the floor, not the ceiling.
    let slow = delayed("up", 30, "upstream", false);
    let mut router = router;
    let table = RouteTable::new(vec![Route::new(
        ModelMatch::Any,
        [slow as Arc<dyn Backend>, local.clone() as Arc<dyn Backend>],
    )]);
    router.table = table;
    let start = tokio::time::Instant::now();
    assert_eq!(served_text(&router).await.0, "local");
    assert_eq!(start.elapsed(), RetryPolicy::default().hedge_min);
}

#[tokio::test(start_paused = true)]
async fn another_upstream_is_hedged_to_only_where_allowed() {
    let up = delayed("up", 12, "upstream", false);
    let other = delayed("other", 0, "other", false);
    let (router, _) = chain(&[up.clone(), other.clone()]);
    assert_eq!(
        served_text(&router).await.0,
        "up",
        "it costs quota: not hedged"
    );
    assert_eq!(other.calls.load(Ordering::SeqCst), 0);
    let routes = vec![Route::new(
        ModelMatch::Any,
        [up as Arc<dyn Backend>, other.clone() as Arc<dyn Backend>],
    )
    .with_retry(&RetryPolicy {
        hedge: true,
        ..RetryPolicy::default()
    })];
    let router = Router::new_default(RouteTable::new(routes));
    assert_eq!(served_text(&router).await.0, "other");
}

#[tokio::test(start_paused = true)]
async fn a_call_pending_past_the_slow_call_threshold_counts_against_its_breaker() {
    let up = delayed("up", 25, "upstream", false);
    let router = Router::new(
        RouteTable::new(vec![Route::new(
            ModelMatch::Any,
            [up.clone() as Arc<dyn Backend>],
        )]),
        |_| BreakerConfig {
            consecutive_failures: 1,
            ..BreakerConfig::default()
        },
    );
    // It answers at last, and its client is served; but it was slow.
    assert_eq!(served_text(&router).await, ("up".into(), "upstream".into()));
    assert_eq!(router.breakers()["up"].trips(), 1);
}

/// A backend whose stream never ends: a chunk every 10 ms.
struct Endless;

impl Backend for Endless {
    fn name(&self) -> &str {
        "endless"
    }

    fn complete<'a>(
        &'a self,
        _req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChatCompletion>, BackendError>> {
        Box::pin(async { Err(BackendError::new(FailureKind::ServerError, "streams only")) })
    }

    fn stream<'a>(
        &'a self,
        _req: &'a Request,
    ) -> BoxFuture<'a, Result<Reply<ChunkStream>, BackendError>> {
        let body = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok(chunk("endless", Some("la "), None)), ()))
        });
        Box::pin(async move {
            Ok(Reply {
                body: Box::pin(body) as ChunkStream,
                headers: Headers::new(),
                waited: Duration::ZERO,
            })
        })
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_never_ends_is_cut_at_the_deadline_with_an_error() {
    let route = Route::new(ModelMatch::Any, [Arc::new(Endless) as Arc<dyn Backend>])
        .with_deadline(Duration::from_secs(5));
    let router = Router::new_default(RouteTable::new(vec![route]));
    let started = tokio::time::Instant::now();
    let (text, _, failed) = stream_text(&router).await;
    assert_eq!(failed, Some(FailureKind::DeadlinePassed));
    assert!(text.len() > 100, "{}", text.len());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // The cut is the deadline's doing, not the target's failure.
    let breaker = &router.breakers()["endless"];
    assert!(breaker.recent_failures().is_empty());
}
