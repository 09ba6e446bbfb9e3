//! Counting a request's prompt tokens before it is sent, as OpenAI models
//! count them: the model family's tiktoken encoding (o200k_base for gpt-4o and
//! newer, cl100k_base for gpt-4 and gpt-3.5; o200k_base as the estimate for
//! models tiktoken does not know), plus the chat format's per-message overhead
//! (3 tokens a message, 1 for a name, 3 to prime the reply).

use backstop_adapter::{Content, Request};
use tiktoken_rs::CoreBPE;

fn encoding(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).unwrap_or_else(|_| tiktoken_rs::o200k_base_singleton())
}

/// Tokens of a piece of text for `model`.
pub fn text_tokens(text: &str, model: &str) -> usize {
    encoding(model).encode_with_special_tokens(text).len()
}

/// The start of `text` that holds at most `n` of `model`'s tokens (a cut
/// that would split a character moves back to the one before).
pub fn first_tokens(text: &str, model: &str, n: usize) -> String {
    let bpe = encoding(model);
    let ids = bpe.encode_with_special_tokens(text);
    if ids.len() <= n {
        return text.to_string();
    }
    (0..=n)
        .rev()
        .find_map(|k| bpe.decode(&ids[..k]).ok())
        .unwrap_or_default()
}

/// Prompt tokens of `req` for `model`.
pub fn prompt_tokens(req: &Request, model: &str) -> usize {
    let bpe = encoding(model);
    let count = |text: &str| bpe.encode_with_special_tokens(text).len();
    if let Some(legacy) = &req.legacy {
        let text = legacy
            .prompt
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                req.chat
                    .messages
                    .first()
                    .and_then(|m| m.content.as_ref())
                    .map(Content::to_text)
                    .unwrap_or_default()
            });
        return count(&text) + req.prefill.as_deref().map_or(0, count);
    }
    let mut total = 3; // every reply is primed with <|start|>assistant<|message|>
    for m in &req.chat.messages {
        total += 3;
        total += count(
            serde_json::to_value(m.role)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .as_deref()
                .unwrap_or(""),
        );
        if let Some(content) = &m.content {
            total += count(&content.to_text());
        }
        if let Some(name) = &m.name {
            total += 1 + count(name);
        }
        for call in m.tool_calls.iter().flatten() {
            total += count(&call.function.name) + count(&call.function.arguments);
        }
    }
    if let Some(tools) = &req.chat.tools {
        // Tool definitions are rendered into the prompt; their JSON is a close estimate.
        total += count(&serde_json::to_string(tools).unwrap_or_default());
    }
    total + req.prefill.as_deref().map_or(0, count)
}
