//! What several replicas on one PostgreSQL store cost and save, against
//! mock upstreams on loopback:
//!
//! - `takeover BIN ROUNDS LEASE_S`: two `backstop` binaries (BIN) share a
//!   store with leases of LEASE_S; a background response streams on the
//!   first, which is killed with SIGKILL; the time from the kill to the
//!   response's next event, made by the survivor, as a client following it
//!   there sees it.
//! - `shadows SECONDS`: an upstream that stays down behind live traffic;
//!   shadow calls it gets a minute from one replica, from two replicas that
//!   share a store (one verifies for both), and from two that do not.
//! - `budgets SECONDS`: two replicas each offered twice the upstream's
//!   limit; requests that reach it past the limit (what it answers with
//!   429s), with the limit shared and with each replica keeping its own.
//! - `breakers ROUNDS`: two replicas share a store; an upstream fails for
//!   one of them only, whose breaker opens; the time until the other counts
//!   it in `backstop_breaker_open_replicas`.
//! - `follow ROUNDS`: a background response streams on one replica, and
//!   clients follow it there (from memory) and on another replica (through
//!   the store and its notifications); how much later each event reaches
//!   the second.
//! - `sync SECONDS REPLICAS`: what sharing the budgets costs PostgreSQL:
//!   REPLICAS stores each sync two budgets (an upstream key's and a client
//!   identity's) back to back, as a replica does every 250 ms; each sync's
//!   time, and how many the database takes a second (benches/counters.sh
//!   sets this beside a counter bumped per request in PostgreSQL and in
//!   Redis).
//!
//! The PostgreSQL server is `BACKSTOP_TEST_POSTGRES` (benches/replicas.sh
//! starts one); each run gets a database of its own.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backstop_server::{run, App, Config, Running};
use backstop_store::{Budget, Postgres, Retention, Store};
use backstop_testkit::{MockReply, MockUpstream};
use serde_json::{json, Value};
use tokio::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match args.first().map(String::as_str) {
            Some("takeover") => {
                let bin = args.get(1).ok_or_else(|| anyhow::anyhow!("BIN"))?;
                let rounds: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
                let lease: u64 = args.get(3).map_or(Ok(10), |s| s.parse())?;
                takeover(bin, rounds, lease).await
            }
            Some("shadows") => shadows(seconds(&args)?).await,
            Some("budgets") => budgets(seconds(&args)?).await,
            Some("breakers") => breakers(args.get(1).map_or(Ok(10), |s| s.parse())?).await,
            Some("follow") => follow(args.get(1).map_or(Ok(5), |s| s.parse())?).await,
            Some("sync") => {
                let replicas: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
                sync(seconds(&args)?, replicas).await
            }
            _ => anyhow::bail!(
                "usage: bench-replicas takeover BIN ROUNDS LEASE_S | shadows SECONDS | \
                 budgets SECONDS | breakers ROUNDS | follow ROUNDS | sync SECONDS REPLICAS"
            ),
        }
    })
}

fn seconds(args: &[String]) -> anyhow::Result<Duration> {
    Ok(Duration::from_secs(
        args.get(1).map_or(Ok(20), |s| s.parse())?,
    ))
}

/// A binary replica on the shared database `url`, in front of `up`.
fn spawn_replica(
    bin: &str,
    up: &MockUpstream,
    url: &str,
    lease: u64,
) -> anyhow::Result<(Child, String)> {
    let dir = std::env::temp_dir().join(format!("bench-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join(format!(
        "{}.toml",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[targets]]\nname = \"up\"\nbase_url = \"{}\"\n\
             [store]\nurl = \"{url}\"\nlease_s = {lease}\n",
            up.url()
        ),
    )?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    // Its log is read to its end, so that it never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if let Some(addr) = line.split("listening on http://").nth(1) {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow::anyhow!("the replica never listened"))?;
    Ok((child, addr))
}

