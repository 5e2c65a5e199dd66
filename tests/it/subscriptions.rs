//! End-to-end tests of subscriptions (observe), pre-subscriptions and Lua rules.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageType, Packet, ResponseType};
use serde_json::json;
use support::coap::{Device, path_of, uint, uint_option};
use support::peers::Lwm2mDevice;
use support::{Daemon, b64};

const WAIT: Duration = Duration::from_secs(10);
const LINKS: &str =
    r#"</3/0>,</3/0/0>,</3303/0/5700>;obs;rt="temperature",</3304/0/5700>;obs;rt="humidity""#;

/// Answers an observe registration (or sends a notification) with Observe=`seq`.
fn notify(
    dev: &Device,
    to: SocketAddr,
    token: &[u8],
    mid: u16,
    mtype: MessageType,
    seq: u32,
    value: &str,
) {
    let mut p = support::observe_content(mtype, mid, token, seq, value.as_bytes());
    p.add_option(CoapOption::MaxAge, uint(30));
    support::send_packet(dev, &p, to);
}

/// Waits for the daemon's observe registration of `path` and answers it with `value`.
fn accept_observe(dev: &Device, path: &str, value: &str) -> (Vec<u8>, SocketAddr) {
    let (req, from) = dev.recv_request(WAIT).expect("no observe request");
    assert_eq!(path_of(&req), path);
    assert_eq!(
        uint_option(&req, CoapOption::Observe),
        Some(0),
        "GET with Observe=0"
    );
    notify(
        dev,
        from,
        req.get_token(),
        req.header.message_id,
        MessageType::Acknowledgement,
        1,
        value,
    );
    (req.get_token().to_vec(), from)
}

/// The next datagram from the daemon, decoded.
fn next_packet(dev: &Device) -> Packet {
    Packet::from_bytes(&dev.recv_raw(WAIT).expect("nothing from the daemon")).unwrap()
}

