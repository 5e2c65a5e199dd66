//! Failed authentications per client address (`rest.auth_failures_per_minute`).
//!
//! Every request but the console's files needs credentials, and nothing bounded how often
//! one address could try them: a `headerkeys` key an operator chose may be short, and each
//! try costs a call into every auth backend. An address may now fail authentication
//! `rest.auth_failures_per_minute` times a minute, in a burst or spread out (the generic
//! cell rate algorithm: one failure's worth comes back every minute / limit). Past that,
//! every request of the address that needs credentials is answered 429 with `Retry-After`
//! **before** its credentials are checked, so that a guess made while throttled tells
//! nothing, good or bad, until the address may try again. A request that authenticates
//! is not counted, and takes no lock unless some address may be refused at that moment.
//! Concurrent guesses of one address all pass the check before the first failure is
//! counted; the debt is charged afterwards, so the rate holds on average, not per burst.
//!
//! Decisions:
//! - **The address, not the credentials, is counted**: a guesser varies the credentials.
//!   IPv4-mapped IPv6 counts as IPv4, and an IPv6 address as its /64 (one host is usually
//!   given a whole /64, and would otherwise try from 2^64 addresses).
//! - **Clients behind one address share its allowance**: behind a reverse proxy, one
//!   misconfigured client can make the others wait too. `0` turns the bound off (for a
//!   proxy that throttles on its own).
//! - **Bounded memory**: at most [`MAX_ADDRESSES`] addresses are remembered. An address
//!   whose allowance is whole again is forgotten when room is needed; when every
//!   remembered address is still counting, a new address's failure is not counted against
//!   it (logged once a minute; still counted in `rest_unauthorized_total`): an attacker
//!   with that many addresses is past what a per-address bound can stop.
//! - **Per node**: a cluster's nodes count apart.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Addresses remembered at most.
pub const MAX_ADDRESSES: usize = 16_384;

/// An address whose failures are past its allowance is logged at most once per this long.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The window the allowance is counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// What the throttle says of a request that needs credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check its credentials.
    Check,
    /// Refuse it unchecked; the address may try again after this long. `log` is set for
    /// the first refusal of the address in [`LOG_INTERVAL`].
    Wait { after: Duration, log: bool },
}

/// One address's state: when its allowance is whole again (the "theoretical arrival
/// time" of the generic cell rate algorithm), and when its refusal was last logged.
#[derive(Debug, Clone, Copy)]
struct Address {
    whole_at: Instant,
    logged: Option<Instant>,
}

/// `rest.auth_failures_per_minute` for every client address.
#[derive(Debug)]
pub struct AuthThrottle {
    /// The time one failure's worth of allowance takes to come back; `None`: no bound.
    per_failure: Option<Duration>,
    /// Until when (ms after `base`, rounded up) some address may be refused: a request
    /// (every proxied read, issue 24) takes no lock after that. A flag set at the first
    /// failure ever stayed set for good (a review finding).
    refuse_until: AtomicU64,
    base: Instant,
    addresses: Mutex<Addresses>,
}

#[derive(Debug, Default)]
struct Addresses {
    map: HashMap<IpAddr, Address>,
    /// When a failure was last not counted for want of room (logged once a minute).
    full_logged: Option<Instant>,
    /// When the full table was last pruned: at most once a second, or a flood of new
    /// addresses made every failure a pass over the table under the lock.
    pruned: Option<Instant>,
}

/// Whether `now` is the first time in `every` (then `last` becomes `now`).
fn first_in(last: &mut Option<Instant>, now: Instant, every: Duration) -> bool {
    let first = last.is_none_or(|t| now.duration_since(t) >= every);
    if first {
        *last = Some(now);
    }
    first
}

/// The address a client is counted under: IPv4 as it is (IPv4-mapped IPv6 too), IPv6 by
/// its /64.
pub fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

impl AuthThrottle {
    /// `per_minute` failures a minute per address; 0: no bound.
    pub fn new(per_minute: u32) -> AuthThrottle {
        AuthThrottle {
            per_failure: (per_minute > 0).then(|| WINDOW / per_minute),
            refuse_until: AtomicU64::new(0),
            base: Instant::now(),
            addresses: Mutex::default(),
        }
    }

    /// Whether a request from `ip` that needs credentials may have them checked now.
    pub fn verdict(&self, ip: IpAddr) -> Verdict {
        // No address ever failed (the usual case): not even the clock is read.
        if self.refuse_until.load(Ordering::Relaxed) == 0 {
            return Verdict::Check;
        }
        self.verdict_at(ip, Instant::now())
    }

    fn verdict_at(&self, ip: IpAddr, now: Instant) -> Verdict {
        let Some(per_failure) = self.per_failure else {
            return Verdict::Check;
        };
        let since_base = now.saturating_duration_since(self.base).as_millis() as u64;
        if since_base >= self.refuse_until.load(Ordering::Relaxed) {
            return Verdict::Check;
        }
        let mut addresses = self.lock();
        let Some(a) = addresses.map.get_mut(&counted_as(ip)) else {
            return Verdict::Check;
        };
        // One more failure must fit in the window.
        let next = a.whole_at.max(now) + per_failure;
        let Some(after) = next.checked_duration_since(now + WINDOW) else {
            return Verdict::Check;
        };
        if after.is_zero() {
            return Verdict::Check;
        }
        let log = first_in(&mut a.logged, now, LOG_INTERVAL);
        Verdict::Wait { after, log }
    }

