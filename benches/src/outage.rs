//! A full upstream outage under steady load, through Backstop with its
//! documented default breaker, retry, health and shadow settings; the 503
//! outage runs twice, with the shadow verifier off and on, side by side.
//!
//! Two mock upstreams: `primary` goes down (HTTP 503 to every completion, or
//! no response at all) for a while and then recovers; `fallback` stays
//! healthy. An open-loop client sends streaming requests at a fixed rate
//! throughout and records what each got. Prints one markdown row per
//! scenario: failed client requests, the attempts the failing upstream saw
//! (clustered: the burst before its breaker opened, then each open period's
//! trial call or shadow), the time from its first failure to the first
//! answer served by the fallback, from its recovery to the first answer it
//! served again and to the point after which it served every request, and
//! the client's latency while the primary was down.
//!
//! Usage: bench-outage [RATE_PER_S] [OUTAGE_S]   (default 20 and 20)

use std::sync::Arc;
use std::time::Duration;

use backstop_server::{run, App, Config};
use backstop_testkit::{MockReply, MockUpstream};
use tokio::time::Instant;

struct Outcome {
    sent: Instant,
    done: Instant,
    status: u16,
    complete: bool,
    backend: String,
}

/// One scenario's figures.
struct Figures {
    requests: usize,
    failed: usize,
    clusters: Vec<usize>,
    to_fallback: Option<Duration>,
    to_return: Option<Duration>,
    to_full_return: Option<Duration>,
    /// Client latency (whole stream) p50 and p99 while the primary was down:
    /// every request served by the fallback, some mirrored as shadows.
    latency: (Duration, Duration),
}

async fn scenario(
    down: MockReply,
    rate: u32,
    outage: Duration,
    first_byte_ms: u64,
    shadow: bool,
) -> anyhow::Result<Figures> {
    let primary = MockUpstream::start().await?;
    let fallback = MockUpstream::start().await?;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[shadow]\nenabled = {shadow}\n\
         [[targets]]\nname = \"primary\"\nbase_url = \"{}\"\nfirst_byte_timeout_ms = {first_byte_ms}\n\
         header_timeout_ms = {first_byte_ms}\n\
         [[targets]]\nname = \"fallback\"\nbase_url = \"{}\"\n",
        primary.url(),
        fallback.url()
    );
    let config = Config::parse(&toml, |_| None)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = run(App::new(config).await?, async {
        let _ = stopped.await;
    })
    .await?;
    let url = format!("http://{}/v1/chat/completions", running.addr);
    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "Say something reassuring."}]})
    .to_string();

    let before = Duration::from_secs(3);
    let after = Duration::from_secs(40);
    let start = Instant::now();
    let (down_at, up_at) = (start + before, start + before + outage);
    let primary = Arc::new(primary);
    let switch = {
        let primary = primary.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(down_at).await;
            primary.set_default(down);
            tokio::time::sleep_until(up_at).await;
            primary.set_default(MockReply::echo());
        })
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = Vec::new();
    while Instant::now() < up_at + after {
        ticks.tick().await;
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let resp = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let (status, backend, text) = match resp {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let backend = r
                        .headers()
                        .get("x-backstop-backend")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    (status, backend, r.text().await.unwrap_or_default())
                }
                Err(_) => (0, String::new(), String::new()),
            };
            Outcome {
                sent,
                done: Instant::now(),
                status,
                complete: text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""),
                backend,
            }
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await?);
    }
    switch.await?;
    let _ = stop.send(());
    running.wait().await;

    let failed = outcomes
        .iter()
        .filter(|o| o.status != 200 || !o.complete)
        .count();
    // The failing upstream's attempts during the outage, in clusters split
    // by a quiet second: the burst before the breaker opened, then trials.
    let arrivals: Vec<Instant> = primary
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| r.at)
        .filter(|at| *at >= down_at && *at < up_at)
        .collect();
    let mut clusters: Vec<usize> = Vec::new();
    for (i, at) in arrivals.iter().enumerate() {
        if i == 0 || *at - arrivals[i - 1] >= Duration::from_secs(1) {
            clusters.push(0);
        }
        if let Some(last) = clusters.last_mut() {
            *last += 1;
        }
    }
    let to_fallback = arrivals.first().and_then(|first| {
        outcomes
            .iter()
            .filter(|o| o.backend == "fallback" && o.done >= *first)
            .map(|o| o.done - *first)
            .min()
    });
    let to_return = outcomes
        .iter()
        .filter(|o| o.backend == "primary" && o.sent >= up_at)
        .map(|o| o.done - up_at)
        .min();
    let to_full_return = outcomes
        .iter()
        .rposition(|o| o.backend != "primary")
        .and_then(|i| outcomes.get(i + 1))
        .map(|o| o.sent.saturating_duration_since(up_at));
    let mut latencies: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.sent >= down_at && o.sent < up_at)
        .map(|o| o.done - o.sent)
        .collect();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let latency = (pick(0.5), pick(0.99));
    Ok(Figures {
        requests: outcomes.len(),
        failed,
        clusters,
        to_fallback,
        to_return,
        to_full_return,
        latency,
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let outage = Duration::from_secs(args.next().map(|a| a.parse()).transpose()?.unwrap_or(20));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "| outage ({} s, {rate} req/s) | client requests | failed | primary's attempts while down (burst, then per open period) | first failure → first fallback answer | recovery → first primary answer | recovery → all traffic back | client p50 / p99 while down |",
            outage.as_secs()
        );
        println!("|---|---|---|---|---|---|---|---|");
        let overloaded = || MockReply::error(503, "server_error", "The server is overloaded");
        for (name, down, first_byte_ms, shadow) in [
            ("503s, breaker only (shadow off)", overloaded(), 60_000, false),
            ("503s, shadow verification", overloaded(), 60_000, true),
            ("no response at all (first byte deadline 2 s), shadow verification", MockReply::Hang, 2_000, true),
        ] {
            let f = scenario(down, rate, outage, first_byte_ms, shadow).await?;
            let ms = |d: Option<Duration>| {
                d.map_or("never".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            };
            let clusters: Vec<String> = f.clusters.iter().map(usize::to_string).collect();
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} ms |",
                f.requests,
                f.failed,
                clusters.join(", "),
                ms(f.to_fallback),
                ms(f.to_return),
                ms(f.to_full_return),
                f.latency.0.as_secs_f64() * 1000.0,
                f.latency.1.as_secs_f64() * 1000.0,
            );
        }
        Ok(())
    })
}
