//! End-to-end tests of keys restricted to some endpoints and resources (`allow`, issue 18
//! item 1): the restriction holds wherever data fans out, not only on the REST routes that
//! name an endpoint. Registration events, notifications, async responses and
//! subscription errors reach a restricted key only for what it may see, and resource
//! lists are cut to it; a domain-wide pre-subscription observes nothing on the key's
//! behalf outside it. An unrestricted key of the same domain sees everything.
//!
//! The only backend that restricts keys is `losant` (application keys: device filters
//! and topics); `connector`, `pelion` and `headerkeys` keys are never restricted. The
//! unrestricted key here is the connector's admin key.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use serde_json::{Value, json};
use support::coap::{Device, path_of, uint_option};
use support::{Daemon, Events, Prepared, http, observe_content, send_packet};

const WAIT: Duration = Duration::from_secs(10);
/// Two observable resources: `/3303/...` is allowed on `sensor-1` to the restricted key,
/// `/3/0/13` is not.
const LINKS: &str = r#"</3/0/13>;obs;rt="time",</3303/0/5700>;obs;rt="temperature""#;
/// Every resource of `gw-*`, and on `sensor-1` only the `/3303` object.
const RESTRICTED: &str = r#"{"filterType": "whitelist", "deviceTags": [{"key": "endpoint", "value": "gw-*"}], "subTopics": ["ep/sensor-1/3303/#"]}"#;

/// A daemon with the connector (admin key in `d.key`) and Losant backends, a Losant
/// application in the default domain and an API token of it.
fn start() -> (Daemon, String, String) {
    let p = Prepared::new("", "[plugins]\nauth = [\"connector\", \"losant\"]\n");
    let (app, token) = p.losant_app("plant");
    (p.start(), app, token)
}

/// A Losant application key: its id and its `Authorization` header value.
struct AppKey {
    id: String,
    auth: String,
}

fn token_call(d: &Daemon, method: &str, path: &str, token: &str, body: &str) -> support::Http {
    http(
        method,
        &d.url(path),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        Some(body.as_bytes()),
    )
}

fn app_key(d: &Daemon, app: &str, token: &str, body: &str) -> AppKey {
    let r = token_call(d, "POST", &format!("/applications/{app}/keys"), token, body);
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        v["key"].as_str().unwrap(),
        v["secret"].as_str().unwrap()
    ));
    AppKey {
        id: v["id"].as_str().unwrap().to_string(),
        auth: format!("Basic {basic}"),
    }
}

impl AppKey {
    fn call(&self, d: &Daemon, method: &str, path: &str, body: Option<&str>) -> support::Http {
        let mut h = vec![("Authorization", self.auth.as_str())];
        if body.is_some() {
            h.push(("Content-Type", "application/json"));
        }
        http(method, &d.url(path), &h, body.map(str::as_bytes))
    }

    /// Pulls (without waiting) into `inbox` until `done` holds for it or `timeout` passes.
    fn collect(
        &self,
        d: &Daemon,
        inbox: &mut Events,
        timeout: Duration,
        done: impl Fn(&Events) -> bool,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let r = self.call(d, "GET", "/v2/notification/pull?noWait=true", None);
            match r.status {
                200 => inbox.add(&r.json()),
                204 => {}
                s => panic!("pull answered {s}: {}", r.body),
            }
            if done(inbox) || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `ep` of each entry (registration entries are objects, removals names).
fn eps(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            e.get("ep")
                .unwrap_or(e)
                .as_str()
                .expect("an endpoint name")
                .to_string()
        })
        .collect()
}

fn paths(entry: &Value) -> Vec<String> {
    support::strings_of(&entry["resources"], "path")
}

