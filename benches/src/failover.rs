//! Failover with the shipped defaults: every upstream fault, two chains,
//! one and eight clients, each client an ordinary one (streaming, no
//! `max_tokens`, the default temperature, a 20 s deadline announced the way
//! the OpenAI SDKs do, `x-stainless-read-timeout`).
//!
//! Chains:
//! - `up→local`: no config file, as a new user runs it: `OPENAI_BASE_URL`
//!   and `OPENAI_API_KEY` only, so the default local model is last.
//! - `up→up2→local`: a second upstream without prefill (as the real OpenAI
//!   API) between them, everything else default.
//!
//! Per fault and chain, prints: clients answered whole within the deadline
//! (`[DONE]`, a finish reason, no error event) and the finish reasons (`length`
//! where a cap or the deadline cut the answer short), time to the whole answer
//! (p50 / p99), completion calls the faulty upstream saw per request (and,
//! apart, the capped shadow calls of its verification), and who finished
//! the answers (by the last chunk's model).
//!
//! Usage: bench-failover MODEL_GGUF [ROUNDS]   (ROUNDS of 8 clients, default 1;
//! the single client makes 3 × ROUNDS requests in turn)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use backstop_server::{run, App, Config};
use backstop_testkit::{MockReply, MockUpstream, SseStep};
use serde_json::{json, Value};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(20);
const LOCAL: &str = "smollm2-135m-instruct";

fn raw(status: u16, content_type: &str, body: &'static str) -> MockReply {
    MockReply::Raw {
        status,
        content_type: Some(content_type.into()),
        body: bytes::Bytes::from_static(body.as_bytes()),
    }
}

/// The start of an answer that then breaks.
fn begun() -> Vec<SseStep> {
    vec![
        SseStep::text("Here are three tips for sleeping"),
        SseStep::text(" better: keep a regular"),
    ]
}

/// How the faulty upstream behaves: every request (`Always`), or the first
/// attempt of each request and then healthy (`Once`), or down and up in
/// turns (`Flap`).
enum Fault {
    Always(MockReply),
    Once(MockReply),
    Flap,
}

