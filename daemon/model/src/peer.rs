//! Where a device is: an opaque reference to the listener that received its messages and
//! its session on that listener, stored with its registration (`Registration::peer`).
//!
//! The registry and the request paths only compare, store and hand back a [`PeerRef`];
//! the CoAP crate routes it (`connectord_core::coap_route` converts to and from its own type).
//! Self-contained on purpose (std and serde only): it moves to the `model` crate.
//!
//! Stored form (JSON, inside the registration):
//! `{"listener": "udp:0.0.0.0:5683", "session": "192.0.2.1:56830"}`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// CoAP over UDP (RFC 7252).
    Udp,
    /// CoAP over DTLS 1.2 (RFC 7252 §9).
    Dtls,
    /// CoAP over TLS over TCP (RFC 8323).
    Tls,
}

impl ListenerKind {
    /// The scheme in a listener's name.
    pub fn scheme(self) -> &'static str {
        match self {
            ListenerKind::Udp => "udp",
            ListenerKind::Dtls => "dtls",
            ListenerKind::Tls => "tls",
        }
    }

    /// True for the transports whose peers prove an identity (DTLS, TLS).
    pub fn secure(self) -> bool {
        !matches!(self, ListenerKind::Udp)
    }
}

/// A listener: its transport and local address, written `udp:[::]:5683`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId {
    pub kind: ListenerKind,
    pub local: SocketAddr,
}

/// One device on one listener. For UDP the session is the device's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerRef {
    pub listener: ListenerId,
    #[serde(serialize_with = "session_out")]
    pub session: SocketAddr,
}

/// The session as serde writes a `SocketAddr` (its `Display` form in a human-readable
/// format), an IPv4 one without `fmt` ([`AddrText`]).
fn session_out<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    match addr {
        SocketAddr::V4(v4) if s.is_human_readable() => {
            let mut t = AddrText::default();
            t.push_v4(v4);
            s.serialize_str(t.as_str())
        }
        _ => addr.serialize(s),
    }
}

/// An IPv4 socket address (with a scheme before it) written by hand into a buffer on the
/// stack: byte for byte its `Display` form (`192.0.2.1:56830`). Decision: every stored
/// registration writes two addresses (listener and session); through `fmt` they were
/// about 4 000 instructions of each registration (callgrind, issue 24), by hand a tenth.
/// IPv6 addresses (their `::` compression) keep `Display`.
#[derive(Default)]
struct AddrText {
    /// "dtls:" + "255.255.255.255:65535" at most.
    buf: [u8; 32],
    len: usize,
}

impl AddrText {
    fn push_bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// `n` in decimal, without leading zeros.
    fn push_decimal(&mut self, n: u16) {
        let mut digits = [0u8; 5];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push_bytes(&digits[i..]);
    }

    fn push_v4(&mut self, addr: &std::net::SocketAddrV4) {
        for (i, octet) in addr.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.push_bytes(b".");
            }
            self.push_decimal(u16::from(octet));
        }
        self.push_bytes(b":");
        self.push_decimal(addr.port());
    }

    fn as_str(&self) -> &str {
        // Only ASCII was pushed.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl PeerRef {
    /// A device at `peer` that talks to the UDP socket bound on `local`.
    pub fn udp(local: SocketAddr, peer: SocketAddr) -> PeerRef {
        PeerRef {
            listener: ListenerId {
                kind: ListenerKind::Udp,
                local,
            },
            session: peer,
        }
    }
}

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.scheme(), self.local)
    }
}

impl fmt::Display for PeerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.listener, self.session)
    }
}

/// A listener name that is not `scheme:address` with a known scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadListenerId(pub String);

impl fmt::Display for BadListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a listener name (scheme:address): {:?}", self.0)
    }
}

impl std::error::Error for BadListenerId {}

impl FromStr for ListenerId {
    type Err = BadListenerId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadListenerId(s.to_owned());
        let (scheme, addr) = s.split_once(':').ok_or_else(bad)?;
        let kind = match scheme {
            "udp" => ListenerKind::Udp,
            "dtls" => ListenerKind::Dtls,
            "tls" => ListenerKind::Tls,
            _ => return Err(bad()),
        };
        Ok(ListenerId {
            kind,
            local: addr.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for ListenerId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.local {
            SocketAddr::V4(v4) => {
                let mut t = AddrText::default();
                t.push_bytes(self.kind.scheme().as_bytes());
                t.push_bytes(b":");
                t.push_v4(v4);
                s.serialize_str(t.as_str())
            }
            SocketAddr::V6(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for ListenerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips() {
        let p = PeerRef::udp(
            "[::]:5683".parse().unwrap(),
            "[2001:db8::1]:56830".parse().unwrap(),
        );
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"listener":"udp:[::]:5683","session":"[2001:db8::1]:56830"}"#
        );
        assert_eq!(serde_json::from_str::<PeerRef>(&json).unwrap(), p);
        for name in ["dtls:0.0.0.0:5684", "tls:[::]:5684"] {
            assert_eq!(name.parse::<ListenerId>().unwrap().to_string(), name);
        }
        // IPv4 addresses are written by hand: the same text as `Display`.
        for (local, peer) in [
            ("0.0.0.0:5683", "192.0.2.1:56830"),
            ("255.255.255.255:65535", "10.0.0.0:0"),
            ("127.0.0.1:1", "1.22.203.9:10"),
        ] {
            for kind in [ListenerKind::Udp, ListenerKind::Dtls, ListenerKind::Tls] {
                let p = PeerRef {
                    listener: ListenerId {
                        kind,
                        local: local.parse().unwrap(),
                    },
                    session: peer.parse().unwrap(),
                };
                let json = serde_json::to_string(&p).unwrap();
                assert_eq!(
                    json,
                    format!(
                        r#"{{"listener":"{}","session":"{}"}}"#,
                        p.listener, p.session
                    )
                );
                assert_eq!(serde_json::from_str::<PeerRef>(&json).unwrap(), p);
            }
        }
        for o in 0..=255u8 {
            let a = std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::new(o, o / 3, 255 - o, o % 10),
                u16::from(o) * 257,
            );
            let mut t = AddrText::default();
            t.push_v4(&a);
            assert_eq!(t.as_str(), a.to_string());
        }
        for bad in [
            r#"{"listener":"tcp:[::]:5683","session":"192.0.2.1:1"}"#,
            r#"{"listener":"coaps:[::]:5683","session":"192.0.2.1:1"}"#,
            r#"{"listener":"[::]:5683","session":"192.0.2.1:1"}"#,
            r#"{"listener":"udp:[::]:5683","session":"nowhere"}"#,
        ] {
            assert!(serde_json::from_str::<PeerRef>(bad).is_err(), "{bad}");
        }
    }
}
