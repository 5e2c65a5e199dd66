//! The CoAP over TLS listener over real TCP sockets and real TLS (rustls on both sides):
//! RFC 8323 signalling (CSM first, Ping/Pong, Release, Abort on malformed input, idle
//! release), requests both ways through the unchanged message layer (a device's request
//! to the handler, our read and observation to the device), the certificate's identity,
//! a closed connection failing a pending request at once, and `close_sessions`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{RequestType, ResponseType};
use connectord_coap::client::{OutRequest, observation_feed};
use connectord_coap::message::{Handled, Inbound, Response};
use connectord_coap::rfc8323::{self, Frame, Signal};
use connectord_coap::{
    CoapConfig, Counters, ListenerKind, PeerIdentity, PeerRef, RequestHandler, Transport,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const MAX: usize = 4096;

/// Answers every request 2.05 with the peer's certificate identity as `cn/ou`.
struct WhoAmI;
impl RequestHandler for WhoAmI {
    fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>> {
        let who = match req.identity {
            Some(PeerIdentity::Certificate { cn, ou, .. }) => {
                format!("{cn}/{}", ou.as_deref().unwrap_or(""))
            }
            other => format!("{other:?}"),
        };
        Box::pin(async move {
            let mut r = Response::new(ResponseType::Content);
            r.payload = who.into_bytes();
            r.into()
        })
    }
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, cn: &str, ou: Option<&str>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(ou) = ou {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        let c = p.signed_by(&key, &issuer).unwrap();
        (c.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec!["localhost".into()], "server", None),
        client: leaf(vec![], "dev1", Some("dom")),
    }
}

struct Setup {
    transport: Arc<Transport>,
    addr: SocketAddr,
    pki: Pki,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn setup(idle_s: u64) -> Setup {
    setup_with(CoapConfig {
        tls_idle_timeout_s: idle_s,
        ..CoapConfig::default()
    })
    .await
}

async fn setup_with(base: CoapConfig) -> Setup {
    setup_full(base, None).await
}

async fn setup_full(
    base: CoapConfig,
    credentials: Option<Arc<dyn connectord_coap::Credentials>>,
) -> Setup {
    let cfg = CoapConfig {
        listen: vec![],
        listen_tls: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        tls_max_message_size: MAX,
        // Long enough that a request failing within a second was failed by the close.
        ack_timeout_ms: 2000,
        max_retransmit: 4,
        ..base
    };
    assert_eq!(cfg.check(), Ok(()));
    let transport = Transport::bind(&cfg, Arc::new(Counters::default())).unwrap();
    let pki = pki();
    use rustls::pki_types::pem::PemObject;
    let server = connectord_coap::tls::server_config(
        ("server cert", pki.server.0.as_bytes()),
        ("server key", pki.server.1.as_bytes()),
        &[
            rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes())
                .unwrap()
                .to_vec(),
        ],
    )
    .unwrap();
    transport.configure_tls(&connectord_coap::TlsSetup {
        server: Arc::new(server),
        credentials,
    });
    let (trigger, stop) = tokio::sync::watch::channel(false);
    transport.start(Arc::new(WhoAmI), stop);
    let addr = transport.local_addrs_of(ListenerKind::Tls)[0];
    Setup {
        transport,
        addr,
        pki,
        _stop: trigger,
    }
}

async fn try_connect(s: &Setup) -> std::io::Result<Device> {
    try_connect_with(s, None).await
}

/// As [`try_connect`], with the socket's receive buffer set to `rcvbuf` bytes.
async fn try_connect_with(s: &Setup, rcvbuf: Option<u32>) -> std::io::Result<Device> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(s.pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(s.pki.client.0.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(s.pki.client.1.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"coap".to_vec()];
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    let tcp = sock.connect(s.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // The server's verdict on our certificate (or a full listener) shows at the
    // first read in TLS 1.3: wait for its first bytes (the CSM).
    let mut d = Device {
        tls,
        buf: Vec::new(),
        local,
    };
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), d.tls.read(&mut chunk))
        .await
        .map_err(|_| std::io::Error::other("nothing within 5 s"))??;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    d.buf.extend_from_slice(&chunk[..n]);
    Ok(d)
}

/// A device's TLS connection with its receive buffer.
struct Device {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
    local: SocketAddr,
}

impl Device {
    async fn connect(s: &Setup) -> Device {
        try_connect(s).await.expect("handshake")
    }

    async fn send(&mut self, f: &Frame) {
        self.tls.write_all(&rfc8323::encode(f)).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// The next frame, or None at the end of the stream; within 5 s.
    async fn next(&mut self) -> Option<Frame> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((f, n)) = rfc8323::decode(&self.buf, usize::MAX).unwrap() {
                self.buf.drain(..n);
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.tls.read(&mut chunk))
                .await
                .expect("nothing from the server within 5 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads the server's CSM and sends ours.
    async fn csm(&mut self) {
        let f = self.next().await.expect("the server's CSM");
        assert_eq!(
            Signal::read(&f),
            Ok(Some(Signal::Csm {
                max_message_size: Some(MAX as u32),
                block_wise: false
            })),
            "the server's first message is its CSM"
        );
        self.send(&rfc8323::csm(1152)).await;
    }

    fn peer(&self, s: &Setup) -> PeerRef {
        PeerRef {
            listener: s.transport.listeners()[0],
            session: self.local,
        }
    }
}

fn request(code: u8, token: &[u8], path: &[&str]) -> Frame {
    let opts: Vec<(u16, &[u8])> = path.iter().map(|p| (11u16, p.as_bytes())).collect();
    Frame {
        code,
        token: token.to_vec(),
        body: rfc8323::body(&opts, &[]),
    }
}

fn response(token: &[u8], observe: Option<u8>, payload: &[u8]) -> Frame {
    let obs = observe.map(|o| vec![o]);
    let opts: Vec<(u16, &[u8])> = obs.iter().map(|o| (6u16, o.as_slice())).collect();
    Frame {
        code: 0x45,
        token: token.to_vec(),
        body: rfc8323::body(&opts, payload),
    }
}

fn payload(f: &Frame) -> Vec<u8> {
    rfc8323::options(&f.body).unwrap().1.to_vec()
}

#[tokio::test]
async fn requests_both_ways_and_signalling_over_a_tls_connection() {
    let s = setup(60).await;
    let mut dev = Device::connect(&s).await;
    dev.csm().await;

    // Ping → Pong with the same token.
    dev.send(&rfc8323::signal(rfc8323::PING, &[7])).await;
    let pong = dev.next().await.unwrap();
    assert_eq!(
        (pong.code, pong.token.as_slice()),
        (rfc8323::PONG, &[7u8][..])
    );

    // The device's request reaches the handler with its certificate's identity, and the
    // answer comes back on the connection with the request's token.
    dev.send(&request(0x02, &[1], &["rd"])).await;
    let r = dev.next().await.unwrap();
    assert_eq!((r.code, r.token.as_slice()), (0x45, &[1u8][..]));
    assert_eq!(payload(&r), b"dev1/dom");
    assert_eq!(
        s.transport.listeners()[0].kind,
        ListenerKind::Tls,
        "the only listener"
    );

    // A read from our side goes out as a frame; the device's answer ends the exchange.
    let t = Arc::clone(&s.transport);
    let to = dev.peer(&s);
    let read = tokio::spawn(async move {
        t.request(to, &OutRequest::new(RequestType::Get, "/3/0/0"))
            .await
    });
    let req = dev.next().await.unwrap();
    assert_eq!(req.code, 0x01, "a GET");
    dev.send(&response(&req.token, None, b"ACME")).await;
    let reply = read.await.unwrap().expect("the read's answer");
    assert_eq!(
        (reply.code, reply.payload.as_slice()),
        (ResponseType::Content, &b"ACME"[..])
    );

    // An observation: the first answer, then a notification on the same token.
    let t = Arc::clone(&s.transport);
    let obs = tokio::spawn(async move {
        t.observe(to, &OutRequest::new(RequestType::Get, "/3303/0/5700"))
            .await
    });
    let req = dev.next().await.unwrap();
    dev.send(&response(&req.token, Some(1), b"20")).await;
    let (first, stream) = obs.await.unwrap().expect("observation established");
    assert_eq!(
        (first.payload.as_slice(), first.observe),
        (&b"20"[..], Some(1))
    );
    let (tx, mut feed) = observation_feed();
    let fed = stream.into_feed(1, &tx, None);
    dev.send(&response(&req.token, Some(2), b"21")).await;
    let mut items = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), feed.recv_many(&mut items, 1))
        .await
        .expect("a notification");
    assert_eq!(items[0].take_reply().payload, b"21");
    // The observation dropped on our side: its next notification is answered by a
    // deregistration (GET, Observe=1, same token and path), there being no RST on TCP.
    drop(fed);
    dev.send(&response(&req.token, Some(3), b"22")).await;
    let dereg = dev.next().await.unwrap();
    assert_eq!((dereg.code, &dereg.token), (0x01, &req.token));
    let (opts, _) = rfc8323::options(&dereg.body).unwrap();
    assert!(opts.contains(&(6, &[1u8][..])), "{opts:?}");
    let path: Vec<&[u8]> = opts
        .iter()
        .filter(|(n, _)| *n == 11)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(path, [&b"3303"[..], b"0", b"5700"]);

    // A request pending when the device releases the connection fails at once, not
    // after MAX_TRANSMIT_WAIT (62 s here).
    let t = Arc::clone(&s.transport);
    let started = Instant::now();
    let pending = tokio::spawn(async move {
        t.request(to, &OutRequest::new(RequestType::Get, "/3/0/1"))
            .await
    });
    let _unanswered = dev.next().await.unwrap();
    dev.send(&rfc8323::signal(rfc8323::RELEASE, &[])).await;
    let failed = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the pending request fails within 2 s")
        .unwrap();
    assert!(failed.is_err(), "{failed:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(dev.next().await, None, "the server closed");
    // The session is gone: a request to it fails at once.
    let gone = s
        .transport
        .request(to, &OutRequest::new(RequestType::Get, "/3/0/0"))
        .await;
    assert!(gone.is_err());
}

/// Malformed input, a first message that is not a CSM and a message over our
/// Max-Message-Size: each is answered with Abort and the connection closes.
#[tokio::test]
async fn malformed_input_is_answered_with_abort_and_close() {
    let s = setup(60).await;
    let abort_then_close = |mut dev: Device, bytes: Vec<u8>| async move {
        dev.tls.write_all(&bytes).await.unwrap();
        dev.tls.flush().await.unwrap();
        let f = dev.next().await.expect("an Abort");
        assert!(
            matches!(Signal::read(&f), Ok(Some(Signal::Abort(_)))),
            "{f:?}"
        );
        assert_eq!(dev.next().await, None, "closed after the Abort");
    };
    // A reserved token length (TKL 9), after the CSM.
    let mut dev = Device::connect(&s).await;
    dev.csm().await;
    abort_then_close(dev, vec![0x09, 0x01]).await;
    // A request before any CSM.
    let mut dev = Device::connect(&s).await;
    let _ = dev.next().await;
    abort_then_close(dev, rfc8323::encode(&request(0x01, &[1], &["x"]))).await;
    // A message over Max-Message-Size (refused from its header alone).
    let mut dev = Device::connect(&s).await;
    dev.csm().await;
    let big = Frame {
        code: 0x02,
        token: vec![],
        body: rfc8323::body(&[], &vec![0u8; MAX + 1]),
    };
    abort_then_close(dev, rfc8323::encode(&big)).await;
    // The listener still serves.
    let mut dev = Device::connect(&s).await;
    dev.csm().await;
    dev.send(&request(0x01, &[2], &["x"])).await;
    assert_eq!(dev.next().await.unwrap().code, 0x45);
}

/// A connection with no byte from the device for `coap.tls_idle_timeout_s` is released
/// (7.04) and closed; `close_sessions` aborts the connections of a revoked identity.
#[tokio::test]
async fn idle_connections_are_released_and_revoked_ones_aborted() {
    let s = setup(1).await;
    let mut dev = Device::connect(&s).await;
    dev.csm().await;
    let started = Instant::now();
    let f = dev.next().await.expect("a Release");
    assert_eq!(Signal::read(&f), Ok(Some(Signal::Release)));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(dev.next().await, None);

    let mut dev = Device::connect(&s).await;
    dev.csm().await;
    // Handled once the CSM is read: the session has its identity.
    dev.send(&request(0x01, &[3], &["x"])).await;
    assert_eq!(dev.next().await.unwrap().code, 0x45);
    let listener = &s.transport;
    assert_eq!(
        listener.close_sessions(
            &|id| matches!(id, PeerIdentity::Certificate { cn, .. } if &**cn == "other")
        ),
        0
    );
    assert_eq!(
        listener.close_sessions(
            &|id| matches!(id, PeerIdentity::Certificate { cn, .. } if &**cn == "dev1")
        ),
        1
    );
    let f = dev.next().await.expect("an Abort");
    assert!(
        matches!(Signal::read(&f), Ok(Some(Signal::Abort(_)))),
        "{f:?}"
    );
    assert_eq!(dev.next().await, None);
}

/// `coap.tls_max_connections`: a connection past the bound is closed at accept (its
/// handshake fails) and one is accepted again once a slot is free;
/// `coap.tls_handshake_timeout_s`: a TCP connection that never starts its handshake is
/// closed after it.
#[tokio::test]
async fn connections_and_handshakes_are_bounded() {
    let s = setup_with(CoapConfig {
        tls_max_connections: 1,
        tls_handshake_timeout_s: 1,
        ..CoapConfig::default()
    })
    .await;
    let mut first = Device::connect(&s).await;
    first.csm().await;
    let second = tokio::time::timeout(Duration::from_secs(5), try_connect(&s))
        .await
        .expect("refused at once");
    assert!(
        second.is_err(),
        "a second connection past tls_max_connections"
    );
    first.send(&rfc8323::signal(rfc8323::RELEASE, &[])).await;
    assert_eq!(first.next().await, None);
    // The slot is given back when the connection task ends.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(d) = try_connect(&s).await {
            again = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = again.expect("a connection once the first is gone");
    again.csm().await;
    again.send(&rfc8323::signal(rfc8323::RELEASE, &[])).await;
    assert_eq!(again.next().await, None);

    // Plain CoAP over TCP (no TLS) on the TLS port: the handshake fails, the connection
    // closes at once.
    let mut plain = TcpStream::connect(s.addr).await.unwrap();
    plain
        .write_all(&rfc8323::encode(&rfc8323::csm(1152)))
        .await
        .unwrap();
    let mut b = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match plain.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // a TLS alert
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection without TLS is closed");

    // Silent after TCP connect: closed after the handshake timeout (1 s).
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let started = Instant::now();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

/// The host's credential store revoked the certificate (by CN and serial): asked right
/// after the handshake, it has the connection aborted before any message is read.
#[tokio::test]
async fn a_revoked_certificate_is_aborted_after_the_handshake() {
    struct Revoked(std::sync::Mutex<Vec<(String, String)>>);
    impl connectord_coap::Credentials for Revoked {
        fn psk(&self, _: &[u8]) -> Option<Vec<u8>> {
            None
        }
        fn certificate_valid(&self, cn: &str, serial: &str) -> bool {
            self.0.lock().unwrap().push((cn.into(), serial.into()));
            cn != "dev1"
        }
    }
    let store = Arc::new(Revoked(Default::default()));
    let s = setup_full(
        CoapConfig::default(),
        Some(Arc::clone(&store) as Arc<dyn connectord_coap::Credentials>),
    )
    .await;
    let mut d = try_connect(&s)
        .await
        .expect("the handshake completes; the Abort follows");
    let f = d.next().await.expect("an Abort");
    assert!(
        matches!(Signal::read(&f), Ok(Some(Signal::Abort(ref why))) if why.contains("revoked")),
        "{f:?}"
    );
    assert_eq!(d.next().await, None);
    let asked = store.0.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].0, "dev1");
    assert!(
        asked[0].1.len() >= 2 && asked[0].1.chars().all(|c| c.is_ascii_hexdigit()),
        "serial in hex: {asked:?}"
    );
}

/// A device that sends requests and never reads their answers: once its queue of
/// answers is full, its connection is aborted, and all the while another device's
/// requests are answered (the receive loop the connections share is never held up).
#[tokio::test]
async fn a_device_that_does_not_read_is_aborted_and_holds_up_no_one() {
    let s = setup(60).await;
    let mut flood = try_connect_with(&s, Some(4096)).await.expect("handshake");
    flood.csm().await;
    let req = rfc8323::encode(&request(0x01, &[1], &["x"]));
    let burst: Vec<u8> = req
        .iter()
        .copied()
        .cycle()
        .take(req.len() * 20_000)
        .collect();
    let (mut rd, mut wr) = tokio::io::split(flood.tls);
    // Writing stops when the server stops reading (its writes to us are stuck).
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), wr.write_all(&burst)).await;
        wr
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another device is served meanwhile.
    let started = Instant::now();
    let mut other = Device::connect(&s).await;
    other.csm().await;
    other.send(&request(0x01, &[2], &["x"])).await;
    assert_eq!(other.next().await.unwrap().code, 0x45);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The flooding device reads at last: answers, then the Abort, then the end.
    let mut buf = flood.buf;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut answers = 0usize;
    let mut aborted = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    'read: loop {
        while let Some((f, n)) = rfc8323::decode(&buf, usize::MAX).unwrap() {
            buf.drain(..n);
            match Signal::read(&f) {
                Ok(Some(Signal::Abort(why))) => aborted = Some(why),
                _ => answers += 1,
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break 'read,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no end of the stream within 20 s ({answers} answers)"),
        }
    }
    let _ = writer.await;
    assert_eq!(aborted.as_deref(), Some("not reading"), "{answers} answers");
    assert!(answers < 20_000, "{answers}");
}
