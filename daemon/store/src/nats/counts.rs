//! Cluster-wide traffic counts (issue 22, "limits are enforced cluster-wide"): each node
//! stores its own hourly counts under `<domain>.<hour>.<node>` in `<p>_hour_counts` and
//! follows the other nodes' from the bucket's watch ([`NatsStore::watch_hour_counts`]), so
//! that its limits service adds them to its own.
//!
//! Decisions:
//! - **A key per (domain, hour, node)**, each written by its node only: no two nodes write
//!   one key, so nothing is lost to last-writer-wins, and no compare-and-set round trip is
//!   needed per save. The cost is one key per node per active domain and hour (24 hours
//!   are kept; older ones are removed by whichever node saves).
//! - **[`QuotaStore::load_hour_counts`](crate::QuotaStore) answers this node's own counts**
//!   only; the other nodes' come from the watch, whose first
//!   answer is every other node's current count. A node restarting under the same name
//!   goes on with its own counts; counts stored under another name (a renamed node) stay
//!   the cluster's until their hour leaves the day. The cluster's sum is
//!   [`NatsStore::load_cluster_hour_counts`]. Keys of the older `<domain>.<hour>` form
//!   (written before this, by a node on the first NATS store) are counted by nobody: with
//!   several nodes nobody can tell whose they were; they are removed once their hour
//!   leaves the day, so a quota forgets at most one day of such counts at the upgrade.
//! - The watch keeps the other nodes' current counts in memory (a domain's at most 24
//!   hours per node); a receiver that lags takes a new snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{NODE_HEADER, NatsStore, Raw, Shared, dec, enc};
use crate::{HourCount, Pending, StoreError};

/// Another node's count of a domain's hour, as it stored it last (`count` 0: removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHourCount {
    pub node: String,
    pub domain: String,
    pub hour: u64,
    pub count: u64,
}

/// The other nodes' counts as the watch last saw them, and the changes after.
pub(super) struct CountsWatch {
    /// (node, domain, hour) → count; only other nodes', only non-zero.
    current: Mutex<BTreeMap<(String, String, u64), u64>>,
    changes: broadcast::Sender<NodeHourCount>,
}

impl CountsWatch {
    pub(super) fn new() -> Arc<CountsWatch> {
        let (changes, _) = broadcast::channel(4096);
        Arc::new(CountsWatch {
            current: Mutex::new(BTreeMap::new()),
            changes,
        })
    }

    fn apply(&self, c: NodeHourCount) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let key = (c.node.clone(), c.domain.clone(), c.hour);
        let before = if c.count == 0 {
            cur.remove(&key)
        } else {
            cur.insert(key, c.count)
        };
        if before != Some(c.count) && !(before.is_none() && c.count == 0) {
            // Sent under the lock: a subscriber's snapshot and its changes do not overlap
            // or leave a gap.
            let _ = self.changes.send(c);
        }
    }
}

/// The key of a count: `<domain>.<hour>.<node>`.
pub(super) fn key(domain: &str, hour: u64, node: &str) -> String {
    format!("{}.{hour}.{}", enc(domain), enc(node))
}

/// The hour of a key of either form (`<domain>.<hour>[.<node>]`).
pub(super) fn hour_of(key: &str) -> Option<u64> {
    key.split('.').nth(1)?.parse().ok()
}

/// A key's parts: (domain, hour, node), node `None` in the older two-token form.
fn parse_key(key: &str) -> Option<(String, u64, Option<String>)> {
    let mut t = key.split('.');
    let domain = dec(t.next()?)?;
    let hour = t.next()?.parse().ok()?;
    let node = match t.next() {
        Some(n) => Some(dec(n)?),
        None => None,
    };
    if t.next().is_some() {
        return None;
    }
    Some((domain, hour, node))
}

