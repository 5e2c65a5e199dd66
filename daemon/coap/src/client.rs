//! The client side of the message layer: requests the daemon sends to devices.
//!
//! - Confirmable requests are retransmitted (RFC 7252 §4.2: ACK_TIMEOUT × random factor,
//!   doubling, MAX_RETRANSMIT times), then fail with [`ClientError::Timeout`].
//! - A piggybacked response ends the exchange; an empty ACK means a separate response will
//!   follow (CON, acknowledged by the transport, or NON), awaited for
//!   `coap.separate_response_timeout_s`. A RST ends it with [`ClientError::Reset`].
//! - Tokens are 8 random bytes: they cannot be guessed by a third party injecting
//!   responses.
//! - Block-wise (RFC 7959): a request payload larger than `coap.block_size` goes out in
//!   Block1 blocks (adapting to a smaller size the device asks for); a response with Block2
//!   and the more-flag set is fetched block by block (GET/FETCH) up to `coap.max_body`.

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::sync::mpsc;

use crate::Map;

use crate::listener::Listener;
use crate::message;
use crate::peer::{ListenerId, PeerIdentity, PeerRef, Source};
use crate::transport::Transport;

/// What arrived for an exchange of ours.
#[derive(Debug)]
pub enum ClientEvent {
    /// ACK matching our message id: empty (a separate response follows) or piggybacked.
    Ack(Packet),
    /// RST matching our message id.
    Reset,
    /// A separate response carrying our token.
    Response(Packet),
    /// A notification (or the first, separate response) of an observation: counted in
    /// [`Queued`] until taken; a CON one from an unreliable listener with its ACK, which
    /// is sent only once the observation has stored it ([`FeedItem::take_ack`]).
    Notification(Packet, Option<HeldAck>),
}

/// The ACK of a CON notification, held until the notification is stored (issue 24): a
/// device's notification is acknowledged only once it is durable, so an acknowledged one
/// is never lost. Until then the duplicate cache has it in progress (a retransmission is
/// ignored); one dropped at a full queue is not acknowledged at all and forgotten by the
/// duplicate cache, so the device's retransmission gets another chance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldAck {
    pub listener: ListenerId,
    pub peer: SocketAddr,
    pub mid: u16,
    /// The listener's index in the transport (the duplicate cache's key, [`Source`]).
    pub(crate) via: u16,
}

impl HeldAck {
    pub(crate) fn source(&self) -> Source {
        Source {
            via: self.via,
            peer: self.peer,
        }
    }
}

/// Events that may wait for one open exchange: a few at most (ACK, RST, a separate
/// response).
pub const EXCHANGE_QUEUE: usize = 64;

/// Notifications that may wait in one observation's own stream (issue 24): from the
/// observe's answer until the stream is handed to an [`ObservationFeed`]
/// ([`ObserveStream::into_feed`], which moves them to the feed ahead of the later ones),
/// so this absorbs what a device that notifies every few ms sends meanwhile. Once handed
/// over only the feed's bound applies. All observations together are bounded by
/// `coap.max_queued_notifications` (the memory bound); past either bound the excess is
/// dropped and counted instead of queued: a later notification carries the newer value
/// anyway (RFC 7641 §1.3, eventual consistency).
pub const OBSERVE_QUEUE: usize = 1024;

/// What became of a response routed by token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    Delivered,
    /// Queued for its observation with its ACK held ([`HeldAck`]).
    Held,
    /// The exchange's queue was full: dropped (the exchange stays open).
    Dropped,
    /// No open exchange has this token.
    Unknown,
}

/// Notifications received and not yet taken, over all observations, and their bound
/// (`coap.max_queued_notifications`).
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) now: std::sync::atomic::AtomicUsize,
    pub(crate) max: usize,
}

impl Queued {
    pub(crate) fn new(max: usize) -> Queued {
        Queued {
            now: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.now.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Where a token routes to: an exchange, or an observation whose queued notifications
/// count against [`Queued`]; and whom it answers to.
#[derive(Debug)]
struct Route {
    tx: RouteTx,
    /// The session the request went to: a separate response or a notification with this
    /// token from any other source is not its answer (RFC 7252 §5.3.2: "The source
    /// endpoint of the response MUST be the same as the destination endpoint of the
    /// original request"; RFC 7641 §3.2 for notifications).
    to: Source,
    /// On a secure listener, the identity the session proved when the request went out:
    /// a session of that address that proved another is not its answer either.
    identity: Option<PeerIdentity>,
    /// An observation's request (`None` for an exchange): what the rest of a block-wise
    /// notification is fetched with ([`ClientState::rest_to_fetch`]).
    observe: Option<Box<OutRequest>>,
    /// A fetch of a block-wise notification's rest runs for this route: at most one at a
    /// time, so a device cannot start fetches faster than they end.
    fetching: bool,
    /// The exchange cancelling the observation of this token
    /// ([`Transport::cancel_observation`]): a notification of it (a CON or NON with
    /// Observe) is not its answer but one of the observation it ends (answered RST).
    cancelling: bool,
}

impl Route {
    /// A route to the session `to` (with `identity` on a secure listener); an
    /// observation's when `observe` is its request.
    fn new(
        tx: mpsc::Sender<ClientEvent>,
        to: Source,
        identity: Option<PeerIdentity>,
        observe: Option<Box<OutRequest>>,
    ) -> Route {
        Route {
            tx: RouteTx::Own(tx),
            to,
            identity,
            observe,
            fetching: false,
            cancelling: false,
        }
    }

    /// Whether the route is an observation's (its notifications count against
    /// [`Queued`]) rather than an exchange's.
    fn observation(&self) -> bool {
        self.observe.is_some()
    }

    /// Whether a separate response or notification from `from` answers this route: from
    /// the session the request went to (RFC 7252 §5.3.2). Decision: a plain-UDP
    /// observation also takes its notifications from another address of the same
    /// listener (a NAT's new mapping, which a device behind it learns of only at its next
    /// update): on plain UDP the source address proves nothing, the token is the only
    /// guard against forgery, and rejecting them would end the device's observation
    /// (RST) until its next update, hours away for a queue-mode device. A secure
    /// session's observation and every exchange take answers from their session only.
    fn answered_from(&self, from: Source) -> bool {
        self.to == from
            || (self.observation() && self.identity.is_none() && self.to.via == from.via)
    }
}

/// What to do with a separate response or notification before it is routed
/// ([`ClientState::rest_to_fetch`]).
pub(crate) enum Rest {
    /// Route it as it is.
    No,
    /// A notification in blocks: fetch the rest with this request first.
    Fetch(OutRequest),
    /// A notification in blocks whose observation is fetching another's rest: not taken
    /// (a CON one is not acknowledged, so the device sends it again).
    Busy,
}

/// Where a route's messages go.
#[derive(Debug)]
enum RouteTx {
    /// The exchange's (or observation stream's) own channel.
    Own(mpsc::Sender<ClientEvent>),
    /// An observation handed to an [`ObservationFeed`] ([`ObserveStream::into_feed`]).
    Feed(std::sync::Arc<FeedLink>),
}

impl RouteTx {
    fn is_closed(&self) -> bool {
        match self {
            RouteTx::Own(tx) => tx.is_closed(),
            RouteTx::Feed(link) => link.tx.is_closed(),
        }
    }
}

/// A transmission waiting for its ACK or RST: the token of its exchange and, on a secure
/// listener, the identity its session proved when it was sent (an ACK or RST from a
/// session of that address that proved another is not its answer).
#[derive(Debug)]
struct Waiting {
    token: Vec<u8>,
    identity: Option<PeerIdentity>,
}

/// Open exchanges, by token and by (source, message id).
#[derive(Debug)]
pub struct ClientState {
    by_token: Map<Vec<u8>, Route>,
    by_mid: Map<(Source, u16), Waiting>,
    queued: std::sync::Arc<Queued>,
}

impl ClientState {
    /// `max_queued`: `coap.max_queued_notifications`.
    pub fn new(max_queued: usize) -> ClientState {
        ClientState {
            by_token: Map::default(),
            by_mid: Map::default(),
            queued: std::sync::Arc::new(Queued::new(max_queued)),
        }
    }

    /// Notifications received and not yet taken by their observations.
    pub fn queued_notifications(&self) -> usize {
        self.queued.now.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Routes an ACK or RST by message id; false when no exchange waits for it.
    /// `identity` tells what the session it came from proved (asked only when the
    /// transmission was sent to a secure session): one of another identity is not its
    /// answer. A session gone by then (`None`) does not refuse it: a TLS listener reports
    /// a closed connection as RSTs after it forgot the connection (the exchange fails at
    /// once, rather than after MAX_TRANSMIT_WAIT), and a message already received from a
    /// session that closed since was that session's.
    pub(crate) fn on_ack_or_reset(
        &mut self,
        from: Source,
        packet: Packet,
        identity: impl FnOnce() -> Option<PeerIdentity>,
    ) -> bool {
        let Some(waiting) = self.by_mid.get(&(from, packet.header.message_id)) else {
            return false;
        };
        if let Some(want) = &waiting.identity
            && identity().is_some_and(|now| now != *want)
        {
            return false;
        }
        let token = &waiting.token;
        // A piggybacked response answers the request only with its token (RFC 7252
        // §5.3.2); one with another token is not its answer, and is ignored (the request
        // is retransmitted, and times out if every answer is like it). Except an error
        // with no token at all: some LwM2M clients (Wakaama's parse errors) answer a
        // request they could not parse so, and that is its answer.
        let error_without_token = packet.get_token().is_empty()
            && matches!(packet.header.code, MessageClass::Response(c) if c.is_error());
        if packet.header.code != MessageClass::Empty
            && packet.get_token() != token.as_slice()
            && !error_without_token
        {
            return false;
        }
        let Some(Route { tx, .. }) = self.by_token.get(token) else {
            return false;
        };
        let ev = if packet.header.get_type() == MessageType::Reset {
            ClientEvent::Reset
        } else {
            ClientEvent::Ack(packet)
        };
        match tx {
            // A full queue means the exchange is being answered already: it is known.
            RouteTx::Own(tx) => {
                !matches!(tx.try_send(ev), Err(mpsc::error::TrySendError::Closed(_)))
            }
            // An established observation has no exchange waiting for an ACK (its stream
            // ignored them too).
            RouteTx::Feed(link) => !link.tx.is_closed(),
        }
    }

    /// Routes a separate response (or notification) by token, from the session its
    /// request went to ([`Route::to`]; `identity` as for [`ClientState::on_ack_or_reset`]).
    /// One from another source is [`Routed::Unknown`] to it: before, a datagram from any
    /// port, or another device's DTLS session, that carried a request's token answered
    /// it, and the device's own answer was then taken for a duplicate.
    pub(crate) fn on_response(
        &mut self,
        from: Source,
        packet: Packet,
        held: Option<HeldAck>,
        identity: impl FnOnce() -> Option<PeerIdentity>,
    ) -> Routed {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(route) = self.by_token.get(packet.get_token()) else {
            return Routed::Unknown;
        };
        if !route.answered_from(from) {
            return Routed::Unknown;
        }
        if let Some(want) = &route.identity
            && identity().is_some_and(|now| now != *want)
        {
            return Routed::Unknown;
        }
        if route.cancelling
            && packet.header.get_type() != MessageType::Acknowledgement
            && packet.get_option(CoapOption::Observe).is_some()
        {
            return Routed::Unknown;
        }
        if route.observation() {
            // Counted before it is sent (the stream subtracts what it takes); called under
            // the client lock, so no other sender races past the bound.
            if self.queued.now.load(Relaxed) >= self.queued.max {
                return if route.tx.is_closed() {
                    Routed::Unknown
                } else {
                    Routed::Dropped
                };
            }
            self.queued.now.fetch_add(1, Relaxed);
        }
        let ok = match (route.observation(), held) {
            (true, Some(_)) => Routed::Held,
            _ => Routed::Delivered,
        };
        let sent = match &route.tx {
            RouteTx::Own(tx) => {
                let ev = if route.observation() {
                    ClientEvent::Notification(packet, held)
                } else {
                    ClientEvent::Response(packet)
                };
                tx.try_send(ev).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => Routed::Dropped,
                    mpsc::error::TrySendError::Closed(_) => Routed::Unknown,
                })
            }
            RouteTx::Feed(link) => {
                let item = FeedItem {
                    link: std::sync::Arc::clone(link),
                    message: FeedMessage::Notification(packet),
                    held,
                    from: Some(from.peer),
                };
                link.tx.send(item).map_err(|e| {
                    // Not taken (the feed's reader is gone): the caller answers RST, so
                    // the item's held ACK is not the item's to forget.
                    let mut item = e.0;
                    item.held = None;
                    Routed::Unknown
                })
            }
        };
        match sent {
            Ok(()) => ok,
            Err(routed) => {
                if route.observation() {
                    self.queued.release(1);
                }
                routed
            }
        }
    }

    /// Whether `packet` is a notification of an observation answered from `from` whose
    /// Block2 says more blocks follow (or is not its first block, or cannot be read: the
    /// fetch then fails, and the notification is not taken as if whole). A fetch it
    /// starts marks the route until [`ClientState::fetched`].
    pub(crate) fn rest_to_fetch(&mut self, from: Source, packet: &Packet) -> Rest {
        let Some(route) = self.by_token.get_mut(packet.get_token()) else {
            return Rest::No;
        };
        let Some(req) = route
            .observe
            .as_deref()
            .filter(|_| route.answered_from(from))
        else {
            return Rest::No;
        };
        match block_option(packet, CoapOption::Block2) {
            Ok(Some(b)) if !b.more && b.num == 0 => Rest::No,
            Ok(None) => Rest::No,
            _ if route.fetching => Rest::Busy,
            _ => {
                let req = req.clone();
                route.fetching = true;
                Rest::Fetch(req)
            }
        }
    }

    /// A fetch started by [`ClientState::rest_to_fetch`] ended.
    pub(crate) fn fetched(&mut self, token: &[u8]) {
        if let Some(route) = self.by_token.get_mut(token) {
            route.fetching = false;
        }
    }

    /// Whether `token` still routes somewhere (a fetch for a cancelled observation stops).
    pub(crate) fn routes(&self, token: &[u8]) -> bool {
        self.by_token.contains_key(token)
    }

    pub fn open_exchanges(&self) -> usize {
        self.by_token.len()
    }
}

/// Timing and size limits of the client side (from `[coap]`).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub ack_timeout: Duration,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
    pub separate_response_timeout: Duration,
    /// Block size for Block1 writes (16..=1024, a power of two).
    pub block_size: usize,
    /// Largest response body assembled from Block2 blocks.
    pub max_body: usize,
}

/// A request to a device.
#[derive(Debug, Clone)]
pub struct OutRequest {
    pub method: RequestType,
    /// The resource path: its non-empty `/`-separated segments are the Uri-Path options.
    /// Kept whole (split as it is encoded): a `Vec` of segments cost an allocation each,
    /// on every request.
    pub path: String,
    pub query: Vec<String>,
    pub payload: Vec<u8>,
    pub content_format: Option<u16>,
    pub accept: Option<u16>,
    /// Observe option: 0 registers, 1 deregisters.
    pub observe: Option<u32>,
    /// On a secure listener: the identity the session must have proved. Every
    /// transmission (each retransmission, each block) first checks the session still has
    /// it, and fails with [`ClientError::OtherSession`] sending nothing if not: a session
    /// of that address established since by another peer (a NAT that gave the address to
    /// another device) never receives the request. `None` sends to whichever session
    /// holds the address.
    pub identity: Option<PeerIdentity>,
}

impl OutRequest {
    /// The Uri-Path options: the path's non-empty segments.
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> {
        self.path
            .as_bytes()
            .split(|b| *b == b'/')
            .filter(|s| !s.is_empty())
    }

