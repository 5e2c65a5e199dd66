//! Counters of what happened, shared by every subsystem and rendered in the Prometheus
//! text format at `GET /metrics`.
//!
//! The text format is written here by hand (a few `writeln!`s) rather than through a
//! metrics crate: every series is an atomic or a value read at scrape time, so nothing
//! needs a registry. Hot-path cost: one relaxed atomic add per counter; a latency is one
//! `Instant::now()` pair, a scan of [`LATENCY_BUCKETS`] (14 comparisons) and two relaxed
//! atomic adds.
//!
//! Kept after measuring `prometheus-client` 0.26 (issue 20) on the same series (31
//! counters, 6 status codes, 3 histograms, 12 gauges, 2 × 20 per-key gauges; a release
//! build, three runs on a loaded 2-core machine): one exposition took 18-21 µs and 9
//! allocations here against 33-36 µs and 288 allocations; a counter increment cost the
//! same (a relaxed add, 11-15 ns there); a histogram observation 26-30 ns here against
//! 34-38 ns (it takes a lock), paid on every REST request, CoAP request and store commit.
//! And it cannot write today's text: it speaks OpenMetrics, so a counter's `# HELP` and
//! `# TYPE` lines lose `_total`, bucket bounds read `le="10.0"`, help text gets a `.`
//! appended and the body ends in `# EOF`; names, types and help must stay as they are.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// Monotonic counters; each field is documented as its metric's help text.
        #[derive(Debug, Default)]
        pub struct Counters {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
            /// REST responses by status code (index: status - 100).
            pub rest_responses: RestStatuses,
            /// CoAP-over-TLS connections closed, by reason.
            pub coap_tls_closed: TlsClosed,
            /// REST requests forwarded between cluster nodes (issue 22), by direction.
            pub cluster_forwarded: Forwarded,
            /// Time to answer a REST request, from its head read to its response head
            /// (long-poll pulls are left out: they wait on purpose).
            pub rest_latency: Histogram,
            /// Time to answer a CoAP request from a device (registration, update, ...),
            /// its store write included.
            pub coap_latency: Histogram,
            /// Time of one store transaction, begin to commit (fsync included): the
            /// store's own histogram, shared (see `SqliteStore::commit_latency`).
            pub store_commit: Arc<Histogram>,
        }

        impl Counters {
            /// Prometheus text exposition of every counter, named `connectord_<field>_total`.
            pub fn render(&self, out: &mut String) {
                build_info(out);
                self.rest_responses.render(out);
                self.rest_latency.render(
                    out,
                    "rest_request_duration_seconds",
                    "Time to answer a REST request (long-poll pulls left out).",
                );
                self.coap_latency.render(
                    out,
                    "coap_request_duration_seconds",
                    "Time to answer a CoAP request from a device, its store write included.",
                );
                self.store_commit.render(
                    out,
                    "store_commit_duration_seconds",
                    "Time of one store transaction (a batch of writes), begin to commit.",
                );
                $(
                    let help = concat!($($doc),*).trim();
                    let _ = writeln!(out, "# HELP connectord_{}_total {}", stringify!($name), help);
                    let _ = writeln!(out, "# TYPE connectord_{}_total counter", stringify!($name));
                    let _ = writeln!(out, "connectord_{}_total {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                self.coap_tls_closed.render(out);
                self.cluster_forwarded.render(out);
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
    /// CoAP NON requests dropped because coap.max_in_flight requests were being handled.
    coap_busy_drops,
    /// CoAP CON requests answered 5.03 with Max-Age (when to retry) because
    /// coap.max_in_flight requests were being handled: load shed.
    coap_shed,
    /// Observe notifications (or separate responses) dropped at a full queue (1024 waiting for
    /// their observation, or coap.max_queued_notifications for all): a NON one is lost (the
    /// next one carries the newer value), a CON one is not acknowledged (the device retransmits).
    coap_responses_dropped,
    /// CoAP messages that matched no exchange (stray responses, ACKs, RSTs).
    coap_unexpected,
    /// CoAP requests answered with a 4.xx or 5.xx code.
    coap_error_responses,
    /// Plain-CoAP registrations, updates and de-registrations refused (4.03) because
    /// their endpoint has credentials or registered over a secure transport.
    coap_plain_refused,
    /// Plain-CoAP datagrams dropped by coap.plain ("loopback": from a non-loopback
    /// address; "deny": all).
    coap_plain_dropped,
    /// DTLS handshakes completed (sessions established).
    coap_dtls_handshakes,
    /// DTLS handshakes failed (wrong key, unknown identity, refused certificate, no common
    /// suite, timeout).
    coap_dtls_handshakes_failed,
    /// DTLS ClientHellos without a valid cookie, answered with a HelloVerifyRequest (no
    /// state kept).
    coap_dtls_hello_verify,
    /// DTLS ClientHellos with a valid cookie dropped at coap.dtls_max_handshakes or
    /// coap.dtls_max_sessions.
    coap_dtls_handshakes_dropped,
    /// CoAP-over-TLS handshakes completed (client certificate verified, not revoked).
    coap_tls_handshakes,
    /// CoAP-over-TLS handshakes failed (TLS error, no or refused client certificate, a
    /// certificate without a CN, coap.tls_handshake_timeout_s).
    coap_tls_handshakes_failed,
    /// DTLS records not sent to a session's new address before the device showed it is
    /// there (beyond 3 times the bytes received from it; RFC 9146 §6).
    coap_dtls_unverified_dropped,
    /// LwM2M registrations accepted.
    registrations,
    /// LwM2M registration updates accepted.
    registration_updates,
    /// LwM2M de-registrations.
    deregistrations,
    /// Registrations removed because their lifetime ran out.
    registrations_expired,
    /// Steps of the expiry: each removes at most registry.expiry_batch registrations in
    /// one store commit, and the daemon serves other work between two.
    registration_expiry_batches,
    /// REST requests refused for missing or bad credentials.
    rest_unauthorized,
    /// REST requests answered 429 without their credentials checked, because their client
    /// address failed authentication more than rest.auth_failures_per_minute times.
    rest_auth_throttled,
    /// REST connections closed at once because their client address already had
    /// rest.max_connections_per_address connections open.
    rest_connections_refused,
    /// Connections to a rest.listen_tls address closed before their TLS handshake
    /// completed: not TLS (plain HTTP is answered 400 first), a handshake error, or no
    /// handshake within rest.tls_handshake_timeout_s.
    rest_tls_handshake_failures,
    /// Notification events queued (counted once per receiving key).
    events_published,
    /// Notification events accepted by a callback, or answered to a long-poll whose key
    /// then pulled again (acknowledged).
    events_delivered,
    /// Long-poll answers whose events were queued again: not acknowledged by a next pull
    /// within notifications.redeliver_after_s, or not written to a client that went away.
    long_poll_redeliveries,
    /// Notification events discarded (older than the discard window, refused by the
    /// callback, pushed out of a full queue, or queued in a channel removed as idle).
    events_discarded,
    /// Of those, the oldest events pushed out of a full queue (over
    /// notifications.max_queued_per_key or notifications.max_queued_bytes_per_key).
    events_dropped_queue_full,
    /// Notification channels removed after notifications.idle_channel_removal_s without
    /// an event in, a pull or a delivery.
    channels_removed_idle,
    /// Failed callback deliveries that will be retried.
    delivery_retries,
    /// WebSockets opened on a WebSocket channel (`/notification/websocket-connect`).
    websockets_opened,
    /// WebSocket frames sent (each a notification message, as a long-poll answer).
    websocket_frames_sent,
    /// WebSocket frames acknowledged by the pong to the ping that followed them.
    websocket_frames_acknowledged,
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
    /// Reports of the request layer to the subscriptions manager (an observation
    /// established or refused) that waited for room in their full channel.
    observation_reports_waited,
}

/// CoAP-over-TLS connections closed, by reason: `released` (Release 7.04, the device's
/// or ours at a clean stop), `aborted` (Abort 7.05, either side's), `idle` (released by
/// us after coap.tls_idle_timeout_s), `revoked` (its client certificate revoked, at
/// connect or while open), `closed` (no signal: the device closed the connection, or a
/// read or write failed).
#[derive(Debug, Default)]
pub struct TlsClosed {
    pub released: AtomicU64,
    pub aborted: AtomicU64,
    pub idle: AtomicU64,
    pub revoked: AtomicU64,
    pub closed: AtomicU64,
}

impl TlsClosed {
    fn render(&self, out: &mut String) {
        let name = "connectord_coap_tls_connections_closed_total";
        let _ = writeln!(
            out,
            "# HELP {name} CoAP-over-TLS connections closed, by reason (released, aborted, idle, revoked, closed)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (reason, c) in [
            ("released", &self.released),
            ("aborted", &self.aborted),
            ("idle", &self.idle),
            ("revoked", &self.revoked),
            ("closed", &self.closed),
        ] {
            let n = c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
        }
    }
}

/// REST requests (on a resource, or subscriptions) forwarded between cluster nodes
/// (issue 22): `out` handed by this node to a device's owner, `in` received from another
/// node and handled here as the owner. Counted once per call, answered or not.
#[derive(Debug, Default)]
pub struct Forwarded {
    pub out: AtomicU64,
    pub in_: AtomicU64,
}

impl Forwarded {
    /// (out, in) now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.out.load(Ordering::Relaxed),
            self.in_.load(Ordering::Relaxed),
        )
    }

    fn render(&self, out: &mut String) {
        let name = "connectord_cluster_forwarded_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} REST requests forwarded between cluster nodes: out (to a device's owner node), in (from another node, handled here)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        let (o, i) = self.get();
        let _ = writeln!(out, "{name}{{direction=\"out\"}} {o}");
        let _ = writeln!(out, "{name}{{direction=\"in\"}} {i}");
    }
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

/// The CoAP layer's events land in the `coap_*` counters above.
impl connectord_coap::Metrics for Counters {
    fn count(&self, event: connectord_coap::Event) {
        use connectord_coap::Event;
        let c = match event {
            Event::Datagram => &self.coap_datagrams,
            Event::Malformed => &self.coap_malformed,
            Event::Oversize => &self.coap_oversize,
            Event::Duplicate => &self.coap_duplicates,
            Event::BusyDrop => &self.coap_busy_drops,
            Event::Shed => &self.coap_shed,
            Event::ResponseDropped => &self.coap_responses_dropped,
            Event::Unexpected => &self.coap_unexpected,
            Event::ErrorResponse => &self.coap_error_responses,
            Event::PlainDropped => &self.coap_plain_dropped,
            Event::DtlsHandshake => &self.coap_dtls_handshakes,
            Event::DtlsHandshakeFailed => &self.coap_dtls_handshakes_failed,
            Event::DtlsHelloVerify => &self.coap_dtls_hello_verify,
            Event::DtlsHandshakeDropped => &self.coap_dtls_handshakes_dropped,
            Event::TlsHandshake => &self.coap_tls_handshakes,
            Event::TlsHandshakeFailed => &self.coap_tls_handshakes_failed,
            Event::TlsReleased => &self.coap_tls_closed.released,
            Event::TlsAborted => &self.coap_tls_closed.aborted,
            Event::TlsIdle => &self.coap_tls_closed.idle,
            Event::TlsRevoked => &self.coap_tls_closed.revoked,
            Event::TlsClosed => &self.coap_tls_closed.closed,
            Event::DtlsUnverifiedDropped => &self.coap_dtls_unverified_dropped,
        };
        Counters::inc(c);
    }
    fn request_latency(&self, elapsed: Duration) {
        self.coap_latency.observe(elapsed);
    }
}

/// Upper bounds of the latency histograms' buckets, in seconds (then `+Inf`): from half a
/// millisecond (a cached REST read) to 10 s (a store stalled on a slow disk).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with the fixed buckets [`LATENCY_BUCKETS`], lock-free.
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl connectord_store::CommitObserver for Histogram {
    fn observe(&self, took: Duration) {
        Histogram::observe(self, took);
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Prometheus text: `connectord_<name>_bucket{le=...}` (cumulative), `_sum`, `_count`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP connectord_{name} {help}");
        let _ = writeln!(out, "# TYPE connectord_{name} histogram");
        let mut total = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            match LATENCY_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "connectord_{name}_bucket{{le=\"{le}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "connectord_{name}_bucket{{le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "connectord_{name}_sum {sum}");
        let _ = writeln!(out, "connectord_{name}_count {total}");
    }
}

/// `connectord_build_info{version="…"} 1`: the running version, to join with other series.
fn build_info(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP connectord_build_info The running connectord's version (always 1)."
    );
    let _ = writeln!(out, "# TYPE connectord_build_info gauge");
    let _ = writeln!(
        out,
        "connectord_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
}

/// A label value in the text format: backslash, double quote and newline escaped.
pub fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.render(&mut out, "x", "X.");
        for line in [
            "# TYPE connectord_x histogram",
            "connectord_x_bucket{le=\"0.0005\"} 2",
            "connectord_x_bucket{le=\"0.001\"} 2",
            "connectord_x_bucket{le=\"0.005\"} 3",
            "connectord_x_bucket{le=\"10\"} 3",
            "connectord_x_bucket{le=\"+Inf\"} 4",
            "connectord_x_count 4",
        ] {
            assert!(out.lines().any(|l| l == line), "{line}:\n{out}");
        }
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
