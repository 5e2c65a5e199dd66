//! The notification hub: one ordered, durable queue per access key.
//!
//! Publishing submits each event to the store under the hub lock, which numbers it in its
//! key's sequence (`EventLog::append_events`), queues it with that number and returns once
//! it is durable. Events are typed ([`Event`]); the REST edge renders a long-poll answer's
//! batch, the sink each callback batch. A long-poll is answered with
//! the oldest events, which stay queued and stored as the key's *answer in flight* until
//! the key's next pull acknowledges them (see [`Hub::pull`]); a callback channel has a
//! delivery task that sends the oldest batch to the [`Sink`] and removes it only when the
//! sink accepted (or refused) it, retrying with exponential backoff otherwise. The delivery
//! tasks of different keys run concurrently, at most
//! `notifications.max_concurrent_deliveries` deliveries at once. Events older
//! than `notifications.discard_after_s` (15 minutes by default, as the seed says) are
//! discarded and counted, wherever they wait.
//!
//! On a node of a cluster ([`Hub::load_clustered`], issue 22) each key's channel is served
//! by one node at a time, its owner (a lease, [`super::peers::ChannelPeers::claim`]): the
//! owner's hub does all of the above for the key; the others route the key's events to it
//! and forward its long-polls there, and follow its record (ARCHITECTURE.md, "Multi-node
//! on NATS JetStream", Channels). Without peers every channel is this hub's, as before.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::peers::{ChannelPeers, Claim, PeerError, PollRequest, Polled};
use super::{
    About, ChannelRecord, Delivery, Entry, Event, Render, Sink, StoredEvent, registration_entry,
};
use crate::auth::Principal;
use crate::config::{EVENT_OVERHEAD_BYTES, NotificationsConfig};
use crate::hashing::Map;
use crate::metrics::Counters;
use crate::registry::{RegistryEvent, RegistryListener, now_ms};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};

/// Most characters of a callback URL plus its header values (seed 000).
pub const MAX_CALLBACK_LEN: usize = 400;

/// Cluster: how long a key's owner waits to hear whether a long-poll answer it gave to
/// another node reached that node's client ([`super::peers::ChannelPeers::answered`])
/// before it queues the answer's events again.
pub const REMOTE_ANSWER_WINDOW: Duration = Duration::from_secs(10);

/// Cluster: how often an owner renews its channel leases (which live 6 s in the store),
/// and how often a node looks for callback channels nobody owns.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(2);

/// Cluster: an owner whose renewals have failed this long stops delivering (its lease
/// may have lapsed and another node taken the channel).
const LEASE_STEP_DOWN_AFTER: Duration = Duration::from_secs(4);

/// Cluster: how long a publish keeps trying to reach a key's owner (or to take its
/// lease once it lapsed) before the event is given up, logged and counted as discarded.
pub const FORWARD_BOUND: Duration = Duration::from_secs(15);

/// How often a long-poll forwarded to the key's channel owner reads whether that node
/// still holds the channel's lease ([`Hub::pull_routed`]).
const HOLDER_CHECK: Duration = Duration::from_secs(1);

/// Lets a long-poll forwarded to `node` end on its own when nobody waits for its answer
/// any more (its client went away, or another node holds the channel now): a batch that
/// `node` still answers with is queued again there at once, not after
/// `REMOTE_ANSWER_WINDOW`.
fn requeue_late_batch(
    peers: &Arc<dyn ChannelPeers>,
    node: &str,
    key_id: &str,
    call: tokio::task::JoinHandle<Result<Polled, PeerError>>,
) {
    let (peers, node, key) = (Arc::clone(peers), node.to_string(), key_id.to_string());
    tokio::spawn(async move {
        if let Ok(Ok(Polled::Batch { id, .. })) = call.await {
            peers.answered(&node, &key, id, false).await;
        }
    });
}

/// Who delivers a channel's events (cluster; a hub without peers owns every channel).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Here,
    Node(String),
    /// Not known: the next need asks the peers ([`Hub::route`]).
    Unknown,
}

/// Where a key's channel is served.
enum Route {
    Here,
    Node(String),
}

/// Lets the store's removal of delivered events commit in the background. The delete is
/// queued in order behind every append it covers, but not awaited: waiting for its commit
/// (an fsync) before answering made each long-poll round trip, and each callback batch, as
/// slow as the store's commit cycle under load. It costs nothing in safety: a crash before
/// the commit delivers those events again after the restart (at least once), and never
/// loses one.
fn forget_in_background(key_id: &str, delete: crate::store::Pending<()>) {
    let key = key_id.to_string();
    tokio::spawn(async move {
        if let Err(e) = delete.await {
            tracing::error!(
                key,
                "notifications: delivered events not removed from the store: {e}"
            );
        }
    });
}

/// Which channels an event is queued for.
#[derive(Clone, Copy)]
enum To<'a> {
    Key(&'a str),
    /// Several keys, each once, in one store write.
    Keys(&'a [String]),
    Domain(&'a str),
}

/// Events queued for the nodes that own their keys' channels ([`Hub::publish_batch`]):
/// [`Forwarding::wait`] says whether every owner stored them (false once one was given
/// up, after retries for up to [`FORWARD_BOUND`]). Nothing to forward: true at once.
#[derive(Debug, Default)]
#[must_use = "a forwarding says when the other nodes stored the events"]
pub struct Forwarding {
    answers: Vec<tokio::sync::oneshot::Receiver<bool>>,
    /// The hub was going away: nothing was queued.
    failed: bool,
    /// [`Hub::publish_batch`]: this node's store refused the write, and the events of the
    /// groups marked [`Undo::Unqueue`] were taken out of the queues again.
    failed_here: bool,
    /// [`Hub::publish_batch`]: per group of the batch, whether any of its events went to
    /// another node's channel (and so waits on [`Forwarding::wait`]).
    remote_groups: Vec<bool>,
}

impl Forwarding {
    /// Nothing was forwarded.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty() && !self.failed
    }

    /// Whether this node's store refused the write ([`Hub::publish_batch`]): the events
    /// of the groups marked [`Undo::Unqueue`] are not queued.
    pub fn failed_here(&self) -> bool {
        self.failed_here
    }

    /// [`Hub::publish_batch`]: whether any event of the batch's group `i` went to another
    /// node's channel.
    pub fn went_elsewhere(&self, i: usize) -> bool {
        self.remote_groups.get(i).copied().unwrap_or(false)
    }

    /// Whether every owner stored its events.
    pub async fn wait(self) -> bool {
        let mut all = !self.failed;
        for rx in self.answers {
            all &= rx.await.unwrap_or(false);
        }
        all
    }
}

/// For [`Hub::enqueue`]: which chosen events (by index) to record, and the record of
/// those queued, by key and number (taken out again if their write fails).
type Pushed<'a> = (&'a [bool], &'a mut Vec<(String, u64)>);

/// What becomes of a group's events queued here when their store write fails
/// ([`Hub::publish_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// Kept in memory (delivered while the daemon runs): notifications that will not come
    /// again (NON, over TLS, an observe's first value), an async response (whose stored
    /// request is kept too), a registration event (whose change is stored already).
    Keep,
    /// Taken out again: the notifications of an observation whose CON messages wait for
    /// their ACKs, which are then not sent, so the device sends them again.
    Unqueue,
}

/// Events about one thing and where they go ([`Hub::publish_groups`]).
struct Group<'a> {
    to: To<'a>,
    events: &'a [Event],
    about: About<'a>,
    undo: Undo,
}

/// The notification queues at one moment ([`Hub::queue_stats`]).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Notification channels (one per key that pulled or set a callback).
    pub channels: usize,
    /// Events waiting in every channel (not yet acknowledged, so those below included).
    pub queued: usize,
    /// Events answered to a long-poll and not yet acknowledged by the key's next pull.
    pub unacknowledged: usize,
    /// (key id, queued, unacknowledged) of the channels with the most events waiting.
    pub top: Vec<(String, usize, usize)>,
}

/// The batch a long-poll was answered with, until the key's next pull acknowledges it.
#[derive(Debug)]
struct InFlight {
    /// Which answer this is: a [`Ticket`] or [`Answer`] of an older one no longer matches.
    id: u64,
    /// Its events are the first `len` of the queue: kept there, and in the store, until
    /// acknowledged, so that putting them back is forgetting this record.
    len: usize,
    /// When the answer was handed to its connection; `None` while its pull still answers.
    sent: Option<Instant>,
    /// Cluster: when the answer was handed to another node for its client (put back if
    /// that node does not say it was sent within [`REMOTE_ANSWER_WINDOW`]).
    handed: Option<Instant>,
}

struct Channel {
    rec: ChannelRecord,
    queue: VecDeque<StoredEvent>,
    /// Woken when events arrive or the channel changes.
    wake: Arc<Notify>,
    /// A delivery task is running for this channel.
    pusher: bool,
    /// The long-poll answer not yet acknowledged (at most one per key).
    in_flight: Option<InFlight>,
    /// The id of the next long-poll answer.
    next_answer: u64,
    /// The key's restriction as last submitted to the store, and that write's number:
    /// `rec.allow`, which routing obeys, takes it once the write commits (unless a newer
    /// one was submitted meanwhile). Every record written carries it ([`Channel::record`]).
    allow_written: (u64, Option<Vec<String>>),
    /// Who delivers its events (always `Here` without peers).
    owner: Owner,
    /// Cluster: when this node's lease was last renewed (while `owner` is `Here`).
    renewed: Instant,
    /// Bytes of the queued events, as counted against
    /// `notifications.max_queued_bytes_per_key` ([`Hub::size_of`]).
    bytes: u64,
    /// What this channel lost since it was loaded (or, on a cluster, since this node
    /// took it): [`ChannelInfo`].
    lost: Lost,
    /// The queue is full and dropping its oldest (logged once per such spell).
    dropping: bool,
    /// The last event in, pull, acknowledgement or delivery: the idle clock of
    /// `notifications.idle_channel_removal_s` (starts at the load: a restart resets it).
    active: Instant,
    /// Pulls of the key waiting or answering now (a channel with one is never idle).
    pulling: usize,
    /// The WebSocket attached to the channel on this node (issue 23; at most one).
    socket: Option<Socket>,
}

/// The WebSocket attached to a channel ([`Hub::attach_socket`]), and how to close it.
struct Socket {
    id: u64,
    close: tokio::sync::oneshot::Sender<SocketEnd>,
}

/// Why the hub ends a channel's WebSocket (the REST edge picks the close code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketEnd {
    /// Another socket of the key was opened (Pelion: 1001, going away).
    Replaced,
    /// The WebSocket channel was deleted, or a callback replaced it (1001).
    ChannelRemoved,
    /// The key no longer authenticates ([`Hub::forget_key`]; 1008, policy).
    Revoked,
}

/// How a channel delivers, as its record says ([`Hub::switch_kind`]).
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    LongPoll,
    Callback(super::CallbackTarget),
    Websocket,
}

impl Kind {
    fn of(rec: &ChannelRecord) -> Kind {
        match (&rec.callback, rec.websocket) {
            (Some(t), _) => Kind::Callback(t.clone()),
            (None, true) => Kind::Websocket,
            (None, false) => Kind::LongPoll,
        }
    }

    fn set(&self, rec: &mut ChannelRecord) {
        rec.callback = match self {
            Kind::Callback(t) => Some(t.clone()),
            _ => None,
        };
        rec.websocket = *self == Kind::Websocket;
    }
}

/// What a socket pull may take: the channel is a WebSocket channel
/// ([`Hub::pull_for_socket`]) or a long-poll one ([`Hub::pull`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    LongPoll,
    Socket,
}

/// A WebSocket attached to its key's channel ([`Hub::attach_socket`]); dropping it
/// detaches the socket (the channel stays, and keeps its events for the next socket).
pub struct Attached {
    hub: Weak<Hub>,
    key_id: String,
    id: u64,
    /// Resolves when the hub ends the socket (another socket, the channel removed, the
    /// key revoked).
    pub end: tokio::sync::oneshot::Receiver<SocketEnd>,
    /// The daemon's stop (the socket is closed with 1012, service restart).
    pub stop: Shutdown,
}

impl Attached {
    /// The socket's number on its channel ([`Hub::revoke_socket`]).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("key_id", &self.key_id)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade()
            && let Some(ch) = hub.lock().get_mut(&self.key_id)
            && ch.socket.as_ref().is_some_and(|s| s.id == self.id)
        {
            ch.socket = None;
        }
    }
}

/// `GET /notification/websocket`: Pelion's `WebsocketChannel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebsocketInfo {
    /// Events waiting in the channel's queue (an unacknowledged frame's included).
    pub queue_size: usize,
    /// A socket is attached on this node.
    pub connected: bool,
}

/// Events a channel lost, by cause (in memory: since the channel was loaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    /// Pushed out of a queue at `notifications.max_queued_per_key`.
    pub queue_count: u64,
    /// Pushed out of a queue over `notifications.max_queued_bytes_per_key`.
    pub queue_bytes: u64,
    /// Older than `notifications.discard_after_s` (the event lifetime).
    pub expired: u64,
    /// Refused by the callback receiver.
    pub refused: u64,
}

/// A key's channel as `GET /v2/limits` shows it ([`Hub::channel_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// `long-poll`, `callback` or `websocket`.
    pub kind: &'static str,
    /// On a cluster, whether this node serves the channel: the counts below are the
    /// serving node's, so they are known only there (`None` elsewhere).
    pub here: bool,
    pub queued_events: Option<usize>,
    pub queued_bytes: Option<u64>,
    pub lost: Option<Lost>,
    /// Seconds since the last event in, pull or delivery (served here only).
    pub idle_s: Option<u64>,
}

impl Channel {
    fn new(rec: ChannelRecord) -> Channel {
        Channel::owned_by(rec, Owner::Here)
    }

    fn owned_by(rec: ChannelRecord, owner: Owner) -> Channel {
        Channel {
            owner,
            renewed: Instant::now(),
            allow_written: (0, rec.allow.clone()),
            rec,
            queue: VecDeque::new(),
            wake: Arc::new(Notify::new()),
            pusher: false,
            in_flight: None,
            next_answer: 1,
            bytes: 0,
            lost: Lost::default(),
            dropping: false,
            active: Instant::now(),
            pulling: 0,
            socket: None,
        }
    }

    /// Ends the attached socket, if any, for `why`.
    fn close_socket(&mut self, why: SocketEnd) {
        if let Some(s) = self.socket.take() {
            let _ = s.close.send(why);
        }
    }

    /// The record to store: the restriction last submitted rather than the one in force,
    /// so that a write of another field never puts an older restriction back.
    fn record(&self) -> ChannelRecord {
        ChannelRecord {
            allow: self.allow_written.1.clone(),
            ..self.rec.clone()
        }
    }

    /// Puts the answer in flight back if it was sent more than `window` ago and no pull
    /// acknowledged it; true when it did.
    fn settle_stale(&mut self, now: Instant, window: Duration) -> bool {
        let stale = self
            .in_flight
            .as_ref()
            .is_some_and(|f| match (f.sent, f.handed) {
                (Some(sent), _) => now >= sent + window,
                (None, Some(handed)) => now >= handed + REMOTE_ANSWER_WINDOW,
                (None, None) => false,
            });
        if stale {
            self.in_flight = None;
        }
        stale
    }

    /// Drops events past the discard window; returns how many and the last dropped seq.
    /// Nothing is dropped while an answer is in flight: its events are the oldest, and they
    /// are settled (acknowledged or put back) within `notifications.redeliver_after_s`.
    fn drop_expired(
        &mut self,
        cutoff_ms: u64,
        size: impl Fn(&Event) -> u64,
    ) -> Option<(usize, u64)> {
        if self.in_flight.is_some() {
            return None;
        }
        let mut last = None;
        let mut n = 0;
        while self
            .queue
            .front()
            .is_some_and(|e| e.event.created_ms < cutoff_ms)
        {
            last = self.pop_oldest(&size);
            n += 1;
        }
        self.lost.expired += n as u64;
        last.map(|s| (n, s))
    }

