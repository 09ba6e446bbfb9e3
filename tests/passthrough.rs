//! A client gets what the upstream would have given it, through Backstop.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use backstop_testkit::{MockReply, SseStep};
use backstop_tests::{sse_data, streamed_text, Harness};
use serde_json::{json, Value};

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello there"}]})
}

#[tokio::test]
async fn non_streaming_chat_is_what_the_upstream_said() {
    let h = Harness::start().await;
    h.mock().push([MockReply::Json {
        status: 200,
        body: json!({"id": "chatcmpl-9", "object": "chat.completion", "created": 1712345678,
                     "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44",
                     "service_tier": "default",
                     "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Hi!", "refusal": null}}],
                     "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14,
                               "completion_tokens_details": {"reasoning_tokens": 0}}}),
        headers: vec![
            ("x-ratelimit-remaining-tokens".into(), "149984".into()),
            ("x-ratelimit-reset-requests".into(), "6m0s".into()),
        ],
    }]);
    let resp = h.post("/v1/chat/completions", &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    assert_eq!(resp.headers()["x-backstop-attempts"], "1");
    assert_eq!(resp.headers()["x-ratelimit-remaining-tokens"], "149984");
    assert_eq!(resp.headers()["x-ratelimit-reset-requests"], "6m0s");
    let metrics = h.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("backstop_ratelimit_remaining{kind=\"tokens\",target=\"up0\"} 149984"),
        "{metrics}"
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    // Semantically identical: `refusal: null` is the only thing that may drop.
    let expected = json!({"id": "chatcmpl-9", "object": "chat.completion", "created": 1712345678,
                     "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44",
                     "service_tier": "default",
                     "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Hi!"}}],
                     "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14,
                               "completion_tokens_details": {"reasoning_tokens": 0}}});
    assert_eq!(body, expected);
    let sent = &h.mock().requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.headers["authorization"], "Bearer sk-test");
    assert_eq!(sent.body["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn request_fields_reach_the_upstream_unchanged() {
    let h = Harness::start().await;
    let body = json!({
        "model": "gpt-4o", "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto", "n": 2, "stop": ["\n"], "seed": 7, "max_tokens": 50,
        "max_completion_tokens": 60, "response_format": {"type": "json_object"},
        "parallel_tool_calls": false, "metadata": {"team": "a"}, "brand_new_option": [1, {"x": null}]
    });
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let mut sent = h.mock().requests()[0].body.clone();
    assert_eq!(sent["stream"], json!(false));
    sent.as_object_mut().unwrap().remove("stream");
    assert_eq!(sent, body);
}

#[tokio::test]
async fn streaming_chat_arrives_chunk_by_chunk_and_ends_with_done() {
    let h = Harness::start().await;
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&payloads), "You said: hello there");
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage["choices"], json!([]));
    let first: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
}

