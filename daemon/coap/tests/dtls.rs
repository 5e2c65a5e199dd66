//! The DTLS listener through real sockets: a dimpl client (PSK) against a `Transport`
//! with a DTLS listener; the message layer answers through the session; refusals; the
//! stateless cookie keeps a ClientHello flood from creating state.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use connectord_coap::client::OutRequest;
use connectord_coap::dtls::client::{ClientAuth, ClientConfig, DtlsClient};
use connectord_coap::message::{Handled, Response};
use connectord_coap::{
    CoapConfig, Counters, Credentials, DtlsSetup, Event, Inbound, ListenerId, ListenerKind,
    PeerIdentity, PeerRef, RequestHandler, Transport,
};
use tokio::net::UdpSocket;

struct Keys;

/// How often the listener looked up `dev-3`'s key (only one test uses that identity).
static DEV3_LOOKUPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Credentials for Keys {
    fn psk(&self, identity: &[u8]) -> Option<Vec<u8>> {
        match identity {
            b"dev-1" => Some(b"secret-key-16byt".to_vec()),
            b"dev-2" => Some(b"other-key-16byte".to_vec()),
            b"dev-3" => {
                DEV3_LOOKUPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Some(b"third-key-16byte".to_vec())
            }
            _ => None,
        }
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
    start_setup(cfg, None)
}

/// A server offering certificates too: its own (self-signed, `localhost`), and no CA a
/// client certificate could chain to.
fn start_cert() -> Server {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    start_setup(
        CoapConfig::default(),
        Some((cert.der().to_vec(), key.serialize_der())),
    )
}

fn start_setup(cfg: CoapConfig, certificate: Option<(Vec<u8>, Vec<u8>)>) -> Server {
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
            certificate,
            trust_anchors: Vec::new(),
        })
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    transport.start(Arc::new(WhoAmI(Mutex::new(Vec::new()))), rx);
    let dtls = transport.local_addrs_of(ListenerKind::Dtls)[0];
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
    send_via(c, sock, server, &get(mid)).await;
    receive_any(c, sock, server, Duration::from_secs(5))
        .await
        .expect("an answer within 5 s")
}

/// The PSK client `dev-1` (key `secret-key-16byt`), its handshake with `s` done from `sock`.
async fn dev1(s: &Server, sock: &UdpSocket) -> DtlsClient {
    DtlsClient::connect(
        &psk("dev-1", b"secret-key-16byt"),
        sock,
        s.dtls,
        Duration::from_secs(5),
    )
    .await
    .expect("handshake")
}

/// The session a DTLS client made from `sock` is known by to `s`'s transport.
fn session_of(s: &Server, sock: &UdpSocket) -> PeerRef {
    PeerRef {
        listener: ListenerId {
            kind: ListenerKind::Dtls,
            local: s.dtls,
        },
        session: sock.local_addr().unwrap(),
    }
}

