//! The LwM2M registration interface over CoAP: `POST /rd`, `POST /rd/{id}`,
//! `DELETE /rd/{id}`. Turns CoAP requests into [`Registry`] calls and their outcome into
//! CoAP responses with a diagnostic payload for every refusal.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use coap_lite::{CoapOption, ContentFormat, MessageClass, RequestType, ResponseType};

use super::{RegisterParams, Registry, RegistryError, RegistryEvent, UpdateParams};
use crate::coap::RequestHandler;
use crate::coap::message::{self, Handled, Inbound, Response};
use crate::coap_route::from_coap;

/// Answers the registration interface for a [`Registry`].
pub struct Lwm2mHandler {
    registry: Arc<Registry>,
}

impl Lwm2mHandler {
    pub fn new(registry: Arc<Registry>) -> Lwm2mHandler {
        Lwm2mHandler { registry }
    }
}

impl RequestHandler for Lwm2mHandler {
    fn handle(&self, req: Inbound) -> Pin<Box<dyn Future<Output = Handled> + Send>> {
        let registry = Arc::clone(&self.registry);
        Box::pin(async move {
            let (response, event) = handle(&registry, req).await;
            Handled {
                response: Some(response),
                after_send: event.map(|ev| -> Box<dyn FnOnce() + Send> {
                    Box::new(move || registry.after_reply(&ev))
                }),
            }
        })
    }
}

/// The response, and the registry event whose after-reply work is due once it is sent.
async fn handle(registry: &Registry, req: Inbound) -> (Response, Option<RegistryEvent>) {
    let MessageClass::Request(method) = req.packet.header.code else {
        return (
            Response::diagnostic(ResponseType::BadRequest, "not a request"),
            None,
        );
    };
    let path = message::uri_path(&req.packet);
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let response = match (method, path.as_slice()) {
        (RequestType::Post, ["rd"]) => return register(registry, &req).await,
        (RequestType::Post, ["rd", id]) => return update(registry, id, &req).await,
        (RequestType::Delete, ["rd", id]) => match registry.deregister(id).await {
            Ok(_) => Response::new(ResponseType::Deleted),
            Err(e) => refusal(e),
        },
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

fn parse_lifetime(v: Option<&str>) -> Result<u32, Response> {
    v.and_then(|v| v.parse::<u32>().ok()).ok_or_else(|| {
        Response::diagnostic(
            ResponseType::BadRequest,
            "lt must be a whole number of seconds",
        )
    })
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

fn register_params(req: &Inbound) -> Result<RegisterParams, Response> {
    let mut p = RegisterParams::default();
    let mut name = None;
    for item in message::uri_query(&req.packet) {
        match split_query(&item) {
            ("ep", v) => name = Some(text_param("ep", v)?),
            ("lt", v) => p.lifetime_s = Some(parse_lifetime(v)?),
            ("lwm2m", v) => p.lwm2m = Some(text_param("lwm2m", v)?),
            ("b", v) => p.binding = Some(binding(v)?),
            ("et", v) => p.ept = Some(text_param("et", v)?),
            ("d", v) => p.domain = Some(text_param("d", v)?),
            ("Q", None) => p.queue_flag = true,
            // sms, pid, apn and unknown parameters are accepted and ignored.
            _ => {}
        }
    }
    p.name = name.ok_or_else(|| {
        Response::diagnostic(ResponseType::BadRequest, "ep (endpoint name) is required")
    })?;
    p.links = body(req)?.unwrap_or_default();
    Ok(p)
}

async fn register(registry: &Registry, req: &Inbound) -> (Response, Option<RegistryEvent>) {
    let params = match register_params(req) {
        Ok(p) => p,
        Err(r) => return (r, None),
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
