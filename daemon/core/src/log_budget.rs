//! The budget of per-device log lines ([`connectord_coap::log_budget`], where it lives so
//! that the CoAP transports use it too), and the task that logs its summaries.

use std::time::Duration;

pub use crate::coap::log_budget::{
    DEFAULT_PER_SECOND, DeviceLine, LogBudget, allow, set_per_second,
};

use crate::shutdown::Shutdown;

/// Logs the summary of left-out lines once a second, and a last one at stop.
pub async fn run_summaries(mut stop: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stopping = tokio::select! {
            _ = stop.recv() => true,
            _ = tick.tick() => false,
        };
        if let Some(s) = crate::coap::log_budget::take_summary() {
            tracing::info!("{s}");
        }
        if stopping {
            return;
        }
    }
}
