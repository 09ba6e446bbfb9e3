use serde_json::{json, Value};

use super::*;

fn round_trip<T: serde::de::DeserializeOwned + Serialize>(v: Value) -> Value {
    let typed: T = serde_json::from_value(v).unwrap();
    serde_json::to_value(&typed).unwrap()
}

#[test]
fn request_fields_and_unknown_fields_survive() {
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
            ], "name": "ann"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"x\":1}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 100,
        "max_completion_tokens": 120,
        "n": 2,
        "stop": ["\n\n", "END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 42,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "look", "description": "d",
                   "parameters": {"type": "object"}, "strict": true}}],
        "tool_choice": "auto",
        "logit_bias": {"50256": -100},
        "user": "u-1",
        "future_field": {"nested": [1, 2, 3]}
    });
    assert_eq!(round_trip::<ChatRequest>(body.clone()), body);
    let req: ChatRequest = serde_json::from_value(body).unwrap();
    assert!(req.is_stream() && req.include_usage());
    assert_eq!(req.stop.unwrap().sequences(), vec!["\n\n", "END"]);
    assert_eq!(req.extra.len(), 3);
}

#[test]
fn response_round_trips_with_tool_calls_and_usage_details() {
    let body = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": null, "refusal": "no",
                        "tool_calls": [{"id": "c", "type": "function",
                                        "function": {"name": "f", "arguments": "{}"}}],
                        "annotations": []},
            "finish_reason": "tool_calls", "logprobs": null
        }],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                  "prompt_tokens_details": {"cached_tokens": 0}},
        "system_fingerprint": "fp_1", "service_tier": "default"
    });
    assert_eq!(round_trip::<ChatCompletion>(body.clone()), body);
}

#[test]
fn streamed_tool_call_fragments_round_trip() {
    let chunks = [
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": null,
                 "tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}]},
                 "finish_reason": null, "logprobs": null}]}),
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                 "function": {"arguments": "{\"city\":"}}]},
                 "finish_reason": null, "logprobs": null}]}),
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
    ];
    for chunk in chunks {
        let mut expected = chunk.clone();
        // An explicit `content: null` in a delta means the same as its absence.
        if let Some(delta) = expected.pointer_mut("/choices/0/delta") {
            delta.as_object_mut().unwrap().remove("content");
        }
        assert_eq!(round_trip::<ChatChunk>(chunk), expected);
    }
}

#[test]
fn content_parts_give_their_text() {
    let c: Content = serde_json::from_value(json!([
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "b"}
    ]))
    .unwrap();
    assert_eq!(c.to_text(), "ab");
}

#[test]
fn a_completion_becomes_an_equivalent_stream() {
    let completion: ChatCompletion = serde_json::from_value(json!({
        "id": "x", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "hi",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    }))
    .unwrap();
    let chunks = completion.into_chunks(true);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    assert_eq!(chunks[0].choices[0].delta.content.as_deref(), Some("hi"));
    let call = &chunks[0].choices[0].delta.tool_calls.as_ref().unwrap()[0];
    assert_eq!(
        call.function.as_ref().unwrap().arguments.as_deref(),
        Some("{}")
    );
    assert_eq!(
        chunks[1].choices[0].finish_reason.as_deref(),
        Some("tool_calls")
    );
    assert!(chunks[2].choices.is_empty());
    assert_eq!(chunks[2].usage.as_ref().unwrap().total_tokens, 3);
    assert!(chunks
        .iter()
        .all(|c| c.id == "x" && c.object == "chat.completion.chunk"));
}
