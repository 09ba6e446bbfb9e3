//! Chat completion types: the one schema every backend speaks.
//!
//! Every struct keeps the fields it does not know in `extra`, so a request or a
//! response passes through Backstop without losing what a newer API version added.

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

mod fields;
mod writer;
use fields::Fields;
pub use writer::ChatWriter;

/// Fields a type does not model, kept verbatim for the round trip.
pub type Extra = Map<String, Value>;

/// A `POST /v1/chat/completions` request body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRequest {
    /// The model the client asked for.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Whether the client wants server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Legacy cap on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Cap on generated tokens, reasoning included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// How many choices to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Structured output request (`json_object`, `json_schema`), kept opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Which tool the model must call, kept opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Every other field, passed to the upstream untouched.
    #[serde(flatten)]
    pub extra: Extra,
}

impl<'de> Deserialize<'de> for ChatRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fields::deserialize(d)
    }
}

impl Fields for ChatRequest {
    const EXPECTING: &'static str = "a chat completion request";
    const REQUIRED: &'static [&'static str] = &["model", "messages"];

    fn empty() -> Self {
        ChatRequest {
            model: String::new(),
            messages: Vec::new(),
            stream: None,
            stream_options: None,
            max_tokens: None,
            max_completion_tokens: None,
            n: None,
            stop: None,
            temperature: None,
            top_p: None,
            seed: None,
            response_format: None,
            tools: None,
            tool_choice: None,
            extra: Extra::new(),
        }
    }

    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "model" => self.model = map.next_value()?,
            "messages" => self.messages = map.next_value()?,
            "stream" => self.stream = map.next_value()?,
            "stream_options" => self.stream_options = map.next_value()?,
            "max_tokens" => self.max_tokens = map.next_value()?,
            "max_completion_tokens" => self.max_completion_tokens = map.next_value()?,
            "n" => self.n = map.next_value()?,
            "stop" => self.stop = map.next_value()?,
            "temperature" => self.temperature = map.next_value()?,
            "top_p" => self.top_p = map.next_value()?,
            "seed" => self.seed = map.next_value()?,
            "response_format" => self.response_format = map.next_value()?,
            "tools" => self.tools = map.next_value()?,
            "tool_choice" => self.tool_choice = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn extra(&mut self) -> &mut Extra {
        &mut self.extra
    }
}

impl ChatRequest {
    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client asked for a final usage chunk in its stream.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// `stream_options` of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk carrying the usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Other stream options.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `stop`: one sequence or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Up to four stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn sequences(&self) -> Vec<&str> {
        match self {
            Stop::One(s) => vec![s.as_str()],
            Stop::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the application.
    System,
    /// Instructions from the developer (newer name for system).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
    /// A legacy function result.
    Function,
}

/// One message of a conversation, or the message of a response choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text or content parts; `null` for an assistant turn that only calls tools.
    #[serde(default)]
    pub content: Option<Content>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by the assistant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A refusal by the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Other fields (`audio`, `annotations`, ...).
    #[serde(flatten)]
    pub extra: Extra,
}

impl Message {
    /// A message with plain text content.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            content: Some(Content::Text(text.into())),
            ..Message::empty_as(role)
        }
    }

    fn empty_as(role: Role) -> Self {
        Message {
            role,
            content: None,
            name: None,
            tool_calls: None,
            tool_call_id: None,
            refusal: None,
            extra: Extra::new(),
        }
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fields::deserialize(d)
    }
}

impl Fields for Message {
    const EXPECTING: &'static str = "a message";
    const REQUIRED: &'static [&'static str] = &["role"];

    fn empty() -> Self {
        Message::empty_as(Role::User)
    }

    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "role" => self.role = map.next_value()?,
            "content" => self.content = map.next_value()?,
            "name" => self.name = map.next_value()?,
            "tool_calls" => self.tool_calls = map.next_value()?,
            "tool_call_id" => self.tool_call_id = map.next_value()?,
            "refusal" => self.refusal = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn extra(&mut self) -> &mut Extra {
        &mut self.extra
    }
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts (`text`, `image_url`, `input_audio`, ...).
    Parts(Vec<ContentPart>),
}

/// Read by the JSON type it finds, not as `untagged` would (buffering the
/// whole content to try each variant in turn).
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(ContentVisitor)
    }
}

impl Content {
    /// The text of the content, text parts concatenated.
    pub fn to_text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

/// One typed content part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// The part's type, e.g. `text` or `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The rest of the part (`image_url`, ...).
    #[serde(flatten)]
    pub extra: Extra,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// The tool's type, `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function's definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDef>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A function a tool exposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// The function's name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Other fields (`strict`, ...).
    #[serde(flatten)]
    pub extra: Extra,
}

/// A tool call made by the assistant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, echoed by the tool message that answers it.
    pub id: String,
    /// The call's type, `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function called and its arguments.
    pub function: FunctionCall,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The function part of a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments, a JSON document in a string.
    pub arguments: String,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
    /// Details (`prompt_tokens_details`, ...).
    #[serde(flatten)]
    pub extra: Extra,
}

