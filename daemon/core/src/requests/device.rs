//! How the request layer reaches devices: the [`DeviceClient`] seam. The daemon's is
//! [`CoapDevices`], the CoAP transport (requests leave through the listener that
//! received the device's messages); another node's forwarder or a test's fake device
//! is another implementation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use connectord_model::PeerRef;

use crate::coap::Transport;
use crate::coap::client::{ClientError, CoapReply, ObserveStream, OutRequest};
use crate::coap_route::{listener_to_coap, to_coap};

/// A boxed future borrowing the client for `'a`.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends requests to devices, each at the peer its registration stored.
pub trait DeviceClient: Send + Sync + 'static {
    /// Whether a device registered through this peer's listener can still be reached
    /// (the listener is bound).
    fn reaches(&self, peer: &PeerRef) -> bool;
    /// A confirmable request and its answer (piggybacked or separate, block-wise).
    fn request<'a>(
        &'a self,
        peer: PeerRef,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<CoapReply, ClientError>>;
    /// An observation: the first answer and the stream of notifications.
    fn observe<'a>(
        &'a self,
        peer: PeerRef,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(CoapReply, ObserveStream), ClientError>>;
    /// A non-confirmable request, answered by nobody (`noResp`).
    fn send_non<'a>(
        &'a self,
        peer: PeerRef,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(), ClientError>>;
}

/// The CoAP transport as the request layer's [`DeviceClient`].
pub struct CoapDevices(pub Arc<Transport>);

impl DeviceClient for CoapDevices {
    fn reaches(&self, peer: &PeerRef) -> bool {
        self.0.has_listener(&listener_to_coap(peer.listener))
    }

    fn request<'a>(
        &'a self,
        peer: PeerRef,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<CoapReply, ClientError>> {
        Box::pin(self.0.request(to_coap(peer), req))
    }

    fn observe<'a>(
        &'a self,
        peer: PeerRef,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(CoapReply, ObserveStream), ClientError>> {
        Box::pin(self.0.observe(to_coap(peer), req))
    }

    fn send_non<'a>(
        &'a self,
        peer: PeerRef,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(), ClientError>> {
        Box::pin(self.0.send_non(to_coap(peer), req))
    }
}
