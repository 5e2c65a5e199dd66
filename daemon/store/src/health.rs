//! Whether a store's writes succeed, and the log of it: one state per store, kept by the
//! SQLite store's thread and the NATS store's writer alike (so its lines name this module,
//! not a backend's: an outside review read a NATS node's failures as SQLite's).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Health, StoreError};

/// How often, at most, the store says again that it is still failing.
const FAILING_LOG_EVERY: Duration = Duration::from_secs(60);

/// Whether the store's writes succeed, kept by the store thread (SQLite) or its writer task (NATS). Decision: the state
/// changes with each batch (failing at the first write the storage refuses, healthy at
/// the first batch that changes rows and commits without such a failure; a batch of
/// reads says nothing), and is logged when it changes
/// and at most once a [`FAILING_LOG_EVERY`] while it fails, never once per request.
#[derive(Default)]
pub(crate) struct HealthState {
    errors: AtomicU64,
    inner: Mutex<HealthLog>,
}

#[derive(Default)]
struct HealthLog {
    failing: Option<String>,
    /// When the last line about the failure was written, and the failures since.
    logged: Option<Instant>,
    since_logged: u64,
    since_failing: u64,
}

impl HealthState {
    pub(crate) fn failed(&self, e: &StoreError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        h.since_failing += 1;
        let now = Instant::now();
        if h.failing.is_none() {
            tracing::error!(
                "store: the state store is failing: {e}; writes are refused (REST 503, CoAP 5.03) until it works again"
            );
            h.logged = Some(now);
            h.since_logged = 0;
        } else if h
            .logged
            .is_none_or(|t| now.duration_since(t) >= FAILING_LOG_EVERY)
        {
            tracing::error!(
                "store: the state store is still failing: {e} ({} failed writes since the last line)",
                h.since_logged + 1
            );
            h.logged = Some(now);
            h.since_logged = 0;
        } else {
            h.since_logged += 1;
        }
        h.failing = Some(e.to_string());
    }

    pub(crate) fn succeeded(&self) {
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if h.failing.take().is_some() {
            tracing::warn!(
                "store: the state store works again ({} writes failed meanwhile)",
                h.since_failing
            );
            h.since_failing = 0;
            h.logged = None;
        }
    }

    pub(crate) fn snapshot(&self) -> Health {
        let h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Health {
            failing: h.failing.clone(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}
