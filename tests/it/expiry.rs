//! Issue 24: the expiry of a whole fleet after an outage longer than its lifetime. Every
//! registration is due at once when the daemon starts again; it expires them in bounded
//! steps (`registry.expiry_batch` per store commit, other work served between two), every
//! expiry event reaches the key's channel once, and REST answers meanwhile.

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{Daemon, eventually};

const FLEET: usize = 400;
const BATCH: usize = 25;
/// The fleet's lifetime: long enough for all of it to register before the first expires.
const LIFETIME_S: u64 = 8;

#[test]
fn a_fleet_due_at_restart_expires_in_batches_with_one_event_each() {
    let d = Daemon::start_with(&format!("[registry]\nexpiry_batch = {BATCH}\n"));
    // The admin key's channel, opened before the fleet comes (it is stored: the events
    // queued while nobody pulls wait for the next pull).
    assert!(d.pull_now().is_none());
    let names: Vec<String> = (0..FLEET).map(|i| format!("fleet-{i:04}")).collect();
    let lt = format!("lt={LIFETIME_S}");
    let mut dev = d.device();
    let first = Instant::now();
    for name in &names {
        dev.register(&[&format!("ep={name}"), &lt], "</3/0>,</3303/0/5700>;obs");
    }
    let last = Instant::now();
    let registered = d.collect_events(Duration::from_secs(20), |e| {
        e.of("registrations").len() >= FLEET
    });
    assert_eq!(registered.of("registrations").len(), FLEET);
    assert_eq!(
        d.metric("registrations_expired_total"),
        0,
        "the fleet must all be registered before the outage: raise LIFETIME_S"
    );
    assert!(first.elapsed() < Duration::from_secs(LIFETIME_S));

    // The outage: killed, down for longer than every registration's lifetime.
    let mut d = d;
    d.kill9();
    let past = Duration::from_secs(LIFETIME_S) + Duration::from_millis(1500);
    std::thread::sleep(past.saturating_sub(last.elapsed()));
    // Started again after every deadline: all of the fleet is due at once.
    let d = d.crash_and_restart();

    // REST answers while the expiry runs; what it shows only goes down.
    let mut seen = Vec::new();
    let gone = eventually(Duration::from_secs(60), || {
        let r = d.get("/v2/endpoints");
        assert_eq!(r.status, 200, "{}", r.body);
        let n = r.json().as_array().map_or(usize::MAX, Vec::len);
        seen.push(n);
        n == 0
    });
    assert!(gone, "the fleet did not expire; seen {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] >= w[1]), "{seen:?}");
    assert!(
        eventually(Duration::from_secs(20), || d
            .metric("registrations_expired_total")
            == FLEET as u64),
        "expired {} of {FLEET}",
        d.metric("registrations_expired_total")
    );
    // In bounded steps: all due at once, so exactly ceil(FLEET / BATCH) of them.
    assert_eq!(
        d.metric("registration_expiry_batches_total"),
        FLEET.div_ceil(BATCH) as u64
    );

    // Each expiry reached the channel once, durably queued, naming its endpoint.
    let events = d.collect_events(Duration::from_secs(20), |e| {
        e.of("registrations-expired").len() >= FLEET
    });
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for e in events.of("registrations-expired") {
        let name = e.as_str().expect("an expiry event is the endpoint's name");
        *count.entry(name.to_string()).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = names.iter().map(|n| (n.clone(), 1)).collect();
    assert_eq!(count, want);
}
