//! UDP sockets and the server side of the RFC 7252 message layer.
//!
//! One receive task per bound socket. Each datagram is decoded strictly; a new request is
//! recorded in the duplicate cache and handed to the [`RequestHandler`] on its own task
//! (bounded by `coap.max_in_flight`); the reply is cached and sent from the socket that
//! received the request, which is what LwM2M clients behind NAT require.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use tokio::sync::watch;

use crate::block1::{self, Assemblies};
use crate::client::{ClientConfig, ClientState};
use crate::config::CoapConfig;
use crate::dedup::{Dedup, Seen};
use crate::message::{self, Handled, Inbound, RawHeader, Response};
use crate::metrics::{Event, Metrics};
use crate::peer::{ListenerId, PeerRef};

/// What the transport calls for each new request. A [`Handled`] without a response sends
/// no reply (only sensible for a NON request); its `after_send` runs once the reply is out.
pub trait RequestHandler: Send + Sync + 'static {
    fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>>;
}

/// Bound sockets plus message-layer state.
pub struct Transport {
    sockets: Vec<(ListenerId, Arc<UdpSocket>)>,
    dedup: Mutex<Dedup>,
    /// Request bodies arriving block-wise (Block1).
    blocks: Mutex<Assemblies>,
    max_datagram: usize,
    in_flight: Arc<Semaphore>,
    next_mid: AtomicU16,
    metrics: Arc<dyn Metrics>,
    /// Exchanges we started (requests to devices), see [`crate::client`].
    client: Mutex<ClientState>,
    client_cfg: ClientConfig,
}

