//! Issue 23, item 3: several notification sinks at once, chosen per key by the callback
//! URL's scheme (webhooks for `http`/`https`, the MQTT sink for `mqtt`/`mqtts`), against
//! real receivers: the testkit's HTTP receiver and tarpit, and Debian's `mosquitto`
//! started by each test on free ports of 127.0.0.1, read with `mosquitto_sub` (a client
//! nobody here wrote).

use crate::notifications::{pushed, put_callback, set_callback};
use crate::support;

use std::process::{Command, Stdio};
use std::time::Duration;

use connectord_testkit::mosquitto::{Mosquitto, Subscriber, free_port, pki};
use serde_json::{Value, json};
use support::receiver::{Receiver, Tarpit};
use support::{Daemon, http};

const WAIT: Duration = Duration::from_secs(20);

/// The next `n` messages (probes left out), as (topic, payload as JSON).
fn take(sub: &Subscriber, n: usize) -> Vec<(String, Value)> {
    sub.take(n)
        .into_iter()
        .map(|line| {
            let (topic, payload) = line.split_once(' ').unwrap();
            (topic.to_string(), serde_json::from_str(payload).unwrap())
        })
        .collect()
}

/// A new access key of the default domain: (secret, id).
fn new_key(d: &Daemon, name: &str) -> (String, String) {
    let body = json!({ "name": name }).to_string();
    let r = d.send_json("POST", "/api/api_tokens", body.as_bytes());
    assert_eq!(r.status, 201, "{}", r.body);
    let j = r.json();
    (
        j["access_key"].as_str().unwrap().to_string(),
        j["id"].as_str().unwrap().to_string(),
    )
}

fn register(d: &Daemon, eps: &[&str]) {
    for ep in eps {
        d.device()
            .register(&[&format!("ep={ep}"), "lt=300"], "</3/0>");
    }
}

#[test]
fn a_webhook_key_and_an_mqtt_key_each_get_their_events() {
    let d = Daemon::start();
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(broker.port, "apps/#");
    let rx = Receiver::start(0);
    let (web_key, _) = new_key(&d, "web");
    let (mqtt_key, mqtt_id) = new_key(&d, "mqtt");
    set_callback(&d, &web_key, &rx.url("/hook"));
    set_callback(
        &d,
        &mqtt_key,
        &format!("mqtt://127.0.0.1:{}/apps/one", broker.port),
    );
    let r = http(
        "GET",
        &d.url("/v2/notification/callback"),
        &[("Authorization", &format!("Bearer {mqtt_key}"))],
        None,
    );
    assert_eq!(
        r.json()["url"],
        format!("mqtt://127.0.0.1:{}/apps/one", broker.port)
    );

    register(&d, &["both-1", "both-2"]);
    let got = rx.wait(WAIT, |r| pushed(r, "/hook").len() >= 2);
    assert_eq!(pushed(&got, "/hook"), ["both-1", "both-2"]);
    let msgs = take(&sub, 2);
    for (i, (topic, payload)) in msgs.iter().enumerate() {
        let ep = format!("both-{}", i + 1);
        assert_eq!(
            *topic,
            format!("apps/one/{mqtt_id}/registrations/{ep}"),
            "in order, on the key's topic"
        );
        assert!(!topic.contains(&mqtt_key), "never the secret in a topic");
        assert_eq!(payload["ep"], ep.as_str());
        assert_eq!(payload["resources"][0]["path"], "/3/0");
    }
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("notification sinks by callback URL scheme: http (webhook), https (webhook), mqtt (mqtt), mqtts (mqtt)")),
        "{:?}",
        d.logs()
    );
}

