//! The REST API over HTTPS (`rest.listen_tls`, `rest.tls_cert`, `rest.tls_key`): served
//! to TLS stacks nobody here wrote (curl with OpenSSL, HTTP/1.1 and HTTP/2) and to a
//! rustls client that reads the certificate it was given; plain HTTP to the HTTPS port
//! refused cleanly; the certificate swapped by SIGHUP for new connections only, and kept
//! when the new files are unusable; an unusable certificate refusing the start.
//! Certificates are made here with rcgen: a CA of the test and leaves it signs, each with
//! its own serial so that a client can tell which one it was served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use connectord_testkit::Launch;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::{self, BIN, Daemon, eventually, http_get};

/// How long a test waits for a log line or a connection's end.
const WAIT: Duration = Duration::from_secs(10);

/// A CA of the test and the server certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
    ca_der: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "connectord https test CA");
        let ca = params.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        Pki {
            dir,
            ca_der: ca.der().to_vec(),
            issuer: rcgen::Issuer::new(params, ca_key),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_pem(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A server certificate for 127.0.0.1 and localhost with `serial`, signed by the CA;
    /// returns its PEM and its key's PEM.
    fn leaf(&self, serial: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial.to_be_bytes()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("connectord {serial:x}"));
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf with `serial` to `<name>.crt` and `<name>.key`.
    fn write_leaf(&self, name: &str, serial: u64) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(serial);
        let (c, k) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&c, cert).expect("write cert");
        std::fs::write(&k, key).expect("write key");
        (c, k)
    }

    /// The `[rest]` lines of an HTTPS listener on a free port with these files.
    fn rest_lines(cert: &Path, key: &Path, more: &str) -> String {
        format!(
            "listen_tls = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{more}",
            cert.display(),
            key.display()
        )
    }

    /// A client configuration trusting the CA alone, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A daemon process with an HTTPS listener on the files `cert` and `key`, and `more`
