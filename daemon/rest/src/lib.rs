//! The REST API for applications (mbed Device Connector v2 compatible), on hyper.
//!
//! Every route is served at `/v2/…`, `/v1/…` and unprefixed. The router ([`routes`]) names
//! the core [`Scope`](crate::auth::Scope) a route needs; this module authenticates the
//! caller through the [`AuthChain`] and checks the scope before any handler runs. Errors
//! are JSON `{"type": …, "message": …}`, never an empty body or an HTML page.

#![deny(unsafe_code)]

// The modules below this crate under the paths this code was written with.
use connectord_certs as certs;
use connectord_core::{
    auth, coap, events, limits, metrics, registry, requests, revocation, shutdown, store,
};
use connectord_plugin_host as plugins;

pub mod cluster;
pub mod config;
pub mod conn;
pub mod console;
pub mod credentials;
pub mod device_requests;
pub mod devtools;
pub mod endpoints;
pub mod finish;
pub mod notifications;
pub mod reply;
pub mod resources;
pub mod routes;
pub mod subscriptions;
pub mod throttle;
pub mod tls;
pub mod websocket;
pub mod wire;

pub use config::RestConfig;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::auth::{AuthChain, AuthError, Principal, Scope};
use crate::coap::Transport;
use crate::events::Hub;
use crate::metrics::Counters;
use crate::registry::{Directory, Registry};
use crate::requests::Requests;
use crate::shutdown::Shutdown;
use connectord_core::subscriptions::Subscriptions;
use connectord_plugin_sdk::http::ErrorTypes;
use reply::{Reply, error};
use routes::Route;

/// The OpenAPI 3 document of the REST API (`docs/openapi.json`), served at
/// `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// How long a graceful stop waits for open HTTP connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What handlers need, shared by every connection.
pub struct AppState {
    /// What is registered now (the registry's read model), for every read.
    pub directory: Arc<Directory>,
    /// The registry's write service, for `DELETE /endpoints/{name}` only.
    pub registry: Arc<Registry>,
    pub auth: AuthChain,
    pub counters: Arc<Counters>,
    pub transport: Arc<Transport>,
    pub requests: Arc<Requests>,
    pub hub: Arc<Hub>,
    pub subscriptions: Arc<Subscriptions>,
    pub plugins: Arc<crate::plugins::PluginHost>,
    pub limits: Arc<crate::limits::Limits>,
    pub ca: Arc<crate::certs::CertAuthority>,
    /// Device credentials (PSKs, issued certificates): `/device-credentials`, and the
    /// record of each certificate `POST /api/cert` issues.
    pub credentials: Arc<connectord_core::credentials::DeviceCredentials>,
    /// Asked for its health by `GET /` and `/metrics`.
    pub store: Arc<dyn crate::store::Store>,
    /// `requests.max_body`; on NATS at most what one NATS message carries
    /// (`cluster::max_body_on`).
    pub max_body: usize,
    /// `notifications.long_poll_s`.
    pub long_poll: Duration,
    /// `notifications.websocket_ping_interval_s`.
    pub websocket_ping: Duration,
    /// `rest.max_connections`, `rest.client_timeout_s`.
    pub connections: conn::Connections,
    /// `GET /v2/cluster`, `connectord_cluster_members`.
    pub cluster: Arc<cluster::ClusterView>,
}

/// Binds every configured address (before the daemon reports ready).
pub async fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    bind_scheme(addrs, "http").await
}

/// Binds every `rest.listen_tls` address (served with [`tls::Tls`]).
pub async fn bind_tls(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    bind_scheme(addrs, "https").await
}

