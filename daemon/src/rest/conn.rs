//! Bounds on the REST server's connections: how many are served at once
//! (`rest.max_connections`) and how long the daemon waits on a client
//! (`rest.client_timeout_s`) before closing its connection.
//!
//! The wait is bounded at every point where a client could otherwise hold a connection
//! (and its buffers) forever: before its first request ([`first_request_within`]: nothing
//! sent, half an HTTP/2 preface), for a request head and between HTTP/1 keep-alive
//! requests (hyper's header read timeout), for a request body (`rest::dispatch`, 408),
//! while a response waits for a client that does not read it, and while a connection has
//! no request in flight and the client sends nothing ([`ClientIo`]; hyper has no idle
//! timeout for HTTP/2, so an idle HTTP/2 connection would otherwise hold its slot for
//! good).

use std::future::Future;
use std::io;
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

/// `rest.max_connections` and `rest.client_timeout_s`, and the connections open now.
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
    timeout: Duration,
}

impl Connections {
    pub fn new(cfg: &crate::config::RestConfig) -> Connections {
        Connections {
            permits: Arc::new(Semaphore::new(cfg.max_connections)),
            max: cfg.max_connections,
            timeout: Duration::from_secs(cfg.client_timeout_s),
        }
    }

    /// Waits for room for one more connection; the permit is its slot.
    pub async fn admit(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// `rest.client_timeout_s`.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

/// Runs a connection, closing it (`None`) when no request arrived within `timeout`.
/// hyper's head timeout starts only once it knows the protocol, so the wait before that is
/// bounded here. `first` is notified by the service for every request.
pub async fn first_request_within<F: Future>(
    conn: F,
    first: &Notify,
    timeout: Duration,
) -> Option<F::Output> {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return Some(r),
        _ = first.notified() => {}
        _ = tokio::time::sleep(timeout) => return None,
    }
    Some(conn.await)
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
        })
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
}

impl<T> ClientIo<T> {
    pub fn new(inner: T, timeout: Duration, activity: Arc<Activity>) -> ClientIo<T> {
        ClientIo {
            inner,
            timeout,
            stalled: None,
            activity,
            last_io: Instant::now(),
            idle: None,
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

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
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
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        this.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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

    #[tokio::test]
    async fn no_first_request_closes_the_connection() {
        let first = Notify::new();
        let never = std::future::pending::<()>();
        assert_eq!(first_request_within(never, &first, T).await, None);
        // Once a request came, the connection runs as long as it likes.
        first.notify_one();
        let long = tokio::time::sleep(3 * T);
        assert_eq!(first_request_within(long, &first, T).await, Some(()));
    }
}
