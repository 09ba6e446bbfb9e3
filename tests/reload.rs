//! A live configuration: the file is read again on `POST /admin/reload` and
//! when it changes, validated, and put in place as one snapshot. Targets
//! whose settings did not change keep what they learned; requests in flight
//! finish on the configuration they started with; a file that does not
//! validate changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream};
use backstop_tests::{sse_data, streamed_text, Harness};
use futures_util::StreamExt;
use serde_json::{json, Value};

const HEAD: &str = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                    [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n";

/// A target over `mock`, with `extra` lines in its table.
fn target(name: &str, mock: &MockUpstream, extra: &str) -> String {
    format!(
        "[[targets]]\nname = \"{name}\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n{extra}\n",
        mock.url()
    )
}

/// The one route, over these targets in order.
fn route(targets: &[&str]) -> String {
    format!("[[routes]]\nmodels = \"*\"\ntargets = {targets:?}\n")
}

async fn mocks(n: usize) -> Vec<MockUpstream> {
    let mut mocks = Vec::new();
    for _ in 0..n {
        mocks.push(MockUpstream::start().await.unwrap());
    }
    mocks
}

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})
}

/// Who served a chat.
async fn served_by(h: &Harness) -> String {
    let resp = h.post("/v1/chat/completions", &chat()).await;
    assert_eq!(resp.status(), 200);
    let backend = resp.headers()["x-backstop-backend"].to_str().unwrap();
    backend.to_string()
}

