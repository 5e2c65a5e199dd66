//! End-to-end tests of `GET /metrics`: the series an operator needs (queues, latencies,
//! build) move with real traffic, and a key with only `metrics:read` may scrape them.

use crate::support;

use std::time::Duration;

use serde_json::json;
use support::{Daemon, eventually, http};

/// The value of the first sample of `name` whose labels contain `labels` (`""`: any).
fn sample(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (series, value) = rest.rsplit_once(' ')?;
        let ok = if labels.is_empty() {
            series.is_empty() || series.starts_with('{')
        } else {
            series.starts_with('{') && series.contains(labels)
        };
        ok.then(|| value.parse().ok()).flatten()
    })
}

/// Asserts each `(name, labels, value)`: the first sample of `name` whose labels contain
/// `labels` has that value.
fn assert_samples(body: &str, want: &[(&str, &str, f64)]) {
    for &(name, labels, value) in want {
        assert_eq!(sample(body, name, labels), Some(value), "{name}:\n{body}");
    }
}

fn scrape(d: &Daemon) -> String {
    let r = d.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[test]
fn operator_series_exist_and_move() {
    let d = Daemon::start();
    let before = scrape(&d);
    assert_eq!(
        sample(
            &before,
            "connectord_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0),
        "{before}"
    );
    for h in [
        "connectord_rest_request_duration_seconds",
        "connectord_coap_request_duration_seconds",
        "connectord_store_commit_duration_seconds",
    ] {
        assert!(
            before.contains(&format!("# TYPE {h} histogram")),
            "{h}:\n{before}"
        );
        assert!(sample(&before, &format!("{h}_bucket"), "le=\"+Inf\"").is_some());
    }
    let count = |body: &str, h: &str| sample(body, &format!("{h}_count"), "").unwrap();
    assert_eq!(sample(&before, "connectord_events_queued", ""), Some(0.0));
    assert_eq!(sample(&before, "connectord_requests_queued", ""), Some(0.0));

    // The admin key gets a channel; a registration queues an event on it.
    assert!(d.pull_now().is_none());
    let mut dev = d.device();
    dev.register(&["ep=metered", "lt=300"], "</3/0>");
    assert!(eventually(Duration::from_secs(5), || {
        sample(&scrape(&d), "connectord_events_queued", "") == Some(1.0)
    }));
    assert_samples(
        &scrape(&d),
        &[
            ("connectord_channel_events_queued", "key=\"", 1.0),
            ("connectord_events_unacknowledged", "", 0.0),
        ],
    );
    // Pulled but not yet acknowledged (by the next pull).
    assert!(d.pull_now().is_some());
    assert_samples(
        &scrape(&d),
        &[
            ("connectord_events_unacknowledged", "", 1.0),
            ("connectord_channel_events_unacknowledged", "key=\"", 1.0),
        ],
    );

    // A device that does not answer: one request in flight, the next two wait.
    for _ in 0..3 {
        d.async_request("GET", "/v2/endpoints/metered/3/0/0", None, None);
    }
    assert!(eventually(Duration::from_secs(5), || {
        sample(&scrape(&d), "connectord_requests_queued", "") == Some(2.0)
    }));
    let body = scrape(&d);
    assert_samples(
        &body,
        &[
            ("connectord_requests_queue_max", "", 2.0),
            ("connectord_requests_in_flight", "", 1.0),
        ],
    );

    // The histograms counted the traffic.
    for h in [
        "connectord_rest_request_duration_seconds",
        "connectord_coap_request_duration_seconds",
        "connectord_store_commit_duration_seconds",
    ] {
        assert!(count(&body, h) > count(&before, h), "{h}:\n{body}");
        assert_eq!(
            sample(&body, &format!("{h}_bucket"), "le=\"+Inf\""),
            Some(count(&body, h)),
            "{h}"
        );
    }
}

/// A key with only `metrics:read` scrapes `/metrics` and reaches nothing else.
#[test]
fn a_metrics_read_key_scrapes_and_nothing_else() {
    let d = Daemon::start();
    let body = json!({"name": "prometheus", "scopes": ["metrics:read"]}).to_string();
    let r = d.send_json("POST", "/api/api_tokens", body.as_bytes());
    assert_eq!(r.status, 201, "{}", r.body);
    let auth = format!("Bearer {}", r.json()["access_key"].as_str().unwrap());
    let get = |path: &str| http("GET", &d.url(path), &[("Authorization", &auth)], None);
    let r = get("/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("connectord_build_info"));
    assert_eq!(get("/v2/metrics").status, 200);
    for path in [
        "/v2/endpoints",
        "/v2/subscriptions",
        "/v2/notification/pull?noWait=true",
        "/v2/limits",
        "/api/api_tokens",
    ] {
        assert_eq!(get(path).status, 403, "{path}");
    }
    // The data scopes alone do not open /metrics; admin does.
    let body = json!({"name": "app"}).to_string();
    let r = d.send_json("POST", "/api/api_tokens", body.as_bytes());
    assert_eq!(r.status, 201, "{}", r.body);
    let app = format!("Bearer {}", r.json()["access_key"].as_str().unwrap());
    let r = http("GET", &d.url("/metrics"), &[("Authorization", &app)], None);
    assert_eq!(r.status, 403);
    assert_eq!(d.get("/metrics").status, 200);
}

/// Datagrams the kernel drops at a listener's full receive buffer are counted per
/// listener in `connectord_coap_kernel_drops_total` and said in the log (issue 24: no
/// silent drops): the daemon is stopped (SIGSTOP) while a burst larger than its receive
/// buffer (4 MiB asked, at most 8 MiB granted) arrives.
#[test]
fn kernel_drops_at_a_full_receive_buffer_are_counted_and_logged() {
    let d = Daemon::start();
    let listener = format!("listener=\"udp:{}\"", d.coap);
    let before = scrape(&d);
    assert_eq!(
        sample(&before, "connectord_coap_kernel_drops_total", &listener),
        Some(0.0),
        "{before}"
    );
    d.signal("STOP");
    let burst = (|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        // Not CoAP (version 0): dropped as malformed once read. 12 000 × 1 200 bytes is
        // more than 8 MiB before the kernel's per-datagram overhead.
        let junk = [0u8; 1200];
        for _ in 0..12_000 {
            s.send_to(&junk, d.coap)?;
        }
        std::io::Result::Ok(())
    })();
    d.signal("CONT");
    burst.unwrap();
    // The count comes with a datagram the daemon reads after the burst (SO_RXQ_OVFL, one
    // in 32 sampled): one at a time until it shows.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (dropped, after) = loop {
        probe.send_to(&[0u8; 4], d.coap).unwrap();
        let after = scrape(&d);
        let dropped = sample(&after, "connectord_coap_kernel_drops_total", &listener)
            .unwrap_or_else(|| panic!("no kernel drops of {listener}:\n{after}"));
        if dropped > 0.0 || std::time::Instant::now() > deadline {
            break (dropped, after);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(dropped > 0.0, "{after}");
    // The log's check runs every 10 s: within two of them.
    assert!(
        d.wait_log("the kernel dropped", Duration::from_secs(25)),
        "{:#?}",
        d.logs()
    );
}
