//! TLS settings of one endpoint: a rustls client config for tokio-postgres connections, and
//! the same settings as PEM files for the replication connection (pgwire-replication reads
//! certificates from paths).

use ferrosync_config::{PostgresConnectionConfig, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

/// TLS for one endpoint (absent for `sslmode: disable`).
pub(crate) struct ClientTls {
    mode: SslMode,
    config: Arc<ClientConfig>,
    /// Name sent and verified instead of the host (`tls_servername`).
    pub servername: Option<String>,
    pem: PemFiles,
    /// `verify-ca`: a name the server's certificate is valid for, learnt on the first
    /// connection (see [`ClientTls::replication`]).
    certificate_name: Arc<Mutex<Option<String>>>,
}

/// The PEM inputs written to a private directory for the replication connection.
struct PemFiles {
    _dir: tempfile::TempDir,
    ca: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// `None` for `sslmode: disable`; an error message for unusable PEM input.
    pub fn new(cfg: &PostgresConnectionConfig) -> Result<Option<ClientTls>, String> {
        if cfg.sslmode == SslMode::Disable {
            return Ok(None);
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = Arc::new(root_store(cfg.cacert.as_deref())?);
        let builder = ClientConfig::builder().with_root_certificates(roots.clone());
        let mut config = match (&cfg.client_certificate, &cfg.client_private_key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client_certificate is not valid PEM: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| format!("client_private_key is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client_certificate / client_private_key rejected: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        let certificate_name = Arc::new(Mutex::new(None));
        if cfg.sslmode == SslMode::VerifyCa {
            let inner = WebPkiServerVerifier::builder(roots)
                .build()
                .map_err(|e| format!("cannot build a certificate verifier: {e}"))?;
            config.dangerous().set_certificate_verifier(Arc::new(ChainOnly {
                inner,
                certificate_name: certificate_name.clone(),
            }));
        }
        Ok(Some(ClientTls {
            mode: cfg.sslmode,
            config: Arc::new(config),
            servername: cfg.tls_servername.clone(),
            pem: PemFiles::write(cfg).map_err(|e| format!("cannot write TLS files for the replication connection: {e}"))?,
            certificate_name,
        }))
    }

    pub fn connector(&self) -> ServerNameConnect {
        ServerNameConnect {
            inner: MakeRustlsConnect::new((*self.config).clone()),
            servername: self.servername.clone(),
        }
    }

    /// The same settings for pgwire-replication. It refuses `verify-full` against an IP
    /// address unless a server name is given; the IP itself is what rustls verifies then.
    /// Its `verify-ca` still fails on a host name mismatch (it only tolerates the error variant
    /// older rustls versions raised), so for `verify-ca` it is given a name the certificate is
    /// valid for, learnt from an earlier connection whose chain was verified.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        let ca = self.pem.ca.clone();
        let mut tls = match self.mode {
            SslMode::VerifyCa => pgwire_replication::TlsConfig::verify_ca(ca),
            _ => pgwire_replication::TlsConfig::verify_full(ca),
        };
        let learnt = match self.mode {
            SslMode::VerifyCa => self.certificate_name.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => None,
        };
        let sni = self.servername.clone().or(learnt).unwrap_or_else(|| host.to_string());
        tls = tls.with_sni_hostname(sni);
        if let Some((cert, key)) = &self.pem.client {
            tls = tls.with_client_cert(cert.clone(), key.clone());
        }
        tls
    }
}

fn root_store(cacert: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match cacert {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cacert is not valid PEM: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err("cacert holds no usable CA certificate".into());
            }
        }
        // Like the reference (Node's bundled Mozilla roots): hosted Postgres with public CAs.
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

impl PemFiles {
    fn write(cfg: &PostgresConnectionConfig) -> std::io::Result<PemFiles> {
        let dir = tempfile::Builder::new().prefix("ferrosync-tls-").tempdir()?;
        let write = |name: &str, text: &str| -> std::io::Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let ca = cfg.cacert.as_deref().map(|pem| write("ca.pem", pem)).transpose()?;
        let client = match (&cfg.client_certificate, &cfg.client_private_key) {
            (Some(c), Some(k)) => Some((write("client.pem", c)?, write("client.key", k)?)),
            _ => None,
        };
        Ok(PemFiles { _dir: dir, ca, client })
    }
}

/// tokio-postgres TLS that sends and verifies `tls_servername` when set, else the host.
#[derive(Clone)]
pub(crate) struct ServerNameConnect {
    inner: MakeRustlsConnect,
    servername: Option<String>,
}

impl MakeTlsConnect<Socket> for ServerNameConnect {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = self.servername.clone().unwrap_or_else(|| host.to_string());
        <MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(&mut self.inner, &name)
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
    certificate_name: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, after the chain and validity period passed.
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                // A wildcard name is not a valid server name: any label under it is.
                let name = webpki::EndEntityCert::try_from(end_entity)
                    .ok()
                    .and_then(|cert| cert.valid_dns_names().next().map(|n| n.replacen('*', "replication", 1)));
                if name.is_some() {
                    *self.certificate_name.lock().unwrap_or_else(|e| e.into_inner()) = name;
                }
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
