//! Chat prompts for the local model: the GGUF's own `tokenizer.chat_template`
//! rendered with minijinja when it has one, built-in ChatML or LLaMA-2
//! (`[INST] <<SYS>>`) formats otherwise.

use backstop_adapter::{Content, Message, Role};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::LocalError;

/// A prompt format.
#[derive(Debug, Clone)]
pub enum Template {
    /// A Jinja chat template, as Hugging Face and GGUF files carry them.
    Jinja(String),
    /// `<|im_start|>role\ncontent<|im_end|>\n` turns.
    ChatMl,
    /// LLaMA-2 chat: `<s>[INST] <<SYS>>\n…\n<</SYS>>\n\nuser [/INST] answer </s>`.
    Llama2,
}

/// A message as templates see it: role and text.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

impl Turn {
    /// The template view of a request message; `developer` reads as `system`.
    pub fn from_message(m: &Message) -> Self {
        let role = match m.role {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool | Role::Function => "tool",
        };
        let mut content = m.content.as_ref().map(Content::to_text).unwrap_or_default();
        if let Some(calls) = &m.tool_calls {
            for call in calls {
                content.push_str(&format!(
                    "\n[tool call {}: {}({})]",
                    call.id, call.function.name, call.function.arguments
                ));
            }
        }
        Turn { role, content }
    }
}

impl Template {
    /// Picks the template for a model: its own when it has one, else by family.
    pub fn for_model(chat_template: Option<&str>, tokenizer_kind: &str) -> Self {
        match chat_template {
            Some(t) if !t.trim().is_empty() => Template::Jinja(t.to_string()),
            _ if tokenizer_kind == "llama" => Template::Llama2,
            _ => Template::ChatMl,
        }
    }

    /// Renders the conversation, ending where the assistant's answer starts.
    pub fn render(&self, turns: &[Turn], bos: &str, eos: &str) -> Result<String, LocalError> {
        match self {
            Template::Jinja(source) => render_jinja(source, turns, bos, eos),
            Template::ChatMl => {
                let mut out = String::new();
                for t in turns {
                    out.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        t.role, t.content
                    ));
                }
                out.push_str("<|im_start|>assistant\n");
                Ok(out)
            }
            Template::Llama2 => Ok(render_llama2(turns, bos, eos)),
        }
    }
}

fn render_jinja(source: &str, turns: &[Turn], bos: &str, eos: &str) -> Result<String, LocalError> {
    let mut env = Environment::new();
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template("chat", source)
        .map_err(|e| LocalError::Template(e.to_string()))?;
    let template = env
        .get_template("chat")
        .map_err(|e| LocalError::Template(e.to_string()))?;
    template
        .render(context! {
            messages => turns,
            add_generation_prompt => true,
            bos_token => bos,
            eos_token => eos,
        })
        .map_err(|e| LocalError::Template(e.to_string()))
}

/// LLaMA-2 chat format: the system prompt folds into the first user turn.
fn render_llama2(turns: &[Turn], bos: &str, eos: &str) -> String {
    let (system, rest) = match turns.first() {
        Some(t) if t.role == "system" => (Some(t.content.as_str()), &turns[1..]),
        _ => (None, turns),
    };
    let mut out = String::new();
    let mut first_user = true;
    for t in rest {
        match t.role {
            "assistant" => out.push_str(&format!(" {} {eos}", t.content.trim())),
            _ => {
                let text = match (first_user, system) {
                    (true, Some(sys)) => {
                        format!("<<SYS>>\n{sys}\n<</SYS>>\n\n{}", t.content.trim())
                    }
                    _ => t.content.trim().to_string(),
                };
                first_user = false;
                out.push_str(&format!("{bos}[INST] {text} [/INST]"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
