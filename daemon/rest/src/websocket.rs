//! The WebSocket notification channel (issue 23), as Pelion Device Management Connect
//! has it: `PUT|GET|DELETE /notification/websocket` registers, shows and removes a key's
//! WebSocket channel; `GET /notification/websocket-connect` opens the socket its
//! notifications are pushed to.
//!
//! The socket is served by tokio-tungstenite over hyper's upgrade (no framing of ours).
//! Each text frame is one notification message, the same JSON a long-poll answers
//! (`wire::message`). Delivery is at least once and runs on the hub's long-poll
//! machinery ([`Hub::pull_for_socket`]): a frame is the key's answer in flight; a ping
//! follows it, and the peer's pong (sent after it read the frame, frames being read in
//! order) is the answer's [`Ticket::sent`](crate::events::hub::Ticket::sent), so the
//! socket's next pull acknowledges it. A socket that ends before that pong puts the
//! batch back for the next socket. While idle, a ping goes out every
//! `notifications.websocket_ping_interval_s`; a pong that does not come within that
//! interval drops the socket (no close frame: the client sees 1006, abnormal).
//!
//! Close codes (Pelion's): 1000 answers a client's own close; 1001 when another socket
//! of the key opened, or the channel was deleted or replaced by a callback; 1008 when the
//! key no longer authenticates (revoked); 1011 when the key has no WebSocket channel
//! (no `PUT /notification/websocket` first) or the state store fails; 1012 when the
//! daemon stops. A client that breaks the protocol gets RFC 6455's codes: 1009 for a
//! message or frame over 64 KiB, 1007 for a text message that is not UTF-8, 1002 for any
//! other protocol error (an unmasked frame, a reserved opcode or bit).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::request::Parts;
use http::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::reply::{Reply, error};
use crate::auth::Principal;
use crate::events::Hub;
use crate::events::hub::{Attached, Pulled, SocketEnd};
use crate::metrics::Counters;

/// The subprotocol a browser names (with its key as `pelion_ak_<key>`), and the one the
/// daemon answers with.
pub const SUBPROTOCOL: &str = "wss";

/// The prefix of the key in `Sec-WebSocket-Protocol` (browsers cannot set
/// `Authorization` on a WebSocket).
pub const KEY_PREFIX: &str = "pelion_ak_";

/// Largest message a client may send (the daemon reads only pongs and closes; anything
/// else is dropped): a client cannot make the daemon buffer more.
const MAX_INCOMING: usize = 64 * 1024;

/// The slowest link a frame's pong waits for, in bytes a second (128 kbit/s): after a
/// frame the pong may take a ping interval and the frame's length at this rate (a 512 KiB
/// frame: 32 s more), since the frame's tail may still be in the kernel's buffers when
/// its write ends.
const SLOW_LINK_BYTES_PER_S: f64 = 16.0 * 1024.0;

/// How long a closing socket waits for the peer's close frame before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// `PUT|GET|DELETE /notification/websocket`: Pelion's `WebsocketChannel`
/// (`{"queue_size", "status": "connected"|"disconnected"}`); PUT 201 when it created the
/// channel, 200 when the key had one; GET 200 or 404; DELETE 204 or 404.
pub async fn channel(hub: &Arc<Hub>, who: &Principal, parts: &Parts) -> Reply {
    match parts.method {
        Method::PUT => match hub.register_websocket(who).await {
            Ok(created) => {
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                match hub.websocket(&who.key_id) {
                    Some(info) => Reply::json(status, &body(info)),
                    // Deleted again in the meantime.
                    None => not_registered(),
                }
            }
            Err(e) => super::reply::store_failure(&e, "WebSocket channel not stored"),
        },
        Method::GET => match hub.websocket(&who.key_id) {
            Some(info) => Reply::json(StatusCode::OK, &body(info)),
            None => not_registered(),
        },
        _ => match hub.delete_websocket(&who.key_id).await {
            Ok(true) => Reply::empty(StatusCode::NO_CONTENT),
            Ok(false) => not_registered(),
            Err(e) => super::reply::store_failure(&e, "WebSocket channel not removed"),
        },
    }
}

