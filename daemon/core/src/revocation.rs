//! The notification channels, callbacks and subscriptions of keys that no longer
//! authenticate are dropped.
//!
//! A key stops authenticating when it is revoked or deleted in its backend, or when any key
//! up its chain of creators is ([`crate::auth::AuthChain::liveness`]). Requests need no
//! help here: each one is authenticated. What runs without a request is the fan-out of
//! events to a key's channel and the push to its callback URL, so the host sweeps the keys
//! that have a channel: after every state-changing request on a plugin route (where keys
//! are revoked and deleted), before that request is answered; after the plugins are loaded
//! again because another process (`connectord plugin-call`) wrote the state database;
//! once at start (a revocation made while the daemon was down, or before a crash cut a
//! sweep short); and every `notifications.key_check_interval_s` (60 s by default), for keys
//! that stop authenticating with no request at all (a Pelion access key reaching its
//! `expires_at`: before, its channel, callback and WebSocket lived on).
//!
//! The same sweep carries the restriction a backend reports for a live key
//! (`KeyStatusResponse::restriction`, the Losant backend's application keys) to the key's
//! channel ([`Hub::restrict`]), so a key narrowed through a route sees nothing more outside
//! its new restriction even if it never makes a request (a callback-only key).
//!
//! Each sweep also has every open WebSocket check the credentials it was opened with
//! again (`AuthChain::sweeps`, `rest::websocket::watch_credentials`): a socket whose
//! credentials no longer authenticate as its key is closed with 1008 while the key lives
//! on (a `headerkeys` pair changed: every pair is the one key `headerkeys`).
//!
//! Architecture invariant: the sweep drops only what a backend says is dead; a backend
//! that cannot answer leaves the channel as it is (the key's requests fail closed anyway).

use crate::auth::{AuthChain, Liveness};
use crate::events::hub::Hub;
use crate::subscriptions::Subscriptions;

/// Drops the channel, callback and subscriptions of every key with a channel that no
/// longer authenticates. Returns how many were dropped.
pub async fn sweep(auth: &AuthChain, hub: &Hub, subscriptions: &Subscriptions) -> usize {
    // Open WebSockets check the credentials they were opened with again (a key pair
    // changed under the same key id, as `headerkeys`' are, leaves the key live).
    auth.swept();
    let mut dropped = 0;
    for key_id in hub.key_ids() {
        match auth.liveness(&key_id).await {
            Liveness::Live(None) => {}
            // The backend says the key's restriction now: a key narrowed through a route
            // is narrowed on its channel at once, not only at its next request.
            Liveness::Live(Some(r)) => {
                if let Err(e) = hub.restrict(&key_id, &r.allow).await {
                    tracing::warn!(key = %key_id, "revocation sweep: the key's restriction not recorded: {e}");
                }
            }
            Liveness::CannotTell(why) => {
                tracing::debug!(key = %key_id, "revocation sweep: cannot tell ({why})");
            }
            Liveness::Dead(why) => {
                tracing::info!(key = %key_id, "revocation sweep: dropping the channel of a key that no longer authenticates: {why}");
                if let Err(e) = subscriptions.unsubscribe_all(&key_id).await {
                    tracing::warn!(key = %key_id, "revocation sweep: subscriptions not removed: {e}");
                }
                match hub.forget_key(&key_id).await {
                    Ok(true) => dropped += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(key = %key_id, "revocation sweep: channel not dropped: {e}")
                    }
                }
            }
        }
    }
    dropped
}