impl Transport {
    /// Binds every configured address. A wildcard of an address family the host does not
    /// have is skipped with a warning; any other failure, or no socket at all, is an error.
    pub fn bind(cfg: &CoapConfig, metrics: Arc<dyn Metrics>) -> io::Result<Arc<Transport>> {
        let mut sockets = Vec::new();
        for addr in &cfg.listen {
            match bind_one(*addr) {
                Ok(s) => {
                    let local = s.local_addr()?;
                    tracing::info!("CoAP listening on udp://{local}");
                    sockets.push((ListenerId::udp(local), Arc::new(s)));
                }
                Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && family_missing(&e) => {
                    tracing::warn!("CoAP: skipping {addr}: IPv6 is not available here ({e})");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot bind CoAP on {addr}: {e}"),
                    ));
                }
            }
        }
        if sockets.is_empty() {
            return Err(io::Error::other("no CoAP socket could be bound"));
        }
        Ok(Arc::new(Transport {
            sockets,
            dedup: Mutex::new(Dedup::new(
                Duration::from_secs(cfg.exchange_lifetime_s),
                cfg.dedup_capacity,
            )),
            blocks: Mutex::new(Assemblies::default()),
            max_datagram: cfg.max_datagram,
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
            next_mid: AtomicU16::new(rand::random()),
            metrics,
            client: Mutex::new(ClientState::default()),
            client_cfg: ClientConfig {
                ack_timeout: Duration::from_millis(cfg.ack_timeout_ms),
                ack_random_factor: cfg.ack_random_factor,
                max_retransmit: cfg.max_retransmit,
                separate_response_timeout: Duration::from_secs(cfg.separate_response_timeout_s),
                block_size: cfg.block_size,
                max_body: cfg.max_body,
            },
        }))
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|(l, _)| l.local).collect()
    }

    /// The listeners, in the order of `coap.listen`.
    pub fn listeners(&self) -> Vec<ListenerId> {
        self.sockets.iter().map(|(l, _)| *l).collect()
    }

    /// The socket of `listener`, if it is still one of ours.
    pub(crate) fn socket_for(&self, listener: &ListenerId) -> Option<&Arc<UdpSocket>> {
        self.sockets
            .iter()
            .find(|(l, _)| l == listener)
            .map(|(_, s)| s)
    }

    /// True when `listener` is one of ours: a device that registered through a listener
    /// no longer configured cannot be reached.
    pub fn has_listener(&self, listener: &ListenerId) -> bool {
        self.sockets.iter().any(|(l, _)| l == listener)
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
        (0..self.sockets.len())
            .map(|i| {
                let t = Arc::clone(self);
                let h = Arc::clone(&handler);
                let sd = stop.clone();
                tokio::spawn(async move { t.receive_loop(i, h, sd).await })
            })
            .collect()
    }

    async fn receive_loop(
        self: Arc<Self>,
        index: usize,
        handler: Arc<dyn RequestHandler>,
        mut stop: watch::Receiver<bool>,
    ) {
        let (listener, socket) = self.sockets[index].clone();
        let local = listener.local;
        // One byte more than the limit, so that an oversize datagram is seen as such
        // instead of being silently truncated.
        let mut buf = vec![0u8; self.max_datagram + 1];
        loop {
            let (len, peer) = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here on Linux; not fatal.
                        tracing::debug!("CoAP recv on {local}: {e}");
                        continue;
                    }
                },
            };
            self.metrics.count(Event::Datagram);
            if len > self.max_datagram {
                self.metrics.count(Event::Oversize);
                tracing::debug!(%peer, "dropping datagram over coap.max_datagram ({} bytes)", self.max_datagram);
                continue;
            }
            self.on_datagram(&buf[..len], peer, local, &socket, &handler)
                .await;
        }
    }

    async fn on_datagram(
        self: &Arc<Self>,
        buf: &[u8],
        peer: SocketAddr,
        local: SocketAddr,
        socket: &Arc<UdpSocket>,
        handler: &Arc<dyn RequestHandler>,
    ) {
        let packet = match message::decode(buf) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.count(Event::Malformed);
                tracing::debug!(%peer, "malformed CoAP datagram: {e}");
                // A confirmable message we cannot parse is rejected with RST (§4.2).
                if let Some(h) = RawHeader::read(buf).filter(|h| h.version == 1 && h.confirmable) {
                    send(socket, &message::reset(h.message_id), peer).await;
                }
                return;
            }
        };
        let mtype = packet.header.get_type();
        let mid = packet.header.message_id;
        match (packet.header.code, mtype) {
            (MessageClass::Request(_), MessageType::Confirmable | MessageType::NonConfirmable) => {}
            (MessageClass::Empty, MessageType::Confirmable) => {
                // CoAP ping (§4.3): answer with RST.
                send(socket, &message::reset(mid), peer).await;
                return;
            }
            (
                MessageClass::Empty | MessageClass::Response(_),
                MessageType::Acknowledgement | MessageType::Reset,
            ) => {
                if !self.lock_client().on_ack_or_reset(peer, packet) {
                    self.metrics.count(Event::Unexpected);
                }
                return;
            }
            (MessageClass::Response(_), MessageType::Confirmable | MessageType::NonConfirmable) => {
                self.on_separate_response(packet, peer, socket).await;
                return;
            }
            _ => {
                self.metrics.count(Event::Unexpected);
                tracing::debug!(%peer, "ignoring unexpected {:?} {}", mtype, packet.header.code);
                if mtype == MessageType::Confirmable {
                    // A confirmable message we cannot process: reject it (§4.2).
                    send(socket, &message::reset(mid), peer).await;
                }
                return;
            }
        }

        let seen = self.lock_dedup().check(peer, mid, Instant::now());
        match seen {
            Seen::New => {}
            Seen::InProgress => {
                self.metrics.count(Event::Duplicate);
                return;
            }
            Seen::Answered(reply) => {
                self.metrics.count(Event::Duplicate);
                if let Some(bytes) = reply {
                    send(socket, &bytes, peer).await;
                }
                return;
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
            self.lock_dedup().complete(peer, mid, bytes.clone());
            if let Some(b) = bytes {
                send(socket, &b, peer).await;
            }
            return;
        }
        // The permit first: a last block dropped for want of one would otherwise have
        // taken its transfer with it, and the device's retransmission would get 4.08.
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            self.metrics.count(Event::BusyDrop);
            self.lock_dedup().forget(peer, mid);
            tracing::debug!(%peer, "dropping request: coap.max_in_flight reached");
            return;
        };
        let mut packet = packet;
        let step = self
            .lock_blocks()
            .on_request(peer, &mut packet, Instant::now());
        let echo = match step {
            block1::Step::Handle(echo) => echo,
            block1::Step::Answer(r) => {
                // 2.31 Continue for a block, or a refusal: no handler involved.
                drop(permit);
                let bytes = self.encode_response(r, &packet, peer);
                self.lock_dedup().complete(peer, mid, bytes.clone());
                if let Some(b) = bytes {
                    send(socket, &b, peer).await;
                }
                return;
            }
        };

        let this = Arc::clone(self);
        let socket = Arc::clone(socket);
        let started = std::time::Instant::now();
        let fut = handler.handle(Inbound {
            packet: packet.clone(),
            peer: PeerRef::udp(local, peer),
        });
        tokio::spawn(async move {
            let _permit = permit;
            // The handler runs on its own task so that a panic in it becomes a 5.00
            // answer instead of a request that is never answered.
            let Handled {
                response,
                after_send,
            } = match tokio::spawn(fut).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(%peer, "CoAP request handler failed: {e}");
                    Response::diagnostic(ResponseType::InternalServerError, "internal error").into()
                }
            };
            this.metrics.request_latency(started.elapsed());
            let bytes = response.and_then(|mut r| {
                // The last block of a block-wise request: its response echoes its Block1.
                if let Some(b) = echo {
                    r.options.push((CoapOption::Block1, b.encode()));
                }
                this.encode_response(r, &packet, peer)
            });
            this.lock_dedup().complete(peer, mid, bytes.clone());
            if let Some(b) = bytes {
                send(&socket, &b, peer).await;
            }
            if let Some(f) = after_send {
                f();
            }
        });
    }

    /// A response that is not piggybacked: a separate response or an observe notification.
    /// A CON one is acknowledged (and a retransmission of it acknowledged again from the
    /// duplicate cache); one whose token we do not know is rejected with RST, which also
    /// cancels a stale observation (RFC 7641 §3.6).
    async fn on_separate_response(
        &self,
        packet: coap_lite::Packet,
        peer: SocketAddr,
        socket: &Arc<UdpSocket>,
    ) {
        let mid = packet.header.message_id;
        let con = packet.header.get_type() == MessageType::Confirmable;
        if con {
            let seen = self.lock_dedup().check(peer, mid, Instant::now());
            match seen {
                Seen::New => {}
                Seen::InProgress => return,
                Seen::Answered(reply) => {
                    self.metrics.count(Event::Duplicate);
                    if let Some(bytes) = reply {
                        send(socket, &bytes, peer).await;
                    }
                    return;
                }
            }
        }
        let routed = self.lock_client().on_response(packet);
        let reply = match routed {
            crate::client::Routed::Delivered => con.then(|| message::empty_ack(mid)),
            // Still acknowledged: the observation goes on, only this value is skipped.
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
            self.lock_dedup().complete(peer, mid, reply.clone());
        }
        if let Some(bytes) = reply {
            send(socket, &bytes, peer).await;
        }
    }

    /// Encodes a response to `request` (piggybacked on the ACK of a CON request).
    fn encode_response(
        &self,
        r: Response,
        request: &coap_lite::Packet,
        peer: SocketAddr,
    ) -> Option<Vec<u8>> {
        if r.code.is_error() {
            self.metrics.count(Event::ErrorResponse);
        }
        match r.into_packet(request, || self.next_message_id()).to_bytes() {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(%peer, "cannot encode CoAP response: {e:?}");
                None
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

    fn lock_dedup(&self) -> std::sync::MutexGuard<'_, Dedup> {
        // The dedup state stays consistent even if a holder panicked (all updates are
        // single map operations), so a poisoned lock is recovered.
        self.dedup.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn send(socket: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = socket.send_to(bytes, peer).await {
        tracing::debug!(%peer, "CoAP send failed: {e}");
    }
}

/// True for the errors of a host without IPv6 (Linux EAFNOSUPPORT, EADDRNOTAVAIL).
fn family_missing(e: &io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    matches!(e.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL))
}

fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A larger receive buffer absorbs bursts of registrations; the kernel caps it.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}
