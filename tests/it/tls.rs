//! CoAP over TLS (RFC 8323, `coaps+tcp`, `[coap] listen_tls`): devices with a certificate
//! from `POST /api/cert` register through libcoap's `coap-client-openssl` and
//! `coap-client-gnutls`; handshakes without a client certificate, with one from another
//! CA or with an expired one are refused; a registration contradicting the certificate's
//! CN/OU is 4.03; revoking the certificate aborts the device's connection.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

use crate::support::{self, Daemon};

const TLS: &str = "listen_tls = [\"127.0.0.1:0\"]";

/// A device's key, its certificate from `POST /api/cert` and the CA certificate, as files.
struct DeviceCert {
    dir: tempfile::TempDir,
    endpoint: String,
}

impl DeviceCert {
    fn key(&self) -> PathBuf {
        self.dir.path().join("device.key")
    }
    fn cert(&self) -> PathBuf {
        self.dir.path().join("device.pem")
    }
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A P-256 key and the daemon's certificate for it (domain `default`).
fn device_cert(d: &Daemon) -> DeviceCert {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = support::certs::device_certificate(d, dir.path());
    DeviceCert { dir, endpoint }
}

fn tls_addr(d: &Daemon) -> std::net::SocketAddr {
    d.ready.as_ref().expect("ready").coap_tls[0]
}

/// Runs a libcoap client (`coap-client-openssl`, `coap-client-gnutls`) for a registration
/// of `ep` over `coaps+tcp` with `tls` arguments; its exit status and all it printed.
fn register(client: &str, d: &Daemon, ep: &str, tls: &[&str]) -> (bool, String) {
    support::peers::libcoap_client();
    let uri = format!("coaps+tcp://{}/rd?ep={ep}&lt=60&b=T", tls_addr(d));
    let out = Command::new(client)
        .args([
            "-v", "6", "-B", "10", "-m", "post", "-e", "</3/0>", "-t", "40",
        ])
        .args(tls)
        .arg(&uri)
        .output()
        .expect("run the libcoap client");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}

fn registered(d: &Daemon, ep: &str) -> bool {
    let r = d.get("/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.contains(ep)
}

fn cert_args(c: &DeviceCert) -> Vec<String> {
    ["-c", p(&c.cert()), "-j", p(&c.key()), "-C", p(&c.ca())]
        .map(str::to_owned)
        .to_vec()
}

/// libcoap over OpenSSL and over GnuTLS, each with its certificate from `/api/cert`,
/// verifying the daemon's server certificate against the CA certificate it was given:
/// 2.01 Created over `coaps+tcp`, and the endpoint is listed.
#[test]
fn libcoap_registers_over_tls_with_a_device_certificate() {
    let d = Daemon::start_custom(TLS, "");
    for client in ["coap-client-openssl", "coap-client-gnutls"] {
        let c = device_cert(&d);
        let args = cert_args(&c);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, all) = register(client, &d, &c.endpoint, &args);
        assert!(ok, "{client} failed:\n{all}\n{}", d.logs().join("\n"));
        assert!(
            all.contains("c:2.01"),
            "{client}: no 2.01 Created in:\n{all}"
        );
        assert!(
            registered(&d, &c.endpoint),
            "{client}: {} not listed",
            c.endpoint
        );
    }
}

/// No client certificate, a certificate from a CA the daemon does not trust, and an
/// expired certificate signed by the daemon's own CA: the handshake fails, nothing is
/// registered; the daemon's certificate is fine all along (the same client with its own
/// good certificate registers afterwards).
#[test]
fn handshakes_without_a_good_client_certificate_are_refused() {
    let d = Daemon::start_custom(TLS, "");
    let good = device_cert(&d);
    let dir = good.dir.path();
    let ca = good.ca();

    // Another CA, and a device certificate from it with the same subject shape.
    let (other_ca, other_key) = support::certs::foreign_ca(dir);
    let foreign = dir.join("foreign.pem");
    let subject = format!("/OU=default/CN={}", good.endpoint);
    support::certs::sign((&other_ca, &other_key), &good.key(), &subject, &foreign);

    // Expired, signed by the daemon's own CA (its key is in the state directory).
    let (expired, expired_key) = (dir.join("expired.pem"), dir.join("expired.key"));
    support::certs::expired_certificate(&d.state_dir(), &good.endpoint, &expired, &expired_key);

    let key = good.key();
    let cases: [(&str, Vec<&str>); 3] = [
        ("no client certificate", vec!["-C", p(&ca)]),
        (
            "a certificate from another CA",
            vec!["-c", p(&foreign), "-j", p(&key), "-C", p(&ca)],
        ),
        (
            "an expired certificate",
            vec!["-c", p(&expired), "-j", p(&expired_key), "-C", p(&ca)],
        ),
    ];
    for (what, args) in cases {
        let (_, all) = register("coap-client-openssl", &d, &good.endpoint, &args);
        assert!(!all.contains("c:2.01"), "{what}: registered:\n{all}");
        assert!(!registered(&d, &good.endpoint), "{what}: listed");
    }
    assert!(
        d.wait_log("CoAP/TLS handshake failed", Duration::from_secs(5)),
        "the refusals are logged"
    );
    let args = cert_args(&good);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, all) = register("coap-client-openssl", &d, &good.endpoint, &args);
    assert!(ok && all.contains("c:2.01"), "the good certificate:\n{all}");
    assert!(registered(&d, &good.endpoint));
}

