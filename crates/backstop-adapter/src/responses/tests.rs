#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};

use crate::api::Wire;
use crate::chat::{ChatChunk, Content, Role};
use crate::request::{Outgoing, Request};
use crate::responses::ResponseWriter;

fn parse(body: Value) -> Request {
    Request::parse_responses(body.to_string().as_bytes()).unwrap()
}

fn param(body: Value) -> Option<String> {
    Request::parse_responses(body.to_string().as_bytes())
        .unwrap_err()
        .param
}

/// SSE bytes as the events' JSON.
fn events(out: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(out).unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

#[test]
fn input_and_instructions_become_the_chat_view() {
    let req = parse(json!({
        "model": "gpt-4o-mini",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Look: "},
                                         {"type": "input_text", "text": "this"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "reasoning", "summary": []},
            {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
        ],
        "max_output_tokens": 64,
        "temperature": 0.5,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {}}},
        "reasoning": {"effort": "low"},
    }));
    let chat = &req.chat;
    let roles: Vec<Role> = chat.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::User
        ]
    );
    assert_eq!(
        chat.messages[1].content,
        Some(Content::Text("Look: this".into()))
    );
    let calls = chat.messages[2].tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 2, "calls in a row are one turn");
    assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("c1"));
    let Some(Content::Parts(parts)) = &chat.messages[4].content else {
        panic!("{:?}", chat.messages[4]);
    };
    assert_eq!(parts[0].extra["image_url"]["url"], "https://x/y.png");
    assert_eq!(chat.max_completion_tokens, Some(64));
    assert_eq!(chat.temperature, Some(0.5));
    let tool = chat.tools.as_ref().unwrap()[0].function.as_ref().unwrap();
    assert_eq!(tool.name, "f");
    assert_eq!(tool.extra["strict"], true);
    assert_eq!(
        chat.tool_choice,
        Some(json!({"type": "function", "function": {"name": "f"}}))
    );
    assert_eq!(
        chat.response_format.as_ref().unwrap()["json_schema"]["name"],
        "s"
    );
    assert_eq!(chat.extra["reasoning_effort"], "low");
    assert_eq!(req.api.untranslatable(1), None);
}

