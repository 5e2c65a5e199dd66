//! `[coap]`: the settings of the message layer and its listeners. The host's configuration
//! file embeds this section as it is (same field names, same defaults).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// `[coap]`: the UDP side that devices talk to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    /// UDP addresses to bind. An IPv6 wildcard is bound IPv6-only so that it can sit beside
    /// the IPv4 wildcard; an address family the host lacks is logged and skipped.
    pub listen: Vec<SocketAddr>,
    /// Largest datagram accepted, in bytes; larger ones are dropped and counted.
    pub max_datagram: usize,
    /// How long a reply is kept to answer a duplicate of the same request (RFC 7252
    /// EXCHANGE_LIFETIME, 247 s by default).
    pub exchange_lifetime_s: u64,
    /// Upper bound on remembered exchanges for duplicate detection; the oldest go first.
    pub dedup_capacity: usize,
    /// Requests from devices handled at the same time; beyond this, a CON request is
    /// answered 5.03 with a Max-Age (when to retry, see [`crate::shed`]) and a NON request
    /// is dropped.
    pub max_in_flight: usize,
    /// Notifications received from devices and not yet taken to be stored, over all
    /// observations (issue 24): the memory bound of the observations' queues (each also
    /// holds at most `client::OBSERVE_QUEUE`); past it notifications are dropped and
    /// counted (`coap_responses_dropped_total`).
    pub max_queued_notifications: usize,
    /// Initial retransmission timeout of our confirmable requests (RFC 7252 ACK_TIMEOUT).
    pub ack_timeout_ms: u64,
    /// Random factor applied to the initial timeout (RFC 7252 ACK_RANDOM_FACTOR, >= 1).
    pub ack_random_factor: f64,
    /// Retransmissions before a request times out (RFC 7252 MAX_RETRANSMIT).
    pub max_retransmit: u32,
    /// How long to wait for a separate response after the device's empty ACK.
    pub separate_response_timeout_s: u64,
    /// Block size for block-wise writes (Block1): 16, 32, ..., 1024 bytes.
    pub block_size: usize,
    /// Largest body accepted from or sent to a device, in bytes (Block2 responses are
    /// assembled up to this).
    pub max_body: usize,
    /// TCP addresses of CoAP over TLS (RFC 8323, `coaps+tcp`, port 5684 by convention);
    /// empty by default. Devices must present a client certificate (see [`crate::tls`]).
    pub listen_tls: Vec<SocketAddr>,
    /// The server certificate chain (PEM) of the TLS and the DTLS listeners (they present
    /// one certificate; DTLS sends the leaf only and needs an ECDSA P-256/P-384 key); when
    /// unset (with `tls_key`), the daemon issues one from its own CA at start.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM, PKCS#8, SEC1 or PKCS#1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM files) trusted for client certificates besides the daemon's
    /// own CA (the one of `POST /api/cert`). Shared by the DTLS and TLS listeners.
    pub trusted_cas: Vec<PathBuf>,
    /// TLS connections open at once (handshakes included); past it, new ones are closed.
    pub tls_max_connections: usize,
    /// Seconds a TLS connection may stay without a byte from the device before it is
    /// released (7.04) and closed.
    pub tls_idle_timeout_s: u64,
    /// Largest RFC 8323 message accepted (our CSM's Max-Message-Size), in bytes; a larger
    /// one aborts the connection (7.05).
    pub tls_max_message_size: usize,
    /// Seconds a TLS handshake may take before the connection is closed.
    pub tls_handshake_timeout_s: u64,
    /// UDP addresses for CoAP over DTLS 1.2 (`coaps://`, port 5684 by convention); empty
    /// (the default): no DTLS.
    pub listen_dtls: Vec<SocketAddr>,
    /// DTLS sessions kept at most per listener; a new handshake beyond it is dropped.
    pub dtls_max_sessions: usize,
    /// Half-open DTLS handshakes (cookie verified, not finished) at most per listener;
    /// beyond it ClientHellos are dropped and counted.
    pub dtls_max_handshakes: usize,
    /// Half-open DTLS handshakes at most from one source (an IPv4 address, an IPv6 /64) per
    /// listener, so that one source cannot hold every slot of `dtls_max_handshakes`
    /// (0, or a value not below `dtls_max_handshakes`: no bound of its own; not an error,
    /// so that lowering `dtls_max_handshakes` needs no second change). Beyond it
    /// ClientHellos are dropped and counted.
    pub dtls_max_handshakes_per_source: usize,
    /// A DTLS handshake not finished after this long is dropped.
    pub dtls_handshake_timeout_s: u64,
    /// A DTLS session that carried nothing for this long is closed (the device handshakes
    /// again).
    pub dtls_idle_s: u64,
    /// Who may speak plain (unencrypted) CoAP on the UDP listeners (issue 21).
    pub plain: PlainPolicy,
}

