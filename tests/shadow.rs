//! Shadow verification end to end: an upstream whose breaker opened gets live
//! traffic back only after shadows of real requests prove it healthy, in
//! steps, and goes back to open if it fails during the ramp.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream, Recorded};
use backstop_tests::{sse_data, Harness};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Shadows carry the capped `max_tokens`; live requests carry none.
const CAP: u64 = 8;

fn is_shadow(r: &Recorded) -> bool {
    r.body["max_tokens"] == CAP
}

/// Backstop with `up0` (breaker opens after 2 failures, for 200 ms) and
/// `up1`, under a fast shadow verifier: every routed-past request mirrored,
/// 50 ms apart at least (200 ms after failures), confirmation after 5 of the last 6 with the last 3
/// ok, then 50% of live traffic for 400 ms, then all.
async fn verified() -> Harness {
    let (up0, up1) = (
        MockUpstream::start().await.unwrap(),
        MockUpstream::start().await.unwrap(),
    );
    up0.set_default(MockReply::error(503, "server_error", "down"));
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
         [shadow]\nsample_rate = 1.0\nmin_interval_ms = 50\nmax_interval_ms = 200\nmax_tokens = {CAP}\nprobe_interval_ms = 100\n\
         first_token_slo_ms = 300\ntotal_slo_ms = 1000\nwindow = 6\nlast_k = 3\nthreshold = 0.8\n\
         ramp = [0.5, 1.0]\nramp_step_ms = 400\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n\
         breaker = {{ consecutive_failures = 2, open_ms = 200, max_open_ms = 400, jitter = 0.0 }}\n\
         [[targets]]\nname = \"up1\"\nbase_url = \"{}\"\n",
        up0.url(),
        up1.url()
    );
    Harness::with_config(vec![up0, up1], &toml).await
}

/// Sends a streaming request every 20 ms for `run`; every answer must be
/// complete. Returns who served each, in order.
async fn steady_traffic(h: Arc<Harness>, run: Duration) -> Vec<String> {
    let until = Instant::now() + run;
    let mut served = Vec::new();
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hello"}]});
    while Instant::now() < until {
        let resp = h.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200);
        let backend = resp.headers()["x-backstop-backend"]
            .to_str()
            .unwrap()
            .to_string();
        let payloads = sse_data(&resp.text().await.unwrap());
        assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
        assert!(payloads.iter().all(|p| !p.contains("\"error\"")));
        served.push(backend);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    served
}

async fn status_of(h: &Harness, target: &str) -> Value {
    let status: Value = h.admin_get("/admin/status").await.json().await.unwrap();
    status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_then_back_gets_traffic_only_after_shadows_confirm_it() {
    let h = Arc::new(verified().await);
    let traffic = tokio::spawn(steady_traffic(h.clone(), Duration::from_millis(3500)));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let recovered = Instant::now();
    h.mocks[0].set_default(MockReply::echo());
    let served = traffic.await.unwrap();

    let seen = h.mocks[0].requests();
    let live: Vec<&Recorded> = seen.iter().filter(|r| !is_shadow(r)).collect();
    // While down: the two failures that opened the breaker, then no live call.
    assert_eq!(live.iter().filter(|r| r.at < recovered).count(), 2);
    // Traffic came back only after enough shadows of real requests passed.
    let first_back = live.iter().find(|r| r.at >= recovered).unwrap().at;
    let shadows_after = seen
        .iter()
        .filter(|r| is_shadow(r) && r.at >= recovered && r.at < first_back)
        .count();
    assert!(
        shadows_after >= 5,
        "{shadows_after} shadows before traffic returned"
    );
    // ... and within a bounded time of the real recovery: five shadows 50 ms
    // apart, each a few ms, then the first 50% stage (generous for CI).
    let returned_after = first_back - recovered;
    assert!(
        returned_after < Duration::from_secs(2),
        "{returned_after:?}"
    );
    assert!(
        seen.iter()
            .any(|r| is_shadow(r) && r.body["messages"][0]["content"] == "hello"),
        "live requests were mirrored"
    );
    // And it came back in full: the last requests were all served by up0.
    assert!(
        served.iter().rev().take(10).all(|b| b == "up0"),
        "{served:?}"
    );
    let status = status_of(&h, "up0").await;
    assert_eq!(status["state"], "closed", "{status}");
    assert_eq!(status["shadow"]["phase"], "serving");
    assert_eq!(status["shadow"]["confirmations"], 1);
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("backstop_shadow_confirmations_total{target=\"up0\"} 1"));
    assert!(metrics.contains("backstop_shadow_ramp_fraction{target=\"up0\"} 1"));
    assert!(metrics.contains("backstop_shadow_requests_total{outcome=\"failed\",target=\"up0\"}"));
    assert!(metrics
        .contains("backstop_shadow_similarity_count{measure=\"token_overlap\",target=\"up0\"}"));
}

