//! [`connectord_model::PeerRef`] (what registrations store) ⇄ `connectord_coap::PeerRef` (what
//! the CoAP crate routes): the same fields, copied.

use connectord_coap as coap;

use connectord_model::{ListenerId, ListenerKind, PeerRef};

pub fn from_coap(p: coap::PeerRef) -> PeerRef {
    PeerRef {
        listener: ListenerId {
            kind: match p.listener.kind {
                coap::ListenerKind::Udp => ListenerKind::Udp,
                coap::ListenerKind::Dtls => ListenerKind::Dtls,
                coap::ListenerKind::Tls => ListenerKind::Tls,
            },
            local: p.listener.local,
        },
        session: p.session,
    }
}

pub fn to_coap(p: PeerRef) -> coap::PeerRef {
    coap::PeerRef {
        listener: listener_to_coap(p.listener),
        session: p.session,
    }
}

pub fn listener_to_coap(l: ListenerId) -> coap::ListenerId {
    coap::ListenerId {
        kind: match l.kind {
            ListenerKind::Udp => coap::ListenerKind::Udp,
            ListenerKind::Dtls => coap::ListenerKind::Dtls,
            ListenerKind::Tls => coap::ListenerKind::Tls,
        },
        local: l.local,
    }
}