/// (ep, path) of each `notifications` (or `subscription-errors`) entry.
fn ep_paths(entries: &[Value]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["ep"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn pair(ep: &str, path: &str) -> (String, String) {
    (ep.to_string(), path.to_string())
}

/// Sends a notification (or, with `seq` None, a response without Observe) for `token`.
fn notify(dev: &Device, to: SocketAddr, token: &[u8], mid: u16, seq: u32, value: &str) {
    let p = observe_content(
        MessageType::NonConfirmable,
        mid,
        token,
        seq,
        value.as_bytes(),
    );
    send_packet(dev, &p, to);
}

/// Ends an observation from the device's side: a 4.04 on its token.
fn end_observation(dev: &Device, to: SocketAddr, token: &[u8], mid: u16) {
    let mut p = Packet::new();
    p.header.set_type(MessageType::NonConfirmable);
    p.header.code = MessageClass::Response(ResponseType::NotFound);
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    dev.sock.send_to(&p.to_bytes().unwrap(), to).unwrap();
}

/// Answers the daemon's next observe request with `value`; returns its path, token and
/// where it came from.
fn accept_observe(dev: &Device, value: &str) -> (String, Vec<u8>, SocketAddr) {
    let (req, from) = dev.recv_request(WAIT).expect("no observe request");
    assert_eq!(
        uint_option(&req, CoapOption::Observe),
        Some(0),
        "an observe"
    );
    let (mid, token) = (req.header.message_id, req.get_token());
    let p = observe_content(
        MessageType::Acknowledgement,
        mid,
        token,
        1,
        value.as_bytes(),
    );
    send_packet(dev, &p, from);
    (path_of(&req), req.get_token().to_vec(), from)
}

#[test]
fn registration_events_and_resource_lists_hold_to_the_restriction() {
    let (d, app, token) = start();
    let key = app_key(&d, &app, &token, RESTRICTED);
    // Both keys open their channels before the devices come.
    let mut seen = Events::default();
    key.collect(&d, &mut seen, Duration::ZERO, |_| true);
    assert!(d.pull_now().is_none());

    let mut gw = d.device();
    let gw_id = gw.register(&["ep=gw-1", "lt=300"], LINKS);
    d.device().register(&["ep=sensor-1", "lt=300"], LINKS);
    let mut pump = d.device();
    let pump_id = pump.register(&["ep=pump-1", "lt=300"], LINKS);
    assert_eq!(
        pump.update(&pump_id, &["lt=200"], None),
        ResponseType::Changed
    );
    assert_eq!(pump.deregister(&pump_id), ResponseType::Deleted);
    d.device()
        .register(&["ep=pump-2", "lt=1", "b=UQ"], "</3/0>");
    // The unrestricted key sees everything, whole.
    let all = d.collect_events(WAIT, |e| !e.of("registrations-expired").is_empty());
    assert_eq!(
        eps(&all.of("registrations")),
        ["gw-1", "sensor-1", "pump-1", "pump-2"]
    );
    for r in all.of("registrations").iter().take(3) {
        assert_eq!(paths(r), ["/3/0/13", "/3303/0/5700"], "{r}");
    }
    assert_eq!(eps(&all.of("reg-updates")), ["pump-1"]);
    assert_eq!(eps(&all.of("de-registrations")), ["pump-1"]);
    assert_eq!(eps(&all.of("registrations-expired")), ["pump-2"]);

    // An update of an allowed endpoint comes after all of that in the key's queue.
    assert_eq!(gw.update(&gw_id, &["lt=250"], None), ResponseType::Changed);
    key.collect(&d, &mut seen, WAIT, |e| !e.of("reg-updates").is_empty());
    assert_eq!(eps(&seen.of("registrations")), ["gw-1", "sensor-1"]);
    let regs = seen.of("registrations");
    assert_eq!(paths(&regs[0]), ["/3/0/13", "/3303/0/5700"]);
    assert_eq!(
        paths(&regs[1]),
        ["/3303/0/5700"],
        "cut to the allowed resources"
    );
    assert_eq!(eps(&seen.of("reg-updates")), ["gw-1"]);
    assert!(seen.of("de-registrations").is_empty(), "{seen:?}");
    assert!(seen.of("registrations-expired").is_empty(), "{seen:?}");

    // Resource lists: cut for the restricted key, whole for the other.
    let r = key.call(&d, "GET", "/v2/endpoints/sensor-1", None);
    assert_eq!(r.status, 200);
    let uris: Vec<Value> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["uri"].clone())
        .collect();
    assert_eq!(uris, [json!("/3303/0/5700")]);
    let r = http(
        "GET",
        &d.url("/v2/endpoints/sensor-1"),
        &[
            ("Authorization", key.auth.as_str()),
            ("Accept", "application/link-format"),
        ],
        None,
    );
    assert_eq!(r.body, r#"</3303/0/5700>;rt="temperature";obs"#);
    assert_eq!(
        d.get("/v2/endpoints/sensor-1")
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let names: Vec<String> =
        support::strings_of(&key.call(&d, "GET", "/v2/endpoints", None).json(), "name");
    assert_eq!(names, ["gw-1", "sensor-1"]);

    // The restriction is kept with the channel: after a crash, events published before
    // the key makes any request are filtered as well.
    let d = d.crash_and_restart();
    d.device().register(&["ep=pump-3", "lt=300"], LINKS);
    d.device().register(&["ep=sensor-1", "lt=300"], LINKS);
    d.device().register(&["ep=gw-2", "lt=300"], LINKS);
    let mut after = Events::default();
    key.collect(&d, &mut after, WAIT, |e| {
        eps(&e.of("registrations")).contains(&"gw-2".to_string())
    });
    // (The last answer before the crash may come again: long-poll is at least once.)
    let regs = after.of("registrations");
    let names = eps(&regs);
    assert!(!names.contains(&"pump-3".to_string()), "{names:?}");
    assert!(
        names.ends_with(&["sensor-1".to_string(), "gw-2".to_string()]),
        "{names:?}"
    );
    for r in regs.iter().filter(|r| r["ep"] == "sensor-1") {
        assert_eq!(paths(r), ["/3303/0/5700"], "{r}");
    }
}

#[test]
fn a_domain_wide_presubscription_observes_and_delivers_only_what_the_key_may_see() {
    let (d, app, token) = start();
    let key = app_key(&d, &app, &token, RESTRICTED);
    let everything = r#"[{"endpoint-name":"*"}]"#;
    let r = key.call(&d, "PUT", "/v2/subscriptions", Some(everything));
    assert_eq!(r.status, 204, "{}", r.body);
    // Stored as given.
    let r = key.call(&d, "GET", "/v2/subscriptions", None);
    assert_eq!(r.json(), serde_json::from_str::<Value>(everything).unwrap());

    let mut pump = d.device();
    pump.register(&["ep=pump-1", "lt=300"], LINKS);
    let mut sensor = d.device();
    sensor.register(&["ep=sensor-1", "lt=300"], LINKS);
    let mut gw = d.device();
    gw.register(&["ep=gw-1", "lt=300"], LINKS);

    // Observed on the key's behalf: only what it may see.
    let mut gw_obs = [accept_observe(&gw, "1"), accept_observe(&gw, "2")];
    gw_obs.sort();
    assert_eq!(
        gw_obs.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        ["/3/0/13", "/3303/0/5700"]
    );
    let sensor_obs = accept_observe(&sensor, "3");
    assert_eq!(sensor_obs.0, "/3303/0/5700");
    support::no_request(
        &sensor,
        Duration::from_millis(300),
        "/3/0/13 of sensor-1 is not observed for the restricted key",
    );
    support::no_request(
        &pump,
        Duration::from_millis(100),
        "pump-1 is not observed for the restricted key",
    );
    let r = key.call(&d, "GET", "/v2/subscriptions/sensor-1", None);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/subscriptions/sensor-1/3303/0/5700")
    );

    // The unrestricted key pre-subscribes to everything too: now everything is observed.
    let r = d.send_json("PUT", "/v2/subscriptions", everything.as_bytes());
    assert_eq!(r.status, 204, "{}", r.body);
    let mut pump_obs = [accept_observe(&pump, "4"), accept_observe(&pump, "5")];
    pump_obs.sort();
    let sensor_time = accept_observe(&sensor, "6");
    assert_eq!(sensor_time.0, "/3/0/13");

    // Notifications the restricted key may not see, first; the admin key gets them.
    for (dev, (_, tok, from)) in [
        (&pump, &pump_obs[0]),
        (&pump, &pump_obs[1]),
        (&sensor, &sensor_time),
    ] {
        notify(dev, *from, tok, 900, 2, "hidden");
    }
    let admin = d.collect_events(WAIT, |e| {
        e.of("notifications")
            .iter()
            .filter(|n| n["payload"] == support::b64(b"hidden"))
            .count()
            == 3
    });
    assert_eq!(
        ep_paths(
            &admin
                .of("notifications")
                .into_iter()
                .filter(|n| n["payload"] == support::b64(b"hidden"))
                .collect::<Vec<_>>()
        ),
        [
            pair("pump-1", "/3/0/13"),
            pair("pump-1", "/3303/0/5700"),
            pair("sensor-1", "/3/0/13"),
        ]
    );
    // Then the ones it may see.
    for (dev, (_, tok, from)) in [(&gw, &gw_obs[0]), (&gw, &gw_obs[1]), (&sensor, &sensor_obs)] {
        notify(dev, *from, tok, 901, 3, "shown");
    }
    let mut seen = Events::default();
    key.collect(&d, &mut seen, WAIT, |e| {
        e.of("notifications")
            .iter()
            .filter(|n| n["payload"] == support::b64(b"shown"))
            .count()
            == 3
    });
    // The first values (the observes' answers) and the "shown" ones; nothing else.
    let expected = [
        pair("gw-1", "/3/0/13"),
        pair("gw-1", "/3303/0/5700"),
        pair("sensor-1", "/3303/0/5700"),
    ];
    let got = ep_paths(&seen.of("notifications"));
    let mut want: Vec<_> = expected.iter().chain(&expected).cloned().collect();
    want.sort();
    assert_eq!(got, want, "{seen:?}");
    assert!(
        seen.of("notifications")
            .iter()
            .all(|n| n["payload"] != support::b64(b"hidden"))
    );
}

#[test]
fn a_narrowed_restriction_holds_for_what_the_key_set_up_before() {
    let (d, app, token) = start();
    let key = app_key(
        &d,
        &app,
        &token,
        r#"{"filterType": "whitelist", "deviceTags": [{"key": "endpoint", "value": "gw-*"}], "subTopics": ["ep/sensor-1/#"]}"#,
    );
    // The admin key's channel exists before anything is published to it.
    assert!(d.pull_now().is_none());
    let mut sensor = d.device();
    sensor.register(&["ep=sensor-1", "lt=300"], LINKS);
    let mut seen = Events::default();

    // While it may see all of sensor-1, the key subscribes to both resources.
    let mut observed = Vec::new();
    for path in ["/3/0/13", "/3303/0/5700"] {
        let r = key.call(
            &d,
            "PUT",
            &format!("/v2/subscriptions/sensor-1{path}"),
            None,
        );
        assert_eq!(r.status, 202, "{}", r.body);
        let id = r.json()["async-response-id"].as_str().unwrap().to_string();
        let o = accept_observe(&sensor, "0");
        assert_eq!(o.0, path);
        observed.push(o);
        key.collect(&d, &mut seen, WAIT, |e| e.async_response(&id).is_some());
    }
    // The admin key subscribes to /3/0/13 as well (observed already: 200).
    assert_eq!(
        d.call("PUT", "/v2/subscriptions/sensor-1/3/0/13", None, None)
            .status,
        200
    );
    // Two reads, the first held by the device (one request at a time per endpoint).
    let read = |path: &str| {
        let r = key.call(&d, "GET", &format!("/v2/endpoints/sensor-1{path}"), None);
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()["async-response-id"].as_str().unwrap().to_string()
    };
    let hidden_read = read("/3/0/13");
    let shown_read = read("/3303/0/5700");
    let (held, held_from) = sensor.recv_request(WAIT).expect("the read");
    assert_eq!(path_of(&held), "/3/0/13");

    // The key is narrowed to sensor-1's /3303 object.
    let r = token_call(
        &d,
        "PATCH",
        &format!("/applications/{app}/keys/{}", key.id),
        &token,
        r#"{"subTopics": ["ep/sensor-1/3303/#"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Its next request carries the new verdict: lists are cut at once.
    let r = key.call(&d, "GET", "/v2/subscriptions/sensor-1", None);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/subscriptions/sensor-1/3303/0/5700")
    );
    let r = key.call(&d, "GET", "/v2/endpoints/sensor-1", None);
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{}", r.body);
    key.collect(&d, &mut seen, Duration::ZERO, |_| true);
    let before = seen.clone();

    // The held read's answer is not the key's any more; the next one is.
    sensor.reply(
        &held,
        held_from,
        ResponseType::Content,
        b"12",
        Some(0),
        None,
    );
    let (next, next_from) = sensor.recv_request(WAIT).expect("the second read");
    assert_eq!(path_of(&next), "/3303/0/5700");
    sensor.reply(
        &next,
        next_from,
        ResponseType::Content,
        b"21",
        Some(0),
        None,
    );
    key.collect(&d, &mut seen, WAIT, |e| {
        e.async_response(&shown_read).is_some()
    });
    assert!(
        seen.async_response(&hidden_read).is_none(),
        "an async response of a resource the key may no longer see: {seen:?}"
    );

    // A notification of /3/0/13 reaches the admin key only; then one of /3303.
    let (_, time_token, time_from) = &observed[0];
    let (_, temp_token, temp_from) = &observed[1];
    notify(&sensor, *time_from, time_token, 910, 2, "hidden");
    let admin = d.collect_events(WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == support::b64(b"hidden"))
    });
    assert!(!admin.of("notifications").is_empty());
    notify(&sensor, *temp_from, temp_token, 911, 2, "shown");
    key.collect(&d, &mut seen, WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == support::b64(b"shown"))
    });

    // The device ends the /3/0/13 observation: the subscription error is the admin's.
    end_observation(&sensor, *time_from, time_token, 912);
    d.collect_events(WAIT, |e| !e.of("subscription-errors").is_empty());
    notify(&sensor, *temp_from, temp_token, 913, 3, "last");
    key.collect(&d, &mut seen, WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == support::b64(b"last"))
    });
    let new_notifications: Vec<Value> =
        seen.of("notifications")[before.of("notifications").len()..].to_vec();
    assert_eq!(
        ep_paths(&new_notifications),
        [
            pair("sensor-1", "/3303/0/5700"),
            pair("sensor-1", "/3303/0/5700")
        ],
        "{seen:?}"
    );
    assert!(seen.of("subscription-errors").is_empty(), "{seen:?}");
}