impl Usage {
    /// Counts `tokens` of a prefill as answer, not prompt: a continued
    /// stream's prefill is text the client receives, so the continuing
    /// backend's usage reports the whole answer, as if it had produced it.
    pub fn count_prefill_as_answer(&mut self, tokens: u64) {
        let moved = tokens.min(self.prompt_tokens);
        self.prompt_tokens -= moved;
        self.completion_tokens += moved;
    }
}

/// A `chat.completion` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// Completion id.
    pub id: String,
    /// Always `chat.completion`.
    #[serde(default = "object_chat_completion")]
    pub object: String,
    /// Unix time of creation.
    pub created: u64,
    /// The model that produced it.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<Choice>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Other fields (`service_tier`, ...).
    #[serde(flatten)]
    pub extra: Extra,
    /// The answer exactly as a target that speaks the client's own dialect
    /// sent it (a Responses object or event), for the client's writer to
    /// pass on with every field intact; never serialized.
    #[serde(skip)]
    pub native: Option<Box<Value>>,
}

impl ChatCompletion {
    /// The same answer as a stream: per choice a chunk with the role and the
    /// whole message, then one with its finish reason; then a usage chunk when
    /// asked. Lets a backend that answered in one piece serve a streaming client.
    pub fn into_chunks(self, include_usage: bool) -> Vec<ChatChunk> {
        let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatChunk {
            id: self.id.clone(),
            object: object_chat_chunk(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: self.system_fingerprint.clone(),
            extra: Extra::new(),
            native: None,
        };
        let mut chunks = Vec::with_capacity(self.choices.len() * 2 + 1);
        for choice in &self.choices {
            let m = &choice.message;
            let tool_calls = m.tool_calls.as_ref().map(|calls| {
                calls
                    .iter()
                    .zip(0u32..)
                    .map(|(call, index)| ToolCallDelta {
                        index,
                        id: Some(call.id.clone()),
                        kind: Some(call.kind.clone()),
                        function: Some(FunctionCallDelta {
                            name: Some(call.function.name.clone()),
                            arguments: Some(call.function.arguments.clone()),
                            extra: Extra::new(),
                        }),
                        extra: Extra::new(),
                    })
                    .collect()
            });
            let delta = Delta {
                role: Some(m.role),
                content: m.content.as_ref().map(Content::to_text),
                tool_calls,
                refusal: m.refusal.clone(),
                extra: Extra::new(),
            };
            let finish = |delta, finish_reason| ChunkChoice {
                index: choice.index,
                delta,
                finish_reason,
                logprobs: None,
                extra: Extra::new(),
            };
            chunks.push(chunk(vec![finish(delta, None)], None));
            chunks.push(chunk(
                vec![finish(Delta::default(), choice.finish_reason.clone())],
                None,
            ));
        }
        if include_usage {
            chunks.push(chunk(Vec::new(), self.usage.clone()));
        }
        chunks
    }
}

/// One choice of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Position among the choices.
    pub index: u32,
    /// The assistant's message.
    pub message: Message,
    /// Why generation ended: `stop`, `length`, `tool_calls`, `content_filter`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Log probabilities, kept opaque.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `chat.completion.chunk`: one server-sent event of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    /// Completion id, the same for every chunk of a stream.
    pub id: String,
    /// Always `chat.completion.chunk`.
    #[serde(default = "object_chat_chunk")]
    pub object: String,
    /// Unix time of creation.
    pub created: u64,
    /// The model that produced it.
    pub model: String,
    /// Deltas, one per choice (empty in the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Usage, in the last chunk when `include_usage` was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
    /// The answer exactly as a target that speaks the client's own dialect
    /// sent it (a Responses object or event), for the client's writer to
    /// pass on with every field intact; never serialized.
    #[serde(skip)]
    pub native: Option<Box<Value>>,
}

/// One choice's delta within a chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Position among the choices.
    pub index: u32,
    /// What this chunk adds.
    pub delta: Delta,
    /// Set on the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Log probabilities, kept opaque.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The increment a chunk adds to a choice's message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Set on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Text fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Refusal fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A fragment of a tool call in a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which tool call of the choice this fragment extends.
    pub index: u32,
    /// The call's id, on its first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The call's type, on its first fragment.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and argument fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Name and argument fragments of a streamed tool call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// Function name, on the first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the arguments string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Model name, as clients request it.
    pub id: String,
    /// Always `model`.
    #[serde(default = "object_model")]
    pub object: String,
    /// Unix time of creation.
    #[serde(default)]
    pub created: u64,
    /// Who owns it.
    #[serde(default)]
    pub owned_by: String,
}

/// The `GET /v1/models` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    #[serde(default = "object_list")]
    pub object: String,
    /// The models.
    pub data: Vec<Model>,
}

fn object_chat_completion() -> String {
    "chat.completion".into()
}
fn object_chat_chunk() -> String {
    "chat.completion.chunk".into()
}
fn object_model() -> String {
    "model".into()
}
fn object_list() -> String {
    "list".into()
}

#[cfg(test)]
mod tests;