    pub fn new(method: RequestType, path: &str) -> OutRequest {
        OutRequest {
            method,
            path: path.to_owned(),
            query: Vec::new(),
            payload: Vec::new(),
            content_format: None,
            accept: None,
            observe: None,
            identity: None,
        }
    }
}

/// A request encoded for sending ([`Transport::build`]).
struct Outgoing {
    bytes: Vec<u8>,
    message_id: u16,
    token: [u8; 8],
}

/// The cancellations on their way to one device ([`Transport::cancel_observation`]): sent
/// one at a time (`turn`), and waited for by an observe of that device.
#[derive(Default)]
pub(crate) struct PeerCancels {
    pending: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
    turn: tokio::sync::Mutex<()>,
}

/// A cancellation's end, however its task ends (panicked or aborted too): it no longer
/// counts against [`MAX_CANCELS`] nor holds up its device's observes.
struct CancelDone {
    transport: std::sync::Arc<Transport>,
    to: Source,
    queue: std::sync::Arc<PeerCancels>,
}

impl Drop for CancelDone {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.transport.cancels.fetch_sub(1, Ordering::Relaxed);
        let mut all = self
            .transport
            .cancelling
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.queue.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            if all
                .get(&self.to)
                .is_some_and(|q| std::sync::Arc::ptr_eq(q, &self.queue))
            {
                all.remove(&self.to);
            }
            self.queue.done.notify_waiters();
        }
    }
}

/// How long an observe waits at most for the cancellations on their way to its device
/// ([`Transport::after_cancels`]): past it the observe goes (a device that answers no
/// cancellation is not observed the later for it).
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Observations being cancelled on their devices at once, at most
/// ([`Transport::cancel_observation`]): an application that drops thousands of
/// subscriptions at once sends no burst beyond it (the rest learn of it by RST).
pub(crate) const MAX_CANCELS: usize = 256;

/// `req` as a datagram ([`Transport::build`]).
fn encode(
    req: &OutRequest,
    mtype: MessageType,
    message_id: u16,
    token: &[u8],
    extra: &[(CoapOption, &[u8])],
) -> Result<Vec<u8>, ClientError> {
    let size = 24
        + req.payload.len()
        + req.path.len()
        + 2 * req.segments().count()
        + req.query.iter().map(|s| s.len() + 2).sum::<usize>();
    let mut w = message::Writer::new(
        mtype,
        MessageClass::Request(req.method),
        message_id,
        token,
        size,
    );
    if let Some(o) = req.observe {
        w.uint_option(CoapOption::Observe.into(), o);
    }
    for seg in req.segments() {
        w.option(CoapOption::UriPath.into(), seg);
    }
    if let Some(cf) = req.content_format {
        w.uint_option(CoapOption::ContentFormat.into(), cf.into());
    }
    for q in &req.query {
        w.option(CoapOption::UriQuery.into(), q.as_bytes());
    }
    if let Some(a) = req.accept {
        w.uint_option(CoapOption::Accept.into(), a.into());
    }
    for (o, v) in extra {
        w.option((*o).into(), v);
    }
    w.finish(&req.payload, Packet::MAX_SIZE)
        .map_err(|e| ClientError::Encode(e.to_string()))
}

/// A device's answer, with the payload of every block assembled.
#[derive(Debug, Clone, PartialEq)]
pub struct CoapReply {
    pub code: ResponseType,
    pub payload: Vec<u8>,
    pub content_format: Option<u16>,
    /// Max-Age option; CoAP's default when absent is 60 s.
    pub max_age: Option<u32>,
    pub observe: Option<u32>,
    pub token: Vec<u8>,
    /// The Location-Path options joined as a path (`/3303/1`), when there are any.
    pub location: Option<String>,
}

impl CoapReply {
    pub fn from_packet(p: &Packet) -> CoapReply {
        CoapReply {
            payload: p.payload.clone(),
            ..CoapReply::from_packet_without_payload(p)
        }
    }

    /// As [`CoapReply::from_packet`] with an empty payload (for a caller that moves the
    /// packet's payload in).
    fn from_packet_without_payload(p: &Packet) -> CoapReply {
        CoapReply {
            code: match p.header.code {
                MessageClass::Response(r) => r,
                _ => ResponseType::UnKnown,
            },
            payload: Vec::new(),
            content_format: message::uint_option(p, CoapOption::ContentFormat)
                .and_then(|v| u16::try_from(v).ok()),
            max_age: message::uint_option(p, CoapOption::MaxAge),
            observe: message::uint_option(p, CoapOption::Observe),
            token: p.get_token().to_vec(),
            location: location_path(p),
        }
    }
}

/// The Location-Path options of a response as one path with a leading slash (segments
/// that are not UTF-8 are decoded lossily).
fn location_path(p: &Packet) -> Option<String> {
    let segments = p.get_option(CoapOption::LocationPath)?;
    let mut path = String::new();
    for s in segments {
        path.push('/');
        path.push_str(&String::from_utf8_lossy(s));
    }
    Some(path)
}

/// Why a request to a device got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the device did not answer")]
    Timeout,
    #[error("the device rejected the request (RST)")]
    Reset,
    #[error("no socket is bound on {} any more", .0.local)]
    NoSocket(ListenerId),
    #[error("the response is larger than coap.max_body ({0} bytes)")]
    TooLarge(usize),
    #[error("cannot encode the request: {0}")]
    Encode(String),
    #[error("block-wise transfer failed: {0}")]
    Block(String),
    #[error("send failed: {0}")]
    Io(String),
    #[error("the session of that address is no longer the device's (another identity, or none)")]
    OtherSession,
}

/// Before each transmission ([`OutRequest::identity`]): with `want`, the session
/// `session` of `sock` must have proved it, or nothing is sent.
fn same_session(
    sock: &crate::listener::AnyListener,
    session: SocketAddr,
    want: Option<&PeerIdentity>,
) -> Result<(), ClientError> {
    match want {
        Some(want) if sock.identity(session).as_ref() != Some(want) => {
            Err(ClientError::OtherSession)
        }
        _ => Ok(()),
    }
}

/// A Block1/Block2 option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    /// Size exponent: size = 2^(szx+4), 0..=6.
    pub szx: u8,
}

impl Block {
    pub fn size(self) -> usize {
        1 << (self.szx as usize + 4)
    }
    pub fn encode(self) -> Vec<u8> {
        message::encode_uint((self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx))
    }
    pub fn decode(v: u32) -> Option<Block> {
        let szx = (v & 0x7) as u8;
        // szx 7 is reserved (BERT, TCP only).
        (szx < 7).then_some(Block {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx,
        })
    }
    pub fn szx_for(size: usize) -> u8 {
        let size = size.clamp(16, 1024);
        (size.ilog2() - 4) as u8
    }
}

/// Whether a Block2 response of `len` payload bytes is the block that starts at `offset`
/// of the body, and is whole: every block but the last fills its size (RFC 7959 §2.2), so
/// a device cannot stretch a transfer with empty or short blocks, nor shift it.
fn check_block(b: Block, offset: usize, len: usize) -> Result<(), ClientError> {
    let start = (b.num as usize).checked_mul(b.size());
    if start != Some(offset) {
        return Err(ClientError::Block(format!(
            "block {} of {} bytes does not start at byte {offset} of the body",
            b.num,
            b.size()
        )));
    }
    if (b.more && len != b.size()) || len > b.size() {
        return Err(ClientError::Block(format!(
            "block {} carries {len} bytes, not {} ({})",
            b.num,
            b.size(),
            if b.more { "more follow" } else { "the last" }
        )));
    }
    Ok(())
}

