//! Who a message came from and where a request goes: a listener and a session on it.
//!
//! The host stores a [`PeerRef`] with a device's registration and hands it back to send
//! requests; it need not look inside. Routing is exact: a request leaves through the
//! listener that received the device's messages (for UDP: from the same socket, so the
//! device sees the source port it registered to).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The transport of a listener. DTLS, TCP and TLS come next (issue 20 follow-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// CoAP over UDP (RFC 7252): one session per peer address.
    Udp,
}

impl ListenerKind {
    /// The scheme in a listener's name (`udp`).
    pub fn scheme(self) -> &'static str {
        match self {
            ListenerKind::Udp => "udp",
        }
    }

    /// True when the transport loses, duplicates and reorders messages, so that the
    /// message layer's reliability (CON/ACK, retransmission, duplicate cache) applies.
    pub fn unreliable(self) -> bool {
        match self {
            ListenerKind::Udp => true,
        }
    }
}

/// One listener: its transport and the local address it is bound on. Written
/// `udp:0.0.0.0:5683` or `udp:[::]:5683`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId {
    pub kind: ListenerKind,
    pub local: SocketAddr,
}

impl ListenerId {
    pub fn udp(local: SocketAddr) -> ListenerId {
        ListenerId {
            kind: ListenerKind::Udp,
            local,
        }
    }
}

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.scheme(), self.local)
    }
}

/// Why a listener name does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a listener name (scheme:address): {0:?}")]
pub struct BadListenerId(pub String);

impl FromStr for ListenerId {
    type Err = BadListenerId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadListenerId(s.to_owned());
        let (scheme, addr) = s.split_once(':').ok_or_else(bad)?;
        let kind = match scheme {
            "udp" => ListenerKind::Udp,
            _ => return Err(bad()),
        };
        Ok(ListenerId {
            kind,
            local: addr.parse().map_err(|_| bad())?,
        })
    }
}

/// One peer on one listener: where a device's messages came from and where requests to
/// it go. For UDP the session is the peer's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerRef {
    pub listener: ListenerId,
    pub session: SocketAddr,
}

impl PeerRef {
    pub fn udp(local: SocketAddr, peer: SocketAddr) -> PeerRef {
        PeerRef {
            listener: ListenerId::udp(local),
            session: peer,
        }
    }
}

impl fmt::Display for PeerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.listener, self.session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_names_round_trip() {
        for s in ["udp:0.0.0.0:5683", "udp:[::]:5683", "udp:[::1]:1"] {
            let l: ListenerId = s.parse().unwrap();
            assert_eq!(l.to_string(), s);
        }
        for s in ["", "udp", "tcp:0.0.0.0:1", "udp:nothing", "0.0.0.0:5683"] {
            assert!(s.parse::<ListenerId>().is_err(), "{s}");
        }
    }
}
