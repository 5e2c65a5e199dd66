//! The shared store of a cluster (issue 22): every port on NATS JetStream, so that several
//! connectord nodes serve one fleet from one state. Connected with [`NatsStore::connect`].
//!
//! # Layout
//!
//! Names start with [`NatsConfig::prefix`] (`cd` by default), so that two fleets can share
//! a server. Every bucket and stream has [`NatsConfig::replicas`] replicas (1, or 3 in a
//! three-server cluster) and file storage; `connect` creates them, or binds to them if they
//! exist (a bucket keeps the replicas it was created with).
//!
//! | state | where | key / subject |
//! |---|---|---|
//! | registrations | KV `<p>_registrations` | `<domain>.<name>` |
//! | channels | KV `<p>_channels` | `<key id>` |
//! | subscriptions | KV `<p>_subscriptions` | `<key id>.<endpoint>.<path>` |
//! | pre-subscriptions | KV `<p>_presubscriptions` | `<key id>` |
//! | plugin state | KV `<p>_plugin_state` | `<plugin>.<key>` |
//! | hourly counts | KV `<p>_hour_counts` | `<domain>.<hour>.<node>` (each node its own: `counts`) |
//! | PSKs | KV `<p>_psks` | `ep.<domain>.<endpoint>`, and `id.<identity>` → `<domain>.<endpoint>` |
//! | certificates | KV `<p>_certificates` | `<domain>.<endpoint>.<serial>` |
//! | event numbering epoch | KV `<p>_meta` | `event_epoch` |
//! | the cluster's CA (SHA-256) | KV `<p>_meta` | `ca_sha256` ([`NatsStore::check_ca`]) |
//! | members (heartbeats, 6 s max age) | KV `<p>_nodes` | `<node>` ([`NatsStore::heartbeat`]) |
//! | channel leases (6 s max age) | KV `<p>_channel_owners` | `<key id>` → node ([`NatsStore::claim_channel`]) |
//! | requests to devices | stream `<p>_requests` | `<p>.req.<domain>.<endpoint>` |
//! | events | stream `<p>_events` | `<p>.ev.<key id>`, header `Cd-Seq` (a marker with `Cd-Void: <rows>` voids rows: `channels::Tenure`) |
//! | calls to a node (core NATS, not stored) | request/reply | `<p>.node.<node>.<op>` ([`NatsStore::call_node`]) |
//!
//! KV keys (and subject tokens) allow only `[-/_=.a-zA-Z0-9]`, so every user-chosen name
//! (domain, endpoint name, key id, path, plugin key, ...) is one token, encoded reversibly:
//! base64url without padding, `=` for the empty string ([`enc`], [`dec`]). A value is the
//! record as JSON (the registration's serde form, the request's `record_json::request`, the
//! event's `record_json::event`, ...). Every message the store publishes carries the
//! header `Cd-Node: <node>`, which is how a watch tells another node's writes from ours.
//!
//! # Writes
//!
//! Every write goes to one writer task (an unbounded queue, as the SQLite store's), which
//! publishes in submission order on one connection without waiting for each
//! acknowledgement; each write's [`Pending`] resolves once JetStream acknowledged all its
//! messages (stored, and replicated to a majority for R3), and writes resolve in the order
//! submitted. A failed publish or ack (server unreachable, JetStream not answering within
//! [`NatsConfig::timeout`]) resolves with [`StoreError::Backend`] `unavailable`, and
//! [`Feed::health`] fails until a write succeeds again. Reads go through the same queue and
//! run once every write submitted before them is acknowledged (a read sees the writes
//! submitted before it, as on SQLite), without holding up the writes after them.
//!
//! Decisions and their costs:
//! - **No transactions.** JetStream 2.9 has no atomic multi-message publish. A write of
//!   several messages (a re-registration replacing another id's record, events and the
//!   request they answer, pre-subscriptions and the subscriptions they remove, a device's
//!   revocation) publishes them in order and resolves once all are acknowledged; a crash or
//!   an outage in between applies a prefix. The order is chosen so that the prefix is
//!   harmless: events before the deletion of their request (a request answered twice
//!   rather than never, as on SQLite across a crash), a new record before the deletion of
//!   what it replaces.
//! - **Per-stream order.** Messages on one stream are stored in the order published; two
//!   writes to different buckets are published in order but JetStream may store them in
//!   either order (their `Pending`s still resolve in order).
//! - **One registration per (domain, name)** is the bucket's key, so it holds across nodes
//!   without a lock: a second node's registration of the same endpoint replaces the first.
//!   `delete_registration(id)` needs the key of an id: an in-memory index (`RegIndex`: per
//!   key, the ids it held at known stream sequences), loaded at connect and kept from our
//!   acknowledgements and a watch of the bucket (other nodes' writes); an id is forgotten
//!   once a later message on its key is known. The delete is conditional
//!   (`Nats-Expected-Last-Subject-Sequence` = the sequence that put the id): it removes the
//!   key only if it still holds that registration, so a re-registration by another node
//!   in between stays (the delete then resolves `Ok`: that registration is gone anyway).
//!   Cost: about 200 bytes of index per registration (the daemon keeps every registration
//!   in memory anyway), and the watch delivers each registration write to every node once
//!   more (2.9 cannot filter by header, so a node's own writes come back and are dropped).
//! - **Read-modify-write writes** (deleting a key's or endpoint's subscriptions, replacing
//!   pre-subscriptions, revoking a device, pruning hourly counts, a PSK's identity check)
//!   list the keys they touch: the writer waits for every earlier write's acknowledgement,
//!   reads, then publishes, holding up the queue for those round trips. They are rare.
//!   Between nodes they are not atomic: two nodes racing on the same key id may interleave,
//!   and two nodes putting one PSK identity for two endpoints at once can both pass the
//!   check.
//! - **Two ways to read.** The loads (every record, at start) read through an ephemeral
//!   pull consumer, in batches of 1 024, to the last matching sequence the stream's leader
//!   reports (not to the consumer's pending count), and message by message when no
//!   consumer can be made within the timeout (module `resume`). The listings of the read-modify-write writes and
//!   `plugin_state_keys` read one message per `STREAM.MSG.GET` (`next_by_subj`), which the
//!   stream's leader answers: making a consumer needs the cluster's meta leader, which is
//!   elected again only 5 to 25 s after its server is lost (measured in
//!   `an_r3_cluster_loses_nothing_acknowledged_when_a_server_is_killed`), and on 2.9 a
//!   consumer of an R3 stream is at times placed on the lost server and never answers, so
//!   consumer creation is retried in short attempts within the timeout.
//! - **Durability is JetStream's.** A write resolves when JetStream acknowledged it: on
//!   R1, stored by the server (it survives `kill -9` of the server, tested); on R3,
//!   stored by a majority of the servers. nats-server 2.9 does not fsync each write (its
//!   file store syncs every 2 minutes and has no `sync_interval: always`, which came with
//!   2.10), so unlike SQLite's `synchronous=FULL`, an acknowledged write on one R1 server
//!   can be lost to a power cut or an OS crash within that window; R3 on separate machines
//!   is what covers a machine's loss.
//! - **Plugin-state keys by prefix** list every key of the plugin (one `STREAM.MSG.GET`
//!   each, above) and filter after decoding: a prefix of a name is not a prefix of its
//!   base64 token. Linear in the plugin's keys, a round trip each: fine for listing the
//!   auth plugins' keys now and then, not for a hot path.
//! - **Hourly counts** are kept per (domain, hour, node), each key written by its node
//!   only; `load_hour_counts` answers this node's, [`NatsStore::watch_hour_counts`] the
//!   other nodes' (the limits add them up: a quota holds cluster-wide, module `counts`).
//! - Deleted KV keys leave a delete marker each (JetStream's KV): one per endpoint name,
//!   subscription, plugin key, hour ever deleted. Nothing here compacts them yet.
//!
//! # Events and their numbers
//!
//! `append_events` must answer each event's number at once (not after a round trip), so
//! the numbers are `epoch << EPOCH_SHIFT | n` as on SQLite: `epoch` counted up cluster-wide
//! in the `<p>_meta` bucket (compare-and-set) at each connect, `n` this process's count for
//! the key from 1. So a number is never given twice in the cluster, and a key's numbers
//! grow across restarts (a new connect has a greater epoch than any before it), also for a
//! key whose events were all deleted. Decision, instead of the first plan (initialise a
//! key's counter from its last stored message): `append_events` is synchronous, so it
//! cannot read the server, and a key whose events were all deleted has no last message.
//! When a key's channel moves to another node (one node at a time numbers a key, its
//! channel owner, holding the key's lease: [`NatsStore::claim_channel`]), the new owner
//! calls [`EventLog::load_events_of`] before its first append: that takes a new epoch if
//! another node connected after this one, so the owner's numbers for the key are above
//! every number given before.
//!
//! `delete_events_through(key, seq)` purges the key's subject up to the stream sequence of
//! its last event numbered `<= seq` (a purge with subject filter and sequence, which 2.9
//! has): one request, whatever the count. The stream sequences of events appended or
//! loaded here are kept per key until deleted; for others the subject is read once.
//!
//! # Watches
//!
//! [`Feed::external_changes`] moves when another node (another `Cd-Node`) writes to the
//! plugin-state bucket; this node's own writes are not counted. [`NatsStore::watch_registrations`]
//! streams other nodes' registration writes (the daemon's directory follows them);
//! [`NatsStore::watch_subscriptions`] their subscription and pre-subscription writes
//! (module `follow`: every node lists every subscription; the owner observes);
//! [`NatsStore::watch_hour_counts`] the other nodes' traffic counts (module `counts`);
//! [`NatsStore::credential_changes`] moves on other nodes' PSK and certificate writes
//! (module `credential_changes`); [`NatsStore::watch_channels`] other nodes' channel
//! records (the hub follows them).
//!
//! Every one of them is a resumable watch (`Shared::watch_bucket`, module `resume`): an
//! ordered push consumer on the bucket, supervised by the last stream sequence it
//! delivered; when the bucket's last sequence (`STREAM.INFO`, answered by its leader) is
//! ahead and nothing came for 3 s, or the consumer ended, a new consumer is made from the
//! last sequence + 1, in short attempts until one is. Decision by experiment: after a
//! bucket's leader is killed, the consumer async-nats re-creates by itself was at times
//! never answered (6 of 8 runs); ours, under a new name, were, within 2 ms to 2.7 s. Push
//! rather than polling direct gets: 2 000 messages took 0.9 s by direct gets, 0.1 s by
//! a consumer (module `resume`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishAckFuture, kv, stream::StorageType};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use connectord_model::{
    CertificateRecord, ChannelRecord, Event, HourCount, Job, PresubRecord, PskRecord, Registration,
    StoredEvent, SubscriptionRecord,
};

use crate::health::HealthState;
use crate::sqlite::EPOCH_SHIFT;
use crate::{
    Appended, CredentialStore, EventLog, Feed, Health, Pending, PluginStateStore, QuotaStore,
    RegistrationStore, RequestStore, StoreError, SubscriptionStore, record_json,
};

