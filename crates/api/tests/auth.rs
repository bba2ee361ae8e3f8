//! JWT authentication tests (protocol.md §9).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse;
use base64::Engine as _;
use ferrosync_api::auth::{AuthContext, KeyStore};
use ferrosync_api::error::ServiceError;
use ferrosync_config::ClientAuthConfig;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

// Test keys generated once with `openssl genpkey` (PKCS#8). Test-only, never used elsewhere.
const RSA_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCq89qzXEhr9Jgh
HE4tF04wWE6tADYgukDdd527HTxvCO4Akl9kR5TNThj39FxuAH65nNh7fnkDDJSM
EdBdr3ACnXhUWWhg7CJKGWecnUotc3Ep30juCm2uyCLEoTgCsIhFbepkSEiojvoo
opxhN/Ebnf8Sg42Qz0h+uhc3x9KXCAE92/EiSM3euxFuHm2/7h6Ae0x0daqTXA2C
XwAboRbXuq0QrmlKvIMgl5oJZvK3WD41G+WfkI4bTCquxArALG51OXjkwEIFd4xU
D94zOm6fAlz5MfHJ1jnJpFvdOsGnZu5rEd9V6O9kz2iRfyJFGLag8hinwKlWt+4F
1eoNGsghAgMBAAECggEAAlRnq/dTXNZE3vmk5pgpVn8Tlme49R34rZP4XDEQLmax
oKQeBO61TE12yWVE/7JFx9eHezpcYZJhsV16SJaQGRcGiWa9BYoeRwJ83x1lIgSv
W33Zn3XYrA+56pJUYjP/7WtLrRFvnQ1ywwxBQ5FouaK/88ODccBjaWe1korod6qs
aV2dSTA8HCfF7OAD86OiuBlmiwPswJEYNA0AvvtwK7+0/O0e5Vg+3PXTM+KT2UMQ
2Rh106Ufvd1ryhnAYX+RqNpS1Q2j29f4AJyLJIhkWh4SGuhq7WUX9KEGTEY5dvua
zXrtp/bIeXBR5BXu4eRwxlNoq45Wj4OHquvgEZGKAQKBgQDkWeCHNNLe6rr9lS5m
nIgnLCRo+JQFAzaTYxQH8kDq1Kb4o14+h6FcLOze+Z1Z71aw8cH2JH4Pkdn9ic35
eQZiAaeYS/2b2i/XwwjWyZ1EM9dd0aenPUtqpIO/T2BZNzJDRDt6VlYdmyFpmj51
eOMagdpWAuCG3rCGr0oOLcdXoQKBgQC/ptBpO0/MFkAwUzQ5iqIXptsOyi101nOU
PGYUJgbOQ9HRjcd1MHzxOHoQT5c5vIeFjKQo/grSz3s7k84fibvXX/nfV5hJzlEZ
1TKGQxZouRU4am1H6l9/pdTs3ojBl/37or2PxgNpo+coFswGK4e365biOD0mWFR0
ybmdngOggQKBgAnozJGRfUUnMo4mlyjkyhPJGptjjijZhtjGh+wAW0jViZlonYJh
KGNzn6PdeTKZ7E0pcJ1Z4A6U6bzS6hlVYy2FnNxDD/JfeYwHbq7DeQuopEPyATCE
vG0YTo9Sxn+YoZnBsEMS1BHc1YpbozI92L0hvXPWFCBGMarmmHQdEHWBAoGAaO5C
aXtJ42nDVzIXA/I9cUmv4lcbsD7CJUU0do+jZkeHl35S2Hzly4SqgEezeq8YXCx2
rOL6thVXWXVBg877g55OxtPE05Qcn1I1SYFtwYSkc7EBiEBwbQk0nUPyCFzZeG7P
7unxcGOG6lIg/rfSpQZeJBm6kUYHZ7IS6JNdVQECgYEAgzQePRPiows9hc6ERzWs
eB10lOf+p43rveGqBh3ufs1mp43d4asq2Lr9+ZlDHA6bq/WhU5lL6e7HPOUA38Sf
dwVbPhjjiMxyWbGl/jI2MERw1vVuLg10jyAkqMKxBzdRO9Mq0fYrl7VP2e0W1rH0
3iGTQ6bh1q7jRirvUHMRKJ4=
-----END PRIVATE KEY-----
";

