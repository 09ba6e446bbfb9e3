//! Several replicas sharing one PostgreSQL store act as one service: any
//! replica serves, follows and resumes a generation another one runs.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream};
use backstop_tests::{events, keyed, output_text, text_of, Harness};
use serde_json::{json, Value};

/// Bound on every wait: a hang guard, not a timing assertion.
const HANG: Duration = Duration::from_secs(30);

const LONG: &str = "one two three four five six seven eight nine ten eleven twelve";

/// A replica in front of a mock of its own that echoes slowly, keeping
/// generations in the shared database at `url`.
async fn replica(url: &str) -> Harness {
    replica_with(url, "").await
}

/// A replica as [`replica`], with `target` added to its target's table.
async fn replica_with(url: &str, target: &str) -> Harness {
    let mock = MockUpstream::start().await.unwrap();
    mock.set_default(MockReply::Echo {
        delay: Duration::ZERO,
        chunk_delay: Duration::from_millis(30),
    });
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
         [[targets]]\nname = \"up\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n{target}\n\
         [store]\nurl = \"{url}\"\n",
        mock.url()
    );
    Harness::with_config(vec![mock], &toml).await
}

async fn two_replicas() -> (Harness, Harness) {
    let url = backstop_testkit::postgres::database().await.unwrap();
    (replica(&url).await, replica(&url).await)
}

/// Reads a response body to its end, within the hang guard.
async fn text(resp: reqwest::Response) -> String {
    tokio::time::timeout(HANG, resp.text())
        .await
        .unwrap()
        .unwrap()
}

