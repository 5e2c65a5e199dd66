//! CoAP over DTLS 1.2 (RFC 7252 §9): one UDP socket per listener, one DTLS session per
//! peer address, the handshakes and records done by [`dimpl`] (sans-IO), PSK
//! (`TLS_PSK_WITH_AES_128_CCM_8`) and X.509 client certificates (ECDHE-ECDSA with AES-GCM).
//!
//! Decisions (see ARCHITECTURE.md, "CoAP over DTLS", for the comparison of libraries):
//! - **No per-peer state before the cookie round trip.** A ClientHello from an address
//!   without a session is answered here, statelessly, with a HelloVerifyRequest whose
//!   cookie is `HMAC-SHA256(HMAC-SHA256(secret, address), client_random)`, the address
//!   being the client's IP and port (RFC 6347 §4.2.1: a cookie proves the client receives
//!   at that address; one fetched from an address of the client's is no use from another,
//!   so a spoofed source can neither take a device's session over nor fill the half-open
//!   slots, nor have a certificate flight reflected to it). A session (a dimpl instance)
//!   is created only for a ClientHello that carries that cookie. The instance is given the
//!   same per-address secret (`Dtls::set_server_cookie_secret`, our patch of dimpl,
//!   `vendor/dimpl/PATCHED.md`), so it accepts the cookie itself; it is first shown the cookie-less ClientHello
//!   (`message_seq` 0, answered with a HelloVerifyRequest we drop) so that it is in the
//!   state RFC 6347 §4.2.2 describes after a cookie exchange (`message_seq` 1 on both
//!   sides; the first ClientHello is not part of the handshake hash).
//! - **Bounds.** Half-open handshakes (cookie verified, not yet established) are capped at
//!   `coap.dtls_max_handshakes`, and at `coap.dtls_max_handshakes_per_source` from one
//!   source (an IPv4 address, an IPv6 /64: the cookie proves the address, so one host
//!   holding every slot for the handshake timeout would lock out every device), sessions
//!   at `coap.dtls_max_sessions`; beyond any of them a ClientHello is dropped and counted. A handshake older than
//!   `coap.dtls_handshake_timeout_s` is dropped, a session idle for `coap.dtls_idle_s` is
//!   closed (close_notify) and forgotten.
//! - **The mode is chosen per handshake** from the client's offer: the first suite it
//!   offers that we have decides a PSK instance (`Dtls::new_12_psk`) or a certificate one
//!   (`Dtls::new_12`, client certificate required).
//! - **Identities.** PSK: the identity whose key the host's [`Credentials`] gave (the
//!   handshake fails on an unknown identity or a wrong key). Certificate: the leaf that
//!   dimpl reports is verified here with webpki against the trust anchors (the daemon's
//!   CA and `coap.trusted_cas`): chain, validity dates, `clientAuth`; then its CN, OU and
//!   serial are read (x509-parser) and [`Credentials::certificate_valid`] asked.
//! - **Timers** (dimpl's retransmissions, the bounds above) are driven from [`recv`]
//!   ([`Listener::recv`]), which wakes at least every [`TICK`]: no task of its own.
//! - A ClientHello of a new handshake (another client random) from the address of a
//!   session (a device that restarted) goes through the cookie check like any other; once
//!   its cookie verifies, the new handshake replaces the old session. A retransmitted
//!   ClientHello of the handshake in progress goes to its instance.
//!
//! - **Connection ID (RFC 9146; our patch of dimpl).** Sessions get a random CID of
//!   [`CID_LEN`] bytes when the client offers the extension. A `tls12_cid` record is
//!   routed by its CID (fixed length: read without state) to an established session, any
//!   other datagram by its source address. The session key (the registration's
//!   `PeerRef.session`) stays the handshake's address; records go to `Peer::to`, which
//!   moves to a datagram's source only when one of its records authenticated and is newer
//!   than every earlier one (RFC 9146 §6, `Dtls::take_newer_record`).
//! - **A new address is checked** (`Probe`, RFC 9146 §6 and §8): a CoAP ping inside the
//!   session, answered by a Reset from that address, verifies it; until then at most
//!   [`AMPLIFICATION`] times the bytes received from it are sent there (the rest is
//!   dropped and counted, `Event::DtlsUnverifiedDropped`), so a record an attacker
//!   replays from a victim's address cannot make the daemon flood the victim. Moving back
//!   to the last verified address is not checked.
//!
//! Not done: a ClientHello fragmented over several records before the cookie exchange
//! (dropped), session resumption (a returning device does a full handshake).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dimpl::{Config, Dtls, DtlsCertificate, Output, PskResolver};
use tokio::net::UdpSocket;

/// The DTLS engine, for the fuzz target and tests.
pub use dimpl;

use crate::Map;
use crate::listener::{Credentials, Listener};
use crate::metrics::{Event, Metrics};
use crate::peer::{ListenerId, ListenerKind, PeerIdentity};

/// How often [`DtlsListener::recv`] wakes up for timers when no datagram comes.
pub const TICK: Duration = Duration::from_millis(100);

/// An established session quiet for this long gives back the memory dimpl kept from its
/// handshake and its buffer pool (`Dtls::trim`, our patch in `vendor/dimpl`), checked on
/// the [`TICK`] sweep. Decision: not after every datagram, since a busy session would
/// then allocate its buffers anew for each record; a quiet one (most of 10 000 devices
/// that report now and then) holds its session in about 2.0 KB of heap (measured:
/// `tests/dtls_memory.rs`, docs/PERFORMANCE.md; 10.5 KB before trimming existed).
pub const TRIM_AFTER: Duration = Duration::from_secs(1);

/// A session's address not yet shown to reach the peer (RFC 9146 §6, see `Probe`) is
/// sent at most this many times the bytes received from it (the anti-amplification
/// factor of RFC 9000 §8).
pub const AMPLIFICATION: usize = 3;

/// The CoAP ping to an unverified address is sent again after this long (CoAP's
/// ACK_TIMEOUT) ...
pub const PROBE_RETRY: Duration = Duration::from_secs(2);

/// ... at most this many times in all (1 + CoAP's MAX_RETRANSMIT).
const PROBE_TRIES: u8 = 5;

/// Decrypted messages waiting for the receive loop, at most (more are dropped: the peer
/// retransmits).
const MAX_READY: usize = 1024;

/// Largest DTLS datagram read.
const MAX_RECORD: usize = 4096;

/// The largest output of a session's dimpl state taken: datagrams are far smaller; a
/// client certificate over this is refused (its handshake fails), not copied out.
const MAX_OUTPUT: usize = 16 * 1024;

/// What one ClientHello cipher suite means to us.
const PSK_AES128_CCM_8: u16 = 0xC0A8;
const ECDHE_ECDSA_SUITES: [u16; 3] = [0xC02B, 0xC02C, 0xCCA9];

