//! Notification channels (seed 000, "Notifications"): long-poll
//! `GET /notification/pull` and the callback `PUT|GET|DELETE /notification/callback`.
//!
//! A key that has a callback cannot long-poll: `GET /notification/pull` is then 409.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, StatusCode};
use serde::Deserialize;

use super::reply::{Reply, error, json_object_body};
use super::resources::bool_param;
use crate::auth::Principal;
use crate::events::hub::{CallbackError, Pulled};
use crate::events::{CallbackTarget, Hub};

/// `GET /notification/pull[?noWait=true]`: 200 with a batch, or 204 after up to
/// `notifications.long_poll_s`. `gone` resolves when the client goes away: a poll that is
/// waiting then stops without taking events. The answer carries the batch's
/// [`Ticket`](crate::events::hub::Ticket), which the response body turns into an
/// acknowledgement-pending answer once it is handed to the connection.
pub async fn pull(
    hub: &Arc<Hub>,
    who: &Principal,
    parts: &Parts,
    hold: Duration,
    gone: impl Future<Output = ()>,
) -> Reply {
    let no_wait = match bool_param(parts, "noWait") {
        Ok(v) => v,
        Err(r) => return r,
    };
    match hub.pull(who, (!no_wait).then_some(hold), gone).await {
        Ok(Pulled::Batch(b)) => {
            let message = super::wire::message(&b.events);
            Reply::with_type(StatusCode::OK, "application/json", message.into_bytes())
                .holding(b.ticket)
        }
        Ok(Pulled::Empty) => Reply::empty(StatusCode::NO_CONTENT),
        Ok(Pulled::Gone) => {
            tracing::debug!(key = %who.key_id, "long-poll: the client went away");
            Reply::empty(StatusCode::NO_CONTENT)
        }
        Ok(Pulled::CallbackActive) => error(
            StatusCode::CONFLICT,
            "conflict",
            "this access key delivers notifications to a callback URL; delete it to use long-poll",
        ),
        Ok(Pulled::WebsocketActive) => error(
            StatusCode::CONFLICT,
            "conflict",
            "this access key delivers notifications to a WebSocket channel; delete it (DELETE /v2/notification/websocket) to use long-poll",
        ),
        // Only a socket's pull gets it.
        Ok(Pulled::NoWebsocket) => Reply::empty(StatusCode::NO_CONTENT),
        Err(e) => super::reply::store_failure(&e, "long-poll"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackBody {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// `PUT|GET|DELETE /notification/callback`.
pub async fn callback(hub: &Arc<Hub>, who: &Principal, parts: &Parts, body: Bytes) -> Reply {
    match parts.method {
        Method::PUT => {
            let parsed: CallbackBody = match json_object_body(
                &body,
                "the body must be a JSON object {\"url\": \"…\", \"headers\": {…}}",
                "the body must be JSON {\"url\": \"…\", \"headers\": {…}}",
            ) {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let target = CallbackTarget {
                url: parsed.url,
                headers: parsed.headers,
            };
            match hub.set_callback(who, target).await {
                Ok(()) => Reply::empty(StatusCode::NO_CONTENT),
                Err(CallbackError::Invalid(m)) | Err(CallbackError::Unreachable(m)) => {
                    error(StatusCode::BAD_REQUEST, "bad_request", &m)
                }
                Err(CallbackError::Store(e)) => {
                    super::reply::store_failure(&e, "callback not stored")
                }
            }
        }
        Method::GET => match hub.callback(&who.key_id) {
            Some(t) => Reply::json(
                StatusCode::OK,
                &serde_json::json!({"url": t.url, "headers": t.headers}),
            ),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no callback URL is registered",
            ),
        },
        _ => match hub.delete_callback(&who.key_id).await {
            Ok(true) => Reply::empty(StatusCode::NO_CONTENT),
            Ok(false) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no callback URL is registered",
            ),
            Err(e) => super::reply::store_failure(&e, "callback not removed"),
        },
    }
}