    /// Counts a failed authentication of a request from `ip`. Returns `true` when it could
    /// not be counted because [`MAX_ADDRESSES`] addresses are all still counting, and that
    /// is to be logged (once a minute).
    pub fn failed(&self, ip: IpAddr) -> bool {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> bool {
        let Some(per_failure) = self.per_failure else {
            return false;
        };
        let key = counted_as(ip);
        let mut addresses = self.lock();
        if !addresses.map.contains_key(&key) && addresses.map.len() >= MAX_ADDRESSES {
            // Room: forget the addresses whose allowance is whole again.
            if first_in(&mut addresses.pruned, now, Duration::from_secs(1)) {
                addresses.map.retain(|_, a| a.whole_at > now);
            }
            if addresses.map.len() >= MAX_ADDRESSES {
                return first_in(&mut addresses.full_logged, now, LOG_INTERVAL);
            }
        }
        let a = addresses.map.entry(key).or_insert(Address {
            whole_at: now,
            logged: None,
        });
        a.whole_at = a.whole_at.max(now) + per_failure;
        // Refused while one more failure does not fit: until `whole_at + per_failure -
        // WINDOW`.
        if let Some(until) = (a.whole_at + per_failure).checked_sub(WINDOW) {
            let ms = until
                .saturating_duration_since(self.base)
                .as_nanos()
                .div_ceil(1_000_000);
            self.refuse_until.fetch_max(ms as u64, Ordering::Relaxed);
        }
        false
    }

    /// Addresses remembered now (tests, and the memory bound).
    pub fn remembered(&self) -> usize {
        self.lock().map.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Addresses> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_fails_its_allowance_then_waits_for_one_failures_worth() {
        let t = AuthThrottle::new(6); // one failure's worth every 10 s
        let now = Instant::now();
        for _ in 0..6 {
            assert_eq!(t.verdict_at(ip("10.0.0.1"), now), Verdict::Check);
            t.failed_at(ip("10.0.0.1"), now);
        }
        assert_eq!(
            t.verdict_at(ip("10.0.0.1"), now),
            Verdict::Wait {
                after: Duration::from_secs(10),
                log: true
            }
        );
        // Logged once; refused again without a log line.
        assert_eq!(
            t.verdict_at(ip("10.0.0.1"), now + Duration::from_secs(4)),
            Verdict::Wait {
                after: Duration::from_secs(6),
                log: false
            }
        );
        // Another address is not concerned.
        assert_eq!(t.verdict_at(ip("10.0.0.2"), now), Verdict::Check);
        // After one failure's worth, one more try; from then on no lock is taken until the
        // next refusal is possible.
        let later = now + Duration::from_secs(10);
        let later_ms = later.duration_since(t.base).as_millis() as u64;
        assert!(later_ms + 1 >= t.refuse_until.load(Ordering::Relaxed));
        assert_eq!(t.verdict_at(ip("10.0.0.1"), later), Verdict::Check);
        t.failed_at(ip("10.0.0.1"), later);
        assert!(matches!(
            t.verdict_at(ip("10.0.0.1"), later),
            Verdict::Wait { .. }
        ));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(counted_as(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(counted_as(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        let t = AuthThrottle::new(1);
        let now = Instant::now();
        t.failed_at(ip("2001:db8:1:2::7"), now);
        assert!(matches!(
            t.verdict_at(ip("2001:db8:1:2:ffff::9"), now),
            Verdict::Wait { .. }
        ));
        assert_eq!(t.verdict_at(ip("2001:db8:1:3::7"), now), Verdict::Check);
    }

    #[test]
    fn zero_is_no_bound() {
        let t = AuthThrottle::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            t.failed_at(ip("10.0.0.1"), now);
        }
        assert_eq!(t.verdict_at(ip("10.0.0.1"), now), Verdict::Check);
        assert_eq!(t.remembered(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_whole_allowances_first() {
        let t = AuthThrottle::new(60);
        let now = Instant::now();
        for i in 0..MAX_ADDRESSES as u32 {
            assert!(!t.failed_at(IpAddr::V4(i.into()), now));
        }
        assert_eq!(t.remembered(), MAX_ADDRESSES);
        // All still counting: a new address's failure is not counted, logged once.
        assert!(t.failed_at(ip("192.0.2.1"), now));
        assert!(!t.failed_at(ip("192.0.2.2"), now));
        assert_eq!(t.remembered(), MAX_ADDRESSES);
        // A second later, every allowance is whole again: room is made.
        let later = now + Duration::from_secs(2);
        assert!(!t.failed_at(ip("192.0.2.1"), later));
        assert_eq!(t.remembered(), 1);
    }
}
