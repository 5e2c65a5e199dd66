//! `POST /v2/device-requests/{device-id}?async-id=…&retry=…&expiry-seconds=…` (issue 23):
//! Pelion Device Management's Connect API call that replaced
//! `/v2/endpoints/{device-id}/{path}`: one JSON body for every method, the async id chosen
//! by the client, and delivery terms. The answer always comes later on the key's
//! notification channel, as an `async-responses` entry whose `id` is the client's
//! `async-id` (the same entry as the resource routes' answers).
//!
//! Body (`application/json`; an absent Content-Type is taken as JSON):
//! `{"method": "GET|PUT|POST|DELETE", "uri": "/3/0/0", "accepted-content-type": "…",
//! "content-type": "…", "payload-b64": "…"}`; `method` and `uri` are required, the method
//! in any case; `accept` is taken as a spelling of `accepted-content-type` (Pelion's
//! earlier name); any other field is refused.
//!
//! Decisions (Pelion's documentation leaves them open or this daemon differs):
//! - Synchronous answers: 202 `{"async-response-id": <async-id>}` (Pelion answers 202
//!   with no body; the body is the resource routes' shape, which clients may ignore);
//!   400 `bad_request` for every malformed input (query parameter, body, method, uri,
//!   media type, base64), each naming what is wrong; 403 for a key restricted away from
//!   the endpoint or the resource, or a write without `resources:write`; 404 for a device
//!   that is not registered in the key's domain (this daemon knows devices only by their
//!   registrations, so it cannot queue for a device it has never seen; the resource
//!   routes answer 410 there, unchanged) or a resource the device does not list (as the
//!   resource routes); 409 for an `async-id` in use; 413 body over `requests.max_body`;
//!   429 queue full or quota used up; 503 the device cannot be reached now.
//! - `async-id`: required, 1 to [`MAX_ASYNC_ID_LEN`] bytes of UTF-8 (after
//!   percent-decoding), no control characters, not of the form of the ids the daemon
//!   makes for the resource routes' requests (`<number>#<UUID>`). It is
//!   unique per domain (the account) among the requests not yet answered: a second
//!   request with it is 409 until the first one's answer is on the channel, after which
//!   the id may be used again. On a cluster the check is made by the node that owns the
//!   device (every request for one device reaches its owner), so two requests with one id
//!   for devices owned by two nodes are both accepted.
//! - `retry`: 0 to [`MAX_RETRY`]; `expiry-seconds`: 1 to [`MAX_EXPIRY_S`] (Pelion's
//!   defaults apply when absent: 0 and 2 hours, or 2 and 3 days for a queue-mode device).
//!   A delivery attempt that fails (no answer within CoAP's retransmissions, the socket
//!   gone, a reset) puts the request back at the head of the device's queue while retries
//!   are left; it is sent again when the device next speaks (an update or a registration
//!   with this node). When the expiry passes first, the request is answered
//!   `{"status": 504, "error": "REQUEST_EXPIRED"}`, whether it was waiting or in flight;
//!   when retries run out, with the last attempt's failure (504 timeout, 502, 503).
//! - `GET` is always sent to the device (Pelion may answer from its cache; the resource
//!   routes' `cacheOnly=true` is the way to read the cache here). A `uri` with a query
//!   (Pelion's notification attributes, `?pmin=…`) is refused with 400 for now.
//! - A de-registration, an expiry of the registration or a full re-registration answers
//!   the device's queued device-requests 410 as it does the resource routes' requests.

use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;
use serde::Deserialize;

use super::endpoints::query_param;
use super::reply::{Reply, error};
use crate::auth::{Principal, Scope};
use crate::coap::content_format;
use crate::requests::{DeviceRequestOpts, Method, RequestError, Requests, Submit, Submitted};

/// The longest `async-id`, in bytes.
pub const MAX_ASYNC_ID_LEN: usize = 1024;
/// The most retries a request may ask for.
pub const MAX_RETRY: u32 = 24;
/// The longest `expiry-seconds`: 30 days.
pub const MAX_EXPIRY_S: u64 = 30 * 24 * 3600;

