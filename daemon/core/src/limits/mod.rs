//! Traffic limits per domain (seed 000, "Traffic limits"): transactions over the last 24
//! hours and registered endpoints, each against a quota.
//!
//! Transactions are what the seed counts: incoming registrations, registration updates
//! and removals, and notifications; outgoing proxy (resource) requests and subscription
//! requests. They are counted in 24 hourly buckets per domain (a sliding day with hour
//! resolution). Over the transaction quota, new work is refused: REST resource and
//! subscription requests get 429, registrations and updates get CoAP 4.29, notifications
//! from devices are dropped (counted in `connectord_limits_refused_total`); removals are
//! counted but never refused. The endpoint quota is `registry.max_endpoints_per_domain`.
//! A domain's counter is dropped once it has counted nothing for 24 hours (swept at the
//! first transaction of each hour), so the map holds only the domains active in the last
//! day.
//!
//! Counting is in memory (every REST request and notification comes here, and a store
//! write each would be a second durable write per proxied read); [`Limits::run_saver`]
//! writes the hours of the domains that counted something every `[limits]
//! save_interval_ms` and once more at shutdown, and [`Limits::restore`] reads them back
//! at start. Decision: a restart goes on with the stored 24 hours, and a crash loses at
//! most one interval of counting: a bounded under-count of a quota, not data.
//!
//! **In a cluster (issue 22)** each node counts its own traffic as above and stores it
//! under its own name; the daemon hands it the other nodes' stored counts as they change
//! ([`Limits::set_other`], from the NATS store's watch), and a domain's total, the one the
//! quota is checked against and `GET /limits` shows, is its own count plus the others'.
//! Decision: a quota then holds cluster-wide within one save interval plus the watch's
//! delay (the daemon saves at least every second on NATS): traffic spread over several
//! nodes at once can pass the quota by what the other nodes counted in that time, each
//! node refusing only what it sees. The endpoint quota (`max_endpoints_per_domain`) and
//! `registry.max_endpoints` count the cluster's directory, other nodes' registrations
//! included, so they are cluster-wide too (within the registrations watch's delay); every
//! other limit (connections, queues, body sizes, rates of the REST listener) guards a
//! node's own resources and stays per node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::LimitsConfig;
use crate::hashing::Map;
use crate::metrics::Counters;
use crate::shutdown::Shutdown;
use crate::store::Store;
pub use connectord_model::HourCount;
use connectord_model::now_ms;

const HOUR_MS: u64 = 3_600_000;

/// The transaction quota of a domain is used up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the domain's transaction quota ({quota} per 24 hours) is used up")]
pub struct OverQuota {
    pub quota: u64,
}

/// One hour of a domain's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    hour: u64,
    count: u64,
    /// Counted since it was last handed to the saver.
    dirty: bool,
}

/// Another cluster node's count of one hour (issue 22), as it stored it last.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Other {
    node: String,
    hour: u64,
    count: u64,
}

#[derive(Default)]
struct Window {
    /// At most 24 hours, in no particular order.
    buckets: Vec<Bucket>,
    /// Other nodes' hours (at most 24 per node), added to the total; never saved here.
    others: Vec<Other>,
}

impl Window {
    fn total(&mut self, hour: u64) -> u64 {
        self.buckets.retain(|b| b.hour + 24 > hour);
        self.others.retain(|o| o.hour + 24 > hour);
        self.buckets.iter().map(|b| b.count).sum::<u64>()
            + self.others.iter().map(|o| o.count).sum::<u64>()
    }

    /// This node's own count of the window (what it saves).
    #[cfg(test)]
    fn own(&self) -> u64 {
        self.buckets.iter().map(|b| b.count).sum()
    }

    fn set_other(&mut self, node: &str, hour: u64, count: u64) {
        match self
            .others
            .iter_mut()
            .position(|o| o.hour == hour && o.node == node)
        {
            Some(i) if count == 0 => {
                self.others.swap_remove(i);
            }
            Some(i) => self.others[i].count = count,
            None if count == 0 => {}
            None => self.others.push(Other {
                node: node.to_string(),
                hour,
                count,
            }),
        }
    }

    fn add(&mut self, hour: u64, n: u64) {
        match self.buckets.iter_mut().find(|b| b.hour == hour) {
            Some(b) => {
                b.count += n;
                b.dirty = true;
            }
            None => self.buckets.push(Bucket {
                hour,
                count: n,
                dirty: true,
            }),
        }
    }
}