fn parse_count(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

impl Shared {
    /// Starts following the other nodes' counts into `watch` (from every current value).
    pub(super) async fn watch_hour_count_bucket(
        self: Arc<Self>,
        watch: Arc<CountsWatch>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let bucket = self.names.hour_counts.clone();
        let (mut messages, _) = self
            .ordered(&bucket, consumer::DeliverPolicy::LastPerSubject, false)
            .await?;
        let skip = format!("$KV.{bucket}.").len();
        Ok(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let Ok(m) = m else { continue };
                let m = m.message;
                let raw = Raw {
                    subject: m.subject.to_string(),
                    headers: m.headers,
                    payload: m.payload,
                    seq: 0,
                };
                let Some((domain, hour, Some(node))) = raw.subject.get(skip..).and_then(parse_key)
                else {
                    continue;
                };
                if node == self.node {
                    continue;
                }
                let count = if raw.is_kv_delete() {
                    0
                } else {
                    match parse_count(&raw.payload) {
                        Some(c) => c,
                        None => {
                            tracing::error!(
                                "store: skipping unreadable limit count {}",
                                raw.subject
                            );
                            continue;
                        }
                    }
                };
                // The header, if any, must agree with the key: a count is its node's.
                if raw.header(NODE_HEADER).is_some_and(|n| n != node) {
                    tracing::debug!("store: a count of {node} written by another node");
                }
                watch.apply(NodeHourCount {
                    node,
                    domain,
                    hour,
                    count,
                });
            }
            tracing::error!(
                "store: the hourly counts watch ended; other nodes' traffic is no longer added to the limits"
            );
        }))
    }

    /// Every stored count: (domain, hour, node) with `None` for the older form.
    pub(super) async fn all_hour_counts(
        &self,
    ) -> Result<Vec<(String, u64, Option<String>, u64)>, StoreError> {
        let msgs = self.read_bucket(&self.names.hour_counts, ">").await?;
        let skip = format!("$KV.{}.", self.names.hour_counts).len();
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let parsed = m
                .subject
                .get(skip..)
                .and_then(parse_key)
                .zip(parse_count(&m.payload));
            match parsed {
                Some(((domain, hour, node), count)) => out.push((domain, hour, node, count)),
                None => tracing::error!("store: skipping unreadable limit count {}", m.subject),
            }
        }
        Ok(out)
    }
}

impl NatsStore {
    /// The other nodes' current hourly counts, and every change of them from then on
    /// (another node saving a count, or a count removed: `count` 0). A receiver more than
    /// 4 096 changes behind gets `Lagged` and should call this again.
    pub fn watch_hour_counts(&self) -> (Vec<NodeHourCount>, broadcast::Receiver<NodeHourCount>) {
        let cur = self
            .counts
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let rx = self.counts.changes.subscribe();
        let now = cur
            .iter()
            .map(|((node, domain, hour), count)| NodeHourCount {
                node: node.clone(),
                domain: domain.clone(),
                hour: *hour,
                count: *count,
            })
            .collect();
        (now, rx)
    }

    /// The cluster's counts: every node's summed per (domain, hour), by domain and hour
    /// (diagnostics and tests; a node's limits add the others' from the watch).
    pub fn load_cluster_hour_counts(&self) -> Pending<Vec<HourCount>> {
        self.read(async move |s: Arc<Shared>| {
            let mut sum: BTreeMap<(String, u64), u64> = BTreeMap::new();
            for (domain, hour, _, count) in s.all_hour_counts().await? {
                *sum.entry((domain, hour)).or_default() += count;
            }
            Ok(sum
                .into_iter()
                .map(|((domain, hour), count)| HourCount {
                    domain,
                    hour,
                    count,
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_domain_hour_and_node_and_the_older_form_parses() {
        let k = key("a.b", 490_000, "n-1");
        assert_eq!(
            parse_key(&k),
            Some(("a.b".into(), 490_000, Some("n-1".into())))
        );
        assert_eq!(hour_of(&k), Some(490_000));
        let old = format!("{}.12", enc("d"));
        assert_eq!(parse_key(&old), Some(("d".into(), 12, None)));
        assert_eq!(hour_of(&old), Some(12));
        assert_eq!(parse_key("!.1.x"), None);
        assert_eq!(parse_key(&format!("{k}.extra")), None);
    }
}
