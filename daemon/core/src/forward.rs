//! Forwarding a REST request to the cluster node that owns its device (issue 22).
//!
//! Every node lists every endpoint of the cluster, but only the node a device registered
//! with (its owner, `Registration::node`) has a session with it. A request or subscription
//! for an endpoint another node owns is handed to a [`Forwarder`], given at construction
//! (`RequestsDeps::forwarder`), which asks the owner to do it as if it had been made
//! there, with the caller's principal, and gives back its answer. The daemon implements it
//! on NATS request/reply (`daemon/src/cluster/forward.rs`); the core knows nothing of the
//! transport.
//!
//! Decisions:
//! - **The owner does everything** a local request does: the resource and quota checks,
//!   the cache (`cacheOnly=true` answers from the owner's cache), storing the request,
//!   queueing it for a queue-mode endpoint, and publishing its async response on its own
//!   hub for the key. The caller only returns the owner's answer (the async-response id
//!   the owner made).
//! - **Quota is counted once, on the owner** (where the request reaches the device, as
//!   notifications are counted where they arrive); the node that received the REST call
//!   counts nothing.
//! - **A subscription is forwarded; an unsubscription is not**: removing one is a store
//!   write any node can make, and the owner follows it (the subscriptions watch) and stops
//!   observing what nobody is subscribed to any more.

use std::future::Future;
use std::pin::Pin;

use crate::auth::Principal;
use crate::requests::{RequestError, Submit, Submitted};
use crate::subscriptions::{SubError, Subscribed};

/// A boxed future, as the trait's methods return.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Hands requests to the node that owns their endpoint.
pub trait Forwarder: Send + Sync {
    /// `Requests::submit` on `owner`, as `who`. Errors as locally; the owner not
    /// answering is [`RequestError::Unavailable`] naming it, an answer that cannot be
    /// read [`RequestError::Undecodable`].
    fn submit<'a>(
        &'a self,
        owner: &'a str,
        who: &'a Principal,
        ep: &'a str,
        s: Submit,
    ) -> Fut<'a, Result<Submitted, RequestError>>;

    /// `Subscriptions::subscribe` on `owner`, as `who`.
    fn subscribe<'a>(
        &'a self,
        owner: &'a str,
        who: &'a Principal,
        ep: &'a str,
        path: &'a str,
    ) -> Fut<'a, Result<Subscribed, SubError>>;
}
