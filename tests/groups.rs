//! Target groups: equivalent targets (regions) sharing one hop of a route,
//! balanced by a policy, the client's region first, and left only when
//! every member is out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use backstop_testkit::{MockReply, MockUpstream};
use backstop_tests::Harness;
use serde_json::json;

const REGIONS: [(&str, &str); 3] = [
    ("us-east", "us"),
    ("eu-central", "eu"),
    ("ap-southeast", "ap"),
];

/// Three regional targets over the first three mocks in a group called
/// `regions` with `group` lines, then `backup` over the fourth, in one
/// route; `server` lines go in `[server]`.
fn config(mocks: &[MockUpstream], group: &str, server: &str) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n\
         [retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n"
    );
    for ((name, region), mock) in REGIONS.iter().zip(mocks) {
        toml.push_str(&format!(
            "[[targets]]\nname = \"{name}\"\nregion = \"{region}\"\nbase_url = \"{}\"\n",
            mock.url()
        ));
    }
    toml.push_str(&format!(
        "[[targets]]\nname = \"backup\"\nbase_url = \"{}\"\n\
         [[groups]]\nname = \"regions\"\nmembers = [\"us-east\", \"eu-central\", \"ap-southeast\"]\n{group}\n\
         [[routes]]\nmodels = \"*\"\ntargets = [\"regions\", \"backup\"]\n",
        mocks[3].url()
    ));
    toml
}

async fn start(group: &str, server: &str) -> Harness {
    let mut mocks = Vec::new();
    for _ in 0..4 {
        mocks.push(MockUpstream::start().await.unwrap());
    }
    let toml = config(&mocks, group, server);
    Harness::with_config(mocks, &toml).await
}

/// Sends `n` chats (streamed or not), `region` as the hint; who served
/// each, counted, with the attempts of the last.
async fn send(
    h: &Harness,
    n: usize,
    stream: bool,
    region: Option<&str>,
) -> BTreeMap<String, usize> {
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let body = json!({"model": "gpt-4o-mini", "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]});
        let mut req = h.http.post(h.url("/v1/chat/completions")).json(&body);
        if let Some(region) = region {
            req = req.header("x-backstop-region", region);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let by = resp.headers()["x-backstop-backend"]
            .to_str()
            .unwrap()
            .to_string();
        let text = resp.text().await.unwrap();
        assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
        *served.entry(by).or_default() += 1;
    }
    served
}

fn count(served: &BTreeMap<String, usize>, name: &str) -> usize {
    served.get(name).copied().unwrap_or(0)
}

#[tokio::test]
async fn a_weighted_group_spreads_requests_by_weight() {
    let h = start(
        "policy = \"weighted\"\nweights = { \"us-east\" = 4, \"eu-central\" = 1, \"ap-southeast\" = 1 }",
        "",
    )
    .await;
    let served = send(&h, 300, false, None).await;
    let (us, eu, ap) = (
        count(&served, "us-east"),
        count(&served, "eu-central"),
        count(&served, "ap-southeast"),
    );
    // Weights 4:1:1 of 300: about 200, 50, 50 (bounds far outside chance).
    assert!((150..250).contains(&us), "{served:?}");
    assert!(
        (20..90).contains(&eu) && (20..90).contains(&ap),
        "{served:?}"
    );
    assert_eq!(count(&served, "backup"), 0, "{served:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn a_region_hint_prefers_the_members_of_its_region() {
    // The server's own region is the hint when a request gives none.
    let h = start("policy = \"weighted\"", "region = \"ap\"").await;
    let served = send(&h, 20, false, Some("eu")).await;
    assert_eq!(count(&served, "eu-central"), 20, "{served:?}");
    let served = send(&h, 20, true, None).await;
    assert_eq!(count(&served, "ap-southeast"), 20, "{served:?}");
    // A region no member is in: the group balances as if none were given.
    let served = send(&h, 30, false, Some("sa")).await;
    assert_eq!(count(&served, "backup"), 0, "{served:?}");
    assert!(served.len() >= 2, "{served:?}");
    h.shutdown().await;

    // A member of the hinted region that is out: the others serve.
    let h = start("policy = \"least_busy\"", "").await;
    h.mocks[1].set_default(MockReply::error(500, "server_error", "down"));
    let served = send(&h, 10, false, Some("eu")).await;
    assert_eq!(count(&served, "eu-central"), 0, "{served:?}");
    assert_eq!(count(&served, "backup"), 0, "{served:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn failover_leaves_the_group_only_when_every_member_is_out() {
    let h = start("policy = \"least_busy\"", "").await;
    for mock in &h.mocks[..2] {
        mock.set_default(MockReply::error(500, "server_error", "region down"));
    }
    // Two regions down: the third serves every request, the backup none.
    let served = send(&h, 12, false, None).await;
    assert_eq!(count(&served, "ap-southeast"), 12, "{served:?}");
    // Their breakers opened (5 failures in a row each); ap's did not.
    let breakers: serde_json::Value = h.admin_get("/admin/breakers").await.json().await.unwrap();
    let state = |name: &str| {
        breakers["breakers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["target"] == name)
            .map(|b| b["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state("ap-southeast"), "closed");
    assert_eq!(state("us-east"), "open");
    // The last region down too: the route goes on past the group.
    h.mocks[2].set_default(MockReply::error(500, "server_error", "region down"));
    let served = send(&h, 3, false, None).await;
    assert_eq!(count(&served, "backup"), 3, "{served:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn least_latency_sends_most_requests_to_the_fastest_member() {
    let h = start("policy = \"least_latency\"", "").await;
    for (mock, ms) in h.mocks.iter().zip([120, 0, 40]) {
        mock.set_default(MockReply::Echo {
            delay: Duration::from_millis(ms),
            chunk_delay: Duration::ZERO,
        });
    }
    // Times to first token are learned from streams.
    let served = send(&h, 60, true, None).await;
    let (us, eu, ap) = (
        count(&served, "us-east"),
        count(&served, "eu-central"),
        count(&served, "ap-southeast"),
    );
    // Once each has been tried, the slowest never wins a draw of two and
    // the fastest wins both of its draws: about 2/3 to eu, 1/3 to ap.
    assert!(us <= 3, "{served:?}");
    assert!(eu > ap && eu >= 30, "{served:?}");
    h.shutdown().await;
}