/// The header naming the node that published a message.
pub const NODE_HEADER: &str = "Cd-Node";
/// The header of an event's sequence number.
pub const SEQ_HEADER: &str = "Cd-Seq";
/// On a message of no event of its own in a key's events subject: the stream rows of that
/// subject's events it voids (comma-separated), which loads skip (`channels::Tenure`).
pub const VOID_HEADER: &str = "Cd-Void";
const KV_OPERATION: &str = "KV-Operation";

/// Where and how to reach the cluster's JetStream.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` of one or more servers of the cluster.
    pub servers: Vec<String>,
    /// Starts every bucket, stream and subject name (`[A-Za-z0-9_-]+`), so that two fleets
    /// can share a server.
    pub prefix: String,
    /// Replicas of each bucket and stream: 1, or 3 on a three-server cluster.
    pub replicas: usize,
    /// This node's name, unique in the cluster (the `Cd-Node` header of its writes).
    pub node: String,
    /// How long a connect, a publish's acknowledgement or a read may take before it is
    /// answered as unavailable.
    pub timeout: Duration,
}

impl NatsConfig {
    /// One server, prefix `cd`, one replica, a 5-second timeout.
    pub fn new(server: impl Into<String>, node: impl Into<String>) -> NatsConfig {
        NatsConfig {
            servers: vec![server.into()],
            prefix: "cd".into(),
            replicas: 1,
            node: node.into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The `<p>_meta` key of the cluster's CA fingerprint.
const CA_KEY: &str = "ca_sha256";

/// How long a node's heartbeat record lives in `<p>_nodes` ([`NatsStore::heartbeat`]).
pub const MEMBER_MAX_AGE: Duration = Duration::from_secs(6);

/// What [`NatsStore::check_ca`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCheck {
    /// No CA was recorded; this one is now.
    Recorded,
    /// The recorded CA is this one.
    Same,
    /// Another CA is recorded: its fingerprint.
    Differs(String),
}

/// A node of the cluster, as its heartbeat records it ([`NatsStore::heartbeat`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// The node's name (`[cluster] node`).
    pub node: String,
    /// Its bound REST addresses.
    pub rest: Vec<String>,
    /// Its bound CoAP (UDP) addresses.
    pub coap: Vec<String>,
    /// When it started, Unix seconds.
    pub started: u64,
    /// Its connectord version.
    pub version: String,
    /// The notification channels it delivers (holds the lease of) at its last heartbeat;
    /// 0 in the records of nodes older than this field.
    #[serde(default)]
    pub owned_channels: u64,
}

/// A change of the registrations made by another node ([`NatsStore::watch_registrations`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RegistrationChange {
    /// Stored or replaced (the endpoint's previous registration, if any, is gone).
    Put(Box<Registration>),
    /// The endpoint's registration was removed.
    Deleted { domain: String, name: String },
}

/// The NATS JetStream store. Dropping it stops its tasks; writes already queued are still
/// published.
pub struct NatsStore {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Op>,
    /// The registrations' and the plugin state's watches, aborted at drop.
    watches: Vec<tokio::task::JoinHandle<()>>,
    external: watch::Receiver<u64>,
    registrations: broadcast::Sender<RegistrationChange>,
    /// The other nodes' hourly counts (`counts`).
    counts: Arc<counts::CountsWatch>,
    /// Moves on other nodes' credential writes (`credential_changes`).
    credentials: Arc<watch::Sender<u64>>,
    /// Other nodes' channel records (`channels`).
    channels: broadcast::Sender<ChannelChange>,
}

/// The names of the buckets and streams.
struct Names {
    registrations: String,
    channels: String,
    subscriptions: String,
    presubscriptions: String,
    plugin_state: String,
    hour_counts: String,
    psks: String,
    certificates: String,
    meta: String,
    /// Membership (heartbeats), with a `max_age`; not one of [`Names::buckets`].
    nodes: String,
    /// Channel leases (`channels`), with a `max_age`; not one of [`Names::buckets`].
    channel_owners: String,
    requests: String,
    events: String,
    /// `<p>.req`, `<p>.ev`.
    req_subject: String,
    ev_subject: String,
    /// `<p>.node`: calls between nodes (`calls`).
    node_subject: String,
}

impl Names {
    fn new(p: &str) -> Names {
        Names {
            registrations: format!("{p}_registrations"),
            channels: format!("{p}_channels"),
            subscriptions: format!("{p}_subscriptions"),
            presubscriptions: format!("{p}_presubscriptions"),
            plugin_state: format!("{p}_plugin_state"),
            hour_counts: format!("{p}_hour_counts"),
            psks: format!("{p}_psks"),
            certificates: format!("{p}_certificates"),
            meta: format!("{p}_meta"),
            nodes: format!("{p}_nodes"),
            channel_owners: format!("{p}_channel_owners"),
            requests: format!("{p}_requests"),
            events: format!("{p}_events"),
            req_subject: format!("{p}.req"),
            ev_subject: format!("{p}.ev"),
            node_subject: format!("{p}.node"),
        }
    }

    fn buckets(&self) -> [&str; 9] {
        [
            &self.registrations,
            &self.channels,
            &self.subscriptions,
            &self.presubscriptions,
            &self.plugin_state,
            &self.hour_counts,
            &self.psks,
            &self.certificates,
            &self.meta,
        ]
    }
}

/// What the writer, the chain's tasks and the watches share.
struct Shared {
    js: jetstream::Context,
    client: async_nats::Client,
    names: Names,
    node: String,
    timeout: Duration,
    health: HealthState,
    /// This process's current event epoch.
    epoch: AtomicU64,
    /// The last number given to each key's events.
    numbered: Mutex<HashMap<String, u64>>,
    /// Each key's known events: number → stream sequence.
    event_rows: Mutex<HashMap<String, BTreeMap<u64, u64>>>,
    /// The `keep_from` of the last pruning of the hourly counts: a save with the same one
    /// (every save within an hour) lists no keys (module `counts`).
    counts_pruned_from: AtomicU64,
    index: Mutex<RegIndex>,
    plugin_kv: kv::Store,
    nodes_kv: kv::Store,
    /// The channel leases (`channels`).
    owners_kv: kv::Store,
    /// This node's tenure of each channel lease it has held, for the appends' fence
    /// (`channels::Tenure`).
    tenures: Mutex<HashMap<String, channels::Tenure>>,
    /// How many tenures this node has begun (a lease created), to tell them apart.
    tenures_begun: AtomicU64,
    /// Every stream (buckets' too) by name, got once at connect.
    streams: HashMap<String, jetstream::stream::Stream>,
}

/// Where each registration id is in the registrations bucket, for `delete_registration(id)`
/// (the bucket is keyed by (domain, name)).
///
/// Per key, the ids it held at the stream sequences known here: our own writes (the
/// sequence unknown until acknowledged) and what the watch saw (other nodes' writes, and
/// everything before connect). An id is forgotten once a later message on its key is
/// known; so nothing is kept per replaced registration, and a watch that lags behind our
/// own writes cannot make us forget a registration that is still stored.
#[derive(Default)]
struct RegIndex {
    by_id: HashMap<String, String>,
    keys: HashMap<String, KeyIds>,
}

#[derive(Default)]
struct KeyIds {
    /// Each id with the stream sequence of the message that put it (`None` while ours is
    /// not acknowledged).
    ids: Vec<(String, Option<u64>)>,
    /// The latest stream sequence known on the key.
    last: u64,
}

impl RegIndex {
    /// We publish a put of `id` on `key`.
    fn submitted(&mut self, key: &str, id: &str) {
        let k = self.keys.entry(key.to_string()).or_default();
        match k.ids.iter_mut().find(|(i, _)| i == id) {
            Some(e) => e.1 = None,
            None => k.ids.push((id.to_string(), None)),
        }
        self.by_id.insert(id.to_string(), key.to_string());
    }

    /// Our put of `id` on `key` was stored at `seq` (`None`: it failed, and may or may not
    /// be stored: kept until a later message on the key is known).
    fn acked(&mut self, key: &str, id: &str, seq: Option<u64>) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        if let Some(e) = k.ids.iter_mut().find(|(i, s)| i == id && s.is_none()) {
            e.1 = Some(seq.unwrap_or(0));
        }
        if let Some(seq) = seq {
            k.last = k.last.max(seq);
        }
        self.prune(key);
    }

    /// Whether a message on `key` at `seq` is older than what this node wrote or knows
    /// there: a later message is known, or a put of ours is not acknowledged yet. A delete
    /// by another node delivered after the device registered here again is then not told
    /// as a removal of that newer registration, which the store still holds (registration
    /// deletes are conditional on the put they saw: a review finding).
    fn superseded(&self, key: &str, seq: u64) -> bool {
        self.keys
            .get(key)
            .is_some_and(|k| k.last > seq || k.ids.iter().any(|(_, s)| s.is_none()))
    }

    /// A message on `key` at `seq`: a put of `id`, or a delete (`None`).
    fn observed(&mut self, key: &str, seq: u64, id: Option<&str>) {
        let k = self.keys.entry(key.to_string()).or_default();
        k.last = k.last.max(seq);
        if let Some(id) = id {
            match k.ids.iter_mut().find(|(i, _)| i == id) {
                Some(e) => e.1 = Some(e.1.map_or(seq, |s| s.max(seq))),
                None => k.ids.push((id.to_string(), Some(seq))),
            }
            self.by_id.insert(id.to_string(), key.to_string());
        }
        self.prune(key);
    }

    /// Forgets the ids of `key` put before the latest message known on it.
    fn prune(&mut self, key: &str) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        let last = k.last;
        let by_id = &mut self.by_id;
        k.ids.retain(|(id, s)| {
            let keep = s.is_none_or(|s| s >= last);
            if !keep && by_id.get(id).is_some_and(|k| k == key) {
                by_id.remove(id);
            }
            keep
        });
        if k.ids.is_empty() {
            self.keys.remove(key);
        }
    }

    /// Where `id` is: its key, and the sequence that put it if known (`None`: our put is
    /// not acknowledged yet).
    fn find(&self, id: &str) -> Option<(String, Option<u64>)> {
        let key = self.by_id.get(id)?;
        let (_, seq) = self.keys.get(key)?.ids.iter().find(|(i, _)| i == id)?;
        Some((key.clone(), *seq))
    }
}

/// A subject token for a user-chosen name: base64url without padding, `=` for "".
pub fn enc(s: &str) -> String {
    if s.is_empty() {
        "=".into()
    } else {
        URL_SAFE_NO_PAD.encode(s)
    }
}

/// The name [`enc`] encoded; `None` if `t` is not such a token.
pub fn dec(t: &str) -> Option<String> {
    if t == "=" {
        return Some(String::new());
    }
    String::from_utf8(URL_SAFE_NO_PAD.decode(t).ok()?).ok()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        source: format!("NATS JetStream: {e}").into(),
        unavailable: true,
    }
}

