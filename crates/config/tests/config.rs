use std::collections::HashMap;
use std::path::Path;

use ferrosync_config::{
    load_config_file, load_config_str, ConfigError, ConfigFormat, LoadedConfig, LogFormat, LogLevel, LoggingConfig, ProbesConfig, SslMode,
};

fn no_env(_: &str) -> Option<String> {
    None
}

fn env_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name| map.get(name).cloned()
}

fn load_yaml(text: &str) -> Result<LoadedConfig, ConfigError> {
    load_config_str(text, ConfigFormat::Yaml, Path::new("."), &no_env)
}

fn load_yaml_env(text: &str, pairs: &[(&str, &str)]) -> Result<LoadedConfig, ConfigError> {
    let env = env_from(pairs);
    load_config_str(text, ConfigFormat::Yaml, Path::new("."), &env)
}

fn err_string(r: Result<LoadedConfig, ConfigError>) -> String {
    match r {
        Ok(c) => panic!("expected an error, got {:?}", c.config),
        Err(e) => e.to_string(),
    }
}

const STORAGE: &str = r#"
storage:
  type: postgresql
  uri: postgresql://storage_user:storage_pw@storage-host/powersync_storage
  sslmode: disable
"#;

#[test]
fn typical_powersync_yaml() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sync-config.yaml"),
        "bucket_definitions:\n  global:\n    data:\n      - SELECT * FROM lists\n",
    )
    .unwrap();
    let config_path = dir.path().join("powersync.yaml");
    std::fs::write(
        &config_path,
        r#"
# PowerSync service config
replication:
  connections:
    - type: postgresql
      uri: postgresql://postgres:s3cr%40t@pg.example.com:5433/postgres
      sslmode: disable
      debug_api: true

storage:
  type: postgresql
  uri: postgresql://storage:pw@localhost/storage_db
  sslmode: disable
  batch_limits:
    max_record_count: 1000

port: 8080

sync_config:
  path: sync-config.yaml

client_auth:
  jwks:
    keys:
      - kty: oct
        alg: HS256
        kid: powersync-dev
        k: c2VjcmV0
  audience: ['powersync-dev', 'powersync']

api:
  tokens:
    - use_a_better_token_in_production
  parameters:
    max_buckets_per_connection: 2000

metadata:
  owner: me
healthcheck:
  probes:
    use_http: true
system:
  logging:
    level: debug
telemetry:
  disable_telemetry_sharing: true
  prometheus_port: 9464
"#,
    )
    .unwrap();

    let loaded = load_config_file(&config_path, &no_env).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;

    let repl = c.replication.expect("replication");
    assert_eq!(repl.id, "default");
    assert_eq!(repl.tag, "default");
    assert_eq!(repl.hostname, "pg.example.com");
    assert_eq!(repl.port, 5433);
    assert_eq!(repl.database, "postgres");
    assert_eq!(repl.username, "postgres");
    assert_eq!(repl.password.as_deref(), Some("s3cr@t"));
    assert_eq!(repl.sslmode, SslMode::Disable);
    assert_eq!(repl.slot_name_prefix, "powersync_");
    assert_eq!(repl.max_pool_size, 8);
    assert_eq!(repl.connect_timeout_secs, None);
    assert!(repl.debug_api);
    assert!(!c.storage.debug_api);

    assert_eq!(c.storage.hostname, "localhost");
    assert_eq!(c.storage.port, 5432);
    assert_eq!(c.storage.database, "storage_db");

    assert_eq!(c.port, 8080);
    assert_eq!(c.bind_address, "0.0.0.0");

    let sync = c.sync_config.expect("sync config");
    assert!(sync.content.contains("bucket_definitions"));
    assert_eq!(sync.path, Some(dir.path().join("sync-config.yaml")));
    assert!(sync.exit_on_error);

    assert_eq!(c.client_auth.jwks_keys.len(), 1);
    assert_eq!(c.client_auth.jwks_keys[0]["kid"], "powersync-dev");
    assert_eq!(c.client_auth.jwks_keys[0]["k"], "c2VjcmV0");
    assert_eq!(c.client_auth.audience, vec!["powersync-dev", "powersync"]);
    assert!(c.client_auth.jwks_uri.is_empty());
    assert!(!c.client_auth.supabase);

    assert_eq!(c.api.tokens, vec!["use_a_better_token_in_production"]);
    assert_eq!(c.api.parameters.max_buckets_per_connection, 2000);
    assert_eq!(c.api.parameters.max_concurrent_connections, 200);
    assert_eq!(c.api.parameters.max_parameter_query_results, 1000);
    assert_eq!(c.api.parameters.checkpoint_request_retention_minutes, 60);
    assert_eq!(c.telemetry.prometheus_port, Some(9464));
    assert!(!c.migrations.disable_auto_migration);
    assert_eq!(c.logging.level, Some(LogLevel::Debug));
    assert_eq!(c.logging.format, LogFormat::Text);
    // `probes` present: options not given are off, legacy included.
    assert_eq!(
        c.probes,
        ProbesConfig {
            use_http: true,
            use_filesystem: false,
            use_legacy: false
        }
    );
    assert!(c.probes.http() && !c.probes.filesystem());
}

