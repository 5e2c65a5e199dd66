//! Forwarding REST requests to a device's owner node (issue 22), on the store's calls
//! between nodes (`NatsStore::call_node` / `serve_calls`, core NATS request/reply on
//! `<prefix>.node.<node>.<op>`).
//!
//! The calling side is [`NatsForwarder`], the core's `forward::Forwarder`; the serving
//! side is [`serve`], a task on every NATS node that handles each call as a local request
//! of the forwarded principal (`Requests::submit_here`, `Subscriptions::subscribe_here`)
//! and answers.
//!
//! Wire format (decision): serde JSON of the small structs below (not the REST JSON, which
//! is the `rest` crate's); payloads base64. A body that cannot be read, from either side,
//! is an error answer or a 502 (`RequestError::Undecodable`), never a panic. A request
//! body that one NATS message could not carry is refused before (413,
//! `cluster::max_body_on`).
//!
//! Decisions:
//! - **The owner re-checks**: the endpoint must still be its own (looked up in the
//!   forwarded principal's domain, so the principal's domain is the endpoint's). If it
//!   moved, the owner answers `elsewhere` with the owner it knows now, and the caller
//!   retries once with that node; a second `elsewhere` is 503 naming the node.
//! - **Failures name the owner**: no node serving calls under that name
//!   (`CallError::NoNode`: it stopped or was killed) and no answer within
//!   `[cluster] timeout_ms` are 503 with the owner and the reason. A call that timed out
//!   may still have been carried out by the owner if it took the call in time (its async
//!   response then lands on the owner's channel under an id the caller never saw); one
//!   that reaches the owner after its deadline is dropped unread (`NodeCalls::next`).
//! - Counted in `Counters::cluster_forwarded` (`out` per call made, `in` per call taken).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::forward::{Forwarder, Fut};
use crate::metrics::Counters;
use crate::requests::{DeviceRequestOpts, Method, RequestError, Requests, Submit, Submitted, Want};
use crate::shutdown;
use crate::store::nats::{CallError, NatsStore, NodeCall};
use crate::subscriptions::{SubError, Subscribed, Subscriptions};

/// The operation of a forwarded request on a resource.
pub const OP_SUBMIT: &str = "submit";
/// The operation of a forwarded subscription.
pub const OP_SUBSCRIBE: &str = "subscribe";

/// How many forwarded calls a node handles at once; more wait in NATS's buffer.
const MAX_CONCURRENT_CALLS: usize = 256;

/// The caller, as the owner acts for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WirePrincipal {
    backend: String,
    key_id: String,
    domain: String,
    scopes: Vec<String>,
    allow: Option<Vec<String>>,
}

impl From<&Principal> for WirePrincipal {
    fn from(p: &Principal) -> Self {
        WirePrincipal {
            backend: p.backend.clone(),
            key_id: p.key_id.clone(),
            domain: p.domain.clone(),
            scopes: p.scopes.clone(),
            allow: p.allow.clone(),
        }
    }
}

