//! The Responses API (`POST /v1/responses`) over the one schema.
//!
//! A request's `instructions` and `input` (a text, or items: messages,
//! function calls and their outputs) become the chat view's messages; its
//! sampling fields, tools, tool choice and text format become the chat's.
//! Everything else is kept as sent ([`Responses`]), so a target that speaks
//! this dialect natively gets the body back intact, unknown fields
//! included. Answers read into the one schema in [`decode`], each keeping
//! the object or event as sent; [`ResponseWriter`] writes an answer out as
//! a response object or as typed events, passing native events on and
//! making up the ones a chat answer lacks.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::chat::{
    ChatRequest, Content, ContentPart, Extra, FunctionCall, FunctionDef, Message, Role,
    StreamOptions, Tool, ToolCall,
};
use crate::error::InvalidRequest;
use crate::request::{check, from_path, invalid, Outgoing, Request};

pub mod decode;
mod writer;

pub use writer::ResponseWriter;

/// What the Responses API adds to a chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct Responses {
    /// `input` exactly as sent: a text, or items.
    pub input: Value,
    /// Every field the chat view does not own, as sent (`instructions`,
    /// `tools`, `text`, `store`, `metadata`, `reasoning`, unknown ones).
    pub fields: Extra,
}

/// Fields the chat view owns: read into it, written back from it.
const OWNED: [&str; 5] = [
    "model",
    "stream",
    "temperature",
    "top_p",
    "max_output_tokens",
];

/// Fields Backstop acts on itself and never sends upstream: it runs a
/// background response as its own job, and resolves a conversation's
/// earlier turns from its own store.
const OWN: [&str; 2] = ["background", "previous_response_id"];

/// Input item types OpenAI documents that only a target speaking this
/// dialect can take (hosted tools, references to stored items).
const NATIVE_ONLY: [&str; 16] = [
    "item_reference",
    "file_search_call",
    "web_search_call",
    "computer_call",
    "computer_call_output",
    "image_generation_call",
    "code_interpreter_call",
    "local_shell_call",
    "local_shell_call_output",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "mcp_call",
    "custom_tool_call",
    "custom_tool_call_output",
    "compaction",
];

/// Request fields with no chat equivalent: a chat target cannot serve them.
const NATIVE_FIELDS: [&str; 2] = ["prompt", "conversation"];

/// The chat-owned fields, typed, so a bad one is a 400 naming it.
#[derive(Deserialize)]
struct Owned {
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
}

/// Parses a `POST /v1/responses` body into its chat view and what only
/// this dialect has.
pub(crate) fn parse(body: &[u8]) -> Result<(ChatRequest, Responses), InvalidRequest> {
    let mut fields: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(invalid("request body must be a JSON object".into(), None)),
        Err(e) => return Err(invalid(format!("invalid JSON: {e}"), None)),
    };
    let owned: Map<String, Value> = OWNED
        .iter()
        .filter_map(|key| fields.remove(*key).map(|v| (key.to_string(), v)))
        .collect();
    let owned: Owned = serde_path_to_error::deserialize(Value::Object(owned)).map_err(from_path)?;
    let input = fields
        .remove("input")
        .ok_or_else(|| invalid("missing field `input`".into(), Some("input".into())))?;
    if let Some(cap) = owned.max_output_tokens {
        check(cap >= 1, "max_output_tokens", "must be at least 1")?;
    }
    for key in ["background", "store"] {
        if let Some(v) = fields.get(key).filter(|v| !v.is_null()) {
            check(v.is_boolean(), key, "must be true or false")?;
        }
    }
    if let Some(v) = fields.get("previous_response_id").filter(|v| !v.is_null()) {
        check(v.is_string(), "previous_response_id", "must be a string")?;
    }
    let mut messages = Vec::new();
    match fields.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(Message::text(Role::System, text.clone())),
        Some(_) => check(false, "instructions", "must be a string")?,
    }
    input_messages(&input, &mut messages)?;
    if messages.is_empty() && !native_items(&input) {
        return Err(invalid(
            "`input` must hold at least one message".into(),
            Some("input".into()),
        ));
    }
    let stream = owned.stream;
    let chat = ChatRequest {
        model: owned.model,
        messages,
        stream,
        // Usage fills the response's `usage`: ask a chat target for it.
        stream_options: (stream == Some(true)).then(|| StreamOptions {
            include_usage: Some(true),
            extra: Extra::new(),
        }),
        max_tokens: None,
        max_completion_tokens: owned.max_output_tokens,
        n: None,
        stop: None,
        temperature: owned.temperature,
        top_p: owned.top_p,
        seed: None,
        response_format: response_format(fields.get("text"))?,
        tools: tools(fields.get("tools"))?,
        tool_choice: tool_choice(fields.get("tool_choice")),
        extra: chat_extra(&fields),
    };
    Ok((chat, Responses { input, fields }))
}