/// The JSON body, as Pelion's `DeviceRequest` model names its fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    method: String,
    uri: String,
    #[serde(rename = "accepted-content-type", alias = "accept", default)]
    accepted_content_type: Option<String>,
    #[serde(rename = "content-type", default)]
    content_type: Option<String>,
    #[serde(rename = "payload-b64", default)]
    payload_b64: Option<String>,
}

/// A parsed and checked device-request.
#[derive(Debug)]
pub struct Parsed {
    pub submit: Submit,
    pub opts: DeviceRequestOpts,
}

fn bad(msg: impl AsRef<str>) -> Reply {
    error(StatusCode::BAD_REQUEST, "bad_request", msg.as_ref())
}

/// The query parameters and the body of a device-request, checked; a 400 naming the
/// first thing wrong otherwise.
pub fn parse(parts: &Parts, body: &[u8]) -> Result<Parsed, Reply> {
    let async_id = match query_param(parts, "async-id")? {
        None => return Err(bad("the query parameter async-id is required")),
        Some(id) if id.is_empty() => return Err(bad("async-id must not be empty")),
        Some(id) if id.len() > MAX_ASYNC_ID_LEN => {
            return Err(bad(format!(
                "async-id is {} bytes long; at most {MAX_ASYNC_ID_LEN} are allowed",
                id.len()
            )));
        }
        Some(id) if id.chars().any(char::is_control) => {
            return Err(bad("async-id must not contain control characters"));
        }
        // The ids this daemon makes for the resource routes' requests are not compared
        // with the device-requests' (only those are tracked), so a client's id of that
        // form could name two answers on one channel (an outside review).
        Some(id) if crate::requests::is_made_async_id(&id) => {
            return Err(bad(format!(
                "async-id {id:?} has the form of the ids this daemon makes for the resource routes' requests (<number>#<UUID>); choose another"
            )));
        }
        Some(id) => id,
    };
    let retry = number_param(parts, "retry", u64::from(MAX_RETRY), 0)?.map(|n| n as u32);
    let expiry_s = number_param(parts, "expiry-seconds", MAX_EXPIRY_S, 1)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(
            "a JSON body is required: {\"method\": \"GET\", \"uri\": \"/3/0/0\"}",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    let b: Body = serde_json::from_value(value)
        .map_err(|e| bad(format!("the body is not a device request: {e}")))?;
    let method = match b.method.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        _ => {
            return Err(bad(format!(
                "method must be GET, PUT, POST or DELETE, not {:?}",
                b.method
            )));
        }
    };
    let path = uri_path(&b.uri)?;
    let payload = match b.payload_b64.as_deref() {
        None | Some("") => Vec::new(),
        Some(p) => base64::engine::general_purpose::STANDARD
            .decode(p.trim())
            .map_err(|e| bad(format!("payload-b64 is not valid base64: {e}")))?,
    };
    let content_format = match b.content_type.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(ct) => Some(content_format::from_media_type(ct).ok_or_else(|| {
            bad(format!(
                "content-type {ct:?} has no CoAP Content-Format; use text/plain, application/json, application/octet-stream, application/vnd.oma.lwm2m+tlv, application/senml+json, ..."
            ))
        })?),
    };
    let want = match b.accepted_content_type.as_deref() {
        None => crate::requests::Want::Any,
        Some(a) => super::resources::wanted(Some(a)).map_err(|_| {
            bad(format!(
                "accepted-content-type {a:?} names no media type a device can answer in; use application/json (a decoded value tree), text/plain, application/vnd.oma.lwm2m+tlv, application/senml+json, application/senml+cbor, application/vnd.oma.lwm2m+cbor or */*"
            ))
        })?,
    };
    let opts = DeviceRequestOpts {
        async_id,
        retry,
        expiry_s,
    };
    Ok(Parsed {
        submit: Submit {
            method: Some(method),
            path,
            payload,
            content_format,
            want,
            no_resp: false,
            cache_only: false,
            device_request: Some(opts.clone()),
        },
        opts,
    })
}

/// An optional integer query parameter within `min..=max`.
fn number_param(parts: &Parts, name: &str, max: u64, min: u64) -> Result<Option<u64>, Reply> {
    let Some(v) = query_param(parts, name)? else {
        return Ok(None);
    };
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(bad(format!(
            "{name} must be an integer from {min} to {max}, not {v:?}"
        ))),
    }
}

