//! Every way the upstream really fails, injected by the mock one at a time.
//! `up0` misbehaves; `up1` is healthy and can continue a stream. Each test
//! checks what the client received, and how many attempts reached `up0` and
//! how far apart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream, SseStep};
use backstop_tests::{sse_data, streamed_text, Harness};
use bytes::Bytes;
use serde_json::{json, Value};

/// Backstop in front of a faulty `up0` and a healthy `up1`. `up0` has short
/// deadlines (500 ms to first byte, first token and between stream reads),
/// and one retry after a 100 ms backoff; `up0_extra` adds to its table. The
/// shadow verifier is off: these tests watch the breaker's own recovery.
async fn faulty(up0_extra: &str) -> Harness {
    let (up0, up1) = (
        MockUpstream::start().await.unwrap(),
        MockUpstream::start().await.unwrap(),
    );
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [retry]\nmax_retries = 1\nbackoff_base_ms = 100\nbackoff_max_ms = 100\n\
         [health]\nprobe = \"off\"\n[shadow]\nenabled = false\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n\
         first_byte_timeout_ms = 500\nidle_timeout_ms = 500\n\
         retry = {{ first_token_timeout_ms = 500 }}\n{up0_extra}\n\
         [[targets]]\nname = \"up1\"\nbase_url = \"{}\"\nprefill = true\n",
        up0.url(),
        up1.url()
    );
    Harness::with_config(vec![up0, up1], &toml).await
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// What the client got: status, who served, attempts, the answer's text, and
/// for streams every payload.
struct Answer {
    status: u16,
    backend: String,
    attempts: String,
    text: String,
    payloads: Vec<String>,
    body: Value,
}

async fn ask(h: &Harness, stream: bool) -> Answer {
    let resp = h.post("/v1/chat/completions", &chat(stream)).await;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (backend, attempts) = (header("x-backstop-backend"), header("x-backstop-attempts"));
    let raw = resp.text().await.unwrap();
    let (text, payloads, body) = if stream && status == 200 {
        let payloads = sse_data(&raw);
        (streamed_text(&payloads), payloads, Value::Null)
    } else {
        let body: Value = serde_json::from_str(&raw).unwrap();
        let text = body
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        (text, Vec::new(), body)
    };
    Answer {
        status,
        backend,
        attempts,
        text,
        payloads,
        body,
    }
}

/// A complete answer from `backend`: a 200 with the echo's text and, for a
/// stream, a finish reason and `[DONE]` with no error event.
fn assert_complete(a: &Answer, backend: &str) {
    assert_eq!((a.status, a.backend.as_str()), (200, backend), "{}", a.body);
    assert!(a.text.ends_with("You said: hello there"), "{}", a.text);
    if !a.payloads.is_empty() {
        assert_eq!(a.payloads.last().map(String::as_str), Some("[DONE]"));
        assert!(a.payloads.iter().all(|p| !p.contains("\"error\"")));
        assert!(a
            .payloads
            .iter()
            .any(|p| p.contains("\"finish_reason\":\"stop\"")));
    }
}

/// How far apart the requests that reached a mock were.
fn gaps(mock: &MockUpstream) -> Vec<Duration> {
    let at: Vec<_> = mock.requests().iter().map(|r| r.at).collect();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_that_wait() {
    let h = faulty("").await;
    h.mocks[0].push([MockReply::Json {
        status: 429,
        body: json!({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}),
        headers: vec![("retry-after-ms".into(), "300".into())],
    }]);
    let a = ask(&h, false).await;
    assert_complete(&a, "up0");
    assert_eq!(a.attempts, "2");
    let gap = gaps(&h.mocks[0])[0];
    assert!(gap >= Duration::from_millis(300), "{gap:?}");
}

#[tokio::test]
async fn a_429_without_retry_after_moves_on_and_holds_the_target_back() {
    let h = faulty("").await;
    h.mocks[0].set_default(MockReply::error(429, "requests", "Rate limit reached"));
    for _ in 0..3 {
        assert_complete(&ask(&h, false).await, "up1");
    }
    // The first 429 was not retried, and held `up0` back from the next requests.
    assert_eq!(h.mocks[0].requests().len(), 1);
    assert_eq!(h.mocks[1].requests().len(), 3);
}

#[tokio::test]
async fn a_500_once_is_retried_on_the_same_target_after_a_jittered_backoff() {
    let h = faulty("").await;
    h.mocks[0].push([MockReply::error(500, "server_error", "oops")]);
    let a = ask(&h, false).await;
    assert_complete(&a, "up0");
    assert_eq!(a.attempts, "2");
    assert_eq!(h.mocks[1].requests().len(), 0);
    // Full jitter: anywhere up to the 100 ms base, plus scheduling.
    assert!(gaps(&h.mocks[0])[0] < Duration::from_millis(600));
}

#[tokio::test]
async fn a_persistent_503_opens_the_breaker_and_the_target_is_left_alone() {
    let h = faulty("breaker = { consecutive_failures = 3, open_ms = 60000 }").await;
    h.mocks[0].set_default(MockReply::error(503, "server_error", "unavailable"));
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let a = ask(&h, true).await;
        assert_complete(&a, "up1");
        attempts.push(a.attempts);
    }
    // Two attempts (one retry), then one more failure opens the breaker.
    assert_eq!(attempts[..2], ["3", "2"]);
    assert!(attempts[2..].iter().all(|a| a == "1"), "{attempts:?}");
    assert_eq!(h.mocks[0].requests().len(), 3);
}

