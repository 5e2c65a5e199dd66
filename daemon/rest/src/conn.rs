//! Bounds on the REST server's connections: how many are served at once
//! (`rest.max_connections`), how many of them one client address may hold
//! (`rest.max_connections_per_address`, [`Connections::admit_address`]), and how long the
//! daemon waits on a client (`rest.client_timeout_s`; [`QUIET`] for one that sends nothing)
//! before closing its connection. [`ClientIo`] also gives hyper's own parse-error answers
//! the JSON error body ([`json_rejection`]).
//!
//! The wait is bounded at every point where a client could otherwise hold a connection
//! (and its buffers) forever: before its first request ([`first_request_within`]: nothing
//! sent, half an HTTP/2 preface), for a request head and between HTTP/1 keep-alive
//! requests (hyper's header read timeout), for a request body (`rest::dispatch`, 408),
//! while a response waits for a client that does not read it, and while a connection has
//! no request in flight and the client sends nothing ([`ClientIo`]; hyper has no idle
//! timeout for HTTP/2, so an idle HTTP/2 connection would otherwise hold its slot for
//! good).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Largest request head (HTTP/1 read buffer, HTTP/2 header list); 431 beyond. hyper's
/// default (about 400 KiB) times `rest.max_connections` would be the REST server's largest
/// memory term.
pub const MAX_HEAD: usize = 64 * 1024;

/// How long a connection may send nothing at all before it is closed (or
/// `rest.client_timeout_s` if shorter): a client that connects and says nothing holds a
/// slot for this long, not for the whole client timeout. Once a byte has come, hyper's
/// header read timeout (`rest.client_timeout_s`) bounds the rest of the head.
pub const QUIET: Duration = Duration::from_secs(5);

/// A refused address is logged at most once per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Addresses remembered for [`REFUSAL_LOG_INTERVAL`]; past this many, the ones whose
/// interval is over are forgotten.
const REFUSAL_LOG_ADDRESSES: usize = 4096;

/// Connections open per client address.
type ByAddress = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// `rest.max_connections`, `rest.max_connections_per_address`, `rest.client_timeout_s`,
/// and the connections open now.
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
    /// `rest.max_connections_per_address`: below `max`, so one address (a slowloris) cannot
    /// take every slot; what it cannot take is the reserve the other addresses are served
    /// from.
    per_address: usize,
    by_address: ByAddress,
    /// When each refused address was last logged (the log stays bounded under a flood).
    logged: Mutex<HashMap<IpAddr, Instant>>,
    timeout: Duration,
    /// `rest.tls_handshake_timeout_s`.
    tls_handshake_timeout: Duration,
    /// `rest.auth_failures_per_minute`.
    auth_throttle: crate::throttle::AuthThrottle,
}

/// A connection's share of its client address's bound; given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    by_address: ByAddress,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A connection refused for its address; `log` when it is the first of the address in
/// [`REFUSAL_LOG_INTERVAL`].
#[derive(Debug)]
pub struct Refused {
    pub log: bool,
    pub limit: usize,
}

