//! Configuration: raw TOML structs, validated into one runtime snapshot.
//!
//! Parsing rejects unknown fields and names the path of any bad one
//! (`targets[0].http2: invalid type ...`); validation then checks what types
//! cannot (unique names, known targets, URLs, addresses).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod auth;
pub mod limits;
pub use auth::{AuthConfig, IdentityConfig, JwtConfig, Scopes};
pub use limits::Limits;

use backstop_local::{KvCache, LocalConfig};
use backstop_router::breaker::BreakerConfig;
use backstop_router::group::{Group, Member, Policy};
use backstop_router::health::{HealthConfig, Probe};
use backstop_router::retry::RetryPolicy;
use backstop_router::{ModelMatch, DEFAULT_DEADLINE};
use backstop_shadow::ShadowConfig;
use backstop_upstream::UpstreamConfig;

use serde::Deserialize;

/// The public OpenAI API, used when `OPENAI_BASE_URL` is not set.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Where Backstop listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the admin endpoints are served unless told otherwise: loopback.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
/// The local model file used when none is configured (`models/fetch` gets it).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The name clients see for the default local model.
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";

/// A configuration problem, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or a field has the wrong type or name.
    #[error("{path}: {message}")]
    Parse {
        /// Dotted path of the field, `.` for the document.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A field parsed but its value is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    groups: Vec<RawGroup>,
    local: Option<RawLocal>,
    #[serde(default)]
    breaker: RawBreaker,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    shadow: RawShadow,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    auth: auth::RawAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    enabled: Option<bool>,
    path: Option<PathBuf>,
    url: Option<String>,
    lease_s: Option<u64>,
    keep_stored_days: Option<u64>,
    keep_unstored_s: Option<u64>,
    max_disk_mb: Option<u64>,
    max_unwritten_mb: Option<u64>,
    sweep_every_s: Option<u64>,
    max_running: Option<usize>,
    max_queued: Option<usize>,
}

/// Where generations are kept, for how long, and how many background jobs
/// run and wait.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// The database.
    pub database: Database,
    /// How long a replica's hold on the generations it runs lasts unless
    /// renewed (a shared store): past it, another replica takes them over.
    pub lease: Duration,
    /// How long a response stored at the client's request is kept.
    pub keep_stored: Duration,
    /// How long any other generation is kept (for polling and resuming).
    pub keep_unstored: Duration,
    /// The database's size past which the oldest finished records go.
    pub max_disk_bytes: u64,
    /// Events waiting for the disk past which streams wait for the store.
    pub max_unwritten_bytes: usize,
    /// How often the sweeper runs.
    pub sweep_every: Duration,
    /// Background jobs generating at once.
    pub max_running: usize,
    /// Background jobs accepted but waiting; past it, a 429.
    pub max_queued: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    enabled: Option<bool>,
    sample_rate: Option<f64>,
    min_interval_ms: Option<u64>,
    max_interval_ms: Option<u64>,
    max_tokens: Option<u32>,
    allowlist: Option<Vec<String>>,
    queue: Option<usize>,
    concurrency: Option<usize>,
    probe_interval_ms: Option<u64>,
    probes: Option<Vec<String>>,
    probe_model: Option<String>,
    first_token_slo_ms: Option<u64>,
    total_slo_ms: Option<u64>,
    window: Option<usize>,
    last_k: Option<usize>,
    threshold: Option<f64>,
    ramp: Option<Vec<f64>>,
    ramp_step_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    probe: Option<String>,
    probe_model: Option<String>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_retries: Option<u32>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    max_retry_after_ms: Option<u64>,
    deadline_ms: Option<u64>,
    first_token_timeout_ms: Option<u64>,
    retry_within_ms: Option<u64>,
    hedge: Option<bool>,
    hedge_min_ms: Option<u64>,
    hedge_max_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    consecutive_failures: Option<u32>,
    failure_rate: Option<f64>,
    min_calls: Option<usize>,
    window_ms: Option<u64>,
    open_ms: Option<u64>,
    max_open_ms: Option<u64>,
    jitter: Option<f64>,
    slow_call_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    target: Option<String>,
    name: Option<String>,
    model: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    batch: Option<usize>,
    queue: Option<usize>,
    context: Option<usize>,
    max_tokens: Option<usize>,
    continuation_tokens: Option<usize>,
    max_temperature: Option<f64>,
    kv_cache: Option<String>,
    retry: Option<RawRetry>,
    breaker: Option<RawBreaker>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    region: Option<String>,
    admin_listen: Option<String>,
    admin_token_env: Option<String>,
    max_body_bytes: Option<usize>,
    shutdown_grace_ms: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    min_body_rate: Option<u64>,
    send_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    max_in_flight: Option<usize>,
    max_json_values: Option<usize>,
    max_messages: Option<usize>,
    max_request_memory: Option<usize>,
    max_header_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    base_url: String,
    region: Option<String>,
    api_key_env: Option<String>,
    api_keys_env: Option<Vec<String>>,
    api_key_file: Option<PathBuf>,
    model: Option<String>,
    pool_max_idle: Option<usize>,
    pool_idle_timeout_ms: Option<u64>,
    http2: Option<bool>,
    ca_bundle: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    header_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_body_bytes: Option<usize>,
    max_event_bytes: Option<usize>,
    prefill: Option<bool>,
    completions: Option<bool>,
    responses: Option<bool>,
    context_window: Option<usize>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    retry: Option<RawRetry>,
    breaker: Option<RawBreaker>,
    health: Option<RawHealth>,
}