/// aiocoap (its TLS client transport, `coaps+tcp`) as a device that stays connected:
/// it registers with its certificate from `/api/cert`, then answers a read and an
/// observation sent back over its own connection; notifications flow over it until the
/// subscription is deleted.
#[test]
fn aiocoap_device_answers_reads_and_observations_over_its_tls_connection() {
    let d = Daemon::start_custom(TLS, "");
    let c = device_cert(&d);
    let tls = format!("{},{},{}", p(&c.ca()), p(&c.cert()), p(&c.key()));
    let dev = support::peers::Lwm2mDevice::start(
        tls_addr(&d),
        &c.endpoint,
        &["--tls", &tls, "--notify-interval", "0.2"],
    );
    let ep = &c.endpoint;
    let id = d.async_request("GET", &format!("/v2/endpoints/{ep}/3/0/0"), None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(support::b64(b"connectord-test").as_str())),
        "{r}"
    );
    let id = d.async_request(
        "PUT",
        &format!("/v2/subscriptions/{ep}/3303/0/5700"),
        None,
        None,
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    let e = d.collect_events(WAIT, |e| e.of("notifications").len() >= 3);
    assert!(e.of("notifications").len() >= 3);
    dev.wait_event(WAIT, |e| e["event"] == "observers" && e["count"] == 1);
    // Unsubscribed: with no RST on TCP, the next notification is answered with a
    // deregistration (GET, Observe=1), and aiocoap drops its observer.
    let r = d.call(
        "DELETE",
        &format!("/v2/subscriptions/{ep}/3303/0/5700"),
        None,
        None,
    );
    assert_eq!(r.status, 204);
    dev.wait_event(WAIT, |e| e["event"] == "observers" && e["count"] == 0);
}

