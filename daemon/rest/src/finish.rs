//! Running a request's handler in the connection's own task, to its end.
//!
//! A handler once ran on a task of its own (`tokio::spawn`, awaited by the connection), for
//! two reasons: a panic in it must become a JSON 500, not end the connection's task; and a
//! handler must not stop half-way when hyper drops the request's future because the client
//! went away (a proxied read stored but not queued, say). The spawn cost a task, a
//! hand-off to another worker and a wake-up back for every request (issue 24: the proxied
//! read's profile). [`Finish`] keeps both properties without it: it polls the handler in
//! place, catching a panic, and if it is dropped before the handler ended, it spawns what is
//! left of the handler (boxed, so it moves without being moved) to run to its end.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;

/// A handler's future, finished even when dropped ([module docs](self)). Resolves to the
/// handler's output, or `Err` with the panic's message when it panicked.
pub struct Finish<F: Future + Send + 'static>
where
    F::Output: Send,
{
    handler: Option<Pin<Box<F>>>,
}

impl<F: Future + Send + 'static> Finish<F>
where
    F::Output: Send,
{
    pub fn new(handler: F) -> Self {
        Finish {
            handler: Some(Box::pin(handler)),
        }
    }
}

impl<F: Future + Send + 'static> Future for Finish<F>
where
    F::Output: Send,
{
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // `Finish` is `Unpin` (its handler is boxed).
        let Some(handler) = self.handler.as_mut() else {
            return Poll::Ready(Err("polled after it ended".into()));
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                self.handler = None;
                Poll::Ready(Ok(out))
            }
            Err(panic) => {
                // A future that panicked is not polled again (as tokio does with a task's).
                let dropped = self.handler.take();
                let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(dropped)));
                Poll::Ready(Err(panic_message(&*panic)))
            }
        }
    }
}

impl<F: Future + Send + 'static> Drop for Finish<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        let Some(handler) = self.handler.take() else {
            return;
        };
        // Dropped before the handler ended: the client went away. What is left runs on a
        // task of its own (a panic there ends that task only). Outside a runtime (the
        // daemon stopping), there is nothing left to run it on.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(panic) = AssertUnwindSafe(handler).catch_unwind().await {
                    tracing::error!(
                        "REST handler failed after its client went away: {}",
                        panic_message(&*panic)
                    );
                }
            });
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A handler's output comes back, in the caller's task.
    #[tokio::test]
    async fn a_handler_runs_to_its_output() {
        let out = Finish::new(async {
            tokio::task::yield_now().await;
            7
        })
        .await;
        assert_eq!(out, Ok(7));
    }

    /// A panic becomes an error with its message; the caller's task goes on.
    #[tokio::test]
    async fn a_panic_becomes_an_error() {
        let out = Finish::new(async {
            tokio::task::yield_now().await;
            if std::hint::black_box(true) {
                panic!("the handler's bug");
            }
            1
        })
        .await;
        assert_eq!(out, Err("panicked: the handler's bug".to_string()));
    }

    /// Dropped half-way (the client went away), the handler still runs to its end.
    #[tokio::test]
    async fn a_handler_dropped_half_way_runs_to_its_end() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let ended = Arc::new(AtomicBool::new(false));
        let mut f = Finish::new({
            let ended = Arc::clone(&ended);
            async move {
                let _ = wait.await;
                ended.store(true, Ordering::SeqCst);
            }
        });
        // Started (waiting on `wait`), then dropped.
        let waker = futures_util::task::noop_waker();
        assert!(
            Pin::new(&mut f)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        drop(f);
        go.send(()).unwrap();
        let t = std::time::Instant::now();
        while !ended.load(Ordering::SeqCst) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the handler never ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
