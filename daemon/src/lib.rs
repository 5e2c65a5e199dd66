//! connectord: a self-hosted device connector. LwM2M devices register over CoAP; web
//! applications reach them through an mbed Device Connector compatible REST API.
//!
//! Map of the crate (see ARCHITECTURE.md at the repository root for the invariants):
//! - [`config`]: the TOML file, parsed strictly, with file:line:column errors.
//! - [`coap`]: the `connectord-coap` crate (listeners, the RFC 7252 message layer,
//!   link-format), re-exported under its old module name.
//! - [`peer`]: the opaque reference to a device's listener and session that registrations
//!   store.
//! - [`registry`]: the endpoint directory and the LwM2M registration interface.
//! - [`store`]: durable state (SQLite, behind a trait).
//! - [`state_dir`]: the state directory's permissions (private, tightened at start).
//! - [`auth`]: principals, scopes and the chain of auth backends.
//! - [`rest`]: the HTTP API.
//! - [`revocation`]: drops the notification channels of keys that no longer authenticate.
//! - [`lwm2m_data`]: LwM2M content formats (TLV, SenML, LwM2M JSON/CBOR, …) ⇄ one JSON
//!   value tree; pure.
//! - [`daemon`]: start-up wiring, signals, systemd readiness.
//! - [`metrics`], [`shutdown`], [`log_budget`], [`hashing`]: counters, the stop signal, the
//!   budget of per-device log lines and the hasher of maps keyed by outside data, shared by
//!   all of the above.
//! - [`dir_watch`]: which file-system events of a watched directory (plugins, Lua rules)
//!   are changes.

#![deny(unsafe_code)]

pub mod auth;
pub mod certs;
pub mod coap_route;
pub use connectord_coap as coap;
pub mod config;
pub mod daemon;
pub mod dir_watch;
pub mod events;
pub mod hashing;
pub mod limits;
pub mod log_budget;
pub mod lwm2m_data;
pub mod metrics;
pub mod peer;
pub mod plugins;
pub mod registry;
pub mod requests;
pub mod rest;
pub mod revocation;
pub mod shutdown;
pub mod simulate;
pub mod state_dir;
pub mod store;
pub mod subscriptions;
