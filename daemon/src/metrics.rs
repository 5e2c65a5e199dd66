//! Counters of what happened, shared by every subsystem and rendered in the Prometheus
//! text format at `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// Monotonic counters; each field is documented as its metric's help text.
        #[derive(Debug, Default)]
        pub struct Counters {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
            /// REST responses by status code (index: status - 100).
            pub rest_responses: RestStatuses,
        }

        impl Counters {
            /// Prometheus text exposition of every counter, named `connectord_<field>_total`.
            pub fn render(&self, out: &mut String) {
                self.rest_responses.render(out);
                $(
                    let help = concat!($($doc),*).trim();
                    let _ = writeln!(out, "# HELP connectord_{}_total {}", stringify!($name), help);
                    let _ = writeln!(out, "# TYPE connectord_{}_total counter", stringify!($name));
                    let _ = writeln!(out, "connectord_{}_total {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
            }
        }
    };
}

counters! {
    /// CoAP datagrams received.
    coap_datagrams,
    /// CoAP datagrams that were not valid CoAP messages.
    coap_malformed,
    /// CoAP datagrams larger than coap.max_datagram, dropped.
    coap_oversize,
    /// Retransmitted CoAP requests answered from the duplicate cache or dropped.
    coap_duplicates,
    /// CoAP requests dropped because coap.max_in_flight requests were being handled.
    coap_busy_drops,
    /// Observe notifications (or separate responses) dropped because 64 were already waiting
    /// for their observation (acknowledged; the next one carries the newer value).
    coap_responses_dropped,
    /// CoAP messages that matched no exchange (stray responses, ACKs, RSTs).
    coap_unexpected,
    /// CoAP requests answered with a 4.xx or 5.xx code.
    coap_error_responses,
    /// LwM2M registrations accepted.
    registrations,
    /// LwM2M registration updates accepted.
    registration_updates,
    /// LwM2M de-registrations.
    deregistrations,
    /// Registrations removed because their lifetime ran out.
    registrations_expired,
    /// REST requests refused for missing or bad credentials.
    rest_unauthorized,
    /// Notification events queued (counted once per receiving key).
    events_published,
    /// Notification events accepted by a callback, or answered to a long-poll whose key
    /// then pulled again (acknowledged).
    events_delivered,
    /// Long-poll answers whose events were queued again: not acknowledged by a next pull
    /// within notifications.redeliver_after_s, or not written to a client that went away.
    long_poll_redeliveries,
    /// Notification events discarded (older than the discard window, refused by the
    /// callback, or pushed out of a full queue).
    events_discarded,
    /// Failed callback deliveries that will be retried.
    delivery_retries,
    /// Requests sent to devices (async, each CoAP exchange counted once).
    device_requests,
    /// Requests to devices that got no answer in time.
    device_timeouts,
    /// Lua rule calls that failed (error or limit); they count as "no opinion".
    lua_errors,
    /// Lua rule files (re)loaded successfully.
    lua_reloads,
    /// Transactions refused because a domain's quota was used up.
    limits_refused,
    /// Plugin files loaded (at start or on change) and swapped in.
    plugin_reloads,
    /// Plugins that failed to load or start, and plugin calls that failed.
    plugin_errors,
    /// New plugin generations rolled back to the previous one because a call panicked
    /// while they were on probation.
    plugin_rollbacks,
    /// REST requests authenticated by a verdict an auth backend let the host reuse (no plugin call).
    auth_reused,
    /// Observe notifications accepted from devices.
    observe_notifications,
    /// Observe notifications dropped as older than one already seen.
    observe_stale,
}

/// REST responses counted by status code, lock-free.
#[derive(Debug)]
pub struct RestStatuses(Box<[AtomicU64]>);

impl Default for RestStatuses {
    fn default() -> Self {
        RestStatuses((100..600).map(|_| AtomicU64::new(0)).collect())
    }
}

impl RestStatuses {
    pub fn inc(&self, status: u16) {
        if let Some(c) = status.checked_sub(100).and_then(|i| self.0.get(i as usize)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP connectord_rest_responses_total REST responses by status code."
        );
        let _ = writeln!(out, "# TYPE connectord_rest_responses_total counter");
        for (i, c) in self.0.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "connectord_rest_responses_total{{status=\"{}\"}} {n}",
                    i + 100
                );
            }
        }
    }
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A gauge line in Prometheus text format.
pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP connectord_{name} {help}");
    let _ = writeln!(out, "# TYPE connectord_{name} gauge");
    let _ = writeln!(out, "connectord_{name} {value}");
}

/// `connectord_store_healthy` (1 while the store's writes succeed, 0 while they fail) and
/// `connectord_store_errors_total` (writes failed because the storage failed).
pub fn store_health(out: &mut String, h: &crate::store::Health) {
    gauge(
        out,
        "store_healthy",
        "1 while the state store's writes succeed, 0 while they fail (GET / answers 503).",
        u64::from(h.failing.is_none()),
    );
    let _ = writeln!(
        out,
        "# HELP connectord_store_errors_total Writes refused because the state store failed (disk full, read-only, I/O error, corruption)."
    );
    let _ = writeln!(out, "# TYPE connectord_store_errors_total counter");
    let _ = writeln!(out, "connectord_store_errors_total {}", h.errors);
}
