//! JWT authentication (protocol.md §9): key store built from `client_auth`, token verification
//! with PowerSync's key-selection rules, claim checks and error codes.

#[path = "jwks.rs"]
mod jwks;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ferrosync_config::ClientAuthConfig;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::error::ServiceError;
use jwks::{alg_family, alg_name, parse_alg, parse_jwk, Family, IpPolicy, JwkOrigin, KeySpec, ParsedJwk, Refresh, RemoteJwks};

/// Clock tolerance for `exp` / `nbf`, seconds.
pub const CLOCK_TOLERANCE_SECS: i64 = 60;
/// Maximum `exp - iat` (`token_max_expiration: '1d'`).
pub const MAX_TOKEN_LIFETIME_SECS: i64 = 86_400;
/// Maximum `exp - iat` for tokens verified by the Supabase legacy secret: 7 days + 1200 s.
pub const SUPABASE_MAX_TOKEN_LIFETIME_SECS: i64 = 7 * 86_400 + 1_200;
/// Audience required for tokens verified by the Supabase legacy secret.
pub const SUPABASE_AUDIENCE: &str = "authenticated";
/// Longest `Authorization` value looked at. Real tokens are a few KiB at most; a longer value
/// is refused before any decoding, so a client cannot make each request cost megabytes of
/// base64 and JSON work.
pub const MAX_AUTHORIZATION_LEN: usize = 32 * 1024;

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthContext {
    /// `sub`, as text (numbers are rendered like JavaScript would).
    pub user_id: String,
    /// The full JWT payload.
    pub payload: Value,
    /// `iat`, unix seconds.
    pub issued_at: i64,
    /// `exp`, unix seconds.
    pub expires_at: i64,
}

impl AuthContext {
    /// The `parameters` claim (an object), if present.
    pub fn token_parameters(&self) -> Option<&serde_json::Map<String, Value>> {
        self.payload.get("parameters").and_then(Value::as_object)
    }
}

/// Verification keys from `client_auth` (inline JWKS, Supabase secret, remote JWKS URIs).
///
/// `Send + Sync`; share it in an `Arc`. Remote JWKS are fetched lazily on first use, refreshed
/// when older than 5 minutes, and re-fetched (at most every 30 s) when a token's `kid` is unknown.
pub struct KeyStore {
    static_keys: Vec<Arc<KeySpec>>,
    remotes: Vec<RemoteJwks>,
    audiences: Vec<String>,
    client: reqwest::Client,
    ip_policy: IpPolicy,
    unknown_kid_refresh_interval: Duration,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("static_keys", &self.static_keys.iter().map(|k| k.describe()).collect::<Vec<_>>())
            .field("jwks_uri", &self.remotes.iter().map(|r| r.uri.as_str()).collect::<Vec<_>>())
            .field("audiences", &self.audiences)
            .finish()
    }
}

/// Parsed JWT header.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl TokenHeader {
    fn describe(&self) -> String {
        format!("kid: {}, alg: {}", self.kid.as_deref().unwrap_or("<none>"), alg_name(self.alg))
    }
}

enum KeySearch {
    Verified(Arc<KeySpec>),
    NoKey,
}

fn auth_err(code: &'static str, description: impl Into<String>) -> ServiceError {
    ServiceError::unauthorized(code, description)
}