#[test]
fn subscribe_receive_notifications_and_unsubscribe() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=obs-1", "lt=300"], LINKS);

    let id = d.async_request("PUT", "/v2/subscriptions/obs-1/3303/0/5700", None, None);
    let (token, from) = accept_observe(&dev, "/3303/0/5700", "20.0");
    let ar = d.async_response(&id, WAIT);
    assert_eq!(
        (ar["status"].as_u64(), ar["payload"].as_str()),
        (Some(200), Some(b64(b"20.0").as_str()))
    );

    // A CON notification is acknowledged and delivered; so is a NON one.
    notify(&dev, from, &token, 500, MessageType::Confirmable, 2, "21.0");
    let ack = next_packet(&dev);
    assert_eq!(
        (ack.header.get_type(), ack.header.message_id),
        (MessageType::Acknowledgement, 500)
    );
    notify(
        &dev,
        from,
        &token,
        501,
        MessageType::NonConfirmable,
        3,
        "22.0",
    );
    // An older one (sequence 2 again) is stale and dropped.
    notify(
        &dev,
        from,
        &token,
        502,
        MessageType::NonConfirmable,
        2,
        "stale",
    );
    assert_eq!(
        d.events_of("notifications", 2),
        json!([
            json!({"ep": "obs-1", "path": "/3303/0/5700", "ct": "text/plain", "payload": b64(b"21.0"), "max-age": 30}),
            json!({"ep": "obs-1", "path": "/3303/0/5700", "ct": "text/plain", "payload": b64(b"22.0"), "max-age": 30}),
        ])
    );
    assert!(support::eventually(WAIT, || d
        .metric("observe_stale_total")
        == 1));
    assert_eq!(
        d.collect_events(Duration::from_millis(300), |_| false)
            .of("notifications")
            .len(),
        2
    );

    // Status and listing.
    let r = d.get("/v2/subscriptions/obs-1/3303/0/5700");
    assert_eq!(
        (r.status, r.content_type.as_str(), r.body.as_str()),
        (200, "text/uri-list", "/subscriptions/obs-1/3303/0/5700")
    );
    let r = d.get("/subscriptions/obs-1");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/subscriptions/obs-1/3303/0/5700")
    );
    // Their one content type (seed 000): an Accept that takes it gets it, one that does
    // not gets 406, before anything is looked up.
    for path in [
        "/v2/subscriptions/obs-1/3303/0/5700",
        "/v2/subscriptions/obs-1",
    ] {
        for accept in [
            "text/uri-list",
            "text/*",
            "*/*",
            "application/json;q=0.5, text/uri-list",
        ] {
            let r = d.get_accept(path, accept);
            assert_eq!(
                (r.status, r.content_type.as_str()),
                (200, "text/uri-list"),
                "{path} {accept}"
            );
        }
        for accept in ["application/json", "text/uri-list;q=0, application/json"] {
            let r = d.get_accept(path, accept);
            assert_eq!(r.status, 406, "{path} {accept}: {}", r.body);
            assert_eq!(r.json()["type"], "not_acceptable");
        }
    }
    assert_eq!(
        d.get_accept("/v2/subscriptions/obs-1/9/9/9", "application/json")
            .status,
        406
    );
    // Already observed: 200 at once, nothing sent to the device.
    assert_eq!(
        d.call("PUT", "/v2/subscriptions/obs-1/3303/0/5700", None, None)
            .status,
        200
    );
    // Notifications fill the cache.
    let r = d.call(
        "GET",
        "/v2/endpoints/obs-1/3303/0/5700?cacheOnly=true",
        None,
        None,
    );
    assert_eq!((r.status, r.body.as_str()), (200, "22.0"));

    // Unsubscribe: the device is told (GET with Observe=1 and the observation's token),
    // and a notification still on its way is answered with RST, which cancels it too.
    assert_eq!(
        d.call("DELETE", "/v2/subscriptions/obs-1/3303/0/5700", None, None)
            .status,
        204
    );
    assert_eq!(
        support::accept_cancels(&dev, 1),
        [("/3303/0/5700".to_string(), token.to_vec())]
    );
    notify(&dev, from, &token, 503, MessageType::Confirmable, 4, "23.0");
    let rst = next_packet(&dev);
    assert_eq!(
        (rst.header.get_type(), rst.header.message_id),
        (MessageType::Reset, 503)
    );
    assert_eq!(d.get("/v2/subscriptions/obs-1/3303/0/5700").status, 404);
    assert_eq!(d.get("/v2/subscriptions/obs-1").status, 404);
    assert_eq!(
        d.call("DELETE", "/v2/subscriptions/obs-1/3303/0/5700", None, None)
            .status,
        404
    );
}

/// Issue 24: a burst of notifications that arrives faster than each can be stored is
/// stored whole and in order: the observation takes what arrived while its last batch
/// was being stored and stores it in one write, and its queue holds a burst (before, it
/// stored one notification per commit and dropped past 64 waiting).
#[test]
fn a_burst_of_notifications_is_delivered_whole_and_in_order() {
    const N: u32 = 500;
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=burst-1", "lt=300"], LINKS);
    let id = d.async_request("PUT", "/v2/subscriptions/burst-1/3303/0/5700", None, None);
    let (token, from) = accept_observe(&dev, "/3303/0/5700", "first");
    assert_eq!(d.async_response(&id, WAIT)["status"].as_u64(), Some(200));
    for i in 0..N {
        notify(
            &dev,
            from,
            &token,
            1000 + i as u16,
            MessageType::NonConfirmable,
            2 + i,
            &i.to_string(),
        );
    }
    let values = support::strings_of(&d.events_of("notifications", N as usize), "payload");
    let want: Vec<String> = (0..N).map(|i| b64(i.to_string().as_bytes())).collect();
    assert_eq!(values, want);
    assert_eq!(d.metric("coap_responses_dropped_total"), 0);
}

