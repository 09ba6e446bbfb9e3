//! A failing upstream trips its circuit breaker: traffic goes straight to the
//! next target without hammering the sick one, and operators see it.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use backstop_testkit::MockReply;
use backstop_tests::Harness;
use serde_json::json;

#[tokio::test]
async fn an_open_breaker_sends_traffic_past_the_failing_target() {
    let mut mocks = Vec::new();
    for _ in 0..2 {
        mocks.push(backstop_testkit::MockUpstream::start().await.unwrap());
    }
    mocks[0].set_default(MockReply::error(500, "server_error", "boom"));
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [breaker]\nconsecutive_failures = 3\nopen_ms = 60000\n[retry]\nmax_retries = 0\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n\
         [[targets]]\nname = \"up1\"\nbase_url = \"{}\"\n",
        mocks[0].url(),
        mocks[1].url()
    );
    let h = Harness::with_config(mocks, &toml).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let resp = h.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backstop-attempts"], "2");
    }
    for _ in 0..5 {
        let resp = h.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backstop-backend"], "up1");
        assert_eq!(resp.headers()["x-backstop-attempts"], "1");
    }
    assert_eq!(
        h.mocks[0].requests().len(),
        3,
        "the sick upstream is left alone"
    );
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("backstop_breaker_state{target=\"up0\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("backstop_breaker_state{target=\"up1\"} 0"));
}

#[tokio::test]
async fn when_every_breaker_is_open_the_client_gets_a_clean_503() {
    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    mock.set_default(MockReply::error(502, "server_error", "bad gateway"));
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[breaker]\nconsecutive_failures = 2\n[retry]\nmax_retries = 0\n\
         [[targets]]\nname = \"only\"\nbase_url = \"{}\"\n",
        mock.url()
    );
    let h = Harness::with_config(vec![mock], &toml).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        assert_eq!(h.post("/v1/chat/completions", &body).await.status(), 502);
    }
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-backstop-attempts"], "0");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "circuit_open");
    // The cause is told, not only that the breaker is open.
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("last failed with") && message.contains("bad gateway"),
        "{message}"
    );
    assert_eq!(h.mocks[0].requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_answer_is_finished_by_the_local_model() {
    use backstop_testkit::SseStep;
    use backstop_tests::{model_path, sse_data, streamed_text};

    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    let piece = |t: &str| {
        SseStep::Data(
            json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": t},
                   "finish_reason": null}]})
            .to_string(),
        )
    };
    mock.push([MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![piece("2 + 2"), piece(" equals"), SseStep::Cut],
    }]);
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n\
         [local]\nmodel = \"{}\"\n",
        mock.url(),
        model_path()
    );
    // No need to wait for the model: the engine queues work while it loads.
    let h = Harness::with_config(vec![mock], &toml).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "temperature": 0, "max_tokens": 20,
                      "messages": [{"role": "user", "content": "What is 2+2?"}]});
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{payloads:?}"
    );
    let chunks: Vec<serde_json::Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{payloads:?}"
    );
    assert!(
        chunks.iter().all(|c| c["id"] == "chatcmpl-up"),
        "one completion id"
    );
    let text = streamed_text(&payloads);
    assert!(
        text.starts_with("2 + 2 equals") && text.len() > "2 + 2 equals".len(),
        "{text:?}"
    );
    // Honest about who wrote what: the continuation carries the local model's name.
    assert!(chunks.iter().any(|c| c["model"] == "smollm2-135m-instruct"));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("backstop_stream_continuations_total{from=\"up0\",to=\"local\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_prompt_too_long_for_one_model_moves_on_but_other_client_errors_stop() {
    let h = Harness::with_targets(2, "").await;
    h.mocks[0].push([
        MockReply::Json {
            status: 400,
            body: json!({"error": {"message": "This model's maximum context length is 8192 tokens.",
                                   "type": "invalid_request_error", "param": "messages",
                                   "code": "context_length_exceeded"}}),
            headers: vec![],
        },
        MockReply::error(
            400,
            "invalid_request_error",
            "Invalid value for 'temperature'",
        ),
    ]);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "up1");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    assert_eq!(
        h.mocks[1].requests().len(),
        1,
        "a plain client error is not retried elsewhere"
    );
}