/// The bounds of a DTLS listener (`[coap] dtls_*`).
#[derive(Debug, Clone, Copy)]
pub struct DtlsLimits {
    pub max_sessions: usize,
    pub max_handshakes: usize,
    /// 0: no bound of its own.
    pub max_handshakes_per_source: usize,
    pub handshake_timeout: Duration,
    pub idle: Duration,
}

/// What a DTLS listener needs from its host besides the socket: given once, after the
/// host loaded its CA ([`crate::Transport::set_dtls`]); until then ClientHellos are dropped.
pub struct DtlsSetup {
    /// The keys of PSK identities (and the revocation check of certificates).
    pub credentials: Arc<dyn Credentials>,
    /// The server's certificate and its PKCS#8 key (both DER, an ECDSA P-256 or P-384
    /// key); `None` offers PSK only.
    pub certificate: Option<(Vec<u8>, Vec<u8>)>,
    /// CA certificates (DER) a client certificate must chain to.
    pub trust_anchors: Vec<Vec<u8>>,
}

/// A bad [`DtlsSetup`] or `coap.trusted_cas` file.
#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    #[error("coap.trusted_cas: cannot read {path}: {source}")]
    ReadCa { path: PathBuf, source: io::Error },
    #[error("coap.trusted_cas: {path} holds no PEM CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    #[error("coap.trusted_cas: {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("DTLS trust anchor is not a usable CA certificate: {0}")]
    BadAnchor(String),
    #[error("DTLS server key or settings refused by dimpl: {0}")]
    Dimpl(String),
}

/// Reads the CA certificates of `coap.trusted_cas` (PEM files, one or more CERTIFICATE
/// blocks each), as DER.
pub fn read_trusted_cas(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, DtlsError> {
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read(path).map_err(|source| DtlsError::ReadCa {
            path: path.clone(),
            source,
        })?;
        let blocks = pem::parse_many(&text).map_err(|e| DtlsError::BadCa {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let before = out.len();
        for b in blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE") {
            let der = b.into_contents();
            check_anchor(&der).map_err(|reason| DtlsError::BadCa {
                path: path.clone(),
                reason,
            })?;
            out.push(der);
        }
        if out.len() == before {
            return Err(DtlsError::NoCertificate { path: path.clone() });
        }
    }
    Ok(out)
}

fn check_anchor(der: &[u8]) -> Result<(), String> {
    let der = rustls_pki_types::CertificateDer::from(der);
    webpki::anchor_from_trusted_cert(&der)
        .map(|_| ())
        .map_err(|e| format!("not a usable CA certificate ({e:?})"))
}

/// The keys, built once from a [`DtlsSetup`].
struct Keys {
    psk: Arc<Config>,
    resolver: Arc<Resolver>,
    cert: Option<(Arc<Config>, DtlsCertificate)>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    credentials: Arc<dyn Credentials>,
}

/// dimpl's PSK lookup over the host's [`Credentials`]. It is called inside
/// `Dtls::handle_packet`, under the listener's state lock; `last` names the identity of
/// the handshake being stepped, emptied before and taken after every step ([`step`]).
struct Resolver {
    credentials: AssertUnwindSafe<Arc<dyn Credentials>>,
    last: Mutex<Option<Vec<u8>>>,
}

impl PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.to_vec());
        self.credentials.psk(identity)
    }
}

/// How a session authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Psk,
    Certificate,
}

struct Peer {
    dtls: Dtls,
    mode: Mode,
    /// The ClientHello random of this session's handshake: a ClientHello with another is
    /// a new handshake (the device restarted), checked like one from a new address.
    random: [u8; 32],
    established: bool,
    /// What the handshake proved so far (PSK identity, verified certificate); the
    /// session's identity once established.
    identity: Option<PeerIdentity>,
    started: Instant,
    last: Instant,
    timer: Option<Instant>,
    /// Where records to the peer go: the handshake's address until a newer record
    /// authenticates from another one (RFC 9146 §6).
    to: SocketAddr,
    /// While `to` is not shown to reach the peer: what may still be sent there.
    probe: Option<Box<Probe>>,
    /// The connection ID incoming records carry (RFC 9146), once established with one.
    cid: Option<Box<[u8]>>,
    /// Whether dimpl's handshake-only memory was given back (`Dtls::trim`) since the
    /// last datagram either way; see [`TRIM_AFTER`].
    trimmed: bool,
}

/// The return-routability check of a session's new address (RFC 9146 §6 and §8: an
/// on-path attacker can replay a device's newer record from a victim's address and so
/// move the session there). Until the device answers, from that address, a CoAP ping
/// (an Empty CON, RFC 7252 §4.3, inside the session: only the device can answer it) with
/// a Reset, at most [`AMPLIFICATION`] times the bytes received from the address are sent
/// there; other packets are dropped (and counted: the CoAP layer retransmits its
/// requests). Moving back to the last verified address needs no check.
struct Probe {
    /// The last address known to reach the peer (the handshake's, or one that answered).
    verified: SocketAddr,
    /// The message ID of our ping.
    mid: u16,
    /// Bytes that may still be sent to the unverified address.
    budget: usize,
    /// When the ping was last sent, and how many times.
    sent: Instant,
    tries: u8,
}

impl Peer {
    /// An authenticated record newer than every earlier one came from `from`, another
    /// address than `to`, in a datagram of `len` bytes: records go there from now on,
    /// checked unless it is the last verified address.
    fn move_to(&mut self, from: SocketAddr, len: usize, now: Instant) {
        let verified = self.probe.as_ref().map_or(self.to, |p| p.verified);
        self.to = from;
        if from == verified {
            self.probe = None;
            return;
        }
        self.probe = Some(Box::new(Probe {
            verified,
            mid: rand::random(),
            budget: AMPLIFICATION.saturating_mul(len),
            sent: now,
            tries: 0,
        }));
        self.ping(now);
    }

    /// Sends the probe's CoAP ping (into dimpl's output; `drain` sends it, within the
    /// budget).
    fn ping(&mut self, now: Instant) {
        if let Some(p) = self.probe.as_mut() {
            let [hi, lo] = p.mid.to_be_bytes();
            p.sent = now;
            p.tries += 1;
            // An Empty CON: version 1, type CON, no token; code 0.00.
            if let Err(e) = self.dtls.send_application_data(&[0x40, 0x00, hi, lo]) {
                tracing::debug!("DTLS address probe not sent: {e}");
            }
        }
    }