#[test]
fn subscription_status_codes() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=codes", "lt=300"], LINKS);
    let cases = [
        ("PUT", "/v2/subscriptions/nobody/3303/0/5700", 404),
        ("PUT", "/v2/subscriptions/codes/9/9/9", 404),
        ("PUT", "/v2/subscriptions/codes/3/0/0", 412),
        ("GET", "/v2/subscriptions/codes/3303/0/5700", 404),
        ("GET", "/v2/subscriptions/codes", 404),
        ("DELETE", "/v2/subscriptions/nobody", 404),
        ("DELETE", "/v2/subscriptions/codes", 204),
        ("POST", "/v2/subscriptions/codes/3/0/0", 405),
        ("PUT", "/v2/subscriptions/codes", 405),
    ];
    for (method, path, status) in cases {
        let r = d.call(method, path, None, None);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        if status >= 400 {
            assert!(r.json()["type"].is_string());
        }
    }
    // The device refuses to be observed (no Observe option in its answer): 412 async.
    let r = d.call("PUT", "/v2/subscriptions/codes/3304/0/5700", None, None);
    let id = r.json()["async-response-id"].as_str().unwrap().to_string();
    let (req, from) = dev.recv_request(WAIT).unwrap();
    dev.reply(&req, from, ResponseType::Content, b"40", Some(0), None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 412);
}

#[test]
fn delete_all_subscriptions_with_and_without_trailing_slash() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=all", "lt=300"], LINKS);
    for path in ["/v2/subscriptions/", "/v2/subscriptions"] {
        for res in ["/3303/0/5700", "/3304/0/5700"] {
            let r = d.call("PUT", &format!("/v2/subscriptions/all{res}"), None, None);
            assert_eq!(r.status, 202, "{}", r.body);
            accept_observe(&dev, res, "1");
        }
        let r = d.get("/v2/subscriptions/all");
        assert_eq!(r.body.lines().count(), 2, "{}", r.body);
        assert_eq!(d.call("DELETE", path, None, None).status, 204, "{path}");
        assert_eq!(d.get("/v2/subscriptions/all").status, 404, "{path}");
        let paths: Vec<String> = support::accept_cancels(&dev, 2)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(paths, ["/3303/0/5700", "/3304/0/5700"], "{path}");
    }
}