fn refused(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        source: format!("NATS JetStream: {e}").into(),
        unavailable: false,
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<Bytes, StoreError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The meta bucket's key of the cluster's event epoch.
const EPOCH_KEY: &str = "event_epoch";

/// Whether a KV message's headers make it a delete or purge marker.
fn kv_deleted(headers: &HeaderMap) -> bool {
    headers
        .get(KV_OPERATION)
        .is_some_and(|v| matches!(v.as_str(), "DEL" | "PURGE"))
}

/// A KV key's last message, as [`Shared::kv_last`] reads it.
struct KvLast {
    /// Its value; None for a delete or purge marker.
    value: Option<Bytes>,
    revision: u64,
}

/// The rows the void markers among `msgs` void ([`VOID_HEADER`]).
fn voided_rows(msgs: &[Raw]) -> std::collections::HashSet<u64> {
    msgs.iter()
        .filter_map(|m| m.header(VOID_HEADER))
        .flat_map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()))
        .collect()
}

/// A message as read from a stream.
struct Raw {
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
    seq: u64,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    /// A KV delete or purge marker.
    fn is_kv_delete(&self) -> bool {
        self.headers.as_ref().is_some_and(kv_deleted)
    }

    /// The decoded tokens of the subject after `skip` tokens.
    fn tokens(&self, skip: usize) -> Option<Vec<String>> {
        self.subject.split('.').skip(skip).map(dec).collect()
    }
}

/// A message to publish.
struct Msg {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// One queued operation. Reads are closures run once the writes before them are
/// acknowledged.
enum Op {
    PutRegistration(Registration, Reply<()>),
    DeleteRegistration(String, Reply<()>),
    PutChannel(ChannelRecord, Reply<()>),
    DeleteChannel(String, Reply<()>),
    AppendEvents(Vec<StoredEvent>, Option<u64>, Reply<()>),
    DeleteEventsThrough(String, u64, Reply<()>),
    /// A channel lease given up, after the appends before it (`channels`).
    ReleaseChannel(String, Reply<()>),
    PutRequest(Job, Reply<u64>),
    DeleteRequest(u64, Reply<()>),
    PluginPut(String, String, Vec<u8>, Reply<()>),
    PluginDelete(String, String, Reply<()>),
    PutSubscription(SubscriptionRecord, Reply<()>),
    DeleteSubscriptions(String, Option<String>, Option<String>, Reply<()>),
    ReplacePresubscriptions(PresubRecord, Reply<()>),
    SaveHourCounts(Vec<HourCount>, u64, Reply<()>),
    PutPsk(PskRecord, Reply<()>),
    PutCertificate(CertificateRecord, Reply<()>),
    RevokeDevice(String, String, u64, Reply<()>),
    Read(ReadFn),
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
type ReadFn = Box<dyn FnOnce(Arc<Shared>) -> BoxFuture<'static, ()> + Send>;

impl NatsStore {
    /// Connects to `cfg.servers`, creates the buckets and streams (or binds to them) and
    /// takes this process's event epoch. Fails with an `unavailable` [`StoreError::Backend`]
    /// when no server answers or JetStream does not within `cfg.timeout`.
    pub async fn connect(cfg: NatsConfig) -> Result<NatsStore, StoreError> {
        if cfg.prefix.is_empty()
            || !cfg
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(refused(format!(
                "the prefix {:?} is not [A-Za-z0-9_-]+",
                cfg.prefix
            )));
        }
        if cfg.node.is_empty() || cfg.node.contains(['\r', '\n']) {
            return Err(refused(format!(
                "the node name {:?} is not usable",
                cfg.node
            )));
        }
        let t = cfg.timeout;
        let options = async_nats::ConnectOptions::new()
            .name(format!("connectord {}", cfg.node))
            .connection_timeout(t)
            .request_timeout(Some(t));
        let client = tokio::time::timeout(
            t + t,
            async_nats::connect_with_options(cfg.servers.clone(), options),
        )
        .await
        .map_err(|_| unavailable("connecting timed out"))?
        .map_err(unavailable)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(t)
            .max_ack_inflight(16_384)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let names = Names::new(&cfg.prefix);
        let mut plugin_kv = None;
        for bucket in names.buckets() {
            let store = bind_bucket(&js, bucket, cfg.replicas).await?;
            if bucket == names.plugin_state {
                plugin_kv = Some(store);
            }
        }
        let plugin_kv = plugin_kv.ok_or_else(|| refused("no plugin-state bucket"))?;
        let nodes_kv =
            bind_bucket_aged(&js, &names.nodes, cfg.replicas, Some(MEMBER_MAX_AGE)).await?;
        let owners_kv = bind_bucket_aged(
            &js,
            &names.channel_owners,
            cfg.replicas,
            Some(CHANNEL_LEASE_MAX_AGE),
        )
        .await?;
        for (name, subject) in [
            (&names.requests, &names.req_subject),
            (&names.events, &names.ev_subject),
        ] {
            js.get_or_create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{subject}.>")],
                storage: StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("stream {name}: {e}")))?;
        }
        let mut streams = HashMap::new();
        let all = names
            .buckets()
            .map(|b| format!("KV_{b}"))
            .into_iter()
            .chain([
                format!("KV_{}", names.nodes),
                format!("KV_{}", names.channel_owners),
                names.requests.clone(),
                names.events.clone(),
            ]);
        for name in all {
            let stream = js
                .get_stream(&name)
                .await
                .map_err(|e| unavailable(format!("stream {name}: {e}")))?;
            streams.insert(name, stream);
        }
        let shared = Arc::new(Shared {
            streams,
            js,
            client,
            names,
            node: cfg.node.clone(),
            timeout: t,
            health: HealthState::default(),
            epoch: AtomicU64::new(0),
            numbered: Mutex::new(HashMap::new()),
            event_rows: Mutex::new(HashMap::new()),
            counts_pruned_from: AtomicU64::new(0),
            index: Mutex::new(RegIndex::default()),
            plugin_kv,
            nodes_kv,
            owners_kv,
            tenures: Mutex::new(HashMap::new()),
            tenures_begun: AtomicU64::new(0),
        });
        let epoch = shared.next_epoch().await?;
        shared.epoch.store(epoch, Ordering::SeqCst);

        let mut tasks = Vec::new();
        let (registrations, _) = broadcast::channel(4096);
        let (caught_up_tx, caught_up) = oneshot::channel();
        tasks.push(
            shared
                .clone()
                .watch_registration_bucket(registrations.clone(), caught_up_tx)
                .await?,
        );
        tokio::time::timeout(t, caught_up)
            .await
            .map_err(|_| unavailable("reading the registrations timed out"))?
            .map_err(|_| unavailable("the registrations watch ended"))??;
        let (external_tx, external) = watch::channel(0u64);
        tasks.push(shared.clone().watch_plugin_state(external_tx).await?);
        let credentials = Arc::new(watch::channel(0u64).0);
        for bucket in [&shared.names.psks, &shared.names.certificates] {
            tasks.push(
                shared
                    .clone()
                    .watch_credential_bucket(bucket.clone(), Arc::clone(&credentials))
                    .await?,
            );
        }
        let counts = counts::CountsWatch::new();
        tasks.push(
            shared
                .clone()
                .watch_hour_count_bucket(Arc::clone(&counts))
                .await?,
        );
        let (channels, _) = broadcast::channel(4096);
        tasks.push(
            shared
                .clone()
                .watch_channel_bucket(channels.clone())
                .await?,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            shared: shared.clone(),
            last: None,
        };
        tokio::spawn(writer.run(rx));
        Ok(NatsStore {
            shared,
            tx,
            watches: tasks,
            external,
            registrations,
            counts,
            credentials,
            channels,
        })
    }

    /// Other nodes' writes to the registrations bucket, from now on, in the bucket's order.
    /// A receiver that falls behind by more than 4 096 changes gets
    /// [`broadcast::error::RecvError::Lagged`] and should reload.
    pub fn watch_registrations(&self) -> broadcast::Receiver<RegistrationChange> {
        self.registrations.subscribe()
    }

    /// This process's current event epoch (tests, diagnostics).
    pub fn event_epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }

    /// Records `fingerprint` (the cluster's CA certificate, SHA-256 in hex) in the
    /// `<p>_meta` bucket (key `ca_sha256`) if no node recorded one yet, and answers what
    /// the cluster holds now: [`CaCheck::Recorded`] (this call wrote it), [`CaCheck::Same`]
    /// or [`CaCheck::Differs`] with the recorded one. Every node must sign device
    /// certificates with the same CA (one from `/api/cert` on one node must verify on the
    /// others), so a node whose CA differs is refused by the daemon. Create-if-absent is
    /// atomic: two nodes starting at once with different CAs cannot both record theirs.
    pub async fn check_ca(&self, fingerprint: &str) -> Result<CaCheck, StoreError> {
        let t = self.shared.timeout;
        let meta = self
            .shared
            .js
            .get_key_value(&self.shared.names.meta)
            .await
            .map_err(unavailable)?;
        for _ in 0..4 {
            let now = tokio::time::timeout(t, meta.get(CA_KEY))
                .await
                .map_err(|_| unavailable("reading the CA fingerprint timed out"))?
                .map_err(unavailable)?;
            if let Some(v) = now {
                let recorded = String::from_utf8_lossy(&v).into_owned();
                return Ok(if recorded == fingerprint {
                    CaCheck::Same
                } else {
                    CaCheck::Differs(recorded)
                });
            }
            let created =
                tokio::time::timeout(t, meta.create(CA_KEY, Bytes::from(fingerprint.to_string())))
                    .await
                    .map_err(|_| unavailable("recording the CA fingerprint timed out"))?;
            match created {
                Ok(_) => return Ok(CaCheck::Recorded),
                // Another node recorded one meanwhile: read it again.
                Err(e) => tracing::debug!("store: CA fingerprint recorded meanwhile ({e})"),
            }
        }
        Err(unavailable("could not record the CA fingerprint"))
    }

    /// The streams of this cluster's state (every bucket's and stream's, as `connect` bound
    /// them) that the server answers it does not have: JetStream's "stream not found",
    /// nothing else. Empty while they all exist, and also when the server cannot be asked
    /// (an outage is not a loss: it is the answer of a server that is up). A server that
    /// lost its store (brought back on a new disk, or without its store directory) has none
    /// of them; the daemon watches for that (`cluster::run_heartbeat`).
    ///
    /// The streams are asked at once, all within one [`NatsConfig::timeout`] (one after
    /// the other, a server that does not answer held the heartbeat for 13 timeouts: a
    /// review).
    pub async fn missing_streams(&self) -> Vec<String> {
        use jetstream::context::GetStreamErrorKind;
        let asks = self.shared.streams.keys().map(|name| async move {
            let asked = self.shared.js.get_stream(name).await;
            match asked {
                Err(e)
                    if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    Some(name.clone())
                }
                _ => None,
            }
        });
        let answers =
            tokio::time::timeout(self.shared.timeout, futures_util::future::join_all(asks))
                .await
                .unwrap_or_default();
        let mut missing: Vec<String> = answers.into_iter().flatten().collect();
        missing.sort();
        missing
    }

    /// Puts this node's record into the `<p>_nodes` bucket, whose entries expire after
    /// [`MEMBER_MAX_AGE`]: a node that stops heartbeating (killed, cut off) drops out of
    /// [`NatsStore::members`] within that time. Written directly, not through the write
    /// queue (a heartbeat needs no order with the state's writes).
    pub async fn heartbeat(&self, member: &Member) -> Result<(), StoreError> {
        let value = json(member)?;
        let t = self.shared.timeout;
        tokio::time::timeout(t, self.shared.nodes_kv.put(enc(&member.node), value))
            .await
            .map_err(|_| unavailable("heartbeat timed out"))?
            .map_err(unavailable)?;
        Ok(())
    }

    /// The largest message the NATS server takes (its `max_payload`, 1 MiB by default),
    /// as it said when this node connected.
    pub fn max_payload(&self) -> usize {
        self.shared.client.server_info().max_payload
    }

    /// `node`'s record in the members bucket and its revision, if it has one that has not
    /// expired (a node that stopped cleanly removed its own; a killed one's lasts
    /// [`MEMBER_MAX_AGE`]).
    pub async fn member_record(&self, node: &str) -> Result<Option<(u64, Member)>, StoreError> {
        let t = self.shared.timeout;
        let entry = tokio::time::timeout(t, self.shared.nodes_kv.entry(enc(node)))
            .await
            .map_err(|_| unavailable("reading a member's record timed out"))?
            .map_err(unavailable)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                serde_json::from_slice::<Member>(&e.value)
                    .ok()
                    .map(|m| (e.revision, m))
            }))
    }

    /// Removes `node`'s record (at a clean stop).
    pub async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let t = self.shared.timeout;
        tokio::time::timeout(t, self.shared.nodes_kv.delete(enc(node)))
            .await
            .map_err(|_| unavailable("leaving timed out"))?
            .map_err(unavailable)?;
        Ok(())
    }

    /// The nodes whose heartbeat is younger than [`MEMBER_MAX_AGE`], by name. Read from
    /// the bucket's stream directly (no consumer, see `list_direct`).
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let stream = format!("KV_{}", self.shared.names.nodes);
        let raw = self
            .shared
            .list_direct(&stream, &format!("$KV.{}.>", self.shared.names.nodes))
            .await?;
        let mut out: Vec<Member> = raw
            .iter()
            .filter(|m| !m.is_kv_delete())
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect();
        out.sort_by(|a: &Member, b| a.node.cmp(&b.node));
        Ok(out)
    }

    fn submit<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        match self.tx.send(op(tx)) {
            Ok(()) => Pending::new(rx),
            Err(_) => Pending::failed(StoreError::Closed),
        }
    }

    fn read<T: Send + 'static, F>(
        &self,
        f: impl FnOnce(Arc<Shared>) -> F + Send + 'static,
    ) -> Pending<T>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run: ReadFn = Box::new(move |shared| {
            Box::pin(async move {
                let _ = tx.send(f(shared).await);
            })
        });
        match self.tx.send(Op::Read(run)) {
            Ok(()) => Pending::new(rx),
            Err(_) => Pending::failed(StoreError::Closed),
        }
    }
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        // The writer ends by itself once the queue is closed and empty; the watches
        // would run forever.
        for t in &self.watches {
            t.abort();
        }
    }
}