/// The restriction is applied where events are queued, so a key that takes its events
/// through a callback URL gets the same as one that long-polls.
#[test]
fn a_restricted_key_with_a_callback_receives_only_what_it_may_see() {
    let (d, app, token) = start();
    let key = app_key(&d, &app, &token, RESTRICTED);
    let rx = support::receiver::Receiver::start(0);
    let body = json!({"url": rx.url("/hook")}).to_string();
    let r = key.call(&d, "PUT", "/v2/notification/callback", Some(&body));
    assert_eq!(r.status, 204, "{}", r.body);

    d.device().register(&["ep=pump-1", "lt=300"], LINKS);
    d.device().register(&["ep=sensor-1", "lt=300"], LINKS);
    d.device().register(&["ep=gw-1", "lt=300"], LINKS);
    let mut got = Events::default();
    for r in rx.wait(WAIT, |rs| rs.iter().any(|r| r.body.contains("gw-1"))) {
        // The deliveries (the verifying PUT has no notification message).
        if let Ok(v) = serde_json::from_str::<Value>(&r.body)
            && v.is_object()
        {
            got.add(&v);
        }
    }
    let regs = got.of("registrations");
    assert_eq!(eps(&regs), ["sensor-1", "gw-1"], "{got:?}");
    assert_eq!(paths(&regs[0]), ["/3303/0/5700"]);
    assert_eq!(paths(&regs[1]), ["/3/0/13", "/3303/0/5700"]);
}

