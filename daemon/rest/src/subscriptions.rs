//! Subscriptions (seed 000, "Subscriptions"):
//! - `PUT /subscriptions/{ep}/{path}`: 200 already observed, 202 with an async-response id
//!   (the observe's first answer), 404 endpoint or resource not found, 412 resource not
//!   observable, 429/503 as for other requests.
//! - `GET /subscriptions/{ep}/{path}`: 200 `text/uri-list` or 404; `DELETE`: 204 or 404.
//! - `GET /subscriptions/{ep}`: 200 `text/uri-list` of the key's subscriptions on the
//!   endpoint, 404 when there are none; `DELETE`: 204, 404 when the endpoint is not
//!   registered and the key has no subscriptions there.
//! - Both `GET`s answer 406 to an `Accept` that takes no `text/uri-list` (the seed's only
//!   content type for them), before looking anything up, as `GET /endpoints` does.
//! - `PUT /subscriptions`: pre-subscriptions (204, 400 malformed); `GET`: them (`[]` when
//!   none); `DELETE /subscriptions` and `DELETE /subscriptions/`: all the key's
//!   subscriptions (204).

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, StatusCode};
use serde_json::json;

use super::reply::{Reply, error};
use crate::auth::Principal;
use crate::registry::Directory;
use crate::requests::RequestError;
use connectord_core::subscriptions::{SubError, Subscribed, Subscriptions, presub};

const URI_LIST: &str = "text/uri-list";

/// 406 unless the request's `Accept` takes `text/uri-list` (by q-value; absent, empty or
/// not readable as text: anything is taken, as for `GET /endpoints`).
fn uri_list_accepted(parts: &Parts) -> Result<(), Reply> {
    use super::endpoints::{accept_of, choose};
    choose(accept_of(parts), (), |media| {
        matches!(media, URI_LIST | "text/*" | "*/*").then_some(())
    })
    .ok_or_else(|| {
        error(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this resource is available as text/uri-list",
        )
    })
}

fn storage_failure(e: impl Into<SubError>) -> Reply {
    match e.into() {
        SubError::Store(e) => super::reply::store_failure(&e, "subscriptions"),
        e => {
            tracing::error!("subscriptions: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "storage failure",
            )
        }
    }
}

/// `PUT|GET|DELETE /subscriptions/{ep}/{path}`.
pub async fn resource(
    subs: &Subscriptions,
    who: &Principal,
    parts: &Parts,
    ep: &str,
    path: &str,
) -> Reply {
    match parts.method {
        Method::PUT => match subs.subscribe(who, ep, path).await {
            Ok(Subscribed::Active) => Reply::empty(StatusCode::OK),
            Ok(Subscribed::Pending(id)) => {
                Reply::json(StatusCode::ACCEPTED, &json!({"async-response-id": id}))
            }
            Err(SubError::NotFound(m)) => error(StatusCode::NOT_FOUND, "not_found", &m),
            Err(e @ SubError::NotObservable) => error(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                &e.to_string(),
            ),
            Err(SubError::Request(RequestError::TooMany(n))) => error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                &format!("the endpoint already has {n} requests waiting"),
            ),
            Err(SubError::Request(RequestError::OverQuota(m))) => {
                error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", &m)
            }
            Err(SubError::Request(RequestError::Unavailable(m))) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &m)
            }
            Err(SubError::Request(RequestError::Gone | RequestError::NotFound(_))) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "endpoint or resource not found",
            ),
            // Forwarded to the owner node (issue 22): its refusals as a request's.
            Err(SubError::Request(
                e @ (RequestError::Elsewhere { .. }
                | RequestError::Undecodable(_)
                | RequestError::BadPath(_)),
            )) => super::resources::refusal(e),
            Err(e) => storage_failure(e),
        },
        Method::GET => {
            if let Err(r) = uri_list_accepted(parts) {
                return r;
            }
            if subs.is_subscribed(who, ep, path) {
                Reply::with_type(StatusCode::OK, URI_LIST, uri_of(ep, path))
            } else {
                error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "resource is not subscribed",
                )
            }
        }
        _ => match subs.unsubscribe(who, ep, path).await {
            Ok(true) => Reply::empty(StatusCode::NO_CONTENT),
            Ok(false) => error(StatusCode::NOT_FOUND, "not_found", "no such subscription"),
            Err(e) => storage_failure(e),
        },
    }
}

/// A subscription's line of a `text/uri-list` (lines end in CRLF, RFC 2483): the
/// endpoint's name percent-encoded as one path segment, as in the endpoints' links
/// ([`crate::endpoints::NAME_IN_LINK`]), so that a name with a space or `%` is a URI.
fn uri_of(ep: &str, path: &str) -> String {
    format!(
        "/subscriptions/{}{path}",
        percent_encoding::utf8_percent_encode(ep, crate::endpoints::NAME_IN_LINK)
    )
}

/// `GET|DELETE /subscriptions/{ep}`.
pub async fn endpoint(
    subs: &Subscriptions,
    directory: &Directory,
    who: &Principal,
    parts: &Parts,
    ep: &str,
) -> Reply {
    if parts.method == Method::GET {
        if let Err(r) = uri_list_accepted(parts) {
            return r;
        }
        let paths = subs.list(who, ep);
        if paths.is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "endpoint not found or no subscriptions for it",
            );
        }
        let body = paths
            .iter()
            .map(|p| uri_of(ep, p))
            .collect::<Vec<_>>()
            .join("\r\n");
        return Reply::with_type(StatusCode::OK, URI_LIST, body);
    }
    match subs.unsubscribe_endpoint(who, ep).await {
        Ok(removed) => {
            if removed || directory.get(&who.domain, ep).is_some() {
                Reply::empty(StatusCode::NO_CONTENT)
            } else {
                error(StatusCode::NOT_FOUND, "not_found", "endpoint not found")
            }
        }
        Err(e) => storage_failure(e),
    }
}

/// `PUT|GET|DELETE /subscriptions`.
pub async fn all(subs: &Arc<Subscriptions>, who: &Principal, parts: &Parts, body: Bytes) -> Reply {
    match parts.method {
        Method::GET => Reply::json(StatusCode::OK, &subs.presubscriptions(&who.key_id)),
        Method::PUT => {
            let rules = match presub::parse(&body) {
                Ok(r) => r,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.0),
            };
            match subs.set_presubscriptions(who, rules).await {
                Ok(()) => Reply::empty(StatusCode::NO_CONTENT),
                Err(e) => storage_failure(e),
            }
        }
        _ => match subs.unsubscribe_all(&who.key_id).await {
            Ok(()) => Reply::empty(StatusCode::NO_CONTENT),
            Err(e) => storage_failure(e),
        },
    }
}