async fn bind_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    bind_bucket_aged(js, bucket, replicas, None).await
}

/// [`bind_bucket`], its entries removed after `max_age` if given.
async fn bind_bucket_aged(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
    max_age: Option<Duration>,
) -> Result<kv::Store, StoreError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    // The bucket's stream as `create_key_value` makes it (history 1). Not that call
    // itself: it reads the account's info first, whose 2.9 answer async-nats 0.52 cannot
    // parse ("data did not match any variant of untagged enum Response").
    let created = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            discard: jetstream::stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            // No longer than the entries live (the server refuses that).
            duplicate_window: max_age.map_or(Duration::from_secs(120), |a| {
                a.min(Duration::from_secs(120))
            }),
            storage: StorageType::File,
            num_replicas: replicas,
            max_age: max_age.unwrap_or_default(),
            ..Default::default()
        })
        .await;
    match created {
        Ok(_) => js
            .get_key_value(bucket)
            .await
            .map_err(|e| unavailable(format!("bucket {bucket}: {e}"))),
        Err(e) => Err(unavailable(format!("bucket {bucket}: {e}"))),
    }
}

impl Shared {
    fn stream(&self, name: &str) -> Result<&jetstream::stream::Stream, StoreError> {
        self.streams
            .get(name)
            .ok_or_else(|| refused(format!("no stream {name}")))
    }

    /// Every message of `stream` matching `filter`, in order, one `STREAM.MSG.GET`
    /// (`next_by_subj`) each. Decision: for the small listings of the read-modify-write
    /// writes and `plugin_state_keys` rather than a consumer, because making a consumer
    /// needs the cluster's meta leader, which takes 10 to 16 s to be elected again after
    /// its server is lost (measured, `an_r3_cluster_loses_nothing_acknowledged_when_a_server_is_killed`),
    /// while these requests go to the stream's own leader. One round trip per message:
    /// the loads at start (every record) use a consumer instead.
    async fn list_direct(&self, stream: &str, filter: &str) -> Result<Vec<Raw>, StoreError> {
        let mut out = Vec::new();
        self.list_direct_from(stream, filter, 1, u64::MAX, &mut out)
            .await?;
        Ok(out)
    }

    /// The messages of `stream` matching `filter` from the sequence `next` through `upto`,
    /// appended to `out` as they come (one `STREAM.MSG.GET` each, see [`Shared::list_direct`]).
    async fn list_direct_from(
        &self,
        stream: &str,
        filter: &str,
        mut next: u64,
        upto: u64,
        out: &mut Vec<Raw>,
    ) -> Result<(), StoreError> {
        let stream = self.stream(stream)?;
        while next <= upto {
            let got = tokio::time::timeout(
                self.timeout,
                stream
                    .raw_message_builder()
                    .sequence(next)
                    .next_by_subject(filter)
                    .send(),
            )
            .await
            .map_err(|_| unavailable("reading timed out"))?;
            match got {
                Ok(m) => {
                    next = m.sequence + 1;
                    out.push(Raw {
                        subject: m.subject.to_string(),
                        headers: Some(m.headers),
                        payload: m.payload,
                        seq: m.sequence,
                    });
                }
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    return Ok(());
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(())
    }

    /// Runs `f` (making a consumer) until it succeeds, each attempt bounded by a quarter
    /// of the timeout (at least a second), all of them by the timeout. Decision: on 2.9, a
    /// consumer of an R3 stream made while one of its servers is down is at times placed
    /// on that server, and its creation then waits for an answer that never comes (seen
    /// in `an_r3_cluster_loses_nothing_acknowledged_when_a_server_is_killed`: a node's
    /// connect failed for 30 s); another attempt is placed again, most likely elsewhere.
    async fn attempts<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
        &self,
        what: &str,
        mut f: impl FnMut() -> F,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let each = (self.timeout / 4).max(Duration::from_secs(1));
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let last = match tokio::time::timeout(each.min(left), f()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(unavailable(format!("{what}: {last}")));
            }
            tracing::debug!("store: {what}: {last}; again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(NODE_HEADER, self.node.as_str());
        h
    }

    fn kv_subject(bucket: &str, key: &str) -> String {
        format!("$KV.{bucket}.{key}")
    }

    fn kv_put(&self, bucket: &str, key: &str, payload: Bytes) -> Msg {
        Msg {
            subject: Self::kv_subject(bucket, key),
            headers: self.headers(),
            payload,
        }
    }

    fn kv_delete(&self, bucket: &str, key: &str) -> Msg {
        let mut headers = self.headers();
        headers.insert(KV_OPERATION, "DEL");
        Msg {
            subject: Self::kv_subject(bucket, key),
            headers,
            payload: Bytes::new(),
        }
    }

    /// A KV delete that applies only while the key's last message is at `seq`
    /// (`Nats-Expected-Last-Subject-Sequence`); unconditional without `seq`.
    fn kv_delete_if(&self, bucket: &str, key: &str, seq: Option<u64>) -> Msg {
        let mut m = self.kv_delete(bucket, key);
        if let Some(seq) = seq {
            m.headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
        }
        m
    }

    fn event_subject(&self, key_id: &str) -> String {
        format!("{}.{}", self.names.ev_subject, enc(key_id))
    }

    /// Counts the cluster's event epoch up by one (compare-and-set) and answers it.
    ///
    /// The last count is read from the meta stream's leader, not with a direct get: a
    /// direct get may be answered by a replica that has not seen the last count yet, and a
    /// compare-and-set on its revision fails however often it is tried. A try lost to
    /// another node's count is tried again at once (after up to 1 ms of jitter, so that
    /// nodes started together do not stay in step); any other failure (the stream has no
    /// leader yet: right after the first start made it, or after its leader's server was
    /// lost) after a pause that grows from 5 to 250 ms, with jitter; until the store's
    /// timeout has passed, then the last failure is the error.
    /// (Before: 32 tries, whatever failed, and then the start was refused: 128 nodes
    /// started at once refused one, and CI saw a node refused on a fresh cluster.)
    async fn next_epoch(&self) -> Result<u64, StoreError> {
        let meta = self
            .js
            .get_key_value(&self.names.meta)
            .await
            .map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            // Err((lost to another node's count, why)).
            let tried = match self.epoch_entry().await {
                Ok(last) => {
                    let (next, revision) = last.map_or((1, 0), |(n, rev)| (n + 1, rev));
                    // Revision 0 expects no message on the subject: a create.
                    meta.update(EPOCH_KEY, next.to_string().into(), revision)
                        .await
                        .map(|_| next)
                        .map_err(|e| {
                            (
                                e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                                e.to_string(),
                            )
                        })
                }
                Err(e) => Err((false, e.to_string())),
            };
            let (lost, e) = match tried {
                Ok(epoch) => return Ok(epoch),
                Err(e) => e,
            };
            // Lost to another node: read and try again at once (up to 1 ms apart, so
            // that the nodes racing do not stay in step); anything else after a pause.
            let wait = if lost {
                Duration::from_micros(rand::random_range(0..1000))
            } else {
                pause.mul_f64(1.0 + rand::random::<f64>())
            };
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(unavailable(format!(
                    "could not count the event epoch up within {} ms: {e}",
                    self.timeout.as_millis()
                )));
            }
            tracing::debug!("store: counting the event epoch up failed ({e}); again");
            tokio::time::sleep(wait).await;
            if !lost {
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }

    /// The cluster's last event epoch and its revision, read from the meta stream's
    /// leader; None when it was never counted.
    async fn epoch_entry(&self) -> Result<Option<(u64, u64)>, StoreError> {
        match self.kv_last(&self.names.meta, EPOCH_KEY).await? {
            None => Ok(None),
            // Deleted (nothing does): counted on from 0, at the marker's revision.
            Some(KvLast {
                value: None,
                revision,
            }) => Ok(Some((0, revision))),
            Some(KvLast {
                value: Some(v),
                revision,
            }) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(|n| Some((n, revision)))
                .ok_or_else(|| StoreError::Corrupt("the event epoch".into())),
        }
    }

    /// The cluster's last event epoch (0 before the first count), from the meta stream's
    /// leader: a replica behind it could answer one below this node's own.
    async fn last_epoch(&self) -> Result<u64, StoreError> {
        Ok(self.epoch_entry().await?.map_or(0, |(n, _)| n))
    }

    /// The live values of a bucket whose keys match `filter` (after `$KV.<bucket>.`).
    async fn read_bucket(&self, bucket: &str, filter: &str) -> Result<Vec<Raw>, StoreError> {
        let mut all = self
            .read_all(
                &format!("KV_{bucket}"),
                format!("$KV.{bucket}.{filter}"),
                consumer::DeliverPolicy::LastPerSubject,
                false,
            )
            .await?;
        all.retain(|m| !m.is_kv_delete());
        Ok(all)
    }

    /// The live keys of a bucket matching `filter`, as subject tokens after the bucket.
    async fn bucket_keys(&self, bucket: &str, filter: &str) -> Result<Vec<String>, StoreError> {
        let skip = "$KV.".len() + bucket.len() + 1;
        Ok(self
            .bucket_list(bucket, filter)
            .await?
            .into_iter()
            .filter_map(|m| m.subject.get(skip..).map(str::to_string))
            .collect())
    }

    /// The live entries of a bucket whose keys match `filter`, read with [`Shared::list_direct`].
    async fn bucket_list(&self, bucket: &str, filter: &str) -> Result<Vec<Raw>, StoreError> {
        let mut all = self
            .list_direct(&format!("KV_{bucket}"), &format!("$KV.{bucket}.{filter}"))
            .await?;
        all.retain(|m| !m.is_kv_delete());
        Ok(all)
    }

    /// The value of one key, if live.
    async fn bucket_get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.kv_last(bucket, key).await?.and_then(|l| l.value))
    }

