//! Graceful stop: one [`Trigger`] owned by the daemon, a [`Shutdown`] listener per task.

use tokio::sync::watch;

/// Fires the stop signal for every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A task's view of the stop signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected pair.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Completes when the stop signal fires (or its trigger is dropped).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
    /// The signal as a plain `watch` receiver (true once fired), for the crates that take
    /// their stop signal so (`connectord-coap`).
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}