    /// Whether `data`, received from `src`, is the Reset answering our ping from the
    /// address being checked; if so the address is verified.
    fn pong(&mut self, data: &[u8], src: Option<SocketAddr>) -> bool {
        let answered = self.probe.as_ref().is_some_and(|p| {
            src == Some(self.to)
                && data.len() == 4
                && data[0] & 0xf0 == 0x70
                && data[1] == 0
                && data[2..4] == p.mid.to_be_bytes()
        });
        if answered {
            tracing::debug!(to = %self.to, "DTLS session address verified");
            self.probe = None;
        }
        answered
    }

    /// Queues a packet for `to`, within the probe's budget; false when it was dropped.
    fn emit(&mut self, packet: &[u8], out: &mut Outgoing) -> bool {
        if let Some(p) = self.probe.as_mut() {
            if packet.len() > p.budget {
                return false;
            }
            p.budget -= packet.len();
        }
        out.push((packet.to_vec(), self.to));
        true
    }
}

#[derive(Default)]
struct State {
    /// Boxed: the map keeps up to about twice as many slots as entries (power-of-two
    /// growth), so a `Peer` inline (208 bytes since dimpl boxes its own state; 3.5 KB
    /// before) would cost up to twice its size in slots; boxed, a slot is a pointer.
    peers: Map<SocketAddr, Box<Peer>>,
    /// Established sessions by their connection ID.
    by_cid: Map<Box<[u8]>, SocketAddr>,
    half_open: usize,
    /// Half-open handshakes by source ([`source_of`]); a source leaves at its last.
    half_open_by_source: Map<IpAddr, usize>,
    ready: VecDeque<(Vec<u8>, SocketAddr)>,
    next_sweep: Option<Instant>,
}

/// Handshakes and sessions of a DTLS listener now (gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DtlsCounts {
    pub sessions: usize,
    pub half_open: usize,
}

/// A UDP socket speaking DTLS 1.2 to many peers (see the module documentation).
pub struct DtlsListener {
    id: ListenerId,
    socket: UdpSocket,
    /// Datagrams the kernel dropped at the socket (`udp::KernelDrops`).
    drops: crate::udp::KernelDrops,
    limits: DtlsLimits,
    cookie_secret: [u8; 32],
    metrics: Arc<dyn Metrics>,
    keys: OnceLock<Keys>,
    state: Mutex<State>,
}

impl std::fmt::Debug for DtlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsListener")
            .field("id", &self.id)
            .finish()
    }
}

/// Packets to send after the state lock is released.
type Outgoing = Vec<(Vec<u8>, SocketAddr)>;

/// The length of the connection IDs (RFC 9146) the listener gives its sessions: fixed,
/// so that the ID of a `tls12_cid` record is found without state. Random, 6 bytes.
const CID_LEN: usize = 6;

/// RFC 9146 `tls12_cid` content type.
const TLS12_CID: u8 = 25;

/// The connection ID of a `tls12_cid` record: after type, version, epoch, sequence.
fn record_cid(bytes: &[u8]) -> Option<&[u8]> {
    (bytes.first() == Some(&TLS12_CID))
        .then(|| bytes.get(11..11 + CID_LEN))
        .flatten()
}

impl State {
    /// The session a datagram belongs to: by connection ID for a `tls12_cid` record of
    /// an established session, else by source address.
    fn key_of(&self, bytes: &[u8], from: SocketAddr) -> SocketAddr {
        record_cid(bytes)
            .and_then(|cid| self.by_cid.get(cid).copied())
            .unwrap_or(from)
    }

    /// A half-open handshake more, of the peer keyed `key`.
    fn handshake_began(&mut self, key: SocketAddr) {
        self.half_open += 1;
        *self.half_open_by_source.entry(source_of(key)).or_default() += 1;
    }

    /// A half-open handshake fewer (established, failed, timed out, replaced, revoked).
    fn handshake_ended(&mut self, key: SocketAddr) {
        self.half_open -= 1;
        let source = source_of(key);
        if let Some(n) = self.half_open_by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.half_open_by_source.remove(&source);
            }
        }
    }

    fn half_open_from(&self, key: SocketAddr) -> usize {
        self.half_open_by_source
            .get(&source_of(key))
            .copied()
            .unwrap_or(0)
    }

    /// Removes a session and its connection ID.
    fn forget(&mut self, key: SocketAddr) -> Option<Box<Peer>> {
        let peer = self.peers.remove(&key)?;
        if let Some(cid) = &peer.cid
            && self.by_cid.get(cid) == Some(&key)
        {
            self.by_cid.remove(cid);
        }
        Some(peer)
    }
}

impl DtlsListener {
    /// Datagrams the kernel dropped at this listener's socket since it was bound, as of
    /// one of the last datagrams received (`udp::KernelDrops`).
    pub fn kernel_drops(&self) -> u64 {
        self.drops.get()
    }

    /// Binds `addr` (port 0 resolved); handshakes wait for [`DtlsListener::configure`].
    pub fn bind(
        addr: SocketAddr,
        limits: DtlsLimits,
        metrics: Arc<dyn Metrics>,
    ) -> io::Result<DtlsListener> {
        let socket = crate::udp::bind_one(addr)?;
        let local = socket.local_addr()?;
        Ok(DtlsListener {
            id: ListenerId {
                kind: ListenerKind::Dtls,
                local,
            },
            socket,
            drops: crate::udp::KernelDrops::default(),
            limits,
            cookie_secret: rand::random(),
            metrics,
            keys: OnceLock::new(),
            state: Mutex::new(State::default()),
        })
    }

    /// Gives the listener its keys (once; a second call is refused).
    pub fn configure(&self, setup: &DtlsSetup) -> Result<(), DtlsError> {
        let keys = self.build_keys(setup)?;
        self.keys
            .set(keys)
            .map_err(|_| DtlsError::Dimpl("the DTLS listener is configured already".into()))
    }

