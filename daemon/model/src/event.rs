//! Events for applications and the notification channels they are queued on.
//!
//! An event's body is still the rendered mbed JSON entry (see ARCHITECTURE.md, "model"):
//! it is made once, stored and delivered as that text.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The event types of the notification message (seed 000, "Notification data structure").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Notifications,
    Registrations,
    RegUpdates,
    DeRegistrations,
    RegistrationsExpired,
    AsyncResponses,
    /// An extension: a subscription the device refused or ended (see
    /// `subscriptions::subscription_error_body`).
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
}

/// An event's JSON entry, serialised once when the event is made: it is stored, queued
/// for every key it goes to and written into long-poll answers and callbacks as this
/// same text, so cloning it is a reference count and no step builds a JSON tree again.
/// It is stored (and read back) as the JSON value itself, not as a string. Being a
/// [`RawValue`](serde_json::value::RawValue), it is known to be valid JSON and is written
/// out without being parsed again.
#[derive(Debug, Clone)]
pub struct Body(Arc<serde_json::value::RawValue>);

impl Body {
    /// Serialises `v` (straight to JSON text, without a `Value` tree). Nothing the daemon
    /// makes fails to serialise; if something did, the entry would be `null`.
    pub fn new<T: Serialize + ?Sized>(v: &T) -> Body {
        match serde_json::value::to_raw_value(v) {
            Ok(raw) => Body(raw.into()),
            Err(e) => {
                tracing::error!("event entry not serialisable: {e}");
                Body(serde_json::value::RawValue::NULL.to_owned().into())
            }
        }
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Body {}

impl From<Value> for Body {
    fn from(v: Value) -> Body {
        Body::new(&v)
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Body, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Ok(Body(raw.into()))
    }
}

/// One entry of a notification message: its type and its JSON entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: Kind,
    pub body: Body,
    /// When it was created (ms since the epoch): the 15-minute discard window starts here.
    pub created_ms: u64,
}

/// An event queued for one key, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

/// Where a key's notifications go: the `PUT /notification/callback` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackTarget {
    pub url: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}
