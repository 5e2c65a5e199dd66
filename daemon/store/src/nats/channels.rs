//! Notification channels across nodes (issue 22): the lease that makes one node at a time
//! a key's *channel owner*, the watch of channel records other nodes write, the calls a
//! node serves for the channels it owns, and the events' form on the wire between nodes.
//!
//! **The lease** is the key's entry in KV `<p>_channel_owners` (key: the key id as one
//! token, value: the owner's node name). [`NatsStore::claim_channel`] creates it if absent
//! (atomic: of two nodes claiming at once one wins), renews it if this node holds it (an
//! update expecting the revision read: a renewal racing a taker fails) and otherwise
//! answers the holder. The bucket's entries live [`CHANNEL_LEASE_MAX_AGE`] from their
//! last write (stream `max_age`, as the members' heartbeats): an owner renews each of its
//! leases every 2 s, so a killed owner's leases lapse within 6 s and the next node to
//! claim takes them. [`NatsStore::release_channel`] deletes ours at a clean stop (expecting
//! our revision, so a lease already taken by another node is left alone).
//!
//! Decision: the value names the node and nothing else; a claim is a read (direct get)
//! and, for a free or our own lease, one write. The renewal is one write per owned
//! channel every 2 s: cheap for the tens to thousands of application keys a fleet has,
//! not meant for a million.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::broadcast;

use connectord_model::{ChannelRecord, Event};

use super::calls::NodeCalls;
use super::resume::Start;
use super::{NODE_HEADER, NatsStore, Shared, enc, unavailable};
use crate::{StoreError, record_json};
use std::sync::atomic::Ordering;

/// How long a channel lease lives after its last renewal.
pub const CHANNEL_LEASE_MAX_AGE: Duration = Duration::from_secs(6);

/// This node's tenure of a key's channel lease, as the fence of its appends sees it.
///
/// **The fence** (a node whose lease lapsed, paused or cut off, went on storing the key's
/// events after another node took the channel over: stored below the new owner's numbers
/// and behind its load, so duplicated, out of order, or purged with the new owner's
/// undelivered events). The lease and the events are two streams, and one publish
/// cannot be conditional on another stream, so the check comes after the write: once a
/// key's events are stored, the lease is read from its stream's leader, and the append
/// stands only if the lease's last write is still this node's last renewal of the same
/// tenure. Then no other node took the lease between that renewal and the append, so a
/// later owner's load sees the events. Otherwise the events are deleted again (best
/// effort), the append fails (nothing is acknowledged), and the key's later appends are
/// refused at once until a claim takes the lease again. A key this node never held a
/// lease of is not fenced (a single node's store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tenure {
    /// Held: `since` tells this tenure from the node's others (one per lease created),
    /// `revision` is the lease's last write by this node.
    Held { since: u64, revision: u64 },
    /// Found held by another node: appends refused until a claim takes it again.
    Lost,
}

/// How long the fence waits between reads of a lease whose last write is this node's but
/// not the revision recorded (a renewal whose answer is on its way; read again until the
/// store's timeout has passed).
const FENCE_PAUSE: Duration = Duration::from_millis(20);

