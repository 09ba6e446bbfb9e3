//! Client authentication: API keys and JWTs (HS256, RS256, ES256, EdDSA)
//! admit their identities only, to the models and scopes config gives
//! them; a JWKS rotation rejects no valid token; the admin endpoints need
//! the admin scope; the official Python SDK works with a key and a JWT; no
//! secret shows in an error, a metric or `/admin/status`.

// Helpers of a test crate panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use backstop_tests::{Harness, JWT_SECRET};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The billing service's key: inference, gpt-4o-mini only.
const KEY: &str = "sk-billing-4f1c2a9e7b3d5f60a8c1e2d3b4a59687";
/// The operators' key: inference and admin, any model.
const OPS_KEY: &str = "sk-ops-0b9e8d7c6a5f4e3d2c1b0a9f8e7d6c5b";
/// A batch job's key: two requests a minute.
const BATCH_KEY: &str = "sk-batch-93e1f0c7d2b4a6958e7f6d5c4b3a2910";
/// A trial's key: three tokens a minute.
const TRIAL_KEY: &str = "sk-trial-5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d";

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `[auth]` tables, with `jwt` (a `[auth.jwt]` table or nothing).
fn auth_toml(jwt: &str) -> String {
    format!(
        "[auth]\nenabled = true\n\
         [[auth.identities]]\nname = \"billing\"\nmodels = [\"gpt-4o-mini\"]\nkey_sha256 = [\"{}\"]\n\
         [[auth.identities]]\nname = \"ops\"\nscopes = [\"inference\", \"admin\"]\nkey_sha256 = [\"{}\"]\n\
         [[auth.identities]]\nname = \"batch\"\nrequests_per_minute = 2\nkey_sha256 = [\"{}\"]\n\
         [[auth.identities]]\nname = \"trial\"\ntokens_per_minute = 3\nkey_sha256 = [\"{}\"]\n\
         {jwt}\n",
        sha256_hex(KEY),
        sha256_hex(OPS_KEY),
        sha256_hex(BATCH_KEY),
        sha256_hex(TRIAL_KEY)
    )
}

