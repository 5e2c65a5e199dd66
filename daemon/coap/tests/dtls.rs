//! The DTLS listener through real sockets: a dimpl client (PSK) against a `Transport`
//! with a DTLS listener; the message layer answers through the session; refusals; the
//! stateless cookie keeps a ClientHello flood from creating state.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use connectord_coap::dtls::client::{ClientAuth, ClientConfig, DtlsClient};
use connectord_coap::message::{Handled, Response};
use connectord_coap::{
    CoapConfig, Counters, Credentials, DtlsSetup, Event, Inbound, PeerIdentity, RequestHandler,
    Transport,
};
use tokio::net::UdpSocket;

struct Keys;

impl Credentials for Keys {
    fn psk(&self, identity: &[u8]) -> Option<Vec<u8>> {
        (identity == b"dev-1").then(|| b"secret-key-16byt".to_vec())
    }
}

/// Answers every request with the identity the listener reported.
struct WhoAmI(Mutex<Vec<Option<PeerIdentity>>>);

impl RequestHandler for WhoAmI {
    fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>> {
        let text = format!("{:?}", req.identity);
        self.0.lock().unwrap().push(req.identity);
        Box::pin(async move {
            let mut r = Response::new(ResponseType::Content);
            r.payload = text.into_bytes();
            r.into()
        })
    }
}

struct Server {
    transport: Arc<Transport>,
    counters: Arc<Counters>,
    dtls: SocketAddr,
    _stop: tokio::sync::watch::Sender<bool>,
}

fn start(max_handshakes: usize) -> Server {
    start_with(CoapConfig {
        dtls_max_handshakes: max_handshakes,
        ..CoapConfig::default()
    })
}

fn start_with(cfg: CoapConfig) -> Server {
    let cfg = CoapConfig {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        listen_dtls: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..cfg
    };
    cfg.check().unwrap();
    let counters = Arc::new(Counters::default());
    let transport = Transport::bind(&cfg, counters.clone()).unwrap();
    transport
        .set_dtls(&DtlsSetup {
            credentials: Arc::new(Keys),
            certificate: None,
            trust_anchors: Vec::new(),
        })
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    transport.start(Arc::new(WhoAmI(Mutex::new(Vec::new()))), rx);
    let dtls = transport.local_addrs_of(connectord_coap::ListenerKind::Dtls)[0];
    Server {
        transport,
        counters,
        dtls,
        _stop: tx,
    }
}

fn psk(identity: &str, key: &[u8]) -> ClientConfig {
    ClientConfig::new(ClientAuth::Psk {
        identity: identity.as_bytes().to_vec(),
        key: key.to_vec(),
    })
    .unwrap()
}

async fn socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

fn get(mid: u16) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Get);
    p.header.message_id = mid;
    p.set_token(vec![7]);
    p.add_option(CoapOption::UriPath, b"who".to_vec());
    p.to_bytes().unwrap()
}

/// Sends a CoAP GET through the session and returns the decrypted answer.
async fn exchange(c: &mut DtlsClient, sock: &UdpSocket, server: SocketAddr, mid: u16) -> Packet {
    for r in c.send(&get(mid)).unwrap() {
        sock.send_to(&r, server).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(m) = c.take_message() {
            return Packet::from_bytes(&m).unwrap();
        }
        let (n, _) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        for r in c.on_datagram(&buf[..n], Instant::now()).unwrap() {
            sock.send_to(&r, server).await.unwrap();
        }
    }
}

#[tokio::test]
async fn psk_session_carries_coap_and_names_its_identity() {
    let s = start(100);
    let sock = socket().await;
    let mut c = DtlsClient::connect(
        &psk("dev-1", b"secret-key-16byt"),
        &sock,
        s.dtls,
        Duration::from_secs(5),
    )
    .await
    .expect("handshake");
    let answer = exchange(&mut c, &sock, s.dtls, 1).await;
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Content)
    );
    assert_eq!(
        String::from_utf8_lossy(&answer.payload),
        "Some(Psk(\"dev-1\"))"
    );
    // A retransmission is answered from the duplicate cache, through the session.
    let again = exchange(&mut c, &sock, s.dtls, 1).await;
    assert_eq!(again.payload, answer.payload);
    assert_eq!(s.counters.get(Event::Duplicate), 1);
    assert_eq!(s.counters.get(Event::DtlsHandshake), 1);
    assert_eq!(s.transport.dtls_counts().sessions, 1);
    // The device restarts: a new handshake from the same address replaces the session.
    let mut c = DtlsClient::connect(
        &psk("dev-1", b"secret-key-16byt"),
        &sock,
        s.dtls,
        Duration::from_secs(5),
    )
    .await
    .expect("a new handshake from the same address");
    assert_eq!(
        exchange(&mut c, &sock, s.dtls, 2).await.payload,
        answer.payload
    );
    assert_eq!(s.counters.get(Event::DtlsHandshake), 2);
    assert_eq!(s.transport.dtls_counts().sessions, 1);
    // Revoking the identity closes the session.
    let closed = s
        .transport
        .close_sessions(&|id| *id == PeerIdentity::Psk(Arc::from("dev-1")));
    assert_eq!(closed, 1);
    assert_eq!(s.transport.dtls_counts().sessions, 0);
}

