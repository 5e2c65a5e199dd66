//! Durable state: one port (trait) per aggregate, [`Store`] their union, and the backends:
//! [`sqlite::SqliteStore`] (embedded, the default), [`nats::NatsStore`] (NATS JetStream, the
//! shared state of a cluster, issue 22) and [`memory::MemoryStore`] (tests).
//!
//! Every write returns a [`Pending`] that resolves once the write is durable; callers
//! acknowledge to devices and applications only after that.
//!
//! **Invariant:** this crate depends on `connectord-model` alone; how a record is
//! serialised is the backend's business, and [`StoreError`] names no backend's type.

#![deny(unsafe_code)]

pub mod memory;
pub mod nats;
/// Every port trait, for calling them on a concrete backend: `use connectord_store::prelude::*`.
pub mod prelude {
    pub use crate::{
        CredentialStore, EventLog, Feed, PluginStateStore, QuotaStore, RegistrationStore,
        RequestStore, Store, SubscriptionStore,
    };
}
mod health;
mod journal;
mod record_json;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use connectord_model::{
    CertificateRecord, ChannelRecord, Event, HourCount, Job, PresubRecord, PskRecord, Registration,
    StoredEvent, SubscriptionRecord,
};

/// Told how long each of the store's transactions took (the daemon's
/// `store_commit_duration_seconds`). `()` observes nothing.
pub trait CommitObserver: Send + Sync + 'static {
    fn observe(&self, took: std::time::Duration);
}

impl CommitObserver for () {
    fn observe(&self, _: std::time::Duration) {}
}

/// How often a store looks for writes by other processes (see
/// [`Store::external_changes`]).
pub const EXTERNAL_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The owner, in the plugin state, of what the daemon itself keeps there (no plugin's
/// name: those have no dot). No plugin reads it, so another node's write of it is no
/// reason to load the plugins again (`Feed::external_changes` leaves it out on NATS).
pub const CORE_STATE_OWNER: &str = "connectord.core";

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend's own error (SQLite's, for [`sqlite::SqliteStore`]), kept as its
    /// source; `unavailable` is the backend's verdict for [`StoreError::is_unavailable`].
    #[error("database error: {source}")]
    Backend {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        unavailable: bool,
    },
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot open the state directory {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the database schema is version {found}, newer than this connectord knows ({known}); upgrade connectord or restore a backup"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("the transaction failed: {0}")]
    Commit(String),
    #[error("the store has stopped")]
    Closed,
    /// Events not stored because this node's channel lease of each key named lapsed and
    /// another node may have taken the channel over (the NATS store's fence, module
    /// `nats::channels`): the keys' events go to their owners. The other keys' events of
    /// the same write are stored.
    #[error("the channel lease of {} is no longer this node's: its events go to the owner", .0.join(", "))]
    LeaseLost(Vec<String>),
    /// Another cluster node that holds what was asked for (a key's notification channel)
    /// could not be reached (the message says which and why). Unavailable, like a failing
    /// store, but this node's store is fine: answered 503 with this reason, not as a
    /// failing store.
    #[error("{0}")]
    PeerUnreachable(String),
    /// The state cannot be used: found by the probe at start (read-only, corrupt pages, not
    /// a database, ...). The message names the file and the cause.
    #[error("{}: {cause}", path.display())]
    Unusable {
        path: std::path::PathBuf,
        cause: String,
    },
}

impl StoreError {
    /// Whether the storage itself is failing (disk full, read-only, I/O error, corrupt
    /// pages, the store stopped), rather than one record or statement being wrong. Such a
    /// failure is answered "unavailable, try again" (REST 503, CoAP 5.03), not 500 / 5.00.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Backend { unavailable, .. } => *unavailable,
            StoreError::Commit(_)
            | StoreError::Closed
            | StoreError::Dir { .. }
            | StoreError::Unusable { .. }
            | StoreError::PeerUnreachable(_) => true,
            StoreError::Corrupt(_) | StoreError::SchemaTooNew { .. } | StoreError::LeaseLost(_) => {
                false
            }
        }
    }
}

