//! Notification channels across the nodes of a cluster (issue 22): the hub's
//! [`ChannelPeers`] on NATS, the calls a node serves for the channels it owns, and the
//! watch that tells this node's hub the channel records other nodes write.
//!
//! Calls (core NATS request/reply, `<prefix>.node.<owner>.<op>`, JSON bodies; events in
//! the store's own record form, `store::nats::events_to_json`):
//! - [`OP_APPEND`] `{"key", "events", "unqueue"?}`: the owner queues the events, and takes
//!   every one out again if its write fails (the sender sends them again; `unqueue`, per
//!   event, is what an older owner went by: this version's senders mark every event) (one call carries
//!   all the key's events waiting on this node, up to 256); answered once they are stored (`"ok"`), or `{"not_owner": <owner or null>}`, `{"failed": <why>}`.
//! - [`OP_POLL`] `{"key", "domain", "allow", "wait_ms", "sent", "socket"?}`: a long-poll
//!   on the owner (`"socket": true`: a WebSocket's pull, issue 23), with what is left of
//!   the client's wait and the id of the owner's answer this
//!   node last handed to a client for the key (`null` if none since); answered `{"batch": {"id", "events"}}`, `"empty"`,
//!   `"callback"` (the key delivers to a callback), or as above. The call's own timeout
//!   is the wait plus `[cluster] timeout_ms` plus 1 s.
//! - [`OP_ANSWERED`] `{"key", "id", "sent"}`: whether the owner's answer `id` reached the
//!   client (the key's next pull acknowledges it) or is to be queued again.
//!
//! Bytes from another node are outside input: an unreadable call is answered
//! `{"failed": ...}`, an unreadable answer is an unreachable owner (asked again).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::events::Hub;
use crate::events::peers::{BoxFut, ChannelPeers, Claim, PeerError, PollRequest, Polled};
use crate::model::Event;
use crate::shutdown::Shutdown;
use crate::store::StoreError;
use crate::store::nats::{
    ChannelChange, Lease, NatsStore, NodeCall, events_from_json, events_to_json,
};

/// The longest wait a forwarded long-poll may ask for: `notifications.long_poll_s` can be
/// at most 300 s. A call's `wait_ms` is outside input: `u64::MAX` overflowed the owner's
/// deadline (a panic in its handler) and a huge value held a slot of the owner for good.
const MAX_POLL_WAIT: Duration = Duration::from_secs(300);

/// The wait of a forwarded long-poll, at most [`MAX_POLL_WAIT`].
fn poll_wait(wait_ms: Option<u64>) -> Option<Duration> {
    wait_ms.map(|ms| Duration::from_millis(ms).min(MAX_POLL_WAIT))
}

/// Queue events on the key's owner.
pub const OP_APPEND: &str = "ch_append";
/// A long-poll forwarded to the key's owner.
pub const OP_POLL: &str = "ch_poll";
/// Whether a forwarded long-poll's answer reached its client.
pub const OP_ANSWERED: &str = "ch_answered";

#[derive(Serialize, Deserialize)]
struct AppendCall {
    key: String,
    events: serde_json::Value,
    /// Per event, whether the owner takes it out again if its write fails: what an owner
    /// of an older version goes by. An owner of this version takes every event out again
    /// and reads it not; its senders mark every one, for older owners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unqueue: Vec<bool>,
}

#[derive(Serialize, Deserialize)]
struct PollCall {
    key: String,
    domain: String,
    allow: Option<Vec<String>>,
    wait_ms: Option<u64>,
    /// [`PollRequest::sent`] (absent from a node that does not send it).
    #[serde(default)]
    sent: Option<u64>,
    /// [`PollRequest::socket`]: a WebSocket's poll (absent from older nodes: a long-poll).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    socket: bool,
}

#[derive(Serialize, Deserialize)]
struct AnsweredCall {
    key: String,
    id: u64,
    sent: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok,
    NotOwner(Option<String>),
    Failed(String),
    Batch { id: u64, events: serde_json::Value },
    Empty,
    Callback,
}

/// The hub's peers on the NATS store.
pub struct NatsPeers {
    store: Arc<NatsStore>,
    node: String,
    /// `[cluster] timeout_ms`: a call's bound (a poll's is its wait plus this).
    timeout: Duration,
}