/// The `GET /limits` answer of a domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    #[serde(rename = "transaction-quota")]
    pub transaction_quota: u64,
    #[serde(rename = "transaction-count")]
    pub transaction_count: u64,
    #[serde(rename = "endpoint-quota")]
    pub endpoint_quota: u64,
    #[serde(rename = "endpoint-count")]
    pub endpoint_count: u64,
}

/// The transaction counters of every domain.
pub struct Limits {
    quota: u64,
    endpoint_quota: u64,
    counters: Arc<Counters>,
    windows: Mutex<Windows>,
}

/// The per-domain windows and the hour they were last swept in.
#[derive(Default)]
struct Windows {
    map: Map<String, Window>,
    swept_hour: u64,
    /// Some window is dirty: the saver has something to write.
    dirty: bool,
}

impl Windows {
    /// At the first call of each hour, drops the domains that counted nothing in the
    /// last 24 hours.
    fn sweep(&mut self, hour: u64) {
        if self.swept_hour != hour {
            self.swept_hour = hour;
            self.map.retain(|_, w| w.total(hour) > 0);
        }
    }
}

/// Runs `f` on the domain's window, made on first use. Looked up before inserting: every
/// REST request and notification comes here, and `entry` would allocate the domain's name
/// each time.
fn with_window<R>(
    w: &mut Map<String, Window>,
    domain: &str,
    f: impl FnOnce(&mut Window) -> R,
) -> R {
    match w.get_mut(domain) {
        Some(win) => f(win),
        None => f(w.entry(domain.to_string()).or_default()),
    }
}

impl Limits {
    pub fn new(cfg: &LimitsConfig, endpoint_quota: usize, counters: Arc<Counters>) -> Limits {
        Limits {
            quota: cfg.transaction_quota,
            endpoint_quota: endpoint_quota as u64,
            counters,
            windows: Mutex::new(Windows::default()),
        }
    }