#[tokio::test]
async fn psk_session_carries_coap_and_names_its_identity() {
    let s = start(100);
    let sock = socket().await;
    let mut c = dev1(&s, &sock).await;
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
    let mut c = dev1(&s, &sock).await;
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

/// Drives `c`'s handshake from `sock` up to its last flight (ClientKeyExchange,
/// ChangeCipherSpec, Finished), which it sends as one datagram, as a client may.
async fn last_flight_in_one_datagram(c: &mut DtlsClient, sock: &UdpSocket, server: SocketAddr) {
    for r in c.poll() {
        sock.send_to(&r, server).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
            .await
            .expect("the server's flight")
            .unwrap();
        let records = c.on_datagram(&buf[..n], Instant::now()).unwrap();
        if records.is_empty() {
            continue;
        }
        if records.len() == 1 && records[0].get(13) == Some(&1) {
            // The ClientHello with the cookie.
            sock.send_to(&records[0], server).await.unwrap();
            continue;
        }
        sock.send_to(&records.concat(), server).await.unwrap();
        return;
    }
}

/// Issue 25 review: a handshake that fails in the datagram that named its PSK identity
/// (the whole last flight at once, under a wrong key) gives that identity to nobody.
/// Before, the identity stayed in the listener's one `last` slot and the next session to
/// step took it: an established session of `dev-1` became `dev-2`.
#[tokio::test]
async fn a_failed_handshake_leaves_its_identity_to_no_other_session() {
    let s = start(100);
    let sock = socket().await;
    let mut c = dev1(&s, &sock).await;
    let mine = "Some(Psk(\"dev-1\"))";
    assert_eq!(
        String::from_utf8_lossy(&exchange(&mut c, &sock, s.dtls, 1).await.payload),
        mine
    );
    let thief_sock = socket().await;
    let mut thief = DtlsClient::new(&psk("dev-2", b"wrong-key-16byte"), Instant::now());
    last_flight_in_one_datagram(&mut thief, &thief_sock, s.dtls).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.counters.get(Event::DtlsHandshakeFailed) < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.counters.get(Event::DtlsHandshakeFailed), 1);
    assert!(!thief.is_connected());
    for mid in 2..4 {
        assert_eq!(
            String::from_utf8_lossy(&exchange(&mut c, &sock, s.dtls, mid).await.payload),
            mine,
            "dev-1's session keeps its identity"
        );
    }
    // A handshake of dev-2 with its key still names dev-2.
    let sock2 = socket().await;
    let mut c2 = DtlsClient::connect(
        &psk("dev-2", b"other-key-16byte"),
        &sock2,
        s.dtls,
        Duration::from_secs(5),
    )
    .await
    .expect("dev-2 handshakes");
    assert_eq!(
        String::from_utf8_lossy(&exchange(&mut c2, &sock2, s.dtls, 1).await.payload),
        "Some(Psk(\"dev-2\"))"
    );
}

/// Issue 25 review: a client certificate larger than the listener's 2 KiB scratch buffer
/// is refused like any other it cannot verify. Before, dimpl asserted on the buffer's
/// size: the panic ended the listener's receive task, and no handshake was answered
/// after it.
#[tokio::test]
async fn a_big_client_certificate_is_refused_and_the_listener_goes_on() {
    let s = start_cert();
    for sans in [60, 150] {
        let key = rcgen::KeyPair::generate().unwrap();
        let names = (0..sans)
            .map(|i| format!("device-{i:04}.sensors.example.com"))
            .collect::<Vec<_>>();
        let big = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let len = big.der().len();
        assert!(len > 2048 && len < 16 * 1024, "{len} bytes");
        let cfg = ClientConfig::new(ClientAuth::Certificate {
            cert: big.der().to_vec(),
            key: key.serialize_der(),
        })
        .unwrap();
        let sock = socket().await;
        let r = DtlsClient::connect(&cfg, &sock, s.dtls, Duration::from_secs(3)).await;
        assert!(
            r.is_err(),
            "a certificate chaining to no trusted CA is refused"
        );
        // The listener still answers: a PSK device handshakes and is answered.
        let sock = socket().await;
        let mut c = dev1(&s, &sock).await;
        assert_eq!(
            String::from_utf8_lossy(&exchange(&mut c, &sock, s.dtls, 1).await.payload),
            "Some(Psk(\"dev-1\"))"
        );
    }
    assert_eq!(s.counters.get(Event::DtlsHandshakeFailed), 2);
    assert_eq!(s.transport.dtls_counts().half_open, 0);
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
    let mut c = dev1(&s, &sock).await;
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

/// Issue 25 review: the HelloVerifyRequest cookie is bound to the client's address
/// (RFC 6347 §4.2.1). A ClientHello carrying a cookie fetched from another address gets
/// a HelloVerifyRequest of its own and leaves no state, so a spoofed source can neither
/// replace a device's session nor hold half-open slots; from the address it was sent to,
/// the same ClientHello opens the handshake. Before, the cookie was a function of the
/// client random alone and was accepted from any address.
#[tokio::test]
async fn a_cookie_opens_a_handshake_from_its_own_address_only() {
    let s = start(100);
    let mine = socket().await;
    let other = socket().await;
    let mut c = DtlsClient::new(&psk("dev-1", b"secret-key-16byt"), Instant::now());
    for r in c.poll() {
        mine.send_to(&r, s.dtls).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), mine.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let with_cookie = c.on_datagram(&buf[..n], Instant::now()).unwrap().concat();
    assert_eq!(s.counters.get(Event::DtlsHelloVerify), 1);
    // From another address (port): another HelloVerifyRequest (handshake type 3), no state.
    other.send_to(&with_cookie, s.dtls).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), other.recv_from(&mut buf))
        .await
        .expect("an answer to the other address")
        .unwrap();
    assert_eq!(
        buf.get(13),
        Some(&3),
        "a HelloVerifyRequest: {:?}",
        &buf[..n.min(16)]
    );
    assert_eq!(s.counters.get(Event::DtlsHelloVerify), 2);
    assert_eq!(s.transport.dtls_counts(), Default::default());
    // From its own address the same ClientHello opens the handshake (ServerHello, type 2).
    mine.send_to(&with_cookie, s.dtls).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), mine.recv_from(&mut buf))
        .await
        .expect("the server's flight")
        .unwrap();
    assert_eq!(
        buf.get(13),
        Some(&2),
        "a ServerHello: {:?}",
        &buf[..n.min(16)]
    );
    assert_eq!(s.transport.dtls_counts().half_open, 1);
    // And it completes.
    let mut done = c.on_datagram(&buf[..n], Instant::now()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !c.is_connected() {
        for r in done.drain(..) {
            mine.send_to(&r, s.dtls).await.unwrap();
        }
        let (n, _) = tokio::time::timeout_at(deadline, mine.recv_from(&mut buf))
            .await
            .expect("the handshake completes")
            .unwrap();
        done = c.on_datagram(&buf[..n], Instant::now()).unwrap();
    }
    for r in done {
        mine.send_to(&r, s.dtls).await.unwrap();
    }
    assert_eq!(
        exchange(&mut c, &mine, s.dtls, 5).await.header.message_id,
        5
    );
}