const EC_P256_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQLX5YGSLkDhzTNO+
OvjkZOg5q+1iA6hl+sKg+qJEau+hRANCAARB9WiPSbPOAO19jlzAWcJZiLFGyjj8
b4bKFtGZA/RQEr/0ymggWWUs9WqtaLzN1tmZoIUYLeeR3EoAqITKc9IO
-----END PRIVATE KEY-----
";

const EC_P384_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDAw+E+YDw9EkHQNC4H7
fXkxh0U+2OYt6RQfsqp6zYDuoIIe6oxdb3W34mH6b9/aLSehZANiAASRM6eG5DwG
esUg96aC64mCvKtXGD3kpPUuRR7uu1sb/Wdi5IOXWoC3L5La5cvPRD9nP4+U1fTM
K9QzW30ms4e53y+Xs8P9BgwlpFFgndGknIbRaZLdv1oerN9u6kHjapo=
-----END PRIVATE KEY-----
";

const ED25519_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIFE14gZzxke4xZe5aLocU0Jh0kogFuvMqaOHbGQa/iCD
-----END PRIVATE KEY-----
";

const NOW: i64 = 1_700_000_000;
const HS_SECRET: &[u8] = b"a-test-secret-of-reasonable-length!!";

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap()
}
fn ec256_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_P256_PEM.as_bytes()).unwrap()
}
fn ec384_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_P384_PEM.as_bytes()).unwrap()
}
fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(ED25519_PEM.as_bytes()).unwrap()
}
fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(HS_SECRET)
}

/// Public JWK for a private key, with an optional kid.
fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: Option<&str>) -> Value {
    let jwk = Jwk::from_encoding_key(key, alg).unwrap();
    let mut v = serde_json::to_value(&jwk).unwrap();
    if let Some(kid) = kid {
        v["kid"] = json!(kid);
    }
    v
}

