//! Bad input and bad upstreams give clean OpenAI-shaped errors, never panics,
//! hangs or leaked bodies.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::{MockReply, SseStep};
use backstop_tests::{sse_data, streamed_text, Harness};
use serde_json::{json, Value};

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(resp.headers().contains_key("x-backstop-backend"));
    assert!(resp.headers().contains_key("x-backstop-attempts"));
    let body: Value = resp.json().await.unwrap();
    let error = &body["error"];
    assert!(error["message"].is_string(), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    (status, body)
}

async fn raw_post(h: &Harness, path: &str, body: &'static str) -> reqwest::Response {
    h.http
        .post(h.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_request_bodies_get_400s_that_name_the_parameter() {
    let h = Harness::start().await;
    let cases: [(&str, &str, Option<&str>); 8] = [
        ("/v1/chat/completions", "{\"model\": \"m\", \"messages\": [", None),
        ("/v1/chat/completions", "{\"model\": \"m\"}", Some("messages")),
        ("/v1/chat/completions", "{\"model\": \"m\", \"messages\": \"hi\"}", Some("messages")),
        ("/v1/chat/completions", "{\"model\": \"m\", \"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}", Some("messages[0].role")),
        ("/v1/chat/completions", "{\"model\": \"m\", \"messages\": [{\"role\": \"user\"}]}", Some("messages[0].content")),
        ("/v1/chat/completions", "{\"model\": 5, \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", Some("model")),
        ("/v1/chat/completions", "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": \"hot\"}", Some("temperature")),
        ("/v1/completions", "{\"model\": \"m\"}", Some("prompt")),
    ];
    for (path, body, param) in cases {
        let (status, v) = error_of(raw_post(&h, path, body).await).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {v}");
    }
    assert!(
        h.mock().requests().is_empty(),
        "bad input never reaches the upstream"
    );
}

#[tokio::test]
async fn oversized_bodies_unknown_paths_and_wrong_methods() {
    let h = Harness::start().await;
    let huge = "x".repeat(5 << 20);
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 413);
    assert_eq!(error_of(h.get("/v1/nothing").await).await.0, 404);
    assert_eq!(error_of(h.get("/v1/chat/completions").await).await.0, 405);
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn upstream_rate_limits_pass_through_with_their_headers() {
    let h = Harness::start().await;
    h.mock().push([MockReply::Json {
        status: 429,
        body: json!({"error": {"message": "Rate limit reached for requests", "type": "requests",
                               "param": null, "code": "rate_limit_exceeded"}}),
        headers: vec![
            ("retry-after".into(), "3".into()),
            ("retry-after-ms".into(), "2500".into()),
            ("x-should-retry".into(), "true".into()),
            ("x-ratelimit-remaining-requests".into(), "0".into()),
        ],
    }]);
    let resp = h.post("/v1/chat/completions", &chat(false)).await;
    for (name, value) in [
        ("retry-after", "3"),
        ("retry-after-ms", "2500"),
        ("x-should-retry", "true"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-backstop-backend", "up0"),
    ] {
        assert_eq!(resp.headers()[name], value, "{name}");
    }
    let (status, v) = error_of(resp).await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn html_and_truncated_upstream_answers_become_clean_502s() {
    let h = Harness::start().await;
    h.mock().push([
        MockReply::Raw {
            status: 502,
            content_type: Some("text/html".into()),
            body: "<html><h1>502 Bad Gateway</h1></html>".into(),
        },
        MockReply::Raw {
            status: 200,
            content_type: Some("application/json".into()),
            body: "{\"id\":\"chatcmpl-1\",\"choices\":[{\"leak".into(),
        },
        MockReply::Raw {
            status: 200,
            content_type: None,
            body: "ok".into(),
        },
    ]);
    for _ in 0..3 {
        let resp = h.post("/v1/chat/completions", &chat(false)).await;
        let (status, v) = error_of(resp).await;
        assert_eq!(status, 502, "{v}");
        assert_eq!(v["error"]["type"], "upstream_error");
        assert!(
            !v.to_string().contains("<h1>") && !v.to_string().contains("leak"),
            "{v}"
        );
    }
}

#[tokio::test]
async fn a_hanging_upstream_gets_a_504_within_the_deadline() {
    let h = Harness::with_targets(1, "first_byte_timeout_ms = 200").await;
    h.mock().push([MockReply::Hang]);
    let started = tokio::time::Instant::now();
    let (status, v) = error_of(h.post("/v1/chat/completions", &chat(false)).await).await;
    assert_eq!(status, 504);
    assert_eq!(v["error"]["code"], "first_byte_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_stream_cut_mid_answer_ends_in_an_error_event_not_done() {
    let h = Harness::start().await;
    let piece = |t: &str| {
        SseStep::Data(
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
            .to_string(),
        )
    };
    h.mock().push([MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![piece("The answer"), piece(" is"), SseStep::Cut],
    }]);
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    assert_eq!(resp.status(), 200);
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(streamed_text(&payloads), "The answer is");
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_broken", "{last}");
    assert!(
        !payloads.iter().any(|p| p == "[DONE]"),
        "a truncated answer is not a success"
    );
}

#[tokio::test]
async fn an_error_event_inside_a_200_stream_reaches_the_client_as_one() {
    let h = Harness::start().await;
    let piece = SseStep::Data(
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]})
        .to_string(),
    );
    h.mock().push([MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![
            piece,
            SseStep::Data(
                json!({"error": {"message": "The server had an error", "type": "server_error",
                                       "param": null, "code": null}})
                .to_string(),
            ),
        ],
    }]);
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    let payloads = sse_data(&resp.text().await.unwrap());
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["message"], "The server had an error");
    assert!(!payloads.iter().any(|p| p == "[DONE]"));
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_naming_the_target() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[targets]]\nname = \"gone\"\nbase_url = \"http://{closed}/v1\"\n");
    let h = Harness::with_config(Vec::new(), &toml).await;
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "gone");
    let (status, v) = error_of(resp).await;
    assert_eq!(status, 502);
    assert_eq!(v["error"]["code"], "connect");
}

#[tokio::test]
async fn every_answer_carries_a_request_id_the_clients_own_when_it_sent_one() {
    let h = Harness::start().await;
    let resp = h.get("/v1/nowhere").await;
    assert_eq!(resp.status(), 404);
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 36, "a UUID: {made}");
    let resp = h
        .http
        .get(h.url("/healthz"))
        .header("x-request-id", "client-7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-7");
}