impl Responses {
    /// The first field a chat target cannot carry: an input item or a tool
    /// only this dialect has, a hosted tool choice, a stored prompt or
    /// conversation.
    pub fn untranslatable(&self) -> Option<&'static str> {
        if native_items(&self.input) {
            return Some("input");
        }
        let tools = self.fields.get("tools").and_then(Value::as_array);
        if tools
            .into_iter()
            .flatten()
            .any(|t| t.get("type").and_then(Value::as_str) != Some("function"))
        {
            return Some("tools");
        }
        let choice = self.fields.get("tool_choice").filter(|c| c.is_object());
        if choice.is_some_and(|c| c.get("type").and_then(Value::as_str) != Some("function")) {
            return Some("tool_choice");
        }
        NATIVE_FIELDS
            .into_iter()
            .find(|key| self.fields.get(*key).is_some_and(|v| !v.is_null()))
    }

    /// Whether the client asked for a background response.
    pub fn background(&self) -> bool {
        self.fields.get("background").and_then(Value::as_bool) == Some(true)
    }
}

/// Whether `input` holds an item only a native target can take: one of
/// [`NATIVE_ONLY`], or an image given by file id.
fn native_items(input: &Value) -> bool {
    let Some(items) = input.as_array() else {
        return false;
    };
    items.iter().any(|item| {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
        NATIVE_ONLY.contains(&kind)
            || item
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|part| {
                    part.get("type").and_then(Value::as_str) == Some("input_image")
                        && part.get("image_url").and_then(Value::as_str).is_none()
                })
    })
}