impl KeyStore {
    /// Builds the key store. Invalid inline JWKs are rejected with `PSYNC_S2201`, naming the key.
    pub fn from_config(cfg: &ClientAuthConfig) -> Result<KeyStore, ServiceError> {
        let mut static_keys = Vec::new();
        for (i, jwk) in cfg.jwks_keys.iter().enumerate() {
            let source = format!("client_auth.jwks.keys[{i}]");
            let kid_label = match jwk.get("kid").and_then(Value::as_str) {
                Some(kid) => format!(" (kid: {kid})"),
                None => String::new(),
            };
            match parse_jwk(jwk, &source, JwkOrigin::Inline) {
                Ok(ParsedJwk::Key(key)) => static_keys.push(Arc::new(key)),
                Ok(ParsedJwk::Skip(reason)) => {
                    tracing::warn!(%source, %reason, "JWK ignored");
                }
                Err(reason) => {
                    return Err(ServiceError::new(
                        "PSYNC_S2201",
                        500,
                        format!("Invalid JWK at {source}{kid_label}: {reason}"),
                    ));
                }
            }
        }

        if cfg.supabase {
            match cfg.supabase_jwt_secret.as_deref() {
                Some(secret) if !secret.is_empty() => {
                    static_keys.push(Arc::new(KeySpec {
                        kid: None,
                        alg: Some(Algorithm::HS256),
                        family: Family::Hmac,
                        curve_alg: None,
                        key: DecodingKey::from_secret(secret.as_bytes()),
                        source: "client_auth.supabase_jwt_secret".to_string(),
                        audience: Some(vec![SUPABASE_AUDIENCE.to_string()]),
                        max_lifetime_secs: Some(SUPABASE_MAX_TOKEN_LIFETIME_SECS),
                    }));
                }
                _ => {
                    tracing::warn!(
                        "client_auth.supabase is enabled without supabase_jwt_secret; \
                         Supabase JWKS auto-discovery is not implemented, configure jwks_uri instead"
                    );
                }
            }
        }

        let mut remotes = Vec::new();
        for uri in &cfg.jwks_uri {
            let parsed = reqwest::Url::parse(uri)
                .map_err(|e| ServiceError::new("PSYNC_S2201", 500, format!("Invalid client_auth.jwks_uri {uri:?}: {e}")))?;
            if parsed.scheme() != "http" && parsed.scheme() != "https" {
                return Err(ServiceError::new(
                    "PSYNC_S2201",
                    500,
                    format!("Invalid client_auth.jwks_uri {uri:?}: only http and https are supported"),
                ));
            }
            remotes.push(RemoteJwks::new(uri.clone()));
        }

        let ip_policy =
            IpPolicy::new(&cfg.jwks_reject_ip_ranges, cfg.block_local_jwks).map_err(|e| ServiceError::new("PSYNC_S2201", 500, e))?;

        let mut builder = reqwest::Client::builder().timeout(jwks::FETCH_TIMEOUT);
        if !ip_policy.is_empty() {
            // Redirects could lead to a host that was never checked against the IP policy.
            builder = builder.redirect(reqwest::redirect::Policy::none());
        }
        let client = builder.build().map_err(|e| {
            ServiceError::new(
                "PSYNC_S2201",
                500,
                format!("Could not create the HTTP client for JWKS requests: {e}"),
            )
        })?;

        Ok(KeyStore {
            static_keys,
            remotes,
            audiences: cfg.audience.clone(),
            client,
            ip_policy,
            unknown_kid_refresh_interval: jwks::UNKNOWN_KID_REFRESH_INTERVAL,
        })
    }

    /// Sets how often a token with an unknown `kid` may trigger a re-fetch of the remote JWKS
    /// (default 30 s).
    pub fn with_unknown_kid_refresh_interval(mut self, interval: Duration) -> KeyStore {
        self.unknown_kid_refresh_interval = interval;
        self
    }

    /// Number of statically configured keys (inline JWKS plus the Supabase secret).
    pub fn static_key_count(&self) -> usize {
        self.static_keys.len()
    }

    /// Verifies an `Authorization` header value: `Token <jwt>` or `Bearer <jwt>`.
    pub async fn verify_authorization(&self, header: Option<&str>) -> Result<AuthContext, ServiceError> {
        // The description says which check failed; it never quotes the token.
        self.check_authorization(header)
            .await
            .inspect_err(|e| tracing::info!(code = e.code, check = %e.description, "authentication failed"))
    }