async fn start(jwt: &str) -> Harness {
    Harness::with_targets(1, &auth_toml(jwt)).await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

async fn post_as(h: &Harness, credential: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = h.http.post(h.url("/v1/chat/completions")).json(body);
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    req.send().await.unwrap()
}

/// The status and error body of a refused request.
async fn refused(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn metrics(h: &Harness) -> String {
    h.get("/metrics").await.text().await.unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn api_keys_admit_their_identity_to_its_models_only() {
    let h = start("").await;
    let resp = post_as(&h, None, &chat("gpt-4o-mini")).await;
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, body) = refused(resp).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("didn't provide"));

    let wrong = "sk-billing-4f1c2a9e7b3d5f60a8c1e2d3b4a59688";
    let (status, body) = refused(post_as(&h, Some(wrong), &chat("gpt-4o-mini")).await).await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains(wrong), "{body}");
    // Nothing reached the upstream for them.
    assert!(h.mock().requests().is_empty());

    let resp = post_as(&h, Some(KEY), &chat("gpt-4o-mini")).await;
    assert_eq!(resp.status(), 200);
    let (status, body) = refused(post_as(&h, Some(KEY), &chat("gpt-4o")).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["param"], "model");
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert_eq!(h.mock().requests().len(), 1);
    // The operators' key may use any model; every endpoint of the API is
    // behind a key, the operational ones are not.
    let resp = post_as(&h, Some(OPS_KEY), &chat("gpt-4o")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(h.get("/v1/models").await.status(), 401);
    assert_eq!(h.get("/v1/responses/resp_x").await.status(), 401);
    assert_eq!(h.get("/healthz").await.status(), 200);

    let text = metrics(&h).await;
    for line in [
        "backstop_identity_requests_total{identity=\"billing\"} 2",
        "backstop_identity_requests_total{identity=\"ops\"} 1",
        "backstop_auth_failures_total{reason=\"missing\"} 3",
        "backstop_auth_failures_total{reason=\"unknown_key\"} 1",
        "backstop_auth_failures_total{reason=\"forbidden_model\"} 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(
        text.contains("backstop_identity_tokens_total{identity=\"billing\",kind=\"completion\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn each_identity_has_its_own_request_and_token_limits() {
    let h = start("").await;
    for _ in 0..2 {
        let resp = post_as(&h, Some(BATCH_KEY), &chat("gpt-4o-mini")).await;
        assert_eq!(resp.status(), 200);
    }
    let resp = post_as(&h, Some(BATCH_KEY), &chat("gpt-4o-mini")).await;
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // A request comes back every 30 s at two a minute.
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert!(resp.headers().contains_key("retry-after-ms"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // The limit is the caller's own: another identity is served.
    assert_eq!(
        post_as(&h, Some(KEY), &chat("gpt-4o-mini")).await.status(),
        200
    );

    // Tokens are charged as the backend reports them: the first answer
    // spends more than the trial's minute, so the next request waits.
    let resp = post_as(&h, Some(TRIAL_KEY), &chat("gpt-4o-mini")).await;
    assert_eq!(resp.status(), 200);
    let resp = post_as(&h, Some(TRIAL_KEY), &chat("gpt-4o-mini")).await;
    assert_eq!(resp.status(), 429);
    // Three upstream calls for batch and billing, one for the trial.
    assert_eq!(h.mock().requests().len(), 4);
    let text = metrics(&h).await;
    assert!(
        text.contains("backstop_rejected_total{reason=\"identity_rate_limit\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn the_admin_endpoints_need_the_admin_scope() {
    let h = start("").await;
    let get = |url: String, key: Option<&'static str>| {
        let mut req = h.http.get(url);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    // On the admin listener too: authentication on means a credential.
    let resp = get(h.admin_url("/admin/breakers"), None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = get(h.admin_url("/admin/breakers"), Some(KEY))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin scope"));
    let resp = get(h.admin_url("/admin/breakers"), Some(OPS_KEY))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // And on the client listener, with the admin scope.
    let resp = get(h.url("/admin/status"), Some(OPS_KEY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let status = resp.text().await.unwrap();
    for secret in [KEY, OPS_KEY, &sha256_hex(KEY), "sk-test"] {
        assert!(!status.contains(secret), "a secret in /admin/status");
    }
}

/// An HS256 token for `sub`, signed with `secret`, with these claims over
/// the defaults (a valid hour, Backstop's audience).
fn hs256(kid: &str, secret: &str, sub: &str, claims: Value) -> String {
    let mut all =
        json!({"sub": sub, "exp": now() + 3600, "iss": "https://idp.test", "aud": "backstop"});
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &all, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

const HS_JWT: &str = "[auth.jwt]\nissuer = \"https://idp.test\"\naudience = \"backstop\"\nleeway_s = 30\nsecrets = [{ kid = \"s1\", secret_env = \"TEST_JWT_SECRET\" }]\n";

#[tokio::test]
async fn jwts_are_checked_for_signature_time_issuer_and_audience() {
    let h = start(HS_JWT).await;
    let ok = hs256("s1", JWT_SECRET, "billing", json!({}));
    assert_eq!(
        post_as(&h, Some(&ok), &chat("gpt-4o-mini")).await.status(),
        200
    );
    // Within the leeway is still valid.
    let late = hs256("s1", JWT_SECRET, "billing", json!({"exp": now() - 5}));
    assert_eq!(
        post_as(&h, Some(&late), &chat("gpt-4o-mini"))
            .await
            .status(),
        200
    );
    let cases = [
        (
            hs256("s1", JWT_SECRET, "billing", json!({"exp": now() - 120})),
            "expired",
        ),
        (
            hs256("s1", JWT_SECRET, "billing", json!({"nbf": now() + 600})),
            "not valid yet",
        ),
        (
            hs256("s1", JWT_SECRET, "billing", json!({"aud": "someone-else"})),
            "another issuer or audience",
        ),
        (
            hs256(
                "s1",
                JWT_SECRET,
                "billing",
                json!({"iss": "https://evil.test"}),
            ),
            "another issuer or audience",
        ),
        (
            hs256("s1", JWT_SECRET, "mallory", json!({})),
            "not a known identity",
        ),
        (
            hs256("s2", JWT_SECRET, "billing", json!({})),
            "kid) is not known",
        ),
        (
            hs256(
                "s1",
                "another secret, also at least thirty-two bytes",
                "billing",
                json!({}),
            ),
            "signature is not valid",
        ),
        ("eyJhbGciOi.abc.def".to_string(), "not a valid JWT"),
    ];
    for (token, why) in cases {
        let (status, body) = refused(post_as(&h, Some(&token), &chat("gpt-4o-mini")).await).await;
        assert_eq!(status, 401, "{why}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{why}: {message}");
        assert!(!body.to_string().contains(&token));
    }
    // A token's identity has that identity's models only.
    let (status, _) = refused(post_as(&h, Some(&ok), &chat("gpt-4o")).await).await;
    assert_eq!(status, 403);
    let text = metrics(&h).await;
    assert!(!text.contains(JWT_SECRET));
    for reason in [
        "expired",
        "not_yet_valid",
        "wrong_claims",
        "unknown_identity",
        "unknown_kid",
        "bad_signature",
        "malformed_token",
    ] {
        assert!(
            text.contains(&format!(
                "backstop_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{reason} in\n{text}"
        );
    }
}

/// A signing key and its public JWK.
struct Signer {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn rsa(kid: &'static str) -> Self {
        // A test-only key (PKCS#1 DER): ring cannot make RSA keys.
        let der = include_bytes!("fixtures/jwt-test-rsa.der");
        let pair = RsaKeyPair::from_der(der).unwrap();
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        let (n, e) = (public.n, public.e);
        Signer {
            alg: Algorithm::RS256,
            kid,
            key: EncodingKey::from_rsa_der(der),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                        "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e)}),
        }
    }

    fn p256(kid: &'static str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        // An uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        Signer {
            alg: Algorithm::ES256,
            kid,
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                        "y": URL_SAFE_NO_PAD.encode(&point[33..65])}),
        }
    }

    fn ed25519(kid: &'static str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Signer {
            alg: Algorithm::EdDSA,
            kid,
            key: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
                        "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())}),
        }
    }

    /// A valid token for `sub`.
    fn token(&self, sub: &str) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.into());
        let claims = json!({"sub": sub, "exp": now() + 3600});
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn write_jwks(path: &std::path::Path, keys: &[&Signer]) {
    let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    // Written aside and renamed in, as a publisher would: never half a file.
    let aside = path.with_extension("new");
    std::fs::write(&aside, set.to_string()).unwrap();
    std::fs::rename(aside, path).unwrap();
}

/// Waits (boundedly) until `token` gets `status`; the status last seen.
async fn until_status(h: &Harness, token: &str, status: u16) -> u16 {
    let mut seen = 0;
    for _ in 0..60 {
        seen = post_as(h, Some(token), &chat("gpt-4o-mini"))
            .await
            .status()
            .as_u16();
        if seen == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test]
async fn a_jwks_rotation_never_rejects_a_valid_token() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let (old, new, next) = (
        Signer::rsa("2026-10"),
        Signer::p256("2026-11"),
        Signer::ed25519("2026-12"),
    );
    write_jwks(&jwks, &[&old]);
    let h = start(&format!("[auth.jwt]\njwks_file = {jwks:?}\n")).await;
    let (old_token, new_token, next_token) = (
        old.token("billing"),
        new.token("billing"),
        next.token("ops"),
    );
    assert_eq!(until_status(&h, &old_token, 200).await, 200);
    assert_eq!(until_status(&h, &new_token, 401).await, 401);

    // The new key is published beside the old: both are valid, and every
    // request with the old key is served all along.
    write_jwks(&jwks, &[&old, &new]);
    let mut old_refused = 0;
    for _ in 0..60 {
        if post_as(&h, Some(&old_token), &chat("gpt-4o-mini"))
            .await
            .status()
            != 200
        {
            old_refused += 1;
        }
        if post_as(&h, Some(&new_token), &chat("gpt-4o-mini"))
            .await
            .status()
            == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(old_refused, 0);
    assert_eq!(until_status(&h, &new_token, 200).await, 200);
    assert_eq!(until_status(&h, &old_token, 200).await, 200);

    // The old key is withdrawn: its tokens are refused, the others served.
    write_jwks(&jwks, &[&new, &next]);
    assert_eq!(until_status(&h, &old_token, 401).await, 401);
    assert_eq!(until_status(&h, &new_token, 200).await, 200);
    assert_eq!(until_status(&h, &next_token, 200).await, 200);
    let (_, body) = refused(post_as(&h, Some(&old_token), &chat("gpt-4o-mini")).await).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("kid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_calls_with_a_key_and_with_a_jwt() {
    let h = start(HS_JWT).await;
    h.python_sdk("check_sdk_auth.py", &[("OPENAI_API_KEY", KEY)])
        .await;
    let token = hs256("s1", JWT_SECRET, "billing", json!({}));
    h.python_sdk("check_sdk_auth.py", &[("OPENAI_API_KEY", &token)])
        .await;
    let text = metrics(&h).await;
    assert!(
        text.contains("backstop_identity_requests_total{identity=\"billing\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn an_identity_sees_only_the_generations_it_made() {
    let h = start("").await;
    let made = h
        .http
        .post(h.url("/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o-mini", "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 200);
    let id = made.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Another identity cannot read, follow, list, cancel or delete it: to
    // it, the response does not exist.
    let http = &h.http;
    for (what, req) in [
        ("get", http.get(h.url(&format!("/v1/responses/{id}")))),
        (
            "stream",
            http.get(h.url(&format!("/v1/responses/{id}?stream=true&starting_after=0"))),
        ),
        (
            "input_items",
            http.get(h.url(&format!("/v1/responses/{id}/input_items"))),
        ),
        (
            "cancel",
            http.post(h.url(&format!("/v1/responses/{id}/cancel")))
                .json(&json!({})),
        ),
        ("delete", http.delete(h.url(&format!("/v1/responses/{id}")))),
    ] {
        let resp = req.bearer_auth(OPS_KEY).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{what}");
    }
    let next = json!({"model": "gpt-4o-mini", "input": "and then?", "previous_response_id": id});
    let resp = http
        .post(h.url("/v1/responses"))
        .bearer_auth(OPS_KEY)
        .json(&next)
        .send()
        .await
        .unwrap();
    let (status, body) = refused(resp).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "previous_response_id");
    // Its owner still can.
    let own = http
        .get(h.url(&format!("/v1/responses/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);

    // An Idempotency-Key is the caller's own: the same key from another
    // identity makes its own generation, never a replay of another's.
    let keyed = |key: &'static str| {
        http.post(h.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("idempotency-key", "order-42")
            .json(&chat("gpt-4o-mini"))
            .send()
    };
    for key in [KEY, KEY, OPS_KEY] {
        assert_eq!(keyed(key).await.unwrap().status(), 200);
    }
    // The same caller's retry was a replay; the other caller's, its own.
    let chats = h
        .mock()
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .count();
    assert_eq!(chats, 2);
    h.shutdown().await;
}

#[tokio::test]
async fn the_model_list_holds_only_the_models_the_caller_may_use() {
    let h = start("").await;
    let list = |key: &'static str| {
        let req = h.http.get(h.url("/v1/models")).bearer_auth(key).send();
        async move {
            let body: Value = req.await.unwrap().json().await.unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    // The upstream lists `mock-model`: ops may use any model, billing only
    // gpt-4o-mini.
    assert_eq!(list(OPS_KEY).await, ["mock-model"]);
    assert!(list(KEY).await.is_empty());
    let anonymous = h.get("/v1/models").await;
    assert_eq!(anonymous.status(), 401);
    h.shutdown().await;
}