/// What a refused connection is told before it is closed (best effort: written only if
/// the socket takes it at once).
pub fn refusal_response() -> Vec<u8> {
    let body = serde_json::json!({
        "type": "service_unavailable",
        "message": "too many connections from this address (rest.max_connections_per_address)",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Connections {
    pub fn new(cfg: &crate::config::RestConfig) -> Connections {
        Connections {
            permits: Arc::new(Semaphore::new(cfg.max_connections)),
            max: cfg.max_connections,
            per_address: cfg.max_connections_per_address.min(cfg.max_connections),
            by_address: Arc::default(),
            logged: Mutex::default(),
            timeout: Duration::from_secs(cfg.client_timeout_s),
            tls_handshake_timeout: Duration::from_secs(cfg.tls_handshake_timeout_s),
            auth_throttle: crate::throttle::AuthThrottle::new(cfg.auth_failures_per_minute),
        }
    }

    /// The failed authentications counted per client address
    /// (`rest.auth_failures_per_minute`).
    pub fn auth_throttle(&self) -> &crate::throttle::AuthThrottle {
        &self.auth_throttle
    }

    /// Room for one more connection from `ip` (IPv4-mapped IPv6 counts as IPv4), or why
    /// not.
    pub fn admit_address(&self, ip: IpAddr) -> Result<AddressSlot, Refused> {
        let ip = ip.to_canonical();
        {
            let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n < self.per_address {
                *n += 1;
                return Ok(AddressSlot {
                    by_address: Arc::clone(&self.by_address),
                    ip,
                });
            }
        }
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() >= REFUSAL_LOG_ADDRESSES {
            logged.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
        }
        let log = match logged.get(&ip) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
            _ => logged.len() < REFUSAL_LOG_ADDRESSES,
        };
        if log {
            logged.insert(ip, now);
        }
        Err(Refused {
            log,
            limit: self.per_address,
        })
    }

    /// Waits for room for one more connection; the permit is its slot.
    pub async fn admit(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }

    /// A slot for a connection just accepted, if one is free now.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// `rest.client_timeout_s`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `rest.tls_handshake_timeout_s`.
    pub fn tls_handshake_timeout(&self) -> Duration {
        self.tls_handshake_timeout
    }

    /// The connection builder: HTTP/1 and HTTP/2, heads up to [`MAX_HEAD`], and hyper's
    /// header read timeout, which also closes idle keep-alive connections (hyper starts it
    /// whenever it waits for a request head).
    pub fn builder(&self) -> Builder<TokioExecutor> {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeout)
            .max_buf_size(MAX_HEAD);
        builder.http2().max_header_list_size(MAX_HEAD as u32);
        builder
    }
}

/// Runs a connection, closing it (`None`) when no request arrived within `timeout`, or
/// when its client sent no byte at all within `quiet` (see [`QUIET`]). hyper's head
/// timeout starts only once it knows the protocol, so the wait before that is bounded
/// here. `first` is notified by the service for every request; `activity` knows whether
/// anything was read.
pub async fn first_request_within<F: Future>(
    conn: F,
    first: &Notify,
    activity: &Activity,
    quiet: Duration,
    timeout: Duration,
) -> Option<F::Output> {
    tokio::pin!(conn);
    let started = Instant::now();
    let deadline = async {
        tokio::time::sleep(quiet.min(timeout)).await;
        if activity.has_read() {
            tokio::time::sleep_until(started + timeout).await;
        }
    };
    tokio::select! {
        r = conn.as_mut() => return Some(r),
        _ = first.notified() => {}
        _ = deadline => return None,
    }
    Some(conn.await)
}

/// A connection's hold for the WebSocket it may be upgraded to (issue 23), put in every
/// request's extensions: once hyper hands the connection to a socket, the connection's
/// slot (`rest.max_connections` and its address's share) stays taken until the socket
/// ends, and the socket counts as a request in flight (so [`ClientIo`]'s idle timeout
/// does not close it; its write timeout still drops a peer that stops reading).
#[derive(Clone)]
pub struct Upgrades {
    /// Weak: only a socket keeps the connection's wait open, not a request's handler.
    held: tokio::sync::mpsc::WeakSender<()>,
    activity: Arc<Activity>,
}

/// A socket's hold on its connection ([`Upgrades::hold`]).
pub struct Held {
    _held: tokio::sync::mpsc::Sender<()>,
    _in_flight: InFlight,
}

impl Upgrades {
    /// The hold of a connection, and what [`Upgrades::released`] waits on.
    pub fn new(activity: &Arc<Activity>) -> (Upgrades, tokio::sync::mpsc::Sender<()>, Released) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (
            Upgrades {
                held: tx.downgrade(),
                activity: Arc::clone(activity),
            },
            tx,
            Released(rx),
        )
    }

    /// Holds the connection for a socket; `None` once the connection has ended.
    pub fn hold(&self) -> Option<Held> {
        Some(Held {
            _held: self.held.upgrade()?,
            _in_flight: self.activity.begin(),
        })
    }
}

/// Resolves once every socket of a connection has ended (after the connection's own
/// sender was dropped).
pub struct Released(tokio::sync::mpsc::Receiver<()>);

impl Released {
    pub async fn wait(mut self) {
        let _ = self.0.recv().await;
    }
}

/// What to do if a connection fails after a response was handed to it: a long-poll
/// answer's events are queued again (`rest::reply::Body`).
pub type OnFailure = Box<dyn FnOnce() + Send>;