fn faults() -> Vec<(&'static str, Fault)> {
    let limited = |headers: Vec<(String, String)>| MockReply::Json {
        status: 429,
        body: json!({"error": {"message": "Rate limit reached", "type": "requests",
                               "code": "rate_limit_exceeded"}}),
        headers,
    };
    let mut cut = begun();
    cut.push(SseStep::Cut);
    let mut stall = begun();
    stall.push(SseStep::Sleep(Duration::from_secs(120)));
    let mut malformed = begun();
    malformed.push(SseStep::Raw(bytes::Bytes::from_static(
        b"data: {\"choices\": [oops\n\n",
    )));
    let mut no_done = begun();
    no_done.push(SseStep::text(" schedule."));
    no_done.push(SseStep::finish("stop"));
    no_done.push(SseStep::Sleep(Duration::from_secs(120)));
    let mut slow = vec![SseStep::Sleep(Duration::from_secs(30))];
    slow.extend(begun());
    slow.push(SseStep::finish("stop"));
    let mut filtered = begun();
    filtered.push(SseStep::finish("content_filter"));
    vec![
        (
            "429 with Retry-After 1 s",
            Fault::Once(limited(vec![("retry-after".into(), "1".into())])),
        ),
        ("429 without Retry-After", Fault::Always(limited(vec![]))),
        (
            "500 once",
            Fault::Once(MockReply::error(500, "server_error", "boom")),
        ),
        (
            "503",
            Fault::Always(MockReply::error(503, "server_error", "overloaded")),
        ),
        ("reset", Fault::Always(MockReply::Reset)),
        ("no response", Fault::Always(MockReply::Hang)),
        (
            "slow first token (30 s)",
            Fault::Always(MockReply::sse(slow)),
        ),
        ("cut mid-answer", Fault::Always(MockReply::sse(cut))),
        ("stall mid-answer", Fault::Always(MockReply::sse(stall))),
        ("malformed chunk", Fault::Always(MockReply::sse(malformed))),
        (
            "finished, no [DONE]",
            Fault::Always(MockReply::sse(no_done)),
        ),
        (
            "HTML with a 200",
            Fault::Always(raw(
                200,
                "text/html",
                "<html><body>Bad gateway</body></html>",
            )),
        ),
        (
            "truncated JSON with a 200",
            Fault::Always(raw(
                200,
                "application/json",
                "{\"id\": \"chatcmpl-x\", \"choi",
            )),
        ),
        (
            "context length",
            Fault::Always(MockReply::Json {
                status: 400,
                body: json!({"error": {"message": "This model's maximum context length is 8 tokens.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
                headers: vec![],
            }),
        ),
        ("content filter", Fault::Always(MockReply::sse(filtered))),
        ("flap (2 s down, 2 s up)", Fault::Flap),
    ]
}

/// One client's request and what it got.
struct Outcome {
    whole: bool,
    took: Duration,
    by: String,
    /// The answer's finish reason, if it had one.
    finish: Option<String>,
}

async fn ask(client: &reqwest::Client, url: &str, question: &str) -> Outcome {
    let body = json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": question}]});
    let sent = Instant::now();
    let resp = client
        .post(url)
        .header("x-stainless-read-timeout", DEADLINE.as_secs().to_string())
        .json(&body)
        .timeout(DEADLINE)
        .send()
        .await;
    let text = match resp {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let took = sent.elapsed();
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let finish = events
        .iter()
        .find_map(|e| e.pointer("/choices/0/finish_reason")?.as_str())
        .map(str::to_string);
    let finished = finish.is_some();
    let error = events.iter().any(|e| e.get("error").is_some());
    let by = events
        .iter()
        .rev()
        .find_map(|e| e.get("model").and_then(Value::as_str))
        .map_or("none", |m| match m {
            LOCAL => "local",
            "up2-model" => "up2",
            _ => "up",
        })
        .to_string();
    Outcome {
        whole: finished && !error && text.ends_with("data: [DONE]\n\n") && took <= DEADLINE,
        took,
        by,
        finish,
    }
}

const QUESTIONS: [&str; 4] = [
    "Give me three tips for sleeping better.",
    "What causes rain?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
];

async fn cell(
    model: &std::path::Path,
    second: bool,
    fault: &Fault,
    clients: usize,
    rounds: usize,
) -> anyhow::Result<String> {
    let up = std::sync::Arc::new(MockUpstream::start().await?);
    let up2 = MockUpstream::start().await?;
    let mut config = if second {
        let toml = format!(
            "[[targets]]\nname = \"up\"\nbase_url = \"{}\"\napi_key_env = \"KEY\"\n\
             [[targets]]\nname = \"up2\"\nbase_url = \"{}\"\napi_key_env = \"KEY\"\nmodel = \"up2-model\"\n\
             [local]\nmodel = \"{}\"\n",
            up.url(),
            up2.url(),
            model.display()
        );
        Config::parse(&toml, |_| Some("sk-test".into()))?
    } else {
        let (url, model) = (up.url(), model.display().to_string());
        Config::from_env(move |name| match name {
            "OPENAI_BASE_URL" => Some(url.clone()),
            "OPENAI_API_KEY" => Some("sk-test".into()),
            "BACKSTOP_MODEL" => Some(model.clone()),
            _ => None,
        })?
    };
    config.listen = "127.0.0.1:0".parse()?;
    config.admin_listen = "127.0.0.1:0".parse()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = run(App::new(config).await?, async {
        let _ = stopped.await;
    })
    .await?;
    let base = format!("http://{}", running.addr);
    let admin = format!("http://{}", running.admin_addr);
    let client = reqwest::Client::new();
    for _ in 0..1200 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
            && client
                .get(format!("{admin}/admin/status"))
                .send()
                .await
                .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait for the local model too: /readyz is ready once any target is.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = if clients == 1 {
        3 * rounds
    } else {
        clients * rounds
    };
    let flap = match fault {
        Fault::Always(reply) => {
            up.set_default(reply.clone());
            None
        }
        Fault::Once(reply) => {
            up.push(std::iter::repeat_n(reply.clone(), requests));
            None
        }
        Fault::Flap => {
            let flapping = up.clone();
            Some(tokio::spawn(async move {
                loop {
                    flapping.set_default(MockReply::error(503, "server_error", "down"));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    flapping.set_default(MockReply::echo());
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }))
        }
    };
    let url = format!("{base}/v1/chat/completions");
    let mut outcomes = Vec::new();
    for round in 0..requests.div_ceil(clients) {
        let asks = (0..clients).map(|i| {
            let (client, url) = (client.clone(), url.clone());
            let question = QUESTIONS[(round * clients + i) % QUESTIONS.len()];
            tokio::spawn(async move { ask(&client, &url, question).await })
        });
        for task in asks.collect::<Vec<_>>() {
            outcomes.push(task.await?);
        }
    }
    if let Some(task) = flap {
        task.abort();
    }
    // Completions only (not health checks); the clients send no
    // max_tokens, so a capped one is a shadow copy or a synthetic probe.
    let calls: Vec<bool> = up
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| r.body.get("max_tokens").is_some())
        .collect();
    let attempts = calls.iter().filter(|shadow| !**shadow).count();
    let shadows = calls.len() - attempts;
    let _ = stop.send(());
    running.wait().await;
    let whole = outcomes.iter().filter(|o| o.whole).count();
    let mut times: Vec<Duration> = outcomes.iter().map(|o| o.took).collect();
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize].as_secs_f64();
    let mut by: Vec<(String, usize)> = Vec::new();
    for o in &outcomes {
        match by.iter_mut().find(|(name, _)| *name == o.by) {
            Some((_, n)) => *n += 1,
            None => by.push((o.by.clone(), 1)),
        }
    }
    let by: Vec<String> = by.iter().map(|(name, n)| format!("{name} {n}")).collect();
    let mut finishes: Vec<(String, usize)> = Vec::new();
    for o in outcomes.iter().filter_map(|o| o.finish.as_ref()) {
        match finishes.iter_mut().find(|(reason, _)| reason == o) {
            Some((_, n)) => *n += 1,
            None => finishes.push((o.clone(), 1)),
        }
    }
    let finishes: Vec<String> = finishes.iter().map(|(r, n)| format!("{r} {n}")).collect();
    Ok(format!(
        "{whole}/{} | {} | {:.1} / {:.1} s | {:.1} (+{shadows}) | {}",
        outcomes.len(),
        finishes.join(", "),
        pick(0.5),
        pick(0.99),
        attempts as f64 / outcomes.len() as f64,
        by.join(", ")
    ))
}

fn main() -> anyhow::Result<()> {
    backstop_local::settle_thread_count();
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .context("usage: bench-failover MODEL_GGUF [ROUNDS]")?,
    );
    let rounds: usize = args.next().map_or(Ok(1), |r| r.parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!("| fault | chain | clients | answered whole in 20 s | finish reasons | whole answer p50 / p99 | faulty upstream's attempts per request (+ shadow calls) | finished by |");
        println!("|---|---|---|---|---|---|---|---|");
        for (name, fault) in faults() {
            for (chain, second) in [("up→local", false), ("up→up2→local", true)] {
                for clients in [1, 8] {
                    let row = cell(&model, second, &fault, clients, rounds).await?;
                    println!("| {name} | {chain} | {clients} | {row} |");
                }
            }
        }
        Ok(())
    })
}