impl Shared {
    /// Of the distinct keys of `keys`: those this node holds, with their tenure, to be
    /// checked after the append; and those whose lease it lost, whose events it does not
    /// store.
    pub(super) fn tenures_of<'a>(
        &self,
        keys: impl Iterator<Item = &'a str>,
    ) -> (Vec<(String, u64)>, Vec<String>) {
        let tenures = self.tenures.lock().unwrap_or_else(|p| p.into_inner());
        let (mut fenced, mut lost): (Vec<(String, u64)>, Vec<String>) = (Vec::new(), Vec::new());
        for key in keys {
            match tenures.get(key) {
                Some(Tenure::Lost) if !lost.iter().any(|k| k == key) => lost.push(key.to_string()),
                Some(Tenure::Held { since, .. }) if !fenced.iter().any(|(k, _)| k == key) => {
                    fenced.push((key.to_string(), *since));
                }
                _ => {}
            }
        }
        (fenced, lost)
    }

    /// The fence ([`Tenure`]): the keys of `fenced` whose lease is no longer in the
    /// tenure `since` with this node's last renewal as its last write (another node's
    /// now, or lapsed: each marked lost); and the first error, when a key's lease could
    /// not be read, or stayed this node's at a write not recorded (a renewal or a claim
    /// whose answer did not come) for the store's timeout. Every key is checked.
    pub(super) async fn fence(
        &self,
        fenced: &[(String, u64)],
    ) -> (Vec<String>, Option<StoreError>) {
        let mut fell = Vec::new();
        let mut failed = None;
        for (key, since) in fenced {
            match self.fence_one(key, *since).await {
                Ok(true) => {}
                Ok(false) => fell.push(key.clone()),
                // Every key is still looked at: one found lost must be voided even when
                // another could not be read.
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        (fell, failed)
    }

    /// [`Shared::fence`] of one key: whether its lease is still in the tenure `since`.
    async fn fence_one(&self, key: &str, since: u64) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let last = self.lease_entry(key).await?;
            let recorded = self
                .tenures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(key)
                .copied();
            let ours = last.as_ref().filter(|l| l.node == self.node.as_bytes());
            match (ours, recorded) {
                (Some(l), Some(Tenure::Held { since: s, revision }))
                    if s == since && l.revision == revision =>
                {
                    return Ok(true);
                }
                // Ours, but not the write recorded: a renewal whose answer is on its way.
                (Some(_), Some(Tenure::Held { since: s, .. })) if s == since => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(unavailable(format!(
                            "the channel lease of key {key} was written by this node at a revision it does not know"
                        )));
                    }
                    tokio::time::sleep(FENCE_PAUSE).await;
                }
                (Some(_), _) => {
                    // A tenure begun since the append was submitted: the lease was not
                    // held throughout.
                    tracing::warn!(
                        "store: the channel lease of key {key} lapsed while its events were stored: they go to the owner"
                    );
                    return Ok(false);
                }
                (None, _) => {
                    self.lost(key, Some(since));
                    tracing::warn!(
                        "store: the channel lease of key {key} is no longer this node's: its events just stored are voided and go to the owner"
                    );
                    return Ok(false);
                }
            }
        }
    }

    /// A lease as its stream's leader has it last (a direct get may be answered by a
    /// replica that has not seen the last write); None when absent or deleted.
    async fn lease_entry(&self, key_id: &str) -> Result<Option<LeaseEntry>, StoreError> {
        let last = tokio::time::timeout(
            self.timeout,
            self.kv_last(&self.names.channel_owners, &enc(key_id)),
        )
        .await
        .map_err(|_| unavailable("reading a channel lease timed out"))??;
        Ok(last.and_then(|l| {
            Some(LeaseEntry {
                node: l.value?,
                revision: l.revision,
            })
        }))
    }

    /// Voids the events of the keys `fell` among an append's (`keys` and their stream
    /// `rows`, in order): one marker per key in its events subject, naming the rows, which
    /// loads skip; a purge through the marker takes the rows with it. Best effort,
    /// logged: an event left unvoided is delivered again at the key's next take-over.
    ///
    /// Decision: a marker, not `STREAM.MSG.DELETE`. On nats-server 2.9.10 (Debian's)
    /// deleting a subject's last message and then purging that subject up to an earlier
    /// row loses the subject's remaining messages from its index (a filtered consumer and
    /// `last_by_subj` no longer find them, reproduced): the new owner's undelivered events
    /// would vanish from its loads.
    pub(super) async fn void_stray_events(&self, keys: &[String], rows: &[u64], fell: &[String]) {
        for key in fell {
            let voided: Vec<String> = keys
                .iter()
                .zip(rows)
                .filter(|(k, _)| *k == key)
                .map(|(_, row)| row.to_string())
                .collect();
            if voided.is_empty() {
                continue;
            }
            let mut headers = self.headers();
            headers.insert(super::VOID_HEADER, voided.join(",").as_str());
            let marker = super::Msg {
                subject: self.event_subject(key),
                headers,
                payload: Bytes::new(),
            };
            let sent = super::Writer::send(self, vec![marker]).await;
            if let Err(e) = super::acked(sent).await {
                tracing::warn!(
                    "store: could not void the events of key {key} stored without its channel lease ({e}): they are delivered again at its next take-over"
                );
            }
        }
    }

    /// Records this node's write of a lease: `created` begins a tenure, a renewal goes on
    /// with the one held (or begins one, when the node thought it lost: continuity is
    /// not proved).
    ///
    /// `renewed`: the revision a renewal updated (None: a create). The tenure goes on only
    /// when that is the revision recorded: a renewal of a write whose answer never came
    /// (a create that timed out on its way back) proves no continuity. Whether a tenure
    /// began (the caller loads the key's events, as after a create).
    fn held(&self, key_id: &str, renewed: Option<u64>, revision: u64) -> bool {
        let mut tenures = self.tenures.lock().unwrap_or_else(|p| p.into_inner());
        let (since, began) = match (tenures.get(key_id), renewed) {
            (Some(Tenure::Held { since, revision: r }), Some(from)) if *r == from => {
                (*since, false)
            }
            _ => (self.tenures_begun.fetch_add(1, Ordering::Relaxed) + 1, true),
        };
        tenures.insert(key_id.to_string(), Tenure::Held { since, revision });
        began
    }

    /// [`NatsStore::release_channel`], in the writer's chain.
    pub(super) async fn release_lease(&self, key_id: &str) -> Result<(), StoreError> {
        let t = self.timeout;
        let Some(e) = self.lease_entry(key_id).await? else {
            self.lost(key_id, None);
            return Ok(());
        };
        if e.node.as_ref() == self.node.as_bytes() {
            tokio::time::timeout(
                t,
                self.owners_kv
                    .delete_expect_revision(enc(key_id), Some(e.revision)),
            )
            .await
            .map_err(|_| unavailable("releasing a channel lease timed out"))?
            .map_err(unavailable)?;
        }
        self.lost(key_id, None);
        Ok(())
    }

    /// Records that a lease this node held is no longer its own; with `since`, only if
    /// this node still records that tenure (a claim may have begun another meanwhile).
    fn lost(&self, key_id: &str, since: Option<u64>) {
        let mut tenures = self.tenures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tenures.get_mut(key_id)
            && since.is_none_or(|since| matches!(t, Tenure::Held { since: s, .. } if *s == since))
        {
            *t = Tenure::Lost;
        }
    }
}

