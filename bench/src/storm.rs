//! `--storm` (issue 24): a fleet registering at once after an outage.
//!
//! `--big-devices` endpoints register from `--bulk-sockets` UDP sockets (the bulk loader,
//! [`crate::bulk`], `--storm-window` outstanding per socket: 80 000 at once with the
//! defaults of the run) against a fresh daemon. The loader behaves as a CoAP client
//! does: retransmissions after a random 2–3 s (doubling, 4 at most, then the registration
//! fails), and after a 5.03 with Max-Age a new request once Max-Age (plus up to 1 s of
//! jitter) is over. A thread polls `connectord_registrations_total` every 100 ms, which
//! gives the rate over the storm and per 10 % slice of the registrations (whether it
//! degrades as the registry grows). Bounded by `--timeout-s` (the loader's deadline).

use super::*;

/// What the storm measured.
struct Storm {
    n: usize,
    sockets: usize,
    window: usize,
    report: bulk::BulkReport,
    /// (time since the loader started, registrations_total) every 100 ms.
    samples: Vec<(Duration, u64)>,
    cpu: Duration,
    /// Before → after of the daemon's counters.
    shed: u64,
    busy_drops: u64,
    duplicates: u64,
    datagrams: u64,
    /// The kernel's drops at the daemon's UDP socket (full receive buffer), if readable.
    kernel_drops: Option<u64>,
    rss_after_kib: u64,
}

pub(crate) fn run(args: &Args) -> Result<Vec<Row>> {
    let s = storm(args)?;
    Ok(rows(&s))
}

fn storm(args: &Args) -> Result<Storm> {
    let n = args.big_devices;
    let timeout = Duration::from_secs(args.timeout_s);
    let daemon = Daemon::start(&args.daemon, args)?;
    let api = daemon.api();
    std::thread::sleep(Duration::from_secs(1));
    let pid = daemon.pid();
    let m0 = api.metrics()?;
    let get0 = |k: &str| m0.get(k).copied().unwrap_or(0);
    let drops0 = udp_drops(daemon.coap.port());
    let cpu0 = cpu_time(pid)?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = Arc::clone(&stop);
        let api = daemon.api();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut tick = Instant::now();
            while !stop.load(Ordering::Acquire) && tick.elapsed() < timeout * 2 {
                if let Ok(v) = api.metric("registrations_total") {
                    samples.push((t0.elapsed(), v));
                    if samples.len() % 100 == 0 {
                        eprintln!("  {:>5.0} s: {v} registered", t0.elapsed().as_secs_f64());
                    }
                }
                tick += Duration::from_millis(100);
                std::thread::sleep(tick.saturating_duration_since(Instant::now()));
            }
            samples
        })
    };
    let loaded = bulk::register(
        daemon.coap,
        n,
        args.bulk_sockets,
        args.storm_window,
        "s",
        timeout,
    );
    let cpu = cpu_time(pid)?.saturating_sub(cpu0);
    // One more sample after the loader's end (the last registrations are counted).
    std::thread::sleep(Duration::from_millis(250));
    stop.store(true, Ordering::Release);
    let samples = poller
        .join()
        .map_err(|_| anyhow!("the metrics poller panicked"))?;
    let report = loaded?;
    let m = api.metrics()?;
    let delta = |k: &str| m.get(k).copied().unwrap_or(0).saturating_sub(get0(k));
    let kernel_drops = match (drops0, udp_drops(daemon.coap.port())) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Ok(Storm {
        n,
        sockets: args.bulk_sockets,
        window: args.storm_window,
        report,
        samples,
        cpu,
        shed: delta("coap_shed_total"),
        busy_drops: delta("coap_busy_drops_total"),
        duplicates: delta("coap_duplicates_total"),
        datagrams: delta("coap_datagrams_total"),
        kernel_drops,
        rss_after_kib: vm_rss_kib(pid)?,
    })
}

