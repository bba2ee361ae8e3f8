//! Postgres connection config (`replication.connections[]` with `type: postgresql`, and
//! `storage` with `type: postgresql`).

use serde_yaml_ng::Value;

use crate::error::ConfigError;
use crate::node::{as_port_number, parse_port_str, Obj, Result};

/// TLS mode of a Postgres connection. `sslmode` is never read from the URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// TLS required; certificate and host name verified (default).
    #[default]
    VerifyFull,
    /// TLS required; certificate verified against `cacert`, host name not verified.
    VerifyCa,
    /// No TLS.
    Disable,
}

impl SslMode {
    /// The config-file spelling (`verify-full`, `verify-ca`, `disable`).
    pub fn as_str(&self) -> &'static str {
        match self {
            SslMode::VerifyFull => "verify-full",
            SslMode::VerifyCa => "verify-ca",
            SslMode::Disable => "disable",
        }
    }
}

/// A normalised Postgres connection (URI merged with explicit fields, defaults applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConnectionConfig {
    /// `id`, default `default`.
    pub id: String,
    /// `tag`, default `default` (the connection tag used in `"tag.schema".table`).
    pub tag: String,
    /// `debug_api`, default false: allows the admin API's `execute-sql` on this connection.
    pub debug_api: bool,
    pub hostname: String,
    pub port: u16,
    pub database: String,
    pub username: String,
    /// Always `Some` (non-empty) after loading: the reference requires a password (S1108).
    pub password: Option<String>,
    pub sslmode: SslMode,
    /// `slot_name_prefix`, default `powersync_`.
    pub slot_name_prefix: String,
    /// `max_pool_size`, default 8.
    pub max_pool_size: usize,
    /// `connect_timeout` (seconds) or the URI's `?connect_timeout=`.
    pub connect_timeout_secs: Option<u64>,
    /// `cacert`: PEM text of the CA certificate(s) to trust instead of the public roots.
    pub cacert: Option<String>,
    /// `client_certificate` and `client_private_key` (PEM text), for servers that ask for one.
    pub client_certificate: Option<String>,
    pub client_private_key: Option<String>,
    /// `tls_servername`: the name sent (SNI) and verified instead of `hostname`.
    pub tls_servername: Option<String>,
}

impl PostgresConnectionConfig {
    /// libpq `key=value` connection string accepted by `tokio_postgres::Config::from_str`.
    ///
    /// Values are single-quoted with `\` and `'` backslash-escaped. `sslmode` is mapped to what
    /// tokio-postgres understands: `verify-full`/`verify-ca` become `require` (certificate
    /// verification is the job of the TLS connector the caller installs), `disable` stays.
    pub fn connection_string(&self) -> String {
        let mut parts = vec![
            format!("host={}", quote_value(&self.hostname)),
            format!("port={}", self.port),
            format!("dbname={}", quote_value(&self.database)),
            format!("user={}", quote_value(&self.username)),
        ];
        if let Some(password) = &self.password {
            parts.push(format!("password={}", quote_value(password)));
        }
        parts.push(format!(
            "sslmode={}",
            match self.sslmode {
                SslMode::Disable => "disable",
                SslMode::VerifyCa | SslMode::VerifyFull => "require",
            }
        ));
        if let Some(t) = self.connect_timeout_secs {
            parts.push(format!("connect_timeout={t}"));
        }
        parts.join(" ")
    }
}

fn quote_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Extra keys accepted on `storage`.
/// `compaction` is ferrosync's, read by [`crate::CompactionConfig`].
const STORAGE_KEYS: &[&str] = &["batch_limits", "default_storage_version", "compaction"];

pub(crate) enum ConnectionRole {
    Replication,
    Storage,
}

