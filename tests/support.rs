//! Test harness: the real Backstop server, in process, in front of mock
//! upstreams, everything on `127.0.0.1:0`.

// A harness that cannot start its servers has nothing to test: panicking is its report.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;

use backstop_server::{run, App, Config, ConfigSource, Running};
use backstop_testkit::MockUpstream;
use serde_json::Value;
use tokio::sync::oneshot;

/// A Backstop server with its mock upstreams.
pub struct Harness {
    /// The mock upstreams, in target order (`up0`, `up1`, ...).
    pub mocks: Vec<MockUpstream>,
    /// Where Backstop listens.
    pub addr: SocketAddr,
    /// Where its admin endpoints are.
    pub admin_addr: SocketAddr,
    /// A plain HTTP client.
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    running: Option<Running>,
    /// The store's data directory, unless the config names one.
    pub data: Option<tempfile::TempDir>,
    /// The config file it reloads, when started from one.
    pub config_file: Option<ConfigFile>,
}

/// A config file a test rewrites, for the server to reload.
pub struct ConfigFile {
    dir: tempfile::TempDir,
    /// Appended to every version: the store's section, which a reload
    /// cannot change.
    store: String,
}

impl ConfigFile {
    /// The file.
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("backstop.toml")
    }

    /// Replaces the file with this TOML, as an editor or a mounted volume
    /// does: written beside it, then renamed over it.
    pub fn write(&self, toml: &str) {
        let next = self.dir.path().join("backstop.toml.next");
        std::fs::write(&next, format!("{toml}\n{}", self.store)).unwrap();
        std::fs::rename(next, self.path()).unwrap();
    }
}

/// The environment the servers tests start see: their keys and secrets.
fn test_env(name: &str) -> Option<String> {
    match name {
        "TEST_KEY" => Some("sk-test".into()),
        "TEST_KEY_2" => Some("sk-test-2".into()),
        "TEST_KEY_3" => Some("sk-test-3".into()),
        "TEST_JWT_SECRET" => Some(JWT_SECRET.into()),
        _ => None,
    }
}

/// The shared secret `TEST_JWT_SECRET` holds for the servers tests start.
pub const JWT_SECRET: &str = "a test secret of at least thirty-two bytes";

impl Harness {
    /// Backstop with one target in front of one mock.
    pub async fn start() -> Self {
        Self::with_targets(1, "").await
    }

    /// Backstop with `n` targets (`up0`..) in front of `n` mocks; `extra` is
    /// appended to each target's TOML table.
    pub async fn with_targets(n: usize, extra: &str) -> Self {
        let mut mocks = Vec::new();
        // One attempt per target: these tests watch exactly what passes through.
        let mut toml = String::from(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 5000\n[retry]\nmax_retries = 0\n[health]\nprobe = \"off\"\n",
        );
        for i in 0..n {
            let mock = MockUpstream::start().await.expect("mock starts");
            toml.push_str(&format!(
                "[[targets]]\nname = \"up{i}\"\nbase_url = \"{}\"\napi_key_env = \"TEST_KEY\"\n{extra}\n",
                mock.url()
            ));
            mocks.push(mock);
        }
        Self::with_config(mocks, &toml).await
    }

    /// Backstop running this TOML config in front of these mocks.
    pub async fn with_config(mocks: Vec<MockUpstream>, toml: &str) -> Self {
        Self::from(mocks, toml, None).await
    }

    /// Backstop running this TOML config from a file (`config_file`
    /// rewrites it), which it reloads on `POST /admin/reload`, and when it
    /// changes if `watch`.
    pub async fn with_file(mocks: Vec<MockUpstream>, toml: &str, watch: bool) -> Self {
        Self::from(mocks, toml, Some(watch)).await
    }