fn block_option(p: &Packet, opt: CoapOption) -> Result<Option<Block>, ClientError> {
    // A critical option of a length it may not have is not an absent one (RFC 7252
    // §5.4.3): read as absent, a Block2 of 4 bytes would make block 0 the whole body.
    if p.get_first_option(opt).is_some_and(|v| v.len() > 3) {
        return Err(ClientError::Block(format!(
            "a {opt:?} option longer than 3 bytes"
        )));
    }
    match message::uint_option(p, opt) {
        None => Ok(None),
        Some(v) => Block::decode(v)
            .map(Some)
            .ok_or_else(|| ClientError::Block("reserved block size".into())),
    }
}

/// The retransmission schedule of one confirmable message (RFC 7252 §4.2) as explicit
/// deadlines, no timer of its own: after each transmission the caller [`arms`] it and
/// waits until the deadline it returns; when that passes without an answer, [`expired`]
/// says whether to transmit again (the timeout doubles) or give up.
///
/// [`arms`]: Retransmission::arm
/// [`expired`]: Retransmission::expired
#[derive(Debug, Clone)]
pub struct Retransmission {
    timeout: Duration,
    attempts: u32,
    max_retransmit: u32,
}

impl Retransmission {
    /// `random` in [0, 1) picks the initial timeout between ACK_TIMEOUT and ACK_TIMEOUT ×
    /// ACK_RANDOM_FACTOR.
    pub fn new(cfg: &ClientConfig, random: f64) -> Retransmission {
        let factor = 1.0 + random * (cfg.ack_random_factor - 1.0).max(0.0);
        Retransmission {
            timeout: cfg.ack_timeout.mul_f64(factor),
            attempts: 0,
            max_retransmit: cfg.max_retransmit,
        }
    }

    /// The deadline of a transmission made at `now`.
    pub fn arm(&self, now: std::time::Instant) -> std::time::Instant {
        now + self.timeout
    }

    /// The deadline of the last retransmission's wait, for a transmission made at `now`
    /// (RFC 7252 MAX_TRANSMIT_WAIT with this schedule's initial timeout): how long a
    /// request on a reliable transport, sent once, waits for its response.
    pub fn max_transmit_wait(&self, now: std::time::Instant) -> std::time::Instant {
        let rounds = (1u32 << (self.max_retransmit + 1).min(20)) - 1;
        now + self.timeout * rounds
    }

    /// The deadline passed: true to transmit again, false when MAX_RETRANSMIT
    /// retransmissions went unanswered.
    pub fn expired(&mut self) -> bool {
        self.attempts += 1;
        if self.attempts > self.max_retransmit {
            return false;
        }
        self.timeout *= 2;
        true
    }
}

/// Removes a token route when the exchange (or observation) that owns it ends.
struct TokenGuard<'a> {
    transport: &'a Transport,
    token: Vec<u8>,
}

impl Drop for TokenGuard<'_> {
    fn drop(&mut self) {
        self.transport.lock_client().by_token.remove(&self.token);
    }
}

/// Removes a (source, message id) route when its transmission ends.
struct MidGuard<'a> {
    transport: &'a Transport,
    key: (Source, u16),
}

impl Drop for MidGuard<'_> {
    fn drop(&mut self) {
        self.transport.lock_client().by_mid.remove(&self.key);
    }
}

/// An established observation (RFC 7641): the notifications that carry its token, queued
/// in its own channel until it is handed to an [`ObservationFeed`]
/// ([`ObserveStream::into_feed`]), which is how the daemon takes them. Dropping it forgets
/// the token, so the device's next notification is answered with RST, which cancels the
/// observation on the device.
pub struct ObserveStream {
    rx: mpsc::Receiver<ClientEvent>,
    transport: std::sync::Arc<Transport>,
    token: Vec<u8>,
    queued: std::sync::Arc<Queued>,
    /// Handed to a feed ([`ObserveStream::into_feed`]): the route is the feed's now.
    handed_over: bool,
}

impl ObserveStream {
    pub fn token(&self) -> &[u8] {
        &self.token
    }

    /// Hands the observation to `feed` as observation `id`: its notifications go to the
    /// feed's reader from now on, after `first` (the observe's first response, when the
    /// reader is to publish it too: it is not counted against the bound and holds no ACK)
    /// and after those already queued here, in the order they came. An observation whose
    /// token was forgotten meanwhile stays ended.
    pub fn into_feed(
        mut self,
        id: u64,
        feed: &FeedSender,
        first: Option<CoapReply>,
    ) -> FedObservation {
        let link = std::sync::Arc::new(FeedLink {
            id,
            tx: feed.0.clone(),
            queued: std::sync::Arc::clone(&self.queued),
            transport: std::sync::Arc::downgrade(&self.transport),
        });
        {
            // Under the client lock nothing is routed meanwhile: what the stream's own
            // channel holds goes first.
            let mut client = self.transport.lock_client();
            if let Some(route) = client.by_token.get_mut(&self.token) {
                let first = first.map(|reply| FeedItem {
                    link: std::sync::Arc::clone(&link),
                    message: FeedMessage::First(reply),
                    held: None,
                    from: None,
                });
                // The feed's reader is gone when a send fails: what was not taken is not
                // counted, and a held ACK is not the item's to forget (the stream's drop
                // of its route answers the retransmission with RST).
                let mut open = first.is_none_or(|item| link.tx.send(item).is_ok());
                while let Ok(ev) = self.rx.try_recv() {
                    let ClientEvent::Notification(packet, held) = ev else {
                        continue;
                    };
                    let item = FeedItem {
                        link: std::sync::Arc::clone(&link),
                        message: FeedMessage::Notification(packet),
                        held,
                        from: None,
                    };
                    let refused = if open {
                        link.tx.send(item).err().map(|e| e.0)
                    } else {
                        Some(item)
                    };
                    if let Some(mut item) = refused {
                        open = false;
                        item.held = None;
                        self.queued.release(1);
                    }
                }
                route.tx = RouteTx::Feed(std::sync::Arc::clone(&link));
                self.handed_over = true;
            }
        }
        FedObservation {
            transport: std::sync::Arc::clone(&self.transport),
            token: std::mem::take(&mut self.token),
            live: self.handed_over,
        }
    }

    /// [`FedObservation::cancel`] for an observation not handed to the feed yet: its
    /// route forgotten as dropping it does, and the device told.
    pub fn cancel(mut self) {
        if self.handed_over {
            return;
        }
        let token = std::mem::take(&mut self.token);
        self.transport.cancel_observation(token);
        // The drop below finds no route of an empty token and releases what was queued.
    }
}

impl Drop for ObserveStream {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        self.transport.lock_client().by_token.remove(&self.token);
        // What was queued and never taken no longer counts against the bound; CON ones
        // were never acknowledged, and their retransmissions get RST (the token is gone).
        self.rx.close();
        let mut dedup = None;
        while let Ok(ev) = self.rx.try_recv() {
            if let ClientEvent::Notification(_, held) = ev {
                self.queued.release(1);
                if let Some(h) = held {
                    dedup
                        .get_or_insert_with(|| self.transport.lock_dedup())
                        .forget(h.source(), h.mid);
                }
            }
        }
    }
}

/// An observation whose notifications go to an [`ObservationFeed`] (issue 24: one task
/// takes the notifications of every observation in batches, where each observation had
/// a task of its own). Dropping it forgets the token, as dropping its stream did: the
/// device's next notification is answered with RST.
pub struct FedObservation {
    transport: std::sync::Arc<Transport>,
    token: Vec<u8>,
    /// False when the observation was cancelled before it was handed over.
    live: bool,
}

impl FedObservation {
    pub fn token(&self) -> &[u8] {
        &self.token
    }

    /// Ends the observation on the device too ([`Transport::cancel_observation`]): for an
    /// observation nobody is subscribed to any more, not for one whose device left
    /// (dropping it forgets the token only).
    pub fn cancel(mut self) {
        if self.live {
            self.live = false;
            self.transport
                .cancel_observation(std::mem::take(&mut self.token));
        }
    }
}

impl Drop for FedObservation {
    fn drop(&mut self) {
        if self.live {
            self.transport.lock_client().by_token.remove(&self.token);
        }
    }
}

/// What a fed observation's route holds: the feed, its number there, and what taking or
/// dropping one of its notifications needs.
#[derive(Debug)]
struct FeedLink {
    id: u64,
    tx: mpsc::UnboundedSender<FeedItem>,
    queued: std::sync::Arc<Queued>,
    transport: std::sync::Weak<Transport>,
}

/// The sending side of an [`ObservationFeed`], for [`ObserveStream::into_feed`].
#[derive(Debug, Clone)]
pub struct FeedSender(mpsc::UnboundedSender<FeedItem>);

/// The notifications of every observation handed to it, in the order they came (so each
/// observation's in its own order). Unbounded as a channel: what waits in it counts
/// against `coap.max_queued_notifications` until it is taken ([`ObservationFeed::recv_many`]),
/// and past that bound the transport drops instead of queueing.
#[derive(Debug)]
pub struct ObservationFeed {
    rx: mpsc::UnboundedReceiver<FeedItem>,
}

/// A feed and its sender.
pub fn observation_feed() -> (FeedSender, ObservationFeed) {
    let (tx, rx) = mpsc::unbounded_channel();
    (FeedSender(tx), ObservationFeed { rx })
}

impl ObservationFeed {
    /// Waits for a notification and takes it with those queued behind it, at most
    /// `limit` in all, into `buf`; 0 when every sender is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<FeedItem>, limit: usize) -> usize {
        let before = buf.len();
        let n = self.rx.recv_many(buf, limit).await;
        for item in &buf[before..] {
            if !item.is_first() {
                item.link.queued.release(1);
            }
        }
        n
    }
}

/// One notification from a feed: which observation it is for and the device's message.
/// A CON notification's ACK is held ([`HeldAck`]) until the reader takes it
/// ([`FeedItem::take_ack`]) and sends it once the notification is stored; an item
/// dropped with its ACK still held (its observation ended meanwhile) has the duplicate
/// cache forget it, so the device's retransmission is answered anew (with RST: the token
/// is gone).
#[derive(Debug)]
pub struct FeedItem {
    link: std::sync::Arc<FeedLink>,
    message: FeedMessage,
    held: Option<HeldAck>,
    /// The address a notification came from, when it was routed to the feed directly
    /// (not for the observe's first answer, nor for what waited in its stream).
    from: Option<SocketAddr>,
}

/// What a [`FeedItem`] carries.
#[derive(Debug)]
enum FeedMessage {
    /// A notification, counted against the bound until taken.
    Notification(Packet),
    /// The observe's first response, handed over with the observation
    /// ([`ObserveStream::into_feed`]).
    First(CoapReply),
}

impl FeedItem {
    /// The number the observation was handed over with.
    pub fn observation(&self) -> u64 {
        self.link.id
    }

    /// The address a notification routed to the feed came from.
    pub fn from(&self) -> Option<SocketAddr> {
        self.from
    }

    /// Whether this is the observe's first response rather than a notification.
    pub fn is_first(&self) -> bool {
        matches!(self.message, FeedMessage::First(_))
    }

    /// The device's message as a reply; its payload is moved out (a second call finds
    /// it empty).
    pub fn take_reply(&mut self) -> CoapReply {
        match &mut self.message {
            FeedMessage::Notification(p) => {
                let payload = std::mem::take(&mut p.payload);
                CoapReply {
                    payload,
                    ..CoapReply::from_packet_without_payload(p)
                }
            }
            FeedMessage::First(r) => CoapReply {
                payload: std::mem::take(&mut r.payload),
                ..r.clone()
            },
        }
    }

