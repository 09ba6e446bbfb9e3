//! Durable generations: responses kept in the store and retrieved, streams
//! that resume after a dropped connection, background jobs polled and
//! cancelled, conversations continued from a previous response, and chat
//! streams kept by an `Idempotency-Key`.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::MockReply;
use backstop_tests::{events, keyed, output_text, text_of, Harness};
use serde_json::{json, Value};

/// Bound on every wait: a hang guard, not a timing assertion.
const HANG: Duration = Duration::from_secs(30);

/// A slow echo: each stream event a while after the last.
fn slow(chunk_ms: u64) -> MockReply {
    MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(chunk_ms),
    }
}

const LONG: &str = "one two three four five six seven eight nine ten eleven twelve";

/// Polls a response until it is final.
async fn settled(h: &Harness, id: &str) -> Value {
    let until = tokio::time::Instant::now() + HANG;
    loop {
        let v: Value = h
            .get(&format!("/v1/responses/{id}"))
            .await
            .json()
            .await
            .unwrap();
        let status = v["status"].as_str().unwrap_or_default().to_string();
        if !matches!(status.as_str(), "queued" | "in_progress") {
            return v;
        }
        assert!(tokio::time::Instant::now() < until, "still {status}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stored_responses_are_retrieved_listed_and_deleted() {
    let h = Harness::start().await;
    let body = json!({"model": "m", "instructions": "Be brief.",
                      "input": [{"role": "user", "content": "hello"}]});
    let made: Value = h.post("/v1/responses", &body).await.json().await.unwrap();
    let id = made["id"].as_str().unwrap();
    let got: Value = h
        .get(&format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got, made);
    let items: Value = h
        .get(&format!("/v1/responses/{id}/input_items"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"][0]["role"], "user");
    assert_eq!(items["data"][0]["content"][0]["text"], "hello");
    let resp = h
        .http
        .delete(h.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v, json!({"id": id, "object": "response", "deleted": true}));
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
        "/v1/responses/resp_nope".to_string(),
    ] {
        let resp = h.get(&path).await;
        assert_eq!(resp.status(), 404, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // Not stored at the client's request: not retrievable.
    let mut unstored = body.clone();
    unstored["store"] = json!(false);
    let made: Value = h
        .post("/v1/responses", &unstored)
        .await
        .json()
        .await
        .unwrap();
    let resp = h
        .get(&format!("/v1/responses/{}", made["id"].as_str().unwrap()))
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_dropped_responses_stream_resumes_from_the_next_event() {
    let h = Harness::start().await;
    h.mock().set_default(slow(30));
    let body = json!({"model": "m", "input": LONG, "stream": true});
    let mut resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while events(&seen).len() < 6 {
        let chunk = tokio::time::timeout(HANG, resp.chunk()).await.unwrap();
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    drop(resp); // the connection drops mid-stream
    let before = events(&seen);
    let id = before[0].1["response"]["id"].as_str().unwrap().to_string();
    let last = before.last().unwrap().0.unwrap();
    // Still running, it is retrieved as it stands.
    let running: Value = h
        .get(&format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(running["id"], id.as_str());
    assert_eq!(running["status"], "in_progress");
    assert_eq!(running["object"], "response");
    let resumed = h
        .get(&format!(
            "/v1/responses/{id}?stream=true&starting_after={last}"
        ))
        .await;
    assert_eq!(resumed.status(), 200);
    let after = events(
        &tokio::time::timeout(HANG, resumed.text())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(after[0].0, Some(last + 1), "the next event, not a repeat");
    let all: Vec<(Option<u64>, Value)> = before.into_iter().chain(after).collect();
    for (i, (id, e)) in all.iter().enumerate() {
        assert_eq!(*id, Some(i as u64));
        assert_eq!(e["sequence_number"], i);
    }
    let done = &all.last().unwrap().1;
    assert_eq!(done["type"], "response.completed");
    assert_eq!(text_of(&all), format!("You said: {LONG}"));
    assert_eq!(output_text(&done["response"]), format!("You said: {LONG}"));
    assert_eq!(h.mock().requests().len(), 1, "one generation");

    // Past the end of a finished response: the stream ends at once.
    let end = h
        .get(&format!(
            "/v1/responses/{id}?stream=true&starting_after=100000"
        ))
        .await;
    assert_eq!(end.status(), 200);
    assert_eq!(
        tokio::time::timeout(HANG, end.text())
            .await
            .unwrap()
            .unwrap(),
        ""
    );
    // The whole stream, again, from its start.
    let replay = h.get(&format!("/v1/responses/{id}?stream=true")).await;
    let replayed = events(&replay.text().await.unwrap());
    assert_eq!(replayed.len(), all.len());
}

#[tokio::test]
async fn background_responses_run_as_jobs_and_are_polled() {
    let h = Harness::start().await;
    h.mock().set_default(slow(10));
    let body = json!({"model": "m", "input": LONG, "background": true});
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 200);
    let queued: Value = resp.json().await.unwrap();
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["background"], true);
    let id = queued["id"].as_str().unwrap();
    let done = settled(&h, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(output_text(&done), format!("You said: {LONG}"));
    assert!(
        done["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{done}"
    );
    // Its events are kept like any stream's.
    let replay = h.get(&format!("/v1/responses/{id}?stream=true")).await;
    let all = events(&replay.text().await.unwrap());
    assert_eq!(all[0].1["response"]["status"], "queued");
    assert_eq!(all.last().unwrap().1["type"], "response.completed");

    // Streamed: the events from the start, live.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = h.post("/v1/responses", &streamed).await;
    let all = events(
        &tokio::time::timeout(HANG, resp.text())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(all[0].1["type"], "response.created");
    assert_eq!(text_of(&all), format!("You said: {LONG}"));
}

#[tokio::test]
async fn background_responses_cancel_as_openai_answers() {
    let h = Harness::start().await;
    h.mock().set_default(slow(500));
    let body = json!({"model": "m", "input": LONG, "background": true});
    let queued: Value = h.post("/v1/responses", &body).await.json().await.unwrap();
    let id = queued["id"].as_str().unwrap();
    let cancel = format!("/v1/responses/{id}/cancel");
    let resp = h.post(&cancel, &json!({})).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    let got: Value = h
        .get(&format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["status"], "cancelled");
    // Again: the same answer.
    let again: Value = h.post(&cancel, &json!({})).await.json().await.unwrap();
    assert_eq!(again["status"], "cancelled");

    // A finished one, or a foreground one: a 400.
    h.mock().set_default(MockReply::echo());
    let quick: Value = h.post("/v1/responses", &body).await.json().await.unwrap();
    let quick = quick["id"].as_str().unwrap();
    settled(&h, quick).await;
    let foreground: Value = h
        .post("/v1/responses", &json!({"model": "m", "input": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    for id in [quick, foreground["id"].as_str().unwrap()] {
        let resp = h
            .post(&format!("/v1/responses/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    let resp = h.post("/v1/responses/resp_nope/cancel", &json!({})).await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_full_background_queue_gets_a_429() {
    let data = tempfile::tempdir().unwrap();
    let mock = backstop_testkit::MockUpstream::start().await.unwrap();
    mock.set_default(MockReply::Hang);
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[retry]\nmax_retries = 0\n\
         [store]\npath = {:?}\nmax_running = 1\nmax_queued = 1\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n",
        data.path(),
        mock.url()
    );
    let h = Harness::with_config(vec![mock], &toml).await;
    let body = json!({"model": "m", "input": "hi", "background": true});
    for _ in 0..2 {
        assert_eq!(h.post("/v1/responses", &body).await.status(), 200);
    }
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "background_queue");
}

#[tokio::test]
async fn a_conversation_continues_from_its_previous_response() {
    let h = Harness::start().await;
    let first: Value = h
        .post("/v1/responses", &json!({"model": "m", "input": "hello"}))
        .await
        .json()
        .await
        .unwrap();
    let body = json!({"model": "m", "input": "and again", "previous_response_id": first["id"]});
    let second: Value = h.post("/v1/responses", &body).await.json().await.unwrap();
    assert_eq!(second["previous_response_id"], first["id"]);
    assert_eq!(output_text(&second), "You said: and again");
    // The upstream got the whole conversation, not the id.
    let sent = &h.mock().requests()[1].body;
    let input = sent["input"].as_array().unwrap();
    assert_eq!(input.len(), 3, "{sent}");
    assert_eq!(input[0]["content"], "hello");
    assert_eq!(input[1]["content"][0]["text"], "You said: hello");
    assert_eq!(input[2]["content"], "and again");
    assert!(sent.get("previous_response_id").is_none());
    // A third turn needs only the second.
    let third: Value = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "more", "previous_response_id": second["id"]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(third["status"], "completed");
    assert_eq!(
        h.mock().requests()[2].body["input"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    let resp = h
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "x", "previous_response_id": "resp_nope"}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "previous_response_id");
}

#[tokio::test]
async fn a_keyed_chat_stream_resumes_after_its_last_event_and_never_runs_twice() {
    let h = Harness::start().await;
    h.mock().set_default(slow(30));
    let body = json!({"model": "m", "stream": true,
                      "messages": [{"role": "user", "content": LONG}]});
    let mut resp = keyed(&h, &body, "key-1", None).await;
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while events(&seen).len() < 4 {
        let chunk = tokio::time::timeout(HANG, resp.chunk()).await.unwrap();
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    drop(resp);
    let before = events(&seen);
    let last = before.last().unwrap().0.expect("chat events carry ids");
    let resumed = keyed(&h, &body, "key-1", Some(last)).await;
    let after = events(
        &tokio::time::timeout(HANG, resumed.text())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(after[0].0, Some(last + 1));
    let all: Vec<(Option<u64>, Value)> = before.into_iter().chain(after).collect();
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, (id, _))| *id == Some(i as u64)));
    assert_eq!(all.last().unwrap().1, Value::String("[DONE]".into()));
    let text: String = all
        .iter()
        .filter_map(|(_, e)| {
            e.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, format!("You said: {LONG}"));
    // The same key without Last-Event-ID: the whole stream again.
    let replay = keyed(&h, &body, "key-1", None).await;
    let replayed = events(&replay.text().await.unwrap());
    assert_eq!(replayed.len(), all.len());
    assert_eq!(h.mock().requests().len(), 1, "one generation for the key");
}

#[tokio::test]
async fn a_keyed_chat_retried_gets_the_same_answer_from_one_generation() {
    let h = Harness::start().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]});
    let first: Value = keyed(&h, &body, "key-2", None).await.json().await.unwrap();
    let again: Value = keyed(&h, &body, "key-2", None).await.json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first["choices"][0]["message"]["content"], "You said: hello");
    assert_eq!(h.mock().requests().len(), 1);
    // While the first is still being made, a retry is told so.
    h.mock().set_default(MockReply::Echo {
        delay: Duration::from_millis(500),
        chunk_delay: Duration::ZERO,
    });
    let (a, b) = tokio::join!(keyed(&h, &body, "key-3", None), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        keyed(&h, &body, "key-3", None).await
    });
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 409);
    assert_eq!(h.mock().requests().len(), 2);
}

#[tokio::test]
async fn resuming_past_the_end_of_a_running_response_waits_for_its_end() {
    let h = Harness::start().await;
    h.mock().set_default(slow(20));
    let body = json!({"model": "m", "input": LONG, "background": true});
    let queued: Value = h.post("/v1/responses", &body).await.json().await.unwrap();
    let id = queued["id"].as_str().unwrap();
    let resp = h
        .get(&format!(
            "/v1/responses/{id}?stream=true&starting_after=100000"
        ))
        .await;
    assert_eq!(resp.status(), 200);
    let rest = tokio::time::timeout(HANG, resp.text())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, "", "no event past the end");
    // The stream ended because the response did, not before.
    let done: Value = h
        .get(&format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "completed");
}

#[tokio::test]
async fn an_oversized_input_is_a_400_naming_it() {
    let h = Harness::start().await;
    let items: Vec<Value> = (0..5000)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let resp = h
        .post("/v1/responses", &json!({"model": "m", "input": items}))
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "input", "{v}");
}