    /// Removes the oldest event, its bytes counted off; answers its number.
    ///
    /// The answer in flight, whose events are the first `len` of the queue, shrinks with
    /// it: the oldest may leave while an answer holds them (a full queue making room, or
    /// a callback delivery that ends after the channel was switched to long-poll or a
    /// WebSocket), and the answer's acknowledgement must then remove only what is left of
    /// it, not as many again from the new front (events never sent).
    fn pop_oldest(&mut self, size: impl Fn(&Event) -> u64) -> Option<u64> {
        let e = self.queue.pop_front()?;
        self.bytes = if self.queue.is_empty() {
            0
        } else {
            self.bytes.saturating_sub(size(&e.event))
        };
        if let Some(f) = self.in_flight.as_mut() {
            f.len = f.len.saturating_sub(1);
            if f.len == 0 {
                self.in_flight = None;
            }
        }
        Some(e.seq)
    }

    /// Removes the oldest events up to and including number `seq`; answers how many.
    fn pop_through(&mut self, seq: u64, size: impl Fn(&Event) -> u64) -> usize {
        let mut n = 0;
        while self.queue.front().is_some_and(|e| e.seq <= seq) {
            self.pop_oldest(&size);
            n += 1;
        }
        if n > 0 {
            self.dropping = false;
        }
        n
    }
}

/// A pull of a key under way ([`Hub::pull_here`]): its channel is not idle meanwhile,
/// and its end is activity too.
struct Pulling<'a> {
    hub: &'a Hub,
    key_id: &'a str,
}

impl<'a> Pulling<'a> {
    fn start(hub: &'a Hub, key_id: &'a str) -> Pulling<'a> {
        if let Some(ch) = hub.lock().get_mut(key_id) {
            ch.pulling += 1;
            ch.active = Instant::now();
        }
        Pulling { hub, key_id }
    }
}

impl Drop for Pulling<'_> {
    fn drop(&mut self) {
        if let Some(ch) = self.hub.lock().get_mut(self.key_id) {
            ch.pulling = ch.pulling.saturating_sub(1);
            ch.active = Instant::now();
        }
    }
}

/// What a long-poll got.
#[derive(Debug)]
pub enum Pulled {
    /// A notification message with at least one event.
    Batch(Batch),
    /// Nothing arrived in time.
    Empty,
    /// The client went away while the poll waited; nothing was taken for it.
    Gone,
    /// The key delivers to a callback URL; long-poll is not available.
    CallbackActive,
    /// The key delivers to a WebSocket channel; long-poll is not available.
    WebsocketActive,
    /// A socket's pull ([`Hub::pull_for_socket`]) found no WebSocket channel (deleted
    /// or replaced meanwhile).
    NoWebsocket,
}

/// A long-poll answer: its events, oldest first (the edge renders the message), and the
/// hold on them.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub ticket: Ticket,
}

/// The hold of a long-poll answer on its batch, until the answer reaches its connection.
/// [`Ticket::sent`] says it did; dropped without that (the client went away first, the
/// handler failed, the answer was a HEAD's), the batch is put back at once.
#[derive(Debug)]
pub struct Ticket {
    hub: Weak<Hub>,
    /// (Boxed strings: a `Reply` holds its ticket, and stays small.)
    key_id: Box<str>,
    id: u64,
    /// Set by [`Ticket::sent`]: the drop then puts nothing back.
    sent: bool,
    /// Cluster: the node whose answer this is (the key's owner), told instead of this hub.
    owner: Option<Box<str>>,
}

impl Ticket {
    /// The answer was handed to its connection: its batch now waits for the key's next
    /// pull (or `notifications.redeliver_after_s`). The [`Answer`] lets the connection put
    /// it back if it fails before then.
    pub fn sent(mut self) -> Answer {
        self.sent = true;
        if let Some(hub) = self.hub.upgrade() {
            match &self.owner {
                Some(owner) => hub.tell_owner(owner, &self.key_id, self.id, true),
                None => hub.mark_sent(&self.key_id, self.id),
            }
        }
        Answer {
            hub: self.hub.clone(),
            key_id: std::mem::take(&mut self.key_id).into(),
            id: self.id,
            owner: self.owner.take().map(Into::into),
        }
    }

    /// Cluster, on the owner: the answer goes to another node for its client. The ticket
    /// puts nothing back; the answer is settled by [`Hub::answer_reached`], or put back
    /// after [`REMOTE_ANSWER_WINDOW`]. Answers the answer's id.
    fn hand_over(mut self) -> u64 {
        self.sent = true;
        if let Some(hub) = self.hub.upgrade()
            && let Some(f) = hub
                .lock()
                .get_mut(&*self.key_id)
                .and_then(|c| c.in_flight.as_mut())
                .filter(|f| f.id == self.id)
        {
            f.handed = Some(Instant::now());
        }
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.sent
            && let Some(hub) = self.hub.upgrade()
        {
            match &self.owner {
                Some(owner) => hub.tell_owner(owner, &self.key_id, self.id, false),
                None => hub.put_back(&self.key_id, self.id, "the answer was not written"),
            }
        }
    }
}

/// A long-poll answer handed to its connection, not yet acknowledged.
#[derive(Debug)]
pub struct Answer {
    hub: Weak<Hub>,
    key_id: String,
    id: u64,
    owner: Option<String>,
}

impl Answer {
    /// The connection failed (reset, write error) after the answer was handed to it: the
    /// client may not have read it, so its events are queued again, unless the key has
    /// pulled again since.
    pub fn put_back(self) {
        if let Some(hub) = self.hub.upgrade() {
            match &self.owner {
                Some(owner) => hub.tell_owner(owner, &self.key_id, self.id, false),
                None => hub.put_back(&self.key_id, self.id, "its connection failed"),
            }
        }
    }
}

/// Why a callback could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The hub.
pub struct Hub {
    /// This hub (for the tasks a claim starts).
    me: Weak<Hub>,
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    cfg: NotificationsConfig,
    counters: Arc<Counters>,
    channels: Mutex<Map<String, Channel>>,
    /// One permit per callback delivery in flight, `notifications.max_concurrent_deliveries`
    /// in all. A key's delivery task holds at most one (it sends one batch at a time), and
    /// only while the sink delivers, not while it backs off, so keys whose receivers hang
    /// hold one permit each and the rest go to the others, first come first served.
    deliveries: Semaphore,
    stop: Shutdown,
    /// Cluster: the other nodes (`None`: this hub owns every channel, the single-node
    /// path, unchanged).
    peers: Option<Arc<dyn ChannelPeers>>,
    /// Cluster: one claim at a time (a key's events are loaded once per claim).
    claiming: tokio::sync::Mutex<()>,
    /// Cluster: the events waiting to go to other nodes' channels, per key
    /// ([`Hub::queue_forwards`]): one sender per key at a time sends all that waits in one
    /// call, so a key's events keep their order and many producers share each round trip.
    outboxes: Mutex<Map<String, Outbox>>,
    /// Cluster: per key, the long-poll answer of its owner (owner, answer id) this node
    /// last handed to its client, not yet repeated in a forwarded poll
    /// ([`PollRequest::sent`]).
    handed_out: Mutex<Map<String, (String, u64)>>,
    /// The id of the next WebSocket attached ([`Hub::attach_socket`]).
    next_socket: std::sync::atomic::AtomicU64,
    /// What sizes an event for `notifications.max_queued_bytes_per_key` (the REST edge's
    /// renderer, [`Hub::set_render`]; without one an event counts its overhead alone).
    render: std::sync::OnceLock<Arc<dyn Render>>,
    /// Cluster: async responses being sent again to their keys' owners
    /// ([`Hub::answer_again`]) and their bytes (as the queues count them), at most
    /// [`MAX_ANSWERS_AGAIN`] and [`MAX_ANSWERS_AGAIN_BYTES`].
    answers_again: Mutex<(usize, u64)>,
}

/// Cluster: most async responses sent again at once ([`Hub::answer_again`]), and most
/// bytes of them; one beyond is given up (logged): its request stays stored, and is asked
/// again after a restart.
const MAX_ANSWERS_AGAIN: usize = 10_000;
const MAX_ANSWERS_AGAIN_BYTES: u64 = 64 << 20;

/// One async response's place among those sent again ([`Hub::answers_again`]), given
/// back when dropped (the retry ended, or its task panicked).
struct AgainHeld {
    hub: Arc<Hub>,
    bytes: u64,
}

impl AgainHeld {
    fn take(hub: &Arc<Hub>, bytes: u64) -> Option<AgainHeld> {
        let mut held = hub.answers_again.lock().unwrap_or_else(|p| p.into_inner());
        if held.0 >= MAX_ANSWERS_AGAIN || held.1.saturating_add(bytes) > MAX_ANSWERS_AGAIN_BYTES {
            return None;
        }
        held.0 += 1;
        held.1 += bytes;
        Some(AgainHeld {
            hub: Arc::clone(hub),
            bytes,
        })
    }
}

impl Drop for AgainHeld {
    fn drop(&mut self) {
        let mut held = self
            .hub
            .answers_again
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        held.0 = held.0.saturating_sub(1);
        held.1 = held.1.saturating_sub(self.bytes);
    }
}

/// Cluster: one key's events waiting to be sent to its owner ([`Hub::queue_forwards`]): each
/// publish's events and where to say whether they were stored.
#[derive(Default)]
struct Outbox {
    waiting: Vec<(Vec<Forwarded>, tokio::sync::oneshot::Sender<bool>)>,
}

/// An event sent to its key's owner, and whether a device will send it again
/// ([`Undo::Unqueue`]). An owner whose write fails takes every forwarded event out of its
/// queue again ([`Hub::append_owned`]), so the mark does not travel; it matters when this
/// node took the channel meanwhile: then only the marked ones go, as for its own events.
type Forwarded = (Event, bool);

/// Cluster: most events sent to a key's owner in one call (a call's body stays far
/// below NATS's payload limit).
const MAX_EVENTS_PER_APPEND: usize = 256;

impl Hub {
    /// Loads channels and undelivered events from the store.
    pub async fn load(
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        cfg: NotificationsConfig,
        counters: Arc<Counters>,
        stop: Shutdown,
    ) -> Result<Arc<Hub>, StoreError> {
        Hub::load_with(store, sink, cfg, counters, stop, None).await
    }

    /// [`Hub::load`] for a node of a cluster: the channels are loaded, owned by nobody
    /// known yet, and no events: a key's undelivered events are loaded by the node that
    /// takes its lease ([`Hub::run_leases`] takes the callback channels nobody owns).
    pub async fn load_clustered(
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        cfg: NotificationsConfig,
        counters: Arc<Counters>,
        stop: Shutdown,
        peers: Arc<dyn ChannelPeers>,
    ) -> Result<Arc<Hub>, StoreError> {
        Hub::load_with(store, sink, cfg, counters, stop, Some(peers)).await
    }

    async fn load_with(
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        cfg: NotificationsConfig,
        counters: Arc<Counters>,
        stop: Shutdown,
        peers: Option<Arc<dyn ChannelPeers>>,
    ) -> Result<Arc<Hub>, StoreError> {
        let owner = if peers.is_some() {
            Owner::Unknown
        } else {
            Owner::Here
        };
        let mut channels: Map<String, Channel> = store
            .load_channels()
            .await?
            .into_iter()
            .map(|r| (r.key_id.clone(), Channel::owned_by(r, owner.clone())))
            .collect();
        if peers.is_none() {
            for e in store.load_events().await? {
                if let Some(ch) = channels.get_mut(&e.key_id) {
                    ch.queue.push_back(e);
                }
            }
        }
        let queued: usize = channels.values().map(|c| c.queue.len()).sum();
        tracing::info!(
            "notifications: {} channels, {queued} undelivered events",
            channels.len()
        );
        let cfg_deliveries = cfg.max_concurrent_deliveries.max(1);
        let hub = Arc::new_cyclic(|me| Hub {
            me: me.clone(),
            store,
            sink,
            cfg,
            counters,
            channels: Mutex::new(channels),
            deliveries: Semaphore::new(cfg_deliveries),
            stop,
            peers,
            claiming: tokio::sync::Mutex::new(()),
            outboxes: Mutex::new(Map::default()),
            handed_out: Mutex::new(Map::default()),
            next_socket: std::sync::atomic::AtomicU64::new(1),
            render: std::sync::OnceLock::new(),
            answers_again: Mutex::new((0, 0)),
        });
        hub.recount();
        let callback_keys: Vec<String> = hub
            .lock()
            .values()
            .filter(|c| c.rec.callback.is_some())
            .map(|c| c.rec.key_id.clone())
            .collect();
        for k in callback_keys {
            hub.ensure_pusher(&k);
        }
        Ok(hub)
    }

    fn lock(&self) -> MutexGuard<'_, Map<String, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sizes events for `notifications.max_queued_bytes_per_key` by `render`'s entries
    /// (the daemon gives the REST edge's, right after the load): the queues loaded are
    /// counted again with it. A second call changes nothing.
    pub fn set_render(&self, render: Arc<dyn Render>) {
        if self.render.set(render).is_ok() {
            self.recount();
        }
    }

    /// What `event` counts against `notifications.max_queued_bytes_per_key`: its entry as
    /// rendered plus [`EVENT_OVERHEAD_BYTES`]. The rendering is kept with the event
    /// (`Event::rendered`), so this is the answer's own text, made once.
    fn size_of(&self, event: &Event) -> u64 {
        let entry = self
            .render
            .get()
            .map_or(0, |r| u64::try_from(r.entry_len(event)).unwrap_or(u64::MAX));
        entry.saturating_add(EVENT_OVERHEAD_BYTES)
    }

