//! Makes a fresh ES256 key for `benches/auth.sh`: writes its public key as
//! a JWKS file and prints a token for identity `bench`, valid an hour.
//!
//!   bench-jwt JWKS_PATH

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: bench-jwt JWKS_PATH")?;
    let rng = SystemRandom::new();
    let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| anyhow::anyhow!("keygen"))?;
    let pair =
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| anyhow::anyhow!("key"))?;
    // An uncompressed point: 0x04, x, y.
    let point = pair.public_key().as_ref();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}]});
    std::fs::write(&path, jwks.to_string())?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &header,
        &json!({"sub": "bench", "exp": exp}),
        &EncodingKey::from_ec_der(pkcs8.as_ref()),
    )?;
    println!("{token}");
    Ok(())
}
