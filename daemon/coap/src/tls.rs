//! CoAP over TLS over TCP (RFC 8323, `coaps+tcp`): one connection per session, the
//! session key the connection's peer address.
//!
//! # Reliability at the edge
//!
//! TLS is reliable: no message ids, no ACKs, no retransmission, no duplicates. The message
//! layer ([`crate::transport`]) and the client ([`crate::client`]) are RFC 7252 code; the
//! listener translates at its edge so that neither `Transport::request` nor
//! `RequestHandler` changes:
//! - a request from the device becomes a CON message with a message id the connection
//!   picks; the handler's piggybacked ACK goes out as a frame (type and id dropped);
//! - a request we send (CON) goes out as a frame, and the connection remembers its token
//!   with its message id: the device's response comes back as the ACK of that id (so the
//!   client's exchange ends as with a piggybacked response); a later response with the
//!   same token (an observe notification) comes back as NON;
//! - empty ACKs the message layer sends are dropped (they mean nothing here); its RST of
//!   a notification whose observation it forgot becomes a GET with Observe=1 and the
//!   observation's token and options (RFC 7641 §3.6: there is no RST over TCP); other
//!   RSTs are dropped;
//! - when the connection closes, each request still waiting for its response gets an RST
//!   from the listener, so the exchange fails at once instead of after a timeout.
//!
//! The message layer skips its duplicate cache on reliable listeners and the client does
//! not retransmit on them ([`crate::ListenerKind::unreliable`]).
//!
//! # Signalling
//!
//! Our CSM (Max-Message-Size = `coap.tls_max_message_size`, no BERT) is the first thing
//! sent; the peer's first message must be its CSM, or the connection is aborted. Ping is
//! answered with Pong, Release and Abort close the connection. A frame that cannot be
//! read, or one over our Max-Message-Size, is answered with Abort (7.05) and a close. At a
//! clean stop ([`Listener::stop`]) every open connection gets Release (7.04, RFC 8323
//! §5.5) before it is closed.
//!
//! # Metrics
//!
//! Handshakes done and failed, and each connection's end by reason (released, aborted,
//! idle, revoked, closed), are reported as [`Event`]s; the open connections are
//! [`TlsListener::connections`].
//!
//! # Credentials
//!
//! The server presents `coap.tls_cert` or a certificate the daemon's CA issued at start.
//! A client certificate is required, verified (chain, validity, client-auth usage) with
//! rustls' `WebPkiClientVerifier` against the daemon's CA and `coap.trusted_cas`. The
//! session's [`PeerIdentity::Certificate`] is the leaf's subject CN and OU and its serial
//! (lowercase hex, no separators), read with x509-parser. The host's
//! [`Credentials::certificate_valid`] is asked right after the handshake: refused, the
//! connection is aborted before any message is read.
//!
//! # Bounds
//!
//! `coap.tls_max_connections` (a connection past it is closed at accept, counted in the
//! log at debug level), `coap.tls_handshake_timeout_s`, `coap.tls_idle_timeout_s` (no byte
//! from the device: Release and close), `coap.tls_max_message_size`, a bounded queue of
//! messages towards the message layer (a connection whose messages are not taken waits:
//! backpressure on its socket) and one of frames towards each device (a device that
//! does not read until it is full is aborted; nothing waits on it).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::Map;
use crate::listener::{Credentials, Listener};
use crate::metrics::{Event, Metrics};
use crate::peer::{ListenerId, ListenerKind, PeerIdentity};
use crate::rfc8323::{self, Frame, Signal};

/// Messages waiting between all connections of a listener and the message layer.
const INBOUND_QUEUE: usize = 1024;
/// Frames waiting to be written on one connection. A device that lets this many pile up
/// (it does not read) has its connection closed: queueing further would hold up the
/// receive loop of every connection (see [`TlsListener::send`]).
const OUTBOUND_QUEUE: usize = 256;
/// Requests of ours awaiting a response on one connection; the oldest are forgotten past
/// it (their exchanges have timed out long since).
const MAX_PENDING: usize = 256;
/// The Observe option (RFC 7641).
const OBSERVE: u16 = 6;
/// How long a clean stop waits for its open connections to send Release and close.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The limits of a TLS listener (from `[coap]`).
#[derive(Debug, Clone)]
pub struct TlsBounds {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_message_size: usize,
}