#[tokio::test]
async fn operators_force_a_breaker_open_and_hand_it_back() {
    let h = Harness::with_targets(2, "").await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let force = |how: &'static str| {
        h.http
            .post(h.admin_url("/admin/breakers/up0"))
            .json(&json!({"force": how}))
            .send()
    };
    let v: serde_json::Value = force("open").await.unwrap().json().await.unwrap();
    assert_eq!(v["forced"], "open");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up1");
    assert!(h.mocks[0].requests().is_empty());
    let list: serde_json::Value = h.admin_get("/admin/breakers").await.json().await.unwrap();
    assert_eq!(list["breakers"][0]["target"], "up0");
    assert_eq!(list["breakers"][0]["forced"], "open");
    force("auto").await.unwrap();
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    let bad = h
        .http
        .post(h.admin_url("/admin/breakers/up0"))
        .json(&json!({"force": "sideways"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = h
        .http
        .post(h.admin_url("/admin/breakers/nope"))
        .json(&json!({"force": "open"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn a_failed_attempt_is_retried_on_the_same_upstream_after_the_wait_it_asked_for() {
    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    mock.push([MockReply::Json {
        status: 503,
        body: json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}}),
        headers: vec![("retry-after-ms".into(), "200".into())],
    }]);
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[retry]\nmax_retries = 1\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n",
        mock.url()
    );
    let h = Harness::with_config(vec![mock], &toml).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-attempts"], "2");
    let seen = h.mocks[0].requests();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].at - seen[0].at >= std::time::Duration::from_millis(200));
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("backstop_retries_total{reason=\"server_error\",target=\"up0\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_checks_take_a_failing_upstream_out_of_service_and_bring_it_back() {
    let mut mocks = Vec::new();
    for _ in 0..2 {
        mocks.push(backstop_testkit::MockUpstream::start().await.unwrap());
    }
    mocks[0].set_default(MockReply::error(500, "server_error", "down"));
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[retry]\nmax_retries = 0\n\
         [health]\nprobe = \"completion\"\nprobe_model = \"probe-model\"\ninterval_ms = 30\n\
         timeout_ms = 500\nhealthy_threshold = 2\nunhealthy_threshold = 2\n\
         [breaker]\nconsecutive_failures = 1000\nmin_calls = 1000\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n\
         [[targets]]\nname = \"up1\"\nbase_url = \"{}\"\n",
        mocks[0].url(),
        mocks[1].url()
    );
    let h = Harness::with_config(mocks, &toml).await;
    let mut waited = 0;
    while !unhealthy(&h).await {
        waited += 1;
        assert!(waited < 200, "the failing upstream never became unhealthy");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let probes = h.mocks[0].requests();
    assert!(probes
        .iter()
        .all(|r| r.body["model"] == "probe-model" && r.body["max_tokens"] == 1));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let before = h.mocks[0].requests().len();
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up1");
    assert_eq!(
        resp.headers()["x-backstop-attempts"],
        "1",
        "no attempt on an unhealthy target"
    );
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("backstop_target_healthy{target=\"up0\"} 0"),
        "{metrics}"
    );

    // It recovers: probes succeed twice in a row, traffic returns.
    h.mocks[0].set_default(MockReply::echo());
    let mut waited = 0;
    while unhealthy(&h).await {
        waited += 1;
        assert!(waited < 200, "the upstream never came back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    assert!(h.mocks[0].requests().len() > before);
}

async fn unhealthy(h: &Harness) -> bool {
    let v: serde_json::Value = h.admin_get("/admin/breakers").await.json().await.unwrap();
    v["breakers"][0]["healthy"] == json!(false)
}

#[tokio::test]
async fn a_prompt_too_big_for_a_target_skips_it_and_one_that_fits_none_is_a_clear_400() {
    let mut mocks = Vec::new();
    for _ in 0..2 {
        mocks.push(backstop_testkit::MockUpstream::start().await.unwrap());
    }
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[health]\nprobe = \"off\"\n\
         [[targets]]\nname = \"small\"\nbase_url = \"{}\"\ncontext_window = 32\n\
         [[targets]]\nname = \"large\"\nbase_url = \"{}\"\ncontext_window = 200\n",
        mocks[0].url(),
        mocks[1].url()
    );
    let h = Harness::with_config(mocks, &toml).await;
    let ask = |words: usize| json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "word ".repeat(words)}]});
    let resp = h.post("/v1/chat/completions", &ask(60)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "large");
    assert!(
        h.mocks[0].requests().is_empty(),
        "never sent to the small model"
    );

    let resp = h.post("/v1/chat/completions", &ask(400)).await;
    assert_eq!(resp.status(), 400);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("tokens over"), "{message}");
    assert_eq!(
        h.mocks[1].requests().len(),
        1,
        "the oversized prompt reached no upstream"
    );
}

#[tokio::test]
async fn a_spent_rate_limit_sends_requests_to_the_next_target_instead_of_earning_a_429() {
    let h = Harness::with_targets(2, "requests_per_minute = 1").await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "up1");
    assert_eq!(
        resp.headers()["x-backstop-attempts"],
        "1",
        "a held-back target is not an attempt"
    );
    assert_eq!(h.mocks[0].requests().len(), 1);
}
