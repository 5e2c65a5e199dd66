//! connectord's services, below the REST edge, the plugin host and the binary: what the
//! daemon does, whatever carries the requests in and whoever stores the state.
//!
//! - [`config`]: the configuration sections of these services (`[registry]`,
//!   `[requests]`, `[notifications]`, `[limits]`, `[lua]`) with their defaults and range
//!   checks; the file they come from is the daemon's.
//! - [`coap`]: the `connectord-coap` crate (listeners, the RFC 7252 message layer,
//!   link-format); [`coap_route`] converts its peer references to the model's.
//! - [`registry`]: the endpoint directory and the LwM2M registration interface.
//! - [`requests`]: requests to devices (queues, async responses, the value cache).
//! - [`subscriptions`]: subscriptions, pre-subscriptions, observations, Lua rules.
//! - [`events`]: notification events and the hub that queues and delivers them through
//!   a [`events::Sink`].
//! - [`limits`]: traffic limits per domain.
//! - [`auth`]: principals, scopes and the chain of auth backends (an
//!   [`auth::AuthBackends`] trait; the plugin host implements it).
//! - [`metrics`], [`shutdown`], [`log_budget`], [`hashing`]: counters, the stop signal, the
//!   budget of per-device log lines and the hasher of maps keyed by outside data.
//! - [`dir_watch`]: which file-system events of a watched directory (plugins, Lua rules)
//!   are changes.
//!
//! **Invariant:** this crate knows no plugin loader, no HTTP server and no start-up
//! wiring: it depends on `connectord-model`, `connectord-store`, `connectord-lwm2m` and the
//! plugin SDK's protocol types only, and the crates above it (`connectord`: REST, plugin
//! host, binary) are constructed on top of it.

#![deny(unsafe_code)]

pub mod auth;
pub mod coap_route;
pub mod config;
pub mod credentials;
pub mod dir_watch;
pub mod events;
pub mod forward;
pub mod hashing;
pub mod limits;
pub mod log_budget;
pub mod metrics;
pub mod registry;
pub mod requests;
pub mod revocation;
pub mod shutdown;
pub mod subscriptions;

/// The CoAP layer: the `connectord-coap` crate (listeners, the message layer).
pub use connectord_coap as coap;
/// LwM2M content formats: the `connectord-lwm2m` crate.
pub use connectord_lwm2m as lwm2m_data;
/// The domain records every layer shares: the `connectord-model` crate.
pub use connectord_model as model;
pub use connectord_model::peer;
/// Durable state: the `connectord-store` crate (ports per aggregate, SQLite and memory).
pub use connectord_store as store;
