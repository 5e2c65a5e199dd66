//! The LwM2M registration interface over CoAP: `POST /rd`, `POST /rd/{id}`,
//! `DELETE /rd/{id}`. Turns CoAP requests into [`Registry`] calls and their outcome into
//! CoAP responses with a diagnostic payload for every refusal.
//!
//! Identity binding (issue 21): a request from a secure session is the endpoint its
//! credential names ([`DeviceCredentials::bound`]); `ep=`/`d=` contradicting it, a
//! plain-CoAP registration of an endpoint that has credentials, and an update or
//! de-registration from another credential than the registration's are 4.03 with a
//! diagnostic (the decisions: [`crate::credentials::on_register`], [`on_update`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use coap_lite::{CoapOption, ContentFormat, MessageClass, RequestType, ResponseType};

use super::{RegisterParams, Registry, RegistryError, RegistryEvent, UpdateParams};
use crate::coap::RequestHandler;
use crate::coap::message::{self, Handled, Inbound, Response};
use crate::coap_route::from_coap;
use crate::credentials::{Arrival, DeviceCredentials, Verdict, on_register, on_update};
use crate::metrics::Counters;

/// Answers the registration interface for a [`Registry`].
pub struct Lwm2mHandler {
    registry: Arc<Registry>,
    credentials: Arc<DeviceCredentials>,
    counters: Arc<Counters>,
}

impl Lwm2mHandler {
    pub fn new(
        registry: Arc<Registry>,
        credentials: Arc<DeviceCredentials>,
        counters: Arc<Counters>,
    ) -> Lwm2mHandler {
        Lwm2mHandler {
            registry,
            credentials,
            counters,
        }
    }
}

impl RequestHandler for Lwm2mHandler {
    fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>> {
        let registry = Arc::clone(&self.registry);
        let binding = Binding {
            credentials: Arc::clone(&self.credentials),
            counters: Arc::clone(&self.counters),
        };
        Box::pin(async move {
            let (response, event) = handle(&registry, &binding, req).await;
            Handled {
                response: Some(response),
                after_send: event.map(|ev| -> Box<dyn FnOnce() + Send> {
                    Box::new(move || registry.after_reply(&ev))
                }),
            }
        })
    }
}

/// What identity binding needs: the credentials and the counter of plain refusals.
struct Binding {
    credentials: Arc<DeviceCredentials>,
    counters: Arc<Counters>,
}

impl Binding {
    /// How `req` arrived: plain, or a secure session bound to an endpoint (or to none).
    fn arrival(&self, req: &Inbound) -> Arrival {
        match &req.identity {
            None if !req.peer.listener.kind.secure() => Arrival::Plain,
            None => Arrival::Unbound,
            Some(id) => match self.credentials.bound(id) {
                Some((domain, ep)) => Arrival::Bound { domain, ep },
                None => Arrival::Unbound,
            },
        }
    }

    /// 4.03 for a refusing verdict (a plain refusal counted and logged within the
    /// device-line budget), `None` to go on.
    fn refusal(&self, verdict: &Verdict, req: &Inbound) -> Option<Response> {
        match verdict {
            Verdict::Accept { .. } => None,
            Verdict::Forbidden(m) => {
                if crate::log_budget::allow(crate::log_budget::DeviceLine::Refused) {
                    tracing::info!(peer = %req.peer, "registration interface: refused: {m}");
                }
                Some(Response::diagnostic(ResponseType::Forbidden, m.clone()))
            }
            Verdict::PlainRefused(m) => {
                Counters::inc(&self.counters.coap_plain_refused);
                if crate::log_budget::allow(crate::log_budget::DeviceLine::Refused) {
                    tracing::info!(peer = %req.peer, "plain CoAP refused: {m}");
                }
                Some(Response::diagnostic(ResponseType::Forbidden, m.clone()))
            }
        }
    }

    /// The refusal of an update or de-registration of registration `id` that does not come
    /// from the registration's credential; `None` to go on (an unknown id too: the
    /// registry answers 4.04).
    fn check_update(&self, registry: &Registry, id: &str, req: &Inbound) -> Option<Response> {
        let ep = registry.directory().by_id(id)?;
        let verdict = on_update(
            &self.arrival(req),
            &ep.reg.domain,
            &ep.reg.name,
            ep.reg.peer.listener.kind.secure(),
            self.credentials
                .has_credentials(&ep.reg.domain, &ep.reg.name),
        );
        self.refusal(&verdict, req)
    }
}