impl NatsPeers {
    pub fn new(store: Arc<NatsStore>, node: String, timeout: Duration) -> NatsPeers {
        NatsPeers {
            store,
            node,
            timeout,
        }
    }

    async fn call<T: Serialize>(
        &self,
        node: &str,
        op: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<Answer, PeerError> {
        let body = serde_json::to_vec(body).map_err(|e| PeerError::Failed(e.to_string()))?;
        let got = self
            .store
            .call_node(node, op, Bytes::from(body), timeout)
            .await
            .map_err(|e| PeerError::Unreachable(e.to_string()))?;
        let answer: Answer = serde_json::from_slice(&got).map_err(|e| {
            PeerError::Unreachable(format!("node {node} answered {op} unreadably: {e}"))
        })?;
        match answer {
            Answer::NotOwner(owner) => Err(PeerError::NotOwner(owner)),
            Answer::Failed(why) => Err(PeerError::Failed(why)),
            other => Ok(other),
        }
    }
}

impl ChannelPeers for NatsPeers {
    fn node(&self) -> &str {
        &self.node
    }

    fn claim<'a>(&'a self, key_id: &'a str) -> BoxFut<'a, Result<Claim, String>> {
        Box::pin(async move {
            match self.store.claim_channel(key_id).await {
                Ok(Lease::Ours { fresh }) => Ok(Claim::Here { fresh }),
                Ok(Lease::Theirs(n)) => Ok(Claim::Node(n)),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn holder<'a>(&'a self, key_id: &'a str) -> BoxFut<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            self.store
                .channel_owner(key_id)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn release<'a>(&'a self, key_id: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.store.release_channel(key_id).await {
                tracing::debug!(key = key_id, "cluster: channel lease not released: {e}");
            }
        })
    }

    fn append<'a>(
        &'a self,
        node: &'a str,
        key_id: &'a str,
        events: &'a [Event],
    ) -> BoxFut<'a, Result<(), PeerError>> {
        Box::pin(async move {
            let call = AppendCall {
                key: key_id.to_string(),
                events: events_to_json(events),
                // Every one: this node sends them again, so an owner of an older version
                // (which keeps the unmarked ones) does not queue a copy per try either.
                unqueue: vec![true; events.len()],
            };
            match self.call(node, OP_APPEND, &call, self.timeout).await? {
                Answer::Ok => Ok(()),
                _ => Err(PeerError::Unreachable(format!(
                    "node {node} answered {OP_APPEND} with something else"
                ))),
            }
        })
    }

    fn poll<'a>(
        &'a self,
        node: &'a str,
        req: &'a PollRequest,
    ) -> BoxFut<'a, Result<Polled, PeerError>> {
        Box::pin(async move {
            let call = PollCall {
                key: req.key_id.clone(),
                domain: req.domain.clone(),
                allow: req.allow.clone(),
                wait_ms: req.wait.map(|w| w.as_millis() as u64),
                sent: req.sent,
                socket: req.socket,
            };
            let bound = req.wait.unwrap_or_default() + self.timeout + Duration::from_secs(1);
            match self.call(node, OP_POLL, &call, bound).await? {
                Answer::Batch { id, events } => match events_from_json(&events) {
                    Ok(events) => Ok(Polled::Batch { id, events }),
                    Err(e) => {
                        // Its events cannot be read here: the owner queues them again.
                        self.answered(node, &req.key_id, id, false).await;
                        Err(PeerError::Unreachable(format!(
                            "node {node} answered a long-poll unreadably: {e}"
                        )))
                    }
                },
                Answer::Empty => Ok(Polled::Empty),
                Answer::Callback => Ok(Polled::CallbackActive),
                _ => Err(PeerError::Unreachable(format!(
                    "node {node} answered {OP_POLL} with something else"
                ))),
            }
        })
    }

    fn answered<'a>(
        &'a self,
        node: &'a str,
        key_id: &'a str,
        id: u64,
        sent: bool,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let call = AnsweredCall {
                key: key_id.to_string(),
                id,
                sent,
            };
            if let Err(e) = self.call(node, OP_ANSWERED, &call, self.timeout).await {
                // The owner puts the answer back by itself after a while.
                tracing::debug!(key = key_id, "cluster: {OP_ANSWERED} to {node}: {e}");
            }
        })
    }
}