/// `coap.tls_cert`/`coap.tls_key` replace the certificate the CA would issue (libcoap
/// verifies the daemon against that one now); a certificate file that is missing, or a
/// `coap.trusted_cas` file without a certificate, stops the start with the key and the
/// file named.
#[test]
fn a_configured_server_certificate_is_used_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = support::certs::self_signed_server(dir.path());
    let coap = format!(
        "{TLS}\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let d = Daemon::start_custom(&coap, "");
    let c = device_cert(&d);
    let (dev_cert, dev_key) = (c.cert(), c.key());
    let args = ["-c", p(&dev_cert), "-j", p(&dev_key), "-C", p(&cert)];
    let (ok, all) = register("coap-client-openssl", &d, &c.endpoint, &args);
    assert!(ok && all.contains("c:2.01"), "{all}");
    // The CA's certificate does not verify this server any more.
    let c2 = device_cert(&d);
    let args = cert_args(&c2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, all) = register("coap-client-openssl", &d, &c2.endpoint, &args);
    assert!(!all.contains("c:2.01"), "{all}");

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    for (lines, named) in [
        (
            format!(
                "{TLS}\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"{}\"\n",
                key.display()
            ),
            "coap.tls_cert: /nonexistent/c.pem".to_owned(),
        ),
        (
            format!("{TLS}\ntrusted_cas = [\"{}\"]\n", not_pem.display()),
            format!("coap.trusted_cas: {}", not_pem.display()),
        ),
    ] {
        let r = connectord_testkit::Launch::new(support::BIN)
            .coap(&lines)
            .in_process()
            .start();
        let e = r.err().expect("the start fails").to_string();
        assert!(e.contains(&named), "{e}");
    }
}

/// A certificate whose CN is not the `ep=` (or whose OU is not the `d=`) of the
/// registration: 4.03 over `coaps+tcp` for libcoap's OpenSSL and GnuTLS clients; the
/// registration naming its own endpoint goes through on the same certificate.
#[test]
fn a_registration_contradicting_the_certificate_is_refused() {
    let d = Daemon::start_custom(TLS, "");
    let c = device_cert(&d);
    let args = cert_args(&c);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let other_domain = format!("{}&d=other", c.endpoint);
    for client in ["coap-client-openssl", "coap-client-gnutls"] {
        for ep in ["someone-else", other_domain.as_str()] {
            let (_, all) = register(client, &d, ep, &args);
            assert!(
                all.contains("c:4.03") && !all.contains("c:2.01"),
                "{client} ep={ep}:\n{all}"
            );
        }
        assert!(!registered(&d, "someone-else"), "{client}");
    }
    let (ok, all) = register("coap-client-gnutls", &d, &c.endpoint, &args);
    assert!(ok && all.contains("c:2.01"), "{all}");
}

/// Revoking a device's credentials (`DELETE /v2/device-credentials/{ep}`, which revokes
/// its certificates from `/api/cert`) aborts its open `coaps+tcp` connection (an aiocoap
/// device that stays connected) and ends its registration: its next update, on a new
/// connection, fails at the handshake, and libcoap with the same certificate is refused
/// too.
#[test]
fn revoking_a_certificate_aborts_its_tls_connection() {
    let d = Daemon::start_custom(TLS, "");
    let c = device_cert(&d);
    let tls = format!("{},{},{}", p(&c.ca()), p(&c.cert()), p(&c.key()));
    let mut dev = support::peers::Lwm2mDevice::start(tls_addr(&d), &c.endpoint, &["--tls", &tls]);
    dev.command("update");
    let e = dev.wait_event(WAIT, |e| e["event"] == "updated" || e["event"] == "error");
    assert_eq!(e["code"], "2.04", "{e}");

    let r = d.call(
        "DELETE",
        &format!("/v2/device-credentials/{}", c.endpoint),
        None,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    d.expect_log("closed 1 secure sessions that used the old ones", WAIT);
    let shown = d
        .get(&format!("/v2/device-credentials/{}", c.endpoint))
        .json();
    assert!(shown["certificates"][0]["revoked"].is_string(), "{shown}");

    dev.command("update");
    let e = dev.wait_event(WAIT, |e| e["event"] == "error");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("update failed"),
        "{e}"
    );
    assert_eq!(
        dev.events()
            .iter()
            .filter(|e| e["event"] == "updated")
            .count(),
        1,
        "{:?}",
        dev.events()
    );
    // The registration ended with the revocation: not listed, a read is 410 at once.
    assert_eq!(d.get(&format!("/v2/endpoints/{}", c.endpoint)).status, 404);
    let r = d.call(
        "GET",
        &format!("/v2/endpoints/{}/3/0/0", c.endpoint),
        None,
        None,
    );
    assert_eq!(r.status, 410, "{}", r.body);
    let args = cert_args(&c);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, all) = register("coap-client-openssl", &d, &c.endpoint, &args);
    assert!(
        !all.contains("c:2.01"),
        "the revoked certificate registered:\n{all}"
    );
    // Refused for being revoked (the aiocoap device's reconnection, then libcoap's).
    assert!(
        d.wait_log(
            "CoAP/TLS client certificate revoked; aborted",
            Duration::from_secs(5)
        ),
        "{}",
        d.logs().join("\n")
    );
}

