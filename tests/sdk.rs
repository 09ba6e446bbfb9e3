//! The official OpenAI SDKs, unchanged, talk to Backstop: Python's, and
//! Node's for a background response resumed mid-stream.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use backstop_testkit::MockReply;
use backstop_tests::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_through_backstop() {
    let h = Harness::start().await;
    h.python_sdk("check_sdk.py", &[]).await;
    // The SDK's requests really went through to the upstream.
    let paths: Vec<String> = h.mock().requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().any(|p| p == "/v1/chat/completions"),
        "{paths:?}"
    );
    assert!(paths.iter().any(|p| p == "/v1/completions"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_legacy_completions_reach_a_chat_only_upstream() {
    let h = Harness::start().await;
    h.mock().push([MockReply::error(
        404,
        "invalid_request_error",
        "This is a chat model and not supported in the v1/completions endpoint.",
    )]);
    h.python_sdk("check_sdk_chat_only.py", &[]).await;
    let paths: Vec<String> = h.mock().requests().iter().map(|r| r.path.clone()).collect();
    // One 404, then chats only.
    assert_eq!(paths[0], "/v1/completions");
    assert!(
        paths[1..].iter().all(|p| p == "/v1/chat/completions"),
        "{paths:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_responses_calls_reach_a_responses_upstream() {
    let h = Harness::start().await;
    h.python_sdk("check_sdk_responses.py", &[]).await;
    let paths: Vec<String> = h.mock().requests().iter().map(|r| r.path.clone()).collect();
    assert!(paths.iter().all(|p| p == "/v1/responses"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_responses_calls_reach_a_chat_only_upstream() {
    let h = Harness::start().await;
    h.mock()
        .push([MockReply::error(404, "invalid_request_error", "Not found")]);
    h.python_sdk("check_sdk_responses.py", &[("BACKSTOP_CHAT_ONLY", "1")])
        .await;
    let paths: Vec<String> = h.mock().requests().iter().map(|r| r.path.clone()).collect();
    // One 404, then chats only.
    assert_eq!(paths[0], "/v1/responses");
    assert!(
        paths[1..].iter().all(|p| p == "/v1/chat/completions"),
        "{paths:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_background_responses_are_polled_resumed_and_cancelled() {
    let h = Harness::start().await;
    h.mock().set_default(MockReply::Echo {
        delay: std::time::Duration::ZERO,
        chunk_delay: std::time::Duration::from_millis(40),
    });
    h.python_sdk("check_sdk_background.py", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sdk_resumes_a_background_stream_it_dropped() {
    let h = Harness::start().await;
    h.mock().set_default(MockReply::Echo {
        delay: std::time::Duration::ZERO,
        chunk_delay: std::time::Duration::from_millis(40),
    });
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/node");
    let base = h.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("check_resume.mjs")
            .current_dir(dir)
            .env("OPENAI_BASE_URL", base)
            .env("OPENAI_API_KEY", "sk-client-side")
            .output()
            .expect("node runs (scripts/test installs the openai package)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("node sdk checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.mock().requests().len(), 1, "one generation");
}
