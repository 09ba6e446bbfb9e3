//! Several replicas sharing one PostgreSQL store act as one service: any
//! replica serves, follows and resumes a generation another one runs.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream};
use backstop_tests::{events, output_text, text_of, Harness};
use serde_json::{json, Value};

/// Bound on every wait: a hang guard, not a timing assertion.
const HANG: Duration = Duration::from_secs(30);

const LONG: &str = "one two three four five six seven eight nine ten eleven twelve";

/// A replica in front of a mock of its own that echoes slowly, keeping
/// generations in the shared database at `url`.
async fn replica(url: &str) -> Harness {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(30),
    });
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
         [[targets]]\nname = \"up\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n\
         [store]\nurl = \"{url}\"\n",
        mock.url()
    );
    Harness::with_config(vec![mock], &toml).await
}

async fn two_replicas() -> (Harness, Harness) {
    let url = backstop_testkit::postgres::database().await.unwrap();
    (replica(&url).await, replica(&url).await)
}

/// Reads a response body to its end, within the hang guard.
async fn text(resp: reqwest::Response) -> String {
    tokio::time::timeout(HANG, resp.text())
        .await
        .unwrap()
        .unwrap()
}

/// Reads a stream until it has `n` events, then drops the connection.
async fn first_events(mut resp: reqwest::Response, n: usize) -> Vec<(Option<u64>, Value)> {
    let mut seen = String::new();
    while events(&seen).len() < n {
        let chunk = tokio::time::timeout(HANG, resp.chunk()).await.unwrap();
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    events(&seen)
}

/// Events numbered 0, 1, 2... with no gap and no repeat.
fn numbered_from_zero(all: &[(Option<u64>, Value)]) {
    for (i, (id, _)) in all.iter().enumerate() {
        assert_eq!(*id, Some(i as u64), "event {i} of {all:?}");
    }
}

#[tokio::test]
async fn a_background_job_on_one_replica_is_followed_and_polled_on_another() {
    let (a, b) = two_replicas().await;
    let body = json!({"model": "m", "input": LONG, "background": true});
    let queued: Value = a.post("/v1/responses", &body).await.json().await.unwrap();
    let id = queued["id"].as_str().unwrap();
    // B follows it live, from its first event to its end, as A makes it.
    let followed = b.get(&format!("/v1/responses/{id}?stream=true")).await;
    assert_eq!(followed.status(), 200);
    let all = events(&text(followed).await);
    numbered_from_zero(&all);
    assert_eq!(all.last().unwrap().1["type"], "response.completed");
    assert_eq!(text_of(&all), format!("You said: {LONG}"));
    // And polls it.
    let done: Value = b
        .get(&format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(output_text(&done), format!("You said: {LONG}"));
    assert_eq!(a.mock().requests().len(), 1);
    assert_eq!(b.mock().requests().len(), 0, "B only read");
}

#[tokio::test]
async fn a_responses_stream_dropped_on_one_replica_resumes_on_another() {
    let (a, b) = two_replicas().await;
    let body = json!({"model": "m", "input": LONG, "stream": true});
    let before = first_events(a.post("/v1/responses", &body).await, 5).await;
    let id = before[0].1["response"]["id"].as_str().unwrap().to_string();
    let last = before.last().unwrap().0.unwrap();
    let resumed = b
        .get(&format!(
            "/v1/responses/{id}?stream=true&starting_after={last}"
        ))
        .await;
    assert_eq!(resumed.status(), 200);
    let after = events(&text(resumed).await);
    assert_eq!(after[0].0, Some(last + 1), "the next event, not a repeat");
    let all: Vec<_> = before.into_iter().chain(after).collect();
    numbered_from_zero(&all);
    assert_eq!(all.last().unwrap().1["type"], "response.completed");
    assert_eq!(text_of(&all), format!("You said: {LONG}"));
    assert_eq!(a.mock().requests().len() + b.mock().requests().len(), 1);
}

/// POSTs a chat with an `Idempotency-Key` (and a `Last-Event-ID`).
async fn keyed(h: &Harness, body: &Value, key: &str, last: Option<u64>) -> reqwest::Response {
    let mut req = h
        .http
        .post(h.url("/v1/chat/completions"))
        .header("idempotency-key", key)
        .json(body);
    if let Some(last) = last {
        req = req.header("last-event-id", last.to_string());
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn a_keyed_chat_stream_dropped_on_one_replica_resumes_on_another() {
    let (a, b) = two_replicas().await;
    let body = json!({"model": "m", "stream": true,
                      "messages": [{"role": "user", "content": LONG}]});
    let before = first_events(keyed(&a, &body, "key-1", None).await, 4).await;
    let last = before.last().unwrap().0.expect("chat events carry ids");
    let resumed = keyed(&b, &body, "key-1", Some(last)).await;
    assert_eq!(resumed.status(), 200);
    let after = events(&text(resumed).await);
    assert_eq!(after[0].0, Some(last + 1));
    let all: Vec<_> = before.into_iter().chain(after).collect();
    numbered_from_zero(&all);
    assert_eq!(all.last().unwrap().1, Value::String("[DONE]".into()));
    let said: String = all
        .iter()
        .filter_map(|(_, e)| e.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert_eq!(said, format!("You said: {LONG}"));
    // The key again on B, without Last-Event-ID: the whole stream, replayed.
    let replay = events(&text(keyed(&b, &body, "key-1", None).await).await);
    assert_eq!(replay.len(), all.len());
    assert_eq!(
        a.mock().requests().len() + b.mock().requests().len(),
        1,
        "one generation for the key, across replicas"
    );
}