#[test]
fn system_logging_level_and_format() {
    let c = load_yaml(&format!("{STORAGE}system:\n  logging:\n    level: verbose\n    format: json\n")).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(
        c.config.logging,
        LoggingConfig {
            level: Some(LogLevel::Verbose),
            format: LogFormat::Json
        }
    );
    let e = err_string(load_yaml(&format!("{STORAGE}system:\n  logging:\n    level: loud\n")));
    assert!(
        e.contains("system.logging.level") && e.contains("\"loud\"") && e.contains("silly"),
        "{e}"
    );
    let e = err_string(load_yaml(&format!("{STORAGE}system:\n  logging:\n    format: xml\n")));
    assert!(e.contains("system.logging.format") && e.contains("json or text"), "{e}");
    let c = load_yaml(&format!("{STORAGE}system:\n  logging:\n    colour: true\n")).unwrap();
    assert_eq!(c.warnings, vec!["unknown key `system.logging.colour` ignored".to_string()]);
}

#[test]
fn defaults_with_minimal_config() {
    let c = load_yaml(STORAGE).unwrap().config;
    assert!(c.replication.is_none());
    assert!(c.sync_config.is_none());
    assert_eq!(c.port, 8080);
    assert_eq!(c.storage.username, "storage_user");
    assert_eq!(c.storage.password.as_deref(), Some("storage_pw"));
    assert_eq!(c.client_auth, Default::default());
    assert_eq!(c.api, Default::default());
    assert_eq!(c.telemetry.prometheus_port, None);
    assert_eq!(c.logging, LoggingConfig::default());
    // No `healthcheck.probes`: the legacy probes, HTTP and files.
    assert!(c.probes.use_legacy && c.probes.http() && c.probes.filesystem());
}

#[test]
fn explicit_fields_override_uri() {
    let c = load_yaml(
        r#"
storage:
  type: postgresql
  uri: postgres://u:p@h:6000/db?connect_timeout=12&sslmode=disable
  hostname: other-host
  username: other_user
  port: "7000"
  max_pool_size: 3
  slot_name_prefix: ps_
  id: main
  tag: tagged
"#,
    )
    .unwrap()
    .config;
    let s = c.storage;
    assert_eq!(s.hostname, "other-host");
    assert_eq!(s.username, "other_user");
    assert_eq!(s.password.as_deref(), Some("p"));
    assert_eq!(s.database, "db");
    assert_eq!(s.port, 7000);
    assert_eq!(s.connect_timeout_secs, Some(12));
    // sslmode is never taken from the URI
    assert_eq!(s.sslmode, SslMode::VerifyFull);
    assert_eq!(s.max_pool_size, 3);
    assert_eq!(s.slot_name_prefix, "ps_");
    assert_eq!(s.id, "main");
    assert_eq!(s.tag, "tagged");
}