    /// The notification's held ACK, to send once it is stored.
    pub fn take_ack(&mut self) -> Option<FeedAck> {
        let held = self.held.take()?;
        Some(FeedAck {
            transport: self.link.transport.clone(),
            held: Some(held),
        })
    }
}

impl Drop for FeedItem {
    fn drop(&mut self) {
        if let Some(h) = self.held.take()
            && let Some(t) = self.link.transport.upgrade()
        {
            t.lock_dedup().forget(h.source(), h.mid);
        }
    }
}

/// A CON notification's ACK, held until the notification is stored. Dropped unsent, the
/// duplicate cache forgets the notification (see [`FeedItem`]).
#[derive(Debug)]
pub struct FeedAck {
    transport: std::sync::Weak<Transport>,
    held: Option<HeldAck>,
}

impl FeedAck {
    /// Sends the ACK (and remembers it for the device's retransmissions).
    pub async fn send(mut self) {
        if let Some(h) = self.held.take()
            && let Some(t) = self.transport.upgrade()
        {
            t.send_held_ack(h).await;
        }
    }
}

impl Drop for FeedAck {
    fn drop(&mut self) {
        if let Some(h) = self.held.take()
            && let Some(t) = self.transport.upgrade()
        {
            t.lock_dedup().forget(h.source(), h.mid);
        }
    }
}

impl Transport {
    /// Sends a confirmable request to `peer` through its listener and returns the device's
    /// response, block-wise transfers included.
    pub async fn request(&self, peer: PeerRef, req: &OutRequest) -> Result<CoapReply, ClientError> {
        let cfg = self.client_config().clone();
        let first = if req.payload.len() > cfg.block_size {
            self.send_block1(peer, req, &cfg).await?
        } else {
            let p = self.build(req, MessageType::Confirmable, &[])?;
            self.exchange(peer, p, req.identity.as_ref(), &cfg).await?
        };
        let mut first = first;
        // Block2: fetch the rest of a large response (safe methods only).
        if matches!(req.method, RequestType::Get | RequestType::Fetch)
            && let Some(refusal) = self
                .rest_of_blocks(peer, req, &mut first, &cfg, || true)
                .await?
        {
            return Ok(refusal);
        }
        Ok(CoapReply::from_packet(&first))
    }

    /// Fetches the blocks after the first of a Block2 answer to `req` (a GET: a read, an
    /// observe's first answer, a notification, RFC 7959 §2.4 and §2.6) and appends them
    /// to `first`'s payload; `first` without Block2, or its last block, is left as it is.
    /// `Some` is the device's answer to a follow-up that is not 2.05 (the transfer ends
    /// with it).
    ///
    /// `alive` is asked before each follow-up: false ends the transfer (a notification
    /// whose observation was cancelled meanwhile). The assembled `first` carries no Block2
    /// any more, so it is not assembled twice (a separate first answer of an observe is
    /// assembled on its arrival, then seen again by [`Transport::observe`]).
    pub(crate) async fn rest_of_blocks(
        &self,
        peer: PeerRef,
        req: &OutRequest,
        first: &mut Packet,
        cfg: &ClientConfig,
        alive: impl Fn() -> bool,
    ) -> Result<Option<CoapReply>, ClientError> {
        let mut block = block_option(first, CoapOption::Block2)?;
        if let Some(b) = block {
            check_block(b, 0, first.payload.len())?;
            first.clear_option(CoapOption::Block2);
        }
        let mut etag = first
            .get_option(CoapOption::ETag)
            .and_then(|v| v.front().cloned());
        // Whether the transfer began again at block 0 (below); once at most.
        let mut restarted = false;
        while let Some(b) = block.filter(|b| b.more) {
            if !alive() {
                return Err(ClientError::Block(
                    "the observation ended during the transfer".into(),
                ));
            }
            // The next block at the size the device chose (RFC 7959 §2.4); a device may
            // answer it at a smaller size still, numbered for that size.
            let offset = first.payload.len();
            let next = Block {
                num: u32::try_from(offset / b.size())
                    .map_err(|_| ClientError::TooLarge(cfg.max_body))?,
                more: false,
                szx: b.szx,
            };
            // Without Observe: the rest of a notification is fetched with a plain GET
            // (RFC 7959 §2.6).
            let mut follow = req.clone();
            follow.observe = None;
            let p = self.build(
                &follow,
                MessageType::Confirmable,
                &[(CoapOption::Block2, &next.encode())],
            )?;
            let resp = self.exchange(peer, p, req.identity.as_ref(), cfg).await?;
            let part = CoapReply::from_packet(&resp);
            // A device that serves later blocks only of a transfer it began itself
            // (aiocoap answers 4.08 to block 1 of an observe's answer or notification):
            // the transfer begins again at block 0 of a plain GET, once. The value is then
            // the resource's current one, which may be newer than the first block's.
            if part.code == ResponseType::RequestEntityIncomplete && offset > 0 && !restarted {
                restarted = true;
                first.payload.clear();
                block = Some(Block { num: 0, ..b });
                continue;
            }
            if part.code != ResponseType::Content {
                return Ok(Some(part));
            }
            if offset == 0 {
                // The transfer begun again: its first answer's Content-Format, ETag and
                // Max-Age are the value's, not those of the block it replaces, and its
                // ETag is the reference for the blocks after it.
                etag = resp
                    .get_option(CoapOption::ETag)
                    .and_then(|v| v.front().cloned());
                for opt in [
                    CoapOption::ContentFormat,
                    CoapOption::ETag,
                    CoapOption::MaxAge,
                ] {
                    first.clear_option(opt);
                    if let Some(values) = resp.get_option(opt) {
                        for v in values {
                            first.add_option(opt, v.clone());
                        }
                    }
                }
            }
            let Some(got) = block_option(&resp, CoapOption::Block2)? else {
                if offset == 0 {
                    // Begun again, the value fits one message now: it is whole.
                    first.payload = part.payload;
                    break;
                }
                return Err(ClientError::Block("a block without a Block2 option".into()));
            };
            if got.szx > next.szx {
                return Err(ClientError::Block(format!(
                    "asked for blocks of {} bytes and got one of {}",
                    next.size(),
                    got.size()
                )));
            }
            check_block(got, offset, part.payload.len())?;
            if offset > 0
                && resp.get_option(CoapOption::ETag).and_then(|v| v.front()) != etag.as_ref()
            {
                return Err(ClientError::Block(
                    "the resource changed during the transfer (another ETag)".into(),
                ));
            }
            first.payload.extend_from_slice(&part.payload);
            if first.payload.len() > cfg.max_body {
                return Err(ClientError::TooLarge(cfg.max_body));
            }
            block = Some(got);
        }
        Ok(None)
    }

    async fn send_block1(
        &self,
        peer: PeerRef,
        req: &OutRequest,
        cfg: &ClientConfig,
    ) -> Result<Packet, ClientError> {
        let mut szx = Block::szx_for(cfg.block_size);
        let mut offset = 0usize;
        loop {
            let size = 1usize << (szx as usize + 4);
            let num = (offset / size) as u32;
            let end = (offset + size).min(req.payload.len());
            let more = end < req.payload.len();
            let block = Block { num, more, szx };
            let mut part = req.clone();
            part.payload = req.payload[offset..end].to_vec();
            let total = req.payload.len();
            let (block, size1) = (block.encode(), message::encode_uint(total as u32));
            let extra: &[(CoapOption, &[u8])] = if num == 0 {
                &[(CoapOption::Block1, &block), (CoapOption::Size1, &size1)]
            } else {
                &[(CoapOption::Block1, &block)]
            };
            let p = self.build(&part, MessageType::Confirmable, extra)?;
            let resp = self.exchange(peer, p, req.identity.as_ref(), cfg).await?;
            if !more || resp.header.code != MessageClass::Response(ResponseType::Continue) {
                // The final response, or an error that ends the transfer.
                return Ok(resp);
            }
            offset = end;
            if let Some(b) = block_option(&resp, CoapOption::Block1)?
                && b.szx < szx
            {
                // The device asks for smaller blocks from now on (RFC 7959 §2.5).
                szx = b.szx;
            }
        }
    }

    /// `req` encoded with a fresh message id and a random token, and `extra` options
    /// (numbers above Accept's, in order: Block2, Block1, Size1) after its own. Refused
    /// when the message would exceed [`Packet::MAX_SIZE`] (RFC 7252 §4.6).
    fn build(
        &self,
        req: &OutRequest,
        mtype: MessageType,
        extra: &[(CoapOption, &[u8])],
    ) -> Result<Outgoing, ClientError> {
        self.build_with_token(req, mtype, extra, rand::random())
    }

    /// [`Transport::build`] with the token given (an observation's cancellation).
    fn build_with_token(
        &self,
        req: &OutRequest,
        mtype: MessageType,
        extra: &[(CoapOption, &[u8])],
        token: [u8; 8],
    ) -> Result<Outgoing, ClientError> {
        let message_id = self.next_message_id();
        let bytes = encode(req, mtype, message_id, &token, extra)?;
        Ok(Outgoing {
            bytes,
            message_id,
            token,
        })
    }

    /// Sends a non-confirmable request and forgets it (`noResp=true`).
    pub async fn send_non(&self, peer: PeerRef, req: &OutRequest) -> Result<(), ClientError> {
        let p = self.build(req, MessageType::NonConfirmable, &[])?;
        let (sock, _) = self.sending(&peer.listener)?;
        same_session(sock, peer.session, req.identity.as_ref())?;
        sock.send(peer.session, &p.bytes)
            .await
            .map_err(|e| ClientError::Io(e.to_string()))?;
        Ok(())
    }