    async fn check_authorization(&self, header: Option<&str>) -> Result<AuthContext, ServiceError> {
        let Some(header) = header else {
            return Err(auth_err(
                "PSYNC_S2106",
                "Authentication required: the Authorization header is missing",
            ));
        };
        if header.len() > MAX_AUTHORIZATION_LEN {
            return Err(auth_err(
                "PSYNC_S2106",
                format!("Authentication required: the Authorization header is longer than {MAX_AUTHORIZATION_LEN} bytes"),
            ));
        }
        let token = parse_authorization(header).ok_or_else(|| {
            auth_err(
                "PSYNC_S2106",
                "Authentication required: the Authorization header must be `Token <jwt>` or `Bearer <jwt>`",
            )
        })?;
        self.verify_token(token).await
    }

    /// Verifies a JWT against the current time.
    pub async fn verify_token(&self, jwt: &str) -> Result<AuthContext, ServiceError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.verify_token_at(jwt, now).await
    }

    /// Verifies a JWT as of `now_unix` (seconds).
    pub async fn verify_token_at(&self, jwt: &str, now_unix: i64) -> Result<AuthContext, ServiceError> {
        let (header, payload) = decode_unverified(jwt)?;
        let key = self.find_key(jwt, &header).await?;
        validate_claims(&payload, &key, &self.audiences, now_unix)
    }

    async fn find_key(&self, jwt: &str, header: &TokenHeader) -> Result<Arc<KeySpec>, ServiceError> {
        let mut fetch_errors = Vec::new();
        let keys = self.collect_keys(Refresh::IfStale, &mut fetch_errors).await;
        if let KeySearch::Verified(k) = search_keys(jwt, header, &keys)? {
            return Ok(k);
        }

        let kid_known = header
            .kid
            .as_deref()
            .is_some_and(|kid| keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        let mut all_keys = keys;
        if header.kid.is_some() && !kid_known && !self.remotes.is_empty() {
            fetch_errors.clear();
            let keys = self.collect_keys(Refresh::UnknownKid, &mut fetch_errors).await;
            if let KeySearch::Verified(k) = search_keys(jwt, header, &keys)? {
                return Ok(k);
            }
            all_keys = keys;
        }

        let known = if all_keys.is_empty() {
            "none".to_string()
        } else {
            all_keys.iter().map(|k| k.describe()).collect::<Vec<_>>().join("; ")
        };
        if let Some(first) = fetch_errors.first() {
            let mut description = first.description.clone();
            for e in &fetch_errors[1..] {
                description.push_str("; ");
                description.push_str(&e.description);
            }
            return Err(ServiceError::new(
                first.code,
                first.status,
                format!("{description}. No usable key matched the token ({})", header.describe()),
            )
            .with_details(format!("Known keys: {known}")));
        }
        Err(auth_err(
            "PSYNC_S2101",
            format!(
                "Could not find an appropriate key in the keystore. The key is missing or no key matched the token. {}",
                header.describe()
            ),
        )
        .with_details(format!("Known keys: {known}")))
    }

    async fn collect_keys(&self, refresh: Refresh, fetch_errors: &mut Vec<ServiceError>) -> Vec<Arc<KeySpec>> {
        let mut keys: Vec<Arc<KeySpec>> = self.static_keys.clone();
        for remote in &self.remotes {
            let (remote_keys, error) = remote
                .keys(&self.client, &self.ip_policy, refresh, self.unknown_kid_refresh_interval)
                .await;
            keys.extend(remote_keys.iter().cloned());
            if let Some(e) = error {
                fetch_errors.push(e);
            }
        }
        keys
    }
}

/// Extracts the token from `^(Token|Bearer) (\S+)$`.
fn parse_authorization(header: &str) -> Option<&str> {
    let token = header.strip_prefix("Token ").or_else(|| header.strip_prefix("Bearer "))?;
    if token.is_empty() || token.chars().any(char::is_whitespace) {
        return None;
    }
    Some(token)
}

