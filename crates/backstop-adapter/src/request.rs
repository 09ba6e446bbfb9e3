//! A client's request in the one schema, parsed from any of the endpoints.
//!
//! A legacy `POST /v1/completions` body becomes a [`ChatRequest`] whose single
//! user message is the prompt, and its [`Api`] is [`Api::Legacy`] with a record
//! of what only that API has (`prompt` as sent, `echo`, `suffix`, `logprobs`,
//! `best_of`). A backend that
//! speaks the legacy API upstream rebuilds the exact legacy body from both
//! ([`Request::upstream_body`]); the others see a chat. A Responses body
//! is read the same way, in [`crate::responses`].

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::api::{Api, Wire};
use crate::chat::{ChatRequest, Extra, Message, Role};
use crate::error::InvalidRequest;

/// Fields that exist only in the legacy API.
const LEGACY_ONLY: [&str; 4] = ["echo", "suffix", "logprobs", "best_of"];

/// What the legacy API adds to a chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct Legacy {
    /// The prompt exactly as sent: a string, strings, or token arrays.
    pub prompt: Value,
    /// Legacy-only fields (`echo`, `suffix`, `logprobs`, `best_of`).
    pub fields: Extra,
}

impl Legacy {
    /// The first field a chat cannot carry, when this request goes to a
    /// target that serves chat only: a prompt that is not one text, an
    /// insertion `suffix`, legacy `logprobs`, or `best_of` above `n`.
    /// (`echo` is done by Backstop: see [`Legacy::echo`].)
    pub fn untranslatable(&self, n: u32) -> Option<&'static str> {
        let set = |key: &str| self.fields.get(key).filter(|v| !v.is_null());
        if !self.prompt.is_string() {
            Some("prompt")
        } else if set("suffix").is_some() {
            Some("suffix")
        } else if set("logprobs").is_some() {
            Some("logprobs")
        } else if set("best_of").and_then(Value::as_u64).unwrap_or(1) > u64::from(n) {
            Some("best_of")
        } else {
            None
        }
    }

    /// The prompt to put before the answer, when the client asked for an
    /// `echo` and the target that answers (a chat) does not give it.
    pub fn echo(&self) -> Option<&str> {
        let echo = self.fields.get("echo").and_then(Value::as_bool);
        self.prompt.as_str().filter(|_| echo == Some(true))
    }
}

/// A request in the one schema, whichever endpoint it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The request as a chat.
    pub chat: ChatRequest,
    /// The dialect the client spoke.
    pub api: Api,
    /// Assistant text the answer must continue from: set when a stream that
    /// broke mid-answer is continued by another backend.
    pub prefill: Option<String>,
    /// When the answer must be over: set by the router from the client's
    /// budget, so a backend that generates (the local model) stops in time.
    /// A point on the monotonic clock that tokio's `Instant` wraps (this
    /// crate has no runtime): the router sets it from tokio's clock, so
    /// paused-time tests stay in control.
    #[allow(clippy::disallowed_types)]
    pub deadline: Option<std::time::Instant>,
    /// The client's region (`x-backstop-region`, or the server's own): a
    /// target group tries its members of this region first.
    pub region: Option<String>,
}

impl Request {
    /// Parses and validates a `POST /v1/chat/completions` body.
    pub fn parse_chat(body: &[u8]) -> Result<Self, InvalidRequest> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let chat: ChatRequest = serde_path_to_error::deserialize(&mut de).map_err(from_path)?;
        de.end()
            .map_err(|e| invalid(format!("invalid JSON: {e}"), None))?;
        validate(&chat)?;
        validate_messages(&chat.messages)?;
        Ok(Request {
            chat,
            api: Api::Chat,
            prefill: None,
            deadline: None,
            region: None,
        })
    }

    /// Parses and validates a `POST /v1/completions` body.
    pub fn parse_legacy(body: &[u8]) -> Result<Self, InvalidRequest> {
        let mut map: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(invalid("request body must be a JSON object".into(), None)),
            Err(e) => return Err(invalid(format!("invalid JSON: {e}"), None)),
        };
        let prompt = map
            .remove("prompt")
            .ok_or_else(|| invalid("missing field `prompt`".into(), Some("prompt".into())))?;
        let text = prompt_text(&prompt)?;
        let mut fields = Extra::new();
        for key in LEGACY_ONLY {
            if let Some(v) = map.remove(key) {
                fields.insert(key.to_string(), v);
            }
        }
        let messages = serde_json::to_value(vec![Message::text(Role::User, text)])
            .map_err(|e| invalid(e.to_string(), None))?;
        map.insert("messages".into(), messages);
        let chat: ChatRequest =
            serde_path_to_error::deserialize(Value::Object(map)).map_err(from_path)?;
        validate(&chat)?;
        validate_legacy(&fields, chat.n.unwrap_or(1))?;
        Ok(Request {
            chat,
            api: Api::Legacy(Legacy { prompt, fields }),
            prefill: None,
            deadline: None,
            region: None,
        })
    }

    /// Parses and validates a `POST /v1/responses` body.
    pub fn parse_responses(body: &[u8]) -> Result<Self, InvalidRequest> {
        let (chat, responses) = crate::responses::parse(body)?;
        validate(&chat)?;
        Ok(Request {
            chat,
            api: Api::Responses(Box::new(responses)),
            prefill: None,
            deadline: None,
            region: None,
        })
    }

    /// The body to send to an OpenAI-compatible upstream, with `changes`:
    /// the legacy body for a legacy request, the chat body otherwise. A
    /// prefill becomes a final, partial assistant message (or the end of a
    /// legacy text prompt).
    ///
    /// Written straight from the typed request: no `Value` tree of the
    /// whole body is built on the way.
    pub fn upstream_body(&self, changes: &Outgoing) -> Result<Vec<u8>, serde_json::Error> {
        let wire = changes.wire.unwrap_or(self.api.wire());
        match self.api.responses().filter(|_| wire == Wire::Responses) {
            Some(responses) => serde_json::to_vec(&crate::responses::NativeBody {
                req: self,
                responses,
                changes,
            }),
            None => serde_json::to_vec(&Body { req: self, changes }),
        }
    }
}

