//! The end-to-end tests of connectord, one binary with a module per area: the real
//! `connectord` binary (`CARGO_BIN_EXE_connectord`) on loopback with a private state
//! directory, driven over real HTTP and UDP through the testkit (`daemon/testkit`, bound
//! to the binary in [`support`]). `cargo test --workspace` runs them; one area alone:
//! `cargo test -p connectord --test it -- <area>::` (for example `-- flood::`).
//!
//! All areas share one process: a test must not change process-wide state (environment,
//! umask, working directory, signal handling); it passes such things to the child
//! process instead, and keeps to its own temporary directories and port-0 sockets.

mod support;

mod allow;
mod auth;
mod connections;
mod crash;
mod flood;
mod fuzz;
mod lua;
mod lwm2m;
mod metrics;
mod notifications;
mod openapi;
mod package;
mod plugins;
mod readme;
mod registration;
mod requests;
mod revocation;
mod schemathesis;
mod simulate;
mod startup;
mod startup_log;
mod state_dir;
mod store_failure;
mod strictness;
mod subscriptions;
mod tenants;
mod upgrade;
mod watch;