fn hs_jwk(secret: &[u8], kid: Option<&str>) -> Value {
    let mut v = json!({
        "kty": "oct",
        "alg": "HS256",
        "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    });
    if let Some(kid) = kid {
        v["kid"] = json!(kid);
    }
    v
}

fn claims() -> Value {
    json!({"sub": "user-1", "iat": NOW, "exp": NOW + 3600, "aud": "powersync"})
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn auth_config(keys: Vec<Value>) -> ClientAuthConfig {
    ClientAuthConfig {
        jwks_keys: keys,
        audience: vec!["powersync".to_string(), "powersync-dev".to_string()],
        ..Default::default()
    }
}

fn store(keys: Vec<Value>) -> KeyStore {
    KeyStore::from_config(&auth_config(keys)).unwrap()
}

/// A store with one key of every supported kind, each with a kid.
fn full_store() -> KeyStore {
    store(vec![
        hs_jwk(HS_SECRET, Some("hs")),
        public_jwk(&rsa_key(), Algorithm::RS256, Some("rsa")),
        public_jwk(&ec256_key(), Algorithm::ES256, Some("ec256")),
        public_jwk(&ec384_key(), Algorithm::ES384, Some("ec384")),
        public_jwk(&ed_key(), Algorithm::EdDSA, Some("ed")),
    ])
}

async fn expect_err(store: &KeyStore, token: &str, code: &str) -> ServiceError {
    match store.verify_token_at(token, NOW).await {
        Ok(ctx) => panic!("expected {code}, got success: {ctx:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "unexpected error: {e} ({:?})", e.details);
            assert_eq!(e.status, 401, "{e}");
            e
        }
    }
}

async fn expect_ok(store: &KeyStore, token: &str) -> AuthContext {
    match store.verify_token_at(token, NOW).await {
        Ok(ctx) => ctx,
        Err(e) => panic!("expected success, got {e} ({:?})", e.details),
    }
}

#[tokio::test]
async fn valid_tokens_for_every_algorithm() {
    let store = full_store();
    let cases = [
        (Algorithm::HS256, hs_key(), "hs"),
        (Algorithm::RS256, rsa_key(), "rsa"),
        (Algorithm::ES256, ec256_key(), "ec256"),
        (Algorithm::ES384, ec384_key(), "ec384"),
        (Algorithm::EdDSA, ed_key(), "ed"),
    ];
    for (alg, key, kid) in cases {
        let token = sign(alg, &key, Some(kid), &claims());
        let ctx = expect_ok(&store, &token).await;
        assert_eq!(ctx.user_id, "user-1", "{alg:?}");
        assert_eq!(ctx.issued_at, NOW);
        assert_eq!(ctx.expires_at, NOW + 3600);
        assert_eq!(ctx.payload, claims());
    }
}

#[tokio::test]
async fn hs384_and_rs512_by_family_when_key_has_no_alg() {
    // RSA key without `alg`: any RS* algorithm is accepted.
    let mut rsa = public_jwk(&rsa_key(), Algorithm::RS256, Some("rsa"));
    rsa.as_object_mut().unwrap().remove("alg");
    let store = store(vec![
        rsa,
        json!({"kty": "oct", "alg": "HS384", "kid": "h384",
               "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(HS_SECRET)}),
    ]);
    let token = sign(Algorithm::RS512, &rsa_key(), Some("rsa"), &claims());
    expect_ok(&store, &token).await;
    let token = sign(Algorithm::HS384, &hs_key(), Some("h384"), &claims());
    expect_ok(&store, &token).await;
    // ... but a key with an explicit alg only accepts that alg.
    let token = sign(Algorithm::HS256, &hs_key(), Some("h384"), &claims());
    let e = expect_err(&store, &token, "PSYNC_S2101").await;
    assert!(e.description.contains("Unexpected token algorithm HS256"), "{e}");
}

#[tokio::test]
async fn numeric_sub_and_parameters() {
    let store = full_store();
    let mut c = claims();
    c["sub"] = json!(42);
    c["parameters"] = json!({"team": "a"});
    let ctx = expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c)).await;
    assert_eq!(ctx.user_id, "42");
    assert_eq!(ctx.token_parameters().unwrap()["team"], "a");
}

#[tokio::test]
async fn token_and_bearer_headers() {
    let store = full_store();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let c = json!({"sub": "u", "iat": now, "exp": now + 300, "aud": ["other", "powersync-dev"]});
    let token = sign(Algorithm::RS256, &rsa_key(), Some("rsa"), &c);
    for scheme in ["Token", "Bearer"] {
        let ctx = store.verify_authorization(Some(&format!("{scheme} {token}"))).await.unwrap();
        assert_eq!(ctx.user_id, "u");
    }
    // verify_token uses the current time as well.
    store.verify_token(&token).await.unwrap();
}

#[tokio::test]
async fn missing_authorization_header() {
    let e = full_store().verify_authorization(None).await.unwrap_err();
    assert_eq!(e.code, "PSYNC_S2106");
    assert_eq!(e.status, 401);
}

#[tokio::test]
async fn malformed_authorization_header() {
    let store = full_store();
    let token = sign(Algorithm::HS256, &hs_key(), Some("hs"), &claims());
    for header in [
        token.clone(),
        format!("token {token}"),
        format!("Basic {token}"),
        format!("Bearer  {token}"),
        format!("Bearer {token} extra"),
        "Bearer ".to_string(),
        String::new(),
    ] {
        let e = store.verify_authorization(Some(&header)).await.unwrap_err();
        assert_eq!(e.code, "PSYNC_S2106", "header {header:?}: {e}");
        assert_eq!(e.status, 401);
    }
}

#[tokio::test]
async fn oversized_authorization_header_is_refused_unparsed() {
    let store = full_store();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut c = json!({"sub": "u", "iat": now, "exp": now + 300, "aud": "powersync-dev"});
    c["padding"] = json!("x".repeat(ferrosync_api::auth::MAX_AUTHORIZATION_LEN));
    let token = sign(Algorithm::HS256, &hs_key(), Some("hs"), &c);
    // The token itself is valid: only its length gets it refused.
    store.verify_token(&token).await.unwrap();
    let e = store.verify_authorization(Some(&format!("Token {token}"))).await.unwrap_err();
    assert_eq!((e.code, e.status), ("PSYNC_S2106", 401), "{e}");
    assert!(e.description.contains("longer than 32768 bytes"), "{e}");
}

#[tokio::test]
async fn not_a_jwt() {
    let store = full_store();
    for token in ["abc", "a.b", "a.b.c", "e30.e30.e30.e30"] {
        let e = expect_err(&store, token, "PSYNC_S2101").await;
        assert!(e.description.contains("not a valid JWT"), "{e}");
    }
    // Unsupported algorithm (`none`).
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims().to_string().as_bytes());
    let e = expect_err(&store, &format!("{header}.{payload}."), "PSYNC_S2101").await;
    assert!(e.description.contains("Unsupported JWT algorithm"), "{e}");
}

#[tokio::test]
async fn bad_signature() {
    let store = full_store();
    let wrong = EncodingKey::from_secret(b"some-other-secret-entirely-xxxxxx");
    let token = sign(Algorithm::HS256, &wrong, Some("hs"), &claims());
    let e = expect_err(&store, &token, "PSYNC_S2102").await;
    assert!(e.description.contains("kid hs"), "{e}");

    // A tampered payload with a valid RS256 signature of something else.
    let good = sign(Algorithm::RS256, &rsa_key(), Some("rsa"), &claims());
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut evil = claims();
    evil["sub"] = json!("admin");
    let evil_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(evil.to_string().as_bytes());
    parts[1] = &evil_payload;
    expect_err(&store, &parts.join("."), "PSYNC_S2102").await;

    // An EdDSA token signed by a different key claiming the ES256 kid: alg mismatch.
    let token = sign(Algorithm::EdDSA, &ed_key(), Some("ec256"), &claims());
    expect_err(&store, &token, "PSYNC_S2101").await;
}

#[tokio::test]
async fn expiry_with_clock_tolerance() {
    let store = full_store();
    let mut c = claims();
    c["iat"] = json!(NOW - 3600);
    c["exp"] = json!(NOW - 61);
    let e = expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2103").await;
    assert!(e.description.contains("expired"), "{e}");

    // Expired 30 s ago: within the 60 s tolerance.
    c["exp"] = json!(NOW - 30);
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c)).await;

    // nbf in the future beyond the tolerance.
    let mut c = claims();
    c["nbf"] = json!(NOW + 120);
    expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2101").await;
    c["nbf"] = json!(NOW + 30);
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c)).await;
}

