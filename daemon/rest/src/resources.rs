//! `GET|PUT|POST|DELETE /endpoints/{endpoint-name}/{resource-path}` (seed 000,
//! "Resources"): read, write, execute and delete, answered with an async-response id.
//!
//! Synchronous answers: 202 with `{"async-response-id"}`; 204 for `noResp=true`; 200 with
//! the cached value (its own content type) for `cacheOnly=true`, 205 when nothing fresh is
//! cached; 404 resource not listed by the device; 409 `noResp` on a queue-mode endpoint;
//! 410 endpoint not registered; 412 a body that is not what its Content-Type says, or a
//! JSON value tree the device's object model cannot take; 413 a
//! body over `requests.max_body`; 415 a Content-Type with no CoAP Content-Format;
//! 429 the endpoint's queue is full; 503 the endpoint cannot be reached now. The device's
//! own answer (or 502/504) arrives later as an `async-responses` event.

use bytes::Bytes;
use http::request::Parts;
use http::{Method as HttpMethod, StatusCode};

use super::endpoints::{best_by_q, query_param};
use super::reply::{Reply, error};
use crate::auth::Principal;
use crate::coap::content_format;
use crate::requests::{Method, RequestError, Requests, Submit, Submitted, Want};

/// A boolean query parameter: absent is false; anything but `true`/`false` is an error.
pub fn bool_param(parts: &Parts, name: &str) -> Result<bool, Reply> {
    match query_param(parts, name)?.as_deref() {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("{name} must be true or false, not {v:?}"),
        )),
    }
}

/// The CoAP Content-Format of the request body, checked against the body.
fn body_format(parts: &Parts, body: &[u8]) -> Result<Option<u16>, Reply> {
    let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let ct = ct.to_str().unwrap_or("");
    let Some(cf) = content_format::from_media_type(ct) else {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            &format!(
                "Content-Type {ct:?} has no CoAP Content-Format; use text/plain, application/json, application/octet-stream, application/vnd.oma.lwm2m+tlv, ..."
            ),
        ));
    };
    let valid = match cf {
        0 | 40 => std::str::from_utf8(body).is_ok(),
        50 | 110 => body.is_empty() || serde_json::from_slice::<serde_json::Value>(body).is_ok(),
        _ => true,
    };
    if !valid {
        return Err(error(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            &format!("the request payload is not valid {ct}"),
        ));
    }
    Ok(Some(cf))
}

/// The representation a read asks for with `Accept`, by q-value (the first on a tie):
/// `application/json` is the decoded value tree, another media type with a CoAP
/// Content-Format is asked of the device as it is, `*/*` (or no header) leaves the choice
/// to the daemon and the device. A header naming none of these is 406.
pub fn wanted(accept: Option<&str>) -> Result<Want, Reply> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Want::Any);
    };
    best_by_q(accept, |media| match media {
        "*/*" | "application/*" => Some(Want::Any),
        "application/json" => Some(Want::Json),
        m => content_format::from_media_type(m).map(Want::Format),
    })
    .ok_or_else(|| {
        error(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "Accept names no media type a device can answer in; use application/json (a decoded value tree), text/plain, application/octet-stream, application/vnd.oma.lwm2m+tlv, application/senml+json, application/senml+cbor, application/vnd.oma.lwm2m+cbor, application/cbor or */*",
        )
    })
}

pub async fn handle(
    requests: &std::sync::Arc<Requests>,
    who: &Principal,
    parts: &Parts,
    body: Bytes,
    ep: &str,
    path: &str,
) -> Reply {
    let method = match parts.method {
        HttpMethod::GET => Method::Get,
        HttpMethod::PUT => Method::Put,
        HttpMethod::POST => Method::Post,
        _ => Method::Delete,
    };
    let no_resp = match bool_param(parts, "noResp") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let cache_only = match bool_param(parts, "cacheOnly") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let content_format = match body_format(parts, &body) {
        Ok(cf) => cf,
        Err(r) => return r,
    };
    let want = if method == Method::Get {
        let accept = parts
            .headers
            .get(http::header::ACCEPT)
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        match wanted(accept) {
            Ok(w) => w,
            Err(r) => return r,
        }
    } else {
        Want::Any
    };
    let submit = Submit {
        method: Some(method),
        path: path.to_string(),
        payload: body.to_vec(),
        content_format,
        want,
        no_resp,
        cache_only,
        device_request: None,
    };
    match requests.submit(who, ep, submit).await {
        Ok(Submitted::Accepted(id)) => accepted(&id),
        Ok(Submitted::Sent) => Reply::empty(StatusCode::NO_CONTENT),
        Ok(Submitted::Cached {
            payload,
            content_format,
        }) => {
            let ct = content_format
                .and_then(content_format::media_type)
                .unwrap_or("application/octet-stream");
            Reply::with_type(StatusCode::OK, ct, payload)
        }
        // Seed 000 ("Resources"): "412 Request payload was not valid", also for a JSON
        // value tree the object model cannot encode for the device (before: 400).
        Err(RequestError::BadBody(m)) => {
            error(StatusCode::PRECONDITION_FAILED, "precondition_failed", &m)
        }
        Err(e) => refusal(e),
    }
}