fn body(info: crate::events::hub::WebsocketInfo) -> serde_json::Value {
    serde_json::json!({
        "queue_size": info.queue_size,
        "status": if info.connected { "connected" } else { "disconnected" },
    })
}

fn not_registered() -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no WebSocket channel is registered for this access key",
    )
}

/// For a browser's `GET /notification/websocket-connect`: a key given as
/// `Sec-WebSocket-Protocol: wss, pelion_ak_<key>` becomes `Authorization: Bearer <key>`
/// (unless the request has an `Authorization` already), so that the auth chain reads it
/// as it reads any key.
pub fn key_from_subprotocol(headers: &mut HeaderMap) {
    if headers.contains_key(http::header::AUTHORIZATION) {
        return;
    }
    let key = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(KEY_PREFIX).map(str::to_owned));
    if let Some(Ok(v)) = key.map(|k| HeaderValue::from_str(&format!("Bearer {k}"))) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
}

/// What a WebSocket needs from the daemon.
pub struct Socket {
    pub hub: Arc<Hub>,
    pub counters: Arc<Counters>,
    /// `notifications.websocket_ping_interval_s`.
    pub ping: Duration,
    /// Checks the socket's credentials again at each revocation sweep
    /// ([`watch_credentials`]).
    pub auth: crate::auth::AuthChain,
}

