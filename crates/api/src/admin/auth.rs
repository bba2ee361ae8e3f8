//! Admin API authorization: `Authorization: Bearer <t>` or `Token <t>` with `t` one of
//! `api.tokens`. Tokens are compared as SHA-256 digests in constant time, so neither a token's
//! content nor its length leaks through response timing.

use crate::error::ServiceError;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};

/// The configured admin tokens (digests only).
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
}

impl ApiTokens {
    pub fn new(tokens: &[String]) -> ApiTokens {
        ApiTokens {
            digests: tokens.iter().map(|t| digest(t)).collect(),
        }
    }

    /// `Ok` when the request carries a configured token; else the reference's 401.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ServiceError> {
        if self.digests.is_empty() {
            return Err(refused(
                "Authentication disabled: no api.tokens are configured, so every admin route is refused",
            ));
        }
        let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let Some(token) = token_of(header) else {
            return Err(refused("Authentication required: send `Authorization: Bearer <api token>`"));
        };
        let given = digest(token);
        // Every configured token is compared, so timing does not tell which one was close.
        let matched = self.digests.iter().fold(false, |found, d| found | equal(d, &given));
        match matched {
            true => Ok(()),
            false => Err(refused("Authentication failed: the token is not one of api.tokens")),
        }
    }
}

/// `Token <t>` or `Bearer <t>`, `t` without whitespace (the reference's `^(Token|Bearer) (\S+)$`).
fn token_of(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let ok = matches!(scheme, "Token" | "Bearer") && !token.is_empty() && !token.chars().any(char::is_whitespace);
    ok.then_some(token)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refused(details: &str) -> ServiceError {
    ServiceError::unauthorized("PSYNC_S2101", "Authorization failed").with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).expect("header"));
        h
    }

    fn details(r: Result<(), ServiceError>) -> String {
        r.err()
            .map(|e| format!("{} {} {}", e.status, e.code, e.details.unwrap_or_default()))
            .unwrap_or_default()
    }

    #[test]
    fn tokens_schemes_and_refusals() {
        let tokens = ApiTokens::new(&["secret-1".into(), "secret-2".into()]);
        assert!(tokens.authorize(&with("Bearer secret-1")).is_ok());
        assert!(tokens.authorize(&with("Token secret-2")).is_ok());
        assert!(details(tokens.authorize(&HeaderMap::new())).starts_with("401 PSYNC_S2101 Authentication required"));
        assert!(details(tokens.authorize(&with("Basic secret-1"))).contains("Authentication required"));
        assert!(details(tokens.authorize(&with("Bearer secret-1 x"))).contains("Authentication required"));
        assert!(details(tokens.authorize(&with("Bearer secret-3"))).contains("Authentication failed"));
        assert!(details(tokens.authorize(&with("Bearer secret-"))).contains("Authentication failed"));
        let none = ApiTokens::new(&[]);
        assert!(details(none.authorize(&with("Bearer secret-1"))).contains("no api.tokens are configured"));
    }
}
