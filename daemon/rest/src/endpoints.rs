//! `GET /endpoints` and `GET /endpoints/{endpoint-name}` (seed 000, "Endpoints").
//!
//! Both answer JSON or `application/link-format` by the `Accept` header, and come from the
//! directory without waking the device. Field shapes follow the seed's examples: the
//! endpoint list's `q` is a JSON boolean; a resource's `obs` is the string `"true"` or
//! `"false"`; `rt` and `type` are left out when the device did not give them.

use http::StatusCode;
use http::request::Parts;
use serde::Serialize;

use super::reply::{Reply, error};
use crate::auth::Principal;
use crate::registry::{Directory, Registry, RegistryError, Resource};

const JSON: &str = "application/json";
const LINK_FORMAT: &str = "application/link-format";

/// The representation a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    LinkFormat,
}

/// Picks JSON or link-format from an `Accept` header by q-value; JSON when absent or on a
/// tie. `None` when the client accepts neither (406).
pub fn negotiate(accept: Option<&str>) -> Option<Format> {
    choose(accept, Format::Json, |media| match media {
        JSON | "application/*" | "*/*" => Some(Format::Json),
        LINK_FORMAT => Some(Format::LinkFormat),
        _ => None,
    })
}

/// `default` when `accept` is absent or blank, else what [`best_by_q`] picks with `pick`
/// (`None`: the client accepts nothing offered, 406).
pub fn choose<T>(
    accept: Option<&str>,
    default: T,
    pick: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    match accept.filter(|a| !a.trim().is_empty()) {
        None => Some(default),
        Some(accept) => best_by_q(accept, pick),
    }
}

/// The request's `Accept` header; `None` when absent or not readable as text.
pub fn accept_of(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
}

/// The choice `pick` makes of the media ranges of an `Accept` header (lower-cased, without
/// parameters) with the highest q-value, the first on a tie; ranges with q=0 and ranges
/// `pick` does not take are skipped. `None` when nothing is left.
pub fn best_by_q<T>(accept: &str, mut pick: impl FnMut(&str) -> Option<T>) -> Option<T> {
    let mut best: Option<(f32, T)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|v| v.trim().parse::<f32>().ok())
            })
            .next()
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        let Some(choice) = pick(&media) else {
            continue;
        };
        if best.as_ref().is_none_or(|(bq, _)| q > *bq) {
            best = Some((q, choice));
        }
    }
    best.map(|(_, c)| c)
}

fn format_of(parts: &Parts) -> Result<Format, Reply> {
    negotiate(accept_of(parts)).ok_or_else(|| {
        error(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this resource is available as application/json or application/link-format",
        )
    })
}

/// The value of query parameter `name`, percent-decoded; 400 when the decoded bytes are
/// not UTF-8 (before, they were replaced by U+FFFD without a word, so that two different
/// device-request async-ids became one: an outside review).
pub fn query_param(parts: &Parts, name: &str) -> Result<Option<String>, Reply> {
    let Some(q) = parts.uri.query() else {
        return Ok(None);
    };
    let Some(v) = q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    }) else {
        return Ok(None);
    };
    let v = v.replace('+', " ");
    match percent_encoding::percent_decode_str(&v).decode_utf8() {
        Ok(v) => Ok(Some(v.into_owned())),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("the query parameter {name} is not valid UTF-8 after percent-decoding"),
        )),
    }
}

#[derive(Serialize)]
struct EndpointJson<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    ept: &'a str,
    status: &'static str,
    q: bool,
    /// Extension: the LwM2M version the device registered with (`lwm2m=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    lwm2m: Option<&'a str>,
    /// Extension: the device's preferred content format (`ct=` on its root link).
    #[serde(skip_serializing_if = "Option::is_none")]
    ct: Option<String>,
}

