//! Client authentication: who is calling, by API key or JWT bearer token,
//! and whether it may. Off unless `[auth] enabled = true`.
//!
//! An API key is known by its SHA-256, compared in constant time with every
//! configured hash. A JWT (HS256, RS256, ES256, EdDSA; `jsonwebtoken` checks
//! the signature and claims) is verified with the key its `kid` names: a
//! shared secret from config, or a public key from the JWKS file, which is
//! reread when it changes, so a rotation (the new key published beside the
//! old) never rejects a valid token. Its `sub` names the identity. Neither
//! secret nor token is ever logged or echoed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use backstop_config::{AuthConfig, IdentityConfig, JwtConfig};
use backstop_upstream::ratelimit::RateLimit;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::error::ServerError;
use crate::App;

/// How often the JWKS file is looked at for a change.
const JWKS_CHECK: Duration = Duration::from_secs(1);

/// A known caller: what config says of it, and its rate limit.
pub(crate) struct Identity {
    pub(crate) config: IdentityConfig,
    /// Its own requests and tokens a minute, when limited.
    limit: Option<RateLimit>,
}

/// The caller of a request, once authenticated (a request extension).
#[derive(Clone)]
pub(crate) struct Caller(pub(crate) Arc<Identity>);

impl Caller {
    /// Whether it may ask for `model`.
    pub(crate) fn may_use(&self, model: &str) -> bool {
        let models = &self.0.config.models;
        models.is_empty() || models.iter().any(|m| m.matches(model))
    }

    /// Its name.
    pub(crate) fn name(&self) -> &str {
        &self.0.config.name
    }

    /// Takes a generation request from its rate limit, or says how long
    /// until one would be allowed.
    pub(crate) fn admit(&self) -> Result<(), Duration> {
        self.0.limit.as_ref().map_or(Ok(()), |l| l.acquire(0))
    }

    /// Charges tokens a backend reported to its rate limit.
    pub(crate) fn charge(&self, tokens: u64) {
        if let Some(limit) = &self.0.limit {
            limit.charge(tokens);
        }
    }
}

/// Why a credential was not accepted: the label of
/// `backstop_auth_failures_total`, and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// An API key no identity holds.
    UnknownKey,
    /// A token that is not a well-formed JWT.
    Malformed,
    /// A JWT whose `kid` names no key, or that has none.
    UnknownKid,
    /// A JWT whose signature does not verify.
    BadSignature,
    /// A JWT past its `exp`.
    Expired,
    /// A JWT before its `nbf`.
    NotYetValid,
    /// A JWT for another issuer or audience.
    WrongClaims,
    /// A valid JWT whose `sub` is no configured identity.
    UnknownIdentity,
}

impl Refusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Malformed => "malformed_token",
            Refusal::UnknownKid => "unknown_kid",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::WrongClaims => "wrong_claims",
            Refusal::UnknownIdentity => "unknown_identity",
        }
    }

    /// What the client is told (never the credential).
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "You didn't provide an API key. Provide it in an Authorization header using \
                 Bearer auth (Authorization: Bearer YOUR_KEY)."
            }
            Refusal::UnknownKey => "Incorrect API key provided.",
            Refusal::Malformed => "The bearer token is not a valid JWT.",
            Refusal::UnknownKid => "The bearer token's key (kid) is not known.",
            Refusal::BadSignature => "The bearer token's signature is not valid.",
            Refusal::Expired => "The bearer token has expired.",
            Refusal::NotYetValid => "The bearer token is not valid yet (nbf).",
            Refusal::WrongClaims => "The bearer token is for another issuer or audience.",
            Refusal::UnknownIdentity => "The bearer token's subject is not a known identity.",
        }
    }
}

/// Why the authenticator could not be built.
#[derive(Debug, thiserror::Error)]
#[error("auth.jwt.jwks_file {path}: {message}")]
pub struct JwksError {
    path: String,
    message: String,
}

/// The authenticator a config describes.
pub(crate) struct Auth {
    identities: Vec<Arc<Identity>>,
    jwt: Option<Jwt>,
}

/// A key a JWT may be verified with, and the one algorithm it takes.
struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

struct Jwt {
    config: JwtConfig,
    secrets: HashMap<String, Key>,
    jwks: Mutex<Jwks>,
}

