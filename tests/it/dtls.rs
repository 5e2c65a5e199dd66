//! CoAP over DTLS (`[coap] listen_dtls`): libcoap's clients (OpenSSL and GnuTLS builds)
//! handshake with a device certificate issued by `POST /api/cert` and register; a
//! certificate from another CA and an expired one are refused and counted. (PSK and the
//! handshake bounds are tested against the listener itself, `daemon/coap/tests/dtls.rs`:
//! the daemon knows no PSK identity until the credential store exists.)

use std::path::{Path, PathBuf};
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

/// A CA of its own (openssl) in `dir` and a device certificate it signed for
/// `OU=default, CN=<cn>`: the CA's PEM, the device's certificate and key.
fn other_ca(dir: &Path, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        path(&p("other-ca.key")),
        "-out",
        path(&p("other-ca.pem")),
        "-subj",
        "/CN=other CA",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        path(&p("other.key")),
    ]);
    let subj = format!("/OU=default/CN={cn}");
    openssl(&[
        "req",
        "-new",
        "-key",
        path(&p("other.key")),
        "-subj",
        &subj,
        "-out",
        path(&p("other.csr")),
    ]);
    // Without extensions OpenSSL 3.0 writes a version 1 certificate, which webpki refuses
    // for that alone.
    std::fs::write(
        p("leaf.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        path(&p("other.csr")),
        "-CA",
        path(&p("other-ca.pem")),
        "-CAkey",
        path(&p("other-ca.key")),
        "-days",
        "1",
        "-out",
        path(&p("other.pem")),
        "-extfile",
        path(&p("leaf.ext")),
    ]);
    (p("other-ca.pem"), p("other.pem"), p("other.key"))
}

/// A device certificate of the daemon's CA (its files in `state`) valid in 2020 only,
/// written with its key to `cert` and `key` (rcgen: openssl 3.0's `x509 -req` cannot
/// backdate).
fn expired_certificate(state: &Path, cert: &Path, key: &Path) {
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
    dn.push(rcgen::DnType::CommonName, "old");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let device = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signed = params.signed_by(&device, &issuer).unwrap();
    std::fs::write(cert, signed.pem()).unwrap();
    std::fs::write(key, device.serialize_pem()).unwrap();
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

    // A certificate of another CA, and one of ours that expired in 2021.
    let (_, other, other_key) = other_ca(dir.path(), "intruder");
    let expired = dir.path().join("expired.pem");
    let expired_key = dir.path().join("expired.key");
    expired_certificate(&d.state_dir(), &expired, &expired_key);
    let before = metric(&d, "coap_dtls_handshakes_failed_total");
    let mut refused = 0;
    for (cert, key, what) in [
        (&other, &other_key, "another CA"),
        (&expired, &expired_key, "expired"),
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
    // Refused for what they are: an unknown issuer, an expired certificate.
    let logs = d.logs().join("\n");
    for reason in ["UnknownIssuer", "CertExpired"] {
        assert!(logs.contains(reason), "no {reason} in the log:\n{logs}");
    }
}

/// `connectord simulate --cert --key` registers over DTLS; a read and an observation go
/// to the device through its DTLS session (the registration's listener is `dtls:`).
#[test]
fn reads_and_observations_reach_a_simulated_dtls_device() {
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(15);
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let dtls = d.ready.as_ref().expect("ready file").coap[1];
    // A PSK per device: identity binding ties a session to one endpoint, so two devices
    // cannot share one certificate (its CN is the endpoint /api/cert chose).
    for ep in ["secure-000000", "secure-000001"] {
        let r = d.send_json(
            "PUT",
            &format!("/v2/device-credentials/{ep}"),
            json!({"psk_identity": ep, "psk": "7365637572652d6b65792d3136627974"}).to_string(),
        );
        assert!(
            r.status == 200 || r.status == 201,
            "{} {}",
            r.status,
            r.body
        );
    }
    let mut sim = Command::new(support::BIN)
        .args([
            "simulate",
            "--devices",
            "2",
            "--prefix",
            "secure-",
            "--notify-interval",
            "200",
        ])
        .args(["--server", &dtls.to_string()])
        .args(["--psk-per-endpoint", "7365637572652d6b65792d3136627974"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("connectord simulate");
    let registered = support::eventually(WAIT, || {
        let body = d.get("/v2/endpoints").body;
        body.contains("secure-000000") && body.contains("secure-000001")
    });
    if !registered {
        let _ = sim.kill();
        panic!("not registered over DTLS: {}", d.get("/v2/endpoints").body);
    }
    assert_eq!(metric(&d, "coap_dtls_sessions"), 2);

    let id = d.async_request("GET", "/v2/endpoints/secure-000001/3/0/2", None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["payload"], support::b64(b"secure-000001").as_str(), "{r}");
    let id = d.async_request(
        "PUT",
        "/v2/subscriptions/secure-000000/3303/0/5700",
        None,
        None,
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    let ours = |e: &serde_json::Value| e["ep"] == "secure-000000" && e["path"] == "/3303/0/5700";
    let events = d.collect_events(WAIT, |e| {
        e.of("notifications").iter().filter(|n| ours(n)).count() >= 2
    });
    let _ = sim.kill();
    let _ = sim.wait();
    assert!(
        events
            .of("notifications")
            .iter()
            .filter(|n| ours(n))
            .count()
            >= 2,
        "{events:?}"
    );
}

/// `coap.trusted_cas`: a device certificate of another CA is accepted once that CA is
/// listed (libcoap over OpenSSL registers with it).
#[test]
fn trusted_cas_admit_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = other_ca(dir.path(), "guest");
    let d = support::Daemon::start_custom(
        &format!(
            "listen_dtls = [\"127.0.0.1:0\"]\ntrusted_cas = [{:?}]",
            path(&ca)
        ),
        "",
    );
    let dtls = d.ready.as_ref().expect("ready file").coap[1];
    let uri = format!("coaps://127.0.0.1:{}/rd?ep=guest&lt=300", dtls.port());
    let (ok, all) = libcoap(
        "coap-client-openssl",
        &[
            "-c",
            path(&cert),
            "-j",
            path(&key),
            "-n",
            "-m",
            "post",
            "-e",
            "</3/0>",
            &uri,
        ],
    );
    assert!(ok && all.contains("2.01"), "{all}\n{}", d.logs().join("\n"));
    assert!(d.get("/endpoints").body.contains("guest"));
}
