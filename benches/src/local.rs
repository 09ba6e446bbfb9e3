//! The local model's speed on this machine, for side-by-side comparison with
//! llama.cpp's `llama-bench` on the same GGUF file (see `local.sh`).
//!
//! Usage: bench-local MODEL_GGUF
//!
//! Prints time to ready, prompt and decode tokens/s for one sequence and the
//! aggregate decode rate of four concurrent ones, peak RSS, and the
//! memory-bandwidth bound on decode (read bandwidth / model file size).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use backstop_adapter::{Backend, Request};
use backstop_local::{LocalBackend, LocalConfig};
use futures_util::StreamExt;
use tokio::time::Instant;

/// Peak resident set size of this process, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Read bandwidth in bytes/s: summing a buffer far larger than the caches.
fn read_bandwidth() -> f64 {
    let words = 64 << 20; // 512 MiB of u64
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..5 {
        let t = Instant::now();
        sink = sink.wrapping_add(buf.iter().fold(0u64, |a, b| a.wrapping_add(*b)));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (words * 8) as f64 / best
}

fn request(body: serde_json::Value) -> anyhow::Result<Request> {
    Request::parse_chat(body.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Streams one answer; returns (prompt-phase seconds, decode tokens, decode seconds).
async fn timed_stream(backend: &LocalBackend, req: &Request) -> anyhow::Result<(f64, u64, f64)> {
    let started = Instant::now();
    let mut body = backend
        .stream(req)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .body;
    let (mut first, mut last, mut tokens) = (None, started, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = Instant::now();
        if chunk
            .choices
            .iter()
            .any(|c| c.delta.content.as_deref().is_some_and(|t| !t.is_empty()))
        {
            first.get_or_insert(now);
            last = now;
        }
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens;
        }
    }
    let first = first.context("no text came")?;
    Ok((
        (first - started).as_secs_f64(),
        tokens.saturating_sub(1),
        (last - first).as_secs_f64(),
    ))
}

fn main() -> anyhow::Result<()> {
    let model: PathBuf = std::env::args()
        .nth(1)
        .context("usage: bench-local MODEL_GGUF")?
        .into();
    if !model.exists() {
        bail!("{} is missing: run models/fetch", model.display());
    }
    let model_bytes = std::fs::metadata(&model)?.len() as f64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let started = Instant::now();
        let backend = LocalBackend::start(LocalConfig::new("bench", &model));
        while !backend.ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ready = started.elapsed().as_secs_f64();

        // Prompt processing: a 64-token prompt, answered with one token.
        let words: Vec<String> = (0..64).map(|i| format!("w{i}")).collect();
        let mut pp = 0.0f64;
        for _ in 0..3 {
            let req = Request::parse_legacy(
                serde_json::json!({"model": "m", "prompt": words.join(" "), "max_tokens": 1,
                                   "temperature": 0})
                .to_string()
                .as_bytes(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = Instant::now();
            let reply = backend.complete(&req).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = reply.body.usage.map_or(0, |u| u.prompt_tokens) as f64;
            pp = pp.max(n / t.elapsed().as_secs_f64());
        }

        let long = |seed: i64| {
            request(serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                "max_tokens": 128, "temperature": 0.8, "seed": seed,
                "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to sail."}]}))
        };
        let (_, n, secs) = timed_stream(&backend, &long(1)?).await?;
        let decode1 = n as f64 / secs;

        let t = Instant::now();
        let reqs: Vec<Request> = (2..6).map(long).collect::<anyhow::Result<_>>()?;
        let results = futures_util::future::join_all(reqs.iter().map(|r| timed_stream(&backend, r))).await;
        let total: u64 = results.iter().filter_map(|r| r.as_ref().ok()).map(|(_, n, _)| n + 1).sum();
        let decode4 = total as f64 / t.elapsed().as_secs_f64();

        // Read the peak before the bandwidth test's own buffer raises it.
        let peak = peak_rss_mib();
        let bound = read_bandwidth() / model_bytes;
        println!("| engine | ready (s) | prompt tok/s | decode tok/s (1 seq) | decode tok/s (4 seqs, total) | peak RSS (MiB) |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| backstop (candle) | {ready:.2} | {pp:.1} | {decode1:.1} | {decode4:.1} | {peak:.0} |"
        );
        println!();
        println!("memory-bandwidth bound on decode: {bound:.0} tok/s ({:.1} GB/s read, {:.1} MB of weights)",
            bound * model_bytes / 1e9, model_bytes / 1e6);
        Ok(())
    })
}