/// The response, and the registry event whose after-reply work is due once it is sent.
async fn handle(
    registry: &Registry,
    binding: &Binding,
    req: Inbound,
) -> (Response, Option<RegistryEvent>) {
    let MessageClass::Request(method) = req.packet.header.code else {
        return (
            Response::diagnostic(ResponseType::BadRequest, "not a request"),
            None,
        );
    };
    let path = message::uri_path(&req.packet);
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let response = match (method, path.as_slice()) {
        (RequestType::Post, ["rd"]) => return register(registry, binding, &req).await,
        (RequestType::Post, ["rd", id]) => {
            if let Some(r) = binding.check_update(registry, id, &req) {
                return (r, None);
            }
            return update(registry, id, &req).await;
        }
        (RequestType::Delete, ["rd", id]) => {
            if let Some(r) = binding.check_update(registry, id, &req) {
                return (r, None);
            }
            match registry.deregister(id).await {
                Ok(_) => Response::new(ResponseType::Deleted),
                Err(e) => refusal(e),
            }
        }
        (_, ["rd"] | ["rd", _]) => Response::diagnostic(
            ResponseType::MethodNotAllowed,
            "the registration interface takes POST /rd, POST /rd/{id} and DELETE /rd/{id}",
        ),
        _ => Response::diagnostic(ResponseType::NotFound, "no such resource"),
    };
    (response, None)
}

fn refusal(e: RegistryError) -> Response {
    match e {
        RegistryError::Invalid(m) => Response::diagnostic(ResponseType::BadRequest, m),
        RegistryError::NotFound(_) => {
            Response::diagnostic(ResponseType::NotFound, "unknown registration")
        }
        RegistryError::OverQuota(m) => Response::diagnostic(ResponseType::TooManyRequests, m),
        e @ RegistryError::DomainFull { .. } => {
            Response::diagnostic(ResponseType::Forbidden, e.to_string())
        }
        // Not the device's fault, and it may pass: 5.03 rather than 4.03.
        e @ RegistryError::Full { .. } => {
            Response::diagnostic(ResponseType::ServiceUnavailable, e.to_string())
        }
        // Decision: the storage failing (full, read-only, ...) is 5.03 with Max-Age, the
        // seconds after which the device may try again (RFC 7252 §5.9.3.4); the store logs
        // it once, not per device. Any other store error stays 5.00.
        RegistryError::Store(e) if e.is_unavailable() => {
            tracing::debug!("registration not stored: {e}");
            Response::diagnostic(
                ResponseType::ServiceUnavailable,
                "the server cannot store registrations now; try again later",
            )
            .with_option(
                coap_lite::CoapOption::MaxAge,
                STORE_RETRY_S.to_be_bytes().to_vec(),
            )
        }
        RegistryError::Store(e) => {
            tracing::error!("registration not stored: {e}");
            Response::diagnostic(ResponseType::InternalServerError, "storage failure")
        }
    }
}

/// Max-Age of a 5.03 answered because the store is failing: when the device may try again.
const STORE_RETRY_S: u8 = 60;

/// The link-format body, if the request has one. A Content-Format other than
/// link-format is 4.15; a body that is not UTF-8 is 4.00.
fn body(req: &Inbound) -> Result<Option<String>, Response> {
    if let Some(cf) = req.packet.get_content_format()
        && cf != ContentFormat::ApplicationLinkFormat
    {
        return Err(Response::diagnostic(
            ResponseType::UnsupportedContentFormat,
            "the object list must be application/link-format",
        ));
    }
    if req.packet.payload.is_empty() {
        return Ok(None);
    }
    String::from_utf8(req.packet.payload.clone())
        .map(Some)
        .map_err(|_| Response::diagnostic(ResponseType::BadRequest, "object list is not UTF-8"))
}

/// One `name=value` (or bare `name`) query item.
fn split_query(item: &str) -> (&str, Option<&str>) {
    match item.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (item, None),
    }
}