/// The DTLS records of a datagram (13-byte headers, length in bytes 11–12).
fn records(mut d: &[u8]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    while d.len() >= 13 {
        let end = 13 + u16::from_be_bytes([d[11], d[12]]) as usize;
        v.push(d[..end.min(d.len())].to_vec());
        d = &d[end.min(d.len())..];
    }
    v
}

/// Issue 25 review: revoking (or replacing) a PSK ends the handshakes that already looked
/// it up, not only the established sessions. Before, a handshake holding its
/// ClientKeyExchange at the moment of the rotation finished under the old key afterwards.
#[tokio::test]
async fn revoking_an_identity_ends_its_handshakes_in_progress() {
    let s = start(100);
    let sock = socket().await;
    let mut c = DtlsClient::new(&psk("dev-3", b"third-key-16byte"), Instant::now());
    for r in c.poll() {
        sock.send_to(&r, s.dtls).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let flight = loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
            .await
            .expect("the server's flight")
            .unwrap();
        let out = c.on_datagram(&buf[..n], Instant::now()).unwrap();
        match out.first() {
            // The ClientHello with the cookie.
            Some(r) if out.len() == 1 && r.get(13) == Some(&1) => {
                sock.send_to(r, s.dtls).await.unwrap();
            }
            Some(_) => break records(&out.concat()),
            None => {}
        }
    };
    assert!(
        flight.len() >= 3,
        "ClientKeyExchange, ChangeCipherSpec, Finished"
    );
    // The ClientKeyExchange alone: the server looks the key up and waits for the rest.
    let before = DEV3_LOOKUPS.load(std::sync::atomic::Ordering::SeqCst);
    sock.send_to(&flight[0], s.dtls).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while DEV3_LOOKUPS.load(std::sync::atomic::Ordering::SeqCst) == before
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.transport.dtls_counts().half_open, 1);
    let closed = s
        .transport
        .close_sessions(&|id| *id == PeerIdentity::Psk(Arc::from("dev-3")));
    assert_eq!(closed, 1, "the handshake in progress is ended");
    assert_eq!(s.transport.dtls_counts(), Default::default());
    sock.send_to(&flight[1..].concat(), s.dtls).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await;
    if let Ok(Ok((n, _))) = got {
        let _ = c.on_datagram(&buf[..n], Instant::now());
    }
    assert!(!c.is_connected(), "the handshake does not finish");
    assert_eq!(s.transport.dtls_counts(), Default::default());
    assert_eq!(s.counters.get(Event::DtlsHandshake), 0);
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

