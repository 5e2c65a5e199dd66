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
    pub session: SocketAddr,
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
        s.collect_str(self)
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