/// Reads a stream until it has `n` events, then drops the connection.
async fn first_events(mut resp: reqwest::Response, n: usize) -> Vec<(Option<u64>, Value)> {
    let mut seen = String::new();
    while events(&seen).len() < n {
        let chunk = tokio::time::timeout(HANG, resp.chunk()).await.unwrap();
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    events(&seen)
}

/// Events numbered 0, 1, 2... with no gap and no repeat.
fn numbered_from_zero(all: &[(Option<u64>, Value)]) {
    for (i, (id, _)) in all.iter().enumerate() {
        assert_eq!(*id, Some(i as u64), "event {i} of {all:?}");
    }
}

#[tokio::test]
async fn a_background_job_on_one_replica_is_followed_and_polled_on_another() {
    let (a, b) = two_replicas().await;
    let body = json!({"model": "m", "input": LONG, "background": true});
    let queued: Value = a.post("/v1/responses", &body).await.json().await.unwrap();
    let id = queued["id"].as_str().unwrap();
    // B follows it live, from its first event to its end, as A makes it.
    let followed = b.get(&format!("/v1/responses/{id}?stream=true")).await;
    assert_eq!(followed.status(), 200);
    let all = events(&text(followed).await);
    numbered_from_zero(&all);
    assert_eq!(all.last().unwrap().1["type"], "response.completed");
    assert_eq!(text_of(&all), format!("You said: {LONG}"));
    // And polls it.
    let done: Value = b
        .get(&format!("/v1/responses/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(output_text(&done), format!("You said: {LONG}"));
    assert_eq!(a.mock().requests().len(), 1);
    assert_eq!(b.mock().requests().len(), 0, "B only read");
}

#[tokio::test]
async fn a_responses_stream_dropped_on_one_replica_resumes_on_another() {
    let (a, b) = two_replicas().await;
    let body = json!({"model": "m", "input": LONG, "stream": true});
    let before = first_events(a.post("/v1/responses", &body).await, 5).await;
    let id = before[0].1["response"]["id"].as_str().unwrap().to_string();
    let last = before.last().unwrap().0.unwrap();
    let resumed = b
        .get(&format!(
            "/v1/responses/{id}?stream=true&starting_after={last}"
        ))
        .await;
    assert_eq!(resumed.status(), 200);
    let after = events(&text(resumed).await);
    assert_eq!(after[0].0, Some(last + 1), "the next event, not a repeat");
    let all: Vec<_> = before.into_iter().chain(after).collect();
    numbered_from_zero(&all);
    assert_eq!(all.last().unwrap().1["type"], "response.completed");
    assert_eq!(text_of(&all), format!("You said: {LONG}"));
    assert_eq!(a.mock().requests().len() + b.mock().requests().len(), 1);
}

#[tokio::test]
async fn a_keyed_chat_stream_dropped_on_one_replica_resumes_on_another() {
    let (a, b) = two_replicas().await;
    let body = json!({"model": "m", "stream": true,
                      "messages": [{"role": "user", "content": LONG}]});
    let before = first_events(keyed(&a, &body, "key-1", None).await, 4).await;
    let last = before.last().unwrap().0.expect("chat events carry ids");
    let resumed = keyed(&b, &body, "key-1", Some(last)).await;
    assert_eq!(resumed.status(), 200);
    let after = events(&text(resumed).await);
    assert_eq!(after[0].0, Some(last + 1));
    let all: Vec<_> = before.into_iter().chain(after).collect();
    numbered_from_zero(&all);
    assert_eq!(all.last().unwrap().1, Value::String("[DONE]".into()));
    let said: String = all
        .iter()
        .filter_map(|(_, e)| e.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert_eq!(said, format!("You said: {LONG}"));
    // The key again on B, without Last-Event-ID: the whole stream, replayed.
    let replay = events(&text(keyed(&b, &body, "key-1", None).await).await);
    assert_eq!(replay.len(), all.len());
    assert_eq!(
        a.mock().requests().len() + b.mock().requests().len(),
        1,
        "one generation for the key, across replicas"
    );
}

/// Waits (bounded) until a replica's `/readyz` answers `status`.
async fn readyz_becomes(h: &Harness, status: u16) {
    for _ in 0..300 {
        if h.get("/readyz").await.status() == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {status}");
}

#[tokio::test]
async fn a_replica_cut_off_from_the_store_says_so_and_takes_no_jobs_until_it_is_back() {
    let url = backstop_testkit::postgres::database().await.unwrap();
    let relay = backstop_testkit::postgres::Relay::to(&url).await.unwrap();
    let a = replica(&relay.url).await;
    let b = replica(&url).await;
    let job = json!({"model": "m", "input": "hello", "background": true});
    readyz_becomes(&a, 200).await;
    relay.cut();
    readyz_becomes(&a, 503).await;
    let not_ready: Value = a.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        not_ready["error"]["code"], "store_unreachable",
        "{not_ready}"
    );
    let refused = a.post("/v1/responses", &job).await;
    assert_eq!(refused.status(), 503);
    let refused: Value = refused.json().await.unwrap();
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("store"),
        "{refused}"
    );
    // The other replica serves on.
    assert_eq!(b.get("/readyz").await.status(), 200);
    let taken: Value = b.post("/v1/responses", &job).await.json().await.unwrap();
    assert_eq!(taken["status"], "queued");
    relay.restore();
    readyz_becomes(&a, 200).await;
    let queued: Value = a.post("/v1/responses", &job).await.json().await.unwrap();
    assert_eq!(queued["status"], "queued", "{queued}");
    // And what it takes, the other replica reads.
    let id = queued["id"].as_str().unwrap();
    let followed = events(&text(b.get(&format!("/v1/responses/{id}?stream=true")).await).await);
    assert_eq!(followed.last().unwrap().1["type"], "response.completed");
}

/// A PostgreSQL server of the test's own (`scripts/postgres`), to restart.
struct OwnServer {
    dir: tempfile::TempDir,
    url: String,
}

impl OwnServer {
    fn script(command: &str, dir: &std::path::Path) -> String {
        let out =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres"))
                .arg(command)
                .arg(dir)
                .output()
                .unwrap();
        assert!(out.status.success(), "scripts/postgres {command}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = Self::script("start", &dir.path().join("pg"));
        OwnServer { dir, url }
    }

    fn restart(&self) {
        Self::script("restart", &self.dir.path().join("pg"));
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        Self::script("stop", &self.dir.path().join("pg"));
    }
}

#[tokio::test]
async fn a_postgres_restart_mid_run_pauses_jobs_and_loses_nothing() {
    let server = OwnServer::start();
    let a = replica(&server.url).await;
    let b = replica(&server.url).await;
    let mut ids = Vec::new();
    for (i, h) in [&a, &b, &a, &b].into_iter().enumerate() {
        let job = json!({"model": "m", "input": format!("{i} {LONG}"), "background": true});
        let queued: Value = h.post("/v1/responses", &job).await.json().await.unwrap();
        ids.push(queued["id"].as_str().unwrap().to_string());
    }
    // Under way, then the database restarts under them.
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.restart();
    for (i, id) in ids.iter().enumerate() {
        let mut done = Value::Null;
        for _ in 0..600 {
            let resp = a.get(&format!("/v1/responses/{id}")).await;
            if resp.status() == 200 {
                done = resp.json().await.unwrap();
                if !matches!(done["status"].as_str(), Some("queued" | "in_progress")) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(done["status"], "completed", "{id}: {done}");
        assert_eq!(output_text(&done), format!("You said: {i} {LONG}"));
        // Its whole log, on either replica, numbered without a gap.
        let log = events(&text(b.get(&format!("/v1/responses/{id}?stream=true")).await).await);
        numbered_from_zero(&log);
        assert_eq!(text_of(&log), format!("You said: {i} {LONG}"));
        assert_eq!(log.last().unwrap().1["type"], "response.completed");
    }
    assert_eq!(a.mock().requests().len() + b.mock().requests().len(), 4);
}

#[tokio::test]
async fn replicas_share_one_rate_budget() {
    let url = backstop_testkit::postgres::database().await.unwrap();
    let limit = "requests_per_minute = 60";
    let a = replica_with(&url, limit).await;
    let b = replica_with(&url, limit).await;
    for h in [&a, &b] {
        h.mock().set_default(MockReply::echo());
    }
    // Both have reported: each knows it shares the budget with the other.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut answered = 0;
    for i in 0..100 {
        let h = if i % 2 == 0 { &a } else { &b };
        if h.post("/v1/chat/completions", &body).await.status() == 200 {
            answered += 1;
        }
    }
    let sent = a.mock().requests().len() + b.mock().requests().len();
    eprintln!("{sent} of 100 requests reached the upstream");
    assert_eq!(sent, answered);
    // One minute's budget for the two (and what refilled meanwhile), where
    // each alone would have spent its own 60: all 100.
    assert!(sent <= 70, "{sent} requests reached the upstream");
    assert!(sent >= 50, "only {sent} requests reached the upstream");
    assert_eq!(a.metric("backstop_rate_budgets_shared").await, 1.0);
}

/// Waits (bounded) until a replica's metric `sample` reads `value`.
async fn metric_becomes(h: &Harness, sample: &str, value: f64) {
    for _ in 0..300 {
        if h.metric(sample).await == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sample} never read {value}");
}

#[tokio::test]
async fn a_replica_cut_off_from_the_store_keeps_its_own_rate_limit_and_serves_on() {
    let url = backstop_testkit::postgres::database().await.unwrap();
    let relay = backstop_testkit::postgres::Relay::to(&url).await.unwrap();
    let a = replica_with(&relay.url, "requests_per_minute = 600").await;
    a.mock().set_default(MockReply::echo());
    metric_becomes(&a, "backstop_rate_budgets_shared", 1.0).await;
    relay.cut();
    metric_becomes(&a, "backstop_rate_budgets_shared", 0.0).await;
    // Its own limit now: requests still go through.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..10 {
        assert_eq!(a.post("/v1/chat/completions", &body).await.status(), 200);
    }
    relay.restore();
    metric_becomes(&a, "backstop_rate_budgets_shared", 1.0).await;
}

/// Shadow calls a replica made to `target`, whatever their outcome.
async fn shadows_sent(h: &Harness, target: &str) -> f64 {
    let text = h.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("backstop_shadow_requests_total{"))
        .filter(|l| l.contains(&format!("target=\"{target}\"")) && !l.contains("dropped"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The phase of `target`'s verification on a replica.
async fn phase(h: &Harness, target: &str) -> String {
    let status: Value = h.admin_get("/admin/status").await.json().await.unwrap();
    status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .map(|t| t["shadow"]["phase"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_verifies_a_sick_upstream_for_the_fleet_and_the_other_follows() {
    let url = backstop_testkit::postgres::database().await.unwrap();
    let sick = MockUpstream::start().await.unwrap();
    sick.set_default(MockReply::error(503, "server_error", "down"));
    let sick_url = sick.url();
    let replica = |fallback: MockUpstream, first: Option<MockUpstream>| {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n\
             [shadow]\nsample_rate = 1.0\nmin_interval_ms = 50\nmax_interval_ms = 200\n\
             max_tokens = 8\nprobe_interval_ms = 100\nfirst_token_slo_ms = 300\n\
             total_slo_ms = 1000\nwindow = 6\nlast_k = 3\nthreshold = 0.8\n\
             ramp = [0.5, 1.0]\nramp_step_ms = 400\n\
             [[targets]]\nname = \"up0\"\nbase_url = \"{sick_url}\"\n\
             breaker = {{ consecutive_failures = 2, open_ms = 200, max_open_ms = 400, jitter = 0.0 }}\n\
             [[targets]]\nname = \"up1\"\nbase_url = \"{}\"\n\
             [store]\nurl = \"{url}\"\n",
            fallback.url()
        );
        let mocks: Vec<MockUpstream> = first.into_iter().chain([fallback]).collect();
        async move { Harness::with_config(mocks, &toml).await }
    };
    let a = replica(MockUpstream::start().await.unwrap(), Some(sick)).await;
    let b = replica(MockUpstream::start().await.unwrap(), None).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]});
    // Traffic on both, the upstream down: both breakers open, and both
    // replicas verify, but only one of them sends shadows.
    for _ in 0..40 {
        for h in [&a, &b] {
            assert_eq!(h.post("/v1/chat/completions", &body).await.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        a.metric("backstop_breaker_open_replicas{target=\"up0\"}")
            .await,
        2.0
    );
    let (by_a, by_b) = (shadows_sent(&a, "up0").await, shadows_sent(&b, "up0").await);
    assert!(
        (by_a > 0.0) != (by_b > 0.0),
        "shadows by A: {by_a}, by B: {by_b}: one replica's worth, not two"
    );
    let (leader, follower) = if by_a > 0.0 { (&a, &b) } else { (&b, &a) };
    // The upstream recovers: the verifying replica confirms it and ramps it
    // back, and the other follows each step to serving.
    a.mocks[0].set_default(MockReply::echo());
    let mut serving = false;
    for _ in 0..300 {
        for h in [&a, &b] {
            assert_eq!(h.post("/v1/chat/completions", &body).await.status(), 200);
        }
        if phase(leader, "up0").await == "serving" && phase(follower, "up0").await == "serving" {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        serving,
        "leader {}, follower {}",
        phase(leader, "up0").await,
        phase(follower, "up0").await
    );
    assert_eq!(
        shadows_sent(follower, "up0").await,
        0.0,
        "the follower sent shadows"
    );
    assert_eq!(
        follower
            .metric("backstop_shadow_ramp_fraction{target=\"up0\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn replicas_share_one_rate_budget_per_client_identity() {
    use sha2::{Digest, Sha256};
    const KEY: &str = "sk-batch-93e1f0c7d2b4a6958e7f6d5c4b3a2910";
    let url = backstop_testkit::postgres::database().await.unwrap();
    let hash: String = Sha256::digest(KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The identity's table follows the target's, as part of its [auth].
    let identity = format!(
        "[auth]\nenabled = true\n[[auth.identities]]\nname = \"batch\"\n\
         requests_per_minute = 60\nkey_sha256 = [\"{hash}\"]\n"
    );
    let a = replica_with(&url, &identity).await;
    let b = replica_with(&url, &identity).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut answered = 0;
    for i in 0..100 {
        let h = if i % 2 == 0 { &a } else { &b };
        let resp = h
            .http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => answered += 1,
            429 => {}
            other => panic!("answered {other}"),
        }
    }
    eprintln!("{answered} of 100 requests of one identity answered");
    // One minute's budget for the identity across both replicas, where
    // each alone would have let its own 60 through: all 100.
    assert!(answered <= 70, "{answered} answered");
    assert!(answered >= 50, "only {answered} answered");
}
