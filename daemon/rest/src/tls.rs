//! HTTPS for the REST API: the certificate and key of `rest.tls_cert` / `rest.tls_key`,
//! loaded into one rustls server configuration shared by every `rest.listen_tls`
//! listener, and swapped on SIGHUP ([`Tls::reload`]).
//!
//! Decisions:
//! - One certificate for every HTTPS listener (not one per listener): the names a daemon
//!   is reached by go in the certificate's SANs, and one pair of files is what a renewal
//!   tool (certbot, an ACME client, a CA's deploy hook) writes before its SIGHUP. Plain
//!   and HTTPS listeners sit side by side (`rest.listen` / `rest.listen_tls`).
//! - The certificate is chosen per handshake by a resolver holding the current
//!   [`CertifiedKey`] ([`CertSlot`]); a reload replaces that one value, so the server
//!   configuration (and its session cache) stays, new handshakes get the new certificate
//!   and connections already open keep the one they were made with.
//! - A reload that cannot read or use the files changes nothing: the old certificate
//!   stays in force and the error names the file and the cause. The daemon never falls
//!   back to plain HTTP on an HTTPS address.
//! - The certificate is parsed (x509-parser) when loaded, not only at the first
//!   handshake, so a file that is PEM but no certificate is refused at start; an
//!   expired or not yet valid one is served with a warning (refusing to start would not
//!   make it valid).
//! - TLS 1.2 and 1.3 with rustls's safe defaults (ring); ALPN offers `h2` then
//!   `http/1.1`, and a client that names neither gets HTTP/1.1 (hyper's auto builder also
//!   recognises the HTTP/2 preface).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// Why the certificate or key of `rest.tls_cert` / `rest.tls_key` cannot be used: the
/// key, the file and the cause.
#[derive(Debug, thiserror::Error)]
#[error("rest.{key} {}: {reason}", path.display())]
pub struct TlsError {
    /// `tls_cert` or `tls_key`.
    pub key: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl TlsError {
    fn cert(path: &Path, reason: impl Into<String>) -> TlsError {
        TlsError {
            key: "tls_cert",
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn key(path: &Path, reason: impl Into<String>) -> TlsError {
        TlsError {
            key: "tls_key",
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// What a loaded certificate is, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    /// Colon-separated hex bytes (`0a:1f`), as x509-parser spells it.
    pub serial: String,
    pub not_after: String,
    /// Why the certificate is not valid now (expired, not yet valid), if so.
    pub invalid_now: Option<String>,
    /// Certificates in the chain (the server's first).
    pub chain_len: usize,
}

impl std::fmt::Display for CertInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "subject {}, serial {}, valid until {}, chain of {}",
            self.subject, self.serial, self.not_after, self.chain_len
        )
    }
}

/// The certificate handed to each new handshake; replaced whole by a reload.
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The HTTPS side of the REST server: the acceptor every `rest.listen_tls` listener
/// uses, and the files it was loaded from.
pub struct Tls {
    acceptor: TlsAcceptor,
    slot: Arc<CertSlot>,
    provider: Arc<CryptoProvider>,
    /// The files in force (a reload may name others, from a changed configuration).
    files: RwLock<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &*self.files())
            .finish_non_exhaustive()
    }
}

/// ALPN protocols offered, in the server's order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

impl Tls {
    /// The HTTPS configuration of `[rest]`: `None` without `listen_tls`; the certificate
    /// and key loaded (an error naming the file otherwise). The configuration's checks
    /// (`RestConfig::check`) have made sure both paths are there with `listen_tls`.
    pub fn from_config(
        cfg: &crate::config::RestConfig,
    ) -> Result<Option<(Tls, CertInfo)>, TlsError> {
        if cfg.listen_tls.is_empty() {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
            let path = PathBuf::new();
            return Err(match cfg.tls_cert {
                None => TlsError::cert(&path, "needed with rest.listen_tls"),
                Some(_) => TlsError::key(&path, "needed with rest.listen_tls"),
            });
        };
        Tls::load(cert, key).map(Some)
    }

