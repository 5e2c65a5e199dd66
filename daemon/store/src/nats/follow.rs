//! Following other nodes' subscriptions and pre-subscriptions (issue 22): every node keeps
//! them in memory (listed by `GET /v2/subscriptions/...` on any node; the device's owner
//! observes), so each node applies the other nodes' writes to the two buckets.
//!
//! [`NatsStore::watch_subscriptions`] streams those writes (header `Cd-Node` not this
//! node's) from the moment it is called, in one channel for both buckets.
//!
//! Decision, the order between the buckets: replacing a key's pre-subscriptions deletes
//! its subscriptions (in `<p>_subscriptions`) and then writes its rules (in
//! `<p>_presubscriptions`); the owner of a device, applying the new rules, records new
//! subscriptions of that key. Were the old deletes delivered after the new rules, the
//! owner would drop from memory what its own rules just recorded. So a pre-subscription
//! change is passed on only once the subscriptions watch has delivered everything the
//! subscriptions bucket held when the change arrived (its last stream sequence, read then;
//! bounded by the store's timeout, after which the change is passed on all the same, with
//! a warning).

use std::sync::Arc;

use async_nats::jetstream::consumer;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{NODE_HEADER, NatsStore, Raw, Shared};
use crate::{StoreError, SubscriptionChange};

/// What [`SubscriptionWatch::next`] gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    Change(SubscriptionChange),
    /// The receiver fell more than [`WATCH_BUFFER`] changes behind, or an unreadable
    /// record was skipped: what memory holds may be off; reload from the store.
    Lagged,
}

/// How many changes may wait for the receiver before it is told it lagged.
pub const WATCH_BUFFER: usize = 4096;

/// The other nodes' subscription changes ([`NatsStore::watch_subscriptions`]); the watch
/// ends when this is dropped.
pub struct SubscriptionWatch {
    rx: mpsc::Receiver<Followed>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SubscriptionWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SubscriptionWatch {
    /// The next change; `None` once the watch ended for good (the connection closed).
    pub async fn next(&mut self) -> Option<Followed> {
        self.rx.recv().await
    }
}

/// Sends without waiting; a full channel becomes one `Lagged` once there is room again.
struct Out {
    tx: mpsc::Sender<Followed>,
    lagged: bool,
}

impl Out {
    fn send(&mut self, f: Followed) {
        if self.lagged {
            if self.tx.try_send(Followed::Lagged).is_err() {
                return;
            }
            self.lagged = false;
        }
        if self.tx.try_send(f).is_err() {
            self.lagged = true;
        }
    }
}

fn key_of(raw: &Raw) -> Option<Vec<String>> {
    // `$KV.<bucket>.<tokens>`
    raw.tokens(2)
}

fn raw_of(m: &async_nats::jetstream::Message) -> Raw {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    Raw {
        subject: m.message.subject.to_string(),
        headers: m.message.headers.clone(),
        payload: m.message.payload.clone(),
        seq,
    }
}

impl Shared {
    fn subscription_change(&self, raw: &Raw) -> Option<Result<SubscriptionChange, String>> {
        if raw.header(NODE_HEADER) == Some(self.node.as_str()) {
            return None;
        }
        Some(if raw.is_kv_delete() {
            match key_of(raw).and_then(|t| <[String; 3]>::try_from(t).ok()) {
                Some([key_id, ep, path]) => Ok(SubscriptionChange::Deleted { key_id, ep, path }),
                None => Err(format!("unreadable subscription key {}", raw.subject)),
            }
        } else {
            serde_json::from_slice(&raw.payload)
                .map(SubscriptionChange::Put)
                .map_err(|e| format!("unreadable subscription: {e}"))
        })
    }