/// `GET /notification/websocket-connect`: checks the handshake (400, 426), answers 101
/// and serves the socket on its own task once hyper hands the connection over. A key
/// without a WebSocket channel gets the socket and then close 1011, as on Pelion.
pub fn connect(socket: Socket, who: Arc<Principal>, parts: &mut Parts) -> Reply {
    let h = &parts.headers;
    let has_token = |name, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(UPGRADE, "websocket") || !has_token(CONNECTION, "upgrade") {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "this route opens a WebSocket: send Upgrade: websocket and Connection: Upgrade \
             (HTTP/1.1)",
        );
    }
    if h.get(SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "only WebSocket version 13 (RFC 6455) is served",
        )
        .header(SEC_WEBSOCKET_VERSION, "13");
    }
    let Some(key) = h.get(SEC_WEBSOCKET_KEY) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the WebSocket handshake has no Sec-WebSocket-Key",
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let wss = has_token(SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    let Some(upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a WebSocket is opened over HTTP/1.1",
        );
    };
    // The connection's slot is held while the socket lives (`conn::Upgrades`).
    let hold = parts
        .extensions
        .get::<super::conn::Upgrades>()
        .and_then(super::conn::Upgrades::hold);
    let attached = socket.hub.attach_socket(&who.key_id);
    // Dropped when the socket ends: its credentials' watcher stops then.
    let (serving, done) = tokio::sync::oneshot::channel::<()>();
    if let Some(a) = &attached {
        tokio::spawn(watch_credentials(
            socket.auth.clone(),
            Arc::downgrade(&socket.hub),
            who.key_id.clone(),
            a.id(),
            (
                parts.method.clone(),
                parts.uri.path().to_string(),
                parts.headers.clone(),
            ),
            done,
        ));
    }
    tokio::spawn(async move {
        let _hold = hold;
        let _serving = serving;
        let io = match upgrade.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(key = %who.key_id, "WebSocket upgrade failed: {e}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_INCOMING))
            .max_frame_size(Some(MAX_INCOMING));
        let io = Progress {
            inner: TokioIo::new(io),
            written: Arc::new(AtomicU64::new(0)),
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        serve(ws, socket, &who, attached).await;
    });
    let mut reply = Reply::empty(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, &accept);
    if wss {
        reply = reply.header(SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    }
    reply
}

/// Ends socket `id` of `key_id` (1008) when, at a revocation sweep, the credentials it was
/// opened with no longer authenticate as its key, although the key lives on: a
/// `headerkeys` pair changed (every pair is the one key `headerkeys`, so the sweep of dead
/// keys never drops its channel). Before, a socket opened with a retired pair went on
/// receiving the key's events. The channel, its queue and its subscriptions stay (they
/// are the key's); a client reconnects with the new pair. A backend that cannot answer
/// leaves the socket open (as the sweep leaves a channel).
async fn watch_credentials(
    auth: crate::auth::AuthChain,
    hub: std::sync::Weak<Hub>,
    key_id: String,
    id: u64,
    (method, path, headers): (http::Method, String, HeaderMap),
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    let mut sweeps = auth.sweeps();
    // A sweep that ran between the handshake's authentication and this subscription is
    // not missed: the first pass checks at once (a reused verdict, usually).
    sweeps.mark_changed();
    loop {
        tokio::select! {
            _ = &mut done => return,
            changed = sweeps.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let still = match auth.authenticate(&method, &path, &headers).await {
            Ok(p) => p.key_id == key_id,
            Err(crate::auth::AuthError::Unauthenticated(_)) => false,
            Err(crate::auth::AuthError::Unavailable(_)) => true,
        };
        if !still {
            tracing::info!(key = %key_id, "notification WebSocket closed: the credentials it was opened with no longer authenticate as its key");
            if let Some(hub) = hub.upgrade() {
                hub.revoke_socket(&key_id, id);
            }
            return;
        }
    }
}

/// How a socket ended (logged).
#[derive(Debug)]
enum End {
    /// The client closed, or its connection ended.
    Client(String),
    /// No pong within the ping interval: dropped without a close frame.
    NoPong,
    /// A frame or ping of which the connection took no byte for a ping interval (the
    /// client does not read, and its TCP window stays shut): dropped without a close
    /// frame, which could not be written either.
    Stalled,
    /// The daemon closed it with this code.
    Closed(u16, &'static str),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Client(why) => f.write_str(why),
            End::NoPong => {
                f.write_str("no pong within notifications.websocket_ping_interval_s; dropped")
            }
            End::Stalled => f.write_str(
                "the connection took no byte of a frame for notifications.websocket_ping_interval_s (the client does not read); dropped",
            ),
            End::Closed(code, why) => write!(f, "closed with {code}: {why}"),
        }
    }
}

type Io = WebSocketStream<Progress<TokioIo<hyper::upgrade::Upgraded>>>;
type Rx = futures_util::stream::SplitStream<Io>;

/// The sending half of a socket, with the bytes its connection has taken so far.
struct Tx {
    sink: futures_util::stream::SplitSink<Io, Message>,
    written: Arc<AtomicU64>,
}

/// A socket's connection, counting the bytes written to it: a write is stalled when none
/// go in for a whole ping interval ([`write`]), however long a slow client takes to read
/// a big frame.
struct Progress<T> {
    inner: T,
    written: Arc<AtomicU64>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Progress<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T> Progress<T> {
    /// Counts what a write took.
    fn counted(
        &self,
        r: std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Progress<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.counted(r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.counted(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one socket until it ends.
async fn serve(ws: Io, socket: Socket, who: &Principal, attached: Option<Attached>) {
    let written = Arc::clone(&ws.get_ref().written);
    let (sink, mut rx) = ws.split();
    let mut tx = Tx { sink, written };
    let end = match attached {
        None => End::Closed(
            1011,
            "no WebSocket channel is registered for this access key (PUT /v2/notification/websocket first)",
        ),
        Some(mut attached) => {
            Counters::inc(&socket.counters.websockets_opened);
            tracing::debug!(key = %who.key_id, "WebSocket connected");
            deliver(&socket, who, &mut attached, &mut tx, &mut rx).await
        }
    };
    match &end {
        End::Closed(code, reason) => {
            let frame = CloseFrame {
                code: CloseCode::from(*code),
                reason: (*reason).into(),
            };
            // Bounded: a client that does not read would hold the close for good.
            let close = tx.sink.send(Message::Close(Some(frame)));
            let sent = tokio::time::timeout(CLOSE_WAIT, close);
            if matches!(sent.await, Ok(Ok(()))) {
                // The peer answers with its own close; then the connection ends.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    while let Some(Ok(_)) = rx.next().await {}
                })
                .await;
            }
        }
        // Flushes tungstenite's answer to the client's close (its own code echoed).
        End::Client(_) => {
            let _ = tokio::time::timeout(CLOSE_WAIT, tx.sink.close()).await;
        }
        // Dropped: the peer sees the connection end without a close frame (1006).
        End::NoPong | End::Stalled => {}
    }
    tracing::debug!(key = %who.key_id, "WebSocket ended: {end}");
}

/// Pushes the key's notifications until the socket ends.
async fn deliver(
    socket: &Socket,
    who: &Principal,
    attached: &mut Attached,
    tx: &mut Tx,
    rx: &mut Rx,
) -> End {
    let mut stop = attached.stop.clone();
    let mut pings: u64 = 0;
    loop {
        let pulled = tokio::select! {
            biased;
            why = &mut attached.end => return hub_end(why.ok()),
            _ = stop.recv() => return stopping(),
            m = rx.next() => match incoming(m) {
                Some(end) => return end,
                None => continue,
            },
            r = socket.hub.pull_for_socket(who, Some(socket.ping), std::future::pending()) => r,
        };
        pings += 1;
        let ping = pings.to_be_bytes();
        match pulled {
            Ok(Pulled::Batch(batch)) => {
                let message = super::wire::message(&batch.events);
                // The frame's tail may still sit in the kernel's buffers when its write
                // ends: a slow client's pong comes once it has read that too.
                let grace = Duration::from_secs_f64(message.len() as f64 / SLOW_LINK_BYTES_PER_S);
                if let Err(end) =
                    write(socket, attached, &mut stop, tx, Message::text(message)).await
                {
                    // The ticket's drop puts the batch back.
                    return end;
                }
                Counters::inc(&socket.counters.websocket_frames_sent);
                match ponged(socket, attached, &mut stop, tx, rx, &ping, grace).await {
                    Ok(()) => {
                        // Read: the socket's next pull acknowledges it.
                        drop(batch.ticket.sent());
                        Counters::inc(&socket.counters.websocket_frames_acknowledged);
                    }
                    Err(end) => return end,
                }
            }
            // Idle for an interval: is the peer still there?
            Ok(Pulled::Empty | Pulled::Gone) => {
                if let Err(end) =
                    ponged(socket, attached, &mut stop, tx, rx, &ping, Duration::ZERO).await
                {
                    return end;
                }
            }
            Ok(Pulled::NoWebsocket | Pulled::CallbackActive | Pulled::WebsocketActive) => {
                return End::Closed(1001, "the WebSocket channel was removed");
            }
            Err(e) => {
                super::reply::store_failure(&e, "WebSocket delivery");
                return End::Closed(1011, "internal error: the state store is failing");
            }
        }
    }
}

/// Sends a ping and waits for its pong, up to one ping interval and `grace`.
async fn ponged(
    socket: &Socket,
    attached: &mut Attached,
    stop: &mut crate::shutdown::Shutdown,
    tx: &mut Tx,
    rx: &mut Rx,
    ping: &[u8],
    grace: Duration,
) -> Result<(), End> {
    write(
        socket,
        attached,
        stop,
        tx,
        Message::Ping(ping.to_vec().into()),
    )
    .await?;
    let deadline = Instant::now() + socket.ping + grace;
    loop {
        tokio::select! {
            biased;
            why = &mut attached.end => return Err(hub_end(why.ok())),
            _ = stop.recv() => {
                return Err(stopping());
            }
            _ = tokio::time::sleep_until(deadline) => return Err(End::NoPong),
            m = rx.next() => match m {
                Some(Ok(Message::Pong(p))) if p.as_ref() == ping => return Ok(()),
                other => {
                    if let Some(end) = incoming(other) {
                        return Err(end);
                    }
                }
            },
        }
    }
}

/// Writes one message (a frame, a ping), or ends the socket when its connection takes
/// no byte for a whole ping interval: a client that stops reading, its TCP window shut,
/// would otherwise hold the write, the socket and its unacknowledged batch for good,
/// unseen by the pings (before, nothing bounded it, nor raced it against the daemon
/// stopping or another socket taking the channel). A slow client that goes on reading
/// keeps its socket, however long a big frame takes. The batch of a dropped socket goes
/// back to the channel ([`deliver`]), for the next socket.
async fn write(
    socket: &Socket,
    attached: &mut Attached,
    stop: &mut crate::shutdown::Shutdown,
    tx: &mut Tx,
    m: Message,
) -> Result<(), End> {
    let written = Arc::clone(&tx.written);
    let send = tx.sink.send(m);
    tokio::pin!(send);
    let mut seen = written.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            biased;
            why = &mut attached.end => return Err(hub_end(why.ok())),
            _ = stop.recv() => {
                return Err(stopping());
            }
            r = &mut send => {
                return r.map_err(|e| End::Client(format!("a message was not written: {e}")));
            }
            _ = tokio::time::sleep(socket.ping) => {
                let now = written.load(Ordering::Relaxed);
                if now == seen {
                    return Err(End::Stalled);
                }
                seen = now;
            }
        }
    }
}

/// The end of a socket whose daemon stops (1012, service restart).
fn stopping() -> End {
    End::Closed(1012, "the daemon is restarting or stopping")
}

/// A message from the client: `Some` when it ends the socket. Other frames (text,
/// binary, stale pongs) are read and dropped; tungstenite answers pings itself.
/// A client that broke the protocol gets the close code RFC 6455 §7.4.1 gives for it
/// (before, an empty close frame, which the client reads as 1005: an outside review).
fn incoming(m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<End> {
    use tokio_tungstenite::tungstenite::Error;
    match m {
        None => Some(End::Client("the connection ended".into())),
        Some(Err(Error::Capacity(_))) => Some(End::Closed(
            1009,
            "a message or frame from the client is over the 64 KiB limit",
        )),
        Some(Err(Error::Utf8(_))) => Some(End::Closed(
            1007,
            "a text message from the client is not valid UTF-8",
        )),
        Some(Err(Error::Protocol(e))) if !is_connection_end(&e) => {
            Some(End::Closed(1002, "the client broke the WebSocket protocol"))
        }
        Some(Err(e)) => Some(End::Client(format!("read failed: {e}"))),
        Some(Ok(Message::Close(frame))) => Some(End::Client(format!(
            "closed by the client ({})",
            frame.map_or_else(|| "no code".to_string(), |f| u16::from(f.code).to_string())
        ))),
        Some(Ok(_)) => None,
    }
}

/// A protocol error that says the connection ended rather than that the client sent
/// something wrong: no close frame can follow it.
fn is_connection_end(e: &tokio_tungstenite::tungstenite::error::ProtocolError) -> bool {
    use tokio_tungstenite::tungstenite::error::ProtocolError as P;
    matches!(
        e,
        P::ResetWithoutClosingHandshake | P::SendAfterClosing | P::ReceivedAfterClosing
    )
}

/// The close for a socket the hub ended (`None`: the hub went away, the daemon stops).
fn hub_end(why: Option<SocketEnd>) -> End {
    match why {
        Some(SocketEnd::Replaced) => {
            End::Closed(1001, "another WebSocket of this access key opened")
        }
        Some(SocketEnd::ChannelRemoved) => End::Closed(1001, "the WebSocket channel was removed"),
        Some(SocketEnd::Revoked) => End::Closed(1008, "the access key is no longer valid"),
        None => stopping(),
    }
}