impl From<WirePrincipal> for Principal {
    fn from(p: WirePrincipal) -> Self {
        Principal {
            backend: p.backend,
            key_id: p.key_id,
            domain: p.domain,
            scopes: p.scopes,
            allow: p.allow,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireWant {
    Any,
    Format { cf: u16 },
    Json,
}

/// `op = submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WireSubmit {
    who: WirePrincipal,
    ep: String,
    method: Option<Method>,
    path: String,
    /// Base64.
    payload: String,
    content_format: Option<u16>,
    want: WireWant,
    no_resp: bool,
    cache_only: bool,
    /// A device-request's options (issue 23); absent from the other requests (and from
    /// nodes of the release before, which sent none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_request: Option<DeviceRequestOpts>,
}

/// `op = subscribe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WireSubscribe {
    who: WirePrincipal,
    ep: String,
    path: String,
}

/// A refusal, as the owner's request layer or subscriptions manager said it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
enum WireError {
    Gone,
    NotFound {
        message: String,
    },
    Conflict {
        message: String,
    },
    TooMany {
        waiting: usize,
    },
    Unavailable {
        message: String,
    },
    OverQuota {
        message: String,
    },
    NoCache,
    Undecodable {
        message: String,
    },
    BadBody {
        message: String,
    },
    /// The owner's store failed.
    Store {
        message: String,
    },
    /// The owner does not own the endpoint (any more): this node does.
    Elsewhere {
        ep: String,
        owner: String,
    },
    /// A subscription: not observable (412).
    NotObservable,
    /// A subscription: endpoint or resource not found (404).
    SubNotFound {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SubmitAnswer {
    Accepted {
        id: String,
    },
    Sent,
    Cached {
        /// Base64.
        payload: String,
        content_format: Option<u16>,
    },
    Refused(WireError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SubscribeAnswer {
    Active,
    Pending { id: String },
    Refused(WireError),
}

fn wire_error(e: RequestError) -> WireError {
    match e {
        RequestError::Gone => WireError::Gone,
        RequestError::NotFound(m) => WireError::NotFound { message: m },
        RequestError::Conflict(m) => WireError::Conflict { message: m },
        RequestError::TooMany(n) => WireError::TooMany { waiting: n },
        RequestError::Unavailable(m) => WireError::Unavailable { message: m },
        RequestError::OverQuota(m) => WireError::OverQuota { message: m },
        RequestError::NoCache => WireError::NoCache,
        RequestError::Undecodable(m) => WireError::Undecodable { message: m },
        // A path is checked by the node the application called, before forwarding; an
        // older node that did not check it gets the owner's refusal as a body's (412 on a
        // resource route since the fourteenth session, 400 elsewhere). Not a wire variant of
        // its own: an older node could not read it.
        RequestError::BadBody(m) | RequestError::BadPath(m) => WireError::BadBody { message: m },
        RequestError::Elsewhere { ep, owner } => WireError::Elsewhere { ep, owner },
        RequestError::Store(e) => WireError::Store {
            message: e.to_string(),
        },
    }
}

/// A refusal from `owner` as the caller's request error.
fn request_error(owner: &str, e: WireError) -> RequestError {
    match e {
        WireError::Gone => RequestError::Gone,
        WireError::NotFound { message } => RequestError::NotFound(message),
        WireError::Conflict { message } => RequestError::Conflict(message),
        WireError::TooMany { waiting } => RequestError::TooMany(waiting),
        WireError::Unavailable { message } => RequestError::Unavailable(message),
        WireError::OverQuota { message } => RequestError::OverQuota(message),
        WireError::NoCache => RequestError::NoCache,
        WireError::Undecodable { message } => RequestError::Undecodable(message),
        WireError::BadBody { message } => RequestError::BadBody(message),
        WireError::Store { message } => {
            RequestError::Unavailable(format!("cluster node {owner}: {message}"))
        }
        WireError::Elsewhere { ep, owner } => RequestError::Elsewhere { ep, owner },
        WireError::NotObservable | WireError::SubNotFound { .. } => RequestError::Undecodable(
            format!("cluster node {owner} answered a request with a subscription's refusal"),
        ),
    }
}

fn sub_error(owner: &str, e: WireError) -> SubError {
    match e {
        WireError::NotObservable => SubError::NotObservable,
        WireError::SubNotFound { message } => SubError::NotFound(message),
        other => SubError::Request(request_error(owner, other)),
    }
}

fn wire_sub_error(e: SubError) -> WireError {
    match e {
        SubError::NotFound(m) => WireError::SubNotFound { message: m },
        SubError::NotObservable => WireError::NotObservable,
        SubError::Request(e) => wire_error(e),
        SubError::Store(e) => WireError::Store {
            message: e.to_string(),
        },
    }
}

fn undecodable(owner: &str, e: impl std::fmt::Display) -> RequestError {
    RequestError::Undecodable(format!(
        "cannot read the answer of cluster node {owner}: {e}"
    ))
}

fn decode_submit_answer(owner: &str, body: &[u8]) -> Result<Submitted, RequestError> {
    match serde_json::from_slice::<SubmitAnswer>(body).map_err(|e| undecodable(owner, e))? {
        SubmitAnswer::Accepted { id } => Ok(Submitted::Accepted(id)),
        SubmitAnswer::Sent => Ok(Submitted::Sent),
        SubmitAnswer::Cached {
            payload,
            content_format,
        } => Ok(Submitted::Cached {
            payload: B64.decode(payload).map_err(|e| undecodable(owner, e))?,
            content_format,
        }),
        SubmitAnswer::Refused(e) => Err(request_error(owner, e)),
    }
}

fn decode_subscribe_answer(owner: &str, body: &[u8]) -> Result<Subscribed, SubError> {
    match serde_json::from_slice::<SubscribeAnswer>(body).map_err(|e| undecodable(owner, e))? {
        SubscribeAnswer::Active => Ok(Subscribed::Active),
        SubscribeAnswer::Pending { id } => Ok(Subscribed::Pending(id)),
        SubscribeAnswer::Refused(e) => Err(sub_error(owner, e)),
    }
}

fn call_failed(ep: &str, e: CallError) -> RequestError {
    RequestError::Unavailable(format!(
        "endpoint {ep} is served by another cluster node; the request could not be forwarded: {e}"
    ))
}

/// The calling side: hands requests to the owner over NATS.
pub struct NatsForwarder {
    pub store: Arc<NatsStore>,
    /// `[cluster] timeout_ms`.
    pub timeout: Duration,
    pub counters: Arc<Counters>,
    /// This node's name (an owner named in an `elsewhere` answer that is this node is not
    /// called).
    pub node: String,
}

impl NatsForwarder {
    /// Calls `op` on `owner`, and once more on the owner it names if it answers
    /// `elsewhere`; `decode` reads an answer, and says which node it names, if any.
    async fn call<T, E>(
        &self,
        owner: &str,
        ep: &str,
        op: &str,
        body: Vec<u8>,
        decode: impl Fn(&str, &[u8]) -> Result<T, E>,
        moved: impl Fn(&E) -> Option<String>,
    ) -> Result<T, E>
    where
        E: From<RequestError>,
    {
        let body = Bytes::from(body);
        let mut to = owner.to_string();
        for attempt in 0..2 {
            crate::metrics::Counters::inc(&self.counters.cluster_forwarded.out);
            let answer = self
                .store
                .call_node(&to, op, body.clone(), self.timeout)
                .await
                .map_err(|e| call_failed(ep, e))?;
            match decode(&to, &answer) {
                Err(e) if attempt == 0 => match moved(&e) {
                    Some(next) if next != to && next != self.node => {
                        tracing::debug!(%ep, from = %to, to = %next, "forwarded request: the endpoint moved; asking its new owner");
                        to = next;
                    }
                    _ => return Err(e),
                },
                other => return other,
            }
        }
        Err(E::from(RequestError::Elsewhere {
            ep: ep.to_string(),
            owner: to,
        }))
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // These structs of strings, numbers and options always serialise.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Forwarder for NatsForwarder {
    fn submit<'a>(
        &'a self,
        owner: &'a str,
        who: &'a Principal,
        ep: &'a str,
        s: Submit,
    ) -> Fut<'a, Result<Submitted, RequestError>> {
        Box::pin(async move {
            let wire = WireSubmit {
                who: who.into(),
                ep: ep.to_string(),
                method: s.method,
                path: s.path,
                payload: B64.encode(&s.payload),
                content_format: s.content_format,
                want: match s.want {
                    Want::Any => WireWant::Any,
                    Want::Format(cf) => WireWant::Format { cf },
                    Want::Json => WireWant::Json,
                },
                no_resp: s.no_resp,
                cache_only: s.cache_only,
                device_request: s.device_request,
            };
            self.call(
                owner,
                ep,
                OP_SUBMIT,
                encode(&wire),
                decode_submit_answer,
                |e| match e {
                    RequestError::Elsewhere { owner, .. } => Some(owner.clone()),
                    _ => None,
                },
            )
            .await
        })
    }

    fn subscribe<'a>(
        &'a self,
        owner: &'a str,
        who: &'a Principal,
        ep: &'a str,
        path: &'a str,
    ) -> Fut<'a, Result<Subscribed, SubError>> {
        Box::pin(async move {
            let wire = WireSubscribe {
                who: who.into(),
                ep: ep.to_string(),
                path: path.to_string(),
            };
            self.call(
                owner,
                ep,
                OP_SUBSCRIBE,
                encode(&wire),
                decode_subscribe_answer,
                |e| match e {
                    SubError::Request(RequestError::Elsewhere { owner, .. }) => Some(owner.clone()),
                    _ => None,
                },
            )
            .await
        })
    }
}

/// What the serving side answers a call with.
async fn handle(call: &NodeCall, requests: &Arc<Requests>, subs: &Subscriptions) -> Vec<u8> {
    let from = call.from.as_deref().unwrap_or("?");
    match call.op.as_str() {
        OP_SUBMIT => {
            let answer = match serde_json::from_slice::<WireSubmit>(&call.body) {
                Err(e) => SubmitAnswer::Refused(WireError::Undecodable {
                    message: format!(
                        "cannot read the request forwarded by cluster node {from}: {e}"
                    ),
                }),
                Ok(w) => match B64.decode(&w.payload) {
                    Err(e) => SubmitAnswer::Refused(WireError::Undecodable {
                        message: format!(
                            "cannot read the payload forwarded by cluster node {from}: {e}"
                        ),
                    }),
                    Ok(payload) => {
                        let s = Submit {
                            method: w.method,
                            path: w.path,
                            payload,
                            content_format: w.content_format,
                            want: match w.want {
                                WireWant::Any => Want::Any,
                                WireWant::Format { cf } => Want::Format(cf),
                                WireWant::Json => Want::Json,
                            },
                            no_resp: w.no_resp,
                            cache_only: w.cache_only,
                            device_request: w.device_request,
                        };
                        let who = Principal::from(w.who);
                        match requests.submit_here(&who, &w.ep, s).await {
                            Ok(Submitted::Accepted(id)) => SubmitAnswer::Accepted { id },
                            Ok(Submitted::Sent) => SubmitAnswer::Sent,
                            Ok(Submitted::Cached {
                                payload,
                                content_format,
                            }) => SubmitAnswer::Cached {
                                payload: B64.encode(payload),
                                content_format,
                            },
                            Err(e) => SubmitAnswer::Refused(wire_error(e)),
                        }
                    }
                },
            };
            encode(&answer)
        }
        OP_SUBSCRIBE => {
            let answer = match serde_json::from_slice::<WireSubscribe>(&call.body) {
                Err(e) => SubscribeAnswer::Refused(WireError::Undecodable {
                    message: format!(
                        "cannot read the subscription forwarded by cluster node {from}: {e}"
                    ),
                }),
                Ok(w) => {
                    let who = Principal::from(w.who);
                    match subs.subscribe_here(&who, &w.ep, &w.path).await {
                        Ok(Subscribed::Active) => SubscribeAnswer::Active,
                        Ok(Subscribed::Pending(id)) => SubscribeAnswer::Pending { id },
                        Err(e) => SubscribeAnswer::Refused(wire_sub_error(e)),
                    }
                }
            };
            encode(&answer)
        }
        other => encode(&SubmitAnswer::Refused(WireError::Undecodable {
            message: format!("unknown cluster call {other:?}"),
        })),
    }
}

/// Logs a failed answer at most once a minute (with how many failed since), so that NATS
/// failing under a flood of forwarded requests cannot flood the log.
fn answer_failed(e: &crate::store::StoreError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static FAILED: AtomicU64 = AtomicU64::new(0);
    static LAST_LOGGED_S: AtomicU64 = AtomicU64::new(0);
    let failed = FAILED.fetch_add(1, Ordering::Relaxed) + 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_LOGGED_S.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_LOGGED_S
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "cluster: cannot answer a request another node forwarded: {e} ({failed} answers failed since the start; logged at most once a minute)"
        );
    }
}

