//! Client authentication settings: who may call Backstop (`[auth]`), with
//! what scopes and models, by API key (kept as its SHA-256) or by JWT.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use backstop_router::ModelMatch;
use serde::Deserialize;

use crate::{invalid, model_match, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    enabled: Option<bool>,
    #[serde(default)]
    identities: Vec<RawIdentity>,
    jwt: Option<RawJwt>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: String,
    scopes: Option<Vec<String>>,
    models: Option<Vec<String>>,
    key_sha256: Option<Vec<String>>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    secrets: Vec<RawSecret>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    kid: String,
    secret_env: String,
}

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes {
    /// Completions, responses and models (`inference`).
    pub inference: bool,
    /// The `/admin/*` endpoints (`admin`).
    pub admin: bool,
}

/// A caller Backstop knows: its name (a metric label, never a secret),
/// what it may do, and the hashes of its API keys.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityConfig {
    /// The name logs and metrics use; a JWT's `sub` names it.
    pub name: String,
    /// What it may do.
    pub scopes: Scopes,
    /// The models it may ask for; empty for any.
    pub models: Vec<ModelMatch>,
    /// The SHA-256 of each of its API keys (several, for a rotation).
    pub key_hashes: Vec<[u8; 32]>,
    /// Generation requests it may make a minute, when limited.
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt and completion, as the backends report them) it may
    /// spend a minute, when limited.
    pub tokens_per_minute: Option<u64>,
}

/// JWT bearer tokens: where their keys come from and the claims checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    /// A JWKS file of public keys (RS256, ES256, EdDSA), selected by `kid`;
    /// reread when it changes.
    pub jwks_file: Option<PathBuf>,
    /// Shared secrets (HS256) by `kid`.
    pub secrets: Vec<(String, Vec<u8>)>,
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// The `aud` a token must carry, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// Client authentication, when on.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// The known callers.
    pub identities: Vec<IdentityConfig>,
    /// JWTs, when accepted.
    pub jwt: Option<JwtConfig>,
}

/// Shortest shared secret accepted for HS256: the hash's own size.
const MIN_SECRET: usize = 32;

impl RawAuth {
    pub(crate) fn validate(
        self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Option<AuthConfig>, ConfigError> {
        if self.enabled != Some(true) {
            if self.enabled.is_none() && (!self.identities.is_empty() || self.jwt.is_some()) {
                return Err(invalid(
                    "auth.enabled",
                    "identities or jwt are set: say `enabled = true` (or false) too",
                ));
            }
            return Ok(None);
        }
        if self.identities.is_empty() {
            return Err(invalid(
                "auth.identities",
                "authentication is on: at least one identity is needed",
            ));
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        let mut identities = Vec::with_capacity(self.identities.len());
        for (i, raw) in self.identities.into_iter().enumerate() {
            let at = |field: &str| format!("auth.identities[{i}].{field}");
            if raw.name.is_empty()
                || raw.name.len() > 64
                || !raw
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(invalid(
                    at("name"),
                    "use up to 64 letters, digits, `-`, `_`, `.` and `@`",
                ));
            }
            if !names.insert(raw.name.clone()) {
                return Err(invalid(at("name"), format!("`{}` is used twice", raw.name)));
            }
            let mut scopes = Scopes::default();
            for scope in raw.scopes.unwrap_or_else(|| vec!["inference".into()]) {
                match scope.as_str() {
                    "inference" => scopes.inference = true,
                    "admin" => scopes.admin = true,
                    other => {
                        return Err(invalid(
                            at("scopes"),
                            format!("`{other}` is not a scope (inference, admin)"),
                        ))
                    }
                }
            }
            let mut models = Vec::new();
            for (j, m) in raw.models.unwrap_or_default().iter().enumerate() {
                models.push(
                    model_match(m)
                        .ok_or_else(|| invalid(at(&format!("models[{j}]")), "is empty"))?,
                );
            }
            let mut key_hashes = Vec::new();
            for (j, hex) in raw.key_sha256.unwrap_or_default().iter().enumerate() {
                let hash = parse_sha256(hex).ok_or_else(|| {
                    invalid(
                        at(&format!("key_sha256[{j}]")),
                        "must be 64 hexadecimal digits (sha256sum of the key)",
                    )
                })?;
                if !hashes.insert(hash) {
                    return Err(invalid(
                        at(&format!("key_sha256[{j}]")),
                        "this key belongs to another identity too",
                    ));
                }
                key_hashes.push(hash);
            }
            let per_minute = |value: Option<u64>, field: &str| match value {
                Some(0) => Err(invalid(at(field), "must be greater than 0")),
                other => Ok(other),
            };
            identities.push(IdentityConfig {
                name: raw.name,
                scopes,
                models,
                key_hashes,
                requests_per_minute: per_minute(raw.requests_per_minute, "requests_per_minute")?,
                tokens_per_minute: per_minute(raw.tokens_per_minute, "tokens_per_minute")?,
            });
        }
        let jwt = self.jwt.map(|j| j.validate(env)).transpose()?;
        Ok(Some(AuthConfig { identities, jwt }))
    }
}

impl RawJwt {
    fn validate(self, env: &impl Fn(&str) -> Option<String>) -> Result<JwtConfig, ConfigError> {
        if self.jwks_file.is_none() && self.secrets.is_empty() {
            return Err(invalid(
                "auth.jwt",
                "set jwks_file, secrets, or both: tokens need keys",
            ));
        }
        let mut kids = HashSet::new();
        let mut secrets = Vec::with_capacity(self.secrets.len());
        for (i, s) in self.secrets.into_iter().enumerate() {
            let at = |field: &str| format!("auth.jwt.secrets[{i}].{field}");
            if s.kid.is_empty() || !kids.insert(s.kid.clone()) {
                return Err(invalid(
                    at("kid"),
                    "must be set, and differ from the others",
                ));
            }
            let secret = env(&s.secret_env).unwrap_or_default();
            if secret.len() < MIN_SECRET {
                return Err(invalid(
                    at("secret_env"),
                    format!(
                        "`{}` must hold a secret of at least {MIN_SECRET} bytes",
                        s.secret_env
                    ),
                ));
            }
            secrets.push((s.kid, secret.into_bytes()));
        }
        Ok(JwtConfig {
            jwks_file: self.jwks_file,
            secrets,
            issuer: self.issuer.filter(|s| !s.is_empty()),
            audience: self.audience.filter(|s| !s.is_empty()),
            leeway: Duration::from_secs(self.leeway_s.unwrap_or(60)),
        })
    }
}

/// 64 hex digits as 32 bytes.
fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}
