#![no_main]
//! The DTLS input path: any datagram into a DTLS listener (the stateless ClientHello
//! parse, the cookie check, the HelloVerifyRequest, the rewrite of the first ClientHello)
//! and into a dimpl PSK server instance (record and handshake parsing past the cookie),
//! where runs of inputs build on one instance until it fails. Must not panic.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use connectord::coap::dtls::dimpl::{self, Dtls, Output};
use connectord::coap::dtls::{DtlsLimits, DtlsListener, DtlsSetup, hello};
use connectord::coap::{Counters, Credentials};
use libfuzzer_sys::fuzz_target;

struct Keys;

impl Credentials for Keys {
    fn psk(&self, identity: &[u8]) -> Option<Vec<u8>> {
        (identity == b"dev").then(|| b"0123456789abcdef".to_vec())
    }
}

struct Resolver;

impl dimpl::PskResolver for Resolver {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(b"0123456789abcdef".to_vec())
    }
}

fn listener() -> &'static DtlsListener {
    static L: OnceLock<(tokio::runtime::Runtime, DtlsListener)> = OnceLock::new();
    &L.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let l = {
            let _g = rt.enter();
            let limits = DtlsLimits {
                max_sessions: 100,
                max_handshakes: 10,
                max_handshakes_per_source: 10,
                handshake_timeout: Duration::from_secs(30),
                idle: Duration::from_secs(60),
            };
            DtlsListener::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                limits,
                Arc::new(Counters::default()),
            )
            .unwrap()
        };
        l.configure(&DtlsSetup {
            credentials: Arc::new(Keys),
            certificate: None,
            trust_anchors: Vec::new(),
        })
        .unwrap();
        (rt, l)
    })
    .1
}

fn server_config() -> Arc<dimpl::Config> {
    static C: OnceLock<Arc<dimpl::Config>> = OnceLock::new();
    C.get_or_init(|| {
        Arc::new(
            dimpl::Config::builder()
                .use_server_cookie(false)
                .with_psk_server(None, Arc::new(Resolver))
                .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8])
                .dtls13_cipher_suites(&[])
                // As the listener: a client offering RFC 9146 gets a CID (patch).
                .connection_id_len(6)
                .build()
                .unwrap(),
        )
    })
    .clone()
}

static SERVER: Mutex<Option<Dtls>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let peer = SocketAddr::from(([192, 0, 2, 1], 5684));
    let l = listener();
    let _ = l.on_datagram(data, peer, now);
    let _ = l.on_tick(now);
    if let Some(h) = hello::parse(data) {
        let _ = hello::first_hello(data, &h);
        let _ = hello::verify_request(&[7; 32], &h);
        let _ = hello::cookie_valid(&[7; 32], data, &h);
    }
    let mut server = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    let dtls = server.get_or_insert_with(|| Dtls::new_12_psk(server_config(), now));
    let ok = dtls.handle_timeout(now).and_then(|()| dtls.handle_packet(data));
    if ok.is_err() {
        *server = None;
        return;
    }
    let mut buf = vec![0u8; 2048];
    loop {
        match dtls.poll_output(&mut buf) {
            Output::Timeout(_) => break,
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            _ => {}
        }
    }
});