#[tokio::test]
async fn lifetime_too_long() {
    let store = full_store();
    let mut c = claims();
    c["exp"] = json!(NOW + 86_401);
    let e = expect_err(&store, &sign(Algorithm::ES256, &ec256_key(), Some("ec256"), &c), "PSYNC_S2104").await;
    assert!(e.description.contains("86400"), "{e}");
    c["exp"] = json!(NOW + 86_400);
    expect_ok(&store, &sign(Algorithm::ES256, &ec256_key(), Some("ec256"), &c)).await;
}

#[tokio::test]
async fn audience_checks() {
    let store = full_store();
    let mut c = claims();
    c["aud"] = json!("somebody-else");
    let e = expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2105").await;
    assert!(e.description.contains("somebody-else"), "{e}");
    assert!(e.details.as_deref().unwrap_or("").contains("powersync-dev"), "{e:?}");

    c["aud"] = json!(["x", "y"]);
    expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2105").await;

    c.as_object_mut().unwrap().remove("aud");
    let e = expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2105").await;
    assert!(e.description.contains("missing"), "{e}");

    c["aud"] = json!(["x", "powersync"]);
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c)).await;

    // No audiences configured: every token is rejected with S2105.
    let no_aud = KeyStore::from_config(&ClientAuthConfig {
        jwks_keys: vec![hs_jwk(HS_SECRET, Some("hs"))],
        ..Default::default()
    })
    .unwrap();
    expect_err(&no_aud, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &claims()), "PSYNC_S2105").await;
}

#[tokio::test]
async fn missing_required_claims() {
    let store = full_store();
    for claim in ["sub", "iat", "exp"] {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(claim);
        let e = expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2101").await;
        assert!(e.description.contains(&format!("\"{claim}\"")), "{e}");
    }
}