    /// The last message of key `key` (a subject token) of bucket `bucket`, from its
    /// stream's leader (`STREAM.MSG.GET`: a direct get may be answered by a replica that
    /// has not seen the last write); None when the key has none.
    async fn kv_last(&self, bucket: &str, key: &str) -> Result<Option<KvLast>, StoreError> {
        let stream = self.stream(&format!("KV_{bucket}"))?;
        match stream
            .get_last_raw_message_by_subject(&Self::kv_subject(bucket, key))
            .await
        {
            Ok(m) => Ok(Some(KvLast {
                value: (!kv_deleted(&m.headers)).then_some(m.payload),
                revision: m.sequence,
            })),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Events read from the events stream (`filter` below it), numbers and stream
    /// sequences remembered for deletes.
    async fn read_events(&self, filter: String) -> Result<Vec<StoredEvent>, StoreError> {
        let msgs = self
            .read_all(
                &self.names.events,
                filter,
                consumer::DeliverPolicy::All,
                false,
            )
            .await?;
        let voided = voided_rows(&msgs);
        let mut out = Vec::with_capacity(msgs.len());
        let mut rows = self.event_rows.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs {
            if voided.contains(&m.seq) || m.header(VOID_HEADER).is_some() {
                continue;
            }
            let key = m
                .tokens(2)
                .and_then(|mut t| (t.len() == 1).then(|| t.remove(0)));
            let seq = m.header(SEQ_HEADER).and_then(|s| s.parse::<u64>().ok());
            let (Some(key_id), Some(seq)) = (key, seq) else {
                tracing::error!("store: skipping unreadable event at {}", m.subject);
                continue;
            };
            let event = match std::str::from_utf8(&m.payload)
                .map_err(|e| e.to_string())
                .and_then(record_json::read_event)
            {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!("store: skipping unreadable event: {e}");
                    continue;
                }
            };
            rows.entry(key_id.clone()).or_default().insert(seq, m.seq);
            out.push(StoredEvent { key_id, seq, event });
        }
        Ok(out)
    }

    async fn watch_registration_bucket(
        self: Arc<Self>,
        changes: broadcast::Sender<RegistrationChange>,
        caught_up: oneshot::Sender<Result<(), StoreError>>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let bucket = self.names.registrations.clone();
        let skip = 2;
        self.watch_bucket(
            "registrations",
            bucket,
            resume::Start::Current,
            false,
            Some(caught_up),
            move |shared, raw, live| {
                let ours = raw.header(NODE_HEADER) == Some(shared.node.as_str());
                // Before catching up, everything (ours from an earlier run too); after,
                // only other nodes' writes (ours are in the index from their acks).
                if live && ours {
                    return;
                }
                let seq = raw.seq;
                let key = raw
                    .subject
                    .split('.')
                    .skip(skip)
                    .collect::<Vec<_>>()
                    .join(".");
                if raw.is_kv_delete() {
                    let stale = {
                        let mut index = shared.index.lock().unwrap_or_else(|p| p.into_inner());
                        let stale = index.superseded(&key, seq);
                        index.observed(&key, seq, None);
                        stale
                    };
                    if live
                        && !stale
                        && let Some([domain, name]) = raw
                            .tokens(skip)
                            .and_then(|t| <[String; 2]>::try_from(t).ok())
                    {
                        let _ = changes.send(RegistrationChange::Deleted { domain, name });
                    }
                } else {
                    match serde_json::from_slice::<Registration>(&raw.payload) {
                        Ok(reg) => {
                            shared
                                .index
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .observed(&key, seq, Some(&reg.id));
                            if live {
                                let _ = changes.send(RegistrationChange::Put(Box::new(reg)));
                            }
                        }
                        Err(e) => {
                            tracing::error!("store: skipping unreadable registration: {e}")
                        }
                    }
                }
            },
        )
        .await
    }

    async fn watch_plugin_state(
        self: Arc<Self>,
        external: watch::Sender<u64>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let bucket = self.names.plugin_state.clone();
        // The daemon's own state (`CORE_STATE_OWNER`, a watermark written every second
        // while registrations come) is no plugin's: no reload for it.
        let core = format!("$KV.{bucket}.{}.", enc(crate::CORE_STATE_OWNER));
        self.watch_bucket(
            "plugin-state",
            bucket,
            resume::Start::New,
            true,
            None,
            move |shared, raw, _| {
                if raw.header(NODE_HEADER) != Some(shared.node.as_str())
                    && !raw.subject.starts_with(core.as_str())
                {
                    external.send_modify(|n| *n += 1);
                }
            },
        )
        .await
    }

    /// An ordered push consumer on a whole bucket, and how many messages it had pending
    /// when created.
    async fn ordered(
        &self,
        bucket: &str,
        policy: consumer::DeliverPolicy,
        headers_only: bool,
    ) -> Result<(consumer::push::Ordered, u64), StoreError> {
        let stream = self.stream(&format!("KV_{bucket}"))?;
        let config = consumer::push::OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy: policy,
            headers_only,
            ..Default::default()
        };
        let consumer = self
            .attempts(&format!("watching {bucket}"), || {
                stream.create_consumer(config.clone())
            })
            .await?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(unavailable)?;
        Ok((messages, pending))
    }
}

/// The writer task's state: the end of the chain of writes in flight.
struct Writer {
    shared: Arc<Shared>,
    /// Fires when the last linked operation has resolved.
    last: Option<oneshot::Receiver<()>>,
}

