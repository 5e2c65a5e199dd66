//! `--expiry` (issue 24): the whole fleet expiring at once after an outage longer than
//! its lifetime.
//!
//! `--big-devices` endpoints are registered by the bulk loader ([`crate::bulk`],
//! `--bulk-sockets` sockets, 8 outstanding each) against a fresh daemon whose admin key
//! has a long-poll channel (so that every expiry is an event queued for it). Then the
//! daemon is killed (`kill -9`) and, as if it had been down for longer than the
//! registrations' lifetime, every stored deadline is moved back by the time to the last
//! one plus a second (one `UPDATE` of the `expires_at_ms` field in the state directory's
//! SQLite database, the only change made behind the daemon's back; the bulk loader
//! registers for 86 400 s, so waiting the lifetime out is not an option). The daemon is
//! started again on that state; from its ready file the bench
//!
//! - polls `/metrics` every 100 ms: the registered endpoints, `registrations_expired_total`,
//!   `registration_expiry_batches_total` (the steps of `registry.expiry_batch`) and the
//!   notification events queued, until no endpoint is left;
//! - asks `GET /v2/endpoints/{name}` of one endpoint of the fleet every 20 ms over a
//!   connection of its own and records each answer's latency: REST must answer all along
//!   (200 while the endpoint is there, 404 after it expired).
//!
//! Bounded by `--timeout-s` for each phase (registering, expiring).

use super::*;

/// What the expiry run measured.
struct Expiry {
    n: usize,
    restored: u64,
    ready: Duration,
    /// From the ready file to the first sample with no endpoint left.
    expired_in: Option<Duration>,
    expired: u64,
    steps: u64,
    /// Notification events queued for the key's channel since the start, and those of
    /// them pushed out of the full queue (`notifications.max_queued_per_key`).
    events: u64,
    events_dropped_full: u64,
    /// The probe's answers: latency and status.
    probes: Vec<(Duration, u16)>,
    probe_errors: usize,
    /// Daemon CPU from the ready file to the end (the first steps may run before it).
    cpu: Duration,
    /// (time since ready, endpoints left) every 100 ms.
    samples: Vec<(Duration, u64)>,
}

pub(crate) fn run(args: &Args) -> Result<Vec<Row>> {
    let e = expiry(args)?;
    Ok(rows(&e))
}

fn expiry(args: &Args) -> Result<Expiry> {
    let n = args.big_devices;
    let timeout = Duration::from_secs(args.timeout_s);
    let mut daemon = Daemon::start(&args.daemon, args)?;
    let api = daemon.api();
    api.open_channel()?;
    let r = bulk::register(daemon.coap, n, args.bulk_sockets, 8, "x", timeout)?;
    ensure!(
        r.registered == n,
        "bulk registration: {} of {n} registered, {} failed, {} unfinished at the deadline",
        r.registered,
        r.failed,
        r.unfinished
    );
    // Acknowledged registrations are durable; the sleep lets the last group commits of
    // the events settle before the kill.
    std::thread::sleep(Duration::from_secs(1));
    daemon.kill9();
    let moved = outage(&daemon.state_dir())?;
    ensure!(
        moved as usize >= n,
        "{moved} stored registrations moved into the past, {n} registered"
    );
    let t = Instant::now();
    daemon.spawn()?;
    let ready = t.elapsed();
    let pid = daemon.pid();
    let cpu0 = cpu_time(pid)?;
    let api = daemon.api();
    // The start's own count (the metrics are read after the first steps ran).
    let restored = daemon
        .logs()
        .iter()
        .rev()
        .find_map(|l| {
            let (_, rest) = l.split_once("loaded ")?;
            rest.strip_suffix(" stored registrations")?.parse().ok()
        })
        .ok_or_else(|| anyhow!("no \"loaded N stored registrations\" in the daemon's log"))?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let stop = Arc::clone(&stop);
        let probe_api = daemon.api();
        let path = format!(
            "/v2/endpoints/{}",
            bulk::endpoint_name("x", n - 1, n, args.bulk_sockets)
        );
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            let mut errors = 0;
            let mut tick = Instant::now();
            while !stop.load(Ordering::Acquire) {
                let sent = Instant::now();
                match probe_api.get(&path) {
                    Ok((status, _)) => answers.push((sent.elapsed(), status)),
                    Err(_) => errors += 1,
                }
                tick += Duration::from_millis(20);
                std::thread::sleep(tick.saturating_duration_since(Instant::now()));
            }
            (answers, errors)
        })
    };
    let mut samples = Vec::new();
    let mut expired_in = None;
    let mut tick = Instant::now();
    while t0.elapsed() < timeout {
        let left = api.metric("registered_endpoints")?;
        samples.push((t0.elapsed(), left));
        if samples.len() % 50 == 0 {
            eprintln!(
                "  {:>5.1} s: {left} endpoints left",
                t0.elapsed().as_secs_f64()
            );
        }
        if left == 0 {
            expired_in = Some(t0.elapsed());
            break;
        }
        tick += Duration::from_millis(100);
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
    // The last events of the expiry are queued after the last step's commit.
    std::thread::sleep(Duration::from_millis(500));
    let cpu = cpu_time(pid)?.saturating_sub(cpu0);
    stop.store(true, Ordering::Release);
    let (probes, probe_errors) = probe
        .join()
        .map_err(|_| anyhow!("the REST probe panicked"))?;
    // The process is new: its counters count from its start.
    let m = api.metrics()?;
    let delta = |k: &str| m.get(k).copied().unwrap_or(0);
    Ok(Expiry {
        n,
        restored,
        ready,
        expired_in,
        expired: delta("registrations_expired_total"),
        steps: delta("registration_expiry_batches_total"),
        events: delta("events_published_total"),
        events_dropped_full: delta("events_dropped_queue_full_total"),
        probes,
        probe_errors,
        cpu,
        samples,
    })
}

