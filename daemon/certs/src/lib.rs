//! The daemon's certificate authority, behind `POST /api/cert`.
//!
//! A device sends its domain and the public half of an EC key pair; the daemon answers with
//! a fresh endpoint name, a device certificate for that key signed by its own CA, and the CA
//! certificate (the "server certificate" the device must trust).
//!
//! # Files
//!
//! The CA lives in the state directory as `ca.key.pem` (PKCS#8, mode 0600) and `ca.cert.pem`.
//! Both are created at first start: an EC P-256 key and a self-signed certificate with the
//! subject `CN=connectord CA`, valid for ten years. Later starts load them as they are; the
//! certificate is never re-signed, so every start hands out the same CA certificate. A file
//! that cannot be read or does not match is an error naming it; nothing is replaced silently.
//! To start over with a new CA, stop the daemon and remove both files (every device
//! certificate issued so far then stops verifying).
//!
//! # Device certificates
//!
//! - endpoint name: a random version 4 UUID, lowercase with hyphens
//!   (`"0f8e3c1a-5b2d-4c7e-9a01-23456789abcd"`);
//! - subject: `OU=<domain>, CN=<endpoint name>`;
//! - validity: from one hour ago (clock skew) to ten years from now, but never past the
//!   CA certificate's own expiry;
//! - extensions: basicConstraints `CA:FALSE`, keyUsage `digitalSignature`, extendedKeyUsage
//!   `clientAuth`, subject and authority key identifiers;
//! - a random 128-bit serial number.
//!
//! # Public keys
//!
//! Only EC keys on secp256r1 (prime256v1, NIST P-256) are accepted, as a PEM
//! `SubjectPublicKeyInfo` (`-----BEGIN PUBLIC KEY-----`, what `openssl ec -pubout` writes).
//! The PEM may be indented, use `\r\n`, sit on one line, carry JSON-style escaped newlines
//! (`\n` as two characters), or use the `BEGIN PUBLICKEY` spelling of the mbed documentation.
//! Compressed points are expanded. The point must lie on the curve. Everything else
//! (RSA, other curves, certificates, private keys, garbage) is [`CertError::BadKey`] with a
//! message meant for the REST client.
//!
//! ## Other 256-bit curves
//!
//! Seed 000 says "Secp256r1 is recommended, but other 256 bit curves work as well". They are
//! refused here on purpose: a certificate is only worth issuing if the device transport can
//! later verify it, and certificate mode of CoAP over DTLS/TLS (RFC 7252 §9.1.3.3, whose
//! mandatory suite is `TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8` with ECDSA on secp256r1) is what
//! the device transports verify; secp256k1, brainpoolP256r1/t1, SM2 and FRP256v1 keys would
//! get a certificate no handshake could accept. Each of them is refused with a message that
//! names the curve and says why ([`OTHER_256_BIT_CURVES`]).

#![deny(unsafe_code)]

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::der::asn1::ObjectIdentifier;
use p256::pkcs8::der::{Tag, Tagged};
use p256::pkcs8::spki::SubjectPublicKeyInfoRef;
use p256::pkcs8::{AssociatedOid, DecodePublicKey};
use pem::{EncodeConfig, LineEnding, PemError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber,
    SignatureAlgorithm,
};
use time::OffsetDateTime;

/// File name of the CA private key inside the state directory.
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// File name of the CA certificate inside the state directory.
pub const CA_CERT_FILE: &str = "ca.cert.pem";
/// Common name of the CA certificate created at first start.
pub const CA_COMMON_NAME: &str = "connectord CA";

/// Validity of the CA certificate and of device certificates (ten years, leap days included).
const VALIDITY: Duration = Duration::from_secs((10 * 365 + 3) * 24 * 60 * 60);
/// How far in the past certificates start, for devices whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Longest accepted domain (the X.509 upper bound for an organizational unit name).
const MAX_DOMAIN_LEN: usize = 64;

/// Hint appended to public key errors.
const KEY_HINT: &str = "expected an EC public key on secp256r1 (prime256v1, NIST P-256) in PEM \
     format ('-----BEGIN PUBLIC KEY-----'), e.g. the output of 'openssl ec -in device.key -pubout'";

/// Why the CA could not be loaded or a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A CA file or the state directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A CA file exists but is unusable (corrupt, wrong kind of key, does not match the other file).
    #[error("{}: {reason}", path.display())]
    BadCaFile { path: PathBuf, reason: String },
    /// The CA certificate has expired; no useful device certificate can be issued.
    #[error(
        "{}: the CA certificate expired; remove {CA_KEY_FILE} and {CA_CERT_FILE} to create a new CA \
         (devices then need new certificates)",
        path.display()
    )]
    CaExpired { path: PathBuf },
    /// The submitted public key is unusable. The message can be shown to the REST client.
    #[error("bad public key: {0}")]
    BadKey(String),
    /// The submitted domain cannot go into a certificate. The message can be shown to the REST client.
    #[error("bad domain: {0}")]
    BadDomain(String),
    /// Certificate generation failed inside rcgen.
    #[error("certificate generation failed: {0}")]
    Rcgen(String),
}

impl CertError {
    /// True when the request was at fault (answer 400), false for server-side problems (500).
    pub fn is_bad_request(&self) -> bool {
        matches!(self, CertError::BadKey(_) | CertError::BadDomain(_))
    }
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Rcgen(e.to_string())
    }
}

