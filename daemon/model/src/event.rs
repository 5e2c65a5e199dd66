//! Events for applications and the notification channels they are queued on.
//!
//! An event is typed data ([`Entry`]): what happened, with the fields an application's
//! entry needs. No wire shape lives here: the REST edge (`connectord_rest::wire`) renders
//! entries and notification messages in mbed JSON, the store keeps its own record of them.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

/// The event types of the notification message (seed 000, "Notification data structure").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Notifications,
    Registrations,
    RegUpdates,
    DeRegistrations,
    RegistrationsExpired,
    AsyncResponses,
    /// An extension: a subscription the device refused or ended.
    SubscriptionErrors,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Notifications,
        Kind::Registrations,
        Kind::RegUpdates,
        Kind::DeRegistrations,
        Kind::RegistrationsExpired,
        Kind::AsyncResponses,
        Kind::SubscriptionErrors,
    ];

    /// The type's name (the seed's): the key of its array in a notification message, and
    /// the name the store records it under.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Notifications => "notifications",
            Kind::Registrations => "registrations",
            Kind::RegUpdates => "reg-updates",
            Kind::DeRegistrations => "de-registrations",
            Kind::RegistrationsExpired => "registrations-expired",
            Kind::AsyncResponses => "async-responses",
            Kind::SubscriptionErrors => "subscription-errors",
        }
    }

    /// The kind named `name` ([`Kind::as_str`]).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// A value a device sent for a resource it is observed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub ep: String,
    pub path: String,
    /// The content format, described (`text/plain`; a number when unknown).
    pub ct: Option<String>,
    pub payload: Vec<u8>,
    /// Seconds (the device's Max-Age, else the default).
    pub max_age: u32,
}

/// One resource of a registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSummary {
    pub path: String,
    /// `if=`.
    pub iface: Option<String>,
    /// `rt=`.
    pub rt: Option<String>,
    /// `ct=`, described.
    pub ct: Option<String>,
    pub obs: bool,
    /// `ver=`.
    pub ver: Option<String>,
}

/// A registration or update: the endpoint with the resources the receiving key may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSummary {
    pub ep: String,
    /// The endpoint type (empty when the device gave none).
    pub ept: String,
    /// Queue mode.
    pub queue: bool,
    pub resources: Vec<ResourceSummary>,
    /// The LwM2M version, if the device gave one.
    pub lwm2m: Option<String>,
    /// The device's preferred content format, described, if it listed one.
    pub ct: Option<String>,
}

/// The answer of a device to a request (or the failure in its place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncResponse {
    /// The async-response id given to the application.
    pub id: String,
    /// HTTP status of the answer.
    pub status: u16,
    pub payload: Vec<u8>,
    /// The content format, described.
    pub ct: Option<String>,
    pub max_age: Option<u32>,
    /// Present only on failure.
    pub error: Option<String>,
    /// The Location-Path a device answered a create with (`/3303/1`).
    pub location: Option<String>,
}

/// A subscription removed because the device refused or ended the observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionError {
    pub ep: String,
    pub path: String,
    /// HTTP status of the device's answer (412: it answered without Observe).
    pub status: u16,
    pub error: String,
}

/// What an event says, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Notification(Notification),
    Registration(EndpointSummary),
    RegUpdate(EndpointSummary),
    /// The endpoint's name.
    DeRegistration(String),
    /// The endpoint's name.
    Expired(String),
    AsyncResponse(AsyncResponse),
    SubscriptionError(SubscriptionError),
}

impl Entry {
    pub fn kind(&self) -> Kind {
        match self {
            Entry::Notification(_) => Kind::Notifications,
            Entry::Registration(_) => Kind::Registrations,
            Entry::RegUpdate(_) => Kind::RegUpdates,
            Entry::DeRegistration(_) => Kind::DeRegistrations,
            Entry::Expired(_) => Kind::RegistrationsExpired,
            Entry::AsyncResponse(_) => Kind::AsyncResponses,
            Entry::SubscriptionError(_) => Kind::SubscriptionErrors,
        }
    }
}

#[derive(Debug)]
struct Shared {
    entry: Entry,
    /// The entry as the edge renders it, filled by the first delivery and reused by the
    /// others (an event queued for several keys, delivered again after a failure). Opaque
    /// text here: its format is the renderer's.
    rendered: OnceLock<Box<str>>,
}

/// One event: its entry and when it happened. Cloning it is a reference count; every key
/// it is queued for shares one entry (and one rendering of it).
#[derive(Debug, Clone)]
pub struct Event {
    shared: Arc<Shared>,
    /// When it was created (ms since the epoch): the 15-minute discard window starts here.
    pub created_ms: u64,
}

impl Event {
    pub fn new(entry: Entry, created_ms: u64) -> Event {
        Event {
            shared: Arc::new(Shared {
                entry,
                rendered: OnceLock::new(),
            }),
            created_ms,
        }
    }

    pub fn entry(&self) -> &Entry {
        &self.shared.entry
    }

    pub fn kind(&self) -> Kind {
        self.shared.entry.kind()
    }

    /// The entry rendered by `render`, made once per event and kept with it (the edge's
    /// cache; see `connectord_rest::wire`).
    pub fn rendered(&self, render: impl FnOnce(&Entry) -> String) -> &str {
        self.shared
            .rendered
            .get_or_init(|| render(&self.shared.entry).into_boxed_str())
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Event) -> bool {
        self.created_ms == other.created_ms && self.entry() == other.entry()
    }
}

impl Eq for Event {}

/// An event queued for one key, as stored: the sequence number is the store's
/// (`EventLog::append_events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub key_id: String,
    pub seq: u64,
    pub event: Event,
}

/// A key's notification channel, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub key_id: String,
    pub domain: String,
    /// Set: notifications are pushed there. Unset: the key long-polls.
    pub callback: Option<CallbackTarget>,
    /// The key's restriction to some endpoints and resources (`Principal::allow`), as its
    /// latest authentication said: events are routed to the channel only for what it
    /// allows (see `events::About` in the daemon). Kept with the record so that it holds across a restart,
    /// before the key authenticates again. Absent (records of older versions too): no
    /// restriction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// The key registered a WebSocket channel (`PUT /notification/websocket`): its
    /// notifications go to the socket opened at `/notification/websocket-connect`, its
    /// long-poll answers 409. Never set together with `callback` (each replaces the
    /// other). Absent (records of older versions too): false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub websocket: bool,
}

/// Where a key's notifications go: the `PUT /notification/callback` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackTarget {
    pub url: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}
