//! Who a message came from and where a request goes: a listener and a session on it.
//!
//! The host stores a [`PeerRef`] with a device's registration and hands it back to send
//! requests; it need not look inside. Routing is exact: a request leaves through the
//! listener that received the device's messages (for UDP: from the same socket, so the
//! device sees the source port it registered to).

use std::fmt;
use std::net::SocketAddr;

/// The transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// CoAP over UDP (RFC 7252): one session per peer address.
    Udp,
    /// CoAP over DTLS 1.2 (RFC 7252 §9): one DTLS session per peer; the session key is
    /// the address the handshake came from and stays the session's name when the peer's
    /// address changes under a DTLS Connection ID (RFC 9146).
    Dtls,
    /// CoAP over TLS over TCP (RFC 8323): one connection per session.
    Tls,
}

impl ListenerKind {
    /// The scheme in a listener's name (`udp`, `dtls`, `tls`).
    pub fn scheme(self) -> &'static str {
        match self {
            ListenerKind::Udp => "udp",
            ListenerKind::Dtls => "dtls",
            ListenerKind::Tls => "tls",
        }
    }

    /// True when the transport loses, duplicates and reorders messages, so that the
    /// message layer's reliability (CON/ACK, retransmission, duplicate cache) applies.
    pub fn unreliable(self) -> bool {
        match self {
            ListenerKind::Udp | ListenerKind::Dtls => true,
            ListenerKind::Tls => false,
        }
    }

    /// True for the transports whose peers prove an identity ([`PeerIdentity`]).
    pub fn secure(self) -> bool {
        !matches!(self, ListenerKind::Udp)
    }
}

/// What the peer of a secure session proved, as its listener verified it during the
/// handshake. The host maps it to an endpoint name and domain (identity binding); this
/// crate only carries it from the listener to [`crate::Inbound::identity`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A pre-shared key: the PSK identity the client sent, whose key the host's
    /// [`crate::Credentials`] gave.
    Psk(std::sync::Arc<str>),
    /// An X.509 client certificate that chained to a trusted CA: its subject's CN and OU
    /// (the certificates `/api/cert` issues carry `CN=<endpoint>, OU=<domain>`) and its
    /// serial number, hex, as the CA wrote it.
    Certificate {
        cn: std::sync::Arc<str>,
        ou: Option<std::sync::Arc<str>>,
        serial: std::sync::Arc<str>,
    },
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

/// A session as the message layer's state keys it (the duplicate cache, the routing of
/// ACKs and RSTs by message id, Block1 assemblies): the peer's address on one listener,
/// the listener by its index in the transport. The same address on two listeners (a
/// plain UDP peer and a DTLS session of that address, under `coap.plain = "allow"`) is
/// two sources: a plain datagram, whose source anyone can forge, neither answers nor
/// duplicates a secure session's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    pub via: u16,
    pub peer: SocketAddr,
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