impl TlsBounds {
    pub fn from_config(cfg: &crate::CoapConfig) -> TlsBounds {
        TlsBounds {
            max_connections: cfg.tls_max_connections,
            idle_timeout: Duration::from_secs(cfg.tls_idle_timeout_s),
            handshake_timeout: Duration::from_secs(cfg.tls_handshake_timeout_s),
            max_message_size: cfg.tls_max_message_size,
        }
    }
}

/// What the TLS listeners need from the host once its CA is loaded: the rustls server
/// configuration ([`server_config`]) and the credential store asked about revocation.
#[derive(Clone)]
pub struct TlsSetup {
    pub server: Arc<rustls::ServerConfig>,
    pub credentials: Option<Arc<dyn Credentials>>,
}

/// A PEM reading error in words. rustls-pki-types prints the markers it names as byte
/// arrays (`missing section end marker: [67, 69, 82, ...]`: found by an outside review on a
/// certificate file cut short); the REST and DTLS listeners' messages use this too.
pub fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "a block has no line -----END {}----- (is the file cut short?)",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => format!(
            "a malformed -----BEGIN line: {:?}",
            String::from_utf8_lossy(line)
        ),
        E::Base64Decode(e) => format!("a block's base64 does not decode ({e})"),
        E::NoItemsFound => "no PEM block of the kind needed".to_string(),
        e => e.to_string(),
    }
}

/// rustls's refusal of a certificate and key, in words where its own are not
/// (`keys may not be consistent: KeyMismatch`).
fn refused_text(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => "the key does not match the certificate".into(),
        e => e.to_string(),
    }
}