/// The `drops` column of the daemon's IPv4 UDP socket on 127.0.0.1:`port` in
/// `/proc/net/udp` (datagrams the kernel dropped because the socket's receive buffer was
/// full, or for a bad checksum).
fn udp_drops(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()))
            .then(|| f.last()?.parse().ok())
            .flatten()
    })
}

/// The time at which the count first reached `at_least`.
fn reached(samples: &[(Duration, u64)], at_least: u64) -> Option<Duration> {
    samples
        .iter()
        .find(|(_, c)| *c >= at_least)
        .map(|(t, _)| *t)
}

/// Registrations per second in each tenth of the registrations (by the polled count).
fn slices(samples: &[(Duration, u64)], n: usize) -> Vec<Option<f64>> {
    let tenth = (n / 10).max(1) as u64;
    let first = reached(samples, 1);
    (1..=10u64)
        .map(|k| {
            let start = if k == 1 {
                first
            } else {
                reached(samples, (k - 1) * tenth)
            }?;
            let end = reached(samples, k * tenth)?;
            let secs = end.saturating_sub(start).as_secs_f64();
            (secs > 0.0).then(|| tenth as f64 / secs)
        })
        .collect()
}

fn rows(s: &Storm) -> Vec<Row> {
    let r = &s.report;
    let first = reached(&s.samples, 1);
    let last = s.samples.last().map(|x| x.1).unwrap_or(0);
    let all_at = reached(&s.samples, last.max(1));
    let rate = match (first, all_at) {
        (Some(a), Some(b)) if b > a => last as f64 / (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let per10: Vec<String> = slices(&s.samples, s.n)
        .iter()
        .map(|v| v.map_or("?".into(), |r| format!("{r:.0}")))
        .collect();
    let cpu_us = s.cpu.as_secs_f64() * 1e6 / r.registered.max(1) as f64;
    vec![
        Row {
            scenario: format!(
                "storm: registered ({} endpoints, {} sockets × {})",
                s.n, s.sockets, s.window
            ),
            value: r.registered as f64,
            unit: "reg",
            target: Some((s.n as f64, true)),
            detail: format!(
                "{} failed ({} after the last retransmission), {} unfinished at the deadline; \
                 loader start→last answer {:.1} s; \
                 {} retransmissions; {} answered 5.03 with Max-Age (mean Max-Age {:.1} s), \
                 daemon counted {} shed, {} NON dropped busy, {} duplicates, {} datagrams; \
                 kernel drops at the daemon's socket {}; RSS after {} MiB",
                r.failed,
                r.timed_out,
                r.unfinished,
                r.elapsed.as_secs_f64(),
                r.retransmissions,
                r.shed,
                r.shed_max_age_s as f64 / r.shed.max(1) as f64,
                s.shed,
                s.busy_drops,
                s.duplicates,
                s.datagrams,
                s.kernel_drops.map_or("?".into(), |d| d.to_string()),
                s.rss_after_kib / 1024,
            ),
        },
        Row {
            scenario: "storm: registrations/s, first → last".into(),
            value: rate,
            unit: "reg/s",
            target: None,
            detail: format!(
                "first registration seen at {:.1} s, all {last} at {:.1} s; per 10 % slice: {}; \
                 daemon CPU {cpu_us:.1} µs per registration",
                first.map_or(0.0, |t| t.as_secs_f64()),
                all_at.map_or(0.0, |t| t.as_secs_f64()),
                per10.join(", ")
            ),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_the_rate_of_each_tenth() {
        // 100 registrations: 10 per second for 5 s, then 5 per second.
        let mut samples = vec![(Duration::ZERO, 0)];
        let mut c = 0;
        for s in 1..=15u64 {
            c += if s <= 5 { 10 } else { 5 };
            samples.push((Duration::from_secs(s), c.min(100)));
        }
        let r = slices(&samples, 100);
        assert_eq!(r.len(), 10);
        // The first slice counts from the first registration seen (at 1 s, 10 of them).
        assert_eq!(
            r[0], None,
            "10 reached at the first sample: no time measured"
        );
        assert_eq!(r[1], Some(10.0));
        assert_eq!(r[9], Some(5.0));
    }
}