/// A live lease as read: its holder's name and its revision.
struct LeaseEntry {
    node: Bytes,
    revision: u64,
}

/// A channel change another node made ([`NatsStore::watch_channels`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelChange {
    /// The record written (created, a callback set or removed, a restriction).
    Put(ChannelRecord),
    /// The channel removed (idle), with its events: the key id.
    Removed(String),
}

/// Who holds a key's channel lease ([`NatsStore::claim_channel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// This node does. `fresh`: the lease was free and this call created it (the caller
    /// loads the key's undelivered events); otherwise it renewed this node's lease.
    Ours { fresh: bool },
    /// Another node does: its name.
    Theirs(String),
}

impl NatsStore {
    fn owners(&self) -> &kv::Store {
        &self.shared.owners_kv
    }

    /// Takes key `key_id`'s channel lease if it is free, renews it if this node holds it,
    /// or answers its holder. Bounded by the store's timeout per round trip.
    pub async fn claim_channel(&self, key_id: &str) -> Result<Lease, StoreError> {
        let t = self.shared.timeout;
        let key = enc(key_id);
        let me = self.shared.node.as_str();
        for _ in 0..4 {
            // From the leader: a replica behind it could name the holder before the last,
            // and this node would step down from a lease it holds.
            let live = self.shared.lease_entry(key_id).await?;
            let attempt = match &live {
                Some(e) if e.node.as_ref() != me.as_bytes() => {
                    self.shared.lost(key_id, None);
                    return Ok(Lease::Theirs(String::from_utf8_lossy(&e.node).into_owned()));
                }
                Some(e) => tokio::time::timeout(
                    t,
                    self.owners()
                        .update(key.as_str(), Bytes::from(me.to_string()), e.revision),
                )
                .await
                .map(|r| {
                    r.map(|rev| (Some(e.revision), rev))
                        .map_err(|e| e.to_string())
                }),
                None => tokio::time::timeout(
                    t,
                    self.owners()
                        .create(key.as_str(), Bytes::from(me.to_string())),
                )
                .await
                .map(|r| r.map(|rev| (None, rev)).map_err(|e| e.to_string())),
            };
            match attempt {
                Ok(Ok((renewed, revision))) => {
                    let fresh = self.shared.held(key_id, renewed, revision);
                    return Ok(Lease::Ours { fresh });
                }
                // Taken (or renewed) by another node meanwhile: read it again.
                Ok(Err(e)) => tracing::debug!("store: channel lease changed meanwhile ({e})"),
                Err(_) => return Err(unavailable("writing a channel lease timed out")),
            }
        }
        Err(unavailable("the channel lease kept changing"))
    }