/// Splits and decodes header and payload without verifying anything.
fn decode_unverified(jwt: &str) -> Result<(TokenHeader, Value), ServiceError> {
    let malformed = |why: &str| auth_err("PSYNC_S2101", format!("Token is not a valid JWT: {why}"));
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("expected three dot-separated parts"));
    };
    let decode_json = |part: &str, what: &str| -> Result<Value, ServiceError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| malformed(&format!("the {what} is not valid base64url")))?;
        serde_json::from_slice::<Value>(&bytes).map_err(|_| malformed(&format!("the {what} is not valid JSON")))
    };
    let header = decode_json(h, "header")?;
    let payload = decode_json(p, "payload")?;
    if !payload.is_object() {
        return Err(malformed("the payload is not a JSON object"));
    }
    let alg_str = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("the header has no `alg`"))?;
    let alg = parse_alg(alg_str).ok_or_else(|| {
        auth_err(
            "PSYNC_S2101",
            format!("Unsupported JWT algorithm {alg_str:?}. Supported: HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384, EdDSA"),
        )
    })?;
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(malformed("the header `kid` is not a string")),
    };
    Ok((TokenHeader { alg, kid }, payload))
}

/// PowerSync key selection: a key with the token's `kid` wins (its algorithm must match);
/// otherwise every key without a `kid` whose algorithm matches is tried in order.
fn search_keys(jwt: &str, header: &TokenHeader, keys: &[Arc<KeySpec>]) -> Result<KeySearch, ServiceError> {
    if let Some(kid) = &header.kid {
        if let Some(key) = keys.iter().find(|k| k.kid.as_deref() == Some(kid.as_str())) {
            if !key.matches_alg(header.alg) {
                return Err(auth_err(
                    "PSYNC_S2101",
                    format!("Unexpected token algorithm {} for key with kid {kid}", alg_name(header.alg)),
                )
                .with_details(format!("Key: {}", key.describe())));
            }
            return match verify_signature(jwt, key, header.alg) {
                SigResult::Valid => Ok(KeySearch::Verified(key.clone())),
                SigResult::Invalid(why) => Err(auth_err(
                    "PSYNC_S2102",
                    format!(
                        "Could not verify the token signature with the key with kid {kid} ({}): {why}",
                        alg_name(header.alg)
                    ),
                )
                .with_details(format!("Key: {}", key.describe()))),
                SigResult::Malformed(why) => Err(auth_err("PSYNC_S2101", format!("Token is not a valid JWT: {why}"))),
            };
        }
    }
    for key in keys.iter().filter(|k| k.kid.is_none() && k.matches_alg(header.alg)) {
        match verify_signature(jwt, key, header.alg) {
            SigResult::Valid => return Ok(KeySearch::Verified(key.clone())),
            SigResult::Invalid(_) => continue,
            SigResult::Malformed(why) => return Err(auth_err("PSYNC_S2101", format!("Token is not a valid JWT: {why}"))),
        }
    }
    Ok(KeySearch::NoKey)
}

enum SigResult {
    Valid,
    Invalid(String),
    Malformed(String),
}

fn verify_signature(jwt: &str, key: &KeySpec, alg: Algorithm) -> SigResult {
    debug_assert!(alg_family(alg) == Some(key.family));
    // Only the signature is checked here; claims are validated by `validate_claims`.
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    match jsonwebtoken::decode::<Value>(jwt, &key.key, &validation) {
        Ok(_) => SigResult::Valid,
        Err(e) => match e.kind() {
            ErrorKind::InvalidSignature => SigResult::Invalid("signature mismatch".to_string()),
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => SigResult::Malformed(e.to_string()),
            // Key/algorithm incompatibilities (e.g. a P-384 key for ES256) mean this key
            // cannot have produced the signature.
            _ => SigResult::Invalid(e.to_string()),
        },
    }
}

fn claim_number(payload: &Value, claim: &str) -> Result<f64, ServiceError> {
    match payload.get(claim) {
        None | Some(Value::Null) => Err(auth_err(
            "PSYNC_S2101",
            format!("JWT payload is missing a required claim \"{claim}\""),
        )),
        Some(Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| auth_err("PSYNC_S2101", format!("\"{claim}\" claim must be a number"))),
        Some(_) => Err(auth_err("PSYNC_S2101", format!("\"{claim}\" claim must be a number"))),
    }
}

