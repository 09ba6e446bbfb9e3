use serde_json::{json, Value};

use super::*;

/// The upstream body of `req`, unchanged, as JSON.
fn sent(req: &Request) -> Value {
    serde_json::from_slice(&req.upstream_body(&Outgoing::AS_SENT).unwrap()).unwrap()
}

fn err(body: &str) -> InvalidRequest {
    Request::parse_chat(body.as_bytes()).unwrap_err()
}

#[test]
fn bad_bodies_name_the_parameter() {
    let e = err("{not json");
    assert!(e.message.contains("invalid"), "{e:?}");

    let e = err(r#"{"model":"m"}"#);
    assert_eq!(e.param.as_deref(), Some("messages"));

    let e = err(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    assert!(e.message.contains("wizard"));

    let e = err(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#);
    assert_eq!(e.param.as_deref(), Some("max_tokens"));

    let e = err(r#"{"model":"m","messages":[]}"#);
    assert_eq!(e.param.as_deref(), Some("messages"));

    let e = err(r#"{"model":"m","messages":[{"content":"x"}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].role"));

    let e = err(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].content"));
    assert!(e.message.contains("content parts"), "{e:?}");

    let e = err(r#"{"model":"m","messages":[{"role":"user","content":[{"text":"x"}]}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));

    let e = err(r#"{"model":"m","messages":[{"role":"user"}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].content"));
    let e = err(
        r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"system","content":null}]}"#,
    );
    assert_eq!(e.param.as_deref(), Some("messages[1].content"));
    let e = err(r#"{"model":"m","messages":[{"role":"assistant"}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].content"));
    let e = err(r#"{"model":"m","messages":[{"role":"tool","content":"42"}]}"#);
    assert_eq!(e.param.as_deref(), Some("messages[0].tool_call_id"));
    // An assistant turn that only calls a tool has no content, rightly.
    let calls = r#"{"model":"m","messages":[{"role":"user","content":"x"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
         "function":{"name":"f","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"42"}]}"#;
    assert!(Request::parse_chat(calls.as_bytes()).is_ok());

    let e = err(r#"[1,2]"#);
    assert_eq!(e.param, None);

    let e = err(r#"{"model":"m","messages":[{"role":"user","content":"x"}]} trailing"#);
    assert!(e.message.contains("JSON"), "{e:?}");
}

#[test]
fn legacy_request_maps_to_chat_and_back_unchanged() {
    let body = json!({
        "model": "gpt-3.5-turbo-instruct",
        "prompt": "Say this is a test",
        "max_tokens": 7,
        "temperature": 0,
        "echo": true,
        "suffix": "!",
        "logprobs": 2,
        "best_of": 3,
        "stop": "\n",
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "u"
    });
    let req = Request::parse_legacy(body.to_string().as_bytes()).unwrap();
    assert_eq!(req.chat.messages.len(), 1);
    assert_eq!(req.chat.messages[0].role, Role::User);
    assert_eq!(
        req.chat.messages[0].content.as_ref().unwrap().to_text(),
        "Say this is a test"
    );
    assert!(req.chat.is_stream());
    assert_eq!(req.chat.max_tokens, Some(7));
    // Legacy-only fields do not leak into the chat view.
    assert!(!req.chat.extra.contains_key("echo"));
    let mut expected = body;
    expected["temperature"] = json!(0.0);
    assert_eq!(sent(&req), expected);
}

#[test]
fn legacy_prompts_of_every_shape() {
    for prompt in [
        json!("x"),
        json!(["a", "b"]),
        json!([1, 2, 3]),
        json!([[1], [2]]),
    ] {
        let body = json!({"model": "m", "prompt": prompt});
        let req = Request::parse_legacy(body.to_string().as_bytes()).unwrap();
        assert_eq!(sent(&req)["prompt"], prompt);
    }
    let e = Request::parse_legacy(br#"{"model":"m","prompt":{"a":1}}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("prompt"));
    let e = Request::parse_legacy(br#"{"model":"m"}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("prompt"));
    let e = Request::parse_legacy(br#"{"model":"m","prompt":"x","max_tokens":-1}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("max_tokens"));
}

#[test]
fn chat_request_body_is_the_chat_body() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": 1});
    let req = Request::parse_chat(body.to_string().as_bytes()).unwrap();
    assert_eq!(sent(&req), body);

    // Every field the schema knows, and unknown ones, go through as sent.
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "x": [1]}],
        "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": 9, "max_completion_tokens": 8, "n": 2, "stop": ["a", "b"],
        "temperature": 0.5, "top_p": 0.25, "seed": 7,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto", "metadata": {"k": "v"}
    });
    let req = Request::parse_chat(body.to_string().as_bytes()).unwrap();
    assert_eq!(sent(&req), body);

    // The sender's changes: the upstream's model name, no stream (so no
    // stream options), and both token caps through its function.
    let changed = req
        .upstream_body(&Outgoing {
            wire: None,
            model: Some("upstream-model"),
            stream: Some(false),
            cap: &|n| n - 5,
        })
        .unwrap();
    let changed: Value = serde_json::from_slice(&changed).unwrap();
    let mut expected = body;
    expected["model"] = json!("upstream-model");
    expected["stream"] = json!(false);
    expected.as_object_mut().unwrap().remove("stream_options");
    expected["max_tokens"] = json!(4);
    expected["max_completion_tokens"] = json!(3);
    assert_eq!(changed, expected);
}

#[test]
fn a_prefill_is_a_final_partial_assistant_turn_or_the_end_of_a_text_prompt() {
    let mut req =
        Request::parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
            .unwrap();
    req.prefill = Some("Hello th".into());
    let body = sent(&req);
    assert_eq!(
        body["messages"][1],
        json!({"role": "assistant", "content": "Hello th"})
    );

    let mut req = Request::parse_legacy(br#"{"model":"m","prompt":"Once upon"}"#).unwrap();
    req.prefill = Some(" a time".into());
    assert_eq!(sent(&req)["prompt"], "Once upon a time");
}

#[test]
fn every_sampling_parameter_is_checked_and_named() {
    let with = |field: &str, value: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        body[field] = value;
        Request::parse_chat(body.to_string().as_bytes())
    };
    let bad = [
        ("temperature", json!(2.5)),
        ("temperature", json!(-0.1)),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-1)),
        ("top_k", json!(0)),
        ("top_k", json!(2.5)),
        ("repetition_penalty", json!(0)),
        ("repetition_penalty", json!("x")),
        ("repetition_penalty", json!(-1)),
        ("min_p", json!(2)),
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!("high")),
        ("n", json!(0)),
        ("n", json!(129)),
        ("max_tokens", json!(0)),
        ("max_completion_tokens", json!(0)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("seed", json!("s")),
        ("seed", json!(1.5)),
        ("logprobs", json!(3)),
        ("top_logprobs", json!(21)),
        ("logit_bias", json!([1])),
    ];
    for (field, value) in bad {
        let e = with(field, value.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(field), "{field} = {value}: {e:?}");
        assert!(e.message.contains(field), "{e:?}");
    }
    let e = with("logit_bias", json!({"50256": -101})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("logit_bias.50256"));
    let e = with("logit_bias", json!({"word": 1})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("logit_bias.word"));

    let good = [
        ("temperature", json!(0)),
        ("temperature", json!(2)),
        ("top_p", json!(1e-308)),
        ("top_k", json!(40)),
        ("repetition_penalty", json!(1.1)),
        ("n", json!(2)),
        ("stop", json!(["a", "b", "c", "d"])),
        ("seed", json!(-7)),
        ("logit_bias", json!({"50256": -100, "11": 2.5})),
        ("presence_penalty", json!(null)),
    ];
    for (field, value) in good {
        assert!(with(field, value.clone()).is_ok(), "{field} = {value}");
    }
}

#[test]
fn legacy_only_fields_are_checked() {
    let with = |field: &str, value: Value| {
        let mut body = json!({"model": "m", "prompt": "x"});
        body[field] = value;
        Request::parse_legacy(body.to_string().as_bytes())
    };
    for (field, value) in [
        ("logprobs", json!(6)),
        ("best_of", json!(0)),
        ("best_of", json!(21)),
        ("echo", json!("yes")),
        ("suffix", json!(3)),
        ("temperature", json!(9)),
    ] {
        let e = with(field, value.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(field), "{field} = {value}: {e:?}");
    }
    assert!(with("best_of", json!(3)).is_ok());
}

#[test]
fn what_a_chat_cannot_carry_of_a_legacy_request_is_named() {
    let legacy = |body: Value| {
        let req = Request::parse_legacy(body.to_string().as_bytes()).unwrap();
        let n = req.chat.n.unwrap_or(1);
        req.api.legacy().unwrap().untranslatable(n)
    };
    assert_eq!(
        legacy(json!({"model": "m", "prompt": "x", "echo": true})),
        None
    );
    assert_eq!(
        legacy(json!({"model": "m", "prompt": "x", "best_of": 2, "n": 2})),
        None
    );
    assert_eq!(
        legacy(json!({"model": "m", "prompt": ["a", "b"]})),
        Some("prompt")
    );
    assert_eq!(
        legacy(json!({"model": "m", "prompt": "x", "suffix": "y"})),
        Some("suffix")
    );
    assert_eq!(
        legacy(json!({"model": "m", "prompt": "x", "logprobs": 1})),
        Some("logprobs")
    );
    assert_eq!(
        legacy(json!({"model": "m", "prompt": "x", "best_of": 3})),
        Some("best_of")
    );

    // Sent as a chat: the prompt is the user's message, legacy fields stay home.
    let req = Request::parse_legacy(br#"{"model":"m","prompt":"x","echo":true}"#).unwrap();
    let body = req
        .upstream_body(&Outgoing {
            wire: Some(Wire::Chat),
            ..Outgoing::AS_SENT
        })
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    );
    assert_eq!(req.api.legacy().unwrap().echo(), Some("x"));
}