/// A key narrowed in its backend while it makes no request of its own (it takes its events
/// through a callback URL) sees nothing more outside its new restriction: the change made
/// through the backend's route reaches its channel (the revocation sweep carries each
/// key's current restriction, `KeyStatusResponse::restriction`).
#[test]
fn a_callback_key_narrowed_in_its_backend_gets_nothing_outside_it() {
    let (d, app, token) = start();
    let gw_only =
        r#"{"filterType": "whitelist", "deviceTags": [{"key": "endpoint", "value": "gw-*"}]}"#;
    let key = app_key(&d, &app, &token, gw_only);
    let rx = support::receiver::Receiver::start(0);
    let body = json!({"url": rx.url("/hook")}).to_string();
    let r = key.call(&d, "PUT", "/v2/notification/callback", Some(&body));
    assert_eq!(r.status, 204, "{}", r.body);
    let delivered = |rx: &support::receiver::Receiver, until: &str| {
        let mut got = Events::default();
        for r in rx.wait(WAIT, |rs| rs.iter().any(|r| r.body.contains(until))) {
            if let Ok(v) = serde_json::from_str::<Value>(&r.body)
                && v.is_object()
            {
                got.add(&v);
            }
        }
        eps(&got.of("registrations"))
    };
    d.device().register(&["ep=gw-1", "lt=300"], LINKS);
    assert_eq!(delivered(&rx, "gw-1"), ["gw-1"]);

    // Narrowed to pump-* through the Losant API, with the key's own token.
    let pumps =
        r#"{"filterType": "whitelist", "deviceTags": [{"key": "endpoint", "value": "pump-*"}]}"#;
    let r = token_call(
        &d,
        "PATCH",
        &format!("/applications/{app}/keys/{}", key.id),
        &token,
        pumps,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    d.device().register(&["ep=gw-2", "lt=300"], LINKS);
    d.device().register(&["ep=pump-1", "lt=300"], LINKS);
    assert_eq!(delivered(&rx, "pump-1"), ["gw-1", "pump-1"]);
}

/// A Connector key created with `allow` patterns (`POST /api/api_tokens`, issue 18 item 3)
/// is held to them like a Losant application key: registration events of its endpoints
/// only, resource lists cut, endpoint list filtered, pre-subscriptions kept as given.
#[test]
fn a_connector_key_created_with_allow_patterns_sees_only_what_they_allow() {
    let (d, _app, _token) = start();
    let body = json!({"name": "gw-reader", "allow": ["gw-*", "sensor-1/3303/*"]}).to_string();
    let r = d.send_json("POST", "/api/api_tokens", body.as_bytes());
    assert_eq!(r.status, 201, "{}", r.body);
    let key = AppKey {
        id: r.json()["id"].as_str().unwrap().to_string(),
        auth: format!("Bearer {}", r.json()["access_key"].as_str().unwrap()),
    };
    let mut seen = Events::default();
    key.collect(&d, &mut seen, Duration::ZERO, |_| true);
    let r = key.call(
        &d,
        "PUT",
        "/v2/subscriptions",
        Some(r#"[{"endpoint-name": "*"}]"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        key.call(&d, "GET", "/v2/subscriptions", None).json(),
        json!([{"endpoint-name": "*"}])
    );

    d.device()
        .register(&["ep=pump-1", "lt=300"], "</3/0/13>,</3303/0/5700>");
    d.device()
        .register(&["ep=sensor-1", "lt=300"], "</3/0/13>,</3303/0/5700>");
    d.device()
        .register(&["ep=gw-1", "lt=300"], "</3/0/13>,</3303/0/5700>");
    key.collect(&d, &mut seen, WAIT, |e| {
        eps(&e.of("registrations")).contains(&"gw-1".to_string())
    });
    let regs = seen.of("registrations");
    assert_eq!(eps(&regs), ["sensor-1", "gw-1"], "{seen:?}");
    assert_eq!(paths(&regs[0]), ["/3303/0/5700"]);
    assert_eq!(paths(&regs[1]), ["/3/0/13", "/3303/0/5700"]);
    let mut names: Vec<String> =
        support::strings_of(&key.call(&d, "GET", "/v2/endpoints", None).json(), "name");
    names.sort();
    assert_eq!(names, ["gw-1", "sensor-1"]);
    assert_eq!(
        key.call(&d, "GET", "/v2/endpoints/pump-1", None).status,
        403
    );
}

/// A key allowed some resources of a device may not act on the device as a whole:
/// de-register it, read or replace its credentials, or enrol a device by certificate
/// (403). A key allowed the whole device (no resource part, or `/*`) may. Before, the
/// endpoint part of the pattern was enough.
#[test]
fn a_key_allowed_some_resources_may_not_act_on_the_whole_device() {
    let (d, _app, _token) = start();
    let key = |allow: serde_json::Value| {
        let body = json!({"name": "k", "allow": allow}).to_string();
        let r = d.send_json("POST", "/api/api_tokens", body.as_bytes());
        assert_eq!(r.status, 201, "{}", r.body);
        AppKey {
            id: r.json()["id"].as_str().unwrap().to_string(),
            auth: format!("Bearer {}", r.json()["access_key"].as_str().unwrap()),
        }
    };
    let some = key(json!(["sensor-1/3303/0/5700"]));
    let all = key(json!(["sensor-1/*", "sensor-2"]));
    let mut dev = d.device();
    dev.register(&["ep=sensor-1", "lt=300"], "</3303/0/5700>");
    let mut dev2 = d.device();
    dev2.register(&["ep=sensor-2", "lt=300"], "</3303/0/5700>");
    let psk = json!({"psk_identity": "s1", "psk": "000102030405060708090a0b0c0d0e0f"}).to_string();
    let cert = json!({"domain": "default", "publickey": "not a key"}).to_string();
    for (method, path, body) in [
        ("DELETE", "/v2/endpoints/sensor-1", None),
        ("PUT", "/v2/device-credentials/sensor-1", Some(psk.as_str())),
        ("GET", "/v2/device-credentials/sensor-1", None),
        ("DELETE", "/v2/device-credentials/sensor-1", None),
        ("POST", "/api/cert", Some(cert.as_str())),
    ] {
        let r = some.call(&d, method, path, body);
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
    }
    // Its own resource it may still read.
    let r = some.call(&d, "GET", "/v2/endpoints/sensor-1/3303/0/5700", None);
    assert_eq!(r.status, 202, "{}", r.body);
    // Patterns that cover the whole device.
    let r = all.call(&d, "PUT", "/v2/device-credentials/sensor-1", Some(&psk));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = all.call(&d, "DELETE", "/v2/endpoints/sensor-2", None);
    assert_eq!(r.status, 200, "{}", r.body);
    // A certificate names a device of its own: only for keys with no restriction.
    let r = all.call(&d, "POST", "/api/cert", Some(&cert));
    assert_eq!(r.status, 403, "{}", r.body);
    let _ = (some.id, all.id);
}

/// `.` and `..` segments never reach a device (a client resolves them, RFC 7252 §6.4): a
/// path with one is 400, also where the key's allow pattern would have let it pass
/// (`sensor-1/3303/*` and `/3303/../3/0/0`, which names `/3/0/0`).
#[test]
fn dot_segments_in_a_resource_path_are_400() {
    let (d, _app, _token) = start();
    let body = json!({"name": "k", "allow": ["sensor-1/3303/*"]}).to_string();
    let r = d.send_json("POST", "/api/api_tokens", body.as_bytes());
    assert_eq!(r.status, 201, "{}", r.body);
    let key = AppKey {
        id: r.json()["id"].as_str().unwrap().to_string(),
        auth: format!("Bearer {}", r.json()["access_key"].as_str().unwrap()),
    };
    let mut dev = d.device();
    dev.register(&["ep=sensor-1", "lt=300"], "</3/0/0>,</3303/0/5700>;obs");
    let dreq = json!({"method": "GET", "uri": "/3303/../3/0/0"}).to_string();
    for (method, path, body) in [
        ("GET", "/v2/endpoints/sensor-1/3303/../3/0/0", None),
        ("PUT", "/v2/endpoints/sensor-1/3303/%2E%2E/3/0/0", Some("1")),
        ("GET", "/v2/endpoints/sensor-1/3303/./0/5700", None),
        ("PUT", "/v2/subscriptions/sensor-1/3303/../3/0/0", None),
        (
            "POST",
            "/v2/device-requests/sensor-1?async-id=dots",
            Some(dreq.as_str()),
        ),
    ] {
        let r = key.call(&d, method, path, body);
        assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
    }
    assert!(
        dev.recv_request(Duration::from_millis(300)).is_none(),
        "nothing reached the device"
    );
    let _ = key.id;
}
