//! End-to-end tests of the per-channel limits (issue 23, item 4; Pelion's "Event
//! notification channel" properties): the queue's bytes per key
//! (`notifications.max_queued_bytes_per_key`), the event lifetime on every channel kind
//! (`discard_after_s`), the removal of idle channels (`idle_channel_removal_s`), all shown
//! in `GET /v2/limits` (`notification-channel`), and `check-config` refusing bad values.
//! Devices are our simulator (exact counts) and aiocoap (a stack nobody here wrote).

use crate::support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use coap_lite::{CoapOption, MessageType};
use serde_json::{Value, json};
use support::Daemon;
use support::coap::{Device, path_of, uint, uint_option};
use support::peers::Lwm2mDevice;
use support::receiver::Receiver;

const WAIT: Duration = Duration::from_secs(10);
const LINKS: &str = r#"</3/0>,</3303/0/5700>;obs;rt="temperature""#;
/// `connectord_core::config::EVENT_OVERHEAD_BYTES`, as documented.
const OVERHEAD: u64 = 200;

/// Sends a notification (or the answer to the observe registration) with Observe=`seq`.
fn notify(
    dev: &Device,
    to: SocketAddr,
    token: &[u8],
    mid: u16,
    mtype: MessageType,
    seq: u32,
    value: &[u8],
) {
    let mut p = support::observe_content(mtype, mid, token, seq, value);
    p.add_option(CoapOption::MaxAge, uint(30));
    support::send_packet(dev, &p, to);
}

