//! A budget for the log lines that devices cause one by one ("registered", "de-registered",
//! "registration expired", ...), so that a flood of devices, or 100 000 registrations
//! expiring together, cannot flood the log. What Lua rules log while they decide about a
//! device (`print`, a failed or stopped call) is caused by that device too, and shares the
//! budget; so does a REST request whose plugin route's call failed (a client that asks a
//! panicking route 2 000 times made 2 000 error lines).
//!
//! Such lines are logged one by one up to `[log] device_lines_per_s` in each second (all
//! kinds together; 0: no limit); past it they are only counted, and once a second a
//! summary line says how many of each kind were left out. journald drops a service's
//! messages past its own rate limit (by default 10 000 per 30 s), and it drops them
//! whatever they are, errors included: the budget keeps the daemon under that limit with
//! room for everything else. Lines about the daemon itself are never budgeted.
//!
//! The budget is one per process, like the log itself; `[log]` is re-read on SIGHUP. It
//! lives in this crate, the lowest that logs per-device lines (a refused handshake), and
//! `connectord-core` re-exports it with the task that logs its summaries.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The default of `[log] device_lines_per_s`.
pub const DEFAULT_PER_SECOND: u32 = 100;

/// A kind of per-device line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLine {
    Registered,
    AddressChanged,
    Deregistered,
    Expired,
    ObservationEnded,
    ObservationNotEstablished,
    /// A line a Lua rule printed (`print`).
    LuaPrint,
    /// A Lua rule call that failed or was stopped.
    LuaFailure,
    /// A registration-interface request refused by identity binding (issue 21).
    Refused,
    /// A DTLS or TLS handshake refused for its client certificate (not trusted, or
    /// revoked).
    HandshakeRefused,
    /// A block-wise notification whose rest could not be fetched.
    NotificationIncomplete,
    /// A REST request on a plugin's route whose plugin call failed (panicked, or errored):
    /// caused by a client one request at a time, like a device's lines.
    PluginRouteFailed,
}

/// How many kinds there are.
const KINDS: usize = 12;

impl DeviceLine {
    /// Every kind, in declaration order (so `kind as usize` indexes it).
    const ALL: [DeviceLine; KINDS] = [
        DeviceLine::Registered,
        DeviceLine::AddressChanged,
        DeviceLine::Deregistered,
        DeviceLine::Expired,
        DeviceLine::ObservationEnded,
        DeviceLine::ObservationNotEstablished,
        DeviceLine::LuaPrint,
        DeviceLine::LuaFailure,
        DeviceLine::Refused,
        DeviceLine::HandshakeRefused,
        DeviceLine::NotificationIncomplete,
        DeviceLine::PluginRouteFailed,
    ];

    /// How the summary line names this kind.
    fn label(self) -> &'static str {
        match self {
            DeviceLine::Registered => "registered",
            DeviceLine::AddressChanged => "device address changed",
            DeviceLine::Deregistered => "de-registered",
            DeviceLine::Expired => "registration expired",
            DeviceLine::ObservationEnded => "the device ended the observation",
            DeviceLine::ObservationNotEstablished => "observation not established",
            DeviceLine::LuaPrint => "Lua print lines",
            DeviceLine::LuaFailure => "Lua rule calls failed or stopped",
            DeviceLine::Refused => "registration requests refused by identity binding",
            DeviceLine::HandshakeRefused => "handshakes refused for their client certificate",
            DeviceLine::NotificationIncomplete => {
                "block-wise notifications whose rest could not be fetched"
            }
            DeviceLine::PluginRouteFailed => "plugin route calls failed",
        }
    }
}

/// Per-second budget of per-device lines.
pub struct LogBudget {
    per_second: AtomicU32,
    state: Mutex<State>,
}

struct State {
    /// Start of the current one-second window.
    window: Option<Instant>,
    /// Lines logged in it.
    used: u32,
    /// Lines left out since the last summary, by kind (in [`DeviceLine::ALL`] order).
    suppressed: [u64; KINDS],
}

/// The process's budget.
static DEVICE_LINES: LogBudget = LogBudget::new(DEFAULT_PER_SECOND);

/// Whether a line of this kind may be logged now (if not, it is counted for the summary).
pub fn allow(kind: DeviceLine) -> bool {
    DEVICE_LINES.allow_at(kind, Instant::now())
}

/// Sets `[log] device_lines_per_s` (0: no limit).
pub fn set_per_second(n: u32) {
    DEVICE_LINES.per_second.store(n, Ordering::Relaxed);
}

/// The summary of the lines left out since the last call, if any were (logged once a
/// second by `connectord_core::log_budget::run_summaries`).
pub fn take_summary() -> Option<String> {
    DEVICE_LINES.take_summary()
}

impl LogBudget {
    pub const fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second: AtomicU32::new(per_second),
            state: Mutex::new(State {
                window: None,
                used: 0,
                suppressed: [0; KINDS],
            }),
        }
    }

    fn allow_at(&self, kind: DeviceLine, now: Instant) -> bool {
        let limit = self.per_second.load(Ordering::Relaxed);
        if limit == 0 {
            return true;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.window {
            Some(w) if now.saturating_duration_since(w) < Duration::from_secs(1) => {}
            _ => {
                s.window = Some(now);
                s.used = 0;
            }
        }
        if s.used < limit {
            s.used += 1;
            true
        } else {
            s.suppressed[kind as usize] += 1;
            false
        }
    }

    /// The summary of what was left out since the last call, if anything was.
    fn take_summary(&self) -> Option<String> {
        let counts = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut s.suppressed)
        };
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let parts: Vec<String> = DeviceLine::ALL
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {}", k.label()))
            .collect();
        Some(format!(
            "{total} device log lines left out (more than log.device_lines_per_s = {}): {}",
            self.per_second.load(Ordering::Relaxed),
            parts.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_budget_are_counted_and_summarised() {
        let b = LogBudget::new(2);
        let t = Instant::now();
        assert!(b.allow_at(DeviceLine::Registered, t));
        assert!(b.allow_at(DeviceLine::Expired, t));
        assert!(!b.allow_at(DeviceLine::Registered, t));
        assert!(!b.allow_at(DeviceLine::Registered, t + Duration::from_millis(999)));
        assert!(!b.allow_at(DeviceLine::Expired, t + Duration::from_millis(999)));
        assert_eq!(
            b.take_summary().as_deref(),
            Some(
                "3 device log lines left out (more than log.device_lines_per_s = 2): 2 registered, 1 registration expired"
            )
        );
        assert_eq!(b.take_summary(), None, "counts start again after a summary");
        // A new second, a new budget.
        let t2 = t + Duration::from_secs(1);
        assert!(b.allow_at(DeviceLine::Deregistered, t2));
        assert!(b.allow_at(DeviceLine::Deregistered, t2));
        assert!(!b.allow_at(DeviceLine::Deregistered, t2));
        assert!(b.take_summary().unwrap().ends_with(": 1 de-registered"));
    }

    #[test]
    fn zero_means_no_limit() {
        let b = LogBudget::new(0);
        let t = Instant::now();
        assert!((0..10_000).all(|_| b.allow_at(DeviceLine::Registered, t)));
        assert_eq!(b.take_summary(), None);
    }
}
