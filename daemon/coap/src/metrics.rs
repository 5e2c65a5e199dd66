//! What the CoAP layer counts, reported to its host through [`Metrics`].
//!
//! The host (the daemon's metrics) implements the trait and renders the figures; this
//! crate only says what happened. Hot-path cost: one dynamic call per event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Something the message layer counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A datagram was received.
    Datagram,
    /// A datagram was not a valid CoAP message.
    Malformed,
    /// A datagram was larger than `coap.max_datagram` and dropped.
    Oversize,
    /// A retransmitted message was answered from the duplicate cache or dropped.
    Duplicate,
    /// A NON request was dropped because `coap.max_in_flight` requests were being handled.
    BusyDrop,
    /// A CON request was answered 5.03 with Max-Age because `coap.max_in_flight` requests
    /// were being handled (load shed, see [`crate::shed`]).
    Shed,
    /// A notification or separate response was dropped at its exchange's queue bound.
    ResponseDropped,
    /// A message matched no exchange (stray response, ACK, RST).
    Unexpected,
    /// A request was answered with a 4.xx or 5.xx code.
    ErrorResponse,
    /// A plain-CoAP datagram was dropped by `coap.plain`.
    PlainDropped,
    /// A DTLS handshake completed (a session established).
    DtlsHandshake,
    /// A DTLS handshake failed (wrong key, unknown identity, refused certificate, no
    /// common suite, timeout).
    DtlsHandshakeFailed,
    /// A ClientHello without a valid cookie was answered with a HelloVerifyRequest (no
    /// state kept).
    DtlsHelloVerify,
    /// A ClientHello with a valid cookie was dropped: `coap.dtls_max_handshakes` half-open
    /// handshakes or `coap.dtls_max_sessions` sessions.
    DtlsHandshakeDropped,
    /// A CoAP-over-TLS handshake completed and the client certificate was taken.
    TlsHandshake,
    /// A CoAP-over-TLS handshake failed (TLS error, no or refused client certificate,
    /// a certificate without a CN, `coap.tls_handshake_timeout_s`).
    TlsHandshakeFailed,
    /// A TLS connection ended with Release (7.04): the device's, or ours at a clean stop.
    TlsReleased,
    /// A TLS connection ended with Abort (7.05): the device's, or ours (a frame that
    /// cannot be read or is too large, a device that does not read).
    TlsAborted,
    /// A TLS connection released by us after `coap.tls_idle_timeout_s` without a byte.
    TlsIdle,
    /// A TLS connection aborted because its client certificate is revoked (at connect or
    /// while open).
    TlsRevoked,
    /// A TLS connection closed without a signal: the device closed it, or a read or
    /// write failed.
    TlsClosed,
    /// A DTLS record to a session's new address, not yet verified, was dropped: beyond
    /// `AMPLIFICATION` times the bytes received from there (RFC 9146 §6, `dtls::Probe`).
    DtlsUnverifiedDropped,
}

/// The host's counters, as the message layer reports to them.
pub trait Metrics: Send + Sync + 'static {
    fn count(&self, event: Event);
    /// Time to answer one request from a device, handler included.
    fn request_latency(&self, elapsed: Duration);
}

/// How many [`Event`]s there are: the last one's index + 1 (keep it the last variant).
const EVENTS: usize = Event::DtlsUnverifiedDropped as usize + 1;

/// A plain implementation: one atomic per [`Event`] (tests, embedders without metrics).
#[derive(Debug, Default)]
pub struct Counters {
    events: [AtomicU64; EVENTS],
    requests: AtomicU64,
}

impl Counters {
    pub fn get(&self, event: Event) -> u64 {
        self.events[event as usize].load(Ordering::Relaxed)
    }

    /// Requests whose latency was reported.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Metrics for Counters {
    fn count(&self, event: Event) {
        self.events[event as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn request_latency(&self, _: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}