/// The chat messages `input` holds, after `messages`.
fn input_messages(input: &Value, messages: &mut Vec<Message>) -> Result<(), InvalidRequest> {
    let items = match input {
        Value::String(text) => {
            messages.push(Message::text(Role::User, text.clone()));
            return Ok(());
        }
        Value::Array(items) => items,
        _ => {
            return Err(invalid(
                "`input` must be a string or an array of input items".into(),
                Some("input".into()),
            ))
        }
    };
    for (i, item) in items.iter().enumerate() {
        let at = |field: &str| format!("input[{i}]{field}");
        let Some(obj) = item.as_object() else {
            return Err(invalid(
                format!("`{}` must be an object", at("")),
                Some(at("")),
            ));
        };
        let text = |key: &str| -> Result<String, InvalidRequest> {
            match obj.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(invalid(
                    format!("`{}` must be a string", at(&format!(".{key}"))),
                    Some(at(&format!(".{key}"))),
                )),
            }
        };
        let kind = match obj.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            None if obj.contains_key("role") => "message",
            _ => {
                return Err(invalid(
                    format!("`{}` must name the item's type", at(".type")),
                    Some(at(".type")),
                ))
            }
        };
        match kind {
            "message" => {
                let role = match obj.get("role").and_then(Value::as_str) {
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("system") => Role::System,
                    Some("developer") => Role::Developer,
                    _ => {
                        return Err(invalid(
                            format!(
                                "`{}` must be `user`, `assistant`, `system` or `developer`",
                                at(".role")
                            ),
                            Some(at(".role")),
                        ))
                    }
                };
                let mut message = Message::text(role, String::new());
                message.content = Some(content(obj.get("content"), &at(".content"))?);
                messages.push(message);
            }
            "function_call" => {
                let call = ToolCall {
                    id: text("call_id")?,
                    kind: "function".into(),
                    function: FunctionCall {
                        name: text("name")?,
                        arguments: text("arguments")?,
                        extra: Extra::new(),
                    },
                    extra: Extra::new(),
                };
                // Calls in a row are one assistant turn's parallel calls.
                match messages.last_mut() {
                    Some(last) if last.role == Role::Assistant && last.tool_calls.is_some() => {
                        last.tool_calls.get_or_insert_with(Vec::new).push(call)
                    }
                    _ => {
                        let mut turn = Message::text(Role::Assistant, String::new());
                        turn.content = None;
                        turn.tool_calls = Some(vec![call]);
                        messages.push(turn);
                    }
                }
            }
            "function_call_output" => {
                let output = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(parts @ Value::Array(_)) => {
                        content(Some(parts), &at(".output"))?.to_text()
                    }
                    _ => {
                        return Err(invalid(
                            format!("`{}` must be a string or content parts", at(".output")),
                            Some(at(".output")),
                        ))
                    }
                };
                let mut message = Message::text(Role::Tool, output);
                message.tool_call_id = Some(text("call_id")?);
                messages.push(message);
            }
            // A model's reasoning is its own; a chat takes none back.
            "reasoning" => {}
            kind if NATIVE_ONLY.contains(&kind) => {}
            kind => {
                return Err(invalid(
                    format!("`{}` is an unknown input item type `{kind}`", at(".type")),
                    Some(at(".type")),
                ))
            }
        }
    }
    Ok(())
}

/// A message's content: a text, or input parts as chat content parts.
fn content(value: Option<&Value>, at: &str) -> Result<Content, InvalidRequest> {
    let parts = match value {
        Some(Value::String(s)) => return Ok(Content::Text(s.clone())),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(invalid(
                format!("`{at}` must be a string or an array of content parts"),
                Some(at.to_string()),
            ))
        }
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let field = |key: &str| part.get(key).cloned();
        let text_of = |key: &str| part.get(key).and_then(Value::as_str).map(str::to_string);
        let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
        let chat = match kind {
            "input_text" | "output_text" | "text" => ContentPart {
                kind: "text".into(),
                text: Some(text_of("text").ok_or_else(|| {
                    invalid(
                        format!("`{at}.text` must be a string"),
                        Some(format!("{at}.text")),
                    )
                })?),
                extra: Extra::new(),
            },
            "refusal" => ContentPart {
                kind: "text".into(),
                text: text_of("refusal"),
                extra: Extra::new(),
            },
            "input_image" => {
                let mut image = Map::new();
                image.insert("url".into(), field("image_url").unwrap_or_default());
                if let Some(detail) = field("detail") {
                    image.insert("detail".into(), detail);
                }
                let mut extra = Extra::new();
                extra.insert("image_url".into(), Value::Object(image));
                ContentPart {
                    kind: "image_url".into(),
                    text: None,
                    extra,
                }
            }
            "input_file" => {
                let file: Map<String, Value> = ["file_id", "file_data", "filename"]
                    .into_iter()
                    .filter_map(|key| Some((key.to_string(), field(key)?)))
                    .collect();
                let mut extra = Extra::new();
                extra.insert("file".into(), Value::Object(file));
                ContentPart {
                    kind: "file".into(),
                    text: None,
                    extra,
                }
            }
            other => {
                return Err(invalid(
                    format!("`{at}.type` is an unknown content part type `{other}`"),
                    Some(format!("{at}.type")),
                ))
            }
        };
        out.push(chat);
    }
    // Text alone reads as a text: what every target (and template) takes.
    if out.iter().all(|p| p.kind == "text") {
        return Ok(Content::Text(
            out.iter().filter_map(|p| p.text.as_deref()).collect(),
        ));
    }
    Ok(Content::Parts(out))
}

