//! Load shedding at `coap.max_in_flight`: the Max-Age of a 5.03 Service Unavailable.
//!
//! A confirmable request that finds every in-flight permit taken is answered at once with
//! 5.03 and a Max-Age (RFC 7252 §5.9.3.4: the number of seconds after which the client
//! may retry), instead of being dropped: a dropped request costs the device its
//! retransmissions (2 + 4 + 8 + 16 s with the defaults) and, in a storm, fails after the
//! last one, while a 5.03 tells it when to come back with a new request.
//!
//! The Max-Age spreads the retries at the rate the daemon completes requests: every shed
//! request is given the next free *slot* of a virtual queue that advances by 1 / rate per
//! request (after the requests in flight now), and its Max-Age is the seconds to its slot,
//! rounded up. Requests shed over one second get Max-Ages that grow with their place in
//! that queue, so the retries come back spread over as many seconds as the daemon needs
//! for them, not all at once (the jitter is their place in the queue, plus the time at
//! which each was answered within its second). The rate is measured (completions per
//! 100 ms, smoothed); before the first measurement it is taken as `max_in_flight` per
//! 100 ms. A queue longer than [`MAX_AGE_CAP_S`] starts again from that cap, so that no
//! device is sent away for longer than that.

use std::time::{Duration, Instant};

/// The longest Max-Age of a shed request, in seconds.
pub const MAX_AGE_CAP_S: u32 = 60;

/// How often the completion rate is sampled.
const SAMPLE: Duration = Duration::from_millis(100);

/// The virtual queue of shed requests' retries.
#[derive(Debug)]
pub struct Pacer {
    /// Completions per second (smoothed).
    rate: f64,
    /// When the completion count was last sampled, and its value then.
    sampled: Option<(Instant, u64)>,
    /// The next free retry slot.
    next_slot: Option<Instant>,
}

impl Pacer {
    /// A pacer for `max_in_flight` permits: until measured, a request is assumed to take
    /// 100 ms.
    pub fn new(max_in_flight: usize) -> Pacer {
        Pacer {
            rate: (max_in_flight.max(1) as f64) * 10.0,
            sampled: None,
            next_slot: None,
        }
    }

    /// The completion rate used now, per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Updates the rate from `completed` (requests completed since start, monotonic) at
    /// `now`. Called at every shed; a sample covers at least [`SAMPLE`].
    fn sample(&mut self, now: Instant, completed: u64) {
        match self.sampled {
            None => self.sampled = Some((now, completed)),
            Some((t, c)) => {
                let dt = now.saturating_duration_since(t);
                if dt >= SAMPLE {
                    let measured = completed.saturating_sub(c) as f64 / dt.as_secs_f64();
                    // A long pause (no shedding) starts the average again.
                    self.rate = if dt > SAMPLE * 10 {
                        measured
                    } else {
                        0.5 * self.rate + 0.5 * measured
                    };
                    self.sampled = Some((now, completed));
                }
            }
        }
    }

    /// The Max-Age, in seconds (1 to [`MAX_AGE_CAP_S`]), of a request shed at `now` with
    /// `in_flight` requests being handled and `completed` completed so far.
    pub fn max_age(&mut self, now: Instant, in_flight: usize, completed: u64) -> u32 {
        self.sample(now, completed);
        // At least one request a second: a daemon that completed nothing in a sample
        // (stalled store) still spreads its retries, at the cap.
        let rate = self.rate.max(1.0);
        let step = Duration::from_secs_f64(1.0 / rate);
        let after_in_flight = now + Duration::from_secs_f64(in_flight as f64 / rate);
        let cap = now + Duration::from_secs(u64::from(MAX_AGE_CAP_S));
        let mut slot = self
            .next_slot
            .map_or(after_in_flight, |s| s.max(after_in_flight));
        if slot > cap {
            // The queue is longer than the cap: those past it come back at the cap and
            // may be shed again then.
            slot = cap;
        }
        self.next_slot = Some(slot + step);
        let wait = slot.saturating_duration_since(now).as_secs_f64().ceil() as u32;
        wait.clamp(1, MAX_AGE_CAP_S)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shed_requests_are_spread_at_the_completion_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10);
        // Completions: 1000 per second measured over 100 ms.
        assert_eq!(p.max_age(t0, 10, 0), 1);
        let mut t = t0;
        for k in 1..=12 {
            t = t0 + Duration::from_millis(100 * k);
            p.max_age(t, 10, 100 * k);
        }
        assert!((p.rate() - 1000.0).abs() < 1.0, "rate {}", p.rate());
        // 3000 requests shed at once: the retries cover about 3 s at 1000/s.
        let ages: Vec<u32> = (0..3000).map(|_| p.max_age(t, 10, 1200)).collect();
        assert_eq!(ages[0], 1);
        assert_eq!(
            *ages.last().unwrap(),
            4,
            "3 s of queue after 10 ms in flight"
        );
        assert!(ages.windows(2).all(|w| w[0] <= w[1]), "slots in order");
        let in_second = |s: u32| ages.iter().filter(|&&a| a == s).count();
        assert!((900..=1100).contains(&in_second(2)), "{}", in_second(2));
        assert!((900..=1100).contains(&in_second(3)), "{}", in_second(3));
    }

    #[test]
    fn max_age_is_capped_and_the_queue_moves_on() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1);
        // 10/s assumed: 10 000 shed requests would need 1000 s.
        let last = (0..10_000).map(|_| p.max_age(t0, 1, 0)).last().unwrap();
        assert_eq!(last, MAX_AGE_CAP_S);
        // Once time has passed, slots are near again.
        let later = t0 + Duration::from_secs(u64::from(MAX_AGE_CAP_S) + 5);
        assert!(p.max_age(later, 0, 0) <= 2);
    }
}