/// Serves the calls other nodes make to this one until `stop`: each forwarded request is
/// handled in a task of its own (at most [`MAX_CONCURRENT_CALLS`] at once) as a local
/// request of the forwarded principal, and answered.
pub async fn serve(
    calls: crate::store::nats::NodeCalls,
    requests: Arc<Requests>,
    subs: Arc<Subscriptions>,
    counters: Arc<Counters>,
    stop: shutdown::Shutdown,
) {
    super::serve_calls(
        calls,
        MAX_CONCURRENT_CALLS,
        stop,
        "this node's calls ended; requests forwarded by other nodes are no longer served",
        move |call| {
            Counters::inc(&counters.cluster_forwarded.in_);
            let (requests, subs) = (Arc::clone(&requests), Arc::clone(&subs));
            async move {
                let answer = handle(&call, &requests, &subs).await;
                if let Err(e) = call.answer(Bytes::from(answer)).await {
                    answer_failed(&e);
                }
            }
        },
    )
    .await
}

/// Applies the other nodes' subscription changes to this node's subscriptions manager
/// until `stop` (see `Subscriptions::follow`); a lagged watch is logged and everything
/// loaded again from the store.
pub async fn follow_subscriptions(
    mut watch: crate::store::nats::SubscriptionWatch,
    subs: Arc<Subscriptions>,
    mut stop: shutdown::Shutdown,
) {
    use crate::store::nats::Followed;
    // When the observations nobody is subscribed to any more are to be ended (see
    // `Subscriptions::follow`).
    let mut prune_at: Option<tokio::time::Instant> = None;
    loop {
        let prune_due = async {
            match prune_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let f = tokio::select! {
            _ = stop.recv() => return,
            () = prune_due => {
                prune_at = None;
                subs.prune_unsubscribed();
                continue;
            }
            f = watch.next() => f,
        };
        match f {
            None => return,
            Some(Followed::Change(c)) => {
                if subs.follow(c).await && prune_at.is_none() {
                    prune_at = Some(
                        tokio::time::Instant::now() + crate::subscriptions::FOLLOWED_PRUNE_AFTER,
                    );
                }
            }
            Some(Followed::Lagged) => {
                tracing::warn!(
                    "cluster: missed changes of other nodes' subscriptions; loading them again"
                );
                if let Err(e) = subs.reload().await {
                    tracing::warn!("cluster: cannot load the subscriptions again: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_cannot_be_read_are_bad_gateway_errors_naming_the_node() {
        for body in [
            &b""[..],
            b"not json",
            b"{\"accepted\":{}}",
            b"{\"refused\":{\"error\":\"no_such_error\"}}",
            b"{\"cached\":{\"payload\":\"***\",\"content_format\":0}}",
            b"\"sent\" trailing",
        ] {
            match decode_submit_answer("n2", body) {
                Err(RequestError::Undecodable(m)) => assert!(m.contains("n2"), "{m}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        for body in [&b"[]"[..], b"{\"pending\":{\"id\":7}}", b"\xff"] {
            match decode_subscribe_answer("n3", body) {
                Err(SubError::Request(RequestError::Undecodable(m))) => {
                    assert!(m.contains("n3"), "{m}")
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn answers_round_trip_and_refusals_map_as_locally() {
        let cached = encode(&SubmitAnswer::Cached {
            payload: B64.encode([0u8, 1, 255]),
            content_format: Some(42),
        });
        assert_eq!(
            decode_submit_answer("n2", &cached).ok(),
            Some(Submitted::Cached {
                payload: vec![0, 1, 255],
                content_format: Some(42)
            })
        );
        let gone = encode(&SubmitAnswer::Refused(wire_error(RequestError::Gone)));
        assert!(matches!(
            decode_submit_answer("n2", &gone),
            Err(RequestError::Gone)
        ));
        let many = encode(&SubmitAnswer::Refused(wire_error(RequestError::TooMany(9))));
        assert!(matches!(
            decode_submit_answer("n2", &many),
            Err(RequestError::TooMany(9))
        ));
        let moved = encode(&SubscribeAnswer::Refused(wire_error(
            RequestError::Elsewhere {
                ep: "e".into(),
                owner: "n4".into(),
            },
        )));
        assert!(matches!(
            decode_subscribe_answer("n2", &moved),
            Err(SubError::Request(RequestError::Elsewhere { owner, .. })) if owner == "n4"
        ));
        let not_obs = encode(&SubscribeAnswer::Refused(WireError::NotObservable));
        assert!(matches!(
            decode_subscribe_answer("n2", &not_obs),
            Err(SubError::NotObservable)
        ));
    }

    /// A store of node `node` on `server`.
    async fn node(server: &connectord_testkit::nats::NatsServer, node: &str) -> Arc<NatsStore> {
        let cfg = crate::store::nats::NatsConfig {
            servers: vec![server.url()],
            prefix: "cd".into(),
            replicas: 1,
            node: node.into(),
            timeout: Duration::from_secs(2),
        };
        Arc::new(NatsStore::connect(cfg).await.expect("connect"))
    }

    /// Serves `store`'s calls, answering each `submit` with `answer` (the test's stand-in
    /// for an owner whose endpoint moved, or the new owner).
    async fn answer_with(store: &NatsStore, answer: SubmitAnswer) {
        let mut calls = store.serve_calls().await.expect("serve");
        tokio::spawn(async move {
            while let Some(call) = calls.next().await {
                assert_eq!(call.op, OP_SUBMIT);
                let w: WireSubmit = serde_json::from_slice(&call.body).expect("a request");
                assert_eq!((w.who.key_id.as_str(), w.ep.as_str()), ("k", "ep"));
                call.answer(Bytes::from(encode(&answer)))
                    .await
                    .expect("answer");
            }
        });
    }

    fn principal() -> Principal {
        Principal {
            backend: "connector".into(),
            key_id: "k".into(),
            domain: "d".into(),
            scopes: vec![],
            allow: None,
        }
    }

    /// Over a real nats-server: an owner that answers `elsewhere` makes the caller ask
    /// the node it names, once; a second `elsewhere` is `RequestError::Elsewhere` naming
    /// the node the second one names (503); a node nobody serves is `Unavailable` naming it. Each call is counted.
    #[tokio::test]
    async fn a_moved_endpoint_is_asked_of_its_new_owner_once() {
        let server = connectord_testkit::nats::NatsServer::start().expect("nats-server");
        let caller = node(&server, "caller").await;
        let (n1, n3, n4, n5) = (
            node(&server, "n1").await,
            node(&server, "n3").await,
            node(&server, "n4").await,
            node(&server, "n5").await,
        );
        let moved = |to: &str| {
            SubmitAnswer::Refused(WireError::Elsewhere {
                ep: "ep".into(),
                owner: to.into(),
            })
        };
        answer_with(&n1, moved("n3")).await;
        answer_with(&n3, SubmitAnswer::Accepted { id: "1#x".into() }).await;
        answer_with(&n4, moved("n5")).await;
        answer_with(&n5, moved("n6")).await;
        let counters = Arc::new(Counters::default());
        let f = NatsForwarder {
            store: Arc::clone(&caller),
            timeout: Duration::from_secs(2),
            counters: Arc::clone(&counters),
            node: "caller".into(),
        };
        let who = principal();
        let got = f.submit("n1", &who, "ep", Submit::default()).await;
        assert_eq!(got.ok(), Some(Submitted::Accepted("1#x".into())));
        assert_eq!(counters.cluster_forwarded.get(), (2, 0));
        match f.submit("n4", &who, "ep", Submit::default()).await {
            Err(RequestError::Elsewhere { owner, .. }) => assert_eq!(owner, "n6"),
            other => panic!("{other:?}"),
        }
        match f.submit("n9", &who, "ep", Submit::default()).await {
            Err(RequestError::Unavailable(m)) => assert!(m.contains("cluster node n9"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_that_cannot_be_read_are_refused_not_panicked_on() {
        for body in [&b"{"[..], b"{\"who\":1}", b"null"] {
            assert!(serde_json::from_slice::<WireSubmit>(body).is_err());
            assert!(serde_json::from_slice::<WireSubscribe>(body).is_err());
        }
        let w = WireSubmit {
            who: WirePrincipal {
                backend: "connector".into(),
                key_id: "k".into(),
                domain: "d".into(),
                scopes: vec!["admin".into()],
                allow: None,
            },
            ep: "ep".into(),
            method: Some(Method::Put),
            path: "/3/0/1".into(),
            payload: B64.encode(b"x"),
            content_format: Some(0),
            want: WireWant::Format { cf: 11542 },
            no_resp: true,
            cache_only: false,
            device_request: None,
        };
        let back: WireSubmit = serde_json::from_slice(&encode(&w)).expect("round trip");
        assert_eq!(back, w);
        // A device-request's options go along (issue 23).
        let w = WireSubmit {
            device_request: Some(DeviceRequestOpts {
                async_id: "my id".into(),
                retry: Some(2),
                expiry_s: None,
            }),
            ..w
        };
        let back: WireSubmit = serde_json::from_slice(&encode(&w)).expect("round trip");
        assert_eq!(back, w);
    }
}