/// Parses a Postgres connection object (`type` already checked by the caller).
pub(crate) fn parse_postgres(
    value: &Value,
    path: &str,
    role: ConnectionRole,
    warnings: &mut Vec<String>,
) -> Result<PostgresConnectionConfig> {
    let mut obj = Obj::new(value, path)?;
    obj.accept(&["type", "reject_ip_ranges", "snapshot_socket_timeout", "heartbeat_interval_seconds"]);
    if matches!(role, ConnectionRole::Storage) {
        obj.accept(STORAGE_KEYS);
    }
    let uri = match obj.string("uri")? {
        Some(u) => parse_uri(&u, &obj.key_path("uri"))?,
        None => ParsedUri::default(),
    };

    let id = obj.string("id")?.unwrap_or_else(|| "default".to_string());
    let tag = obj.string("tag")?.unwrap_or_else(|| "default".to_string());
    let debug_api = obj.bool("debug_api")?.unwrap_or(false);
    let hostname = obj.string("hostname")?.or(uri.host).unwrap_or_default();

    let port_path = obj.key_path("port");
    let port_num = match obj.get("port") {
        Some(v) => as_port_number(v, &port_path)?,
        None => match &uri.port {
            Some(p) => parse_port_str(p)
                .ok_or_else(|| ConfigError::invalid(obj.key_path("uri"), format!("[PSYNC_S1109] Invalid URI - invalid port {p:?}")))?,
            None => 5432,
        },
    };
    let port = validate_port(port_num, &port_path)?;

    let database = obj.string("database")?.or(uri.database).unwrap_or_default();
    let username = obj.string("username")?.or(uri.username).unwrap_or_default();
    let password = obj.string("password")?.or(uri.password).unwrap_or_default();

    let sslmode_path = obj.key_path("sslmode");
    let sslmode = match obj.string("sslmode")?.as_deref() {
        None | Some("verify-full") => SslMode::VerifyFull,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("disable") => SslMode::Disable,
        Some(other) => {
            return Err(ConfigError::invalid(
                sslmode_path,
                format!("unsupported sslmode {other:?} (expected verify-full, verify-ca or disable)"),
            ))
        }
    };
    let cacert = obj.string("cacert")?;
    let client_certificate = obj.string("client_certificate")?;
    let client_private_key = obj.string("client_private_key")?;
    if client_certificate.is_some() != client_private_key.is_some() {
        let missing = if client_certificate.is_some() {
            "client_private_key"
        } else {
            "client_certificate"
        };
        return Err(ConfigError::invalid(
            obj.key_path(missing),
            "client_certificate and client_private_key must be given together",
        ));
    }
    let tls_servername = obj.string("tls_servername")?;
    if sslmode == SslMode::VerifyCa && cacert.is_none() {
        return Err(ConfigError::invalid(
            obj.key_path("cacert"),
            "[PSYNC_S1104] Explicit cacert is required for `sslmode: verify-ca`",
        ));
    }

    let slot_name_prefix = obj.string("slot_name_prefix")?.unwrap_or_else(|| "powersync_".to_string());
    let max_pool_size = match obj.u64("max_pool_size")? {
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => 8,
    };
    let connect_timeout_secs = match obj.u64("connect_timeout")? {
        Some(t) => Some(t),
        None => match &uri.connect_timeout {
            Some(t) => Some(
                t.trim()
                    .parse::<u64>()
                    .map_err(|_| ConfigError::invalid(obj.key_path("uri"), format!("invalid connect_timeout in URI: {t:?}")))?,
            ),
            None => None,
        },
    };

    if hostname.is_empty() {
        return Err(ConfigError::invalid(
            obj.key_path("hostname"),
            "[PSYNC_S1106] Postgres connection: hostname required",
        ));
    }
    if username.is_empty() {
        return Err(ConfigError::invalid(
            obj.key_path("username"),
            "[PSYNC_S1107] Postgres connection: username required",
        ));
    }
    if password.is_empty() {
        return Err(ConfigError::invalid(
            obj.key_path("password"),
            "[PSYNC_S1108] Postgres connection: password required",
        ));
    }
    if database.is_empty() {
        return Err(ConfigError::invalid(
            obj.key_path("database"),
            "[PSYNC_S1105] Postgres connection: database required",
        ));
    }

    obj.finish(warnings);
    Ok(PostgresConnectionConfig {
        id,
        tag,
        debug_api,
        hostname,
        port,
        database,
        username,
        password: Some(password),
        sslmode,
        slot_name_prefix,
        max_pool_size,
        connect_timeout_secs,
        cacert,
        client_certificate,
        client_private_key,
        tls_servername,
    })
}

