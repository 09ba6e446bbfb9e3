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

/// Bytes a token spans at most, with room to spare: what is looked at to
/// find `n` tokens, so that a huge text costs no more than its start.
const TOKEN_BYTES: usize = 256;

/// The start of `text` of at most `bytes` bytes, cut at a character boundary.
fn head(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Tokens of `text` for `model`, counted up to `limit`: past that, `limit`
/// or more (only the start of a long text is encoded).
pub fn tokens_up_to(text: &str, model: &str, limit: usize) -> usize {
    let start = head(text, limit.saturating_add(1).saturating_mul(TOKEN_BYTES));
    let counted = text_tokens(start, model);
    if start.len() < text.len() {
        counted.max(limit + 1)
    } else {
        counted
    }
}

/// The start of `text` that holds at most `n` of `model`'s tokens (a cut
/// that would split a character moves back to the one before). Only the
/// start of a long text is encoded.
pub fn first_tokens(text: &str, model: &str, n: usize) -> String {
    let bpe = encoding(model);
    let start = head(text, n.saturating_add(1).saturating_mul(TOKEN_BYTES));
    let ids = bpe.encode_with_special_tokens(start);
    if ids.len() <= n && start.len() == text.len() {
        return text.to_string();
    }
    (0..=n.min(ids.len()))
        .rev()
        .find_map(|k| bpe.decode(&ids[..k]).ok())
        .unwrap_or_default()
}

/// Prompt tokens of `req` for `model`.
pub fn prompt_tokens(req: &Request, model: &str) -> usize {
    let bpe = encoding(model);
    let count = |text: &str| bpe.encode_with_special_tokens(text).len();
    if let Some(legacy) = req.api.legacy() {
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