    /// Loads `cert` and `key` (PEM) into a new server configuration.
    pub fn load(cert: &Path, key: &Path) -> Result<(Tls, CertInfo), TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (certified, info) = load_pair(cert, key, &provider)?;
        let slot = Arc::new(CertSlot(RwLock::new(Arc::new(certified))));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::cert(cert, format!("no TLS version to offer: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&slot) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok((
            Tls {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                slot,
                provider,
                files: RwLock::new((cert.to_path_buf(), key.to_path_buf())),
            },
            info,
        ))
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The certificate and key files in force.
    pub fn files(&self) -> std::sync::RwLockReadGuard<'_, (PathBuf, PathBuf)> {
        self.files.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `cert` and `key` again (SIGHUP; they may be other files than before) and
    /// serves them to every handshake from now on. On an error nothing changes: the
    /// certificate in force stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<CertInfo, TlsError> {
        let (certified, info) = load_pair(cert, key, &self.provider)?;
        self.slot.set(Arc::new(certified));
        *self.files.write().unwrap_or_else(|p| p.into_inner()) =
            (cert.to_path_buf(), key.to_path_buf());
        Ok(info)
    }
}

/// Why a connection to an HTTPS address ended before its handshake completed.
#[derive(Debug, thiserror::Error)]
pub enum Handshake {
    /// The client closed without sending anything (a port check): not counted.
    #[error("closed before sending anything")]
    Closed,
    /// It spoke plain HTTP (answered 400, `https_required`) or something else that is not
    /// TLS.
    #[error("not TLS (plain HTTP: {http})")]
    NotTls { http: bool },
    #[error("no TLS handshake within rest.tls_handshake_timeout_s")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

/// The first byte of a TLS connection: a handshake record (RFC 8446, 5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The answer to plain HTTP on an HTTPS address, before it is closed.
pub fn https_required() -> Vec<u8> {
    let body = serde_json::json!({
        "type": "https_required",
        "message": "this address serves HTTPS only (rest.listen_tls): use https://",
    })
    .to_string();
    format!(
        "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The server side of a TLS handshake on `stream`, within `timeout` from now. A client
/// that speaks plain HTTP (its first byte a letter, as a request line's method) is
/// answered [`https_required`] and closed cleanly (what it sent is read and dropped, so
/// that the close is no reset that could destroy the answer before it is read).
pub async fn handshake(
    stream: tokio::net::TcpStream,
    acceptor: &TlsAcceptor,
    timeout: std::time::Duration,
) -> Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Handshake> {
    let deadline = tokio::time::Instant::now() + timeout;
    let within = |f| tokio::time::timeout_at(deadline, f);
    let mut first = [0u8; 1];
    match within(stream.peek(&mut first)).await {
        Err(_) => return Err(Handshake::Timeout),
        Ok(Ok(0)) => return Err(Handshake::Closed),
        Ok(Err(e)) => return Err(Handshake::Failed(e)),
        Ok(Ok(_)) => {}
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        let http = first[0].is_ascii_uppercase();
        if http {
            refuse_plain(stream, deadline).await;
        }
        return Err(Handshake::NotTls { http });
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Err(_) => Err(Handshake::Timeout),
        Ok(Err(e)) => Err(Handshake::Failed(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Writes [`https_required`], ends the sending side, and reads what the client sent
/// until it closes (bounded: [`crate::conn::MAX_HEAD`] bytes, one second, `deadline`).
async fn refuse_plain(mut stream: tokio::net::TcpStream, deadline: tokio::time::Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = https_required();
    if tokio::time::timeout_at(deadline, stream.write_all(&answer))
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < crate::conn::MAX_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let bound = deadline.min(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
    let _ = tokio::time::timeout_at(bound, drain).await;
}

/// Reads a file whole; the error names it.
fn read(path: &Path, err: fn(&Path, String) -> TlsError) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(path, format!("cannot read it: {e}")))
}

/// The certificate chain of `cert` and the key of `key`, checked against each other.
fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let chain = read_chain(cert)?;
    let info = describe(&chain).map_err(|reason| TlsError::cert(cert, reason))?;
    let pem = read(key, TlsError::key)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        TlsError::key(
            key,
            match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no private key in the file (expected a PEM block PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".to_string()
                }
                e => format!(
                    "not a valid PEM file: {}",
                    connectord_core::coap::tls::pem_problem(&e)
                ),
            },
        )
    })?;
    let certified = CertifiedKey::from_der(chain, der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::key(
            key,
            format!(
                "the key does not match the certificate of rest.tls_cert {}",
                cert.display()
            ),
        ),
        e => TlsError::key(key, format!("unusable private key: {e}")),
    })?;
    Ok((certified, info))
}

/// The PEM certificates of `path`, the server's first.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, TlsError::cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError::cert(
                path,
                format!(
                    "not a valid PEM file: {}",
                    connectord_core::coap::tls::pem_problem(&e)
                ),
            )
        })?;
    if chain.is_empty() {
        return Err(TlsError::cert(
            path,
            "no certificate in the file (expected a PEM block CERTIFICATE)",
        ));
    }
    Ok(chain)
}