/// The outage: moves every stored registration's deadline back so that the last one
/// lies a second in the past (the order of the deadlines kept). Returns the rows changed.
fn outage(state: &Path) -> Result<u64> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let db = state.join("connectord.db");
    let c = rusqlite::Connection::open(&db).with_context(|| format!("{}", db.display()))?;
    let last: i64 = c.query_row(
        "SELECT coalesce(max(json_extract(data, '$.expires_at_ms')), 0) FROM registrations",
        [],
        |r| r.get(0),
    )?;
    let shift = (last - now_ms).max(0) + 1000;
    let changed = c.execute(
        "UPDATE registrations SET data = json_set(data, '$.expires_at_ms',
             json_extract(data, '$.expires_at_ms') - ?1)",
        [shift],
    )?;
    Ok(changed as u64)
}

fn rows(e: &Expiry) -> Vec<Row> {
    let mut lat: Vec<Duration> = e.probes.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let ok = e.probes.iter().filter(|(_, s)| *s == 200).count();
    let gone = e.probes.iter().filter(|(_, s)| *s == 404).count();
    let other = e.probes.len() - ok - gone;
    let secs = e.expired_in.map(|d| d.as_secs_f64());
    // The rate in each tenth of the fleet, from the samples of endpoints left.
    let tenth = (e.restored / 10).max(1);
    let at = |left_at_most: u64| {
        e.samples
            .iter()
            .find(|(_, l)| *l <= left_at_most)
            .map(|(t, _)| *t)
    };
    let slices: Vec<String> = (1..=10u64)
        .map(|k| {
            let from = if k == 1 {
                Some(Duration::ZERO)
            } else {
                at(e.restored.saturating_sub((k - 1) * tenth))
            };
            let to = at(e.restored.saturating_sub(k * tenth));
            match (from, to) {
                (Some(a), Some(b)) if b > a => {
                    format!("{:.0}", tenth as f64 / (b - a).as_secs_f64())
                }
                _ => "?".into(),
            }
        })
        .collect();
    vec![
        Row {
            scenario: format!("expiry: whole fleet after an outage ({} stored)", e.n),
            value: secs.unwrap_or(f64::NAN),
            unit: "s",
            target: None,
            detail: format!(
                "restart spawn→ready {:.2} s with {} restored; {} expired in {} steps{}; \
                 per 10 % slice (expired/s): {}; {} notification events queued for the \
                 key's channel ({} of them pushed out of its full queue); daemon CPU {:.1} s \
                 ({:.1} µs per expired registration)",
                e.ready.as_secs_f64(),
                e.restored,
                e.expired,
                e.steps,
                match secs {
                    Some(s) => format!(" within {s:.1} s of ready"),
                    None => " (NOT all expired by the deadline)".into(),
                },
                slices.join(", "),
                e.events,
                e.events_dropped_full,
                e.cpu.as_secs_f64(),
                e.cpu.as_secs_f64() * 1e6 / e.expired.max(1) as f64,
            ),
        },
        Row {
            scenario: "expiry: REST latency meanwhile (GET /v2/endpoints/{ep})".into(),
            value: ms(percentile(&lat, 0.99)),
            unit: "ms p99",
            target: None,
            detail: format!(
                "{} answers every 20 ms ({ok} 200, {gone} 404, {other} other, {} failed): \
                 p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                e.probes.len(),
                e.probe_errors,
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                ms(lat.last().copied().unwrap_or_default()),
            ),
        },
    ]
}