/// The JWKS file's keys, as last read.
struct Jwks {
    keys: Arc<HashMap<String, Key>>,
    modified: Option<SystemTime>,
    checked: Instant,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Auth {
    /// Builds the authenticator; reads the JWKS file, which must be valid.
    /// An identity whose settings are as in `previous` (a reload) keeps its
    /// rate limits' state.
    pub(crate) fn new(config: &AuthConfig, previous: Option<&Auth>) -> Result<Self, JwksError> {
        let jwt = match &config.jwt {
            Some(j) => {
                let secrets = j
                    .secrets
                    .iter()
                    .map(|(kid, secret)| {
                        let key = Key {
                            key: DecodingKey::from_secret(secret),
                            algorithm: Algorithm::HS256,
                        };
                        (kid.clone(), key)
                    })
                    .collect();
                let (keys, modified) = match &j.jwks_file {
                    Some(path) => read_jwks(path)?,
                    None => (HashMap::new(), None),
                };
                Some(Jwt {
                    config: j.clone(),
                    secrets,
                    jwks: Mutex::new(Jwks {
                        keys: Arc::new(keys),
                        modified,
                        checked: Instant::now(),
                    }),
                })
            }
            None => None,
        };
        Ok(Auth {
            identities: config
                .identities
                .iter()
                .map(|c| {
                    let kept = previous
                        .and_then(|p| p.identities.iter().find(|i| i.config == *c).cloned());
                    if let Some(kept) = kept {
                        return kept;
                    }
                    let limited = c.requests_per_minute.is_some() || c.tokens_per_minute.is_some();
                    Arc::new(Identity {
                        config: c.clone(),
                        limit: limited
                            .then(|| RateLimit::new(c.requests_per_minute, c.tokens_per_minute)),
                    })
                })
                .collect(),
            jwt,
        })
    }

    /// The identity of this name, as a caller: a background job's owner,
    /// after a restart.
    /// Each limited identity's rate limit, named `identity/{name}`: the
    /// names replicas share them by.
    pub(crate) fn rate_limits(&self) -> impl Iterator<Item = (String, &RateLimit)> + '_ {
        self.identities.iter().filter_map(|i| {
            let limit = i.limit.as_ref()?;
            Some((format!("identity/{}", i.config.name), limit))
        })
    }

    pub(crate) fn caller(&self, name: &str) -> Option<Caller> {
        self.identities
            .iter()
            .find(|i| i.config.name == name)
            .map(|i| Caller(i.clone()))
    }

    /// The caller a request's `Authorization` header proves.
    pub(crate) fn verify(&self, headers: &http::HeaderMap) -> Result<Caller, Refusal> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        let identity = if looks_like_jwt(token) && self.jwt.is_some() {
            self.jwt_identity(token)?
        } else {
            self.key_identity(token)?
        };
        Ok(Caller(identity))
    }

    /// The identity holding API key `key`: its hash is compared with every
    /// configured one, each compare taking the same time.
    fn key_identity(&self, key: &str) -> Result<Arc<Identity>, Refusal> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for identity in &self.identities {
            for known in &identity.config.key_hashes {
                let diff = known
                    .iter()
                    .zip(&hash)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                if diff == 0 {
                    found = Some(identity.clone());
                }
            }
        }
        found.ok_or(Refusal::UnknownKey)
    }

    fn jwt_identity(&self, token: &str) -> Result<Arc<Identity>, Refusal> {
        let Some(jwt) = &self.jwt else {
            return Err(Refusal::Malformed);
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let kid = header.kid.ok_or(Refusal::UnknownKid)?;
        let keys = jwt.keys();
        let key = jwt
            .secrets
            .get(&kid)
            .or_else(|| keys.get(&kid))
            .ok_or(Refusal::UnknownKid)?;
        if header.alg != key.algorithm {
            // A token may not choose how its key is read.
            return Err(Refusal::BadSignature);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = jwt.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &jwt.config.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &jwt.config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::ImmatureSignature => Refusal::NotYetValid,
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => Refusal::WrongClaims,
                ErrorKind::InvalidSignature => Refusal::BadSignature,
                ErrorKind::MissingRequiredClaim(_) => Refusal::WrongClaims,
                _ => Refusal::Malformed,
            })?
            .claims;
        self.identities
            .iter()
            .find(|i| i.config.name == claims.sub)
            .cloned()
            .ok_or(Refusal::UnknownIdentity)
    }
}