#[test]
fn json_form() {
    let text = r#"{
      "replication": {"connections": [{"type": "postgresql", "hostname": "db", "port": 5432,
         "database": "app", "username": "u", "password": "p", "sslmode": "verify-ca", "cacert": "PEM"}]},
      "storage": {"type": "postgresql", "uri": "postgresql://s:t@st/sdb"},
      "port": "9090",
      "bind_address": "127.0.0.1",
      "sync_rules": {"content": "bucket_definitions: {}", "exit_on_error": false},
      "client_auth": {"jwks_uri": "https://example.com/.well-known/jwks.json", "audience": ["a"],
         "supabase": true, "supabase_jwt_secret": "shh", "block_local_jwks": true,
         "jwks_reject_ip_ranges": ["local", "10.0.0.0/8"]},
      "migrations": {"disable_auto_migration": true}
    }"#;
    for format in [ConfigFormat::Json, ConfigFormat::Auto, ConfigFormat::Yaml] {
        let loaded = load_config_str(text, format, Path::new("."), &no_env).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = loaded.config;
        let repl = c.replication.unwrap();
        assert_eq!(repl.hostname, "db");
        assert_eq!(repl.sslmode, SslMode::VerifyCa);
        assert_eq!(c.port, 9090);
        assert_eq!(c.bind_address, "127.0.0.1");
        let sync = c.sync_config.unwrap();
        assert_eq!(sync.content, "bucket_definitions: {}");
        assert_eq!(sync.path, None);
        assert!(!sync.exit_on_error);
        assert_eq!(c.client_auth.jwks_uri, vec!["https://example.com/.well-known/jwks.json"]);
        assert!(c.client_auth.supabase);
        assert_eq!(c.client_auth.supabase_jwt_secret.as_deref(), Some("shh"));
        assert!(c.client_auth.block_local_jwks);
        assert_eq!(c.client_auth.jwks_reject_ip_ranges, vec!["local", "10.0.0.0/8"]);
        assert!(c.migrations.disable_auto_migration);
    }
}

#[test]
fn json_file_extension_and_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, "{\"storage\": ").unwrap();
    let err = load_config_file(&p, &no_env).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { format: "JSON", .. }), "{err}");

    let missing = load_config_file(&dir.path().join("nope.yaml"), &no_env).unwrap_err();
    assert!(matches!(missing, ConfigError::Io { .. }), "{missing}");
}

#[test]
fn env_substitution() {
    let text = r#"
replication:
  connections:
    - type: postgresql
      hostname: !env PS_PG_HOST
      port: !env PS_PG_PORT::number
      database: !env PS_PG_DB::string
      username: postgres
      password: !env PS_PG_PASSWORD
storage:
  type: postgresql
  uri: !env PS_STORAGE_URI
port: !env PS_PORT::number
migrations:
  disable_auto_migration: !env PS_NO_MIGRATE::boolean
"#;
    let c = load_yaml_env(
        text,
        &[
            ("PS_PG_HOST", "pg.internal"),
            ("PS_PG_PORT", "6543"),
            ("PS_PG_DB", "12345"),
            ("PS_PG_PASSWORD", "pa ss"),
            ("PS_STORAGE_URI", "postgresql://a:b@c/d"),
            ("PS_PORT", "8181"),
            ("PS_NO_MIGRATE", "TRUE"),
        ],
    )
    .unwrap()
    .config;
    let repl = c.replication.unwrap();
    assert_eq!(repl.hostname, "pg.internal");
    assert_eq!(repl.port, 6543);
    assert_eq!(repl.database, "12345");
    assert_eq!(repl.password.as_deref(), Some("pa ss"));
    assert_eq!(c.storage.hostname, "c");
    assert_eq!(c.port, 8181);
    assert!(c.migrations.disable_auto_migration);
}