    fn presub_change(&self, raw: &Raw) -> Option<Result<SubscriptionChange, String>> {
        if raw.header(NODE_HEADER) == Some(self.node.as_str()) {
            return None;
        }
        Some(if raw.is_kv_delete() {
            match key_of(raw).and_then(|t| <[String; 1]>::try_from(t).ok()) {
                Some([key_id]) => Ok(SubscriptionChange::PresubscriptionsDeleted { key_id }),
                None => Err(format!("unreadable pre-subscription key {}", raw.subject)),
            }
        } else {
            serde_json::from_slice(&raw.payload)
                .map(SubscriptionChange::Presubscriptions)
                .map_err(|e| format!("unreadable pre-subscription: {e}"))
        })
    }

    /// The subscriptions bucket's last stream sequence now.
    async fn subscriptions_last_seq(&self) -> Result<u64, StoreError> {
        let stream = self.stream(&format!("KV_{}", self.names.subscriptions))?;
        let info = tokio::time::timeout(self.timeout, stream.get_info())
            .await
            .map_err(|_| super::unavailable("reading the subscriptions stream timed out"))?
            .map_err(super::unavailable)?;
        Ok(info.state.last_sequence)
    }
}

impl NatsStore {
    /// Other nodes' writes to the subscriptions and pre-subscriptions buckets from now on
    /// (see the module doc for their order). Subscribe before loading them, so no change
    /// falls between the load and the watch (one seen twice is applied twice, which the
    /// receiver makes harmless).
    pub async fn watch_subscriptions(&self) -> Result<SubscriptionWatch, StoreError> {
        let shared = Arc::clone(&self.shared);
        let (mut subs, _) = shared
            .ordered(
                &shared.names.subscriptions,
                consumer::DeliverPolicy::New,
                false,
            )
            .await?;
        let (mut presubs, _) = shared
            .ordered(
                &shared.names.presubscriptions,
                consumer::DeliverPolicy::New,
                false,
            )
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let task = tokio::spawn(async move {
            let mut out = Out { tx, lagged: false };
            // The subscriptions watch's last delivered stream sequence.
            let mut seen = 0u64;
            loop {
                tokio::select! {
                    m = subs.next() => {
                        let Some(m) = m else { break };
                        let Ok(m) = m else { continue };
                        let raw = raw_of(&m);
                        seen = seen.max(raw.seq);
                        match shared.subscription_change(&raw) {
                            None => {}
                            Some(Ok(c)) => out.send(Followed::Change(c)),
                            Some(Err(e)) => {
                                tracing::error!("store: {e}");
                                out.send(Followed::Lagged);
                            }
                        }
                    }
                    m = presubs.next() => {
                        let Some(m) = m else { break };
                        let Ok(m) = m else { continue };
                        let raw = raw_of(&m);
                        let change = match shared.presub_change(&raw) {
                            None => continue,
                            Some(Ok(c)) => c,
                            Some(Err(e)) => {
                                tracing::error!("store: {e}");
                                out.send(Followed::Lagged);
                                continue;
                            }
                        };
                        // The subscriptions' changes made before it first.
                        let target = match shared.subscriptions_last_seq().await {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::warn!("store: {e}; a pre-subscription change is applied without waiting for the subscriptions before it");
                                0
                            }
                        };
                        let until = tokio::time::Instant::now() + shared.timeout;
                        while seen < target {
                            let m = match tokio::time::timeout_at(until, subs.next()).await {
                                Ok(Some(Ok(m))) => m,
                                Ok(Some(Err(_))) => continue,
                                Ok(None) => break,
                                Err(_) => {
                                    tracing::warn!("store: the subscriptions watch did not catch up within the timeout; a pre-subscription change is applied all the same");
                                    break;
                                }
                            };
                            let raw = raw_of(&m);
                            seen = seen.max(raw.seq);
                            match shared.subscription_change(&raw) {
                                None => {}
                                Some(Ok(c)) => out.send(Followed::Change(c)),
                                Some(Err(e)) => {
                                    tracing::error!("store: {e}");
                                    out.send(Followed::Lagged);
                                }
                            }
                        }
                        out.send(Followed::Change(change));
                    }
                }
            }
            tracing::error!(
                "store: the subscriptions watch ended; other nodes' subscriptions are no longer followed"
            );
        });
        Ok(SubscriptionWatch { rx, task })
    }
}