    /// How many of the oldest `events` one answer, delivery or frame takes: at most
    /// `max_batch`, and no more bytes than `max_batch_bytes` (sized as the queue bound
    /// sizes them), but at least one.
    ///
    /// Decision (issue 25 review): bounded by bytes as well as by count. A WebSocket frame
    /// of 500 large events (registrations with many resources) was over what clients
    /// take (Python `websockets`: 1 MiB; a browser's limit varies): the client closed the
    /// socket, the batch went back, and the next socket got the same frame again, for
    /// ever. 512 KiB by default, under those limits and far over a typical batch.
    fn batch_len<'a>(&self, events: impl Iterator<Item = &'a Event>) -> usize {
        let mut n = 0usize;
        let mut bytes = 0u64;
        for e in events.take(self.cfg.max_batch) {
            bytes = bytes.saturating_add(self.size_of(e));
            if n > 0 && bytes > self.cfg.max_batch_bytes {
                break;
            }
            n += 1;
        }
        n
    }

    /// Counts every queue's bytes again (after a load, or a new renderer).
    fn recount(&self) {
        let mut map = self.lock();
        let sizes = {
            let events: Vec<&Event> = map
                .values()
                .flat_map(|ch| ch.queue.iter().map(|e| &e.event))
                .collect();
            self.sizes_of(&events)
        };
        // The same order: the map did not change in between.
        let mut sizes = sizes.into_iter();
        for ch in map.values_mut() {
            ch.bytes = sizes.by_ref().take(ch.queue.len()).sum();
        }
    }

    /// [`Hub::size_of`] of each of `events`, on several threads when there are many.
    ///
    /// Decision (issue 24, restart): sizing an event renders it (and keeps the
    /// rendering for its answer), and a key whose queue filled during an outage holds up
    /// to `notifications.max_queued_per_key` of them: 0.13 s on one thread for the
    /// bench's 89 640 registration events of about 1 KB, before the daemon is ready and
    /// with the second core idle. Only at start (after a load, or a renderer's arrival).
    fn sizes_of(&self, events: &[&Event]) -> Vec<u64> {
        const PARALLEL_FROM: usize = 8192;
        let size = |part: &[&Event]| part.iter().map(|e| self.size_of(e)).collect::<Vec<u64>>();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        if events.len() < PARALLEL_FROM || threads < 2 {
            return size(events);
        }
        let mut parts = events.chunks(events.len().div_ceil(threads));
        let Some(first) = parts.next() else {
            return Vec::new();
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = parts
                .map(|part| {
                    let spawned = std::thread::Builder::new()
                        .name("hub-sizes".into())
                        .spawn_scoped(scope, move || size(part));
                    // A thread that cannot start: its part is sized here.
                    spawned.map_err(|_| part)
                })
                .collect();
            let mut out = size(first);
            for other in others {
                match other {
                    Ok(t) => match t.join() {
                        Ok(sizes) => out.extend(sizes),
                        Err(panic) => std::panic::resume_unwind(panic),
                    },
                    Err(part) => out.extend(size(part)),
                }
            }
            out
        })
    }

    /// A channel made here: this hub's own without peers, else owned by whoever the
    /// peers say at its first need.
    fn new_channel(&self, rec: ChannelRecord) -> Channel {
        if self.peers.is_some() {
            Channel::owned_by(rec, Owner::Unknown)
        } else {
            Channel::new(rec)
        }
    }

    fn cutoff(&self) -> u64 {
        now_ms().saturating_sub(self.cfg.discard_after_s * 1000)
    }

    /// Creates the key's channel (long-poll) if it has none; events for the key are kept
    /// from then on. An existing channel takes the principal's restriction
    /// ([`Hub::note_restriction`]).
    pub async fn ensure_channel(&self, p: &Principal) -> Result<(), StoreError> {
        let durable = {
            let mut map = self.lock();
            if !map.contains_key(&p.key_id) {
                let rec = ChannelRecord {
                    key_id: p.key_id.clone(),
                    domain: p.domain.clone(),
                    callback: None,
                    allow: p.allow.clone(),
                    websocket: false,
                };
                map.insert(p.key_id.clone(), self.new_channel(rec.clone()));
                Some(self.store.put_channel(rec))
            } else {
                None
            }
        };
        match durable {
            Some(d) => {
                let r = d.await;
                if r.is_err() {
                    self.drop_unstored(&p.key_id);
                }
                r
            }
            None => self.note_restriction(p).await,
        }
    }

    /// Removes a channel whose creation the store refused, if nothing has happened to it
    /// since (no event queued, no callback): memory holds only what the store holds.
    fn drop_unstored(&self, key_id: &str) {
        let mut map = self.lock();
        if map
            .get(key_id)
            .is_some_and(|c| c.queue.is_empty() && c.rec.callback.is_none() && !c.rec.websocket)
        {
            map.remove(key_id);
        }
    }

    /// Records the restriction of the key's latest verdict (`Principal::allow`) on its
    /// channel, if it has one and the restriction changed (a key edited in its backend):
    /// the newest verdict wins. Called for every authenticated request, so a narrowed key
    /// sees nothing more from its next request on. Durable first; routing obeys it once
    /// the write committed.
    pub async fn note_restriction(&self, p: &Principal) -> Result<(), StoreError> {
        self.restrict(&p.key_id, &p.allow).await
    }

    /// Records `allow` as key `key_id`'s restriction on its channel, if it has one and the
    /// restriction changed: from a request's verdict ([`Hub::note_restriction`]) or from
    /// the backend's answer to the host's sweep of channel keys (`crate::revocation`), so
    /// that a key narrowed in its backend is narrowed here even if it makes no request.
    /// Durable first; routing obeys it once the write committed.
    pub async fn restrict(
        &self,
        key_id: &str,
        allow: &Option<Vec<String>>,
    ) -> Result<(), StoreError> {
        let (n, durable) = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id) else {
                return Ok(());
            };
            if ch.allow_written.1 == *allow {
                return Ok(());
            }
            let n = ch.allow_written.0 + 1;
            ch.allow_written = (n, allow.clone());
            (n, self.store.put_channel(ch.record()))
        };
        let result = durable.await;
        let mut map = self.lock();
        if let Some(ch) = map.get_mut(key_id)
            && ch.allow_written.0 == n
        {
            match &result {
                Ok(()) => {
                    tracing::info!(key = %key_id, ?allow, "the key's restriction changed");
                    ch.rec.allow = allow.clone();
                }
                // Not stored: the next request of the key, or the next sweep, tries again.
                Err(_) => ch.allow_written.1 = ch.rec.allow.clone(),
            }
        }
        result
    }

    /// May the key see endpoint `ep`'s resource `path`, by the restriction recorded on
    /// its channel? For a key without a channel no restriction is known: true (nothing
    /// reaches such a key, and the channel it gets later records its restriction before
    /// anything is routed to it).
    pub fn may_see(&self, key_id: &str, ep: &str, path: &str) -> bool {
        self.lock()
            .get(key_id)
            .is_none_or(|c| crate::auth::may_access(c.rec.allow.as_deref(), ep, Some(path)))
    }

    /// Queues `event` for one key (a notification or a subscription error of a key's
    /// subscription), if its restriction lets it see what the event is `about`.
    pub async fn publish_to_key(&self, key_id: &str, event: Event, about: About<'_>) {
        self.publish(To::Key(key_id), std::slice::from_ref(&event), None, about)
            .await;
    }

    /// Queues `event` for each of `keys` (distinct) whose restriction lets it see what it
    /// is `about`, stored in one write: once one key can pull it, every key can.
    pub async fn publish_to_keys(&self, keys: &[String], event: Event, about: About<'_>) {
        self.publish(To::Keys(keys), std::slice::from_ref(&event), None, about)
            .await;
    }

    /// [`Hub::publish_to_keys`] of several groups of events, each group's events about
    /// the same thing and in their order (the notifications of the observations that
    /// arrived together, issue 24), all in one store write.
    ///
    /// Returns once they are stored here. In a cluster, the events of keys whose channel
    /// another node owns are queued for their owners in order, and the returned
    /// [`Forwarding`] says when those are stored (or given up): the caller waits for it
    /// elsewhere, so that a peer that is slow or gone holds up no other batch.
    ///
    /// Each group says what becomes of its events here if the store refuses the write
    /// ([`Undo`]): a group whose device waits for an ACK is taken out again
    /// ([`Forwarding::failed_here`]), so that the device sends it again; the others stay
    /// queued in memory, as their devices will not send them again.
    pub async fn publish_batch(
        &self,
        batch: &[(&[String], &[Event], About<'_>, Undo)],
    ) -> Forwarding {
        // Every entry is a group, empty ones too (they choose nothing), so that the
        // groups' numbering is the batch's ([`Forwarding::went_elsewhere`]).
        if batch.iter().all(|(_, events, _, _)| events.is_empty()) {
            return Forwarding::default();
        }
        let groups: Vec<Group<'_>> = batch
            .iter()
            .map(|&(keys, events, about, undo)| Group {
                to: To::Keys(keys),
                events,
                about,
                undo,
            })
            .collect();
        self.publish_here(&groups, None).await
    }

    /// Queues the async response `event` for the key that asked (if its restriction, which
    /// may have narrowed since it asked, still lets it see what the response is `about`),
    /// and forgets the stored request (row `request_row`) in the same store transaction.
    ///
    /// In a cluster, an answer its key's channel owner did not store (not reached within
    /// [`FORWARD_BOUND`], or its store refusing) is sent again ([`Hub::answer_again`]):
    /// before, it was given up, and its request (still stored) was answered only after a
    /// restart.
    pub async fn publish_answer(
        &self,
        key_id: &str,
        event: Event,
        request_row: u64,
        about: About<'_>,
    ) {
        let delivered = self
            .publish(
                To::Key(key_id),
                std::slice::from_ref(&event),
                Some(request_row),
                about,
            )
            .await;
        if delivered {
            return;
        }
        let About::Resource(ep, path) = about else {
            return;
        };
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let Some(held) = AgainHeld::take(&me, self.size_of(&event)) else {
            tracing::warn!(key = %key_id, ep = %ep, path = %path, "notifications: an async response its key's channel owner did not store is not sent again: {MAX_ANSWERS_AGAIN} answers or {MAX_ANSWERS_AGAIN_BYTES} bytes are being sent again already; its request stays stored, and is asked again after a restart");
            return;
        };
        let (key, ep, path) = (key_id.to_string(), ep.to_string(), path.to_string());
        tokio::spawn(async move {
            let _held = held;
            me.answer_again(&key, event, request_row, (&ep, &path))
                .await;
        });
    }

    /// Sends the async response `event` again (as [`Hub::publish_answer`]), backing off
    /// from 1 s to 30 s, until it is stored, the event's lifetime
    /// (`notifications.discard_after_s`) has passed, or the daemon stops. Its request
    /// stays stored until then (and is asked again after a restart if it never is).
    async fn answer_again(&self, key_id: &str, event: Event, row: u64, (ep, path): (&str, &str)) {
        let lifetime_ms = self.cfg.discard_after_s.saturating_mul(1000);
        let mut wait = Duration::from_secs(1);
        let mut stop = self.stop.clone();
        let mut tries: u32 = 0;
        loop {
            if now_ms().saturating_sub(event.created_ms) >= lifetime_ms {
                tracing::warn!(key = %key_id, ep = %ep, path = %path, tries, "notifications: an async response its key's channel owner did not store is given up: older than notifications.discard_after_s; its request stays stored, and is asked again after a restart");
                return;
            }
            tokio::select! {
                _ = stop.recv() => return,
                () = tokio::time::sleep(wait) => {}
            }
            tries += 1;
            let event = event.clone();
            let about = About::Resource(ep, path);
            if self
                .publish(
                    To::Key(key_id),
                    std::slice::from_ref(&event),
                    Some(row),
                    about,
                )
                .await
            {
                tracing::info!(key = %key_id, ep = %ep, path = %path, tries, "notifications: an async response its key's channel owner had not stored is delivered now (stored, or its channel gone)");
                return;
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// Whether some channel (this node's or, in a cluster, another node's) belongs to a
    /// key of `domain`: one that [`Hub::publish_to_domain`] may queue an event for.
    pub fn has_channel_in(&self, domain: &str) -> bool {
        self.lock().values().any(|c| c.rec.domain == domain)
    }

    /// Queues `event` for every channel of a domain whose key may see what it is `about`
    /// (registration events).
    pub async fn publish_to_domain(&self, domain: &str, event: Event, about: About<'_>) {
        self.publish(
            To::Domain(domain),
            std::slice::from_ref(&event),
            None,
            about,
        )
        .await;
    }

    /// Routes `event` to the channels `to` names, leaving out those whose key's
    /// restriction does not let it see what the event is `about`; a registration's
    /// resource list is cut to what each restricted key may see (one entry made per
    /// distinct restriction).
    ///
    /// False when an event went to another node's channel and that node did not store it.
    async fn publish(
        &self,
        to: To<'_>,
        events: &[Event],
        answered: Option<u64>,
        about: About<'_>,
    ) -> bool {
        self.publish_groups(
            &[Group {
                to,
                events,
                about,
                undo: Undo::Keep,
            }],
            answered,
        )
        .await
    }

    /// [`Hub::publish`] of several groups in one store write (and one wait for it). False
    /// when an event went to another node's channel and that node did not store it.
    async fn publish_groups(&self, groups: &[Group<'_>], answered: Option<u64>) -> bool {
        let forwarding = self.publish_here(groups, answered).await;
        if forwarding.is_empty() {
            return true;
        }
        let stored = forwarding.wait().await;
        if let Some(row) = answered.filter(|_| stored)
            && let Err(e) = self.store.delete_request(row).await
        {
            crate::store::log_failure(
                format_args!("notifications: answered request not removed"),
                &e,
            );
        }
        stored
    }

    /// [`Hub::publish_groups`] up to the events stored here; those for other nodes' keys
    /// queued for their owners (in order), their answers returned. Each group's `undo`
    /// says what becomes of its events queued here when their store write fails.
    async fn publish_here(&self, groups: &[Group<'_>], answered: Option<u64>) -> Forwarding {
        // Not sized (rendered) here: an event no channel takes is never rendered (see
        // `rest::wire`); one that is queued is rendered once, when it is queued.
        let mut wakes = Vec::new();
        let mut trims = Vec::new();
        let mut remote: Vec<(String, Event, bool)> = Vec::new();
        let mut remote_groups = vec![false; groups.len()];
        let mut pushed: Option<Vec<(String, u64)>> = None;
        let mut failed_here = false;
        // Cluster: the events queued here (with their marks and groups), sent to their
        // keys' owners instead if the store finds this node's lease of a key lapsed.
        let mut kept: Vec<(String, Event, bool, Option<usize>)> = Vec::new();
        let durable = {
            let mut map = self.lock();
            let mut chosen: Vec<(String, Event)> = Vec::new();
            // Per chosen event: its group is [`Undo::Unqueue`] (kept only when a group is:
            // never for an async response, on every read's path).
            let undoing = groups.iter().any(|g| g.undo == Undo::Unqueue);
            let mut marks: Vec<bool> = Vec::new();
            // Per chosen event: the index of its group.
            let mut group_of: Vec<usize> = Vec::new();
            for (
                gi,
                &Group {
                    to,
                    events,
                    about,
                    undo,
                },
            ) in groups.iter().enumerate()
            {
                // A registration's entry cut to a restriction, made once per event and
                // distinct restriction.
                let mut cut: Vec<(usize, Vec<String>, Event)> = Vec::new();
                let mut choose = |ch: &Channel| {
                    if !about.visible_to(ch.rec.allow.as_deref()) {
                        return;
                    }
                    for (i, event) in events.iter().enumerate() {
                        let event = match (about, &ch.rec.allow) {
                            (About::Registration(ep), Some(allow)) => {
                                match cut.iter().find(|(j, a, _)| *j == i && a == allow) {
                                    Some((_, _, e)) => e.clone(),
                                    None => {
                                        let summary = registration_entry(ep, Some(allow));
                                        let entry = match event.entry() {
                                            Entry::RegUpdate(_) => Entry::RegUpdate(summary),
                                            _ => Entry::Registration(summary),
                                        };
                                        let e = Event::new(entry, event.created_ms);
                                        cut.push((i, allow.clone(), e.clone()));
                                        e
                                    }
                                }
                            }
                            _ => event.clone(),
                        };
                        chosen.push((ch.rec.key_id.clone(), event));
                        group_of.push(gi);
                        if undoing {
                            marks.push(undo == Undo::Unqueue);
                        }
                    }
                };
                match to {
                    To::Key(k) => map.get(k).into_iter().for_each(&mut choose),
                    To::Keys(ks) => {
                        for k in ks {
                            map.get(k.as_str()).into_iter().for_each(&mut choose);
                        }
                    }
                    To::Domain(d) => map
                        .values()
                        .filter(|c| c.rec.domain == d)
                        .for_each(&mut choose),
                }
            }
            if self.peers.is_some() {
                // Cluster: only the channels this node owns are queued here; the others'
                // events go to their owners below.
                let (mut here, mut here_marks) = (Vec::new(), Vec::new());
                for (i, (k, e)) in chosen.into_iter().enumerate() {
                    if map.get(k.as_str()).is_some_and(|c| c.owner == Owner::Here) {
                        kept.push((
                            k.clone(),
                            e.clone(),
                            marks.get(i).copied().unwrap_or(false),
                            group_of.get(i).copied(),
                        ));
                        here.push((k, e));
                        if undoing {
                            here_marks.push(marks.get(i).copied().unwrap_or(false));
                        }
                    } else {
                        if let Some(&g) = group_of.get(i) {
                            remote_groups[g] = true;
                        }
                        remote.push((k, e, marks.get(i).copied().unwrap_or(false)));
                    }
                }
                chosen = here;
                marks = here_marks;
            }
            // An answer forwarded to its key's owner is forgotten once the owner stored it.
            let answered_here = answered.filter(|_| remote.is_empty());
            if chosen.is_empty() && answered_here.is_none() {
                None
            } else {
                if marks.contains(&true) {
                    pushed = Some(Vec::new());
                }
                Some(self.enqueue(
                    &mut map,
                    chosen,
                    answered_here,
                    &mut wakes,
                    &mut trims,
                    pushed.as_mut().map(|p| (marks.as_slice(), p)),
                ))
            }
        };
        if let Some(d) = durable
            && let Err(e) = d.await
        {
            crate::store::log_failure(format_args!("notifications: event not stored"), &e);
            if let StoreError::LeaseLost(keys) = &e {
                // The store's fence: this node's lease of these keys lapsed under the
                // write. It steps down from them (their queues leave memory: what was
                // stored before is the new owner's to deliver), and their events go to the
                // owners as other nodes' keys' events do; the other keys' are stored.
                for k in keys {
                    self.step_down(k, Owner::Unknown);
                }
                for (k, e, mark, group) in kept {
                    if keys.contains(&k) {
                        if let Some(g) = group {
                            remote_groups[g] = true;
                        }
                        remote.push((k, e, mark));
                    }
                }
            } else if let Some(pushed) = pushed.take() {
                // Not stored, so not queued: the devices' CON notifications are not
                // acknowledged, and their retransmissions are taken anew.
                self.unqueue(pushed);
                failed_here = true;
            }
        }
        // Before the settling, which may wait: the events of a key this node just stepped
        // down from join the key's outbox ahead of any publish after the step-down.
        let mut forwarding = if remote.is_empty() {
            Forwarding::default()
        } else {
            self.queue_forwards(remote)
        };
        self.settle(trims, wakes).await;
        forwarding.failed_here = failed_here;
        forwarding.remote_groups = remote_groups;
        forwarding
    }

    /// Numbers `chosen` in the store (in submission order: under the hub lock, so in each
    /// queue's order) and queues them with those numbers, forgetting request `answered` in
    /// the same write; the write's durability to await, and the trims and wakes to
    /// [`Hub::settle`] after it.
    fn enqueue(
        &self,
        map: &mut Map<String, Channel>,
        chosen: Vec<(String, Event)>,
        answered: Option<u64>,
        wakes: &mut Vec<Arc<Notify>>,
        trims: &mut Vec<crate::store::Pending<()>>,
        mut pushed: Option<Pushed<'_>>,
    ) -> crate::store::Pending<()> {
        let appended = self.store.append_events(chosen.clone(), answered);
        let size = |e: &Event| self.size_of(e);
        for (i, ((key_id, event), seq)) in chosen.into_iter().zip(appended.seqs).enumerate() {
            let Some(ch) = map.get_mut(key_id.as_str()) else {
                continue;
            };
            if let Some((marks, p)) = pushed.as_mut()
                && marks.get(i) == Some(&true)
            {
                p.push((key_id.clone(), seq));
            }
            Counters::inc(&self.counters.events_published);
            ch.bytes = ch.bytes.saturating_add(size(&event));
            ch.active = Instant::now();
            ch.queue.push_back(StoredEvent { key_id, seq, event });
            // Bounded by count and by bytes: the oldest events make room and are counted
            // as discarded; the newest event stays even if it alone is over the bytes.
            let mut dropped = None;
            loop {
                let over_count = ch.queue.len() > self.cfg.max_queued_per_key;
                let over_bytes = ch.bytes > self.cfg.max_queued_bytes_per_key && ch.queue.len() > 1;
                if !(over_count || over_bytes) {
                    break;
                }
                let Some(old) = ch.pop_oldest(size) else {
                    break;
                };
                // Even out of an answer in flight (`pop_oldest` shrinks it): the queue
                // bound holds.
                if over_count {
                    ch.lost.queue_count += 1;
                } else {
                    ch.lost.queue_bytes += 1;
                }
                Counters::inc(&self.counters.events_discarded);
                Counters::inc(&self.counters.events_dropped_queue_full);
                dropped = Some(old);
            }
            if let Some(old) = dropped {
                if !ch.dropping {
                    // Once per spell: the counters say how many.
                    ch.dropping = true;
                    tracing::warn!(
                        key = %ch.rec.key_id,
                        queued = ch.queue.len(),
                        bytes = ch.bytes,
                        "notifications: the key's queue is full (notifications.max_queued_per_key {}, max_queued_bytes_per_key {}): its oldest events are dropped",
                        self.cfg.max_queued_per_key,
                        self.cfg.max_queued_bytes_per_key
                    );
                }
                trims.push(self.store.delete_events_through(ch.rec.key_id.clone(), old));
            }
            wakes.push(Arc::clone(&ch.wake));
        }
        appended.durable
    }

    /// Takes the events `pushed` (key, number) out of their queues again: their store
    /// write failed. One that a pull took meanwhile leaves its answer in flight too.
    fn unqueue(&self, pushed: Vec<(String, u64)>) {
        let mut map = self.lock();
        for (key_id, seq) in pushed {
            let Some(ch) = map.get_mut(key_id.as_str()) else {
                continue;
            };
            let Some(i) = ch.queue.iter().rposition(|e| e.seq == seq) else {
                continue;
            };
            if let Some(e) = ch.queue.remove(i) {
                ch.bytes = if ch.queue.is_empty() {
                    0
                } else {
                    ch.bytes.saturating_sub(self.size_of(&e.event))
                };
            }
            if let Some(f) = ch.in_flight.as_mut()
                && i < f.len
            {
                f.len -= 1;
                if f.len == 0 {
                    ch.in_flight = None;
                }
            }
        }
    }

    /// After an append is durable: waits for the trims of full queues, wakes the readers.
    async fn settle(&self, trims: Vec<crate::store::Pending<()>>, wakes: Vec<Arc<Notify>>) {
        for t in trims {
            if let Err(e) = t.await {
                crate::store::log_failure(
                    format_args!("notifications: cannot trim a full queue"),
                    &e,
                );
            }
        }
        for w in wakes {
            w.notify_waiters();
        }
    }

    /// Answers a long-poll with the oldest events of a key, waiting up to `wait` for one
    /// to arrive (`None`: answer at once), or until `gone` resolves (the client went away:
    /// nothing is taken for it).
    ///
    /// At least once: the events answered stay queued and stored as the key's answer in
    /// flight. The key's next pull acknowledges it (removes them and counts them
    /// delivered): a long-poll client pulls again only after reading its answer. Put back
    /// instead, to be answered again first: an answer never handed to its connection
    /// ([`Ticket`]), one whose connection failed ([`Answer::put_back`]), and one not
    /// acknowledged within `notifications.redeliver_after_s` of being sent. A key has at
    /// most one answer in flight; a pull that finds one still being answered (a concurrent
    /// pull of the same key) neither acknowledges it nor takes events while it stands: it
    /// waits as if the queue were empty, until that answer was sent (then it acknowledges
    /// it and takes what follows, as a pull arriving then would) or its wait ends.
    pub async fn pull(
        self: &Arc<Self>,
        p: &Principal,
        wait: Option<Duration>,
        gone: impl Future<Output = ()>,
    ) -> Result<Pulled, StoreError> {
        self.pull_via(p, wait, gone, Via::LongPoll).await
    }

    /// [`Hub::pull`] for the key's WebSocket (issue 23): the same queue, answer in
    /// flight and acknowledgement, taken only while the key has a WebSocket channel
    /// ([`Pulled::NoWebsocket`] otherwise), where a long-poll gets
    /// [`Pulled::WebsocketActive`]. The socket's frame is the answer; the pong that
    /// follows it is its [`Ticket::sent`], and the socket's next pull acknowledges it.
    pub async fn pull_for_socket(
        self: &Arc<Self>,
        p: &Principal,
        wait: Option<Duration>,
        gone: impl Future<Output = ()>,
    ) -> Result<Pulled, StoreError> {
        self.pull_via(p, wait, gone, Via::Socket).await
    }

    /// A pull also ends, as empty and without taking events, when the daemon stops: a
    /// held long-poll was answered only when the REST drain gave up on its connection (10
    /// s, and then with no response at all), so a client could not tell a stop from a
    /// network failure, and the stop took the drain's whole time.
    async fn pull_via(
        self: &Arc<Self>,
        p: &Principal,
        wait: Option<Duration>,
        gone: impl Future<Output = ()>,
        via: Via,
    ) -> Result<Pulled, StoreError> {
        self.ensure_channel(p).await?;
        let mut stop = self.stop.clone();
        let gone = async move {
            tokio::select! {
                () = gone => {}
                () = stop.recv() => {}
            }
        };
        let pulled = if self.peers.is_some() {
            self.pull_routed(p, wait, gone, via).await
        } else {
            self.pull_here(&p.key_id, wait, gone, via).await
        };
        match pulled {
            Ok(Pulled::Gone) if self.stop.is_fired() => Ok(Pulled::Empty),
            other => other,
        }
    }

    /// [`Hub::pull`] of a channel this node owns (or, without peers, any channel). A
    /// channel this node stops owning while the poll waits answers it as empty.
    async fn pull_here(
        self: &Arc<Self>,
        key_id: &str,
        wait: Option<Duration>,
        gone: impl Future<Output = ()>,
        via: Via,
    ) -> Result<Pulled, StoreError> {
        let deadline = Instant::now() + wait.unwrap_or_default();
        let _pulling = Pulling::start(self, key_id);
        tokio::pin!(gone);
        loop {
            // At the start, and again whenever the pull is woken: an answer in flight that
            // has been sent since (to another client of the key) is read, so this pull
            // acknowledges it and may take the events after it.
            self.acknowledge(key_id);
            let wake = match self.lock().get(key_id) {
                Some(ch) if ch.rec.callback.is_some() => return Ok(Pulled::CallbackActive),
                Some(ch) if ch.rec.websocket && via == Via::LongPoll => {
                    return Ok(Pulled::WebsocketActive);
                }
                Some(ch) if !ch.rec.websocket && via == Via::Socket => {
                    return Ok(Pulled::NoWebsocket);
                }
                Some(ch) if ch.owner != Owner::Here => return Ok(Pulled::Empty),
                Some(ch) => Arc::clone(&ch.wake),
                None => return Ok(Pulled::Empty),
            };
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(batch) = self.take(key_id) {
                return Ok(Pulled::Batch(batch));
            }
            if wait.is_none() {
                return Ok(Pulled::Empty);
            }
            tokio::select! {
                biased;
                () = &mut gone => return Ok(Pulled::Gone),
                r = tokio::time::timeout_at(deadline, notified) => {
                    if r.is_err() {
                        return Ok(Pulled::Empty);
                    }
                }
            }
        }
    }

    /// A pull arrived: the key's answer in flight, if it was sent, has been read. One sent
    /// longer than `notifications.redeliver_after_s` ago is put back instead.
    fn acknowledge(&self, key_id: &str) {
        let window = Duration::from_secs(self.cfg.redeliver_after_s);
        let durable = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id) else {
                return;
            };
            if ch.settle_stale(Instant::now(), window) {
                self.count_put_back(key_id, "it was not acknowledged in time");
                ch.wake.notify_waiters();
                return;
            }
            let Some(f) = ch.in_flight.take_if(|f| f.sent.is_some()) else {
                return;
            };
            let n = f.len.min(ch.queue.len());
            let Some(last) = n
                .checked_sub(1)
                .and_then(|i| ch.queue.get(i))
                .map(|e| e.seq)
            else {
                return;
            };
            ch.pop_through(last, |e| self.size_of(e));
            ch.active = Instant::now();
            for _ in 0..n {
                Counters::inc(&self.counters.events_delivered);
            }
            self.store.delete_events_through(key_id.to_string(), last)
        };
        forget_in_background(key_id, durable);
    }

    /// Makes up to `max_batch` of the oldest events the key's answer in flight and returns
    /// them as a message; `None` when there are none, or an answer is in flight already.
    fn take(self: &Arc<Self>, key_id: &str) -> Option<Batch> {
        let cutoff = self.cutoff();
        let window = Duration::from_secs(self.cfg.redeliver_after_s);
        let (batch, durable) = {
            let mut map = self.lock();
            let ch = map.get_mut(key_id)?;
            if ch.settle_stale(Instant::now(), window) {
                self.count_put_back(key_id, "it was not acknowledged in time");
            }
            if ch.in_flight.is_some() {
                return None;
            }
            let expired = ch.drop_expired(cutoff, |e| self.size_of(e));
            if let Some((n, _)) = expired {
                self.count_discarded(key_id, n);
            }
            let durable =
                expired.map(|(_, s)| self.store.delete_events_through(key_id.to_string(), s));
            let n = self.batch_len(ch.queue.iter().map(|e| &e.event));
            let batch = (n > 0).then(|| {
                let id = ch.next_answer;
                ch.next_answer += 1;
                ch.in_flight = Some(InFlight {
                    id,
                    len: n,
                    sent: None,
                    handed: None,
                });
                Batch {
                    events: ch.queue.iter().take(n).map(|e| e.event.clone()).collect(),
                    ticket: Ticket {
                        hub: Arc::downgrade(self),
                        key_id: key_id.into(),
                        id,
                        sent: false,
                        owner: None,
                    },
                }
            });
            (batch, durable)
        };
        if let Some(d) = durable {
            forget_in_background(key_id, d);
        }
        batch
    }

    /// The answer `id` reached its connection.
    ///
    /// Wakes the key's waiting pulls: a concurrent pull that found this answer in flight
    /// (another client of the key, or a pull forwarded from another node) acknowledges it
    /// now and takes what follows, as a pull arriving now would, instead of waiting out
    /// its whole long-poll (two pollers of one key used to take turns only at their
    /// deadlines: the cluster bench saw no notification delivered in its window).
    fn mark_sent(&self, key_id: &str, id: u64) {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(key_id) else {
            return;
        };
        if let Some(f) = ch.in_flight.as_mut().filter(|f| f.id == id) {
            f.sent = Some(Instant::now());
            ch.active = Instant::now();
            ch.wake.notify_waiters();
        }
    }

    /// Queues the events of answer `id` again (first, in order), if it is still in flight.
    fn put_back(&self, key_id: &str, id: u64, why: &str) {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(key_id) else {
            return;
        };
        if ch.in_flight.take_if(|f| f.id == id).is_some() {
            self.count_put_back(key_id, why);
            ch.wake.notify_waiters();
        }
    }

    fn count_put_back(&self, key_id: &str, why: &str) {
        Counters::inc(&self.counters.long_poll_redeliveries);
        // Per client failure, so not above debug (the counter is the signal).
        tracing::debug!(key = key_id, "long-poll answer queued again: {why}");
    }

    fn count_discarded(&self, key_id: &str, n: usize) {
        for _ in 0..n {
            Counters::inc(&self.counters.events_discarded);
        }
        tracing::warn!(
            key = key_id,
            "discarded {n} notification events older than {} s",
            self.cfg.discard_after_s
        );
    }

    /// `PUT /notification/callback`: checks length, verifies the URL with a PUT, then
    /// switches the key's channel to push.
    pub async fn set_callback(
        self: &Arc<Self>,
        p: &Principal,
        target: super::CallbackTarget,
    ) -> Result<(), CallbackError> {
        let len = target.url.chars().count()
            + target
                .headers
                .values()
                .map(|v| v.chars().count())
                .sum::<usize>();
        if len > MAX_CALLBACK_LEN {
            return Err(CallbackError::Invalid(format!(
                "the URL and header values are {len} characters; at most {MAX_CALLBACK_LEN} are allowed"
            )));
        }
        self.sink
            .verify(&target)
            .await
            .map_err(CallbackError::Unreachable)?;
        self.switch_kind(p, Kind::Callback(target)).await?;
        self.ensure_pusher(&p.key_id);
        if self.peers.is_some() {
            // Cluster: the owner (which follows the record) delivers; a channel nobody
            // owns is taken here.
            if let Err(e) = self.route(&p.key_id).await {
                tracing::warn!(key = %p.key_id, "notifications: the channel's owner is not known yet: {e}");
            }
        }
        tracing::info!(key = %p.key_id, "notification callback registered");
        Ok(())
    }

    pub fn callback(&self, key_id: &str) -> Option<super::CallbackTarget> {
        self.lock().get(key_id).and_then(|c| c.rec.callback.clone())
    }

    /// `DELETE /notification/callback`: back to long-poll. False when there was none.
    pub async fn delete_callback(self: &Arc<Self>, key_id: &str) -> Result<bool, StoreError> {
        let durable = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id).filter(|c| c.rec.callback.is_some()) else {
                return Ok(false);
            };
            let before = ch.rec.callback.take();
            ch.wake.notify_waiters();
            (before, self.store.put_channel(ch.record()))
        };
        let (before, durable) = durable;
        if let Err(e) = durable.await {
            // Still stored, so still the key's callback (its pusher may have stopped:
            // it starts again).
            let restored = {
                let mut map = self.lock();
                match map.get_mut(key_id) {
                    Some(ch) if ch.rec.callback.is_none() => {
                        ch.rec.callback = before;
                        true
                    }
                    _ => false,
                }
            };
            if restored {
                self.ensure_pusher(key_id);
            }
            return Err(e);
        }
        tracing::info!(key = key_id, "notification callback removed");
        Ok(true)
    }

    /// `PUT /notification/websocket` (issue 23): makes the key's channel a WebSocket
    /// channel, created if the key had none. True when it was not one before (201), false
    /// when it was already (200, nothing changed). A callback it had is replaced (its
    /// delivery task stops; decision, as a callback replaces long-poll), and a long-poll
    /// answer in flight is put back: the socket delivers from the oldest event on.
    pub async fn register_websocket(&self, p: &Principal) -> Result<bool, StoreError> {
        let changed = self.switch_kind(p, Kind::Websocket).await?;
        if changed {
            tracing::info!(key = %p.key_id, "notification WebSocket channel registered");
        }
        Ok(changed)
    }

    /// Makes `p`'s channel (created if the key has none) deliver by `kind` and stores it:
    /// a callback or a WebSocket channel replaces whatever the key had (decision, issue
    /// 23: the two replace each other, as a callback replaces long-poll); a socket
    /// attached to a channel that stops being a WebSocket one is closed
    /// ([`SocketEnd::ChannelRemoved`]), and an answer in flight is put back, so the new
    /// kind delivers from the oldest event on (at least once). False, and nothing stored,
    /// when the channel was a WebSocket channel already (a callback is stored again even if
    /// it is the same). If the store refuses, memory goes back to what is stored (the
    /// previous kind; no channel if it was created here and nothing was queued since),
    /// unless a later change replaced this one meanwhile.
    async fn switch_kind(&self, p: &Principal, kind: Kind) -> Result<bool, StoreError> {
        let (created, before, durable) = {
            let mut map = self.lock();
            let created = !map.contains_key(&p.key_id);
            let new = self.new_channel(ChannelRecord {
                key_id: p.key_id.clone(),
                domain: p.domain.clone(),
                callback: None,
                allow: p.allow.clone(),
                websocket: false,
            });
            let ch = map.entry(p.key_id.clone()).or_insert(new);
            let before = Kind::of(&ch.rec);
            if before == Kind::Websocket && kind == Kind::Websocket {
                return Ok(false);
            }
            kind.set(&mut ch.rec);
            if kind != Kind::Websocket {
                ch.close_socket(SocketEnd::ChannelRemoved);
            }
            ch.in_flight = None;
            ch.wake.notify_waiters();
            (created, before, self.store.put_channel(ch.record()))
        };
        if let Err(e) = durable.await {
            let mut map = self.lock();
            if let Some(ch) = map.get_mut(&p.key_id)
                && Kind::of(&ch.rec) == kind
            {
                before.set(&mut ch.rec);
                if before != Kind::Websocket {
                    ch.close_socket(SocketEnd::ChannelRemoved);
                }
                ch.wake.notify_waiters();
                if created && ch.queue.is_empty() && before == Kind::LongPoll {
                    map.remove(&p.key_id);
                }
            }
            drop(map);
            if matches!(before, Kind::Callback(_))
                && let Some(me) = self.me.upgrade()
            {
                // Its pusher may have stopped: it starts again.
                me.ensure_pusher(&p.key_id);
            }
            return Err(e);
        }
        Ok(true)
    }

    /// `GET /notification/websocket`: the key's WebSocket channel, if it has one.
    pub fn websocket(&self, key_id: &str) -> Option<WebsocketInfo> {
        self.lock()
            .get(key_id)
            .filter(|c| c.rec.websocket)
            .map(|c| WebsocketInfo {
                queue_size: c.queue.len(),
                connected: c.socket.is_some(),
            })
    }

    /// `DELETE /notification/websocket`: back to long-poll (the queued events stay, as
    /// when a callback is deleted); its socket is closed. False when there was none.
    pub async fn delete_websocket(&self, key_id: &str) -> Result<bool, StoreError> {
        let durable = {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id).filter(|c| c.rec.websocket) else {
                return Ok(false);
            };
            ch.rec.websocket = false;
            ch.close_socket(SocketEnd::ChannelRemoved);
            ch.in_flight = None;
            ch.wake.notify_waiters();
            self.store.put_channel(ch.record())
        };
        if let Err(e) = durable.await {
            // Still stored, so still the key's WebSocket channel (the socket reconnects).
            if let Some(ch) = self.lock().get_mut(key_id)
                && ch.rec.callback.is_none()
            {
                ch.rec.websocket = true;
            }
            return Err(e);
        }
        tracing::info!(key = key_id, "notification WebSocket channel removed");
        Ok(true)
    }

    /// Attaches a WebSocket to the key's WebSocket channel (`None`: the key has none).
    /// A socket attached before on this node is ended ([`SocketEnd::Replaced`]): one
    /// socket per channel.
    pub fn attach_socket(self: &Arc<Self>, key_id: &str) -> Option<Attached> {
        let id = self
            .next_socket
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (close, end) = tokio::sync::oneshot::channel();
        let mut map = self.lock();
        let ch = map.get_mut(key_id).filter(|c| c.rec.websocket)?;
        ch.close_socket(SocketEnd::Replaced);
        ch.socket = Some(Socket { id, close });
        Some(Attached {
            hub: Arc::downgrade(self),
            key_id: key_id.to_string(),
            id,
            end,
            stop: self.stop.clone(),
        })
    }

    /// Ends socket `id` of the key, if it is still attached, as revoked (1008): the
    /// credentials it was opened with no longer authenticate as the key, although the
    /// key's channel lives on (a `headerkeys` pair changed).
    pub fn revoke_socket(&self, key_id: &str, id: u64) {
        if let Some(ch) = self.lock().get_mut(key_id)
            && ch.socket.as_ref().is_some_and(|s| s.id == id)
        {
            ch.close_socket(SocketEnd::Revoked);
        }
    }

    /// WebSockets attached now (the `websockets_connected` gauge).
    pub fn websockets(&self) -> usize {
        self.lock().values().filter(|c| c.socket.is_some()).count()
    }

    /// The keys that have a channel (for the sweep of revoked keys, `crate::revocation`).
    pub fn key_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Drops a key's channel because the key no longer authenticates: its queued events
    /// are deleted and nothing more is queued or pushed to its callback (the pusher stops
    /// when it finds no channel). The stored record is kept without its callback, so that
    /// a restart pushes nothing to it either (the sweep at start drops it again). False
    /// when the key had no channel.
    pub async fn forget_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let durable = {
            let mut map = self.lock();
            let Some(mut ch) = map.remove(key_id) else {
                return Ok(false);
            };
            ch.wake.notify_waiters();
            ch.close_socket(SocketEnd::Revoked);
            let had_websocket = std::mem::take(&mut ch.rec.websocket);
            let had_callback = ch.rec.callback.take().is_some() || had_websocket;
            let events = self
                .store
                .delete_events_through(key_id.to_string(), i64::MAX as u64);
            let record = had_callback.then(|| self.store.put_channel(ch.rec.clone()));
            (events, record)
        };
        durable.0.await?;
        if let Some(r) = durable.1 {
            r.await?;
        }
        tracing::info!(
            key = key_id,
            "notification channel dropped: the key no longer authenticates"
        );
        Ok(true)
    }

    fn ensure_pusher(self: &Arc<Self>, key_id: &str) {
        let start = {
            let mut map = self.lock();
            match map.get_mut(key_id) {
                Some(ch) if !ch.pusher && ch.rec.callback.is_some() && ch.owner == Owner::Here => {
                    ch.pusher = true;
                    true
                }
                _ => false,
            }
        };
        if start {
            tokio::spawn(Arc::clone(self).push_loop(key_id.to_string()));
        }
    }

    /// Delivers a callback channel's events in order, one batch at a time, each under a
    /// permit of [`Hub::deliveries`]. Other keys' tasks run meanwhile: a receiver that
    /// does not answer delays only its own key (the sink plugin runs calls that overlap on
    /// instances of their own, see `plugins::Generation`).
    async fn push_loop(self: Arc<Self>, key_id: String) {
        let mut stop = self.stop.clone();
        let initial = Duration::from_millis(self.cfg.retry_initial_ms);
        let max = Duration::from_millis(self.cfg.retry_max_ms);
        let mut backoff = initial;
        loop {
            if stop.is_fired() {
                break;
            }
            let Some(wake) = self.lock().get(&key_id).map(|c| Arc::clone(&c.wake)) else {
                break;
            };
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let cutoff = self.cutoff();
            let (target, batch, expired) = {
                let mut map = self.lock();
                let Some(ch) = map.get_mut(&key_id) else {
                    break;
                };
                let Some(target) = ch.rec.callback.clone().filter(|_| ch.owner == Owner::Here)
                else {
                    ch.pusher = false;
                    return;
                };
                let expired = ch.drop_expired(cutoff, |e| self.size_of(e));
                let n = self.batch_len(ch.queue.iter().map(|e| &e.event));
                let batch: Vec<(u64, Event)> = ch
                    .queue
                    .iter()
                    .take(n)
                    .map(|e| (e.seq, e.event.clone()))
                    .collect();
                (target, batch, expired)
            };
            if let Some((n, seq)) = expired {
                self.count_discarded(&key_id, n);
                if let Err(e) = self.store.delete_events_through(key_id.clone(), seq).await {
                    crate::store::log_failure(
                        format_args!("notifications: cannot remove discarded events"),
                        &e,
                    );
                }
            }
            let Some(last) = batch.last().map(|e| e.0) else {
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = notified => continue,
                }
            };
            let events: Vec<Event> = batch.into_iter().map(|e| e.1).collect();
            // Waits while `max_concurrent_deliveries` other keys' deliveries are in flight.
            let permit = tokio::select! {
                _ = stop.recv() => break,
                p = self.deliveries.acquire() => match p {
                    Ok(p) => p,
                    // Never closed; if it were, delivering without a bound beats stalling.
                    Err(_) => {
                        tracing::error!("notifications: the delivery bound is closed");
                        break;
                    }
                },
            };
            let outcome = self.sink.deliver(&key_id, &target, &events).await;
            drop(permit);
            match outcome {
                Delivery::Accepted => {
                    backoff = initial;
                    for _ in 0..events.len() {
                        Counters::inc(&self.counters.events_delivered);
                    }
                    self.remove_through(&key_id, last).await;
                }
                Delivery::Refused(why) => {
                    backoff = initial;
                    if let Some(ch) = self.lock().get_mut(&key_id) {
                        ch.lost.refused += events.len() as u64;
                    }
                    tracing::warn!(key = %key_id, url = %super::redact_url(&target.url), "callback refused {} events, discarding them: {why}", events.len());
                    for _ in 0..events.len() {
                        Counters::inc(&self.counters.events_discarded);
                    }
                    self.remove_through(&key_id, last).await;
                }
                Delivery::Retry(why) => {
                    Counters::inc(&self.counters.delivery_retries);
                    tracing::warn!(key = %key_id, url = %super::redact_url(&target.url), "callback delivery failed, retrying in {backoff:?}: {why}");
                    tokio::select! {
                        _ = stop.recv() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        if let Some(ch) = self.lock().get_mut(&key_id) {
            ch.pusher = false;
        }
    }

    async fn remove_through(&self, key_id: &str, seq: u64) {
        let durable = {
            let mut map = self.lock();
            if let Some(ch) = map.get_mut(key_id) {
                // The channel may have been switched to long-poll or a WebSocket while
                // this delivery ran, and an answer taken from the same oldest events:
                // `pop_oldest` shrinks it.
                ch.pop_through(seq, |e| self.size_of(e));
                ch.active = Instant::now();
            }
            self.store.delete_events_through(key_id.to_string(), seq)
        };
        forget_in_background(key_id, durable);
    }

    /// Discards expired events of channels nobody reads, and removes idle channels
    /// ([`Hub::remove_idle`]): once a minute, or every quarter of
    /// `notifications.idle_channel_removal_s` if that is shorter (at least every second).
    pub async fn run_sweeper(self: Arc<Self>, mut stop: Shutdown) {
        let every = match self.cfg.idle_channel_removal_s {
            0 => 60,
            idle => (idle / 4).clamp(1, 60),
        };
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tick.tick() => {}
            }
            self.remove_idle().await;
            let cutoff = self.cutoff();
            let deletes = {
                let mut map = self.lock();
                let mut deletes = Vec::new();
                let now = Instant::now();
                let window = Duration::from_secs(self.cfg.redeliver_after_s);
                for ch in map.values_mut() {
                    if ch.settle_stale(now, window) {
                        self.count_put_back(&ch.rec.key_id, "it was not acknowledged in time");
                    }
                    if let Some((n, seq)) = ch.drop_expired(cutoff, |e| self.size_of(e)) {
                        self.count_discarded(&ch.rec.key_id, n);
                        deletes.push(self.store.delete_events_through(ch.rec.key_id.clone(), seq));
                    }
                }
                deletes
            };
            for d in deletes {
                if let Err(e) = d.await {
                    crate::store::log_failure(
                        format_args!("notifications: cannot remove discarded events"),
                        &e,
                    );
                }
            }
        }
    }

    /// Removes the channels this node serves that saw no event in, no pull (none waiting
    /// either), no acknowledgement and no delivery for `notifications.idle_channel_removal_s`
    /// (0: never), as Pelion removes a channel idle for 48 hours: from memory and from the
    /// store, with its undelivered events (counted as discarded) and its callback. Logged,
    /// one line per channel. The key gets a new channel at its next use (a pull, a
    /// callback, a resource or subscription request). Answers how many were removed.
    pub async fn remove_idle(&self) -> usize {
        let idle_s = self.cfg.idle_channel_removal_s;
        if idle_s == 0 {
            return 0;
        }
        let idle = Duration::from_secs(idle_s);
        let now = Instant::now();
        let removed: Vec<(String, usize, bool, crate::store::Pending<()>)> = {
            let mut map = self.lock();
            let keys: Vec<String> = map
                .values()
                .filter(|c| {
                    c.owner == Owner::Here
                        && c.pulling == 0
                        && c.in_flight.is_none()
                        && now.saturating_duration_since(c.active) >= idle
                })
                .map(|c| c.rec.key_id.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| {
                    let ch = map.remove(&k)?;
                    ch.wake.notify_waiters();
                    let n = ch.queue.len();
                    for _ in 0..n {
                        Counters::inc(&self.counters.events_discarded);
                    }
                    Counters::inc(&self.counters.channels_removed_idle);
                    let durable = self.store.delete_channel(k.clone());
                    Some((k, n, ch.rec.callback.is_some(), durable))
                })
                .collect()
        };
        let count = removed.len();
        for (key, n, callback, durable) in removed {
            if let Some(peers) = &self.peers {
                peers.release(&key).await;
            }
            match durable.await {
                Ok(()) => tracing::info!(
                    key,
                    undelivered = n,
                    callback,
                    "notifications: channel removed: no event in, pull or delivery for {idle_s} s (notifications.idle_channel_removal_s); the key gets a new channel at its next use"
                ),
                Err(e) => crate::store::log_failure(
                    format_args!(
                        "notifications: idle channel of key {key} removed from memory, not from the store (loaded again at the next start)"
                    ),
                    &e,
                ),
            }
        }
        count
    }

    /// Key `key_id`'s channel as `GET /v2/limits` shows it; `None` without one.
    pub fn channel_info(&self, key_id: &str) -> Option<ChannelInfo> {
        let map = self.lock();
        let ch = map.get(key_id)?;
        let here = ch.owner == Owner::Here;
        Some(ChannelInfo {
            kind: if ch.rec.callback.is_some() {
                "callback"
            } else if ch.rec.websocket {
                "websocket"
            } else {
                "long-poll"
            },
            here,
            queued_events: here.then_some(ch.queue.len()),
            queued_bytes: here.then_some(ch.bytes),
            lost: here.then_some(ch.lost),
            idle_s: here.then(|| ch.active.elapsed().as_secs()),
        })
    }

    /// The `[notifications]` section the hub runs with (for `GET /v2/limits`).
    pub fn config(&self) -> &NotificationsConfig {
        &self.cfg
    }

    // ---- Cluster (issue 22): channel owners. Nothing below runs without peers. ----

    /// Where key `key_id`'s channel is served: here, or the node the peers name. A
    /// channel whose owner is not known is claimed (taken if its lease is free: its
    /// undelivered events are loaded, [`Hub::take_over`]). `Err`: no such channel, or
    /// the lease could not be read.
    async fn route(&self, key_id: &str) -> Result<Route, String> {
        let Some(peers) = &self.peers else {
            return Ok(Route::Here);
        };
        match self.lock().get(key_id).map(|c| c.owner.clone()) {
            None => return Err("no notification channel".into()),
            Some(Owner::Here) => return Ok(Route::Here),
            Some(Owner::Node(n)) => return Ok(Route::Node(n)),
            Some(Owner::Unknown) => {}
        }
        let _one = self.claiming.lock().await;
        if self
            .lock()
            .get(key_id)
            .is_some_and(|c| c.owner == Owner::Here)
        {
            return Ok(Route::Here);
        }
        match peers.claim(key_id).await? {
            Claim::Node(n) => {
                if let Some(ch) = self.lock().get_mut(key_id)
                    && ch.owner != Owner::Here
                {
                    ch.owner = Owner::Node(n.clone());
                }
                Ok(Route::Node(n))
            }
            Claim::Here { .. } => {
                self.take_over(key_id).await.map_err(|e| e.to_string())?;
                Ok(Route::Here)
            }
        }
    }

    /// This node holds key `key_id`'s lease now (under `claiming`): its undelivered
    /// events are loaded from the store (`EventLog::load_events_of`, which numbers the
    /// key on above every number given before) and become its queue; a callback starts
    /// delivering. At least once: what the previous owner delivered but had not yet
    /// removed is delivered again.
    async fn take_over(&self, key_id: &str) -> Result<(), StoreError> {
        let events = self.store.load_events_of(key_id.to_string()).await?;
        let n = events.len();
        {
            let mut map = self.lock();
            let Some(ch) = map.get_mut(key_id) else {
                return Ok(());
            };
            // What this node queued after the load was submitted (a renewal that found
            // the lease lapsed, while still delivering) is numbered above it: kept.
            let loaded_to = events.last().map_or(0, |e| e.seq);
            let newer: Vec<StoredEvent> =
                ch.queue.drain(..).filter(|e| e.seq > loaded_to).collect();
            ch.queue = events.into();
            ch.queue.extend(newer);
            ch.bytes = ch.queue.iter().map(|e| self.size_of(&e.event)).sum();
            ch.active = Instant::now();
            ch.in_flight = None;
            ch.owner = Owner::Here;
            ch.renewed = Instant::now();
            ch.wake.notify_waiters();
        }
        tracing::info!(
            key = key_id,
            "notifications: this node owns the key's channel now ({n} undelivered events)"
        );
        if let Some(me) = self.me.upgrade() {
            me.ensure_pusher(key_id);
        }
        Ok(())
    }

    /// This node no longer owns key `key_id`'s channel: its queue is dropped from memory
    /// (the events stay stored, for the next owner), a long-poll waiting here ends, the
    /// delivery task stops.
    fn step_down(&self, key_id: &str, to: Owner) {
        let mut map = self.lock();
        if let Some(ch) = map.get_mut(key_id)
            && ch.owner == Owner::Here
        {
            ch.owner = to;
            ch.queue.clear();
            ch.bytes = 0;
            ch.in_flight = None;
            ch.wake.notify_waiters();
            tracing::info!(
                key = key_id,
                "notifications: this node no longer owns the key's channel"
            );
        }
    }

    /// What another node said of a key's owner (`None`: ask the peers next time).
    fn note_owner(&self, key_id: &str, owner: Option<String>) {
        let me = self.peers.as_ref().map(|p| p.node().to_string());
        if let Some(ch) = self.lock().get_mut(key_id)
            && ch.owner != Owner::Here
        {
            ch.owner = match owner {
                Some(n) if Some(&n) != me.as_ref() => Owner::Node(n),
                _ => Owner::Unknown,
            };
        }
    }

    /// Sends other nodes' events to their owners; true when every one was stored. Each
    /// key's events join the key's outbox, in the order they reach it; one sender per key
    /// (a task, started by the publish that finds none running) sends everything waiting
    /// in the outbox, up to [`MAX_EVENTS_PER_APPEND`], in one call and tells each publish
    /// whether its events were stored. So a key's events reach its owner in order, each
    /// publish is answered only once the owner stored its events, and the publishes that
    /// arrive during a round trip share the next one (rather than each waiting for all
    /// before it, one round trip each); different keys are sent concurrently.
    fn queue_forwards(&self, events: Vec<(String, Event, bool)>) -> Forwarding {
        let Some(me) = self.me.upgrade() else {
            return Forwarding {
                answers: Vec::new(),
                failed: true,
                failed_here: false,
                remote_groups: Vec::new(),
            };
        };
        let mut by_key: Vec<(String, Vec<Forwarded>)> = Vec::new();
        for (k, e, unqueue) in events {
            match by_key.iter_mut().find(|(key, _)| *key == k) {
                Some((_, list)) => list.push((e, unqueue)),
                None => by_key.push((k, vec![(e, unqueue)])),
            }
        }
        let mut answers = Vec::with_capacity(by_key.len());
        {
            let mut outboxes = self.outboxes.lock().unwrap_or_else(|e| e.into_inner());
            for (key, events) in by_key {
                let (tx, rx) = tokio::sync::oneshot::channel();
                answers.push(rx);
                match outboxes.get_mut(&key) {
                    // Its sender is running: it takes these with the next call.
                    Some(out) => out.waiting.push((events, tx)),
                    None => {
                        outboxes.insert(
                            key.clone(),
                            Outbox {
                                waiting: vec![(events, tx)],
                            },
                        );
                        tokio::spawn(Arc::clone(&me).send_outbox(key));
                    }
                }
            }
        }
        Forwarding {
            answers,
            failed: false,
            failed_here: false,
            remote_groups: Vec::new(),
        }
    }

    /// The sender of key `key_id`'s outbox ([`Hub::queue_forwards`]): until it is empty,
    /// sends what waits in it to the key's owner in one call.
    async fn send_outbox(self: Arc<Self>, key_id: String) {
        loop {
            let taken = {
                let mut outboxes = self.outboxes.lock().unwrap_or_else(|e| e.into_inner());
                let Some(out) = outboxes.get_mut(&key_id) else {
                    return;
                };
                if out.waiting.is_empty() {
                    outboxes.remove(&key_id);
                    return;
                }
                let mut n = 0;
                let mut k = 0;
                while k < out.waiting.len() && (k == 0 || n < MAX_EVENTS_PER_APPEND) {
                    n += out.waiting[k].0.len();
                    k += 1;
                }
                out.waiting.drain(..k).collect::<Vec<_>>()
            };
            let mut events = Vec::new();
            let mut tells = Vec::with_capacity(taken.len());
            for (e, tx) in taken {
                events.extend(e);
                tells.push(tx);
            }
            let stored = self.forward(&key_id, events).await;
            for tx in tells {
                let _ = tx.send(stored);
            }
        }
    }

    /// Has key `key_id`'s owner store `events`, or queues them here if this node takes
    /// the channel meanwhile (its owner gone, its lease lapsed). Retried for up to
    /// [`FORWARD_BOUND`]; then the events are given up: logged and counted as discarded.
    async fn forward(&self, key_id: &str, forwarded: Vec<Forwarded>) -> bool {
        let (events, unqueue): (Vec<Event>, Vec<bool>) = forwarded.into_iter().unzip();
        let Some(peers) = self.peers.clone() else {
            return false;
        };
        let started = Instant::now();
        let mut last: String;
        loop {
            match self.route(key_id).await {
                Ok(Route::Here) => {
                    // As on the owner ([`Hub::append_here`]), but as this node's own
                    // events: those no device sends again stay queued if the write fails.
                    match self
                        .append_owned(key_id, events.clone(), Some(&unqueue))
                        .await
                    {
                        Some(Ok(())) => return true,
                        Some(Err(e)) => {
                            crate::store::log_failure(
                                format_args!("notifications: event not stored"),
                                &e,
                            );
                            return false;
                        }
                        None => {}
                    }
                    last = "the channel moved while it was taken".into();
                }
                Ok(Route::Node(n)) => match peers.append(&n, key_id, &events).await {
                    Ok(()) => return true,
                    Err(PeerError::NotOwner(owner)) => {
                        last = format!("node {n} no longer owns it");
                        self.note_owner(key_id, owner);
                    }
                    Err(e) => {
                        last = format!("node {n}: {e}");
                        self.note_owner(key_id, None);
                    }
                },
                Err(e) => last = e,
            }
            if started.elapsed() >= FORWARD_BOUND {
                for _ in 0..events.len() {
                    Counters::inc(&self.counters.events_discarded);
                }
                tracing::error!(
                    key = key_id,
                    "notifications: {} events not stored: the key's channel owner was not reached within {FORWARD_BOUND:?} ({last})",
                    events.len()
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// [`Hub::pull`] on a node of a cluster: served here if this node owns (or takes) the
    /// key's channel, else forwarded to its owner with what is left of the wait. An owner
    /// that does not answer is asked again (its lease lapses within seconds if it is gone,
    /// and the channel is taken) until the wait, and at least [`FORWARD_BOUND`], passed:
    /// then the poll fails as unavailable.
    async fn pull_routed(
        self: &Arc<Self>,
        p: &Principal,
        wait: Option<Duration>,
        gone: impl Future<Output = ()>,
        via: Via,
    ) -> Result<Pulled, StoreError> {
        let Some(peers) = self.peers.clone() else {
            return self.pull_here(&p.key_id, wait, gone, via).await;
        };
        let start = Instant::now();
        let deadline = start + wait.unwrap_or_default();
        let give_up = deadline.max(start + FORWARD_BOUND);
        tokio::pin!(gone);
        let mut last: String;
        loop {
            // Every node follows the channel's record: a callback, or a WebSocket channel
            // a long-poll may not read, is answered here.
            let kind = self
                .lock()
                .get(&p.key_id)
                .map(|c| (c.rec.callback.is_some(), c.rec.websocket));
            match kind {
                Some((true, _)) => return Ok(Pulled::CallbackActive),
                Some((_, true)) if via == Via::LongPoll => return Ok(Pulled::WebsocketActive),
                Some((_, false)) if via == Via::Socket => return Ok(Pulled::NoWebsocket),
                _ => {}
            }
            let left = wait.map(|_| deadline.saturating_duration_since(Instant::now()));
            match self.route(&p.key_id).await {
                Ok(Route::Here) => {
                    return self.pull_here(&p.key_id, left, gone.as_mut(), via).await;
                }
                Ok(Route::Node(n)) => {
                    let sent = self.take_handed_out(&p.key_id, &n);
                    let req = PollRequest {
                        key_id: p.key_id.clone(),
                        domain: p.domain.clone(),
                        allow: p.allow.clone(),
                        wait: left,
                        sent,
                        socket: via == Via::Socket,
                    };
                    let mut call = {
                        let (peers, n) = (Arc::clone(&peers), n.clone());
                        tokio::spawn(async move { peers.poll(&n, &req).await })
                    };
                    // While the owner holds the poll, its lease is read every
                    // `HOLDER_CHECK`: an owner killed mid-poll never answers, and the poll
                    // waited out its whole bound (the wait, plus the call timeout and a
                    // second: 36 s) while another node had taken the channel after about
                    // 6 s (found by an outside review). A lease that moved or lapsed ends
                    // the call, and the poll goes to whoever holds the channel now.
                    let mut checks = tokio::time::interval_at(
                        tokio::time::Instant::now() + HOLDER_CHECK,
                        HOLDER_CHECK,
                    );
                    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let r = loop {
                        tokio::select! {
                            biased;
                            () = &mut gone => {
                                // The owner may still answer the poll: its batch is queued
                                // again at once, not after `REMOTE_ANSWER_WINDOW`.
                                requeue_late_batch(&peers, &n, &p.key_id, call);
                                return Ok(Pulled::Gone);
                            }
                            r = &mut call => break r.unwrap_or_else(|e| Err(PeerError::Unreachable(e.to_string()))),
                            _ = checks.tick() => {
                                match peers.holder(&p.key_id).await {
                                    Ok(Some(h)) if h == n => {}
                                    // Not read: the call goes on (it is bounded).
                                    Err(_) => {}
                                    // The call ended meanwhile: its answer counts.
                                    Ok(_) if call.is_finished() => {}
                                    Ok(other) => {
                                        // Left to end on its own, as for a client gone.
                                        requeue_late_batch(&peers, &n, &p.key_id, call);
                                        break Err(PeerError::NotOwner(other));
                                    }
                                }
                            }
                        }
                    };
                    match r {
                        Ok(Polled::Batch { id, events }) => {
                            return Ok(Pulled::Batch(Batch {
                                events,
                                ticket: Ticket {
                                    hub: Arc::downgrade(self),
                                    key_id: p.key_id.as_str().into(),
                                    id,
                                    sent: false,
                                    owner: Some(n.into()),
                                },
                            }));
                        }
                        Ok(Polled::Empty) => return Ok(Pulled::Empty),
                        Ok(Polled::CallbackActive) => return Ok(Pulled::CallbackActive),
                        Err(PeerError::NotOwner(owner)) => {
                            last = format!("node {n} no longer owns it");
                            self.note_owner(&p.key_id, owner);
                        }
                        Err(e) => {
                            last = format!("node {n}: {e}");
                            self.note_owner(&p.key_id, None);
                        }
                    }
                }
                Err(e) => last = e,
            }
            if Instant::now() >= give_up {
                return Err(StoreError::PeerUnreachable(format!(
                    "the notification channel's owner node cannot be reached: {last}; try again"
                )));
            }
            tokio::select! {
                biased;
                () = &mut gone => return Ok(Pulled::Gone),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Tells the owner of a forwarded long-poll answer whether it reached its client. One
    /// that did is also remembered, to be repeated by the key's next poll forwarded to that
    /// owner ([`PollRequest::sent`]): this word travels as a call of its own, which can
    /// reach the owner after the client's next poll.
    fn tell_owner(&self, owner: &str, key_id: &str, id: u64, sent: bool) {
        {
            let mut handed = self.handed_out.lock().unwrap_or_else(|e| e.into_inner());
            if sent {
                handed.insert(key_id.to_string(), (owner.to_string(), id));
            } else if handed
                .get(key_id)
                .is_some_and(|(o, i)| o == owner && *i == id)
            {
                handed.remove(key_id);
            }
        }
        let (Some(peers), Ok(rt)) = (self.peers.clone(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (owner, key_id) = (owner.to_string(), key_id.to_string());
        rt.spawn(async move { peers.answered(&owner, &key_id, id, sent).await });
    }

    /// The answer of `owner` for key `key_id` this node last handed to its client, if not
    /// yet repeated in a poll forwarded to `owner` (forgotten either way: an answer of
    /// another owner means nothing to this one).
    fn take_handed_out(&self, key_id: &str, owner: &str) -> Option<u64> {
        self.handed_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key_id)
            .filter(|(o, _)| o == owner)
            .map(|(_, id)| id)
    }

    /// Is key `key_id`'s channel this node's (asking the peers, and taking a free lease,
    /// if this node does not know)? For the calls other nodes make to an owner.
    async fn owned_here(&self, key_id: &str) -> Result<(), PeerError> {
        self.note_owner(key_id, None);
        match self.route(key_id).await {
            Ok(Route::Here) => Ok(()),
            Ok(Route::Node(n)) => Err(PeerError::NotOwner(Some(n))),
            Err(_) => Err(PeerError::NotOwner(None)),
        }
    }

    /// The owner's side of [`ChannelPeers::append`]: queues another node's events for a
    /// key whose channel this node owns; `Ok` once they are stored. If the write fails,
    /// every one of them is taken out again ([`Hub::append_owned`]).
    pub async fn append_here(&self, key_id: &str, events: Vec<Event>) -> Result<(), PeerError> {
        self.owned_here(key_id).await?;
        for e in &events {
            self.size_of(e);
        }
        match self.append_owned(key_id, events, None).await {
            None => Err(PeerError::NotOwner(None)),
            Some(r) => r.map_err(|e| PeerError::Failed(e.to_string())),
        }
    }

    /// Queues `events` for `key_id` if this node owns its channel (`None` if it does not)
    /// and waits for their store write. If the write fails, every one of them is taken out
    /// again: the sender is told they were not stored, and sends them again (within
    /// [`FORWARD_BOUND`]; an async response until it is stored, [`Hub::answer_again`]), and
    /// a device its CON notifications (which the sender does not acknowledge). Decision:
    /// a forwarded event is stored by its owner or not queued there. Before, those a
    /// device would not send again stayed queued, unstored, and each of the sender's tries
    /// (one every 250 ms or so for 15 s) queued another copy: an async response came 60
    /// times.
    ///
    /// `own_unqueue`: the events were published on this node, which took the key's
    /// channel while it forwarded them ([`Hub::forward`]): then only those it marks go
    /// (by position; missing: false), and the others stay queued, as its other events
    /// would ([`Undo::Keep`]).
    async fn append_owned(
        &self,
        key_id: &str,
        events: Vec<Event>,
        own_unqueue: Option<&[bool]>,
    ) -> Option<Result<(), StoreError>> {
        let mut wakes = Vec::new();
        let mut trims = Vec::new();
        let marks: Vec<bool> = (0..events.len())
            .map(|i| own_unqueue.is_none_or(|u| u.get(i).copied().unwrap_or(false)))
            .collect();
        let mut pushed = Vec::new();
        let durable = {
            let mut map = self.lock();
            if !map.get(key_id).is_some_and(|c| c.owner == Owner::Here) {
                return None;
            }
            let chosen = events
                .into_iter()
                .map(|e| (key_id.to_string(), e))
                .collect();
            self.enqueue(
                &mut map,
                chosen,
                None,
                &mut wakes,
                &mut trims,
                Some((&marks, &mut pushed)),
            )
        };
        let r = durable.await;
        if let Err(StoreError::LeaseLost(_)) = &r {
            // The key's lease lapsed under this write (the store's fence): this node is no
            // longer the owner, and the events go to the one that is (`forward` routes
            // them again; `append_here` answers "not the owner").
            self.step_down(key_id, Owner::Unknown);
            self.settle(trims, wakes).await;
            return None;
        }
        if r.is_err() {
            self.unqueue(pushed);
        }
        self.settle(trims, wakes).await;
        Some(r)
    }

    /// The owner's side of [`ChannelPeers::poll`]: a long-poll of another node's client.
    /// A batch becomes the key's answer in flight, settled by [`Hub::answer_reached`] (or
    /// put back after [`REMOTE_ANSWER_WINDOW`] without word). An answer the poll says its
    /// node handed to its client ([`PollRequest::sent`]) is marked sent first, so that this
    /// poll, the client's next, acknowledges it even when the separate word
    /// ([`Hub::answer_reached`]) has not arrived yet: otherwise the answer would stay in
    /// flight, unacknowledged, and every poll of the key (on any node) would wait as if the
    /// queue were empty until its wait ran out.
    pub async fn poll_here(&self, req: PollRequest) -> Result<Polled, PeerError> {
        self.owned_here(&req.key_id).await?;
        if let Some(id) = req.sent {
            self.mark_sent(&req.key_id, id);
        }
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| PeerError::Failed("stopping".into()))?;
        let via = if req.socket {
            Via::Socket
        } else {
            Via::LongPoll
        };
        match me
            .pull_here(&req.key_id, req.wait, std::future::pending(), via)
            .await
        {
            Ok(Pulled::Batch(Batch { events, ticket })) => Ok(Polled::Batch {
                id: ticket.hand_over(),
                events,
            }),
            // The record changed under the forwarding node (it checks the kind before it
            // forwards): answered as empty, the next poll there sees the new record.
            Ok(Pulled::Empty | Pulled::Gone | Pulled::WebsocketActive | Pulled::NoWebsocket) => {
                Ok(Polled::Empty)
            }
            Ok(Pulled::CallbackActive) => Ok(Polled::CallbackActive),
            Err(e) => Err(PeerError::Failed(e.to_string())),
        }
    }

    /// The owner's side of [`ChannelPeers::answered`]: answer `id` of the key reached the
    /// other node's client (`sent`: the key's next pull acknowledges it), or did not (its
    /// events are queued again, first).
    pub fn answer_reached(&self, key_id: &str, id: u64, sent: bool) {
        if sent {
            self.mark_sent(key_id, id);
        } else {
            self.put_back(key_id, id, "the node that forwarded it could not write it");
        }
    }

    /// A channel record another node wrote (the store's watch): this node routes by it,
    /// and, owning the channel, delivers to the callback it names (or stops).
    pub fn apply_channel(&self, rec: ChannelRecord) {
        let key = rec.key_id.clone();
        {
            let mut map = self.lock();
            match map.get_mut(&key) {
                None => {
                    map.insert(key.clone(), self.new_channel(rec));
                }
                Some(ch) => {
                    let callback_changed = ch.rec.callback != rec.callback;
                    if !rec.websocket {
                        // Another node deleted the WebSocket channel, or replaced it.
                        ch.close_socket(SocketEnd::ChannelRemoved);
                    }
                    ch.allow_written.1 = rec.allow.clone();
                    ch.rec = rec;
                    if callback_changed {
                        // A new callback delivers from the oldest event on, an answer in
                        // flight included (as `set_callback`).
                        if ch.rec.callback.is_some() {
                            ch.in_flight = None;
                        }
                        ch.wake.notify_waiters();
                    }
                }
            }
        }
        if let Some(me) = self.me.upgrade() {
            me.ensure_pusher(&key);
        }
    }

    /// A channel another node removed as idle (the store's watch): this node forgets it,
    /// so that the key's events are no longer routed and its next use makes a new one. A
    /// channel this node serves meanwhile (it took the lease in between: the key was used
    /// again) is kept, and its record written again so that the store holds it too.
    pub fn apply_removal(&self, key_id: &str) {
        let rewrite = {
            let mut map = self.lock();
            match map.get(key_id) {
                None => return,
                Some(ch) if ch.owner == Owner::Here => Some(self.store.put_channel(ch.record())),
                Some(_) => {
                    if let Some(ch) = map.remove(key_id) {
                        ch.wake.notify_waiters();
                    }
                    None
                }
            }
        };
        match rewrite {
            None => tracing::debug!(key = key_id, "notifications: channel removed by its owner"),
            Some(durable) => {
                let key = key_id.to_string();
                tokio::spawn(async move {
                    if let Err(e) = durable.await {
                        crate::store::log_failure(
                            format_args!("notifications: channel of key {key} not stored again"),
                            &e,
                        );
                    }
                });
            }
        }
    }

    /// The channels this node owns.
    pub fn owned_channels(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| c.owner == Owner::Here)
            .count()
    }

    /// Cluster: renews this node's channel leases every [`LEASE_RENEW_EVERY`] (a lease
    /// another node holds now, or not renewed for 4 s, stops this node's delivery of that
    /// channel), and claims the callback channels whose owner is gone (their lease
    /// lapsed: the first node to look takes them, loads their undelivered events and
    /// delivers them). At `stop` every lease is released, so that other nodes take the
    /// channels at once rather than after the lease's lapse. Returns at once without peers.
    pub async fn run_leases(self: Arc<Self>, mut stop: Shutdown) {
        let Some(peers) = self.peers.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(LEASE_RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.recv() => break,
                _ = tick.tick() => {}
            }
            let (owned, callbacks): (Vec<String>, Vec<String>) = {
                let map = self.lock();
                (
                    map.values()
                        .filter(|c| c.owner == Owner::Here)
                        .map(|c| c.rec.key_id.clone())
                        .collect(),
                    map.values()
                        .filter(|c| c.owner != Owner::Here && c.rec.callback.is_some())
                        .map(|c| c.rec.key_id.clone())
                        .collect(),
                )
            };
            for key in owned {
                match peers.claim(&key).await {
                    Ok(Claim::Here { fresh: false }) => {
                        if failing {
                            tracing::info!("notifications: channel leases renewed again");
                            failing = false;
                        }
                        if let Some(ch) = self.lock().get_mut(&key) {
                            ch.renewed = Instant::now();
                        }
                    }
                    // It had lapsed and is ours again: another node may have delivered
                    // from it meanwhile, so the stored events are the queue.
                    Ok(Claim::Here { fresh: true }) => {
                        let _one = self.claiming.lock().await;
                        if let Err(e) = self.take_over(&key).await {
                            tracing::warn!(
                                key,
                                "notifications: cannot reload the key's events: {e}"
                            );
                            self.step_down(&key, Owner::Unknown);
                        }
                    }
                    Ok(Claim::Node(n)) => self.step_down(&key, Owner::Node(n)),
                    Err(e) => {
                        if !failing {
                            tracing::warn!("notifications: cannot renew channel leases: {e}");
                            failing = true;
                        }
                        let old = self
                            .lock()
                            .get(&key)
                            .is_some_and(|c| c.renewed.elapsed() >= LEASE_STEP_DOWN_AFTER);
                        if old {
                            self.step_down(&key, Owner::Unknown);
                        }
                    }
                }
            }
            for key in callbacks {
                self.note_owner(&key, None);
                if let Err(e) = self.route(&key).await {
                    tracing::debug!(key, "notifications: cannot claim a callback channel: {e}");
                }
            }
        }
        let owned: Vec<String> = self
            .lock()
            .values()
            .filter(|c| c.owner == Owner::Here)
            .map(|c| c.rec.key_id.clone())
            .collect();
        for key in &owned {
            self.step_down(key, Owner::Unknown);
            peers.release(key).await;
        }
        if !owned.is_empty() {
            tracing::info!("notifications: released {} channel leases", owned.len());
        }
    }

    /// The keys that have a notification channel in `domain`.
    pub fn channel_keys(&self, domain: &str) -> Vec<String> {
        self.lock()
            .values()
            .filter(|c| c.rec.domain == domain)
            .map(|c| c.rec.key_id.clone())
            .collect()
    }

    /// Undelivered events, all keys.
    pub fn queued(&self) -> usize {
        self.lock().values().map(|c| c.queue.len()).sum()
    }

    /// The notification queues now, for `/metrics`: totals over every channel, and the
    /// `top` channels with the most events waiting (only channels with some), most first.
    pub fn queue_stats(&self, top: usize) -> QueueStats {
        let channels = self.lock();
        let mut stats = QueueStats {
            channels: channels.len(),
            ..QueueStats::default()
        };
        let mut waiting = Vec::new();
        for c in channels.values() {
            let queued = c.queue.len();
            let unacked = c.in_flight.as_ref().map_or(0, |f| f.len);
            stats.queued += queued;
            stats.unacknowledged += unacked;
            if queued > 0 {
                waiting.push((c.rec.key_id.as_str(), queued, unacked));
            }
        }
        waiting.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        stats.top = waiting
            .into_iter()
            .take(top)
            .map(|(k, q, u)| (k.to_string(), q, u))
            .collect();
        stats
    }

    /// Callback deliveries in flight now (permits taken), and the bound.
    pub fn deliveries(&self) -> (usize, usize) {
        let max = self.cfg.max_concurrent_deliveries.max(1);
        (max.saturating_sub(self.deliveries.available_permits()), max)
    }
}

impl RegistryListener for Hub {
    fn on_event<'a>(
        &'a self,
        ev: &'a RegistryEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let ep = ev.endpoint();
            // Decision: a registration's entry (its resource list, read from its links) is
            // made only when some channel of its domain may take it; a domain whose keys
            // have no channel (a fleet nobody listens to) costs no entry per registration.
            // A channel made meanwhile, after this look, is one made after the event.
            if matches!(
                ev,
                RegistryEvent::Registered { .. } | RegistryEvent::Updated { .. }
            ) && !self.has_channel_in(&ep.reg.domain)
            {
                return;
            }
            // The whole entry; restricted keys get theirs cut from the endpoint.
            let (entry, about) = match ev {
                RegistryEvent::Registered { .. } => (
                    Entry::Registration(registration_entry(ep, None)),
                    About::Registration(ep),
                ),
                RegistryEvent::Updated { .. } => (
                    Entry::RegUpdate(registration_entry(ep, None)),
                    About::Registration(ep),
                ),
                RegistryEvent::Deregistered(_) => (
                    Entry::DeRegistration(ep.reg.name.clone()),
                    About::Endpoint(&ep.reg.name),
                ),
                RegistryEvent::Expired(_) => (
                    Entry::Expired(ep.reg.name.clone()),
                    About::Endpoint(&ep.reg.name),
                ),
                // The new owner node publishes the registration.
                RegistryEvent::Moved(_) => return,
                // The node that removed it published the de-registration.
                RegistryEvent::RemovedElsewhere(_) => return,
            };
            let event = Event::new(entry, now_ms());
            self.publish_to_domain(&ep.reg.domain, event, about).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use std::sync::atomic::Ordering;

    struct NoSink;

    impl Sink for NoSink {
        fn verify<'a>(
            &'a self,
            _: &'a super::super::CallbackTarget,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
            Box::pin(async { Ok(()) })
        }
        fn deliver<'a>(
            &'a self,
            _: &'a str,
            _: &'a super::super::CallbackTarget,
            _: &'a [Event],
        ) -> std::pin::Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
            Box::pin(async { Delivery::Accepted })
        }
    }

    struct Fixture {
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        counters: Arc<Counters>,
        key: Principal,
        _stop: crate::shutdown::Trigger,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        fixture_with(NotificationsConfig::default()).await
    }

    /// Sizes every entry as 100 bytes (300 with the overhead).
    struct Hundred;

    impl Render for Hundred {
        fn message(&self, _: &[Event]) -> String {
            String::new()
        }
        fn entry_len(&self, _: &Event) -> usize {
            100
        }
    }

    async fn fixture_with(cfg: NotificationsConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        fixture_on(store, cfg, dir).await
    }

    /// A fixture on `store` (`dir` kept as long as it lives).
    async fn fixture_on(
        store: Arc<dyn Store>,
        cfg: NotificationsConfig,
        dir: tempfile::TempDir,
    ) -> Fixture {
        let counters = Arc::new(Counters::default());
        let (trigger, stop) = crate::shutdown::channel();
        let hub = Hub::load(
            Arc::clone(&store),
            Arc::new(NoSink),
            cfg,
            Arc::clone(&counters),
            stop,
        )
        .await
        .unwrap();
        hub.set_render(Arc::new(Hundred));
        let key = Principal {
            backend: "test".into(),
            key_id: "k".into(),
            domain: "default".into(),
            scopes: vec!["admin".into()],
            allow: None,
        };
        hub.ensure_channel(&key).await.unwrap();
        Fixture {
            hub,
            store,
            counters,
            key,
            _stop: trigger,
            _dir: dir,
        }
    }

    impl Fixture {
        /// Another hub loaded from this one's store, as at a restart.
        async fn reloaded(&self) -> Arc<Hub> {
            let (_t, stop) = crate::shutdown::channel();
            Hub::load(
                Arc::clone(&self.store),
                Arc::new(NoSink),
                NotificationsConfig::default(),
                Arc::new(Counters::default()),
                stop,
            )
            .await
            .unwrap()
        }

        async fn publish(&self, ep: &str) {
            let event = Event::new(Entry::DeRegistration(ep.into()), now_ms());
            self.hub
                .publish_to_key("k", event, About::Endpoint(ep))
                .await;
        }

        /// A pull that answers at once.
        async fn pull(&self) -> Option<Batch> {
            match self
                .hub
                .pull(&self.key, None, std::future::pending())
                .await
                .unwrap()
            {
                Pulled::Batch(b) => Some(b),
                Pulled::Empty => None,
                other => panic!("{other:?}"),
            }
        }

        /// The `ep`s still stored for the key (a store round trip: earlier deletes are
        /// applied before it).
        async fn stored(&self) -> Vec<String> {
            let events = self.store.load_events().await.unwrap();
            events.iter().map(|e| ep_of(&e.event)).collect()
        }

        fn count(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
    }

    /// The endpoint a test event is about.
    fn ep_of(e: &Event) -> String {
        match e.entry() {
            Entry::DeRegistration(ep) => ep.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn eps(b: &Batch) -> Vec<String> {
        b.events.iter().map(ep_of).collect()
    }

    /// Issue 25 review: events another node forwarded to this owner (`append_here`) whose
    /// store write failed stayed queued in memory: the forwarding node tries again, so a
    /// pull got them unstored, once per try. Now every one of them is taken out again.
    #[tokio::test]
    async fn forwarded_events_whose_write_fails_are_not_queued() {
        let store = Arc::new(crate::store::memory::MemoryStore::new());
        let f = fixture_on(
            Arc::clone(&store) as Arc<dyn Store>,
            NotificationsConfig::default(),
            tempfile::tempdir().unwrap(),
        )
        .await;
        let (hub, key) = (&f.hub, &f.key);
        let event = |ep: &str| Event::new(Entry::DeRegistration(ep.into()), now_ms());
        store.fail_writes(true);
        for _ in 0..2 {
            assert!(hub.append_here("k", vec![event("a")]).await.is_err());
        }
        // Nor one no device will send again (not marked): its sender sends it again, and
        // each try kept here would be one more copy (twelfth session: an async response
        // came 60 times).
        for _ in 0..2 {
            assert!(hub.append_here("k", vec![event("again")]).await.is_err());
        }
        store.fail_writes(false);
        hub.append_here("k", vec![event("again")]).await.unwrap();
        hub.append_here("k", vec![event("b")]).await.unwrap();
        let Pulled::Batch(b) = hub.pull(key, None, std::future::pending()).await.unwrap() else {
            panic!("a batch");
        };
        assert_eq!(eps(&b), ["again", "b"]);
    }

    #[tokio::test]
    async fn the_next_pull_acknowledges_an_answer_once_it_was_sent() {
        let f = fixture().await;
        f.publish("a").await;
        f.publish("b").await;
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["a", "b"]);
        // Still being answered: a concurrent pull neither acknowledges nor takes it.
        f.publish("c").await;
        assert!(f.pull().await.is_none());
        assert_eq!(f.stored().await, ["a", "b", "c"]);
        let _answer = b.ticket.sent();
        assert_eq!(f.count(&f.counters.events_delivered), 0);
        // The client came back: acknowledged, and the next events follow.
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["c"]);
        assert_eq!(f.stored().await, ["c"]);
        assert_eq!(f.count(&f.counters.events_delivered), 2);
        drop(b.ticket.sent());
        assert!(f.pull().await.is_none());
        assert!(f.stored().await.is_empty());
        assert_eq!(f.count(&f.counters.events_delivered), 3);
        assert_eq!(f.count(&f.counters.long_poll_redeliveries), 0);
    }

    /// Two clients long-polling one key: the second, waiting while the first's answer is
    /// in flight, acknowledges that answer once it was sent and takes the next events then,
    /// not at its deadline (it used to wait out its whole long-poll: the bug behind the
    /// cluster bench's two pollers of one key delivering nothing in its window).
    #[tokio::test]
    async fn a_waiting_pull_takes_the_next_events_once_the_answer_in_flight_was_sent() {
        let f = fixture().await;
        f.publish("a").await;
        let first = f.pull().await.unwrap();
        assert_eq!(eps(&first), ["a"]);
        f.publish("b").await;
        let hub = Arc::clone(&f.hub);
        let key = f.key.clone();
        let second = tokio::spawn(async move {
            hub.pull(&key, Some(Duration::from_secs(30)), std::future::pending())
                .await
                .unwrap()
        });
        // The second pull is waiting (an answer is in flight: it takes nothing yet).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished());
        let _answer = first.ticket.sent();
        let started = Instant::now();
        match second.await.unwrap() {
            Pulled::Batch(b) => assert_eq!(eps(&b), ["b"]),
            other => panic!(
                "the waiting pull got {other:?} after {:?}",
                started.elapsed()
            ),
        }
        assert_eq!(f.count(&f.counters.events_delivered), 1);
    }

    /// The newest verdict's restriction is stored with the channel and routes the events
    /// published after it; events queued before stay queued.
    #[tokio::test]
    async fn the_newest_restriction_is_stored_and_routes_events() {
        let f = fixture().await;
        let mut narrowed = f.key.clone();
        narrowed.allow = Some(vec!["gw-*".into()]);
        f.hub.note_restriction(&narrowed).await.unwrap();
        let stored = f.store.load_channels().await.unwrap();
        assert_eq!(stored[0].allow, narrowed.allow);
        f.publish("pump-1").await;
        f.publish("gw-1").await;
        // The pull's own verdict (no restriction) is the newest from now on.
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["gw-1"]);
        assert_eq!(f.store.load_channels().await.unwrap()[0].allow, None);
        drop(b.ticket.sent());
        f.publish("pump-1").await;
        assert_eq!(eps(&f.pull().await.unwrap()), ["pump-1"]);
        // A channel reloaded from the store keeps the restriction it was stored with.
        f.hub.note_restriction(&narrowed).await.unwrap();
        let again = f.reloaded().await;
        assert!(again.may_see("k", "gw-1", "/3/0/0"));
        assert!(!again.may_see("k", "pump-1", "/3/0/0"));
        assert!(again.may_see("nobody", "pump-1", "/3/0/0"), "no channel");
    }

    /// The hub queues each event under the number the store gave it: a number is never
    /// given again, not after its event was delivered and the hub restarted, so the
    /// acknowledgement of a new event can never delete another.
    #[tokio::test]
    async fn events_are_queued_under_the_store_s_numbers_across_a_restart() {
        let f = fixture().await;
        f.publish("a").await;
        f.publish("b").await;
        let first: Vec<u64> = f
            .store
            .load_events()
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert!(first[0] < first[1], "{first:?}");
        drop(f.pull().await.unwrap().ticket.sent());
        assert!(f.pull().await.is_none(), "acknowledged");
        assert!(f.stored().await.is_empty());
        let again = f.reloaded().await;
        again
            .publish_to_key(
                "k",
                Event::new(Entry::DeRegistration("c".into()), now_ms()),
                About::Endpoint("c"),
            )
            .await;
        let stored = f.store.load_events().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(
            stored[0].seq > first[1],
            "numbered on after the delivered events"
        );
        assert_eq!(
            again.lock()["k"].queue[0].seq,
            stored[0].seq,
            "queued under that number"
        );
    }

    #[tokio::test]
    async fn an_answer_never_written_is_answered_again_first() {
        let f = fixture().await;
        f.publish("a").await;
        let b = f.pull().await.unwrap();
        f.publish("b").await;
        drop(b);
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["a", "b"], "put back in front, in order");
        assert_eq!(f.count(&f.counters.long_poll_redeliveries), 1);
    }

    #[tokio::test]
    async fn a_failed_connection_puts_its_answer_back_unless_acknowledged() {
        let f = fixture().await;
        f.publish("a").await;
        let answer = f.pull().await.unwrap().ticket.sent();
        answer.put_back();
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), ["a"]);
        let answer = b.ticket.sent();
        // Acknowledged first: the connection's late failure changes nothing.
        assert!(f.pull().await.is_none());
        answer.put_back();
        assert!(f.pull().await.is_none());
        assert!(f.stored().await.is_empty());
        assert_eq!(f.count(&f.counters.long_poll_redeliveries), 1);
        assert_eq!(f.count(&f.counters.events_delivered), 1);
    }

    /// Issue 23: a WebSocket channel is read only by its socket (a long-poll gets
    /// `WebsocketActive`), one socket at a time; a frame not ponged (its ticket dropped)
    /// is the next socket's first; a callback or a revocation ends the socket.
    #[tokio::test]
    async fn a_websocket_channel_is_read_by_one_socket_and_loses_nothing() {
        let f = fixture().await;
        assert!(
            f.hub.attach_socket("k").is_none(),
            "no WebSocket channel yet"
        );
        assert!(f.hub.register_websocket(&f.key).await.unwrap());
        assert!(
            !f.hub.register_websocket(&f.key).await.unwrap(),
            "200: it was one"
        );
        let socket_pull = || f.hub.pull_for_socket(&f.key, None, std::future::pending());
        f.publish("a").await;
        assert!(matches!(
            f.hub
                .pull(&f.key, None, std::future::pending())
                .await
                .unwrap(),
            Pulled::WebsocketActive
        ));
        let mut first = f.hub.attach_socket("k").unwrap();
        assert_eq!(
            f.hub.websocket("k"),
            Some(WebsocketInfo {
                queue_size: 1,
                connected: true
            })
        );
        let Pulled::Batch(b) = socket_pull().await.unwrap() else {
            panic!("no frame");
        };
        assert_eq!(eps(&b), ["a"]);
        // A second socket ends the first; the frame it never ponged is put back.
        let mut second = f.hub.attach_socket("k").unwrap();
        assert_eq!(first.end.try_recv(), Ok(SocketEnd::Replaced));
        drop(b);
        drop(first);
        assert_eq!(f.hub.websockets(), 1, "the second stays attached");
        let Pulled::Batch(b) = socket_pull().await.unwrap() else {
            panic!("the unacknowledged frame was lost");
        };
        assert_eq!(eps(&b), ["a"]);
        // Ponged: the next pull acknowledges it.
        drop(b.ticket.sent());
        assert!(matches!(socket_pull().await.unwrap(), Pulled::Empty));
        assert!(f.stored().await.is_empty());
        // The key revoked: the socket is told, the channel gone.
        assert!(f.hub.forget_key("k").await.unwrap());
        assert_eq!(second.end.try_recv(), Ok(SocketEnd::Revoked));
        assert_eq!(f.hub.websocket("k"), None);
        drop(second);
        assert_eq!(f.hub.websockets(), 0);
        // Back as long-poll, and deleted.
        f.hub.ensure_channel(&f.key).await.unwrap();
        assert!(f.hub.register_websocket(&f.key).await.unwrap());
        let mut third = f.hub.attach_socket("k").unwrap();
        assert!(f.hub.delete_websocket("k").await.unwrap());
        assert_eq!(third.end.try_recv(), Ok(SocketEnd::ChannelRemoved));
        assert!(matches!(socket_pull().await.unwrap(), Pulled::NoWebsocket));
        assert!(!f.hub.delete_websocket("k").await.unwrap());
    }

    #[tokio::test]
    async fn a_pull_whose_client_left_takes_nothing() {
        let f = fixture().await;
        let (left, gone) = tokio::sync::oneshot::channel::<()>();
        let hub = Arc::clone(&f.hub);
        let key = f.key.clone();
        let poll = tokio::spawn(async move {
            hub.pull(&key, Some(Duration::from_secs(30)), async move {
                let _ = gone.await;
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(left);
        assert!(matches!(poll.await.unwrap().unwrap(), Pulled::Gone));
        f.publish("a").await;
        assert_eq!(eps(&f.pull().await.unwrap()), ["a"]);
    }

    /// `notifications.max_queued_bytes_per_key`: the oldest events make room, counted on
    /// the channel and in the metrics, removed from the store; the newest stay, in order,
    /// and the queue's bytes are what its events count (entry plus overhead).
    #[tokio::test]
    async fn a_queue_over_its_bytes_drops_its_oldest_and_counts_them() {
        let f = fixture_with(NotificationsConfig {
            max_queued_bytes_per_key: 4096,
            ..NotificationsConfig::default()
        })
        .await;
        let each = 100 + EVENT_OVERHEAD_BYTES;
        let fit = (4096 / each) as usize;
        for i in 0..20 {
            f.publish(&format!("e{i:02}")).await;
        }
        let info = f.hub.channel_info("k").unwrap();
        assert_eq!(info.queued_events, Some(fit));
        assert_eq!(info.queued_bytes, Some(fit as u64 * each));
        let lost = info.lost.unwrap();
        assert_eq!((lost.queue_bytes, lost.queue_count), (20 - fit as u64, 0));
        assert_eq!(
            f.count(&f.counters.events_dropped_queue_full),
            20 - fit as u64
        );
        assert_eq!(f.count(&f.counters.events_discarded), 20 - fit as u64);
        let newest: Vec<String> = (20 - fit..20).map(|i| format!("e{i:02}")).collect();
        assert_eq!(
            f.stored().await,
            newest,
            "the oldest removed from the store too"
        );
        let b = f.pull().await.unwrap();
        assert_eq!(eps(&b), newest, "the newest, in order");
        drop(b.ticket.sent());
        assert!(f.pull().await.is_none());
        assert_eq!(f.hub.channel_info("k").unwrap().queued_bytes, Some(0));
        // A restart counts the loaded queue the same way.
        f.publish("after").await;
        let again = f.reloaded().await;
        again.set_render(Arc::new(Hundred));
        assert_eq!(again.channel_info("k").unwrap().queued_bytes, Some(each));
    }

    /// Sizes by the endpoint name's length, so that a size counted for the wrong event
    /// or twice changes the sum.
    struct EpLen;

    impl Render for EpLen {
        fn message(&self, _: &[Event]) -> String {
            String::new()
        }
        fn entry_len(&self, e: &Event) -> usize {
            match e.entry() {
                Entry::DeRegistration(ep) => ep.len(),
                _ => 0,
            }
        }
    }

    /// A queue loaded at start with more events than one piece of the store's load and
    /// than the hub sizes on one thread (issue 24, restart): every event is back, in
    /// order, and the queue's bytes are the sum of its events' sizes.
    #[tokio::test]
    async fn a_long_queue_is_loaded_in_order_and_counted_whole() {
        const N: usize = 9_000;
        let f = fixture_with(NotificationsConfig {
            max_queued_per_key: 20_000,
            max_queued_bytes_per_key: 1 << 30,
            ..NotificationsConfig::default()
        })
        .await;
        let names: Vec<String> = (0..N).map(|i| format!("e{i}")).collect();
        let events: Vec<Event> = names
            .iter()
            .map(|n| Event::new(Entry::DeRegistration(n.clone()), now_ms()))
            .collect();
        f.hub
            .publish(To::Key("k"), &events, None, About::Endpoint("e"))
            .await;
        // A second key's queue, of other sizes: each queue is counted its own events.
        let other = Principal {
            key_id: "k2".into(),
            ..f.key.clone()
        };
        f.hub.ensure_channel(&other).await.unwrap();
        let long: Vec<Event> = (0..50)
            .map(|i| {
                Event::new(
                    Entry::DeRegistration(format!("a-longer-name-{i:03}")),
                    now_ms(),
                )
            })
            .collect();
        f.hub
            .publish(To::Key("k2"), &long, None, About::Endpoint("e"))
            .await;
        let again = f.reloaded().await;
        again.set_render(Arc::new(EpLen));
        let info2 = again.channel_info("k2").unwrap();
        assert_eq!(info2.queued_events, Some(50));
        assert_eq!(
            info2.queued_bytes,
            Some(50 * ("a-longer-name-000".len() as u64 + EVENT_OVERHEAD_BYTES))
        );
        let info = again.channel_info("k").unwrap();
        assert_eq!(info.queued_events, Some(N));
        let want: u64 = names
            .iter()
            .map(|n| n.len() as u64 + EVENT_OVERHEAD_BYTES)
            .sum();
        assert_eq!(info.queued_bytes, Some(want));
        let key = f.key.clone();
        let mut got = Vec::new();
        loop {
            match again
                .pull(&key, None, std::future::pending())
                .await
                .unwrap()
            {
                Pulled::Batch(b) => {
                    got.extend(eps(&b));
                    drop(b.ticket.sent());
                }
                Pulled::Empty => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, names);
    }

    /// The count bound and the bytes bound are counted apart.
    #[tokio::test]
    async fn the_count_bound_is_counted_apart_from_the_bytes_bound() {
        let f = fixture_with(NotificationsConfig {
            max_queued_per_key: 3,
            ..NotificationsConfig::default()
        })
        .await;
        for i in 0..5 {
            f.publish(&format!("c{i}")).await;
        }
        let lost = f.hub.channel_info("k").unwrap().lost.unwrap();
        assert_eq!((lost.queue_count, lost.queue_bytes), (2, 0));
        assert_eq!(eps(&f.pull().await.unwrap()), ["c2", "c3", "c4"]);
    }

    /// `notifications.idle_channel_removal_s`: a channel without an event in, a pull or a
    /// delivery for that long is removed, from the store too (a restart does not bring it
    /// back) with its events; a pull makes a new, empty one. A pull waiting keeps it.
    #[tokio::test]
    async fn an_idle_channel_is_removed_durably_and_a_pull_makes_a_new_one() {
        let f = fixture_with(NotificationsConfig {
            idle_channel_removal_s: 1,
            ..NotificationsConfig::default()
        })
        .await;
        f.publish("old").await;
        assert_eq!(f.hub.remove_idle().await, 0, "not idle yet");
        // A pull waiting longer than the idle time keeps the channel.
        let b = f.pull().await.unwrap();
        drop(b.ticket.sent());
        let hub = Arc::clone(&f.hub);
        let key = f.key.clone();
        let waiting = tokio::spawn(async move {
            hub.pull(
                &key,
                Some(Duration::from_millis(1500)),
                std::future::pending(),
            )
            .await
            .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(f.hub.remove_idle().await, 0, "a pull is waiting");
        assert!(matches!(waiting.await.unwrap(), Pulled::Empty));
        f.publish("queued").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(f.hub.remove_idle().await, 1);
        assert!(f.hub.channel_info("k").is_none());
        assert_eq!(f.count(&f.counters.channels_removed_idle), 1);
        assert_eq!(f.count(&f.counters.events_discarded), 1, "the queued event");
        assert!(f.store.load_channels().await.unwrap().is_empty());
        assert!(f.stored().await.is_empty());
        // Nothing is queued for a key without a channel; a restart finds none.
        f.publish("unrouted").await;
        let again = f.reloaded().await;
        assert!(again.channel_info("k").is_none());
        // The key's next pull makes a new channel, which starts empty.
        assert!(f.pull().await.is_none());
        f.publish("new").await;
        assert_eq!(eps(&f.pull().await.unwrap()), ["new"]);
    }

    #[tokio::test]
    async fn an_unacknowledged_answer_stays_stored_and_is_loaded_again() {
        let f = fixture().await;
        f.publish("a").await;
        let _answer = f.pull().await.unwrap().ticket.sent();
        assert_eq!(f.stored().await, ["a"]);
        let again = f.reloaded().await;
        let b = again.pull(&f.key, None, std::future::pending()).await;
        match b.unwrap() {
            Pulled::Batch(b) => assert_eq!(eps(&b), ["a"]),
            other => panic!("{other:?}"),
        }
    }
}
