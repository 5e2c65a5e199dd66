//! The server side of the RFC 7252 message layer over the listeners.
//!
//! One receive task per listener. Each message goes through `Transport::on_message`, a
//! synchronous step of the message-layer state (`(bytes, session, now) -> Action`): decoded
//! strictly, matched against the duplicate cache, the client's open exchanges and the
//! Block1 assemblies, it becomes nothing, bytes to send back, or a new request for the
//! [`RequestHandler`], which runs on its own task (bounded by `coap.max_in_flight`). The
//! receive task does the I/O: the reply is cached and sent through the listener (for UDP:
//! the socket) that received the request, which is what LwM2M clients behind NAT require.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, ResponseType};
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tokio::sync::watch;

use crate::block1::{self, Assemblies};
use crate::client::{ClientConfig, ClientState};
use crate::config::CoapConfig;
use crate::dedup::{Dedup, Seen};
use crate::dtls::{DtlsCounts, DtlsError, DtlsLimits, DtlsListener, DtlsSetup};
use crate::listener::{AnyListener, Listener, RecvBatch, Session};
use crate::message::{self, Handled, Inbound, RawHeader, ReplyTo, Response};
use crate::metrics::{Event, Metrics};
use crate::peer::{ListenerId, PeerRef, Source};
use crate::shed::Pacer;
use crate::tls::{TlsBounds, TlsListener, TlsSetup};
use crate::udp::{self, UdpListener};

/// What the transport calls for each new request. A [`Handled`] without a response sends
/// no reply (only sensible for a NON request); its `after_send` runs once the reply is out.
pub trait RequestHandler: Send + Sync + 'static {
    fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>>;
}

/// The diagnostic payload of a 5.03 answered for load (the store's and the registry's
/// 5.03s say otherwise).
pub const SHED_DIAGNOSTIC: &str = "busy: retry after Max-Age";

/// What one message asks of the receive task ([`Transport::on_message`]).
enum Action {
    Nothing,
    /// Send these bytes back to the session the message came from.
    Reply(Vec<u8>),
    /// A new request for the handler.
    Handle(NewRequest),
    /// A notification whose rest is to be fetched (Block2, more blocks follow).
    Rest(Box<RestFetch>),
}

/// How many block-wise notifications may have their rest fetched at once, over all
/// devices (each observation one at a time).
const MAX_FETCHES: usize = 64;

/// A block-wise notification's first block, and what fetching the rest needs.
struct RestFetch {
    packet: coap_lite::Packet,
    from: Source,
    /// What its session proved when it arrived.
    identity: Option<crate::peer::PeerIdentity>,
    held: Option<crate::client::HeldAck>,
    /// The observe's request (its path, Accept and identity).
    req: crate::client::OutRequest,
}

/// A request that passed the message layer, with what its handling holds.
struct NewRequest {
    packet: coap_lite::Packet,
    /// The Block1 option its response echoes (the last block of a block-wise request).
    echo: Option<crate::client::Block>,
    permit: OwnedSemaphorePermit,
}

/// The listeners plus message-layer state.
pub struct Transport {
    /// `coap.listen` (UDP), `coap.listen_dtls` (DTLS), then `coap.listen_tls`, in their
    /// order.
    listeners: Vec<Arc<AnyListener>>,
    dedup: Mutex<Dedup>,
    /// Request bodies arriving block-wise (Block1).
    blocks: Mutex<Assemblies>,
    max_datagram: usize,
    /// `coap.tls_max_message_size`: the receive buffer of a TLS listener.
    max_tls_message: usize,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// Requests whose handler has finished (the completion rate of [`Pacer`]).
    completed: Arc<AtomicU64>,
    /// The Max-Age of the 5.03 answered to a CON request that finds no permit.
    pacer: Mutex<Pacer>,
    next_mid: AtomicU16,
    metrics: Arc<dyn Metrics>,
    /// Exchanges we started (requests to devices), see [`crate::client`].
    client: Mutex<ClientState>,
    /// Block-wise notifications whose rest is being fetched ([`MAX_FETCHES`]).
    fetches: std::sync::atomic::AtomicUsize,
    /// Cancellations of observations on their way to devices
    /// ([`crate::client::MAX_CANCELS`]).
    pub(crate) cancels: std::sync::atomic::AtomicUsize,
    /// Per device, its cancellations on their way ([`crate::client::PeerCancels`]).
    pub(crate) cancelling: Mutex<crate::Map<Source, Arc<crate::client::PeerCancels>>>,
    client_cfg: ClientConfig,
    /// `coap.plain`: who may speak plain CoAP.
    plain: crate::config::PlainPolicy,
}

/// How often [`Transport::watch_kernel_drops`] looks at the kernel's drops.
pub const KERNEL_DROPS_EVERY: Duration = Duration::from_secs(10);

/// Messages a receive task takes at once ([`Listener::recv_batch`]: one `recvmmsg` on UDP,
/// issue 24); 16 buffers of `coap.max_datagram` + 1 bytes per listener.
const RECV_BATCH: usize = 16;

