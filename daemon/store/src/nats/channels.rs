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

/// How often the fence reads a lease whose last write is this node's but not yet the
/// revision recorded (a renewal whose answer is on its way), 20 ms apart.
const FENCE_READS: usize = 5;

impl Shared {
    /// The tenure of each distinct key of `keys` this node holds, to be checked after
    /// the append; an error if it lost one of them.
    pub(super) fn tenures_of<'a>(
        &self,
        keys: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let tenures = self.tenures.lock().unwrap_or_else(|p| p.into_inner());
        let mut fenced: Vec<(String, u64)> = Vec::new();
        for key in keys {
            match tenures.get(key) {
                Some(Tenure::Lost) => return Err(lease_lost(key)),
                Some(Tenure::Held { since, .. }) if !fenced.iter().any(|(k, _)| k == key) => {
                    fenced.push((key.to_string(), *since));
                }
                _ => {}
            }
        }
        Ok(fenced)
    }

    /// The fence ([`Tenure`]): each key's lease still in the tenure `since`, its last
    /// write this node's last renewal.
    pub(super) async fn fence(&self, fenced: &[(String, u64)]) -> Result<(), StoreError> {
        let stream = self.stream(&format!("KV_{}", self.names.channel_owners))?;
        for (key, since) in fenced {
            let subject = Self::kv_subject(&self.names.channel_owners, &enc(key));
            let mut tries = 0;
            loop {
                tries += 1;
                let last = match tokio::time::timeout(
                    self.timeout,
                    stream.get_last_raw_message_by_subject(&subject),
                )
                .await
                .map_err(|_| unavailable("reading a channel lease timed out"))?
                {
                    Ok(m) => Some(m),
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        None
                    }
                    Err(e) => return Err(unavailable(e)),
                };
                let ours = last.as_ref().is_some_and(|m| {
                    m.payload.as_ref() == self.node.as_bytes()
                        && !m
                            .headers
                            .get(super::KV_OPERATION)
                            .is_some_and(|v| matches!(v.as_str(), "DEL" | "PURGE"))
                });
                let recorded = self
                    .tenures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(key)
                    .copied();
                match (ours, recorded) {
                    (true, Some(Tenure::Held { since: s, revision }))
                        if s == *since && last.as_ref().is_some_and(|m| m.sequence == revision) =>
                    {
                        break;
                    }
                    // Ours, but not the write recorded: a renewal whose answer is on its way.
                    (true, Some(Tenure::Held { since: s, .. }))
                        if s == *since && tries < FENCE_READS =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        if !ours {
                            self.tenures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(key.clone(), Tenure::Lost);
                        }
                        tracing::warn!(
                            "store: the channel lease of key {key} is no longer this node's tenure: its events just stored are taken out again"
                        );
                        return Err(lease_lost(key));
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes the events at stream rows `rows` (an append the fence refused); best
    /// effort, logged: one left is delivered again at the key's next take-over.
    pub(super) async fn delete_stray_events(&self, rows: &[u64]) {
        let Ok(stream) = self.stream(&self.names.events) else {
            return;
        };
        for row in rows {
            if let Err(e) = stream.delete_message(*row).await {
                tracing::warn!(
                    "store: could not take out event row {row} stored without the channel lease: {e}"
                );
            }
        }
    }

    /// Records this node's write of a lease: `created` begins a tenure, a renewal goes on
    /// with the one held (or begins one, when the node thought it lost: continuity is
    /// not proved).
    fn held(&self, key_id: &str, created: bool, revision: u64) {
        let mut tenures = self.tenures.lock().unwrap_or_else(|p| p.into_inner());
        let since = match tenures.get(key_id) {
            Some(Tenure::Held { since, .. }) if !created => *since,
            _ => self.tenures_begun.fetch_add(1, Ordering::Relaxed) + 1,
        };
        tenures.insert(key_id.to_string(), Tenure::Held { since, revision });
    }

    /// Records that another node holds a lease this node held.
    fn lost(&self, key_id: &str) {
        let mut tenures = self.tenures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tenures.get_mut(key_id) {
            *t = Tenure::Lost;
        }
    }
}

fn lease_lost(key_id: &str) -> StoreError {
    crate::nats::refused(format!(
        "the channel lease of key {key_id} is held by another node (or lapsed): its events go to the owner"
    ))
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
            let entry = tokio::time::timeout(t, self.owners().entry(key.as_str()))
                .await
                .map_err(|_| unavailable("reading a channel lease timed out"))?
                .map_err(unavailable)?;
            let live = entry.filter(|e| e.operation == kv::Operation::Put);
            let attempt = match &live {
                Some(e) if e.value.as_ref() != me.as_bytes() => {
                    self.shared.lost(key_id);
                    return Ok(Lease::Theirs(
                        String::from_utf8_lossy(&e.value).into_owned(),
                    ));
                }
                Some(e) => tokio::time::timeout(
                    t,
                    self.owners()
                        .update(key.as_str(), Bytes::from(me.to_string()), e.revision),
                )
                .await
                .map(|r| {
                    r.map(|rev| (Lease::Ours { fresh: false }, rev))
                        .map_err(|e| e.to_string())
                }),
                None => tokio::time::timeout(
                    t,
                    self.owners()
                        .create(key.as_str(), Bytes::from(me.to_string())),
                )
                .await
                .map(|r| {
                    r.map(|rev| (Lease::Ours { fresh: true }, rev))
                        .map_err(|e| e.to_string())
                }),
            };
            match attempt {
                Ok(Ok((lease, revision))) => {
                    self.shared
                        .held(key_id, lease == Lease::Ours { fresh: true }, revision);
                    return Ok(lease);
                }
                // Taken (or renewed) by another node meanwhile: read it again.
                Ok(Err(e)) => tracing::debug!("store: channel lease changed meanwhile ({e})"),
                Err(_) => return Err(unavailable("writing a channel lease timed out")),
            }
        }
        Err(unavailable("the channel lease kept changing"))
    }

    /// The node holding key `key_id`'s channel lease, if any (a read, nothing taken).
    pub async fn channel_owner(&self, key_id: &str) -> Result<Option<String>, StoreError> {
        let t = self.shared.timeout;
        let entry = tokio::time::timeout(t, self.owners().entry(enc(key_id)))
            .await
            .map_err(|_| unavailable("reading a channel lease timed out"))?
            .map_err(unavailable)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    /// Gives up this node's lease of key `key_id`'s channel (a clean stop): deleted only
    /// while this node still holds it.
    pub async fn release_channel(&self, key_id: &str) -> Result<(), StoreError> {
        // From here on another node may take it: this node's appends of the key are
        // refused until it claims the lease again.
        self.shared.lost(key_id);
        let t = self.shared.timeout;
        let key = enc(key_id);
        let entry = tokio::time::timeout(t, self.owners().entry(key.as_str()))
            .await
            .map_err(|_| unavailable("reading a channel lease timed out"))?
            .map_err(unavailable)?;
        let Some(e) = entry.filter(|e| {
            e.operation == kv::Operation::Put && e.value.as_ref() == self.shared.node.as_bytes()
        }) else {
            return Ok(());
        };
        tokio::time::timeout(
            t,
            self.owners()
                .delete_expect_revision(key.as_str(), Some(e.revision)),
        )
        .await
        .map_err(|_| unavailable("releasing a channel lease timed out"))?
        .map_err(unavailable)
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