/// Equivalent targets that share a route's hop.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    members: Vec<String>,
    policy: Option<String>,
    #[serde(default)]
    weights: BTreeMap<String, u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    models: String,
    targets: Vec<String>,
    retry: Option<RawRetry>,
}

/// A validated route: the model pattern, each target with the retry policy
/// its attempts follow on this route, and the request deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Which requested models the route takes.
    pub models: ModelMatch,
    /// Target names in order, each with its retry policy; a group's
    /// members side by side.
    pub hops: Vec<(String, RetryPolicy)>,
    /// The groups among the hops.
    pub groups: Vec<Group>,
    /// Whole-request deadline.
    pub deadline: Duration,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// This server's region: the hint for target groups when a request
    /// gives none (`x-backstop-region`).
    pub region: Option<String>,
    /// Where the admin endpoints are served (loopback by default).
    pub admin_listen: SocketAddr,
    /// The bearer token that opens the admin endpoints on the client
    /// listener too (and is then required on both).
    pub admin_token: Option<String>,
    /// Bounds on clients: time, connections, requests, memory.
    pub limits: Limits,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The upstream targets.
    pub targets: Vec<UpstreamConfig>,
    /// The in-process model, when configured.
    pub local: Option<LocalConfig>,
    /// Each target's circuit breaker settings (`[breaker]`, then the
    /// target's own `breaker` table), by target name.
    pub breakers: BTreeMap<String, BreakerConfig>,
    /// Each upstream target's active health checks (`[health]`, then the
    /// target's own `health` table), in target order.
    pub health: Vec<(String, HealthConfig)>,
    /// Routes: which models go to which targets, with what retries and
    /// deadline.
    pub routes: Vec<RouteConfig>,
    /// The shadow-traffic verifier of the upstream targets' recovery; `None`
    /// leaves recovery to each breaker's own half-open probe.
    pub shadow: Option<ShadowConfig>,
    /// The store of generations (responses, background jobs, resumable
    /// streams); `None` when turned off.
    pub store: Option<StoreConfig>,
    /// Client authentication; `None` (the default) lets anyone who reaches
    /// the port call.
    pub auth: Option<AuthConfig>,
}

impl Config {
    /// Loads and validates a TOML file. `env` looks up environment variables
    /// (API keys), so tests need not touch the process environment.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?, env)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        parse_raw(text)?.validate(&env)
    }

    /// The configuration without a file: the upstream at `OPENAI_BASE_URL`
    /// with `OPENAI_API_KEY`, serving every model under the requested name,
    /// then the local model when its file is there; with no key, offline:
    /// every request served by the local model (`BACKSTOP_MODEL` names its file).
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        if env("OPENAI_API_KEY").is_none_or(|k| k.is_empty()) {
            return RawConfig::default().offline(&env);
        }
        let raw = RawConfig {
            targets: vec![RawTarget {
                name: "openai".into(),
                base_url: env("OPENAI_BASE_URL").unwrap_or_else(|| OPENAI_BASE_URL.into()),
                api_key_env: Some("OPENAI_API_KEY".into()),
                ..RawTarget::default()
            }],
            local: default_local(&env),
            ..RawConfig::default()
        };
        raw.validate(&env)
    }

    /// A config file's settings, but every request served by the local model.
    pub fn load_offline(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::parse_offline(&read(path)?, env)
    }

    /// Parses and validates TOML text for `--offline`: its local model
    /// serves every request, whatever targets it names.
    pub fn parse_offline(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        parse_raw(text)?.offline(&env)
    }

    /// Whether every request is served by the local model.
    pub fn is_offline(&self) -> bool {
        self.targets.is_empty()
    }
}

/// The most a key file may hold: keys, not a stream (a device file).
const MAX_KEY_FILE: u64 = 64 << 10;

/// A secret file's text, or why not (never its contents).
fn read_secret(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| format!("cannot read {}: {}", path.display(), e.kind());
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "{} is larger than {MAX_KEY_FILE} bytes",
            path.display()
        ));
    }
    Ok(text)
}