#[tokio::test]
async fn unknown_kid() {
    let store = full_store();
    let token = sign(Algorithm::RS256, &rsa_key(), Some("nope"), &claims());
    let e = expect_err(&store, &token, "PSYNC_S2101").await;
    assert!(e.description.contains("Could not find an appropriate key in the keystore"), "{e}");
    assert!(e.description.contains("kid: nope, alg: RS256"), "{e}");
    assert!(e.details.as_deref().unwrap_or("").contains("kid=rsa"), "{e:?}");

    // A token without kid does not match keys that have one.
    let token = sign(Algorithm::RS256, &rsa_key(), None, &claims());
    expect_err(&store, &token, "PSYNC_S2101").await;
}

#[tokio::test]
async fn keys_without_kid_are_tried_by_family() {
    let other_secret = b"another-secret-another-secret-123";
    let store = store(vec![
        hs_jwk(other_secret, None),
        hs_jwk(HS_SECRET, None),
        public_jwk(&ec256_key(), Algorithm::ES256, None),
    ]);
    // No kid: both HS keys are tried, the second verifies.
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), None, &claims())).await;
    // Unknown kid falls back to kid-less keys.
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("whatever"), &claims())).await;
    expect_ok(&store, &sign(Algorithm::ES256, &ec256_key(), None, &claims())).await;
    // No kid-less key verifies: "no key" (S2101), not a signature error.
    let wrong = EncodingKey::from_secret(b"not-configured-secret-xxxxxxxxxxx");
    expect_err(&store, &sign(Algorithm::HS256, &wrong, None, &claims()), "PSYNC_S2101").await;
    // No RSA key at all.
    expect_err(&store, &sign(Algorithm::RS256, &rsa_key(), None, &claims()), "PSYNC_S2101").await;
}

#[tokio::test]
async fn parameters_claim_must_be_object() {
    let store = full_store();
    for bad in [json!("x"), json!([1, 2]), json!(3)] {
        let mut c = claims();
        c["parameters"] = bad;
        let e = expect_err(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &c), "PSYNC_S2101").await;
        assert!(e.description.contains("parameters"), "{e}");
    }
}

#[tokio::test]
async fn supabase_secret() {
    let cfg = ClientAuthConfig {
        supabase: true,
        supabase_jwt_secret: Some("super-secret-jwt-token-with-at-least-32-characters".into()),
        audience: vec!["powersync".into()],
        ..Default::default()
    };
    let store = KeyStore::from_config(&cfg).unwrap();
    let key = EncodingKey::from_secret(b"super-secret-jwt-token-with-at-least-32-characters");
    let c = json!({"sub": "u", "iat": NOW, "exp": NOW + 7 * 86_400, "aud": "authenticated", "role": "authenticated"});
    expect_ok(&store, &sign(Algorithm::HS256, &key, None, &c)).await;
    // The Supabase key replaces the configured audiences.
    let mut c2 = c.clone();
    c2["aud"] = json!("powersync");
    expect_err(&store, &sign(Algorithm::HS256, &key, None, &c2), "PSYNC_S2105").await;
    // Max lifetime 7 days + 1200 s.
    let mut c3 = c.clone();
    c3["exp"] = json!(NOW + 7 * 86_400 + 1_201);
    expect_err(&store, &sign(Algorithm::HS256, &key, None, &c3), "PSYNC_S2104").await;

    // Without supabase: true, the secret is ignored.
    let store = KeyStore::from_config(&ClientAuthConfig { supabase: false, ..cfg }).unwrap();
    expect_err(&store, &sign(Algorithm::HS256, &key, None, &c), "PSYNC_S2101").await;
}