/// `lt`: a whole number of seconds (the range the registry takes is checked there, and
/// named in its refusal). A number that is negative or over `u32::MAX` is named as out of
/// range, not as "not a whole number" (what it was refused as before).
fn parse_lifetime(v: Option<&str>) -> Result<u32, Response> {
    let Some(v) = v else {
        return Err(Response::diagnostic(
            ResponseType::BadRequest,
            "lt needs a value: a whole number of seconds",
        ));
    };
    if let Ok(lt) = v.parse::<u32>() {
        return Ok(lt);
    }
    let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
    let diag = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        format!(
            "lt {} is out of range: a lifetime is a whole number of seconds from 1 to {}",
            shorten(v),
            u32::MAX
        )
    } else {
        format!("lt must be a whole number of seconds, not {:?}", shorten(v))
    };
    Err(Response::diagnostic(ResponseType::BadRequest, diag))
}

/// At most 24 characters of a value a diagnostic repeats.
fn shorten(v: &str) -> &str {
    match v.char_indices().nth(24) {
        Some((i, _)) => &v[..i],
        None => v,
    }
}

fn text_param(name: &str, v: Option<&str>) -> Result<String, Response> {
    match v {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(Response::diagnostic(
            ResponseType::BadRequest,
            format!("{name} needs a value"),
        )),
    }
}

/// The binding mode `b=`: one or more distinct transports, `U` (UDP), `T` (TCP), `S`
/// (SMS), `N` (non-IP) of LwM2M 1.1 and `M` (MQTT), `H` (HTTP) of 1.2, with LwM2M 1.0's
/// queue-mode `Q` allowed right after `U` or `S` (`UQ`, `SQ`, `UQS`). Anything else is
/// 4.00 naming the value: it is not stored, shown to applications or read for queue mode.
fn binding(v: Option<&str>) -> Result<String, Response> {
    let b = text_param("b", v)?;
    let mut seen = String::new();
    let valid = b.chars().all(|c| {
        let ok = "UTSNMHQ".contains(c)
            && !seen.contains(c)
            && (c != 'Q' || seen.ends_with('U') || seen.ends_with('S'));
        seen.push(c);
        ok
    }) && b.chars().any(|c| c != 'Q');
    if !valid {
        return Err(Response::diagnostic(
            ResponseType::BadRequest,
            format!(
                "b={b:?} is not a binding mode: letters of U, T, S, N, M, H, each once, with Q only after U or S (UQ, SQ, UQS)"
            ),
        ));
    }
    Ok(b)
}

/// The LwM2M version `lwm2m=`: `MAJOR.MINOR`, one to three digits each (`1.0`, `1.1`,
/// `1.2`; LwM2M 1.1 §6.2.1 "lwm2m=1.1"). Anything else is 4.00 naming the value, as for
/// `b=`: it would otherwise be stored and shown to applications as the endpoint's version
/// (`lwm2m` in the endpoint's JSON), whatever the device wrote. Versions this daemon does
/// not know yet (`1.3`, `2.0`) register: the version is reported, not acted on.
fn version(v: Option<&str>) -> Result<String, Response> {
    let l = text_param("lwm2m", v)?;
    let part = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    match l.split_once('.') {
        Some((major, minor)) if part(major) && part(minor) => Ok(l),
        _ => Err(Response::diagnostic(
            ResponseType::BadRequest,
            format!("lwm2m={l:?} is not an LwM2M version: MAJOR.MINOR, such as 1.0, 1.1 or 1.2"),
        )),
    }
}

/// The registration's parameters, and its `ep=` apart (left out on a secure transport,
/// the credential names the endpoint).
fn register_params(req: &Inbound) -> Result<(RegisterParams, Option<String>), Response> {
    let mut p = RegisterParams::default();
    let mut name = None;
    for item in message::uri_query(&req.packet) {
        match split_query(&item) {
            ("ep", v) => name = Some(text_param("ep", v)?),
            ("lt", v) => p.lifetime_s = Some(parse_lifetime(v)?),
            ("lwm2m", v) => p.lwm2m = Some(version(v)?),
            ("b", v) => p.binding = Some(binding(v)?),
            ("et", v) => p.ept = Some(text_param("et", v)?),
            ("d", v) => p.domain = Some(text_param("d", v)?),
            ("Q", None) => p.queue_flag = true,
            // sms, pid, apn and unknown parameters are accepted and ignored.
            _ => {}
        }
    }
    p.links = body(req)?.unwrap_or_default();
    Ok((p, name))
}

