//! Scoring shadow calls against a mock upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_adapter::Request;
use backstop_shadow::{score, Verdict};
use backstop_testkit::{MockReply, MockUpstream, SseStep};
use backstop_upstream::{Upstream, UpstreamConfig};
use bytes::Bytes;
use serde_json::json;

async fn verdict_of(reply: MockReply) -> Verdict {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([reply]);
    let up = Upstream::new(UpstreamConfig::new("mock", mock.url())).unwrap();
    let body = json!({"model": "m", "stream": true, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "ready?"}]});
    let req = Request::parse_chat(body.to_string().as_bytes()).unwrap();
    score(
        &up,
        &req,
        Duration::from_millis(300),
        Duration::from_secs(2),
    )
    .await
    .verdict
}

fn piece(text: &str, finish: Option<&str>) -> SseStep {
    SseStep::Data(
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
        .to_string(),
    )
}

#[tokio::test]
async fn only_a_complete_timely_stream_scores_ok() {
    assert_eq!(verdict_of(MockReply::echo()).await, Verdict::Ok);
    assert_eq!(
        verdict_of(MockReply::error(429, "requests", "slow down")).await,
        Verdict::RateLimited
    );
    assert_eq!(
        verdict_of(MockReply::error(500, "server_error", "boom")).await,
        Verdict::Failed
    );
    let html = MockReply::Raw {
        status: 200,
        content_type: Some("text/html".into()),
        body: Bytes::from_static(b"<html>maintenance</html>"),
    };
    assert_eq!(verdict_of(html).await, Verdict::Failed);
    let cut = MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![piece("half an ans", None), SseStep::Cut],
    };
    assert_eq!(verdict_of(cut).await, Verdict::Failed);
    let late = MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![
            SseStep::Sleep(Duration::from_millis(600)),
            piece("hi", Some("stop")),
        ],
    };
    assert_eq!(verdict_of(late).await, Verdict::SlowFirstToken);
    let slow = MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![
            piece("hi", None),
            SseStep::Sleep(Duration::from_millis(2500)),
            piece("", Some("stop")),
        ],
    };
    assert_eq!(verdict_of(slow).await, Verdict::Slow);
}