/// `coap.plain`: who may speak plain CoAP (UDP) to the daemon.
///
/// Decision: "deny" keeps the UDP sockets of `coap.listen` bound and drops every
/// datagram on them (counted), like "loopback" drops those from other addresses: one
/// rule in one place for both, and the daemon starts the same whatever the policy (no
/// listener set that becomes empty, no port that vanishes); `coap.listen` says where,
/// `coap.plain` says who.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainPolicy {
    /// Anyone (the embedded default, so that the quick start works).
    #[default]
    Allow,
    /// Only peers on a loopback address (127.0.0.0/8, ::1): local tools and tests.
    Loopback,
    /// Nobody: devices use the secure transports.
    Deny,
}

impl PlainPolicy {
    /// Whether a message from `peer` on a listener of `kind` is let in.
    pub fn admits(self, kind: crate::peer::ListenerKind, peer: std::net::IpAddr) -> bool {
        if kind.secure() {
            return true;
        }
        match self {
            PlainPolicy::Allow => true,
            PlainPolicy::Loopback => peer.to_canonical().is_loopback(),
            PlainPolicy::Deny => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PlainPolicy::Allow => "allow",
            PlainPolicy::Loopback => "loopback",
            PlainPolicy::Deny => "deny",
        }
    }
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0], 5683)),
                SocketAddr::from(([0u16; 8], 5683)),
            ],
            max_datagram: 1500,
            exchange_lifetime_s: 247,
            dedup_capacity: 100_000,
            max_in_flight: 1024,
            max_queued_notifications: 65_536,
            ack_timeout_ms: 2000,
            ack_random_factor: 1.5,
            max_retransmit: 4,
            separate_response_timeout_s: 60,
            block_size: 1024,
            max_body: 1_048_576,
            listen_tls: Vec::new(),
            tls_cert: None,
            tls_key: None,
            trusted_cas: Vec::new(),
            tls_max_connections: 10_000,
            tls_idle_timeout_s: 900,
            tls_max_message_size: 16_384,
            tls_handshake_timeout_s: 10,
            plain: PlainPolicy::Allow,
            listen_dtls: Vec::new(),
            dtls_max_sessions: 100_000,
            dtls_max_handshakes: 1000,
            dtls_max_handshakes_per_source: 100,
            dtls_handshake_timeout_s: 30,
            dtls_idle_s: 3600,
        }
    }
}

