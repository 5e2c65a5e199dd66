//! The seam that spreads notification channels over the nodes of a cluster (issue 22).
//!
//! Each key's events are numbered, queued and delivered by one node at a time, the key's
//! *channel owner*, which holds the key's lease ([`ChannelPeers::claim`]). The hub asks
//! the peers who owns a channel when it needs to know (an event to queue, a long-poll, a
//! callback set) and it does not already own it; a node that does not own a key's channel
//! sends its events for the key to the owner ([`ChannelPeers::append`]: acknowledged to
//! its producer only once the owner stored them) and forwards the key's long-polls there
//! ([`ChannelPeers::poll`], with the poll's own timeout). The owner's side of these calls
//! is [`super::Hub::append_here`], [`super::Hub::poll_here`] and
//! [`super::Hub::answer_reached`]; the daemon implements this trait on NATS request/reply
//! and serves those calls (`daemon/src/channels.rs`). Single-node (SQLite) hubs have no
//! peers and own every channel.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::Event;

/// A boxed future of the seam.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who delivers a key's events now ([`ChannelPeers::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node. `fresh`: the lease was free and is this node's now (the hub loads the
    /// key's undelivered events); otherwise this node's lease was renewed.
    Here { fresh: bool },
    /// Another node, by name.
    Node(String),
}

/// Why a call to a channel's owner failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The node asked does not own the key's channel (any more); the owner it knows, if
    /// any.
    #[error("the node asked does not own the channel (owner: {0:?})")]
    NotOwner(Option<String>),
    /// The node did not answer (gone, timed out, NATS unreachable).
    #[error("{0}")]
    Unreachable(String),
    /// The owner answered that it failed (its store did not take the events).
    #[error("{0}")]
    Failed(String),
}

/// A long-poll forwarded to a key's owner ([`ChannelPeers::poll`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    pub key_id: String,
    pub domain: String,
    pub allow: Option<Vec<String>>,
    /// How long the owner may wait for an event (`None`: answer at once).
    pub wait: Option<Duration>,
    /// The owner's answer (id) for this key that the forwarding node last handed to its
    /// client, repeated from [`ChannelPeers::answered`]: the client pulling again means it
    /// read that answer, and this poll, the key's next pull, acknowledges it on the owner
    /// even if the separate `answered` word is still on its way.
    pub sent: Option<u64>,
    /// The poll is a WebSocket's ([`super::hub::Hub::pull_for_socket`], issue 23): it
    /// reads a WebSocket channel, where a long-poll is refused.
    pub socket: bool,
}

/// The owner's answer to a forwarded long-poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// The owner's answer in flight `id` (acknowledged by the key's next pull once the
    /// forwarding node says it reached its client, [`ChannelPeers::answered`]).
    Batch {
        id: u64,
        events: Vec<Event>,
    },
    Empty,
    /// The key delivers to a callback URL.
    CallbackActive,
}

/// The other nodes of the cluster, as the hub needs them. Implemented by the daemon on
/// NATS (`channels::NatsPeers`).
pub trait ChannelPeers: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> &str;
    /// Takes key `key_id`'s lease if free, renews it if this node holds it, or names its
    /// holder. `Err`: the lease could not be read or written (the message).
    fn claim<'a>(&'a self, key_id: &'a str) -> BoxFut<'a, Result<Claim, String>>;
    /// Gives up this node's lease of the key (a clean stop).
    fn release<'a>(&'a self, key_id: &'a str) -> BoxFut<'a, ()>;
    /// The node holding key `key_id`'s lease now, if any (a read: nothing is taken).
    /// `Err`: it could not be read (the message).
    fn holder<'a>(&'a self, key_id: &'a str) -> BoxFut<'a, Result<Option<String>, String>>;
    /// Has `node`, the key's owner, queue `events` (in this order) for the key; `Ok` once
    /// the owner stored them. An owner whose write fails takes them out of its queue again
    /// ([`super::Hub::append_here`]): the caller sends them again.
    fn append<'a>(
        &'a self,
        node: &'a str,
        key_id: &'a str,
        events: &'a [Event],
    ) -> BoxFut<'a, Result<(), PeerError>>;
    /// Forwards a long-poll to `node`, the key's owner.
    fn poll<'a>(
        &'a self,
        node: &'a str,
        req: &'a PollRequest,
    ) -> BoxFut<'a, Result<Polled, PeerError>>;
    /// Tells `node` whether its long-poll answer `id` for the key reached the client
    /// (`sent`) or is to be queued again. Best effort: the owner puts back an answer it
    /// hears nothing about within [`super::hub::REMOTE_ANSWER_WINDOW`].
    fn answered<'a>(
        &'a self,
        node: &'a str,
        key_id: &'a str,
        id: u64,
        sent: bool,
    ) -> BoxFut<'a, ()>;
}
