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

/// The caller's notification channel and its limits, for `GET /v2/limits`
/// (`notification-channel`): Pelion's per-channel limits (queue size, event lifetime,
/// idle removal, batch size) as configured, and the key's channel now (`null` without
/// one). On a cluster the counts are the serving node's: another node shows only the
/// kind (`served-here` false).
pub fn channel_limits(hub: &Hub, key_id: &str) -> serde_json::Value {
    let cfg = hub.config();
    let limits = serde_json::json!({
        "max-queued-events": cfg.max_queued_per_key,
        "max-queued-bytes": cfg.max_queued_bytes_per_key,
        "event-overhead-bytes": connectord_core::config::EVENT_OVERHEAD_BYTES,
        "event-lifetime-s": cfg.discard_after_s,
        "idle-removal-s": cfg.idle_channel_removal_s,
        "max-batch": cfg.max_batch,
    });
    let channel = hub.channel_info(key_id).map(|c| {
        let mut o = serde_json::json!({
            "kind": c.kind,
            "served-here": c.here,
        });
        if let (Some(events), Some(bytes), Some(lost), Some(idle)) =
            (c.queued_events, c.queued_bytes, c.lost, c.idle_s)
        {
            o["queued-events"] = events.into();
            o["queued-bytes"] = bytes.into();
            o["dropped-queue-count"] = lost.queue_count.into();
            o["dropped-queue-bytes"] = lost.queue_bytes.into();
            o["expired"] = lost.expired.into();
            o["refused"] = lost.refused.into();
            o["idle-s"] = idle.into();
        }
        o
    });
    serde_json::json!({ "limits": limits, "channel": channel })
}
