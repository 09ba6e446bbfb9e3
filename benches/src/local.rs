//! The local model's speed on this machine, for side-by-side comparison with
//! llama.cpp's `llama-bench` on the same GGUF file (see `local.sh`).
//!
//! Usage: bench-local MODEL_GGUF [PROMPT_TOKENS DECODE_TOKENS TTFT_TOKENS [SEQUENCES]]
//!        bench-local --agree MODEL_GGUF
//!
//! `--agree` only reports how far apart the logits are after a prompt run
//! in one step (many-row products: on a GPU, the f16 tensor-core path) and
//! after the same prompt run token by token (one-row products), in a
//! process of its own so that its copy of the model is not in the timings.
//!
//! Prints total prompt and decode tokens/s of 1, 2 and 4 concurrent
//! sequences (PROMPT_TOKENS of prompt and DECODE_TOKENS of answer each, by
//! default 64 and 128, as `llama-batched-bench -npp 64 -ntg 128 -npl 1,2,4`),
//! time to first token for a TTFT_TOKENS prompt (default 512), time to a
//! loaded model, peak RSS, and the memory-bandwidth bound on decode (read
//! bandwidth of two threads over the model file's size). SEQUENCES, a
//! comma-separated list, runs other counts than 1, 2 and 4 (`1` alone, to
//! profile one sequence's decode).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use backstop_adapter::{Backend, Request};
use backstop_local::{LoadedModel, LocalBackend, LocalConfig};
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

/// Read bandwidth in bytes/s of `threads` threads, each summing its part of
/// a buffer far larger than the caches.
fn read_bandwidth(threads: usize) -> f64 {
    let words: usize = 64 << 20; // 512 MiB of u64
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(words.div_ceil(threads)) {
                s.spawn(|| std::hint::black_box(part.iter().fold(0u64, |a, b| a.wrapping_add(*b))));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best
}

/// One streamed answer's timing.
struct Timed {
    /// When each piece of text came (a piece is a token, but for the rare
    /// one held back to complete a character).
    pieces: Vec<Instant>,
    /// Prompt tokens.
    prompt: u64,
}

/// Streams one answer to its end.
async fn timed_stream(backend: &LocalBackend, req: &Request) -> anyhow::Result<Timed> {
    let mut body = backend
        .stream(req)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .body;
    let (mut pieces, mut usage) = (Vec::new(), None);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("{e}"))?;
        if chunk
            .choices
            .iter()
            .any(|c| c.delta.content.as_deref().is_some_and(|t| !t.is_empty()))
        {
            pieces.push(Instant::now());
        }
        usage = usage.or(chunk.usage);
    }
    let usage = usage.context("no usage came")?;
    if pieces.is_empty() {
        bail!("no text came");
    }
    Ok(Timed {
        pieces,
        prompt: usage.prompt_tokens,
    })
}