/// A rustls client of `coaps+tcp` (blocking), verifying the daemon's certificate for
/// 127.0.0.1 against the CA of `c` and presenting `c`'s certificate (or none).
fn rustls_client(
    d: &Daemon,
    c: &DeviceCert,
    with_cert: bool,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(c.ca()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = if with_cert {
        b.with_client_auth_cert(
            vec![CertificateDer::from_pem_file(c.cert()).unwrap()],
            PrivateKeyDer::from_pem_file(c.key()).unwrap(),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"coap".to_vec()];
    let name = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(tls_addr(d)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads the next RFC 8323 frame from `s` (`buf` keeps what follows it); `None` at the
/// end of the connection or on an error.
fn next_frame(
    s: &mut impl std::io::Read,
    buf: &mut Vec<u8>,
) -> Option<connectord::coap::rfc8323::Frame> {
    use connectord::coap::rfc8323;
    loop {
        if let Ok(Some((f, n))) = rfc8323::decode(buf, 1 << 20) {
            buf.drain(..n);
            return Some(f);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Connects with `c`'s certificate, sends our CSM and reads the daemon's.
fn connected(
    d: &Daemon,
    c: &DeviceCert,
) -> (
    rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    Vec<u8>,
) {
    use connectord::coap::rfc8323;
    use std::io::Write;
    let mut s = rustls_client(d, c, true);
    s.write_all(&rfc8323::encode(&rfc8323::csm(1152))).unwrap();
    s.flush().unwrap();
    let mut buf = Vec::new();
    let csm = next_frame(&mut s, &mut buf).expect("the daemon's CSM");
    assert_eq!(csm.code, rfc8323::CSM);
    (s, buf)
}

/// `openssl s_client` over TLS (`dtls`: false) or DTLS 1.2 to `addr`, verifying the
/// server for the IP address 127.0.0.1 against `ca` and presenting the device
/// certificate of `c`; returns the server certificate it printed (PEM) and its output.
fn s_client(addr: std::net::SocketAddr, dtls: bool, ca: &Path, c: &DeviceCert) -> (String, String) {
    let mut cmd = Command::new("timeout");
    cmd.args(["20", "openssl", "s_client"]);
    if dtls {
        cmd.args(["-dtls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]);
    } else {
        cmd.args(["-alpn", "coap"]);
    }
    let out = cmd
        .args(["-connect", &addr.to_string()])
        .args([
            "-CAfile",
            p(ca),
            "-verify_ip",
            "127.0.0.1",
            "-verify_return_error",
        ])
        .args(["-cert", p(&c.cert()), "-key", p(&c.key())])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let begin = all.find("-----BEGIN CERTIFICATE-----");
    let end = all.find("-----END CERTIFICATE-----");
    let pem = match (begin, end) {
        (Some(b), Some(e)) => all[b..e + "-----END CERTIFICATE-----".len()].to_owned(),
        _ => String::new(),
    };
    (pem, all)
}

/// The DTLS and the TLS listeners present one server certificate: `openssl s_client`
/// over DTLS 1.2 and over TLS, each verifying the daemon for the IP address 127.0.0.1
/// against the CA from `/api/cert`, sees the same one. With `coap.tls_cert`/`tls_key`
/// set, the DTLS listeners present that certificate too.
#[test]
fn dtls_and_tls_present_one_server_certificate_valid_for_127_0_0_1() {
    let both = format!("{TLS}\nlisten_dtls = [\"127.0.0.1:0\"]\n");
    let d = Daemon::start_custom(&both, "");
    let c = device_cert(&d);
    let dtls_addr = d.ready.as_ref().expect("ready").coap_dtls[0];
    let (over_dtls, all_dtls) = s_client(dtls_addr, true, &c.ca(), &c);
    let (over_tls, all_tls) = s_client(tls_addr(&d), false, &c.ca(), &c);
    for (what, pem, all) in [
        ("DTLS", &over_dtls, &all_dtls),
        ("TLS", &over_tls, &all_tls),
    ] {
        assert!(!pem.is_empty(), "{what}: no server certificate:\n{all}");
        assert!(
            all.contains("Verify return code: 0 (ok)"),
            "{what}: not verified for 127.0.0.1:\n{all}"
        );
    }
    assert_eq!(over_dtls, over_tls, "two certificates");
    drop(d);

    // A configured certificate (EC P-256, for 127.0.0.1): both listeners present it.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = support::certs::self_signed_server(dir.path());
    let configured = format!(
        "{both}tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let d = Daemon::start_custom(&configured, "");
    let c = device_cert(&d);
    let dtls_addr = d.ready.as_ref().expect("ready").coap_dtls[0];
    let (over_dtls, all) = s_client(dtls_addr, true, &cert, &c);
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");
    let (over_tls, all) = s_client(tls_addr(&d), false, &cert, &c);
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");
    let configured_pem = std::fs::read_to_string(&cert).unwrap();
    assert_eq!(over_dtls.trim(), configured_pem.trim());
    assert_eq!(over_tls.trim(), configured_pem.trim());
}

/// `/metrics` counts CoAP-over-TLS connections over real ones: the open-connections
/// gauge, completed and failed handshakes, and connections closed by reason (released
/// by the device, aborted on a bad frame, revoked, idle).
#[test]
fn tls_connections_are_counted_in_metrics() {
    use connectord::coap::rfc8323;
    use std::io::Write;
    let closed = |d: &Daemon, reason: &str| {
        d.metric(&format!(
            "coap_tls_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    };
    let d = Daemon::start_custom(TLS, "");
    let c = device_cert(&d);
    assert_eq!(d.metric("coap_tls_connections"), 0);
    assert_eq!(d.metric("coap_tls_handshakes_total"), 0);

    // Open, then released by the device.
    let (mut s, _) = connected(&d, &c);
    assert_eq!(d.metric("coap_tls_connections"), 1);
    assert_eq!(d.metric("coap_tls_handshakes_total"), 1);
    s.write_all(&rfc8323::encode(&rfc8323::signal(rfc8323::RELEASE, &[])))
        .unwrap();
    s.flush().unwrap();
    assert!(support::eventually(WAIT, || closed(&d, "released") == 1));
    assert!(support::eventually(WAIT, || d
        .metric("coap_tls_connections")
        == 0));

    // No client certificate: the handshake fails.
    let mut s = rustls_client(&d, &c, false);
    let _ = s.write_all(&rfc8323::encode(&rfc8323::csm(1152)));
    let _ = s.flush();
    let _ = next_frame(&mut s, &mut Vec::new());
    assert!(support::eventually(WAIT, || d
        .metric("coap_tls_handshakes_failed_total")
        == 1));

    // A frame with a reserved token length: aborted.
    let (mut s, mut buf) = connected(&d, &c);
    s.write_all(&[0x0f, 0x01]).unwrap();
    s.flush().unwrap();
    let abort = next_frame(&mut s, &mut buf).expect("Abort");
    assert_eq!(abort.code, rfc8323::ABORT);
    assert!(support::eventually(WAIT, || closed(&d, "aborted") == 1));

    // Revoked while open, then refused as revoked at its next connection.
    let (mut s, mut buf) = connected(&d, &c);
    let r = d.call(
        "DELETE",
        &format!("/v2/device-credentials/{}", c.endpoint),
        None,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let abort = next_frame(&mut s, &mut buf).expect("Abort");
    assert_eq!(abort.code, rfc8323::ABORT);
    assert!(support::eventually(WAIT, || closed(&d, "revoked") == 1));
    let mut s = rustls_client(&d, &c, true);
    let _ = s.write_all(&rfc8323::encode(&rfc8323::csm(1152)));
    let _ = s.flush();
    while next_frame(&mut s, &mut Vec::new()).is_some() {}
    assert!(support::eventually(WAIT, || closed(&d, "revoked") == 2));
    // Completed handshakes: the released, aborted and revoked-while-open connections
    // (one refused as revoked right after its handshake is counted as revoked only).
    assert_eq!(d.metric("coap_tls_handshakes_total"), 3);
    assert_eq!((closed(&d, "idle"), closed(&d, "closed")), (0, 0));
    assert!(support::eventually(WAIT, || d
        .metric("coap_tls_connections")
        == 0));
    drop(d);

    // Idle past coap.tls_idle_timeout_s: released by the daemon, counted as idle.
    let d = Daemon::start_custom(&format!("{TLS}\ntls_idle_timeout_s = 1\n"), "");
    let c = device_cert(&d);
    let (mut s, mut buf) = connected(&d, &c);
    let release = next_frame(&mut s, &mut buf).expect("Release");
    assert_eq!(release.code, rfc8323::RELEASE);
    assert!(support::eventually(WAIT, || closed(&d, "idle") == 1));
    assert_eq!(closed(&d, "released"), 0);
}

/// A clean stop (SIGTERM) sends Release (7.04, RFC 8323 §5.5) on each open
/// `coaps+tcp` connection before closing it: two rustls clients receive it, then the end
/// of the connection.
#[test]
fn a_clean_stop_releases_every_tls_connection() {
    use connectord::coap::rfc8323;
    let mut d = Daemon::start_custom(TLS, "");
    let c = device_cert(&d);
    let mut conns = vec![connected(&d, &c), connected(&d, &c)];
    assert!(support::eventually(WAIT, || d
        .metric("coap_tls_connections")
        == 2));
    d.signal("TERM");
    for (s, buf) in &mut conns {
        let f = next_frame(s, buf).expect("a frame before the close");
        assert_eq!(f.code, rfc8323::RELEASE, "{f:?}");
        assert!(next_frame(s, buf).is_none(), "closed after the Release");
    }
    assert_eq!(d.wait_exit(WAIT), Some(0));
}

/// `noResp=true` needs non-confirmable requests, which CoAP over TLS (RFC 8323) does not
/// have: seed 000 answers that with 409. Nothing goes to the device, and the refused
/// requests count no transaction against the quota.
#[test]
fn no_resp_to_an_endpoint_over_tls_is_409_and_counts_no_transaction() {
    use connectord::coap::rfc8323;
    use std::io::Write;
    let d = Daemon::start_custom(TLS, "[limits]\ntransaction_quota = 100\n");
    let c = device_cert(&d);
    let (mut s, mut buf) = connected(&d, &c);
    let q = format!("ep={}", c.endpoint);
    let body = rfc8323::body(&[(11, b"rd"), (12, &[40]), (15, q.as_bytes())], b"</3/0>");
    let post = rfc8323::Frame {
        code: 0x02,
        token: vec![7],
        body,
    };
    s.write_all(&rfc8323::encode(&post)).unwrap();
    s.flush().unwrap();
    let created = next_frame(&mut s, &mut buf).expect("the registration's answer");
    assert_eq!(created.code, 0x41, "2.01 Created");
    let before = d.get("/v2/limits").json()["transaction-count"].clone();
    assert_eq!(before, 1, "the registration");
    let path = format!("/v2/endpoints/{}/3/0/1?noResp=true", c.endpoint);
    for _ in 0..3 {
        let r = d.call("PUT", &path, Some("text/plain"), Some(b"x"));
        assert_eq!(r.status, 409, "{}", r.body);
        assert_eq!(r.json()["type"], "conflict", "{}", r.body);
        assert!(r.body.contains("TLS"), "{}", r.body);
    }
    assert_eq!(d.get("/v2/limits").json()["transaction-count"], before);
    // Nothing was sent to the device: the connection has no request for it.
    s.get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(
        next_frame(&mut s, &mut buf).is_none(),
        "a request reached the device"
    );
}

/// A device whose connection ends while a read waits for its answer: the read fails at
/// once (502), not after MAX_TRANSMIT_WAIT (93 s). The listener reports the closed
/// connection as RSTs after it forgot the connection; the identity check of the
/// transmission's ACK/RST must take them (this session's review: it refused them).
#[test]
fn a_read_fails_at_once_when_the_devices_tls_connection_ends() {
    use coap_lite::{CoapOption, MessageClass, Packet, RequestType};
    use connectord::coap::rfc8323;
    use std::io::Write;
    let d = Daemon::start_custom(TLS, "");
    let c = device_cert(&d);
    let (mut s, mut buf) = connected(&d, &c);
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Post);
    p.add_option(CoapOption::UriPath, b"rd".to_vec());
    p.add_option(CoapOption::ContentFormat, vec![40]);
    p.add_option(
        CoapOption::UriQuery,
        format!("ep={}", c.endpoint).into_bytes(),
    );
    p.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
    p.payload = b"</3/0>".to_vec();
    // The frame's options and payload: the UDP encoding without its 4-byte header.
    let body = p.to_bytes().unwrap()[4..].to_vec();
    let register = rfc8323::Frame {
        code: 0x02,
        token: vec![7],
        body,
    };
    s.write_all(&rfc8323::encode(&register)).unwrap();
    s.flush().unwrap();
    let created = next_frame(&mut s, &mut buf).expect("the registration's answer");
    assert_eq!(created.code, 0x41, "2.01");
    let id = d.async_request(
        "GET",
        &format!("/v2/endpoints/{}/3/0/0", c.endpoint),
        None,
        None,
    );
    let read = next_frame(&mut s, &mut buf).expect("the read");
    assert_eq!(read.code, 0x01, "GET");
    let started = std::time::Instant::now();
    drop(s);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 502, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// `check-config` reads `coap.tls_cert`/`coap.tls_key` as the start does (it read only
/// the HTTPS files, and called valid a CoAP certificate the start refused), says a cut-short
/// file in words (the PEM reader's markers were printed as byte arrays: an outside review),
/// names a key that does not match, and notes a certificate that no listener presents.
#[test]
fn check_config_reads_the_coap_certificate_as_the_start_does() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = support::certs::self_signed_server(dir.path());
    let cut = dir.path().join("cut.pem");
    let text = std::fs::read(&cert).unwrap();
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let (other, _) = support::certs::self_signed_server(&other_dir);
    let file = dir.path().join("c.toml");
    let check = |cert: &Path, listener: bool| {
        let listen = if listener { TLS } else { "" };
        std::fs::write(
            &file,
            format!(
                "[coap]\n{listen}\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        support::check_config(&file)
    };
    let (ok, stderr) = check(&cut, true);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("coap.tls_cert: {}", cut.display()))
            && stderr.contains("no line -----END CERTIFICATE----- (is the file cut short?)")
            && !stderr.contains("[67, 69"),
        "{stderr}"
    );
    let (ok, stderr) = check(&other, true);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("the key does not match the certificate"),
        "{stderr}"
    );
    let (ok, stderr) = check(&cert, true);
    assert!(ok && stderr.is_empty(), "{stderr}");
    let (ok, stderr) = check(&cert, false);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("no coap.listen_tls or coap.listen_dtls listener presents them"),
        "{stderr}"
    );
}