/// `[rest]` lines.
fn start(cert: &Path, key: &Path, more: &str) -> Daemon {
    Daemon(
        Launch::new(BIN)
            .rest(&Pki::rest_lines(cert, key, more))
            .start()
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

fn https_addr(d: &Daemon) -> SocketAddr {
    let ready = d.ready.as_ref().expect("ready file");
    assert_eq!(ready.rest_tls.len(), 1, "one HTTPS address: {ready:?}");
    ready.rest_tls[0]
}

/// A TLS connection made by rustls (HTTP/1.1 spoken on it by hand).
type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the handshake with `config`, for 127.0.0.1.
fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Tls, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(s)
}

/// The serial number of the certificate the server gave.
fn served_serial(s: &Tls) -> u64 {
    let chain = s.conn.peer_certificates().expect("a certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).expect("X.509");
    let raw = cert.raw_serial();
    assert!(raw.len() <= 9, "a test serial: {raw:?}");
    raw.iter().fold(0, |n, b| n << 8 | u64::from(*b))
}

/// The serial `connect` + [`served_serial`] see on a new connection.
fn serial_now(addr: SocketAddr, pki: &Pki) -> u64 {
    served_serial(&connect(addr, pki.client(&[b"http/1.1"])).expect("TLS"))
}

/// `GET path` with `key` on a kept-alive HTTP/1.1 connection; returns status and body.
fn get(s: &mut impl ReadWrite, path: &str, key: &str) -> (u16, String) {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n\r\n"
    )
    .expect("write request");
    s.flush().expect("flush");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the answer ended early ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8(head).expect("UTF-8 head");
    let status = head[9..12].parse().expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    (status, String::from_utf8(body).expect("UTF-8 body"))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// curl (OpenSSL), installed with apt-get when missing and the tests run as root.
fn curl() -> &'static str {
    const CURL: &str = "/usr/bin/curl";
    if !Path::new(CURL).exists() {
        let root = support::is_root();
        assert!(root, "{CURL} is missing: run `sudo apt-get install curl`");
        support::apt_install(&["curl"]);
    }
    CURL
}

/// Runs curl with `args` (bounded to 10 s); returns its exit code and stdout, stderr.
fn run_curl(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(curl())
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl gets `/v2/endpoints` over HTTPS, trusting the test's CA alone: HTTP/1.1, and
/// HTTP/2 chosen by ALPN; without the CA it refuses the certificate; the plain listener
/// stays plain beside it. A rustls client sees ALPN answer what it offered.
#[test]
fn curl_reads_endpoints_over_https_with_http1_and_http2() {
    let pki = Pki::new();
    let (cert, key) = pki.write_leaf("server", 0x51);
    let d = start(&cert, &key, "");
    d.device()
        .register(&["ep=https-sensor", "lt=300"], "</3303/0>");
    let addr = https_addr(&d);
    let url = format!("https://{addr}/v2/endpoints");
    let auth = format!("authorization: Bearer {}", d.key);
    let ca = pki.ca_pem();
    let ca = ca.to_str().expect("path");
    let write_out = "\n%{http_version} %{http_code}";
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (code, out, err) =
            run_curl(&[flag, "--cacert", ca, "-H", &auth, "-w", write_out, &url]);
        assert_eq!(code, Some(0), "curl {flag}: {err}");
        let (body, last) = out.rsplit_once('\n').expect("write-out line");
        assert_eq!(last, format!("{version} 200"), "{out}");
        let eps: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(eps[0]["name"], "https-sensor", "{body}");
    }
    // Authentication applies over HTTPS as over HTTP. (curl offers h2 by default, and
    // gets it.)
    let (_, out, _) = run_curl(&["--cacert", ca, "-w", write_out, &url]);
    assert!(out.ends_with("\n2 401"), "{out}");
    // Without the CA, curl cannot verify the chain (60: peer certificate problem).
    let (code, _, err) = run_curl(&["-H", &auth, &url]);
    assert_eq!(code, Some(60), "{err}");
    // The plain listener still speaks plain HTTP.
    let (code, out, err) = run_curl(&[
        "-H",
        &auth,
        "-w",
        write_out,
        &format!("http://{}/v2/endpoints", d.rest),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with("1.1 200"), "{out}");
    // ALPN: the server takes h2 when offered, http/1.1 otherwise; no ALPN at all is
    // HTTP/1.1 too.
    for (offered, chosen) in [
        (&[&b"h2"[..], b"http/1.1"][..], Some(&b"h2"[..])),
        (&[&b"http/1.1"[..]][..], Some(&b"http/1.1"[..])),
        (&[][..], None),
    ] {
        let mut s = connect(addr, pki.client(offered)).expect("TLS");
        assert_eq!(s.conn.alpn_protocol(), chosen, "offered {offered:?}");
        assert_eq!(served_serial(&s), 0x51);
        if chosen != Some(b"h2") {
            assert_eq!(get(&mut s, "/v2/endpoints", &d.key).0, 200);
        }
    }
}

/// Plain HTTP sent to the HTTPS port is answered 400 (`https_required`) and the
/// connection closed without a reset; a client that says nothing is closed after
/// rest.tls_handshake_timeout_s. Both are counted, and HTTPS goes on being served.
#[test]
fn plain_http_and_silence_on_the_https_port_are_refused_cleanly() {
    let pki = Pki::new();
    let (cert, key) = pki.write_leaf("server", 0x52);
    let d = start(&cert, &key, "tls_handshake_timeout_s = 1\n");
    let addr = https_addr(&d);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(b"GET /v2/endpoints HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("an answer, then a clean close (no reset)");
    let text = String::from_utf8(out).expect("UTF-8");
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").expect("body").1).expect("JSON");
    assert_eq!(body["type"], "https_required", "{text}");
    // curl too, with the URL's scheme wrong.
    let (code, out, err) = run_curl(&[
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}/v2/endpoints"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with("\n400") && out.contains("https://"), "{out}");

    // Silence: closed once the handshake time is over, not before.
    let mut silent = TcpStream::connect(addr).expect("connect");
    silent.set_read_timeout(Some(WAIT)).expect("timeout");
    let t0 = Instant::now();
    let n = silent.read(&mut [0u8; 16]);
    let waited = t0.elapsed();
    assert!(matches!(n, Ok(0)), "closed: {n:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    // Half a handshake: the same.
    let mut half = TcpStream::connect(addr).expect("connect");
    half.set_read_timeout(Some(WAIT)).expect("timeout");
    half.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x01])
        .expect("write");
    let t0 = Instant::now();
    let n = half.read(&mut [0u8; 16]);
    assert!(matches!(n, Ok(0)) || n.is_err(), "closed: {n:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    assert_eq!(d.metric("rest_tls_handshake_failures_total"), 4);
    let mut s = connect(addr, pki.client(&[b"http/1.1"])).expect("still serving HTTPS");
    assert_eq!(get(&mut s, "/v2/endpoints", &d.key).0, 200);
}

/// HTTPS connections count against the same bounds as plain ones: past
/// rest.max_connections_per_address, a new one is closed before its handshake (and
/// counted); once one closes, the next is served.
#[test]
fn https_connections_count_against_the_connection_bounds() {
    let pki = Pki::new();
    let (cert, key) = pki.write_leaf("server", 0x53);
    let d = start(&cert, &key, "max_connections_per_address = 2\n");
    let addr = https_addr(&d);
    let client = pki.client(&[b"http/1.1"]);
    let mut first = connect(addr, Arc::clone(&client)).expect("first");
    let second = connect(addr, Arc::clone(&client)).expect("second");
    assert_eq!(get(&mut first, "/v2/endpoints", &d.key).0, 200);
    let third = connect(addr, Arc::clone(&client));
    assert!(
        third.is_err(),
        "a third connection from the address is refused"
    );
    drop(second);
    assert!(
        eventually(WAIT, || connect(addr, Arc::clone(&client)).is_ok()),
        "served again once one closed"
    );
    drop(first);
    // The metrics are read over the plain listener: a connection of its own, also from
    // 127.0.0.1, served once the HTTPS ones above have closed.
    let url = format!("http://{}/metrics", d.rest);
    assert!(
        eventually(WAIT, || {
            let m = http_get(&url, Some(&d.key), None);
            // At least the third; a retry above may have come before the server saw
            // the second close.
            m.status == 200
                && m.body.lines().any(|l| {
                    l.strip_prefix("connectord_rest_connections_refused_total ")
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|n| n >= 1)
                })
        }),
        "the refusal is counted"
    );
}

/// SIGHUP re-reads the certificate: new connections get the new one, an open
/// connection keeps its own and is still served. Unusable new files (no certificate, a
/// key of another certificate) are logged naming the file and change nothing. New paths
/// in the configuration are taken without a restart.
#[test]
fn sighup_swaps_the_certificate_for_new_connections_only() {
    let pki = Pki::new();
    let (cert, key) = pki.write_leaf("server", 0x1001);
    let d = start(&cert, &key, "");
    let addr = https_addr(&d);
    let mut open = connect(addr, pki.client(&[b"http/1.1"])).expect("TLS");
    assert_eq!(served_serial(&open), 0x1001);
    assert_eq!(get(&mut open, "/v2/endpoints", &d.key).0, 200);

    // Renewed in place, then SIGHUP.
    pki.write_leaf("server", 0x1002);
    let reloads = |d: &Daemon| {
        d.logs()
            .iter()
            .filter(|l| l.contains("SIGHUP: REST HTTPS certificate reloaded"))
            .count()
    };
    d.signal("HUP");
    assert!(eventually(WAIT, || reloads(&d) == 1), "{:#?}", d.logs());
    assert_eq!(serial_now(addr, &pki), 0x1002);
    assert_eq!(served_serial(&open), 0x1001);
    assert_eq!(
        get(&mut open, "/v2/endpoints", &d.key).0,
        200,
        "the open connection is still served"
    );

    // Unusable files: the error names the file and the cause; 0x1002 stays.
    let (other_cert, _) = pki.leaf(0x1003);
    let (_, other_key) = pki.leaf(0x1004);
    let broken = [
        (
            "not a certificate".to_string(),
            None,
            "rest.tls_cert",
            "no certificate in the file",
        ),
        (
            other_cert,
            Some(other_key),
            "rest.tls_key",
            "does not match the certificate",
        ),
    ];
    for (i, (cert_text, key_text, named, why)) in broken.into_iter().enumerate() {
        std::fs::write(&cert, cert_text).expect("write");
        if let Some(k) = key_text {
            std::fs::write(&key, k).expect("write");
        }
        let file = if named == "rest.tls_cert" {
            &cert
        } else {
            &key
        };
        let needle = format!("{named} {}: ", file.display());
        d.signal("HUP");
        assert!(
            eventually(WAIT, || d
                .logs()
                .iter()
                .filter(
                    // Refused with the whole file (`daemon::validate`, as check-config
                    // and the next start would refuse it).
                    |l| l.contains("SIGHUP: configuration not reloaded")
                        && l.contains(&needle)
                        && l.contains(why)
                )
                .count()
                == 1),
            "case {i}: {:#?}",
            d.logs()
        );
        assert_eq!(serial_now(addr, &pki), 0x1002, "case {i}");
    }

    // Other files named in the configuration: taken at the next SIGHUP, no restart.
    let (new_cert, new_key) = pki.write_leaf("renamed", 0x1005);
    let text = std::fs::read_to_string(&d.config_path).expect("config");
    let text = text
        .replace(&cert.display().to_string(), &new_cert.display().to_string())
        .replace(&key.display().to_string(), &new_key.display().to_string());
    std::fs::write(&d.config_path, text).expect("config");
    d.signal("HUP");
    assert!(eventually(WAIT, || reloads(&d) == 2), "{:#?}", d.logs());
    assert_eq!(serial_now(addr, &pki), 0x1005);
    assert!(
        !d.logs()
            .iter()
            .any(|l| l.contains("take effect after a restart")),
        "{:#?}",
        d.logs()
    );
    assert!(d.logs().iter().any(|l| l.contains(&format!(
        "SIGHUP: REST HTTPS certificate reloaded from {}",
        new_cert.display()
    ))));
}

/// A certificate or key that cannot be used refuses the start (and `check-config`), the
/// message naming the key, the file and the cause; so do HTTPS keys that do not go
/// together.
#[test]
fn an_unusable_certificate_refuses_the_start() {
    let pki = Pki::new();
    let (cert, key) = pki.write_leaf("server", 0x54);
    let (_, other_key) = pki.write_leaf("other", 0x55);
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let missing = pki.path("missing.key");
    let cases: [(String, String); 5] = [
        (
            Pki::rest_lines(&garbage, &key, ""),
            format!("rest.tls_cert {}: not a valid PEM file", garbage.display()),
        ),
        (
            Pki::rest_lines(&cert, &missing, ""),
            format!("rest.tls_key {}: cannot read it", missing.display()),
        ),
        (
            Pki::rest_lines(&cert, &other_key, ""),
            format!(
                "rest.tls_key {}: the key does not match the certificate of rest.tls_cert {}",
                other_key.display(),
                cert.display()
            ),
        ),
        (
            format!(
                "listen_tls = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\n",
                cert.display()
            ),
            "key `rest.tls_key`: is needed with rest.listen_tls".into(),
        ),
        (
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                cert.display(),
                key.display()
            ),
            "key `rest.tls_cert`: is set but rest.listen_tls is empty".into(),
        ),
    ];
    for (lines, expected) in cases {
        let prepared = Launch::new(BIN).rest(&lines).prepare().expect("prepare");
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&prepared.config_path)
            .output()
            .expect("check-config");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&expected),
            "check-config: {err}"
        );
        match prepared.start() {
            Err(connectord_testkit::StartError::Exited { status, log }) => {
                assert!(!status.success());
                assert!(
                    log.lines()
                        .any(|l| l.starts_with("error: ") && l.contains(&expected)),
                    "expected {expected:?} in:\n{log}"
                );
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("started with {lines}"),
        }
    }
}