/// One source (here 127.0.0.1) that finishes cookie exchanges and never a handshake holds
/// at most `dtls_max_handshakes_per_source` slots, so another source still gets one:
/// before, one address could hold every slot of `dtls_max_handshakes` for the handshake
/// timeout (30 s), at 33 ClientHellos a second, and no device could start a session.
#[tokio::test]
async fn one_source_holds_at_most_its_share_of_half_open_handshakes() {
    let s = start_with(CoapConfig {
        dtls_max_handshakes: 10,
        dtls_max_handshakes_per_source: 3,
        ..CoapConfig::default()
    });
    // As many as the listener's bound: without the source's, they would take every slot.
    let _socks = half_open(&s, 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.counters.get(Event::DtlsHandshakeDropped) < 7 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.counters.get(Event::DtlsHandshakeDropped), 7);
    assert_eq!(s.transport.dtls_counts().half_open, 3);
    // Another source completes a handshake.
    let sock = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let mut c = DtlsClient::new(&psk("dev-1", b"secret-key-16byt"), Instant::now());
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = c.poll();
    while !c.is_connected() {
        assert!(
            Instant::now() < deadline,
            "127.0.0.2 could not finish a handshake"
        );
        for r in out.drain(..) {
            sock.send_to(&r, s.dtls).await.unwrap();
        }
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
        {
            out = c.on_datagram(&buf[..n], Instant::now()).unwrap();
        }
    }
    assert_eq!(s.counters.get(Event::DtlsHandshake), 1);
    assert_eq!(s.counters.get(Event::DtlsHandshakeDropped), 7);
}

/// libcoap's client (`coap-client-openssl`, `coap-client-gnutls`, Debian libcoap3-bin)
/// run with `args`, giving up after 10 s; its exit status and all it printed.
fn libcoap(bin: &str, args: &[String]) -> (bool, String) {
    let path = format!("/usr/bin/{bin}");
    if !std::path::Path::new(&path).exists() {
        let _ = std::process::Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "-q",
                "libcoap3-bin",
            ])
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
    let mut c = dev1(&s, &sock).await;
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

/// Waits on `sock` for the next message the session decrypts (answering what the
/// handshake layer asks to send); `None` if nothing comes within `wait`.
async fn receive(
    c: &mut DtlsClient,
    sock: &UdpSocket,
    server: SocketAddr,
    wait: Duration,
) -> Option<Packet> {
    receive_pinged(c, sock, server, wait).await.0
}

/// The next message from the session, CoAP pings (Empty CON: the listener's check of a
/// new address) answered with a Reset from `sock`; how many.
async fn receive_pinged(
    c: &mut DtlsClient,
    sock: &UdpSocket,
    server: SocketAddr,
    wait: Duration,
) -> (Option<Packet>, usize) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pings = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(p) = receive_any(c, sock, server, left).await else {
            return (None, pings);
        };
        if is_ping(&p) {
            answer_ping(c, sock, server, &p).await;
            pings += 1;
            continue;
        }
        return (Some(p), pings);
    }
}

/// The next message from the session, pings included.
async fn receive_any(
    c: &mut DtlsClient,
    sock: &UdpSocket,
    server: SocketAddr,
    wait: Duration,
) -> Option<Packet> {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(m) = c.take_message() {
            return Some(Packet::from_bytes(&m).unwrap());
        }
        let (n, _) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        for r in c.on_datagram(&buf[..n], Instant::now()).unwrap() {
            sock.send_to(&r, server).await.unwrap();
        }
    }
}

fn is_ping(p: &Packet) -> bool {
    p.header.code == MessageClass::Empty && p.header.get_type() == MessageType::Confirmable
}

/// A Reset to a CoAP ping (RFC 7252 §4.3), from `sock`.
async fn answer_ping(c: &mut DtlsClient, sock: &UdpSocket, server: SocketAddr, ping: &Packet) {
    let mut rst = Packet::new();
    rst.header.set_type(MessageType::Reset);
    rst.header.code = MessageClass::Empty;
    rst.header.message_id = ping.header.message_id;
    send_via(c, sock, server, &rst.to_bytes().unwrap()).await;
}

async fn send_via(c: &mut DtlsClient, sock: &UdpSocket, server: SocketAddr, msg: &[u8]) {
    for r in c.send(msg).unwrap() {
        sock.send_to(&r, server).await.unwrap();
    }
}

