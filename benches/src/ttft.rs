//! Time to first token, direct versus through Backstop, measured side by side:
//! requests alternate between the two URLs so both see the same machine noise.
//!
//! Usage: bench-ttft DIRECT_BASE BACKSTOP_BASE [N]
//! (bases end in /v1; N requests to each, default 2000). Prints p50/p99/mean
//! of the time from sending the request to the first SSE event's bytes.

use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context};

async fn first_event(client: &reqwest::Client, url: &str, body: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    let first = resp.chunk().await?.context("empty stream")?;
    let ttft = started.elapsed();
    if !first.starts_with(b"data: ") {
        bail!("not an event stream");
    }
    while resp.chunk().await?.is_some() {}
    Ok(ttft)
}

fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    (at(0.5), at(0.99), mean)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: bench-ttft DIRECT_BASE BACKSTOP_BASE [N]");
    }
    let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let direct = format!("{}/chat/completions", args[1]);
    let routed = format!("{}/chat/completions", args[2]);
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me about failover routers in one short paragraph."}]}"#;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
        for _ in 0..100 {
            first_event(&client, &direct, body).await?;
            first_event(&client, &routed, body).await?;
        }
        let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            a.push(first_event(&client, &direct, body).await?);
            b.push(first_event(&client, &routed, body).await?);
        }
        let (a50, a99, amean) = summary(a);
        let (b50, b99, bmean) = summary(b);
        println!("| path | p50 TTFT (µs) | p99 TTFT (µs) | mean (µs) |");
        println!("|---|---|---|---|");
        println!("| direct | {a50:.0} | {a99:.0} | {amean:.0} |");
        println!("| backstop | {b50:.0} | {b99:.0} | {bmean:.0} |");
        println!(
            "| added | {:.0} | {:.0} | {:.0} |",
            b50 - a50,
            b99 - a99,
            bmean - amean
        );
        Ok(())
    })
}