/// The accept queue asked of the kernel for each REST listener (the kernel clamps it to
/// `net.core.somaxconn`, 4 096 on current Linux). Decision: tokio's `TcpListener::bind`
/// asks for 128. The server accepts a connection only once it has a slot
/// (`rest.max_connections`), so while every slot is taken the connections wait in this
/// queue; past 128 the kernel dropped the clients' SYNs, and each then waited for its
/// retransmission (1 s, 3 s, 7 s, …): a 10 s connect timeout in CI's flood test, whose
/// slow clients held every slot.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `a` with [`LISTEN_BACKLOG`], `SO_REUSEADDR` set as tokio's own bind sets it.
fn listen(a: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match a {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(a)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn bind_scheme(addrs: &[SocketAddr], scheme: &str) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    for &a in addrs {
        let l = listen(a).map_err(|e| {
            let key = if scheme == "https" { "_tls" } else { "" };
            std::io::Error::new(
                e.kind(),
                format!("cannot bind the REST API on {a} (rest.listen{key}): {e}"),
            )
        })?;
        tracing::info!("REST API listening on {scheme}://{}", l.local_addr()?);
        out.push(l);
    }
    Ok(out)
}

/// A bound REST listener and, for an HTTPS one (`rest.listen_tls`), its TLS side.
pub type Listener = (TcpListener, Option<Arc<tls::Tls>>);

/// Serves until `shutdown` fires, then lets open connections finish (bounded). Plain and
/// HTTPS listeners share the connection bounds (`rest.max_connections`, per address);
/// an HTTPS connection holds its slot from its accept, handshake included.
pub async fn serve(listeners: Vec<Listener>, state: Arc<AppState>, mut shutdown: Shutdown) {
    let graceful = Arc::new(GracefulShutdown::new());
    let mut accepts = Vec::new();
    for (listener, tls) in listeners {
        let state = Arc::clone(&state);
        let graceful = Arc::clone(&graceful);
        let mut sd = shutdown.clone();
        accepts.push(tokio::spawn(async move {
            let builder = Arc::new(state.connections.builder());
            let refused_response = conn::refusal_response();
            loop {
                // At rest.max_connections, accept nothing until a connection closes: the
                // next ones wait in the kernel's listen backlog. A listener waits for room
                // without holding it: holding a slot while waiting in `accept`, every
                // listener counted as a connection (`rest_connections`), and at the last
                // free slot an idle listener starved the others (found by an outside
                // review). So a slot is taken once a connection is accepted; when another
                // listener took the last one meanwhile, the accepted connection waits for
                // the next (at most one per listener waits so).
                tokio::select! {
                    _ = sd.recv() => return,
                    p = state.connections.admit() => drop(p),
                };
                let (stream, peer) = tokio::select! {
                    _ = sd.recv() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("REST accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let permit = match state.connections.try_admit() {
                    Some(p) => p,
                    None => tokio::select! {
                        _ = sd.recv() => return,
                        p = state.connections.admit() => p,
                    },
                };
                // One address gets at most rest.max_connections_per_address of the slots;
                // past it, told so and closed at once (not queued: it would hold the
                // backlog for everyone).
                let address_slot = match state.connections.admit_address(peer.ip()) {
                    Ok(s) => s,
                    Err(refused) => {
                        Counters::inc(&state.counters.rest_connections_refused);
                        if refused.log {
                            tracing::warn!(
                                "REST connections from {} refused: it has {} open \
                                 (rest.max_connections_per_address); logged once a minute \
                                 per address, counted in rest_connections_refused_total",
                                peer.ip().to_canonical(),
                                refused.limit
                            );
                        }
                        // An HTTPS client would read plain text as a broken record: it is
                        // only closed.
                        if tls.is_none() {
                            let _ = stream.try_write(&refused_response);
                        }
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                let builder = Arc::clone(&builder);
                // The second one holds the drain for a WebSocket the connection became.
                let watcher = (graceful.watcher(), graceful.watcher());
                let tls = tls.clone();
                let mut sd = sd.clone();
                tokio::spawn(async move {
                    // The address's share goes back before the global slot (fields drop
                    // in order): a connection accepted on this slot must find it free.
                    let _slot = (address_slot, permit);
                    let Some(tls) = tls else {
                        return connection(stream, peer.ip(), state, &builder, watcher).await;
                    };
                    let timeout = state.connections.tls_handshake_timeout();
                    let stream = tokio::select! {
                        _ = sd.recv() => return,
                        r = tls::handshake(stream, tls.acceptor(), timeout) => r,
                    };
                    match stream {
                        Ok(stream) => connection(stream, peer.ip(), state, &builder, watcher).await,
                        Err(tls::Handshake::Closed) => {}
                        Err(e) => {
                            Counters::inc(&state.counters.rest_tls_handshake_failures);
                            if matches!(e, tls::Handshake::NotTls { http: true }) {
                                state.counters.rest_responses.inc(400);
                            }
                            tracing::debug!("REST connection from {peer}: {e}");
                        }
                    }
                });
            }
        }));
    }
    shutdown.recv().await;
    for a in accepts {
        let _ = a.await;
    }
    match Arc::try_unwrap(graceful) {
        Ok(g) => {
            if tokio::time::timeout(DRAIN_TIMEOUT, g.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("REST connections still open after {DRAIN_TIMEOUT:?}; closing them");
            }
        }
        Err(_) => tracing::warn!("REST: cannot drain connections"),
    }
}

/// Serves one accepted connection (plain, or HTTPS once its handshake completed) until
/// it ends; its connection slot is the caller's.
async fn connection<T>(
    stream: T,
    peer: IpAddr,
    state: Arc<AppState>,
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    (watcher, socket_watcher): (
        hyper_util::server::graceful::Watcher,
        hyper_util::server::graceful::Watcher,
    ),
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = state.connections.timeout();
    let counters = Arc::clone(&state.counters);
    let first = Arc::new(tokio::sync::Notify::new());
    let seen = Arc::clone(&first);
    let activity = conn::Activity::new();
    let requests = Arc::clone(&activity);
    let (upgrades, held, released) = conn::Upgrades::new(&activity);
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        seen.notify_one();
        // Only a request hyper may upgrade (an `Upgrade` header, or CONNECT) gets its
        // `OnUpgrade`, without which the WebSocket route refuses before it looks for this:
        // the extension map is not allocated for every other request (issue 24).
        if req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE) {
            req.extensions_mut().insert(upgrades.clone());
        }
        let in_flight = requests.begin();
        let reply = handle(Arc::clone(&state), req, peer);
        let conn = Arc::clone(&requests);
        async move {
            let mut r = reply.await;
            if let Ok(resp) = &mut r {
                resp.body_mut().on_connection(&conn);
            }
            drop(in_flight);
            r
        }
    });
    let io = TokioIo::new(
        conn::ClientIo::new(stream, timeout, Arc::clone(&activity)).counting(counters),
    );
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let conn = watcher.watch(conn.into_owned());
    let outcome = conn::first_request_within(conn, &first, &activity, conn::QUIET, timeout).await;
    // Long-poll answers handed to a connection that failed are queued again.
    activity.finish();
    // A connection upgraded to a WebSocket keeps its slot until the socket ends, and a
    // graceful stop waits for it (bounded by the drain timeout) to send its close frame.
    drop(held);
    released.wait().await;
    drop(socket_watcher);
    match outcome {
        None => tracing::debug!(
            "REST connection closed: no byte within 5 s or no request within rest.client_timeout_s"
        ),
        Some(Err(e)) => tracing::debug!("REST connection ended: {e}"),
        Some(Ok(())) => {}
    }
}

/// Resolves when the client of a request went away: hyper drops a request's future when
/// its connection closes (HTTP/1: an end of input while a request is in flight) or its
/// stream is reset (HTTP/2), and the handler, which then runs on to its end on a task of
/// its own ([`finish::Finish`]), learns it from this.
type Gone = tokio::sync::oneshot::Receiver<()>;

/// One request. Runs the handler in this task through [`finish::Finish`], so that a
/// panic becomes a JSON 500 and a client that goes away does not stop the handler
/// half-way.
async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<reply::Body>, Infallible> {
    let method = req.method().clone();
    // A clone of hyper's URI shares its bytes (a reference count): no copy of the path
    // for every request, which only a failure or a debug line reads.
    let uri = req.uri().clone();
    let path = uri.path();
    let state_counters = Arc::clone(&state.counters);
    // Dropped with this future: when the request ends, or when hyper drops it because the
    // client went away.
    let (_present, gone) = tokio::sync::oneshot::channel();
    let started = std::time::Instant::now();
    // A long-poll waits on purpose (up to notifications.long_poll_s): not a latency.
    let timed = !path.ends_with("/notification/pull");
    // Boxed inside `Finish`: the handler's future is a few KB.
    let reply = match finish::Finish::new(dispatch(state, req, gone, peer)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%method, %path, "REST handler failed: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            )
        }
    };
    state_counters.rest_responses.inc(reply.status().as_u16());
    if timed {
        state_counters.rest_latency.observe(started.elapsed());
    }
    tracing::debug!(%method, %path, status = reply.status().as_u16(), "REST");
    Ok(reply.into_response())
}