/// Logs a failed store operation with `context`: as an error, unless the storage itself is
/// failing ([`StoreError::is_unavailable`]); the store reports that once when it starts
/// and at most once a minute while it lasts, so callers log it only at debug level and a
/// failing disk does not write one line per request, event or device.
pub fn log_failure(context: std::fmt::Arguments<'_>, e: &StoreError) {
    if e.is_unavailable() || matches!(e, StoreError::LeaseLost(_)) {
        tracing::debug!("{context}: {e}");
    } else {
        tracing::error!("{context}: {e}");
    }
}

/// Whether the store's writes succeed now, as the daemon reports it (`GET /`, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// `None` while writes succeed; the last failure while they fail.
    pub failing: Option<String>,
    /// Writes that failed because the storage failed, since start.
    pub errors: u64,
}

/// The result of a store operation, once it is durable.
pub struct Pending<T>(PendingInner<T>);

enum PendingInner<T> {
    Waiting(oneshot::Receiver<Result<T, StoreError>>),
    Failed(Option<StoreError>),
    Ready(Option<T>),
}

impl<T> Pending<T> {
    pub fn new(rx: oneshot::Receiver<Result<T, StoreError>>) -> Pending<T> {
        Pending(PendingInner::Waiting(rx))
    }
    pub fn failed(e: StoreError) -> Pending<T> {
        Pending(PendingInner::Failed(Some(e)))
    }
    /// Already durable (a backend that answers at once, such as [`memory::MemoryStore`]).
    pub fn ready(value: T) -> Pending<T> {
        Pending(PendingInner::Ready(Some(value)))
    }
}

// Nothing inside is ever pinned: the value is moved out whole once ready.
impl<T> Unpin for Pending<T> {}

impl<T> Future for Pending<T> {
    type Output = Result<T, StoreError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PendingInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
            PendingInner::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(StoreError::Closed))),
            PendingInner::Ready(v) => Poll::Ready(v.take().ok_or(StoreError::Closed)),
        }
    }
}

/// What [`EventLog::append_events`] answers.
pub struct Appended {
    /// The sequence number the store gave each event, in the order given.
    pub seqs: Vec<u64>,
    /// Resolves once the events are durable.
    pub durable: Pending<()>,
}

/// The stored registrations in pieces, as a store reads them ([`RegistrationStore::
/// stream_registrations`]).
pub enum RegistrationChunks {
    /// All of them at once.
    Whole(Option<Pending<Vec<Registration>>>),
    /// Pieces as they are read; `done` says whether all were read.
    Chunks {
        rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Registration>>,
        done: Option<Pending<()>>,
    },
}

impl RegistrationChunks {
    /// The next piece; `None` once every registration was given, an error if the read
    /// failed (the pieces given before it are then not the whole).
    pub async fn next(&mut self) -> Option<Result<Vec<Registration>, StoreError>> {
        match self {
            RegistrationChunks::Whole(all) => Some(all.take()?.await),
            RegistrationChunks::Chunks { rx, done } => match rx.recv().await {
                Some(chunk) => Some(Ok(chunk)),
                None => done.take()?.await.err().map(Err),
            },
        }
    }
}

/// The registrations (the endpoint directory's write side).
pub trait RegistrationStore: Send + Sync + 'static {
    /// Every stored registration, expired or not.
    fn load_registrations(&self) -> Pending<Vec<Registration>>;
    /// Every stored registration, in pieces as they are read: at start, so that the
    /// registry indexes one piece while the store reads the next (issue 24: a restart with
    /// 1 000 000 registrations within 2 s). By default all at once.
    fn stream_registrations(&self) -> RegistrationChunks {
        RegistrationChunks::Whole(Some(self.load_registrations()))
    }
    /// Inserts or replaces a registration by id, removing any other registration of the same
    /// endpoint name in the same domain (a full re-registration).
    fn put_registration(&self, reg: Registration) -> Pending<()>;
    /// Removes a registration; removing an absent one is not an error.
    fn delete_registration(&self, id: String) -> Pending<()>;
}