#[tokio::test]
async fn a_connection_reset_before_headers_moves_on() {
    let h = faulty("").await;
    h.mocks[0].set_default(MockReply::Reset);
    for stream in [false, true] {
        assert_complete(&ask(&h, stream).await, "up1");
    }
    // Each request tried `up0` twice (a reset is worth one retry).
    assert_eq!(h.mocks[0].requests().len(), 4);
}

#[tokio::test]
async fn no_response_at_all_is_abandoned_at_the_first_byte_deadline() {
    let h = faulty("").await;
    h.mocks[0].set_default(MockReply::Hang);
    for stream in [false, true] {
        let a = ask(&h, stream).await;
        assert_complete(&a, "up1");
        assert_eq!(a.attempts, "2");
    }
    // Abandoned, not retried: a silent upstream would only waste another deadline.
    assert_eq!(h.mocks[0].requests().len(), 2);
}

#[tokio::test]
async fn a_slow_first_token_is_abandoned_for_the_next_target() {
    let h = faulty("").await;
    h.mocks[0].push([MockReply::sse(vec![
        SseStep::Sleep(Duration::from_secs(3)),
        SseStep::text("late"),
    ])]);
    let a = ask(&h, true).await;
    assert_complete(&a, "up1");
    assert!(!a.text.contains("late"));
    assert_eq!(h.mocks[0].requests().len(), 1);
}