/// What an operation resolves with once its messages are acknowledged.
type Acks = Vec<PublishAckFuture>;

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(op) = rx.recv().await {
            self.apply(op).await;
        }
        self.barrier().await;
    }

    /// Waits until every operation linked so far has resolved.
    async fn barrier(&mut self) {
        if let Some(last) = self.last.take() {
            let _ = last.await;
        }
    }

    /// Publishes `msgs` in order (each send bounded by the timeout); the acks to wait for,
    /// or the first failure.
    async fn publish(&self, msgs: Vec<Msg>) -> Result<Acks, StoreError> {
        Writer::send(&self.shared, msgs).await
    }

    async fn send(shared: &Shared, msgs: Vec<Msg>) -> Result<Acks, StoreError> {
        // Decision: while the client knows it has lost its server, a write fails at once
        // rather than waiting in the client's buffer until its acknowledgement times out
        // (measured: 200 writes of an outage took the 2 s timeout, now milliseconds), and
        // once that buffer is full the writer, which sends one write after the other,
        // would wait a timeout per write. Writes sent before the loss was noticed fail
        // when their acknowledgements time out, together.
        if shared.client.connection_state() == async_nats::connection::State::Disconnected {
            return Err(unavailable("not connected to any NATS server"));
        }
        let mut acks = Vec::with_capacity(msgs.len());
        for m in msgs {
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload)
                .headers(m.headers);
            let ack =
                tokio::time::timeout(shared.timeout, shared.js.send_publish(m.subject, publish))
                    .await
                    .map_err(|_| unavailable("publishing timed out"))?
                    .map_err(unavailable)?;
            acks.push(ack);
        }
        Ok(acks)
    }

    /// Links an operation into the chain: `work` runs at once (its messages are sent);
    /// `finish` gets its result once every earlier operation resolved, so operations
    /// resolve in submission order. With `after` the work itself waits for them first.
    fn link<R: Send + 'static>(
        &mut self,
        after: bool,
        work: impl Future<Output = R> + Send + 'static,
        finish: impl FnOnce(R) + Send + 'static,
    ) {
        let (done, next) = oneshot::channel();
        let prev = self.last.replace(next);
        tokio::spawn(async move {
            let r = if after {
                if let Some(p) = prev {
                    let _ = p.await;
                }
                work.await
            } else {
                let r = work.await;
                if let Some(p) = prev {
                    let _ = p.await;
                }
                r
            };
            finish(r);
            let _ = done.send(());
        });
    }

    /// Publishes and links: `reply` gets `then(sequences)` once every message is
    /// acknowledged, or the first error.
    async fn write<T: Send + 'static>(
        &mut self,
        msgs: Vec<Msg>,
        reply: Reply<T>,
        then: impl FnOnce(&Shared, Vec<u64>) -> Result<T, StoreError> + Send + 'static,
    ) {
        let sent = self.publish(msgs).await;
        let shared = self.shared.clone();
        self.link(false, async move { acked(sent).await }, move |r| {
            let r = r.and_then(|seqs| then(&shared, seqs));
            shared.record(&r);
            let _ = reply.send(r);
        });
    }

    /// A write that needs the server's answer to earlier writes first (reads before it
    /// publishes): waits for them, holding up the queue.
    async fn write_after<T: Send + 'static>(
        &mut self,
        reply: Reply<T>,
        plan: impl AsyncFnOnce(&Shared) -> Result<(Vec<Msg>, T), StoreError>,
    ) {
        self.barrier().await;
        match plan(&self.shared).await {
            Ok((msgs, v)) => self.write(msgs, reply, move |_, _| Ok(v)).await,
            Err(e) => {
                if e.is_unavailable() {
                    self.shared.health.failed(&e);
                }
                let _ = reply.send(Err(e));
            }
        }
    }

    async fn apply(&mut self, op: Op) {
        let s = self.shared.clone();
        let n = &s.names;
        match op {
            Op::PutRegistration(reg, reply) => {
                let key = format!("{}.{}", enc(&reg.domain), enc(&reg.name));
                let payload = match json(&reg) {
                    Ok(p) => p,
                    Err(e) => return drop(reply.send(Err(e))),
                };
                let mut msgs = vec![s.kv_put(&n.registrations, &key, payload)];
                {
                    let mut index = s.index.lock().unwrap_or_else(|p| p.into_inner());
                    // The same id under another (domain, name) (not done by the daemon):
                    // that record goes, if it still holds the id.
                    if let Some((old, seq)) = index.find(&reg.id)
                        && old != key
                    {
                        msgs.push(s.kv_delete_if(&n.registrations, &old, seq));
                    }
                    index.submitted(&key, &reg.id);
                }
                let sent = self.publish(msgs).await;
                self.link(false, acked_each(sent), move |r| {
                    let stored = r
                        .as_ref()
                        .ok()
                        .and_then(|r| r.first()?.as_ref().ok().copied());
                    s.index
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .acked(&key, &reg.id, stored);
                    let r = r.and_then(|acks| {
                        for a in acks {
                            match a {
                                Ok(_) | Err(AckError::Replaced) => {}
                                Err(AckError::Failed(e)) => return Err(e),
                            }
                        }
                        Ok(())
                    });
                    s.record(&r);
                    let _ = reply.send(r);
                });
            }
            Op::DeleteRegistration(id, reply) => {
                let found = s.index.lock().unwrap_or_else(|p| p.into_inner()).find(&id);
                match found {
                    // Unknown here: not stored (a registration is deleted by the node
                    // that wrote it, or after the watch told of it).
                    None => self.link(false, async {}, move |()| {
                        let _ = reply.send(Ok(()));
                    }),
                    // Deleted only if the key still holds this id (at the sequence that
                    // put it): a later registration of the endpoint, by any node, stays.
                    Some((key, Some(seq))) => {
                        let m = s.kv_delete_if(&n.registrations, &key, Some(seq));
                        let sent = self.publish(vec![m]).await;
                        self.link(false, acked_each(sent), move |r| {
                            let r = s.deleted(&key, r);
                            s.record(&r);
                            let _ = reply.send(r);
                        });
                    }
                    // Our put of it is not acknowledged yet: once it is, with its sequence.
                    Some((key, None)) => {
                        let shared = s.clone();
                        let key2 = key.clone();
                        self.link(
                            true,
                            async move {
                                let seq = shared
                                    .index
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .find(&id)
                                    .and_then(|(_, seq)| seq);
                                let m = shared.kv_delete_if(
                                    &shared.names.registrations,
                                    &key,
                                    Some(seq.unwrap_or(0)),
                                );
                                let sent = Writer::send(&shared, vec![m]).await;
                                acked_each(sent).await
                            },
                            move |r| {
                                let r = s.deleted(&key2, r);
                                s.record(&r);
                                let _ = reply.send(r);
                            },
                        );
                    }
                }
            }
            Op::PutChannel(ch, reply) => match json(&ch) {
                Ok(p) => {
                    let m = s.kv_put(&n.channels, &enc(&ch.key_id), p);
                    self.write(vec![m], reply, |_, _| Ok(())).await;
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            Op::DeleteChannel(key_id, reply) => {
                let m = s.kv_delete(&n.channels, &enc(&key_id));
                self.write(vec![m], reply, |_, _| Ok(())).await;
            }
            Op::AppendEvents(events, answered, reply) => {
                // The events of a key whose lease this node lost are not written at all;
                // those of the keys it holds are checked once stored (the fence); the
                // other keys' events are stored as they come.
                let (fenced, mut lost) = s.tenures_of(events.iter().map(|e| e.key_id.as_str()));
                let mut msgs = Vec::with_capacity(events.len());
                let mut numbered = Vec::with_capacity(events.len());
                for e in events {
                    if lost.contains(&e.key_id) {
                        continue;
                    }
                    let mut headers = s.headers();
                    headers.insert(SEQ_HEADER, e.seq.to_string().as_str());
                    msgs.push(Msg {
                        subject: s.event_subject(&e.key_id),
                        headers,
                        payload: Bytes::from(record_json::event(&e.event)),
                    });
                    numbered.push((e.key_id, e.seq));
                }
                let sent = self.publish(msgs).await;
                let shared = s.clone();
                let keys: Vec<String> = numbered.iter().map(|(k, _)| k.clone()).collect();
                self.link(
                    false,
                    async move {
                        let rows = acked(sent).await?;
                        let (fell, failed) = shared.fence(&fenced).await;
                        if !fell.is_empty() {
                            shared.void_stray_events(&keys, &rows, &fell).await;
                            lost.extend(fell);
                        }
                        // A key that could not be checked is stored: its error counts
                        // only when no key was found lost (those must go to their owners).
                        if let Some(e) = failed
                            && lost.is_empty()
                        {
                            return Err(e);
                        }
                        // An answer whose key's events went elsewhere is forgotten by the
                        // node they went to (the hub forwards them with it).
                        if let Some(row) = answered.filter(|_| lost.is_empty()) {
                            shared.delete_request(row).await?;
                        }
                        Ok((rows, lost))
                    },
                    move |r: Result<(Vec<u64>, Vec<String>), StoreError>| {
                        let r = r.and_then(|(rows, mut lost)| {
                            let mut known = s.event_rows.lock().unwrap_or_else(|p| p.into_inner());
                            for ((key, seq), row) in numbered.into_iter().zip(rows) {
                                if !lost.contains(&key) {
                                    known.entry(key).or_default().insert(seq, row);
                                }
                            }
                            if lost.is_empty() {
                                Ok(())
                            } else {
                                lost.sort();
                                lost.dedup();
                                Err(StoreError::LeaseLost(lost))
                            }
                        });
                        s.record(&r);
                        let _ = reply.send(r);
                    },
                );
            }
            Op::ReleaseChannel(key_id, reply) => {
                let shared = s.clone();
                self.link(
                    true,
                    async move { shared.release_lease(&key_id).await },
                    move |r| {
                        let _ = reply.send(r);
                    },
                );
            }
            Op::DeleteEventsThrough(key_id, seq, reply) => {
                let shared = s.clone();
                self.link(
                    true,
                    async move { shared.delete_events_through(&key_id, seq).await },
                    move |r| {
                        s.record(&r);
                        let _ = reply.send(r);
                    },
                );
            }
            Op::PutRequest(job, reply) => {
                let m = Msg {
                    subject: format!("{}.{}.{}", n.req_subject, enc(&job.domain), enc(&job.ep)),
                    headers: s.headers(),
                    payload: Bytes::from(record_json::request(&job)),
                };
                self.write(vec![m], reply, |_, seqs| {
                    seqs.first()
                        .copied()
                        .ok_or_else(|| refused("no acknowledgement"))
                })
                .await;
            }
            Op::DeleteRequest(row, reply) => {
                let shared = s.clone();
                self.link(
                    false,
                    async move { shared.delete_request(row).await },
                    move |r| {
                        s.record(&r);
                        let _ = reply.send(r);
                    },
                );
            }
            Op::PluginPut(plugin, key, value, reply) => {
                let m = s.kv_put(
                    &n.plugin_state,
                    &format!("{}.{}", enc(&plugin), enc(&key)),
                    Bytes::from(value),
                );
                self.write(vec![m], reply, |_, _| Ok(())).await;
            }
            Op::PluginDelete(plugin, key, reply) => {
                let m = s.kv_delete(&n.plugin_state, &format!("{}.{}", enc(&plugin), enc(&key)));
                self.write(vec![m], reply, |_, _| Ok(())).await;
            }
            Op::PutSubscription(sub, reply) => match json(&sub) {
                Ok(p) => {
                    let key = format!("{}.{}.{}", enc(&sub.key_id), enc(&sub.ep), enc(&sub.path));
                    let m = s.kv_put(&n.subscriptions, &key, p);
                    self.write(vec![m], reply, |_, _| Ok(())).await;
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            Op::DeleteSubscriptions(key_id, ep, path, reply) => {
                self.write_after(reply, async |s: &Shared| {
                    let filter = match (&ep, &path) {
                        (None, _) => format!("{}.>", enc(&key_id)),
                        (Some(ep), None) => format!("{}.{}.*", enc(&key_id), enc(ep)),
                        (Some(ep), Some(path)) => {
                            format!("{}.{}.{}", enc(&key_id), enc(ep), enc(path))
                        }
                    };
                    let keys = s.bucket_keys(&s.names.subscriptions, &filter).await?;
                    let msgs = keys
                        .iter()
                        .map(|k| s.kv_delete(&s.names.subscriptions, k))
                        .collect();
                    Ok((msgs, ()))
                })
                .await;
            }
            Op::ReplacePresubscriptions(rec, reply) => {
                self.write_after(reply, async |s: &Shared| {
                    let payload = json(&rec)?;
                    let keys = s
                        .bucket_keys(&s.names.subscriptions, &format!("{}.>", enc(&rec.key_id)))
                        .await?;
                    let mut msgs: Vec<Msg> = keys
                        .iter()
                        .map(|k| s.kv_delete(&s.names.subscriptions, k))
                        .collect();
                    msgs.push(s.kv_put(&s.names.presubscriptions, &enc(&rec.key_id), payload));
                    Ok((msgs, ()))
                })
                .await;
            }
            Op::SaveHourCounts(counts, keep_from, reply) => {
                let b = &n.hour_counts;
                let puts: Vec<Msg> = counts
                    .iter()
                    .filter(|c| c.hour >= keep_from)
                    .map(|c| {
                        let key = counts::key(&c.domain, c.hour, &s.node);
                        s.kv_put(b, &key, Bytes::from(c.count.to_string()))
                    })
                    .collect();
                // Pruning lists every key (a round trip each, holding up the queue):
                // once per `keep_from`, i.e. once an hour, not at every save (each second
                // on a cluster). A pruning whose write fails is not retried before the next
                // hour: hours out of the window are ignored by every reader anyway.
                if s.counts_pruned_from.fetch_max(keep_from, Ordering::SeqCst) >= keep_from {
                    return self.write(puts, reply, |_, _| Ok(())).await;
                }
                self.write_after(reply, async |s: &Shared| {
                    let b = &s.names.hour_counts;
                    let mut msgs = puts;
                    for k in s.bucket_keys(b, ">").await? {
                        // Old hours of every node go (and of the older node-less form).
                        if counts::hour_of(&k).is_some_and(|h| h < keep_from) {
                            msgs.push(s.kv_delete(b, &k));
                        }
                    }
                    Ok((msgs, ()))
                })
                .await;
            }
            Op::PutPsk(rec, reply) => {
                self.write_after(reply, async |s: &Shared| {
                    let b = &s.names.psks;
                    let owner = format!("{}.{}", enc(&rec.domain), enc(&rec.ep));
                    let id_key = format!("id.{}", enc(&rec.identity));
                    if let Some(holder) = s.bucket_get(b, &id_key).await?
                        && holder.as_ref() != owner.as_bytes()
                    {
                        // Not unavailable: this write is wrong, the store works.
                        return Err(StoreError::Commit(format!(
                            "PSK identity {:?} belongs to another endpoint",
                            rec.identity
                        )));
                    }
                    let ep_key = format!("ep.{owner}");
                    let mut msgs = vec![
                        s.kv_put(b, &ep_key, json(&PskJson::from(&rec))?),
                        s.kv_put(b, &id_key, Bytes::from(owner.clone())),
                    ];
                    if let Some(old) = s.bucket_get(b, &ep_key).await?
                        && let Ok(old) = serde_json::from_slice::<PskJson>(&old)
                        && old.identity != rec.identity
                    {
                        msgs.push(s.kv_delete(b, &format!("id.{}", enc(&old.identity))));
                    }
                    Ok((msgs, ()))
                })
                .await;
            }
            Op::PutCertificate(rec, reply) => match json(&CertJson::from(&rec)) {
                Ok(p) => {
                    let key = format!("{}.{}.{}", enc(&rec.domain), enc(&rec.ep), enc(&rec.serial));
                    let m = s.kv_put(&n.certificates, &key, p);
                    self.write(vec![m], reply, |_, _| Ok(())).await;
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            Op::RevokeDevice(domain, ep, revoked_ms, reply) => {
                self.write_after(reply, async |s: &Shared| {
                    let owner = format!("{}.{}", enc(&domain), enc(&ep));
                    let b = &s.names.psks;
                    let mut msgs = Vec::new();
                    let ep_key = format!("ep.{owner}");
                    if let Some(old) = s.bucket_get(b, &ep_key).await? {
                        msgs.push(s.kv_delete(b, &ep_key));
                        if let Ok(old) = serde_json::from_slice::<PskJson>(&old) {
                            let id_key = format!("id.{}", enc(&old.identity));
                            if s.bucket_get(b, &id_key).await?.as_deref() == Some(owner.as_bytes())
                            {
                                msgs.push(s.kv_delete(b, &id_key));
                            }
                        }
                    }
                    let cb = &s.names.certificates;
                    for m in s.bucket_list(cb, &format!("{owner}.*")).await? {
                        let Ok(mut c) = serde_json::from_slice::<CertJson>(&m.payload) else {
                            continue;
                        };
                        if c.revoked_ms.is_none() {
                            c.revoked_ms = Some(revoked_ms);
                            let key = m.subject.splitn(3, '.').nth(2).unwrap_or_default();
                            msgs.push(s.kv_put(cb, key, json(&c)?));
                        }
                    }
                    Ok((msgs, ()))
                })
                .await;
            }
            Op::Read(f) => {
                let shared = s.clone();
                self.link(true, f(shared), |()| ());
            }
        }
    }
}

/// Waits for every acknowledgement; their stream sequences in order, or the first error.
async fn acked(sent: Result<Acks, StoreError>) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for ack in sent? {
        seqs.push(ack.await.map_err(unavailable)?.sequence);
    }
    Ok(seqs)
}

/// Why one message was not stored.
enum AckError {
    /// A conditional write whose condition no longer held: the key changed since.
    Replaced,
    Failed(StoreError),
}

/// Waits for every acknowledgement: each message's stream sequence or why it was not
/// stored; `Err` if a message could not even be sent.
async fn acked_each(
    sent: Result<Acks, StoreError>,
) -> Result<Vec<Result<u64, AckError>>, StoreError> {
    let mut out = Vec::new();
    for ack in sent? {
        out.push(match ack.await {
            Ok(a) => Ok(a.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(AckError::Replaced)
            }
            Err(e) => Err(AckError::Failed(unavailable(e))),
        });
    }
    Ok(out)
}

impl Shared {
    /// The result of a conditional delete of a registration's key: done (the index
    /// forgets what the key held before), or not needed (the key changed since).
    fn deleted(
        &self,
        key: &str,
        r: Result<Vec<Result<u64, AckError>>, StoreError>,
    ) -> Result<(), StoreError> {
        for a in r? {
            match a {
                Ok(seq) => self
                    .index
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observed(key, seq, None),
                Err(AckError::Replaced) => {}
                Err(AckError::Failed(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Shared {
    /// Health after a write: failing while writes fail for the storage's sake.
    fn record<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Ok(_) => self.health.succeeded(),
            Err(e) if e.is_unavailable() => self.health.failed(e),
            Err(_) => {}
        }
    }

    async fn delete_request(&self, row: u64) -> Result<(), StoreError> {
        let stream = self.stream(&self.names.requests)?;
        match stream.delete_message(row).await {
            Ok(_) => Ok(()),
            // Removing an absent request is not an error: 2.9 answers 10057 "no message
            // found" (deleted) or "stream store EOF" (past the last).
            Err(e) => match e.kind() {
                jetstream::stream::DeleteMessageErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_DELETE_FAILED
                        && (j.to_string().contains("no message found")
                            || j.to_string().contains("EOF")) =>
                {
                    Ok(())
                }
                _ => Err(unavailable(e)),
            },
        }
    }

    async fn delete_events_through(&self, key_id: &str, seq: u64) -> Result<(), StoreError> {
        let known = {
            let rows = self.event_rows.lock().unwrap_or_else(|p| p.into_inner());
            rows.get(key_id)
                .and_then(|r| r.range(..=seq).next_back().map(|(_, row)| *row))
        };
        let subject = self.event_subject(key_id);
        let row = match known {
            Some(row) => Some(row),
            // Not appended nor loaded here: find it in the subject.
            None => {
                let listed = self.list_direct(&self.names.events, &subject).await?;
                let voided = voided_rows(&listed);
                listed
                    .into_iter()
                    .filter(|m| !voided.contains(&m.seq))
                    .filter(|m| {
                        m.header(SEQ_HEADER)
                            .and_then(|s| s.parse::<u64>().ok())
                            .is_some_and(|s| s <= seq)
                    })
                    .map(|m| m.seq)
                    .max()
            }
        };
        if let Some(row) = row {
            self.stream(&self.names.events)?
                .purge()
                .filter(subject)
                .sequence(row + 1)
                .await
                .map_err(unavailable)?;
        }
        let mut rows = self.event_rows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = rows.get_mut(key_id) {
            *r = r.split_off(&(seq.saturating_add(1)));
            if r.is_empty() {
                rows.remove(key_id);
            }
        }
        Ok(())
    }
}

/// A PSK record as stored (the key in base64).
#[derive(serde::Serialize, serde::Deserialize)]
struct PskJson {
    domain: String,
    ep: String,
    identity: String,
    key: String,
    created_ms: u64,
}

impl From<&PskRecord> for PskJson {
    fn from(r: &PskRecord) -> PskJson {
        PskJson {
            domain: r.domain.clone(),
            ep: r.ep.clone(),
            identity: r.identity.clone(),
            key: URL_SAFE_NO_PAD.encode(&r.key),
            created_ms: r.created_ms,
        }
    }
}

impl PskJson {
    fn record(self) -> Option<PskRecord> {
        Some(PskRecord {
            key: URL_SAFE_NO_PAD.decode(&self.key).ok()?,
            domain: self.domain,
            ep: self.ep,
            identity: self.identity,
            created_ms: self.created_ms,
        })
    }
}

/// A certificate record as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct CertJson {
    serial: String,
    domain: String,
    ep: String,
    issued_ms: u64,
    not_after_ms: u64,
    revoked_ms: Option<u64>,
}

impl From<&CertificateRecord> for CertJson {
    fn from(r: &CertificateRecord) -> CertJson {
        CertJson {
            serial: r.serial.clone(),
            domain: r.domain.clone(),
            ep: r.ep.clone(),
            issued_ms: r.issued_ms,
            not_after_ms: r.not_after_ms,
            revoked_ms: r.revoked_ms,
        }
    }
}

impl From<CertJson> for CertificateRecord {
    fn from(c: CertJson) -> CertificateRecord {
        CertificateRecord {
            serial: c.serial,
            domain: c.domain,
            ep: c.ep,
            issued_ms: c.issued_ms,
            not_after_ms: c.not_after_ms,
            revoked_ms: c.revoked_ms,
        }
    }
}

/// Parses each value as JSON, skipping (and logging) what does not parse.
fn parse_all<T: serde::de::DeserializeOwned>(msgs: Vec<Raw>, what: &str) -> Vec<T> {
    msgs.into_iter()
        .filter_map(|m| match serde_json::from_slice(&m.payload) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("store: skipping unreadable {what}: {e}");
                None
            }
        })
        .collect()
}

impl RegistrationStore for NatsStore {
    fn load_registrations(&self) -> Pending<Vec<Registration>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s.read_bucket(&s.names.registrations, ">").await?;
            Ok(parse_all(msgs, "registration"))
        })
    }

    fn put_registration(&self, reg: Registration) -> Pending<()> {
        self.submit(|r| Op::PutRegistration(reg, r))
    }

    fn delete_registration(&self, id: String) -> Pending<()> {
        self.submit(|r| Op::DeleteRegistration(id, r))
    }
}

impl EventLog for NatsStore {
    fn load_channels(&self) -> Pending<Vec<ChannelRecord>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s.read_bucket(&s.names.channels, ">").await?;
            Ok(parse_all(msgs, "channel"))
        })
    }

    fn put_channel(&self, channel: ChannelRecord) -> Pending<()> {
        self.submit(|r| Op::PutChannel(channel, r))
    }

    /// The key's events first, then its record (a delete marker the other nodes' watch
    /// of channels sees: [`ChannelChange::Removed`]); both submitted now, in this order.
    fn delete_channel(&self, key_id: String) -> Pending<()> {
        let events = self.delete_events_through(key_id.clone(), i64::MAX as u64);
        let record = self.submit(|r| Op::DeleteChannel(key_id, r));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let r = events.await;
            let _ = tx.send(r.and(record.await));
        });
        Pending::new(rx)
    }

    fn load_events(&self) -> Pending<Vec<StoredEvent>> {
        self.read(async move |s: Arc<Shared>| {
            let mut events = s.read_events(format!("{}.>", s.names.ev_subject)).await?;
            // Per key in stream order, which is their numbers' order.
            events.sort_by(|a, b| (&a.key_id, a.seq).cmp(&(&b.key_id, b.seq)));
            Ok(events)
        })
    }

    fn load_events_of(&self, key_id: String) -> Pending<Vec<StoredEvent>> {
        self.read(async move |s: Arc<Shared>| {
            // Another node connected after this one may have numbered this key: number
            // it on from a new epoch, above all of theirs.
            let ours = s.epoch.load(Ordering::SeqCst);
            let renewed = if s.last_epoch().await? > ours {
                let e = s.next_epoch().await?;
                s.epoch.store(e, Ordering::SeqCst);
                Some(e)
            } else {
                None
            };
            let events = s.read_events(s.event_subject(&key_id)).await?;
            let mut numbered = s.numbered.lock().unwrap_or_else(|p| p.into_inner());
            let floor = events
                .iter()
                .map(|e| e.seq)
                .chain(renewed.map(|e| e << EPOCH_SHIFT))
                .max();
            if let Some(floor) = floor {
                let n = numbered.entry(key_id).or_insert(0);
                *n = (*n).max(floor);
            }
            Ok(events)
        })
    }

    fn append_events(&self, events: Vec<(String, Event)>, answered: Option<u64>) -> Appended {
        // Numbered in submission order under the lock, then queued in that order.
        let mut numbered = self
            .shared
            .numbered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let mut seqs = Vec::with_capacity(events.len());
        let mut stored = Vec::with_capacity(events.len());
        for (key_id, event) in events {
            let n = numbered
                .entry(key_id.clone())
                .or_insert(epoch << EPOCH_SHIFT);
            *n += 1;
            seqs.push(*n);
            stored.push(StoredEvent {
                key_id,
                seq: *n,
                event,
            });
        }
        let durable = self.submit(|r| Op::AppendEvents(stored, answered, r));
        drop(numbered);
        Appended { seqs, durable }
    }

    fn delete_events_through(&self, key_id: String, seq: u64) -> Pending<()> {
        self.submit(|r| Op::DeleteEventsThrough(key_id, seq, r))
    }
}

