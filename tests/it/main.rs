//! The end-to-end tests of connectord, one binary with a module per area: a daemon on
//! loopback with a private state directory, driven over real HTTP and UDP through the
//! testkit (`daemon/testkit`, bound to the binary in [`support`]). `cargo test
//! --workspace` runs them; one area alone: `cargo test -p connectord --test it --
//! <area>::` (for example `-- flood::`).
//!
//! Two ways to run the daemon (see the testkit's crate documentation):
//! - in this process (`support::Daemon::in_process`, `Prepared::start_in_process`):
//!   `connectord::daemon::start`, the start path of `connectord run`. Used by the areas
//!   that need nothing of a process: `auth`, `lwm2m`, `strictness`, `openapi`.
//! - as the real binary (`CARGO_BIN_EXE_connectord`, `support::Daemon::start*`): for every
//!   test that sends signals, kills with `-9` and restarts, reads the daemon's log or exit
//!   code, sets its environment or measures the process (RSS, threads), and for the other
//!   areas until they are converted.
//!
//! All areas share one process: a test must not change process-wide state (environment,
//! umask, working directory, signal handling); it passes such things to the child
//! process instead, and keeps to its own temporary directories and port-0 sockets. An
//! in-process daemon shares the device log line budget (`[log] device_lines_per_s`) with
//! the others: such a test leaves that setting at its default.

mod support;

mod allow;
mod auth;
mod channel_limits;
mod cluster;
mod cluster_channels;
mod cluster_failover;
mod cluster_forward;
mod cluster_moves;
mod connections;
mod console;
mod crash;
mod credentials;
mod device_requests;
mod dtls;
mod expiry;
mod flood;
mod fuzz;
mod https;
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
mod sinks;
mod startup;
mod startup_log;
mod state_dir;
mod store_failure;
mod storm;
mod strictness;
mod subscriptions;
mod tenants;
mod tls;
mod upgrade;
mod watch;
mod websocket;