    fn build_keys(&self, setup: &DtlsSetup) -> Result<Keys, DtlsError> {
        let dimpl_err = |e: dimpl::Error| DtlsError::Dimpl(e.to_string());
        let resolver = Arc::new(Resolver {
            credentials: AssertUnwindSafe(Arc::clone(&setup.credentials)),
            last: Mutex::new(None),
        });
        let base = || {
            Config::builder()
                .server_cookie_secret(self.cookie_secret)
                .handshake_timeout(self.limits.handshake_timeout)
                .mtu(1200)
                .connection_id_len(CID_LEN as u8)
        };
        let psk = base()
            .with_psk_server(None, resolver.clone() as Arc<dyn PskResolver>)
            .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .build()
            .map_err(dimpl_err)?;
        let cert = match &setup.certificate {
            None => None,
            Some((cert, key)) => {
                let config = base()
                    .require_client_certificate(true)
                    .dtls13_cipher_suites(&[])
                    .build()
                    .map_err(dimpl_err)?;
                // dimpl panics on a key it cannot load: load it once here instead.
                config
                    .crypto_provider()
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| DtlsError::Dimpl(format!("server key: {e:?}")))?;
                Some((
                    Arc::new(config),
                    DtlsCertificate {
                        certificate: cert.clone(),
                        private_key: key.clone(),
                    },
                ))
            }
        };
        let mut anchors = Vec::new();
        for der in &setup.trust_anchors {
            let der = rustls_pki_types::CertificateDer::from(der.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| DtlsError::BadAnchor(format!("{e:?}")))?;
            anchors.push(anchor.to_owned());
        }
        Ok(Keys {
            psk: Arc::new(psk),
            resolver,
            cert,
            anchors,
            credentials: Arc::clone(&setup.credentials),
        })
    }

    /// Sessions established and handshakes half-open now.
    pub fn counts(&self) -> DtlsCounts {
        let st = self.lock();
        DtlsCounts {
            sessions: st.peers.len() - st.half_open,
            half_open: st.half_open,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the maps consistent; a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send_all(&self, out: Outgoing) {
        for (bytes, to) in out {
            if let Err(e) = self.socket.send_to(&bytes, to).await {
                tracing::debug!(peer = %to, "DTLS send failed: {e}");
            }
        }
    }

    /// One datagram through the DTLS state: no I/O, `now` given. Decrypted messages go to
    /// `ready`; what to send is returned.
    pub fn on_datagram(&self, bytes: &[u8], from: SocketAddr, now: Instant) -> Outgoing {
        let mut out = Vec::new();
        let Some(keys) = self.keys.get() else {
            return out;
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        let hello = hello::parse(bytes);
        let key = st.key_of(bytes, from);
        if let Some(peer) = st.peers.get_mut(&key)
            && !hello
                .as_ref()
                .is_some_and(|h| peer.established || h.random != peer.random)
        {
            peer.last = now;
            peer.trimmed = false;
            let (step, asked) = step(keys, || {
                peer.dtls
                    .handle_timeout(now)
                    .and_then(|()| peer.dtls.handle_packet(bytes))
            });
            // RFC 9146 §6: the peer moves to the address of a record that authenticated
            // and is newer than any before it (a replayed or late one does not move it);
            // a new address is checked first (`Probe`).
            if peer.dtls.take_newer_record() && peer.to != from && step.is_ok() {
                tracing::debug!(peer = %key, to = %from, "DTLS session moved");
                peer.move_to(from, bytes.len(), now);
            } else if peer.to == from
                && let Some(p) = peer.probe.as_mut()
            {
                p.budget = p
                    .budget
                    .saturating_add(AMPLIFICATION.saturating_mul(bytes.len()));
            }
            let verdict = match step {
                Ok(()) => {
                    give_psk_identity(peer, asked);
                    drain(
                        keys,
                        peer,
                        (key, Some(from)),
                        &mut out,
                        &mut st.ready,
                        &*self.metrics,
                    )
                }
                Err(e) => {
                    tracing::debug!(peer = %key, "DTLS session failed: {e}");
                    Verdict::Failed
                }
            };
            self.settle(st, key, verdict);
            return out;
        }
        let Some(hello) = hello else {
            // Not a ClientHello and no session: noise, or records of a session we forgot.
            return out;
        };
        let secret = hello::secret_for(&self.cookie_secret, from);
        if hello.message_seq == 0 || !hello::cookie_valid(&secret, bytes, &hello) {
            out.push((hello::verify_request(&secret, &hello), from));
            self.metrics.count(Event::DtlsHelloVerify);
            return out;
        }
        let replacing = st.peers.get(&from);
        // A new handshake from the address of a half-open one replaces it: no slot more.
        let replacing_half_open = replacing.is_some_and(|p| !p.established);
        let per_source = self.limits.max_handshakes_per_source;
        if st.half_open >= self.limits.max_handshakes
            || (replacing.is_none() && st.peers.len() >= self.limits.max_sessions)
            || (per_source > 0 && !replacing_half_open && st.half_open_from(from) >= per_source)
        {
            self.metrics.count(Event::DtlsHandshakeDropped);
            return out;
        }
        let Some(mode) = hello::mode(bytes, keys.cert.is_some()) else {
            tracing::debug!(peer = %from, "DTLS ClientHello offers no suite of ours");
            self.metrics.count(Event::DtlsHandshakeFailed);
            return out;
        };
        let mut dtls = match (&keys.cert, mode) {
            (Some((config, cert)), Mode::Certificate) => {
                Dtls::new_12(Arc::clone(config), cert.clone(), now)
            }
            _ => Dtls::new_12_psk(Arc::clone(&keys.psk), now),
        };
        dtls.set_server_cookie_secret(secret);
        // The cookie-less ClientHello first: dimpl answers it with a HelloVerifyRequest
        // (dropped: the client has ours, the same bytes) and expects `message_seq` 1 next.
        let mut scratch = vec![0u8; 2048];
        let (primed, _) = step(keys, || {
            dtls.handle_timeout(now)
                .and_then(|()| dtls.handle_packet(&hello::first_hello(bytes, &hello)))
        });
        if primed.is_err() {
            self.metrics.count(Event::DtlsHandshakeFailed);
            return out;
        }
        while !matches!(dtls.poll_output(&mut scratch), Output::Timeout(_)) {}
        if let Some(old) = st.forget(from)
            && !old.established
        {
            st.handshake_ended(from);
        }
        let mut peer = Box::new(Peer {
            dtls,
            mode,
            random: hello.random,
            established: false,
            identity: None,
            started: now,
            last: now,
            timer: None,
            to: from,
            probe: None,
            cid: None,
            trimmed: false,
        });
        let (stepped, asked) = step(keys, || peer.dtls.handle_packet(bytes));
        let verdict = match stepped {
            Ok(()) => {
                give_psk_identity(&mut peer, asked);
                drain(
                    keys,
                    &mut peer,
                    (from, None),
                    &mut out,
                    &mut st.ready,
                    &*self.metrics,
                )
            }
            Err(e) => {
                tracing::debug!(peer = %from, "DTLS ClientHello refused: {e}");
                Verdict::Failed
            }
        };
        st.peers.insert(from, peer);
        st.handshake_began(from);
        self.settle(st, from, verdict);
        out
    }

    /// Applies what stepping `from`'s session gave.
    fn settle(&self, st: &mut State, from: SocketAddr, verdict: Verdict) {
        match verdict {
            Verdict::Going => {}
            Verdict::Established => {
                st.handshake_ended(from);
                self.metrics.count(Event::DtlsHandshake);
                let cid = st.peers.get(&from).and_then(|p| p.cid.clone());
                if let Some(cid) = cid {
                    // Another session's ID drawn again (2^-48 a pair): this one goes by
                    // address only.
                    st.by_cid.entry(cid).or_insert(from);
                }
            }
            Verdict::Failed | Verdict::Closed => {
                if let Some(p) = st.forget(from) {
                    if p.established {
                        tracing::debug!(peer = %from, "DTLS session closed");
                    } else {
                        st.handshake_ended(from);
                        self.metrics.count(Event::DtlsHandshakeFailed);
                    }
                }
            }
        }
    }

    /// Timers: dimpl's retransmissions, handshake timeouts, idle sessions.
    pub fn on_tick(&self, now: Instant) -> Outgoing {
        let mut out = Vec::new();
        let Some(keys) = self.keys.get() else {
            return out;
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.next_sweep.is_some_and(|t| t > now) {
            return out;
        }
        st.next_sweep = Some(now + TICK);
        let mut settled = Vec::new();
        for (addr, peer) in st.peers.iter_mut() {
            if !peer.established && now.duration_since(peer.started) > self.limits.handshake_timeout
            {
                settled.push((*addr, Verdict::Failed));
                continue;
            }
            if peer.established && now.duration_since(peer.last) > self.limits.idle {
                let _ = peer.dtls.close();
                let mut scratch = vec![0u8; 256];
                drain_packets(peer, &mut scratch, &mut out, &*self.metrics);
                settled.push((*addr, Verdict::Closed));
                continue;
            }
            if peer
                .probe
                .as_ref()
                .is_some_and(|p| p.tries < PROBE_TRIES && now.duration_since(p.sent) >= PROBE_RETRY)
            {
                peer.ping(now);
                let mut scratch = vec![0u8; 256];
                drain_packets(peer, &mut scratch, &mut out, &*self.metrics);
            }
            if peer.established && !peer.trimmed && now.duration_since(peer.last) >= TRIM_AFTER {
                peer.dtls.trim();
                peer.trimmed = true;
            }
            if peer.timer.is_some_and(|t| t <= now) {
                let (stepped, asked) = step(keys, || peer.dtls.handle_timeout(now));
                let verdict = match stepped {
                    Ok(()) => {
                        // A timer step may process a buffered ClientKeyExchange.
                        give_psk_identity(peer, asked);
                        drain(
                            keys,
                            peer,
                            (*addr, None),
                            &mut out,
                            &mut st.ready,
                            &*self.metrics,
                        )
                    }
                    Err(_) => Verdict::Failed,
                };
                if verdict != Verdict::Going {
                    settled.push((*addr, verdict));
                }
            }
        }
        for (addr, verdict) in settled {
            self.settle(st, addr, verdict);
        }
        out
    }
}

/// Whether the DTLS listeners take `key` (PKCS#8 DER) as their server key: dimpl loads
/// ECDSA P-256 and P-384 keys only. `connectord check-config` asks it of
/// `coap.tls_cert`/`coap.tls_key` when DTLS listeners would present them, as the start does
/// ([`DtlsListener::configure`]).
pub fn check_server_key(key: &[u8]) -> Result<(), DtlsError> {
    let config = Config::builder()
        .build()
        .map_err(|e| DtlsError::Dimpl(e.to_string()))?;
    config
        .crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| DtlsError::Dimpl(format!("server key: {e:?}")))?;
    Ok(())
}

/// What [`DtlsLimits::max_handshakes_per_source`] counts by: an IPv4 address, or an IPv6
/// address's /64 (one host or site gets a /64, and can pick any address in it). An
/// IPv4-mapped IPv6 address counts as its IPv4 address.
fn source_of(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Runs `f`, one step of a session's dimpl state, which may ask the listener's
/// [`Resolver`] for a PSK. Returns its result and the identity it asked about, if any.
///
/// The resolver's one slot is emptied before and taken after, whatever the result, so an
/// identity named in a step that failed is given to no other session. (Before, it stayed
/// in the slot and the next session to step successfully took it as its own: a failed
/// handshake under another device's identity renamed an established session.)
///
/// A panic inside dimpl on a peer's input fails this step only, as an error: the listener
/// and its other sessions go on.
fn step(
    keys: &Keys,
    f: impl FnOnce() -> Result<(), dimpl::Error>,
) -> (Result<(), String>, Option<Vec<u8>>) {
    let slot = || {
        keys.resolver
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    };
    slot();
    let result = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if crate::log_budget::allow(crate::log_budget::DeviceLine::HandshakeRefused) {
                tracing::warn!(
                    "DTLS library panicked on a peer's input; the session fails: {what}"
                );
            }
            Err(format!("panic in the DTLS library: {what}"))
        }
    };
    (result, slot())
}

/// Gives a PSK session the identity its handshake asked about ([`step`]). Only while the
/// handshake is going: an established session's identity never changes.
fn give_psk_identity(peer: &mut Peer, asked: Option<Vec<u8>>) {
    if let Some(id) = asked
        && peer.mode == Mode::Psk
        && !peer.established
    {
        peer.identity = Some(PeerIdentity::Psk(Arc::from(
            String::from_utf8_lossy(&id).as_ref(),
        )));
    }
}

/// What stepping a session gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Going,
    Established,
    Failed,
    Closed,
}