impl RequestStore for NatsStore {
    fn load_requests(&self) -> Pending<Vec<Job>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s
                .read_all(
                    &s.names.requests,
                    format!("{}.>", s.names.req_subject),
                    consumer::DeliverPolicy::All,
                    false,
                )
                .await?;
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                match serde_json::from_slice::<Job>(&m.payload) {
                    Ok(job) => out.push(Job { row: m.seq, ..job }),
                    Err(e) => tracing::error!("store: skipping unreadable request: {e}"),
                }
            }
            Ok(out)
        })
    }

    fn put_request(&self, job: &Job) -> Pending<u64> {
        let job = job.clone();
        self.submit(|r| Op::PutRequest(job, r))
    }

    fn delete_request(&self, row: u64) -> Pending<()> {
        self.submit(|r| Op::DeleteRequest(row, r))
    }
}

impl PluginStateStore for NatsStore {
    fn plugin_state_get(&self, plugin: String, key: String) -> Pending<Option<Vec<u8>>> {
        self.read(async move |s: Arc<Shared>| {
            let k = format!("{}.{}", enc(&plugin), enc(&key));
            let v = tokio::time::timeout(s.timeout, s.plugin_kv.get(k))
                .await
                .map_err(|_| unavailable("reading timed out"))?
                .map_err(unavailable)?;
            Ok(v.map(|b| b.to_vec()))
        })
    }