async fn takeover(bin: &str, rounds: usize, lease: u64) -> anyhow::Result<()> {
    let up = MockUpstream::start().await?;
    up.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(100),
    });
    let client = reqwest::Client::new();
    let mut took = Vec::new();
    for _ in 0..rounds {
        let url = backstop_testkit::postgres::database().await?;
        let (mut a, a_addr) = spawn_replica(bin, &up, &url, lease)?;
        let (mut b, b_addr) = spawn_replica(bin, &up, &url, lease)?;
        let words = "word ".repeat(400);
        let made: Value = client
            .post(format!("http://{a_addr}/v1/responses"))
            .json(&json!({"model": "gpt-4o-mini", "input": words, "background": true}))
            .send()
            .await?
            .json()
            .await?;
        let id = made["id"].as_str().unwrap_or_default().to_string();
        // Follow it on B; kill A once events flow.
        let mut follow = client
            .get(format!("http://{b_addr}/v1/responses/{id}?stream=true"))
            .send()
            .await?;
        let mut seen = 0usize;
        while seen < 5 {
            let chunk = follow
                .chunk()
                .await?
                .ok_or_else(|| anyhow::anyhow!("ended"))?;
            seen += String::from_utf8_lossy(&chunk).matches("\n\n").count();
        }
        a.kill()?;
        let killed = Instant::now();
        let _ = a.wait();
        // Events already committed arrive at once; the survivor's are the
        // ones after a pause.
        let mut last = Instant::now();
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(120), follow.chunk()).await??;
            let Some(_) = chunk else {
                anyhow::bail!("the stream ended before a takeover")
            };
            let now = Instant::now();
            if now - last > Duration::from_millis(500) {
                took.push(now - killed);
                break;
            }
            last = now;
        }
        let _ = b.kill();
        let _ = b.wait();
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {lease} s | {rounds} | {:.0} / {:.0} / {:.0} |",
        ms(took[0]),
        ms(took[took.len() / 2]),
        ms(took[took.len() - 1])
    );
    Ok(())
}

/// An in-process replica running `toml` (with `store` added).
async fn replica(
    toml: &str,
    store: &str,
) -> anyhow::Result<(Running, tokio::sync::oneshot::Sender<()>)> {
    let config = Config::parse(&format!("{toml}\n{store}"), |_| None)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = run(App::new(config).await?, async {
        let _ = stopped.await;
    })
    .await?;
    Ok((running, stop))
}

/// Shadow calls bear this cap on `max_tokens`; live ones carry none.
const CAP: u64 = 8;