    async fn from(mocks: Vec<MockUpstream>, toml: &str, file: Option<bool>) -> Self {
        // Each server keeps its generations in a store of its own.
        let (store, data) = if toml.contains("[store]") {
            (String::new(), None)
        } else {
            let dir = tempfile::tempdir().expect("a temporary directory");
            (format!("[store]\npath = {:?}\n", dir.path()), Some(dir))
        };
        let (app, config_file) = if let Some(watch) = file {
            let config_file = ConfigFile {
                dir: tempfile::tempdir().expect("a temporary directory"),
                store,
            };
            config_file.write(toml);
            let source = ConfigSource::new(config_file.path(), |path| Config::load(path, test_env))
                .watched(watch);
            let config = source.read().expect("config is valid");
            let app = App::new(config)
                .await
                .expect("app builds")
                .with_source(source);
            (app, Some(config_file))
        } else {
            let config =
                Config::parse(&format!("{toml}\n{store}"), test_env).expect("config is valid");
            (App::new(config).await.expect("app builds"), None)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let running = run(app, async {
            let _ = stopped.await;
        })
        .await
        .expect("server starts");
        Harness {
            mocks,
            addr: running.addr,
            admin_addr: running.admin_addr,
            http: reqwest::Client::new(),
            stop: Some(stop),
            running: Some(running),
            data,
            config_file,
        }
    }

    /// The first mock.
    pub fn mock(&self) -> &MockUpstream {
        &self.mocks[0]
    }

    /// Backstop's URL for a path, e.g. `/v1/chat/completions`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The URL of an admin endpoint, e.g. `/admin/breakers`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// POSTs an empty JSON object to an admin endpoint.
    pub async fn admin_post(&self, path: &str) -> reqwest::Response {
        self.http
            .post(self.admin_url(path))
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("backstop answers")
    }

    /// The value of a sample in `/metrics`, e.g.
    /// `backstop_config_reloads_total{outcome="applied"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// GETs an admin endpoint.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.admin_url(path))
            .send()
            .await
            .expect("backstop answers")
    }

    /// POSTs a JSON body to Backstop.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("backstop answers")
    }

    /// GETs a path from Backstop.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("backstop answers")
    }

    /// Runs the Python SDK check script `tests/sdk/{name}` against this
    /// server, with these environment variables (`OPENAI_API_KEY` among
    /// them overrides the default); its stdout, once it said it passed.
    pub async fn python_sdk(&self, name: &str, vars: &[(&str, &str)]) -> String {
        let script = format!("{}/sdk/{name}", env!("CARGO_MANIFEST_DIR"));
        let base = self.url("/v1");
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(script)
                .env("OPENAI_BASE_URL", base)
                .env("OPENAI_API_KEY", "sk-client-side")
                .envs(vars)
                .output()
                .expect("python3 runs (scripts/test installs the openai package)")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && stdout.contains("sdk checks passed"),
            "SDK check failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Backstop offline: every request served by the default local model.
    pub async fn offline(extra: &str) -> Self {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[local]\nmodel = \"{}\"\n{extra}\n",
            model_path()
        );
        let h = Self::with_config(Vec::new(), &toml).await;
        for _ in 0..1200 {
            if h.get("/readyz").await.status() == 200 {
                return h;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the local model did not load");
    }

    /// Sends the shutdown signal and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running.wait().await;
        }
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_shutdown(&mut self) -> Option<Running> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.running.take()
    }
}

/// The default local model file (`models/fetch` downloads it).
pub fn model_path() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: run models/fetch"
    );
    path.to_string()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The text of a chat stream's payloads (or a legacy stream's).
pub fn streamed_text(payloads: &[String]) -> String {
    payloads
        .iter()
        .filter(|p| p.as_str() != "[DONE]")
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .flat_map(|v| v["choices"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| {
            c.pointer("/delta/content")
                .or_else(|| c.get("text"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// The text of a Responses object's message items.
pub fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["text"].as_str().map(str::to_string))
        .collect()
}

/// The `data:` JSON of each SSE event, with its `id:` when it has one.
pub fn events(body: &str) -> Vec<(Option<u64>, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| {
            let id = e
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .map(|i| i.parse().unwrap());
            let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
            let v = serde_json::from_str(data).unwrap_or(Value::String(data.to_string()));
            Some((id, v))
        })
        .collect()
}

/// The text of a Responses stream's `response.output_text.delta` events.
pub fn text_of(events: &[(Option<u64>, Value)]) -> String {
    events
        .iter()
        .filter(|(_, e)| e["type"] == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap().to_string())
        .collect()
}

/// POSTs a chat with an `Idempotency-Key` (and a `Last-Event-ID`).
pub async fn keyed(h: &Harness, body: &Value, key: &str, last: Option<u64>) -> reqwest::Response {
    let mut req = h
        .http
        .post(h.url("/v1/chat/completions"))
        .header("idempotency-key", key)
        .json(body);
    if let Some(last) = last {
        req = req.header("last-event-id", last.to_string());
    }
    req.send().await.unwrap()
}
