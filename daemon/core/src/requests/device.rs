//! How the request layer reaches devices: the [`DeviceClient`] seam. The daemon's is
//! [`CoapDevices`], the CoAP transport (requests leave through the listener that
//! received the device's messages); another node's forwarder or a test's fake device
//! is another implementation.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use connectord_model::{PeerRef, Registration};

use crate::coap::Transport;
use crate::coap::client::{ClientError, CoapReply, ObserveStream, OutRequest};
use crate::coap_route::{listener_to_coap, to_coap};
use crate::credentials::DeviceCredentials;

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
        to: &'a Registration,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<CoapReply, ClientError>>;
    /// An observation: the first answer and the stream of notifications.
    fn observe<'a>(
        &'a self,
        to: &'a Registration,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(CoapReply, ObserveStream), ClientError>>;
    /// A non-confirmable request, answered by nobody (`noResp`).
    fn send_non<'a>(
        &'a self,
        to: &'a Registration,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(), ClientError>>;
}

/// The CoAP transport as the request layer's [`DeviceClient`].
///
/// Decision (identity at send): a registration made over DTLS or TLS names a session by
/// its peer's address, and an address can pass to another device (a NAT's mapping
/// expires and is reused, the device's session ends and another's starts from that
/// address). A request therefore goes only to a session whose proved identity the
/// device credentials bind to the registration's endpoint; it is checked once here and
/// then at every transmission by the transport ([`OutRequest::identity`]). A request
/// that finds another identity, or no session, fails as undelivered
/// ([`ClientError::OtherSession`]: 502, retried when a queue-mode device next speaks)
/// and nothing is sent.
pub struct CoapDevices {
    transport: Arc<Transport>,
    credentials: Arc<DeviceCredentials>,
}

impl CoapDevices {
    pub fn new(transport: Arc<Transport>, credentials: Arc<DeviceCredentials>) -> CoapDevices {
        CoapDevices {
            transport,
            credentials,
        }
    }

    /// `req` as it may go to `to`: unchanged on plain UDP; on a secure listener with the
    /// identity its session must keep, once the session's current one is found bound to
    /// the registration's endpoint.
    fn bind<'a>(
        &self,
        to: &Registration,
        req: &'a OutRequest,
    ) -> Result<Cow<'a, OutRequest>, ClientError> {
        if !to.peer.listener.kind.secure() {
            return Ok(Cow::Borrowed(req));
        }
        let identity = self
            .transport
            .session_identity(&to_coap(to.peer))
            .ok_or(ClientError::OtherSession)?;
        match self.credentials.bound(&identity) {
            Some((domain, ep)) if domain == to.domain && ep == to.name => {
                let mut req = req.clone();
                req.identity = Some(identity);
                Ok(Cow::Owned(req))
            }
            _ => Err(ClientError::OtherSession),
        }
    }
}

impl DeviceClient for CoapDevices {
    fn reaches(&self, peer: &PeerRef) -> bool {
        self.transport
            .has_listener(&listener_to_coap(peer.listener))
    }

    fn request<'a>(
        &'a self,
        to: &'a Registration,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<CoapReply, ClientError>> {
        Box::pin(async move {
            let req = self.bind(to, req)?;
            self.transport.request(to_coap(to.peer), &req).await
        })
    }

    fn observe<'a>(
        &'a self,
        to: &'a Registration,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(CoapReply, ObserveStream), ClientError>> {
        Box::pin(async move {
            let req = self.bind(to, req)?;
            self.transport.observe(to_coap(to.peer), &req).await
        })
    }

    fn send_non<'a>(
        &'a self,
        to: &'a Registration,
        req: &'a OutRequest,
    ) -> Fut<'a, Result<(), ClientError>> {
        Box::pin(async move {
            let req = self.bind(to, req)?;
            self.transport.send_non(to_coap(to.peer), &req).await
        })
    }
}