/// The groups, each with its members' names: every member a target, in
/// one group at most, a group's name no target's.
fn validate_groups(
    raw: Vec<RawGroup>,
    targets: &BTreeMap<String, RetryPolicy>,
    regions: &BTreeMap<String, String>,
) -> Result<Vec<(Group, Vec<String>)>, ConfigError> {
    let mut groups: Vec<(Group, Vec<String>)> = Vec::new();
    for (i, g) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("groups[{i}].{field}");
        if g.name.is_empty() || targets.contains_key(&g.name) {
            return Err(invalid(
                at("name"),
                format!("`{}` must be a new name, not a target's", g.name),
            ));
        }
        if groups.iter().any(|(o, _)| o.name == g.name) {
            return Err(invalid(at("name"), format!("`{}` is named twice", g.name)));
        }
        if g.members.is_empty() {
            return Err(invalid(at("members"), "at least one target is needed"));
        }
        let mut members = Vec::new();
        for (j, name) in g.members.iter().enumerate() {
            if !targets.contains_key(name) {
                return Err(invalid(
                    format!("groups[{i}].members[{j}]"),
                    format!("no target is named `{name}`"),
                ));
            }
            let elsewhere = groups.iter().any(|(_, m)| m.contains(name));
            if elsewhere || g.members[..j].contains(name) {
                return Err(invalid(
                    format!("groups[{i}].members[{j}]"),
                    format!("target `{name}` is in a group already"),
                ));
            }
            let weight = g.weights.get(name).copied().unwrap_or(1);
            if weight == 0 {
                return Err(invalid(
                    format!("groups[{i}].weights.{name}"),
                    "must be greater than 0",
                ));
            }
            members.push(Member {
                weight,
                region: regions.get(name).cloned(),
            });
        }
        if let Some(stray) = g.weights.keys().find(|k| !g.members.contains(k)) {
            return Err(invalid(
                format!("groups[{i}].weights.{stray}"),
                format!("`{stray}` is not a member"),
            ));
        }
        let name = g.policy.as_deref().unwrap_or("least_latency");
        let policy = Policy::parse(name).ok_or_else(|| {
            invalid(
                at("policy"),
                format!("`{name}` is not one of weighted, least_latency, least_busy"),
            )
        })?;
        let group = Group {
            name: g.name,
            start: 0,
            members,
            policy,
        };
        groups.push((group, g.members));
    }
    Ok(groups)
}

/// The local model as the last resort behind the upstream, when its file is
/// there (`BACKSTOP_MODEL`, or the default that `models/fetch` downloads).
fn default_local(env: &impl Fn(&str) -> Option<String>) -> Option<RawLocal> {
    let model = env("BACKSTOP_MODEL")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(DEFAULT_MODEL)).filter(|p| p.exists()))?;
    Some(RawLocal {
        model: Some(model),
        ..RawLocal::default()
    })
}

/// A model pattern: `*` for any, `name*` for a prefix, else exactly the
/// name; `None` when empty.
fn model_match(pattern: &str) -> Option<ModelMatch> {
    Some(match pattern {
        "" => return None,
        "*" => ModelMatch::Any,
        p if p.ends_with('*') => ModelMatch::Prefix(p.trim_end_matches('*').to_string()),
        name => ModelMatch::Exact(name.to_string()),
    })
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
        path: ".".into(),
        message: e.message().to_string(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Parse {
            path,
            message: e.inner().message().to_string(),
        }
    })
}

impl RawConfig {
    /// Drops the upstreams: the local model (configured or default) serves all.
    fn offline(mut self, env: &impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut local = self.local.take().unwrap_or_default();
        if local.model.is_none() {
            local.model = env("BACKSTOP_MODEL").map(PathBuf::from);
        }
        self.local = Some(local);
        self.targets.clear();
        self.routes.clear();
        self.validate(env)
    }