async fn never_readmitted(h: Harness) {
    let h = Arc::new(h);
    let served = steady_traffic(h.clone(), Duration::from_millis(2500)).await;
    assert!(served[3..].iter().all(|b| b == "up1"), "{served:?}");
    let live = h.mocks[0]
        .requests()
        .iter()
        .filter(|r| !is_shadow(r))
        .count();
    assert_eq!(live, 2, "only the failures that opened the breaker");
    // It was kept under verification all along (each slow shadow takes 300 ms).
    assert!(
        h.mocks[0]
            .requests()
            .iter()
            .filter(|r| is_shadow(r))
            .count()
            >= 4
    );
    let status = status_of(&h, "up0").await;
    assert_eq!(status["shadow"]["phase"], "verifying", "{status}");
    assert_eq!(status["shadow"]["confirmations"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_fails_half_its_calls_is_not_readmitted() {
    let h = verified().await;
    // Two failures open the breaker; then every other call fails.
    let mut replies = vec![
        MockReply::error(503, "server_error", "down"),
        MockReply::error(503, "server_error", "down"),
    ];
    for _ in 0..200 {
        replies.push(MockReply::echo());
        replies.push(MockReply::error(500, "server_error", "flaky"));
    }
    h.mocks[0].push(replies);
    never_readmitted(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_slo_is_not_readmitted() {
    let h = verified().await;
    h.mocks[0].push([
        MockReply::error(503, "server_error", "down"),
        MockReply::error(503, "server_error", "down"),
    ]);
    h.mocks[0].set_default(MockReply::Echo {
        delay: Duration::from_millis(500),
        chunk_delay: Duration::ZERO,
    });
    never_readmitted(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_during_the_ramp_sends_it_back_to_open_for_longer() {
    let h = Arc::new(verified().await);
    let traffic = tokio::spawn(steady_traffic(h.clone(), Duration::from_millis(3000)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.mocks[0].set_default(MockReply::echo());
    // Wait for the ramp, then fail again.
    let mut ramping = false;
    for _ in 0..100 {
        if status_of(&h, "up0").await["shadow"]["phase"] == "ramping" {
            ramping = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ramping, "recovery was confirmed");
    h.mocks[0].set_default(MockReply::error(503, "server_error", "down again"));
    let mut reopened = None;
    for _ in 0..100 {
        let status = status_of(&h, "up0").await;
        if status["state"] == "open" {
            reopened = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = reopened.expect("a failure during the ramp reopened it");
    assert_eq!(status["trips"], 2, "a longer open period: {status}");
    assert_eq!(
        status["recent_failures"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["kind"],
        "server_error"
    );
    let served = traffic.await.unwrap();
    assert!(
        served.iter().rev().take(10).all(|b| b == "up1"),
        "{served:?}"
    );
}

#[tokio::test]
async fn operators_restart_verification() {
    let h = verified().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        h.post("/v1/chat/completions", &body).await;
    }
    let restart = |target: &'static str| {
        h.http
            .post(h.admin_url(&format!("/admin/breakers/{target}")))
            .json(&json!({"verification": "restart"}))
            .send()
    };
    assert_eq!(restart("up0").await.unwrap().status(), 200);
    let status = status_of(&h, "up0").await;
    assert_eq!(status["shadow"]["window"], json!([]));
    assert_eq!(status["shadow"]["phase"], "verifying", "{status}");
    assert_eq!(restart("nope").await.unwrap().status(), 404);
}
