//! CoAP over DTLS (`[coap] listen_dtls`): libcoap's clients (OpenSSL and GnuTLS builds)
//! handshake with a device certificate issued by `POST /api/cert` and register; a
//! certificate from another CA and an expired one are refused and counted. (PSK and the
//! handshake bounds are tested against the listener itself, `daemon/coap/tests/dtls.rs`:
//! the daemon knows no PSK identity until the credential store exists.)

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::support;

/// libcoap's `bin` with `args`, giving up after 10 s; whether it exited 0 and all it
/// printed.
fn libcoap(bin: &str, args: &[&str]) -> (bool, String) {
    support::peers::libcoap_client();
    let out = Command::new(format!("/usr/bin/{bin}"))
        .args(["-B", "10", "-v", "6"])
        .args(args)
        .output()
        .expect("run libcoap's client");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}

fn openssl(args: &[&str]) -> String {
    let out = support::run_ok(
        Command::new("openssl").args(args),
        &format!("openssl {args:?}"),
    );
    String::from_utf8(out.stdout).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn metric(d: &support::Daemon, name: &str) -> u64 {
    let text = d.get("/metrics").body;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("connectord_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn certificates_from_api_cert_register_over_dtls_and_others_are_refused() {
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let ready = d.ready.as_ref().expect("ready file");
    assert_eq!(
        ready.coap.len(),
        2,
        "a UDP and a DTLS listener: {:?}",
        ready.coap
    );
    let dtls = ready.coap[1];
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("device.key");
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        path(&key),
    ]);
    let public = openssl(&["ec", "-in", path(&key), "-pubout"]);
    let r = d.send_json(
        "POST",
        "/api/cert",
        json!({"domain": "default", "publickey": public}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let endpoint = v["endpoint"].as_str().unwrap().to_string();
    let (ca, cert) = (dir.path().join("ca.pem"), dir.path().join("device.pem"));
    std::fs::write(&ca, v["server_certificate"].as_str().unwrap()).unwrap();
    std::fs::write(&cert, v["device_certificate"].as_str().unwrap()).unwrap();

    let register = |bin: &str, cert: &Path, key: &Path, ep: &str| {
        let uri = format!("coaps://127.0.0.1:{}/rd?ep={ep}&lt=300", dtls.port());
        libcoap(
            bin,
            &[
                "-c",
                path(cert),
                "-j",
                path(key),
                "-C",
                path(&ca),
                "-m",
                "post",
                "-e",
                "</3/0>",
                &uri,
            ],
        )
    };
    for (i, bin) in ["coap-client-openssl", "coap-client-gnutls"]
        .iter()
        .enumerate()
    {
        let (ok, all) = register(bin, &cert, &key, &endpoint);
        assert!(
            ok && all.contains("2.01"),
            "{bin} registration over DTLS:\n{all}"
        );
        assert_eq!(metric(&d, "coap_dtls_handshakes_total"), i as u64 + 1);
    }
    let r = d.get("/endpoints");
    assert!(r.body.contains(&endpoint), "{}", r.body);

    // A certificate of another CA, and one of ours that expired yesterday.
    let other_key = dir.path().join("other.key");
    let other = dir.path().join("other.pem");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        path(&other_key),
        "-out",
        path(&other),
        "-subj",
        "/OU=default/CN=intruder",
        "-days",
        "2",
    ]);
    let csr = dir.path().join("old.csr");
    let expired = dir.path().join("expired.pem");
    openssl(&[
        "req",
        "-new",
        "-key",
        path(&key),
        "-subj",
        "/OU=default/CN=old",
        "-out",
        path(&csr),
    ]);
    let state = d.state_dir();
    openssl(&[
        "x509",
        "-req",
        "-in",
        path(&csr),
        "-CA",
        path(&state.join("ca.cert.pem")),
        "-CAkey",
        path(&state.join("ca.key.pem")),
        "-days",
        "-1",
        "-out",
        path(&expired),
    ]);
    let before = metric(&d, "coap_dtls_handshakes_failed_total");
    let mut refused = 0;
    for (cert, key, what) in [
        (&other, &other_key, "another CA"),
        (&expired, &key, "expired"),
    ] {
        for bin in ["coap-client-openssl", "coap-client-gnutls"] {
            let (_, all) = register(bin, cert, key, "intruder");
            assert!(
                !all.contains("2.01"),
                "{bin} with a certificate of {what} registered:\n{all}"
            );
            refused += 1;
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while metric(&d, "coap_dtls_handshakes_failed_total") < before + refused
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        metric(&d, "coap_dtls_handshakes_failed_total"),
        before + refused
    );
    assert_eq!(metric(&d, "coap_dtls_handshakes_total"), 2);
    assert!(!d.get("/endpoints").body.contains("intruder"));
}
