//! `--read-https`: a CA and a server certificate for 127.0.0.1 made here (rcgen), the
//! `[rest]` lines that serve them on a free HTTPS port, and a client trusting that CA.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::CertificateDer};

/// The certificate files (in a temporary directory, removed on drop) and the client.
pub struct Https {
    dir: tempfile::TempDir,
    pub connector: TlsConnector,
}

impl Https {
    /// Makes the CA and the server certificate; the client offers `h2` (`http2`) or
    /// `http/1.1` by ALPN.
    pub fn new(http2: bool) -> Result<Https> {
        let dir = tempfile::tempdir().context("tempdir")?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
            .signed_by(&key, &issuer)?;
        std::fs::write(dir.path().join("server.crt"), cert.pem())?;
        std::fs::write(dir.path().join("server.key"), key.serialize_pem())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Ok(Https {
            dir,
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The `[rest]` lines: an HTTPS listener on a free loopback port with these files.
    pub fn rest_lines(&self) -> String {
        format!(
            "listen_tls = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            self.dir.path().join("server.crt").display(),
            self.dir.path().join("server.key").display()
        )
    }
}