/// Polls a session's output: packets to `out` (to the peer's current address, within a
/// [`Probe`]'s budget), plaintext to `ready` (from the session key `from`; the Reset
/// answering a probe taken out when it came from `src`, the datagram's source), the
/// certificate checked, the handshake's end reported.
fn drain(
    keys: &Keys,
    peer: &mut Peer,
    (from, src): (SocketAddr, Option<SocketAddr>),
    out: &mut Outgoing,
    ready: &mut VecDeque<(Vec<u8>, SocketAddr)>,
    metrics: &dyn Metrics,
) -> Verdict {
    let mut scratch = vec![0u8; 2048];
    let mut verdict = Verdict::Going;
    loop {
        match peer.dtls.poll_output(&mut scratch) {
            Output::Packet(p) => {
                let p = p.to_vec();
                if !peer.emit(&p, out) {
                    metrics.count(Event::DtlsUnverifiedDropped);
                }
            }
            Output::BufferTooSmall { needed } if needed > MAX_OUTPUT => {
                if crate::log_budget::allow(crate::log_budget::DeviceLine::HandshakeRefused) {
                    tracing::info!(
                        peer = %from,
                        "DTLS client certificate refused: {needed} bytes, over {MAX_OUTPUT}"
                    );
                }
                return Verdict::Failed;
            }
            Output::BufferTooSmall { needed } => scratch.resize(needed, 0),
            Output::Timeout(t) => {
                peer.timer = Some(t);
                return verdict;
            }
            Output::PeerCert(der) => match verify_certificate(keys, der) {
                Ok(identity) => peer.identity = Some(identity),
                Err(reason) => {
                    if crate::log_budget::allow(crate::log_budget::DeviceLine::HandshakeRefused) {
                        tracing::info!(peer = %from, "DTLS client certificate refused: {reason}");
                    }
                    return Verdict::Failed;
                }
            },
            Output::Connected => {
                if peer.identity.is_none() {
                    // A certificate handshake whose certificate we did not see verified.
                    return Verdict::Failed;
                }
                peer.established = true;
                peer.cid = peer
                    .dtls
                    .connection_id()
                    .filter(|c| c.len() == CID_LEN)
                    .map(Box::from);
                verdict = Verdict::Established;
            }
            Output::ApplicationData(data) => {
                if !peer.established || peer.pong(data, src) {
                    continue;
                }
                if ready.len() >= MAX_READY {
                    metrics.count(Event::BusyDrop);
                    continue;
                }
                ready.push_back((data.to_vec(), from));
            }
            Output::CloseNotify => return Verdict::Closed,
            _ => {}
        }
    }
}

