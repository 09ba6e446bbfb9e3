//! A soak: the `backstop` binary (built next to this one) with its default
//! bounds in front of a mock upstream, under a steady mixed load (half JSON
//! completions, half streams, one in fifty with a 540 KB body), for a long
//! time. Samples the binary's resident memory and open file descriptors
//! every 10 s, counts errors, and reports p50/p99 latency and RSS growth
//! after warm-up (the first fifth of the run).
//!
//! `bench-soak memory` measures what request bodies cost instead: for each
//! shape (the most messages accepted, one huge string, 100k tiny messages,
//! content parts), a fresh binary takes 16 such bodies at once, and then 96
//! huge ones, past `max_request_memory`; prints the bodies' total size, the
//! answers, and the binary's peak and remaining RSS.
//!
//! Usage: bench-soak [SECONDS] [RATE_PER_S]   (default 1800 and 100; 120 for a quick run)
//!        bench-soak memory

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use backstop_testkit::{MockReply, MockUpstream};
use tokio::time::Instant;

/// Resident memory in MiB and open descriptors of process `pid`.
fn sample(pid: u32) -> (f64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss_kb / 1024.0, fds)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The `backstop` binary next to this one, running in front of `mock`.
struct Binary {
    child: std::process::Child,
    config: std::path::PathBuf,
    url: String,
}

impl Binary {
    fn start(mock: &MockUpstream) -> anyhow::Result<Self> {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[targets]]\nname = \"up\"\nbase_url = \"{}\"\n",
            mock.url()
        );
        let config =
            std::env::temp_dir().join(format!("backstop-soak-{}.toml", std::process::id()));
        std::fs::write(&config, toml)?;
        let binary = std::env::current_exe()?.with_file_name("backstop");
        let mut child = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", binary.display()))?;
        let stdout = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
        );
        let mut lines = stdout.lines().map_while(Result::ok);
        let addr = lines
            .find_map(|l| {
                l.split("listening on http://")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
            .ok_or_else(|| anyhow::anyhow!("backstop did not say where it listens"))?;
        // Keep draining the log so the binary never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Binary {
            child,
            config,
            url: format!("http://{addr}/v1/chat/completions"),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Peak RSS of process `pid`, in MiB.
fn peak(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Sixteen bodies of each shape at once (96 of the last, past
/// `max_request_memory`), each shape on a fresh binary.
async fn memory(mock: &MockUpstream) -> anyhow::Result<()> {
    let message = |content: &str| serde_json::json!({"role": "user", "content": content});
    let shapes: Vec<(&str, serde_json::Value, usize)> = vec![
        (
            "4,096 messages of 850 bytes (the most accepted)",
            serde_json::json!({"model": "m", "max_tokens": 1,
                "messages": vec![message(&"a".repeat(850)); 4096]}),
            16,
        ),
        (
            "one 4 MB string",
            serde_json::json!({"model": "m", "max_tokens": 1,
                "messages": [message(&"a".repeat(4_000_000))]}),
            16,
        ),
        (
            "100,000 tiny messages",
            serde_json::json!({"model": "m", "messages": vec![message("x"); 100_000]}),
            16,
        ),
        (
            "9,900 content parts",
            serde_json::json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user",
                "content": vec![serde_json::json!({"type": "text", "text": "ab"}); 9_900]}]}),
            16,
        ),
        (
            "one 4 MB string, 96 at once (past the request memory budget)",
            serde_json::json!({"model": "m", "max_tokens": 1,
                "messages": [message(&"a".repeat(4_000_000))]}),
            96,
        ),
    ];
    println!("| bodies at once | total | answers | RSS idle (MiB) | peak (MiB) | peak over idle / total | RSS after (MiB) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, body, count) in shapes {
        let binary = Binary::start(mock)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = sample(binary.pid()).0;
        let body = body.to_string();
        let client = reqwest::Client::new();
        let calls = (0..count).map(|_| {
            client
                .post(&binary.url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        });
        let mut answers = std::collections::BTreeMap::<u16, usize>::new();
        for r in futures_util::future::join_all(calls).await {
            *answers
                .entry(r.map_or(0, |r| r.status().as_u16()))
                .or_default() += 1;
        }
        let answers: Vec<String> = answers.iter().map(|(s, n)| format!("{n}× {s}")).collect();
        let answers = answers.join(", ");
        let total = body.len() as f64 * count as f64 / (1 << 20) as f64;
        let top = peak(binary.pid());
        println!(
            "| {name} | {total:.1} MiB | {answers} | {idle:.1} | {top:.1} | {:.1}× | {:.1} |",
            (top - idle) / total,
            sample(binary.pid()).0
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mock = MockUpstream::start().await?;
    mock.set_default(MockReply::Echo {
        delay: Duration::from_millis(5),
        chunk_delay: Duration::from_millis(1),
    });
    if args.get(1).map(String::as_str) == Some("memory") {
        return memory(&mock).await;
    }
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1800);
    let rate: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let binary = Binary::start(&mock)?;
    let (pid, url) = (binary.pid(), binary.url.clone());
    let client = reqwest::Client::new();
    let big = "lorem ipsum dolor sit amet ".repeat(20_000); // ~540 KB
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut samples: Vec<(u64, f64, usize)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut next_sample = started;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        if Instant::now() >= next_sample {
            let (rss, fds) = sample(pid);
            samples.push((started.elapsed().as_secs(), rss, fds));
            next_sample += Duration::from_secs(10);
        }
        sent += 1;
        let content = if sent.is_multiple_of(50) {
            big.as_str()
        } else {
            "Say something short."
        };
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "stream": sent.is_multiple_of(2),
            "max_tokens": 32,
            "messages": [{"role": "user", "content": content}],
        });
        let (client, url, errors, latencies) = (
            client.clone(),
            url.clone(),
            errors.clone(),
            latencies.clone(),
        );
        tokio::spawn(async move {
            let t = Instant::now();
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            let ok = match sent {
                Ok(r) if r.status() == 200 => {
                    r.text().await.is_ok_and(|t| !t.contains("\"error\""))
                }
                _ => false,
            };
            if ok {
                if let Ok(mut l) = latencies.lock() {
                    l.push(t.elapsed());
                }
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, fds) = sample(pid);
    samples.push((started.elapsed().as_secs(), rss, fds));
    drop(binary);
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort();
    let warm = samples
        .iter()
        .find(|s| s.0 >= seconds / 5)
        .map_or(0.0, |s| s.1);
    let last = samples.last().map_or(0.0, |s| s.1);
    println!("| t (s) | RSS (MiB) | open fds |");
    println!("|---|---|---|");
    let every = (samples.len() / 12).max(1);
    let mut shown: Vec<_> = samples.iter().step_by(every).collect();
    if let Some(last) = samples
        .last()
        .filter(|l| shown.last().is_none_or(|s| s.0 != l.0))
    {
        shown.push(last);
    }
    for s in shown {
        println!("| {} | {:.1} | {} |", s.0, s.1, s.2);
    }
    println!();
    println!(
        "{seconds} s at {rate}/s: {sent} requests, {} errors, p50 {:.1} ms, p99 {:.1} ms; \
         RSS {warm:.1} MiB after warm-up, {last:.1} MiB at the end ({:+.1}%)",
        errors.load(Ordering::Relaxed),
        percentile(&l, 0.5).as_secs_f64() * 1e3,
        percentile(&l, 0.99).as_secs_f64() * 1e3,
        if warm > 0.0 {
            (last - warm) / warm * 100.0
        } else {
            0.0
        },
    );
    Ok(())
}