/// The resource path of `uri`: a leading slash, segments percent-decoded, no query.
fn uri_path(uri: &str) -> Result<String, Reply> {
    if !uri.starts_with('/') {
        return Err(bad(format!(
            "uri must be a resource path starting with '/', such as /3/0/0, not {uri:?}"
        )));
    }
    if uri.contains('?') {
        return Err(bad(
            "uri must not have a query: notification attributes (?pmin=…) are not supported by this daemon",
        ));
    }
    if uri.contains('#') {
        return Err(bad(
            "uri must not have a fragment ('#'); a '#' in a path segment is written %23",
        ));
    }
    let mut path = String::with_capacity(uri.len());
    for seg in uri.split('/').filter(|s| !s.is_empty()) {
        let seg = percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .map_err(|_| bad("uri is not valid UTF-8 after percent-decoding"))?;
        if seg.chars().any(char::is_control) {
            return Err(bad("uri must not contain control characters"));
        }
        path.push('/');
        path.push_str(&seg);
    }
    if path.is_empty() {
        return Err(bad("uri names no resource: give a path such as /3/0/0"));
    }
    Ok(path)
}

pub async fn handle(
    requests: &std::sync::Arc<Requests>,
    who: &Principal,
    parts: &Parts,
    body: Bytes,
    ep: &str,
) -> Reply {
    let Parsed { submit, .. } = match parse(parts, &body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    // The route lets in `resources:read` or `resources:write`; a read needs the first and
    // a write the second, as on the resource routes.
    let needed = if submit.method == Some(Method::Get) {
        Scope::ResourcesRead
    } else {
        Scope::ResourcesWrite
    };
    if !who.allows(needed) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("this access key lacks the scope {}", needed.as_str()),
        );
    }
    if !who.may_access(ep, Some(&submit.path)) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this access key may not access that endpoint or resource",
        );
    }
    match requests.submit(who, ep, submit).await {
        Ok(Submitted::Accepted(id)) => crate::resources::accepted(&id),
        Ok(other) => {
            tracing::error!("unexpected answer to a device-request: {other:?}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected answer of the request layer",
            )
        }
        Err(RequestError::Gone) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("device {ep:?} is not registered"),
        ),
        Err(e) => super::resources::refusal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(query: &str) -> Parts {
        http::Request::post(format!("/v2/device-requests/dev-1{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn parsed(query: &str, body: &str) -> Result<Parsed, (StatusCode, String)> {
        parse(&parts(query), body.as_bytes()).map_err(|r| (r.status(), r.body_text()))
    }

    #[test]
    fn a_full_body_is_read() {
        let p = parsed(
            "?async-id=a%20b&retry=2&expiry-seconds=7200",
            r#"{"method":"put","uri":"/5/0/1","accepted-content-type":"text/plain","content-type":"text/plain","payload-b64":"dmFsdWUxCg=="}"#,
        )
        .unwrap();
        assert_eq!(
            p.opts,
            DeviceRequestOpts {
                async_id: "a b".into(),
                retry: Some(2),
                expiry_s: Some(7200),
            }
        );
        assert_eq!(p.submit.method, Some(Method::Put));
        assert_eq!(p.submit.path, "/5/0/1");
        assert_eq!(p.submit.payload, b"value1\n");
        assert_eq!(p.submit.content_format, Some(0));
        assert_eq!(p.submit.want, crate::requests::Want::Format(0));
        assert_eq!(p.submit.device_request, Some(p.opts.clone()));
        // The minimal body; `accept` is the older spelling of accepted-content-type.
        let p = parsed("?async-id=x", r#"{"method":"GET","uri":"/3/0/0"}"#).unwrap();
        assert_eq!(
            (p.opts.retry, p.opts.expiry_s, p.submit.payload.len()),
            (None, None, 0)
        );
        let p = parsed(
            "?async-id=x",
            r#"{"method":"GET","uri":"/3/0","accept":"application/vnd.oma.lwm2m+tlv"}"#,
        )
        .unwrap();
        assert_eq!(p.submit.want, crate::requests::Want::Format(11542));
        let p = parsed(
            "?async-id=x",
            r#"{"method":"GET","uri":"/a%2Fb/c","accepted-content-type":"application/json"}"#,
        )
        .unwrap();
        assert_eq!(
            (p.submit.path.as_str(), p.submit.want),
            ("/a/b/c", crate::requests::Want::Json)
        );
    }

    /// Every bad input is a 400 whose message names what is wrong.
    #[test]
    fn every_bad_input_is_a_400_naming_it() {
        let ok = r#"{"method":"GET","uri":"/3/0/0"}"#;
        let long = format!("?async-id={}", "x".repeat(MAX_ASYNC_ID_LEN + 1));
        let table: &[(&str, &str, &str)] = &[
            ("", ok, "async-id is required"),
            ("?async-id=", ok, "async-id must not be empty"),
            (&long, ok, "at most 1024"),
            ("?async-id=a%0Ab", ok, "control characters"),
            (
                "?async-id=%FF%FE",
                ok,
                "async-id is not valid UTF-8 after percent-decoding",
            ),
            (
                "?async-id=12%230f0f9a29-0000-4000-8000-000000000000",
                ok,
                "has the form of the ids this daemon makes",
            ),
            ("?async-id=x&retry=%FF", ok, "retry is not valid UTF-8"),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"/3/0/0#frag"}"#,
                "uri must not have a fragment",
            ),
            (
                "?async-id=x&retry=-1",
                ok,
                "retry must be an integer from 0 to 24",
            ),
            ("?async-id=x&retry=25", ok, "retry must be"),
            ("?async-id=x&retry=two", ok, "retry must be"),
            (
                "?async-id=x&expiry-seconds=0",
                ok,
                "expiry-seconds must be an integer from 1",
            ),
            (
                "?async-id=x&expiry-seconds=2592001",
                ok,
                "expiry-seconds must be",
            ),
            ("?async-id=x", "", "a JSON body is required"),
            ("?async-id=x", "{", "not valid JSON"),
            (
                "?async-id=x",
                "[\"GET\",\"/3/0/0\"]",
                "must be a JSON object",
            ),
            (
                "?async-id=x",
                r#"{"uri":"/3/0/0"}"#,
                "missing field `method`",
            ),
            ("?async-id=x", r#"{"method":"GET"}"#, "missing field `uri`"),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"/3/0/0","x":1}"#,
                "unknown field `x`",
            ),
            (
                "?async-id=x",
                r#"{"method":1,"uri":"/3/0/0"}"#,
                "not a device request",
            ),
            (
                "?async-id=x",
                r#"{"method":"PATCH","uri":"/3/0/0"}"#,
                "method must be GET, PUT, POST or DELETE",
            ),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"3/0/0"}"#,
                "starting with '/'",
            ),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"/"}"#,
                "names no resource",
            ),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"/5/0/1?pmin=10"}"#,
                "must not have a query",
            ),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"/%FF"}"#,
                "not valid UTF-8",
            ),
            (
                "?async-id=x",
                r#"{"method":"PUT","uri":"/1/0/1","payload-b64":"not base64!"}"#,
                "payload-b64 is not valid base64",
            ),
            (
                "?async-id=x",
                r#"{"method":"PUT","uri":"/1/0/1","content-type":"text/html"}"#,
                "content-type \"text/html\" has no CoAP Content-Format",
            ),
            (
                "?async-id=x",
                r#"{"method":"GET","uri":"/1/0/1","accepted-content-type":"text/html"}"#,
                "accepted-content-type \"text/html\"",
            ),
        ];
        for (query, body, says) in table {
            match parsed(query, body) {
                Err((status, text)) => {
                    assert_eq!(status, StatusCode::BAD_REQUEST, "{query} {body}: {text}");
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["type"], "bad_request", "{text}");
                    assert!(
                        v["message"].as_str().unwrap().contains(says),
                        "{query} {body}: {text} should say {says:?}"
                    );
                }
                Ok(p) => panic!("{query} {body} accepted: {p:?}"),
            }
        }
    }
}