/// What the sender changes in a request's body on its way upstream.
pub struct Outgoing<'a> {
    /// The dialect the target is sent, instead of the client's: a legacy
    /// request goes to a chat-only target as a chat.
    pub wire: Option<Wire>,
    /// The model name the upstream knows, instead of the client's.
    pub model: Option<&'a str>,
    /// Whether to ask for a stream, instead of what the client asked;
    /// `stream_options` goes only with a stream.
    pub stream: Option<bool>,
    /// Applied to whichever token caps (`max_tokens`,
    /// `max_completion_tokens`) the client gave.
    pub cap: &'a dyn Fn(u32) -> u32,
}

impl Outgoing<'_> {
    /// The body as the client sent it.
    pub const AS_SENT: Outgoing<'static> = Outgoing {
        wire: None,
        model: None,
        stream: None,
        cap: &|n| n,
    };
}

/// A request's upstream body, serialized field by field.
struct Body<'a> {
    req: &'a Request,
    changes: &'a Outgoing<'a>,
}

impl Serialize for Body<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Taken apart in full: a field added to `ChatRequest` does not
        // compile here until it is sent.
        let ChatRequest {
            model,
            messages,
            stream,
            stream_options,
            max_tokens,
            max_completion_tokens,
            n,
            stop,
            temperature,
            top_p,
            seed,
            response_format,
            tools,
            tool_choice,
            extra,
        } = &self.req.chat;
        let changes = self.changes;
        let stream = changes.stream.or(*stream);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("model", changes.model.unwrap_or(model))?;
        // A legacy request sent as a chat is its chat view: the prompt's
        // text as the user's message, the prefill after it.
        let wire = changes.wire.unwrap_or(self.req.api.wire());
        let legacy = self.req.api.legacy().filter(|_| wire == Wire::Legacy);
        match (legacy, &self.req.prefill) {
            (Some(legacy), Some(more)) if legacy.prompt.is_string() => {
                let prompt = legacy.prompt.as_str().unwrap_or_default();
                m.serialize_entry("prompt", &format!("{prompt}{more}"))?;
            }
            (Some(legacy), _) => m.serialize_entry("prompt", &legacy.prompt)?,
            (None, prefill) => m.serialize_entry(
                "messages",
                &Messages {
                    messages,
                    prefill: prefill.as_deref(),
                },
            )?,
        }
        if let Some(stream) = stream {
            m.serialize_entry("stream", &stream)?;
        }
        if stream != Some(false) {
            entry(&mut m, "stream_options", stream_options)?;
        }
        entry(&mut m, "max_tokens", &max_tokens.map(changes.cap))?;
        let max_completion_tokens = max_completion_tokens.map(changes.cap);
        entry(&mut m, "max_completion_tokens", &max_completion_tokens)?;
        entry(&mut m, "n", n)?;
        entry(&mut m, "stop", stop)?;
        entry(&mut m, "temperature", temperature)?;
        entry(&mut m, "top_p", top_p)?;
        entry(&mut m, "seed", seed)?;
        entry(&mut m, "response_format", response_format)?;
        entry(&mut m, "tools", tools)?;
        entry(&mut m, "tool_choice", tool_choice)?;
        let legacy = legacy.map(|l| &l.fields);
        for (key, value) in extra.iter().chain(legacy.into_iter().flatten()) {
            m.serialize_entry(key, value)?;
        }
        m.end()
    }
}