/// Drains only the packets (a closing session, a message of ours, a probe), within a
/// [`Probe`]'s budget.
fn drain_packets(
    peer: &mut Peer,
    scratch: &mut Vec<u8>,
    out: &mut Outgoing,
    metrics: &dyn Metrics,
) {
    loop {
        match peer.dtls.poll_output(scratch) {
            Output::Packet(p) => {
                let p = p.to_vec();
                if !peer.emit(&p, out) {
                    metrics.count(Event::DtlsUnverifiedDropped);
                }
            }
            Output::BufferTooSmall { needed } if needed > MAX_OUTPUT => return,
            Output::BufferTooSmall { needed } => scratch.resize(needed, 0),
            Output::Timeout(_) => return,
            _ => {}
        }
    }
}

/// The client certificate: chained to an anchor, in its validity period, for client
/// authentication, not revoked by the host; its CN, OU and serial.
fn verify_certificate(keys: &Keys, der: &[u8]) -> Result<PeerIdentity, String> {
    let cert_der = rustls_pki_types::CertificateDer::from(der);
    let ee = webpki::EndEntityCert::try_from(&cert_der).map_err(|e| format!("{e:?}"))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &keys.anchors,
        &[],
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| format!("{e:?}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("no subject CN")?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok());
    let serial: String = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !keys.credentials.certificate_valid(cn, &serial) {
        return Err(format!("revoked (CN={cn}, serial {serial})"));
    }
    Ok(PeerIdentity::Certificate {
        cn: Arc::from(cn),
        ou: ou.map(Arc::from),
        serial: Arc::from(serial.as_str()),
    })
}

impl Listener for DtlsListener {
    fn id(&self) -> ListenerId {
        self.id
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        {
            let mut dgram = vec![0u8; MAX_RECORD];
            loop {
                let next = self.lock().ready.pop_front();
                if let Some((data, from)) = next {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    return Ok((data.len(), from));
                }
                let out = tokio::select! {
                    r = self.drops.recv(&self.socket, &mut dgram) => {
                        let (n, from) = r?;
                        self.on_datagram(&dgram[..n], from, Instant::now())
                    }
                    _ = tokio::time::sleep(TICK) => Vec::new(),
                };
                let mut out = out;
                out.extend(self.on_tick(Instant::now()));
                self.send_all(out).await;
            }
        }
    }

    async fn send(&self, session: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        let out = {
            let mut st = self.lock();
            let Some(peer) = st.peers.get_mut(&session).filter(|p| p.established) else {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "no DTLS session with this peer",
                ));
            };
            peer.last = Instant::now();
            peer.trimmed = false;
            peer.dtls
                .send_application_data(bytes)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut out = Vec::new();
            let mut scratch = vec![0u8; 2048];
            drain_packets(peer, &mut scratch, &mut out, &*self.metrics);
            out
        };
        self.send_all(out).await;
        Ok(())
    }

    fn identity(&self, session: SocketAddr) -> Option<PeerIdentity> {
        self.lock()
            .peers
            .get(&session)
            .filter(|p| p.established)
            .and_then(|p| p.identity.clone())
    }

    fn close_sessions(&self, revoked: &dyn Fn(&PeerIdentity) -> bool) -> usize {
        let mut out = Vec::new();
        let closed = {
            let mut st = self.lock();
            let doomed: Vec<SocketAddr> = st
                .peers
                .iter()
                .filter(|(_, p)| p.identity.as_ref().is_some_and(revoked))
                .map(|(a, _)| *a)
                .collect();
            let mut scratch = vec![0u8; 256];
            for addr in &doomed {
                if let Some(mut p) = st.forget(*addr) {
                    if p.established {
                        let _ = p.dtls.close();
                        drain_packets(&mut p, &mut scratch, &mut out, &*self.metrics);
                    } else {
                        // A handshake that has named the identity (its PSK looked up, its
                        // certificate verified) but not finished: it would finish under
                        // the old key or the revoked certificate.
                        st.handshake_ended(*addr);
                        self.metrics.count(Event::DtlsHandshakeFailed);
                    }
                }
            }
            doomed.len()
        };
        // Not async: the close_notify goes out if the socket takes it now (it is not
        // retransmitted anyway, RFC 6347 §4.2.7).
        for (bytes, to) in out {
            let _ = self.socket.try_send_to(&bytes, to);
        }
        closed
    }
}

/// The ClientHello seen before a session exists: parsed, answered, rewritten.
pub mod hello {
    use super::Mode;

    /// The parts of an unfragmented DTLS 1.2 ClientHello in one record that the cookie
    /// check needs (offsets into the datagram).
    #[derive(Debug, Clone)]
    pub struct Hello {
        pub record_seq: [u8; 6],
        pub message_seq: u16,
        pub random: [u8; 32],
        /// Offset and length of the cookie.
        pub cookie: (usize, usize),
        /// Offset and length of the cipher suite list.
        pub suites: (usize, usize),
    }

    /// Record header (13) + handshake header (12).
    const BODY: usize = 25;

