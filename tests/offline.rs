//! Offline: Backstop serves every request from the in-process model, in the
//! same schema an upstream would use.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use backstop_tests::{sse_data, streamed_text, Harness};
use serde_json::{json, Value};

fn question(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "temperature": 0, "max_tokens": 40,
           "messages": [{"role": "user", "content": "What is 2+2?"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_legacy_and_models_are_served_by_the_local_model() {
    let h = Harness::offline("").await;
    let resp = h.post("/v1/chat/completions", &question(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backstop-backend"], "local");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2-135m-instruct");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains('4'), "{text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let resp = h.post("/v1/chat/completions", &question(true)).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let payloads = sse_data(&resp.text().await.unwrap());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&payloads), text, "stream and JSON agree");

    let legacy =
        json!({"model": "x", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0});
    let v: Value = h
        .post("/v1/completions", &legacy)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let v: Value = h.get("/v1/models").await.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "smollm2-135m-instruct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_is_not_ready_and_answers_cleanly() {
    let toml = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[local]\nmodel = \"/nonexistent/model.gguf\"\n";
    let h = Harness::with_config(Vec::new(), toml).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(h.get("/readyz").await.status(), 503);
    // Every answer names the cause, also once the breaker has opened.
    for _ in 0..4 {
        let resp = h.post("/v1/chat/completions", &question(false)).await;
        assert!(resp.status().is_server_error());
        let v: Value = resp.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("not available"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_streams_from_the_local_model() {
    let h = Harness::offline("").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/check_sdk_local.py");
    let base = h.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .env("OPENAI_BASE_URL", base)
            .env("OPENAI_API_KEY", "unused")
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("local sdk checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