/// A raw-text request whose prompt is `tokens` tokens long (for both
/// vocabularies we ship: one word is one token) and whose answer is
/// `max_tokens` long, sampled so that no end of text cuts it short.
fn prompt_of(tokens: usize, max_tokens: usize, seed: usize) -> anyhow::Result<Request> {
    let words: Vec<String> = (0..tokens)
        .map(|i| ["the", "cat", "sat", "on", "a", "mat"][(i + seed) % 6].into())
        .collect();
    let body = serde_json::json!({"model": "m", "prompt": words.join(" "), "max_tokens": max_tokens,
        "stream": true, "stream_options": {"include_usage": true}, "temperature": 0});
    Request::parse_legacy(body.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `n` answers at once: total prompt tokens/s (all prompts, from the start
/// to the last sequence's first token) and total decode tokens/s (from then
/// to the last token, the tokens that came in between), as
/// `llama-batched-bench` counts them.
async fn concurrent(
    backend: &LocalBackend,
    n: usize,
    prompt: usize,
    decode: usize,
) -> anyhow::Result<(f64, f64)> {
    let reqs: Vec<Request> = (0..n)
        .map(|i| prompt_of(prompt, decode + 1, i))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let results =
        futures_util::future::join_all(reqs.iter().map(|r| timed_stream(backend, r))).await;
    let results: Vec<Timed> = results.into_iter().collect::<anyhow::Result<_>>()?;
    let prompt_tokens: u64 = results.iter().map(|t| t.prompt).sum();
    let all_started = results
        .iter()
        .map(|t| t.pieces[0])
        .max()
        .context("no answers")?;
    let pieces = results.iter().flat_map(|t| &t.pieces);
    let end = pieces.clone().max().context("no answers")?;
    let decoded = pieces.filter(|at| **at > all_started).count();
    Ok((
        prompt_tokens as f64 / (all_started - started).as_secs_f64(),
        decoded as f64 / (*end - all_started).as_secs_f64(),
    ))
}

/// The logits after a `tokens`-token prompt run in one step against the
/// same prompt run token by token: the largest difference over the largest
/// logit, and whether the top token is the same.
fn agreement(model: &std::path::Path, tokens: usize) -> anyhow::Result<(f32, bool)> {
    let model = LoadedModel::load(&LocalConfig::new("agree", model))?;
    let llama = &model.llama;
    let prompt: Vec<u32> = (0..tokens).map(|i| 1000 + (i * 37 % 5000) as u32).collect();
    let mut cache = llama.cache(tokens)?;
    let whole = llama.forward(&prompt, &mut cache)?.to_vec1::<f32>()?;
    let mut cache = llama.cache(tokens)?;
    let mut last = None;
    for token in &prompt {
        last = Some(llama.forward(&[*token], &mut cache)?);
    }
    let single = last.context("an empty prompt")?.to_vec1::<f32>()?;
    let largest = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = whole
        .iter()
        .zip(&single)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let top = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    Ok((diff / largest, top(&whole) == top(&single)))
}

fn main() -> anyhow::Result<()> {
    backstop_local::settle_thread_count();
    let usage =
        "usage: bench-local MODEL_GGUF [PROMPT_TOKENS DECODE_TOKENS TTFT_TOKENS [SEQUENCES]] \
                 | bench-local --agree MODEL_GGUF";
    let mut args = std::env::args().skip(1).peekable();
    let agree = args.next_if_eq("--agree").is_some();
    let model: PathBuf = args.next().context(usage)?.into();
    let mut number = |default: usize| -> anyhow::Result<usize> {
        args.next()
            .map_or(Ok(default), |a| a.parse().context("a token count"))
    };
    let (prompt, decode, ttft_tokens) = (number(64)?, number(128)?, number(512)?);
    let sequences: Vec<usize> = match args.next() {
        Some(list) => list
            .split(',')
            .map(|n| n.parse().context("a list of sequence counts, like 1,2,4"))
            .collect::<anyhow::Result<_>>()?,
        None => vec![1, 2, 4],
    };
    if !model.exists() {
        bail!("{} is missing: run models/fetch", model.display());
    }
    let model_bytes = std::fs::metadata(&model)?.len() as f64;
    if agree {
        let tokens = 96;
        let (diff, same) = agreement(&model, tokens)?;
        println!("a {tokens}-token prompt in one step against token by token: largest logit difference {:.2e} of the largest logit, top token {}",
            diff, if same { "the same" } else { "DIFFERENT" });
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let started = Instant::now();
        let backend = LocalBackend::start(LocalConfig::new("bench", &model));
        // A request queued now is answered with the reason if the model
        // fails to load (on a GPU machine, say), where waiting for
        // readiness alone would wait forever.
        let probe = prompt_of(1, 1, 0)?;
        tokio::select! {
            () = async {
                while !backend.ready() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            } => {}
            failed = timed_stream(&backend, &probe) => {
                failed.context("the model did not load")?;
            }
        }
        let ready = started.elapsed().as_secs_f64();
        // Warm up: the first pass pages every weight in.
        concurrent(&backend, 1, 8, 2).await?;

        let t = Instant::now();
        let one = timed_stream(&backend, &prompt_of(ttft_tokens, 1, 0)?).await?;
        let ttft = (one.pieces[0] - t).as_secs_f64();

        println!("| sequences | prompt tok/s (total) | decode tok/s (total) |");
        println!("|---|---|---|");
        for &n in &sequences {
            let (pp, tg) = concurrent(&backend, n, prompt, decode).await?;
            println!("| {n} | {pp:.1} | {tg:.1} |");
        }
        println!();
        let peak = peak_rss_mib();
        let bandwidth = read_bandwidth(2);
        println!("ready in {ready:.2} s; time to first token for a {} token prompt: {ttft:.2} s; peak RSS {peak:.0} MiB",
            one.prompt);
        println!("memory-bandwidth bound on decode: {:.1} tok/s ({:.1} GB/s read by 2 threads, {:.1} MB of weights)",
            bandwidth / model_bytes, bandwidth / 1e9, model_bytes / 1e6);
        Ok(())
    })
}
