//! The legacy `text_completion` objects, mapped into the chat schema and back.
//!
//! Responses and stream chunks of `POST /v1/completions` convert losslessly to
//! and from their chat counterparts: a choice's `text` is the assistant message's
//! content, everything else keeps its place. Requests are in [`crate::request`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::{
    ChatChunk, ChatCompletion, Choice, ChunkChoice, Content, Delta, Extra, Message, Role, Usage,
};

/// A `text_completion` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCompletion {
    /// Completion id.
    pub id: String,
    /// Always `text_completion`.
    #[serde(default = "object_text_completion")]
    pub object: String,
    /// Unix time of creation.
    pub created: u64,
    /// The model that produced it.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<TextChoice>,
    /// Token counts (absent on stream chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One choice of a `text_completion` (or one chunk of it when streaming).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    /// Generated text, or the fragment of it in a stream chunk.
    pub text: String,
    /// Position among the choices.
    pub index: u32,
    /// Log probabilities, kept opaque.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Why generation ended.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

fn object_text_completion() -> String {
    "text_completion".into()
}

impl From<TextCompletion> for ChatCompletion {
    fn from(t: TextCompletion) -> Self {
        ChatCompletion {
            id: t.id,
            object: "chat.completion".into(),
            created: t.created,
            model: t.model,
            choices: t
                .choices
                .into_iter()
                .map(|c| Choice {
                    index: c.index,
                    message: Message::text(Role::Assistant, c.text),
                    finish_reason: c.finish_reason,
                    logprobs: c.logprobs,
                    extra: c.extra,
                })
                .collect(),
            usage: t.usage,
            system_fingerprint: t.system_fingerprint,
            extra: t.extra,
            native: None,
        }
    }
}

impl From<ChatCompletion> for TextCompletion {
    fn from(c: ChatCompletion) -> Self {
        TextCompletion {
            id: c.id,
            object: "text_completion".into(),
            created: c.created,
            model: c.model,
            choices: c
                .choices
                .into_iter()
                .map(|ch| TextChoice {
                    text: ch
                        .message
                        .content
                        .as_ref()
                        .map(Content::to_text)
                        .unwrap_or_default(),
                    index: ch.index,
                    logprobs: ch.logprobs,
                    finish_reason: ch.finish_reason,
                    extra: ch.extra,
                })
                .collect(),
            usage: c.usage,
            system_fingerprint: c.system_fingerprint,
            extra: c.extra,
        }
    }
}

impl From<TextCompletion> for ChatChunk {
    fn from(t: TextCompletion) -> Self {
        ChatChunk {
            id: t.id,
            object: "chat.completion.chunk".into(),
            created: t.created,
            model: t.model,
            choices: t
                .choices
                .into_iter()
                .map(|c| ChunkChoice {
                    index: c.index,
                    delta: Delta {
                        content: Some(c.text),
                        ..Delta::default()
                    },
                    finish_reason: c.finish_reason,
                    logprobs: c.logprobs,
                    extra: c.extra,
                })
                .collect(),
            usage: t.usage,
            system_fingerprint: t.system_fingerprint,
            extra: t.extra,
            native: None,
        }
    }
}

impl From<ChatChunk> for TextCompletion {
    fn from(c: ChatChunk) -> Self {
        TextCompletion {
            id: c.id,
            object: "text_completion".into(),
            created: c.created,
            model: c.model,
            choices: c
                .choices
                .into_iter()
                .map(|ch| TextChoice {
                    text: ch.delta.content.unwrap_or_default(),
                    index: ch.index,
                    logprobs: ch.logprobs,
                    finish_reason: ch.finish_reason,
                    extra: ch.extra,
                })
                .collect(),
            usage: c.usage,
            system_fingerprint: c.system_fingerprint,
            extra: c.extra,
        }
    }
}

/// A legacy `echo` done by Backstop, for an answer that came from a chat:
/// the prompt goes before each choice's text, once.
pub struct Echo {
    prompt: String,
    /// The choices whose text has the prompt already.
    echoed: Vec<u32>,
}

impl Echo {
    /// An echo of `prompt`.
    pub fn new(prompt: impl Into<String>) -> Self {
        Echo {
            prompt: prompt.into(),
            echoed: Vec::new(),
        }
    }

    /// Puts the prompt before each choice's text of a whole answer.
    pub fn completion(&mut self, completion: &mut ChatCompletion) {
        for choice in &mut completion.choices {
            let text = choice
                .message
                .content
                .as_ref()
                .map(Content::to_text)
                .unwrap_or_default();
            choice.message.content = Some(Content::Text(format!("{}{text}", self.prompt)));
        }
    }

    /// Puts the prompt before the first text of each choice in a stream.
    pub fn chunk(&mut self, chunk: &mut ChatChunk) {
        for choice in &mut chunk.choices {
            if !self.echoed.contains(&choice.index) {
                self.echoed.push(choice.index);
                let text = choice.delta.content.take().unwrap_or_default();
                choice.delta.content = Some(format!("{}{text}", self.prompt));
            }
        }
    }
}

#[cfg(test)]
mod tests;
