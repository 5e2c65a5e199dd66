//! Duplicate detection (RFC 7252 §4.5): a retransmitted request is answered with the reply
//! already sent, not handled a second time.
//!
//! Keyed by (source, message id): the peer's address on its listener ([`Source`]). An exchange is `InProgress` while its handler runs
//! (duplicates arriving then are dropped: the device will retransmit again and by then the
//! reply is cached) and `Done` with the encoded reply afterwards. Entries live for
//! EXCHANGE_LIFETIME; the map is bounded and the oldest entries go first.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Map;
use crate::peer::Source;

type Key = (Source, u16);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// First time: handle it (an entry marked in progress has been made).
    New,
    /// Being handled right now: drop this copy.
    InProgress,
    /// Already answered: send these bytes again (None when nothing was sent, e.g. a NON
    /// request that needed no answer).
    Answered(Option<Vec<u8>>),
}

#[derive(Debug)]
struct Entry {
    reply: Option<Option<Vec<u8>>>,
    /// Identifies this insertion in `order`, so that a stale queue slot of a forgotten and
    /// re-inserted key does not evict the newer entry.
    seq: u64,
}

/// The duplicate-detection cache.
#[derive(Debug)]
pub struct Dedup {
    map: Map<Key, Entry>,
    order: VecDeque<(Key, Instant, u64)>,
    next_seq: u64,
    lifetime: Duration,
    capacity: usize,
}

impl Dedup {
    pub fn new(lifetime: Duration, capacity: usize) -> Dedup {
        Dedup {
            map: Map::default(),
            order: VecDeque::new(),
            next_seq: 0,
            lifetime,
            capacity: capacity.max(1),
        }
    }

    /// Looks up (and on first sight records) the exchange.
    pub fn check(&mut self, peer: Source, mid: u16, now: Instant) -> Seen {
        self.expire(now);
        let key = (peer, mid);
        if let Some(e) = self.map.get(&key) {
            return match &e.reply {
                None => Seen::InProgress,
                Some(r) => Seen::Answered(r.clone()),
            };
        }
        // `order` has one slot per entry (and is at least as long as `map`): bounding it
        // bounds both.
        while self.order.len() >= self.capacity {
            match self.order.pop_front() {
                Some((k, _, seq)) => {
                    if self.map.get(&k).is_some_and(|e| e.seq == seq) {
                        self.map.remove(&k);
                    }
                }
                None => break,
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.map.insert(key, Entry { reply: None, seq });
        self.order.push_back((key, now, seq));
        Seen::New
    }

    /// Records the reply sent for an exchange marked in progress.
    pub fn complete(&mut self, peer: Source, mid: u16, reply: Option<Vec<u8>>) {
        if let Some(e) = self.map.get_mut(&(peer, mid)) {
            e.reply = Some(reply);
        }
    }

    /// Forgets an exchange whose handling was abandoned, so that a retransmission is
    /// handled afresh. Its order slot goes too (it is near the back: the exchange was
    /// recorded moments ago), or a flood of abandoned exchanges would grow `order`.
    pub fn forget(&mut self, peer: Source, mid: u16) {
        let key = (peer, mid);
        if let Some(e) = self.map.remove(&key)
            && let Some(i) = self
                .order
                .iter()
                .rposition(|(k, _, seq)| *k == key && *seq == e.seq)
        {
            self.order.remove(i);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Entries held, counting order slots: never more than the capacity.
    pub fn held(&self) -> usize {
        self.map.len().max(self.order.len())
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((k, at, seq)) = self.order.front().copied() {
            if now.duration_since(at) < self.lifetime {
                break;
            }
            self.order.pop_front();
            if self.map.get(&k).is_some_and(|e| e.seq == seq) {
                self.map.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> Source {
        Source {
            via: 0,
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn new_then_in_progress_then_answered() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10), 10);
        assert_eq!(d.check(peer(1), 5, t), Seen::New);
        assert_eq!(d.check(peer(1), 5, t), Seen::InProgress);
        d.complete(peer(1), 5, Some(vec![1, 2]));
        assert_eq!(d.check(peer(1), 5, t), Seen::Answered(Some(vec![1, 2])));
        // Same id from another port is another exchange.
        assert_eq!(d.check(peer(2), 5, t), Seen::New);
        // And from the same address on another listener.
        let other = Source { via: 1, ..peer(1) };
        assert_eq!(d.check(other, 5, t), Seen::New);
    }

    #[test]
    fn entries_expire_after_the_lifetime() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10), 10);
        d.check(peer(1), 5, t);
        d.complete(peer(1), 5, None);
        assert_eq!(
            d.check(peer(1), 5, t + Duration::from_secs(9)),
            Seen::Answered(None)
        );
        assert_eq!(d.check(peer(1), 5, t + Duration::from_secs(10)), Seen::New);
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(100), 3);
        for mid in 0..5 {
            assert_eq!(d.check(peer(1), mid, t), Seen::New);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.check(peer(1), 4, t), Seen::InProgress);
        assert_eq!(d.check(peer(1), 0, t), Seen::New);
    }

    /// Requests dropped at `coap.max_in_flight` are recorded and forgotten at once; a flood
    /// of them must not leave anything behind.
    #[test]
    fn forgotten_exchanges_leave_nothing_behind() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(100), 8);
        d.check(peer(1), 1, t);
        for n in 0..10_000u32 {
            let (port, mid) = (2 + (n / 1000) as u16, n as u16);
            assert_eq!(d.check(peer(port), mid, t), Seen::New);
            d.forget(peer(port), mid);
        }
        assert_eq!((d.len(), d.order.len(), d.held()), (1, 1, 1));
        assert_eq!(d.check(peer(1), 1, t), Seen::InProgress, "kept");
        // Forgetting an exchange that is not the newest works too.
        d.check(peer(1), 2, t);
        d.check(peer(1), 3, t);
        d.forget(peer(1), 2);
        assert_eq!((d.len(), d.order.len()), (2, 2));
        // Full: the capacity counts every slot.
        for mid in 10..30 {
            d.check(peer(1), mid, t);
            assert!(d.held() <= 8);
        }
        assert_eq!(d.held(), 8);
    }

    #[test]
    fn forget_allows_handling_again() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(100), 3);
        d.check(peer(1), 1, t);
        d.forget(peer(1), 1);
        assert_eq!(d.check(peer(1), 1, t), Seen::New);
    }
}
