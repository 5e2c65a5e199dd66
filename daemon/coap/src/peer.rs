//! Who a message came from and where a request goes: a listener and a session on it.
//!
//! The host stores a [`PeerRef`] with a device's registration and hands it back to send
//! requests; it need not look inside. Routing is exact: a request leaves through the
//! listener that received the device's messages (for UDP: from the same socket, so the
//! device sees the source port it registered to).

use std::fmt;
use std::net::SocketAddr;

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
/// `udp:0.0.0.0:5683` or `udp:[::]:5683` (the host parses and stores that form).
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
    fn listener_names() {
        for s in ["udp:0.0.0.0:5683", "udp:[::]:5683"] {
            let l = ListenerId::udp(s[4..].parse().unwrap());
            assert_eq!(l.to_string(), s);
        }
    }
}