    /// The ClientHello at the start of `d`, or `None` for anything else (another record,
    /// a fragment, a truncated or inconsistent one).
    pub fn parse(d: &[u8]) -> Option<Hello> {
        // content type handshake, epoch 0
        if d.len() < BODY + 2 + 32 + 1 || d[0] != 22 || d[3] != 0 || d[4] != 0 {
            return None;
        }
        let record_len = u16::from_be_bytes([d[11], d[12]]) as usize;
        let record = d.get(13..13 + record_len)?;
        if record.len() < 12 || record[0] != 1 {
            return None;
        }
        let len = u24(&record[1..4]);
        let message_seq = u16::from_be_bytes([record[4], record[5]]);
        let frag_off = u24(&record[6..9]);
        let frag_len = u24(&record[9..12]);
        if frag_off != 0 || frag_len != len || 12 + len > record.len() {
            return None;
        }
        let end = 13 + 12 + len;
        let mut pos = BODY + 2;
        let random: [u8; 32] = d.get(pos..pos + 32)?.try_into().ok()?;
        pos += 32;
        let sid = *d.get(pos)? as usize;
        pos += 1 + sid;
        let cookie_len = *d.get(pos)? as usize;
        let cookie = (pos + 1, cookie_len);
        pos += 1 + cookie_len;
        let suites_len = u16::from_be_bytes([*d.get(pos)?, *d.get(pos + 1)?]) as usize;
        let suites = (pos + 2, suites_len);
        if pos + 2 + suites_len > end || !suites_len.is_multiple_of(2) {
            return None;
        }
        let mut record_seq = [0u8; 6];
        record_seq.copy_from_slice(&d[5..11]);
        Some(Hello {
            record_seq,
            message_seq,
            random,
            cookie,
            suites,
        })
    }

    fn u24(b: &[u8]) -> usize {
        (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize
    }

    /// The cookie secret of a client at `addr`: `HMAC-SHA256(secret, ip || port)`.
    pub fn secret_for(secret: &[u8; 32], addr: std::net::SocketAddr) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let mut ctx = ring::hmac::Context::with_key(&key);
        match addr.ip() {
            std::net::IpAddr::V4(ip) => ctx.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => ctx.update(&ip.octets()),
        }
        ctx.update(&addr.port().to_be_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// dimpl's cookie for this random: `HMAC-SHA256(secret, client_random)`, `secret`
    /// being the client's ([`secret_for`]).
    fn cookie(secret: &[u8; 32], random: &[u8; 32]) -> ring::hmac::Tag {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        ring::hmac::sign(&key, random)
    }

    /// True when `h`'s cookie (in `d`) is ours for its random.
    pub fn cookie_valid(secret: &[u8; 32], d: &[u8], h: &Hello) -> bool {
        let (at, len) = h.cookie;
        let Some(got) = d.get(at..at + len) else {
            return false;
        };
        // Constant time.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        len == 32 && ring::hmac::verify(&key, &h.random, got).is_ok()
    }

    /// The HelloVerifyRequest answering `h` (RFC 6347 §4.2.1: DTLS 1.0 version, the
    /// ClientHello's record sequence number, `message_seq` 0).
    pub fn verify_request(secret: &[u8; 32], h: &Hello) -> Vec<u8> {
        let tag = cookie(secret, &h.random);
        let c = tag.as_ref();
        let body_len = 2 + 1 + c.len();
        let mut v = Vec::with_capacity(13 + 12 + body_len);
        v.extend_from_slice(&[22, 0xfe, 0xff, 0, 0]);
        v.extend_from_slice(&h.record_seq);
        v.extend_from_slice(&((12 + body_len) as u16).to_be_bytes());
        v.push(3);
        v.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        v.extend_from_slice(&[0, 0, 0, 0, 0]);
        v.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        v.extend_from_slice(&[0xfe, 0xff, c.len() as u8]);
        v.extend_from_slice(c);
        v
    }

    /// The ClientHello as the client sent it before the cookie exchange, as far as dimpl
    /// cares: `message_seq` 0 and a cookie that does not verify (one bit flipped).
    pub fn first_hello(d: &[u8], h: &Hello) -> Vec<u8> {
        let mut v = d.to_vec();
        v[17] = 0;
        v[18] = 0;
        if h.cookie.1 > 0 {
            v[h.cookie.0] ^= 1;
        }
        v
    }

    /// PSK or certificate: the first suite the client offers that we have.
    pub(super) fn mode(d: &[u8], have_cert: bool) -> Option<Mode> {
        let h = parse(d)?;
        let list = d.get(h.suites.0..h.suites.0 + h.suites.1)?;
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .find_map(|s| {
                if s == super::PSK_AES128_CCM_8 {
                    Some(Mode::Psk)
                } else if have_cert && super::ECDHE_ECDSA_SUITES.contains(&s) {
                    Some(Mode::Certificate)
                } else {
                    None
                }
            })
    }
}

/// A DTLS 1.2 client over dimpl: the simulator's devices and the tests. Sans-IO like the
/// server side: the caller moves datagrams ([`client::DtlsClient::connect`] does it for
/// the handshake on a tokio socket).
pub mod client {
    use std::collections::VecDeque;
    use std::io;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use dimpl::{Config, Dtls, DtlsCertificate, Output, PskResolver};
    use tokio::net::UdpSocket;

    /// How a client proves itself.
    #[derive(Clone)]
    pub enum ClientAuth {
        /// A PSK identity and its key.
        Psk { identity: Vec<u8>, key: Vec<u8> },
        /// A certificate and its PKCS#8 key (both DER, ECDSA).
        Certificate { cert: Vec<u8>, key: Vec<u8> },
    }

    impl ClientAuth {
        /// `IDENTITY:HEXKEY` (the identity may hold colons; the key is after the last).
        pub fn psk_from_arg(arg: &str) -> Result<ClientAuth, String> {
            let (identity, hex) = arg
                .rsplit_once(':')
                .ok_or_else(|| format!("{arg:?} is not IDENTITY:HEXKEY"))?;
            if identity.is_empty() || hex.is_empty() || hex.len() % 2 != 0 {
                return Err(format!(
                    "{arg:?} is not IDENTITY:HEXKEY (an even number of hex digits)"
                ));
            }
            let key = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| format!("the key of {arg:?} is not hex"))?;
            Ok(ClientAuth::Psk {
                identity: identity.as_bytes().to_vec(),
                key,
            })
        }

        /// A certificate and its key from PEM files (`CERTIFICATE`; `EC PRIVATE KEY` or
        /// `PRIVATE KEY`).
        pub fn certificate_from_files(
            cert: &std::path::Path,
            key: &std::path::Path,
        ) -> Result<ClientAuth, String> {
            let block = |path: &std::path::Path, tags: &[&str]| -> Result<Vec<u8>, String> {
                let text = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let blocks = pem::parse_many(&text)
                    .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
                blocks
                    .into_iter()
                    .find(|b| tags.contains(&b.tag()))
                    .map(|b| b.into_contents())
                    .ok_or_else(|| {
                        format!("{}: no {} PEM block", path.display(), tags.join(" or "))
                    })
            };
            Ok(ClientAuth::Certificate {
                cert: block(cert, &["CERTIFICATE"])?,
                key: block(key, &["EC PRIVATE KEY", "PRIVATE KEY"])?,
            })
        }
    }

    struct FixedKey(Vec<u8>);

    impl PskResolver for FixedKey {
        fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
            Some(self.0.clone())
        }
    }

