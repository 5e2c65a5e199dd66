//! The transport seam: a [`Listener`] receives messages from many peers and sends to one;
//! a [`Session`] is one peer on one listener.
//!
//! A listener yields `(message, session)` pairs and sends a message to a session; how it
//! frames messages and tells sessions apart is its own business. UDP ([`crate::udp`]):
//! one datagram is one message and the session is the peer's address. DTLS, TCP and TLS
//! (RFC 8323) fit the same shape: a stream listener accepts connections, reads framed
//! messages from each, and yields them with the connection's peer address as session.
//!
//! Reliability is not the listener's: the message layer ([`crate::transport`]) applies
//! CON/ACK, retransmission and the duplicate cache to unreliable listeners
//! ([`ListenerKind::unreliable`]). A reliable listener (TCP, TLS) will carry requests and
//! responses without message ids or ACKs, with its signalling messages (CSM, Ping/Pong,
//! Release, Abort) handled inside the listener; callers of [`crate::Transport::request`]
//! and implementors of [`crate::RequestHandler`] do not change.
//!
//! The methods return `impl Future` (no boxing: a message costs no allocation here), so a
//! listener is used through a concrete type or an enum of the kinds, not `dyn Listener`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::dtls::DtlsListener;
use crate::peer::{ListenerId, ListenerKind, PeerIdentity, PeerRef};
use crate::udp::UdpListener;

pub trait Listener: Send + Sync + 'static {
    /// This listener's name (`udp:[::]:5683`).
    fn id(&self) -> ListenerId;

    fn kind(&self) -> ListenerKind {
        self.id().kind
    }

    /// The next message into `buf` and the session it came from. A message longer than
    /// `buf` is reported with its full length (at least `buf.len()`), so that the caller
    /// can drop it as oversize; its bytes are cut. Errors are per message (an ICMP error
    /// surfacing on a UDP socket), not the end of the listener.
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a;

    /// Waits for a message and takes it with those ready behind it, at most
    /// `batch.capacity()`, into `batch` (cleared first). By default one, with
    /// [`Listener::recv`]; UDP takes many in one system call (`recvmmsg`, issue 24).
    fn recv_batch<'a>(
        &'a self,
        batch: &'a mut RecvBatch,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a {
        async move {
            batch.clear();
            let (len, from) = self.recv(&mut batch.bufs[0]).await?;
            batch.got.push((len, from));
            Ok(())
        }
    }

    /// Sends one message to `session`.
    fn send<'a>(
        &'a self,
        session: SocketAddr,
        bytes: &'a [u8],
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// What the peer of `session` proved (secure listeners); `None` on plain UDP or for a
    /// session that is gone.
    fn identity(&self, _session: SocketAddr) -> Option<PeerIdentity> {
        None
    }

    /// Closes every session whose peer proved an identity for which `revoked` is true
    /// (a revoked credential), and returns how many it closed. A handshake that has named
    /// such an identity but not finished is ended too (and counted): it would otherwise
    /// finish under the old key or the revoked certificate.
    fn close_sessions(&self, _revoked: &dyn Fn(&PeerIdentity) -> bool) -> usize {
        0
    }

    /// The daemon stops cleanly: end the sessions as the protocol asks (a TLS listener
    /// sends Release on each connection), within a bounded wait. Nothing for UDP and DTLS.
    fn stop(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::ready(())
    }
}

/// Messages received together ([`Listener::recv_batch`]): buffers of one size, and the
/// length and session of each message received into them, in order.
#[derive(Debug)]
pub struct RecvBatch {
    pub(crate) bufs: Vec<Vec<u8>>,
    pub(crate) got: Vec<(usize, SocketAddr)>,
}

impl RecvBatch {
    /// Room for `count` (at least one) messages of `size` bytes each.
    pub fn new(count: usize, size: usize) -> RecvBatch {
        let count = count.max(1);
        RecvBatch {
            bufs: vec![vec![0; size]; count],
            got: Vec::with_capacity(count),
        }
    }

    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    pub fn clear(&mut self) {
        self.got.clear();
    }