/// `ClientConfig::with_psk` (one validated dimpl configuration, copied per device):
/// the copy handshakes as its own identity; a certificate configuration has no copy.
#[tokio::test]
async fn a_psk_config_copy_speaks_as_its_identity() {
    let s = start(100);
    let base = psk("other", b"another-key-16by");
    let copy = base
        .with_psk(b"dev-1".to_vec(), b"secret-key-16byt".to_vec())
        .expect("a PSK configuration");
    let sock = socket().await;
    let mut c = DtlsClient::connect(&copy, &sock, s.dtls, Duration::from_secs(5))
        .await
        .expect("handshake with the copy");
    let answer = exchange(&mut c, &sock, s.dtls, 1).await;
    assert_eq!(
        String::from_utf8_lossy(&answer.payload),
        "Some(Psk(\"dev-1\"))"
    );
    // The base's own identity is unknown to the server: refused.
    let sock = socket().await;
    assert!(
        DtlsClient::connect(&base, &sock, s.dtls, Duration::from_secs(2))
            .await
            .is_err()
    );
}

/// A session quiet for `TRIM_AFTER` gives back its handshake's memory (`Dtls::trim`);
/// it still decrypts, answers and takes more requests afterwards, twice over.
#[tokio::test]
async fn a_quiet_trimmed_session_keeps_working() {
    let s = start(100);
    let sock = socket().await;
    let mut c = DtlsClient::connect(
        &psk("dev-1", b"secret-key-16byt"),
        &sock,
        s.dtls,
        Duration::from_secs(5),
    )
    .await
    .expect("handshake");
    for mid in 1..=3 {
        tokio::time::sleep(connectord_coap::dtls::TRIM_AFTER + connectord_coap::dtls::TICK * 3)
            .await;
        let answer = exchange(&mut c, &sock, s.dtls, mid).await;
        assert_eq!(
            answer.header.code,
            MessageClass::Response(ResponseType::Content),
            "exchange {mid}"
        );
        assert_eq!(answer.header.message_id, mid);
    }
    assert_eq!(s.counters.get(Event::DtlsHandshake), 1);
    assert_eq!(s.transport.dtls_counts().sessions, 1);
}

#[tokio::test]
async fn wrong_key_and_unknown_identity_are_refused() {
    let s = start(100);
    for cfg in [
        psk("dev-1", b"wrong-key-16byte"),
        psk("nobody", b"secret-key-16byt"),
    ] {
        let sock = socket().await;
        let r = DtlsClient::connect(&cfg, &sock, s.dtls, Duration::from_secs(3)).await;
        assert!(r.is_err(), "handshake must fail");
    }
    // The server saw both fail (the client may give up before the server notices).
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.counters.get(Event::DtlsHandshakeFailed) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.counters.get(Event::DtlsHandshakeFailed), 2);
    assert_eq!(s.counters.get(Event::DtlsHandshake), 0);
    assert_eq!(s.transport.dtls_counts().sessions, 0);
}

/// 2000 ClientHellos from 200 sockets: each gets a HelloVerifyRequest and leaves no
/// state (no cookie round trip); then a legitimate client still connects.
#[tokio::test]
async fn hello_flood_leaves_no_state() {
    let s = start(10);
    let probe = psk("dev-1", b"secret-key-16byt");
    let hello = DtlsClient::new(&probe, Instant::now()).poll().remove(0);
    let mut socks = Vec::new();
    for _ in 0..200 {
        socks.push(socket().await);
    }
    for round in 0..10 {
        for sk in &socks {
            sk.send_to(&hello, s.dtls).await.unwrap();
        }
        if round % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.counters.get(Event::DtlsHelloVerify) < 2000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.counters.get(Event::DtlsHelloVerify), 2000);
    assert_eq!(s.transport.dtls_counts(), Default::default());
    let sock = socket().await;
    let mut c = DtlsClient::connect(&probe, &sock, s.dtls, Duration::from_secs(5))
        .await
        .expect("a legitimate client connects during/after the flood");
    assert_eq!(
        exchange(&mut c, &sock, s.dtls, 9).await.header.message_id,
        9
    );
}

