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
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [breaker]\nconsecutive_failures = 3\nopen_ms = 60000\n\
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
        metrics.contains("backstop_breaker_state{target=\"up0\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("backstop_breaker_state{target=\"up1\"} 0"));
}

#[tokio::test]
async fn when_every_breaker_is_open_the_client_gets_a_clean_503() {
    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    mock.set_default(MockReply::error(502, "server_error", "bad gateway"));
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[breaker]\nconsecutive_failures = 2\n\
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
    assert_eq!(h.mocks[0].requests().len(), 2);
}