/// The requests in flight on one connection, when the last one ended, and whether the
/// client's socket failed.
pub struct Activity {
    requests: Mutex<(usize, Instant)>,
    /// Undo actions of the responses handed to the connection since its last request
    /// began (a new request on the connection means the client read them; at most one
    /// long-poll answer per key is in flight, so this stays short).
    on_failure: Mutex<Vec<OnFailure>>,
    /// A read or write of the client's socket failed, or a write made no progress for
    /// the timeout ([`ClientIo`]); not set by an idle close.
    failed: AtomicBool,
    /// The client sent something (at least one read completed).
    read_any: AtomicBool,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("requests", &*self.lock())
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// One request in flight; dropping it ends it.
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            requests: Mutex::new((0, Instant::now())),
            on_failure: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            read_any: AtomicBool::new(false),
        })
    }

    /// Whether the client has sent anything yet.
    pub fn has_read(&self) -> bool {
        self.read_any.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn undo(&self) -> std::sync::MutexGuard<'_, Vec<OnFailure>> {
        self.on_failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request starts (the service was called).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.lock().0 += 1;
        self.undo().clear();
        InFlight(Arc::clone(self))
    }

    /// Runs `f` if the connection fails before its next request begins.
    pub fn on_failure(&self, f: OnFailure) {
        // Checked under the lock `finish` takes: an action kept here because the socket had
        // not failed yet is seen there (a socket fails only before its connection ends).
        let mut undo = self.undo();
        if self.failed.load(Ordering::SeqCst) {
            drop(undo);
            f();
        } else {
            undo.push(f);
        }
    }

    /// The client's socket failed.
    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The connection ended: if the client's socket failed, the undo actions run. An error
    /// hyper ends a connection with is not a failure of what it wrote: its header timeout
    /// ends a connection whose client read its answer and sent nothing more (idle), and a
    /// parse error one whose client sent garbage after reading it.
    pub fn finish(&self) {
        let undo = std::mem::take(&mut *self.undo());
        if self.failed.load(Ordering::SeqCst) {
            for f in undo {
                f();
            }
        }
    }

    /// Since when no request has been in flight; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        let (n, since) = *self.lock();
        (n == 0).then_some(since)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.lock();
        a.0 = a.0.saturating_sub(1);
        if a.0 == 0 {
            a.1 = Instant::now();
        }
    }
}

/// A client connection with two deadlines:
/// - a write that makes no progress for the timeout fails with `TimedOut`: a client that
///   does not read its responses is disconnected instead of holding the connection and the
///   response forever;
/// - a read that waits while no request is in flight ([`Activity`]) fails with `TimedOut`
///   once nothing has been read or written and no request has ended for the timeout: an
///   idle connection is closed. A request in flight (a long-poll) keeps it open whatever
///   its length, and so does a response still being written to a slow reader (hyper keeps
///   a read pending while it writes); the timeout counts from the last of these.
pub struct ClientIo<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    activity: Arc<Activity>,
    /// The last read or write that made progress.
    last_io: Instant,
    idle: Option<Pin<Box<Sleep>>>,
    /// hyper's own answer to a request it could not parse, rewritten with the JSON error
    /// body ([`json_rejection`]), and how much of it is written.
    rewritten: Option<(Vec<u8>, usize)>,
    /// Where those answers are counted (`rest_responses_total`), when set.
    counters: Option<Arc<crate::metrics::Counters>>,
}

impl<T> ClientIo<T> {
    /// Counts hyper's own answers (parse errors) in `counters.rest_responses`, as the
    /// answers of handlers are.
    pub fn counting(mut self, counters: Arc<crate::metrics::Counters>) -> ClientIo<T> {
        self.counters = Some(counters);
        self
    }

    pub fn new(inner: T, timeout: Duration, activity: Arc<Activity>) -> ClientIo<T> {
        ClientIo {
            inner,
            timeout,
            stalled: None,
            activity,
            last_io: Instant::now(),
            idle: None,
            rewritten: None,
            counters: None,
        }
    }