    fn hour() -> u64 {
        now_ms() / HOUR_MS
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one transaction that is never refused (a de-registration).
    pub fn count(&self, domain: &str) {
        self.count_at(domain, Limits::hour());
    }

    fn count_at(&self, domain: &str, hour: u64) {
        let mut w = self.lock();
        w.sweep(hour);
        w.dirty = true;
        with_window(&mut w.map, domain, |win| win.add(hour, 1));
    }

    /// Counts one transaction if the quota allows it.
    pub fn take(&self, domain: &str) -> Result<(), OverQuota> {
        self.take_at(domain, Limits::hour())
    }

    fn take_at(&self, domain: &str, hour: u64) -> Result<(), OverQuota> {
        let mut w = self.lock();
        w.sweep(hour);
        let taken = with_window(&mut w.map, domain, |win| {
            if win.total(hour) >= self.quota {
                Counters::inc(&self.counters.limits_refused);
                return Err(OverQuota { quota: self.quota });
            }
            win.add(hour, 1);
            Ok(())
        });
        w.dirty |= taken.is_ok();
        taken
    }

    /// Puts stored counts back (at start, before anything counts); hours that left the
    /// 24-hour window are ignored. Restored counts are not dirty: they are stored already.
    pub fn restore(&self, counts: Vec<HourCount>) -> usize {
        self.restore_at(counts, Limits::hour())
    }

    fn restore_at(&self, counts: Vec<HourCount>, hour: u64) -> usize {
        let mut w = self.lock();
        let mut n = 0;
        for c in counts {
            if c.hour + 24 > hour && c.hour <= hour {
                w.map.entry(c.domain).or_default().buckets.push(Bucket {
                    hour: c.hour,
                    count: c.count,
                    dirty: false,
                });
                n += 1;
            }
        }
        n
    }

    /// Another cluster node stored `count` transactions of `domain` in `hour` (0: it
    /// removed that hour). The count replaces what that node had before for the hour;
    /// hours outside the 24-hour window are ignored.
    pub fn set_other(&self, node: &str, domain: &str, hour: u64, count: u64) {
        self.set_other_at(node, domain, hour, count, Limits::hour());
    }

    fn set_other_at(&self, node: &str, domain: &str, hour: u64, count: u64, now: u64) {
        let in_window = hour + 24 > now && hour <= now;
        let mut w = self.lock();
        if count > 0 && in_window {
            with_window(&mut w.map, domain, |win| win.set_other(node, hour, count));
        } else if let Some(win) = w.map.get_mut(domain) {
            win.set_other(node, hour, 0);
        }
    }

    /// Forgets every other node's counts (before the daemon hands them all again, after
    /// its watch lagged).
    pub fn clear_others(&self) {
        let mut w = self.lock();
        for win in w.map.values_mut() {
            win.others.clear();
        }
    }

    /// The hours counted in since the last call (usually one per active domain: the
    /// current one), and clears their dirty marks. Cheap when nothing was counted.
    fn take_dirty(&self, hour: u64) -> Vec<HourCount> {
        let mut w = self.lock();
        let mut out = Vec::new();
        if !std::mem::take(&mut w.dirty) {
            return out;
        }
        for (domain, win) in w.map.iter_mut() {
            win.total(hour);
            for b in win.buckets.iter_mut().filter(|b| b.dirty) {
                b.dirty = false;
                out.push(HourCount {
                    domain: domain.clone(),
                    hour: b.hour,
                    count: b.count,
                });
            }
        }
        out
    }

    /// Marks these hours dirty again (their save failed; the next one retries).
    fn mark_dirty(&self, counts: &[HourCount]) {
        let mut w = self.lock();
        let mut any = false;
        for c in counts {
            let bucket = w
                .map
                .get_mut(&c.domain)
                .and_then(|win| win.buckets.iter_mut().find(|b| b.hour == c.hour));
            if let Some(b) = bucket {
                b.dirty = true;
                any = true;
            }
        }
        w.dirty |= any;
    }

    /// Writes what changed now (the daemon calls it once more after its tasks have
    /// stopped, so that what they counted while stopping is kept too).
    pub async fn save_now(&self, store: &dyn Store) {
        self.save(store, Limits::hour()).await;
    }

    /// Writes what changed, and removes stored hours older than the window; says whether
    /// the store took it (if not, the hours stay dirty for the next save).
    async fn save(&self, store: &dyn Store, hour: u64) -> bool {
        let counts = self.take_dirty(hour);
        match store
            .save_hour_counts(counts.clone(), hour.saturating_sub(23))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                crate::store::log_failure(
                    format_args!(
                        "limits: cannot save the transaction counts (retried at the next interval)"
                    ),
                    &e,
                );
                self.mark_dirty(&counts);
                false
            }
        }
    }

    /// Saves the counts that changed every `every`, until `stop` fires (then the daemon
    /// calls [`Limits::save_now`]).
    pub async fn run_saver(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        every: Duration,
        mut stop: Shutdown,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saved_hour = None;
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tick.tick() => {}
            }
            let hour = Limits::hour();
            // Nothing counted and the hour is the same: nothing to write or to drop.
            let dirty = self.lock().dirty;
            if (dirty || saved_hour != Some(hour)) && self.save(store.as_ref(), hour).await {
                saved_hour = Some(hour);
            }
        }
    }

    /// The domain's counts; `endpoints` is its number of registered endpoints now.
    pub fn snapshot(&self, domain: &str, endpoints: usize) -> Snapshot {
        let hour = Limits::hour();
        let count = self
            .lock()
            .map
            .get_mut(domain)
            .map(|x| x.total(hour))
            .unwrap_or(0);
        Snapshot {
            transaction_quota: self.quota,
            transaction_count: count,
            endpoint_quota: self.endpoint_quota,
            endpoint_count: endpoints as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_refuses_per_domain() {
        let l = Limits::new(
            &LimitsConfig {
                transaction_quota: 3,
                ..LimitsConfig::default()
            },
            10,
            Arc::new(Counters::default()),
        );
        for _ in 0..3 {
            l.take("a").unwrap();
        }
        assert_eq!(l.take("a"), Err(OverQuota { quota: 3 }));
        l.take("b").unwrap();
        l.count("a");
        let s = l.snapshot("a", 2);
        assert_eq!(
            (
                s.transaction_count,
                s.transaction_quota,
                s.endpoint_count,
                s.endpoint_quota
            ),
            (4, 3, 2, 10)
        );
        assert_eq!(l.snapshot("b", 0).transaction_count, 1);
    }

    #[test]
    fn domains_idle_for_a_day_are_dropped() {
        let l = Limits::new(&LimitsConfig::default(), 10, Arc::new(Counters::default()));
        let domains = |l: &Limits| {
            let mut d: Vec<String> = l.lock().map.keys().cloned().collect();
            d.sort();
            d
        };
        l.take_at("a", 100).unwrap();
        l.take_at("b", 100).unwrap();
        l.count_at("a", 110);
        l.take_at("c", 123).unwrap();
        assert_eq!(domains(&l), ["a", "b", "c"], "all counted in the last day");
        l.take_at("c", 124).unwrap();
        assert_eq!(domains(&l), ["a", "c"], "b counted nothing since hour 100");
        l.count_at("d", 147);
        assert_eq!(domains(&l), ["c", "d"]);
        assert_eq!(
            l.lock().map["c"]
                .buckets
                .iter()
                .map(|b| (b.hour, b.count))
                .collect::<Vec<_>>(),
            [(124, 1)],
            "hour 123 left c's window"
        );
    }

    #[test]
    fn dirty_domains_hand_over_their_hours_once_and_restored_ones_are_clean() {
        let l = Limits::new(&LimitsConfig::default(), 10, Arc::new(Counters::default()));
        let restored = l.restore_at(
            vec![
                HourCount {
                    domain: "old".into(),
                    hour: 76,
                    count: 9,
                },
                HourCount {
                    domain: "a".into(),
                    hour: 90,
                    count: 3,
                },
                HourCount {
                    domain: "b".into(),
                    hour: 99,
                    count: 2,
                },
                HourCount {
                    domain: "future".into(),
                    hour: 101,
                    count: 1,
                },
            ],
            100,
        );
        assert_eq!(restored, 2, "hour 76 left the day, hour 101 is not yet");
        assert!(l.take_dirty(100).is_empty(), "restored counts are stored");
        l.take_at("a", 100).unwrap();
        l.count_at("c", 100);
        let mut d = l.take_dirty(100);
        d.sort_by(|x, y| (&x.domain, x.hour).cmp(&(&y.domain, y.hour)));
        let got: Vec<(&str, u64, u64)> = d
            .iter()
            .map(|c| (c.domain.as_str(), c.hour, c.count))
            .collect();
        assert_eq!(
            got,
            [("a", 100, 1), ("c", 100, 1)],
            "only the hours counted in; a's restored hour 90 is stored already"
        );
        assert!(l.take_dirty(100).is_empty(), "handed over once");
        l.mark_dirty(&d);
        assert_eq!(
            l.take_dirty(100).len(),
            2,
            "a failed save hands them over again"
        );
        assert_eq!(l.lock().map.get_mut("b").unwrap().total(100), 2);
    }

    /// Issue 22: other nodes' counts add to the domain's total (the quota and the
    /// snapshot), replace each other per (node, hour), are never handed to the saver, and
    /// leave with their hour.
    #[test]
    fn other_nodes_counts_add_to_the_quota_and_are_not_saved() {
        let l = Limits::new(
            &LimitsConfig {
                transaction_quota: 10,
                ..LimitsConfig::default()
            },
            10,
            Arc::new(Counters::default()),
        );
        l.take_at("a", 100).unwrap();
        l.set_other_at("n2", "a", 100, 4, 100);
        l.set_other_at("n3", "a", 99, 3, 100);
        l.set_other_at("n2", "a", 100, 5, 100);
        l.set_other_at("n2", "a", 70, 9, 100);
        l.set_other_at("n2", "b", 100, 1, 100);
        assert_eq!(
            l.lock().map.get_mut("a").unwrap().total(100),
            9,
            "1 + 5 + 3"
        );
        assert_eq!(l.take_at("a", 100), Ok(()));
        assert_eq!(l.take_at("a", 100), Err(OverQuota { quota: 10 }));
        let mut d = l.take_dirty(100);
        d.sort_by(|x, y| x.domain.cmp(&y.domain));
        assert_eq!(
            d.iter()
                .map(|c| (c.domain.as_str(), c.hour, c.count))
                .collect::<Vec<_>>(),
            [("a", 100, 2)],
            "only this node's own count is saved"
        );
        l.set_other_at("n2", "a", 100, 0, 100);
        assert_eq!(l.lock().map.get_mut("a").unwrap().total(100), 5);
        assert_eq!(l.lock().map["a"].own(), 2);
        // Hour 99 leaves the window at hour 123.
        assert_eq!(l.lock().map.get_mut("a").unwrap().total(123), 2);
        l.clear_others();
        assert_eq!(l.lock().map.get_mut("b").unwrap().total(100), 0);
    }

    #[test]
    fn the_window_forgets_hours_older_than_a_day() {
        let mut w = Window::default();
        w.add(100, 5);
        w.add(110, 2);
        assert_eq!(w.total(110), 7);
        assert_eq!(w.total(123), 7);
        assert_eq!(w.total(124), 2, "hour 100 left the window");
        assert_eq!(w.total(134), 0);
    }
}