#[test]
fn pre_subscriptions_apply_at_registration_and_their_change_removes_subscriptions() {
    let d = Daemon::start();
    let rules = json!([{"endpoint-name": "sensor-*", "resource-path": ["/3303/*"]}]);
    let r = d.send_json("PUT", "/v2/subscriptions", rules.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(d.get("/v2/subscriptions").json(), rules);
    assert_eq!(d.get("/subscriptions").json(), rules, "unprefixed too");

    let mut other = d.device();
    other.register(&["ep=other-1", "lt=300"], LINKS);
    let mut sensor = d.device();
    sensor.register(&["ep=sensor-1", "lt=300"], LINKS);
    let (token, from) = accept_observe(&sensor, "/3303/0/5700", "19.5");
    support::no_request(
        &sensor,
        Duration::from_millis(300),
        "only the matching resource",
    );
    support::no_request(
        &other,
        Duration::from_millis(100),
        "only the matching endpoint",
    );
    // The first value arrives as a notification (there is no async request to carry it).
    notify(
        &sensor,
        from,
        &token,
        700,
        MessageType::NonConfirmable,
        2,
        "19.7",
    );
    let values = support::strings_of(&d.events_of("notifications", 2), "payload");
    assert_eq!(values, [b64(b"19.5"), b64(b"19.7")]);
    assert_eq!(
        d.get("/v2/subscriptions/sensor-1").body,
        "/subscriptions/sensor-1/3303/0/5700"
    );

    // Changing the pre-subscriptions removes every subscription, then applies the new
    // rules to registered endpoints.
    let rules = json!([{"endpoint-name": "other-1", "resource-path": ["/3304/0/5700"]}]);
    assert_eq!(
        d.send_json("PUT", "/v2/subscriptions", rules.to_string())
            .status,
        204
    );
    assert_eq!(d.get("/v2/subscriptions/sensor-1").status, 404);
    accept_observe(&other, "/3304/0/5700", "55");
    assert_eq!(
        d.get("/v2/subscriptions/other-1").body,
        "/subscriptions/other-1/3304/0/5700"
    );
    // An empty array removes them.
    assert_eq!(d.send_json("PUT", "/v2/subscriptions", b"[]").status, 204);
    assert_eq!(d.get("/v2/subscriptions").json(), json!([]));
    assert_eq!(d.get("/v2/subscriptions/other-1").status, 404);

    for bad in [
        &b"{not json"[..],
        b"{}",
        b"[{\"endpoint-name\": 1}]",
        b"[{\"bogus\": 1}]",
    ] {
        let r = d.send_json("PUT", "/v2/subscriptions", bad);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
        assert_eq!(r.json()["type"], "bad_request");
    }
}

/// The same rules PUT again (an application does at every start) keep the observations
/// they subscribe to again: nothing is cancelled or observed anew on the device, the
/// unchanged value is not delivered a second time, and the old observation's
/// notifications still arrive. A subscription the rules do not make (an individual one)
/// is still removed by the change (seed 000), and its observation cancelled.
#[test]
fn the_same_pre_subscriptions_again_keep_their_observations() {
    let d = Daemon::start();
    let rules = json!([{"endpoint-name": "same-*", "resource-path": ["/3303/0/5700"]}]);
    let put = |rules: &serde_json::Value| {
        let r = d.send_json("PUT", "/v2/subscriptions", rules.to_string());
        assert_eq!(r.status, 204, "{}", r.body);
    };
    put(&rules);
    let mut dev = d.device();
    dev.register(&["ep=same-1", "lt=300"], LINKS);
    let (token, from) = accept_observe(&dev, "/3303/0/5700", "19.5");
    let values = support::strings_of(&d.events_of("notifications", 1), "payload");
    assert_eq!(values, [b64(b"19.5")]);
    // An individual subscription beside it.
    assert_eq!(
        d.call("PUT", "/v2/subscriptions/same-1/3304/0/5700", None, None)
            .status,
        202
    );
    accept_observe(&dev, "/3304/0/5700", "40");
    d.clear_inbox();

    put(&rules);
    let cancelled = support::accept_cancels(&dev, 1);
    assert_eq!(cancelled[0].0, "/3304/0/5700", "{cancelled:?}");
    support::no_request(
        &dev,
        Duration::from_millis(600),
        "the rules subscribe to /3303/0/5700 again: its observation stays",
    );
    assert_eq!(
        d.get("/v2/subscriptions/same-1").body,
        "/subscriptions/same-1/3303/0/5700"
    );
    notify(
        &dev,
        from,
        &token,
        701,
        MessageType::NonConfirmable,
        2,
        "19.8",
    );
    let values = support::strings_of(&d.events_of("notifications", 1), "payload");
    assert_eq!(values, [b64(b"19.8")], "only the new value, once");

    // Rules that no longer match end the observation on the device.
    put(&json!([{"endpoint-name": "other-*"}]));
    let cancelled = support::accept_cancels(&dev, 1);
    assert_eq!(
        (cancelled[0].0.as_str(), cancelled[0].1.as_slice()),
        ("/3303/0/5700", token.as_slice())
    );
}

#[test]
fn subscriptions_survive_restart_and_are_observed_again() {
    let d = Daemon::start();
    let mut dev = d.device();
    let reg = dev.register(&["ep=keep", "lt=300"], LINKS);
    assert_eq!(
        d.call("PUT", "/v2/subscriptions/keep/3303/0/5700", None, None)
            .status,
        202
    );
    accept_observe(&dev, "/3303/0/5700", "1");
    let d = d.crash_and_restart();
    assert_eq!(
        d.get("/v2/subscriptions/keep").body,
        "/subscriptions/keep/3303/0/5700"
    );
    // The daemon came back on another port; the device's update moves it there, and the
    // subscription is observed again.
    dev.server = d.coap;
    let path = ["rd", reg.as_str()];
    let upd = dev.build(&support::coap::Req::new(
        coap_lite::RequestType::Post,
        &path,
    ));
    dev.send_raw(&upd.to_bytes().unwrap());
    let (token, from) = accept_observe(&dev, "/3303/0/5700", "2");
    notify(&dev, from, &token, 900, MessageType::NonConfirmable, 2, "3");
    let e = d.collect_events(WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == b64(b"3"))
    });
    assert!(
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == b64(b"3")),
        "{e:?}"
    );

    // A full re-registration from the same address: the old observation is cancelled
    // (the device may keep it), then the resource observed again.
    d.clear_inbox();
    let mut again = Device::new(d.coap);
    again.sock = dev.sock.try_clone().unwrap();
    let mut r = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
    r.query = &["ep=keep", "lt=300"];
    r.payload = LINKS.as_bytes();
    let p = again.build(&r);
    again.send_raw(&p.to_bytes().unwrap());
    assert_eq!(support::accept_cancels(&dev, 1)[0].1, token.to_vec());
    accept_observe(&dev, "/3303/0/5700", "4");
}

