//! How often the local model ends its turn by itself, by temperature: the
//! measurement behind `[local] max_temperature` and `max_tokens`.
//!
//! Usage: bench-turn-end MODEL_GGUF [SEEDS]
//!
//! Asks a fixed set of everyday questions with no `max_tokens` (the cap is
//! set at 1,024 tokens, twice the shipped one) at each temperature, SEEDS
//! times each (default 3), four at a time, and prints per temperature: the
//! share of answers that ended with the model's own end of turn, the share
//! that did so within the shipped 512-token cap, and the median and 90th
//! percentile answer length in tokens.

use std::path::PathBuf;

use anyhow::Context;
use backstop_adapter::{Backend, Request};
use backstop_local::{LocalBackend, LocalConfig};

const QUESTIONS: [&str; 10] = [
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Write a haiku about the sea.",
    "Give me three tips for sleeping better.",
    "How do I reverse a list in Python?",
    "What causes rain?",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What is the difference between weather and climate?",
];

const TEMPERATURES: [f64; 5] = [0.0, 0.3, 0.5, 0.7, 1.0];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    backstop_local::settle_thread_count();
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .context("usage: bench-turn-end MODEL_GGUF [SEEDS]")?,
    );
    let seeds: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let mut config = LocalConfig::new("local", model);
    config.max_tokens = 1024;
    config.max_temperature = 2.0;
    let backend = std::sync::Arc::new(LocalBackend::start(config));
    while !backend.ready() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!(
        "| temperature | ended by the model | within 512 tokens | median tokens | p90 tokens |"
    );
    println!("|---|---|---|---|---|");
    for t in TEMPERATURES {
        let mut asks = Vec::new();
        for seed in 0..seeds {
            for q in QUESTIONS {
                let body = serde_json::json!({"model": "local", "temperature": t, "seed": seed,
                    "messages": [{"role": "user", "content": q}]});
                asks.push(Request::parse_chat(body.to_string().as_bytes())?);
            }
        }
        let mut results = Vec::new();
        for group in asks.chunks(4) {
            let replies =
                futures_util::future::join_all(group.iter().map(|r| backend.complete(r))).await;
            for reply in replies {
                let body = reply.map_err(|e| anyhow::anyhow!(e.message))?.body;
                let stop = body.choices[0].finish_reason.as_deref() == Some("stop");
                let tokens = body.usage.map_or(0, |u| u.completion_tokens);
                results.push((stop, tokens));
            }
        }
        let ended = results.iter().filter(|(s, _)| *s).count();
        let within = results.iter().filter(|(s, n)| *s && *n <= 512).count();
        let mut lengths: Vec<u64> = results.iter().map(|(_, n)| *n).collect();
        lengths.sort_unstable();
        let share = |n: usize| {
            format!(
                "{n}/{} ({:.0}%)",
                results.len(),
                100.0 * n as f64 / results.len() as f64
            )
        };
        println!(
            "| {t:.1} | {} | {} | {} | {} |",
            share(ended),
            share(within),
            lengths[lengths.len() / 2],
            lengths[(lengths.len() * 9 / 10).min(lengths.len() - 1)]
        );
    }
    Ok(())
}
