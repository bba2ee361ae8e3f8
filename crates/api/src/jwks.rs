//! JWK parsing, remote JWKS fetching/caching and JWKS host IP filtering (protocol.md §9).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use crate::error::ServiceError;

/// Remote JWKS fetch timeout.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys older than this are refreshed on the next verification.
const MAX_KEY_AGE: Duration = Duration::from_secs(5 * 60);
/// An unknown `kid` triggers a refresh at most this often (default).
pub(crate) const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// After a failed fetch, wait this long before retrying on the normal path.
const FAILED_FETCH_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Key family by JWK `kty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Hmac,
    Rsa,
    Ec,
    Okp,
}

impl Family {
    fn kty(self) -> &'static str {
        match self {
            Family::Hmac => "oct",
            Family::Rsa => "RSA",
            Family::Ec => "EC",
            Family::Okp => "OKP",
        }
    }
}

/// A verification key plus the metadata used to select it.
pub(crate) struct KeySpec {
    pub kid: Option<String>,
    pub alg: Option<Algorithm>,
    pub family: Family,
    /// For EC keys: the algorithm implied by the curve.
    pub curve_alg: Option<Algorithm>,
    pub key: DecodingKey,
    /// Where the key came from (config path or JWKS URI), for error messages.
    pub source: String,
    /// Replaces the configured audiences for tokens verified by this key (Supabase).
    pub audience: Option<Vec<String>>,
    /// Overrides the default maximum token lifetime (Supabase).
    pub max_lifetime_secs: Option<i64>,
}

impl KeySpec {
    /// Whether a token signed with `alg` may be verified with this key.
    pub fn matches_alg(&self, alg: Algorithm) -> bool {
        if let Some(key_alg) = self.alg {
            return key_alg == alg;
        }
        if let Some(curve_alg) = self.curve_alg {
            return curve_alg == alg;
        }
        alg_family(alg) == Some(self.family)
    }

    /// Short description for error details, e.g. `kid=abc kty=RSA alg=RS256 (from ...)`.
    pub fn describe(&self) -> String {
        let alg = self.alg.or(self.curve_alg).map(alg_name).unwrap_or("any");
        format!(
            "kid={} kty={} alg={} ({})",
            self.kid.as_deref().unwrap_or("<none>"),
            self.family.kty(),
            alg,
            self.source
        )
    }
}

pub(crate) fn alg_family(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Some(Family::Hmac),
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => Some(Family::Rsa),
        Algorithm::ES256 | Algorithm::ES384 => Some(Family::Ec),
        Algorithm::EdDSA => Some(Family::Okp),
        // RSASSA-PSS (and anything newer) is not part of the PowerSync algorithm set.
        _ => None,
    }
}

/// Parses a supported JWS algorithm name. ES512 is not supported by the JWT library.
pub(crate) fn parse_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

pub(crate) fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        _ => "unknown",
    }
}

/// Decodes base64url, with or without padding.
pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

/// Where a JWK comes from; remote JWKS are filtered more leniently than inline ones.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwkOrigin {
    /// `client_auth.jwks.keys[]`: strict (RSA needs `kid`, `oct` needs `alg`).
    Inline,
    /// A key from a `jwks_uri`: only RSA/EC/OKP are taken.
    Remote,
}

/// Result of parsing one JWK.
pub(crate) enum ParsedJwk {
    Key(KeySpec),
    /// Not a key we use (e.g. `use: enc`, or an `oct` key from a remote JWKS).
    Skip(String),
}

/// Parses a JWK. `Err` is a human-readable reason naming the offending field.
pub(crate) fn parse_jwk(jwk: &Value, source: &str, origin: JwkOrigin) -> Result<ParsedJwk, String> {
    let obj = jwk.as_object().ok_or_else(|| "a JWK must be a JSON object".to_string())?;
    let get_str = |field: &str| -> Result<Option<&str>, String> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("`{field}` must be a string")),
        }
    };
    let required = |field: &str| -> Result<&str, String> { get_str(field)?.ok_or_else(|| format!("`{field}` is required")) };

    let kty = required("kty")?;
    let kid = get_str("kid")?.map(str::to_string);
    if let Some(key_use) = get_str("use")? {
        if key_use != "sig" {
            return Ok(ParsedJwk::Skip(format!("`use` is {key_use:?}, not \"sig\"")));
        }
    }
    let alg = match get_str("alg")? {
        None => None,
        Some(name) => match parse_alg(name) {
            Some(a) => Some(a),
            None => return Err(format!("unsupported `alg` {name:?}")),
        },
    };

    let (family, key, curve_alg) = match kty {
        "RSA" => {
            if origin == JwkOrigin::Inline && kid.is_none() {
                return Err("`kid` is required for RSA keys".to_string());
            }
            let n = b64url_decode(required("n")?).ok_or("`n` is not valid base64url")?;
            let e = b64url_decode(required("e")?).ok_or("`e` is not valid base64url")?;
            if n.is_empty() || e.is_empty() {
                return Err("`n` and `e` must not be empty".to_string());
            }
            (Family::Rsa, DecodingKey::from_rsa_raw_components(&n, &e), None)
        }
        "EC" => {
            let crv = required("crv")?;
            let (size, curve_alg) = match crv {
                "P-256" => (32, Algorithm::ES256),
                "P-384" => (48, Algorithm::ES384),
                other => return Err(format!("unsupported EC curve `crv` {other:?}")),
            };
            let x = b64url_decode(required("x")?).ok_or("`x` is not valid base64url")?;
            let y = b64url_decode(required("y")?).ok_or("`y` is not valid base64url")?;
            if x.len() != size || y.len() != size {
                return Err(format!("`x` and `y` must be {size} bytes each for curve {crv}"));
            }
            if let Some(a) = alg {
                if a != curve_alg {
                    return Err(format!("`alg` {} does not match curve {crv}", alg_name(a)));
                }
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (Family::Ec, DecodingKey::from_ec_der(&point), Some(curve_alg))
        }
        "OKP" => {
            let crv = required("crv")?;
            if crv != "Ed25519" {
                return Err(format!("unsupported OKP curve `crv` {crv:?} (only Ed25519)"));
            }
            let x = b64url_decode(required("x")?).ok_or("`x` is not valid base64url")?;
            if x.len() != 32 {
                return Err("`x` must be 32 bytes for Ed25519".to_string());
            }
            (Family::Okp, DecodingKey::from_ed_der(&x), None)
        }
        "oct" => {
            if origin == JwkOrigin::Remote {
                return Ok(ParsedJwk::Skip("symmetric (oct) keys are not taken from a remote JWKS".to_string()));
            }
            if alg.is_none() {
                return Err("`alg` is required for oct keys (HS256, HS384 or HS512)".to_string());
            }
            let k = b64url_decode(required("k")?).ok_or("`k` is not valid base64url")?;
            if k.is_empty() {
                return Err("`k` must not be empty".to_string());
            }
            (Family::Hmac, DecodingKey::from_secret(&k), None)
        }
        other => return Err(format!("unsupported key type `kty` {other:?}")),
    };

    if let Some(a) = alg {
        if alg_family(a) != Some(family) {
            return Err(format!("`alg` {} cannot be used with a {} key", alg_name(a), family.kty()));
        }
    }

    Ok(ParsedJwk::Key(KeySpec {
        kid,
        alg,
        family,
        curve_alg,
        key,
        source: source.to_string(),
        audience: None,
        max_lifetime_secs: None,
    }))
}

// ---------------------------------------------------------------------------------------------
// IP filtering for jwks_uri hosts
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum IpRule {
    /// `local`: loopback, private, link-local, unique-local, unspecified.
    Local,
    Net(IpAddr, u8),
}

/// `jwks_reject_ip_ranges` / `block_local_jwks`.
#[derive(Debug, Clone, Default)]
pub(crate) struct IpPolicy {
    rules: Vec<(String, IpRule)>,
    block_ipv6: bool,
}

impl IpPolicy {
    pub fn new(ranges: &[String], block_local: bool) -> Result<IpPolicy, String> {
        let mut rules = Vec::new();
        for r in ranges {
            let rule = parse_ip_rule(r).ok_or_else(|| {
                format!("invalid IP range {r:?} in client_auth.jwks_reject_ip_ranges (expected a CIDR like 10.0.0.0/8, an IP, or 'local')")
            })?;
            rules.push((r.clone(), rule));
        }
        if block_local {
            rules.push(("local (block_local_jwks)".to_string(), IpRule::Local));
        }
        Ok(IpPolicy {
            rules,
            block_ipv6: block_local,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && !self.block_ipv6
    }

    /// Returns an error if `ip` may not be contacted.
    fn check(&self, ip: IpAddr, uri: &str) -> Result<(), ServiceError> {
        if self.block_ipv6 && ip.is_ipv6() {
            return Err(ServiceError::unauthorized(
                "PSYNC_S2202",
                format!("IPv6 is not supported for the JWKS URI {uri} (resolved to {ip}; block_local_jwks is enabled)"),
            ));
        }
        for (label, rule) in &self.rules {
            let hit = match rule {
                IpRule::Local => is_local_ip(ip),
                IpRule::Net(net, prefix) => ip_in_net(ip, *net, *prefix),
            };
            if hit {
                return Err(ServiceError::unauthorized(
                    "PSYNC_S2203",
                    format!(
                        "IPs in this range are not supported: the JWKS URI {uri} resolved to {ip}, which is in the rejected range {label}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn parse_ip_rule(s: &str) -> Option<IpRule> {
    let s = s.trim();
    if s == "local" {
        return Some(IpRule::Local);
    }
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
        None => max,
    };
    Some(IpRule::Net(ip, prefix))
}

fn ip_in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let ip = match (ip, net) {
        (IpAddr::V6(v6), IpAddr::V4(_)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => return false,
        },
        _ => ip,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        _ => false,
    }
}

fn is_local_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64.0.0/10 (carrier-grade NAT)
                || ip_in_net(ip, IpAddr::V4([100, 64, 0, 0].into()), 10)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_local_ip(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                // fc00::/7 unique local, fe80::/10 link local
                || ip_in_net(ip, IpAddr::V6("fc00::".parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)), 7)
                || ip_in_net(ip, IpAddr::V6("fe80::".parse().unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)), 10)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Remote JWKS
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refresh {
    /// Fetch if never fetched or older than 5 minutes.
    IfStale,
    /// The token's `kid` is unknown: fetch unless fetched within the last 30 s.
    UnknownKid,
}

#[derive(Default)]
struct RemoteState {
    keys: Arc<Vec<Arc<KeySpec>>>,
    last_success: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<ServiceError>,
}

pub(crate) struct RemoteJwks {
    pub uri: String,
    state: tokio::sync::Mutex<RemoteState>,
}

impl RemoteJwks {
    pub fn new(uri: String) -> RemoteJwks {
        RemoteJwks {
            uri,
            state: tokio::sync::Mutex::new(RemoteState::default()),
        }
    }

    /// Current keys (refreshing according to `refresh`) and the error of the last fetch if
    /// it failed.
    pub async fn keys(
        &self,
        client: &reqwest::Client,
        ip_policy: &IpPolicy,
        refresh: Refresh,
        unknown_kid_interval: Duration,
    ) -> (Arc<Vec<Arc<KeySpec>>>, Option<ServiceError>) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        let should_fetch = match refresh {
            Refresh::IfStale => {
                let stale = since(state.last_success).is_none_or(|age| age >= MAX_KEY_AGE);
                let may_retry = state.last_error.is_none() || since(state.last_attempt).is_none_or(|d| d >= FAILED_FETCH_RETRY_INTERVAL);
                stale && may_retry
            }
            Refresh::UnknownKid => since(state.last_attempt).is_none_or(|d| d >= unknown_kid_interval),
        };
        if should_fetch {
            state.last_attempt = Some(now);
            match self.fetch(client, ip_policy).await {
                Ok(keys) => {
                    state.keys = Arc::new(keys);
                    state.last_success = Some(Instant::now());
                    state.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(uri = %self.uri, error = %e, "JWKS fetch failed");
                    // Keep the previously fetched keys, if any.
                    state.last_error = Some(e);
                }
            }
        }
        (state.keys.clone(), state.last_error.clone())
    }

    async fn fetch(&self, client: &reqwest::Client, ip_policy: &IpPolicy) -> Result<Vec<Arc<KeySpec>>, ServiceError> {
        let uri = &self.uri;
        let fail = |msg: String| ServiceError::unauthorized("PSYNC_S2204", format!("JWKS request to {uri} failed: {msg}"));
        if !ip_policy.is_empty() {
            check_host(uri, ip_policy).await?;
        }
        let response = client
            .get(uri)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP status {status}")));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| fail(format!("invalid JSON response: {}", error_chain(&e))))?;
        let keys = body
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("response is not a JWKS (missing `keys` array)".to_string()))?;
        let mut out = Vec::new();
        for (i, jwk) in keys.iter().enumerate() {
            let source = format!("{uri} keys[{i}]");
            match parse_jwk(jwk, &source, JwkOrigin::Remote) {
                Ok(ParsedJwk::Key(k)) => out.push(Arc::new(k)),
                Ok(ParsedJwk::Skip(reason)) => {
                    tracing::debug!(%source, %reason, "JWK skipped");
                }
                Err(reason) => {
                    tracing::warn!(%source, %reason, "invalid JWK in remote JWKS ignored");
                }
            }
        }
        Ok(out)
    }
}

async fn check_host(uri: &str, policy: &IpPolicy) -> Result<(), ServiceError> {
    let bad = |msg: String| ServiceError::unauthorized("PSYNC_S2204", format!("JWKS request to {uri} failed: {msg}"));
    let url = reqwest::Url::parse(uri).map_err(|e| bad(format!("invalid URL: {e}")))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let host = url.host_str().ok_or_else(|| bad("URL has no host".to_string()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return policy.check(ip, uri);
    }
    let addrs = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| bad(format!("could not resolve {bare}: {e}")))?;
    for addr in addrs {
        policy.check(addr.ip(), uri)?;
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_rules() {
        let p = IpPolicy::new(&["10.0.0.0/8".to_string(), "::1".to_string()], false).unwrap();
        assert!(p.check("10.1.2.3".parse().unwrap(), "u").is_err());
        assert!(p.check("11.1.2.3".parse().unwrap(), "u").is_ok());
        assert!(p.check("::1".parse().unwrap(), "u").is_err());
        let p = IpPolicy::new(&["local".to_string()], false).unwrap();
        assert!(p.check("127.0.0.1".parse().unwrap(), "u").is_err());
        assert!(p.check("192.168.1.1".parse().unwrap(), "u").is_err());
        assert!(p.check("8.8.8.8".parse().unwrap(), "u").is_ok());
        assert!(p.check("fd00::1".parse().unwrap(), "u").is_err());
        let p = IpPolicy::new(&[], true).unwrap();
        assert_eq!(p.check("2001:db8::1".parse().unwrap(), "u").unwrap_err().code, "PSYNC_S2202");
        assert!(IpPolicy::new(&["10.0.0.0/33".to_string()], false).is_err());
    }
}
