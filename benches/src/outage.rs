//! A full upstream outage under steady load, through Backstop with its
//! documented default breaker, retry and health settings.
//!
//! Two mock upstreams: `primary` goes down (HTTP 503 to every completion, or
//! no response at all) for a while and then recovers; `fallback` stays
//! healthy. An open-loop client sends streaming requests at a fixed rate
//! throughout and records what each got. Prints one markdown row per
//! scenario: failed client requests, the attempts the failing upstream saw
//! (clustered: the burst before its breaker opened, then each open period's
//! trial call), the time from its first failure to the first answer served by
//! the fallback, and from its recovery to the first answer it served again.
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
}

async fn scenario(
    down: MockReply,
    rate: u32,
    outage: Duration,
    first_byte_ms: u64,
) -> anyhow::Result<Figures> {
    let primary = MockUpstream::start().await?;
    let fallback = MockUpstream::start().await?;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [[targets]]\nname = \"primary\"\nbase_url = \"{}\"\nfirst_byte_timeout_ms = {first_byte_ms}\n\
         [[targets]]\nname = \"fallback\"\nbase_url = \"{}\"\n",
        primary.url(),
        fallback.url()
    );
    let config = Config::parse(&toml, |_| None)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = run(App::new(config)?, async {
        let _ = stopped.await;
    })
    .await?;
    let url = format!("http://{}/v1/chat/completions", running.addr);
    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "Say something reassuring."}]})
    .to_string();

    let before = Duration::from_secs(3);
    let after = outage + Duration::from_secs(10);
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
    Ok(Figures {
        requests: outcomes.len(),
        failed,
        clusters,
        to_fallback,
        to_return,
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
            "| outage ({} s, {rate} req/s) | client requests | failed | primary's attempts while down (burst, then per open period) | first failure → first fallback answer | recovery → first primary answer |",
            outage.as_secs()
        );
        println!("|---|---|---|---|---|---|");
        for (name, down, first_byte_ms) in [
            (
                "503 to every completion",
                MockReply::error(503, "server_error", "The server is overloaded"),
                60_000,
            ),
            ("no response at all (first byte deadline 2 s)", MockReply::Hang, 2_000),
        ] {
            let f = scenario(down, rate, outage, first_byte_ms).await?;
            let ms = |d: Option<Duration>| {
                d.map_or("never".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            };
            let clusters: Vec<String> = f.clusters.iter().map(usize::to_string).collect();
            println!(
                "| {name} | {} | {} | {} | {} | {} |",
                f.requests,
                f.failed,
                clusters.join(", "),
                ms(f.to_fallback),
                ms(f.to_return)
            );
        }
        Ok(())
    })
}
