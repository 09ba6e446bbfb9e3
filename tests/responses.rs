//! The Responses API through Backstop: passed through to an upstream that
//! speaks it (fields and events intact, under Backstop's id), translated
//! for one that serves chat only, continued when a stream breaks, and bad
//! requests refused with the parameter named.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use backstop_testkit::{MockReply, SseStep};
use backstop_tests::{output_text, Harness};
use serde_json::{json, Value};

/// The events of a Responses stream, in order; each has an `id:` line (its
/// sequence number, for `Last-Event-ID`) and an `event:` line that names
/// its type.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let field = |name: &str| {
                e.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {e}"))
            };
            let v: Value =
                serde_json::from_str(field("data: ")).unwrap_or_else(|err| panic!("{err}: {e}"));
            assert_eq!(Some(field("event: ")), v["type"].as_str(), "{e}");
            assert_eq!(field("id: "), v["sequence_number"].to_string(), "{e}");
            v
        })
        .collect()
}

/// What every Responses stream must be: numbered from 0 without a gap,
/// `response.created` first, one final event last, every response object
/// under one id; the id.
fn check_stream(events: &[Value]) -> String {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], json!(i), "{events:#?}");
    }
    assert_eq!(events[0]["type"], "response.created", "{events:#?}");
    let id = events[0]["response"]["id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with("resp_") && id != "resp_mock",
        "Backstop's own id: {id}"
    );
    for e in events.iter().filter(|e| e.get("response").is_some()) {
        assert_eq!(e["response"]["id"], json!(id), "{e}");
    }
    let finals = events
        .iter()
        .filter(|e| {
            let kind = e["type"].as_str().unwrap_or_default();
            matches!(
                kind,
                "response.completed" | "response.incomplete" | "response.failed"
            )
        })
        .count();
    assert_eq!(finals, 1, "{events:#?}");
    id
}

#[tokio::test]
async fn responses_reach_a_responses_upstream_intact_under_backstops_id() {
    let h = Harness::start().await;
    let body = json!({"model": "gpt-4o-mini", "input": "hello", "store": false,
                      "metadata": {"k": "v"}, "x_client": {"new": 1}, "max_output_tokens": 50});
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert!(v["id"].as_str().unwrap().starts_with("resp_") && v["id"] != "resp_mock");
    assert_eq!(output_text(&v), "You said: hello");
    assert_eq!(v["status"], "completed");
    assert_eq!(
        v["x_mock"], "kept",
        "the upstream's own fields pass on: {v}"
    );
    let sent = &h.mock().requests()[0];
    assert_eq!(sent.path, "/v1/responses");
    assert_eq!(sent.body["x_client"], json!({"new": 1}), "{}", sent.body);
    assert_eq!(sent.body["metadata"], json!({"k": "v"}));
    assert_eq!(sent.body["max_output_tokens"], 50);
    assert_eq!(sent.body["input"], "hello");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = h.post("/v1/responses", &streamed).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "a Responses stream has no [DONE]");
    assert!(
        text.contains("event: response.output_text.delta\n"),
        "{text}"
    );
    let events = events(&text);
    check_stream(&events);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(
        kinds.contains(&"response.x_mock.note"),
        "an unknown event passes on: {kinds:?}"
    );
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .collect();
    assert!(deltas.iter().all(|d| d["obfuscation"] == "x"), "{deltas:?}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed");
    assert_eq!(output_text(&last["response"]), "You said: hello");
    assert_eq!(last["response"]["x_mock"], "kept");
    assert!(last["response"]["usage"]["output_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn responses_reach_a_chat_only_upstream_as_chats() {
    let h = Harness::start().await;
    h.mock()
        .push([MockReply::error(404, "invalid_request_error", "Not found")]);
    let body = json!({"model": "gpt-4o-mini", "instructions": "Be brief.",
                      "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}],
                      "tools": [{"type": "function", "name": "lookup",
                                 "parameters": {"type": "object"}}]});
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(output_text(&v), "You said: hello");
    assert_eq!(v["instructions"], "Be brief.");
    assert_eq!(
        v["tools"][0]["name"], "lookup",
        "the request's tools, as sent"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = h.post("/v1/responses", &streamed).await;
    let events = events(&resp.text().await.unwrap());
    check_stream(&events);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    for kind in [
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    let done = events.last().unwrap();
    assert_eq!(output_text(&done["response"]), "You said: hello");
    assert!(done["response"]["usage"]["input_tokens"].as_u64().unwrap() > 0);

    // One 404, then chats only, each the request's chat view.
    let sent = h.mock().requests();
    let paths: Vec<&str> = sent.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/responses",
            "/v1/chat/completions",
            "/v1/chat/completions"
        ]
    );
    let chat = &sent[2].body;
    assert_eq!(
        chat["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(chat["messages"][1]["content"], "hello");
    assert_eq!(chat["tools"][0]["function"]["name"], "lookup", "{chat}");
    assert_eq!(chat["stream_options"]["include_usage"], true);
    assert!(chat.get("input").is_none() && chat.get("instructions").is_none());
}

/// A native Responses stream that says `pieces` and is cut.
fn cut_stream(pieces: &[&str]) -> MockReply {
    let open = json!({"id": "resp_up", "object": "response", "status": "in_progress",
                      "created_at": 1, "model": "gpt-4o-mini", "output": []});
    let mut steps = vec![
        json!({"type": "response.created", "response": open}),
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"id": "msg_up", "type": "message", "role": "assistant", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": "msg_up", "output_index": 0,
               "content_index": 0, "part": {"type": "output_text", "text": ""}}),
    ];
    for piece in pieces {
        steps.push(
            json!({"type": "response.output_text.delta", "item_id": "msg_up",
                          "output_index": 0, "content_index": 0, "delta": piece}),
        );
    }
    let mut steps: Vec<SseStep> = steps
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["sequence_number"] = json!(i);
            SseStep::event(e["type"].as_str().unwrap(), &e.to_string())
        })
        .collect();
    steps.push(SseStep::Cut);
    MockReply::sse(steps)
}