/// Starts `n` handshakes that stop after the cookie exchange (half-open on the server).
async fn half_open(s: &Server, n: usize) -> Vec<UdpSocket> {
    let probe = psk("dev-1", b"secret-key-16byt");
    let mut socks = Vec::new();
    for _ in 0..n {
        let sock = socket().await;
        let mut c = DtlsClient::new(&probe, Instant::now());
        for r in c.poll() {
            sock.send_to(&r, s.dtls).await.unwrap();
        }
        // The HelloVerifyRequest, then the ClientHello with the cookie; stop there.
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        for r in c.on_datagram(&buf[..n], Instant::now()).unwrap() {
            sock.send_to(&r, s.dtls).await.unwrap();
        }
        socks.push(sock);
    }
    socks
}

/// Clients that finish the cookie exchange but never the handshake: at most
/// `dtls_max_handshakes` are kept; the rest are dropped and counted.
#[tokio::test]
async fn half_open_handshakes_are_capped() {
    let s = start(3);
    let _socks = half_open(&s, 6).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.counters.get(Event::DtlsHandshakeDropped) < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.counters.get(Event::DtlsHandshakeDropped), 3);
    assert_eq!(s.transport.dtls_counts().half_open, 3);
}

/// libcoap's client (`coap-client-openssl`, `coap-client-gnutls`, Debian libcoap3-bin)
/// run with `args`, giving up after 10 s; its exit status and all it printed.
fn libcoap(bin: &str, args: &[String]) -> (bool, String) {
    let path = format!("/usr/bin/{bin}");
    if !std::path::Path::new(&path).exists() {
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "libcoap3-bin"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    let out = std::process::Command::new(&path)
        .args(["-B", "10", "-v", "6"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {path} (apt-get install libcoap3-bin): {e}"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}

/// libcoap over OpenSSL and over GnuTLS, PSK (`TLS_PSK_WITH_AES_128_CCM_8` or what they
/// offer first of ours): the request arrives with its identity; a wrong key fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_openssl_and_gnutls_psk() {
    let s = start(100);
    let uri = format!("coaps://127.0.0.1:{}/who", s.dtls.port());
    for bin in ["coap-client-openssl", "coap-client-gnutls"] {
        let args = vec![
            "-u".into(),
            "dev-1".into(),
            "-k".into(),
            "secret-key-16byt".into(),
            uri.clone(),
        ];
        let (ok, all) = tokio::task::spawn_blocking(move || libcoap(bin, &args))
            .await
            .unwrap();
        assert!(ok && all.contains("Some(Psk(\"dev-1\"))"), "{bin}:\n{all}");
        let args = vec![
            "-u".into(),
            "dev-1".into(),
            "-k".into(),
            "wrong-key-16byte".into(),
            uri.clone(),
        ];
        let (_, all) = tokio::task::spawn_blocking(move || libcoap(bin, &args))
            .await
            .unwrap();
        assert!(
            !all.contains("Some(Psk("),
            "{bin} with a wrong key got an answer:\n{all}"
        );
    }
    assert_eq!(s.counters.get(Event::DtlsHandshake), 2);
}

/// `dtls_handshake_timeout_s` drops half-open handshakes, `dtls_idle_s` closes idle
/// sessions (close_notify to the client).
#[tokio::test]
async fn handshake_timeout_and_idle_expiry() {
    let s = start_with(CoapConfig {
        dtls_handshake_timeout_s: 1,
        dtls_idle_s: 1,
        ..CoapConfig::default()
    });
    let _socks = half_open(&s, 2).await;
    let sock = socket().await;
    let mut c = DtlsClient::connect(
        &psk("dev-1", b"secret-key-16byt"),
        &sock,
        s.dtls,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(s.transport.dtls_counts().half_open, 2);
    assert_eq!(s.transport.dtls_counts().sessions, 1);
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("a close_notify after dtls_idle_s")
        .unwrap();
    let _ = c.on_datagram(&buf[..n], Instant::now());
    assert!(c.is_closed(), "the client saw close_notify");
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.transport.dtls_counts() != Default::default() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.transport.dtls_counts(), Default::default());
    assert_eq!(s.counters.get(Event::DtlsHandshakeFailed), 2);
}