/// RFC 9146: our client offers a connection ID, the listener gives one; the device's
/// address changes (a new socket, the same DTLS state) and its session stays: its next
/// request is answered at the new address, the daemon's next request reaches it there,
/// and a late record (authentic, not newer) from a third address does not move it.
#[tokio::test]
async fn connection_id_keeps_the_session_across_an_address_change() {
    let s = start(100);
    let first = socket().await;
    let mut c = dev1(&s, &first).await;
    let answer = exchange(&mut c, &first, s.dtls, 1).await;
    assert_eq!(
        String::from_utf8_lossy(&answer.payload),
        "Some(Psk(\"dev-1\"))"
    );

    // The NAT mapping changes: the same session from another port.
    let moved = socket().await;
    let records = c.send(&get(2)).unwrap();
    assert!(
        records.iter().all(|r| r[0] == 25),
        "records to the server are tls12_cid records"
    );
    for r in &records {
        moved.send_to(r, s.dtls).await.unwrap();
    }
    let (answer, pings) = receive_pinged(&mut c, &moved, s.dtls, Duration::from_secs(5)).await;
    let answer = answer.expect("the answer at the new address");
    assert_eq!(answer.header.message_id, 2);
    assert_eq!(pings, 1, "the new address is checked (RFC 9146 §6)");
    assert_eq!(
        String::from_utf8_lossy(&answer.payload),
        "Some(Psk(\"dev-1\"))"
    );
    assert_eq!(s.counters.get(Event::DtlsHandshake), 1);
    assert_eq!(s.transport.dtls_counts().sessions, 1);

    // The daemon's request to the registration's session (the handshake's address)
    // goes to the device's new address.
    let peer = session_of(&s, &first);
    let t = s.transport.clone();
    let read = tokio::spawn(async move {
        t.request(peer, &OutRequest::new(RequestType::Get, "/3/0/0"))
            .await
    });
    let req = receive(&mut c, &moved, s.dtls, Duration::from_secs(5))
        .await
        .expect("the daemon's read at the new address");
    assert_eq!(req.header.code, MessageClass::Request(RequestType::Get));
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Response(ResponseType::Content);
    ack.header.message_id = req.header.message_id;
    ack.set_token(req.get_token().to_vec());
    ack.payload = b"acme".to_vec();
    send_via(&mut c, &moved, s.dtls, &ack.to_bytes().unwrap()).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the read completes")
        .unwrap()
        .expect("the device's answer");
    assert_eq!(reply.payload, b"acme");

    // RFC 9146 §6: a record that authenticates but is older than the newest seen (sent
    // late, from a third address) is answered, but does not move the session.
    let late = c.send(&get(3)).unwrap();
    send_via(&mut c, &moved, s.dtls, &get(4)).await;
    let answer = receive(&mut c, &moved, s.dtls, Duration::from_secs(5))
        .await
        .expect("answer to 4");
    assert_eq!(answer.header.message_id, 4);
    let third = socket().await;
    for r in &late {
        third.send_to(r, s.dtls).await.unwrap();
    }
    let answer = receive(&mut c, &moved, s.dtls, Duration::from_secs(5))
        .await
        .expect("the late request answered at the current address");
    assert_eq!(answer.header.message_id, 3);
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing goes to the address of a late record"
    );
    assert_eq!(s.transport.dtls_counts().sessions, 1);
}

/// Pumps datagrams between two dimpl instances until both are connected or `rounds`
/// pass; returns whether each is.
fn pump(a: &mut dimpl::Dtls, b: &mut dimpl::Dtls, rounds: usize) -> (bool, bool) {
    let mut connected = (false, false);
    for _ in 0..rounds {
        let now = Instant::now();
        let _ = a.handle_timeout(now);
        let _ = b.handle_timeout(now);
        connected.0 |= flush(a, b);
        connected.1 |= flush(b, a);
        if connected == (true, true) {
            break;
        }
    }
    connected
}

/// Delivers what `from` has to send to `to`; whether `from` reported Connected.
fn flush(from: &mut dimpl::Dtls, to: &mut dimpl::Dtls) -> bool {
    let mut buf = vec![0u8; 4096];
    let mut connected = false;
    loop {
        match from.poll_output(&mut buf) {
            dimpl::Output::Packet(p) => {
                let p = p.to_vec();
                to.handle_packet(&p).expect("a valid record");
            }
            dimpl::Output::Connected => connected = true,
            dimpl::Output::Timeout(_) => return connected,
            _ => {}
        }
    }
}