#[test]
fn env_substitution_errors() {
    let base = format!("{STORAGE}port: !env PS_PORT::number\n");

    let e = err_string(load_yaml_env(&base, &[]));
    assert!(e.starts_with("port: "), "{e}");
    assert!(e.contains("\"PS_PORT\" which is undefined"), "{e}");

    let e = err_string(load_yaml_env(&base, &[("PS_PORT", "80a")]));
    assert!(e.contains("is not a valid number"), "{e}");

    let e = err_string(load_yaml_env(
        &format!("{STORAGE}migrations:\n  disable_auto_migration: !env PS_FLAG::boolean\n"),
        &[("PS_FLAG", "yes")],
    ));
    assert!(e.starts_with("migrations.disable_auto_migration: "), "{e}");
    assert!(e.contains("is not a boolean"), "{e}");

    let e = err_string(load_yaml_env(&format!("{STORAGE}bind_address: !env HOME\n"), &[("HOME", "/root")]));
    assert!(e.starts_with("bind_address: "), "{e}");
    assert!(e.contains("starting with \"PS_\""), "{e}");

    let e = err_string(load_yaml_env(
        &format!("{STORAGE}bind_address: !env PS_X::date\n"),
        &[("PS_X", "1")],
    ));
    assert!(e.contains("invalid type suffix"), "{e}");

    // A number substituted where a string is required is a type error.
    let e = err_string(load_yaml_env(
        &format!("{STORAGE}bind_address: !env PS_X::number\n"),
        &[("PS_X", "1")],
    ));
    assert!(e.contains("bind_address: expected a string"), "{e}");
}

#[test]
fn sync_config_and_sync_rules_conflict() {
    let e = err_string(load_yaml(&format!(
        "{STORAGE}sync_config:\n  content: a\nsync_rules:\n  content: b\n"
    )));
    assert!(e.contains("Both `sync_config` and `sync_rules` are present"), "{e}");
}

#[test]
fn sync_config_sources() {
    // Deprecated alias alone works.
    let c = load_yaml(&format!("{STORAGE}sync_rules:\n  content: 'x: 1'\n")).unwrap().config;
    assert_eq!(c.sync_config.unwrap().content, "x: 1");

    // Base64 env var wins over the file.
    let env = [("POWERSYNC_SYNC_CONFIG_B64", "eTogMg==")]; // "y: 2"
    let c = load_yaml_env(&format!("{STORAGE}sync_config:\n  content: 'x: 1'\n  exit_on_error: false\n"), &env)
        .unwrap()
        .config;
    let s = c.sync_config.unwrap();
    assert_eq!(s.content, "y: 2");
    assert!(!s.exit_on_error);

    // Deprecated env var, no sync_config in the file.
    let c = load_yaml_env(STORAGE, &[("POWERSYNC_SYNC_RULES_B64", "eTogMg==")]).unwrap().config;
    assert_eq!(c.sync_config.unwrap().content, "y: 2");

    // Missing file names the key.
    let e = err_string(load_yaml(&format!("{STORAGE}sync_config:\n  path: does-not-exist.yaml\n")));
    assert!(e.starts_with("sync_config.path: "), "{e}");
}

#[test]
fn bad_port() {
    let e = err_string(load_yaml(
        r#"
replication:
  connections:
    - type: postgresql
      uri: postgresql://u:p@h/db
      port: 99
storage:
  type: postgresql
  uri: postgresql://u:p@h/db
"#,
    ));
    assert_eq!(e, "replication.connections[0].port: Port 99 not supported");

    let e = err_string(load_yaml(&format!("{STORAGE}port: 70000\n")));
    assert!(e.starts_with("port: "), "{e}");
    let e = err_string(load_yaml(&format!("{STORAGE}port: eighty\n")));
    assert!(e.starts_with("port: "), "{e}");
}

#[test]
fn bad_uri_scheme() {
    let e = err_string(load_yaml(
        r#"
storage:
  type: postgresql
  uri: mysql://u:p@h/db
"#,
    ));
    assert!(e.starts_with("storage.uri: "), "{e}");
    assert!(e.contains("PSYNC_S1109"), "{e}");
    assert!(!e.contains("u:p"), "credentials must not leak: {e}");
}