/// The notification channels and the event log: each key's ordered queue of undelivered
/// events.
pub trait EventLog: Send + Sync + 'static {
    /// Every notification channel (one per access key that has one).
    fn load_channels(&self) -> Pending<Vec<ChannelRecord>>;
    /// Inserts or replaces a channel by key id.
    fn put_channel(&self, channel: ChannelRecord) -> Pending<()>;
    /// Removes a channel and its undelivered events (a channel removed as idle): the next
    /// load does not find it. Removing an absent one is not an error. The key's sequence
    /// numbers are not given again (a new channel of the key numbers on above them).
    fn delete_channel(&self, key_id: String) -> Pending<()>;
    /// Every undelivered event, in (key id, sequence) order.
    fn load_events(&self) -> Pending<Vec<StoredEvent>>;
    /// One key's undelivered events, in sequence order: what a node loads for a key whose
    /// channel it takes over (issue 22). A key's events are numbered by one store at a time;
    /// the store that loads a key this way numbers its next events above every number given
    /// to the key before, by any store sharing the state (see `nats`), so the new owner
    /// calls this before its first append for the key.
    fn load_events_of(&self, key_id: String) -> Pending<Vec<StoredEvent>>;
    /// Appends events, each `(key id, event)`, and, in the same transaction, removes the
    /// request `answered` whose answer they are (one commit for the async response instead
    /// of two); `answered` is the request's row number.
    ///
    /// The store gives each event its key's next sequence number, at once, in the order
    /// the appends are submitted: per key increasing, never given twice (not after its
    /// event was deleted, not after a restart). [`Appended::seqs`] are those numbers, one
    /// per event in order; [`Appended::durable`] resolves once they are stored.
    fn append_events(&self, events: Vec<(String, Event)>, answered: Option<u64>) -> Appended;
    /// Removes the events of `key_id` with a sequence number up to and including `seq`:
    /// delivery and discarding always take the oldest events first.
    fn delete_events_through(&self, key_id: String, seq: u64) -> Pending<()>;
}

/// Requests to devices, from acceptance until answered.
pub trait RequestStore: Send + Sync + 'static {
    /// Every request to a device not yet answered, in the order they were stored, each
    /// with its [`Job::row`].
    fn load_requests(&self) -> Pending<Vec<Job>>;
    /// Stores a request to a device before it is acknowledged with its async-response id;
    /// resolves to the request's row number (for [`Job::row`]). Borrowed: a store takes
    /// what it keeps (the SQLite store, the record's JSON, rendered on the caller's thread)
    /// rather than the caller cloning the job for it.
    fn put_request(&self, job: &Job) -> Pending<u64>;
    /// Removes a request by row number once its answer is an event (or it was cancelled).
    fn delete_request(&self, row: u64) -> Pending<()>;
}

/// Plugins' key/value state.
pub trait PluginStateStore: Send + Sync + 'static {
    /// A value of a plugin's key-value state.
    fn plugin_state_get(&self, plugin: String, key: String) -> Pending<Option<Vec<u8>>>;
    /// Stores a value of a plugin's state (durable when the future resolves).
    fn plugin_state_put(&self, plugin: String, key: String, value: Vec<u8>) -> Pending<()>;
    fn plugin_state_delete(&self, plugin: String, key: String) -> Pending<()>;
    /// The keys of a plugin's state that start with `prefix`, sorted.
    fn plugin_state_keys(&self, plugin: String, prefix: String) -> Pending<Vec<String>>;
}

/// Subscriptions and pre-subscription rules.
pub trait SubscriptionStore: Send + Sync + 'static {
    /// Every subscription of every key.
    fn load_subscriptions(&self) -> Pending<Vec<SubscriptionRecord>>;
    /// Adds a subscription (adding one that exists is not an error).
    fn put_subscription(&self, sub: SubscriptionRecord) -> Pending<()>;
    /// Removes a key's subscriptions: all (`ep` None), of one endpoint (`path` None), or one.
    fn delete_subscriptions(
        &self,
        key_id: String,
        ep: Option<String>,
        path: Option<String>,
    ) -> Pending<()>;
    /// Every key's pre-subscription rules.
    fn load_presubscriptions(&self) -> Pending<Vec<PresubRecord>>;
    /// Replaces a key's pre-subscription rules and removes all its subscriptions, in one
    /// transaction (the seed: changing pre-subscriptions removes existing subscriptions).
    fn replace_presubscriptions(&self, rec: PresubRecord) -> Pending<()>;
}

