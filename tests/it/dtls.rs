//! CoAP over DTLS (`[coap] listen_dtls`) through the real daemon: libcoap's clients
//! (OpenSSL and GnuTLS builds) handshake with a device certificate issued by `POST
//! /api/cert` and register; a certificate from another CA and an expired one are refused
//! and counted. PSKs provisioned with `connectord credentials put` or the REST API let
//! libcoap register bound to the credential's endpoint (`ep=`/`d=` contradicting it 4.03,
//! a wrong key refused at the handshake, plain CoAP for the endpoint 4.03); `connectord
//! simulate --psk`/`--cert` answers reads and observations over its session; replacing
//! or revoking a PSK, or revoking a certificate, closes the open session; PSKs and
//! revocations hold across a restart. (The handshake bounds are tested against
//! the listener itself, `daemon/coap/tests/dtls.rs`.)
//! RFC 9146: a device with a provisioned PSK whose address changes keeps its session
//! (`a_dtls_device_whose_address_changes_keeps_its_session`, our dimpl client), and so
//! does wolfSSL's DTLS client, an implementation nobody here wrote
//! (`wolfssl_keeps_its_dtls_session_when_its_port_changes`, tests/peers/wolfssl-cid).

use std::net::SocketAddr;
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

use crate::support::certs::{
    device_certificate, expired_certificate, foreign_ca, p256_key, path, sign,
};

