//! Hostile clients and hostile upstreams against the real binary: each test
//! checks the answer a client gets, that the process stays up, and that its
//! memory stays bounded. Every finding of the hostile-input review has its
//! test here.

// Test helpers panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream, SseStep};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");
const KEY: &str = "sk-test-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789";
/// The HS256 secret of the authentication test.
const JWT_SECRET: &str = "jwt-secret-0123456789abcdef0123456789";
/// How long a test waits before it calls an answer hung: a guard against a
/// test that never ends, not a measure of speed (that is `benches/`).
const HANG: Duration = Duration::from_secs(30);

/// The binary, running a config, with its log lines.
struct Backstop {
    child: Child,
    addr: String,
    admin: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Its config file's directory, removed when it stops.
    _dir: tempfile::TempDir,
}

impl Drop for Backstop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backstop {
    /// Starts the binary on this TOML (`[server]` listen lines are added),
    /// optionally under a file-descriptor limit.
    fn start(toml: &str, nofile: Option<u32>) -> Self {
        Self::start_with(toml, nofile, &[], "info")
    }

    /// [`Backstop::start`] with these arguments, logging at `log`.
    fn start_with(toml: &str, nofile: Option<u32>, args: &[&str], log: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backstop.toml");
        std::fs::write(&path, toml).unwrap();
        let mut command = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        command
            .arg("--config")
            .arg(&path)
            .args(args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .env("BACKSTOP_DATA", dir.path().join("data"))
            .env("BACKSTOP_LISTEN", "127.0.0.1:0")
            .env("BACKSTOP_ADMIN_LISTEN", "127.0.0.1:0")
            .env("TEST_KEY", KEY)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TEST_JWT_SECRET", JWT_SECRET)
            .env("BACKSTOP_LOG", log)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let (mut addr, mut admin) = (None, None);
            for line in stdout.lines().map_while(Result::ok) {
                let after = |key: &str| line.split(key).nth(1).map(|a| a.trim().to_string());
                addr = addr.or_else(|| after("listening on http://"));
                admin = admin.or_else(|| after("admin endpoints on http://"));
                if let (Some(a), Some(b)) = (&addr, &admin) {
                    let _ = tx.send((a.clone(), b.clone()));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (addr, admin) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the binary says where it listens");
        Backstop {
            child,
            addr,
            admin,
            log,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Resident and peak memory, in MiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .unwrap()
                / 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The process is up, answers its health check at once, and has never
    /// held more than `peak_mib` of memory.
    async fn assert_up(&mut self, peak_mib: u64) {
        assert!(self.child.try_wait().unwrap().is_none(), "backstop exited");
        let (_, peak) = self.memory();
        assert!(peak < peak_mib, "peak RSS {peak} MiB, over {peak_mib}");
        let health = tokio::time::timeout(HANG, reqwest::get(self.url("/healthz")))
            .await
            .expect("the health check is answered")
            .unwrap();
        assert_eq!(health.status(), 200);
    }

    fn log_lines(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// A config with one target in front of `mock`, and these `[server]` lines.
fn config(mock: &MockUpstream, server: &str, more: &str) -> String {
    format!(
        "[server]\n{server}\n[health]\nprobe = \"off\"\n[shadow]\nenabled = false\n\
         [retry]\nmax_retries = 0\n\
         [[targets]]\nname = \"up0\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n{more}\n",
        mock.url()
    )
}

/// An echo that takes 1.5 s to answer: requests that hold their places.
fn slow_echo() -> MockReply {
    MockReply::Echo {
        delay: Duration::from_millis(1500),
        chunk_delay: Duration::ZERO,
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A raw HTTP/1.1 exchange on an open connection: the status and body of
/// the response (read by its Content-Length), or `None` if the server
/// closed the connection.
async fn exchange(conn: &mut TcpStream, request: &[u8]) -> Option<(u16, String)> {
    conn.write_all(request).await.ok()?;
    read_response(conn).await
}

/// One request on a fresh connection.
async fn once(addr: &str, request: &[u8]) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    exchange(&mut conn, request).await.expect("an answer")
}

async fn read_response(conn: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((
        status,
        String::from_utf8_lossy(&buf[head_end..]).to_string(),
    ))
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").into_bytes()
}

fn post(path: &str, content_type: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {content_type}\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Waits until the server closes `conn`, at most `limit` (well past the
/// deadline under test, far below the time an unbounded socket stays open).
async fn closed_within(conn: &mut TcpStream, limit: Duration) {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, conn.read(&mut chunk)).await {
            Err(_) => panic!("the connection was still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

fn error_code(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["code"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_silent_sockets_and_trickled_bodies_are_cut_off() {
    let mock = MockUpstream::start().await.unwrap();
    let server =
        "header_read_timeout_ms = 1000\nbody_read_timeout_ms = 1500\nidle_timeout_ms = 1500";
    let mut b = Backstop::start(&config(&mock, server, ""), None);
    let addr = b.addr.clone();

    // Nothing at all, and partial headers: closed at the header deadline.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut partial = TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    closed_within(&mut partial, Duration::from_secs(5)).await;

    // A body shorter than its Content-Length: a 408 at the body deadline.
    let mut lying = TcpStream::connect(&addr).await.unwrap();
    lying
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let (status, body) = read_response(&mut lying).await.expect("an answer");
    assert_eq!(status, 408);
    error_code(&body);

    // A body that trickles a byte at a time: the same.
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    trickle
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // Read the answer while still trickling, as a client would.
    let (mut reading, mut writing) = trickle.into_split();
    let feeding = tokio::spawn(async move {
        for _ in 0..40 {
            if writing.write_all(b"1\r\n \r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), reading.read_to_end(&mut answer)).await;
    feeding.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A keep-alive connection left idle after its request: closed.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(exchange(&mut idle, &get("/healthz")).await.unwrap().0, 200);
    closed_within(&mut idle, Duration::from_secs(5)).await;

    b.assert_up(100).await;
    let metrics = metrics(&b).await;
    assert!(metrics.contains("backstop_connections_closed_total{reason=\"header_timeout\"}"));
    assert!(metrics.contains("backstop_rejected_total{reason=\"body_timeout\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_by_a_slow_client() {
    let mock = MockUpstream::start().await.unwrap();
    let b = Backstop::start(&config(&mock, "shutdown_grace_ms = 30000", ""), None);
    let mut partial = TcpStream::connect(&b.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nho")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(&b.addr).await.unwrap();
    assert_eq!(exchange(&mut idle, &get("/healthz")).await.unwrap().0, 200);
    let mut b = b;
    Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap();
    for _ in 0..100 {
        if b.child.try_wait().unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backstop held SIGTERM for a slow client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration_and_never_ends_the_process() {
    let mock = MockUpstream::start().await.unwrap();
    let mut b = Backstop::start(&config(&mock, "", ""), None);
    for n in 1..=2 {
        Command::new("kill")
            .args(["-HUP", &b.child.id().to_string()])
            .status()
            .unwrap();
        // The file is as it was: each SIGHUP is one reload, unchanged.
        let want = format!("backstop_config_reloads_total{{outcome=\"unchanged\"}} {n}");
        let mut seen = false;
        for _ in 0..100 {
            if metrics(&b).await.contains(&want) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen, "no reload after SIGHUP {n}");
    }
    b.assert_up(100).await;
    let log = b.log.lock().unwrap().join("\n");
    assert!(log.contains("SIGHUP: reloading the configuration"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_requests_past_their_caps_get_a_fast_503() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_default(slow_echo());
    let server = "max_connections = 6\nmax_in_flight = 2";
    let mut b = Backstop::start(&config(&mock, server, ""), None);
    let http = reqwest::Client::new();
    let body = chat(json!({}));
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(http.post(b.url("/v1/chat/completions")).json(&body).send()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = http
        .post(b.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 503);
    // Answered at once, not queued: the two it was refused for still run.
    assert!(slow.iter().all(|call| !call.is_finished()));
    assert_eq!(third.headers()["retry-after"], "1");
    assert_eq!(error_code(&third.text().await.unwrap()), "overloaded");
    for call in slow {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    drop(http);
    // Until the server has seen those connections close (the admin's own
    // connection is the one left open).
    for _ in 0..100 {
        if metrics(&b).await.contains("backstop_open_connections 1\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Six idle connections hold every place: the seventh is answered 503.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut c = TcpStream::connect(&b.addr).await.unwrap();
        assert_eq!(exchange(&mut c, &get("/healthz")).await.unwrap().0, 200);
        held.push(c);
    }
    let mut extra = TcpStream::connect(&b.addr).await.unwrap();
    let (status, body) = exchange(&mut extra, &get("/healthz"))
        .await
        .expect("an answer");
    assert_eq!(status, 503);
    assert!(body.contains("connection limit"), "{body}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_meet_the_same_bounds() {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_default(slow_echo());
    let server = "max_in_flight = 2\nheader_read_timeout_ms = 1000\nidle_timeout_ms = 1000";
    let mut b = Backstop::start(&config(&mock, server, ""), None);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // Three streams at once on one connection: in-flight requests are
    // counted across streams, so one of them gets the fast 503.
    let body = chat(json!({}));
    let calls = (0..3).map(|_| h2.post(b.url("/v1/chat/completions")).json(&body).send());
    let mut statuses = Vec::new();
    for resp in futures_util::future::join_all(calls).await {
        let resp = resp.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        statuses.push(resp.status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503]);
    // Headers past `max_header_bytes` are refused on HTTP/2 too.
    let big = "x".repeat(40_000);
    let resp = h2.get(b.url("/healthz")).header("x-big", &big).send().await;
    assert!(resp.is_err() || resp.unwrap().status() == 431);
    // A connection that sends the HTTP/2 preface and then nothing is
    // closed at the header deadline; an idle one at the idle deadline.
    let mut silent = TcpStream::connect(&b.addr).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    drop(h2);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    assert_eq!(
        h2.get(b.url("/healthz")).send().await.unwrap().status(),
        200
    );
    for _ in 0..100 {
        if metrics(&b)
            .await
            .contains("backstop_connections_closed_total{reason=\"idle_timeout\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics(&b).await;
    assert!(
        text.contains("backstop_connections_closed_total{reason=\"idle_timeout\"}"),
        "{text}"
    );
    assert!(text.contains("backstop_connections_closed_total{reason=\"header_timeout\"}"));
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_deep_and_many_valued_bodies_are_refused_within_a_memory_ceiling() {
    let mock = MockUpstream::start().await.unwrap();
    let mut b = Backstop::start(&config(&mock, "", ""), None);
    let http = reqwest::Client::new();
    let send = |body: String| {
        http.post(b.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Nesting past serde's recursion limit.
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let resp = send(deep).await.unwrap();
    assert_eq!(resp.status(), 400);
    // 100k tiny messages in 3.5 MB: refused by the JSON value count, before parsing.
    let tiny = vec![r#"{"role":"user","content":"x"}"#; 100_000].join(",");
    let many = format!(r#"{{"model":"m","messages":[{tiny}]}}"#);
    assert!(many.len() > 3_000_000);
    let calls: Vec<_> = (0..16).map(|_| send(many.clone())).collect();
    for resp in futures_util::future::join_all(calls).await {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(error_code(&resp.text().await.unwrap()), "request_too_large");
    }
    // Past the message limit.
    let over = vec![r#"{"role":"user","content":"x"}"#; 4097].join(",");
    let resp = send(format!(r#"{{"model":"m","messages":[{over}]}}"#))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "messages");
    // Sixteen at once of the largest body accepted: 4096 messages, 3.5 MB.
    let text = "a".repeat(850);
    let big = vec![json!({"role": "user", "content": text}); 4096];
    let big = json!({"model": "m", "messages": big, "max_tokens": 1}).to_string();
    assert!(
        big.len() > 3_500_000 && big.len() < 4 << 20,
        "{}",
        big.len()
    );
    let calls: Vec<_> = (0..16).map(|_| send(big.clone())).collect();
    for resp in futures_util::future::join_all(calls).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    let (rss, peak) = b.memory();
    // 16 × 3.5 MB of bodies: parsing, routing and forwarding stay within
    // a few times their size.
    assert!(peak < 600, "peak RSS {peak} MiB");
    assert!(rss < 400, "RSS after {rss} MiB");
    b.assert_up(600).await;
}

/// The metrics page from the admin listener.
async fn metrics(b: &Backstop) -> String {
    reqwest::get(format!("http://{}/metrics", b.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `backstop_request_memory_bytes` from the admin listener.
async fn request_memory(b: &Backstop) -> u64 {
    let text = metrics(b).await;
    text.lines()
        .find_map(|l| l.strip_prefix("backstop_request_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request memory gauge in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_memory_budget_get_a_fast_503_and_the_budget_comes_back() {
    let mock = MockUpstream::start().await.unwrap();
    let mut b = Backstop::start(&config(&mock, "max_request_memory = 2097152", ""), None);
    let body = |size: usize| {
        let text = "a".repeat(size);
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": text}]})
            .to_string()
    };
    // A client sends most of a 1 MB body and stops: what has arrived is
    // charged (the gauge shows it).
    let slow = body(1_000_000);
    let request = post("/v1/chat/completions", "application/json", &slow, "");
    let (first, rest) = request.split_at(request.len() - 100_000);
    let mut conn = TcpStream::connect(&b.addr).await.unwrap();
    conn.write_all(first).await.unwrap();
    let mut held = 0;
    for _ in 0..200 {
        held = request_memory(&b).await;
        if held >= 890_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held >= 890_000, "{held}");
    // A small request still fits; a 700 KB one (1.4 MB once parsed) does
    // not, and is told to come back.
    let http = reqwest::Client::new();
    let send = |body: String| {
        http.post(b.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(send(body(10)).await.unwrap().status(), 200);
    let resp = send(body(700_000)).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(error_code(&resp.text().await.unwrap()), "overloaded");
    // The slow body ends and is answered (2 MB once parsed); its share
    // comes back, and the 700 KB request goes through.
    let (status, _) = exchange(&mut conn, rest).await.expect("an answer");
    assert_eq!(status, 200);
    drop(conn);
    for _ in 0..200 {
        if request_memory(&b).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(request_memory(&b).await, 0);
    assert_eq!(send(body(700_000)).await.unwrap().status(), 200);
    let text = metrics(&b).await;
    assert!(
        text.contains("backstop_rejected_total{reason=\"request_memory\"} 1\n"),
        "{text}"
    );
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_stops_is_held_to_max_tokens_and_the_deadline() {
    let mock = MockUpstream::start().await.unwrap();
    let endless: Vec<SseStep> = (0..20_000)
        .map(|i| SseStep::text(&format!("word{i} ")))
        .collect();
    mock.set_default(MockReply::sse(endless));
    let toml = config(&mock, "", "").replace("[retry]\n", "[retry]\ndeadline_ms = 3000\n");
    let mut b = Backstop::start(&toml, None);
    let http = reqwest::Client::builder().timeout(HANG).build().unwrap();
    let text = http
        .post(b.url("/v1/chat/completions"))
        .json(&chat(json!({"stream": true, "max_tokens": 5})))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let said: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(said.split_whitespace().count() <= 5, "{said}");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    // Slow and endless, with no max_tokens: cut at the deadline, with an error event.
    let slow: Vec<SseStep> = (0..2_000)
        .flat_map(|_| {
            [
                SseStep::text("la "),
                SseStep::Sleep(Duration::from_millis(20)),
            ]
        })
        .collect();
    mock.set_default(MockReply::sse(slow));
    let text = http
        .post(b.url("/v1/chat/completions"))
        .json(&chat(json!({"stream": true})))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Cut well before the upstream's 2,000 words (40 s of them), and said so.
    let words = text.matches("la ").count();
    assert!(words > 0 && words < 1_000, "{words} words");
    assert!(!text.contains("[DONE]"));
    assert!(
        text.contains("deadline_passed"),
        "{}",
        &text[text.len().saturating_sub(400)..]
    );
    // The cut is not the target's failure.
    let admin = reqwest::get(format!("http://{}/admin/breakers", b.admin))
        .await
        .unwrap();
    let v: Value = admin.json().await.unwrap();
    assert_eq!(v["breakers"][0]["state"], "closed", "{v}");
    b.assert_up(150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_sse_line_or_choice_index_is_a_bad_response_not_a_buffer() {
    let mock = MockUpstream::start().await.unwrap();
    let mut b = Backstop::start(&config(&mock, "", ""), None);
    let http = reqwest::Client::new();
    let stream = chat(json!({"stream": true}));
    // 64 MiB without a line end.
    let mut steps = vec![SseStep::Raw(Bytes::from_static(b"data: {\"x\":\""))];
    steps.extend((0..64).map(|_| SseStep::Raw(Bytes::from(vec![b'a'; 1 << 20]))));
    mock.push([MockReply::sse(steps)]);
    let resp = http
        .post(b.url("/v1/chat/completions"))
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("larger than"));
    // A choice index of four billion.
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 4_000_000_000u64, "delta": {"content": "hi"}, "finish_reason": null}]});
    mock.push([MockReply::sse(vec![SseStep::Data(chunk.to_string())])]);
    let resp = http
        .post(b.url("/v1/chat/completions"))
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("choice index"));
    let (_, peak) = b.memory();
    assert!(peak < 200, "peak RSS {peak} MiB");
    b.assert_up(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_that_echoes_the_key_is_scrubbed() {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::error(
        401,
        "invalid_request_error",
        &format!("Incorrect API key provided: Bearer {KEY}. You can find your key at ..."),
    )]);
    let b = Backstop::start(&config(&mock, "", ""), None);
    let resp = reqwest::Client::new()
        .post(b.url("/v1/chat/completions"))
        .json(&chat(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(KEY), "{text}");
    assert!(text.contains("[redacted]"), "{text}");
    let mut b = b;
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_openai_shaped() {
    let mock = MockUpstream::start().await.unwrap();
    let b = Backstop::start(&config(&mock, "", ""), None);
    let mut garbage = TcpStream::connect(&b.addr).await.unwrap();
    let (status, body) = exchange(&mut garbage, b"NOT HTTP AT ALL\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status, 400);
    error_code(&body);
    let mut big = TcpStream::connect(&b.addr).await.unwrap();
    let header = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let (status, body) = exchange(&mut big, header.as_bytes()).await.unwrap();
    assert_eq!(status, 431);
    assert_eq!(error_code(&body), "headers_too_large");
    let mut b = b;
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_surface_refuses_web_pages_and_the_client_listener() {
    let mock = MockUpstream::start().await.unwrap();
    let b = Backstop::start(&config(&mock, "", ""), None);
    let open_with = |content_type: &str, extra: &str| {
        post(
            "/admin/breakers/up0",
            content_type,
            r#"{"force":"open"}"#,
            extra,
        )
    };
    let force = open_with("application/json", "");
    // On the client listener: not served without the admin token.
    let (status, body) = once(&b.addr, &force).await;
    assert_eq!(status, 403, "{body}");
    // A web page's simple POST, even to the admin listener; a POST that is
    // not JSON; a fetch from another site.
    let page = open_with("text/plain", "origin: http://evil.example\r\n");
    assert_eq!(once(&b.admin, &page).await.0, 403);
    assert_eq!(once(&b.admin, &open_with("text/plain", "")).await.0, 415);
    let fetched = open_with("application/json", "sec-fetch-site: cross-site\r\n");
    assert_eq!(once(&b.admin, &fetched).await.0, 403);
    // The operator, on the admin listener: served, and /readyz tells the truth.
    assert_eq!(reqwest::get(b.url("/readyz")).await.unwrap().status(), 200);
    let (status, body) = once(&b.admin, &force).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reqwest::get(b.url("/readyz")).await.unwrap().status(), 503);

    // With an admin token: served on the client listener to its holder only.
    let toml = config(&mock, "admin_token_env = \"ADMIN_TOKEN\"", "");
    let b = Backstop::start(&toml, None);
    assert_eq!(once(&b.addr, &force).await.0, 401);
    let with = open_with(
        "application/json",
        &format!("authorization: Bearer {ADMIN_TOKEN}\r\n"),
    );
    assert_eq!(once(&b.addr, &with).await.0, 200);
    let mut b = b;
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sampling_parameters_offline_are_400s_and_never_open_the_breaker() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let toml =
        format!("[server]\n[local]\nmodel = \"{model}\"\n[breaker]\nconsecutive_failures = 2\n");
    let mut b = Backstop::start_with(&toml, None, &["--offline"], "info");
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if http
            .get(b.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for bad in [
        json!({"repetition_penalty": 0}),
        json!({"repetition_penalty": "x"}),
        json!({"top_k": -1}),
        json!({"temperature": 3}),
        json!({"logit_bias": {"1": 500}}),
        json!({"repetition_penalty": 0, "stream": true}),
    ] {
        let param = bad.as_object().unwrap().keys().next().unwrap().clone();
        let resp = http
            .post(b.url("/v1/chat/completions"))
            .json(&chat(bad.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let text = resp.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"]["param"].as_str().unwrap().starts_with(&param),
            "{v}"
        );
        assert!(
            !text.contains("backtrace") && !text.contains("rust_begin_unwind"),
            "{text}"
        );
    }
    // Extreme but valid: served.
    for ok in [
        json!({"top_p": 1e-308, "max_tokens": 4}),
        json!({"temperature": 2, "top_k": 1, "repetition_penalty": 10, "max_tokens": 4}),
    ] {
        let resp = http
            .post(b.url("/v1/chat/completions"))
            .json(&chat(ok.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{ok}: {}", resp.text().await.unwrap());
    }
    let breakers: Value = reqwest::get(format!("http://{}/admin/breakers", b.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(breakers["breakers"][0]["state"], "closed", "{breakers}");
    assert_eq!(
        http.get(b.url("/readyz")).send().await.unwrap().status(),
        200
    );
    b.assert_up(400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_backstops_own_failure() {
    let mock = MockUpstream::start().await.unwrap();
    // Connections are allowed past what the descriptors hold, on purpose.
    let server = "max_connections = 500\nheader_read_timeout_ms = 30000\nidle_timeout_ms = 30000";
    let mut b = Backstop::start(&config(&mock, server, "pool_max_idle = 0"), Some(64));
    // Two connections in place first: one for completions, one for the admin.
    let mut client = TcpStream::connect(&b.addr).await.unwrap();
    assert_eq!(
        exchange(&mut client, &get("/healthz")).await.unwrap().0,
        200
    );
    let mut admin = TcpStream::connect(&b.admin).await.unwrap();
    assert_eq!(
        exchange(&mut admin, &get("/admin/breakers"))
            .await
            .unwrap()
            .0,
        200
    );
    // Fill every descriptor with idle connections.
    let mut fillers = Vec::new();
    for _ in 0..80 {
        fillers.push(TcpStream::connect(&b.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = chat(json!({})).to_string();
    let request = post("/v1/chat/completions", "application/json", &body, "");
    for _ in 0..3 {
        let (status, text) = exchange(&mut client, &request).await.expect("an answer");
        assert_eq!(status, 503, "{text}");
        assert_eq!(error_code(&text), "local_resources");
    }
    let (_, breakers) = exchange(&mut admin, &get("/admin/breakers")).await.unwrap();
    let v: Value = serde_json::from_str(&breakers).unwrap();
    assert_eq!(v["breakers"][0]["state"], "closed", "{v}");
    // The accept failures were logged, but not twenty times a second.
    let logged = b.log_lines("accept failed");
    assert!((1..=2).contains(&logged), "{logged} accept failures logged");
    // Pressure over: served at once, with no breaker to wait out.
    drop(fillers);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, text) = exchange(&mut client, &request).await.expect("an answer");
    assert_eq!(status, 200, "{text}");
    b.assert_up(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_shows_in_a_log_an_error_a_metric_or_the_admin_status() {
    use sha2::Digest as _;
    let client_key = "sk-client-7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29";
    let stranger_key = "sk-stranger-00112233445566778899aabbccddeeff";
    let hash: String = sha2::Sha256::digest(client_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mock = MockUpstream::start().await.unwrap();
    let auth = format!(
        "[auth]\nenabled = true\n[[auth.identities]]\nname = \"billing\"\nkey_sha256 = [\"{hash}\"]\n\
         [[auth.identities]]\nname = \"ops\"\nscopes = [\"admin\"]\n\
         [auth.jwt]\nsecrets = [{{ kid = \"s1\", secret_env = \"TEST_JWT_SECRET\" }}]\n"
    );
    let toml = format!(
        "{}\n{auth}",
        config(&mock, "admin_token_env = \"ADMIN_TOKEN\"", "")
    );
    // Everything Backstop logs, its dependencies' debug lines too.
    let b = Backstop::start_with(&toml, None, &[], "debug");
    let sign = |secret: &str, sub: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("s1".into());
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        jsonwebtoken::encode(
            &header,
            &json!({"sub": sub, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let token = sign(JWT_SECRET, "billing");
    let forged = sign("a forged secret of thirty-two bytes or more", "billing");
    let admin_jwt = sign(JWT_SECRET, "ops");
    let http = reqwest::Client::new();
    let mut bodies = Vec::new();
    for (credential, want) in [
        (client_key, 200),
        (stranger_key, 401),
        (token.as_str(), 200),
        (forged.as_str(), 401),
        (ADMIN_TOKEN, 401),
    ] {
        let resp = http
            .post(b.url("/v1/chat/completions"))
            .bearer_auth(credential)
            .json(&chat(json!({"stream": want == 200})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
        bodies.push(resp.text().await.unwrap());
    }
    for credential in [ADMIN_TOKEN, admin_jwt.as_str()] {
        let resp = http
            .get(format!("http://{}/admin/status", b.admin))
            .bearer_auth(credential)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(resp.text().await.unwrap());
    }
    let resp = http
        .get(format!("http://{}/admin/status", b.admin))
        .bearer_auth(client_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    bodies.push(resp.text().await.unwrap());
    bodies.push(metrics(&b).await);
    // The upstream did get its key: it is a secret that exists.
    assert!(mock.requests().iter().any(|r| r
        .headers
        .values()
        .any(|v| v.to_str().unwrap_or("").contains(KEY))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = b.log.lock().unwrap().join("\n");
    assert!(log.contains("authentication is on"), "{log}");
    let secrets = [
        KEY,
        ADMIN_TOKEN,
        JWT_SECRET,
        client_key,
        stranger_key,
        &hash,
        &token,
        &forged,
        &admin_jwt,
    ];
    for secret in secrets {
        assert!(!log.contains(secret), "a secret in the log");
        for body in &bodies {
            assert!(!body.contains(secret), "a secret in an answer: {body}");
        }
    }
    let mut b = b;
    b.assert_up(100).await;
}
