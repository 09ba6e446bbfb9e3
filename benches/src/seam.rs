//! How seamless a continued answer reads: the local model's own answers,
//! cut part-way, and finished three ways, with the router's seam rule
//! (`backstop_adapter::continuation::overlap`) cutting what repeats.
//!
//! Usage: bench-seam MODEL_GGUF
//!
//! For each question the local model's greedy answer (at most 160 tokens)
//! is the reference. It is cut at a third and at two thirds of its length,
//! once between words and once inside a word, and continued:
//! - `prefill`: the local model continues the text as its own answer (what
//!   a prefill-capable target does);
//! - `prompt`: the local model gets the text as an assistant turn and the
//!   continuation prompt (what a target without prefill, such as the real
//!   OpenAI API, gets);
//! - `mock repeat`: an upstream that repeats the last words of the text
//!   (from the start of the previous sentence) and then gives the
//!   reference's rest, the case the cut exists for.
//!
//! As in the router, only continuations without prefill are cut. A seam is
//! counted seamless when the continuation adds text, repeats none
//! of the last three words across the seam nor starts the answer over, and
//! neither joins two words nor doubles a space.

use std::path::PathBuf;

use anyhow::Context;
use backstop_adapter::continuation::overlap;
use backstop_adapter::{Backend, Request};
use backstop_local::{LocalBackend, LocalConfig};

const QUESTIONS: [&str; 8] = [
    "Give me three tips for sleeping better.",
    "What causes rain?",
    "Explain photosynthesis to a child.",
    "Why is the sky blue?",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "What should I pack for a weekend hike?",
];

fn ask(question: &str) -> anyhow::Result<Request> {
    let body = serde_json::json!({"model": "local", "temperature": 0, "max_tokens": 160,
        "messages": [{"role": "user", "content": question}]});
    Ok(Request::parse_chat(body.to_string().as_bytes())?)
}

async fn text(backend: &LocalBackend, req: &Request) -> anyhow::Result<String> {
    let reply = backend
        .complete(req)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(reply.body.choices[0]
        .message
        .content
        .as_ref()
        .map(|c| c.to_text())
        .unwrap_or_default())
}

/// Where to cut `answer` near `at`: between words, or inside a word.
fn cut_point(answer: &str, at: usize, inside_word: bool) -> Option<usize> {
    let mut i = at.min(answer.len());
    while !answer.is_char_boundary(i) {
        i -= 1;
    }
    let bytes = answer.as_bytes();
    if i == 0 {
        return None;
    }
    if inside_word {
        // Move to just after a letter that another letter follows.
        while i + 1 < answer.len()
            && !(bytes[i - 1].is_ascii_alphabetic() && bytes[i].is_ascii_alphabetic())
        {
            i += 1;
        }
    } else {
        // Move to just before a space.
        while i < answer.len() && bytes[i] != b' ' {
            i += 1;
        }
    }
    (i > 0 && i < answer.len() && answer.is_char_boundary(i)).then_some(i)
}

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// Whether `said` + `more` reads as one answer; `inside_word` says the cut
/// split a word.
fn seamless(said: &str, more: &str, inside_word: bool) -> bool {
    if more.trim().is_empty() {
        return false;
    }
    let before = words(said);
    let after = words(more);
    let tail: Vec<&str> = before.iter().rev().take(3).rev().copied().collect();
    let repeats = after.len() >= tail.len() && after[..tail.len()] == tail[..];
    let restarts = before.len() >= 5 && after.len() >= 5 && after[..5] == before[..5];
    let doubled = said.ends_with(' ') && more.starts_with(' ');
    let first = more.chars().next().unwrap_or(' ');
    // Two words run together (the cut was between words), or a word split
    // in two (the cut was inside it).
    let broken = if inside_word {
        first.is_whitespace()
    } else {
        first.is_alphanumeric()
    };
    !(repeats || restarts || doubled || broken)
}

/// What the mock upstream sends: the text from the start of its last
/// sentence (or its last five words), then the reference's rest.
fn repeating(said: &str, rest: &str) -> String {
    let from = said
        .rfind(['.', '!', '?', '\n'])
        .map(|i| i + 1)
        .unwrap_or_else(|| {
            let w = words(said);
            said.len()
                - w.iter()
                    .rev()
                    .take(5)
                    .map(|w| w.len() + 1)
                    .sum::<usize>()
                    .min(said.len())
        });
    format!("{}{rest}", said[from..].trim_start())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    backstop_local::settle_thread_count();
    let model = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: bench-seam MODEL_GGUF")?,
    );
    let backend = LocalBackend::start(LocalConfig::new("local", model));
    while !backend.ready() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let methods = ["prefill", "prompt", "mock repeat"];
    let mut seams = [0usize; 3];
    let mut good = [0usize; 3];
    let mut trimmed = [0usize; 3];
    let mut examples: Vec<String> = Vec::new();
    for question in QUESTIONS {
        let req = ask(question)?;
        let answer = text(&backend, &req).await?;
        for fraction in [3, 2] {
            for inside_word in [false, true] {
                let Some(at) = cut_point(&answer, answer.len() * (fraction - 1) / 3, inside_word)
                else {
                    continue;
                };
                let said = &answer[..at];
                let mut continued = req.clone();
                continued.prefill = Some(said.to_string());
                let outputs = [
                    text(&backend, &continued).await?,
                    text(&backend, &continued.as_continuation()).await?,
                    repeating(said, &answer[at..]),
                ];
                for (m, out) in outputs.iter().enumerate() {
                    // As the router does: a prefill's continuation is its
                    // own answer, and only the others are cut at the seam.
                    let cut = match m {
                        0 => 0,
                        _ => overlap(said, out, true).unwrap_or(0),
                    };
                    let more = &out[cut..];
                    seams[m] += 1;
                    trimmed[m] += usize::from(cut > 0);
                    if seamless(said, more, inside_word) {
                        good[m] += 1;
                    } else if m < 2 && examples.len() < 3 {
                        let tail = &said[said.len().saturating_sub(40)..];
                        let head: String = more.chars().take(40).collect();
                        examples.push(format!("{}: …{tail:?} + {head:?}…", methods[m]));
                    }
                }
            }
        }
    }
    println!("| continued by | seams | seamless | repeat cut |");
    println!("|---|---|---|---|");
    for m in 0..3 {
        println!(
            "| {} | {} | {} ({:.0}%) | {} |",
            methods[m],
            seams[m],
            good[m],
            100.0 * good[m] as f64 / seams[m].max(1) as f64,
            trimmed[m]
        );
    }
    for example in examples {
        println!("\nrough seam, {example}");
    }
    Ok(())
}