    /// The node holding key `key_id`'s channel lease, if any (a read, nothing taken), from
    /// the stream's leader as [`NatsStore::claim_channel`] reads it: a replica behind it
    /// could name a holder before the last (a review finding: a forwarded long-poll then
    /// left a live owner).
    pub async fn channel_owner(&self, key_id: &str) -> Result<Option<String>, StoreError> {
        let live = self.shared.lease_entry(key_id).await?;
        Ok(live.map(|e| String::from_utf8_lossy(&e.node).into_owned()))
    }

    /// Gives up this node's lease of key `key_id`'s channel (a clean stop): deleted only
    /// while this node still holds it. After every append submitted before it (the
    /// writer's chain): those were stored under the lease and pass its fence, and the
    /// next owner's load sees them; appends of the key after it are not stored.
    pub async fn release_channel(&self, key_id: &str) -> Result<(), StoreError> {
        self.submit(|r| super::Op::ReleaseChannel(key_id.to_string(), r))
            .await
    }

    /// Channel records other nodes write, from now on, in the bucket's order (the
    /// channel's kind, callback and restriction: a node that does not own a key's channel
    /// routes its events by them, and the owner starts or stops delivering to a callback
    /// set on another node). A receiver more than 4 096 changes behind gets `Lagged`.
    pub fn watch_channels(&self) -> broadcast::Receiver<ChannelChange> {
        self.channels.subscribe()
    }

    /// Serves only the calls `ops` to this node (`<p>.node.<this node>.<op>` for each):
    /// for a part of the daemon that owns these operations, beside others that serve
    /// theirs. Must not overlap with another `serve_ops` or [`NatsStore::serve_calls`]
    /// of this process (a call would be received twice).
    pub async fn serve_ops(&self, ops: &[&str]) -> Result<NodeCalls, StoreError> {
        let subjects: Vec<String> = ops
            .iter()
            .map(|op| self.node_subject(&self.shared.node, op))
            .collect();
        self.serve_subjects(&subjects).await
    }
}

/// Events as one value for a call between nodes: a JSON array of the store's own event
/// records (`record_json::event`), so that serialisation stays in the store.
pub fn events_to_json(events: &[Event]) -> serde_json::Value {
    serde_json::Value::Array(
        events
            .iter()
            .map(|e| serde_json::Value::String(record_json::event(e)))
            .collect(),
    )
}

/// The events of [`events_to_json`]; a record this version cannot read is an error
/// (bytes from another node are outside input).
pub fn events_from_json(v: &serde_json::Value) -> Result<Vec<Event>, StoreError> {
    let items = v
        .as_array()
        .ok_or_else(|| StoreError::Corrupt("events: not an array".into()))?;
    items
        .iter()
        .map(|i| {
            let s = i
                .as_str()
                .ok_or_else(|| StoreError::Corrupt("an event: not a string".into()))?;
            record_json::read_event(s).map_err(StoreError::Corrupt)
        })
        .collect()
}

impl Shared {
    /// Follows the channels bucket from now on and sends other nodes' puts to `changes`.
    pub(super) async fn watch_channel_bucket(
        self: std::sync::Arc<Self>,
        changes: broadcast::Sender<ChannelChange>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let bucket = self.names.channels.clone();
        self.watch_bucket(
            "channels",
            bucket,
            Start::New,
            false,
            None,
            move |shared, raw, _| {
                if raw.header(NODE_HEADER) == Some(shared.node.as_str()) {
                    return;
                }
                if raw.is_kv_delete() {
                    // `$KV.<bucket>.<key id>`
                    match raw.tokens(2).and_then(|t| <[String; 1]>::try_from(t).ok()) {
                        Some([key_id]) => {
                            let _ = changes.send(ChannelChange::Removed(key_id));
                        }
                        None => tracing::debug!(
                            "store: skipping an unreadable channel key {}",
                            raw.subject
                        ),
                    }
                    return;
                }
                match serde_json::from_slice::<ChannelRecord>(&raw.payload) {
                    Ok(rec) => {
                        let _ = changes.send(ChannelChange::Put(rec));
                    }
                    Err(e) => tracing::debug!("store: skipping an unreadable channel record: {e}"),
                }
            },
        )
        .await
    }
}