/// The core's spelling of the errors `dispatch` answers itself; a plugin's route may
/// declare its own ([`ErrorTypes`]).
static CORE_ERRORS: std::sync::LazyLock<ErrorTypes> = std::sync::LazyLock::new(ErrorTypes::default);

/// `peer` is the client's address, for `rest.auth_failures_per_minute` ([`throttle`]).
async fn dispatch(
    state: Arc<AppState>,
    mut req: Request<Incoming>,
    gone: Gone,
    peer: IpAddr,
) -> Reply {
    // Set for a plugin's route that spells its errors its own way.
    let mut plugin_errors = None;
    let (route, scope) = match routes::resolve(req.method(), req.uri().path()) {
        Ok(r) => r,
        Err(reply) if reply.status() == StatusCode::NOT_FOUND => {
            // Not a core route: maybe a plugin's (e.g. POST /api/api_tokens).
            let Some(path) = routes::unversioned(req.uri().path()) else {
                return reply;
            };
            let Some(pr) = state.plugins.match_route(req.method().as_str(), &path) else {
                return reply;
            };
            if pr.route.scope == connectord_plugin_sdk::http::AUTHENTICATED {
                let errors = pr.route.errors.unwrap_or_default();
                return dispatch_plugin_route(&state, req, peer, pr.plugin, path, &errors).await;
            }
            plugin_errors = pr.route.errors.clone();
            let Some(scope) = Scope::parse(&pr.route.scope) else {
                tracing::error!(plugin = %pr.plugin, "route {} names an unknown scope {:?}", pr.route.path, pr.route.scope);
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "plugin_error",
                    "the plugin's route is misconfigured",
                );
            };
            (
                Route::Plugin {
                    plugin: pr.plugin,
                    path,
                },
                scope,
            )
        }
        Err(reply) => return reply,
    };
    // The console's files are public (they hold no data): answered before authentication.
    if let Route::Console(asset) = &route {
        return console::serve(asset, req.headers()).method_is_head(*req.method() == Method::HEAD);
    }
    let errs = plugin_errors.as_ref().unwrap_or(&CORE_ERRORS);
    // A browser names its key in the WebSocket's subprotocols.
    if route == Route::NotificationWebsocketConnect {
        websocket::key_from_subprotocol(req.headers_mut());
    }
    // Everything needs credentials.
    let principal = match authenticate(&state, &req, peer, errs).await {
        Ok(p) => p,
        Err(reply) => return reply,
    };
    // The key's channel follows its newest verdict, so that events are routed by the
    // restriction it has now (a key edited in its backend), from this request on.
    if let Err(e) = state.hub.note_restriction(&principal).await {
        crate::store::log_failure(
            format_args!(
                "the restriction of key {} is not recorded",
                principal.key_id
            ),
            &e,
        );
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &errs.unavailable,
            "the key's access cannot be recorded now; try again",
        );
    }
    // A key restricted to some endpoints/resources touches no others.
    let target = match &route {
        Route::Endpoint(ep)
        | Route::EndpointSubscriptions(ep)
        | Route::DeviceCredential(ep)
        | Route::DeviceRequest(ep) => Some((ep.as_str(), None)),
        Route::Resource { ep, path } | Route::Subscription { ep, path } => {
            Some((ep.as_str(), Some(path.as_str())))
        }
        _ => None,
    };
    if let Some((ep, path)) = target
        && !principal.may_access(ep, path)
    {
        return error(
            StatusCode::FORBIDDEN,
            &errs.forbidden,
            "this access key may not access that endpoint or resource",
        );
    }
    // What acts on a device as a whole (de-registering it, its credentials, a new
    // device's certificate) needs a key that may access all of it: one allowed some of a
    // device's resources may not remove the device or replace its PSK.
    let partial = match &route {
        Route::Endpoint(ep) if req.method() == Method::DELETE => !principal.may_access_whole(ep),
        Route::DeviceCredential(ep) => !principal.may_access_whole(ep),
        // A certificate enrols a device of any name: only for unrestricted keys.
        Route::Cert => principal.allow.is_some(),
        _ => false,
    };
    if partial {
        return error(
            StatusCode::FORBIDDEN,
            &errs.forbidden,
            "this access key is allowed only some resources of that endpoint (or only some endpoints); acting on a whole device needs a key that may access all of it",
        );
    }
    // A device-request reads or writes as its body says: either scope lets it in, and
    // the handler asks for the one its method needs (before, a write-only key was refused
    // its writes here).
    let admitted = match route {
        Route::DeviceRequest(_) => {
            principal.allows(Scope::ResourcesRead) || principal.allows(Scope::ResourcesWrite)
        }
        _ => principal.allows(scope),
    };
    if !admitted {
        return error(
            StatusCode::FORBIDDEN,
            &errs.forbidden,
            &format!("this access key lacks the scope {}", scope.as_str()),
        );
    }
    let (mut parts, body) = req.into_parts();
    let body = match read_body(&state, body, errs).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    if takes_json(&route, &parts.method)
        && let Some(reply) = refuse_non_json(&parts)
    {
        return reply;
    }
    match route {
        // Decision: the first line stays `connectord <version>` (what clients read); a
        // failing store makes it 503 with a second line naming the failure, so a health
        // check sees it without parsing.
        Route::Root => match state.store.health().failing {
            None => Reply::text(
                StatusCode::OK,
                format!("connectord {}", env!("CARGO_PKG_VERSION")),
            ),
            Some(e) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "connectord {}\nstate store failing: {e}",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
        },
        Route::RestVersions => Reply::json(StatusCode::OK, &["v1", "v2"]),
        Route::Endpoints => endpoints::list(&state.directory, &principal, &parts),
        Route::Endpoint(name) if parts.method == Method::DELETE => {
            endpoints::remove(&state.registry, &principal, &name).await
        }
        Route::Endpoint(name) => endpoints::get(&state.directory, &principal, &parts, &name),
        Route::Resource { ep, path } => {
            resources::handle(&state.requests, &principal, &parts, body, &ep, &path).await
        }
        Route::DeviceRequest(ep) => {
            device_requests::handle(&state.requests, &principal, &parts, body, &ep).await
        }
        Route::NotificationPull => {
            let gone = async move {
                let _ = gone.await;
            };
            notifications::pull(&state.hub, &principal, &parts, state.long_poll, gone).await
        }
        Route::NotificationCallback => {
            let reply = notifications::callback(&state.hub, &principal, &parts, body).await;
            // Deleting the callback also removes the key's subscriptions (seed 000).
            if parts.method == Method::DELETE
                && reply.status() == StatusCode::NO_CONTENT
                && let Err(e) = state.subscriptions.unsubscribe_all(&principal.key_id).await
            {
                crate::store::log_failure(format_args!("subscriptions not removed with the callback"), &e);
            }
            reply
        }
        Route::NotificationWebsocket => {
            websocket::channel(&state.hub, &principal, &parts).await
        }
        Route::NotificationWebsocketConnect => {
            let socket = websocket::Socket {
                hub: Arc::clone(&state.hub),
                counters: Arc::clone(&state.counters),
                ping: state.websocket_ping,
                auth: state.auth.clone(),
            };
            websocket::connect(socket, Arc::clone(&principal), &mut parts)
        }
        Route::Plugin { plugin, path } => {
            let reply = plugin_route(&state, &principal, &parts, body, &plugin, &path, errs).await;
            failed_in_plugin(&state, peer, reply)
        }
        Route::Subscriptions => {
            subscriptions::all(&state.subscriptions, &principal, &parts, body).await
        }
        Route::EndpointSubscriptions(ep) => {
            subscriptions::endpoint(
                &state.subscriptions,
                &state.directory,
                &principal,
                &parts,
                &ep,
            )
            .await
        }
        Route::Subscription { ep, path } => {
            subscriptions::resource(&state.subscriptions, &principal, &parts, &ep, &path).await
        }
        Route::Cert => devtools::create_cert(&state.ca, &state.credentials, &principal, body).await,
        Route::DeviceCredentials => credentials::list(&state.credentials, &principal),
        Route::DeviceCredential(ep) => match parts.method {
            Method::PUT => {
                credentials::put(
                    &state.credentials,
                    &state.transport,
                    &state.registry,
                    &principal,
                    &ep,
                    body,
                )
                .await
            }
            Method::DELETE => {
                credentials::delete(
                    &state.credentials,
                    &state.transport,
                    &state.registry,
                    &principal,
                    &ep,
                )
                .await
            }
            _ => credentials::get(&state.credentials, &principal, &ep),
        },
        Route::OpenApi => Reply::with_type(StatusCode::OK, "application/json", OPENAPI),
        // Answered before authentication; here only for the match to be whole.
        Route::Console(asset) => console::serve(&asset, &parts.headers),
        Route::Limits => {
            let endpoints = state.directory.count_in(&principal.domain);
            let mut body = serde_json::json!(state.limits.snapshot(&principal.domain, endpoints));
            body["notification-channel"] =
                notifications::channel_limits(&state.hub, &principal.key_id);
            Reply::json(StatusCode::OK, &body)
        }
        Route::Metrics | Route::Cluster
            if principal.domain != state.registry.default_domain() =>
        {
            daemon_wide_refused(&state)
        }
        Route::Cluster => Reply::json(
            StatusCode::OK,
            &state.cluster.body(
                &state.directory.count_by_owner(),
                state.counters.cluster_forwarded.get(),
                state.hub.owned_channels() as u64,
            ),
        ),
        Route::Metrics => {
            let mut out = String::new();
            state.counters.render(&mut out);
            metrics::store_health(&mut out, &state.store.health());
            metrics::gauge(
                &mut out,
                "cluster_members",
                "Nodes of the cluster whose heartbeat is current (1 on SQLite).",
                state.cluster.member_count() as u64,
            );
            metrics::gauge(
                &mut out,
                "cluster_owned_channels",
                "Notification channels this node delivers, holding their lease (all of them on SQLite).",
                state.hub.owned_channels() as u64,
            );
            metrics::gauge(
                &mut out,
                "cluster_owned_endpoints",
                "Endpoints registered with this node (all of them on SQLite); registered_endpoints also counts those of the other cluster nodes.",
                state
                    .cluster
                    .owned(&state.directory.count_by_owner(), state.cluster.node()) as u64,
            );
            metrics::gauge(
                &mut out,
                "registered_endpoints",
                "Endpoints registered now.",
                state.directory.len() as u64,
            );
            metrics::gauge(
                &mut out,
                "rest_connections",
                "REST connections open now (at most rest.max_connections).",
                state.connections.open() as u64,
            );
            metrics::gauge(
                &mut out,
                "websockets_connected",
                "WebSockets attached to their notification channel now (at most one per key and node).",
                state.hub.websockets() as u64,
            );
            let (deliveries, max_deliveries) = state.hub.deliveries();
            metrics::gauge(
                &mut out,
                "callback_deliveries",
                &format!(
                    "Callback deliveries in flight now (at most notifications.max_concurrent_deliveries = {max_deliveries})."
                ),
                deliveries as u64,
            );
            metrics::gauge(
                &mut out,
                "coap_dedup_entries",
                "Exchanges in the CoAP duplicate cache (at most coap.dedup_capacity).",
                state.transport.dedup_entries() as u64,
            );
            metrics::gauge(
                &mut out,
                "coap_block_transfers",
                &format!(
                    "Request bodies being received block-wise (Block1), at most {}.",
                    crate::coap::block1::MAX_TRANSFERS
                ),
                state.transport.block_transfers() as u64,
            );
            let dtls = state.transport.dtls_counts();
            metrics::gauge(
                &mut out,
                "coap_dtls_sessions",
                "DTLS sessions established now (at most coap.dtls_max_sessions per listener).",
                dtls.sessions as u64,
            );
            metrics::gauge(
                &mut out,
                "coap_dtls_handshakes_open",
                "DTLS handshakes half-open now (at most coap.dtls_max_handshakes per listener).",
                dtls.half_open as u64,
            );
            metrics::gauge(
                &mut out,
                "coap_tls_connections",
                "CoAP-over-TLS connections open now, handshakes included (at most coap.tls_max_connections per listener).",
                state.transport.tls_connections() as u64,
            );
            render_kernel_drops(&state, &mut out);
            render_queues(&state, &mut out);
            state.plugins.render_metrics(&mut out);
            Reply::with_type(StatusCode::OK, "text/plain; version=0.0.4", out)
        }
    }
    .method_is_head(parts.method == Method::HEAD)
}