#[test]
fn invalid_inline_jwks_are_rejected() {
    let cases = [
        (json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"}), "kid"),
        (json!({"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}), "alg"),
        (
            json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "bad-ec"}),
            "bytes",
        ),
        (json!({"kty": "OKP", "crv": "Ed448", "x": "AAAA", "kid": "ed448"}), "Ed448"),
        (json!({"kty": "XYZ", "kid": "weird"}), "kty"),
        (json!({"kty": "oct", "alg": "RS256", "k": "c2VjcmV0", "kid": "mixed"}), "alg"),
    ];
    for (i, (jwk, needle)) in cases.into_iter().enumerate() {
        let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
        let e = KeyStore::from_config(&auth_config(vec![hs_jwk(HS_SECRET, Some("ok")), jwk])).unwrap_err();
        assert_eq!(e.code, "PSYNC_S2201", "case {i}: {e}");
        assert!(e.description.contains("client_auth.jwks.keys[1]"), "case {i}: {e}");
        assert!(e.description.contains(needle), "case {i}: {e}");
        if let Some(kid) = kid {
            assert!(e.description.contains(&kid), "case {i}: {e}");
        }
    }
    // `use: enc` keys are ignored rather than rejected.
    let mut enc = public_jwk(&rsa_key(), Algorithm::RS256, Some("enc"));
    enc["use"] = json!("enc");
    let s = KeyStore::from_config(&auth_config(vec![enc])).unwrap();
    assert_eq!(s.static_key_count(), 0);

    let e = KeyStore::from_config(&ClientAuthConfig {
        jwks_uri: vec!["ftp://example.com/jwks".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.code, "PSYNC_S2201");
}

// ------------------------------------------------------------------------------------------
// jwks_uri, served by a local axum server
// ------------------------------------------------------------------------------------------

struct JwksServer {
    url: String,
    keys: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
    status: Arc<Mutex<u16>>,
}

async fn start_jwks_server(initial: Value) -> JwksServer {
    let keys = Arc::new(Mutex::new(initial));
    let hits = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(Mutex::new(200u16));
    let (k, h, s) = (keys.clone(), hits.clone(), status.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (k, h, s) = (k.clone(), h.clone(), s.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let status = axum::http::StatusCode::from_u16(*s.lock().unwrap()).unwrap();
                let body = k.lock().unwrap().clone();
                (status, axum::Json(body))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    JwksServer {
        url: format!("http://{addr}/.well-known/jwks.json"),
        keys,
        hits,
        status,
    }
}

fn uri_config(uri: &str) -> ClientAuthConfig {
    ClientAuthConfig {
        jwks_uri: vec![uri.to_string()],
        audience: vec!["powersync".to_string()],
        ..Default::default()
    }
}

#[tokio::test]
async fn jwks_uri_fetch_cache_and_refresh() {
    let mut enc_key = public_jwk(&ec256_key(), Algorithm::ES256, Some("enc-key"));
    enc_key["use"] = json!("enc");
    let server = start_jwks_server(json!({"keys": [
        public_jwk(&rsa_key(), Algorithm::RS256, Some("r1")),
        // oct keys are never taken from a remote JWKS.
        hs_jwk(HS_SECRET, Some("remote-hs")),
        enc_key,
        // Unknown key types are skipped, not fatal.
        {"kty": "foo", "kid": "x"},
    ]}))
    .await;

    let store = KeyStore::from_config(&uri_config(&server.url)).unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 0, "fetch is lazy");

    expect_ok(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims())).await;
    expect_ok(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims())).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "keys are cached");

    expect_err(
        &store,
        &sign(Algorithm::HS256, &hs_key(), Some("remote-hs"), &claims()),
        "PSYNC_S2101",
    )
    .await;
    expect_err(
        &store,
        &sign(Algorithm::ES256, &ec256_key(), Some("enc-key"), &claims()),
        "PSYNC_S2101",
    )
    .await;

    // Key rotation: with the default 30 s limit the new kid is not fetched yet...
    server.keys.lock().unwrap()["keys"]
        .as_array_mut()
        .unwrap()
        .push(public_jwk(&ed_key(), Algorithm::EdDSA, Some("r2")));
    let rotated = sign(Algorithm::EdDSA, &ed_key(), Some("r2"), &claims());
    expect_err(&store, &rotated, "PSYNC_S2101").await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);

    // ... but a store allowed to refresh immediately picks it up on the unknown kid.
    let store = KeyStore::from_config(&uri_config(&server.url))
        .unwrap()
        .with_unknown_kid_refresh_interval(Duration::ZERO);
    expect_ok(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims())).await;
    let hits = server.hits.load(Ordering::SeqCst);
    server.keys.lock().unwrap()["keys"]
        .as_array_mut()
        .unwrap()
        .push(public_jwk(&ec384_key(), Algorithm::ES384, Some("r3")));
    expect_ok(&store, &sign(Algorithm::ES384, &ec384_key(), Some("r3"), &claims())).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), hits + 1);
    // Known kids do not trigger fetches.
    expect_ok(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims())).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), hits + 1);
}