/// A stream that broke after "Hello" is finished by `up1`, which is handed
/// the partial answer as a prefill: the client sees one answer, one id.
async fn assert_continued(steps: Vec<SseStep>) {
    let h = faulty("").await;
    h.mocks[0].push([MockReply::sse(steps)]);
    let a = ask(&h, true).await;
    assert_eq!((a.status, a.backend.as_str()), (200, "up0"));
    assert_eq!(a.payloads.last().map(String::as_str), Some("[DONE]"));
    assert!(
        a.payloads.iter().all(|p| !p.contains("\"error\"")),
        "{:?}",
        a.payloads
    );
    assert_eq!(a.text, "Hello, You said: Hello, ");
    let ids: std::collections::HashSet<String> = a.payloads[..a.payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap()["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let prefill = &h.mocks[1].requests()[0].body["messages"];
    assert_eq!(
        prefill[1],
        json!({"role": "assistant", "content": "Hello, "})
    );
    assert_eq!(
        h.mocks[0].requests().len(),
        1,
        "a started stream is not retried"
    );
}

#[tokio::test]
async fn a_stream_cut_mid_answer_is_continued() {
    assert_continued(vec![SseStep::text("Hello, "), SseStep::Cut]).await;
}

/// Streams a chat request over HTTP/1.1 with `TE: trailers`; returns the
/// headers, the body and the trailer fields.
async fn stream_with_trailers(h: &Harness) -> (http::HeaderMap, String, http::HeaderMap) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "backstop")
        .header("content-type", "application/json")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from(
            chat(true).to_string(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    (headers, body, trailers)
}

#[tokio::test]
async fn trailers_name_the_target_that_finished_a_continued_stream() {
    let h = faulty("").await;
    h.mocks[0].push([MockReply::sse(vec![SseStep::text("Hello, "), SseStep::Cut])]);
    let (headers, body, trailers) = stream_with_trailers(&h).await;
    assert_eq!(headers["x-backstop-backend"], "up0");
    assert_eq!(headers["x-backstop-attempts"], "1");
    assert_eq!(streamed_text(&sse_data(&body)), "Hello, You said: Hello, ");
    assert_eq!(trailers["x-backstop-backend"], "up1", "{trailers:?}");
    assert_eq!(trailers["x-backstop-attempts"], "2");
    // An uncontinued stream's trailers repeat its headers; a client that did
    // not ask for trailers gets none.
    let (_, _, trailers) = stream_with_trailers(&h).await;
    assert_eq!(trailers["x-backstop-backend"], "up0");
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    assert!(resp.headers().get("trailer").is_none());
}

#[tokio::test]
async fn a_stalled_stream_is_continued() {
    assert_continued(vec![
        SseStep::text("Hello, "),
        SseStep::Sleep(Duration::from_secs(5)),
        SseStep::text("never"),
    ])
    .await;
}

#[tokio::test]
async fn a_malformed_chunk_is_continued() {
    assert_continued(vec![
        SseStep::text("Hello, "),
        SseStep::Data("{\"id\": tru".into()),
    ])
    .await;
}

#[tokio::test]
async fn an_error_event_mid_stream_is_continued() {
    assert_continued(vec![
        SseStep::text("Hello, "),
        SseStep::Data(
            json!({"error": {"message": "overloaded", "type": "server_error"}}).to_string(),
        ),
    ])
    .await;
}

#[tokio::test]
async fn a_finished_stream_without_done_is_finalised_promptly() {
    let h = faulty("").await;
    // The upstream finishes its answer but neither says [DONE] nor closes.
    h.mocks[0].push([MockReply::sse(vec![
        SseStep::text("You said: hello there"),
        SseStep::finish("stop"),
        SseStep::Sleep(Duration::from_secs(60)),
    ])]);
    let a = ask(&h, true).await;
    assert_complete(&a, "up0");
    assert_eq!(h.mocks[1].requests().len(), 0, "nothing to continue");
}

#[tokio::test]
async fn html_or_truncated_json_with_status_200_moves_on() {
    let h = faulty("").await;
    let html = MockReply::Raw {
        status: 200,
        content_type: Some("text/html".into()),
        body: Bytes::from_static(b"<html>Gateway login</html>"),
    };
    let truncated = MockReply::Raw {
        status: 200,
        content_type: Some("application/json".into()),
        body: Bytes::from_static(b"{\"id\": \"chatcmpl-1\", \"choi"),
    };
    for bad in [html, truncated] {
        h.mocks[0].push([bad.clone(), bad]);
        let a = ask(&h, false).await;
        assert_complete(&a, "up1");
        assert_eq!(a.attempts, "3");
    }
    assert_eq!(h.mocks[0].requests().len(), 4);
}

#[tokio::test]
async fn a_prompt_too_long_for_the_model_moves_on_without_a_retry() {
    let h = faulty("").await;
    h.mocks[0].push([MockReply::Json {
        status: 400,
        body: json!({"error": {"message": "This model's maximum context length is 8192 tokens.",
                     "type": "invalid_request_error", "param": "messages",
                     "code": "context_length_exceeded"}}),
        headers: vec![],
    }]);
    let a = ask(&h, false).await;
    assert_complete(&a, "up1");
    assert_eq!(a.attempts, "2");
    assert_eq!(h.mocks[0].requests().len(), 1);
}

#[tokio::test]
async fn a_content_filter_rejection_reaches_the_client_untouched() {
    let h = faulty("").await;
    let reason = "Your request was rejected as a result of our safety system.";
    h.mocks[0].set_default(MockReply::Json {
        status: 400,
        body: json!({"error": {"message": reason, "type": "invalid_request_error",
                     "param": "prompt", "code": "content_filter"}}),
        headers: vec![],
    });
    for stream in [false, true] {
        let a = ask(&h, stream).await;
        assert_eq!((a.status, a.attempts.as_str()), (400, "1"));
        assert_eq!(a.body["error"]["message"], reason);
        assert_eq!(a.body["error"]["code"], "content_filter");
    }
    // Not retried, not shopped around to another model, and no breaker trips.
    assert_eq!(h.mocks[0].requests().len(), 2);
    assert_eq!(h.mocks[1].requests().len(), 0);
    let breakers: Value = h.admin_get("/admin/breakers").await.json().await.unwrap();
    assert_eq!(breakers["breakers"][0]["state"], "closed", "{breakers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_for_a_while_then_healthy_under_steady_traffic() {
    // A short open period so that the outage spans several of them.
    let h = faulty(
        "breaker = { consecutive_failures = 3, open_ms = 300, max_open_ms = 300, jitter = 0.0 }",
    )
    .await;
    h.mocks[0].set_default(MockReply::error(503, "server_error", "down"));
    let h = std::sync::Arc::new(h);
    let client = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut served = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(20));
            for _ in 0..150 {
                ticks.tick().await;
                let a = ask(&h, true).await;
                // Complete, and from one of the two targets.
                assert_complete(&a, if a.backend == "up0" { "up0" } else { "up1" });
                served.push(a.backend);
            }
            served
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outage = h.mocks[0].requests().len();
    h.mocks[0].set_default(MockReply::echo());
    let served = client.await.unwrap();
    // Every request was answered. While down, `up0` saw the three failures
    // that opened its breaker, then one trial call per 300 ms open period.
    assert!(
        (3..=3 + 1500 / 300 + 1).contains(&outage),
        "{outage} attempts during 1.5 s of outage"
    );
    // Once healthy, the next trial closed the breaker and traffic came back.
    let back = served.iter().rposition(|b| b == "up1").unwrap();
    assert!(served[back + 1..].len() > 50, "{served:?}");
    assert!(served[back + 1..].iter().all(|b| b == "up0"));
}