/// Sends `msg` from `a` to `b`: returns the records on the wire and what `b` decrypted.
fn carry(a: &mut dimpl::Dtls, b: &mut dimpl::Dtls, msg: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    a.send_application_data(msg).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut wire = Vec::new();
    while let dimpl::Output::Packet(p) = a.poll_output(&mut buf) {
        wire.push(p.to_vec());
    }
    for p in &wire {
        b.handle_packet(p).unwrap();
    }
    let mut got = Vec::new();
    loop {
        match b.poll_output(&mut buf) {
            dimpl::Output::ApplicationData(d) => got.extend_from_slice(d),
            dimpl::Output::Timeout(_) => break,
            _ => {}
        }
    }
    (wire, got)
}

struct AnyPsk;

impl dimpl::PskResolver for AnyPsk {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(b"secret-key-16byt".to_vec())
    }
}

/// The patched dimpl alone: non-empty connection IDs in both directions, with the PSK
/// CCM_8 suite and the ECDHE-ECDSA GCM one; a client that does not offer gets none.
#[test]
fn dimpl_connection_ids_both_ways_ccm8_and_gcm() {
    use dimpl::{Config, Dtls, DtlsCertificate};
    let now = Instant::now();
    let psk_server = |cid: Option<u8>| {
        let b = Config::builder()
            .with_psk_server(None, Arc::new(AnyPsk))
            .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .use_server_cookie(false);
        let b = match cid {
            Some(n) => b.connection_id_len(n),
            None => b,
        };
        Arc::new(b.build().unwrap())
    };
    let psk_client = |cid: Option<u8>| {
        let b = Config::builder()
            .with_psk_client(b"dev".to_vec(), Arc::new(AnyPsk))
            .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[]);
        let b = match cid {
            Some(n) => b.connection_id_len(n),
            None => b,
        };
        Arc::new(b.build().unwrap())
    };
    let cert = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["dev".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        DtlsCertificate {
            certificate: c.der().to_vec(),
            private_key: key.serialize_der(),
        }
    };
    let cert_config = |cid: u8| {
        Arc::new(
            Config::builder()
                .dtls12_cipher_suites(&[
                    dimpl::crypto::Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256,
                ])
                .dtls13_cipher_suites(&[])
                .use_server_cookie(false)
                .connection_id_len(cid)
                .build()
                .unwrap(),
        )
    };
    let pairs: Vec<(&str, Dtls, Dtls)> = vec![
        (
            "psk",
            Dtls::new_12_psk(psk_client(Some(5)), now),
            Dtls::new_12_psk(psk_server(Some(4)), now),
        ),
        (
            "ecdsa",
            Dtls::new_12(cert_config(5), cert(), now),
            Dtls::new_12(cert_config(4), cert(), now),
        ),
    ];
    for (name, mut client, mut server) in pairs {
        client.set_active(true);
        assert_eq!(pump(&mut client, &mut server, 50), (true, true), "{name}");
        let server_cid = server.connection_id().expect("negotiated").to_vec();
        let client_cid = client.connection_id().expect("negotiated").to_vec();
        assert_eq!((server_cid.len(), client_cid.len()), (4, 5), "{name}");
        let (wire, got) = carry(&mut client, &mut server, b"to the server");
        assert_eq!(got, b"to the server", "{name}");
        assert_eq!(wire[0][0], 25, "{name}: tls12_cid");
        assert_eq!(&wire[0][11..15], &server_cid[..], "{name}");
        assert!(server.take_newer_record(), "{name}: a newer record");
        assert!(!server.take_newer_record(), "{name}: reported once");
        let (wire, got) = carry(&mut server, &mut client, b"to the client");
        assert_eq!(got, b"to the client", "{name}");
        assert_eq!(wire[0][0], 25, "{name}: tls12_cid");
        assert_eq!(&wire[0][11..16], &client_cid[..], "{name}");
        // A record whose protected part is altered does not authenticate.
        client.send_application_data(b"x").unwrap();
        let mut buf = vec![0u8; 4096];
        let dimpl::Output::Packet(p) = client.poll_output(&mut buf) else {
            panic!("{name}: a record")
        };
        let mut p = p.to_vec();
        let last = p.len() - 1;
        p[last] ^= 1;
        let _ = server.handle_packet(&p);
        assert!(
            !server.take_newer_record(),
            "{name}: forged record not newer"
        );
    }
    // Without an offer (or without the server's consent) no connection ID is used.
    for (c, s) in [(None, Some(4)), (Some(0), None)] {
        let mut client = Dtls::new_12_psk(psk_client(c), now);
        let mut server = Dtls::new_12_psk(psk_server(s), now);
        client.set_active(true);
        assert_eq!(pump(&mut client, &mut server, 50), (true, true));
        assert!(server.connection_id().is_none() && client.connection_id().is_none());
        let (wire, got) = carry(&mut client, &mut server, b"plain");
        assert_eq!(got, b"plain");
        assert_eq!(wire[0][0], 23, "application_data");
    }
}