#[tokio::test]
async fn a_responses_stream_cut_mid_answer_is_continued_under_the_same_id() {
    let h = Harness::with_targets(2, "").await;
    h.mocks[0].push([cut_stream(&["The answer", " is"])]);
    let body = json!({"model": "gpt-4o-mini", "input": "what is it?", "stream": true});
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 200);
    let events = events(&resp.text().await.unwrap());
    check_stream(&events);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{events:#?}");
    let text = output_text(&last["response"]);
    assert!(
        text.starts_with("The answer is") && text.len() > "The answer is".len(),
        "{text:?}"
    );
    // One message, opened once, whose deltas add up to the final text.
    let added: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "response.output_item.added")
        .collect();
    assert_eq!(added.len(), 1, "{events:#?}");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| {
            assert_eq!(e["item_id"], "msg_up");
            e["delta"].as_str().unwrap()
        })
        .collect();
    assert_eq!(deltas, text);
    // The continuation went to the next target as a chat, with the answer so far.
    let sent = &h.mocks[1].requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert!(
        sent.body.to_string().contains("The answer is"),
        "{}",
        sent.body
    );
}

#[tokio::test]
async fn a_responses_stream_nobody_can_finish_ends_failed_not_completed() {
    let h = Harness::start().await;
    h.mock().push([cut_stream(&["The answer", " is"])]);
    let body = json!({"model": "gpt-4o-mini", "input": "what is it?", "stream": true});
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 200);
    let events = events(&resp.text().await.unwrap());
    check_stream(&events);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(!kinds.contains(&"response.completed"), "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 2..], ["error", "response.failed"]);
    let failed = &events.last().unwrap()["response"];
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"]["message"].as_str().is_some(), "{failed}");
}

#[tokio::test]
async fn bad_responses_requests_get_400s_naming_the_parameter() {
    let h = Harness::start().await;
    let cases = [
        (json!({"model": "m"}), "input"),
        (json!({"model": "m", "input": 5}), "input"),
        (json!({"model": "m", "input": []}), "input"),
        (json!({"input": "hi"}), "model"),
        (
            json!({"model": "m", "input": [{"type": "telepathy"}]}),
            "input[0].type",
        ),
        (
            json!({"model": "m", "input": [{"role": "robot", "content": "hi"}]}),
            "input[0].role",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "hologram"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}),
            "input[0].call_id",
        ),
        (
            json!({"model": "m", "input": "hi", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"model": "m", "input": "hi", "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"model": "m", "input": "hi", "text": {"format": {"type": "xml"}}}),
            "text.format.type",
        ),
        (
            json!({"model": "m", "input": "hi", "background": "yes"}),
            "background",
        ),
        (
            json!({"model": "m", "input": "hi", "previous_response_id": "resp_x"}),
            "previous_response_id",
        ),
    ];
    for (body, param) in cases {
        let resp = h.post("/v1/responses", &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    assert!(
        h.mock().requests().is_empty(),
        "no bad request went upstream"
    );
    let resp = h.get("/v1/responses").await;
    assert_eq!(resp.status(), 405);

    // A hosted tool cannot go to a target that serves chat only.
    let h = Harness::with_targets(1, "responses = false").await;
    let body = json!({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]});
    let resp = h.post("/v1/responses", &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "tools", "{v}");
    assert_eq!(v["error"]["code"], "unsupported_parameter");
    assert!(h.mock().requests().is_empty());
}