fn validate_port(port: i64, path: &str) -> Result<u16> {
    if !(1024..=65535).contains(&port) {
        return Err(ConfigError::invalid(path, format!("Port {port} not supported")));
    }
    u16::try_from(port).map_err(|_| ConfigError::invalid(path, format!("Port {port} not supported")))
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ParsedUri {
    pub host: Option<String>,
    pub port: Option<String>,
    pub database: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Option<String>,
}

/// Parses `postgres[ql]://[user[:password]@]host[:port][/database][?params]`.
/// Components are percent-decoded; empty components are treated as absent.
pub(crate) fn parse_uri(uri: &str, path: &str) -> Result<ParsedUri> {
    let bad = |msg: String| ConfigError::invalid(path, msg);
    let (scheme, rest) = match uri.split_once("://") {
        Some((s, r)) => (s, r),
        None => {
            let scheme = uri.split_once(':').map(|(s, _)| s).unwrap_or("");
            return Err(bad(format!(
                "[PSYNC_S1109] Invalid URI - protocol must be postgresql, got {scheme:?}"
            )));
        }
    };
    let lower = scheme.to_ascii_lowercase();
    if lower != "postgresql" && lower != "postgres" {
        return Err(bad(format!(
            "[PSYNC_S1109] Invalid URI - protocol must be postgresql, got {scheme:?}"
        )));
    }
    let rest = rest.split_once('#').map(|(r, _)| r).unwrap_or(rest);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, db_path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };

    let mut out = ParsedUri::default();
    let decode = |s: &str, what: &str| -> Result<Option<String>> {
        let d = percent_decode(s).ok_or_else(|| bad(format!("[PSYNC_S1109] Invalid URI - bad percent-encoding in {what}")))?;
        Ok(if d.is_empty() { None } else { Some(d) })
    };

    if let Some(userinfo) = userinfo {
        let (user, pass) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        out.username = decode(user, "username")?;
        if let Some(p) = pass {
            out.password = decode(p, "password")?;
        }
    }

    let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
        match after.split_once(']') {
            Some((h, tail)) => {
                let port = match tail.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if tail.is_empty() => None,
                    None => return Err(bad("[PSYNC_S1109] Invalid URI - malformed IPv6 host".to_string())),
                };
                (h, port)
            }
            None => return Err(bad("[PSYNC_S1109] Invalid URI - malformed IPv6 host".to_string())),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    out.host = decode(host, "host")?;
    out.port = port.filter(|p| !p.is_empty()).map(str::to_string);
    if let Some(db) = db_path {
        out.database = decode(db, "database")?;
    }
    if let Some(query) = query {
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == "connect_timeout" {
                out.connect_timeout = decode(v, "connect_timeout")?;
            }
        }
    }
    Ok(out)
}

/// Decodes `%XX` escapes; `None` for malformed escapes or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parts() {
        let u = parse_uri(
            "postgres://us%40er:p%3Ass@db.example.com:5433/my%20db?sslmode=require&connect_timeout=7",
            "x",
        )
        .unwrap();
        assert_eq!(u.username.as_deref(), Some("us@er"));
        assert_eq!(u.password.as_deref(), Some("p:ss"));
        assert_eq!(u.host.as_deref(), Some("db.example.com"));
        assert_eq!(u.port.as_deref(), Some("5433"));
        assert_eq!(u.database.as_deref(), Some("my db"));
        assert_eq!(u.connect_timeout.as_deref(), Some("7"));
    }

    #[test]
    fn uri_ipv6_and_minimal() {
        let u = parse_uri("postgresql://[::1]:6000/db", "x").unwrap();
        assert_eq!(u.host.as_deref(), Some("::1"));
        assert_eq!(u.port.as_deref(), Some("6000"));
        let u = parse_uri("postgresql:///", "x").unwrap();
        assert_eq!(u, ParsedUri::default());
    }

    #[test]
    fn uri_bad() {
        assert!(parse_uri("mysql://a@b/c", "x").is_err());
        assert!(parse_uri("localhost:5432", "x").is_err());
        assert!(parse_uri("postgres://u:%zz@h/d", "x").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_value(r"a'b\c d"), r"'a\'b\\c d'");
    }
}