/// RFC 9146 §6: until the device answers the listener's check of its new address (a CoAP
/// ping in the session) from there, the address gets at most 3 times the bytes it sent: a
/// 600-byte request of the daemon is held back (counted) while the first ping goes
/// unanswered; the ping is repeated, the device answers the second one, and the request
/// (retransmitted by the message layer) then reaches it at the new address.
#[tokio::test]
async fn an_unanswered_address_check_holds_back_big_requests_until_answered() {
    let s = start(100);
    let first = socket().await;
    let mut c = dev1(&s, &first).await;
    exchange(&mut c, &first, s.dtls, 1).await;

    let moved = socket().await;
    send_via(&mut c, &moved, s.dtls, &get(2)).await;
    let mut answered = false;
    let mut ping = None;
    while !(answered && ping.is_some()) {
        let m = receive_any(&mut c, &moved, s.dtls, Duration::from_secs(5))
            .await
            .expect("the answer and the ping at the new address");
        if is_ping(&m) {
            ping = Some(m);
        } else {
            assert_eq!(m.header.message_id, 2);
            answered = true;
        }
    }
    // The first ping is not answered.

    let peer = session_of(&s, &first);
    let t = s.transport.clone();
    let mut put = OutRequest::new(RequestType::Put, "/3/0/15");
    put.payload = vec![b'x'; 600];
    let write = tokio::spawn(async move { t.request(peer, &put).await });
    let mut second = None;
    let mut held_back = true;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while second.is_none() && tokio::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match receive_any(&mut c, &moved, s.dtls, left).await {
            Some(m) if is_ping(&m) => second = Some(m),
            Some(_) => held_back = false,
            None => break,
        }
    }
    assert!(
        held_back,
        "a 600-byte request went to an unverified address"
    );
    assert!(s.counters.get(Event::DtlsUnverifiedDropped) >= 1);
    let second = second.expect("the ping again (after 2 s)");
    answer_ping(&mut c, &moved, s.dtls, &second).await;

    let (req, _) = receive_pinged(&mut c, &moved, s.dtls, Duration::from_secs(15)).await;
    let req = req.expect("the request once the address answered");
    assert_eq!(req.header.code, MessageClass::Request(RequestType::Put));
    assert_eq!(req.payload.len(), 600);
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Response(ResponseType::Changed);
    ack.header.message_id = req.header.message_id;
    ack.set_token(req.get_token().to_vec());
    send_via(&mut c, &moved, s.dtls, &ack.to_bytes().unwrap()).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .expect("the write completes")
        .unwrap()
        .expect("the device's answer");
    assert_eq!(reply.code, ResponseType::Changed);
    assert_eq!(s.counters.get(Event::DtlsHandshake), 1);
}

/// Everything `from` has to send now, and whether it reported Connected meanwhile.
fn outgoing(from: &mut dimpl::Dtls) -> (Vec<Vec<u8>>, bool) {
    let mut buf = vec![0u8; 4096];
    let (mut wire, mut connected) = (Vec::new(), false);
    loop {
        match from.poll_output(&mut buf) {
            dimpl::Output::Packet(p) => wire.push(p.to_vec()),
            dimpl::Output::Connected => connected = true,
            dimpl::Output::Timeout(_) => return (wire, connected),
            _ => {}
        }
    }
}