    fn validate(self, env: &impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let listen_text = self.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse().map_err(|e| {
            invalid(
                "server.listen",
                format!("`{listen_text}` is not an address: {e}"),
            )
        })?;
        let (admin_listen, admin_token) = self.server.admin(env)?;
        let limits = self.server.limits()?;
        let breaker = self.breaker.apply(&BreakerConfig::default(), "breaker")?;
        let retry = self.retry.apply(&RetryPolicy::default(), "retry")?;
        let deadline = millis(
            self.retry.deadline_ms,
            "retry.deadline_ms",
            DEFAULT_DEADLINE,
            false,
        )?;
        let health = self.health.apply(&HealthConfig::default(), "health")?;
        let mut names = HashSet::new();
        let mut regions: BTreeMap<String, String> = BTreeMap::new();
        // Per target: its breaker, and the retry policy its attempts follow
        // unless a route says otherwise.
        let mut breakers = BTreeMap::new();
        let mut target_retry = BTreeMap::new();
        let mut checks = Vec::new();
        let local = match self.local {
            Some(mut l) => {
                let (b, r) = (l.breaker.take(), l.retry.take());
                let local = validate_local(l)?;
                breakers.insert(
                    local.target.clone(),
                    b.unwrap_or_default().apply(&breaker, "local.breaker")?,
                );
                target_retry.insert(
                    local.target.clone(),
                    target_policy(r.as_ref(), &retry, "local.retry")?,
                );
                Some(local)
            }
            None => None,
        };
        if self.targets.is_empty() && local.is_none() {
            return Err(invalid(
                "targets",
                "at least one target (or [local]) is needed",
            ));
        }
        let mut targets = Vec::with_capacity(self.targets.len());
        for (i, t) in self.targets.into_iter().enumerate() {
            let at = |field: &str| format!("targets[{i}].{field}");
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(
                    at("name"),
                    "use letters, digits, `-`, `_` and `.` only",
                ));
            }
            if !names.insert(t.name.clone()) || local.as_ref().is_some_and(|l| l.target == t.name) {
                return Err(invalid(at("name"), format!("`{}` is used twice", t.name)));
            }
            if !(t.base_url.starts_with("http://") || t.base_url.starts_with("https://")) {
                return Err(invalid(
                    at("base_url"),
                    "must start with http:// or https://",
                ));
            }
            breakers.insert(
                t.name.clone(),
                t.breaker
                    .unwrap_or_default()
                    .apply(&breaker, &at("breaker"))?,
            );
            target_retry.insert(
                t.name.clone(),
                target_policy(t.retry.as_ref(), &retry, &at("retry"))?,
            );
            checks.push((
                t.name.clone(),
                t.health.unwrap_or_default().apply(&health, &at("health"))?,
            ));
            if let Some(region) = t.region.filter(|r| !r.is_empty()) {
                regions.insert(t.name.clone(), region);
            }
            let mut u = UpstreamConfig::new(t.name, t.base_url);
            u.api_keys = t
                .api_key_env
                .as_deref()
                .and_then(env)
                .filter(|k| !k.is_empty())
                .into_iter()
                .collect();
            // More keys for the same upstream, used in turn: each must be set.
            for (j, var) in t.api_keys_env.iter().flatten().enumerate() {
                match env(var).filter(|k| !k.is_empty()) {
                    Some(key) if !u.api_keys.contains(&key) => u.api_keys.push(key),
                    Some(_) => {
                        return Err(invalid(
                            at(&format!("api_keys_env[{j}]")),
                            format!("`{var}` holds a key this target already has"),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            at(&format!("api_keys_env[{j}]")),
                            format!("`{var}` is not set"),
                        ))
                    }
                }
            }
            // Keys from a file (a mounted secret), one a line, read again at
            // each reload: rotating them needs no restart.
            if let Some(path) = &t.api_key_file {
                let text = read_secret(path).map_err(|why| invalid(at("api_key_file"), why))?;
                let keys: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .collect();
                if keys.is_empty() {
                    return Err(invalid(
                        at("api_key_file"),
                        format!("{} holds no key", path.display()),
                    ));
                }
                for key in keys {
                    if !u.api_keys.iter().any(|k| k == key) {
                        u.api_keys.push(key.to_string());
                    }
                }
            }
            u.model = t.model;
            u.http2 = t.http2.unwrap_or(false);
            u.prefill = t.prefill.unwrap_or(false);
            u.completions = t.completions.unwrap_or(true);
            u.responses = t.responses.unwrap_or(true);
            u.context_window = match t.context_window {
                Some(n) if n < 16 => {
                    return Err(invalid(at("context_window"), "must be at least 16 tokens"))
                }
                other => other,
            };
            let limit = |value: Option<u64>, field: &str| {
                value.map(|n| count(Some(n), &at(field), n)).transpose()
            };
            u.requests_per_minute = limit(t.requests_per_minute, "requests_per_minute")?;
            u.tokens_per_minute = limit(t.tokens_per_minute, "tokens_per_minute")?;
            u.ca_bundle = t.ca_bundle;
            if let Some(n) = t.pool_max_idle {
                u.pool_max_idle = n;
            }
            let ms = |v: Option<u64>, field: &str, default: Duration| {
                millis(v, &at(field), default, false)
            };
            u.pool_idle_timeout = ms(
                t.pool_idle_timeout_ms,
                "pool_idle_timeout_ms",
                u.pool_idle_timeout,
            )?;
            u.connect_timeout = ms(
                t.connect_timeout_ms,
                "connect_timeout_ms",
                u.connect_timeout,
            )?;
            u.first_byte_timeout = ms(
                t.first_byte_timeout_ms,
                "first_byte_timeout_ms",
                u.first_byte_timeout,
            )?;
            u.header_timeout = ms(t.header_timeout_ms, "header_timeout_ms", u.header_timeout)?;
            u.idle_timeout = ms(t.idle_timeout_ms, "idle_timeout_ms", u.idle_timeout)?;
            let size = |value: Option<usize>, field: &str, default: usize| match value {
                Some(0) => Err(invalid(at(field), "must be greater than 0")),
                other => Ok(other.unwrap_or(default)),
            };
            u.max_body_bytes = size(t.max_body_bytes, "max_body_bytes", u.max_body_bytes)?;
            u.max_event_bytes = size(t.max_event_bytes, "max_event_bytes", u.max_event_bytes)?;
            targets.push(u);
        }
        if let Some(l) = &local {
            names.insert(l.target.clone());
        }
        let groups = validate_groups(self.groups, &target_retry, &regions)?;
        let mut routes = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let models = model_match(&r.models)
                .ok_or_else(|| invalid(format!("routes[{i}].models"), "must not be empty"))?;
            if r.targets.is_empty() {
                return Err(invalid(
                    format!("routes[{i}].targets"),
                    "at least one target is needed",
                ));
            }
            let overrides = r.retry.unwrap_or_default();
            let mut hops: Vec<(String, RetryPolicy)> = Vec::with_capacity(r.targets.len());
            let mut in_groups = Vec::new();
            for (j, name) in r.targets.into_iter().enumerate() {
                let (members, group) = match groups.iter().find(|(g, _)| g.name == name) {
                    Some((group, members)) => (members.clone(), Some(group)),
                    None => (vec![name.clone()], None),
                };
                if let Some(group) = group {
                    in_groups.push(Group {
                        start: hops.len(),
                        ..group.clone()
                    });
                }
                for member in members {
                    let Some(base) = target_retry.get(&member) else {
                        return Err(invalid(
                            format!("routes[{i}].targets[{j}]"),
                            format!("no target or group is named `{member}`"),
                        ));
                    };
                    if hops.iter().any(|(n, _)| *n == member) {
                        return Err(invalid(
                            format!("routes[{i}].targets[{j}]"),
                            format!("target `{member}` is in this route twice"),
                        ));
                    }
                    let policy = overrides.apply(base, &format!("routes[{i}].retry"))?;
                    hops.push((member, policy));
                }
            }
            let deadline = millis(
                overrides.deadline_ms,
                &format!("routes[{i}].retry.deadline_ms"),
                deadline,
                false,
            )?;
            routes.push(RouteConfig {
                models,
                hops,
                groups: in_groups,
                deadline,
            });
        }
        if routes.is_empty() {
            // No routes: every model goes down every target, in configured
            // order, the local model last.
            let hops = targets
                .iter()
                .map(|t| t.name.clone())
                .chain(local.iter().map(|l| l.target.clone()))
                .filter_map(|name| Some((name.clone(), target_retry.get(&name)?.clone())))
                .collect();
            routes.push(RouteConfig {
                models: ModelMatch::Any,
                hops,
                groups: Vec::new(),
                deadline,
            });
        }
        Ok(Config {
            listen,
            region: self.server.region.filter(|r| !r.is_empty()),
            admin_listen,
            admin_token,
            limits,
            shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms.unwrap_or(30_000)),
            targets,
            local,
            breakers,
            health: checks,
            routes,
            shadow: self.shadow.validate()?,
            store: self.store.validate(env)?,
            auth: self.auth.validate(env)?,
        })
    }
}