async fn register(
    registry: &Registry,
    binding: &Binding,
    req: &Inbound,
) -> (Response, Option<RegistryEvent>) {
    let (mut params, name) = match register_params(req) {
        Ok(p) => p,
        Err(r) => return (r, None),
    };
    let verdict = on_register(
        &binding.arrival(req),
        name.as_deref(),
        params.domain.as_deref(),
        registry.default_domain(),
        |d, e| binding.credentials.has_credentials(d, e),
        |d, e| {
            registry
                .directory()
                .get(d, e)
                .is_some_and(|ep| ep.reg.peer.listener.kind.secure())
        },
    );
    if let Some(r) = binding.refusal(&verdict, req) {
        return (r, None);
    }
    let (bound_domain, bound_ep) = match verdict {
        Verdict::Accept { domain, ep } => (domain, ep),
        _ => (None, None),
    };
    if bound_domain.is_some() {
        params.domain = bound_domain;
    }
    params.name = match bound_ep.or(name) {
        Some(n) => n,
        None => {
            return (
                Response::diagnostic(ResponseType::BadRequest, "ep (endpoint name) is required"),
                None,
            );
        }
    };
    match registry.register(params, from_coap(req.peer)).await {
        Ok(ep) => (
            Response::new(ResponseType::Created)
                .with_option(CoapOption::LocationPath, b"rd".to_vec())
                .with_option(CoapOption::LocationPath, ep.reg.id.clone().into_bytes()),
            Some(RegistryEvent::Registered { ep, replaced: None }),
        ),
        Err(e) => (refusal(e), None),
    }
}