/// Channels listed one by one in `connectord_channel_events_*` (those with the most
/// events waiting): a bound on the series a scrape returns however many keys there are.
pub const METRICS_TOP_CHANNELS: usize = 20;

/// `connectord_coap_kernel_drops_total{listener}`: what the kernel dropped at each UDP and
/// DTLS listener (`Transport::kernel_drops`).
fn render_kernel_drops(state: &AppState, out: &mut String) {
    use std::fmt::Write as _;
    let drops = state.transport.kernel_drops();
    if drops.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP connectord_coap_kernel_drops_total Datagrams the kernel dropped at a UDP or DTLS listener since it was bound (its receive buffer full while the daemon was behind, or a bad checksum), as of the last datagram received: their devices retransmit them."
    );
    let _ = writeln!(out, "# TYPE connectord_coap_kernel_drops_total counter");
    for (id, d) in drops {
        let _ = writeln!(
            out,
            "connectord_coap_kernel_drops_total{{listener=\"{id}\"}} {d}"
        );
    }
}

/// The notification and request queue gauges of `/metrics`.
fn render_queues(state: &AppState, out: &mut String) {
    use std::fmt::Write as _;
    let q = state.hub.queue_stats(METRICS_TOP_CHANNELS);
    metrics::gauge(
        out,
        "notification_channels",
        "Notification channels (keys that pulled or set a callback).",
        q.channels as u64,
    );
    metrics::gauge(
        out,
        "events_queued",
        "Notification events waiting in every channel, not yet acknowledged.",
        q.queued as u64,
    );
    metrics::gauge(
        out,
        "events_unacknowledged",
        "Notification events answered to a long-poll, not yet acknowledged by the next pull.",
        q.unacknowledged as u64,
    );
    let per_channel = [
        (
            "channel_events_queued",
            "Events waiting per channel (key id), for the channels with the most waiting",
        ),
        (
            "channel_events_unacknowledged",
            "Events answered to a long-poll and not yet acknowledged, per channel, for the same channels",
        ),
    ];
    for (i, (name, help)) in per_channel.into_iter().enumerate() {
        let _ = writeln!(
            out,
            "# HELP connectord_{name} {help} (at most {METRICS_TOP_CHANNELS})."
        );
        let _ = writeln!(out, "# TYPE connectord_{name} gauge");
        for (key, queued, unacked) in &q.top {
            let v = if i == 0 { queued } else { unacked };
            let _ = writeln!(
                out,
                "connectord_{name}{{key=\"{}\"}} {v}",
                metrics::label_value(key)
            );
        }
    }
    let (waiting, deepest, in_flight) = state.requests.queue_depths();
    metrics::gauge(
        out,
        "requests_queued",
        "Requests to devices waiting in the per-endpoint queues (not in flight).",
        waiting as u64,
    );
    metrics::gauge(
        out,
        "requests_queue_max",
        "Requests waiting in the longest queue of one endpoint (at most requests.queue_len).",
        deepest as u64,
    );
    metrics::gauge(
        out,
        "requests_in_flight",
        "Requests to devices sent and not yet answered (at most one per endpoint).",
        in_flight as u64,
    );
}