async fn reload(h: &Harness) -> (u16, Value) {
    let resp = h.admin_post("/admin/reload").await;
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// The `Authorization` each request `mock` got carried, in order.
fn keys_seen(mock: &MockUpstream) -> Vec<String> {
    mock.requests()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect()
}

/// An operator forces `target`'s breaker open: state a reload must keep.
async fn force_open(h: &Harness, target: &str) {
    let forced = h
        .http
        .post(h.admin_url(&format!("/admin/breakers/{target}")))
        .json(&json!({"force": "open"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), 200);
}

async fn breaker(h: &Harness, target: &str) -> Value {
    let all: Value = h.admin_get("/admin/breakers").await.json().await.unwrap();
    all["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["target"] == target)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_reload_keeps_what_unchanged_targets_learned_and_starts_the_rest() {
    let mocks = mocks(3).await;
    let first = format!(
        "{HEAD}{}{}{}",
        target("up0", &mocks[0], ""),
        target("up1", &mocks[1], ""),
        route(&["up0", "up1"])
    );
    let h = Harness::with_file(mocks, &first, false).await;
    // What up0 has learned: an operator forced its breaker open.
    force_open(&h, "up0").await;
    assert_eq!(served_by(&h).await, "up1");

    // up0 as it was, up1 changed (a bigger pool), up2 new, and the route
    // now up0 then up2.
    let file = h.config_file.as_ref().unwrap();
    file.write(&format!(
        "{HEAD}{}{}{}{}",
        target("up0", &h.mocks[0], ""),
        target("up1", &h.mocks[1], "pool_max_idle = 128"),
        target("up2", &h.mocks[2], ""),
        route(&["up0", "up2"])
    ));
    let (status, body) = reload(&h).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "applied");
    assert_eq!(body["targets"]["kept"], json!(["up0"]));
    assert_eq!(body["targets"]["started"], json!(["up1", "up2"]));
    assert_eq!(body["targets"]["removed"], json!([]));
    assert_eq!(body["restart_needed"], json!([]));
    assert_eq!(
        breaker(&h, "up0").await["forced"],
        "open",
        "up0 kept its breaker"
    );
    assert_eq!(served_by(&h).await, "up2");

    // up1 removed; the same file again changes nothing.
    file.write(&format!(
        "{HEAD}{}{}{}",
        target("up0", &h.mocks[0], ""),
        target("up2", &h.mocks[2], ""),
        route(&["up0", "up2"])
    ));
    let (_, body) = reload(&h).await;
    assert_eq!(body["targets"]["kept"], json!(["up0", "up2"]));
    assert_eq!(body["targets"]["removed"], json!(["up1"]));
    let (_, body) = reload(&h).await;
    assert_eq!(body["outcome"], "unchanged");
    assert_eq!(breaker(&h, "up1").await, Value::Null);
    assert_eq!(breaker(&h, "up0").await["forced"], "open");

    // A setting read only at start is reported, not applied.
    file.write(&format!(
        "{}{}{}{}",
        HEAD.replace("[server]\n", "[server]\nmax_in_flight = 7\n"),
        target("up0", &h.mocks[0], ""),
        target("up2", &h.mocks[2], ""),
        route(&["up0", "up2"])
    ));
    let (_, body) = reload(&h).await;
    assert_eq!(body["outcome"], "unchanged");
    assert_eq!(body["restart_needed"], json!(["limits"]));

    let sample = |outcome: &str| format!("backstop_config_reloads_total{{outcome=\"{outcome}\"}}");
    assert_eq!(h.metric(&sample("applied")).await, 2.0);
    assert_eq!(h.metric(&sample("unchanged")).await, 2.0);
    assert_eq!(h.metric(&sample("rejected")).await, 0.0);
    h.shutdown().await;
}

#[tokio::test]
async fn a_file_that_does_not_validate_changes_nothing_and_says_why() {
    let mocks = mocks(2).await;
    let first = format!("{HEAD}{}", target("up0", &mocks[0], ""));
    let h = Harness::with_file(mocks, &first, false).await;
    let file = h.config_file.as_ref().unwrap();
    for (broken, says) in [
        (
            format!(
                "{HEAD}{}{}",
                target("up1", &h.mocks[1], ""),
                route(&["nowhere"])
            ),
            "nowhere",
        ),
        (
            format!("{HEAD}{}", target("up1", &h.mocks[1], "pool_max_idel = 3")),
            "pool_max_idel",
        ),
        ("[[targets]\nname = ".to_string(), "unclosed"),
    ] {
        file.write(&broken);
        let (status, body) = reload(&h).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_config");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert_eq!(served_by(&h).await, "up0", "the running config stays");
    }
    assert_eq!(
        h.metric("backstop_config_reloads_total{outcome=\"rejected\"}")
            .await,
        3.0
    );
    assert_eq!(h.mocks[1].requests().len(), 0);
    h.shutdown().await;

    // Started without a file: nothing to reload.
    let h = Harness::start().await;
    let (status, body) = reload(&h).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "no_config_file");
    h.shutdown().await;
}

#[tokio::test]
async fn requests_in_flight_finish_on_the_configuration_they_started_with() {
    let mocks = mocks(2).await;
    mocks[0].set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(40),
    });
    let first = format!(
        "{HEAD}{}{}{}",
        target("up0", &mocks[0], ""),
        target("up1", &mocks[1], ""),
        route(&["up0", "up1"])
    );
    let h = Harness::with_file(mocks, &first, false).await;
    let mut body = chat();
    body["stream"] = json!(true);
    body["messages"][0]["content"] = json!("one two three four five six seven eight nine ten");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.headers()["x-backstop-backend"], "up0");
    let mut stream = resp.bytes_stream();
    let first_chunk = stream.next().await.unwrap().unwrap();

    // up0 removed while its stream goes on.
    h.config_file.as_ref().unwrap().write(&format!(
        "{HEAD}{}{}",
        target("up1", &h.mocks[1], ""),
        route(&["up1"])
    ));
    let (status, reloaded) = reload(&h).await;
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(reloaded["targets"]["removed"], json!(["up0"]));
    assert_eq!(served_by(&h).await, "up1");

    let mut text = String::from_utf8(first_chunk.to_vec()).unwrap();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert!(streamed_text(&events).contains("ten"), "{text}");
    assert_eq!(h.mocks[0].requests().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn a_change_to_the_file_is_reloaded_without_being_asked() {
    let mocks = mocks(2).await;
    let first = format!("{HEAD}{}", target("up0", &mocks[0], ""));
    let h = Harness::with_file(mocks, &first, true).await;
    assert_eq!(served_by(&h).await, "up0");
    h.config_file
        .as_ref()
        .unwrap()
        .write(&format!("{HEAD}{}", target("up1", &h.mocks[1], "")));
    let mut by = String::new();
    // The file is looked at every second: a bounded wait for the change.
    for _ in 0..100 {
        by = served_by(&h).await;
        if by == "up1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(by, "up1");
    assert_eq!(
        h.metric("backstop_config_reloads_total{outcome=\"applied\"}")
            .await,
        1.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn upstream_keys_are_replaced_by_a_reload() {
    let mocks = mocks(1).await;
    let first = format!("{HEAD}{}", target("up0", &mocks[0], ""));
    let h = Harness::with_file(mocks, &first, false).await;
    served_by(&h).await;
    let toml = format!(
        "{HEAD}[[targets]]\nname = \"up0\"\nbase_url = \"{}\"\n\
         api_keys_env = [\"TEST_KEY_2\", \"TEST_KEY_3\"]\n",
        h.mocks[0].url()
    );
    h.config_file.as_ref().unwrap().write(&toml);
    let (status, body) = reload(&h).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targets"]["started"], json!(["up0"]));
    for _ in 0..4 {
        served_by(&h).await;
    }
    let keys = keys_seen(&h.mocks[0]);
    assert_eq!(keys[0], "Bearer sk-test");
    let mut after = keys[1..].to_vec();
    after.sort();
    after.dedup();
    assert_eq!(after, ["Bearer sk-test-2", "Bearer sk-test-3"]);
    h.shutdown().await;
}

#[tokio::test]
async fn clients_see_no_error_while_the_configuration_changes_under_them() {
    let mocks = mocks(3).await;
    for m in &mocks {
        m.set_default(MockReply::Echo {
            delay: Duration::ZERO,
            chunk_delay: Duration::from_millis(2),
        });
    }
    // up0 changes with every reload, up1 and up2 never do.
    let config = |order: [&str; 3], pool: usize| {
        format!(
            "{HEAD}{}{}{}{}",
            target("up0", &mocks[0], &format!("pool_max_idle = {pool}")),
            target("up1", &mocks[1], ""),
            target("up2", &mocks[2], ""),
            route(&order)
        )
    };
    let versions = [
        config(["up0", "up1", "up2"], 8),
        config(["up1", "up0", "up2"], 16),
    ];
    let h = std::sync::Arc::new(Harness::with_file(mocks, &versions[0], false).await);
    // What a reload must not reset: an operator's hold on up2's breaker.
    force_open(&h, "up2").await;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                let mut body = chat();
                body["stream"] = json!(true);
                for _ in 0..15 {
                    let resp = h.post("/v1/chat/completions", &body).await;
                    assert_eq!(resp.status(), 200);
                    let text = resp.text().await.unwrap();
                    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
                    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
                }
            })
        })
        .collect();
    for i in 1..=10 {
        h.config_file.as_ref().unwrap().write(&versions[i % 2]);
        let (status, body) = reload(&h).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], "applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(breaker(&h, "up2").await["forced"], "open");
    assert_eq!(h.mocks[2].requests().len(), 0);
    assert_eq!(
        h.mocks[0].requests().len() + h.mocks[1].requests().len(),
        8 * 15
    );
}

#[tokio::test]
async fn keys_from_a_file_rotate_with_a_reload() {
    let mocks = mocks(1).await;
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("openai-key");
    std::fs::write(&secret, "sk-file-old\n").unwrap();
    let toml = format!(
        "{HEAD}[[targets]]\nname = \"up0\"\nbase_url = \"{}\"\napi_key_file = {:?}\n",
        mocks[0].url(),
        secret
    );
    let h = Harness::with_file(mocks, &toml, false).await;
    served_by(&h).await;
    // The secret is rotated where it is mounted; the config file is as it was.
    std::fs::write(&secret, "sk-file-new\n").unwrap();
    let (status, body) = reload(&h).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targets"]["started"], json!(["up0"]));
    served_by(&h).await;
    let used = keys_seen(&h.mocks[0]);
    assert_eq!(used, ["Bearer sk-file-old", "Bearer sk-file-new"]);
    // A secret that cannot be read leaves the running keys in place.
    std::fs::remove_file(&secret).unwrap();
    let (status, body) = reload(&h).await;
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("api_key_file"), "{message}");
    assert!(!message.contains("sk-file"), "{message}");
    served_by(&h).await;
    h.shutdown().await;
}