/// Parses every certificate of the chain; describes the first.
fn describe(chain: &[CertificateDer<'_>]) -> Result<CertInfo, String> {
    let mut info = None;
    for (i, der) in chain.iter().enumerate() {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate {} of the file cannot be parsed: {e}", i + 1))?;
        if i > 0 {
            continue;
        }
        let validity = c.validity();
        let now = x509_parser::time::ASN1Time::now();
        let invalid_now = if now > validity.not_after {
            Some(format!("expired on {}", validity.not_after))
        } else if now < validity.not_before {
            Some(format!("not valid before {}", validity.not_before))
        } else {
            None
        };
        info = Some(CertInfo {
            subject: c.subject().to_string(),
            serial: c.raw_serial_as_string(),
            not_after: validity.not_after.to_string(),
            invalid_now,
            chain_len: chain.len(),
        });
    }
    info.ok_or_else(|| "no certificate in the file".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(serial: u64, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial.to_be_bytes()));
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn loads_a_pair_and_refuses_bad_files_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair(1, dir.path(), "one");
        let (c2, k2) = pair(2, dir.path(), "two");
        let (tls, info) = Tls::load(&c1, &k1).unwrap();
        assert!(info.serial.ends_with("01"), "{info}");
        assert_eq!(info.invalid_now, None);
        let served = |t: &Tls| t.slot.current().cert[0].clone();
        let first = served(&tls);

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all").unwrap();
        let missing = dir.path().join("missing.pem");
        let cases = [
            (&garbage, &k1, "rest.tls_cert", "no certificate in the file"),
            (&missing, &k1, "rest.tls_cert", "cannot read it"),
            (&c1, &garbage, "rest.tls_key", "no private key in the file"),
            (&c1, &k2, "rest.tls_key", "does not match the certificate"),
            // A key file given as the certificate: PEM, but no certificate in it.
            (&k1, &k1, "rest.tls_cert", "no certificate in the file"),
        ];
        for (c, k, key, why) in cases {
            let e = tls.reload(c, k).unwrap_err().to_string();
            let named = if key == "rest.tls_cert" { c } else { k };
            assert!(
                e.starts_with(&format!("{key} {}: ", named.display())) && e.contains(why),
                "{e}"
            );
            assert_eq!(served(&tls), first, "the old certificate stays");
            assert!(Tls::load(c, k).is_err());
        }
        let info = tls.reload(&c2, &k2).unwrap();
        assert!(info.serial.ends_with("02"), "{info}");
        assert_ne!(served(&tls), first);
        assert_eq!(tls.files().0, c2);
    }
}