fn entry<M: SerializeMap, T: Serialize>(
    m: &mut M,
    key: &str,
    value: &Option<T>,
) -> Result<(), M::Error> {
    match value {
        Some(value) => m.serialize_entry(key, value),
        None => Ok(()),
    }
}

/// A conversation's messages, then the prefill as a partial assistant turn.
struct Messages<'a> {
    messages: &'a [Message],
    prefill: Option<&'a str>,
}

impl Serialize for Messages<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let said = self.prefill.map(|p| Message::text(Role::Assistant, p));
        s.collect_seq(self.messages.iter().chain(said.as_ref()))
    }
}

impl Request {
    /// What a target that cannot take a prefill gets instead: the answer so
    /// far as an assistant turn, then [`CONTINUE_PROMPT`] as a user turn. A
    /// legacy prompt continues its text either way, so it is unchanged.
    /// (A Responses request is continued as a chat: see `Upstream`.)
    ///
    /// [`CONTINUE_PROMPT`]: crate::continuation::CONTINUE_PROMPT
    pub fn as_continuation(&self) -> Request {
        let mut req = self.clone();
        if req.api.legacy().is_some() {
            return req;
        }
        if let Some(said) = req.prefill.take() {
            req.chat.messages.push(Message::text(Role::Assistant, said));
            req.chat.messages.push(Message::text(
                Role::User,
                crate::continuation::CONTINUE_PROMPT.to_string(),
            ));
        }
        req
    }
}

pub(crate) fn invalid(message: String, param: Option<String>) -> InvalidRequest {
    InvalidRequest { message, param }
}

pub(crate) fn from_path(e: serde_path_to_error::Error<serde_json::Error>) -> InvalidRequest {
    if e.inner().is_syntax() || e.inner().is_eof() {
        return invalid(format!("invalid JSON: {}", e.inner()), None);
    }
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    // serde reports a missing field at its parent's path; name the field itself.
    let missing = inner
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(|field| match path.as_str() {
            "." | "" => field.to_string(),
            parent => format!("{parent}.{field}"),
        });
    let param = missing.or_else(|| (path != "." && !path.is_empty()).then_some(path));
    let message = match &param {
        Some(p) => format!("invalid value for `{p}`: {inner}"),
        None => format!("invalid request body: {inner}"),
    };
    invalid(message, param)
}

/// The largest `n` OpenAI takes, and the most stop sequences.
const MAX_N: u32 = 128;
const MAX_STOPS: usize = 4;
/// Entries of `logit_bias` accepted: every one costs work on each token.
const MAX_LOGIT_BIAS: usize = 1024;

/// Checks what every backend would otherwise reject in its own way (or,
/// worse, fail on): the request's shape and each sampling parameter, the
/// ones the schema models and the common extensions (`top_k`,
/// `repetition_penalty`, `min_p`, `logit_bias`, ...), each with a 400
/// naming it.
fn validate(chat: &ChatRequest) -> Result<(), InvalidRequest> {
    if chat.model.is_empty() {
        return Err(invalid(
            "`model` must not be empty".into(),
            Some("model".into()),
        ));
    }
    if chat.messages.is_empty() {
        return Err(invalid(
            "`messages` must hold at least one message".into(),
            Some("messages".into()),
        ));
    }
    if let Some(n) = chat.n {
        check(
            (1..=MAX_N).contains(&n),
            "n",
            format!("must be between 1 and {MAX_N}"),
        )?;
    }
    if let Some(t) = chat.temperature {
        check(
            (0.0..=2.0).contains(&t),
            "temperature",
            "must be between 0 and 2",
        )?;
    }
    if let Some(p) = chat.top_p {
        check(
            p > 0.0 && p <= 1.0,
            "top_p",
            "must be above 0 and at most 1",
        )?;
    }
    for (name, cap) in [
        ("max_tokens", chat.max_tokens),
        ("max_completion_tokens", chat.max_completion_tokens),
    ] {
        if let Some(cap) = cap {
            check(cap >= 1, name, "must be at least 1")?;
        }
    }
    if let Some(stop) = &chat.stop {
        check(
            stop.sequences().len() <= MAX_STOPS,
            "stop",
            format!("takes at most {MAX_STOPS} sequences"),
        )?;
    }
    let extra = |name: &str| chat.extra.get(name).filter(|v| !v.is_null());
    for name in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = extra(name) {
            let ok = v.as_f64().is_some_and(|p| (-2.0..=2.0).contains(&p));
            check(ok, name, "must be a number between -2 and 2")?;
        }
    }
    if let Some(v) = extra("top_k") {
        let ok = v.as_u64().is_some_and(|k| k >= 1);
        check(ok, "top_k", "must be a whole number of at least 1")?;
    }
    if let Some(v) = extra("repetition_penalty") {
        let ok = v.as_f64().is_some_and(|p| p > 0.0 && p <= 10.0);
        check(
            ok,
            "repetition_penalty",
            "must be a number above 0 and at most 10",
        )?;
    }
    if let Some(v) = extra("min_p") {
        let ok = v.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p));
        check(ok, "min_p", "must be a number between 0 and 1")?;
    }
    if let Some(v) = extra("logprobs") {
        check(v.is_boolean(), "logprobs", "must be true or false")?;
    }
    if let Some(v) = extra("top_logprobs") {
        let ok = v.as_u64().is_some_and(|k| k <= 20);
        check(
            ok,
            "top_logprobs",
            "must be a whole number between 0 and 20",
        )?;
    }
    if let Some(v) = extra("logit_bias") {
        validate_logit_bias(v)?;
    }
    Ok(())
}