/// aiocoap as the device: a real observable resource that changes every 0.2 s.
#[test]
fn aiocoap_device_notifications_flow_until_unsubscribed() {
    let d = Daemon::start();
    let dev = Lwm2mDevice::start(d.coap, "aio-obs", &["--notify-interval", "0.2"]);
    let id = d.async_request("PUT", "/v2/subscriptions/aio-obs/3303/0/5700", None, None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    let e = d.collect_events(WAIT, |e| e.of("notifications").len() >= 3);
    let values: Vec<f64> = e
        .of("notifications")
        .iter()
        .map(|n| {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(n["payload"].as_str().unwrap())
                .unwrap();
            String::from_utf8(raw).unwrap().parse().unwrap()
        })
        .collect();
    assert!(values.len() >= 3, "{values:?}");
    assert!(
        values.windows(2).all(|w| w[1] > w[0]),
        "in order: {values:?}"
    );
    assert_eq!(
        d.call(
            "DELETE",
            "/v2/subscriptions/aio-obs/3303/0/5700",
            None,
            None
        )
        .status,
        204
    );
    // aiocoap drops the observation when its next notification is answered with RST.
    dev.wait_event(WAIT, |e| e["event"] == "observers" && e["count"] == 0);
}

#[test]
fn lua_rules_choose_resources_and_reload_without_restart() {
    let d = Daemon::start();
    // The key needs a notification channel to be offered resources.
    assert!(d.pull_now().is_none());
    d.write_rule(
        "10-rule.lua",
        "function presubscribe(endpoint, resource, key)\n  return resource.rt == 'temperature'\nend\n",
    );
    let (_a, observed) = d.register_observed(&["ep=lua-a", "lt=300"], LINKS);
    assert_eq!(observed, vec!["/3303/0/5700"]);

    // Edited: now humidity. Takes effect for the next registration, no restart.
    d.write_rule(
        "10-rule.lua",
        "function presubscribe(endpoint, resource, key)\n  return resource.rt == 'humidity'\nend\n",
    );
    let (_b, observed) = d.register_observed(&["ep=lua-b", "lt=300"], LINKS);
    assert_eq!(observed, vec!["/3304/0/5700"]);

    // A broken edit keeps the previous version in force and is logged with file:line.
    d.write_rule(
        "10-rule.lua",
        "function presubscribe(endpoint, resource, key)\n  return (\nend\n",
    );
    d.expect_log("10-rule.lua:3", WAIT);
    let (_c, observed) = d.register_observed(&["ep=lua-c", "lt=300"], LINKS);
    assert_eq!(observed, vec!["/3304/0/5700"]);
}

#[test]
fn runaway_lua_rules_are_stopped_and_count_as_no_opinion() {
    let d = Daemon::start_with("[lua]\ninstruction_budget = 100000\nmemory_limit_kb = 1024\n");
    let rules = json!([{"resource-path": ["/3304/*"]}]);
    assert_eq!(
        d.send_json("PUT", "/v2/subscriptions", rules.to_string())
            .status,
        204
    );
    d.write_rule(
        "10-loop.lua",
        "function presubscribe(e, r, k)\n  if r.rt == 'temperature' then while true do end end\n  return nil\nend\n",
    );
    d.write_rule(
        "20-hog.lua",
        "function presubscribe(e, r, k)\n  local t = {}\n  for i = 1, 1e9 do t[i] = string.rep('x', 1000) end\nend\n",
    );
    let errors = d.metric("lua_errors_total");
    let mut dev = d.device();
    dev.register(&["ep=runaway", "lt=300"], LINKS);
    // Both scripts fail for every resource; the JSON rule decides: humidity only.
    assert_eq!(
        support::observed_paths(&dev, Duration::from_millis(800)),
        vec!["/3304/0/5700"]
    );
    assert!(d.metric("lua_errors_total") >= errors + 2);
    // Still serving.
    assert_eq!(d.get("/v2/endpoints").status, 200);
}

/// A key that subscribes to a resource observed already (200: nothing is asked of the
/// device for it) has a notification channel from then on, so the next notification
/// reaches it even though it never pulled before.
#[test]
fn a_subscription_to_an_observed_resource_opens_the_keys_channel() {
    let p = support::Prepared::new("", "");
    let admin = p.plugin_call_str(
        "connector",
        "bootstrap",
        &json!({"domain": "default"}),
        "created",
    );
    let other = p.plugin_call_str(
        "connector",
        "create_key",
        &json!({"name": "second", "domain": "default"}),
        "access_key",
    );
    let mut d = p.start();
    d.key = admin;
    let mut dev = d.device();
    dev.register(&["ep=shared", "lt=300"], LINKS);
    d.async_request("PUT", "/v2/subscriptions/shared/3303/0/5700", None, None);
    let (token, from) = accept_observe(&dev, "/3303/0/5700", "1");
    let as_other = |method: &str, path: &str| {
        support::http(
            method,
            &d.url(path),
            &[("Authorization", &format!("Bearer {other}"))],
            None,
        )
    };
    assert_eq!(
        as_other("PUT", "/v2/subscriptions/shared/3303/0/5700").status,
        200
    );
    notify(&dev, from, &token, 800, MessageType::NonConfirmable, 2, "2");
    // The admin key has it: it was published, to both keys in one store write
    // (`Hub::publish_to_keys`), so one pull of the other key finds it too.
    d.collect_events(WAIT, |e| !e.of("notifications").is_empty());
    let r = as_other("GET", "/v2/notification/pull?noWait=true");
    assert_eq!(r.status, 200, "the notification was not kept for the key");
    assert_eq!(
        r.json()["notifications"][0]["payload"].as_str(),
        Some(b64(b"2").as_str())
    );
}

/// A subscription row left behind by an endpoint that is no longer registered (its removal
/// failed, or the process stopped between the two writes) is not loaded at start and is
/// removed from the store: the endpoint registering anew is not observed for a key that
/// lost that subscription when the endpoint left.
#[test]
fn subscriptions_of_an_endpoint_gone_while_down_are_dropped_at_start() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=ghost", "lt=300"], LINKS);
    d.async_request("PUT", "/v2/subscriptions/ghost/3303/0/5700", None, None);
    accept_observe(&dev, "/3303/0/5700", "20.0");
    assert_eq!(
        d.call("GET", "/v2/subscriptions/ghost/3303/0/5700", None, None)
            .status,
        200
    );
    // Between two runs the registration row goes, its subscription row stays.
    let d = d.stop_edit_restart(|state| {
        let db = rusqlite::Connection::open(state.join("connectord.db")).unwrap();
        let n = db
            .execute("DELETE FROM registrations WHERE name = 'ghost'", [])
            .unwrap();
        assert_eq!(n, 1);
    });
    let mut again = d.device();
    again.register(&["ep=ghost", "lt=300"], LINKS);
    assert_eq!(
        d.call("GET", "/v2/subscriptions/ghost/3303/0/5700", None, None)
            .status,
        404,
        "the subscription of the departed endpoint came back"
    );
    support::no_request(
        &again,
        Duration::from_secs(2),
        "the daemon observed the endpoint for a subscription it had lost",
    );
    assert!(d.wait_log("subscriptions of endpoints that are not registered", WAIT));
    // And it is gone from the store too: not back after another restart.
    let d = d.stop_and_restart();
    assert!(!d.wait_log(
        "subscriptions of endpoints that are not registered",
        Duration::from_secs(2)
    ));
}