async fn shadows(secs: Duration) -> anyhow::Result<()> {
    println!("| replicas | store | shadow calls to the sick upstream a minute |");
    println!("|---|---|---|");
    for (n, shared) in [(1, true), (2, true), (2, false)] {
        let sick = MockUpstream::start().await?;
        sick.set_default(MockReply::error(503, "server_error", "down"));
        let fallback = MockUpstream::start().await?;
        let url = backstop_testkit::postgres::database().await?;
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
             [shadow]\nsample_rate = 1.0\nmax_tokens = {CAP}\n\
             [[targets]]\nname = \"sick\"\nbase_url = \"{}\"\n\
             breaker = {{ consecutive_failures = 2, open_ms = 1000, jitter = 0.0 }}\n\
             [[targets]]\nname = \"fallback\"\nbase_url = \"{}\"\n",
            sick.url(),
            fallback.url()
        );
        let mut replicas = Vec::new();
        for i in 0..n {
            let store = if shared {
                format!("[store]\nurl = \"{url}\"\n")
            } else {
                let dir =
                    std::env::temp_dir().join(format!("bench-shadows-{}-{i}", std::process::id()));
                format!("[store]\npath = {dir:?}\n")
            };
            replicas.push(replica(&toml, &store).await?);
        }
        let client = reqwest::Client::new();
        let body =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
        let start = Instant::now();
        // Live traffic on every replica, 20 requests a second each.
        while start.elapsed() < secs {
            for (running, _) in &replicas {
                let _ = client
                    .post(format!("http://{}/v1/chat/completions", running.addr))
                    .json(&body)
                    .send()
                    .await?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let shadows = sick
            .requests()
            .iter()
            .filter(|r| r.body["max_tokens"] == CAP)
            .count();
        let per_minute = shadows as f64 * 60.0 / secs.as_secs_f64();
        let store = if shared {
            "one PostgreSQL, shared"
        } else {
            "each its own SQLite"
        };
        println!("| {n} | {store} | {per_minute:.0} |");
        for (_, stop) in replicas {
            let _ = stop.send(());
        }
    }
    Ok(())
}

/// Requests past an upstream limit of `per_minute`, a bucket that starts
/// full and refills continuously: what the upstream answers with 429s.
fn past_the_limit(arrivals: &mut [Instant], per_minute: f64) -> usize {
    arrivals.sort();
    let (mut level, mut at, mut over) = (per_minute, arrivals.first().copied(), 0);
    for &t in arrivals.iter() {
        let since = at.map_or(0.0, |a| (t - a).as_secs_f64());
        level = (level + since * per_minute / 60.0).min(per_minute);
        at = Some(t);
        if level >= 1.0 {
            level -= 1.0;
        } else {
            over += 1;
        }
    }
    over
}

async fn budgets(secs: Duration) -> anyhow::Result<()> {
    const LIMIT: u64 = 30;
    println!(
        "| budget | offered | reached the upstream | past its limit of {LIMIT} a minute (429s) |"
    );
    println!("|---|---|---|---|");
    for shared in [true, false] {
        let up = MockUpstream::start().await?;
        let url = backstop_testkit::postgres::database().await?;
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
             [[targets]]\nname = \"up\"\nbase_url = \"{}\"\nrequests_per_minute = {LIMIT}\n",
            up.url()
        );
        let mut replicas = Vec::new();
        for i in 0..2 {
            let store = if shared {
                format!("[store]\nurl = \"{url}\"\n")
            } else {
                let dir =
                    std::env::temp_dir().join(format!("bench-budgets-{}-{i}", std::process::id()));
                format!("[store]\npath = {dir:?}\n")
            };
            replicas.push(replica(&toml, &store).await?);
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let client = reqwest::Client::new();
        let body =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
        let start = Instant::now();
        let mut offered = 0;
        // Each replica offered twice the limit: 4 requests a second each.
        while start.elapsed() < secs {
            for (running, _) in &replicas {
                offered += 1;
                let _ = client
                    .post(format!("http://{}/v1/chat/completions", running.addr))
                    .json(&body)
                    .send()
                    .await?;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut arrivals: Vec<Instant> = up.requests().iter().map(|r| r.at).collect();
        let reached = arrivals.len();
        let over = past_the_limit(&mut arrivals, LIMIT as f64);
        let budget = if shared {
            "shared (one PostgreSQL)"
        } else {
            "per replica"
        };
        println!("| {budget} | {offered} | {reached} | {over} |");
        for (_, stop) in replicas {
            let _ = stop.send(());
        }
    }
    Ok(())
}

/// See the module's docs (`sync`).
async fn sync(secs: Duration, replicas: usize) -> anyhow::Result<()> {
    let url = backstop_testkit::postgres::database().await?;
    let retention = Retention {
        stored: Duration::from_secs(3600),
        unstored: Duration::from_secs(600),
        max_bytes: u64::MAX,
    };
    let mut tasks = Vec::new();
    for _ in 0..replicas {
        let store = Postgres::connect(&url, retention.clone(), Duration::from_secs(10)).await?;
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let start = Instant::now();
            let mut spent = 0.0;
            while start.elapsed() < secs {
                spent += 1.0;
                let budgets = ["up#0", "identity/team-a"].map(|name| Budget {
                    name: name.to_string(),
                    per_minute: [Some(10_000.0), Some(2_000_000.0)],
                    spent: [spent, spent * 100.0],
                    remaining: [Some(10_000.0 - spent), None],
                    held_ms: 0,
                });
                let began = Instant::now();
                store.share_budgets(budgets.to_vec()).await?;
                took.push(began.elapsed());
            }
            anyhow::Ok(took)
        }));
    }
    let mut took = Vec::new();
    for task in tasks {
        took.extend(task.await??);
    }
    took.sort();
    let at = |p: f64| took[((took.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "| Backstop's budget sync (2 budgets), {replicas} replicas back to back | {:.0} | {:.2} | {:.2} |",
        took.len() as f64 / secs.as_secs_f64(),
        at(0.5),
        at(0.99)
    );
    Ok(())
}

/// A metric's value on a replica's admin endpoint (0 when absent).
async fn metric(client: &reqwest::Client, running: &Running, sample: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("http://{}/metrics", running.admin_addr))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// See the module's docs (`breakers`).
async fn breakers(rounds: usize) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
    let mut took = Vec::new();
    for _ in 0..rounds {
        let url = backstop_testkit::postgres::database().await?;
        let fallback = MockUpstream::start().await?;
        let sick = MockUpstream::start().await?;
        sick.set_default(MockReply::error(503, "server_error", "down"));
        let well = MockUpstream::start().await?;
        let mut replicas = Vec::new();
        for up in [&sick, &well] {
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
                 [[targets]]\nname = \"up\"\nbase_url = \"{}\"\n\
                 breaker = {{ consecutive_failures = 2, open_ms = 60000 }}\n\
                 [[targets]]\nname = \"fallback\"\nbase_url = \"{}\"\n",
                up.url(),
                fallback.url()
            );
            replicas.push(replica(&toml, &format!("[store]\nurl = \"{url}\"\n")).await?);
        }
        let (a, b) = (&replicas[0].0, &replicas[1].0);
        // Both replicas report to the store before the breaker opens.
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Two failures in a row open A's breaker as the second returns.
        for _ in 0..2 {
            client
                .post(format!("http://{}/v1/chat/completions", a.addr))
                .json(&body)
                .send()
                .await?;
        }
        let opened = Instant::now();
        let sample = "backstop_breaker_open_replicas{target=\"up\"}";
        loop {
            if metric(&client, b, sample).await? >= 1.0 {
                took.push(opened.elapsed());
                break;
            }
            if opened.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("the other replica never heard of the open breaker");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (_, stop) in replicas {
            let _ = stop.send(());
        }
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| rounds | another replica counts the open breaker after: min / median / max (ms) |");
    println!("|---|---|");
    println!(
        "| {rounds} | {:.0} / {:.0} / {:.0} |",
        ms(took[0]),
        ms(took[took.len() / 2]),
        ms(took[took.len() - 1])
    );
    Ok(())
}

/// When each event (by its `sequence_number`) of a response's stream
/// arrives at a client following it on `addr`.
async fn arrivals(
    client: reqwest::Client,
    addr: std::net::SocketAddr,
    id: String,
) -> anyhow::Result<std::collections::HashMap<u64, Instant>> {
    let mut resp = client
        .get(format!("http://{addr}/v1/responses/{id}?stream=true"))
        .send()
        .await?;
    let (mut seen, mut buffer) = (std::collections::HashMap::new(), String::new());
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), resp.chunk()).await?? {
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data = event.lines().find_map(|l| l.strip_prefix("data: "));
            if let Some(seq) = data
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .and_then(|v| v["sequence_number"].as_u64())
            {
                seen.insert(seq, now);
            }
        }
    }
    Ok(seen)
}

