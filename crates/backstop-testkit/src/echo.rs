//! The mock's default answers: valid OpenAI responses derived from the request.

use serde_json::{json, Value};

const CREATED: u64 = 1_700_000_000;

/// The text the echo answers with: it quotes the last message (or prompt,
/// or Responses input: a text, or the last item's text).
pub fn echo_text(body: &Value) -> String {
    let text = |c: &Value| match c {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let chat = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .or_else(|| body.get("prompt"))
        .map(text);
    let input = || {
        let last = match body.get("input")? {
            Value::Array(items) => items.last()?.get("content")?,
            input => input,
        };
        Some(match last {
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
            other => text(other),
        })
    };
    format!("You said: {}", chat.or_else(input).unwrap_or_default())
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn usage(body: &Value, answer: &str) -> Value {
    let prompt = words(&body.to_string());
    let completion = words(answer);
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

fn model(body: &Value) -> Value {
    body.get("model").cloned().unwrap_or(json!("mock-model"))
}

/// A whole completion for the request.
pub(crate) fn completion(body: &Value, legacy: bool) -> Value {
    let answer = echo_text(body);
    let usage = usage(body, &answer);
    if legacy {
        json!({"id": "cmpl-mock", "object": "text_completion", "created": CREATED,
               "model": model(body),
               "choices": [{"text": answer, "index": 0, "logprobs": null, "finish_reason": "stop"}],
               "usage": usage})
    } else {
        json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED,
               "model": model(body),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": answer,
                            "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
               "usage": usage, "system_fingerprint": "fp_mock"})
    }
}

/// The data of each event of a streamed answer, `[DONE]` last.
pub(crate) fn stream(body: &Value, legacy: bool) -> Vec<String> {
    let answer = echo_text(body);
    let include_usage = body.pointer("/stream_options/include_usage") == Some(&json!(true));
    let model = model(body);
    let mut pieces: Vec<String> = answer.split_inclusive(' ').map(str::to_string).collect();
    if pieces.is_empty() {
        pieces.push(String::new());
    }
    let chunk = |choice: Value, usage: Option<Value>| {
        let mut c = if legacy {
            json!({"id": "cmpl-mock", "object": "text_completion", "created": CREATED,
                   "model": model, "choices": [choice]})
        } else {
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
                   "model": model, "system_fingerprint": "fp_mock", "choices": [choice]})
        };
        if let Some(u) = usage {
            c["choices"] = json!([]);
            c["usage"] = u;
        }
        c.to_string()
    };
    let piece = |text: &str, first: bool, finish: Option<&str>| {
        if legacy {
            json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish})
        } else if first {
            json!({"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": null,
                   "finish_reason": finish})
        } else if finish.is_some() {
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
        }
    };
    let mut out: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| chunk(piece(p, i == 0, None), None))
        .collect();
    out.push(chunk(piece("", false, Some("stop")), None));
    if include_usage {
        out.push(chunk(json!(null), Some(usage(body, &answer))));
    }
    out.push("[DONE]".into());
    out
}

/// The echo as a Responses object, with a field no Backstop version knows.
pub(crate) fn response(body: &Value) -> Value {
    let answer = echo_text(body);
    let usage = usage(body, &answer);
    json!({"id": "resp_mock", "object": "response", "created_at": CREATED,
           "status": "completed", "model": model(body), "error": null,
           "incomplete_details": null, "x_mock": "kept",
           "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
           "output": [{"id": "msg_mock", "type": "message", "status": "completed",
                       "role": "assistant",
                       "content": [{"type": "output_text", "text": answer, "annotations": []}]}],
           "usage": {"input_tokens": usage["prompt_tokens"],
                     "output_tokens": usage["completion_tokens"],
                     "total_tokens": usage["total_tokens"]}})
}

/// The echo as Responses stream events, `(type, data)`: the documented
/// ones, with an unknown field on each delta and one event type no Backstop
/// version knows, before the message closes.
pub(crate) fn response_events(body: &Value) -> Vec<(String, String)> {
    let whole = response(body);
    let answer = echo_text(body);
    let mut open = whole.clone();
    open["status"] = json!("in_progress");
    open["output"] = json!([]);
    open["usage"] = Value::Null;
    let mut events = vec![
        json!({"type": "response.created", "response": open}),
        json!({"type": "response.in_progress", "response": open}),
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"id": "msg_mock", "type": "message", "status": "in_progress",
                        "role": "assistant", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": "msg_mock",
               "output_index": 0, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": []}}),
    ];
    for piece in answer.split_inclusive(' ') {
        events.push(
            json!({"type": "response.output_text.delta", "item_id": "msg_mock",
                           "output_index": 0, "content_index": 0, "delta": piece,
                           "logprobs": [], "obfuscation": "x"}),
        );
    }
    events.push(json!({"type": "response.x_mock.note", "note": "an event type from the future"}));
    events.push(
        json!({"type": "response.output_text.done", "item_id": "msg_mock",
                       "output_index": 0, "content_index": 0, "text": answer, "logprobs": []}),
    );
    events.push(
        json!({"type": "response.content_part.done", "item_id": "msg_mock",
                       "output_index": 0, "content_index": 0,
                       "part": {"type": "output_text", "text": answer, "annotations": []}}),
    );
    events.push(
        json!({"type": "response.output_item.done", "output_index": 0,
                       "item": whole["output"][0]}),
    );
    events.push(json!({"type": "response.completed", "response": whole}));
    events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["sequence_number"] = json!(i);
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e.to_string(),
            )
        })
        .collect()
}

/// The `GET /v1/models` answer.
pub(crate) fn model_list() -> Value {
    json!({"object": "list", "data": [
        {"id": "mock-model", "object": "model", "created": CREATED, "owned_by": "mock"}
    ]})
}