    fn plugin_state_put(&self, plugin: String, key: String, value: Vec<u8>) -> Pending<()> {
        self.submit(|r| Op::PluginPut(plugin, key, value, r))
    }

    fn plugin_state_delete(&self, plugin: String, key: String) -> Pending<()> {
        self.submit(|r| Op::PluginDelete(plugin, key, r))
    }

    fn plugin_state_keys(&self, plugin: String, prefix: String) -> Pending<Vec<String>> {
        self.read(async move |s: Arc<Shared>| {
            let keys = s
                .bucket_keys(&s.names.plugin_state, &format!("{}.*", enc(&plugin)))
                .await?;
            let mut out: Vec<String> = keys
                .iter()
                .filter_map(|k| dec(k.split_once('.')?.1))
                .filter(|k| k.starts_with(&prefix))
                .collect();
            out.sort();
            Ok(out)
        })
    }
}

impl SubscriptionStore for NatsStore {
    fn load_subscriptions(&self) -> Pending<Vec<SubscriptionRecord>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s.read_bucket(&s.names.subscriptions, ">").await?;
            let mut subs: Vec<SubscriptionRecord> = parse_all(msgs, "subscription");
            subs.sort_by(|a, b| (&a.key_id, &a.ep, &a.path).cmp(&(&b.key_id, &b.ep, &b.path)));
            Ok(subs)
        })
    }

    fn put_subscription(&self, sub: SubscriptionRecord) -> Pending<()> {
        self.submit(|r| Op::PutSubscription(sub, r))
    }

    fn delete_subscriptions(
        &self,
        key_id: String,
        ep: Option<String>,
        path: Option<String>,
    ) -> Pending<()> {
        self.submit(|r| Op::DeleteSubscriptions(key_id, ep, path, r))
    }

    fn load_presubscriptions(&self) -> Pending<Vec<PresubRecord>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s.read_bucket(&s.names.presubscriptions, ">").await?;
            Ok(parse_all(msgs, "pre-subscription"))
        })
    }

    fn replace_presubscriptions(&self, rec: PresubRecord) -> Pending<()> {
        self.submit(|r| Op::ReplacePresubscriptions(rec, r))
    }
}

impl QuotaStore for NatsStore {
    fn load_hour_counts(&self) -> Pending<Vec<HourCount>> {
        // This node's own counts; the other nodes' are
        // `watch_hour_counts` (module `counts`).
        self.read(async move |s: Arc<Shared>| {
            let mut own: BTreeMap<(String, u64), u64> = BTreeMap::new();
            for (domain, hour, node, count) in s.all_hour_counts().await? {
                if node.as_ref().is_some_and(|n| *n == s.node) {
                    *own.entry((domain, hour)).or_default() += count;
                }
            }
            Ok(own
                .into_iter()
                .map(|((domain, hour), count)| HourCount {
                    domain,
                    hour,
                    count,
                })
                .collect())
        })
    }

    fn save_hour_counts(&self, counts: Vec<HourCount>, keep_from: u64) -> Pending<()> {
        self.submit(|r| Op::SaveHourCounts(counts, keep_from, r))
    }
}

impl CredentialStore for NatsStore {
    fn load_psks(&self) -> Pending<Vec<PskRecord>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s.read_bucket(&s.names.psks, "ep.>").await?;
            let parsed: Vec<PskJson> = parse_all(msgs, "PSK");
            Ok(parsed.into_iter().filter_map(PskJson::record).collect())
        })
    }

    fn load_certificates(&self) -> Pending<Vec<CertificateRecord>> {
        self.read(async move |s: Arc<Shared>| {
            let msgs = s.read_bucket(&s.names.certificates, ">").await?;
            let parsed: Vec<CertJson> = parse_all(msgs, "certificate");
            Ok(parsed.into_iter().map(CertificateRecord::from).collect())
        })
    }

    fn put_psk(&self, rec: PskRecord) -> Pending<()> {
        self.submit(|r| Op::PutPsk(rec, r))
    }

    fn put_certificate(&self, rec: CertificateRecord) -> Pending<()> {
        self.submit(|r| Op::PutCertificate(rec, r))
    }

    fn revoke_device(&self, domain: String, ep: String, revoked_ms: u64) -> Pending<()> {
        self.submit(|r| Op::RevokeDevice(domain, ep, revoked_ms, r))
    }
}

impl Feed for NatsStore {
    fn external_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.external.clone())
    }

    /// The writes' health, and failing too while the client has no connection to a
    /// server (it reconnects by itself): an idle node has no write to fail, and `GET /`
    /// stayed 200 for 7-8 s after its server was gone (an outside review).
    fn health(&self) -> Health {
        let mut health = self.shared.health.snapshot();
        if health.failing.is_none()
            && self.shared.client.connection_state() != async_nats::connection::State::Connected
        {
            health.failing = Some(
                "no connection to a NATS server (the client is reconnecting to cluster.servers)"
                    .into(),
            );
        }
        health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another node's delete of a registration is superseded by what this node wrote
    /// after it: a put of ours not acknowledged yet, or one stored later.
    #[test]
    fn a_delete_older_than_our_put_is_superseded() {
        let mut index = RegIndex::default();
        assert!(!index.superseded("d.ep", 5), "nothing known");
        index.submitted("d.ep", "id2");
        assert!(index.superseded("d.ep", 5), "our put on its way");
        index.acked("d.ep", "id2", Some(10));
        assert!(index.superseded("d.ep", 5), "our put stored later");
        assert!(!index.superseded("d.ep", 11), "a delete after our put");
    }

    #[test]
    fn names_encode_to_valid_key_tokens_and_back() {
        for s in [
            "",
            "a",
            "ep/1",
            "3/0/1",
            "é ü",
            "a.b",
            "*",
            ">",
            "key with spaces",
        ] {
            let t = enc(s);
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{t}"
            );
            assert_eq!(dec(&t).as_deref(), Some(s));
        }
        assert_eq!(dec("!"), None);
    }

    /// The index answers where an id is while its key may still hold it, and forgets it
    /// once a later message on the key is known, in whatever order our acks and the
    /// watch's messages come.
    #[test]
    fn the_registration_index_forgets_an_id_only_after_a_later_message_on_its_key() {
        let mut ix = RegIndex::default();
        ix.submitted("k", "r1");
        assert_eq!(ix.find("r1"), Some(("k".into(), None)));
        ix.acked("k", "r1", Some(5));
        assert_eq!(ix.find("r1"), Some(("k".into(), Some(5))));
        // Another node's older write seen late (the watch lags): r1 stays.
        ix.observed("k", 3, Some("r0"));
        assert_eq!(ix.find("r1"), Some(("k".into(), Some(5))));
        assert_eq!(ix.find("r0"), None);
        // Another node's newer write: r1 is gone, r2 is there.
        ix.observed("k", 7, Some("r2"));
        assert_eq!(ix.find("r1"), None);
        assert_eq!(ix.find("r2"), Some(("k".into(), Some(7))));
        // Ours, pending while the other's newer delete is seen: kept until acked...
        ix.submitted("k", "r3");
        ix.observed("k", 9, None);
        assert_eq!(ix.find("r3"), Some(("k".into(), None)));
        assert_eq!(ix.find("r2"), None);
        // ...and stored after it: kept.
        ix.acked("k", "r3", Some(10));
        assert_eq!(ix.find("r3"), Some(("k".into(), Some(10))));
        // Ours stored before another's later write: forgotten at the ack.
        ix.submitted("j", "r4");
        ix.observed("j", 12, Some("r5"));
        ix.acked("j", "r4", Some(11));
        assert_eq!(ix.find("r4"), None);
        assert_eq!(ix.find("r5"), Some(("j".into(), Some(12))));
        // A delete of ours removes everything of the key before it.
        ix.observed("k", 13, None);
        assert_eq!(ix.find("r3"), None);
        assert!(!ix.keys.contains_key("k"));
        assert!(!ix.by_id.contains_key("r3"));
    }
}

mod calls;
mod channels;
pub use calls::{CallError, NodeCall, NodeCalls};
mod counts;
pub use counts::NodeHourCount;
mod credential_changes;
pub use channels::{CHANNEL_LEASE_MAX_AGE, ChannelChange, Lease, events_from_json, events_to_json};
mod follow;
pub use follow::{Followed, SubscriptionWatch};
/// Watches that resume after a server's death, loads that read to the end.
mod resume;