/// The reply to a request the request layer refused (also a subscription's).
pub(crate) fn refusal(e: RequestError) -> Reply {
    let msg = e.to_string();
    match e {
        RequestError::Gone => error(StatusCode::GONE, "gone", &msg),
        RequestError::NotFound(_) => error(StatusCode::NOT_FOUND, "not_found", &msg),
        RequestError::Conflict(_) => error(StatusCode::CONFLICT, "conflict", &msg),
        RequestError::TooMany(_) | RequestError::OverQuota(_) => {
            error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", &msg)
        }
        RequestError::Unavailable(_) | RequestError::Elsewhere { .. } => {
            error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &msg)
        }
        RequestError::Undecodable(_) => error(StatusCode::BAD_GATEWAY, "bad_gateway", &msg),
        RequestError::BadBody(_) | RequestError::BadPath(_) => {
            error(StatusCode::BAD_REQUEST, "bad_request", &msg)
        }
        // 205 Reset Content carries no body (RFC 9110 §15.3.6).
        RequestError::NoCache => Reply::empty(StatusCode::RESET_CONTENT),
        RequestError::Store(e) => super::reply::store_failure(&e, "request not stored"),
    }
}

/// 202 with `{"async-response-id": id}`: a request accepted for its device (the resource
/// routes and `POST /device-requests`).
/// Written by hand, byte for byte what serde wrote (`tests::SerdeAccepted`): one per
/// proxied read, where serde's string writer was about 700 instructions (issue 24).
pub(crate) fn accepted(id: &str) -> Reply {
    let mut body = String::with_capacity(26 + id.len());
    body.push_str("{\"async-response-id\":");
    super::wire::json_string(&mut body, id);
    body.push('}');
    Reply::with_type(StatusCode::ACCEPTED, "application/json", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 202's body as serde wrote it before issue 24.
    #[derive(serde::Serialize)]
    struct SerdeAccepted<'a> {
        #[serde(rename = "async-response-id")]
        id: &'a str,
    }

    #[test]
    fn the_202_body_is_what_serde_wrote() {
        for id in [
            "1234#0b1e3d6a-1c2b-4f5e-8a9b-0c1d2e3f4a5b",
            "",
            "client's \"id\" \\ \u{1} \n é \u{2028}",
        ] {
            let r = accepted(id);
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            let want = serde_json::to_string(&SerdeAccepted { id }).unwrap();
            assert_eq!(r.body_text(), want, "{id:?}");
            let r = r.into_response();
            assert_eq!(r.headers()[http::header::CONTENT_TYPE], "application/json");
        }
    }

    #[test]
    fn accept_picks_the_representation_of_a_read() {
        let table: &[(Option<&str>, Option<Want>)] = &[
            (None, Some(Want::Any)),
            (Some(" "), Some(Want::Any)),
            (Some("*/*"), Some(Want::Any)),
            (Some("application/json"), Some(Want::Json)),
            (Some("text/plain"), Some(Want::Format(0))),
            (
                Some("application/vnd.oma.lwm2m+tlv"),
                Some(Want::Format(11542)),
            ),
            (Some("application/senml+cbor"), Some(Want::Format(112))),
            (Some("application/cbor"), Some(Want::Format(60))),
            (Some("text/plain;q=0.5, application/json"), Some(Want::Json)),
            (Some("text/html, text/plain"), Some(Want::Format(0))),
            (Some("application/json;q=0, */*;q=0.1"), Some(Want::Any)),
            (Some("text/html"), None),
            (Some("application/json;q=0"), None),
        ];
        for (accept, want) in table {
            match (wanted(*accept), want) {
                (Ok(got), Some(w)) => assert_eq!(got, *w, "{accept:?}"),
                (Err(r), None) => assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE),
                (got, want) => panic!(
                    "{accept:?}: {:?} against {want:?}",
                    got.map_err(|r| r.status())
                ),
            }
        }
    }
}
