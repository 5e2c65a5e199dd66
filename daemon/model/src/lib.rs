//! connectord's domain records, shared by every layer: what is registered, what is queued
//! for applications, what is asked of devices and what is counted.
//!
//! **Invariant:** this crate does no I/O and depends on no other crate of connectord; the
//! store, the core services and the REST edge all depend on it, never the other way.

#![forbid(unsafe_code)]

pub mod credential;
pub mod event;
pub mod json;
pub mod names;
pub mod peer;
pub mod quota;
pub mod registration;
pub mod request;
pub mod subscription;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;

pub use credential::{CertificateRecord, PskRecord, normal_serial};
pub use event::{
    AsyncResponse, CallbackTarget, ChannelRecord, EndpointSummary, Entry, Event, Kind,
    Notification, ResourceSummary, StoredEvent, SubscriptionError,
};
pub use names::{MAX_NAME_LEN, is_dot_segment, valid_domain, valid_name};
pub use peer::{ListenerId, ListenerKind, PeerRef};
pub use quota::HourCount;
pub use registration::Registration;
pub use request::{DeviceRequestTerms, Job, Method};
pub use subscription::{PreSub, PresubRecord, SubscriptionRecord};
pub use time::now_ms;