/// A registration update that arrives while the subscription's observe is on its way must
/// not send a second observe of the same resource: the update's "observe what is
/// missing" saw the subscription without an observation (the first observe was in flight,
/// popped from the endpoint's queue) and queued another behind it. CI caught the same race
/// at a registration (`lua::a_re_registration_observes_each_subscription_once`) when the
/// registration's after-reply work ran late.
#[test]
fn an_update_while_the_observe_is_in_flight_observes_once() {
    let d = Daemon::start();
    let mut dev = d.device();
    let id = dev.register(&["ep=inflight-1", "lt=300"], LINKS);
    d.async_request(
        "PUT",
        "/v2/subscriptions/inflight-1/3303/0/5700",
        None,
        None,
    );
    let (req, from) = dev.recv_request(WAIT).expect("no observe request");
    assert_eq!(path_of(&req), "/3303/0/5700");
    // The device speaks before it answers the observe.
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed);
    notify(
        &dev,
        from,
        req.get_token(),
        req.header.message_id,
        MessageType::Acknowledgement,
        1,
        "20.0",
    );
    assert_eq!(
        support::observed_paths(&dev, Duration::from_millis(800)),
        Vec::<String>::new(),
        "a second observe of the same resource"
    );
}

/// A subscription's first value is its async response; a notification the device sends
/// right after it is newer and must not reach the channel first (an application would
/// keep the older value). The notifications wait until the async response is published.
/// One event per long-poll answer (`max_batch = 1`), so the answers show the channel's
/// order; tried on several endpoints.
#[test]
fn a_notification_right_after_the_first_value_comes_after_its_async_response() {
    let d = Daemon::start_with("[notifications]\nmax_batch = 1\n");
    for n in 0..6 {
        let ep = format!("order-{n}");
        let mut dev = d.device();
        dev.register(&[&format!("ep={ep}"), "lt=300"], LINKS);
        let id = d.async_request(
            "PUT",
            &format!("/v2/subscriptions/{ep}/3303/0/5700"),
            None,
            None,
        );
        let answers = std::thread::scope(|s| {
            let puller = s.spawn(|| {
                // Each long-poll answer in turn, until both events were seen.
                let mut answers = Vec::new();
                let t = std::time::Instant::now();
                let seen = |answers: &[serde_json::Value]| {
                    let ar = answers.iter().any(|a| {
                        a["async-responses"]
                            .as_array()
                            .is_some_and(|v| v.iter().any(|e| e["id"] == id.as_str()))
                    });
                    let second = answers.iter().any(|a| {
                        a["notifications"].as_array().is_some_and(|v| {
                            v.iter().any(|e| e["payload"] == b64(b"second").as_str())
                        })
                    });
                    ar && second
                };
                while !seen(&answers) && t.elapsed() < WAIT {
                    let r = d.get("/v2/notification/pull");
                    if r.status == 200 {
                        answers.push(r.json());
                    }
                }
                answers
            });
            // The first value, and a newer one at once.
            let (token, from) = accept_observe(&dev, "/3303/0/5700", "first");
            notify(
                &dev,
                from,
                &token,
                900,
                MessageType::NonConfirmable,
                2,
                "second",
            );
            puller.join().unwrap()
        });
        let at = |f: &dyn Fn(&serde_json::Value) -> bool| answers.iter().position(f);
        let response = at(&|a| {
            a["async-responses"]
                .as_array()
                .is_some_and(|v| v.iter().any(|e| e["id"] == id.as_str()))
        })
        .unwrap_or_else(|| panic!("{ep}: no async response in {answers:?}"));
        let second = at(&|a| {
            a["notifications"]
                .as_array()
                .is_some_and(|v| v.iter().any(|e| e["payload"] == b64(b"second").as_str()))
        })
        .unwrap_or_else(|| panic!("{ep}: no notification in {answers:?}"));
        assert!(
            response < second,
            "{ep}: the newer value came in answer {second}, the first value's async response in answer {response}: {answers:?}"
        );
        assert_eq!(
            answers[response]["async-responses"][0]["payload"],
            b64(b"first").as_str()
        );
    }
}