#[test]
fn required_fields_after_merge() {
    let e = err_string(load_yaml("storage:\n  type: postgresql\n  uri: postgresql://u:p@h\n"));
    assert!(e.contains("PSYNC_S1105") && e.starts_with("storage.database"), "{e}");
    let e = err_string(load_yaml("storage:\n  type: postgresql\n  uri: postgresql://u:p@/db\n"));
    assert!(e.contains("PSYNC_S1106"), "{e}");
    let e = err_string(load_yaml("storage:\n  type: postgresql\n  uri: postgresql://h/db\n"));
    assert!(e.contains("PSYNC_S1107"), "{e}");
    let e = err_string(load_yaml("storage:\n  type: postgresql\n  uri: postgresql://u@h/db\n"));
    assert!(e.contains("PSYNC_S1108"), "{e}");
    let e = err_string(load_yaml("port: 8080\n"));
    assert!(e.starts_with("storage: "), "{e}");
}

#[test]
fn unsupported_sources() {
    let e = err_string(load_yaml(&format!(
        "{STORAGE}replication:\n  connections:\n    - type: mongodb\n      uri: mongodb://x\n"
    )));
    assert!(e.starts_with("replication.connections[0].type: "), "{e}");
    assert!(e.contains("not supported yet"), "{e}");

    let e = err_string(load_yaml(&format!(
        "{STORAGE}replication:\n  connections:\n    - type: postgresql\n      uri: postgresql://u:p@h/db\n    - type: postgresql\n      uri: postgresql://u:p@h/db\n"
    )));
    assert!(e.contains("Only a single replication data source is supported currently"), "{e}");

    let e = err_string(load_yaml("storage:\n  type: mongodb\n  uri: mongodb://x\n"));
    assert!(e.starts_with("storage.type: "), "{e}");

    let e = err_string(load_yaml(
        "storage:\n  type: postgresql\n  uri: postgresql://u:p@h/db\n  sslmode: verify-ca\n",
    ));
    assert!(e.contains("PSYNC_S1104"), "{e}");
}

#[test]
fn unknown_keys_warn() {
    let loaded = load_yaml(&format!(
        "{STORAGE}  extra_storage_key: 1\nclient_auth:\n  audiance: [x]\nsomething_else: true\napi:\n  parameters:\n    max_things: 3\n"
    ))
    .unwrap();
    let w = loaded.warnings;
    assert!(w.contains(&"unknown key `storage.extra_storage_key` ignored".to_string()), "{w:?}");
    assert!(w.contains(&"unknown key `client_auth.audiance` ignored".to_string()), "{w:?}");
    assert!(w.contains(&"unknown key `something_else` ignored".to_string()), "{w:?}");
    assert!(w.contains(&"unknown key `api.parameters.max_things` ignored".to_string()), "{w:?}");
    assert_eq!(w.len(), 4, "{w:?}");
}

#[test]
fn type_errors_name_the_key() {
    let e = err_string(load_yaml(&format!("{STORAGE}client_auth:\n  supabase: 'yes please'\n")));
    assert_eq!(e, "client_auth.supabase: expected a boolean, got a string");
    let e = err_string(load_yaml(&format!(
        "{STORAGE}api:\n  parameters:\n    checkpoint_request_retention_minutes: 0\n"
    )));
    assert!(e.starts_with("api.parameters.checkpoint_request_retention_minutes: "), "{e}");
    let e = err_string(load_yaml(&format!(
        "{STORAGE}client_auth:\n  jwks:\n    keys:\n      - just-a-string\n"
    )));
    assert!(e.starts_with("client_auth.jwks.keys[0]: "), "{e}");
}

