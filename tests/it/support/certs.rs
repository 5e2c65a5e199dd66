//! Device certificates for the secure-transport areas (`dtls`, `tls`): openssl makes the
//! key, the daemon's `POST /api/cert` signs it.

use std::path::Path;
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

/// A P-256 device key and its certificate from `POST /api/cert` (domain `default`) in
/// `dir`: `device.key`, `device.pem`, and the daemon's CA as `ca.pem`. Returns the
/// endpoint name the certificate carries (its CN).
pub fn device_certificate(d: &super::Daemon, dir: &Path) -> String {
    let key = dir.join("device.key");
    let key_path = key.to_str().expect("UTF-8 path");
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        key_path,
    ]);
    let public = openssl(&["ec", "-in", key_path, "-pubout"]);
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