/// `text/uri-list` (RFC 2483): lines end in CRLF, and each line is a URI: the endpoint's
/// name percent-encoded as one path segment (a space or `%` in it used to be written
/// raw). A queue-mode endpoint is subscribed at once (its observes wait for it).
#[test]
fn subscription_lists_are_uri_lists() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=a b%", "lt=300", "b=UQ"], "</3/0/0>;obs,</3/0/1>;obs");
    for p in ["/3/0/0", "/3/0/1"] {
        let r = d.call("PUT", &format!("/v2/subscriptions/a%20b%25{p}"), None, None);
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let r = d.get("/v2/subscriptions/a%20b%25");
    assert_eq!(
        (r.status, r.content_type.as_str()),
        (200, "text/uri-list"),
        "{}",
        r.body
    );
    let mut lines: Vec<&str> = r.body.split("\r\n").collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "/subscriptions/a%20b%25/3/0/0",
            "/subscriptions/a%20b%25/3/0/1"
        ],
        "{:?}",
        r.body
    );
    let r = d.get("/v2/subscriptions/a%20b%25/3/0/1");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/subscriptions/a%20b%25/3/0/1")
    );
}

/// An observe of a device waits for the cancellations on their way to it (at most 10 s):
/// a client that removes an observer by its path (Wakaama) would end the new observation
/// when the old one's cancellation reached it after the new observe (found by a review).
#[test]
fn a_new_observe_waits_for_the_cancellation_before_it() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=order", "lt=300"], LINKS);
    let sub = "/v2/subscriptions/order/3303/0/5700";
    assert_eq!(d.call("PUT", sub, None, None).status, 202);
    accept_observe(&dev, "/3303/0/5700", "1");
    assert_eq!(d.call("DELETE", sub, None, None).status, 204);
    assert_eq!(d.call("PUT", sub, None, None).status, 202);
    let (cancel, from) = dev.recv_request(WAIT).expect("the cancellation");
    assert_eq!(uint_option(&cancel, CoapOption::Observe), Some(1));
    // While it is unanswered (retransmitted, perhaps), no observe comes.
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        if let Some((req, _)) = dev.recv_request(left) {
            assert_eq!(
                uint_option(&req, CoapOption::Observe),
                Some(1),
                "an observe before the cancellation was answered"
            );
        }
    }
    dev.reply(&cancel, from, ResponseType::Content, b"", None, None);
    accept_observe(&dev, "/3303/0/5700", "2");
}

