//! The time to resume a Responses stream: from sending
//! `GET /v1/responses/{id}?stream=true&starting_after=N` to the first event
//! after `N`, for a generation still running (its events in memory) and for
//! one finished (its events read from the store), through Backstop in
//! process with the embedded store, in front of a mock upstream that
//! streams an event every 5 ms.
//!
//! Usage: bench-store [SAMPLES]   (default 200)

use std::time::Duration;

use backstop_server::{run, App, Config};
use backstop_testkit::{MockReply, MockUpstream};
use serde_json::{json, Value};
use tokio::time::Instant;

/// The allocator the `backstop` binary uses, so the in-process server
/// measured here is the one that ships.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1e3
}

/// Time to the first body bytes of a resumed stream.
async fn resume(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    after: u64,
) -> anyhow::Result<Duration> {
    let sent = Instant::now();
    let mut resp = client
        .get(format!(
            "{base}/v1/responses/{id}?stream=true&starting_after={after}"
        ))
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "resume answered {}", resp.status());
    let first = resp.chunk().await?;
    let took = sent.elapsed();
    let text = String::from_utf8_lossy(first.as_deref().unwrap_or_default()).to_string();
    anyhow::ensure!(
        text.starts_with(&format!("id: {}\n", after + 1)),
        "the next event, got {text:?}"
    );
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::args().nth(1).map_or(Ok(200), |s| s.parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let data = std::env::temp_dir().join(format!("bench-store-{}", std::process::id()));
        let mock = MockUpstream::start().await?;
        mock.set_default(MockReply::Echo {
            delay: Duration::ZERO,
            chunk_delay: Duration::from_millis(5),
        });
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [store]\npath = {:?}\nmax_running = 64\n\
             [[targets]]\nname = \"mock\"\nbase_url = \"{}\"\n",
            data,
            mock.url()
        );
        let config = Config::parse(&toml, |_| None)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = run(App::new(config).await?, async {
            let _ = stopped.await;
        })
        .await?;
        let base = format!("http://{}", running.addr);
        let client = reqwest::Client::new();
        let words = "word ".repeat(60);
        let mut live = Vec::with_capacity(samples);
        let mut ids = Vec::with_capacity(samples);
        for _ in 0..samples {
            let body = json!({"model": "gpt-4o-mini", "input": words, "background": true});
            let made: Value = client
                .post(format!("{base}/v1/responses"))
                .json(&body)
                .send()
                .await?
                .json()
                .await?;
            let id = made["id"].as_str().unwrap_or_default().to_string();
            // Mid-answer: a few events made, most still to come.
            tokio::time::sleep(Duration::from_millis(40)).await;
            live.push(resume(&client, &base, &id, 2).await?);
            ids.push(id);
        }
        // Every job finished: their events come from the store.
        for id in &ids {
            loop {
                let v: Value = client
                    .get(format!("{base}/v1/responses/{id}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                if v["status"] == "completed" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut finished = Vec::with_capacity(samples);
        for id in &ids {
            finished.push(resume(&client, &base, id, 2).await?);
        }
        println!("| resumed stream | samples | p50 (ms) | p99 (ms) | max (ms) |");
        println!("|---|---|---|---|---|");
        for (name, mut s) in [
            ("running (live)", live),
            ("finished (from SQLite)", finished),
        ] {
            let (p50, p99, max) = (
                percentile(&mut s, 0.5),
                percentile(&mut s, 0.99),
                percentile(&mut s, 1.0),
            );
            println!("| {name} | {} | {p50:.3} | {p99:.3} | {max:.3} |", s.len());
        }
        let _ = stop.send(());
        running.wait().await;
        let _ = std::fs::remove_dir_all(&data);
        Ok(())
    })
}