/// The core routes whose body is JSON: `PUT /notification/callback`, `PUT /subscriptions`
/// (an array), `POST /api/cert`. Resource routes take any media type.
fn takes_json(route: &Route, method: &Method) -> bool {
    matches!(
        (route, method),
        (Route::NotificationCallback, &Method::PUT)
            | (Route::Subscriptions, &Method::PUT)
            | (Route::Cert, &Method::POST)
            | (Route::DeviceCredential(_), &Method::PUT)
            | (Route::DeviceRequest(_), &Method::POST)
    )
}

/// 415 for a JSON route whose `Content-Type` is present and not JSON (`application/json`
/// or a `+json` type, parameters allowed); an absent one is taken as JSON, as the
/// official SDKs sometimes send none.
fn refuse_non_json(parts: &http::request::Parts) -> Option<Reply> {
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    connectord_plugin_sdk::http::refuse_non_json(content_type.as_deref())
        .err()
        .map(|m| {
            error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                &m,
            )
        })
}

/// 408: the request body did not arrive within `rest.client_timeout_s`.
/// Reads a request body whole, within `requests.max_body` (413) and the client timeout
/// (408); a body that fails to arrive otherwise is 400.
async fn read_body(state: &AppState, body: Incoming, errs: &ErrorTypes) -> Result<Bytes, Reply> {
    // No body (a GET, a read: nearly every request): nothing to wait for, so no timer.
    // The timeout's timer entry and the collector were about 550 instructions per proxied
    // read (callgrind, issue 24).
    if hyper::body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    let read = Limited::new(body, state.max_body).collect();
    let Ok(read) = tokio::time::timeout(state.connections.timeout(), read).await else {
        return Err(body_timeout(errs));
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &errs.payload_too_large,
                    &format!(
                        "the request body is larger than {} bytes (requests.max_body, or on a cluster what one NATS message carries)",
                        state.max_body
                    ),
                ));
            }
            Err(error(
                StatusCode::BAD_REQUEST,
                &errs.bad_request,
                &format!("cannot read the request body: {e}"),
            ))
        }
    }
}