/// Where the store keeps generations.
#[derive(Debug, Clone, PartialEq)]
pub enum Database {
    /// Embedded SQLite in a data directory (made on first start): `[store]
    /// path`, else `BACKSTOP_DATA`, else `data` under the working
    /// directory. The default: no setup, one replica.
    Sqlite(PathBuf),
    /// A PostgreSQL server that several replicas share: `[store] url`
    /// (`postgres://user@host:port/db`), else `BACKSTOP_STORE_URL`.
    Postgres(String),
}

impl RawStore {
    fn validate(
        &self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Option<StoreConfig>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let positive = |value: Option<u64>, field: &str, default: u64| match value {
            Some(0) => Err(invalid(field, "must be greater than 0")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let count = |value: Option<usize>, field: &str, default: usize| match value {
            Some(0) => Err(invalid(field, "must be greater than 0")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let url = self
            .url
            .clone()
            .or_else(|| env("BACKSTOP_STORE_URL").filter(|u| !u.is_empty()));
        let database = match (url, &self.path) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "store.url",
                    "names a PostgreSQL store, and store.path an SQLite one: give one",
                ))
            }
            (Some(url), None) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(invalid(
                        "store.url",
                        "must be a PostgreSQL URL (postgres://user@host:port/db)",
                    ));
                }
                Database::Postgres(url)
            }
            (None, path) => Database::Sqlite(
                path.clone()
                    .or_else(|| {
                        env("BACKSTOP_DATA")
                            .filter(|p| !p.is_empty())
                            .map(PathBuf::from)
                    })
                    .unwrap_or_else(|| PathBuf::from("data")),
            ),
        };
        let days = positive(self.keep_stored_days, "store.keep_stored_days", 30)?;
        Ok(Some(StoreConfig {
            database,
            lease: Duration::from_secs(positive(self.lease_s, "store.lease_s", 10)?),
            keep_stored: Duration::from_secs(days.saturating_mul(24 * 3600)),
            keep_unstored: Duration::from_secs(positive(
                self.keep_unstored_s,
                "store.keep_unstored_s",
                600,
            )?),
            max_disk_bytes: positive(self.max_disk_mb, "store.max_disk_mb", 1024)?
                .saturating_mul(1 << 20),
            max_unwritten_bytes: usize::try_from(
                positive(self.max_unwritten_mb, "store.max_unwritten_mb", 64)?
                    .saturating_mul(1 << 20),
            )
            .unwrap_or(usize::MAX),
            sweep_every: Duration::from_secs(positive(
                self.sweep_every_s,
                "store.sweep_every_s",
                60,
            )?),
            max_running: count(self.max_running, "store.max_running", 16)?,
            max_queued: count(self.max_queued, "store.max_queued", 1000)?,
        }))
    }
}

