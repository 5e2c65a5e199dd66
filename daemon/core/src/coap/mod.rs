//! The CoAP side: UDP sockets, the RFC 7252 message layer and the link-format parser.
//!
//! Architecture invariant: this module knows nothing of LwM2M registrations, HTTP or the
//! store. It decodes datagrams, answers duplicates from its cache, assembles request bodies
//! sent block-wise ([`block1`]), and hands each new request to a
//! [`transport::RequestHandler`] that returns the response to send.

pub mod block1;
pub mod client;
pub mod content_format;
pub mod dedup;
pub mod link_format;
pub mod message;
pub mod transport;

pub use message::{DecodeError, Inbound};
pub use transport::{RequestHandler, Transport};