/// A change another cluster node made to the subscriptions or pre-subscriptions, as a
/// backend that several nodes share reports it (`nats::NatsStore::watch_subscriptions`).
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionChange {
    /// A subscription recorded.
    Put(SubscriptionRecord),
    /// A subscription removed.
    Deleted {
        key_id: String,
        ep: String,
        path: String,
    },
    /// A key's pre-subscription rules replaced (its subscriptions were removed before).
    Presubscriptions(PresubRecord),
    /// A key's pre-subscription rules removed.
    PresubscriptionsDeleted { key_id: String },
}

/// The traffic limits' hourly transaction counts.
pub trait QuotaStore: Send + Sync + 'static {
    /// Every stored hourly transaction count of the traffic limits.
    fn load_hour_counts(&self) -> Pending<Vec<HourCount>>;
    /// Stores these hourly counts (each replaces the stored count of its domain and hour)
    /// and removes the counts of hours before `keep_from`, in one transaction.
    fn save_hour_counts(&self, counts: Vec<HourCount>, keep_from: u64) -> Pending<()>;
}

/// Device credentials (issue 21): each endpoint's PSK, and the device certificates the
/// CA issued with their revocation.
///
/// Decision: a certificate is revoked by its serial number (each issued one is recorded
/// here), not by "every certificate of the endpoint issued before a time": the serial is
/// what a TLS stack hands over, and a list tells exactly which certificate is out.
/// Revoking an endpoint revokes every certificate it was issued.
pub trait CredentialStore: Send + Sync + 'static {
    /// Every endpoint's PSK.
    fn load_psks(&self) -> Pending<Vec<PskRecord>>;
    /// Every issued certificate, revoked or not.
    fn load_certificates(&self) -> Pending<Vec<CertificateRecord>>;
    /// Inserts or replaces the PSK of (`domain`, `ep`). The identity is unique: a record
    /// of another endpoint with the same identity makes the write fail.
    fn put_psk(&self, rec: PskRecord) -> Pending<()>;
    /// Records an issued certificate (or replaces the record of its serial).
    fn put_certificate(&self, rec: CertificateRecord) -> Pending<()>;
    /// Removes the PSK of (`domain`, `ep`) and marks each of its certificates not yet
    /// revoked as revoked at `revoked_ms`, in one transaction. Revoking an endpoint
    /// without credentials is not an error.
    fn revoke_device(&self, domain: String, ep: String, revoked_ms: u64) -> Pending<()>;
}

/// The change feed and the backend's health.
pub trait Feed: Send + Sync + 'static {
    /// A counter that moves each time the store sees a write made to the same state by
    /// another process (`connectord plugin-call`), checked about once a
    /// [`EXTERNAL_CHECK`] (SQLite), or another node's write to the plugin state, as it
    /// comes (NATS); `None` if this backend cannot tell.
    fn external_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether writes succeed now (a backend that cannot tell is always healthy).
    fn health(&self) -> Health {
        Health::default()
    }
}

/// `Store` is the union of the ports, and every type that implements them all is one.
macro_rules! union_of_ports {
    ($($port:ident),+) => {
        /// Everything the daemon keeps across restarts: one port per aggregate, which a
        /// backend implements all of (a service that needs one aggregate can take that port
        /// alone).
        ///
        /// Writes are applied in the order they are submitted, so a caller that submits
        /// under its own lock gets the store in the same order as its in-memory state; that
        /// holds across ports too (one backend, one order).
        pub trait Store: $($port +)+ {}

        impl<T: $($port +)+> Store for T {}
    };
}

union_of_ports!(
    RegistrationStore,
    EventLog,
    RequestStore,
    PluginStateStore,
    SubscriptionStore,
    QuotaStore,
    CredentialStore,
    Feed
);
