//! One answer written out in the Responses dialect: a response object, or
//! typed events each with its `sequence_number`.
//!
//! The chunk's text and function calls are the truth (Backstop may have cut
//! them to `max_output_tokens`, or joined a continuation to them); a native
//! event is the template they are written into, so its other fields and
//! every event type Backstop does not model pass on intact. Events a chat
//! answer lacks are made up. The lifecycle is Backstop's own: `created` and
//! `in_progress` once, the message's closing events and the final event
//! once, at the end, with the whole text; so a stream continued by another
//! target stays one response with one message, under one id.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::decode::usage_value;
use crate::api::Api;
use crate::chat::{ChatChunk, ChatCompletion, ChunkChoice, Content, Usage};
use crate::request::Request;
use crate::sse;

/// Writes one answer as a Responses object or event stream.
#[derive(Debug)]
pub struct ResponseWriter {
    id: String,
    created_at: u64,
    model: String,
    /// The request fields a response object repeats.
    echo: Value,
    seq: u64,
    created: bool,
    in_progress: bool,
    /// The assistant message, once it has begun.
    message: Option<MessageItem>,
    /// Function calls made up from chat deltas, by the chat's call index.
    calls: BTreeMap<u32, Call>,
    /// Output items a native target finished, by output index.
    items: BTreeMap<u32, Value>,
    /// The next free output index.
    next_index: u32,
    finish: Option<String>,
    usage: Option<Usage>,
    /// The native target's final response object.
    terminal: Option<Value>,
    ended: bool,
    /// The status `response.created` shows: `queued` for a background job.
    first_status: &'static str,
}

/// The assistant message item and its text so far.
#[derive(Debug)]
struct MessageItem {
    id: String,
    index: u32,
    part_open: bool,
    text: String,
    /// A native target's closing events, sent at the end with the whole text.
    text_done: Option<Value>,
    part_done: Option<Value>,
    item_done: Option<Value>,
}

/// A function call made up from chat deltas.
#[derive(Debug)]
struct Call {
    id: String,
    call_id: String,
    name: String,
    arguments: String,
    index: u32,
}