/// What `POST /api/cert` hands back (next to the domain the client sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The new endpoint name (a v4 UUID); it is also the device certificate's common name.
    pub endpoint: String,
    /// The CA certificate PEM: what the device must trust to verify the server.
    pub server_certificate: String,
    /// The device certificate PEM, for the submitted public key.
    pub device_certificate: String,
    /// The device certificate's serial number, lower-case hex (the host records it, to
    /// revoke the certificate by it).
    pub serial: String,
    /// The end of the device certificate's validity (its `notAfter`), in ms since the
    /// Unix epoch.
    pub not_after_ms: u64,
}

/// A server certificate from [`CertAuthority::issue_server`], in the forms the secure
/// listeners take it.
pub struct ServerCertificate {
    /// The chain, leaf then the CA, PEM (the TLS listeners').
    pub chain_pem: String,
    /// The key, PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf alone, DER (the DTLS listeners': dimpl sends one certificate).
    pub leaf_der: Vec<u8>,
    /// The key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

/// The daemon's certificate authority (see the module documentation).
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_not_after: SystemTime,
    cert_path: PathBuf,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_path", &self.cert_path)
            .field("ca_not_after", &self.ca_not_after)
            .field("key", &"[elided]")
            .finish()
    }
}

impl CertAuthority {
    /// Loads the CA from `state_dir` (`ca.key.pem`, `ca.cert.pem`), creating it at first start
    /// (EC P-256 key, self-signed, CN "connectord CA", 10-year validity), key file mode 0600.
    ///
    /// If only the key exists (a first start interrupted between the two writes), the
    /// certificate is rebuilt from it. If only the certificate exists, that is an error: the
    /// key cannot be recovered.
    pub fn load_or_create(state_dir: &Path) -> Result<CertAuthority, CertError> {
        fs::create_dir_all(state_dir).map_err(|source| CertError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let key_path = state_dir.join(CA_KEY_FILE);
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_text = read_optional(&key_path)?;
        let cert_text = read_optional(&cert_path)?;
        match (key_text, cert_text) {
            (Some(key_text), Some(cert_text)) => {
                let key = load_key(&key_path, &key_text)?;
                warn_if_key_readable_by_others(&key_path);
                Self::from_key_and_cert(key, &cert_text, cert_path)
            }
            (Some(key_text), None) => {
                let key = load_key(&key_path, &key_text)?;
                warn_if_key_readable_by_others(&key_path);
                tracing::warn!(
                    key = %key_path.display(),
                    "CA certificate missing; rebuilding it from the existing CA key"
                );
                let pem = ca_params_for_new_certificate().self_signed(&key)?.pem();
                write_new_file(&cert_path, pem.as_bytes(), 0o644)?;
                Self::from_key_and_cert(key, &pem, cert_path)
            }
            (None, Some(_)) => Err(CertError::BadCaFile {
                path: key_path,
                reason: format!(
                    "missing although {CA_CERT_FILE} exists; restore it from a backup, or remove \
                     {CA_CERT_FILE} too to create a new CA (devices then need new certificates)"
                ),
            }),
            (None, None) => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let pem = ca_params_for_new_certificate().self_signed(&key)?.pem();
                // The key first: an interruption leaves a key without a certificate, which
                // the next start repairs.
                write_new_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                write_new_file(&cert_path, pem.as_bytes(), 0o644)?;
                tracing::info!(
                    dir = %state_dir.display(),
                    "created a new certificate authority ({CA_KEY_FILE}, {CA_CERT_FILE})"
                );
                Self::from_key_and_cert(key, &pem, cert_path)
            }
        }
    }

