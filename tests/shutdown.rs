//! SIGTERM-style shutdown lets in-flight streams finish, within a bound.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::MockReply;
use backstop_tests::{sse_data, streamed_text, Harness};
use serde_json::json;

fn stream_body() -> serde_json::Value {
    json!({"model": "m", "stream": true,
           "messages": [{"role": "user", "content": "one two three four five"}]})
}

#[tokio::test]
async fn in_flight_streams_finish_and_new_connections_are_refused() {
    let mut h = Harness::start().await;
    h.mock().set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(100),
    });
    let resp = h.post("/v1/chat/completions", &stream_body()).await;
    assert_eq!(resp.status(), 200);
    let running = h.signal_shutdown().unwrap();
    let body = resp.text().await.unwrap();
    let payloads = sse_data(&body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        streamed_text(&payloads),
        "You said: one two three four five"
    );
    tokio::time::timeout(Duration::from_secs(5), running.wait())
        .await
        .unwrap();
    assert!(reqwest::Client::new()
        .get(h.url("/healthz"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn the_grace_period_bounds_shutdown() {
    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    mock.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_secs(2),
    });
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 300\n\
         [[targets]]\nname = \"slow\"\nbase_url = \"{}\"\n",
        mock.url()
    );
    let mut h = Harness::with_config(vec![mock], &toml).await;
    let resp = h.post("/v1/chat/completions", &stream_body()).await;
    let running = h.signal_shutdown().unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), running.wait())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    // The client sees its stream cut, not a hang.
    assert!(tokio::time::timeout(Duration::from_secs(5), resp.text())
        .await
        .is_ok());
}