impl CoapConfig {
    /// Range checks serde cannot express: the first value out of range as `(key,
    /// message)`, the key relative to the section (`max_datagram`); the host names it in
    /// full and locates it in its file.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_empty() && self.listen_dtls.is_empty() && self.listen_tls.is_empty() {
            return Err((
                "listen",
                "needs at least one address (or coap.listen_dtls / coap.listen_tls)".into(),
            ));
        }
        if !(64..=65_507).contains(&self.max_datagram) {
            return Err((
                "max_datagram",
                format!("{} is outside 64..=65507", self.max_datagram),
            ));
        }
        if self.dedup_capacity == 0 {
            return Err(("dedup_capacity", "must be at least 1".into()));
        }
        if self.ack_timeout_ms == 0 {
            return Err(("ack_timeout_ms", "must be at least 1".into()));
        }
        if !(1.0..=10.0).contains(&self.ack_random_factor) {
            return Err(("ack_random_factor", "must lie between 1.0 and 10.0".into()));
        }
        if self.max_retransmit > 20 {
            return Err(("max_retransmit", "must be at most 20".into()));
        }
        if self.separate_response_timeout_s == 0 {
            return Err(("separate_response_timeout_s", "must be at least 1".into()));
        }
        if !self.block_size.is_power_of_two() || !(16..=1024).contains(&self.block_size) {
            return Err((
                "block_size",
                "must be one of 16, 32, 64, 128, 256, 512, 1024".into(),
            ));
        }
        if self.max_body < 1024 {
            return Err(("max_body", "must be at least 1024".into()));
        }
        if self.max_in_flight == 0 {
            return Err(("max_in_flight", "must be at least 1".into()));
        }
        if self.max_queued_notifications == 0 {
            return Err(("max_queued_notifications", "must be at least 1".into()));
        }
        self.check_tls()?;
        if self.dtls_max_sessions == 0 {
            return Err(("dtls_max_sessions", "must be at least 1".into()));
        }
        if !(1..=self.dtls_max_sessions).contains(&self.dtls_max_handshakes) {
            return Err((
                "dtls_max_handshakes",
                format!(
                    "{} is outside 1..=coap.dtls_max_sessions ({})",
                    self.dtls_max_handshakes, self.dtls_max_sessions
                ),
            ));
        }
        if !(1..=600).contains(&self.dtls_handshake_timeout_s) {
            return Err((
                "dtls_handshake_timeout_s",
                format!("{} is outside 1..=600", self.dtls_handshake_timeout_s),
            ));
        }
        if self.dtls_idle_s == 0 {
            return Err(("dtls_idle_s", "must be at least 1".into()));
        }
        if let Some(a) = self
            .listen_dtls
            .iter()
            .find(|a| self.listen.contains(a) && a.port() != 0)
        {
            return Err((
                "listen_dtls",
                format!("{a} is also in coap.listen (one socket cannot be both)"),
            ));
        }
        Ok(())
    }
}

