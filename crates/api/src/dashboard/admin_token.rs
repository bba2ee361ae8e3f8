//! The admin token check of the dashboard's routes (`Authorization: Bearer <one of api.tokens>`).
//!
//! Interim: the admin API brings its own bearer-token middleware; at merge this function is
//! replaced by it and the dashboard routes sit behind that instead.

use crate::error::ServiceError;
use axum::http::{header, HeaderMap};

/// Ok when `headers` carry `Bearer <token>` (or `Token <token>`) with one of `tokens`. No
/// configured token means no admin access at all, rather than open access.
pub fn authorize(tokens: &[String], headers: &HeaderMap) -> Result<(), ServiceError> {
    if tokens.is_empty() {
        return Err(ServiceError::unauthorized(
            "PSYNC_S2101",
            "Admin API disabled: no api.tokens in the config",
        ));
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ServiceError::unauthorized("PSYNC_S2106", "Authentication required: no admin token"))?;
    let given = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("Token "))
        .ok_or_else(|| ServiceError::unauthorized("PSYNC_S2106", "Authorization must be `Bearer <admin token>`"))?
        .trim();
    if tokens.iter().any(|t| same(t.as_bytes(), given.as_bytes())) {
        Ok(())
    } else {
        Err(ServiceError::unauthorized(
            "PSYNC_S2101",
            "Authentication required: the admin token is not accepted",
        ))
    }
}

/// Compares without stopping at the first difference, so response times say nothing about
/// how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        headers
    }

    #[test]
    fn only_a_configured_token_is_accepted() {
        let tokens = vec!["secret-1".to_string(), "secret-2".to_string()];
        assert!(authorize(&tokens, &with_auth("Bearer secret-2")).is_ok());
        assert!(authorize(&tokens, &with_auth("Token secret-1")).is_ok());
        assert_eq!(
            authorize(&tokens, &with_auth("Bearer secret-3")).map_err(|e| e.code),
            Err("PSYNC_S2101")
        );
        assert_eq!(
            authorize(&tokens, &with_auth("Bearer secret")).map_err(|e| e.code),
            Err("PSYNC_S2101")
        );
        assert_eq!(authorize(&tokens, &with_auth("secret-1")).map_err(|e| e.code), Err("PSYNC_S2106"));
        assert_eq!(authorize(&tokens, &HeaderMap::new()).map_err(|e| e.code), Err("PSYNC_S2106"));
    }

    #[test]
    fn no_configured_token_means_no_access() {
        let e = authorize(&[], &with_auth("Bearer anything")).expect_err("refused");
        assert_eq!((e.code, e.status), ("PSYNC_S2101", 401));
        assert!(e.description.contains("api.tokens"), "{}", e.description);
    }
}
