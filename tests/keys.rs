//! A target with several upstream keys: requests spread across them; a key
//! the upstream refuses (401, 403) is taken out and the next key answers
//! at once; a 429 holds back only the key it was for.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use backstop_testkit::MockReply;
use backstop_tests::Harness;
use serde_json::json;

async fn three_keys() -> Harness {
    Harness::with_targets(1, "api_keys_env = [\"TEST_KEY_2\", \"TEST_KEY_3\"]\n").await
}

/// The bearer key each request the mock got carried, in order.
fn keys_used(h: &Harness) -> Vec<String> {
    h.mock()
        .requests()
        .iter()
        .map(|r| {
            let auth = r.headers.get("authorization").unwrap().to_str().unwrap();
            auth.strip_prefix("Bearer ").unwrap().to_string()
        })
        .collect()
}

async fn chat(h: &Harness) -> u16 {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    h.post("/v1/chat/completions", &body)
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn requests_spread_across_the_keys() {
    let h = three_keys().await;
    for _ in 0..6 {
        assert_eq!(chat(&h).await, 200);
    }
    let used = keys_used(&h);
    for key in ["sk-test", "sk-test-2", "sk-test-3"] {
        assert_eq!(used.iter().filter(|k| *k == key).count(), 2, "{used:?}");
    }
}

#[tokio::test]
async fn a_refused_key_is_taken_out_and_the_next_key_answers_at_once() {
    let h = three_keys().await;
    h.mock().push([MockReply::error(
        401,
        "invalid_request_error",
        "Incorrect API key provided.",
    )]);
    // The client never sees the refusal: the next key answers.
    assert_eq!(chat(&h).await, 200);
    for _ in 0..6 {
        assert_eq!(chat(&h).await, 200);
    }
    let used = keys_used(&h);
    assert_eq!(used[0], "sk-test");
    assert!(
        used[1..].iter().all(|k| k != "sk-test"),
        "the refused key is out: {used:?}"
    );
    assert!(used[1..].iter().any(|k| k == "sk-test-2"));
    assert!(used[1..].iter().any(|k| k == "sk-test-3"));
    let metrics = h.get("/metrics").await.text().await.unwrap();
    for line in [
        "backstop_upstream_key_in_use{key=\"0\",target=\"up0\"} 0",
        "backstop_upstream_key_in_use{key=\"1\",target=\"up0\"} 1",
        "backstop_upstream_key_in_use{key=\"2\",target=\"up0\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(!metrics.contains("sk-test"));
    // The target itself is fine: its breaker did not count the refusal.
    let breakers = h.admin_get("/admin/breakers").await.text().await.unwrap();
    assert!(breakers.contains("closed"), "{breakers}");
}

#[tokio::test]
async fn a_429_holds_back_only_the_key_it_was_for() {
    let h = three_keys().await;
    h.mock().push([MockReply::Json {
        status: 429,
        body: json!({"error": {"message": "Rate limit reached", "type": "requests",
                               "param": null, "code": "rate_limit_exceeded"}}),
        headers: vec![("retry-after".into(), "60".into())],
    }]);
    assert_eq!(chat(&h).await, 200);
    for _ in 0..6 {
        assert_eq!(chat(&h).await, 200);
    }
    let used = keys_used(&h);
    assert_eq!(used[0], "sk-test");
    // Held back for its minute, not taken out; the others serve meanwhile.
    assert!(used[1..].iter().all(|k| k != "sk-test"), "{used:?}");
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("backstop_upstream_key_in_use{key=\"0\",target=\"up0\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn every_key_must_be_set() {
    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    let toml = format!(
        "[[targets]]\nname = \"up0\"\nbase_url = \"{}\"\napi_keys_env = [\"NOT_SET\"]\n",
        mock.url()
    );
    let err = backstop_server::Config::parse(&toml, |_| None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "targets[0].api_keys_env[0]: `NOT_SET` is not set"
    );
}