fn body_timeout(errs: &ErrorTypes) -> Reply {
    error(
        StatusCode::REQUEST_TIMEOUT,
        &errs.request_timeout,
        "the request body did not arrive within rest.client_timeout_s",
    )
}

/// Authenticates a request through the auth chain: 401 (with `WWW-Authenticate`) when no
/// backend accepts it, 503 when a backend cannot answer; `errs` spells their `type`. An
/// address past `rest.auth_failures_per_minute` failures is answered 429 with
/// `Retry-After` before its credentials are looked at ([`throttle`]).
async fn authenticate(
    state: &AppState,
    req: &Request<Incoming>,
    peer: IpAddr,
    errs: &ErrorTypes,
) -> Result<Arc<Principal>, Reply> {
    let throttle = state.connections.auth_throttle();
    if let throttle::Verdict::Wait { after, log } = throttle.verdict(peer) {
        Counters::inc(&state.counters.rest_auth_throttled);
        // Whole seconds, rounded up: a client that waits that long may try.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if log {
            tracing::warn!(
                "REST requests from {} refused unchecked (429) for {secs} s: their credentials \
                 failed more than rest.auth_failures_per_minute times; logged once a minute \
                 per address, counted in rest_auth_throttled_total",
                throttle::counted_as(peer),
            );
        }
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            &errs.too_many_requests,
            &format!(
                "too many failed authentications from this address (rest.auth_failures_per_minute); try again in {secs} s"
            ),
        )
        .header(http::header::RETRY_AFTER, &secs.to_string()));
    }
    match state
        .auth
        .authenticate(req.method(), req.uri().path(), req.headers())
        .await
    {
        Ok(p) => Ok(p),
        Err(AuthError::Unauthenticated(why)) => {
            count_failure(state, peer);
            Err(error(StatusCode::UNAUTHORIZED, &errs.unauthorized, &why)
                .header(http::header::WWW_AUTHENTICATE, "Bearer"))
        }
        Err(AuthError::Unavailable(why)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            &errs.unavailable,
            &why,
        )),
    }
}

