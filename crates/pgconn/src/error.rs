//! Connection errors that name the cause, in the words an operator needs.

use std::error::Error as StdError;

/// Why a Postgres connection could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgConnError {
    /// The TLS settings themselves are unusable (bad PEM, key without certificate...).
    #[error("invalid TLS settings for {endpoint}: {message}")]
    TlsSettings { endpoint: String, message: String },
    /// The TLS handshake failed; `cause` says why (unknown CA, host name mismatch, expired...).
    #[error("TLS to {endpoint} failed: {cause}")]
    Tls { endpoint: String, cause: String },
    #[error("connecting to {endpoint} timed out after {secs} s")]
    Timeout { endpoint: String, secs: u64 },
    #[error("connecting to {endpoint}: {cause}")]
    Connect { endpoint: String, cause: String },
}

impl PgConnError {
    /// Classify a failed connect: TLS failures get a cause a person can act on.
    pub(crate) fn from_connect(endpoint: &str, servername: &str, err: &(dyn StdError + 'static)) -> PgConnError {
        let chain = error_chain(err);
        match tls_cause(&chain, servername) {
            Some(cause) => PgConnError::Tls {
                endpoint: endpoint.to_string(),
                cause,
            },
            None => PgConnError::Connect {
                endpoint: endpoint.to_string(),
                cause: chain,
            },
        }
    }
}

/// `err: source: source...`, skipping repeats (wrappers often repeat their source's text).
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// What a TLS failure means, from the rustls / tokio-postgres / pgwire-replication text.
pub(crate) fn tls_cause(chain: &str, servername: &str) -> Option<String> {
    let has = |needle: &str| chain.contains(needle);
    let cause = if has("received fatal alert") {
        format!("the server refused the handshake ({chain}); if it requires a client certificate, check client_certificate / client_private_key")
    } else if has("UnknownIssuer") || has("unknown issuer") {
        "the server's certificate is signed by an unknown CA (set `cacert` to the CA that signed it)".to_string()
    } else if has("NotValidForName") || has("not valid for name") {
        format!("host name mismatch: the server's certificate is not valid for {servername:?} (connect by a name the certificate lists, or set `tls_servername`): {chain}")
    } else if has("Expired") || has("certificate expired") {
        format!("the server's certificate expired (renew it on the server): {chain}")
    } else if has("NotValidYet") || has("not valid yet") {
        format!("the server's certificate is not valid yet (check the clocks): {chain}")
    } else if has("does not support TLS") || has("SSLRequest rejected") || has("server does not support") {
        "the server does not accept TLS connections (`sslmode: disable` is only for servers without TLS)".to_string()
    } else if has("TLS handshake") || has("tls error") || has("certificate") {
        chain.to_string()
    } else {
        return None;
    };
    Some(cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_failures_are_named() {
        let unknown = "error performing TLS handshake: invalid peer certificate: UnknownIssuer";
        assert!(tls_cause(unknown, "db").is_some_and(|c| c.contains("unknown CA")));
        let name = "error performing TLS handshake: invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")";
        assert!(tls_cause(name, "127.0.0.1").is_some_and(|c| c.starts_with("host name mismatch")));
        let expired = "error performing TLS handshake: invalid peer certificate: certificate expired: verification time 1800000000 (UNIX), but certificate is not valid after 1700000000 (100000000 seconds ago)";
        assert!(tls_cause(expired, "db").is_some_and(|c| c.contains("certificate expired")));
        let refused = "error performing TLS handshake: server does not support TLS";
        assert!(tls_cause(refused, "db").is_some_and(|c| c.contains("does not accept TLS")));
        assert!(tls_cause("error connecting to server: Connection refused (os error 111)", "db").is_none());
    }

    #[test]
    fn chain_skips_repeated_text() {
        let inner = std::io::Error::other("boom");
        assert_eq!(error_chain(&inner), "boom");
    }
}