async fn update(registry: &Registry, id: &str, req: &Inbound) -> (Response, Option<RegistryEvent>) {
    let mut p = UpdateParams::default();
    for item in message::uri_query(&req.packet) {
        let r = match split_query(&item) {
            ("lt", v) => parse_lifetime(v).map(|lt| p.lifetime_s = Some(lt)),
            ("b", v) => binding(v).map(|b| p.binding = Some(b)),
            ("Q", None) => {
                p.queue_flag = true;
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(resp) = r {
            return (resp, None);
        }
    }
    p.links = match body(req) {
        Ok(b) => b,
        Err(r) => return (r, None),
    };
    match registry.update(id, p, from_coap(req.peer)).await {
        Ok(ep) => (
            Response::new(ResponseType::Changed),
            Some(RegistryEvent::Updated { ep }),
        ),
        Err(e) => (refusal(e), None),
    }
}

#[cfg(test)]
mod tests {
    //! Identity binding through the handler, with requests as a secure listener would hand
    //! them over (an `Inbound` with the identity its handshake proved).
    use super::*;

    /// `lt` refusals say what is wrong: a number out of range was "not a whole number".
    #[test]
    fn lifetime_refusals_name_the_value_and_what_is_wrong() {
        let diag = |v: Option<&str>| {
            let r = parse_lifetime(v).unwrap_err();
            String::from_utf8(r.payload.clone()).unwrap()
        };
        assert_eq!(parse_lifetime(Some("86400")).ok(), Some(86400));
        assert_eq!(
            diag(Some("99999999999")),
            "lt 99999999999 is out of range: a lifetime is a whole number of seconds from 1 to 4294967295"
        );
        assert_eq!(
            diag(Some("-5")),
            "lt -5 is out of range: a lifetime is a whole number of seconds from 1 to 4294967295"
        );
        assert_eq!(
            diag(Some("1.5")),
            "lt must be a whole number of seconds, not \"1.5\""
        );
        assert_eq!(
            diag(Some(&"9x".repeat(40))),
            format!(
                "lt must be a whole number of seconds, not {:?}",
                "9x".repeat(12)
            )
        );
        assert_eq!(diag(None), "lt needs a value: a whole number of seconds");
    }
    use crate::coap::{ListenerId, ListenerKind, PeerIdentity, PeerRef};
    use crate::config::RegistryConfig;
    use crate::store::Store;
    use crate::store::memory::MemoryStore;
    use coap_lite::Packet;

    struct Rig {
        handler: Lwm2mHandler,
        registry: Arc<Registry>,
        credentials: Arc<DeviceCredentials>,
        counters: Arc<Counters>,
    }

    async fn rig() -> Rig {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let counters = Arc::new(Counters::default());
        let registry = Arc::new(Registry::new(
            RegistryConfig::default(),
            Arc::clone(&store),
            Arc::clone(&counters),
            None,
        ));
        let credentials = DeviceCredentials::load(store, "default").await.unwrap();
        credentials
            .put_psk("default", "dev-1", "id-1", vec![1; 16])
            .await
            .unwrap();
        Rig {
            handler: Lwm2mHandler::new(
                Arc::clone(&registry),
                Arc::clone(&credentials),
                Arc::clone(&counters),
            ),
            registry,
            credentials,
            counters,
        }
    }

    fn peer(kind: ListenerKind, port: u16) -> PeerRef {
        PeerRef {
            listener: ListenerId {
                kind,
                local: "127.0.0.1:5684".parse().unwrap(),
            },
            session: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn psk(id: &str) -> Option<PeerIdentity> {
        Some(PeerIdentity::Psk(id.into()))
    }

    fn request(method: RequestType, path: &[&str], query: &[&str]) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(method);
        for s in path {
            p.add_option(CoapOption::UriPath, s.as_bytes().to_vec());
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if method == RequestType::Post && path.len() == 1 {
            p.payload = b"</3/0>".to_vec();
        }
        p
    }

    impl Rig {
        async fn send(
            &self,
            packet: Packet,
            kind: ListenerKind,
            identity: Option<PeerIdentity>,
        ) -> Response {
            let handled = self
                .handler
                .handle(Inbound {
                    packet,
                    peer: peer(kind, 40_000),
                    identity,
                })
                .await;
            handled.response.unwrap()
        }

        async fn register(
            &self,
            query: &[&str],
            kind: ListenerKind,
            identity: Option<PeerIdentity>,
        ) -> Response {
            self.send(request(RequestType::Post, &["rd"], query), kind, identity)
                .await
        }

        fn plain_refused(&self) -> u64 {
            self.counters
                .coap_plain_refused
                .load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn text(r: &Response) -> String {
        String::from_utf8_lossy(&r.payload).into_owned()
    }

    #[tokio::test]
    async fn a_psk_session_registers_as_its_credential_and_nothing_else() {
        let rig = rig().await;
        let dtls = ListenerKind::Dtls;
        // ep= contradicting the credential, or d=: 4.03 naming it.
        let r = rig
            .register(&["ep=dev-2", "lt=60"], dtls, psk("id-1"))
            .await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert!(text(&r).contains("ep=dev-2"), "{}", text(&r));
        let r = rig
            .register(&["ep=dev-1", "d=other", "lt=60"], dtls, psk("id-1"))
            .await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert!(rig.registry.directory().is_empty());
        // No ep=: the credential's name and domain.
        let r = rig.register(&["lt=60"], dtls, psk("id-1")).await;
        assert_eq!(r.code, ResponseType::Created, "{}", text(&r));
        let ep = rig.registry.directory().get("default", "dev-1").unwrap();
        assert_eq!(
            ep.reg.peer.listener.kind,
            connectord_model::ListenerKind::Dtls
        );
        // An unknown PSK identity (removed since the handshake) registers nothing.
        let r = rig.register(&["ep=x", "lt=60"], dtls, psk("gone")).await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert_eq!(rig.plain_refused(), 0, "none of these came over plain CoAP");
    }

    #[tokio::test]
    async fn plain_coap_cannot_take_an_endpoint_with_credentials() {
        let rig = rig().await;
        let udp = ListenerKind::Udp;
        let r = rig.register(&["ep=dev-1", "lt=60"], udp, None).await;
        assert_eq!(r.code, ResponseType::Forbidden);
        assert!(text(&r).contains("has credentials"), "{}", text(&r));
        assert_eq!(rig.plain_refused(), 1);
        // Another domain's dev-1 is another endpoint; a name without credentials is free.
        let r = rig
            .register(&["ep=dev-1", "d=lab", "lt=60"], udp, None)
            .await;
        assert_eq!(r.code, ResponseType::Created, "{}", text(&r));
        let r = rig.register(&["ep=free", "lt=60"], udp, None).await;
        assert_eq!(r.code, ResponseType::Created, "{}", text(&r));
        // Plain CoAP still needs ep=.
        let r = rig.register(&["lt=60"], udp, None).await;
        assert_eq!(r.code, ResponseType::BadRequest);
        // A certificate session registers as its CN/OU (its certificate is not recorded
        // here: one issued before recording, still valid).
        let cert = Some(PeerIdentity::Certificate {
            cn: "cert-dev".into(),
            ou: Some("lab".into()),
            serial: "4a".into(),
        });
        let r = rig.register(&["lt=60"], ListenerKind::Tls, cert).await;
        assert_eq!(r.code, ResponseType::Created, "{}", text(&r));
        // Plain CoAP cannot replace that live secure registration.
        let r = rig
            .register(&["ep=cert-dev", "d=lab", "lt=60"], udp, None)
            .await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert_eq!(rig.plain_refused(), 2);
    }

    #[tokio::test]
    async fn updates_and_deregistration_come_from_the_registrations_credential() {
        let rig = rig().await;
        let dtls = ListenerKind::Dtls;
        let r = rig.register(&["lt=60"], dtls, psk("id-1")).await;
        assert_eq!(r.code, ResponseType::Created, "{}", text(&r));
        let id = rig
            .registry
            .directory()
            .get("default", "dev-1")
            .unwrap()
            .reg
            .id
            .clone();
        let update = || request(RequestType::Post, &["rd", &id], &["lt=120"]);
        let delete = || request(RequestType::Delete, &["rd", &id], &[]);
        // Plain: refused and counted.
        let r = rig.send(update(), ListenerKind::Udp, None).await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        let r = rig.send(delete(), ListenerKind::Udp, None).await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert_eq!(rig.plain_refused(), 2);
        // Another credential: refused.
        rig.credentials
            .put_psk("default", "dev-2", "id-2", vec![2; 16])
            .await
            .unwrap();
        let r = rig.send(update(), dtls, psk("id-2")).await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert_eq!(
            rig.registry
                .directory()
                .get("default", "dev-1")
                .unwrap()
                .reg
                .lifetime_s,
            60
        );
        // Its own: accepted.
        let r = rig.send(update(), dtls, psk("id-1")).await;
        assert_eq!(r.code, ResponseType::Changed, "{}", text(&r));
        // Once revoked, the identity binds to nothing: refused.
        rig.credentials
            .revoke("default", "dev-1")
            .await
            .unwrap()
            .unwrap();
        let r = rig.send(delete(), dtls, psk("id-1")).await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        assert!(rig.registry.directory().get("default", "dev-1").is_some());
    }

    #[tokio::test]
    async fn a_plain_registration_is_refused_updates_once_its_endpoint_gets_credentials() {
        let rig = rig().await;
        let r = rig
            .register(&["ep=later", "lt=60"], ListenerKind::Udp, None)
            .await;
        assert_eq!(r.code, ResponseType::Created);
        let id = rig
            .registry
            .directory()
            .get("default", "later")
            .unwrap()
            .reg
            .id
            .clone();
        let r = rig
            .send(
                request(RequestType::Post, &["rd", &id], &[]),
                ListenerKind::Udp,
                None,
            )
            .await;
        assert_eq!(r.code, ResponseType::Changed);
        rig.credentials
            .put_psk("default", "later", "id-later", vec![3; 16])
            .await
            .unwrap();
        let r = rig
            .send(
                request(RequestType::Post, &["rd", &id], &[]),
                ListenerKind::Udp,
                None,
            )
            .await;
        assert_eq!(r.code, ResponseType::Forbidden, "{}", text(&r));
        // Over DTLS with its new credential, the update moves it to the secure session.
        let r = rig
            .send(
                request(RequestType::Post, &["rd", &id], &[]),
                ListenerKind::Dtls,
                psk("id-later"),
            )
            .await;
        assert_eq!(r.code, ResponseType::Changed, "{}", text(&r));
    }
}