impl Transport {
    /// Binds every configured address (`coap.listen`, then `coap.listen_dtls`: the DTLS
    /// listeners handshake once given their keys, [`Transport::set_dtls`]). A wildcard of
    /// an address family the host does not have is skipped with a warning; any other
    /// failure, or no socket at all, is an error.
    pub fn bind(cfg: &CoapConfig, metrics: Arc<dyn Metrics>) -> io::Result<Arc<Transport>> {
        let mut listeners = Vec::new();
        let limits = DtlsLimits {
            max_sessions: cfg.dtls_max_sessions,
            max_handshakes: cfg.dtls_max_handshakes,
            max_handshakes_per_source: cfg.dtls_max_handshakes_per_source,
            handshake_timeout: Duration::from_secs(cfg.dtls_handshake_timeout_s),
            idle: Duration::from_secs(cfg.dtls_idle_s),
        };
        let udp = cfg.listen.iter().map(|a| (*a, false));
        let dtls = cfg.listen_dtls.iter().map(|a| (*a, true));
        for (addr, secure) in udp.chain(dtls) {
            let bound = if secure {
                DtlsListener::bind(addr, limits, Arc::clone(&metrics))
                    .map(|l| AnyListener::Dtls(Box::new(l)))
            } else {
                UdpListener::bind(addr).map(AnyListener::Udp)
            };
            match bound {
                Ok(l) => {
                    let scheme = if secure { "coaps" } else { "udp" };
                    tracing::info!("CoAP listening on {scheme}://{}", l.id().local);
                    listeners.push(Arc::new(l));
                }
                Err(e)
                    if addr.is_ipv6() && addr.ip().is_unspecified() && udp::family_missing(&e) =>
                {
                    tracing::warn!("CoAP: skipping {addr}: IPv6 is not available here ({e})");
                }
                Err(e) => {
                    let key = if secure {
                        "coap.listen_dtls"
                    } else {
                        "coap.listen"
                    };
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot bind CoAP on {addr} ({key}): {e}"),
                    ));
                }
            }
        }
        for addr in &cfg.listen_tls {
            match TlsListener::bind(*addr, TlsBounds::from_config(cfg), Arc::clone(&metrics)) {
                Ok(l) => {
                    tracing::info!("CoAP listening on coaps+tcp://{}", l.id().local);
                    listeners.push(Arc::new(AnyListener::Tls(l)));
                }
                Err(e)
                    if addr.is_ipv6() && addr.ip().is_unspecified() && udp::family_missing(&e) =>
                {
                    tracing::warn!("CoAP/TLS: skipping {addr}: IPv6 is not available here ({e})");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot bind CoAP over TLS on {addr} (coap.listen_tls): {e}"),
                    ));
                }
            }
        }
        if listeners.is_empty() {
            return Err(io::Error::other("no CoAP socket could be bound"));
        }
        if cfg.plain != crate::config::PlainPolicy::Allow {
            tracing::info!(
                "coap.plain = \"{}\": plain CoAP datagrams {} are dropped (counted in connectord_coap_plain_dropped_total)",
                cfg.plain.as_str(),
                if cfg.plain == crate::config::PlainPolicy::Deny {
                    "from every address"
                } else {
                    "from non-loopback addresses"
                }
            );
        }
        Ok(Arc::new(Transport {
            listeners,
            dedup: Mutex::new(Dedup::new(
                Duration::from_secs(cfg.exchange_lifetime_s),
                cfg.dedup_capacity,
            )),
            blocks: Mutex::new(Assemblies::default()),
            max_datagram: cfg.max_datagram,
            max_tls_message: cfg.tls_max_message_size,
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
            max_in_flight: cfg.max_in_flight,
            completed: Arc::new(AtomicU64::new(0)),
            pacer: Mutex::new(Pacer::new(cfg.max_in_flight)),
            next_mid: AtomicU16::new(rand::random()),
            metrics,
            client: Mutex::new(ClientState::new(cfg.max_queued_notifications)),
            fetches: std::sync::atomic::AtomicUsize::new(0),
            cancels: std::sync::atomic::AtomicUsize::new(0),
            cancelling: Mutex::new(crate::Map::default()),
            client_cfg: ClientConfig {
                ack_timeout: Duration::from_millis(cfg.ack_timeout_ms),
                ack_random_factor: cfg.ack_random_factor,
                max_retransmit: cfg.max_retransmit,
                separate_response_timeout: Duration::from_secs(cfg.separate_response_timeout_s),
                block_size: cfg.block_size,
                max_body: cfg.max_body,
            },
            plain: cfg.plain,
        }))
    }

    /// The plain-CoAP UDP addresses actually bound (port 0 resolved);
    /// [`Transport::local_addrs_of`] gives those of another kind (DTLS, TLS).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs_of(crate::peer::ListenerKind::Udp)
    }

    /// The addresses of the listeners of one kind (port 0 resolved).
    pub fn local_addrs_of(&self, kind: crate::peer::ListenerKind) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .map(|l| l.id())
            .filter(|id| id.kind == kind)
            .map(|id| id.local)
            .collect()
    }

    /// Closes, on every listener, the secure sessions whose peer proved an identity for
    /// which `revoked` is true (a credential revoked or replaced), and returns how many
    /// were closed. Plain UDP has no sessions to close.
    pub fn close_sessions(&self, revoked: &dyn Fn(&crate::peer::PeerIdentity) -> bool) -> usize {
        self.listeners
            .iter()
            .map(|l| l.close_sessions(revoked))
            .sum()
    }

    /// Gives every DTLS listener its keys (the host's credentials, its server certificate,
    /// the CAs client certificates must chain to).
    pub fn set_dtls(&self, setup: &DtlsSetup) -> Result<(), DtlsError> {
        for l in &self.listeners {
            if let AnyListener::Dtls(d) = &**l {
                d.configure(setup)?;
            }
        }
        Ok(())
    }

    /// DTLS sessions and half-open handshakes now, over every DTLS listener.
    pub fn dtls_counts(&self) -> DtlsCounts {
        let mut c = DtlsCounts::default();
        for l in &self.listeners {
            if let AnyListener::Dtls(d) = &**l {
                let n = d.counts();
                c.sessions += n.sessions;
                c.half_open += n.half_open;
            }
        }
        c
    }

    /// Datagrams the kernel dropped at each UDP and DTLS listener since it was bound (its
    /// receive buffer full while the receive task was behind, or a bad checksum), as of
    /// one of the last datagrams the listener received (`SO_RXQ_OVFL`, see
    /// `udp::KernelDrops`): nothing else shows them.
    pub fn kernel_drops(&self) -> Vec<(ListenerId, u64)> {
        self.listeners
            .iter()
            .filter_map(|l| match &**l {
                AnyListener::Udp(u) => Some((u.id(), u.kernel_drops())),
                AnyListener::Dtls(d) => Some((d.id(), d.kernel_drops())),
                AnyListener::Tls(_) => None,
            })
            .collect()
    }

    /// CoAP-over-TLS connections open now (handshakes included), over every TLS
    /// listener (at most `coap.tls_max_connections` each).
    pub fn tls_connections(&self) -> usize {
        self.listeners
            .iter()
            .map(|l| match &**l {
                AnyListener::Tls(t) => t.connections(),
                _ => 0,
            })
            .sum()
    }

    /// The id of the listener a [`Source`] names by its index (`via`).
    pub(crate) fn listener_id_at(&self, via: u16) -> Option<ListenerId> {
        self.listeners.get(usize::from(via)).map(|l| l.id())
    }

    /// The listeners, in the order of `coap.listen`.
    pub fn listeners(&self) -> Vec<ListenerId> {
        self.listeners.iter().map(|l| l.id()).collect()
    }

    /// The listener named `id`, if it is still one of ours.
    pub(crate) fn listener(&self, id: &ListenerId) -> Option<&AnyListener> {
        self.sending(id).ok().map(|(l, _)| l)
    }

    /// The listener a request to a device leaves through, with its index (the `via` of
    /// the message layer's [`Source`]).
    pub(crate) fn sending(
        &self,
        id: &ListenerId,
    ) -> Result<(&AnyListener, u16), crate::client::ClientError> {
        self.listeners
            .iter()
            .position(|l| l.id() == *id)
            .and_then(|i| Some((&*self.listeners[i], u16::try_from(i).ok()?)))
            .ok_or(crate::client::ClientError::NoSocket(*id))
    }

    /// The message layer's name of `peer`'s session ([`Source`]): where its answers come
    /// from.
    pub(crate) fn source_of(&self, peer: &PeerRef) -> Result<Source, crate::client::ClientError> {
        let (_, via) = self.sending(&peer.listener)?;
        Ok(Source {
            via,
            peer: peer.session,
        })
    }

    /// What the peer of `peer`'s session proved (secure listeners); `None` on plain UDP,
    /// for a session that is gone, or a listener that is not ours.
    pub fn session_identity(&self, peer: &PeerRef) -> Option<crate::peer::PeerIdentity> {
        self.listener(&peer.listener)?.identity(peer.session)
    }

    /// True when `listener` is one of ours: a device that registered through a listener
    /// no longer configured cannot be reached.
    pub fn has_listener(&self, listener: &ListenerId) -> bool {
        self.listener(listener).is_some()
    }

    /// Gives the TLS listeners their certificates (before [`Transport::start`]; the
    /// sockets are bound earlier, before the state directory that holds the CA is read).
    /// A connection accepted without them is closed.
    pub fn configure_tls(&self, setup: &TlsSetup) {
        for l in &self.listeners {
            if let AnyListener::Tls(t) = &**l {
                t.configure(setup.clone());
            }
        }
    }

    /// True when some listener is a TLS one.
    pub fn has_tls(&self) -> bool {
        self.listeners
            .iter()
            .any(|l| matches!(&**l, AnyListener::Tls(_)))
    }

    pub fn client_config(&self) -> &ClientConfig {
        &self.client_cfg
    }

    pub(super) fn lock_client(&self) -> std::sync::MutexGuard<'_, ClientState> {
        // Every update is a single map operation: a poisoned lock is still consistent.
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exchanges with devices waiting for an answer.
    pub fn open_exchanges(&self) -> usize {
        self.lock_client().open_exchanges()
    }

    /// Exchanges held by the duplicate cache (at most `coap.dedup_capacity`).
    pub fn dedup_entries(&self) -> usize {
        self.lock_dedup().held()
    }

    /// A fresh message id for a message we originate.
    pub fn next_message_id(&self) -> u16 {
        self.next_mid.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts one receive task per socket; they end when `stop` turns true (or its sender
    /// is dropped).
    pub fn start(
        self: &Arc<Self>,
        handler: Arc<dyn RequestHandler>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks: Vec<_> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(via, l)| {
                let t = Arc::clone(self);
                let l = Arc::clone(l);
                let h = Arc::clone(&handler);
                let sd = stop.clone();
                // At most a handful of listeners: `bind` takes them from the configuration.
                let via = u16::try_from(via).unwrap_or(u16::MAX);
                tokio::spawn(async move { t.receive_loop(l, via, h, sd).await })
            })
            .collect();
        if self
            .listeners
            .iter()
            .any(|l| !matches!(&**l, AnyListener::Tls(_)))
        {
            let t = Arc::clone(self);
            tasks.push(tokio::spawn(
                async move { t.watch_kernel_drops(stop).await },
            ));
        }
        tasks
    }

    /// Warns, at most once per listener every [`KERNEL_DROPS_EVERY`], when the kernel
    /// dropped datagrams at a UDP or DTLS listener since the last look
    /// ([`Transport::kernel_drops`]): such a drop is otherwise silent (the device learns
    /// of it only by retransmitting 2–3 s later, and after four in vain its request
    /// fails).
    async fn watch_kernel_drops(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut seen: Vec<(ListenerId, u64)> = Vec::new();
        loop {
            let now = self.kernel_drops();
            for (id, drops) in &now {
                let before = seen.iter().find(|(i, _)| i == id).map(|(_, d)| *d);
                if let Some(before) = before
                    && *drops > before
                {
                    tracing::warn!(
                        "CoAP on {id}: the kernel dropped {} more datagrams (seen in the last {} s; the listener's receive buffer was full: the daemon is behind, or net.core.rmem_max is small); their devices retransmit them; connectord_coap_kernel_drops_total counts them",
                        drops - before,
                        KERNEL_DROPS_EVERY.as_secs()
                    );
                }
            }
            seen = now;
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep(KERNEL_DROPS_EVERY) => {}
            }
        }
    }

    async fn receive_loop<L: Listener>(
        self: Arc<Self>,
        listener: Arc<L>,
        via: u16,
        handler: Arc<dyn RequestHandler>,
        mut stop: watch::Receiver<bool>,
    ) {
        let id = listener.id();
        let reliable = !id.kind.unreliable();
        // A TLS listener checked the size of each message against its Max-Message-Size
        // already (our translation adds the 4-byte RFC 7252 header).
        let limit = if reliable {
            self.max_tls_message + 4
        } else {
            self.max_datagram
        };
        // One byte more than the limit, so that an oversize datagram is seen as such
        // instead of being silently truncated.
        let mut batch = RecvBatch::new(RECV_BATCH, limit + 1);
        loop {
            let received = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => None,
                r = listener.recv_batch(&mut batch) => match r {
                    Ok(()) => Some(()),
                    Err(e) => {
                        // ICMP errors from earlier sends surface here on Linux; not fatal.
                        tracing::debug!("CoAP recv on {}: {e}", id.local);
                        continue;
                    }
                },
            };
            // Stopping: the listener ends its sessions as its protocol asks (TLS: Release).
            if received.is_none() {
                listener.stop().await;
                return;
            }
            for (bytes, len, peer) in batch.messages() {
                self.metrics.count(Event::Datagram);
                if len > limit {
                    self.metrics.count(Event::Oversize);
                    tracing::debug!(%peer, "dropping datagram over coap.max_datagram ({} bytes)", self.max_datagram);
                    continue;
                }
                if !self.plain.admits(id.kind, peer.ip()) {
                    self.metrics.count(Event::PlainDropped);
                    tracing::debug!(%peer, "dropping plain CoAP datagram (coap.plain = \"{}\")", self.plain.as_str());
                    continue;
                }
                let session = Session {
                    listener: &*listener,
                    key: peer,
                };
                let from = Source { via, peer };
                let identity = || listener.identity(peer);
                match self.on_message(
                    bytes,
                    from,
                    identity,
                    (!reliable).then_some(id),
                    Instant::now(),
                ) {
                    Action::Nothing => {}
                    Action::Reply(bytes) => session.send(&bytes).await,
                    Action::Rest(r) => {
                        tokio::spawn(Arc::clone(&self).rest_of_notification(*r));
                    }
                    Action::Handle(req) => self.handle(
                        req,
                        PeerRef {
                            listener: id,
                            session: peer,
                        },
                        via,
                        &listener,
                        &handler,
                    ),
                }
            }
        }
    }

    /// One message through the message-layer state: no I/O, `now` given. On a reliable
    /// listener (TLS, translated at its edge: see [`crate::tls`]) there are no duplicates,
    /// so the duplicate cache is skipped.
    ///
    /// `unreliable`: the listener, for one with the message layer's reliability (UDP,
    /// DTLS); None for a reliable one. `identity`: what the session proved (asked only
    /// for an ACK, RST, separate response or notification answering a request sent to a
    /// secure session).
    fn on_message(
        &self,
        buf: &[u8],
        from: Source,
        identity: impl FnOnce() -> Option<crate::peer::PeerIdentity>,
        unreliable: Option<ListenerId>,
        now: Instant,
    ) -> Action {
        let peer = from.peer;
        let reliable = unreliable.is_none();
        let packet = match message::decode(buf) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.count(Event::Malformed);
                tracing::debug!(%peer, "malformed CoAP datagram: {e}");
                // A confirmable message we cannot parse is rejected with RST (§4.2).
                return match RawHeader::read(buf).filter(|h| h.version == 1 && h.confirmable) {
                    Some(h) => Action::Reply(message::reset(h.message_id)),
                    None => Action::Nothing,
                };
            }
        };
        let mtype = packet.header.get_type();
        let mid = packet.header.message_id;
        match (packet.header.code, mtype) {
            (MessageClass::Request(_), MessageType::Confirmable | MessageType::NonConfirmable) => {}
            (MessageClass::Empty, MessageType::Confirmable) => {
                // CoAP ping (§4.3): answer with RST.
                return Action::Reply(message::reset(mid));
            }
            (
                MessageClass::Empty | MessageClass::Response(_),
                MessageType::Acknowledgement | MessageType::Reset,
            ) => {
                if !self.lock_client().on_ack_or_reset(from, packet, identity) {
                    self.metrics.count(Event::Unexpected);
                }
                return Action::Nothing;
            }
            (MessageClass::Response(_), MessageType::Confirmable | MessageType::NonConfirmable) => {
                return self.on_separate_response(packet, from, identity, unreliable, now);
            }
            // An unassigned method code (0.08 to 0.31) is still a request: 4.05, as for a
            // known method we do not serve (RFC 7252 §5.8). Before, RST for a CON one and
            // nothing for a NON one.
            (
                MessageClass::Reserved(code @ 0x08..=0x1f),
                MessageType::Confirmable | MessageType::NonConfirmable,
            ) => {
                self.metrics.count(Event::Unexpected);
                let r = Response::diagnostic(
                    ResponseType::MethodNotAllowed,
                    format!("method code 0.{:02} is not a CoAP method", code & 0x1f),
                );
                return self
                    .encode_response(r, &packet, peer)
                    .map_or(Action::Nothing, Action::Reply);
            }
            _ => {
                self.metrics.count(Event::Unexpected);
                tracing::debug!(%peer, "ignoring unexpected {:?} {}", mtype, packet.header.code);
                // A confirmable message we cannot process: reject it (§4.2).
                return match mtype {
                    MessageType::Confirmable => Action::Reply(message::reset(mid)),
                    _ => Action::Nothing,
                };
            }
        }

        let seen = if reliable {
            Seen::New
        } else {
            self.lock_dedup().check(from, mid, now)
        };
        match seen {
            Seen::New => {}
            Seen::InProgress => {
                self.metrics.count(Event::Duplicate);
                return Action::Nothing;
            }
            Seen::Answered(reply) => {
                self.metrics.count(Event::Duplicate);
                return reply.map_or(Action::Nothing, Action::Reply);
            }
        }
        // Options the daemon cannot honour (RFC 7252 §5.4.1), proxying, non-UTF-8 names:
        // refused here, for every handler, and remembered like any answer.
        if let Err(refusal) = message::check_request(&packet) {
            tracing::debug!(%peer, "CoAP request refused: {}", String::from_utf8_lossy(&refusal.response.payload));
            let bytes = if refusal.reset_non && mtype == MessageType::NonConfirmable {
                Some(message::reset(mid))
            } else {
                self.encode_response(refusal.response, &packet, peer)
            };
            self.lock_dedup().complete(from, mid, bytes.clone());
            return bytes.map_or(Action::Nothing, Action::Reply);
        }
        // The permit first: a last block dropped for want of one would otherwise have
        // taken its transfer with it, and the device's retransmission would get 4.08.
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            return self.shed(&packet, from, now);
        };
        let mut packet = packet;
        let step = self.lock_blocks().on_request(from, &mut packet, now);
        let echo = match step {
            block1::Step::Handle(echo) => echo,
            block1::Step::Answer(r) => {
                // 2.31 Continue for a block, or a refusal: no handler involved.
                drop(permit);
                let bytes = self.encode_response(r, &packet, peer);
                self.lock_dedup().complete(from, mid, bytes.clone());
                return bytes.map_or(Action::Nothing, Action::Reply);
            }
        };
        Action::Handle(NewRequest {
            packet,
            echo,
            permit,
        })
    }

    /// A request that found every `coap.max_in_flight` permit taken. A CON request is
    /// answered 5.03 Service Unavailable with a Max-Age that spreads the retries at the
    /// rate requests complete ([`crate::shed`]); the answer is remembered like any other,
    /// so a retransmission of the same message gets it again, and the device's retry
    /// after Max-Age is a new request. A NON request (no answer expected, none of its
    /// retries to spare) is dropped and counted.
    fn shed(&self, packet: &coap_lite::Packet, from: Source, now: Instant) -> Action {
        let (peer, mid) = (from.peer, packet.header.message_id);
        if packet.header.get_type() != MessageType::Confirmable {
            self.metrics.count(Event::BusyDrop);
            self.lock_dedup().forget(from, mid);
            tracing::debug!(%peer, "dropping NON request: coap.max_in_flight reached");
            return Action::Nothing;
        }
        self.metrics.count(Event::Shed);
        let in_flight = self
            .max_in_flight
            .saturating_sub(self.in_flight.available_permits());
        let max_age =
            self.lock_pacer()
                .max_age(now, in_flight, self.completed.load(Ordering::Relaxed));
        let r = Response::diagnostic(ResponseType::ServiceUnavailable, SHED_DIAGNOSTIC)
            .with_option(CoapOption::MaxAge, message::encode_uint(max_age));
        let bytes = self.encode_response(r, packet, peer);
        self.lock_dedup().complete(from, mid, bytes.clone());
        bytes.map_or(Action::Nothing, Action::Reply)
    }

    /// Runs the handler of a new request on its own task, then caches and sends its reply
    /// through `listener`.
    ///
    /// Decision: one task per request. The handler's future is polled inside that task
    /// under `catch_unwind`, so that a panic in it becomes a 5.00 answer (and an error in
    /// the log) instead of a request that is never answered; a task of its own per handler
    /// (awaited only for the same purpose) cost a second spawn per request. The task keeps
    /// only what the response needs of the request ([`ReplyTo`]); the request itself goes
    /// to the handler.
    fn handle<L: Listener>(
        self: &Arc<Self>,
        req: NewRequest,
        from: PeerRef,
        via: u16,
        listener: &Arc<L>,
        handler: &Arc<dyn RequestHandler>,
    ) {
        let NewRequest {
            packet,
            echo,
            permit,
        } = req;
        let peer = from.session;
        let reply_to = ReplyTo::of(&packet);
        let mid = reply_to.message_id;
        let this = Arc::clone(self);
        let listener = Arc::clone(listener);
        let completed = Arc::clone(&self.completed);
        let started = std::time::Instant::now();
        let fut = handler.handle(Inbound {
            packet,
            peer: from,
            identity: listener.identity(peer),
        });
        tokio::spawn(async move {
            let _permit = permit;
            let Handled {
                response,
                after_send,
            } = match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => {
                    let what = panic_message(&*panic);
                    tracing::error!(%peer, "CoAP request handler failed: panicked: {what}");
                    Response::diagnostic(ResponseType::InternalServerError, "internal error").into()
                }
            };
            this.metrics.request_latency(started.elapsed());
            let bytes = response.and_then(|mut r| {
                // The last block of a block-wise request: its response echoes its Block1.
                if let Some(b) = echo {
                    r.options.push((CoapOption::Block1, b.encode()));
                }
                this.encode_reply(r, reply_to, peer)
            });
            this.lock_dedup()
                .complete(Source { via, peer }, mid, bytes.clone());
            if let Some(b) = bytes {
                let session = Session {
                    listener: &*listener,
                    key: peer,
                };
                session.send(&b).await;
            }
            completed.fetch_add(1, Ordering::Relaxed);
            if let Some(f) = after_send {
                f();
            }
        });
    }

    /// A response that is not piggybacked: a separate response or an observe notification.
    /// A CON one is acknowledged (and a retransmission of it acknowledged again from the
    /// duplicate cache): a separate response at once, a notification on an unreliable
    /// listener once its observation has stored it ([`crate::client::HeldAck`]; one
    /// dropped at a full queue is not acknowledged: the device retransmits it). One whose
    /// token we do not know is rejected with RST, which also cancels a stale observation
    /// (RFC 7641 §3.6).
    fn on_separate_response(
        &self,
        packet: coap_lite::Packet,
        from: Source,
        identity: impl FnOnce() -> Option<crate::peer::PeerIdentity>,
        unreliable: Option<ListenerId>,
        now: Instant,
    ) -> Action {
        let peer = from.peer;
        let mid = packet.header.message_id;
        let con = packet.header.get_type() == MessageType::Confirmable;
        let held = unreliable
            .filter(|_| con)
            .map(|listener| crate::client::HeldAck {
                listener,
                peer,
                mid,
                via: from.via,
            });
        if con {
            let seen = self.lock_dedup().check(from, mid, now);
            match seen {
                Seen::New => {}
                Seen::InProgress => return Action::Nothing,
                Seen::Answered(reply) => {
                    self.metrics.count(Event::Duplicate);
                    return reply.map_or(Action::Nothing, Action::Reply);
                }
            }
        }
        // A notification whose Block2 says more blocks follow: the rest is fetched
        // first (RFC 7959 §2.6), off the receive loop; before, the first block was taken
        // for the whole value. At most one fetch per observation and MAX_FETCHES in all;
        // past either the notification is not taken (a CON one not acknowledged: the
        // device sends it again).
        let mut client = self.lock_client();
        let routed = match client.rest_to_fetch(from, &packet) {
            crate::client::Rest::No => client.on_response(from, packet, held, identity),
            crate::client::Rest::Fetch(req) => {
                if self.fetches.fetch_add(1, Ordering::Relaxed) < MAX_FETCHES {
                    drop(client);
                    return Action::Rest(Box::new(RestFetch {
                        identity: identity(),
                        packet,
                        from,
                        held,
                        req,
                    }));
                }
                self.fetches.fetch_sub(1, Ordering::Relaxed);
                client.fetched(packet.get_token());
                crate::client::Routed::Dropped
            }
            crate::client::Rest::Busy => crate::client::Routed::Dropped,
        };
        drop(client);
        self.answer_routed(routed, con, mid, from, held.is_some())
            .map_or(Action::Nothing, Action::Reply)
    }

    /// The device's answer to a separate response or notification as it was routed
    /// ([`crate::client::Routed`]), with the duplicate cache told: `None` sends nothing.
    fn answer_routed(
        &self,
        routed: crate::client::Routed,
        con: bool,
        mid: u16,
        from: Source,
        held: bool,
    ) -> Option<Vec<u8>> {
        let reply = match routed {
            crate::client::Routed::Delivered => con.then(|| message::empty_ack(mid)),
            // In progress in the duplicate cache until the observation acknowledges it.
            crate::client::Routed::Held => return None,
            // Not acknowledged: forgotten, so that the device's retransmission is taken
            // as new (by then there may be room).
            crate::client::Routed::Dropped if held => {
                self.metrics.count(Event::ResponseDropped);
                self.lock_dedup().forget(from, mid);
                return None;
            }
            // A NON one (or over a reliable listener): the observation goes on, only this
            // value is skipped.
            crate::client::Routed::Dropped => {
                self.metrics.count(Event::ResponseDropped);
                con.then(|| message::empty_ack(mid))
            }
            crate::client::Routed::Unknown => {
                self.metrics.count(Event::Unexpected);
                Some(message::reset(mid))
            }
        };
        if con {
            self.lock_dedup().complete(from, mid, reply.clone());
        }
        reply
    }

    /// Fetches the rest of a block-wise notification ([`Action::Rest`]) and routes it
    /// whole, with the first block's Observe number: a newer notification routed
    /// meanwhile makes it stale, and the observation skips it (RFC 7641 §3.4). One whose
    /// rest cannot be fetched is not taken: a CON one is not acknowledged (the device
    /// sends it again, and the fetch is tried again), a NON one is dropped; both counted
    /// (`ResponseDropped`) and logged.
    async fn rest_of_notification(self: Arc<Self>, r: RestFetch) {
        let RestFetch {
            mut packet,
            from,
            identity,
            held,
            req,
        } = r;
        let token = packet.get_token().to_vec();
        // Counted off and the route unmarked however this ends.
        struct Done<'a>(&'a Transport, &'a [u8]);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetches.fetch_sub(1, Ordering::Relaxed);
                self.0.lock_client().fetched(self.1);
            }
        }
        let _done = Done(&self, &token);
        let Some(listener) = self.listeners.get(usize::from(from.via)).cloned() else {
            return;
        };
        let peer = PeerRef {
            listener: listener.id(),
            session: from.peer,
        };
        let cfg = self.client_config().clone();
        let mid = packet.header.message_id;
        let con = packet.header.get_type() == MessageType::Confirmable;
        let alive = || self.lock_client().routes(&token);
        let failed = match self
            .rest_of_blocks(peer, &req, &mut packet, &cfg, alive)
            .await
        {
            Ok(None) => None,
            Ok(Some(refusal)) => Some(format!("the device answered {:?}", refusal.code)),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            self.metrics.count(Event::ResponseDropped);
            if crate::log_budget::allow(crate::log_budget::DeviceLine::NotificationIncomplete) {
                tracing::warn!(peer = %from.peer, path = %req.path, "the rest of a block-wise notification could not be fetched: {why}; the notification is not taken{}", if con { " (not acknowledged: the device sends it again)" } else { "" });
            }
            if con {
                self.lock_dedup().forget(from, mid);
            }
            return;
        }
        let routed = self
            .lock_client()
            .on_response(from, packet, held, || identity);
        if let Some(bytes) = self.answer_routed(routed, con, mid, from, held.is_some())
            && let Err(e) = listener.send(from.peer, &bytes).await
        {
            tracing::debug!(peer = %from.peer, "CoAP send failed: {e}");
        }
    }

    /// Sends a CON notification's held ACK (its observation stored it) and remembers it
    /// in the duplicate cache for the device's retransmissions.
    pub(crate) async fn send_held_ack(&self, h: crate::client::HeldAck) {
        let bytes = message::empty_ack(h.mid);
        self.lock_dedup()
            .complete(h.source(), h.mid, Some(bytes.clone()));
        if let Some(l) = self.listener(&h.listener)
            && let Err(e) = l.send(h.peer, &bytes).await
        {
            tracing::debug!(peer = %h.peer, "CoAP send failed: {e}");
        }
    }

    /// Encodes a response to `request` (piggybacked on the ACK of a CON request).
    fn encode_response(
        &self,
        r: Response,
        request: &coap_lite::Packet,
        peer: SocketAddr,
    ) -> Option<Vec<u8>> {
        self.encode_reply(r, ReplyTo::of(request), peer)
    }

    /// [`Transport::encode_response`] from what the response needs of its request.
    fn encode_reply(&self, r: Response, to: ReplyTo, peer: SocketAddr) -> Option<Vec<u8>> {
        if r.code.is_error() {
            self.metrics.count(Event::ErrorResponse);
        }
        let code = r.code;
        let fallback = to.clone();
        match r.into_reply(to, || self.next_message_id()).to_bytes() {
            Ok(b) => Some(b),
            Err(e) => {
                // Not the device's doing (diagnostics are cut to size): a response of ours
                // too large for a datagram. The device still gets its answer, as a bare
                // 5.00, rather than none (which its retransmissions would meet too).
                tracing::error!(%peer, "cannot encode CoAP response {code:?}: {e:?}; answered 5.00");
                Response::new(ResponseType::InternalServerError)
                    .into_reply(fallback, || self.next_message_id())
                    .to_bytes()
                    .ok()
            }
        }
    }

    /// Block-wise transfers in progress (at most `block1::MAX_TRANSFERS`).
    pub fn block_transfers(&self) -> usize {
        self.lock_blocks().len()
    }

    fn lock_blocks(&self) -> std::sync::MutexGuard<'_, Assemblies> {
        // Every update is a single map operation: a poisoned lock is still consistent.
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pacer(&self) -> std::sync::MutexGuard<'_, Pacer> {
        // Plain numbers: a poisoned lock is still consistent.
        self.pacer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lock_dedup(&self) -> std::sync::MutexGuard<'_, Dedup> {
        // The dedup state stays consistent even if a holder panicked (all updates are
        // single map operations), so a poisoned lock is recovered.
        self.dedup.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The text a panic was given (`panic!("...")`), if any.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::{Packet, RequestType};

    use crate::metrics::Counters;

    fn transport() -> (Arc<Transport>, Arc<Counters>) {
        let cfg = CoapConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            max_in_flight: 1,
            ..CoapConfig::default()
        };
        let counters = Arc::new(Counters::default());
        let t = Transport::bind(&cfg, counters.clone()).unwrap();
        (t, counters)
    }

    fn request(mid: u16) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(vec![1]);
        p.add_option(CoapOption::UriPath, b"rd".to_vec());
        p.to_bytes().unwrap()
    }

    fn reply(a: Action) -> Option<Packet> {
        match a {
            Action::Reply(b) => Some(Packet::from_bytes(&b).unwrap()),
            Action::Nothing => None,
            Action::Handle(_) => panic!("handled"),
            Action::Rest(_) => panic!("a block-wise notification"),
        }
    }

    /// A request with an unassigned method code (0.08 to 0.31) is answered 4.05, CON
    /// piggybacked, NON with a NON response (RFC 7252 §5.8). Before, RST and nothing.
    #[tokio::test]
    async fn an_unassigned_method_code_is_answered_method_not_allowed() {
        let (t, _) = transport();
        let peer = SocketAddr::from(([192, 0, 2, 1], 56830));
        let src = Source { via: 0, peer };
        for (code, mtype, answer) in [
            (0x08, MessageType::Confirmable, MessageType::Acknowledgement),
            (
                0x1f,
                MessageType::NonConfirmable,
                MessageType::NonConfirmable,
            ),
        ] {
            let mut p = Packet::new();
            p.header.set_type(mtype);
            p.header.code = MessageClass::Reserved(code);
            p.header.message_id = 900;
            p.set_token(vec![7, 7]);
            let bytes = p.to_bytes().unwrap();
            let r = reply(t.on_message(
                &bytes,
                src,
                || None,
                Some(ListenerId::udp(peer)),
                Instant::now(),
            ))
            .unwrap_or_else(|| panic!("0.{code:02x}: no answer"));
            assert_eq!(
                (r.header.code, r.header.get_type(), r.get_token()),
                (
                    MessageClass::Response(ResponseType::MethodNotAllowed),
                    answer,
                    &[7u8, 7][..]
                ),
                "0.{code:02x}"
            );
            if mtype == MessageType::Confirmable {
                assert_eq!(r.header.message_id, 900);
            }
        }
    }

    /// The message layer as a function of (bytes, session, now): no socket is touched.
    #[tokio::test]
    async fn the_message_layer_steps_without_io() {
        let (t, counters) = transport();
        let peer = SocketAddr::from(([192, 0, 2, 1], 56830));
        let src = Source { via: 0, peer };
        let now = Instant::now();
        // A CoAP ping is answered with RST.
        let ping = [0x40, 0, 0x12, 0x34];
        let rst = reply(t.on_message(&ping, src, || None, Some(ListenerId::udp(peer)), now))
            .expect("RST");
        assert_eq!(
            (rst.header.get_type(), rst.header.message_id),
            (MessageType::Reset, 0x1234)
        );
        // A new request goes to the handler, holding the only in-flight permit; its
        // duplicate is dropped while it runs.
        let Action::Handle(first) =
            t.on_message(&request(7), src, || None, Some(ListenerId::udp(peer)), now)
        else {
            panic!("not handled");
        };
        assert!(
            reply(t.on_message(&request(7), src, || None, Some(ListenerId::udp(peer)), now))
                .is_none()
        );
        assert_eq!(counters.get(Event::Duplicate), 1);
        // Another CON request finds no permit: answered 5.03 with a Max-Age at once, and
        // its retransmission gets the same answer from the duplicate cache.
        let shed = reply(t.on_message(&request(8), src, || None, Some(ListenerId::udp(peer)), now))
            .expect("5.03");
        assert_eq!(
            shed.header.code,
            MessageClass::Response(ResponseType::ServiceUnavailable)
        );
        assert_eq!(shed.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(shed.payload, SHED_DIAGNOSTIC.as_bytes());
        let age = message::uint_option(&shed, CoapOption::MaxAge).expect("Max-Age");
        assert!((1..=crate::shed::MAX_AGE_CAP_S).contains(&age), "{age}");
        assert_eq!(counters.get(Event::Shed), 1);
        let again =
            reply(t.on_message(&request(8), src, || None, Some(ListenerId::udp(peer)), now))
                .expect("cached");
        assert_eq!(again.header.code, shed.header.code);
        assert_eq!(counters.get(Event::Shed), 1, "answered from the cache");
        // A NON request without a permit is dropped and counted.
        let mut non = Packet::from_bytes(&request(9)).unwrap();
        non.header.set_type(MessageType::NonConfirmable);
        assert!(
            reply(t.on_message(
                &non.to_bytes().unwrap(),
                src,
                || None,
                Some(ListenerId::udp(peer)),
                now
            ))
            .is_none()
        );
        assert_eq!(counters.get(Event::BusyDrop), 1);
        t.lock_dedup()
            .complete(src, 7, Some(vec![0x60, 0x44, 0, 7]));
        drop(first);
        assert_eq!(
            reply(t.on_message(&request(7), src, || None, Some(ListenerId::udp(peer)), now))
                .map(|p| p.header.message_id),
            Some(7),
            "the duplicate gets the cached reply"
        );
        // The retry after Max-Age is a new request (new message id): handled.
        assert!(matches!(
            t.on_message(&request(10), src, || None, Some(ListenerId::udp(peer)), now),
            Action::Handle(_)
        ));
        // The cache forgets after EXCHANGE_LIFETIME: the same id is a new request.
        let later = now + Duration::from_secs(CoapConfig::default().exchange_lifetime_s);
        assert!(matches!(
            t.on_message(
                &request(7),
                src,
                || None,
                Some(ListenerId::udp(peer)),
                later
            ),
            Action::Handle(_)
        ));
    }

    struct Panics;

    impl RequestHandler for Panics {
        fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>> {
            Box::pin(async move {
                tokio::task::yield_now().await;
                if req.packet.payload == b"panic" {
                    panic!("handler panics on purpose");
                }
                Response::new(ResponseType::Changed).into()
            })
        }
    }

    /// A handler that panics: the request is answered 5.00 (piggybacked, with its token),
    /// the duplicate cache holds that answer for a retransmission, the permit is given
    /// back, and the next request is handled as usual.
    #[tokio::test]
    async fn a_panicking_handler_is_answered_5_00() {
        let (t, counters) = transport();
        let (stop_tx, stop) = watch::channel(false);
        let tasks = t.start(Arc::new(Panics), stop);
        let server = t.local_addrs()[0];
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let exchange = |bytes: Vec<u8>| {
            let client = &client;
            async move {
                client.send_to(&bytes, server).await.unwrap();
                let mut buf = [0u8; 1500];
                let (n, _) =
                    tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                        .await
                        .expect("an answer")
                        .unwrap();
                Packet::from_bytes(&buf[..n]).unwrap()
            }
        };
        let mut p = Packet::from_bytes(&request(21)).unwrap();
        p.set_token(vec![9, 8, 7]);
        p.payload = b"panic".to_vec();
        let bytes = p.to_bytes().unwrap();
        let answer = exchange(bytes.clone()).await;
        assert_eq!(
            answer.header.code,
            MessageClass::Response(ResponseType::InternalServerError)
        );
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(answer.header.message_id, 21);
        assert_eq!(answer.get_token(), &[9, 8, 7]);
        assert_eq!(answer.payload, b"internal error");
        assert_eq!(counters.get(Event::ErrorResponse), 1);
        // The retransmission gets the same answer from the duplicate cache.
        let again = exchange(bytes).await;
        assert_eq!(again.header.code, answer.header.code);
        assert_eq!(counters.get(Event::Duplicate), 1);
        // The only permit comes back (once the task ends, after the send): the next
        // request is handled.
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.in_flight.available_permits() == 0 {
            assert!(Instant::now() < deadline, "the permit was not given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ok = exchange(request(22)).await;
        assert_eq!(
            ok.header.code,
            MessageClass::Response(ResponseType::Changed)
        );
        assert_eq!(ok.header.message_id, 22);
        stop_tx.send(true).unwrap();
        for task in tasks {
            task.await.unwrap();
        }
    }
}