/// A plugin route open to any authenticated caller (the plugin checks permissions).
/// 403 for `/metrics` and `/v2/cluster` asked with a key of another domain than the
/// default one.
///
/// Decision: both describe the whole daemon, every domain's (per-key series name the keys
/// of every domain; the counts cover every tenant's endpoints and traffic), so they are
/// the operator's: only keys of `registry.default_domain` (where the first admin key is)
/// read them. A tenant's `admin` key implies `metrics:read`, and so read other tenants'
/// key ids and counts.
fn daemon_wide_refused(state: &AppState) -> Reply {
    error(
        StatusCode::FORBIDDEN,
        "forbidden",
        &format!(
            "the daemon's metrics and cluster state cover every domain: only keys of the default domain ({}) may read them",
            state.registry.default_domain()
        ),
    )
}

async fn dispatch_plugin_route(
    state: &AppState,
    req: Request<Incoming>,
    peer: IpAddr,
    plugin: String,
    path: String,
    errs: &ErrorTypes,
) -> Reply {
    let principal = match authenticate(state, &req, peer, errs).await {
        Ok(p) => p,
        Err(reply) => return reply,
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(state, body, errs).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let reply = plugin_route(state, &principal, &parts, body, &plugin, &path, errs).await;
    failed_in_plugin(state, peer, reply)
}

/// A plugin's route that refuses its caller's credentials itself (401: `headerkeys`' own
/// area wants its own pair, whoever the core authenticated) counts as a failed
/// authentication of the address (`rest.auth_failures_per_minute`), as the core's 401s do:
/// otherwise any valid key would open an unbounded guess at that area's pair.
fn failed_in_plugin(state: &AppState, peer: IpAddr, reply: Reply) -> Reply {
    if reply.status() == StatusCode::UNAUTHORIZED {
        count_failure(state, peer);
    }
    reply
}

/// Counts a failed authentication of `peer` (`rest_unauthorized`, and [`throttle`]).
fn count_failure(state: &AppState, peer: IpAddr) {
    Counters::inc(&state.counters.rest_unauthorized);
    let throttle = state.connections.auth_throttle();
    if throttle.failed(peer) {
        tracing::warn!(
            "failed authentications from {} not counted: {} addresses are counting theirs \
             (rest.auth_failures_per_minute); logged once a minute",
            throttle::counted_as(peer),
            throttle::MAX_ADDRESSES
        );
    }
}

/// A request on a route a plugin serves: handed to the plugin as `http`.
async fn plugin_route(
    state: &AppState,
    who: &Principal,
    parts: &http::request::Parts,
    body: Bytes,
    plugin: &str,
    path: &str,
    errs: &ErrorTypes,
) -> Reply {
    use connectord_plugin_sdk::auth::PrincipalSpec;
    use connectord_plugin_sdk::http::{HttpRequest, HttpResponse, OP_HTTP};
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return error(
            StatusCode::BAD_REQUEST,
            &errs.bad_request,
            "the request body is not UTF-8",
        );
    };
    let req = HttpRequest {
        method: parts.method.to_string(),
        path: path.to_string(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        principal: PrincipalSpec {
            key_id: who.key_id.clone(),
            domain: who.domain.clone(),
            scopes: who.scopes.clone(),
            allow: who.allow.clone(),
            creator: None,
        },
        backend: who.backend.clone(),
    };
    match state
        .plugins
        .call_json::<_, HttpResponse>(plugin, OP_HTTP, &req)
        .await
    {
        Ok(r) => match StatusCode::from_u16(r.status) {
            Ok(status) => {
                // A state change on a plugin route may have revoked or deleted keys: their
                // channels are dropped before the answer, so that once a revocation is
                // answered no event reaches them.
                if status.is_success() && !matches!(parts.method, Method::GET | Method::HEAD) {
                    crate::revocation::sweep(&state.auth, &state.hub, &state.subscriptions).await;
                }
                // Decision: a plugin sees only that a state call failed, so its 500 while
                // the store is failing is answered as the core's routes answer a failing
                // store: 503, try again (in the route's own error spelling).
                if status == StatusCode::INTERNAL_SERVER_ERROR
                    && state.store.health().failing.is_some()
                {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &errs.unavailable,
                        reply::STORE_FAILING,
                    );
                }
                let challenged = r
                    .headers
                    .keys()
                    .any(|k| k.eq_ignore_ascii_case("www-authenticate"));
                let reply = Reply::raw(status, &r.headers, r.body);
                // A 401 names its scheme (RFC 9110 §11.6.1), as the core's do; a plugin
                // that names none (`headerkeys`' own area) gets the core's.
                if status == StatusCode::UNAUTHORIZED && !challenged {
                    return reply.header(http::header::WWW_AUTHENTICATE, "Bearer");
                }
                reply
            }
            Err(_) => error(
                StatusCode::BAD_GATEWAY,
                "plugin_error",
                &format!("plugin {plugin} answered an invalid status"),
            ),
        },
        Err(e) => {
            // Caused by a client one request at a time: budgeted like a device's lines.
            if connectord_core::log_budget::allow(
                connectord_core::log_budget::DeviceLine::PluginRouteFailed,
            ) {
                tracing::error!("{e}");
            }
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_error",
                &e.to_string(),
            )
        }
    }
}
