//! TLS to Postgres (source and storage on one cluster): a cluster that only accepts TLS over
//! TCP, certificates made here with rcgen, and the real binary. With a valid CA everything works
//! as without TLS; when TLS fails at startup the service exits non-zero and names the cause.

use crate::harness::*;
use anyhow::{bail, Context, Result};
use ferrosync_testkit::{ConnTls, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use std::time::Duration;

/// A throwaway certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A server certificate for DNS name `host`, valid from 1975 to 4096 (rcgen's default)
    /// unless `expired`, when it was valid only during 2020.
    fn server_cert(&self, host: &str, expired: bool) -> Result<ServerTls> {
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            client_ca_pem: None,
        })
    }

    /// A client certificate for database user `user` (Postgres matches its CN), as (cert, key) PEM.
    fn client_cert(&self, user: &str) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// libpq's verdict (via psql) on a TLS connection to the cluster as `host` with `sslmode` and
/// `cacert`: `Ok` when it connected and the session uses TLS, else libpq's message. A control,
/// independent of the service: it shows the cluster and the certificates are what each test
/// says they are.
fn libpq_verdict(svc: &Service, host: &str, sslmode: &str, cacert: &str) -> Result<std::result::Result<(), String>> {
    let root = svc.dir.path().join("libpq-root.pem");
    std::fs::write(&root, cacert)?;
    let out = std::process::Command::new(ferrosync_testkit::find_pg_bin()?.join("psql"))
        .arg(format!(
            "host={host} port={} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={} connect_timeout=10",
            svc.cluster.port(),
            root.display()
        ))
        .args(["-X", "-A", "-t", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
        .output()
        .context("running psql")?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && stdout == "t" {
        Ok(Ok(()))
    } else {
        Ok(Err(format!("{stdout} {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// A plain (non-TLS) TCP connection to the cluster must be refused, so that nothing here can
/// pass without TLS.
async fn assert_plain_tcp_refused(svc: &Service) -> Result<()> {
    let plain = format!(
        "host=127.0.0.1 port={} user=postgres password=postgres dbname=todo sslmode=disable",
        svc.cluster.port()
    );
    match tokio_postgres::connect(&plain, tokio_postgres::NoTls).await {
        Ok(_) => bail!("the cluster accepted a non-TLS TCP connection"),
        Err(e) => {
            let msg = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
            assert!(
                msg.contains("no pg_hba.conf entry") || msg.contains("no encryption"),
                "unexpected error for a plain connection: {msg}"
            );
        }
    }
    Ok(())
}

/// Every TCP session on the cluster (the service's pools and its replication connection) uses
/// TLS, and there is at least one.
async fn assert_service_sessions_use_tls(svc: &Service) -> Result<()> {
    let db = svc.cluster.connect("postgres").await?;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*), count(*) FILTER (WHERE a.backend_type = 'walsender')
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.client_addr IS NOT NULL",
            &[],
        )
        .await?;
    let (tls, all, walsenders): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(all > 0, "no TCP sessions from the service");
    assert_eq!(tls, all, "{all} TCP sessions, only {tls} with TLS");
    assert!(walsenders > 0, "no replication connection from the service");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_syncs_todo_app_to_node_client() -> Result<()> {
    let ca = Ca::new("ferrosync test CA")?;
    let conn = ConnTls {
        sslmode: Some("verify-full"),
        cacert: Some(&ca.pem),
        ..ConnTls::default()
    };
    let mut svc = Service::with_tls(Some(ca.server_cert("localhost", false)?), "localhost", &conn).await?;
    assert_plain_tcp_refused(&svc).await?;
    if let Err(e) = libpq_verdict(&svc, "localhost", "verify-full", &ca.pem)? {
        bail!("control: libpq cannot connect with verify-full: {e}");
    }
    let db = svc.source().await?;
    seed(&db, 2, 20, &["u1", "u2"]).await?;
    svc.start().await?;

    let mut agent = NodeAgent::start()?;
    agent.call(json!({"cmd": "open", "db_path": svc.dir.path().join("client.sqlite")}))?;
    // No source_url: this test only downloads.
    agent.call(json!({"cmd": "connect", "endpoint": svc.url(), "token": token("u1"), "retry_delay_ms": 200}))?;
    agent
        .call(json!({"cmd": "wait_first_sync", "timeout_ms": 60000}))
        .with_context(|| svc.log())?;
    eventually_equal(&mut agent, &db, "u1").await.with_context(|| svc.log())?;
    assert_eq!(agent.todos()?.len(), 20);

    // A live change travels through the TLS replication connection.
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'live over tls', 'u1', id FROM lists LIMIT 1")
        .await?;
    eventually_equal(&mut agent, &db, "u1").await.with_context(|| svc.log())?;
    assert!(agent.todos()?.values().any(|d| d == "live over tls"));

    assert_service_sessions_use_tls(&svc).await?;
    let status = agent.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");
    agent.call(json!({"cmd": "close"}))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_ca_does_not_check_the_host_name() -> Result<()> {
    let ca = Ca::new("ferrosync test CA")?;
    let conn = ConnTls {
        sslmode: Some("verify-ca"),
        cacert: Some(&ca.pem),
        ..ConnTls::default()
    };
    // The certificate is for another host name: verify-full would refuse it (see below).
    let mut svc = Service::with_tls(Some(ca.server_cert("db.other.test", false)?), "localhost", &conn).await?;
    assert_plain_tcp_refused(&svc).await?;
    if let Err(e) = libpq_verdict(&svc, "localhost", "verify-ca", &ca.pem)? {
        bail!("control: libpq cannot connect with verify-ca: {e}");
    }
    if libpq_verdict(&svc, "localhost", "verify-full", &ca.pem)?.is_ok() {
        bail!("control: libpq accepted the certificate for another host with verify-full");
    }
    let db = svc.source().await?;
    seed(&db, 1, 10, &["u1"]).await?;
    svc.start().await?;

    let mut stream = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": [], "client_id": "tls-ca"}))
        .await
        .with_context(|| svc.log())?;
    let mut state = ClientState::default();
    stream
        .sync_until(&mut state, T, |s| client_todos(s).len() == 10)
        .await
        .with_context(|| svc.log())?;
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'live', 'u1', id FROM lists LIMIT 1")
        .await?;
    stream
        .sync_until(&mut state, T, |s| client_todos(s).len() == 11)
        .await
        .with_context(|| svc.log())?;
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);
    assert_service_sessions_use_tls(&svc).await?;
    Ok(())
}

const PHRASES: [&str; 3] = ["unknown CA", "host name mismatch", "certificate expired"];

/// Start the service against a TLS cluster presenting `server`, with `verify-full` and `cacert`
/// on both connections; it must exit non-zero within 20 s and its stderr must contain
/// `expected` (case-insensitive) and none of the other phrases. Err describes what went wrong.
async fn expect_startup_failure(server: ServerTls, cacert: &str, expected: &str) -> Result<()> {
    let conn = ConnTls {
        sslmode: Some("verify-full"),
        cacert: Some(cacert),
        ..ConnTls::default()
    };
    let mut svc = Service::with_tls(Some(server), "localhost", &conn).await?;
    assert_plain_tcp_refused(&svc).await?;
    match libpq_verdict(&svc, "localhost", "verify-full", cacert)? {
        Ok(()) => bail!("control: libpq accepted the connection that should fail with {expected:?}"),
        Err(e) => eprintln!("control: libpq refuses too ({expected:?} case): {e}"),
    }
    svc.spawn()?;
    let status = svc.wait_exit(Duration::from_secs(20)).await?;
    let stderr = svc.log();
    let Some(status) = status else {
        svc.kill();
        bail!("still running after 20 s; stderr:\n{stderr}");
    };
    if status.success() {
        bail!("exited successfully; stderr:\n{stderr}");
    }
    let lower = stderr.to_lowercase();
    let found: Vec<&str> = PHRASES.iter().copied().filter(|p| lower.contains(&p.to_lowercase())).collect();
    if found != [expected] {
        bail!("exited with {status}; stderr should name {expected:?} (and no other cause), names {found:?}; stderr:\n{stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_name_the_cause() -> Result<()> {
    let ca = Ca::new("ferrosync test CA")?;
    let other_ca = Ca::new("unrelated CA")?;
    let cases = [
        ("wrong CA", ca.server_cert("localhost", false)?, &other_ca.pem, "unknown CA"),
        (
            "host name mismatch",
            ca.server_cert("db.other.test", false)?,
            &ca.pem,
            "host name mismatch",
        ),
        (
            "expired certificate",
            ca.server_cert("localhost", true)?,
            &ca.pem,
            "certificate expired",
        ),
    ];
    let mut failures = Vec::new();
    for (name, server, cacert, phrase) in cases {
        if let Err(e) = expect_startup_failure(server, cacert, phrase).await {
            eprintln!("--- {name}: {e:#}\n");
            failures.push(name);
        }
    }
    if !failures.is_empty() {
        bail!("cases failed: {failures:?} (details above)");
    }
    Ok(())
}

/// A cluster that also demands a client certificate: with `client_certificate` and
/// `client_private_key` the service replicates and serves; without them it stops at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_are_presented() -> Result<()> {
    let ca = Ca::new("ferrosync test CA")?;
    let client_ca = Ca::new("ferrosync client CA")?;
    let mut server = ca.server_cert("localhost", false)?;
    server.client_ca_pem = Some(client_ca.pem.clone());
    let (cert, key) = client_ca.client_cert("postgres")?;
    let conn = ConnTls {
        sslmode: Some("verify-full"),
        cacert: Some(&ca.pem),
        client_cert: Some((&cert, &key)),
        ..ConnTls::default()
    };
    let mut svc = Service::with_tls(Some(server.clone()), "localhost", &conn).await?;
    let db = svc.source().await?;
    seed(&db, 1, 10, &["u1"]).await?;
    svc.start().await?;
    let expected = source_todos(&db, "u1").await?;
    let mut state = ClientState::default();
    let mut stream = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": []})).await?;
    stream
        .sync_until(&mut state, T, |s| client_todos(s) == expected)
        .await
        .with_context(|| svc.log())?;
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'with a client cert', 'u1', id FROM lists LIMIT 1")
        .await?;
    stream
        .sync_until(&mut state, T, |s| client_todos(s).values().any(|d| d == "with a client cert"))
        .await
        .with_context(|| svc.log())?;
    assert_service_sessions_use_tls(&svc).await?;

    let without = ConnTls {
        sslmode: Some("verify-full"),
        cacert: Some(&ca.pem),
        ..ConnTls::default()
    };
    let mut refused = Service::with_tls(Some(server), "localhost", &without).await?;
    refused.spawn()?;
    let status = refused.wait_exit(Duration::from_secs(20)).await?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "without a client certificate the start fails: {}",
        refused.log()
    );
    assert!(
        refused.log().contains("certificate"),
        "the error says a certificate is missing: {}",
        refused.log()
    );
    Ok(())
}