#[test]
fn bad_requests_name_their_parameter() {
    let cases = [
        (json!({"model": "m"}), "input"),
        (json!({"model": "m", "input": {}}), "input"),
        (json!({"model": "m", "input": []}), "input"),
        (json!({"model": "", "input": "x"}), "model"),
        (json!({"model": "m", "input": [7]}), "input[0]"),
        (
            json!({"model": "m", "input": [{"type": "x"}]}),
            "input[0].type",
        ),
        (
            json!({"model": "m", "input": [{"content": "x"}]}),
            "input[0].type",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}),
            "input[0].arguments",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": -1}),
            "max_output_tokens",
        ),
        (json!({"model": "m", "input": "x", "top_p": 0}), "top_p"),
        (
            json!({"model": "m", "input": "x", "instructions": 5}),
            "instructions",
        ),
        (json!({"model": "m", "input": "x", "store": "yes"}), "store"),
        (
            json!({"model": "m", "input": "x", "tools": [{"name": "f"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function"}]}),
            "tools[0].name",
        ),
    ];
    for (body, want) in cases {
        assert_eq!(param(body.clone()).as_deref(), Some(want), "{body}");
    }
}

#[test]
fn a_native_target_gets_the_body_as_sent_less_what_backstop_does_itself() {
    let req = parse(json!({
        "model": "m", "input": [{"role": "user", "content": "hi"}], "stream": true,
        "max_output_tokens": 100, "background": false, "x_new": {"a": 1},
        "tools": [{"type": "web_search"}], "include": ["reasoning.encrypted_content"],
    }));
    let cap = |n: u32| n / 2;
    let body = req
        .upstream_body(&Outgoing {
            wire: Some(Wire::Responses),
            model: Some("gpt-x"),
            stream: Some(true),
            cap: &cap,
        })
        .unwrap();
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        sent,
        json!({"model": "gpt-x", "input": [{"role": "user", "content": "hi"}], "stream": true,
               "max_output_tokens": 50, "x_new": {"a": 1}, "tools": [{"type": "web_search"}],
               "include": ["reasoning.encrypted_content"]})
    );
    // As a chat, the hosted tool cannot go.
    assert_eq!(req.api.untranslatable(1), Some("tools"));
    let chat: Value = serde_json::from_slice(
        &req.upstream_body(&Outgoing {
            wire: Some(Wire::Chat),
            ..Outgoing::AS_SENT
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(chat["messages"], json!([{"role": "user", "content": "hi"}]));
    assert_eq!(chat["max_completion_tokens"], 100);
    assert!(
        chat.get("input").is_none() && chat.get("x_new").is_none(),
        "{chat}"
    );
}

#[test]
fn items_only_the_responses_api_has_are_untranslatable() {
    let req = parse(json!({"model": "m", "input": [
        {"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_1"}]}));
    assert_eq!(req.api.untranslatable(1), Some("input"));
    let req = parse(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file_1"}]}]}));
    assert_eq!(req.api.untranslatable(1), Some("input"));
    let req = parse(json!({"model": "m", "input": "x",
                           "tool_choice": {"type": "file_search"}}));
    assert_eq!(req.api.untranslatable(1), Some("tool_choice"));
}

#[test]
fn a_response_object_reads_into_the_one_schema_and_keeps_itself() {
    let object = json!({"id": "resp_1", "created_at": 5, "model": "gpt", "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"}, "x": 1,
        "output": [{"type": "reasoning", "id": "rs_1"},
                   {"type": "message", "id": "msg_1", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hel"}, {"type": "output_text", "text": "lo"}]},
                   {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                  "output_tokens_details": {"reasoning_tokens": 1}}});
    let c = Wire::Responses.decode_completion(object.clone()).unwrap();
    let choice = &c.choices[0];
    assert_eq!(choice.message.content, Some(Content::Text("Hello".into())));
    assert_eq!(choice.message.tool_calls.as_ref().unwrap()[0].id, "c");
    assert_eq!(choice.finish_reason.as_deref(), Some("length"));
    let usage = c.usage.as_ref().unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 2));
    assert_eq!(c.native.as_deref(), Some(&object));
    let unfinished = json!({"id": "r", "status": "queued", "output": []});
    assert!(Wire::Responses.decode_completion(unfinished).is_err());
}

#[test]
fn events_read_into_chunks_and_failures_into_errors() {
    let delta = json!({"type": "response.output_text.delta", "delta": "Hi", "output_index": 0});
    let c = Wire::Responses.decode_chunk(&delta.to_string()).unwrap();
    assert_eq!(c.choices[0].delta.content.as_deref(), Some("Hi"));
    assert_eq!(c.native.as_deref(), Some(&delta));
    let args = json!({"type": "response.function_call_arguments.delta", "delta": "{\"a",
                      "output_index": 2});
    let c = Wire::Responses.decode_chunk(&args.to_string()).unwrap();
    let call = &c.choices[0].delta.tool_calls.as_ref().unwrap()[0];
    assert_eq!(call.index, 2);
    let done = json!({"type": "response.completed", "response": {"id": "r", "status": "completed",
        "output": [], "usage": {"input_tokens": 1, "output_tokens": 1}}});
    let c = Wire::Responses.decode_chunk(&done.to_string()).unwrap();
    assert_eq!(c.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(c.usage.as_ref().unwrap().total_tokens, 2);
    let other = json!({"type": "response.reasoning_summary_text.delta", "delta": "hmm"});
    let c = Wire::Responses.decode_chunk(&other.to_string()).unwrap();
    assert!(c.choices.is_empty(), "only the answer's text is the answer");
    for failure in [
        json!({"type": "response.failed", "response": {"error": {"message": "boom"}}}),
        json!({"type": "error", "message": "boom"}),
        json!({"no": "type"}),
    ] {
        assert!(Wire::Responses.decode_chunk(&failure.to_string()).is_err());
    }
}

fn writer(body: Value) -> ResponseWriter {
    ResponseWriter::new(&parse(body), "resp_abc".into(), 7)
}

fn chat_chunk(text: Option<&str>, finish: Option<&str>) -> ChatChunk {
    serde_json::from_value(json!({"id": "c", "created": 1, "model": "local",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}))
    .unwrap()
}

#[test]
fn a_chat_stream_is_written_as_a_whole_responses_stream() {
    let mut w = writer(json!({"model": "m", "input": "x", "metadata": {"k": 1}}));
    let mut out = Vec::new();
    for chunk in [
        chat_chunk(Some("Hel"), None),
        chat_chunk(Some("lo"), None),
        chat_chunk(None, Some("stop")),
    ] {
        w.chunk(chunk, &mut out).unwrap();
    }
    w.end(&mut out).unwrap();
    let events = events(&out);
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
    let done = &events[9]["response"];
    assert_eq!(done["id"], "resp_abc");
    assert_eq!(done["metadata"], json!({"k": 1}));
    assert_eq!(done["model"], "local");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(events[6]["text"], "Hello");
}

#[test]
fn a_capped_answer_is_incomplete_and_a_failed_one_never_completes() {
    let mut w = writer(json!({"model": "m", "input": "x"}));
    let mut out = Vec::new();
    w.chunk(chat_chunk(Some("Hi"), Some("length")), &mut out)
        .unwrap();
    w.end(&mut out).unwrap();
    let last = events(&out).pop().unwrap();
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );

    let mut w = writer(json!({"model": "m", "input": "x"}));
    let mut out = Vec::new();
    w.chunk(chat_chunk(Some("Half an"), None), &mut out)
        .unwrap();
    let error = json!({"message": "cut", "type": "server_error", "code": "stream_broken"});
    w.fail(&error, &mut out).unwrap();
    w.end(&mut out).unwrap();
    let events = events(&out);
    let kinds = kinds(&events);
    assert_eq!(kinds[kinds.len() - 2..], ["error", "response.failed"]);
    assert!(!kinds.contains(&"response.completed"));
    let failed = &events.last().unwrap()["response"];
    assert_eq!(failed["error"]["code"], "stream_broken");
    assert_eq!(failed["output"][0]["content"][0]["text"], "Half an");
}

#[test]
fn native_events_pass_on_and_a_chat_continuation_joins_the_same_message() {
    let mut w = writer(json!({"model": "m", "input": "x"}));
    let mut out = Vec::new();
    let native = |event: Value| Wire::Responses.decode_chunk(&event.to_string()).unwrap();
    for event in [
        json!({"type": "response.created", "sequence_number": 40,
               "response": {"id": "resp_up", "status": "in_progress", "x_up": 1, "output": []}}),
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"id": "msg_up", "type": "message", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": "msg_up", "output_index": 0,
               "content_index": 0, "part": {"type": "output_text", "text": ""}}),
        json!({"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0,
               "content_index": 0, "delta": "The ", "obfuscation": "q"}),
        json!({"type": "response.future.thing", "x": 2}),
    ] {
        w.chunk(native(event), &mut out).unwrap();
    }
    // The upstream broke; a chat target continues.
    w.chunk(chat_chunk(Some("end."), Some("stop")), &mut out)
        .unwrap();
    w.end(&mut out).unwrap();
    let events = events(&out);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{events:#?}");
    }
    let kinds = kinds(&events);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "response.output_item.added")
            .count(),
        1
    );
    assert!(kinds.contains(&"response.future.thing"), "{kinds:?}");
    assert_eq!(events[0]["response"]["id"], "resp_abc");
    assert_eq!(
        events[0]["response"]["x_up"], 1,
        "the upstream's fields pass on"
    );
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .collect();
    assert_eq!(deltas[0]["obfuscation"], "q");
    assert!(deltas.iter().all(|d| d["item_id"] == "msg_up"));
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        "The end."
    );
    assert_eq!(done["response"]["output"][0]["id"], "msg_up");
}