    /// A read is pending: is the connection idle past the timeout? Arms (and polls) the
    /// idle timer otherwise. The timer is made once and only moved when it fires, not at
    /// every byte or request: when it fires, the real deadline is worked out from the last
    /// read or write and the last request's end.
    fn idle_past_timeout(&mut self, cx: &mut Context<'_>) -> bool {
        let first = self.last_io + self.timeout;
        let timer = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(first)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let since = match self.activity.idle_since() {
                // A request in flight: look again a whole timeout later.
                None => Instant::now(),
                Some(ended) => ended.max(self.last_io),
            };
            let deadline = since + self.timeout;
            if deadline <= Instant::now() {
                return true;
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Bytes written are activity (a flush is not: hyper flushes at every poll, idle or
    /// not).
    fn wrote(&mut self, r: &Poll<io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.last_io = Instant::now();
        }
    }

    fn check<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            if matches!(r, Poll::Ready(Err(_))) {
                self.activity.fail();
            }
            self.stalled = None;
            return r;
        }
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.activity.fail();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for rest.client_timeout_s",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            if matches!(r, Poll::Ready(Err(_))) {
                this.activity.fail();
            } else {
                this.activity.read_any.store(true, Ordering::Relaxed);
            }
            this.last_io = Instant::now();
            return r;
        }
        if this.idle_past_timeout(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request for rest.client_timeout_s",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncWrite + Unpin> ClientIo<T> {
    /// Writes what is left of a rewritten rejection; ready once it is all written.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.rewritten {
            if *done == bytes.len() {
                self.rewritten = None;
                break;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]);
            if let Poll::Ready(Ok(n)) = r {
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *done += n;
            }
            self.wrote(&r);
            match self.check(cx, r) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// hyper's answer to a request it could not parse becomes the JSON one: taken whole
    /// (hyper buffers a head before writing it) and written by [`ClientIo::drain`].
    fn intercept(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let json = json_rejection(buf)?;
        if let (Some(c), Some(status)) = (
            &self.counters,
            buf.get(9..12)
                .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
        ) {
            c.rest_responses.inc(status);
        }
        self.rewritten = Some((json, 0));
        Some(match self.drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The rest is written before anything else (write, flush, shutdown).
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

/// The body of the JSON error that replaces hyper's own answer to a request it could not
/// parse (which has an empty body): 400 for a malformed request line or header, 414 for a
/// request target too long, 431 for a head over [`MAX_HEAD`].
fn rejection_body(status: u16) -> Option<String> {
    let (kind, message) = match status {
        400 => (
            "bad_request",
            "the request could not be parsed as HTTP (malformed request line or header)"
                .to_string(),
        ),
        414 => ("uri_too_long", "the request target is too long".to_string()),
        431 => (
            "request_header_fields_too_large",
            format!("the request head is larger than {MAX_HEAD} bytes"),
        ),
        _ => return None,
    };
    Some(serde_json::json!({"type": kind, "message": message}).to_string())
}

/// When `buf` is exactly a response hyper makes itself for a parse error (HTTP/1: status
/// 400, 414 or 431, and only `connection: close`, `content-length: 0` and `date`), the same
/// response with the documented JSON error body (`{"type", "message"}`, as every other REST
/// error). hyper offers no hook for these; responses of handlers always have a body or
/// other headers, so they never match.
pub fn json_rejection(buf: &[u8]) -> Option<Vec<u8>> {
    // Cheap first: most writes are responses of handlers, some large.
    if buf.len() > 256 || !buf.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let text = std::str::from_utf8(buf).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let body = rejection_body(status)?;
    let head = text.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let _status_line = lines.next()?;
    let mut date = None;
    let mut others = 0;
    for l in lines {
        match l {
            "connection: close" | "content-length: 0" => others += 1,
            _ if l.starts_with("date: ") => date = Some(l),
            _ => return None,
        }
    }
    if others != 2 {
        return None;
    }
    let status_line = text.split("\r\n").next()?;
    let mut out = format!(
        "{status_line}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(d) = date {
        out.push_str(d);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        if let Some(r) = this.intercept(cx, buf) {
            return r;
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        this.check(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        // A parse-error answer is one short buffer (a head with no body).
        if let [one] = bufs
            && let Some(r) = this.intercept(cx, one)
        {
            return r;
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        this.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut w = ClientIo::new(near, T, Activity::new());
        let started = std::time::Instant::now();
        let err = w.write_all(&[7u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= T);
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_served() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut w = ClientIo::new(near, T, Activity::new());
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 8 * 1024 {
                // Slower than the buffer fills, well within the timeout.
                tokio::time::sleep(T / 4).await;
                got += far.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&[7u8; 8 * 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 8 * 1024);
    }

    /// Idle: nothing read and no request in flight for the timeout.
    #[tokio::test]
    async fn an_idle_connection_is_closed_but_not_one_with_a_request_in_flight() {
        let (near, mut far) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let mut r = ClientIo::new(near, T, Arc::clone(&activity));
        let mut buf = [0u8; 16];
        // Bytes keep it open.
        for _ in 0..3 {
            tokio::time::sleep(T / 2).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(r.read(&mut buf).await.unwrap(), 1);
        }
        // A request in flight for many timeouts (a long-poll) keeps it open too.
        let request = activity.begin();
        let read = tokio::time::timeout(5 * T, r.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting for bytes: {read:?}");
        let ended = Instant::now();
        drop(request);
        // Then a whole timeout from the request's end, not from the last byte.
        let err = tokio::time::timeout(10 * T, r.read(&mut buf))
            .await
            .expect("an idle connection is closed")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now() >= ended + T, "closed before the timeout");
    }

    /// A response still being written (to a slow reader) is activity too: hyper keeps a
    /// read pending while it writes, and that read must not time out meanwhile.
    #[tokio::test]
    async fn writes_that_progress_keep_the_connection_open() {
        let (near, mut far) = tokio::io::duplex(1024);
        let io = ClientIo::new(near, T, Activity::new());
        let (mut r, mut w) = tokio::io::split(io);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let started = Instant::now();
            let err = r.read(&mut buf).await.unwrap_err();
            (err.kind(), started.elapsed())
        });
        let mut got = [0u8; 1];
        for _ in 0..8 {
            tokio::time::sleep(T / 2).await;
            w.write_all(b"x").await.unwrap();
            w.flush().await.unwrap();
            far.read_exact(&mut got).await.unwrap();
        }
        let writes_ended = Instant::now();
        let (kind, waited) = tokio::time::timeout(10 * T, reader)
            .await
            .expect("closed once the writes stop")
            .unwrap();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert!(waited >= 4 * T, "open while the writes went on: {waited:?}");
        assert!(Instant::now() >= writes_ended + T);
    }

    /// Undo actions (long-poll answers handed to the connection) run when the socket
    /// failed, not when the connection ended otherwise or the client asked again.
    #[tokio::test]
    async fn undo_actions_run_only_when_the_connection_failed() {
        use std::sync::atomic::AtomicUsize;
        let ran = Arc::new(AtomicUsize::new(0));
        let undo = || {
            let ran = Arc::clone(&ran);
            Box::new(move || {
                ran.fetch_add(1, Ordering::Relaxed);
            }) as OnFailure
        };
        // Clean end.
        let a = Activity::new();
        a.on_failure(undo());
        a.finish();
        assert_eq!(ran.load(Ordering::Relaxed), 0);
        // The client asked again on the connection: it read the answer.
        let a = Activity::new();
        a.on_failure(undo());
        drop(a.begin());
        a.fail();
        a.finish();
        assert_eq!(ran.load(Ordering::Relaxed), 0);
        // The socket failed (a write nobody reads times out).
        let (near, _far) = tokio::io::duplex(16);
        let a = Activity::new();
        let mut w = ClientIo::new(near, T, Arc::clone(&a));
        a.on_failure(undo());
        assert!(w.write_all(&[7u8; 64]).await.is_err());
        a.finish();
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        // Handed over after the failure (an HTTP/2 stream's task may drop its body after
        // the connection ended): at once.
        a.on_failure(undo());
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn only_hyper_rejections_get_the_json_body() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Fri, 04 Dec 2026 19:57:05 GMT\r\n\r\n";
        let out = String::from_utf8(json_rejection(hyper).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("date: Fri"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "request_header_fields_too_large");
        // Anything else is left alone: another status, a body, other headers.
        for other in [
            &b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n",
        ] {
            assert_eq!(json_rejection(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[tokio::test]
    async fn no_first_request_closes_the_connection() {
        let first = Notify::new();
        let a = Activity::new();
        let never = std::future::pending::<()>();
        assert_eq!(first_request_within(never, &first, &a, T, T).await, None);
        // Once a request came, the connection runs as long as it likes.
        first.notify_one();
        let long = tokio::time::sleep(3 * T);
        assert_eq!(first_request_within(long, &first, &a, T, T).await, Some(()));
    }

    /// Silent for `quiet`: closed then (long before the timeout); a client that sent
    /// something is not closed at `quiet`.
    #[tokio::test]
    async fn a_silent_connection_is_closed_after_quiet() {
        let first = Notify::new();
        let a = Activity::new();
        let never = std::future::pending::<()>();
        let closed =
            tokio::time::timeout(25 * T, first_request_within(never, &first, &a, T, 50 * T)).await;
        assert_eq!(closed, Ok(None), "closed after quiet, not the timeout");
        let a = Activity::new();
        a.read_any.store(true, Ordering::Relaxed);
        let never = std::future::pending::<()>();
        let open =
            tokio::time::timeout(3 * T, first_request_within(never, &first, &a, T, 50 * T)).await;
        assert!(open.is_err(), "still open: it sent something");
    }

    #[test]
    fn one_address_gets_at_most_its_share_and_is_logged_once() {
        let cfg = crate::config::RestConfig {
            max_connections: 10,
            max_connections_per_address: 2,
            ..Default::default()
        };
        let c = Connections::new(&cfg);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let one = c.admit_address(a).unwrap();
        let _two = c.admit_address(mapped).unwrap();
        assert!(c.admit_address(a).unwrap_err().log);
        assert!(
            !c.admit_address(a).unwrap_err().log,
            "logged once per interval"
        );
        let _other = c.admit_address(b).unwrap();
        drop(one);
        let _again = c.admit_address(a).unwrap();
    }
}
