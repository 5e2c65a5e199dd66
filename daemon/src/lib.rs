//! connectord: a self-hosted device connector. LwM2M devices register over CoAP; web
//! applications reach them through an mbed Device Connector compatible REST API.
//!
//! This crate is the top of the stack (ARCHITECTURE.md has the crate map): the REST edge,
//! the plugin host and the start-up wiring, on top of `connectord-core` (the services),
//! `connectord-store`, `connectord-model` and `connectord-lwm2m`, whose modules are
//! re-exported here under their old paths.
//! - [`config`]: the configuration file, aggregated from the sections each crate owns,
//!   with file:line:column errors.
//! - [`rest`]: the HTTP API.
//! - [`plugins`]: the plugin host: loads and reloads `.so` files, and adapts them to the
//!   core's traits (auth backends, the notification sink).
//! - [`certs`]: the daemon's certificate authority (`/api/cert`).
//! - [`state_dir`]: the state directory's permissions (private, tightened at start).
//! - [`revocation`]: drops the notification channels of keys that no longer authenticate.
//! - [`channels`]: notification channels across a cluster's nodes (the hub's peers on NATS).
//! - [`cluster`]: the store backend (`[cluster]`), on NATS the CA check and membership.
//! - [`daemon`]: start-up wiring, signals, systemd readiness.
//! - [`remote`]: the REST API as the CLI reaches it (`connectord credentials`).
//! - [`simulate`]: the simulated device (`connectord simulate`), the `connectord-sim` crate.

#![deny(unsafe_code)]

/// The daemon's version (what `connectord --version` and the ready file say).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod channels;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod remote;
pub mod state_dir;

pub use connectord_certs as certs;
pub use connectord_core::{
    auth, coap, credentials, dir_watch, events, forward, hashing, limits, log_budget, lwm2m_data,
    metrics, model, registry, requests, revocation, shutdown, store, subscriptions,
};
pub use connectord_plugin_host as plugins;
pub use connectord_rest as rest;
pub use connectord_sim as simulate;