impl Jwt {
    /// The JWKS file's keys, reread when the file has changed (looked at
    /// once a second at most). A file that no longer reads keeps the keys
    /// it had, with a warning.
    fn keys(&self) -> Arc<HashMap<String, Key>> {
        let mut jwks = backstop_router::lock(&self.jwks);
        let Some(path) = &self.config.jwks_file else {
            return jwks.keys.clone();
        };
        if jwks.checked.elapsed() >= JWKS_CHECK {
            jwks.checked = Instant::now();
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != jwks.modified {
                match read_jwks(path) {
                    Ok((keys, modified)) => {
                        tracing::info!(
                            "auth: the JWKS file changed; it holds {} keys: {}",
                            keys.len(),
                            kids(&keys)
                        );
                        jwks.keys = Arc::new(keys);
                        jwks.modified = modified;
                    }
                    Err(e) => tracing::warn!("auth: keeping the previous JWKS keys: {e}"),
                }
            }
        }
        jwks.keys.clone()
    }
}

fn kids(keys: &HashMap<String, Key>) -> String {
    let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
    kids.sort_unstable();
    kids.join(", ")
}

/// Three base64url parts, the first a JSON object (`eyJ`).
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// A JWKS file's public keys by `kid`: RSA (RS256), P-256 (ES256) and
/// Ed25519 (EdDSA). Keys without a `kid`, or of other kinds, are skipped
/// with a warning.
fn read_jwks(path: &Path) -> Result<(HashMap<String, Key>, Option<SystemTime>), JwksError> {
    let fail = |message: String| JwksError {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            tracing::warn!("auth: a JWKS key without a kid is skipped");
            continue;
        };
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            _ => {
                tracing::warn!(kid, "auth: a JWKS key of a kind not accepted is skipped");
                continue;
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| fail(format!("key `{kid}`: {e}")))?;
        keys.insert(kid, Key { key, algorithm });
    }
    Ok((keys, modified))
}

/// Lets a client request on only with a credential of the `inference`
/// scope, when authentication is on; its caller goes with it.
pub(crate) async fn client(
    State(app): State<Arc<App>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ServerError> {
    let snapshot = app.snapshot();
    let Some(auth) = &snapshot.auth else {
        return Ok(next.run(req).await);
    };
    let caller = authenticate(&app, auth, req.headers())?;
    require(
        &app,
        caller.0.config.scopes.inference,
        "this credential does not have the inference scope",
    )?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Goes on when a caller was `granted` the scope; else the 403 saying
/// `why`, counted.
pub(crate) fn require(app: &App, granted: bool, why: &'static str) -> Result<(), ServerError> {
    if granted {
        return Ok(());
    }
    app.metrics
        .auth_failures
        .with_label_values(&["forbidden_scope"])
        .inc();
    Err(ServerError::Forbidden(why))
}

/// The caller `headers` prove, counted; the 401 otherwise.
pub(crate) fn authenticate(
    app: &App,
    auth: &Auth,
    headers: &http::HeaderMap,
) -> Result<Caller, ServerError> {
    match auth.verify(headers) {
        Ok(caller) => {
            app.metrics
                .identity_requests
                .with_label_values(&[caller.name()])
                .inc();
            Ok(caller)
        }
        Err(refusal) => {
            app.metrics
                .auth_failures
                .with_label_values(&[refusal.reason()])
                .inc();
            Err(ServerError::Unauthenticated(refusal))
        }
    }
}

/// Where the JWKS file is, for the startup log.
pub(crate) fn describe(config: &AuthConfig) -> String {
    let jwt = match &config.jwt {
        None => "API keys only".to_string(),
        Some(j) => format!(
            "API keys and JWTs ({} shared secrets{})",
            j.secrets.len(),
            j.jwks_file
                .as_ref()
                .map(|p: &PathBuf| format!(", JWKS file {}", p.display()))
                .unwrap_or_default()
        ),
    };
    format!("{} identities; {jwt}", config.identities.len())
}