impl CoapConfig {
    /// The range checks of the TLS listener's settings.
    fn check_tls(&self) -> Result<(), (&'static str, String)> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(("tls_key", "must be set when tls_cert is".into())),
            (None, Some(_)) => return Err(("tls_cert", "must be set when tls_key is".into())),
            _ => {}
        }
        if self.tls_max_connections == 0 {
            return Err(("tls_max_connections", "must be at least 1".into()));
        }
        if !(1..=86_400).contains(&self.tls_idle_timeout_s) {
            return Err((
                "tls_idle_timeout_s",
                format!("{} is outside 1..=86400", self.tls_idle_timeout_s),
            ));
        }
        // 1152 is the size every RFC 8323 peer may assume before the CSM (§5.3.1).
        if !(1152..=16_777_216).contains(&self.tls_max_message_size) {
            return Err((
                "tls_max_message_size",
                format!("{} is outside 1152..=16777216", self.tls_max_message_size),
            ));
        }
        if !(1..=300).contains(&self.tls_handshake_timeout_s) {
            return Err((
                "tls_handshake_timeout_s",
                format!("{} is outside 1..=300", self.tls_handshake_timeout_s),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::ListenerKind;

    #[test]
    fn tls_settings_are_range_checked() {
        let ok = CoapConfig::default();
        assert_eq!(ok.check(), Ok(()));
        assert!(ok.listen_tls.is_empty(), "TLS is off by default");
        let cases: Vec<(CoapConfig, &str)> = vec![
            (
                CoapConfig {
                    tls_max_connections: 0,
                    ..ok.clone()
                },
                "tls_max_connections",
            ),
            (
                CoapConfig {
                    tls_idle_timeout_s: 0,
                    ..ok.clone()
                },
                "tls_idle_timeout_s",
            ),
            (
                CoapConfig {
                    tls_max_message_size: 1151,
                    ..ok.clone()
                },
                "tls_max_message_size",
            ),
            (
                CoapConfig {
                    tls_handshake_timeout_s: 301,
                    ..ok.clone()
                },
                "tls_handshake_timeout_s",
            ),
            (
                CoapConfig {
                    tls_cert: Some("c.pem".into()),
                    ..ok.clone()
                },
                "tls_key",
            ),
            (
                CoapConfig {
                    tls_key: Some("k.pem".into()),
                    ..ok.clone()
                },
                "tls_cert",
            ),
            (
                CoapConfig {
                    listen: vec![],
                    ..ok.clone()
                },
                "listen",
            ),
        ];
        for (cfg, key) in cases {
            assert_eq!(cfg.check().map_err(|e| e.0), Err(key));
        }
        let tls_only = CoapConfig {
            listen: vec![],
            listen_tls: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            ..ok
        };
        assert_eq!(tls_only.check(), Ok(()));
    }

    #[test]
    fn plain_policy_admits_by_transport_and_source() {
        let lo4: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let lo6: std::net::IpAddr = "::1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let lan: std::net::IpAddr = "192.168.1.20".parse().unwrap();
        let lan6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        for ip in [lo4, lo6, mapped, lan, lan6] {
            assert!(PlainPolicy::Allow.admits(ListenerKind::Udp, ip));
            assert!(!PlainPolicy::Deny.admits(ListenerKind::Udp, ip));
            for p in [PlainPolicy::Allow, PlainPolicy::Loopback, PlainPolicy::Deny] {
                assert!(
                    p.admits(ListenerKind::Dtls, ip),
                    "secure transports are not plain"
                );
                assert!(p.admits(ListenerKind::Tls, ip));
            }
        }
        for ip in [lo4, lo6, mapped] {
            assert!(PlainPolicy::Loopback.admits(ListenerKind::Udp, ip), "{ip}");
        }
        for ip in [lan, lan6] {
            assert!(!PlainPolicy::Loopback.admits(ListenerKind::Udp, ip), "{ip}");
        }
    }

    /// The DTLS keys' range checks name the key.
    #[test]
    fn dtls_bounds_are_checked() {
        let ok = CoapConfig::default();
        assert_eq!(ok.check(), Ok(()));
        let addr = SocketAddr::from(([127, 0, 0, 1], 5684));
        let cases = [
            (
                CoapConfig {
                    dtls_max_sessions: 0,
                    ..ok.clone()
                },
                "dtls_max_sessions",
            ),
            (
                CoapConfig {
                    dtls_max_sessions: 10,
                    dtls_max_handshakes: 11,
                    ..ok.clone()
                },
                "dtls_max_handshakes",
            ),
            (
                CoapConfig {
                    dtls_max_handshakes: 0,
                    ..ok.clone()
                },
                "dtls_max_handshakes",
            ),
            (
                CoapConfig {
                    dtls_handshake_timeout_s: 0,
                    ..ok.clone()
                },
                "dtls_handshake_timeout_s",
            ),
            (
                CoapConfig {
                    dtls_idle_s: 0,
                    ..ok.clone()
                },
                "dtls_idle_s",
            ),
            (
                CoapConfig {
                    listen: vec![addr],
                    listen_dtls: vec![addr],
                    ..ok.clone()
                },
                "listen_dtls",
            ),
        ];
        for (cfg, key) in cases {
            assert_eq!(cfg.check().map_err(|(k, _)| k), Err(key));
        }
    }
}