    /// The messages received: the bytes of each (cut to a buffer), its full length as
    /// [`Listener::recv`] reports it, and its session.
    pub fn messages(&self) -> impl Iterator<Item = (&[u8], usize, SocketAddr)> + '_ {
        self.got
            .iter()
            .zip(&self.bufs)
            .map(|(&(len, from), buf)| (&buf[..len.min(buf.len())], len, from))
    }
}

/// The listener kinds the transport holds: one variant per kind, each arm passing through
/// (one line per method per kind). The DTLS one is boxed (its
/// state is large; a listener is built once).
#[derive(Debug)]
pub enum AnyListener {
    Udp(UdpListener),
    Dtls(Box<DtlsListener>),
    Tls(crate::tls::TlsListener),
}

impl Listener for AnyListener {
    fn id(&self) -> ListenerId {
        match self {
            AnyListener::Udp(l) => l.id(),
            AnyListener::Dtls(l) => l.id(),
            AnyListener::Tls(l) => l.id(),
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            AnyListener::Udp(l) => l.recv(buf).await,
            AnyListener::Dtls(l) => l.recv(buf).await,
            AnyListener::Tls(l) => l.recv(buf).await,
        }
    }

    async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        match self {
            AnyListener::Udp(l) => l.recv_batch(batch).await,
            AnyListener::Dtls(l) => l.recv_batch(batch).await,
            AnyListener::Tls(l) => l.recv_batch(batch).await,
        }
    }

    async fn send(&self, session: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        match self {
            AnyListener::Udp(l) => l.send(session, bytes).await,
            AnyListener::Dtls(l) => l.send(session, bytes).await,
            AnyListener::Tls(l) => l.send(session, bytes).await,
        }
    }

    fn identity(&self, session: SocketAddr) -> Option<PeerIdentity> {
        match self {
            AnyListener::Udp(l) => l.identity(session),
            AnyListener::Dtls(l) => l.identity(session),
            AnyListener::Tls(l) => l.identity(session),
        }
    }

    fn close_sessions(&self, revoked: &dyn Fn(&PeerIdentity) -> bool) -> usize {
        match self {
            AnyListener::Udp(l) => l.close_sessions(revoked),
            AnyListener::Dtls(l) => l.close_sessions(revoked),
            AnyListener::Tls(l) => l.close_sessions(revoked),
        }
    }

    async fn stop(&self) {
        match self {
            AnyListener::Udp(l) => l.stop().await,
            AnyListener::Dtls(l) => l.stop().await,
            AnyListener::Tls(l) => l.stop().await,
        }
    }
}

/// What a secure listener asks its host during a handshake. Implemented by the host
/// (its credential store); called on the listener's task, so it answers from memory.
pub trait Credentials: Send + Sync + 'static {
    /// The key of a PSK identity, or `None` for an identity the host does not know (the
    /// handshake then fails).
    fn psk(&self, identity: &[u8]) -> Option<Vec<u8>>;

    /// False for a client certificate that chained to a trusted CA but was revoked since
    /// (the handshake then fails). `serial` is hex, as in [`PeerIdentity::Certificate`].
    fn certificate_valid(&self, _cn: &str, _serial: &str) -> bool {
        true
    }
}

/// One peer on one listener: what a message came from and what a reply goes to.
#[derive(Debug)]
pub struct Session<'a, L: Listener> {
    pub listener: &'a L,
    pub key: SocketAddr,
}

impl<L: Listener> Session<'_, L> {
    pub fn peer(&self) -> PeerRef {
        PeerRef {
            listener: self.listener.id(),
            session: self.key,
        }
    }

    /// Sends one message; a failure is logged (the peer retransmits, or the exchange
    /// times out), as a lost datagram would be.
    pub async fn send(&self, bytes: &[u8]) {
        if let Err(e) = self.listener.send(self.key, bytes).await {
            tracing::debug!(peer = %self.key, "CoAP send failed: {e}");
        }
    }
}