/// The patched dimpl's `Dtls::trim` (issue 21, memory per session) and the server's
/// last flight (RFC 6347 §4.2.4). A server whose final flight (ChangeCipherSpec,
/// Finished) was lost is trimmed before the client has it: the client's retransmitted
/// flight still gets the server's flight again, and the session then carries data both
/// ways. Once the client's application data proved that it has our Finished, a trim
/// drops the flight: a replay of the client's final flight gets nothing back, and the
/// session still carries data both ways. With the PSK CCM_8 suite and the ECDHE-ECDSA
/// GCM one (both with their encryption-only AES key schedules).
#[test]
fn dimpl_trim_keeps_the_last_flight_until_the_client_has_it() {
    use dimpl::{Config, Dtls, DtlsCertificate};
    let psk = |client: bool| {
        let b = Config::builder();
        let b = if client {
            b.with_psk_client(b"dev".to_vec(), Arc::new(AnyPsk))
        } else {
            b.with_psk_server(None, Arc::new(AnyPsk))
                .use_server_cookie(false)
        };
        let b = b
            .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[]);
        Arc::new(b.build().unwrap())
    };
    let cert = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["dev".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        DtlsCertificate {
            certificate: c.der().to_vec(),
            private_key: key.serialize_der(),
        }
    };
    let ecdsa = || {
        Arc::new(
            Config::builder()
                .dtls12_cipher_suites(&[
                    dimpl::crypto::Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256,
                ])
                .dtls13_cipher_suites(&[])
                .use_server_cookie(false)
                .build()
                .unwrap(),
        )
    };
    let start = Instant::now();
    let make = |name: &str| -> (Dtls, Dtls) {
        match name {
            "psk" => (
                Dtls::new_12_psk(psk(true), start),
                Dtls::new_12_psk(psk(false), start),
            ),
            _ => (
                Dtls::new_12(ecdsa(), cert(), start),
                Dtls::new_12(ecdsa(), cert(), start),
            ),
        }
    };
    for name in ["psk", "ecdsa"] {
        // Handshake until the server completes; its final flight is lost.
        let (mut client, mut server) = make(name);
        client.set_active(true);
        let _ = client.handle_timeout(start);
        let _ = server.handle_timeout(start);
        let mut client_final = Vec::new();
        let mut server_done = false;
        for _ in 0..20 {
            let (to_server, _) = outgoing(&mut client);
            for p in &to_server {
                server.handle_packet(p).expect("a valid record");
            }
            let (to_client, done) = outgoing(&mut server);
            if done {
                server_done = true;
                client_final = to_server;
                break;
            }
            for p in &to_client {
                client.handle_packet(p).expect("a valid record");
            }
        }
        assert!(server_done, "{name}: the server completed");
        assert!(
            !client_final.is_empty(),
            "{name}: the client's final flight"
        );
        // Quiet, so trimmed; the client did not get the server's Finished.
        server.trim();
        // The client's timer resends its flight; the server answers with its own again.
        let later = start + Duration::from_secs(3);
        let _ = client.handle_timeout(later);
        let _ = server.handle_timeout(later);
        let (again, _) = outgoing(&mut client);
        assert!(!again.is_empty(), "{name}: the client resends its flight");
        for p in &again {
            server.handle_packet(p).expect("a valid record");
        }
        let (flight, _) = outgoing(&mut server);
        assert!(
            !flight.is_empty(),
            "{name}: the trimmed server resends its last flight"
        );
        for p in &flight {
            client.handle_packet(p).expect("a valid record");
        }
        assert!(
            outgoing(&mut client).1,
            "{name}: the client completes with the resent flight"
        );
        let (_, got) = carry(&mut client, &mut server, b"to the server");
        assert_eq!(got, b"to the server", "{name}");
        let (_, got) = carry(&mut server, &mut client, b"to the client");
        assert_eq!(got, b"to the client", "{name}");
        // The client has proven it has our Finished: a trim now drops the flight, and
        // a replay of the client's final flight gets nothing back.
        server.trim();
        for p in client_final.iter().chain(&again) {
            let _ = server.handle_packet(p);
        }
        let (answer, _) = outgoing(&mut server);
        assert!(answer.is_empty(), "{name}: nothing resent once confirmed");
        for round in 0..2 {
            let (_, got) = carry(&mut client, &mut server, b"again to the server");
            assert_eq!(got, b"again to the server", "{name} {round}");
            let (_, got) = carry(&mut server, &mut client, b"again to the client");
            assert_eq!(got, b"again to the client", "{name} {round}");
            server.trim();
        }
    }
}