impl RawServer {
    /// The admin listener and token. An admin listener off loopback needs
    /// a token: the endpoints can force breakers open.
    fn admin(
        &self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(SocketAddr, Option<String>), ConfigError> {
        let text = self.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let addr: SocketAddr = text.parse().map_err(|e| {
            invalid(
                "server.admin_listen",
                format!("`{text}` is not an address: {e}"),
            )
        })?;
        let token = match &self.admin_token_env {
            None => None,
            Some(var) => match env(var) {
                Some(t) if t.len() >= 16 => Some(t),
                _ => {
                    return Err(invalid(
                        "server.admin_token_env",
                        format!("`{var}` must hold a token of at least 16 characters"),
                    ))
                }
            },
        };
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(invalid(
                "server.admin_listen",
                "is not a loopback address: set server.admin_token_env too",
            ));
        }
        Ok((addr, token))
    }

    /// The client-side bounds, each the default unless set.
    fn limits(&self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let count = |value: Option<usize>, field: &str, default: usize| match value {
            Some(0) => Err(invalid(format!("server.{field}"), "must be greater than 0")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let time =
            |value, field: &str, default| millis(value, &format!("server.{field}"), default, false);
        Ok(Limits {
            header_read_timeout: time(
                self.header_read_timeout_ms,
                "header_read_timeout_ms",
                d.header_read_timeout,
            )?,
            idle_timeout: time(self.idle_timeout_ms, "idle_timeout_ms", d.idle_timeout)?,
            body_read_timeout: time(
                self.body_read_timeout_ms,
                "body_read_timeout_ms",
                d.body_read_timeout,
            )?,
            min_body_rate: self.min_body_rate.unwrap_or(d.min_body_rate),
            send_timeout: time(self.send_timeout_ms, "send_timeout_ms", d.send_timeout)?,
            max_connections: count(self.max_connections, "max_connections", d.max_connections)?,
            max_connections_set: self.max_connections.is_some(),
            max_in_flight: count(self.max_in_flight, "max_in_flight", d.max_in_flight)?,
            max_body_bytes: count(self.max_body_bytes, "max_body_bytes", d.max_body_bytes)?,
            max_json_values: count(self.max_json_values, "max_json_values", d.max_json_values)?,
            max_messages: count(self.max_messages, "max_messages", d.max_messages)?,
            max_request_memory: count(
                self.max_request_memory,
                "max_request_memory",
                d.max_request_memory,
            )?,
            max_header_bytes: count(
                self.max_header_bytes,
                "max_header_bytes",
                d.max_header_bytes,
            )?,
        })
    }
}

/// A target's own retry policy: the global one with the target's overrides.
/// The deadline belongs to the whole request, so a target cannot set it.
fn target_policy(
    raw: Option<&RawRetry>,
    global: &RetryPolicy,
    at: &str,
) -> Result<RetryPolicy, ConfigError> {
    let Some(raw) = raw else {
        return Ok(global.clone());
    };
    if raw.deadline_ms.is_some() {
        return Err(invalid(
            format!("{at}.deadline_ms"),
            "the deadline covers the whole request: set it in [retry] or on a route",
        ));
    }
    raw.apply(global, at)
}

impl RawHealth {
    /// `base` with the fields set here; `at` names the table in errors.
    fn apply(&self, base: &HealthConfig, at: &str) -> Result<HealthConfig, ConfigError> {
        let model = || {
            self.probe_model
                .clone()
                .unwrap_or_else(|| match &base.probe {
                    Some(Probe::Completion(m)) => m.clone(),
                    _ => "gpt-4o-mini".into(),
                })
        };
        let probe = match self.probe.as_deref() {
            None => match &base.probe {
                Some(Probe::Completion(_)) => Some(Probe::Completion(model())),
                other => other.clone(),
            },
            Some("models") => Some(Probe::Models),
            Some("completion") => Some(Probe::Completion(model())),
            Some("off") => None,
            Some(other) => {
                return Err(invalid(
                    format!("{at}.probe"),
                    format!("`{other}` is not one of models, completion, off"),
                ))
            }
        };
        let mut h = HealthConfig {
            probe,
            ..base.clone()
        };
        let positive = |v: Option<u64>, field: &str, default: Duration| {
            millis(v, &format!("{at}.{field}"), default, false)
        };
        h.interval = positive(self.interval_ms, "interval_ms", h.interval)?;
        h.timeout = positive(self.timeout_ms, "timeout_ms", h.timeout)?;
        h.healthy_after = count(
            self.healthy_threshold,
            &format!("{at}.healthy_threshold"),
            h.healthy_after,
        )?;
        h.unhealthy_after = count(
            self.unhealthy_threshold,
            &format!("{at}.unhealthy_threshold"),
            h.unhealthy_after,
        )?;
        Ok(h)
    }
}

impl RawRetry {
    /// `base` with the fields set here (the deadline is the route's, not a
    /// policy's); `at` names the table in errors.
    fn apply(&self, base: &RetryPolicy, at: &str) -> Result<RetryPolicy, ConfigError> {
        let mut r = base.clone();
        if let Some(n) = self.max_retries {
            r.max_retries = n;
        }
        let ms = |v: Option<u64>, field: &str, default: Duration, zero_ok: bool| {
            millis(v, &format!("{at}.{field}"), default, zero_ok)
        };
        r.backoff_base = ms(
            self.backoff_base_ms,
            "backoff_base_ms",
            r.backoff_base,
            true,
        )?;
        r.backoff_max = ms(self.backoff_max_ms, "backoff_max_ms", r.backoff_max, true)?;
        r.max_retry_after = ms(
            self.max_retry_after_ms,
            "max_retry_after_ms",
            r.max_retry_after,
            true,
        )?;
        r.first_token_timeout = ms(
            self.first_token_timeout_ms,
            "first_token_timeout_ms",
            r.first_token_timeout,
            false,
        )?;
        r.retry_within = ms(
            self.retry_within_ms,
            "retry_within_ms",
            r.retry_within,
            true,
        )?;
        if let Some(hedge) = self.hedge {
            r.hedge = hedge;
        }
        r.hedge_min = ms(self.hedge_min_ms, "hedge_min_ms", r.hedge_min, true)?;
        r.hedge_max = ms(self.hedge_max_ms, "hedge_max_ms", r.hedge_max, false)?;
        if r.hedge_max < r.hedge_min {
            return Err(invalid(
                format!("{at}.hedge_max_ms"),
                "must not be below hedge_min_ms",
            ));
        }
        if r.backoff_max < r.backoff_base {
            return Err(invalid(
                format!("{at}.backoff_max_ms"),
                "must not be below backoff_base_ms",
            ));
        }
        Ok(r)
    }
}

impl RawBreaker {
    /// `base` with the fields set here; `at` names the table in errors.
    fn apply(&self, base: &BreakerConfig, at: &str) -> Result<BreakerConfig, ConfigError> {
        let mut b = base.clone();
        let positive = |v: Option<u64>, field: &str, default: Duration| {
            millis(v, &format!("{at}.{field}"), default, false)
        };
        b.window = positive(self.window_ms, "window_ms", b.window)?;
        b.open_for = positive(self.open_ms, "open_ms", b.open_for)?;
        b.max_open_for = positive(self.max_open_ms, "max_open_ms", b.max_open_for)?;
        if b.max_open_for < b.open_for {
            return Err(invalid(
                format!("{at}.max_open_ms"),
                "must not be below open_ms",
            ));
        }
        b.consecutive_failures = count(
            self.consecutive_failures,
            &format!("{at}.consecutive_failures"),
            b.consecutive_failures,
        )?;
        if let Some(n) = self.min_calls {
            b.min_calls = n;
        }
        b.failure_rate = fraction(
            self.failure_rate,
            &format!("{at}.failure_rate"),
            b.failure_rate,
        )?;
        b.jitter = fraction(self.jitter, &format!("{at}.jitter"), b.jitter)?;
        match self.slow_call_ms {
            Some(0) => b.slow_call = None,
            Some(ms) => b.slow_call = Some(Duration::from_millis(ms)),
            None => {}
        }
        if b.failure_rate == 0.0 {
            return Err(invalid(
                format!("{at}.failure_rate"),
                "must be greater than 0",
            ));
        }
        Ok(b)
    }
}

impl RawShadow {
    fn validate(&self) -> Result<Option<ShadowConfig>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut c = ShadowConfig::default();
        let ms = |v: Option<u64>, field: &str, default: Duration| {
            millis(v, &format!("shadow.{field}"), default, false)
        };
        c.min_interval = millis(
            self.min_interval_ms,
            "shadow.min_interval_ms",
            c.min_interval,
            true,
        )?;
        c.max_interval = ms(self.max_interval_ms, "max_interval_ms", c.max_interval)?;
        if c.max_interval < c.min_interval {
            return Err(invalid(
                "shadow.max_interval_ms",
                "must not be below min_interval_ms",
            ));
        }
        c.probe_interval = ms(
            self.probe_interval_ms,
            "probe_interval_ms",
            c.probe_interval,
        )?;
        c.first_token_slo = ms(
            self.first_token_slo_ms,
            "first_token_slo_ms",
            c.first_token_slo,
        )?;
        c.total_slo = ms(self.total_slo_ms, "total_slo_ms", c.total_slo)?;
        c.ramp_step = ms(self.ramp_step_ms, "ramp_step_ms", c.ramp_step)?;
        c.sample_rate = fraction(self.sample_rate, "shadow.sample_rate", c.sample_rate)?;
        c.threshold = fraction(self.threshold, "shadow.threshold", c.threshold)?;
        c.queue = count(self.queue, "shadow.queue", c.queue)?;
        c.concurrency = count(self.concurrency, "shadow.concurrency", c.concurrency)?;
        c.window = count(self.window, "shadow.window", c.window)?;
        c.last_k = count(self.last_k, "shadow.last_k", c.last_k)?;
        if c.last_k > c.window {
            return Err(invalid("shadow.last_k", "must not be above window"));
        }
        c.max_tokens = count(self.max_tokens, "shadow.max_tokens", c.max_tokens)?;
        if let Some(list) = &self.allowlist {
            c.allowlist.clone_from(list);
        }
        if let Some(probes) = &self.probes {
            c.probes.clone_from(probes);
        }
        if let Some(model) = &self.probe_model {
            c.probe_model.clone_from(model);
        }
        if let Some(ramp) = &self.ramp {
            let rising = ramp.windows(2).all(|w| w[0] < w[1]);
            let valid = ramp.iter().all(|f| *f > 0.0 && *f <= 1.0);
            if ramp.last() != Some(&1.0) || !rising || !valid {
                return Err(invalid(
                    "shadow.ramp",
                    "must rise from above 0 to exactly 1.0, e.g. [0.1, 0.5, 1.0]",
                ));
            }
            c.ramp.clone_from(ramp);
        }
        Ok(Some(c))
    }
}

/// A count that cannot be zero: its default when absent.
fn count<T: Copy + Default + PartialEq>(
    value: Option<T>,
    field: &str,
    default: T,
) -> Result<T, ConfigError> {
    match value {
        Some(v) if v == T::default() => Err(invalid(field, "must be greater than 0")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// A fraction between 0 and 1: its default when absent.
fn fraction(value: Option<f64>, field: &str, default: f64) -> Result<f64, ConfigError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => Err(invalid(field, "must be between 0 and 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// A duration field in milliseconds: its default when absent; zero refused
/// unless `zero_ok`.
fn millis(
    value: Option<u64>,
    field: &str,
    default: Duration,
    zero_ok: bool,
) -> Result<Duration, ConfigError> {
    match value {
        Some(0) if !zero_ok => Err(invalid(field, "must be greater than 0")),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default),
    }
}

fn validate_local(raw: RawLocal) -> Result<LocalConfig, ConfigError> {
    let model = raw.model.unwrap_or_else(|| DEFAULT_MODEL.into());
    // Unnamed, a model is called after its file: what clients see in
    // `model` is what answered them.
    let name = raw.name.unwrap_or_else(|| match model.file_stem() {
        Some(stem) if model.file_name() != Path::new(DEFAULT_MODEL).file_name() => {
            stem.to_string_lossy().into_owned()
        }
        _ => DEFAULT_MODEL_NAME.into(),
    });
    let mut local = LocalConfig::new(name, model);
    if let Some(target) = raw.target {
        if target.is_empty()
            || !target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "local.target",
                "use letters, digits, `-`, `_` and `.` only",
            ));
        }
        local.target = target;
    }
    local.tokenizer = raw.tokenizer;
    local.batch = count(raw.batch, "local.batch", local.batch)?;
    local.queue = count(raw.queue, "local.queue", local.queue)?;
    match raw.context {
        Some(n) if n < 16 => return Err(invalid("local.context", "must be at least 16 tokens")),
        other => local.context = other,
    }
    local.max_tokens = count(raw.max_tokens, "local.max_tokens", local.max_tokens)?;
    local.continuation_tokens = count(
        raw.continuation_tokens,
        "local.continuation_tokens",
        local.continuation_tokens,
    )?;
    match raw.max_temperature {
        Some(t) if !(0.0..=2.0).contains(&t) => {
            return Err(invalid("local.max_temperature", "must be between 0 and 2"))
        }
        Some(t) => local.max_temperature = t,
        None => {}
    }
    local.kv_cache = match raw.kv_cache.as_deref() {
        None | Some("f16") => KvCache::F16,
        Some("f32") => KvCache::F32,
        Some(_) => return Err(invalid("local.kv_cache", "must be \"f16\" or \"f32\"")),
    };
    Ok(local)
}

#[cfg(test)]
mod tests;