/// Why the TLS configuration could not be built. `what` names the input (the
/// configuration key and file, `coap.tls_cert: /etc/...`, or "issued server certificate").
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `problem` is in the message ([`pem_problem`]), not a `source`: its own text would
    /// print the byte arrays again in the error's chain.
    #[error("{what}: not PEM: {}", pem_problem(problem))]
    NotPem {
        what: String,
        problem: rustls::pki_types::pem::Error,
    },
    #[error("{what}: no CERTIFICATE block")]
    NoCertificate { what: String },
    #[error("{what}: no usable private key: {}", pem_problem(problem))]
    NoKey {
        what: String,
        problem: rustls::pki_types::pem::Error,
    },
    /// The certificate and key read, but refused together (a certificate that does not
    /// parse, a key that does not match it, an unsupported key type).
    #[error("{chain} with {key}: {}", refused_text(source))]
    Refused {
        chain: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("client CA: not a usable CA certificate: {0}")]
    ClientCa(#[source] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate chain (`chain_pem`: its name and PEM text, CERTIFICATE blocks) and the
/// private key (`key_pem`: PKCS#8, SEC1 or PKCS#1 PEM), as DER.
pub fn read_pem(
    chain_pem: (&str, &[u8]),
    key_pem: (&str, &[u8]),
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.1)
        .collect::<Result<_, _>>()
        .map_err(|problem| TlsError::NotPem {
            what: chain_pem.0.to_owned(),
            problem,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            what: chain_pem.0.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.1).map_err(|problem| TlsError::NoKey {
        what: key_pem.0.to_owned(),
        problem,
    })?;
    Ok((chain, key))
}

/// A rustls server configuration: `chain_pem`/`key_pem` as the server's certificate (see
/// [`read_pem`]), client certificates required and verified against `client_cas` (DER
/// certificates, read and checked once at start: the daemon's CA and `coap.trusted_cas`,
/// as the DTLS listeners get them), ALPN `coap`.
pub fn server_config(
    chain_pem: (&str, &[u8]),
    key_pem: (&str, &[u8]),
    client_cas: &[Vec<u8>],
) -> Result<rustls::ServerConfig, TlsError> {
    let (chain, key) = read_pem(chain_pem, key_pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for der in client_cas {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(TlsError::ClientCa)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(refused(chain_pem, key_pem))?;
    cfg.alpn_protocols = vec![b"coap".to_vec()];
    Ok(cfg)
}

/// Whether `chain_pem` and `key_pem` make a server certificate rustls takes (PEM that reads,
/// a key that matches the leaf), without building a listener's configuration; the key, DER.
/// `connectord check-config` checks `coap.tls_cert`/`coap.tls_key` with it.
pub fn check_pair(
    chain_pem: (&str, &[u8]),
    key_pem: (&str, &[u8]),
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let (chain, key) = read_pem(chain_pem, key_pem)?;
    let kept = key.clone_key();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(refused(chain_pem, key_pem))?;
    Ok(kept)
}

/// [`TlsError::Refused`] of `chain_pem` with `key_pem` (their names).
fn refused(
    chain_pem: (&str, &[u8]),
    key_pem: (&str, &[u8]),
) -> impl FnOnce(rustls::Error) -> TlsError {
    let (chain, key) = (chain_pem.0.to_owned(), key_pem.0.to_owned());
    move |source| TlsError::Refused { chain, key, source }
}

/// The identity a client certificate (DER) proves: subject CN and OU, serial in hex.
pub fn certificate_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next()?.as_str().ok()?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok());
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(PeerIdentity::Certificate {
        cn: cn.into(),
        ou: ou.map(Into::into),
        serial: serial.into(),
    })
}

/// What a connection's writer is asked to do.
enum Out {
    Frame(Vec<u8>),
    /// The client certificate was revoked: send Abort and close.
    Revoked,
    /// The daemon stops: send Release (RFC 8323 §5.5) and close.
    Release,
}

/// Why a connection ended, as `/metrics` counts it (see [`Event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Released,
    Aborted,
    Idle,
    Revoked,
    Closed,
}

impl Close {
    fn event(self) -> Event {
        match self {
            Close::Released => Event::TlsReleased,
            Close::Aborted => Event::TlsAborted,
            Close::Idle => Event::TlsIdle,
            Close::Revoked => Event::TlsRevoked,
            Close::Closed => Event::TlsClosed,
        }
    }
}

/// One open connection, as the listener's methods see it.
struct Conn {
    /// Tells this connection apart from a later one from the same address.
    serial: u64,
    out: mpsc::Sender<Out>,
    /// Ends the connection when its queue overflowed.
    overflow: Arc<tokio::sync::Notify>,
    identity: PeerIdentity,
    /// Tokens of our requests awaiting their response, with the message id the client
    /// gave them (the response comes back as the ACK of that id).
    pending: Arc<Mutex<Pending>>,
}

#[derive(Default)]
struct Pending {
    by_token: Map<Vec<u8>, (u16, Instant)>,
    /// Our observe requests (Observe=0) by token: their options, to deregister with
    /// (RFC 7641 §3.6) when the message layer rejects a notification, since a reliable
    /// transport has no RST (RFC 8323 §5).
    observes: Map<Vec<u8>, Vec<u8>>,
    /// The message ids given to the latest notifications (NON), with their tokens: the
    /// message layer's RST names the id.
    notified: std::collections::VecDeque<(u16, Vec<u8>)>,
}

/// Notifications whose message id is remembered (the message layer answers at once).
const NOTIFIED: usize = 64;