/// What an endpoint name keeps as it is in a link's `<URI-Reference>`: RFC 3986's
/// unreserved characters and the sub-delimiters other than `,` and `;` (and `:` `@`).
///
/// Decision: a name is one path segment of the link's URI, percent-encoded (UTF-8) for
/// everything else, `%` included, so that a client that decodes the segment gets the
/// name back; `,` and `;` are encoded too although RFC 3986 allows them in a segment,
/// because they separate links and parameters in link-format and clients split on them.
/// Names are checked only for control characters and `/ ? #` at registration, so `<`,
/// `>`, `"`, spaces and `%41` were written raw: invalid link-format, or another name once
/// decoded.
pub(crate) const NAME_IN_LINK: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// Quotes a link-format attribute value.
fn quoted(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `GET /endpoints[?type=]`.
pub fn list(directory: &Directory, who: &Principal, parts: &Parts) -> Reply {
    let format = match format_of(parts) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let ept = match query_param(parts, "type") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut eps = directory.list(&who.domain, ept.as_deref());
    eps.retain(|e| who.may_access(&e.reg.name, None));
    match format {
        Format::Json => {
            let body: Vec<EndpointJson> = eps
                .iter()
                .map(|e| EndpointJson {
                    name: &e.reg.name,
                    ept: e.reg.ept.as_deref().unwrap_or(""),
                    status: "ACTIVE",
                    q: e.reg.queue,
                    lwm2m: e.reg.lwm2m.as_deref(),
                    ct: e
                        .formats()
                        .first()
                        .map(|ct| crate::coap::content_format::describe(*ct)),
                })
                .collect();
            Reply::json(StatusCode::OK, &body)
        }
        Format::LinkFormat => {
            let body = eps
                .iter()
                .map(|e| {
                    format!(
                        "<{}>;type={};status=\"ACTIVE\";q=\"{}\"",
                        percent_encoding::utf8_percent_encode(&e.reg.name, NAME_IN_LINK),
                        quoted(e.reg.ept.as_deref().unwrap_or("")),
                        e.reg.queue
                    )
                })
                .collect::<Vec<_>>()
                .join(",");
            Reply::with_type(StatusCode::OK, LINK_FORMAT, body)
        }
    }
}

#[derive(Serialize)]
struct ResourceJson<'a> {
    uri: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rt: Option<&'a str>,
    obs: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    ct: Option<&'a str>,
    /// Extension: the object version (`ver=`) the link carries.
    #[serde(skip_serializing_if = "Option::is_none")]
    ver: Option<&'a str>,
}

fn resources_json(resources: &[Resource]) -> Vec<ResourceJson<'_>> {
    resources
        .iter()
        .map(|r| ResourceJson {
            uri: &r.path,
            rt: r.rt.as_deref(),
            obs: if r.obs { "true" } else { "false" },
            ct: r.ct.as_deref(),
            ver: r.ver.as_deref(),
        })
        .collect()
}

/// `GET /endpoints/{endpoint-name}`: 404 when no such endpoint is registered in the
/// caller's domain. A restricted key gets only the resources it may access.
pub fn get(directory: &Directory, who: &Principal, parts: &Parts, name: &str) -> Reply {
    let format = match format_of(parts) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(ep) = directory.get(&who.domain, name) else {
        return error(StatusCode::NOT_FOUND, "not_found", "endpoint not found");
    };
    // Only the resources a restricted key may see.
    let mut resources = ep.resources();
    resources.retain(|r| who.may_access(name, Some(&r.path)));
    match format {
        Format::Json => Reply::json(StatusCode::OK, &resources_json(&resources)),
        Format::LinkFormat => {
            let body = resources
                .iter()
                .map(|r| {
                    let mut s = format!("<{}>", r.path);
                    if let Some(rt) = &r.rt {
                        s.push_str(&format!(";rt={}", quoted(rt)));
                    }
                    if r.obs {
                        s.push_str(";obs");
                    }
                    if let Some(ct) = &r.ct {
                        s.push_str(&format!(";type={}", quoted(ct)));
                    }
                    if let Some(ver) = &r.ver {
                        s.push_str(&format!(";ver={}", quoted(ver)));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(",");
            Reply::with_type(StatusCode::OK, LINK_FORMAT, body)
        }
    }
}

/// `DELETE /endpoints/{endpoint-name}` (an extension the official SDKs call): removes the
/// registration as a de-registration would (a `de-registrations` event; queued and
/// in-flight requests end with 410); the device's next update is answered 4.04, so it
/// registers again. 200 with no body, or 404 when no such endpoint is registered in the
/// caller's domain. Decision: 200 and not 204, because the official Python SDK's
/// `deleteEndpoint` takes only 200 (done) or 202 (async) as success; the Node SDK takes
/// any status below 400.
pub async fn remove(registry: &Registry, who: &Principal, name: &str) -> Reply {
    match registry.remove_by_name(&who.domain, name).await {
        Ok(_) => Reply::empty(StatusCode::OK),
        Err(RegistryError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, "not_found", "endpoint not found")
        }
        Err(RegistryError::Store(e)) if e.is_unavailable() => {
            super::reply::store_failure(&e, "registration not removed")
        }
        Err(e) => {
            tracing::error!(ep = name, "registration not removed: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                "the registration could not be removed",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let table: &[(Option<&str>, Option<Format>)] = &[
            (None, Some(Format::Json)),
            (Some(""), Some(Format::Json)),
            (Some("application/json"), Some(Format::Json)),
            (Some("*/*"), Some(Format::Json)),
            (Some("application/link-format"), Some(Format::LinkFormat)),
            (
                Some("application/json;q=0.5, application/link-format"),
                Some(Format::LinkFormat),
            ),
            (
                Some("application/link-format;q=0.2, */*;q=0.5"),
                Some(Format::Json),
            ),
            (Some("text/html"), None),
            (Some("application/json;q=0"), None),
        ];
        for (accept, want) in table {
            assert_eq!(negotiate(*accept), *want, "{accept:?}");
        }
    }
}
