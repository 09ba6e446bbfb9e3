//! The client's deadline drives the walk, and a broken stream is finished
//! by whatever healthy target comes next: Backstop in process in front of
//! mock upstreams (and the local model, offline).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream, SseStep};
use backstop_tests::{sse_data, streamed_text, Harness};
use serde_json::{json, Value};

/// `up0` then `up1`, both with the shipped deadlines and retries (one
/// retry), shadow verification off; `up0_extra` adds to `up0`'s table.
async fn two(up0_extra: &str) -> Harness {
    let (up0, up1) = (
        MockUpstream::start().await.unwrap(),
        MockUpstream::start().await.unwrap(),
    );
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[health]\nprobe = \"off\"\n[shadow]\nenabled = false\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n{up0_extra}\n\
         [[targets]]\nname = \"up1\"\nbase_url = \"{}\"\n",
        up0.url(),
        up1.url()
    );
    Harness::with_config(vec![up0, up1], &toml).await
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// POSTs with these headers; the client itself gives up after `limit`.
async fn post(
    h: &Harness,
    body: &Value,
    headers: &[(&str, &str)],
    limit: Duration,
) -> reqwest::Response {
    let mut req = h
        .http
        .post(h.url("/v1/chat/completions"))
        .json(body)
        .timeout(limit);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send()
        .await
        .expect("answered before the client gave up")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_client_deadline_leaves_time_for_the_next_target() {
    // up0 takes the request and never answers; the shipped first-byte
    // deadline is 60 s, but the client gave 3 s, so up0 gets half of it.
    let h = two("").await;
    h.mocks[0].set_default(MockReply::Hang);
    let resp = post(
        &h,
        &chat(false),
        &[("x-backstop-deadline-ms", "3000")],
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-backstop-backend"), "up1");
    // The same with the read timeout the OpenAI SDKs announce, on a stream.
    let resp = post(
        &h,
        &chat(true),
        &[("x-stainless-read-timeout", "3")],
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "x-backstop-backend")),
        (200, "up1".into())
    );
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        h.mocks[0].requests().len(),
        2,
        "one attempt each: a timeout is not retried"
    );
}

#[tokio::test]
async fn a_stream_whose_upstream_sends_no_headers_moves_on_after_the_header_deadline() {
    // No client deadline: the 60 s first-token default would wait long,
    // but a streaming upstream sends its headers at once.
    let h = two("header_timeout_ms = 300").await;
    h.mocks[0].set_default(MockReply::Hang);
    let resp = post(&h, &chat(true), &[], Duration::from_secs(5)).await;
    assert_eq!(header(&resp, "x-backstop-backend"), "up1");
}

#[tokio::test]
async fn a_failure_after_a_long_silence_moves_on_instead_of_retrying() {
    let h = two("retry = { retry_within_ms = 200 }").await;
    h.mocks[0].set_default(MockReply::CloseAfter(Duration::from_millis(400)));
    let resp = post(&h, &chat(false), &[], Duration::from_secs(5)).await;
    assert_eq!(header(&resp, "x-backstop-backend"), "up1");
    assert_eq!(
        h.mocks[0].requests().len(),
        1,
        "not retried on the silent target"
    );
    // A quick reset is still worth a second try on the same target.
    let h = two("").await;
    h.mocks[0].push([MockReply::Reset]);
    let resp = post(&h, &chat(false), &[], Duration::from_secs(5)).await;
    assert_eq!(header(&resp, "x-backstop-backend"), "up0");
    assert_eq!(h.mocks[0].requests().len(), 2);
}

#[tokio::test]
async fn a_malformed_deadline_header_is_the_clients_mistake() {
    let h = two("").await;
    for bad in ["soon", "0", "-5"] {
        let resp = post(
            &h,
            &chat(false),
            &[("x-backstop-deadline-ms", bad)],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-backstop-deadline-ms"));
    }
    assert!(h.mocks[0].requests().is_empty());
}

#[tokio::test]
async fn a_cut_stream_is_finished_by_an_upstream_that_takes_no_prefill() {
    let h = two("").await;
    h.mocks[0].push([MockReply::sse(vec![
        SseStep::text("The answer"),
        SseStep::text(" so far"),
        SseStep::Cut,
    ])]);
    let resp = post(&h, &chat(true), &[], Duration::from_secs(10)).await;
    let raw = resp.text().await.unwrap();
    let payloads = sse_data(&raw);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "{raw}");
    assert!(raw.contains("\"finish_reason\":\"stop\""), "{raw}");
    assert!(!raw.contains("\"error\""), "{raw}");
    let text = streamed_text(&payloads);
    assert!(text.starts_with("The answer so far"), "{text}");
    // up1 got the answer so far as its own turn, and was asked to go on.
    let sent = &h.mocks[1].requests()[0].body;
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages[messages.len() - 2]["role"], "assistant");
    assert_eq!(messages[messages.len() - 2]["content"], "The answer so far");
    assert_eq!(messages[messages.len() - 1]["role"], "user");
    assert!(messages[messages.len() - 1]["content"]
        .as_str()
        .unwrap()
        .contains("Continue"));
}

#[tokio::test]
async fn a_cut_stream_that_cannot_be_finished_ends_in_backstops_own_words() {
    let h = Harness::with_targets(1, "").await;
    h.mock().push([MockReply::sse(vec![
        SseStep::text("The answer"),
        SseStep::Cut,
    ])]);
    let raw = post(&h, &chat(true), &[], Duration::from_secs(10))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !raw.contains("[DONE]") && !raw.contains("\"finish_reason\":\"stop\""),
        "{raw}"
    );
    let error = sse_data(&raw)
        .into_iter()
        .find(|p| p.contains("\"error\""))
        .unwrap();
    let message = serde_json::from_str::<Value>(&error).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    for internal in ["error decoding", "chunk size", "hyper", "reqwest"] {
        assert!(!message.contains(internal), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_model_answers_within_the_clients_deadline() {
    // No max_tokens, the default temperature, a 2 s budget: the answer ends
    // in time with a real finish_reason, streamed or not.
    let h = Harness::offline("").await;
    let ask = |stream: bool| {
        json!({"model": "any", "stream": stream,
               "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]})
    };
    let resp = post(
        &h,
        &ask(false),
        &[("x-backstop-deadline-ms", "2000")],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let finish = body["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(finish == "length" || finish == "stop", "{body}");
    let resp = post(
        &h,
        &ask(true),
        &[("x-backstop-deadline-ms", "2000")],
        Duration::from_secs(2),
    )
    .await;
    let raw = resp.text().await.unwrap();
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    assert!(
        raw.contains("\"finish_reason\":\"length\"") || raw.contains("\"finish_reason\":\"stop\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_local_answer_ends_it() {
    let h = Harness::offline("batch = 1").await;
    let body = json!({"model": "any",
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]});
    // The client gives up early, before the (capped) answer could be done.
    let gone = h
        .http
        .post(h.url("/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err());
    // Its request leaves at once: the server drops its work.
    for _ in 0..100 {
        let metrics = h.get("/metrics").await.text().await.unwrap();
        if metrics.contains("backstop_in_flight_requests 0") {
            // The single batch place is free again: a short answer goes through.
            let short = json!({"model": "any", "max_tokens": 3,
                "messages": [{"role": "user", "content": "Hi"}]});
            let resp = post(&h, &short, &[], Duration::from_secs(30)).await;
            assert_eq!(resp.status(), 200);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the abandoned request is still in flight");
}