/// Serves this node's channel calls ([`OP_APPEND`], [`OP_POLL`], [`OP_ANSWERED`]), each
/// on a task of its own, until `stop`.
/// How many channel calls from other nodes this node handles at once; the next waits for
/// one to end. Larger than the forwarded requests' bound (256) because a forwarded
/// long-poll holds its slot for its whole wait (up to 30 s), and one per key polled
/// through another node can wait at once; a waiting poll costs a task and a few hundred
/// bytes.
const MAX_CONCURRENT_CHANNEL_CALLS: usize = 4096;

pub async fn serve(
    store: &NatsStore,
    hub: Arc<Hub>,
    stop: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let calls = store.serve_ops(&[OP_APPEND, OP_POLL, OP_ANSWERED]).await?;
    Ok(tokio::spawn(crate::cluster::serve_calls(
        calls,
        MAX_CONCURRENT_CHANNEL_CALLS,
        stop,
        "the channel calls ended; this node's channels are no longer reachable",
        move |call| handle(Arc::clone(&hub), call),
    )))
}

fn read<T: serde::de::DeserializeOwned>(call: &NodeCall) -> Result<T, Answer> {
    serde_json::from_slice(&call.body)
        .map_err(|e| Answer::Failed(format!("unreadable {} call: {e}", call.op)))
}

fn peer_answer(e: PeerError) -> Answer {
    match e {
        PeerError::NotOwner(owner) => Answer::NotOwner(owner),
        other => Answer::Failed(other.to_string()),
    }
}

async fn handle(hub: Arc<Hub>, call: NodeCall) {
    let answer = match call.op.as_str() {
        OP_APPEND => match read::<AppendCall>(&call) {
            Ok(c) => match events_from_json(&c.events) {
                Ok(events) => match hub.append_here(&c.key, events).await {
                    Ok(()) => Answer::Ok,
                    Err(e) => peer_answer(e),
                },
                Err(e) => Answer::Failed(e.to_string()),
            },
            Err(a) => a,
        },
        OP_POLL => match read::<PollCall>(&call) {
            Ok(c) => {
                let req = PollRequest {
                    key_id: c.key,
                    domain: c.domain,
                    allow: c.allow,
                    wait: poll_wait(c.wait_ms),
                    sent: c.sent,
                    socket: c.socket,
                };
                match hub.poll_here(req).await {
                    Ok(Polled::Batch { id, events }) => Answer::Batch {
                        id,
                        events: events_to_json(&events),
                    },
                    Ok(Polled::Empty) => Answer::Empty,
                    Ok(Polled::CallbackActive) => Answer::Callback,
                    Err(e) => peer_answer(e),
                }
            }
            Err(a) => a,
        },
        OP_ANSWERED => match read::<AnsweredCall>(&call) {
            Ok(c) => {
                hub.answer_reached(&c.key, c.id, c.sent);
                Answer::Ok
            }
            Err(a) => a,
        },
        other => Answer::Failed(format!("unknown channel call {other}")),
    };
    let body = match serde_json::to_vec(&answer) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cluster: cannot encode a channel answer: {e}");
            return;
        }
    };
    if let Err(e) = call.answer(Bytes::from(body)).await {
        tracing::debug!("cluster: a channel call's answer was not sent: {e}");
    }
}

/// Applies the channel records other nodes write to this node's hub, until `stop`.
pub async fn follow(
    mut rx: tokio::sync::broadcast::Receiver<ChannelChange>,
    hub: Arc<Hub>,
    mut stop: Shutdown,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let got = tokio::select! {
            _ = stop.recv() => return,
            r = rx.recv() => r,
        };
        match got {
            Ok(ChannelChange::Put(rec)) => hub.apply_channel(rec),
            Ok(ChannelChange::Removed(key_id)) => hub.apply_removal(&key_id),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!("cluster: missed {n} channel changes of other nodes");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25 review: another node's `wait_ms` is bounded before it makes a deadline.
    #[test]
    fn a_forwarded_polls_wait_is_bounded() {
        assert_eq!(poll_wait(None), None);
        assert_eq!(poll_wait(Some(1500)), Some(Duration::from_millis(1500)));
        assert_eq!(poll_wait(Some(u64::MAX)), Some(MAX_POLL_WAIT));
        let deadline = std::time::Instant::now() + poll_wait(Some(u64::MAX)).unwrap();
        assert!(deadline > std::time::Instant::now());
    }
}
