//! A native target's Responses answers read into the one schema: the text
//! and function calls of a response object or event, its finish and its
//! usage. Each keeps the object or event as sent in `native`.

use serde::de::Error as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{
    ChatChunk, ChatCompletion, Choice, ChunkChoice, Delta, Extra, FunctionCall, FunctionCallDelta,
    Message, Role, ToolCall, ToolCallDelta, Usage,
};

/// The parts of a response object the one schema reads.
#[derive(Deserialize)]
struct Object {
    id: String,
    #[serde(default)]
    created_at: Option<f64>,
    #[serde(default)]
    model: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    output: Vec<Value>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    incomplete_details: Option<Value>,
}

/// A whole response object as a completion.
pub fn completion(object: Value) -> serde_json::Result<ChatCompletion> {
    let o = Object::deserialize(&object)?;
    let finish = finish_reason(&o)?;
    let mut text = String::new();
    let mut refusal = None;
    let mut calls = Vec::new();
    for item in &o.output {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match part.get("type").and_then(Value::as_str) {
                        Some("output_text") => {
                            text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("refusal") => {
                            refusal = part.get("refusal").and_then(Value::as_str).map(Into::into)
                        }
                        _ => {}
                    }
                }
            }
            Some("function_call") => {
                let field = |key: &str| {
                    item.get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                calls.push(ToolCall {
                    id: field("call_id"),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: field("name"),
                        arguments: field("arguments"),
                        extra: Extra::new(),
                    },
                    extra: Extra::new(),
                });
            }
            _ => {}
        }
    }
    let mut message = Message::text(Role::Assistant, text);
    if message
        .content
        .as_ref()
        .is_some_and(|c| c.to_text().is_empty())
        && !calls.is_empty()
    {
        message.content = None;
    }
    message.refusal = refusal;
    message.tool_calls = (!calls.is_empty()).then_some(calls);
    Ok(ChatCompletion {
        id: o.id,
        object: "chat.completion".into(),
        created: o.created_at.unwrap_or_default() as u64,
        model: o.model,
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: Some(finish.into()),
            logprobs: None,
            extra: Extra::new(),
        }],
        usage: o.usage.as_ref().and_then(usage),
        system_fingerprint: None,
        extra: Extra::new(),
        native: Some(Box::new(object)),
    })
}

/// The chat finish reason of a finished response; an error for one that
/// is not finished.
fn finish_reason(o: &Object) -> serde_json::Result<&'static str> {
    match o.status.as_deref() {
        Some("incomplete") => {
            let reason = o
                .incomplete_details
                .as_ref()
                .and_then(|d| d.get("reason"))
                .and_then(Value::as_str);
            Ok(match reason {
                Some("content_filter") => "content_filter",
                _ => "length",
            })
        }
        None | Some("completed") => {
            let called = o
                .output
                .iter()
                .any(|i| i.get("type").and_then(Value::as_str) == Some("function_call"));
            Ok(if called { "tool_calls" } else { "stop" })
        }
        Some(status) => Err(serde_json::Error::custom(format!(
            "the response is `{status}`, not finished"
        ))),
    }
}

/// One stream event as a chunk: text and function-call deltas become the
/// chunk's delta, the final event its finish and usage; every other event
/// is an empty chunk. A failure event is an error.
pub fn chunk(data: &str) -> serde_json::Result<ChatChunk> {
    let event: Value = serde_json::from_str(data)?;
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| serde_json::Error::custom("a Responses event without a `type`"))?;
    let response = event.get("response");
    let mut delta = Delta::default();
    let mut finish = None;
    let mut used = None;
    let index = event
        .get("output_index")
        .and_then(Value::as_u64)
        .unwrap_or_default() as u32;
    match kind {
        "response.output_text.delta" => {
            let text = event.get("delta").and_then(Value::as_str);
            delta.content = Some(text.unwrap_or_default().to_string());
        }
        "response.output_item.added"
            if event.pointer("/item/type").and_then(Value::as_str) == Some("function_call") =>
        {
            let field = |key: &str| {
                event
                    .pointer(&format!("/item/{key}"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            delta.tool_calls = Some(vec![ToolCallDelta {
                index,
                id: field("call_id"),
                kind: Some("function".into()),
                function: Some(FunctionCallDelta {
                    name: field("name"),
                    arguments: Some(String::new()),
                    extra: Extra::new(),
                }),
                extra: Extra::new(),
            }]);
        }
        "response.function_call_arguments.delta" => {
            let text = event.get("delta").and_then(Value::as_str);
            delta.tool_calls = Some(vec![ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: Some(FunctionCallDelta {
                    name: None,
                    arguments: Some(text.unwrap_or_default().to_string()),
                    extra: Extra::new(),
                }),
                extra: Extra::new(),
            }]);
        }
        "response.completed" | "response.incomplete" => {
            let o = Object::deserialize(response.unwrap_or(&Value::Null))?;
            finish = Some(finish_reason(&o)?.to_string());
            used = o.usage.as_ref().and_then(usage);
        }
        "response.failed" | "error" => {
            let error = response.and_then(|r| r.get("error")).unwrap_or(&event);
            let message = error.get("message").and_then(Value::as_str);
            return Err(serde_json::Error::custom(format!(
                "the response failed: {}",
                message.unwrap_or("no reason given")
            )));
        }
        _ => {}
    }
    let carries = delta.content.is_some() || delta.tool_calls.is_some() || finish.is_some();
    Ok(ChatChunk {
        id: response
            .and_then(|r| r.get("id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        object: "chat.completion.chunk".into(),
        created: response
            .and_then(|r| r.get("created_at"))
            .and_then(Value::as_f64)
            .unwrap_or_default() as u64,
        model: response
            .and_then(|r| r.get("model"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        choices: if carries {
            vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
                logprobs: None,
                extra: Extra::new(),
            }]
        } else {
            Vec::new()
        },
        usage: used,
        system_fingerprint: None,
        extra: Extra::new(),
        native: Some(Box::new(event)),
    })
}

/// A Responses `usage` in the one schema.
pub(crate) fn usage(u: &Value) -> Option<Usage> {
    let count = |key: &str| u.get(key).and_then(Value::as_u64);
    let prompt = count("input_tokens")?;
    let completion = count("output_tokens")?;
    let mut extra = Extra::new();
    if let Some(d) = u.get("input_tokens_details") {
        extra.insert("prompt_tokens_details".into(), d.clone());
    }
    if let Some(d) = u.get("output_tokens_details") {
        extra.insert("completion_tokens_details".into(), d.clone());
    }
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: count("total_tokens").unwrap_or(prompt + completion),
        extra,
    })
}

/// The one schema's usage written as a Responses `usage`.
pub(crate) fn usage_value(u: &Usage) -> Value {
    let details = |key: &str, default: Value| u.extra.get(key).cloned().unwrap_or(default);
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": details("prompt_tokens_details", json!({"cached_tokens": 0})),
        "output_tokens": u.completion_tokens,
        "output_tokens_details":
            details("completion_tokens_details", json!({"reasoning_tokens": 0})),
        "total_tokens": u.total_tokens,
    })
}