/// The chat `response_format` for a Responses `text.format`.
fn response_format(text: Option<&Value>) -> Result<Option<Value>, InvalidRequest> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = format.as_object().cloned().unwrap_or_default();
            schema.remove("type");
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid(
            "`text.format.type` must be `text`, `json_object` or `json_schema`".into(),
            Some("text.format.type".into()),
        )),
    }
}

/// The chat view of the function tools; other tools are native only.
fn tools(tools: Option<&Value>) -> Result<Option<Vec<Tool>>, InvalidRequest> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(invalid(
                "`tools` must be an array".into(),
                Some("tools".into()),
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str);
        if kind.is_none() {
            check(
                false,
                &format!("tools[{i}].type"),
                "must name the tool's type",
            )?;
        }
        if kind != Some("function") {
            continue;
        }
        let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
            invalid(
                format!("`tools[{i}].name` must be a string"),
                Some(format!("tools[{i}].name")),
            )
        })?;
        let mut extra = Extra::new();
        if let Some(strict) = tool.get("strict") {
            extra.insert("strict".into(), strict.clone());
        }
        out.push(Tool {
            kind: "function".into(),
            function: Some(FunctionDef {
                name: name.to_string(),
                description: tool
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                parameters: tool.get("parameters").cloned(),
                extra,
            }),
            extra: Extra::new(),
        });
    }
    Ok((!out.is_empty()).then_some(out))
}

/// The chat `tool_choice`: a mode as it is, a function by name; a hosted
/// tool's choice is native only.
fn tool_choice(choice: Option<&Value>) -> Option<Value> {
    match choice? {
        Value::String(mode) => Some(Value::String(mode.clone())),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            Some(json!({"type": "function", "function": {"name": o.get("name")}}))
        }
        _ => None,
    }
}

/// Fields a chat takes under the same name, and `reasoning.effort` as the
/// chat's `reasoning_effort`.
fn chat_extra(fields: &Extra) -> Extra {
    let mut extra: Extra = [
        "parallel_tool_calls",
        "user",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    ]
    .into_iter()
    .filter_map(|key| Some((key.to_string(), fields.get(key)?.clone())))
    .filter(|(_, v)| !v.is_null())
    .collect();
    if let Some(effort) = fields.get("reasoning").and_then(|r| r.get("effort")) {
        if !effort.is_null() {
            extra.insert("reasoning_effort".into(), effort.clone());
        }
    }
    extra
}

/// A Responses request's body for a target that speaks the dialect: as
/// sent, with the sender's changes, less what Backstop does itself.
pub(crate) struct NativeBody<'a> {
    pub req: &'a Request,
    pub responses: &'a Responses,
    pub changes: &'a Outgoing<'a>,
}

impl Serialize for NativeBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let chat = &self.req.chat;
        let changes = self.changes;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("model", changes.model.unwrap_or(&chat.model))?;
        m.serialize_entry("input", &self.responses.input)?;
        if let Some(stream) = changes.stream.or(chat.stream) {
            m.serialize_entry("stream", &stream)?;
        }
        if let Some(t) = chat.temperature {
            m.serialize_entry("temperature", &t)?;
        }
        if let Some(p) = chat.top_p {
            m.serialize_entry("top_p", &p)?;
        }
        if let Some(cap) = chat.max_completion_tokens {
            m.serialize_entry("max_output_tokens", &(changes.cap)(cap))?;
        }
        for (key, value) in &self.responses.fields {
            if !OWN.contains(&key.as_str()) {
                m.serialize_entry(key, value)?;
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests;