#[test]
fn a_whole_native_answer_keeps_its_fields_under_backstops_id() {
    let object = json!({"id": "resp_up", "object": "response", "status": "completed", "x_up": 1,
        "created_at": 3, "model": "gpt",
        "output": [{"type": "message", "id": "msg_up", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi", "annotations": [1]}]}]});
    let completion = Wire::Responses.decode_completion(object).unwrap();
    let mut w = writer(json!({"model": "m", "input": "x"}));
    let v = w.completion(completion);
    assert_eq!(v["id"], "resp_abc");
    assert_eq!(v["x_up"], 1);
    assert_eq!(v["output"][0]["content"][0]["annotations"], json!([1]));
    assert_eq!(v["status"], "completed");

    // A chat's whole answer, with a tool call.
    let chat: crate::chat::ChatCompletion = serde_json::from_value(json!({
        "id": "c", "created": 1, "model": "local",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
            "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}))
    .unwrap();
    let v = writer(json!({"model": "m", "input": "x"})).completion(chat);
    assert_eq!(v["output"][0]["type"], "function_call");
    assert_eq!(v["output"][0]["call_id"], "call_1");
    assert_eq!(v["usage"]["input_tokens"], 4);
    assert_eq!(v["status"], "completed");
}

#[test]
fn chat_tool_call_deltas_become_function_call_items() {
    let mut w = writer(json!({"model": "m", "input": "x"}));
    let mut out = Vec::new();
    let call = |args: &str, first: bool| -> ChatChunk {
        let mut delta = json!({"index": 0, "function": {"arguments": args}});
        if first {
            delta["id"] = json!("call_9");
            delta["function"]["name"] = json!("f");
        }
        serde_json::from_value(json!({"id": "c", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}))
        .unwrap()
    };
    w.chunk(call("", true), &mut out).unwrap();
    w.chunk(call("{\"a\":", false), &mut out).unwrap();
    w.chunk(call("1}", false), &mut out).unwrap();
    w.chunk(chat_chunk(None, Some("tool_calls")), &mut out)
        .unwrap();
    w.end(&mut out).unwrap();
    let events = events(&out);
    let done = events
        .iter()
        .find(|e| e["type"] == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done["arguments"], "{\"a\":1}");
    let last = events.last().unwrap();
    assert_eq!(last["response"]["output"][0]["call_id"], "call_9");
    assert_eq!(last["response"]["output"][0]["arguments"], "{\"a\":1}");
}

#[test]
fn a_native_event_type_cannot_break_the_event_stream() {
    let mut w = writer(json!({"model": "m", "input": "x"}));
    let mut out = Vec::new();
    let event = json!({"type": "response.x\n\ndata: {\"forged\": true}\n\nevent: y"});
    let chunk = Wire::Responses.decode_chunk(&event.to_string()).unwrap();
    w.chunk(chunk, &mut out).unwrap();
    w.end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("\ndata: {\"forged\""), "{text}");
    for (i, e) in events(text.as_bytes()).iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
}