/// See the module's docs (`follow`).
async fn follow(rounds: usize) -> anyhow::Result<()> {
    let up = MockUpstream::start().await?;
    up.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(50),
    });
    let url = backstop_testkit::postgres::database().await?;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[targets]]\nname = \"up\"\nbase_url = \"{}\"\n",
        up.url()
    );
    let store = format!("[store]\nurl = \"{url}\"\n");
    let (a, stop_a) = replica(&toml, &store).await?;
    let (b, stop_b) = replica(&toml, &store).await?;
    let client = reqwest::Client::new();
    let mut later = Vec::new();
    for _ in 0..rounds {
        let made: Value = client
            .post(format!("http://{}/v1/responses", a.addr))
            .json(&json!({"model": "gpt-4o-mini", "input": "word ".repeat(60), "background": true}))
            .send()
            .await?
            .json()
            .await?;
        let id = made["id"].as_str().unwrap_or_default().to_string();
        let here = tokio::spawn(arrivals(client.clone(), a.addr, id.clone()));
        let there = tokio::spawn(arrivals(client.clone(), b.addr, id));
        let (here, there) = (here.await??, there.await??);
        // Events both saw live (the first ones may predate a follower).
        for (seq, at) in &there {
            if let Some(first) = here.get(seq) {
                if *seq > 2 {
                    later.push(at.saturating_duration_since(*first));
                }
            }
        }
    }
    let _ = (stop_a.send(()), stop_b.send(()));
    later.sort();
    let at = |p: f64| later[((later.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!("| events | on another replica, later by p50 / p99 / max (ms) |");
    println!("|---|---|");
    println!(
        "| {} | {:.1} / {:.1} / {:.1} |",
        later.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