#[tokio::test]
async fn streamed_tool_call_fragments_pass_through() {
    let h = Harness::start().await;
    let frag = |delta: Value, finish: Value| {
        SseStep::Data(
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            .to_string(),
        )
    };
    h.mock().push([MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![
            frag(json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]}), json!(null)),
            frag(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), json!(null)),
            frag(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), json!(null)),
            frag(json!({}), json!("tool_calls")),
            SseStep::Data("[DONE]".into()),
        ],
    }]);
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    let payloads = sse_data(&resp.text().await.unwrap());
    let args: String = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/tool_calls/0/function/arguments")?
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(args, "{\"city\":\"Paris\"}");
    let finish: Value = serde_json::from_str(&payloads[3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(payloads.len(), 5);
}

#[tokio::test]
async fn legacy_completions_go_to_the_legacy_endpoint_both_ways() {
    let h = Harness::start().await;
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test",
                      "max_tokens": 16, "echo": false});
    let resp = h.post("/v1/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "You said: Say this is a test");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let sent = &h.mock().requests()[0];
    assert_eq!(sent.path, "/v1/completions");
    assert_eq!(sent.body["prompt"], "Say this is a test");
    assert_eq!(sent.body["echo"], false);

    let mut body = body;
    body["stream"] = json!(true);
    let resp = h.post("/v1/completions", &body).await;
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(streamed_text(&payloads), "You said: Say this is a test");
    let first: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn legacy_completions_reach_a_chat_only_target_as_chats() {
    let h = Harness::start().await;
    // OpenAI's own answer for a chat model on the legacy endpoint.
    h.mock().push([MockReply::error(
        404,
        "invalid_request_error",
        "This is a chat model and not supported in the v1/completions endpoint. \
         Did you mean to use v1/chat/completions?",
    )]);
    let mut body = json!({"model": "gpt-4o-mini", "prompt": "Say this is a test",
                          "max_tokens": 16, "echo": true});
    let resp = h.post("/v1/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-attempts"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    // The echo is Backstop's: the prompt, then the answer.
    let echoed = "Say this is a testYou said: Say this is a test";
    assert_eq!(v["choices"][0]["text"], echoed);
    let sent = h.mock().requests();
    assert_eq!(sent[0].path, "/v1/completions");
    assert_eq!(sent[1].path, "/v1/chat/completions");
    assert_eq!(
        sent[1].body["messages"],
        json!([{"role": "user", "content": "Say this is a test"}])
    );
    assert!(sent[1].body.get("prompt").is_none() && sent[1].body.get("echo").is_none());

    // Later legacy requests go as chats at once, streams too.
    body["stream"] = json!(true);
    let resp = h.post("/v1/completions", &body).await;
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(streamed_text(&payloads), echoed);
    let first: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(h.mock().requests()[2].path, "/v1/chat/completions");

    // A legacy field a chat cannot carry is a 400 naming it.
    let resp = h
        .post(
            "/v1/completions",
            &json!({"model": "m", "prompt": "x", "suffix": "!"}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "suffix");
    assert_eq!(h.mock().requests().len(), 3);

    // An unknown model is a 404 on both endpoints: the client gets the
    // legacy 404, and the next legacy request still tries the legacy endpoint.
    let h = Harness::start().await;
    let missing = || {
        MockReply::error(
            404,
            "invalid_request_error",
            "The model `nope` does not exist",
        )
    };
    h.mock().push([missing(), missing()]);
    let resp = h
        .post("/v1/completions", &json!({"model": "nope", "prompt": "hi"}))
        .await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    let resp = h
        .post("/v1/completions", &json!({"model": "m", "prompt": "hi"}))
        .await;
    assert_eq!(resp.status(), 200);
    let paths: Vec<String> = h.mock().requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/v1/completions", "/v1/chat/completions", "/v1/completions"]
    );

    // A target set `completions = false` gets chats from the first request.
    let h = Harness::with_targets(1, "completions = false").await;
    let resp = h
        .post("/v1/completions", &json!({"model": "m", "prompt": "hi"}))
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], "You said: hi");
    assert_eq!(h.mocks[0].requests()[0].path, "/v1/chat/completions");
}

#[tokio::test]
async fn models_are_listed_from_the_upstream() {
    let h = Harness::start().await;
    let v: Value = h.get("/v1/models").await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "mock-model");
}

#[tokio::test]
async fn a_failing_first_target_is_skipped_before_the_first_byte() {
    let h = Harness::with_targets(2, "").await;
    h.mocks[0].push([MockReply::Raw {
        status: 503,
        content_type: Some("text/html".into()),
        body: "<h1>down</h1>".into(),
    }]);
    let resp = h.post("/v1/chat/completions", &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "up1");
    assert_eq!(resp.headers()["x-backstop-attempts"], "2");

    // A stream that dies before its first chunk fails over too.
    h.mocks[0].push([MockReply::Sse {
        status: 200,
        headers: vec![],
        steps: vec![SseStep::Cut],
    }]);
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up1");
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(streamed_text(&payloads), "You said: hello there");
}

#[tokio::test]
async fn http2_to_the_upstream_works() {
    let h = Harness::with_targets(1, "http2 = true").await;
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(streamed_text(&payloads), "You said: hello there");
    assert_eq!(h.mock().requests()[0].version, http::Version::HTTP_2);
}