impl Pending {
    /// The deregistration for the notification the message layer rejected with an RST
    /// for `mid`: a GET with the observe request's options, Observe=1 and its token.
    fn deregister(&mut self, mid: u16) -> Option<Frame> {
        let i = self.notified.iter().position(|(m, _)| *m == mid)?;
        let (_, token) = self.notified.remove(i)?;
        let body = self.observes.remove(&token)?;
        let (opts, _) = rfc8323::options(&body).ok()?;
        let opts: Vec<(u16, &[u8])> = opts
            .into_iter()
            .map(|(n, v)| {
                if n == OBSERVE {
                    (n, &[1u8][..])
                } else {
                    (n, v)
                }
            })
            .collect();
        Some(Frame {
            code: 0x01,
            token,
            body: rfc8323::body(&opts, &[]),
        })
    }

    fn notified(&mut self, mid: u16, token: &[u8]) {
        if self.observes.contains_key(token) {
            if self.notified.len() >= NOTIFIED {
                self.notified.pop_front();
            }
            self.notified.push_back((mid, token.to_vec()));
        }
    }

    fn insert(&mut self, token: Vec<u8>, mid: u16) {
        if self.by_token.len() >= MAX_PENDING
            && let Some(oldest) = self
                .by_token
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(t, _)| t.clone())
        {
            self.by_token.remove(&oldest);
        }
        self.by_token.insert(token, (mid, Instant::now()));
    }

    /// Remembers an observe request (Observe=0) we send, and forgets it when its
    /// cancellation (Observe=1, the same token: `Transport::cancel_observation`) goes
    /// out, so that the RST to a late notification sends no second one and the bounded
    /// map holds live observations only.
    fn observing(&mut self, token: &[u8], body: &[u8]) {
        let observe = rfc8323::options(body).ok().and_then(|(o, _)| {
            o.iter()
                .find(|(n, _)| *n == OBSERVE)
                .and_then(|(_, v)| rfc8323::uint(v))
        });
        if observe == Some(1) {
            self.observes.remove(token);
        }
        if observe == Some(0) {
            if self.observes.len() >= MAX_PENDING {
                // Observations are few per device; past the bound an arbitrary entry
                // goes (its cancellation then relies on the device's own timeout).
                if let Some(t) = self.observes.keys().next().cloned() {
                    self.observes.remove(&t);
                }
            }
            self.observes.insert(token.to_vec(), body.to_vec());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single map operation: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared by the listener and its connection tasks.
struct Inner {
    id: ListenerId,
    bounds: TlsBounds,
    setup: OnceLock<TlsSetup>,
    conns: Mutex<Map<SocketAddr, Conn>>,
    inbound: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    slots: Arc<Semaphore>,
    next_serial: AtomicU64,
    metrics: Arc<dyn Metrics>,
    /// Connections past their handshake whose task has not finished closing them (the
    /// stop waits for these).
    live: AtomicUsize,
}

/// Counts a connection in [`Inner::live`] until dropped.
struct Live<'a>(&'a AtomicUsize);

impl<'a> Live<'a> {
    fn new(n: &'a AtomicUsize) -> Live<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Live(n)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP socket accepting CoAP over TLS connections.
pub struct TlsListener {
    inner: Arc<Inner>,
    tcp: TcpListener,
    rx: tokio::sync::Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Binds `addr` (port 0 resolved). Connections are refused until [`Self::configure`]
    /// gave the TLS setup: the socket is bound before the state directory is touched, the
    /// certificates come from it.
    pub fn bind(
        addr: SocketAddr,
        bounds: TlsBounds,
        metrics: Arc<dyn Metrics>,
    ) -> io::Result<TlsListener> {
        let tcp = bind_tcp(addr)?;
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        Ok(TlsListener {
            inner: Arc::new(Inner {
                id: ListenerId {
                    kind: ListenerKind::Tls,
                    local,
                },
                slots: Arc::new(Semaphore::new(bounds.max_connections)),
                bounds,
                setup: OnceLock::new(),
                conns: Mutex::new(Map::default()),
                inbound: tx,
                next_serial: AtomicU64::new(0),
                metrics,
                live: AtomicUsize::new(0),
            }),
            tcp,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// Gives the listener its certificates; false when it had them already.
    pub fn configure(&self, setup: TlsSetup) -> bool {
        self.inner.setup.set(setup).is_ok()
    }

    /// Connections open (handshakes included).
    pub fn connections(&self) -> usize {
        self.inner.bounds.max_connections - self.inner.slots.available_permits()
    }

    fn accept(&self, stream: TcpStream, peer: SocketAddr) {
        let Ok(slot) = Arc::clone(&self.inner.slots).try_acquire_owned() else {
            tracing::debug!(%peer, "CoAP/TLS: coap.tls_max_connections reached, closing");
            return;
        };
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let _slot = slot;
            inner.serve(stream, peer).await;
        });
    }
}

impl Listener for TlsListener {
    fn id(&self) -> ListenerId {
        self.inner.id
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut rx = self.rx.lock().await;
        loop {
            tokio::select! {
                a = self.tcp.accept() => match a {
                    Ok((stream, peer)) => self.accept(stream, peer),
                    Err(e) => {
                        // Out of descriptors and the like: wait a little, do not spin.
                        tracing::warn!("CoAP/TLS accept on {}: {e}", self.inner.id.local);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                m = rx.recv() => {
                    let Some((bytes, peer)) = m else {
                        return Err(io::Error::other("TLS listener closed"));
                    };
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    return Ok((bytes.len(), peer));
                }
            }
        }
    }

    /// Queues the frame on the connection without waiting: the receive loop sends
    /// replies too, and waiting there for one connection's queue would hold up every
    /// connection (and could wait on itself: that connection's task may be waiting for
    /// the loop to take its message). A full queue (the device does not read) ends the
    /// connection, with Abort.
    async fn send(&self, session: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        let Some((out, overflow, frame)) = self.inner.frame_out(session, bytes)? else {
            return Ok(());
        };
        match out.try_send(Out::Frame(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                overflow.notify_one();
                Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the device does not read its TLS connection",
                ))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(io::Error::from(io::ErrorKind::NotConnected))
            }
        }
    }

    fn identity(&self, session: SocketAddr) -> Option<PeerIdentity> {
        lock(&self.inner.conns)
            .get(&session)
            .map(|c| c.identity.clone())
    }

    /// Sends Release (RFC 8323 §5.5) on every open connection and waits, at most
    /// [`RELEASE_WAIT`], until they are closed. A connection whose queue is full (its
    /// device does not read) gets no Release; it is closed with the runtime.
    async fn stop(&self) {
        let outs: Vec<mpsc::Sender<Out>> = lock(&self.inner.conns)
            .values()
            .map(|c| c.out.clone())
            .collect();
        for out in &outs {
            let _ = out.try_send(Out::Release);
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        while self.inner.live.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn close_sessions(&self, revoked: &dyn Fn(&PeerIdentity) -> bool) -> usize {
        let conns = lock(&self.inner.conns);
        let mut closed = 0;
        for c in conns.values().filter(|c| revoked(&c.identity)) {
            let abort = Out::Revoked;
            if let Err(mpsc::error::TrySendError::Full(abort)) = c.out.try_send(abort) {
                // The connection is busy; the Abort still has to get through, so a task
                // waits for room (called outside a runtime, there is none to wait on:
                // the connection then ends at its idle timeout).
                let out = c.out.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = out.send(abort).await;
                    });
                }
            }
            closed += 1;
        }
        closed
    }
}

impl Inner {
    /// The frame for an RFC 7252 message the message layer sends to `session`, with the
    /// connection's queue; None for what has no meaning on TCP (empty ACK, RST).
    #[allow(clippy::type_complexity)]
    fn frame_out(
        &self,
        session: SocketAddr,
        bytes: &[u8],
    ) -> io::Result<Option<(mpsc::Sender<Out>, Arc<tokio::sync::Notify>, Vec<u8>)>> {
        let (mtype, mid, frame) = rfc8323::from_udp(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let conns = lock(&self.conns);
        let conn = conns
            .get(&session)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        if mtype == rfc8323::RST {
            // The message layer rejects a notification of an observation it forgot:
            // without RST on TCP, the observation is deregistered by a GET.
            return Ok(lock(&conn.pending).deregister(mid).map(|f| {
                (
                    conn.out.clone(),
                    Arc::clone(&conn.overflow),
                    rfc8323::encode(&f),
                )
            }));
        }
        if frame.code == 0 {
            return Ok(None);
        }
        let class = frame.code >> 5;
        if class == 0 && mtype == rfc8323::CON {
            let mut p = lock(&conn.pending);
            p.insert(frame.token.clone(), mid);
            p.observing(&frame.token, &frame.body);
        }
        Ok(Some((
            conn.out.clone(),
            Arc::clone(&conn.overflow),
            rfc8323::encode(&frame),
        )))
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let Some(setup) = self.setup.get().cloned() else {
            tracing::warn!(%peer, "CoAP/TLS connection before the listener has its certificates; closed");
            return;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&setup.server));
        let stream =
            match tokio::time::timeout(self.bounds.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.metrics.count(Event::TlsHandshakeFailed);
                    tracing::debug!(%peer, "CoAP/TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    self.metrics.count(Event::TlsHandshakeFailed);
                    tracing::debug!(%peer, "CoAP/TLS handshake over coap.tls_handshake_timeout_s");
                    return;
                }
            };
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| certificate_identity(c));
        let mut stream = stream;
        let Some(identity) = identity else {
            self.metrics.count(Event::TlsHandshakeFailed);
            tracing::debug!(%peer, "CoAP/TLS client certificate without a subject CN; aborted");
            let _ = write_frame(&mut stream, &rfc8323::abort("certificate without CN")).await;
            return;
        };
        if let (Some(creds), PeerIdentity::Certificate { cn, serial, .. }) =
            (&setup.credentials, &identity)
            && !creds.certificate_valid(cn, serial)
        {
            self.metrics.count(Event::TlsRevoked);
            if crate::log_budget::allow(crate::log_budget::DeviceLine::HandshakeRefused) {
                tracing::info!(%peer, %cn, %serial, "CoAP/TLS client certificate revoked; aborted");
            }
            let _ = write_frame(&mut stream, &rfc8323::abort("certificate revoked")).await;
            let _ = stream.shutdown().await;
            return;
        }
        self.metrics.count(Event::TlsHandshake);
        let live = Live::new(&self.live);
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let overflow = Arc::new(tokio::sync::Notify::new());
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let pending = Arc::new(Mutex::new(Pending::default()));
        lock(&self.conns).insert(
            peer,
            Conn {
                serial,
                out: out_tx,
                overflow: Arc::clone(&overflow),
                identity,
                pending: Arc::clone(&pending),
            },
        );
        let (close, end) = self
            .run(&mut stream, peer, out_rx, &overflow, &pending)
            .await;
        self.metrics.count(close.event());
        tracing::debug!(%peer, "CoAP/TLS connection closed: {end}");
        {
            let mut conns = lock(&self.conns);
            if conns.get(&peer).is_some_and(|c| c.serial == serial) {
                conns.remove(&peer);
            }
        }
        let _ = stream.shutdown().await;
        drop(live);
        // Requests still waiting fail now, not after their timeout.
        let waiting: Vec<(Vec<u8>, u16)> = lock(&pending)
            .by_token
            .drain()
            .map(|(t, (mid, _))| (t, mid))
            .collect();
        for (_, mid) in waiting {
            let rst = rfc8323::to_udp(&rfc8323::signal(0, &[]), rfc8323::RST, mid);
            if self.inbound.send((rst, peer)).await.is_err() {
                break;
            }
        }
    }

    /// The connection's life after the handshake; returns why it ended.
    async fn run<S>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        mut out_rx: mpsc::Receiver<Out>,
        overflow: &tokio::sync::Notify,
        pending: &Mutex<Pending>,
    ) -> (Close, String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let max = self.bounds.max_message_size;
        if let Err(e) = write_frame(stream, &rfc8323::csm(max as u32)).await {
            return (Close::Closed, format!("write failed: {e}"));
        }
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        let mut seen_csm = false;
        let mut next_mid: u16 = rand::random();
        let mut deadline = tokio::time::Instant::now() + self.bounds.idle_timeout;
        loop {
            tokio::select! {
                r = stream.read(&mut chunk) => {
                    let n = match r {
                        Ok(0) => return (Close::Closed, "closed by the peer".into()),
                        Ok(n) => n,
                        Err(e) => return (Close::Closed, format!("read failed: {e}")),
                    };
                    deadline = tokio::time::Instant::now() + self.bounds.idle_timeout;
                    buf.extend_from_slice(&chunk[..n]);
                    let mut used = 0;
                    loop {
                        let frame = match rfc8323::decode(&buf[used..], max) {
                            Ok(Some((f, n))) => {
                                used += n;
                                f
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = write_frame(stream, &rfc8323::abort(&e.to_string())).await;
                                return (Close::Aborted, format!("aborted: {e}"));
                            }
                        };
                        match self
                            .on_frame(frame, peer, &mut seen_csm, &mut next_mid, pending)
                            .await
                        {
                            Ok(None) => {}
                            Ok(Some(reply)) => {
                                if let Err(e) = write_frame(stream, &reply).await {
                                    return (Close::Closed, format!("write failed: {e}"));
                                }
                            }
                            Err(End::Closed(close, why)) => return (close, why),
                            Err(End::Abort(why)) => {
                                let _ = write_frame(stream, &rfc8323::abort(&why)).await;
                                return (Close::Aborted, format!("aborted: {why}"));
                            }
                        }
                    }
                    buf.drain(..used);
                }
                _ = overflow.notified() => {
                    let _ = write_frame(stream, &rfc8323::abort("not reading")).await;
                    return (
                        Close::Aborted,
                        format!("aborted: {OUTBOUND_QUEUE} messages not taken by the device"),
                    );
                }
                o = out_rx.recv() => match o {
                    Some(Out::Frame(bytes)) => {
                        if let Err(e) = stream.write_all(&bytes).await {
                            return (Close::Closed, format!("write failed: {e}"));
                        }
                        if let Err(e) = stream.flush().await {
                            return (Close::Closed, format!("write failed: {e}"));
                        }
                    }
                    Some(Out::Revoked) => {
                        let _ = write_frame(stream, &rfc8323::abort("credential revoked")).await;
                        return (Close::Revoked, "aborted: credential revoked".into());
                    }
                    Some(Out::Release) => {
                        let _ = write_frame(stream, &rfc8323::signal(rfc8323::RELEASE, &[])).await;
                        return (Close::Released, "the daemon stops: released".into());
                    }
                    None => return (Close::Closed, "listener gone".into()),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = write_frame(stream, &rfc8323::signal(rfc8323::RELEASE, &[])).await;
                    return (Close::Idle, "idle over coap.tls_idle_timeout_s: released".into());
                }
            }
        }
    }

    /// One frame from the device: a reply to write back, nothing, or the end.
    async fn on_frame(
        &self,
        frame: Frame,
        peer: SocketAddr,
        seen_csm: &mut bool,
        next_mid: &mut u16,
        pending: &Mutex<Pending>,
    ) -> Result<Option<Frame>, End> {
        let signal = Signal::read(&frame).map_err(|e| End::Abort(e.to_string()))?;
        if !*seen_csm {
            if !matches!(signal, Some(Signal::Csm { .. })) {
                return Err(End::Abort("expected CSM (7.01) first".into()));
            }
            *seen_csm = true;
            return Ok(None);
        }
        match signal {
            Some(Signal::Csm { .. }) | Some(Signal::Pong) => return Ok(None),
            Some(Signal::Ping) => return Ok(Some(rfc8323::signal(rfc8323::PONG, &frame.token))),
            Some(Signal::Release) => {
                return Err(End::Closed(Close::Released, "released by the peer".into()));
            }
            Some(Signal::Abort(why)) => {
                return Err(End::Closed(
                    Close::Aborted,
                    format!("aborted by the peer: {why}"),
                ));
            }
            None => {}
        }
        // Empty messages are ignored (RFC 8323 §3.3).
        if frame.code == 0 {
            return Ok(None);
        }
        let class = frame.code >> 5;
        let (mtype, mid) = match class {
            0 => (rfc8323::CON, fresh(next_mid)),
            2 | 4 | 5 => {
                let mut p = lock(pending);
                match p.by_token.remove(&frame.token) {
                    Some((mid, _)) => (rfc8323::ACK, mid),
                    None => {
                        let mid = fresh(next_mid);
                        p.notified(mid, &frame.token);
                        (rfc8323::NON, mid)
                    }
                }
            }
            _ => {
                return Err(End::Abort(
                    rfc8323::FrameError::Code(frame.code).to_string(),
                ));
            }
        };
        let bytes = rfc8323::to_udp(&frame, mtype, mid);
        self.inbound
            .send((bytes, peer))
            .await
            .map_err(|_| End::Closed(Close::Closed, "listener gone".into()))?;
        Ok(None)
    }
}

enum End {
    /// The connection is over (why, for the log); nothing more to send.
    Closed(Close, String),
    /// Send Abort with this diagnostic and close.
    Abort(String),
}

fn fresh(next: &mut u16) -> u16 {
    *next = next.wrapping_add(1);
    *next
}

async fn write_frame<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, f: &Frame) -> io::Result<()> {
    s.write_all(&rfc8323::encode(f)).await?;
    s.flush().await
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A CoAP-over-TLS client connection (the simulator's devices, `connectord simulate
/// --tls`): rustls with the ring provider, ALPN `coap`, a client certificate, and the
/// server verified against a CA (for its IP address or host name).
pub mod client {
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::net::{TcpSocket, TcpStream};

    /// Why a client configuration could not be built.
    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        #[error("{}: {source}", path.display())]
        Pem {
            path: PathBuf,
            #[source]
            source: rustls::pki_types::pem::Error,
        },
        #[error("{}: no usable CA certificate: {source}", path.display())]
        Ca {
            path: PathBuf,
            #[source]
            source: rustls::Error,
        },
        #[error("the client certificate and key: {0}")]
        Rustls(#[from] rustls::Error),
    }

    /// A client configuration, built once and shared by many connections.
    #[derive(Clone)]
    pub struct ClientConfig(Arc<rustls::ClientConfig>);

    impl std::fmt::Debug for ClientConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tls::client::ClientConfig")
        }
    }

    impl ClientConfig {
        /// The client certificate `cert` (PEM, its chain) with its key `key` (PEM), and
        /// the CA certificates of `ca` (PEM) the server's certificate must chain to.
        pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<ClientConfig, ClientError> {
            fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> ClientError + '_ {
                move |source| ClientError::Pem {
                    path: path.to_path_buf(),
                    source,
                }
            }
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(pem(cert))?
                .collect::<Result<_, _>>()
                .map_err(pem(cert))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(pem(ca))? {
                roots
                    .add(c.map_err(pem(ca))?)
                    .map_err(|source| ClientError::Ca {
                        path: ca.to_path_buf(),
                        source,
                    })?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key_der)?;
            cfg.alpn_protocols = vec![b"coap".to_vec()];
            Ok(ClientConfig(Arc::new(cfg)))
        }

        /// Connects from `bind` (port 0) to `server` and completes the TLS handshake,
        /// verifying the server's certificate for `server`'s IP address.
        pub async fn connect(
            &self,
            bind: IpAddr,
            server: SocketAddr,
        ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
            let socket = match server {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(bind, 0))?;
            let tcp = socket.connect(server).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::IpAddress(server.ip().into());
            tokio_rustls::TlsConnector::from(Arc::clone(&self.0))
                .connect(name, tcp)
                .await
        }
    }
}