#[test]
fn connection_string_escaping() {
    let c = load_yaml(
        r#"
storage:
  type: postgresql
  hostname: db.local
  port: 5433
  database: "my db"
  username: "o'brien"
  password: "p a's\\s \"q\""
  sslmode: disable
  connect_timeout: 5
"#,
    )
    .unwrap()
    .config;
    assert_eq!(c.storage.password.as_deref(), Some("p a's\\s \"q\""));
    let cs = c.storage.connection_string();
    let parsed: tokio_postgres::Config = cs.parse().unwrap();
    assert_eq!(parsed.get_hosts().len(), 1);
    assert_eq!(parsed.get_ports(), &[5433]);
    assert_eq!(parsed.get_dbname(), Some("my db"));
    assert_eq!(parsed.get_user(), Some("o'brien"));
    assert_eq!(parsed.get_password(), Some("p a's\\s \"q\"".as_bytes()));
    assert_eq!(parsed.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    assert_eq!(parsed.get_connect_timeout(), Some(&std::time::Duration::from_secs(5)));

    let c = load_yaml("storage:\n  type: postgresql\n  uri: postgresql://u:p@h/d\n")
        .unwrap()
        .config;
    let parsed: tokio_postgres::Config = c.storage.connection_string().parse().unwrap();
    assert_eq!(parsed.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
}

#[test]
fn storage_compaction_keys() {
    let loaded = load_yaml(STORAGE).unwrap();
    assert_eq!(loaded.config.compaction, ferrosync_config::CompactionConfig::default());
    assert!(loaded.config.compaction.enabled, "on by default");
    let yaml = format!("{STORAGE}  compaction:\n    enabled: false\n    interval_seconds: 60\n    pause_ms: 0\n    max_ops_per_pass: 5000\n    write_checkpoint_retention_minutes: 90\n    colour: blue\n");
    let loaded = load_yaml(&yaml).unwrap();
    let c = &loaded.config.compaction;
    assert_eq!(
        (
            c.enabled,
            c.interval_seconds,
            c.pause_ms,
            c.max_ops_per_pass,
            c.write_checkpoint_retention_minutes
        ),
        (false, 60, 0, 5000, 90)
    );
    assert_eq!(loaded.warnings, vec!["unknown key `storage.compaction.colour` ignored".to_string()]);
    let bad = format!("{STORAGE}  compaction:\n    interval_seconds: soon\n");
    assert!(err_string(load_yaml(&bad)).contains("storage.compaction.interval_seconds"));
}

#[test]
fn telemetry_otlp() {
    let c = load_yaml(&format!(
        "{STORAGE}telemetry:\n  prometheus_port: 9464\n  otlp:\n    endpoint: http://collector:4318/v1/metrics\n    protocol: json\n    interval_seconds: 5\n    headers:\n      x-api-key: k1\n"
    ))
    .expect("valid")
    .config;
    let otlp = c.telemetry.otlp.expect("otlp configured");
    assert_eq!(otlp.endpoint, "http://collector:4318/v1/metrics");
    assert_eq!(otlp.protocol, ferrosync_config::OtlpProtocol::Json);
    assert_eq!(otlp.interval_seconds, 5);
    assert_eq!(otlp.headers.get("x-api-key").map(String::as_str), Some("k1"));

    let defaults = load_yaml(&format!(
        "{STORAGE}telemetry:\n  otlp:\n    endpoint: https://otel.example/v1/metrics\n"
    ))
    .expect("valid")
    .config;
    let otlp = defaults.telemetry.otlp.expect("otlp configured");
    assert_eq!(
        (otlp.protocol, otlp.interval_seconds),
        (ferrosync_config::OtlpProtocol::Protobuf, 15)
    );

    for (otlp, expected) in [
        ("    protocol: grpc\n", "telemetry.otlp.endpoint: required"),
        ("    endpoint: collector:4318\n", "expected an http:// or https:// URL"),
        (
            "    endpoint: http://c/v1/metrics\n    protocol: grpc\n",
            "expected `protobuf` or `json`",
        ),
        (
            "    endpoint: http://c/v1/metrics\n    headers: [a]\n",
            "telemetry.otlp.headers: expected an object",
        ),
    ] {
        let e = err_string(load_yaml(&format!("{STORAGE}telemetry:\n  otlp:\n{otlp}")));
        assert!(e.contains(expected), "{e}");
    }
}
