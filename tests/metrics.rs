//! `/metrics` moves with traffic and passes `promtool check metrics`.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};

use backstop_tests::Harness;
use serde_json::json;

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
}

#[tokio::test]
async fn traffic_moves_the_metrics() {
    let h = Harness::start().await;
    let chat = |stream: bool| {
        json!({"model": "m", "stream": stream, "stream_options": {"include_usage": stream},
               "messages": [{"role": "user", "content": "count my tokens please"}]})
    };
    assert_eq!(
        h.post("/v1/chat/completions", &chat(false)).await.status(),
        200
    );
    let resp = h.post("/v1/chat/completions", &chat(true)).await;
    resp.text().await.unwrap();
    let bad = h.post("/v1/chat/completions", &json!({"model": "m"})).await;
    assert_eq!(bad.status(), 400);

    let text = h.get("/metrics").await.text().await.unwrap();
    let ok = [
        ("endpoint", "chat_completions"),
        ("target", "up0"),
        ("status_class", "2xx"),
    ];
    assert_eq!(
        sample(&text, "backstop_requests_total", &ok),
        Some(2.0),
        "{text}"
    );
    let bad = [
        ("endpoint", "chat_completions"),
        ("target", "backstop"),
        ("status_class", "4xx"),
    ];
    assert_eq!(sample(&text, "backstop_requests_total", &bad), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "backstop_upstream_responses_total",
            &[("target", "up0"), ("status", "200")]
        ),
        Some(2.0)
    );
    assert!(
        sample(
            &text,
            "backstop_tokens_total",
            &[("target", "up0"), ("kind", "prompt")]
        )
        .unwrap()
            > 0.0
    );
    assert!(
        sample(
            &text,
            "backstop_tokens_total",
            &[("target", "up0"), ("kind", "completion")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        sample(
            &text,
            "backstop_time_to_first_token_seconds_count",
            &[("target", "up0")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "backstop_overhead_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "backstop_request_duration_seconds_count",
            &[("stream", "true")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "backstop_in_flight_requests", &[]), Some(0.0));
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let h = Harness::start().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    h.post("/v1/chat/completions", &body).await;
    let text = h.get("/metrics").await.text().await.unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .expect("promtool is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric the dashboard and the alert rules query is one Backstop exports.
#[test]
fn the_dashboard_and_alerts_query_only_metrics_that_exist() {
    let exported = backstop_server::Metrics::new().unwrap().names();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/grafana-dashboard.json"
    ))
    .unwrap();
    let alerts =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/alerts.yml"))
            .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut queries: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    queries.push(alerts);
    for query in queries {
        let names = query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("backstop_"));
        for name in names {
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            assert!(
                exported.iter().any(|e| e == family),
                "{name} is queried but not exported ({exported:?})"
            );
        }
    }
}
