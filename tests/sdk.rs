//! The official OpenAI Python SDK, unchanged, talks to Backstop.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use backstop_tests::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_through_backstop() {
    let h = Harness::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/check_sdk.py");
    let base = h.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .env("OPENAI_BASE_URL", base)
            .env("OPENAI_API_KEY", "sk-client-side")
            .output()
            .expect("python3 runs (scripts/test installs the openai package)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sdk checks passed"), "{stdout}");
    // The SDK's requests really went through to the upstream.
    let paths: Vec<String> = h.mock().requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().any(|p| p == "/v1/chat/completions"),
        "{paths:?}"
    );
    assert!(paths.iter().any(|p| p == "/v1/completions"), "{paths:?}");
}
