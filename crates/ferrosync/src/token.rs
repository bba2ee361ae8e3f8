//! `ferrosync token`: a development token for a user, signed with the config's shared-secret
//! key (an `oct` key in `client_auth.jwks`, or the Supabase legacy secret). Tokens for
//! asymmetric keys come from the app's auth provider, which holds the private key.

use anyhow::{bail, Context, Result};
use base64::Engine;
use ferrosync_config::{load_config_file, ClientAuthConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Longest lifetime a token may have (`token_max_expiration`: one day).
const MAX_LIFETIME_SECS: u64 = 86_400;

/// Print a token for `user`, valid for `expires_in` seconds, with `claims` (a JSON object)
/// added to the payload.
pub fn run(config: &Path, user: &str, expires_in: u64, claims: Option<&str>) -> Result<()> {
    let loaded = load_config_file(config, &|name| std::env::var(name).ok()).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let extra = match claims {
        Some(text) => match serde_json::from_str::<Value>(text).context("--claims is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--claims must be a JSON object"),
        },
        None => Map::new(),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    println!("{}", mint(&loaded.config.client_auth, user, now, expires_in, extra)?);
    Ok(())
}

/// The signing key: algorithm, key id and secret.
struct SigningKey {
    alg: Algorithm,
    kid: Option<String>,
    secret: Vec<u8>,
    audience: Option<String>,
}

fn signing_key(auth: &ClientAuthConfig) -> Result<SigningKey> {
    for key in &auth.jwks_keys {
        if key.get("kty").and_then(Value::as_str) != Some("oct") {
            continue;
        }
        let alg = match key.get("alg").and_then(Value::as_str) {
            Some("HS256") => Algorithm::HS256,
            Some("HS384") => Algorithm::HS384,
            Some("HS512") => Algorithm::HS512,
            _ => continue,
        };
        let k = key.get("k").and_then(Value::as_str).context("an oct key without `k`")?;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.trim_end_matches('='))
            .context("`k` is not valid base64url")?;
        return Ok(SigningKey {
            alg,
            kid: key.get("kid").and_then(Value::as_str).map(str::to_string),
            secret,
            audience: auth.audience.first().cloned(),
        });
    }
    if let Some(secret) = &auth.supabase_jwt_secret {
        return Ok(SigningKey {
            alg: Algorithm::HS256,
            kid: None,
            secret: secret.as_bytes().to_vec(),
            audience: Some("authenticated".to_string()),
        });
    }
    bail!(
        "no shared-secret key to sign with: `ferrosync token` needs an HS256/HS384/HS512 key \
         (kty: oct) in client_auth.jwks, or client_auth.supabase_jwt_secret; tokens for RSA, EC or \
         Ed25519 keys come from your auth provider"
    )
}

fn mint(auth: &ClientAuthConfig, user: &str, now: u64, expires_in: u64, extra: Map<String, Value>) -> Result<String> {
    if expires_in == 0 || expires_in > MAX_LIFETIME_SECS {
        bail!("--expires-in must be 1..{MAX_LIFETIME_SECS} seconds (the service refuses longer-lived tokens)");
    }
    let key = signing_key(auth)?;
    let mut claims = json!({"sub": user, "iat": now, "exp": now + expires_in});
    if let Some(aud) = key.audience {
        claims["aud"] = json!(aud);
    }
    if let Value::Object(map) = &mut claims {
        map.extend(extra);
    }
    let mut header = Header::new(key.alg);
    header.kid = key.kid;
    Ok(jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key.secret))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrosync_api::auth::KeyStore;

    fn auth(keys: Vec<Value>) -> ClientAuthConfig {
        ClientAuthConfig {
            jwks_keys: keys,
            audience: vec!["my-app".into()],
            ..ClientAuthConfig::default()
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn the_service_accepts_the_token() {
        let auth = auth(vec![
            json!({"kty": "RSA", "alg": "RS256", "kid": "rsa", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "oct", "alg": "HS384", "kid": "dev", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}),
        ]);
        let extra = json!({"team_id": "t1"}).as_object().cloned().unwrap_or_default();
        let token = mint(&auth, "u1", now(), 3600, extra).expect("token");
        let keys = KeyStore::from_config(&ClientAuthConfig {
            jwks_keys: vec![auth.jwks_keys[1].clone()],
            ..auth.clone()
        })
        .expect("keys");
        let verified = keys.verify_token(&token).await.expect("accepted");
        assert_eq!(verified.user_id, "u1");
        assert_eq!(verified.payload["team_id"], "t1");
        assert_eq!(verified.payload["aud"], "my-app");
        assert_eq!(verified.expires_at - verified.issued_at, 3600);
    }

    #[test]
    fn without_a_shared_secret_it_says_why() {
        let rsa_only = auth(vec![json!({"kty": "RSA", "alg": "RS256", "n": "AQAB", "e": "AQAB"})]);
        let e = mint(&rsa_only, "u1", now(), 60, Map::new()).expect_err("no key");
        assert!(e.to_string().contains("no shared-secret key"), "{e}");
        let hs = auth(vec![json!({"kty": "oct", "alg": "HS256", "k": "c2VjcmV0"})]);
        let e = mint(&hs, "u1", now(), 2 * 86_400, Map::new()).expect_err("too long");
        assert!(e.to_string().contains("--expires-in"), "{e}");
    }
}