    /// Checks the stored certificate against the key and builds the issuer.
    fn from_key_and_cert(
        key: KeyPair,
        cert_text: &str,
        cert_path: PathBuf,
    ) -> Result<CertAuthority, CertError> {
        let bad = |reason: String| CertError::BadCaFile {
            path: cert_path.clone(),
            reason,
        };
        let blocks =
            pem_blocks(cert_text).map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        let block = match blocks.as_slice() {
            [block] if block.tag() == "CERTIFICATE" => block,
            [] => return Err(bad("no PEM block found".into())),
            [block] => {
                return Err(bad(format!(
                    "expected a CERTIFICATE PEM block, found '{}'",
                    block.tag()
                )));
            }
            _ => return Err(bad("expected exactly one certificate".into())),
        };
        let der = block.contents();
        let stored = read_certificate(der).map_err(|e| bad(format!("corrupt certificate: {e}")))?;

        // The issued certificates name the CA by the subject rcgen writes for our parameters,
        // so the stored certificate must carry exactly that, and our key.
        let reference_der = ca_params().self_signed(&key)?.der().to_vec();
        let reference = read_certificate(&reference_der)
            .map_err(|e| CertError::Rcgen(format!("cannot parse own CA certificate: {e}")))?;
        if stored.spki != key.subject_public_key_info() {
            return Err(bad(format!(
                "the certificate's public key does not match {CA_KEY_FILE}"
            )));
        }
        if stored.subject != reference.subject {
            return Err(bad(format!(
                "the certificate's subject is not 'CN={CA_COMMON_NAME}' as created by connectord \
                 (other CA certificates are not supported)"
            )));
        }
        if stored.not_after <= SystemTime::now() {
            tracing::warn!(
                cert = %cert_path.display(),
                "the CA certificate has expired; POST /api/cert will fail until a new CA is created"
            );
        }
        // rcgen (x509-parser) reads the issuer's name, key identifier and key usages.
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)
            .map_err(|e| bad(format!("corrupt certificate: {e}")))?;
        Ok(CertAuthority {
            issuer,
            // Canonical (RFC 7468) text: 64 characters a line, `\n` line ends.
            ca_pem: pem::encode_config(block, EncodeConfig::new().set_line_ending(LineEnding::LF)),
            ca_not_after: stored.not_after,
            cert_path,
        })
    }

    /// Issues a device certificate for `public_key_pem` (SPKI PEM, "-----BEGIN PUBLIC KEY-----").
    ///
    /// The endpoint name is a fresh random v4 UUID; the subject is `OU=<domain>, CN=<endpoint>`.
    /// `server_certificate` is the CA certificate PEM (what the device must trust to verify
    /// the server). See the module documentation for the accepted key formats and the
    /// certificate's contents.
    pub fn issue(&self, domain: &str, public_key_pem: &str) -> Result<Issued, CertError> {
        check_domain(domain)?;
        let public_key = parse_public_key_pem(public_key_pem).map_err(CertError::BadKey)?;

        let now = SystemTime::now();
        if self.ca_not_after <= now {
            return Err(CertError::CaExpired {
                path: self.cert_path.clone(),
            });
        }
        let not_after = (now + VALIDITY).min(self.ca_not_after);

        let endpoint = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
        let mut params = CertificateParams::default();
        set_validity(&mut params, now - BACKDATE, not_after);
        let serial = random_serial();
        let serial_hex: String = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationalUnitName, domain);
        dn.push(DnType::CommonName, endpoint.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&public_key, &self.issuer)?;

        Ok(Issued {
            endpoint,
            server_certificate: self.ca_pem.clone(),
            device_certificate: cert.pem(),
            serial: serial_hex,
            // Whole seconds, as the certificate says it.
            not_after_ms: not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() * 1000),
        })
    }

    /// The CA certificate, DER encoded.
    pub fn ca_certificate_der(&self) -> Vec<u8> {
        pem_blocks(&self.ca_pem)
            .ok()
            .and_then(|b| b.into_iter().next())
            .map(|b| b.contents().to_vec())
            .unwrap_or_default()
    }

    /// The CA certificate, PEM encoded (the same text on every start).
    pub fn ca_certificate_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server certificate of the daemon's own secure listeners (CoAP over TLS and
    /// over DTLS: one certificate for both), signed by this CA, for a fresh P-256 key:
    /// `CN=connectord`, the DNS names and IP addresses in `names` as subject alternative
    /// names, extendedKeyUsage `serverAuth`, valid for as long as a device certificate.
    /// Issued at each start, kept in memory only: devices verify it against the CA
    /// certificate, not the leaf.
    pub fn issue_server(&self, names: &[String]) -> Result<ServerCertificate, CertError> {
        let (cert, key) = self.server_certificate(names)?;
        Ok(ServerCertificate {
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: key.serialize_pem(),
            leaf_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// `CN=connectord`, `names` as subject alternative names, `serverAuth`, a fresh P-256
    /// key, valid like a device certificate (never past the CA).
    fn server_certificate(
        &self,
        names: &[String],
    ) -> Result<(rcgen::Certificate, KeyPair), CertError> {
        let now = SystemTime::now();
        if self.ca_not_after <= now {
            return Err(CertError::CaExpired {
                path: self.cert_path.clone(),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        set_validity(
            &mut params,
            now - BACKDATE,
            (now + VALIDITY).min(self.ca_not_after),
        );
        params.serial_number = Some(random_serial());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "connectord");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }
}

/// The CA's subject, constraints and key usages. These, with the key, are everything the
/// issuer side of a device certificate depends on; validity and serial are set at creation.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn ca_params_for_new_certificate() -> CertificateParams {
    let now = SystemTime::now();
    let mut params = ca_params();
    set_validity(&mut params, now - BACKDATE, now + VALIDITY);
    params.serial_number = Some(random_serial());
    params
}

/// Sets the validity period (whole seconds; times before 1970 are clamped to 1970).
fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let secs = |t: SystemTime| {
        Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    };
    params.not_before = OffsetDateTime::UNIX_EPOCH + secs(not_before);
    params.not_after = OffsetDateTime::UNIX_EPOCH + secs(not_after);
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and always 16 bytes long once encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn check_domain(domain: &str) -> Result<(), CertError> {
    if domain.trim().is_empty() {
        return Err(CertError::BadDomain("the domain is empty".into()));
    }
    if domain.chars().count() > MAX_DOMAIN_LEN {
        return Err(CertError::BadDomain(format!(
            "the domain is longer than {MAX_DOMAIN_LEN} characters"
        )));
    }
    if domain.chars().any(char::is_control) {
        return Err(CertError::BadDomain(
            "the domain contains control characters".into(),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Files

fn read_optional(path: &Path) -> Result<Option<String>, CertError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| CertError::BadCaFile {
                path: path.to_path_buf(),
                reason: "not a text (PEM) file".into(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn load_key(path: &Path, text: &str) -> Result<KeyPair, CertError> {
    let bad = |reason: String| CertError::BadCaFile {
        path: path.to_path_buf(),
        reason,
    };
    let key = KeyPair::from_pem(text)
        .map_err(|e| bad(format!("not a PKCS#8 private key in PEM format: {e}")))?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(bad("not an EC P-256 private key".into()));
    }
    Ok(key)
}

#[cfg(unix)]
fn warn_if_key_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA private key is accessible to other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_key_readable_by_others(_path: &Path) {}

/// Writes `contents` to `path` through a temporary file and a rename, so that `path` is
/// either absent or complete. `mode` applies on Unix.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()
    })()
    .map_err(io_err(&tmp));
    let result = result.and_then(|()| fs::rename(&tmp, path).map_err(io_err(path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable; failing to sync the directory is not worth failing for.
    if let Some(dir) = path.parent()
        && let Ok(dir) = fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// PEM

/// Compares labels ignoring spaces and case ("RSAPRIVATEKEY" is "RSA PRIVATE KEY").
fn squash(label: &str) -> String {
    label
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_uppercase)
        .collect()
}

/// All PEM blocks in `text`, in order, read by the `pem` crate: whitespace anywhere in a
/// body is ignored, which covers indentation, `\r\n` line ends and bodies on one line.
/// Around it: the mbed documentation's `PUBLICKEY` spelling is read as `PUBLIC KEY`, and
/// the errors are worded for the REST client (a `BEGIN` line without its `END` line, which
/// `pem` skips without a word, is one).
fn pem_blocks(text: &str) -> Result<Vec<pem::Pem>, String> {
    let text = text
        .replace("-----BEGIN PUBLICKEY-----", "-----BEGIN PUBLIC KEY-----")
        .replace("-----END PUBLICKEY-----", "-----END PUBLIC KEY-----");
    let blocks = pem::parse_many(&text).map_err(|e| match e {
        PemError::MismatchedTags(begin, end) => {
            format!("'-----BEGIN {begin}-----' ends with '-----END {end}-----'")
        }
        PemError::InvalidData(e) => format!("a PEM block is not valid base64 ({e})"),
        PemError::InvalidHeader(_) => {
            "a PEM block has a blank line inside its base64 or broken headers".into()
        }
        PemError::MissingBeginTag => "malformed '-----BEGIN ...-----' line".into(),
        PemError::MissingEndTag => "malformed '-----END ...-----' line".into(),
        e => format!("malformed PEM ({e})"),
    })?;
    if blocks.len() < text.matches("-----BEGIN ").count() {
        return Err("a '-----BEGIN ...-----' line without a matching '-----END' line".into());
    }
    for block in &blocks {
        let label = block.tag();
        if block.headers().iter().next().is_some() {
            return Err(format!(
                "the '{label}' block has headers (is it encrypted?); expected plain base64"
            ));
        }
        if block.contents().is_empty() {
            return Err(format!("the '{label}' block is empty"));
        }
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------
// Public keys

/// An EC P-256 public key, as the uncompressed point `04 || x || y`.
struct P256PublicKey(Vec<u8>);

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a submitted public key; the error is a message for the REST client.
fn parse_public_key_pem(input: &str) -> Result<P256PublicKey, String> {
    // JSON strings escaped twice arrive with literal "\n"; base64 never contains a backslash.
    let text = input
        .replace("\\r", "")
        .replace("\\n", "\n")
        .replace("\\t", " ")
        .replace("\\/", "/");
    if text.trim().is_empty() {
        return Err(format!("the public key is empty; {KEY_HINT}"));
    }
    let blocks = pem_blocks(&text).map_err(|e| format!("{e}; {KEY_HINT}"))?;
    let Some(first) = blocks.iter().find(|b| b.tag() != "EC PARAMETERS") else {
        return Err(format!("no PEM block found; {KEY_HINT}"));
    };
    let block = blocks
        .iter()
        .find(|b| b.tag() == "PUBLIC KEY")
        .ok_or_else(|| wrong_block_message(first.tag()))?;
    // p256 checks the structure, the algorithm, the curve and that the point is on it.
    match p256::PublicKey::from_public_key_der(block.contents()) {
        Ok(key) => Ok(P256PublicKey(
            key.to_encoded_point(false).as_bytes().to_vec(),
        )),
        Err(_) => Err(format!("{}; {KEY_HINT}", explain_bad_spki(block))),
    }
}

fn wrong_block_message(label: &str) -> String {
    let what = match squash(label).as_str() {
        "CERTIFICATE" | "X509CERTIFICATE" | "TRUSTEDCERTIFICATE" => {
            "this is a certificate, not a public key"
        }
        "PRIVATEKEY" | "ECPRIVATEKEY" | "RSAPRIVATEKEY" | "ENCRYPTEDPRIVATEKEY" => {
            "this is a private key: never send it anywhere; send only the public key"
        }
        "RSAPUBLICKEY" => "RSA keys are not supported",
        "CERTIFICATEREQUEST" | "NEWCERTIFICATEREQUEST" => {
            "this is a certificate signing request, not a public key"
        }
        _ => "this PEM block is not a public key",
    };
    format!("{what} (found '-----BEGIN {label}-----'); {KEY_HINT}")
}

/// Says why p256 refused a `PUBLIC KEY` block, reading its algorithm and curve with the
/// `spki` crate (through p256).
fn explain_bad_spki(block: &pem::Pem) -> String {
    let spki = match SubjectPublicKeyInfoRef::try_from(block.contents()) {
        Ok(spki) => spki,
        Err(e) => return format!("the PUBLIC KEY block is not a valid public key ({e})"),
    };
    let name = |oid: ObjectIdentifier| oid_name(&oid.to_string());
    if spki.algorithm.oid != p256::elliptic_curve::ALGORITHM_OID {
        let oid = spki.algorithm.oid;
        return match name(oid) {
            Some(name) => format!("{name} keys are not supported"),
            None => format!("unsupported public key algorithm (OID {oid})"),
        };
    }
    match spki.algorithm.parameters {
        Some(p) if p.tag() == Tag::Sequence => {
            return "explicit EC curve parameters are not supported; use the named curve \
                    (openssl: '-param_enc named_curve')"
                .into();
        }
        Some(p) => match p.decode_as::<ObjectIdentifier>() {
            Ok(oid) if oid == p256::NistP256::OID => {}
            Ok(oid) if OTHER_256_BIT_CURVES.contains(&oid.to_string().as_str()) => {
                let name = name(oid).unwrap_or("this curve");
                return format!("EC keys on {name} are not supported: {OTHER_256_BIT_WHY}");
            }
            Ok(oid) => {
                return match name(oid) {
                    Some(name) => format!("EC keys on {name} are not supported"),
                    None => format!("EC keys on the curve with OID {oid} are not supported"),
                };
            }
            Err(_) => return "the PUBLIC KEY block names no EC curve".into(),
        },
        None => return "the PUBLIC KEY block names no EC curve".into(),
    }
    let Some(point) = spki.subject_public_key.as_bytes() else {
        return "the PUBLIC KEY block is not a valid public key (bad BIT STRING)".into();
    };
    match (point.first(), point.len()) {
        (Some(0x04), 65) | (Some(0x02 | 0x03), 33) => {
            "the EC point is not on the P-256 curve".into()
        }
        (Some(0x00), 1) => "the EC point is the point at infinity".into(),
        (_, len) => {
            format!("malformed EC point ({len} bytes; a P-256 point has 65, or 33 compressed)")
        }
    }
}

/// The 256-bit curves other than secp256r1 that seed 000's "other 256 bit curves" may mean
/// (OIDs as dotted strings): refused with [`OTHER_256_BIT_WHY`], see the module docs.
pub const OTHER_256_BIT_CURVES: [&str; 5] = [
    "1.3.132.0.10",
    "1.3.36.3.3.2.8.1.1.7",
    "1.3.36.3.3.2.8.1.1.8",
    "1.2.156.10197.1.301",
    "1.2.250.1.223.101.256.1",
];

/// Why a 256-bit curve other than secp256r1 is refused.
const OTHER_256_BIT_WHY: &str = "a certificate for it could not be verified by the device \
     transports, whose certificate mode (RFC 7252 section 9.1.3.3) uses ECDSA on secp256r1 only";

/// Friendly names for algorithm and curve OIDs a client may plausibly send.
fn oid_name(dotted: &str) -> Option<&'static str> {
    Some(match dotted {
        "1.2.840.113549.1.1.1" => "RSA",
        "1.2.840.113549.1.1.10" => "RSA-PSS",
        "1.2.840.10040.4.1" => "DSA",
        "1.3.101.110" => "X25519",
        "1.3.101.111" => "X448",
        "1.3.101.112" => "Ed25519",
        "1.3.101.113" => "Ed448",
        "1.3.132.1.12" => "ECDH-only EC",
        "1.3.132.0.10" => "secp256k1",
        "1.3.132.0.34" => "secp384r1 (P-384)",
        "1.3.132.0.35" => "secp521r1 (P-521)",
        "1.2.840.10045.3.1.1" => "prime192v1 (P-192)",
        "1.3.132.0.33" => "secp224r1 (P-224)",
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1",
        "1.3.36.3.3.2.8.1.1.8" => "brainpoolP256t1",
        "1.2.250.1.223.101.256.1" => "FRP256v1",
        "1.3.36.3.3.2.8.1.1.11" => "brainpoolP384r1",
        "1.3.36.3.3.2.8.1.1.13" => "brainpoolP512r1",
        "1.2.156.10197.1.301" => "SM2",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Certificates

/// The parts of a certificate the CA checks.
struct CertInfo {
    /// The subject Name, DER encoded.
    subject: Vec<u8>,
    /// The SubjectPublicKeyInfo, DER encoded.
    spki: Vec<u8>,
    not_after: SystemTime,
}

/// Reads the fields the CA checks from a DER certificate (x509-parser, which rcgen uses
/// too); bytes after the certificate are an error.
fn read_certificate(cert_der: &[u8]) -> Result<CertInfo, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the certificate", rest.len()));
    }
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok(CertInfo {
        subject: cert.subject().as_raw().to_vec(),
        spki: cert.public_key().raw.to_vec(),
        not_after: UNIX_EPOCH + Duration::from_secs(not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
    use std::process::Command;

    /// Runs openssl in `dir`; panics with a clear message if the CLI is missing or fails.
    fn openssl(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("the openssl CLI is required by this test but could not be run: {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn p256_public_key_pem() -> String {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .public_key_pem()
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        pem_blocks(pem).unwrap().remove(0).into_contents()
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        let config = EncodeConfig::new().set_line_ending(LineEnding::LF);
        pem::encode_config(&pem::Pem::new(label, der), config)
    }

    fn pem_body(pem: &str) -> String {
        pem.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("-----"))
            .collect()
    }

    fn bad_key_message(ca: &CertAuthority, key: &str) -> String {
        match ca.issue("domain", key) {
            Err(CertError::BadKey(msg)) => msg,
            other => panic!("expected BadKey for {key:?}, got {other:?}"),
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_start_creates_both_files_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ca = CertAuthority::load_or_create(&state).unwrap();
        let key_path = state.join(CA_KEY_FILE);
        let cert_path = state.join(CA_CERT_FILE);
        assert!(key_path.is_file() && cert_path.is_file());
        #[cfg(unix)]
        assert_eq!(mode(&key_path), 0o600);
        assert!(!state.join("ca.key.pem.tmp").exists());
        assert!(!state.join("ca.cert.pem.tmp").exists());
        assert_eq!(
            fs::read_to_string(&cert_path).unwrap(),
            ca.ca_certificate_pem()
        );

        let text = openssl(
            &state,
            &["x509", "-in", CA_CERT_FILE, "-noout", "-subject", "-text"],
        );
        assert!(text.contains("CN=connectord CA") || text.contains("CN = connectord CA"));
        assert!(text.contains("CA:TRUE"), "{text}");
        assert!(text.contains("prime256v1"), "{text}");
        assert!(text.contains("Certificate Sign"), "{text}");
        // The key file is a P-256 key matching the certificate.
        let key_pub = openssl(&state, &["pkey", "-in", CA_KEY_FILE, "-pubout"]);
        let cert_pub = openssl(&state, &["x509", "-in", CA_CERT_FILE, "-noout", "-pubkey"]);
        assert_eq!(pem_body(&key_pub), pem_body(&cert_pub));
        // About ten years.
        let nine_years = (9 * 365 * 86_400).to_string();
        let eleven_years = (11 * 365 * 86_400).to_string();
        openssl(
            &state,
            &[
                "x509",
                "-in",
                CA_CERT_FILE,
                "-noout",
                "-checkend",
                &nine_years,
            ],
        );
        let out = Command::new("openssl")
            .args([
                "x509",
                "-in",
                CA_CERT_FILE,
                "-noout",
                "-checkend",
                &eleven_years,
            ])
            .current_dir(&state)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the CA should expire within 11 years"
        );
    }

    /// A new CA in a state directory of its own.
    fn new_ca() -> (tempfile::TempDir, CertAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(dir.path()).unwrap();
        (dir, ca)
    }

    #[test]
    fn second_start_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertAuthority::load_or_create(dir.path()).unwrap();
        let key_before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let second = CertAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(first.ca_certificate_pem(), second.ca_certificate_pem());
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), key_before);

        // Certificates issued after the restart verify against the CA from the first start.
        let issued = second.issue("dom", &p256_public_key_pem()).unwrap();
        assert_eq!(issued.server_certificate, first.ca_certificate_pem());
        fs::write(dir.path().join("first-ca.pem"), first.ca_certificate_pem()).unwrap();
        fs::write(dir.path().join("device.pem"), &issued.device_certificate).unwrap();
        let out = openssl(
            dir.path(),
            &["verify", "-CAfile", "first-ca.pem", "device.pem"],
        );
        assert!(out.contains("device.pem: OK"), "{out}");
    }

    #[test]
    fn issued_certificate_verifies_and_carries_endpoint_domain_and_key() {
        let (dir, ca) = new_ca();
        let public_key = p256_public_key_pem();
        let domain = "012345-6789-0123-45678901";
        let issued = ca.issue(domain, &public_key).unwrap();
        assert_eq!(issued.server_certificate, ca.ca_certificate_pem());

        fs::write(dir.path().join("ca.pem"), &issued.server_certificate).unwrap();
        fs::write(dir.path().join("device.pem"), &issued.device_certificate).unwrap();
        let out = openssl(
            dir.path(),
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslclient",
                "device.pem",
            ],
        );
        assert!(out.contains("device.pem: OK"), "{out}");

        let subject = openssl(
            dir.path(),
            &["x509", "-in", "device.pem", "-noout", "-subject"],
        );
        assert!(subject.contains(&issued.endpoint), "{subject}");
        assert!(subject.contains(domain), "{subject}");
        assert!(subject.contains("CN"), "{subject}");
        assert!(subject.contains("OU"), "{subject}");
        // The serial handed back (for the host's revocation list) is the certificate's,
        // as openssl prints it; and so is the end of its validity.
        let serial = openssl(
            dir.path(),
            &["x509", "-in", "device.pem", "-noout", "-serial"],
        );
        assert_eq!(
            serial.trim().to_ascii_lowercase(),
            format!("serial={}", issued.serial),
            "{serial}"
        );
        let device = read_certificate(&pem_der(&issued.device_certificate)).unwrap();
        assert_eq!(
            issued.not_after_ms,
            device
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                * 1000
        );

        let pubkey = openssl(
            dir.path(),
            &["x509", "-in", "device.pem", "-noout", "-pubkey"],
        );
        assert_eq!(pem_body(&pubkey), pem_body(&public_key));

        let text = openssl(
            dir.path(),
            &["x509", "-in", "device.pem", "-noout", "-text"],
        );
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(text.contains("Digital Signature"), "{text}");
        assert!(!text.contains("Certificate Sign"), "{text}");
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
        assert!(text.contains("Authority Key Identifier"), "{text}");

        // Never valid past the CA.
        let device = read_certificate(&pem_der(&issued.device_certificate)).unwrap();
        let ca_info = read_certificate(&pem_der(ca.ca_certificate_pem())).unwrap();
        assert!(device.not_after <= ca_info.not_after);
        assert!(device.not_after > SystemTime::now() + Duration::from_secs(9 * 365 * 86_400));
    }

    #[test]
    fn two_issues_give_different_endpoint_names() {
        let (_dir, ca) = new_ca();
        let key = p256_public_key_pem();
        let a = ca.issue("dom", &key).unwrap();
        let b = ca.issue("dom", &key).unwrap();
        assert_ne!(a.endpoint, b.endpoint);
        assert_ne!(a.device_certificate, b.device_certificate);
        for name in [&a.endpoint, &b.endpoint] {
            let groups: Vec<&str> = name.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{name}"
            );
            assert!(
                name.chars()
                    .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
            );
            assert_eq!(&groups[2][..1], "4", "version 4: {name}");
            assert!("89ab".contains(&groups[3][..1]), "RFC 4122 variant: {name}");
        }
    }

    #[test]
    fn seed_style_indented_pem_is_accepted() {
        let (dir, ca) = new_ca();
        let key = p256_public_key_pem();
        let lines: Vec<&str> = key.lines().collect();
        let variants = [
            // As in the seed's example: indented inside the JSON string, with the
            // documentation's "PUBLICKEY" spelling on the first line.
            format!(
                "-----BEGIN PUBLICKEY-----\n{}\n        -----END PUBLIC KEY-----",
                lines[1..lines.len() - 1]
                    .iter()
                    .map(|l| format!("        {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
            format!("  \r\n{}\r\n\r\n", lines.join("\r\n")),
            lines.join(" "),
            lines.join("\\n"),
            format!("\t{}\t", lines.join("\n\t")),
        ];
        for variant in &variants {
            let issued = ca
                .issue("dom", variant)
                .unwrap_or_else(|e| panic!("{variant:?} was refused: {e}"));
            assert_eq!(
                certified_key(dir.path(), &issued.device_certificate),
                pem_body(&key)
            );
        }
    }

    #[test]
    fn compressed_point_is_accepted_and_expanded() {
        let (dir, ca) = new_ca();
        let key = p256_public_key_pem();
        let compressed = public_key_as(dir.path(), &key, &["-conv_form", "compressed"]);
        assert_ne!(pem_body(&compressed), pem_body(&key));
        let issued = ca.issue("dom", &compressed).unwrap();
        assert_eq!(
            certified_key(dir.path(), &issued.device_certificate),
            pem_body(&key)
        );
    }

    /// `key` (a PEM public key) rewritten by `openssl ec` with `options`.
    fn public_key_as(dir: &Path, key: &str, options: &[&str]) -> String {
        fs::write(dir.join("pub.pem"), key).unwrap();
        let mut args = vec!["ec", "-pubin", "-in", "pub.pem", "-pubout"];
        args.extend_from_slice(options);
        openssl(dir, &args)
    }

    /// The public key a certificate certifies, as openssl reads it (PEM body).
    fn certified_key(dir: &Path, certificate: &str) -> String {
        fs::write(dir.join("device.pem"), certificate).unwrap();
        pem_body(&openssl(
            dir,
            &["x509", "-in", "device.pem", "-noout", "-pubkey"],
        ))
    }

    #[test]
    fn bad_public_keys_are_rejected_with_helpful_messages() {
        let (dir, ca) = new_ca();
        let gen_pub = |args: &[&str]| {
            openssl(dir.path(), args);
            openssl(dir.path(), &["pkey", "-in", "k.pem", "-pubout"])
        };
        let rsa = gen_pub(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            "k.pem",
        ]);
        let gen_ec = |curve: &str| {
            let opt = format!("ec_paramgen_curve:{curve}");
            gen_pub(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                &opt,
                "-out",
                "k.pem",
            ])
        };
        let k1 = gen_pub(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:secp256k1",
            "-out",
            "k.pem",
        ]);
        let explicit = public_key_as(
            dir.path(),
            &p256_public_key_pem(),
            &["-param_enc", "explicit"],
        );
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .public_key_pem();
        let ed25519 = KeyPair::generate_for(&PKCS_ED25519)
            .unwrap()
            .public_key_pem();
        let private = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        let mut off_curve_der = pem_der(&p256_public_key_pem());
        if let Some(last) = off_curve_der.last_mut() {
            *last ^= 1;
        }
        let off_curve = pem_encode("PUBLIC KEY", &off_curve_der);
        let mut trailing_der = pem_der(&p256_public_key_pem());
        trailing_der.push(0);
        let trailing = pem_encode("PUBLIC KEY", &trailing_der);
        let truncated = {
            let der = pem_der(&p256_public_key_pem());
            pem_encode("PUBLIC KEY", &der[..40])
        };
        let mismatched = p256_public_key_pem().replace("END PUBLIC KEY", "END CERTIFICATE");

        let cases: Vec<(&str, String, &str)> = vec![
            ("empty", String::new(), "empty"),
            ("blank", "  \n\t ".into(), "empty"),
            ("garbage", "hello world".into(), "no PEM block"),
            (
                "bad base64",
                "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----".into(),
                "not valid base64",
            ),
            (
                "no END line",
                "-----BEGIN PUBLIC KEY-----\nMFkw".into(),
                "without a matching",
            ),
            ("mismatched END", mismatched, "ends with"),
            (
                "certificate",
                ca.ca_certificate_pem().to_string(),
                "certificate, not a public key",
            ),
            ("private key", private, "private key"),
            ("RSA", rsa, "RSA keys are not supported"),
            (
                "secp256k1",
                k1,
                "secp256k1 are not supported: a certificate for it could not be verified",
            ),
            (
                "brainpoolP256r1",
                gen_ec("brainpoolP256r1"),
                "brainpoolP256r1 are not supported: a certificate",
            ),
            (
                "brainpoolP256t1",
                gen_ec("brainpoolP256t1"),
                "brainpoolP256t1 are not supported: a certificate",
            ),
            ("SM2", gen_ec("SM2"), "SM2 are not supported: a certificate"),
            ("P-384", p384, "P-384"),
            ("Ed25519", ed25519, "Ed25519 keys are not supported"),
            (
                "explicit parameters",
                explicit,
                "explicit EC curve parameters",
            ),
            ("off-curve point", off_curve, "not on the P-256 curve"),
            ("trailing data", trailing, "trailing data"),
            ("truncated", truncated, "not a valid public key"),
        ];
        for (name, input, expected) in cases {
            let msg = bad_key_message(&ca, &input);
            assert!(
                msg.contains(expected),
                "{name}: message {msg:?} lacks {expected:?}"
            );
            assert!(msg.contains("secp256r1"), "{name}: no hint in {msg:?}");
            let err = CertError::BadKey(msg);
            assert!(err.is_bad_request());
        }
    }

    #[test]
    fn bad_domains_are_rejected() {
        let (_dir, ca) = new_ca();
        let key = p256_public_key_pem();
        for domain in ["", "   ", &"d".repeat(65), "a\nb"] {
            let err = ca.issue(domain, &key).unwrap_err();
            assert!(
                matches!(err, CertError::BadDomain(_)),
                "{domain:?}: {err:?}"
            );
            assert!(err.is_bad_request());
        }
        ca.issue(&"d".repeat(64), &key).unwrap();
        ca.issue("домен", &key).unwrap();
    }

    #[test]
    fn corrupt_ca_certificate_is_an_error_naming_the_file() {
        let (dir, _) = new_ca();
        let cert_path = dir.path().join(CA_CERT_FILE);
        let original = fs::read_to_string(&cert_path).unwrap();
        let body = pem_body(&original);
        let flipped_middle = {
            let mut der = pem_der(&original);
            der.truncate(der.len() - 10);
            pem_encode("CERTIFICATE", &der)
        };
        let corruptions = [
            "garbage".to_string(),
            String::new(),
            original.replace(&body[10..30], "AAAAAAAAAAAAAAAAAAAA"),
            flipped_middle,
            p256_public_key_pem(),
            format!("{original}{original}"),
        ];
        for corrupt in corruptions {
            fs::write(&cert_path, &corrupt).unwrap();
            let err = CertAuthority::load_or_create(dir.path()).unwrap_err();
            assert!(matches!(err, CertError::BadCaFile { .. }), "{err:?}");
            assert!(
                err.to_string().contains(&*cert_path.to_string_lossy()),
                "{err}"
            );
            assert!(!err.is_bad_request());
            // Not replaced.
            assert_eq!(fs::read_to_string(&cert_path).unwrap(), corrupt);
        }
        fs::write(&cert_path, &original).unwrap();
        CertAuthority::load_or_create(dir.path()).unwrap();
    }

    #[test]
    fn certificate_of_another_ca_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(dir.path()).unwrap();
        let other_ca = CertAuthority::load_or_create(other.path()).unwrap();
        let cert_path = dir.path().join(CA_CERT_FILE);
        fs::write(&cert_path, other_ca.ca_certificate_pem()).unwrap();
        let err = CertAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");

        // Same key, different subject.
        let key =
            KeyPair::from_pem(&fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap()).unwrap();
        let mut params = ca_params();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "someone else");
        fs::write(&cert_path, params.self_signed(&key).unwrap().pem()).unwrap();
        let err = CertAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("subject"), "{err}");
    }

    #[test]
    fn corrupt_or_missing_ca_key_is_an_error_naming_the_file() {
        let (dir, _) = new_ca();
        let key_path = dir.path().join(CA_KEY_FILE);
        let original = fs::read(&key_path).unwrap();
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .serialize_pem();
        for corrupt in ["garbage".as_bytes(), p384.as_bytes(), &[0xff, 0xfe, 0x00]] {
            fs::write(&key_path, corrupt).unwrap();
            let err = CertAuthority::load_or_create(dir.path()).unwrap_err();
            assert!(matches!(err, CertError::BadCaFile { .. }), "{err:?}");
            assert!(
                err.to_string().contains(&*key_path.to_string_lossy()),
                "{err}"
            );
            assert_eq!(fs::read(&key_path).unwrap(), corrupt);
        }
        fs::remove_file(&key_path).unwrap();
        let err = CertAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&*key_path.to_string_lossy()),
            "{err}"
        );
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!key_path.exists());
        fs::write(&key_path, original).unwrap();
        CertAuthority::load_or_create(dir.path()).unwrap();
    }

    #[test]
    fn missing_certificate_is_rebuilt_from_the_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertAuthority::load_or_create(dir.path()).unwrap();
        let issued = first.issue("dom", &p256_public_key_pem()).unwrap();
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let rebuilt = CertAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap(),
            rebuilt.ca_certificate_pem()
        );
        // Same name and key: earlier device certificates verify against the rebuilt CA.
        fs::write(dir.path().join("ca.pem"), rebuilt.ca_certificate_pem()).unwrap();
        fs::write(dir.path().join("device.pem"), &issued.device_certificate).unwrap();
        let out = openssl(dir.path(), &["verify", "-CAfile", "ca.pem", "device.pem"]);
        assert!(out.contains("device.pem: OK"), "{out}");
    }

    #[test]
    fn unreadable_state_dir_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, "x").unwrap();
        let err = CertAuthority::load_or_create(&file).unwrap_err();
        assert!(matches!(err, CertError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }

    #[test]
    fn parsers_do_not_panic_on_truncated_or_mutated_input() {
        let (_dir, ca) = new_ca();
        let spki = pem_der(&p256_public_key_pem());
        let cert = pem_der(ca.ca_certificate_pem());
        for der in [&spki, &cert] {
            let mut inputs: Vec<Vec<u8>> = (0..der.len()).map(|len| der[..len].to_vec()).collect();
            for i in 0..der.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut mutated = der.clone();
                    mutated[i] ^= flip;
                    inputs.push(mutated);
                }
            }
            for input in inputs {
                let _ = parse_public_key_pem(&pem_encode("PUBLIC KEY", &input));
                let _ = read_certificate(&input);
            }
        }
        for text in [
            "-----BEGIN ",
            "-----BEGIN -----",
            "-----BEGIN X-----\n-----END ",
            "-----END X-----",
        ] {
            let _ = parse_public_key_pem(text);
        }
    }

    #[test]
    fn cert_authority_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertAuthority>();
        assert_send_sync::<CertError>();
    }
}
