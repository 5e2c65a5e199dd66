//! connectord's CoAP side: the RFC 7252 message layer, block-wise transfers, link-format.
//!
//! Architecture invariant: this crate knows nothing of LwM2M registrations, HTTP or
//! storage, and depends on no other crate of the workspace. It decodes messages, answers
//! duplicates from its cache, assembles request bodies sent block-wise ([`block1`]), hands
//! each new request to a [`transport::RequestHandler`] that returns the response to send,
//! and sends requests to devices ([`client`]). What it needs from its host comes in
//! through its own types: [`CoapConfig`] (the `[coap]` TOML section), a [`Metrics`]
//! implementation (the host's counters), a `watch::Receiver<bool>` stop signal.
//!
//! A device is addressed by a [`PeerRef`]: the listener that received its messages
//! ([`ListenerId`], `udp:[::]:5683`) and its session on that listener (for UDP, its
//! address). Requests to a device leave through that listener (LwM2M clients ignore
//! anything from another source port).
//!
//! Reliability (CON/ACK, retransmission, the duplicate cache keyed by message id) belongs
//! to unreliable listeners (UDP, later DTLS). Callers never see it: they send a request to
//! a `PeerRef` and get a response, and the request handler gets requests and returns
//! responses. A reliable transport (RFC 8323, CoAP over TCP/TLS: no message ids, no ACKs,
//! signalling messages) will be another listener kind that frames messages and skips the
//! reliability layer, without changing [`Transport::request`] or [`RequestHandler`].

#![deny(unsafe_code)]

pub mod block1;
pub mod client;
pub mod config;
pub mod content_format;
pub mod dedup;
pub mod dtls;
pub mod link_format;
pub mod listener;
pub mod log_budget;
pub mod message;
pub mod metrics;
pub mod peer;
pub mod rfc8323;
pub mod shed;
pub mod tls;
pub mod transport;
pub mod udp;

pub use config::{CoapConfig, PlainPolicy};
pub use dtls::{DtlsListener, DtlsSetup};
pub use listener::AnyListener;
pub use listener::{Credentials, Listener, Session};
pub use message::{DecodeError, Inbound};
pub use metrics::{Counters, Event, Metrics};
pub use peer::{ListenerId, ListenerKind, PeerIdentity, PeerRef};
pub use tls::{TlsListener, TlsSetup};
pub use transport::{RequestHandler, Transport};
pub use udp::UdpListener;

/// The hasher of this crate's maps keyed by data from outside (peers, tokens): aHash,
/// keyed per map from OS randomness (as the daemon's own maps).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