/// Registers `ep`, subscribes the test key to its `/3303/0/5700` and answers the observe
/// registration; answers the token and the daemon's address, with the key's queue empty.
fn subscribed(d: &Daemon, dev: &mut Device, ep: &str) -> (Vec<u8>, SocketAddr) {
    assert!(d.pull_now().is_none(), "the channel starts empty");
    dev.register(&[&format!("ep={ep}"), "lt=300"], LINKS);
    let id = d.async_request(
        "PUT",
        &format!("/v2/subscriptions/{ep}/3303/0/5700"),
        None,
        None,
    );
    let (req, from) = dev.recv_request(WAIT).expect("no observe request");
    assert_eq!(path_of(&req), "/3303/0/5700");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    let token = req.get_token().to_vec();
    notify(
        dev,
        from,
        &token,
        req.header.message_id,
        MessageType::Acknowledgement,
        1,
        b"0",
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    // Acknowledges the last answer: nothing is left queued.
    assert!(d.pull_now().is_none());
    (token, from)
}

/// `GET /v2/limits`, `notification-channel`.
fn channel_limits(d: &Daemon) -> Value {
    let r = d.get("/v2/limits");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["notification-channel"].clone()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn payload(entry: &Value) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(entry["payload"].as_str().unwrap())
        .unwrap();
    String::from_utf8(raw).unwrap()
}

/// A queue over `max_queued_bytes_per_key` drops its oldest events: the route and the
/// metric count them, the queue's bytes are its entries' JSON plus the documented
/// overhead each, and the newest events are delivered, in order.
#[test]
fn a_small_byte_limit_drops_the_oldest_and_delivers_the_newest_in_order() {
    let d = Daemon::start_with("[notifications]\nmax_queued_bytes_per_key = 4096\n");
    let mut dev = d.device();
    let (token, from) = subscribed(&d, &mut dev, "lim-1");
    let c = channel_limits(&d);
    assert_eq!(c["channel"]["queued-events"], 0, "{c}");
    let sent: Vec<String> = (0..40)
        .map(|i| format!("{i:03}-{}", "x".repeat(96)))
        .collect();
    for (i, v) in sent.iter().enumerate() {
        let i = u16::try_from(i).unwrap();
        notify(
            &dev,
            from,
            &token,
            600 + i,
            MessageType::NonConfirmable,
            2 + u32::from(i),
            v.as_bytes(),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        support::eventually(WAIT, || {
            let ch = &channel_limits(&d)["channel"];
            n(&ch["queued-events"]) + n(&ch["dropped-queue-bytes"]) == 40
        }),
        "not every notification was queued or dropped: {}",
        channel_limits(&d)
    );
    let ch = channel_limits(&d)["channel"].clone();
    let (queued, bytes, dropped) = (
        n(&ch["queued-events"]),
        n(&ch["queued-bytes"]),
        n(&ch["dropped-queue-bytes"]),
    );
    assert!(queued >= 1 && dropped >= 1 && bytes <= 4096, "{ch}");
    assert_eq!(ch["dropped-queue-count"], 0, "{ch}");
    assert_eq!(ch["expired"], 0, "{ch}");
    assert_eq!(d.metric("events_dropped_queue_full_total"), dropped);
    assert_eq!(d.metric("events_discarded_total"), dropped);

    let e = d.collect_events(WAIT, |e| e.of("notifications").len() as u64 >= queued);
    let got = e.of("notifications");
    let values: Vec<String> = got.iter().map(payload).collect();
    assert_eq!(values, sent[40 - queued as usize..], "the newest, in order");
    let counted: u64 = got
        .iter()
        .map(|entry| serde_json::to_string(entry).unwrap().len() as u64 + OVERHEAD)
        .sum();
    assert_eq!(
        bytes, counted,
        "bytes: the rendered entries plus {OVERHEAD} each"
    );
    assert!(d.pull_now().is_none(), "nothing else");
    assert_eq!(channel_limits(&d)["channel"]["queued-bytes"], 0);
}

/// The same with aiocoap as the device, notifying every 50 ms: the queue stays within its
/// bytes while nobody pulls, counts what it dropped, and what is delivered is in order.
#[test]
fn aiocoap_notifications_beyond_the_byte_limit_drop_the_oldest() {
    let d = Daemon::start_with("[notifications]\nmax_queued_bytes_per_key = 4096\n");
    assert!(d.pull_now().is_none());
    let dev = Lwm2mDevice::start(d.coap, "aio-lim", &["--notify-interval", "0.05"]);
    let id = d.async_request("PUT", "/v2/subscriptions/aio-lim/3303/0/5700", None, None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    assert!(
        support::eventually(WAIT, || n(
            &channel_limits(&d)["channel"]["dropped-queue-bytes"]
        ) >= 5),
        "nothing dropped: {}",
        channel_limits(&d)
    );
    let ch = channel_limits(&d)["channel"].clone();
    assert!(n(&ch["queued-bytes"]) <= 4096, "{ch}");
    let b = d.pull_now().expect("a batch");
    let values: Vec<f64> = b["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| payload(e).parse().unwrap())
        .collect();
    assert!(
        !values.is_empty() && values.len() as u64 <= 4096 / OVERHEAD,
        "{values:?}"
    );
    assert!(
        values.windows(2).all(|w| w[1] > w[0]),
        "in order: {values:?}"
    );
    assert!(d.metric("events_dropped_queue_full_total") >= 5);
    drop(dev);
}

/// The event lifetime (`discard_after_s`) holds for a callback channel as for long-poll:
/// an event that waited longer (its receiver down) is not delivered, and is counted on
/// the channel; a fresh one is.
#[test]
fn events_older_than_the_lifetime_are_not_delivered_to_a_callback() {
    let d = Daemon::start_with(
        "[notifications]\ndiscard_after_s = 1\nretry_initial_ms = 200\nretry_max_ms = 200\n",
    );
    let rx = Receiver::start(0);
    let port = rx.addr.port();
    let body = json!({"url": rx.url("/cb")}).to_string();
    assert_eq!(
        d.send_json("PUT", "/v2/notification/callback", body.as_bytes())
            .status,
        204
    );
    rx.stop();
    d.device().register(&["ep=too-old", "lt=300"], "</3/0>");
    assert!(support::eventually(WAIT, || d
        .metric("delivery_retries_total")
        >= 1));
    std::thread::sleep(Duration::from_millis(1300));
    let rx = Receiver::start(port);
    assert!(
        support::eventually(WAIT, || n(&channel_limits(&d)["channel"]["expired"]) == 1),
        "{}",
        channel_limits(&d)
    );
    d.device().register(&["ep=fresh", "lt=300"], "</3/0>");
    let got = rx.wait(WAIT, |r| !r.is_empty());
    let names: Vec<Value> = got
        .iter()
        .flat_map(|r| {
            r.json()["registrations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|e| e["ep"].clone())
        .collect();
    assert_eq!(names, [json!("fresh")], "the expired event was delivered");
    let c = channel_limits(&d);
    assert_eq!(
        (c["channel"]["kind"].as_str(), n(&c["channel"]["expired"])),
        (Some("callback"), 1)
    );
    assert_eq!(d.metric("events_discarded_total"), 1);
}

/// The event lifetime on a long-poll channel, counted on the channel.
#[test]
fn events_older_than_the_lifetime_are_not_pulled_and_are_counted() {
    let d = Daemon::start_with("[notifications]\ndiscard_after_s = 1\n");
    assert!(d.pull_now().is_none());
    d.device().register(&["ep=stale", "lt=300"], "</3/0>");
    std::thread::sleep(Duration::from_millis(1300));
    assert!(d.pull_now().is_none(), "a stale event was delivered");
    let c = channel_limits(&d);
    assert_eq!(
        (
            n(&c["channel"]["expired"]),
            n(&c["channel"]["queued-events"])
        ),
        (1, 0),
        "{c}"
    );
}

/// A channel idle for `idle_channel_removal_s` (no event in, no pull, no delivery) is
/// removed with its undelivered events, logged, counted, and stays removed across a
/// restart; a held long-poll keeps it; the key's next pull makes a new, empty channel.
#[test]
fn an_idle_channel_is_removed_and_stays_removed_after_a_restart() {
    let d = Daemon::start_with("[notifications]\nidle_channel_removal_s = 2\nlong_poll_s = 4\n");
    assert!(d.pull_now().is_none());
    // A long-poll held longer than the idle time keeps the channel.
    let url = d.url("/v2/notification/pull");
    let key = d.key.clone();
    let held = std::thread::spawn(move || support::http_get(&url, Some(&key), None));
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(channel_limits(&d)["channel"]["kind"], "long-poll");
    assert_eq!(held.join().unwrap().status, 204);
    assert_eq!(d.metric("channels_removed_idle_total"), 0);
    // An event nobody pulls: the channel goes, with it.
    d.device().register(&["ep=left", "lt=300"], "</3/0>");
    assert!(
        support::eventually(WAIT, || d.metric("channels_removed_idle_total") == 1),
        "not removed"
    );
    assert!(d.wait_log(
        "channel removed: no event in, pull or delivery for 2 s",
        WAIT
    ));
    assert_eq!(channel_limits(&d)["channel"], Value::Null);
    assert_eq!(d.metric("events_discarded_total"), 1, "its queued event");
    // Nothing is kept for the key now.
    d.device().register(&["ep=unrouted", "lt=300"], "</3/0>");
    let d = d.stop_and_restart();
    assert_eq!(
        channel_limits(&d)["channel"],
        Value::Null,
        "back after a restart"
    );
    assert!(d.pull_now().is_none(), "the new channel starts empty");
    d.device().register(&["ep=new", "lt=300"], "</3/0>");
    assert_eq!(d.pull_now().unwrap()["registrations"][0]["ep"], "new");
}

/// `GET /v2/limits` shows the channel limits as configured and the key's channel: none
/// before its first use, then its kind and counts.
#[test]
fn the_limits_route_shows_the_channel_limits_and_the_keys_channel() {
    let d = Daemon::start();
    let c = channel_limits(&d);
    assert_eq!(
        c,
        json!({
            "limits": {
                "max-queued-events": 100000,
                "max-queued-bytes": 52428800,
                "event-overhead-bytes": OVERHEAD,
                "event-lifetime-s": 900,
                "idle-removal-s": 172800,
                "max-batch": 500
            },
            "channel": null
        })
    );
    assert!(d.pull_now().is_none());
    d.device().register(&["ep=shown", "lt=300"], "</3/0>");
    let ch = channel_limits(&d)["channel"].clone();
    assert_eq!(ch["kind"], "long-poll");
    assert_eq!(ch["served-here"], true);
    assert_eq!(ch["queued-events"], 1);
    assert!(n(&ch["queued-bytes"]) > OVERHEAD, "{ch}");
    for k in [
        "dropped-queue-count",
        "dropped-queue-bytes",
        "expired",
        "refused",
    ] {
        assert_eq!(ch[k], 0, "{k}: {ch}");
    }
    assert!(ch["idle-s"].is_u64(), "{ch}");
    let rx = Receiver::start(0);
    let body = json!({"url": rx.url("/cb")}).to_string();
    assert_eq!(
        d.send_json("PUT", "/v2/notification/callback", body.as_bytes())
            .status,
        204
    );
    assert_eq!(channel_limits(&d)["channel"]["kind"], "callback");
    assert!(support::eventually(WAIT, || channel_limits(&d)["channel"]
        ["queued-events"]
        == 0));
    assert_eq!(
        rx.wait(WAIT, |r| r.len() >= 2)[1].json()["registrations"][0]["ep"],
        "shown",
        "the callback delivers what was queued"
    );
}

/// `check-config` refuses channel limits out of range, naming the key.
#[test]
fn check_config_refuses_bad_channel_limits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    for (text, key) in [
        (
            "max_queued_bytes_per_key = 100",
            "notifications.max_queued_bytes_per_key",
        ),
        (
            "max_queued_bytes_per_key = -1",
            "notifications.max_queued_bytes_per_key",
        ),
        (
            "idle_channel_removal_s = 31536001",
            "notifications.idle_channel_removal_s",
        ),
        (
            "idle_channel_removal_s = \"2d\"",
            "notifications.idle_channel_removal_s",
        ),
        ("discard_after_s = 0", "notifications.discard_after_s"),
    ] {
        std::fs::write(&file, format!("[notifications]\n{text}\n")).unwrap();
        let out = Command::new(support::BIN)
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:2:", file.display())) && stderr.contains(key),
            "{text}: {stderr}"
        );
    }
    std::fs::write(
        &file,
        "[notifications]\nmax_queued_bytes_per_key = 4096\nidle_channel_removal_s = 0\n",
    )
    .unwrap();
    let out = Command::new(support::BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `d` knows `n` notification channels (another node's records and removals
/// reach it through the channels watch).
fn until_channels(d: &Daemon, n: u64) {
    assert!(
        support::eventually(WAIT, || d.metric("notification_channels") == n),
        "this node knows {} channels, not {n}",
        d.metric("notification_channels")
    );
}

/// Cluster (issue 22): the key's owner applies the byte bound to events made on another
/// node; the owner's `GET /v2/limits` counts, another node's shows the kind only; a pull
/// through the other node gets the newest events, in order.
#[test]
fn cluster_the_owner_bounds_the_queue_of_events_made_elsewhere() {
    let server = connectord_testkit::nats::NatsServer::start().unwrap();
    let limits = "[notifications]\nmax_queued_bytes_per_key = 4096\n";
    let n1 = Daemon::start_with(&format!(
        "{}{limits}",
        crate::cluster::cluster(&[server.url()], "n1")
    ));
    let n2 = crate::cluster::second_node(&server, &n1, "n2", limits);
    assert!(n1.pull_now().is_none(), "n1 makes the channel and owns it");
    until_channels(&n2, 1);
    let want: Vec<String> = (0..20).map(|i| format!("far-{i:02}")).collect();
    let mut devices = Vec::new();
    for ep in &want {
        let mut dev = n2.device();
        dev.register(&[&format!("ep={ep}"), "lt=300"], "</3/0>");
        devices.push(dev);
    }
    let owner = channel_limits(&n1)["channel"].clone();
    let queued = n(&owner["queued-events"]);
    assert!(owner["served-here"] == true && queued >= 1, "{owner}");
    assert_eq!(queued + n(&owner["dropped-queue-bytes"]), 20, "{owner}");
    assert!(n(&owner["queued-bytes"]) <= 4096, "{owner}");
    let other = channel_limits(&n2)["channel"].clone();
    assert_eq!(other, json!({"kind": "long-poll", "served-here": false}));
    let mut got = Vec::new();
    while (got.len() as u64) < queued {
        let r = n2.get("/v2/notification/pull?noWait=true");
        assert_eq!(r.status, 200, "{}", r.body);
        for e in r.json()["registrations"].as_array().unwrap() {
            got.push(e["ep"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        got,
        want[20 - queued as usize..],
        "the newest, in order, through n2"
    );
    assert!(n2.pull_now().is_none(), "nothing else");
}

/// Cluster: the owner removes its idle channel, durably; the other node forgets it (so
/// nothing is routed for the key), and the key's next pull, on either node, makes a new one.
#[test]
fn cluster_an_idle_channel_is_removed_on_every_node() {
    let server = connectord_testkit::nats::NatsServer::start().unwrap();
    let idle = "[notifications]\nidle_channel_removal_s = 2\n";
    let n1 = Daemon::start_with(&format!(
        "{}{idle}",
        crate::cluster::cluster(&[server.url()], "n1")
    ));
    let n2 = crate::cluster::second_node(&server, &n1, "n2", idle);
    assert!(n1.pull_now().is_none(), "n1 makes the channel and owns it");
    until_channels(&n2, 1);
    n2.device().register(&["ep=left", "lt=300"], "</3/0>");
    assert!(
        support::eventually(WAIT, || n1.metric("channels_removed_idle_total") == 1),
        "the owner did not remove its idle channel"
    );
    until_channels(&n2, 0);
    until_channels(&n1, 0);
    assert_eq!(channel_limits(&n2)["channel"], Value::Null);
    assert_eq!(
        n2.metric("channels_removed_idle_total"),
        0,
        "the owner's work"
    );
    n1.device().register(&["ep=unrouted", "lt=300"], "</3/0>");
    assert!(n2.pull_now().is_none(), "a new channel, empty");
    until_channels(&n1, 1);
    n1.device().register(&["ep=new", "lt=300"], "</3/0>");
    let r = n2.get("/v2/notification/pull");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["registrations"][0]["ep"], "new");
}