/// One key's webhook receiver never answers (60 s timeout); another key's MQTT broker and a
/// third key's webhook receiver get every event meanwhile.
#[test]
fn a_webhook_that_never_answers_holds_up_neither_mqtt_nor_another_webhook() {
    let mut d = Daemon::start_with("[plugins.settings.webhook]\ntimeout_s = 60\n");
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(broker.port, "ind/#");
    let tarpit = Tarpit::start();
    let rx = Receiver::start(0);
    let (a, _) = new_key(&d, "a");
    let (b, b_id) = new_key(&d, "b");
    let (c, _) = new_key(&d, "c");
    set_callback(&d, &a, &tarpit.url("/a"));
    set_callback(&d, &b, &format!("mqtt://127.0.0.1:{}/ind", broker.port));
    set_callback(&d, &c, &rx.url("/c"));

    register(&d, &["ind-0"]);
    let held = tarpit.wait(WAIT, |r| !r.is_empty());
    assert_eq!(held.len(), 1, "A's first delivery is held by its receiver");
    register(&d, &["ind-1", "ind-2"]);
    let got = rx.wait(WAIT, |r| pushed(r, "/c").len() >= 3);
    assert_eq!(pushed(&got, "/c"), ["ind-0", "ind-1", "ind-2"]);
    let topics: Vec<String> = take(&sub, 3).into_iter().map(|m| m.0).collect();
    assert_eq!(
        topics,
        (0..3)
            .map(|i| format!("ind/{b_id}/registrations/ind-{i}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(tarpit.held().len(), 1, "one batch in flight for A");
    d.signal("TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
}

/// The broker goes down after the callback was registered: deliveries are retried (logged,
/// counted) and every event arrives, in order, once it is back.
#[test]
fn events_wait_while_the_broker_is_down_and_arrive_once_it_is_back() {
    let d = Daemon::start_with(
        "[notifications]\nretry_initial_ms = 100\nretry_max_ms = 500\n[plugins.settings.mqtt]\ntimeout_s = 2\n",
    );
    let mut broker = Mosquitto::start(None);
    let sub = Subscriber::start(broker.port, "down/#");
    let (key, id) = new_key(&d, "k");
    // mosquitto without a password file lets any user in: the password is only there to
    // be kept out of the log.
    let url = format!("mqtt://sinks:s3cret@127.0.0.1:{}/down", broker.port);
    set_callback(&d, &key, &url);
    broker.stop();
    register(&d, &["down-0", "down-1", "down-2"]);
    assert!(
        d.wait_log("callback delivery failed, retrying", WAIT),
        "{:?}",
        d.logs()
    );
    assert!(support::eventually(WAIT, || d
        .metric("delivery_retries_total")
        >= 2));
    broker.run();
    let got = take(&sub, 3);
    let eps: Vec<&str> = got
        .iter()
        .map(|(topic, payload)| {
            assert!(
                topic.starts_with(&format!("down/{id}/registrations/")),
                "{topic}"
            );
            payload["ep"].as_str().unwrap()
        })
        .collect();
    assert_eq!(eps, ["down-0", "down-1", "down-2"]);
    assert!(support::eventually(WAIT, || d
        .metric("events_delivered_total")
        >= 3));
    assert_eq!(d.metric("events_discarded_total"), 0);
    let log = d.logs().join("\n");
    assert!(log.contains("mqtt://sinks:***@127.0.0.1"), "{log}");
    assert!(!log.contains("s3cret"), "no password in the log: {log}");
}

#[test]
fn mqtts_brokers_are_trusted_through_the_ca_file() {
    let pki = pki();
    let d = Daemon::start_with(&format!(
        "[plugins.settings.mqtt]\nca_file = \"{}\"\ntimeout_s = 5\n",
        pki.ca.display()
    ));
    let broker = Mosquitto::start(Some(&pki));
    let sub = Subscriber::start(broker.port, "sec/#");
    let (key, id) = new_key(&d, "tls");
    set_callback(
        &d,
        &key,
        &format!("mqtts://127.0.0.1:{}/sec", broker.tls_port.unwrap()),
    );
    register(&d, &["tls-0"]);
    let got = take(&sub, 1);
    assert_eq!(got[0].0, format!("sec/{id}/registrations/tls-0"));
    assert_eq!(got[0].1["ep"], "tls-0");

    // A daemon without the CA refuses that broker at registration (its certificate is not
    // trusted), with the reason.
    let other = Daemon::start();
    let (key, _) = new_key(&other, "tls");
    let r = put_callback(
        &other,
        &key,
        &format!("mqtts://127.0.0.1:{}/sec", broker.tls_port.unwrap()),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["message"].as_str().unwrap().contains("TLS"),
        "{}",
        r.body
    );
}

#[test]
fn a_callback_url_no_sink_takes_is_400_with_the_schemes_taken() {
    let d = Daemon::start();
    let dead = free_port();
    for (url, reason) in [
        (
            "ftp://example/cb".to_string(),
            "no notification sink takes callback URLs of scheme \"ftp\"; the schemes taken: http (webhook), https (webhook), mqtt (mqtt), mqtts (mqtt)",
        ),
        ("mqtt://127.0.0.1:1883/a/+/b".to_string(), "wildcards"),
        (
            format!("mqtt://u:hidden@127.0.0.1:{dead}/x"),
            "cannot connect to MQTT broker",
        ),
    ] {
        let r = put_callback(&d, &d.key, &url);
        assert_eq!(r.status, 400, "{url}: {}", r.body);
        assert_eq!(r.json()["type"], "bad_request");
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(reason), "{url}: {message}");
        assert!(!message.contains("hidden"), "{message}");
    }
    // Headers have nowhere to go in MQTT 3.1.1: refused rather than dropped.
    let body = json!({"url": "mqtt://127.0.0.1:1883/x", "headers": {"a": "b"}}).to_string();
    let r = d.send_json("PUT", "/v2/notification/callback", body.as_bytes());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("take no headers"), "{}", r.body);
    assert_eq!(d.get("/v2/notification/callback").status, 404);
}

/// The configuration before `sinks`: `[plugins] sink = "webhook"` starts the webhook sink
/// alone; webhooks work as before and MQTT callbacks are refused with the reason.
#[test]
fn the_old_sink_key_still_works() {
    let d = Daemon::start_with("[plugins]\nsink = \"webhook\"\n");
    let rx = Receiver::start(0);
    set_callback(&d, &d.key, &rx.url("/old"));
    register(&d, &["old-0"]);
    let got = rx.wait(WAIT, |r| !pushed(r, "/old").is_empty());
    assert_eq!(pushed(&got, "/old"), ["old-0"]);
    let (key, _) = new_key(&d, "m");
    let r = put_callback(&d, &key, "mqtt://127.0.0.1:1883/x");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body
            .contains("no notification sink takes callback URLs of scheme \\\"mqtt\\\""),
        "{}",
        r.body
    );
    assert!(
        d.logs().iter().any(|l| l.ends_with(
            "notification sinks by callback URL scheme: http (webhook), https (webhook)"
        )),
        "{:?}",
        d.logs()
    );
}

/// `sinks` and `sink` together, an empty or repeated list, and an unknown sink stop the
/// start with the key at fault.
#[test]
fn bad_sink_lists_are_refused_at_start() {
    for (plugins, want) in [
        (
            "sinks = [\"webhook\"]\nsink = \"webhook\"\n",
            "set either `sinks` (a list) or `sink`",
        ),
        ("sinks = []\n", "needs at least one sink"),
        ("sinks = [\"mqtt\", \"mqtt\"]\n", "names `mqtt` twice"),
        ("sinks = [\"webhook\", \"nosink\"]\n", "key `plugins.sinks`"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("connectord.toml");
        let extra = format!("[plugins]\n{plugins}");
        std::fs::write(&config, support::test_config(tmp.path(), "", &extra)).unwrap();
        let out = Command::new(support::BIN)
            .arg("check-config")
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{plugins}: {err}");
        assert!(err.contains(want), "{plugins}: {err}");
    }
}

/// The MQTT sink as a plugin file (`libsink_mqtt.so`, as the Debian package installs it)
/// replaces the built-in and delivers.
#[test]
fn the_mqtt_sink_loaded_from_its_file_delivers() {
    let built = support::build_plugin("sink-mqtt", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    support::install_plugin(&built, &dir, "libsink_mqtt.so");
    let d = Daemon::start_with(&format!("[plugins]\ndir = \"{}\"\n", dir.display()));
    let file = dir.join("libsink_mqtt.so");
    assert!(
        d.wait_log(
            &format!("sink plugin mqtt ({}, generation", file.display()),
            WAIT
        ),
        "{:?}",
        d.logs()
    );
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(broker.port, "file/#");
    let (key, id) = new_key(&d, "f");
    set_callback(&d, &key, &format!("mqtt://127.0.0.1:{}/file", broker.port));
    register(&d, &["file-0"]);
    let got = take(&sub, 1);
    assert_eq!(got[0].0, format!("file/{id}/registrations/file-0"));
}