    /// Cancels observation `token` (RFC 7641 §3.6): forgets its route, as dropping the
    /// observation does, and sends the device a GET with Observe = 1 (deregister) with the
    /// token and options of the observe that made it, confirmable, retransmitted as any
    /// request, its answer ignored (a task of its own; at most [`MAX_CANCELS`] at once,
    /// beyond which the route is only forgotten). Before, only the route was forgotten,
    /// and the device learnt of it from the RST answering its next notification, which a
    /// resource that never changes never sends: its observer slot stayed taken (an
    /// outside review filled a device's eight slots by subscribing and unsubscribing one
    /// resource; it then refused every observe, which the daemon took as "not
    /// observable").
    ///
    /// Ordered (a review of it): a device's cancellations go one at a time, and an observe
    /// of that device waits for them ([`Transport::after_cancels`], at most
    /// [`CANCEL_WAIT`]), because some clients (Wakaama) remove an observer by its path, not
    /// its token, and a cancellation arriving after a new observe of the path would end
    /// the new one. Not to a queue-mode device (the caller does not cancel those: it
    /// sleeps, and learns of it by RST).
    pub(crate) fn cancel_observation(self: &std::sync::Arc<Self>, token: Vec<u8>) {
        use std::sync::atomic::Ordering;
        let Some(route) = self.lock_client().by_token.remove(&token) else {
            return;
        };
        let (Some(req), Ok(token8), Ok(runtime)) = (
            route.observe,
            <[u8; 8]>::try_from(token.as_slice()).map_err(|_| ()),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let Some(listener) = self.listener_id_at(route.to.via) else {
            return;
        };
        if self.cancels.fetch_add(1, Ordering::Relaxed) >= MAX_CANCELS {
            self.cancels.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let peer = PeerRef {
            listener,
            session: route.to.peer,
        };
        let (identity, to) = (route.identity, route.to);
        // Counted before this returns, so that an observe made next waits for it.
        let queue = {
            let mut all = self.cancelling.lock().unwrap_or_else(|p| p.into_inner());
            let queue = std::sync::Arc::clone(all.entry(to).or_default());
            queue.pending.fetch_add(1, Ordering::SeqCst);
            queue
        };
        let done = CancelDone {
            transport: std::sync::Arc::clone(self),
            to,
            queue,
        };
        runtime.spawn(async move {
            let transport = std::sync::Arc::clone(&done.transport);
            let _turn = done.queue.turn.lock().await;
            let mut r = *req;
            r.observe = Some(1);
            let cfg = transport.client_config().clone();
            let sent = match transport.build_with_token(&r, MessageType::Confirmable, &[], token8) {
                Ok(packet) => transport
                    .exchange_marked(peer, packet, identity.as_ref(), &cfg, true)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::debug!(peer = %peer, path = %r.path, "cancelling an observation: {e}");
            }
            drop(_turn);
            drop(done);
        });
    }

    /// Waits until the cancellations on their way to the device at `to` are done, at most
    /// [`CANCEL_WAIT`] ([`Transport::cancel_observation`]).
    async fn after_cancels(&self, to: Source) {
        use std::sync::atomic::Ordering;
        let queue = {
            let all = self.cancelling.lock().unwrap_or_else(|p| p.into_inner());
            match all.get(&to) {
                Some(q) => std::sync::Arc::clone(q),
                None => return,
            }
        };
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let notified = queue.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if queue.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// One CON exchange: retransmit until ACK/RST, then await a separate response if the
    /// ACK was empty. Returns the response packet.
    async fn exchange(
        &self,
        peer: PeerRef,
        packet: Outgoing,
        identity: Option<&PeerIdentity>,
        cfg: &ClientConfig,
    ) -> Result<Packet, ClientError> {
        self.exchange_marked(peer, packet, identity, cfg, false)
            .await
    }

    /// [`Transport::exchange`], its route marked `cancelling` when it cancels an
    /// observation of the same token ([`Route::cancelling`]).
    async fn exchange_marked(
        &self,
        peer: PeerRef,
        packet: Outgoing,
        identity: Option<&PeerIdentity>,
        cfg: &ClientConfig,
        cancelling: bool,
    ) -> Result<Packet, ClientError> {
        let token = packet.token.to_vec();
        let (tx, mut rx) = mpsc::channel(EXCHANGE_QUEUE);
        let to = self.source_of(&peer)?;
        let mut route = Route::new(tx, to, identity.cloned(), None);
        route.cancelling = cancelling;
        self.lock_client().by_token.insert(token.clone(), route);
        let _route = TokenGuard {
            transport: self,
            token,
        };
        self.transmit(peer, &packet, identity, &mut rx, cfg).await
    }

    /// Registers an observation (GET with Observe=0) and returns the first response and
    /// the stream of later notifications. The caller checks that the response carries an
    /// Observe option (a device that cannot observe answers without one).
    pub async fn observe(
        self: &std::sync::Arc<Self>,
        peer: PeerRef,
        req: &OutRequest,
    ) -> Result<(CoapReply, ObserveStream), ClientError> {
        let cfg = self.client_config().clone();
        let mut r = req.clone();
        r.observe = Some(0);
        let packet = self.build(&r, MessageType::Confirmable, &[])?;
        let token = packet.token.to_vec();
        let to = self.source_of(&peer)?;
        self.after_cancels(to).await;
        let (tx, rx) = mpsc::channel(OBSERVE_QUEUE);
        let queued = {
            let mut client = self.lock_client();
            client.by_token.insert(
                token.clone(),
                Route::new(tx, to, r.identity.clone(), Some(Box::new(r.clone()))),
            );
            std::sync::Arc::clone(&client.queued)
        };
        let mut stream = ObserveStream {
            rx,
            transport: std::sync::Arc::clone(self),
            token,
            queued,
            handed_over: false,
        };
        let mut first = self
            .transmit(peer, &packet, r.identity.as_ref(), &mut stream.rx, &cfg)
            .await?;
        // A first answer in blocks: the rest by GET without Observe (RFC 7959 §2.6).
        // Before, its first block was taken for the whole value. A follow-up the device
        // refuses fails the observe as a transfer error (502), not as a refusal to be
        // observed, which would remove the subscriptions for good.
        if let Some(refusal) = self
            .rest_of_blocks(peer, &r, &mut first, &cfg, || true)
            .await?
        {
            return Err(ClientError::Block(format!(
                "the device answered {:?} to a block of the observed value",
                refusal.code
            )));
        }
        Ok((CoapReply::from_packet(&first), stream))
    }

    /// Sends `packet` (CON) with retransmission and waits for its response on `rx`, the
    /// channel its token routes to. With `identity`, each transmission goes only to a
    /// session that proved it ([`OutRequest::identity`]).
    async fn transmit(
        &self,
        to: PeerRef,
        packet: &Outgoing,
        identity: Option<&PeerIdentity>,
        rx: &mut mpsc::Receiver<ClientEvent>,
        cfg: &ClientConfig,
    ) -> Result<Packet, ClientError> {
        let (sock, via) = self.sending(&to.listener)?;
        let peer = to.session;
        let bytes = &packet.bytes;
        let mid = packet.message_id;
        let key = (Source { via, peer }, mid);
        self.lock_client().by_mid.insert(
            key,
            Waiting {
                token: packet.token.to_vec(),
                identity: identity.cloned(),
            },
        );
        let _mid_route = MidGuard {
            transport: self,
            key,
        };
        let mut schedule = Retransmission::new(cfg, rand::random::<f64>());
        // A reliable listener (TLS) is not retransmitted on: one transmission, answered
        // within the time the retransmissions would have taken (MAX_TRANSMIT_WAIT), or
        // failed at once by the listener when the connection closes.
        let reliable = !to.listener.kind.unreliable();
        loop {
            same_session(sock, peer, identity)?;
            sock.send(peer, bytes)
                .await
                .map_err(|e| ClientError::Io(e.to_string()))?;
            let deadline = if reliable {
                schedule.max_transmit_wait(std::time::Instant::now())
            } else {
                schedule.arm(std::time::Instant::now())
            };
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Err(_) => {
                    if reliable || !schedule.expired() {
                        return Err(ClientError::Timeout);
                    }
                }
                Ok(None) => return Err(ClientError::Timeout),
                Ok(Some(ClientEvent::Reset)) => return Err(ClientError::Reset),
                Ok(Some(ClientEvent::Ack(p))) if p.header.code == MessageClass::Empty => break,
                // A piggybacked response, or a separate one overtaking its empty ACK.
                Ok(Some(ClientEvent::Ack(p) | ClientEvent::Response(p))) => return Ok(p),
                Ok(Some(ClientEvent::Notification(p, held))) => {
                    self.lock_client().queued.release(1);
                    if let Some(h) = held {
                        self.send_held_ack(h).await;
                    }
                    return Ok(p);
                }
            }
        }
        // Empty ACK: the response comes separately.
        let deadline = tokio::time::Instant::now() + cfg.separate_response_timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) | Ok(None) => return Err(ClientError::Timeout),
                Ok(Some(ClientEvent::Response(p))) => return Ok(p),
                Ok(Some(ClientEvent::Notification(p, held))) => {
                    self.lock_client().queued.release(1);
                    if let Some(h) = held {
                        self.send_held_ack(h).await;
                    }
                    return Ok(p);
                }
                Ok(Some(_)) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestHandler;
    use crate::config::CoapConfig;
    use crate::message::{Inbound, Response};
    use crate::metrics::Counters;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use tokio::net::UdpSocket;

    /// A separate response (or a notification) answers a request only from the session
    /// the request went to: not from another port of the address, another listener, or a
    /// session of that address that proved another identity (RFC 7252 §5.3.2). Before, the
    /// token alone routed it.
    #[test]
    fn a_separate_response_from_another_source_or_identity_is_not_the_answer() {
        let mut c = ClientState::new(8);
        let (tx, mut rx) = mpsc::channel(4);
        let to = Source {
            via: 1,
            peer: SocketAddr::from(([127, 0, 0, 1], 40_000)),
        };
        let id = PeerIdentity::Psk("dev-a".into());
        c.by_token
            .insert(vec![1], Route::new(tx, to, Some(id.clone()), None));
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Response(coap_lite::ResponseType::Content);
        p.set_token(vec![1]);
        let other_port = Source {
            peer: SocketAddr::from(([127, 0, 0, 1], 40_001)),
            ..to
        };
        let other_listener = Source { via: 0, ..to };
        let b = || Some(PeerIdentity::Psk("dev-b".into()));
        assert_eq!(
            c.on_response(other_port, p.clone(), None, || Some(id.clone())),
            Routed::Unknown
        );
        assert_eq!(
            c.on_response(other_listener, p.clone(), None, || None),
            Routed::Unknown
        );
        assert_eq!(c.on_response(to, p.clone(), None, b), Routed::Unknown);
        assert!(rx.try_recv().is_err(), "none of them reached the exchange");
        assert_eq!(
            c.on_response(to, p, None, || Some(id.clone())),
            Routed::Delivered
        );
        assert!(matches!(rx.try_recv(), Ok(ClientEvent::Response(_))));
    }

    /// An ACK or RST answers a transmission only from its listener, and for one sent to a
    /// secure session not from a session of another identity.
    #[test]
    fn an_ack_from_another_listener_or_identity_is_not_the_answer() {
        let mut c = ClientState::new(8);
        let (tx, mut rx) = mpsc::channel(4);
        let from = Source {
            via: 1,
            peer: SocketAddr::from(([127, 0, 0, 1], 40_000)),
        };
        let id = PeerIdentity::Psk("dev-a".into());
        c.by_token
            .insert(vec![1], Route::new(tx, from, Some(id.clone()), None));
        c.by_mid.insert(
            (from, 7),
            Waiting {
                token: vec![1],
                identity: Some(id.clone()),
            },
        );
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Empty;
        ack.header.message_id = 7;
        let other = || Some(PeerIdentity::Psk("dev-b".into()));
        assert!(!c.on_ack_or_reset(from, ack.clone(), other));
        let plain = Source { via: 0, ..from };
        assert!(!c.on_ack_or_reset(plain, ack.clone(), || None));
        assert!(rx.try_recv().is_err(), "none of them reached the exchange");
        assert!(c.on_ack_or_reset(from, ack.clone(), || Some(id.clone())));
        assert!(matches!(rx.try_recv(), Ok(ClientEvent::Ack(_))));
        // From its session, closed since (a TLS listener's RSTs for a closed connection).
        assert!(c.on_ack_or_reset(from, ack, || None));
        assert!(matches!(rx.try_recv(), Ok(ClientEvent::Ack(_))));
    }

    struct NotFound;
    impl RequestHandler for NotFound {
        fn handle(
            &self,
            _: Inbound,
        ) -> Pin<Box<dyn Future<Output = crate::message::Handled> + Send>> {
            Box::pin(async { Response::new(ResponseType::NotFound).into() })
        }
    }

    struct Setup {
        transport: Arc<Transport>,
        local: SocketAddr,
        device: UdpSocket,
        peer: SocketAddr,
        _stop: tokio::sync::watch::Sender<bool>,
    }

    async fn setup(cfg: CoapConfig) -> Setup {
        let transport = Transport::bind(&cfg, Arc::new(Counters::default())).unwrap();
        let (trigger, stop) = tokio::sync::watch::channel(false);
        transport.start(Arc::new(NotFound), stop);
        let local = transport.local_addrs()[0];
        let device = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer = device.local_addr().unwrap();
        Setup {
            transport,
            local,
            device,
            peer,
            _stop: trigger,
        }
    }

    fn fast() -> CoapConfig {
        CoapConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            ack_timeout_ms: 40,
            ack_random_factor: 1.0,
            max_retransmit: 2,
            separate_response_timeout_s: 2,
            block_size: 16,
            ..CoapConfig::default()
        }
    }

    async fn recv(dev: &UdpSocket) -> (Packet, SocketAddr) {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(3), dev.recv_from(&mut buf))
            .await
            .expect("device received nothing")
            .unwrap();
        (Packet::from_bytes(&buf[..n]).unwrap(), from)
    }