impl ResponseWriter {
    /// A writer for `req`'s answer, as response `id` made at `created_at`.
    pub fn new(req: &Request, id: String, created_at: u64) -> Self {
        let fields = match &req.api {
            Api::Responses(r) => r.fields.clone(),
            _ => Default::default(),
        };
        let field = |key: &str, default: Value| {
            fields
                .get(key)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        let chat = &req.chat;
        let echo = json!({
            "background": field("background", json!(false)),
            "instructions": field("instructions", Value::Null),
            "max_output_tokens": chat.max_completion_tokens,
            "metadata": field("metadata", json!({})),
            "parallel_tool_calls": field("parallel_tool_calls", json!(true)),
            "previous_response_id": field("previous_response_id", Value::Null),
            "reasoning": field("reasoning", json!({"effort": null, "summary": null})),
            "store": field("store", json!(true)),
            "temperature": chat.temperature.unwrap_or(1.0),
            "text": field("text", json!({"format": {"type": "text"}})),
            "tool_choice": field("tool_choice", json!("auto")),
            "tools": field("tools", json!([])),
            "top_p": chat.top_p.unwrap_or(1.0),
            "truncation": field("truncation", json!("disabled")),
            "user": field("user", Value::Null),
        });
        ResponseWriter {
            id,
            created_at,
            model: chat.model.clone(),
            echo,
            seq: 0,
            created: false,
            in_progress: false,
            message: None,
            calls: BTreeMap::new(),
            items: BTreeMap::new(),
            next_index: 0,
            finish: None,
            usage: None,
            terminal: None,
            ended: false,
            first_status: "in_progress",
        }
    }

    /// A writer for a background job: its response is created `queued`.
    pub fn queued(mut self) -> Self {
        self.first_status = "queued";
        self
    }

    /// A writer that goes on from `events`, the events of this response
    /// already sent (after a restart): numbering, the message and its text
    /// continue where they stopped. The text so far, for the target that
    /// continues it; `None` when a function call was under way, which no
    /// target can continue.
    pub fn resume(&mut self, events: &[Value]) -> Option<String> {
        self.seq = events.len() as u64;
        self.created = !events.is_empty();
        let mut continuable = true;
        for event in events {
            let kind = event
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let index = event
                .get("output_index")
                .and_then(Value::as_u64)
                .map(|i| i as u32);
            match kind {
                "response.created" => {
                    if let Some(response) = event.get("response") {
                        self.terminal.get_or_insert_with(|| response.clone());
                    }
                }
                "response.in_progress" => self.in_progress = true,
                "response.output_item.added" => {
                    let item = event.get("item");
                    let item_type = item.and_then(|i| i.get("type")).and_then(Value::as_str);
                    match (item_type, index) {
                        (Some("message"), Some(index)) => {
                            let id = item.and_then(|i| i.get("id")).and_then(Value::as_str);
                            let id = id
                                .map(str::to_string)
                                .unwrap_or_else(|| self.item_id("msg", 0));
                            self.open_message(Some((id, index)));
                        }
                        (_, Some(index)) => {
                            continuable = false;
                            self.next_index = self.next_index.max(index + 1);
                        }
                        _ => {}
                    }
                }
                "response.content_part.added" => self.keep(|m| m.part_open = true),
                "response.output_text.delta" => {
                    let delta = event
                        .get("delta")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    self.keep(|m| m.text.push_str(delta));
                }
                "response.output_item.done" => {
                    if let (Some(index), Some(item)) = (index, event.get("item")) {
                        self.items.insert(index, item.clone());
                    }
                }
                _ => {}
            }
        }
        continuable.then(|| {
            self.message
                .as_ref()
                .map(|m| m.text.clone())
                .unwrap_or_default()
        })
    }

    /// The response id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The whole answer as a response object.
    pub fn completion(&mut self, completion: ChatCompletion) -> Value {
        self.terminal = completion.native.map(|n| *n);
        self.take_model(&completion.model);
        self.usage = completion.usage;
        if let Some(choice) = completion.choices.into_iter().find(|c| c.index == 0) {
            let message = choice.message;
            let text = message.content.as_ref().map(Content::to_text);
            let calls = message.tool_calls.unwrap_or_default();
            if text.as_ref().is_some_and(|t| !t.is_empty()) || calls.is_empty() {
                self.open_message(None).text = text.unwrap_or_default();
            }
            for (i, call) in (0u32..).zip(calls) {
                let index = self.take_index();
                self.calls.insert(
                    i,
                    Call {
                        id: self.item_id("fc", i),
                        call_id: call.id,
                        name: call.function.name,
                        arguments: call.function.arguments,
                        index,
                    },
                );
            }
            self.finish = choice.finish_reason;
        }
        self.ended = true;
        self.object(self.status())
    }

    /// One chunk of the answer as events onto `out`.
    pub fn chunk(&mut self, mut chunk: ChatChunk, out: &mut Vec<u8>) -> serde_json::Result<()> {
        if self.ended {
            return Ok(());
        }
        self.take_model(&chunk.model);
        if let Some(usage) = chunk.usage.take() {
            self.usage = Some(usage);
        }
        let choice = chunk.choices.into_iter().find(|c| c.index == 0);
        if let Some(finish) = choice.as_ref().and_then(|c| c.finish_reason.clone()) {
            self.finish = Some(finish);
        }
        match chunk.native {
            Some(event) => self.native(*event, choice, out),
            None => self.made_up(choice, out),
        }
    }

    /// The end of the answer: the message's closing events and the final
    /// `response.completed` (or `response.incomplete`) onto `out`.
    pub fn end(&mut self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        if std::mem::replace(&mut self.ended, true) {
            return Ok(());
        }
        self.start(out)?;
        let status = self.status();
        let item_status = if status == "incomplete" {
            "incomplete"
        } else {
            "completed"
        };
        if let Some(m) = self.message.as_mut() {
            let (id, index, text) = (m.id.clone(), m.index, m.text.clone());
            let mut text_done = m.text_done.take().unwrap_or_else(|| {
                json!({"type": "response.output_text.done", "item_id": id,
                       "output_index": index, "content_index": 0, "logprobs": []})
            });
            text_done["text"] = json!(text);
            let mut part_done = m.part_done.take().unwrap_or_else(|| {
                json!({"type": "response.content_part.done", "item_id": id,
                       "output_index": index, "content_index": 0})
            });
            part_done["part"] = output_text(&text);
            let mut item_done = m.item_done.take().unwrap_or_else(
                || json!({"type": "response.output_item.done", "output_index": index}),
            );
            item_done["item"] = message_item(&id, item_status, &text);
            if !m.part_open {
                m.part_open = true;
                self.emit(part_added(&id, index), out)?;
            }
            for event in [text_done, part_done, item_done] {
                self.emit(event, out)?;
            }
        }
        let calls: Vec<(String, u32, Value)> = self
            .calls
            .values()
            .map(|c| (c.id.clone(), c.index, call_item(c)))
            .collect();
        for (id, index, item) in calls {
            self.emit(
                json!({"type": "response.function_call_arguments.done", "item_id": id,
                       "output_index": index, "arguments": item["arguments"]}),
                out,
            )?;
            self.emit(
                json!({"type": "response.output_item.done", "output_index": index, "item": item}),
                out,
            )?;
        }
        let kind = format!("response.{status}");
        let response = self.object(status);
        self.emit(json!({"type": kind, "response": response}), out)
    }

    /// The end of an answer that failed: an `error` event and
    /// `response.failed`, with the text so far; never a completed response.
    /// `error` is an OpenAI error object (`message`, `type`, `code`).
    pub fn fail(&mut self, error: &Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
        if std::mem::replace(&mut self.ended, true) {
            return Ok(());
        }
        self.start(out)?;
        let message = error
            .get("message")
            .cloned()
            .unwrap_or(json!("the answer failed"));
        let code = error
            .get("code")
            .filter(|c| !c.is_null())
            .or_else(|| error.get("type"))
            .cloned()
            .unwrap_or(json!("server_error"));
        self.emit(
            json!({"type": "error", "code": code, "message": message, "param": null}),
            out,
        )?;
        let mut response = self.object("failed");
        response["error"] = json!({"code": code, "message": message});
        self.emit(
            json!({"type": "response.failed", "response": response}),
            out,
        )
    }

    /// Writes a native event into the stream: text from the chunk, the
    /// lifecycle and the message's closing events Backstop's own.
    fn native(
        &mut self,
        mut event: Value,
        choice: Option<ChunkChoice>,
        out: &mut Vec<u8>,
    ) -> serde_json::Result<()> {
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let item_type = event.pointer("/item/type").and_then(Value::as_str);
        let is_message = item_type == Some("message");
        let index = event.get("output_index").and_then(Value::as_u64);
        match kind.as_str() {
            "response.created" | "response.in_progress" => {
                if let Some(response) = event.get("response").cloned() {
                    self.terminal.get_or_insert(response);
                }
                self.start(out)
            }
            // Backstop answers in the foreground of its own jobs.
            "response.queued" => Ok(()),
            "response.output_item.added" if is_message => {
                if self.message.is_some() {
                    return Ok(());
                }
                self.start(out)?;
                let id = event.pointer("/item/id").and_then(Value::as_str);
                let index = index.map(|i| i as u32);
                let item = self.open_message(id.map(str::to_string).zip(index));
                let (id, index) = (item.id.clone(), item.index);
                event["item"]["id"] = json!(id);
                event["output_index"] = json!(index);
                self.emit(event, out)
            }
            "response.content_part.added" => match &mut self.message {
                Some(m) if !m.part_open => {
                    m.part_open = true;
                    event["item_id"] = json!(m.id);
                    event["output_index"] = json!(m.index);
                    self.emit(event, out)
                }
                _ => Ok(()),
            },
            "response.output_text.delta" => {
                let text = choice.and_then(|c| c.delta.content).unwrap_or_default();
                self.text(text, Some(event), out)
            }
            "response.output_text.done" => {
                self.keep(|m| m.text_done = Some(event));
                Ok(())
            }
            "response.content_part.done" => {
                self.keep(|m| m.part_done = Some(event));
                Ok(())
            }
            "response.output_item.done" if is_message => {
                self.keep(|m| m.item_done = Some(event));
                Ok(())
            }
            "response.completed" | "response.incomplete" => {
                self.terminal = event.get("response").cloned();
                Ok(())
            }
            _ => {
                if let Some(index) = index {
                    self.next_index = self.next_index.max(index as u32 + 1);
                    if kind == "response.output_item.done" {
                        self.items.insert(index as u32, event["item"].clone());
                    }
                }
                self.start(out)?;
                self.emit(event, out)
            }
        }
    }

    /// Writes a chunk of a chat answer as the events it stands for.
    fn made_up(
        &mut self,
        choice: Option<ChunkChoice>,
        out: &mut Vec<u8>,
    ) -> serde_json::Result<()> {
        self.start(out)?;
        let Some(choice) = choice else {
            return Ok(());
        };
        let delta = choice.delta;
        if let Some(text) = delta.content {
            self.text(text, None, out)?;
        }
        for call in delta.tool_calls.into_iter().flatten() {
            let function = call.function.unwrap_or_default();
            if !self.calls.contains_key(&call.index) {
                let index = self.take_index();
                let new = Call {
                    id: self.item_id("fc", call.index),
                    call_id: call.id.unwrap_or_else(|| self.item_id("call", call.index)),
                    name: function.name.clone().unwrap_or_default(),
                    arguments: String::new(),
                    index,
                };
                let mut item = call_item(&new);
                item["status"] = json!("in_progress");
                self.calls.insert(call.index, new);
                self.emit(
                    json!({"type": "response.output_item.added", "output_index": index,
                           "item": item}),
                    out,
                )?;
            }
            let Some(args) = function.arguments.filter(|a| !a.is_empty()) else {
                continue;
            };
            let Some(made) = self.calls.get_mut(&call.index) else {
                continue;
            };
            made.arguments.push_str(&args);
            let (id, index) = (made.id.clone(), made.index);
            self.emit(
                json!({"type": "response.function_call_arguments.delta", "item_id": id,
                       "output_index": index, "delta": args}),
                out,
            )?;
        }
        Ok(())
    }

    /// Adds text to the message, opening it first if need be, as a delta
    /// event (a native one as its template).
    fn text(
        &mut self,
        text: String,
        native: Option<Value>,
        out: &mut Vec<u8>,
    ) -> serde_json::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        self.start(out)?;
        if self.message.is_none() {
            let item = self.open_message(None);
            let (id, index) = (item.id.clone(), item.index);
            self.emit(
                json!({"type": "response.output_item.added", "output_index": index,
                       "item": {"id": id, "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []}}),
                out,
            )?;
        }
        let Some(m) = self.message.as_mut() else {
            return Ok(());
        };
        let (id, index) = (m.id.clone(), m.index);
        let open = std::mem::replace(&mut m.part_open, true);
        m.text.push_str(&text);
        if !open {
            self.emit(part_added(&id, index), out)?;
        }
        let mut event = native.unwrap_or_else(|| json!({"logprobs": []}));
        event["type"] = json!("response.output_text.delta");
        event["item_id"] = json!(id);
        event["output_index"] = json!(index);
        event["content_index"] = json!(0);
        event["delta"] = json!(text);
        self.emit(event, out)
    }

    /// Sends `response.created` and `response.in_progress`, once each.
    fn start(&mut self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        if !std::mem::replace(&mut self.created, true) {
            let response = self.object(self.first_status);
            self.emit(
                json!({"type": "response.created", "response": response}),
                out,
            )?;
        }
        if !std::mem::replace(&mut self.in_progress, true) {
            let response = self.object("in_progress");
            self.emit(
                json!({"type": "response.in_progress", "response": response}),
                out,
            )?;
        }
        Ok(())
    }

    /// Keeps a native closing event of the message for the end.
    fn keep(&mut self, f: impl FnOnce(&mut MessageItem)) {
        if let Some(m) = self.message.as_mut() {
            f(m);
        }
    }

    /// The message item, opened with a native `(id, index)` or Backstop's.
    fn open_message(&mut self, native: Option<(String, u32)>) -> &mut MessageItem {
        let item = match self.message.take() {
            Some(m) => m,
            None => {
                let (id, index) = match native {
                    Some((id, index)) => {
                        self.next_index = self.next_index.max(index + 1);
                        (id, index)
                    }
                    None => (self.item_id("msg", 0), self.take_index()),
                };
                MessageItem {
                    id,
                    index,
                    part_open: false,
                    text: String::new(),
                    text_done: None,
                    part_done: None,
                    item_done: None,
                }
            }
        };
        self.message.insert(item)
    }

    fn take_index(&mut self) -> u32 {
        self.next_index += 1;
        self.next_index - 1
    }

    /// An item id of this response: `{prefix}_{the response id's own part}_{n}`.
    fn item_id(&self, prefix: &str, n: u32) -> String {
        let own = self.id.strip_prefix("resp_").unwrap_or(&self.id);
        format!("{prefix}_{own}{n}")
    }

    fn take_model(&mut self, model: &str) {
        if !model.is_empty() {
            self.model = model.to_string();
        }
    }

    /// `completed`, or `incomplete` when the answer was cut short.
    fn status(&self) -> &'static str {
        match self.finish.as_deref() {
            Some("length" | "content_filter") => "incomplete",
            _ => "completed",
        }
    }

    /// The response object as it stands, with `status`: a native target's
    /// own object where there is one (its fields intact, Backstop's id, the
    /// text as sent), made up from the request otherwise.
    pub fn object(&self, status: &str) -> Value {
        let mut o = match &self.terminal {
            Some(native) if native.is_object() => native.clone(),
            _ => {
                let mut o = self.echo.clone();
                o["created_at"] = json!(self.created_at);
                o["model"] = json!(self.model);
                o["error"] = Value::Null;
                o["incomplete_details"] = Value::Null;
                o["usage"] = Value::Null;
                o["output"] = json!([]);
                o
            }
        };
        o["id"] = json!(self.id);
        o["object"] = json!("response");
        o["status"] = json!(status);
        // What Backstop does itself, the target never saw.
        for key in super::OWN {
            o[key] = self.echo[key].clone();
        }
        o["incomplete_details"] = match (status, self.finish.as_deref()) {
            ("incomplete", Some("content_filter")) => json!({"reason": "content_filter"}),
            ("incomplete", _) => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        };
        if let Some(usage) = &self.usage {
            o["usage"] = usage_value(usage);
        }
        if status != "in_progress" && status != "queued" {
            o["output"] = self.output(o.get("output"));
        }
        o
    }

    /// The output items: a native target's own, the message's text set to
    /// what was sent; or the message and calls as Backstop made them.
    fn output(&self, native: Option<&Value>) -> Value {
        let status = if self.status() == "incomplete" {
            "incomplete"
        } else {
            "completed"
        };
        if let Some(Value::Array(items)) = native.filter(|_| self.terminal.is_some()) {
            if !items.is_empty() {
                let mut items = items.clone();
                let text = self.message.as_ref().map(|m| m.text.as_str());
                if let (Some(item), Some(text)) = (
                    items
                        .iter_mut()
                        .find(|i| i.get("type").and_then(Value::as_str) == Some("message")),
                    text,
                ) {
                    set_text(item, text);
                }
                return Value::Array(items);
            }
        }
        let mut by_index: BTreeMap<u32, Value> = self.items.clone();
        if let Some(m) = &self.message {
            by_index.insert(m.index, message_item(&m.id, status, &m.text));
        }
        for call in self.calls.values() {
            by_index.insert(call.index, call_item(call));
        }
        Value::Array(by_index.into_values().collect())
    }

    /// Writes one event with the next sequence number.
    fn emit(&mut self, mut event: Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
        event["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        // A line break in a (native) type would end the field early and
        // let the rest pass as SSE of the upstream's making.
        out.extend_from_slice(b"event: ");
        for part in kind.split(['\r', '\n']) {
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'\n');
        sse::encode_json(&event, out)
    }
}

/// An `output_text` part.
fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// The `content_part.added` event of the message's one text part.
fn part_added(id: &str, index: u32) -> Value {
    json!({"type": "response.content_part.added", "item_id": id, "output_index": index,
           "content_index": 0, "part": output_text("")})
}

/// The assistant message as an output item.
fn message_item(id: &str, status: &str, text: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant",
           "content": [output_text(text)]})
}

/// A function call as an output item.
fn call_item(call: &Call) -> Value {
    json!({"id": call.id, "type": "function_call", "status": "completed",
           "call_id": call.call_id, "name": call.name, "arguments": call.arguments})
}

/// Sets a native message item's (first) text part to `text`.
fn set_text(item: &mut Value, text: &str) {
    let parts = item.get_mut("content").and_then(Value::as_array_mut);
    match parts.and_then(|p| {
        p.iter_mut()
            .find(|p| p.get("type").and_then(Value::as_str) == Some("output_text"))
    }) {
        Some(part) => part["text"] = json!(text),
        None => item["content"] = json!([output_text(text)]),
    }
}