/// Renders a number the way JavaScript's `String(n)` would for common values.
fn js_number_string(n: &serde_json::Number) -> String {
    if n.is_f64() {
        if let Some(f) = n.as_f64() {
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                return format!("{}", f as i64);
            }
        }
    }
    n.to_string()
}

fn validate_claims(payload: &Value, key: &KeySpec, configured_audiences: &[String], now: i64) -> Result<AuthContext, ServiceError> {
    // Required claims, in the reference's order: sub, iat, exp.
    let user_id = match payload.get("sub") {
        None | Some(Value::Null) => return Err(auth_err("PSYNC_S2101", "JWT payload is missing a required claim \"sub\"")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => js_number_string(n),
        Some(_) => return Err(auth_err("PSYNC_S2101", "\"sub\" claim must be a string or a number")),
    };
    let iat = claim_number(payload, "iat")?;
    let exp = claim_number(payload, "exp")?;
    let now_f = now as f64;
    let tolerance = CLOCK_TOLERANCE_SECS as f64;

    if let Some(nbf) = payload.get("nbf").filter(|v| !v.is_null()) {
        let nbf = nbf
            .as_f64()
            .ok_or_else(|| auth_err("PSYNC_S2101", "\"nbf\" claim must be a number"))?;
        if nbf > now_f + tolerance {
            return Err(auth_err(
                "PSYNC_S2101",
                format!("JWT is not valid yet: \"nbf\" is {nbf}, current time is {now}"),
            ));
        }
    }

    if exp <= now_f - tolerance {
        return Err(auth_err(
            "PSYNC_S2103",
            format!("JWT has expired: \"exp\" is {exp}, current time is {now} ({CLOCK_TOLERANCE_SECS} s clock tolerance)"),
        ));
    }

    let max_lifetime = key.max_lifetime_secs.unwrap_or(MAX_TOKEN_LIFETIME_SECS);
    let lifetime = exp - iat;
    if lifetime > max_lifetime as f64 {
        return Err(auth_err(
            "PSYNC_S2104",
            format!("Token must expire in a maximum of {max_lifetime} seconds, got {lifetime}s"),
        )
        .with_details(format!("iat: {iat}, exp: {exp}")));
    }

    let audiences: &[String] = key.audience.as_deref().unwrap_or(configured_audiences);
    let token_aud: Vec<&str> = match payload.get("aud") {
        None | Some(Value::Null) => {
            return Err(
                auth_err("PSYNC_S2105", "JWT payload is missing a required claim \"aud\"").with_details(format!(
                    "Current configuration allows these audience values: {}",
                    serde_json::to_string(audiences).unwrap_or_default()
                )),
            )
        }
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(_) => Vec::new(),
    };
    if !token_aud.iter().any(|a| audiences.iter().any(|allowed| allowed == a)) {
        let aud_json = payload.get("aud").map(Value::to_string).unwrap_or_default();
        return Err(
            auth_err("PSYNC_S2105", format!("Unexpected \"aud\" claim value: {aud_json}")).with_details(format!(
                "Current configuration allows these audience values: {}",
                serde_json::to_string(audiences).unwrap_or_default()
            )),
        );
    }

    if let Some(params) = payload.get("parameters") {
        if !params.is_null() && !params.is_object() {
            return Err(auth_err("PSYNC_S2101", "Payload parameters must be an object"));
        }
    }

    Ok(AuthContext {
        user_id,
        payload: payload.clone(),
        issued_at: iat.floor() as i64,
        expires_at: exp.floor() as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_authorization;

    #[test]
    fn authorization_header() {
        assert_eq!(parse_authorization("Token abc"), Some("abc"));
        assert_eq!(parse_authorization("Bearer a.b.c"), Some("a.b.c"));
        assert_eq!(parse_authorization("bearer abc"), None);
        assert_eq!(parse_authorization("Token  abc"), None);
        assert_eq!(parse_authorization("Token abc def"), None);
        assert_eq!(parse_authorization("Token "), None);
        assert_eq!(parse_authorization("abc"), None);
    }
}