/// What OpenAI requires of each chat message beyond its role: content on
/// every turn but an assistant's that calls a tool, and the call a tool
/// message answers. Without this a backend would see an empty turn, and the
/// local model would answer a prompt the client never wrote.
fn validate_messages(messages: &[Message]) -> Result<(), InvalidRequest> {
    for (i, m) in messages.iter().enumerate() {
        let calls = m.tool_calls.is_some() || m.extra.contains_key("function_call");
        if m.content.is_none() && !(m.role == Role::Assistant && (calls || m.refusal.is_some())) {
            let rule = if m.role == Role::Assistant {
                " unless the message has `tool_calls`"
            } else {
                ""
            };
            return Err(invalid(
                format!("missing required parameter `messages[{i}].content`{rule}"),
                Some(format!("messages[{i}].content")),
            ));
        }
        if m.role == Role::Tool && m.tool_call_id.is_none() {
            return Err(invalid(
                format!("missing required parameter `messages[{i}].tool_call_id`"),
                Some(format!("messages[{i}].tool_call_id")),
            ));
        }
    }
    Ok(())
}

/// `logit_bias`: token ids (as JSON object keys) to a bias from -100 to 100.
fn validate_logit_bias(v: &Value) -> Result<(), InvalidRequest> {
    let Value::Object(map) = v else {
        return Err(invalid(
            "`logit_bias` must be an object of token ids to numbers".into(),
            Some("logit_bias".into()),
        ));
    };
    check(
        map.len() <= MAX_LOGIT_BIAS,
        "logit_bias",
        format!("takes at most {MAX_LOGIT_BIAS} tokens"),
    )?;
    for (token, bias) in map {
        let param = format!("logit_bias.{token}");
        check(
            token.parse::<u32>().is_ok(),
            &param,
            "is not a token id (a whole number)",
        )?;
        let ok = bias.as_f64().is_some_and(|b| (-100.0..=100.0).contains(&b));
        check(ok, &param, "must be a number between -100 and 100")?;
    }
    Ok(())
}

/// The legacy API's own fields.
fn validate_legacy(fields: &Extra, n: u32) -> Result<(), InvalidRequest> {
    let field = |name: &str| fields.get(name).filter(|v| !v.is_null());
    if let Some(v) = field("logprobs") {
        let ok = v.as_u64().is_some_and(|k| k <= 5);
        check(ok, "logprobs", "must be a whole number between 0 and 5")?;
    }
    if let Some(v) = field("best_of") {
        let ok = v.as_u64().is_some_and(|k| k >= u64::from(n) && k <= 20);
        check(ok, "best_of", "must be a whole number from `n` to 20")?;
    }
    if let Some(v) = field("echo") {
        check(v.is_boolean(), "echo", "must be true or false")?;
    }
    if let Some(v) = field("suffix") {
        check(v.is_string(), "suffix", "must be a string")?;
    }
    Ok(())
}

/// A 400 for `param` unless `ok`.
pub(crate) fn check(
    ok: bool,
    param: &str,
    rule: impl std::fmt::Display,
) -> Result<(), InvalidRequest> {
    if ok {
        return Ok(());
    }
    Err(invalid(
        format!("`{param}` {rule}"),
        Some(param.to_string()),
    ))
}

/// The chat view of a legacy prompt: the text of a string or of strings; token
/// arrays (which only a legacy upstream understands) give an empty text.
fn prompt_text(prompt: &Value) -> Result<String, InvalidRequest> {
    let bad = || {
        invalid(
            "`prompt` must be a string, an array of strings, or token arrays".into(),
            Some("prompt".into()),
        )
    };
    match prompt {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n")),
        Value::Array(items) if items.iter().all(|v| v.is_u64() || v.is_array()) => {
            Ok(String::new())
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests;