#[tokio::test]
async fn jwks_uri_combined_with_inline_keys() {
    let server = start_jwks_server(json!({"keys": [
        public_jwk(&rsa_key(), Algorithm::RS256, Some("r1")),
    ]}))
    .await;
    let mut cfg = uri_config(&server.url);
    cfg.jwks_keys = vec![hs_jwk(HS_SECRET, Some("hs"))];
    let store = KeyStore::from_config(&cfg).unwrap();
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &claims())).await;
    expect_ok(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims())).await;
}

#[tokio::test]
async fn jwks_uri_fetch_failures() {
    // HTTP error status.
    let server = start_jwks_server(json!({"keys": []})).await;
    *server.status.lock().unwrap() = 500;
    let store = KeyStore::from_config(&uri_config(&server.url)).unwrap();
    let e = expect_err(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims()), "PSYNC_S2204").await;
    assert!(e.description.contains(&server.url), "{e}");
    assert!(e.description.contains("500"), "{e}");
    assert!(e.description.contains("kid: r1"), "{e}");

    // Not a JWKS.
    *server.status.lock().unwrap() = 200;
    *server.keys.lock().unwrap() = json!({"hello": "world"});
    let store = KeyStore::from_config(&uri_config(&server.url)).unwrap();
    let e = expect_err(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims()), "PSYNC_S2204").await;
    assert!(e.description.contains("keys"), "{e}");

    // Connection refused: bind a port, then free it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let store = KeyStore::from_config(&uri_config(&url)).unwrap();
    let e = expect_err(&store, &sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims()), "PSYNC_S2204").await;
    assert!(e.description.contains(&url), "{e}");

    // Inline keys still work while the remote JWKS is down.
    let mut cfg = uri_config(&url);
    cfg.jwks_keys = vec![hs_jwk(HS_SECRET, Some("hs"))];
    let store = KeyStore::from_config(&cfg).unwrap();
    expect_ok(&store, &sign(Algorithm::HS256, &hs_key(), Some("hs"), &claims())).await;
}

#[tokio::test]
async fn jwks_uri_rejected_ip_ranges() {
    let server = start_jwks_server(json!({"keys": [
        public_jwk(&rsa_key(), Algorithm::RS256, Some("r1")),
    ]}))
    .await;
    let token = sign(Algorithm::RS256, &rsa_key(), Some("r1"), &claims());
    for (ranges, block_local) in [
        (vec!["127.0.0.0/8".to_string()], false),
        (vec!["local".to_string()], false),
        (vec![], true),
    ] {
        let mut cfg = uri_config(&server.url);
        cfg.jwks_reject_ip_ranges = ranges;
        cfg.block_local_jwks = block_local;
        let store = KeyStore::from_config(&cfg).unwrap();
        let e = expect_err(&store, &token, "PSYNC_S2203").await;
        assert!(e.description.contains(&server.url), "{e}");
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 0);

    let mut cfg = uri_config(&server.url);
    cfg.jwks_reject_ip_ranges = vec!["10.0.0.0/8".to_string()];
    expect_ok(&KeyStore::from_config(&cfg).unwrap(), &token).await;

    cfg.jwks_reject_ip_ranges = vec!["not-a-range".to_string()];
    assert_eq!(KeyStore::from_config(&cfg).unwrap_err().code, "PSYNC_S2201");
}

// ------------------------------------------------------------------------------------------
// ServiceError
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn service_error_shape() {
    let e = ServiceError::new("PSYNC_S2103", 401, "JWT has expired").with_details("exp: 1");
    assert_eq!(e.to_string(), "[PSYNC_S2103] JWT has expired");
    assert_eq!(
        e.to_json(),
        json!({"error": {"name": "AuthorizationError", "code": "PSYNC_S2103", "status": 401,
                         "description": "JWT has expired", "details": "exp: 1"}})
    );
    let plain = ServiceError::new("PSYNC_S2302", 500, "No sync rules available");
    assert!(plain.to_json()["error"].get("details").is_none());

    let response = e.clone().into_response();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers().get("content-type").unwrap(), "application/json");
    let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
    let parsed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(parsed, e.to_json());

    let boxed: Box<dyn std::error::Error> = Box::new(plain);
    assert!(boxed.to_string().starts_with("[PSYNC_S2302]"));
}
