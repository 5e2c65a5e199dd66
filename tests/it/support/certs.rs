//! Device certificates for the secure-transport areas (`dtls`, `tls`): openssl makes the
//! key, the daemon's `POST /api/cert` signs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// Runs `openssl` with `args` (it must succeed); what it printed.
pub fn openssl(args: &[&str]) -> String {
    let out = super::run_ok(
        Command::new("openssl").args(args),
        &format!("openssl {args:?}"),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The path as the `&str` a command line takes.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A new P-256 key (openssl) written to `key`; its public key in PEM.
pub fn p256_key(key: &Path) -> String {
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        path(key),
    ]);
    openssl(&["ec", "-in", path(key), "-pubout"])
}

/// A CA of its own (openssl, not the daemon's) in `dir`: its certificate and key.
pub fn foreign_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("other-ca.pem"), dir.join("other-ca.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        path(&key),
        "-out",
        path(&cert),
        "-subj",
        "/CN=other CA",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    (cert, key)
}

/// A self-signed EC P-256 server certificate for `localhost` and 127.0.0.1, valid for two
/// days, and its key, written in `dir` (`server.pem`, `server.key`).
pub fn self_signed_server(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        path(&key),
        "-out",
        path(&cert),
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
    ]);
    (cert, key)
}

/// A client certificate for `key` with subject `subj`, signed by the CA `(cert, key)`,
/// written to `out` (version 3, clientAuth: without extensions OpenSSL 3.0 writes a
/// version 1 certificate, which webpki refuses for that alone).
pub fn sign(ca: (&Path, &Path), key: &Path, subj: &str, out: &Path) {
    let csr = out.with_extension("csr");
    openssl(&[
        "req",
        "-new",
        "-key",
        path(key),
        "-subj",
        subj,
        "-out",
        path(&csr),
    ]);
    let ext = out.with_extension("ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        path(&csr),
        "-CA",
        path(ca.0),
        "-CAkey",
        path(ca.1),
        "-days",
        "1",
        "-out",
        path(out),
        "-extfile",
        path(&ext),
    ]);
}

/// A device certificate for `OU=default, CN=<cn>` from the daemon's CA (its files in the
/// state directory `state`), valid in 2020 only, written with its new key to `cert` and
/// `key` (rcgen: openssl 3.0's `x509 -req` cannot backdate).
pub fn expired_certificate(state: &Path, cn: &str, cert: &Path, key: &Path) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(state.join("ca.key.pem")).unwrap())
            .unwrap();
    let ca_pem = std::fs::read_to_string(state.join("ca.cert.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationalUnitName, "default");
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let device = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signed = params.signed_by(&device, &issuer).unwrap();
    std::fs::write(cert, signed.pem()).unwrap();
    std::fs::write(key, device.serialize_pem()).unwrap();
}

/// A P-256 device key and its certificate from `POST /api/cert` (domain `default`) in
/// `dir`: `device.key`, `device.pem`, and the daemon's CA as `ca.pem`. Returns the
/// endpoint name the certificate carries (its CN).
pub fn device_certificate(d: &super::Daemon, dir: &Path) -> String {
    let public = p256_key(&dir.join("device.key"));
    let r = d.send_json(
        "POST",
        "/api/cert",
        json!({"domain": "default", "publickey": public}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    std::fs::write(
        dir.join("ca.pem"),
        v["server_certificate"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("device.pem"),
        v["device_certificate"].as_str().unwrap(),
    )
    .unwrap();
    v["endpoint"].as_str().unwrap().to_string()
}