    /// The transport's request `method path` to the test's device, running on its own.
    fn spawn_request(
        s: &Setup,
        method: RequestType,
        path: &'static str,
    ) -> tokio::task::JoinHandle<Result<CoapReply, ClientError>> {
        let t = Arc::clone(&s.transport);
        let to = PeerRef::udp(s.local, s.peer);
        tokio::spawn(async move { t.request(to, &OutRequest::new(method, path)).await })
    }

    fn reply_to(req: &Packet, mtype: MessageType, code: MessageClass, payload: &[u8]) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(mtype);
        p.header.code = code;
        p.header.message_id = req.header.message_id;
        p.set_token(req.get_token().to_vec());
        p.payload = payload.to_vec();
        p
    }

    async fn send(dev: &UdpSocket, p: &Packet, to: SocketAddr) {
        dev.send_to(&p.to_bytes().unwrap(), to).await.unwrap();
    }

    /// The request as `coap-lite` encodes it: what [`encode`] replaced, and must match.
    fn encoded_by_coap_lite(
        req: &OutRequest,
        mtype: MessageType,
        mid: u16,
        token: &[u8],
        extra: &[(CoapOption, &[u8])],
    ) -> Option<Vec<u8>> {
        let mut p = Packet::new();
        p.header.set_type(mtype);
        p.header.code = MessageClass::Request(req.method);
        p.header.message_id = mid;
        p.set_token(token.to_vec());
        if let Some(o) = req.observe {
            p.add_option(CoapOption::Observe, message::encode_uint(o));
        }
        for seg in req.segments() {
            p.add_option(CoapOption::UriPath, seg.to_vec());
        }
        if let Some(cf) = req.content_format {
            p.add_option(CoapOption::ContentFormat, message::encode_uint(cf.into()));
        }
        for q in &req.query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if let Some(a) = req.accept {
            p.add_option(CoapOption::Accept, message::encode_uint(a.into()));
        }
        for (o, v) in extra {
            p.add_option(*o, v.to_vec());
        }
        p.payload = req.payload.clone();
        p.to_bytes().ok()
    }

    #[test]
    fn requests_are_encoded_byte_for_byte_as_coap_lite_encodes_them() {
        // A small deterministic generator (xorshift), so a failure repeats.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // Lengths at the option encoding's edges (12/13, 268/269) and beyond.
        let lens = [0usize, 1, 3, 12, 13, 14, 200, 268, 269, 270, 300, 1300];
        let methods = [
            RequestType::Get,
            RequestType::Post,
            RequestType::Put,
            RequestType::Delete,
            RequestType::Fetch,
        ];
        let uints = [0u32, 1, 12, 255, 256, 65_535, 65_536, 1 << 24, u32::MAX];
        let (mut same, mut refused) = (0, 0);
        for case in 0..4000 {
            let mut req = OutRequest::new(methods[next(5) as usize], "");
            for _ in 0..next(5) {
                let len = lens[next(lens.len() as u64 - 1) as usize];
                // Empty segments (`//`) are no option.
                req.path.push('/');
                req.path.push_str(&"a".repeat(len));
            }
            for _ in 0..next(3) {
                req.query
                    .push(format!("q={}", "v".repeat(lens[next(9) as usize])));
            }
            let pick = |v: u64| uints[v as usize] as u16;
            req.observe = (next(3) == 0).then(|| uints[next(9) as usize]);
            req.content_format = (next(2) == 0).then(|| pick(next(6)));
            req.accept = (next(2) == 0).then(|| pick(next(6)));
            req.payload = (0..lens[next(lens.len() as u64) as usize])
                .map(|i| i as u8)
                .collect();
            let (b2, b1, size1) = (
                message::encode_uint(uints[next(9) as usize]),
                message::encode_uint(uints[next(6) as usize]),
                message::encode_uint(uints[next(9) as usize]),
            );
            let extra: Vec<(CoapOption, &[u8])> = match next(4) {
                0 => vec![],
                1 => vec![(CoapOption::Block2, &b2)],
                2 => vec![(CoapOption::Block1, &b1)],
                _ => vec![(CoapOption::Block1, &b1), (CoapOption::Size1, &size1)],
            };
            let mtype = if next(2) == 0 {
                MessageType::Confirmable
            } else {
                MessageType::NonConfirmable
            };
            let mid = next(65_536) as u16;
            let token = next(u64::MAX).to_be_bytes();
            let ours = encode(&req, mtype, mid, &token, &extra).ok();
            let theirs = encoded_by_coap_lite(&req, mtype, mid, &token, &extra);
            assert_eq!(ours, theirs, "case {case}: {req:?} {extra:?}");
            if ours.is_some() {
                same += 1;
            } else {
                refused += 1;
            }
        }
        // Both outcomes were exercised, not one alone.
        assert!(
            same > 1000 && refused > 200,
            "{same} encoded, {refused} refused"
        );
        // And what comes out decodes to the request.
        let mut req = OutRequest::new(RequestType::Put, "/3/0/15");
        req.query.push("pmin=10".into());
        req.content_format = Some(11542);
        req.payload = b"tlv".to_vec();
        let bytes = encode(&req, MessageType::Confirmable, 7, &[1, 2], &[]).unwrap();
        let p = message::decode(&bytes).unwrap();
        assert_eq!(p.header.message_id, 7);
        assert_eq!(p.get_token(), &[1, 2]);
        assert_eq!(message::uri_path(&p), ["3", "0", "15"]);
        assert_eq!(message::uri_query(&p), ["pmin=10"]);
        assert_eq!(
            message::uint_option(&p, CoapOption::ContentFormat),
            Some(11542)
        );
        assert_eq!(p.payload, b"tlv");
    }

    /// Option deltas at the encoding's edges (12/13, 268/269 and beyond), which the
    /// options of a request never reach, against `coap-lite`'s encoding.
    #[test]
    fn option_deltas_at_every_edge_are_encoded_as_coap_lite_encodes_them() {
        let numbers: [&[u16]; 6] = [
            &[13],
            &[12, 25],
            &[1, 269],
            &[268, 537],
            &[11, 300, 2000, 2013, 65_000],
            &[0, 14, 282, 551, 65_535],
        ];
        for nums in numbers {
            for len in [0usize, 12, 13, 268, 269, 300] {
                let value = vec![7u8; len];
                let mut w = message::Writer::new(
                    MessageType::Confirmable,
                    MessageClass::Request(RequestType::Get),
                    9,
                    &[1, 2, 3],
                    0,
                );
                let mut p = Packet::new();
                p.header.code = MessageClass::Request(RequestType::Get);
                p.header.message_id = 9;
                p.set_token(vec![1, 2, 3]);
                for n in nums {
                    w.option(*n, &value);
                    p.add_option(CoapOption::from(*n), value.clone());
                }
                let limit = 64_000;
                assert_eq!(
                    w.finish(b"x", limit).ok(),
                    {
                        p.payload = b"x".to_vec();
                        p.to_bytes_with_limit(limit).ok()
                    },
                    "{nums:?} {len}"
                );
            }
        }
    }

    #[test]
    fn a_path_s_empty_segments_are_no_options() {
        let r = OutRequest::new(RequestType::Get, "//a//b/");
        assert_eq!(r.segments().collect::<Vec<_>>(), [b"a", b"b"]);
        assert_eq!(OutRequest::new(RequestType::Get, "/").segments().count(), 0);
        let bytes = encode(&r, MessageType::Confirmable, 1, &[], &[]).unwrap();
        assert_eq!(
            message::uri_path(&message::decode(&bytes).unwrap()),
            ["a", "b"]
        );
    }

    #[test]
    fn options_out_of_order_and_long_tokens_are_refused() {
        let mut w = message::Writer::new(
            MessageType::Confirmable,
            MessageClass::Request(RequestType::Get),
            1,
            &[],
            0,
        );
        w.option(11, b"a").option(6, b"");
        assert!(w.finish(&[], 1280).is_err());
        let w = message::Writer::new(
            MessageType::Confirmable,
            MessageClass::Request(RequestType::Get),
            1,
            &[0; 9],
            0,
        );
        assert!(w.finish(&[], 1280).is_err());
    }

    /// A device that notifies faster than its notifications are taken: the excess is
    /// dropped at the observation's queue bound, nothing is reset, and the observation
    /// goes on delivering afterwards.
    #[tokio::test]
    async fn notifications_beyond_the_queue_bound_are_dropped_not_queued() {
        let s = setup(fast()).await;
        let (stream, token) = observed(&s).await;

        let notify = |seq: u32| {
            let mut n = Packet::new();
            n.header.set_type(MessageType::NonConfirmable);
            n.header.code = MessageClass::Response(ResponseType::Content);
            n.header.message_id = seq as u16;
            n.set_token(token.clone());
            n.add_option(CoapOption::Observe, seq.to_be_bytes()[1..].to_vec());
            n.payload = seq.to_string().into_bytes();
            n
        };
        for seq in 2..(2 + 2 * OBSERVE_QUEUE as u32) {
            send(&s.device, &notify(seq), s.local).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Not handed over yet: the observation's own queue held what it could.
        let (tx, mut feed) = observation_feed();
        let _fed = stream.into_feed(1, &tx, None);
        let got = drain(&mut feed).await;
        assert_eq!(got.len(), OBSERVE_QUEUE, "queued notifications");
        assert_eq!(got[0].1, "2", "the oldest kept");
        assert_eq!(s.transport.lock_client().queued_notifications(), 0);
        // Nothing was reset: the device heard nothing back for its NON notifications.
        silent(&s.device, 100, "the daemon answered a notification (RST?)").await;
        // The observation still delivers.
        send(&s.device, &notify(1000), s.local).await;
        let next = next_item(&mut feed).await;
        assert_eq!(next.1, "1000");
    }

    /// What the feed holds now: (observation, payload) of each item, in order.
    async fn drain(feed: &mut ObservationFeed) -> Vec<(u64, String)> {
        let mut items = Vec::new();
        while let Ok(n) = tokio::time::timeout(
            Duration::from_millis(100),
            feed.recv_many(&mut items, 10_000),
        )
        .await
        {
            if n == 0 {
                break;
            }
        }
        items.iter_mut().map(payload_of).collect()
    }

    /// The feed's next item, waited for up to 2 s.
    async fn next_item(feed: &mut ObservationFeed) -> (u64, String) {
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), feed.recv_many(&mut items, 1))
            .await
            .expect("no notification from the feed");
        payload_of(&mut items[0])
    }

    fn payload_of(i: &mut FeedItem) -> (u64, String) {
        (
            i.observation(),
            String::from_utf8(i.take_reply().payload).unwrap(),
        )
    }

    /// Asserts that the device hears nothing from the daemon within `ms` milliseconds.
    async fn silent(device: &UdpSocket, ms: u64, what: &str) {
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(ms), device.recv_from(&mut buf))
                .await
                .is_err(),
            "{what}"
        );
    }

    /// Observe with `s`'s device answering Observe: 1; the stream and the request's token.
    async fn observed(s: &Setup) -> (ObserveStream, Vec<u8>) {
        let t = Arc::clone(&s.transport);
        let to = PeerRef::udp(s.local, s.peer);
        let task = tokio::spawn(async move {
            let r = OutRequest::new(RequestType::Get, "/3303/0/5700");
            t.observe(to, &r).await
        });
        let (req, _) = recv(&s.device).await;
        let mut ack = reply_to(
            &req,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::Content),
            b"20",
        );
        ack.add_option(CoapOption::Observe, vec![1]);
        send(&s.device, &ack, s.local).await;
        let (_first, stream) = task.await.unwrap().unwrap();
        (stream, req.get_token().to_vec())
    }

    fn notification(token: &[u8], seq: u32) -> Packet {
        let mut n = Packet::new();
        n.header.set_type(MessageType::NonConfirmable);
        n.header.code = MessageClass::Response(ResponseType::Content);
        n.header.message_id = seq as u16;
        n.set_token(token.to_vec());
        n.add_option(CoapOption::Observe, seq.to_be_bytes()[1..].to_vec());
        n.payload = seq.to_string().into_bytes();
        n
    }

    /// Issue 24: `coap.max_queued_notifications` bounds the notifications waiting over all
    /// observations together (the memory bound); each one taken, or dropped with its
    /// stream, makes room again.
    #[tokio::test]
    async fn the_notifications_of_all_observations_share_one_bound() {
        let s = setup(CoapConfig {
            max_queued_notifications: 10,
            ..fast()
        })
        .await;
        let (a, token_a) = observed(&s).await;
        let (b, token_b) = observed(&s).await;
        for seq in 2..8 {
            send(&s.device, &notification(&token_a, seq), s.local).await;
            send(&s.device, &notification(&token_b, seq), s.local).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.transport.lock_client().queued_notifications(), 10);
        let (tx, mut feed) = observation_feed();
        let _fed_a = a.into_feed(1, &tx, None);
        // Handed over, still counted until taken.
        assert_eq!(s.transport.lock_client().queued_notifications(), 10);
        let got: Vec<String> = drain(&mut feed).await.into_iter().map(|(_, p)| p).collect();
        // Sent alternately, six each: the first ten filled the bound (five each), the
        // last of each was dropped.
        assert_eq!(got, ["2", "3", "4", "5", "6"]);
        assert_eq!(s.transport.lock_client().queued_notifications(), 5);
        // Dropping an observation releases what it held.
        drop(b);
        assert_eq!(s.transport.lock_client().queued_notifications(), 0);
        send(&s.device, &notification(&token_a, 100), s.local).await;
        assert_eq!(next_item(&mut feed).await, (1, "100".to_string()));
        assert_eq!(s.transport.lock_client().queued_notifications(), 0);
    }

    /// Issue 24: a CON notification is acknowledged only once its observation says it is
    /// stored; a retransmission meanwhile gets nothing, one after gets the ACK again, and
    /// neither is taken twice. One dropped at a full queue is not acknowledged, and its
    /// retransmission is taken once there is room.
    #[tokio::test]
    async fn con_notifications_are_acknowledged_once_taken_and_stored() {
        let s = setup(CoapConfig {
            max_queued_notifications: 1,
            ..fast()
        })
        .await;
        let (stream, token) = observed(&s).await;
        let (tx, mut feed) = observation_feed();
        let _fed = stream.into_feed(1, &tx, None);
        let con = |seq: u32| {
            let mut n = notification(&token, seq);
            n.header.set_type(MessageType::Confirmable);
            n
        };
        let silent = async |what: &str| silent(&s.device, 200, what).await;
        send(&s.device, &con(500), s.local).await;
        send(&s.device, &con(501), s.local).await;
        silent("a notification was acknowledged before it was taken").await;
        let mut items = Vec::new();
        feed.recv_many(&mut items, 10).await;
        assert_eq!(items.len(), 1, "501 found the bound (1) taken");
        assert_eq!(payload_of(&mut items[0]).1, "500");
        silent("a notification was acknowledged before it was stored").await;
        send(&s.device, &con(500), s.local).await;
        silent("a retransmission was answered before the notification was stored").await;
        items[0].take_ack().expect("a CON's ACK").send().await;
        let (ack, _) = recv(&s.device).await;
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, 500);
        // A retransmission now gets the ACK again and is not taken a second time.
        send(&s.device, &con(500), s.local).await;
        let (again, _) = recv(&s.device).await;
        assert_eq!(again.header.message_id, 500);
        // 501 found the queue full (bound 1): never acknowledged; its retransmission is
        // taken now.
        assert!(
            drain(&mut feed).await.is_empty(),
            "501 was dropped, 500 not taken twice"
        );
        send(&s.device, &con(501), s.local).await;
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), feed.recv_many(&mut items, 10))
            .await
            .expect("the retransmission was not taken");
        assert_eq!(payload_of(&mut items[0]).1, "501");
        items[0].take_ack().expect("a CON's ACK").send().await;
        let (ack, _) = recv(&s.device).await;
        assert_eq!(ack.header.message_id, 501);
    }

    /// An observation handed over with its first response delivers that first, before
    /// what its stream held, without counting it against the bound or holding an ACK.
    #[tokio::test]
    async fn a_first_response_handed_over_comes_before_the_queued_notifications() {
        let s = setup(fast()).await;
        let (stream, token) = observed(&s).await;
        send(&s.device, &notification(&token, 2), s.local).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.transport.lock_client().queued_notifications(), 1);
        let first = CoapReply::from_packet(&notification(&token, 1));
        let (tx, mut feed) = observation_feed();
        let _fed = stream.into_feed(4, &tx, Some(first));
        let mut items = Vec::new();
        feed.recv_many(&mut items, 10).await;
        assert_eq!(items.len(), 2);
        assert!(items[0].is_first() && !items[1].is_first());
        assert!(items[0].take_ack().is_none());
        let got: Vec<(u64, String)> = items.iter_mut().map(payload_of).collect();
        assert_eq!(got, [(4, "1".to_string()), (4, "2".to_string())]);
        assert_eq!(s.transport.lock_client().queued_notifications(), 0);
    }

    /// Issue 24: observations handed to one feed deliver there, each in its order and
    /// after what its stream held already, counted against the shared bound until taken;
    /// a CON one is acknowledged only when its `FeedAck` is sent. An item dropped with
    /// its ACK held (its observation ended) is forgotten by the duplicate cache, and a
    /// dropped `FedObservation` forgets its token (RST).
    #[tokio::test]
    async fn a_feed_takes_the_notifications_of_every_observation_handed_to_it() {
        let s = setup(fast()).await;
        let (a, token_a) = observed(&s).await;
        let (b, token_b) = observed(&s).await;
        // Queued on a's own stream before the hand-over: it comes first.
        send(&s.device, &notification(&token_a, 2), s.local).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (tx, mut feed) = observation_feed();
        let fed_a = a.into_feed(7, &tx, None);
        let fed_b = b.into_feed(9, &tx, None);
        assert_eq!(fed_a.token(), token_a);
        let con = |token: &[u8], seq: u32| {
            let mut n = notification(token, seq);
            n.header.set_type(MessageType::Confirmable);
            n
        };
        send(&s.device, &notification(&token_b, 3), s.local).await;
        send(&s.device, &notification(&token_a, 4), s.local).await;
        send(&s.device, &con(&token_b, 5), s.local).await;
        send(&s.device, &con(&token_a, 6), s.local).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.transport.lock_client().queued_notifications(), 5);
        let mut items = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), feed.recv_many(&mut items, 100))
            .await
            .expect("nothing from the feed");
        assert_eq!(n, 5);
        assert_eq!(s.transport.lock_client().queued_notifications(), 0);
        let got: Vec<(u64, String)> = items.iter_mut().map(payload_of).collect();
        let want = [(7, "2"), (9, "3"), (7, "4"), (9, "5"), (7, "6")];
        assert_eq!(got, want.map(|(i, p)| (i, p.to_string())));
        silent(
            &s.device,
            200,
            "a CON notification was acknowledged before its ACK was sent",
        )
        .await;
        // b's is sent; a's item is dropped with its ACK held (as for an ended observation).
        let ack_b = items[3]
            .take_ack()
            .expect("b's CON notification holds its ACK");
        assert!(
            items[1].take_ack().is_none(),
            "a NON notification has no ACK"
        );
        ack_b.send().await;
        let (ack, _) = recv(&s.device).await;
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, 5);
        drop(items);
        drop(fed_a);
        // a's retransmission is new to the duplicate cache, and its token is gone: RST.
        send(&s.device, &con(&token_a, 6), s.local).await;
        let (rst, _) = recv(&s.device).await;
        assert_eq!(rst.header.get_type(), MessageType::Reset);
        assert_eq!(rst.header.message_id, 6);
        // b goes on.
        send(&s.device, &notification(&token_b, 8), s.local).await;
        let mut items = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), feed.recv_many(&mut items, 100))
            .await
            .expect("b's next notification");
        assert_eq!(payload_of(&mut items[0]), (9, "8".to_string()));
        drop(fed_b);
    }

    #[tokio::test]
    async fn piggybacked_response_after_retransmissions() {
        let s = setup(fast()).await;
        let t = Arc::clone(&s.transport);
        let to = PeerRef::udp(s.local, s.peer);
        let task = tokio::spawn(async move {
            let mut r = OutRequest::new(RequestType::Get, "/3/0/0");
            r.accept = Some(0);
            t.request(to, &r).await
        });
        // Ignore the first two transmissions: the third is the same message.
        let (first, from) = recv(&s.device).await;
        assert_eq!(
            from, s.local,
            "requests leave from the socket the device registered to"
        );
        assert_eq!(first.get_token().len(), 8);
        assert_eq!(message::uri_path(&first), vec!["3", "0", "0"]);
        let (second, _) = recv(&s.device).await;
        let (third, _) = recv(&s.device).await;
        assert_eq!(first, second);
        assert_eq!(first, third);
        let mut ack = reply_to(
            &third,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::Content),
            b"21.5",
        );
        ack.add_option(CoapOption::ContentFormat, vec![]);
        ack.add_option(CoapOption::MaxAge, vec![30]);
        send(&s.device, &ack, s.local).await;
        let reply = task.await.unwrap().unwrap();
        assert_eq!(reply.code, ResponseType::Content);
        assert_eq!(reply.payload, b"21.5");
        assert_eq!(reply.content_format, Some(0));
        assert_eq!(reply.max_age, Some(30));
        assert_eq!(s.transport.open_exchanges(), 0);
    }

    #[tokio::test]
    async fn a_silent_device_times_out_after_max_retransmit() {
        let s = setup(fast()).await;
        let started = tokio::time::Instant::now();
        let r = s
            .transport
            .request(
                PeerRef::udp(s.local, s.peer),
                &OutRequest::new(RequestType::Get, "/1"),
            )
            .await;
        assert_eq!(r, Err(ClientError::Timeout));
        // 1 transmission + 2 retransmissions, timeouts 40 + 80 + 160 ms.
        assert!(started.elapsed() >= Duration::from_millis(280));
        let mut n = 0;
        let mut buf = [0u8; 256];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(50), s.device.recv_from(&mut buf)).await
        {
            n += 1;
        }
        assert_eq!(n, 3);
        assert_eq!(s.transport.open_exchanges(), 0);
    }

    #[tokio::test]
    async fn reset_ends_the_exchange() {
        let s = setup(fast()).await;
        let task = spawn_request(&s, RequestType::Get, "/1");
        let (req, _) = recv(&s.device).await;
        let mut rst = Packet::new();
        rst.header.set_type(MessageType::Reset);
        rst.header.code = MessageClass::Empty;
        rst.header.message_id = req.header.message_id;
        send(&s.device, &rst, s.local).await;
        assert_eq!(task.await.unwrap(), Err(ClientError::Reset));
    }

    #[tokio::test]
    async fn separate_con_response_is_acknowledged_and_delivered() {
        let s = setup(fast()).await;
        let task = spawn_request(&s, RequestType::Post, "/3/0/4");
        let (req, _) = recv(&s.device).await;
        // Empty ACK first, then (after longer than the retransmission timeout) the response.
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Empty;
        ack.header.message_id = req.header.message_id;
        send(&s.device, &ack, s.local).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut resp = reply_to(
            &req,
            MessageType::Confirmable,
            MessageClass::Response(ResponseType::Changed),
            b"",
        );
        resp.header.message_id = 4242;
        send(&s.device, &resp, s.local).await;
        let (their_ack, _) = recv(&s.device).await;
        assert_eq!(their_ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(their_ack.header.message_id, 4242);
        assert_eq!(their_ack.header.code, MessageClass::Empty);
        assert_eq!(task.await.unwrap().unwrap().code, ResponseType::Changed);
        // The device retransmits its CON response (our ACK "lost"): acknowledged again.
        send(&s.device, &resp, s.local).await;
        let (again, _) = recv(&s.device).await;
        assert_eq!(again, their_ack);
        // And nothing else: no retransmission of the request after the empty ACK.
        silent(
            &s.device,
            200,
            "the request was retransmitted after the empty ACK",
        )
        .await;
    }

    /// RFC 7252 §5.3.2: a piggybacked response with another token than the request's is
    /// not its answer; the retransmission's correct answer is.
    #[tokio::test]
    async fn a_piggybacked_response_with_another_token_is_not_the_answer() {
        let s = setup(fast()).await;
        let task = spawn_request(&s, RequestType::Get, "/3/0/0");
        let (req, _) = recv(&s.device).await;
        let mut wrong = reply_to(
            &req,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::Content),
            b"not yours",
        );
        wrong.set_token(b"other".to_vec());
        send(&s.device, &wrong, s.local).await;
        // Not taken as the answer: the request is transmitted again.
        let (again, _) = recv(&s.device).await;
        assert_eq!(again.header.message_id, req.header.message_id);
        let right = reply_to(
            &again,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::Content),
            b"yours",
        );
        send(&s.device, &right, s.local).await;
        assert_eq!(task.await.unwrap().unwrap().payload, b"yours");

        // An error with no token at all answers the request (a client that could not
        // parse it answers so).
        let task = spawn_request(&s, RequestType::Get, "/3/0/0");
        let (req, _) = recv(&s.device).await;
        let mut bad = reply_to(
            &req,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::BadOption),
            b"",
        );
        bad.set_token(Vec::new());
        send(&s.device, &bad, s.local).await;
        assert_eq!(task.await.unwrap().unwrap().code, ResponseType::BadOption);
    }

    #[tokio::test]
    async fn unknown_tokens_are_reset() {
        let s = setup(fast()).await;
        let mut stray = Packet::new();
        stray.header.set_type(MessageType::NonConfirmable);
        stray.header.code = MessageClass::Response(ResponseType::Content);
        stray.header.message_id = 99;
        stray.set_token(vec![1, 2, 3]);
        send(&s.device, &stray, s.local).await;
        let (rst, _) = recv(&s.device).await;
        assert_eq!(
            (rst.header.get_type(), rst.header.message_id),
            (MessageType::Reset, 99)
        );
    }

    #[tokio::test]
    async fn block2_response_is_assembled() {
        let s = setup(fast()).await;
        let task = spawn_request(&s, RequestType::Get, "/5/0/1");
        let body: Vec<u8> = (0..40u8).collect();
        for num in 0..3u32 {
            let (req, _) = recv(&s.device).await;
            if num > 0 {
                let b =
                    Block::decode(message::uint_option(&req, CoapOption::Block2).unwrap()).unwrap();
                assert_eq!((b.num, b.szx), (num, 0));
            }
            let chunk = &body[(num as usize * 16)..((num as usize + 1) * 16).min(40)];
            let mut ack = reply_to(
                &req,
                MessageType::Acknowledgement,
                MessageClass::Response(ResponseType::Content),
                chunk,
            );
            ack.add_option(
                CoapOption::Block2,
                Block {
                    num,
                    more: num < 2,
                    szx: 0,
                }
                .encode(),
            );
            send(&s.device, &ack, s.local).await;
        }
        let reply = task.await.unwrap().unwrap();
        assert_eq!(reply.payload, body);
    }

    /// One answer of a device in [`block2_script`]: its Block2, payload and ETag.
    type BlockAnswer = (Block, Vec<u8>, Option<&'static [u8]>);

    /// Plays a device answering a GET with `script`'s Block2 responses, one per request it
    /// receives; returns the request's outcome and the Block2 each request asked for.
    async fn block2_script(
        script: Vec<BlockAnswer>,
    ) -> (Result<CoapReply, ClientError>, Vec<Option<Block>>) {
        let s = setup(fast()).await;
        let task = spawn_request(&s, RequestType::Get, "/5/0/1");
        let mut asked = Vec::new();
        for (block, payload, etag) in script {
            let (req, _) = recv(&s.device).await;
            asked.push(message::uint_option(&req, CoapOption::Block2).and_then(Block::decode));
            let mut ack = reply_to(
                &req,
                MessageType::Acknowledgement,
                MessageClass::Response(ResponseType::Content),
                &payload,
            );
            ack.add_option(CoapOption::Block2, block.encode());
            if let Some(e) = etag {
                ack.add_option(CoapOption::ETag, e.to_vec());
            }
            send(&s.device, &ack, s.local).await;
        }
        let outcome = task.await.unwrap();
        silent(&s.device, 100, "a block asked for after the transfer ended").await;
        (outcome, asked)
    }

    fn blk(num: u32, more: bool, szx: u8) -> Block {
        Block { num, more, szx }
    }

    /// RFC 7959 §2.4: a device may answer a block at a smaller size than asked, numbered
    /// for that size; the body is assembled at the right offsets.
    #[tokio::test]
    async fn block2_follows_a_smaller_size_the_device_chose() {
        let body: Vec<u8> = (0..53u8).collect();
        let (r, asked) = block2_script(vec![
            (blk(0, true, 1), body[..32].to_vec(), None),
            (blk(2, true, 0), body[32..48].to_vec(), None),
            (blk(3, false, 0), body[48..].to_vec(), None),
        ])
        .await;
        assert_eq!(r.unwrap().payload, body);
        assert_eq!(
            asked,
            vec![None, Some(blk(1, false, 1)), Some(blk(3, false, 0))]
        );
    }

    /// A device that answers with empty (or short) blocks marked "more" cannot keep the
    /// request going: the first such block ends it, as a block-wise error.
    #[tokio::test]
    async fn block2_refuses_empty_and_short_blocks() {
        let (r, asked) = block2_script(vec![(blk(0, true, 0), Vec::new(), None)]).await;
        assert!(matches!(r, Err(ClientError::Block(_))), "{r:?}");
        assert_eq!(asked.len(), 1);
        let (r, asked) = block2_script(vec![
            (blk(0, true, 0), vec![1; 16], None),
            (blk(1, true, 0), vec![2; 10], None),
        ])
        .await;
        assert!(matches!(r, Err(ClientError::Block(_))), "{r:?}");
        assert_eq!(asked.len(), 2);
    }

    /// A block at a larger size than asked, a block from elsewhere in the body, or one of
    /// another version of the resource (ETag) ends the transfer rather than corrupt it.
    #[tokio::test]
    async fn block2_refuses_a_larger_size_a_shifted_block_and_another_etag() {
        let (r, _) = block2_script(vec![
            (blk(0, true, 0), vec![1; 16], None),
            (blk(0, false, 1), vec![2; 20], None),
        ])
        .await;
        assert!(matches!(r, Err(ClientError::Block(_))), "{r:?}");
        // The first response is not block 0.
        let (r, _) = block2_script(vec![(blk(1, true, 0), vec![1; 16], None)]).await;
        assert!(matches!(r, Err(ClientError::Block(_))), "{r:?}");
        // A Block2 option of 4 bytes is an error, not block 0 as the whole body.
        let s = setup(fast()).await;
        let task = spawn_request(&s, RequestType::Get, "/5/0/1");
        let (req, _) = recv(&s.device).await;
        let mut ack = reply_to(
            &req,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::Content),
            &[1; 16],
        );
        ack.add_option(CoapOption::Block2, vec![0, 0, 0, 0x08]);
        send(&s.device, &ack, s.local).await;
        let r = task.await.unwrap();
        assert!(matches!(r, Err(ClientError::Block(_))), "{r:?}");
        let (r, _) = block2_script(vec![
            (blk(0, true, 0), vec![1; 16], Some(b"v1")),
            (blk(1, false, 0), vec![2; 3], Some(b"v2")),
        ])
        .await;
        assert!(matches!(r, Err(ClientError::Block(_))), "{r:?}");
        let (r, _) = block2_script(vec![
            (blk(0, true, 0), vec![1; 16], Some(b"v1")),
            (blk(1, false, 0), vec![2; 3], Some(b"v1")),
        ])
        .await;
        assert_eq!(r.unwrap().payload.len(), 19);
    }

    #[tokio::test]
    async fn block1_request_adapts_to_a_smaller_block_size() {
        let mut cfg = fast();
        cfg.block_size = 32;
        let s = setup(cfg).await;
        let t = Arc::clone(&s.transport);
        let to = PeerRef::udp(s.local, s.peer);
        let payload: Vec<u8> = (0..100u8).collect();
        let sent = payload.clone();
        let task = tokio::spawn(async move {
            let mut r = OutRequest::new(RequestType::Put, "/5/0/0");
            r.payload = sent;
            r.content_format = Some(42);
            t.request(to, &r).await
        });
        let mut got = Vec::new();
        loop {
            let (req, _) = recv(&s.device).await;
            let b = Block::decode(message::uint_option(&req, CoapOption::Block1).unwrap()).unwrap();
            assert_eq!(
                b.num as usize * b.size(),
                got.len(),
                "blocks arrive in order"
            );
            if b.num == 0 {
                assert_eq!(message::uint_option(&req, CoapOption::Size1), Some(100));
            }
            got.extend_from_slice(&req.payload);
            let (code, echo) = if b.more {
                // Ask for 16-byte blocks from now on.
                (
                    ResponseType::Continue,
                    Block {
                        num: b.num,
                        more: true,
                        szx: 0,
                    },
                )
            } else {
                (ResponseType::Changed, b)
            };
            let mut ack = reply_to(
                &req,
                MessageType::Acknowledgement,
                MessageClass::Response(code),
                b"",
            );
            ack.add_option(CoapOption::Block1, echo.encode());
            send(&s.device, &ack, s.local).await;
            if !b.more {
                break;
            }
        }
        assert_eq!(got, payload);
        assert_eq!(task.await.unwrap().unwrap().code, ResponseType::Changed);
    }

    #[test]
    fn retransmission_deadlines_double_until_max_retransmit() {
        let cfg = ClientConfig {
            ack_timeout: Duration::from_millis(2000),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            separate_response_timeout: Duration::from_secs(60),
            block_size: 1024,
            max_body: 1 << 20,
        };
        let t = std::time::Instant::now();
        // The random factor: 0 gives ACK_TIMEOUT, 0.5 half way to × 1.5.
        assert_eq!(
            Retransmission::new(&cfg, 0.0).arm(t) - t,
            Duration::from_millis(2000)
        );
        let mut r = Retransmission::new(&cfg, 0.5);
        let mut waits = vec![r.arm(t) - t];
        while r.expired() {
            waits.push(r.arm(t) - t);
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        // 1 transmission + MAX_RETRANSMIT retransmissions, each timeout doubled.
        assert_eq!(ms, vec![2500, 5000, 10000, 20000, 40000]);
    }

    #[test]
    fn block_values() {
        let b = Block {
            num: 5,
            more: true,
            szx: 6,
        };
        assert_eq!(b.size(), 1024);
        assert_eq!(Block::decode(0x5E), Some(b));
        assert_eq!(b.encode(), vec![0x5E]);
        assert_eq!(Block::decode(0x07), None);
        assert_eq!(Block::szx_for(1024), 6);
        assert_eq!(Block::szx_for(16), 0);
    }
}