/// A CA of its own (openssl) in `dir` and a device certificate it signed for
/// `OU=default, CN=<cn>`: the CA's PEM, the device's certificate and key.
fn other_ca(dir: &Path, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = foreign_ca(dir);
    let (cert, key) = (dir.join("other.pem"), dir.join("other.key"));
    p256_key(&key);
    sign((&ca, &ca_key), &key, &format!("/OU=default/CN={cn}"), &cert);
    (ca, cert, key)
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
        (ready.coap.len(), ready.coap_dtls.len()),
        (1, 1),
        "a UDP and a DTLS listener: {ready:?}"
    );
    let dtls = ready.coap_dtls[0];
    let dir = tempfile::tempdir().unwrap();
    let endpoint = device_certificate(&d, dir.path());
    let key = dir.path().join("device.key");
    let (ca, cert) = (dir.path().join("ca.pem"), dir.path().join("device.pem"));

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
            ok && all.contains("c:2.01"),
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
    expired_certificate(&d.state_dir(), "old", &expired, &expired_key);
    let before = metric(&d, "coap_dtls_handshakes_failed_total");
    let mut refused = 0;
    for (cert, key, what) in [
        (&other, &other_key, "another CA"),
        (&expired, &expired_key, "expired"),
    ] {
        for bin in ["coap-client-openssl", "coap-client-gnutls"] {
            let (_, all) = register(bin, cert, key, "intruder");
            assert!(
                !all.contains("c:2.01"),
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

/// `connectord simulate` as one device with a credential: the endpoint `args` name
/// (`--endpoint`), over DTLS to `d`, notifying every 200 ms.
fn simulate_secure(d: &support::Daemon, args: &[&str]) -> (std::process::Child, u64) {
    let sessions = metric(d, "coap_dtls_sessions");
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    let child = Command::new(support::BIN)
        .args(["simulate", "--notify-interval", "200"])
        .args(["--server", &dtls.to_string()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("connectord simulate");
    (child, sessions)
}

/// A proxied read and an observation reach the simulated device `ep` over its DTLS
/// session (REST -> daemon -> device -> REST), which is one more DTLS session than the
/// daemon had before (`sim`: the process and that count); `sim` is killed at the end.
fn read_and_observe(d: &support::Daemon, sim: (std::process::Child, u64), ep: &str) {
    let (mut sim, sessions) = sim;
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(15);
    let registered =
        support::eventually(WAIT, || d.get(&format!("/v2/endpoints/{ep}")).status == 200);
    if !registered {
        let _ = sim.kill();
        panic!(
            "{ep} not registered over DTLS: {}\n{}",
            d.get("/v2/endpoints").body,
            d.logs().join("\n")
        );
    }
    assert_eq!(metric(d, "coap_dtls_sessions"), sessions + 1);
    let id = d.async_request("GET", &format!("/v2/endpoints/{ep}/3/0/2"), None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["payload"], support::b64(ep.as_bytes()).as_str(), "{r}");
    let id = d.async_request(
        "PUT",
        &format!("/v2/subscriptions/{ep}/3303/0/5700"),
        None,
        None,
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    let ours = |e: &serde_json::Value| e["ep"] == ep && e["path"] == "/3303/0/5700";
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
    // Nothing of this went over plain UDP: the registration is the DTLS listener's.
    assert_eq!(metric(d, "coap_plain_refused_total"), 0);
}

/// `connectord simulate --endpoint <CN> --cert --key` registers over DTLS; a read and an
/// observation go to the device through its DTLS session. (Without `--endpoint` the
/// simulator's names contradict the certificate's CN: refused, see below.)
#[test]
fn reads_and_observations_reach_a_simulated_dtls_device() {
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let dir = tempfile::tempdir().unwrap();
    let ep = device_certificate(&d, dir.path());
    let sim = simulate_secure(
        &d,
        &[
            "--endpoint",
            &ep,
            "--cert",
            path(&dir.path().join("device.pem")),
            "--key",
            path(&dir.path().join("device.key")),
        ],
    );
    read_and_observe(&d, sim, &ep);
}

/// `connectord simulate --psk IDENTITY:HEXKEY` with a PSK provisioned for its endpoint:
/// it registers over DTLS and answers a proxied read and an observation over its
/// session; the same simulator named otherwise is refused (4.03, it registers nothing).
#[test]
fn a_simulated_device_with_a_provisioned_psk_is_read_and_observed() {
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let r = put_psk(&d, "sim-psk", "sim-psk-id", &psk_hex(PSK_TEXT));
    assert_eq!(r.status, 201, "{}", r.body);
    let psk = format!("sim-psk-id:{}", psk_hex(PSK_TEXT));
    let out = Command::new(support::BIN)
        .args(["simulate", "--devices", "1", "--prefix", "other-"])
        .args([
            "--server",
            &d.ready.as_ref().unwrap().coap_dtls[0].to_string(),
        ])
        .args(["--psk", &psk])
        .output()
        .expect("connectord simulate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("contradicts the credential"), "{err}");
    assert_eq!(d.get("/v2/endpoints/other-000000").status, 404);
    let sim = simulate_secure(&d, &["--endpoint", "sim-psk", "--psk", &psk]);
    read_and_observe(&d, sim, "sim-psk");
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
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
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
    assert!(
        ok && all.contains("c:2.01"),
        "{all}\n{}",
        d.logs().join("\n")
    );
    assert!(d.get("/endpoints").body.contains("guest"));
}

// ---- PSKs from the credential store, end to end (issue 21, items 3, 4, 7) ----

/// The PSK the libcoap tests give with `-k` (libcoap takes the key as text).
const PSK_TEXT: &str = "e2e-secret-key-16";

pub(crate) fn psk_hex(text: &str) -> String {
    hex::encode(text.as_bytes())
}

/// `connectord credentials …` against `d` through the binary, which must succeed.
fn credentials_cli(d: &support::Daemon, args: &[&str]) -> String {
    let out = support::run_ok(
        Command::new(support::BIN)
            .arg("credentials")
            .args(args)
            .args(["--config", path(&d.config_path)])
            .args(["--url", &format!("http://{}", d.rest)])
            .env_remove("CONNECTORD_API_KEY"),
        &format!("connectord credentials {args:?}"),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn put_psk(
    d: &support::Daemon,
    ep: &str,
    identity: &str,
    key_hex: &str,
) -> support::Http {
    d.send_json(
        "PUT",
        &format!("/v2/device-credentials/{ep}"),
        json!({"psk_identity": identity, "psk": key_hex}).to_string(),
    )
}

/// A registration through libcoap's `bin` over DTLS with PSK `identity`/`key` (text) and
/// `query` (`lt=300` added): whether it exited 0 and all it printed.
fn psk_register(
    bin: &str,
    dtls: SocketAddr,
    identity: &str,
    key: &str,
    query: &str,
) -> (bool, String) {
    let uri = format!("coaps://127.0.0.1:{}/rd?lt=300{query}", dtls.port());
    libcoap(
        bin,
        &[
            "-u", identity, "-k", key, "-m", "post", "-e", "</3/0>", &uri,
        ],
    )
}

/// The response code libcoap logged for its request (`c:2.01`), if any.
fn answered(all: &str) -> Option<String> {
    all.lines()
        .filter(|l| l.contains("t:ACK") || l.contains("t:CON") || l.contains("t:NON"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("c:")))
        .find(|c| {
            c.as_bytes()
                .first()
                .is_some_and(|b| (b'2'..=b'5').contains(b))
        })
        .map(str::to_owned)
}

/// The registration id in the `Location-Path` libcoap logged (`rd/<id>`).
fn location_id(all: &str) -> String {
    all.lines()
        .filter(|l| l.contains("c:2.01"))
        .find_map(|l| {
            let segments: Vec<&str> = l
                .split("Location-Path:")
                .skip(1)
                .map(|s| s.split([',', ' ', ']']).next().unwrap_or(""))
                .collect();
            match segments.as_slice() {
                ["rd", id] => Some(id.to_string()),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no Location-Path rd/<id> in:\n{all}"))
}

fn wait_metric(d: &support::Daemon, name: &str, want: u64) -> u64 {
    support::eventually(std::time::Duration::from_secs(5), || {
        metric(d, name) == want
    });
    metric(d, name)
}

/// A PSK provisioned with `connectord credentials put` (the CLI) and one provisioned with
/// `PUT /v2/device-credentials` let libcoap's OpenSSL and GnuTLS clients register over
/// DTLS without `ep=` (the endpoint is the credential's); `ep=` of another endpoint and
/// `d=` of another domain are 4.03; a wrong key fails the handshake; the endpoints over
/// plain CoAP are 4.03 and counted; a plain update or de-registration of a registration
/// made over DTLS is 4.03.
#[test]
fn provisioned_psks_register_libcoap_over_dtls_bound_to_their_endpoint() {
    use coap_lite::ResponseType;
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    let out = credentials_cli(
        &d,
        &[
            "put",
            "cli-dev",
            "--psk-identity",
            "cli-id",
            "--psk",
            &psk_hex(PSK_TEXT),
        ],
    );
    assert!(out.contains("\"cli-id\""), "{out}");
    let r = put_psk(&d, "api-dev", "api-id", &psk_hex("api-secret-key-16"));
    assert_eq!(r.status, 201, "{}", r.body);

    let mut handshakes = 0;
    for bin in ["coap-client-openssl", "coap-client-gnutls"] {
        for (identity, key, ep) in [
            ("cli-id", PSK_TEXT, "cli-dev"),
            ("api-id", "api-secret-key-16", "api-dev"),
        ] {
            let (ok, all) = psk_register(bin, dtls, identity, key, "");
            assert!(
                ok && answered(&all).as_deref() == Some("2.01"),
                "{bin} with {identity}:\n{all}\n{}",
                d.logs().join("\n")
            );
            handshakes += 1;
            let r = d.get(&format!("/v2/endpoints/{ep}"));
            assert_eq!(r.status, 200, "{bin}: {ep} not registered: {}", r.body);
        }
    }
    assert_eq!(metric(&d, "coap_dtls_handshakes_total"), handshakes);
    // Naming another endpoint, or another domain, than the credential's: 4.03.
    for bin in ["coap-client-openssl", "coap-client-gnutls"] {
        for query in ["&ep=api-dev", "&ep=cli-dev&d=other", "&ep=someone-else"] {
            let (_, all) = psk_register(bin, dtls, "cli-id", PSK_TEXT, query);
            assert_eq!(
                answered(&all).as_deref(),
                Some("4.03"),
                "{bin} {query}:\n{all}"
            );
        }
    }
    assert_eq!(d.get("/v2/endpoints/someone-else").status, 404);
    // A wrong key: the handshake fails, nothing is answered.
    let failed = metric(&d, "coap_dtls_handshakes_failed_total");
    for (i, bin) in ["coap-client-openssl", "coap-client-gnutls"]
        .iter()
        .enumerate()
    {
        let (ok, all) = psk_register(bin, dtls, "cli-id", "not-the-key-16byte", "");
        assert!(
            !ok || answered(&all).is_none(),
            "{bin} with a wrong key:\n{all}"
        );
        assert_eq!(answered(&all), None, "{bin}:\n{all}");
        assert_eq!(
            wait_metric(
                &d,
                "coap_dtls_handshakes_failed_total",
                failed + i as u64 + 1
            ),
            failed + i as u64 + 1,
            "{bin}"
        );
    }
    // Plain CoAP for these endpoints: 4.03, counted.
    let mut dev = d.device();
    for ep in ["cli-dev", "api-dev"] {
        let q = format!("ep={ep}");
        let mut req = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
        let query = [q.as_str(), "lt=60"];
        req.query = &query;
        req.payload = b"</3/0>";
        let r = dev.request(&req);
        assert_eq!(support::coap::code(&r), ResponseType::Forbidden, "{ep}");
    }
    assert_eq!(metric(&d, "coap_plain_refused_total"), 2);

    // A plain update or de-registration of the DTLS registration: 4.03; it stays.
    let (ok, all) = psk_register("coap-client-openssl", dtls, "cli-id", PSK_TEXT, "");
    assert!(ok, "{all}");
    let id = location_id(&all);
    assert_eq!(dev.update(&id, &[], None), ResponseType::Forbidden);
    assert_eq!(dev.deregister(&id), ResponseType::Forbidden);
    assert_eq!(metric(&d, "coap_plain_refused_total"), 4);
    assert_eq!(d.get("/v2/endpoints/cli-dev").status, 200);
    // The same update over DTLS with the credential is accepted (2.04).
    let uri = format!("coaps://127.0.0.1:{}/rd/{id}", dtls.port());
    let (_, all) = libcoap(
        "coap-client-openssl",
        &["-u", "cli-id", "-k", PSK_TEXT, "-m", "post", &uri],
    );
    assert_eq!(answered(&all).as_deref(), Some("2.04"), "{all}");
}

/// A device that holds its DTLS session between requests (libcoap's client closes it
/// when it exits): the DTLS client of `connectord-coap` (dimpl) over a real UDP socket,
/// blocking, the requests built by the testkit's CoAP device.
pub(crate) struct DtlsDevice {
    coap: support::coap::Device,
    session: connectord::coap::dtls::client::DtlsClient,
}

impl DtlsDevice {
    /// Handshakes with `server` with PSK `identity`/`key` within 5 s.
    pub(crate) fn connect(
        server: SocketAddr,
        identity: &str,
        key: &str,
    ) -> Result<DtlsDevice, String> {
        DtlsDevice::connect_with(
            server,
            connectord::coap::dtls::client::ClientAuth::Psk {
                identity: identity.as_bytes().to_vec(),
                key: key.as_bytes().to_vec(),
            },
        )
    }

    /// Handshakes with `server` with the certificate `device.pem` and key `device.key` in
    /// `dir` within 5 s.
    pub(crate) fn connect_cert(server: SocketAddr, dir: &Path) -> Result<DtlsDevice, String> {
        let auth = connectord::coap::dtls::client::ClientAuth::certificate_from_files(
            &dir.join("device.pem"),
            &dir.join("device.key"),
        )?;
        DtlsDevice::connect_with(server, auth)
    }

    fn connect_with(
        server: SocketAddr,
        auth: connectord::coap::dtls::client::ClientAuth,
    ) -> Result<DtlsDevice, String> {
        use connectord::coap::dtls::client::{ClientConfig, DtlsClient};
        use std::time::{Duration, Instant};
        let cfg = ClientConfig::new(auth).map_err(|e| e.to_string())?;
        let coap = support::coap::Device::new(server);
        let mut session = DtlsClient::new(&cfg, Instant::now());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = session.poll();
        loop {
            for record in out.drain(..) {
                coap.send_raw(&record);
            }
            if session.is_connected() {
                return Ok(DtlsDevice { coap, session });
            }
            if session.is_closed() {
                return Err("handshake refused".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err("handshake timed out".into());
            }
            let wake = session.next_timer().unwrap_or(deadline).min(deadline);
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            out = match coap.recv_raw(wait) {
                Some(bytes) => session.on_datagram(&bytes, Instant::now()),
                None => session.on_timer(Instant::now()),
            }
            .map_err(|e| e.to_string())?;
        }
    }

    /// Sends `r` through the session: the answer within 3 s, or `None` (no answer, or the
    /// session was closed).
    fn request(&mut self, r: &support::coap::Req) -> Option<coap_lite::Packet> {
        use std::time::{Duration, Instant};
        let p = self.coap.build(r);
        for record in self.session.send(&p.to_bytes().ok()?).ok()? {
            self.coap.send_raw(&record);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            while let Some(m) = self.session.take_message() {
                if let Ok(resp) = coap_lite::Packet::from_bytes(&m)
                    && resp.get_token() == p.get_token()
                    && matches!(resp.header.code, coap_lite::MessageClass::Response(_))
                {
                    return Some(resp);
                }
            }
            let now = Instant::now();
            if self.session.is_closed() || now >= deadline {
                return None;
            }
            let wait = (deadline - now)
                .min(Duration::from_millis(100))
                .max(Duration::from_millis(1));
            let out = match self.coap.recv_raw(wait) {
                Some(bytes) => self.session.on_datagram(&bytes, Instant::now()),
                None => self.session.on_timer(Instant::now()),
            };
            match out {
                Ok(out) => out.iter().for_each(|record| self.coap.send_raw(record)),
                Err(_) => return None,
            }
        }
    }

    /// A registration without `ep=` (the credential names the endpoint): its id.
    pub(crate) fn register(&mut self) -> Result<String, String> {
        let mut r = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
        r.query = &["lt=300"];
        r.payload = b"</3/0>";
        r.content_format = Some(coap_lite::ContentFormat::ApplicationLinkFormat);
        let resp = self.request(&r).ok_or("no answer")?;
        match support::coap::code(&resp) {
            coap_lite::ResponseType::Created => Ok(support::coap::location(&resp)
                .trim_start_matches("rd/")
                .to_string()),
            c => Err(format!("{c:?} {}", support::coap::diag(&resp))),
        }
    }

    /// `POST /rd/{id}` through the session: the answer's code, if one came.
    pub(crate) fn update(&mut self, id: &str) -> Option<coap_lite::ResponseType> {
        let path = ["rd", id];
        let r = support::coap::Req::new(coap_lite::RequestType::Post, &path);
        self.request(&r).map(|p| support::coap::code(&p))
    }
}

/// Replacing a PSK (`PUT` of a new key) and revoking it (`DELETE
/// /v2/device-credentials/{ep}`) close the device's open DTLS session: the session gauge
/// falls, the device's next request through it is not answered, and a new handshake with
/// the old key is refused (our client and libcoap's); the new key works until revoked.
#[test]
fn replacing_or_revoking_a_psk_closes_the_devices_dtls_session() {
    use coap_lite::ResponseType;
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    let (old, new) = ("rev-old-key-16-bytes", "rev-new-key-16-bytes");
    assert_eq!(put_psk(&d, "rev-dev", "rev-id", &psk_hex(old)).status, 201);
    let mut dev = DtlsDevice::connect(dtls, "rev-id", old).expect("handshake");
    let id = dev.register().expect("registered over DTLS");
    assert_eq!(dev.update(&id), Some(ResponseType::Changed));
    assert_eq!(metric(&d, "coap_dtls_sessions"), 1);

    // A new key: the session made with the old one is closed.
    let r = put_psk(&d, "rev-dev", "rev-id", &psk_hex(new));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(wait_metric(&d, "coap_dtls_sessions", 0), 0);
    d.expect_log(
        "closed 1 secure sessions that used the old ones",
        std::time::Duration::from_secs(5),
    );
    assert_eq!(dev.update(&id), None, "the old session still answers");
    let failed = metric(&d, "coap_dtls_handshakes_failed_total");
    assert!(DtlsDevice::connect(dtls, "rev-id", old).is_err());
    let (_, all) = psk_register("coap-client-openssl", dtls, "rev-id", old, "");
    assert_eq!(answered(&all), None, "{all}");
    assert_eq!(
        wait_metric(&d, "coap_dtls_handshakes_failed_total", failed + 2),
        failed + 2
    );
    let mut dev = DtlsDevice::connect(dtls, "rev-id", new).expect("the new key");
    assert_eq!(dev.update(&id), Some(ResponseType::Changed));
    assert_eq!(metric(&d, "coap_dtls_sessions"), 1);

    // Revoked: closed too, the registration ends, and the key is refused from now on.
    assert_eq!(d.get("/v2/endpoints/rev-dev").status, 200);
    let r = d.call("DELETE", "/v2/device-credentials/rev-dev", None, None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(wait_metric(&d, "coap_dtls_sessions", 0), 0);
    assert_eq!(d.get("/v2/endpoints/rev-dev").status, 404);
    assert_eq!(dev.update(&id), None, "the revoked session still answers");
    assert!(DtlsDevice::connect(dtls, "rev-id", new).is_err());
    let (_, all) = psk_register("coap-client-gnutls", dtls, "rev-id", new, "");
    assert_eq!(answered(&all), None, "{all}");
    assert_eq!(metric(&d, "coap_dtls_sessions"), 0);
}

/// Revoking a certificate from `/api/cert` closes the device's open DTLS session made
/// with it and refuses its next handshake; PSKs and revocations are the store's, so after
/// a restart the provisioned PSK registers libcoap over DTLS again, plain CoAP for its
/// endpoint is still 4.03 and the revoked certificate is still refused.
#[test]
fn certificate_revocation_closes_dtls_sessions_and_credentials_survive_a_restart() {
    use coap_lite::ResponseType;
    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    assert_eq!(
        put_psk(&d, "keep-dev", "keep-id", &psk_hex(PSK_TEXT)).status,
        201
    );
    let dir = tempfile::tempdir().unwrap();
    let cert_ep = device_certificate(&d, dir.path());
    let mut dev = DtlsDevice::connect_cert(dtls, dir.path()).expect("certificate handshake");
    let id = dev.register().expect("registered with the certificate");
    assert_eq!(d.get(&format!("/v2/endpoints/{cert_ep}")).status, 200);
    assert_eq!(dev.update(&id), Some(ResponseType::Changed));
    assert_eq!(metric(&d, "coap_dtls_sessions"), 1);

    let r = d.call(
        "DELETE",
        &format!("/v2/device-credentials/{cert_ep}"),
        None,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(wait_metric(&d, "coap_dtls_sessions", 0), 0);
    assert_eq!(dev.update(&id), None, "the revoked session still answers");
    assert!(DtlsDevice::connect_cert(dtls, dir.path()).is_err());
    // Its registration ended with the revocation: not listed, a read is 410. It stayed
    // listed as ACTIVE, every read answered 502 "no DTLS session", until its lifetime
    // ran out.
    assert_eq!(d.get(&format!("/v2/endpoints/{cert_ep}")).status, 404);
    let r = d.call("GET", &format!("/v2/endpoints/{cert_ep}/3/0/0"), None, None);
    assert_eq!(r.status, 410, "{}", r.body);

    let d = d.stop_and_restart();
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    for bin in ["coap-client-openssl", "coap-client-gnutls"] {
        let (ok, all) = psk_register(bin, dtls, "keep-id", PSK_TEXT, "");
        assert!(
            ok && answered(&all).as_deref() == Some("2.01"),
            "{bin}:\n{all}"
        );
    }
    let mut plain = d.device();
    let mut r = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
    r.query = &["ep=keep-dev", "lt=60"];
    r.payload = b"</3/0>";
    assert_eq!(
        support::coap::code(&plain.request(&r)),
        ResponseType::Forbidden
    );
    assert!(DtlsDevice::connect_cert(dtls, dir.path()).is_err());
    assert_eq!(metric(&d, "coap_dtls_handshakes_total"), 2);
    // Refused as revoked (not for some other fault of the certificate).
    d.expect_log(
        &format!("revoked (CN={cert_ep}"),
        std::time::Duration::from_secs(5),
    );
}

/// A PSK provisioned in another domain (with that domain's key): the DTLS registration
/// without `ep=` or `d=` lands in the credential's domain, seen by that domain's keys
/// and not by the default domain's; `d=` of the credential's domain is accepted, `d=`
/// of the default domain is 4.03.
#[test]
fn a_psk_of_another_domain_registers_its_device_in_that_domain() {
    let p = support::Prepared::new("listen_dtls = [\"127.0.0.1:0\"]", "");
    let body =
        json!({"name": "lab", "domain": "lab", "scopes": ["endpoints:read", "resources:write"]});
    let lab = p.plugin_call_str("connector", "create_key", &body, "access_key");
    let body = json!({"name": "home", "domain": "default", "scopes": ["endpoints:read"]});
    let home = p.plugin_call_str("connector", "create_key", &body, "access_key");
    let d = p.start_in_process();
    let dtls = d.ready.as_ref().expect("ready").coap_dtls[0];
    let put = json!({"psk_identity": "lab-id", "psk": psk_hex(PSK_TEXT)});
    let r = support::bearer_call(
        &d,
        "PUT",
        "/v2/device-credentials/lab-dev",
        Some(&lab),
        Some(&put),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["domain"], "lab", "{}", r.body);
    for query in ["", "&d=lab&ep=lab-dev"] {
        let (ok, all) = psk_register("coap-client-openssl", dtls, "lab-id", PSK_TEXT, query);
        assert!(
            ok && answered(&all).as_deref() == Some("2.01"),
            "{query}:\n{all}"
        );
    }
    let (_, all) = psk_register("coap-client-gnutls", dtls, "lab-id", PSK_TEXT, "&d=default");
    assert_eq!(answered(&all).as_deref(), Some("4.03"), "{all}");
    let r = support::bearer_call(&d, "GET", "/v2/endpoints/lab-dev", Some(&lab), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = support::bearer_call(&d, "GET", "/v2/endpoints/lab-dev", Some(&home), None);
    assert_eq!(r.status, 404, "the default domain's view: {}", r.body);
}

/// A DTLS client (ours, offering an RFC 9146 Connection ID) over `sock`, sans-IO driven.
mod cid {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::{Duration, Instant};

    use coap_lite::Packet;
    use connectord::coap::dtls::client::DtlsClient;

    /// The daemon's DTLS address and a client configuration for a PSK provisioned now
    /// for `ep` (identity `identity`, `key`).
    pub fn psk_device(
        d: &crate::support::Daemon,
        ep: &str,
        identity: &str,
        key: &[u8],
    ) -> (SocketAddr, connectord::coap::dtls::client::ClientConfig) {
        use connectord::coap::dtls::client::{ClientAuth, ClientConfig};
        let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
        let r = super::put_psk(d, ep, identity, &hex::encode(key));
        assert!(r.status < 300, "{} {}", r.status, r.body);
        let cfg = ClientConfig::new(ClientAuth::Psk {
            identity: identity.as_bytes().to_vec(),
            key: key.to_vec(),
        })
        .unwrap();
        (dtls, cfg)
    }

    /// A confirmable POST to `path` with `query` (token: the message id's low byte).
    pub fn post<S: AsRef<str>>(mid: u16, path: &[S], query: &[&str]) -> Packet {
        use coap_lite::{CoapOption, MessageClass, MessageType, RequestType};
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(vec![mid as u8]);
        for s in path {
            p.add_option(CoapOption::UriPath, s.as_ref().as_bytes().to_vec());
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p
    }

    /// Registers `ep` (`</3/0>`, lifetime 300 s) through the session from `sock`: 2.01,
    /// and the registration's Location-Path.
    pub fn register(
        c: &mut DtlsClient,
        sock: &UdpSocket,
        server: SocketAddr,
        ep: &str,
    ) -> Vec<String> {
        use coap_lite::{CoapOption, MessageClass, ResponseType};
        let mut reg = post(1, &["rd"], &[&format!("ep={ep}"), "lt=300"]);
        reg.add_option(CoapOption::ContentFormat, vec![40]);
        reg.payload = b"</3/0>".to_vec();
        send(c, sock, server, &reg);
        let (created, _) = receive(c, sock, server, Duration::from_secs(10));
        let created = created.expect("registration answer");
        assert_eq!(
            created.header.code,
            MessageClass::Response(ResponseType::Created)
        );
        created
            .get_option(CoapOption::LocationPath)
            .expect("Location-Path")
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }

    pub fn connect(
        cfg: &connectord::coap::dtls::client::ClientConfig,
        sock: &UdpSocket,
        server: SocketAddr,
    ) -> DtlsClient {
        let mut c = DtlsClient::new(cfg, Instant::now());
        let mut out = c.poll();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        loop {
            for p in out.drain(..) {
                sock.send_to(&p, server).unwrap();
            }
            if c.is_connected() {
                return c;
            }
            assert!(!c.is_closed(), "handshake refused");
            assert!(Instant::now() < deadline, "handshake within 10 s");
            out = match sock.recv_from(&mut buf) {
                Ok((n, _)) => c.on_datagram(&buf[..n], Instant::now()).unwrap(),
                Err(_) => c.on_timer(Instant::now()).unwrap(),
            };
        }
    }

    pub fn send(c: &mut DtlsClient, sock: &UdpSocket, server: SocketAddr, p: &Packet) {
        for r in c.send(&p.to_bytes().unwrap()).unwrap() {
            sock.send_to(&r, server).unwrap();
        }
    }

    /// The next message the session decrypts from datagrams arriving on `sock`, CoAP
    /// pings (Empty CON) answered with a Reset from `sock` (RFC 7252 §4.3); how many.
    pub fn receive(
        c: &mut DtlsClient,
        sock: &UdpSocket,
        server: SocketAddr,
        wait: Duration,
    ) -> (Option<Packet>, usize) {
        use coap_lite::{MessageClass, MessageType};
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        let mut pings = 0;
        while Instant::now() < deadline {
            if let Some(m) = c.take_message() {
                let p = Packet::from_bytes(&m).unwrap();
                if p.header.code == MessageClass::Empty
                    && p.header.get_type() == MessageType::Confirmable
                {
                    let mut rst = Packet::new();
                    rst.header.set_type(MessageType::Reset);
                    rst.header.code = MessageClass::Empty;
                    rst.header.message_id = p.header.message_id;
                    send(c, sock, server, &rst);
                    pings += 1;
                    continue;
                }
                return (Some(p), pings);
            }
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                for r in c.on_datagram(&buf[..n], Instant::now()).unwrap() {
                    sock.send_to(&r, server).unwrap();
                }
            }
        }
        (None, pings)
    }
}

/// RFC 9146 through the daemon: a device with a provisioned PSK registers over DTLS,
/// its NAT mapping changes (a new socket, the same DTLS state), its update from the new
/// address is accepted in the same session, and a REST read reaches it there; one
/// handshake in all.
#[test]
fn a_dtls_device_whose_address_changes_keeps_its_session() {
    use coap_lite::{MessageClass, RequestType, ResponseType};
    use std::net::UdpSocket;
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(10);

    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let (dtls, cfg) = cid::psk_device(&d, "cid-dev", "cid-id", b"cid-device-key16");
    let first = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = cid::connect(&cfg, &first, dtls);
    let location = cid::register(&mut c, &first, dtls, "cid-dev");

    // The NAT mapping changes: the update comes from another port, same session.
    let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
    let path: Vec<&str> = location.iter().map(String::as_str).collect();
    cid::send(&mut c, &moved, dtls, &cid::post(2, &path, &[]));
    let (changed, pings) = cid::receive(&mut c, &moved, dtls, WAIT);
    let changed = changed.expect("update answered");
    assert_eq!(
        changed.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    // The new address was checked: a CoAP ping, which the device answered from there.
    assert_eq!(pings, 1);

    // The application's read reaches the device at its new address.
    let id = d.async_request("GET", "/v2/endpoints/cid-dev/3/0/0", None, None);
    let (read, pings) = cid::receive(&mut c, &moved, dtls, WAIT);
    let read = read.expect("the read at the new address");
    assert_eq!(pings, 0, "one check");
    assert_eq!(read.header.code, MessageClass::Request(RequestType::Get));
    cid::send(
        &mut c,
        &moved,
        dtls,
        &support::coap::response(&read, ResponseType::Content, b"acme", Some(0), None),
    );
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["payload"], support::b64(b"acme").as_str(), "{r}");
    assert_eq!(metric(&d, "coap_dtls_handshakes_total"), 1);
    assert_eq!(metric(&d, "coap_dtls_sessions"), 1);
}

/// An address passes to another device (a NAT reuses the mapping; the first device's
/// session is replaced by the second's handshake from that address): a request for the
/// first device is not sent to the second, whose identity the credentials bind to
/// another endpoint; it fails at once with 502. Once the first device handshakes from
/// the address again, requests reach it. (Before, the session was found by address
/// alone: the second device was sent the first one's request and could answer it.)
#[test]
fn a_request_goes_only_to_a_session_that_proved_its_devices_identity() {
    use coap_lite::{MessageClass, RequestType};
    use std::net::UdpSocket;
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(10);

    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let (dtls, cfg_a) = cid::psk_device(&d, "nat-a", "nat-a-id", b"nat-a-device-key");
    let (_, cfg_b) = cid::psk_device(&d, "nat-b", "nat-b-id", b"nat-b-device-key");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut a = cid::connect(&cfg_a, &sock, dtls);
    cid::register(&mut a, &sock, dtls, "nat-a");

    // Device B handshakes from the same address: its session replaces A's.
    let handshakes = metric(&d, "coap_dtls_handshakes_total");
    let mut b = cid::connect(&cfg_b, &sock, dtls);
    assert_eq!(
        wait_metric(&d, "coap_dtls_handshakes_total", handshakes + 1),
        handshakes + 1
    );
    assert_eq!(metric(&d, "coap_dtls_sessions"), 1);
    let id = d.async_request("GET", "/v2/endpoints/nat-a/3/0/0", None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 502, "{r}");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("no longer the device's")),
        "{r}"
    );
    let (got, _) = cid::receive(&mut b, &sock, dtls, Duration::from_secs(1));
    assert!(
        got.is_none(),
        "device B was sent device A's request: {got:?}"
    );

    // A is back on the address: its reads reach it.
    let mut a = cid::connect(&cfg_a, &sock, dtls);
    let id = d.async_request("GET", "/v2/endpoints/nat-a/3/0/0", None, None);
    let (read, _) = cid::receive(&mut a, &sock, dtls, WAIT);
    let read = read.expect("the read reaches device A");
    assert_eq!(read.header.code, MessageClass::Request(RequestType::Get));
    cid::send(
        &mut a,
        &sock,
        dtls,
        &support::coap::response(
            &read,
            coap_lite::ResponseType::Content,
            b"mine",
            Some(0),
            None,
        ),
    );
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["payload"], support::b64(b"mine").as_str(), "{r}");
}

/// Under `coap.plain = "allow"` a plain UDP datagram from a DTLS device's address, to the
/// plain listener, is not the DTLS session's: an error ACK without a token (which some
/// clients send for a request they cannot parse, and which answers the request of its
/// message id) does not answer the request sent through the session, and the device's
/// own answer does. (Before, the message layer keyed exchanges by address alone, so a
/// forged datagram with a guessed message id ended the secure device's read with 404.)
#[test]
fn a_plain_datagram_does_not_answer_a_request_sent_over_dtls() {
    use coap_lite::{MessageClass, MessageType, Packet, RequestType, ResponseType};
    use std::net::UdpSocket;
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(10);

    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let (dtls, cfg) = cid::psk_device(&d, "mix-dev", "mix-id", b"mix-device-key16");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = cid::connect(&cfg, &sock, dtls);
    cid::register(&mut c, &sock, dtls, "mix-dev");
    let id = d.async_request("GET", "/v2/endpoints/mix-dev/3/0/0", None, None);
    let (read, _) = cid::receive(&mut c, &sock, dtls, WAIT);
    let read = read.expect("the read over DTLS");
    assert_eq!(read.header.code, MessageClass::Request(RequestType::Get));

    // The forgery: from the device's address, in plain CoAP, to the UDP listener.
    let mut forged = Packet::new();
    forged.header.set_type(MessageType::Acknowledgement);
    forged.header.code = MessageClass::Response(ResponseType::NotFound);
    forged.header.message_id = read.header.message_id;
    sock.send_to(&forged.to_bytes().unwrap(), d.coap).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    cid::send(
        &mut c,
        &sock,
        dtls,
        &support::coap::response(&read, ResponseType::Content, b"real", Some(0), None),
    );
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["payload"], support::b64(b"real").as_str(), "{r}");
}

/// wolfSSL's DTLS 1.2 client (`support::peers::wolfssl_cid_client`: an RFC 9146
/// implementation nobody here wrote), driven over its stdin and stdout.
struct Wolf {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Wolf {
    /// Handshakes with `server` (PSK `identity`/`key`); the client's first line
    /// (`connected cid=… port=…`) is returned with it.
    fn connect(server: SocketAddr, identity: &str, key: &[u8]) -> (Wolf, String) {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = Command::new(support::peers::wolfssl_cid_client())
            .args(["127.0.0.1", &server.port().to_string(), identity])
            .arg(hex::encode(key))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the wolfSSL client");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in stdout.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut w = Wolf {
            child,
            stdin,
            lines,
        };
        let first = w.line();
        assert!(first.starts_with("connected "), "{first}");
        (w, first)
    }

    fn line(&mut self) -> String {
        self.lines
            .recv_timeout(std::time::Duration::from_secs(15))
            .expect("a line from the wolfSSL client (did it fail? see stderr)")
    }

    fn command(&mut self, c: &str) -> String {
        use std::io::Write;
        writeln!(self.stdin, "{c}").expect("the wolfSSL client's stdin");
        self.line()
    }

    fn send(&mut self, p: &coap_lite::Packet) {
        let r = self.command(&format!("send {}", hex::encode(p.to_bytes().unwrap())));
        assert_eq!(r, "sent");
    }

    /// The next CoAP message within `wait`, answering CoAP pings (Empty CON) with a Reset
    /// as RFC 7252 §4.3 says, as libcoap and aiocoap do; how many pings it answered.
    fn receive(&mut self, wait: std::time::Duration) -> (Option<coap_lite::Packet>, usize) {
        use coap_lite::{MessageClass, MessageType, Packet};
        let deadline = std::time::Instant::now() + wait;
        let mut pings = 0;
        while std::time::Instant::now() < deadline {
            let r = self.command("recv 300");
            let Some(data) = r.strip_prefix("data ") else {
                assert!(r.starts_with("timeout"), "{r}");
                continue;
            };
            let p = Packet::from_bytes(&hex::decode(data).unwrap()).expect("CoAP");
            if p.header.code == MessageClass::Empty
                && p.header.get_type() == MessageType::Confirmable
            {
                let mut rst = Packet::new();
                rst.header.set_type(MessageType::Reset);
                rst.header.code = MessageClass::Empty;
                rst.header.message_id = p.header.message_id;
                self.send(&rst);
                pings += 1;
                continue;
            }
            return (Some(p), pings);
        }
        (None, pings)
    }
}

impl Drop for Wolf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RFC 9146 against an implementation nobody here wrote: wolfSSL's DTLS 1.2 client
/// handshakes with a provisioned PSK, is given the daemon's connection ID, registers,
/// then moves to a new UDP socket (a new source port: a NAT rebinding) and goes on in
/// the same session: its update is answered at the new port, the daemon's check of the
/// new port (a CoAP ping) is answered, and a REST read and a 600-byte write reach it
/// there. One handshake in all.
#[test]
fn wolfssl_keeps_its_dtls_session_when_its_port_changes() {
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(10);

    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let key = *b"wolf-device-key!";
    let (dtls, _) = cid::psk_device(&d, "wolf-dev", "wolf-id", &key);
    let (mut w, connected) = Wolf::connect(dtls, "wolf-id", &key);
    // `connected cid=<12 hex digits> port=<n>`: the daemon's 6-byte CID.
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .to_string()
    };
    let cid = field(&connected, "cid=");
    assert_eq!(
        cid.len(),
        12,
        "the daemon gave wolfSSL a 6-byte CID: {connected}"
    );
    let first_port = field(&connected, "port=");

    let mut reg = cid::post(1, &["rd"], &["ep=wolf-dev", "lt=300"]);
    reg.add_option(CoapOption::ContentFormat, vec![40]);
    reg.payload = b"</3/0>".to_vec();
    w.send(&reg);
    let (created, _) = w.receive(WAIT);
    let created = created.expect("registration answer");
    assert_eq!(
        created.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    let location: Vec<String> = created
        .get_option(CoapOption::LocationPath)
        .expect("Location-Path")
        .iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();

    // The NAT mapping changes: wolfSSL's next records leave from another port (the old
    // socket is closed), carrying the CID.
    let rebound = w.command("rebind");
    let new_port = field(&rebound, "port=");
    assert_ne!(new_port, first_port);
    let path: Vec<&str> = location.iter().map(String::as_str).collect();
    w.send(&cid::post(2, &path, &[]));
    let (changed, pings) = w.receive(WAIT);
    let changed = changed.expect("update answered at the new port");
    assert_eq!(
        changed.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    assert_eq!(changed.header.message_id, 2);
    // The daemon checked the new port with a CoAP ping that wolfSSL's session carried
    // and our Reset answered (the Reset is what verifies the address).
    assert_eq!(pings, 1);

    // The application's read reaches the device at its new port.
    let id = d.async_request("GET", "/v2/endpoints/wolf-dev/3/0/0", None, None);
    let (read, pings) = w.receive(WAIT);
    let read = read.expect("the read at the new port");
    assert_eq!(pings, 0, "the address was checked once");
    assert_eq!(read.header.code, MessageClass::Request(RequestType::Get));
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Response(ResponseType::Content);
    ack.header.message_id = read.header.message_id;
    ack.set_token(read.get_token().to_vec());
    ack.add_option(CoapOption::ContentFormat, vec![]);
    ack.payload = b"wolfSSL".to_vec();
    w.send(&ack);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["payload"], support::b64(b"wolfSSL").as_str(), "{r}");

    // The new port answered the daemon's check, so it gets more than 3 times what it
    // sent: a 600-byte write arrives whole.
    let value = vec![b'w'; 600];
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/wolf-dev/3/0/15",
        Some("text/plain"),
        Some(&value),
    );
    let (write, _) = w.receive(WAIT);
    let write = write.expect("the write at the new port");
    assert_eq!(write.header.code, MessageClass::Request(RequestType::Put));
    assert_eq!(write.payload, value);
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Response(ResponseType::Changed);
    ack.header.message_id = write.header.message_id;
    ack.set_token(write.get_token().to_vec());
    w.send(&ack);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    assert_eq!(metric(&d, "coap_dtls_unverified_dropped_total"), 0);
    assert_eq!(metric(&d, "coap_dtls_handshakes_total"), 1);
    assert_eq!(metric(&d, "coap_dtls_sessions"), 1);
}

/// RFC 9146 §6 and §8: an on-path attacker who copies a device's newer record and
/// delivers it first from a victim's address moves the session there, but the daemon
/// sends the victim at most 3 times the bytes it got from there until the device answers
/// a CoAP ping from that address: the application's 600-byte write is dropped (counted)
/// instead of going to the victim. The device's next record from its own address moves
/// the session back, unchecked (the address was verified), and the write (retransmitted
/// by the CoAP layer) reaches it there.
#[test]
fn a_replayed_record_from_another_address_gets_that_address_little_traffic() {
    use coap_lite::{MessageClass, MessageType, Packet, RequestType, ResponseType};
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    const WAIT: Duration = Duration::from_secs(10);

    let d = support::Daemon::start_custom("listen_dtls = [\"127.0.0.1:0\"]", "");
    let (dtls, cfg) = cid::psk_device(&d, "amp-dev", "amp-id", b"amp-device-key16");
    let home = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = cid::connect(&cfg, &home, dtls);
    let location = cid::register(&mut c, &home, dtls, "amp-dev");

    // The device's update, delivered first from the victim's address.
    let victim = UdpSocket::bind("127.0.0.1:0").unwrap();
    let records = c
        .send(&cid::post(2, &location, &[]).to_bytes().unwrap())
        .unwrap();
    let injected: usize = records.iter().map(Vec::len).sum();
    for r in &records {
        victim.send_to(r, dtls).unwrap();
    }
    // The application writes 600 bytes to the device meanwhile.
    let value = vec![b'x'; 600];
    let write = d.async_request(
        "PUT",
        "/v2/endpoints/amp-dev/3/0/15",
        Some("text/plain"),
        Some(&value),
    );
    victim
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut received = 0;
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Ok(n) = victim.recv(&mut buf) {
            received += n;
        }
    }
    assert!(
        received > 0,
        "the victim's address got the session (it moved)"
    );
    assert!(
        received <= 3 * injected,
        "{received} bytes sent to an unverified address for {injected} received"
    );
    eprintln!("{received} bytes to the unverified address for {injected} from it");
    assert!(metric(&d, "coap_dtls_unverified_dropped_total") > 0);

    // The device's next record, from home, moves the session back: no check, and the
    // application's write (retransmitted) reaches it.
    cid::send(&mut c, &home, dtls, &cid::post(3, &location, &[]));
    let deadline = Instant::now() + WAIT;
    let mut answered = 0;
    while answered == 0 && Instant::now() < deadline {
        let (m, pings) = cid::receive(&mut c, &home, dtls, WAIT);
        assert_eq!(pings, 0, "the home address was verified");
        let m = m.expect("a message at home");
        if m.header.code == MessageClass::Request(RequestType::Put) {
            assert_eq!(m.payload, value);
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.code = MessageClass::Response(ResponseType::Changed);
            ack.header.message_id = m.header.message_id;
            ack.set_token(m.get_token().to_vec());
            cid::send(&mut c, &home, dtls, &ack);
            answered += 1;
        }
    }
    assert!(answered > 0, "the write reached the device at home");
    let r = d.async_response(&write, WAIT);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(metric(&d, "coap_dtls_handshakes_total"), 1);
}

/// A device that keeps handshaking with a certificate the daemon refuses cannot flood the
/// log: each refusal's line is a per-device line, within `log.device_lines_per_s`, the
/// rest counted in the once-a-second summary (they used to be logged one by one).
#[test]
fn refused_certificate_handshakes_are_within_the_log_budget() {
    let p = support::Prepared::new("listen_dtls = [\"127.0.0.1:0\"]", "");
    support::set_device_lines_per_s(&p, 1);
    let d = p.start();
    let dtls = d.ready.as_ref().expect("ready file").coap_dtls[0];
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = other_ca(dir.path(), "intruder");
    std::fs::copy(&cert, dir.path().join("device.pem")).unwrap();
    std::fs::copy(&key, dir.path().join("device.key")).unwrap();
    const N: u64 = 10;
    // At once (the client only gives up after 5 s: the daemon answers a refused
    // certificate with silence), so that the refusals fall in the same second or two.
    std::thread::scope(|s| {
        for _ in 0..N {
            s.spawn(|| assert!(DtlsDevice::connect_cert(dtls, dir.path()).is_err()));
        }
    });
    let one_by_one = |d: &support::Daemon| {
        d.logs()
            .iter()
            .filter(|l| l.contains("DTLS client certificate refused"))
            .count() as u64
    };
    let summarised = |d: &support::Daemon| {
        support::summarised(d, "handshakes refused for their client certificate") as u64
    };
    assert!(
        support::eventually(std::time::Duration::from_secs(5), || one_by_one(&d)
            + summarised(&d)
            == N),
        "{} logged one by one, {} summarised:\n{}",
        one_by_one(&d),
        summarised(&d),
        d.logs().join("\n")
    );
    assert!(summarised(&d) > 0, "{}", d.logs().join("\n"));
    assert_eq!(metric(&d, "coap_dtls_handshakes_failed_total"), N);
}