/// A device that registers again from the address its observations went to, or whose
/// registration is deleted, is told that they end (GET with Observe=1, each one's token)
/// before it is observed again: found by an outside review with aiocoap, which keeps an
/// observer per token (RFC 7641 §2), so that every re-registration without a reboot left
/// one more, until a resource that never changes could not be observed (412).
#[test]
fn observations_of_a_registration_that_is_replaced_or_removed_are_cancelled() {
    let d = Daemon::start();
    let rules = json!([{"endpoint-name": "again", "resource-path": ["/3303/0/5700"]}]);
    let r = d.send_json("PUT", "/v2/subscriptions", rules.to_string());
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let mut dev = d.device();
    dev.register(&["ep=again", "lt=300"], LINKS);
    let (first, _) = accept_observe(&dev, "/3303/0/5700", "1");
    // Registered again from the same socket: the old observation is cancelled, then
    // the resource observed anew.
    dev.register(&["ep=again", "lt=300"], LINKS);
    let cancels = support::accept_cancels(&dev, 1);
    assert_eq!(cancels, [("/3303/0/5700".to_string(), first.clone())]);
    let (second, _) = accept_observe(&dev, "/3303/0/5700", "2");
    assert_ne!(second, first);
    // Deleted through REST: the device is still there, and told.
    let r = d.call("DELETE", "/v2/endpoints/again", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let cancels = support::accept_cancels(&dev, 1);
    assert_eq!(cancels, [("/3303/0/5700".to_string(), second)]);
}
