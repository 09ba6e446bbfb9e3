//! Configuration: raw TOML structs, validated into one runtime snapshot.
//!
//! Parsing rejects unknown fields and names the path of any bad one
//! (`targets[0].http2: invalid type ...`); validation then checks what types
//! cannot (unique names, known targets, URLs, addresses).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backstop_router::ModelMatch;
use backstop_upstream::UpstreamConfig;
use serde::Deserialize;

/// The public OpenAI API, used when `OPENAI_BASE_URL` is not set.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Where Backstop listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<usize>,
    shutdown_grace_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    base_url: String,
    api_key_env: Option<String>,
    model: Option<String>,
    pool_max_idle: Option<usize>,
    pool_idle_timeout_ms: Option<u64>,
    http2: Option<bool>,
    ca_bundle: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    models: String,
    targets: Vec<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The upstream targets.
    pub targets: Vec<UpstreamConfig>,
    /// Routes: which models go to which targets, by target name.
    pub routes: Vec<(ModelMatch, Vec<String>)>,
}

impl Config {
    /// Loads and validates a TOML file. `env` looks up environment variables
    /// (API keys), so tests need not touch the process environment.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, env)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: ".".into(),
            message: e.message().to_string(),
        })?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Parse {
                path,
                message: e.inner().message().to_string(),
            }
        })?;
        raw.validate(&env)
    }

    /// The configuration without a file: one upstream from `OPENAI_BASE_URL`
    /// and `OPENAI_API_KEY` serving every model under the requested name.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let raw = RawConfig {
            server: RawServer::default(),
            targets: vec![RawTarget {
                name: "openai".into(),
                base_url: env("OPENAI_BASE_URL").unwrap_or_else(|| OPENAI_BASE_URL.into()),
                api_key_env: Some("OPENAI_API_KEY".into()),
                model: None,
                pool_max_idle: None,
                pool_idle_timeout_ms: None,
                http2: None,
                ca_bundle: None,
                connect_timeout_ms: None,
                first_byte_timeout_ms: None,
                idle_timeout_ms: None,
            }],
            routes: Vec::new(),
        };
        raw.validate(&env)
    }
}

impl RawConfig {
    fn validate(self, env: &impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let listen_text = self.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse().map_err(|e| {
            invalid(
                "server.listen",
                format!("`{listen_text}` is not an address: {e}"),
            )
        })?;
        let max_body_bytes = self.server.max_body_bytes.unwrap_or(4 << 20);
        if max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        if self.targets.is_empty() {
            return Err(invalid("targets", "at least one target is needed"));
        }
        let mut names = HashSet::new();
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
            if !names.insert(t.name.clone()) {
                return Err(invalid(at("name"), format!("`{}` is used twice", t.name)));
            }
            if !(t.base_url.starts_with("http://") || t.base_url.starts_with("https://")) {
                return Err(invalid(
                    at("base_url"),
                    "must start with http:// or https://",
                ));
            }
            let mut u = UpstreamConfig::new(t.name, t.base_url);
            u.api_key = t
                .api_key_env
                .as_deref()
                .and_then(env)
                .filter(|k| !k.is_empty());
            u.model = t.model;
            u.http2 = t.http2.unwrap_or(false);
            u.ca_bundle = t.ca_bundle;
            if let Some(n) = t.pool_max_idle {
                u.pool_max_idle = n;
            }
            let ms = |v: Option<u64>, field: &str, default: Duration| match v {
                Some(0) => Err(invalid(at(field), "must be greater than 0")),
                Some(ms) => Ok(Duration::from_millis(ms)),
                None => Ok(default),
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
            u.idle_timeout = ms(t.idle_timeout_ms, "idle_timeout_ms", u.idle_timeout)?;
            targets.push(u);
        }
        let mut routes = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let models = match r.models.as_str() {
                "*" => ModelMatch::Any,
                "" => return Err(invalid(format!("routes[{i}].models"), "must not be empty")),
                p if p.ends_with('*') => ModelMatch::Prefix(p.trim_end_matches('*').to_string()),
                name => ModelMatch::Exact(name.to_string()),
            };
            if r.targets.is_empty() {
                return Err(invalid(
                    format!("routes[{i}].targets"),
                    "at least one target is needed",
                ));
            }
            for (j, name) in r.targets.iter().enumerate() {
                if !names.contains(name) {
                    return Err(invalid(
                        format!("routes[{i}].targets[{j}]"),
                        format!("no target is named `{name}`"),
                    ));
                }
            }
            routes.push((models, r.targets));
        }
        if routes.is_empty() {
            // No routes: every model goes down every target, in configured order.
            routes.push((
                ModelMatch::Any,
                targets.iter().map(|t| t.name.clone()).collect(),
            ));
        }
        Ok(Config {
            listen,
            max_body_bytes,
            shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms.unwrap_or(30_000)),
            targets,
            routes,
        })
    }
}

#[cfg(test)]
mod tests;