    /// A client configuration, built once and shared by many clients (building one checks
    /// the crypto provider, which costs milliseconds).
    #[derive(Clone)]
    pub struct ClientConfig {
        config: Arc<Config>,
        auth: ClientAuth,
    }

    impl std::fmt::Debug for ClientConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mode = match &self.auth {
                ClientAuth::Psk { identity, .. } => {
                    format!("PSK {}", String::from_utf8_lossy(identity))
                }
                ClientAuth::Certificate { .. } => "certificate".into(),
            };
            f.debug_struct("ClientConfig").field("auth", &mode).finish()
        }
    }

    impl ClientConfig {
        /// This PSK configuration with another identity and key, without dimpl's
        /// validation of the crypto provider (milliseconds) that [`ClientConfig::new`]
        /// does; `None` for a certificate configuration.
        pub fn with_psk(&self, identity: Vec<u8>, key: Vec<u8>) -> Option<ClientConfig> {
            if !matches!(self.auth, ClientAuth::Psk { .. }) {
                return None;
            }
            let config = self
                .config
                .with_psk_client_identity(identity.clone(), Arc::new(FixedKey(key.clone())));
            Some(ClientConfig {
                config: Arc::new(config),
                auth: ClientAuth::Psk { identity, key },
            })
        }

        pub fn new(auth: ClientAuth) -> Result<ClientConfig, super::DtlsError> {
            // RFC 9146: offer an empty connection ID (the server's address does not
            // change; we send with the server's so that our address may).
            let b = Config::builder()
                .mtu(1200)
                .dtls13_cipher_suites(&[])
                .connection_id_len(0);
            let b = match &auth {
                ClientAuth::Psk { identity, key } => b
                    .with_psk_client(identity.clone(), Arc::new(FixedKey(key.clone())))
                    .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8]),
                ClientAuth::Certificate { .. } => b,
            };
            let config = b
                .build()
                .map_err(|e| super::DtlsError::Dimpl(e.to_string()))?;
            if let ClientAuth::Certificate { key, .. } = &auth {
                config
                    .crypto_provider()
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| super::DtlsError::Dimpl(format!("client key: {e:?}")))?;
            }
            Ok(ClientConfig {
                config: Arc::new(config),
                auth,
            })
        }
    }

    /// One client session.
    pub struct DtlsClient {
        dtls: Dtls,
        timer: Option<Instant>,
        ready: VecDeque<Vec<u8>>,
        connected: bool,
        closed: bool,
    }

    impl DtlsClient {
        /// A client whose first flight (ClientHello) is ready in [`DtlsClient::poll`].
        pub fn new(cfg: &ClientConfig, now: Instant) -> DtlsClient {
            let mut dtls = match &cfg.auth {
                ClientAuth::Psk { .. } => Dtls::new_12_psk(Arc::clone(&cfg.config), now),
                ClientAuth::Certificate { cert, key } => Dtls::new_12(
                    Arc::clone(&cfg.config),
                    DtlsCertificate {
                        certificate: cert.clone(),
                        private_key: key.clone(),
                    },
                    now,
                ),
            };
            dtls.set_active(true);
            // dimpl starts the handshake (and draws its random) at the first timeout call.
            let _ = dtls.handle_timeout(now);
            DtlsClient {
                dtls,
                timer: None,
                ready: VecDeque::new(),
                connected: false,
                closed: false,
            }
        }

        pub fn is_connected(&self) -> bool {
            self.connected
        }

        pub fn is_closed(&self) -> bool {
            self.closed
        }

        /// When [`DtlsClient::on_timer`] wants to be called.
        pub fn next_timer(&self) -> Option<Instant> {
            self.timer
        }

        /// The next decrypted message.
        pub fn take_message(&mut self) -> Option<Vec<u8>> {
            self.ready.pop_front()
        }

        /// Records to send now.
        pub fn poll(&mut self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut scratch = vec![0u8; 2048];
            loop {
                match self.dtls.poll_output(&mut scratch) {
                    Output::Packet(p) => out.push(p.to_vec()),
                    Output::BufferTooSmall { needed } => scratch.resize(needed, 0),
                    Output::Timeout(t) => {
                        self.timer = Some(t);
                        return out;
                    }
                    Output::Connected => self.connected = true,
                    Output::ApplicationData(d) => self.ready.push_back(d.to_vec()),
                    Output::CloseNotify => self.closed = true,
                    _ => {}
                }
            }
        }

        /// A datagram from the server; returns the records to send.
        pub fn on_datagram(&mut self, bytes: &[u8], now: Instant) -> io::Result<Vec<Vec<u8>>> {
            self.dtls
                .handle_timeout(now)
                .and_then(|()| self.dtls.handle_packet(bytes))
                .map_err(|e| {
                    self.closed = true;
                    io::Error::other(format!("DTLS: {e}"))
                })?;
            Ok(self.poll())
        }

        /// Retransmissions due at `now`.
        pub fn on_timer(&mut self, now: Instant) -> io::Result<Vec<Vec<u8>>> {
            self.dtls.handle_timeout(now).map_err(|e| {
                self.closed = true;
                io::Error::other(format!("DTLS: {e}"))
            })?;
            Ok(self.poll())
        }

        /// Encrypts one message; returns the records to send.
        pub fn send(&mut self, bytes: &[u8]) -> io::Result<Vec<Vec<u8>>> {
            self.dtls
                .send_application_data(bytes)
                .map_err(|e| io::Error::other(format!("DTLS: {e}")))?;
            Ok(self.poll())
        }

        /// close_notify; returns the records to send.
        pub fn close(&mut self) -> Vec<Vec<u8>> {
            let _ = self.dtls.close();
            self.poll()
        }

        /// Handshakes with `server` over `sock` within `timeout`.
        pub async fn connect(
            cfg: &ClientConfig,
            sock: &UdpSocket,
            server: SocketAddr,
            timeout: Duration,
        ) -> io::Result<DtlsClient> {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut c = DtlsClient::new(cfg, Instant::now());
            let mut out = c.poll();
            let mut buf = vec![0u8; 4096];
            loop {
                for p in out.drain(..) {
                    sock.send_to(&p, server).await?;
                }
                if c.connected {
                    return Ok(c);
                }
                if c.closed {
                    return Err(io::Error::other("DTLS handshake refused"));
                }
                let wake = c
                    .timer
                    .map(tokio::time::Instant::from_std)
                    .unwrap_or(deadline)
                    .min(deadline);
                tokio::select! {
                    r = sock.recv_from(&mut buf) => {
                        let (n, from) = r?;
                        if from == server {
                            out = c.on_datagram(&buf[..n], Instant::now())?;
                        }
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "DTLS handshake timed out"));
                        }
                        out = c.on_timer(Instant::now())?;
                    }
                }
            }
        }
    }
}
