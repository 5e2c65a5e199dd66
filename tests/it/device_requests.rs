//! End-to-end tests of `POST /v2/device-requests/{device-id}` (issue 23, Pelion's Connect
//! API): the real daemon process, real HTTP, and real devices on UDP sockets (the
//! testkit's device and aiocoap, a CoAP stack nobody here wrote); the answer on the
//! key's notification channel as an `async-responses` entry with the client's async-id.

use crate::requests::{next_request, send_update};
use crate::support;

use std::time::Duration;

use coap_lite::{CoapOption, RequestType, ResponseType};
use serde_json::{Value, json};
use support::coap::uint_option;
use support::peers::Lwm2mDevice;
use support::{Daemon, Prepared, b64, http};

const LINKS: &str = "</1/0>,</3/0>,</3303/0/5700>;obs,</5/0>";
const WAIT: Duration = Duration::from_secs(10);
/// Fast retransmission: an attempt on a silent device ends in well under a second.
const FAST: &str = "ack_timeout_ms = 100\nack_random_factor = 1.0\nmax_retransmit = 1\nseparate_response_timeout_s = 5";

/// `POST /v2/device-requests/{ep}?{query}` with the admin key and a JSON body.
fn dreq(d: &Daemon, ep: &str, query: &str, body: &Value) -> support::Http {
    d.call(
        "POST",
        &format!("/v2/device-requests/{ep}?{query}"),
        Some("application/json"),
        Some(body.to_string().as_bytes()),
    )
}

/// A device-request that must be accepted: 202 with the client's id echoed.
fn accepted(d: &Daemon, ep: &str, query: &str, body: Value) {
    let r = dreq(d, ep, query, &body);
    assert_eq!(r.status, 202, "{query} {body}: {}", r.body);
    let id = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("async-id="))
        .unwrap();
    // (Only `%2F` is encoded in the ids used here.)
    assert_eq!(
        r.json()["async-response-id"],
        id.replace("%2F", "/"),
        "the client's id is echoed"
    );
}

/// GET, PUT, POST and DELETE with payload-b64 and content types reach our device as
/// CoAP requests; each answer comes back on the channel under the client's async-id.
#[test]
fn every_method_reaches_the_device_and_answers_under_the_clients_id() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=dev-1", "lt=300"], LINKS);

    accepted(
        &d,
        "dev-1",
        "async-id=read-temp",
        json!({"method": "GET", "uri": "/3303/0/5700", "accepted-content-type": "text/plain"}),
    );
    let (req, from) = next_request(&dev, RequestType::Get, "/3303/0/5700");
    assert_eq!(uint_option(&req, CoapOption::Accept), Some(0));
    dev.reply(
        &req,
        from,
        ResponseType::Content,
        b"21.5",
        Some(0),
        Some(30),
    );
    assert_eq!(
        d.async_response("read-temp", WAIT),
        json!({"id": "read-temp", "status": 200, "payload": b64(b"21.5"), "ct": "text/plain", "max-age": 30})
    );

    // A write: the decoded payload and its Content-Format; lower-case method.
    accepted(
        &d,
        "dev-1",
        "async-id=session-7%2Fdev-1%2F1%2F0%2F1",
        json!({"method": "put", "uri": "/1/0/1", "content-type": "text/plain", "payload-b64": b64(b"60")}),
    );
    let (req, from) = next_request(&dev, RequestType::Put, "/1/0/1");
    assert_eq!(req.payload, b"60");
    assert_eq!(uint_option(&req, CoapOption::ContentFormat), Some(0));
    dev.reply(&req, from, ResponseType::Changed, b"", None, None);
    let r = d.async_response("session-7/dev-1/1/0/1", WAIT);
    assert_eq!(r["status"], 200, "{r}");

    // An execute with an opaque argument.
    accepted(
        &d,
        "dev-1",
        "async-id=exec",
        json!({"method": "POST", "uri": "/3/0/4", "content-type": "application/octet-stream", "payload-b64": b64(&[0, 1, 255])}),
    );
    let (req, from) = next_request(&dev, RequestType::Post, "/3/0/4");
    assert_eq!(req.payload, [0, 1, 255]);
    assert_eq!(uint_option(&req, CoapOption::ContentFormat), Some(42));
    dev.reply(&req, from, ResponseType::Changed, b"", None, None);
    assert_eq!(d.async_response("exec", WAIT)["status"], 200);

    // A delete the device refuses: its status and diagnostic come back.
    accepted(
        &d,
        "dev-1",
        "async-id=del",
        json!({"method": "DELETE", "uri": "/5/0"}),
    );
    let (req, from) = next_request(&dev, RequestType::Delete, "/5/0");
    dev.reply(
        &req,
        from,
        ResponseType::MethodNotAllowed,
        b"not deletable",
        None,
        None,
    );
    let r = d.async_response("del", WAIT);
    assert_eq!(r["status"], 405);
    assert!(
        r["error"].as_str().unwrap().contains("not deletable"),
        "{r}"
    );

    // The existing v2 route is unchanged beside it: its own generated id.
    let id = d.async_request("GET", "/v2/endpoints/dev-1/3/0/0", None, None);
    assert!(id.contains('#'), "{id}");
    let (req, from) = next_request(&dev, RequestType::Get, "/3/0/0");
    dev.reply(&req, from, ResponseType::Content, b"x", Some(0), None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
}

/// The aiocoap LwM2M client: TLV and SenML answers pass through as the device sent them
/// (with their media types), a write and an execute reach it, and its refusal comes back.
#[test]
fn aiocoap_answers_tlv_and_senml_and_takes_writes() {
    let d = Daemon::start();
    let mut dev = Lwm2mDevice::start(
        d.coap,
        "aio-1",
        &["--lwm2m", "1.1", "--notify-interval", "3600"],
    );

    accepted(
        &d,
        "aio-1",
        "async-id=tlv",
        json!({"method": "GET", "uri": "/3303/0", "accepted-content-type": "application/vnd.oma.lwm2m+tlv"}),
    );
    let r = d.async_response("tlv", WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["ct"].as_str()),
        (Some(200), Some("application/vnd.oma.lwm2m+tlv")),
        "{r}"
    );
    // 5700 = 21.5 as a 4-byte float, 5701 = "Cel" (the peer's TLV, byte for byte).
    let mut tlv = vec![0b1110_0100, 0x16, 0x44];
    tlv.extend(21.5f32.to_be_bytes());
    tlv.extend([0b1110_0011, 0x16, 0x45, b'C', b'e', b'l']);
    assert_eq!(r["payload"], b64(&tlv));

    accepted(
        &d,
        "aio-1",
        "async-id=senml",
        json!({"method": "GET", "uri": "/3/0", "accepted-content-type": "application/senml+json"}),
    );
    let r = d.async_response("senml", WAIT);
    assert_eq!(r["ct"], "application/senml+json", "{r}");
    use base64::Engine;
    let senml: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(r["payload"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(senml[0]["bn"], "/3/0/", "{senml}");
    assert_eq!(senml[0]["vs"], "connectord-test", "{senml}");

    accepted(
        &d,
        "aio-1",
        "async-id=write",
        json!({"method": "PUT", "uri": "/1/0/1", "content-type": "text/plain", "payload-b64": b64(b"120")}),
    );
    assert_eq!(d.async_response("write", WAIT)["status"], 200);
    let seen = dev.wait_event(WAIT, |e| e["event"] == "request" && e["path"] == "/1/0/1");
    assert_eq!(
        (seen["method"].as_str(), seen["payload"].as_str()),
        (Some("PUT"), Some("120"))
    );
    assert_eq!(seen["ct"], 0);

    accepted(
        &d,
        "aio-1",
        "async-id=reboot",
        json!({"method": "POST", "uri": "/3/0/4"}),
    );
    assert_eq!(d.async_response("reboot", WAIT)["status"], 200);

    // aiocoap refuses a DELETE of an instance it serves only for GET: 4.05.
    accepted(
        &d,
        "aio-1",
        "async-id=refused",
        json!({"method": "DELETE", "uri": "/3/0"}),
    );
    assert_eq!(d.async_response("refused", WAIT)["status"], 405);
    dev.command("quit");
}

/// Queue mode (aiocoap with `b=UQ`): the request waits until the device's next update.
#[test]
fn a_queue_mode_device_gets_the_request_at_its_update() {
    let d = Daemon::start();
    let mut dev = Lwm2mDevice::start(
        d.coap,
        "aio-q",
        &[
            "--lwm2m",
            "1.1",
            "--binding",
            "UQ",
            "--notify-interval",
            "3600",
        ],
    );
    accepted(
        &d,
        "aio-q",
        "async-id=queued",
        json!({"method": "GET", "uri": "/3/0/1", "accepted-content-type": "text/plain"}),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !dev.events().iter().any(|e| e["event"] == "request"),
        "nothing is sent before the device speaks: {:?}",
        dev.events()
    );
    assert!(
        d.collect_events(Duration::from_millis(200), |e| e
            .async_response("queued")
            .is_some())
            .async_response("queued")
            .is_none()
    );
    dev.command("update");
    let r = d.async_response("queued", WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"sim-1").as_str())),
        "{r}"
    );
}

/// An async-id is the domain's until its answer is on the channel: a second request with
/// it, for the same device or another, is 409; once answered it may be used again.
#[test]
fn a_duplicate_async_id_is_409_until_the_first_is_answered() {
    let d = Daemon::start();
    let mut dev = d.device();
    let reg = dev.register(&["ep=sleepy", "lt=300", "b=UQ"], LINKS);
    let mut other = d.device();
    other.register(&["ep=other", "lt=300"], LINKS);
    let get = json!({"method": "GET", "uri": "/3/0/0"});
    accepted(&d, "sleepy", "async-id=dup", get.clone());
    for ep in ["sleepy", "other"] {
        let r = dreq(&d, ep, "async-id=dup", &get);
        assert_eq!(r.status, 409, "{ep}: {}", r.body);
        assert_eq!(r.json()["type"], "conflict");
        assert!(
            r.json()["message"].as_str().unwrap().contains("\"dup\""),
            "{}",
            r.body
        );
    }
    send_update(&mut dev, &reg);
    let (req, from) = next_request(&dev, RequestType::Get, "/3/0/0");
    dev.reply(&req, from, ResponseType::Content, b"1", Some(0), None);
    assert_eq!(d.async_response("dup", WAIT)["status"], 200);
    // Answered: the id is free again.
    accepted(&d, "other", "async-id=dup", get);
    let (req, from) = next_request(&other, RequestType::Get, "/3/0/0");
    other.reply(&req, from, ResponseType::Content, b"2", Some(0), None);
    assert!(support::eventually(WAIT, || {
        d.collect_events(Duration::ZERO, |_| true)
            .of("async-responses")
            .iter()
            .filter(|e| e["id"] == "dup")
            .count()
            == 2
    }));
}

/// A request refused after it took its place in the endpoint's queue (here a duplicate
/// async-id, 409) gives the place back: the queue's room is still there for the next.
#[test]
fn a_refused_request_gives_its_queue_place_back() {
    let d = Daemon::start_with("[requests]\nqueue_len = 2\n");
    let mut dev = d.device();
    dev.register(&["ep=sleepy", "lt=300", "b=UQ"], LINKS); // queue mode: requests wait
    let get = json!({"method": "GET", "uri": "/3/0/0"});
    accepted(&d, "sleepy", "async-id=first", get.clone());
    for _ in 0..5 {
        let r = dreq(&d, "sleepy", "async-id=first", &get);
        assert_eq!(
            r.status, 409,
            "the place given back, not a full queue: {}",
            r.body
        );
    }
    accepted(&d, "sleepy", "async-id=second", get.clone());
    let r = dreq(&d, "sleepy", "async-id=third", &get);
    assert_eq!(r.status, 429, "two wait: {}", r.body);
}

/// Each bad input is a clear JSON error; nothing is sent to the device.
#[test]
fn bad_inputs_are_refused_with_json_errors() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=dev-1", "lt=300"], LINKS);
    let get = json!({"method": "GET", "uri": "/3/0/0"});
    let cases: &[(&str, &str, Value, u16, &str)] = &[
        ("dev-1", "retry=1", get.clone(), 400, "async-id is required"),
        // Found by an outside review: taken as "\u{fffd}\u{fffd}" before.
        (
            "dev-1",
            "async-id=%FF%FE",
            get.clone(),
            400,
            "async-id is not valid UTF-8",
        ),
        (
            "dev-1",
            "async-id=7%230f0f9a29-0000-4000-8000-000000000000",
            get.clone(),
            400,
            "has the form of the ids this daemon makes",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "GET", "uri": "/3/0/0#frag"}),
            400,
            "fragment",
        ),
        (
            "dev-1",
            "async-id=x&retry=99",
            get.clone(),
            400,
            "retry must be an integer from 0 to 24",
        ),
        (
            "dev-1",
            "async-id=x&expiry-seconds=0",
            get.clone(),
            400,
            "expiry-seconds",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"uri": "/3/0/0"}),
            400,
            "missing field `method`",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "GET"}),
            400,
            "missing field `uri`",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "FETCH", "uri": "/3/0/0"}),
            400,
            "method must be",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "GET", "uri": "3/0/0"}),
            400,
            "starting with '/'",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "PUT", "uri": "/1/0/1", "payload-b64": "%%%"}),
            400,
            "base64",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "PUT", "uri": "/1/0/1", "content-type": "image/png"}),
            400,
            "content-type",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "GET", "uri": "/3/0/0", "accepted-content-type": "text/html"}),
            400,
            "accepted-content-type",
        ),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "GET", "uri": "/3/0/0", "extra": true}),
            400,
            "unknown field",
        ),
        (
            "dev-1",
            "async-id=x",
            json!(["GET", "/3/0/0"]),
            400,
            "JSON object",
        ),
        ("nobody", "async-id=x", get.clone(), 404, "not registered"),
        (
            "dev-1",
            "async-id=x",
            json!({"method": "GET", "uri": "/4/0/0"}),
            404,
            "/4/0/0",
        ),
    ];
    for (ep, query, body, status, says) in cases {
        let r = dreq(&d, ep, query, body);
        assert_eq!(r.status, *status, "{ep} {query} {body}: {}", r.body);
        assert_eq!(r.content_type, "application/json");
        assert!(
            r.json()["message"].as_str().unwrap().contains(says),
            "{ep} {query} {body}: {} should say {says:?}",
            r.body
        );
    }
    // Not JSON at all, and a body that says it is something else.
    let r = d.call(
        "POST",
        "/v2/device-requests/dev-1?async-id=x",
        Some("application/json"),
        Some(b"{"),
    );
    assert_eq!(
        (r.status, r.json()["type"].as_str()),
        (400, Some("bad_request"))
    );
    let r = d.call(
        "POST",
        "/v2/device-requests/dev-1?async-id=x",
        Some("text/plain"),
        Some(get.to_string().as_bytes()),
    );
    assert_eq!(r.status, 415, "{}", r.body);
    let r = d.call("GET", "/v2/device-requests/dev-1?async-id=x", None, None);
    assert_eq!(r.status, 405, "{}", r.body);
    support::no_request(
        &dev,
        Duration::from_millis(300),
        "refused requests send nothing",
    );
}

/// A queue-mode device that never speaks again: the request is answered
/// `504 REQUEST_EXPIRED` once its expiry-seconds pass. A device that never answers a
/// request in flight: the expiry ends the exchange with the same answer, long before
/// CoAP's own retransmissions (about 45 s here) would give up.
#[test]
fn an_unanswered_request_expires_with_request_expired() {
    let d = Daemon::start();
    let mut asleep = d.device();
    asleep.register(&["ep=asleep", "lt=300", "b=UQ"], LINKS);
    accepted(
        &d,
        "asleep",
        "async-id=late&expiry-seconds=2",
        json!({"method": "GET", "uri": "/3/0/0"}),
    );
    let r = d.async_response("late", WAIT);
    assert_eq!(
        (
            r["status"].as_u64(),
            r["error"].as_str(),
            r["payload"].as_str()
        ),
        (Some(504), Some("REQUEST_EXPIRED"), Some("")),
        "{r}"
    );
    support::no_request(
        &asleep,
        Duration::from_millis(200),
        "an expired request is not sent",
    );

    let mut silent = d.device();
    silent.register(&["ep=silent", "lt=300"], LINKS);
    accepted(
        &d,
        "silent",
        "async-id=in-flight&expiry-seconds=2",
        json!({"method": "GET", "uri": "/3/0/0"}),
    );
    next_request(&silent, RequestType::Get, "/3/0/0");
    let r = d.async_response("in-flight", Duration::from_secs(20));
    assert_eq!(r["status"], 504);
    assert_eq!(r["error"], "REQUEST_EXPIRED", "not CoAP's timeout: {r}");
    assert!(
        d.wait_log("device-request expired before the device answered", WAIT),
        "the queued expiry is logged (debug)"
    );
}

/// An async-id used again once its first request was answered: the second request has
/// its own expiry, not the first's (found by an outside review: the first request's
/// timer, still running, expired the second at the first's deadline).
#[test]
fn an_async_id_used_again_keeps_its_own_expiry() {
    let d = Daemon::start();
    let mut dev = d.device();
    let reg = dev.register(&["ep=again", "lt=300", "b=UQ"], LINKS);
    let get = json!({"method": "GET", "uri": "/3/0/0"});
    accepted(&d, "again", "async-id=reuse&expiry-seconds=2", get.clone());
    send_update(&mut dev, &reg);
    let (req, from) = next_request(&dev, RequestType::Get, "/3/0/0");
    dev.reply(&req, from, ResponseType::Content, b"1", Some(0), None);
    assert_eq!(d.async_response("reuse", WAIT)["status"], 200);
    d.clear_inbox();

    accepted(&d, "again", "async-id=reuse&expiry-seconds=3600", get);
    // Past the first request's deadline.
    std::thread::sleep(Duration::from_millis(2500));
    let events = d.collect_events(Duration::from_millis(300), |_| false);
    assert!(
        events.async_response("reuse").is_none(),
        "the second request was answered before the device spoke: {:?}",
        events.of("async-responses")
    );
    send_update(&mut dev, &reg);
    let (req, from) = next_request(&dev, RequestType::Get, "/3/0/0");
    dev.reply(&req, from, ResponseType::Content, b"2", Some(0), None);
    let r = d.async_response("reuse", WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"2").as_str())),
        "{r}"
    );
}

/// `retry=1`: the first attempt goes unanswered, the request waits for the device to
/// speak, is sent once more (a new exchange) and, unanswered again, is answered with the
/// timeout. Without `retry` a failed attempt is answered at once.
#[test]
fn retries_are_counted_and_each_waits_for_the_device() {
    let d = Daemon::start_custom(FAST, "");
    let mut dev = d.device();
    let reg = dev.register(&["ep=flaky", "lt=300"], LINKS);
    accepted(
        &d,
        "flaky",
        "async-id=twice&retry=1",
        json!({"method": "GET", "uri": "/3/0/0"}),
    );
    // Attempt 1: two transmissions (max_retransmit = 1) of one message, no answer.
    let (a1, _) = next_request(&dev, RequestType::Get, "/3/0/0");
    let (a1b, _) = next_request(&dev, RequestType::Get, "/3/0/0");
    assert_eq!(a1.header.message_id, a1b.header.message_id);
    // Not answered yet, and nothing more is sent until the device speaks.
    support::no_request(
        &dev,
        Duration::from_millis(800),
        "the retry waits for the device",
    );
    assert!(
        d.collect_events(Duration::from_millis(100), |e| e
            .async_response("twice")
            .is_some())
            .async_response("twice")
            .is_none(),
        "a retried request is not answered yet"
    );
    send_update(&mut dev, &reg);
    let (a2, _) = next_request(&dev, RequestType::Get, "/3/0/0");
    assert_ne!(a2.header.message_id, a1.header.message_id, "a new attempt");
    next_request(&dev, RequestType::Get, "/3/0/0");
    let r = d.async_response("twice", WAIT);
    assert_eq!(r["status"], 504, "{r}");
    assert!(r["error"].as_str().unwrap().contains("timeout"), "{r}");
    assert_eq!(
        d.metric("device_timeouts_total"),
        2,
        "two attempts timed out"
    );

    // retry=0 (the default for a device not in queue mode): answered after one attempt.
    accepted(
        &d,
        "flaky",
        "async-id=once",
        json!({"method": "GET", "uri": "/3/0/1"}),
    );
    next_request(&dev, RequestType::Get, "/3/0/1");
    next_request(&dev, RequestType::Get, "/3/0/1");
    assert_eq!(d.async_response("once", WAIT)["status"], 504);
}

/// A key restricted to some endpoints and resources (a Losant application key) may
/// address only those; the request it may make is counted against the domain's quota.
#[test]
fn a_restricted_key_is_refused_outside_its_restriction() {
    let p = Prepared::new(
        "",
        "[plugins]\nauth = [\"connector\", \"losant\"]\n[limits]\ntransaction_quota = 1000\n",
    );
    let (app, token) = p.losant_app("plant");
    let d = p.start();
    let mut sensor = d.device();
    sensor.register(&["ep=sensor-1", "lt=300"], "</3/0/13>,</3303/0/5700>");
    let key = http(
        "POST",
        &d.url(&format!("/applications/{app}/keys")),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        Some(
            br#"{"filterType": "whitelist", "deviceTags": [{"key": "endpoint", "value": "gw-*"}], "subTopics": ["ep/sensor-1/3303/#"]}"#,
        ),
    );
    assert_eq!(key.status, 201, "{}", key.body);
    let k = key.json();
    use base64::Engine;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            k["key"].as_str().unwrap(),
            k["secret"].as_str().unwrap()
        ))
    );
    let call = |ep: &str, id: &str, uri: &str| {
        http(
            "POST",
            &d.url(&format!("/v2/device-requests/{ep}?async-id={id}")),
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            Some(json!({"method": "GET", "uri": uri}).to_string().as_bytes()),
        )
    };
    let before = d.get("/v2/limits").json()["transaction-count"]
        .as_u64()
        .unwrap();
    let r = call("sensor-1", "no-1", "/3/0/13");
    assert_eq!(
        r.status, 403,
        "a resource outside the restriction: {}",
        r.body
    );
    let r = call("other-1", "no-2", "/3/0/0");
    assert_eq!(
        r.status, 403,
        "an endpoint outside the restriction: {}",
        r.body
    );
    let r = call("sensor-1", "yes", "/3303/0/5700");
    assert_eq!(r.status, 202, "{}", r.body);
    let (req, from) = next_request(&sensor, RequestType::Get, "/3303/0/5700");
    sensor.reply(&req, from, ResponseType::Content, b"20", Some(0), None);
    let after = d.get("/v2/limits").json()["transaction-count"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after,
        before + 1,
        "the accepted request is counted, the refused ones not"
    );
}

/// An accepted request is stored before its 202: after `kill -9` and a restart it is
/// still queued (its id still taken), and reaches the device at its next update under
/// the client's id.
#[test]
fn an_accepted_request_survives_kill_9() {
    let d = Daemon::start();
    let mut dev = d.device();
    let reg = dev.register(&["ep=durable", "lt=300", "b=UQ"], LINKS);
    accepted(
        &d,
        "durable",
        "async-id=kept&retry=3&expiry-seconds=3600",
        json!({"method": "PUT", "uri": "/1/0/1", "content-type": "text/plain", "payload-b64": b64(b"77")}),
    );
    let d = d.crash_and_restart();
    let r = dreq(
        &d,
        "durable",
        "async-id=kept",
        &json!({"method": "GET", "uri": "/3/0/0"}),
    );
    assert_eq!(r.status, 409, "the stored request keeps its id: {}", r.body);
    dev.server = d.coap;
    send_update(&mut dev, &reg);
    let (req, from) = next_request(&dev, RequestType::Put, "/1/0/1");
    assert_eq!(req.payload, b"77");
    dev.reply(&req, from, ResponseType::Changed, b"", None, None);
    assert_eq!(d.async_response("kept", WAIT)["status"], 200);
}

/// The simulator (`connectord simulate`, a separate process) as an LwM2M 1.1 client: a
/// read in TLV, a read in SenML JSON decoded as the daemon's JSON value tree, a write and
/// an execute, each answered under the client's async-id.
#[test]
fn the_simulator_answers_device_requests() {
    let d = Daemon::start();
    let mut sim = std::process::Command::new(d.bin())
        .args([
            "simulate",
            "--devices",
            "1",
            "--prefix",
            "dr-",
            "--lwm2m",
            "1.1",
        ])
        .args(["--server", &d.coap.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start connectord simulate");
    let registered = support::eventually(WAIT, || d.get("/v2/endpoints/dr-000000").status == 200);
    let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(registered, "the simulated device registered");
        accepted(
            &d,
            "dr-000000",
            "async-id=sim-read",
            json!({"method": "GET", "uri": "/3/0/0", "accepted-content-type": "text/plain"}),
        );
        let r = d.async_response("sim-read", WAIT);
        assert_eq!(
            (
                r["status"].as_u64(),
                r["ct"].as_str(),
                r["payload"].as_str()
            ),
            (
                Some(200),
                Some("text/plain"),
                Some(b64(b"connectord").as_str())
            ),
            "{r}"
        );
        accepted(
            &d,
            "dr-000000",
            "async-id=sim-tree",
            json!({"method": "GET", "uri": "/3/0", "accepted-content-type": "application/json"}),
        );
        let r = d.async_response("sim-tree", WAIT);
        assert_eq!(r["ct"], "application/json", "{r}");
        use base64::Engine;
        let tree: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(r["payload"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(tree["0"], "connectord", "{tree}");
        accepted(
            &d,
            "dr-000000",
            "async-id=sim-write",
            json!({"method": "PUT", "uri": "/1/0/1", "content-type": "text/plain", "payload-b64": b64(b"600")}),
        );
        assert_eq!(d.async_response("sim-write", WAIT)["status"], 200);
        accepted(
            &d,
            "dr-000000",
            "async-id=sim-exec",
            json!({"method": "POST", "uri": "/3/0/4"}),
        );
        assert_eq!(d.async_response("sim-exec", WAIT)["status"], 200);
    }));
    let _ = sim.kill();
    let _ = sim.wait();
    if let Err(p) = checks {
        std::panic::resume_unwind(p);
    }
}

/// On a cluster (NATS): a device-request made through a node that does not own the device
/// is forwarded with its async-id and terms; the owner holds the id (409 through either
/// node), queues it for the queue-mode device, and answers it under the client's id.
#[test]
fn a_device_request_through_a_non_owner_reaches_the_owner() {
    use crate::cluster::{cluster, second_node, until_listed};
    let server = connectord_testkit::nats::NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    let mut dev = n1.device();
    let reg = dev.register(&["ep=fw-dr", "lt=300", "b=UQ"], LINKS);
    until_listed(&n2, &["fw-dr"]);
    accepted(
        &n2,
        "fw-dr",
        "async-id=fw-1&retry=1&expiry-seconds=600",
        json!({"method": "PUT", "uri": "/1/0/1", "content-type": "text/plain", "payload-b64": b64(b"45")}),
    );
    for node in [&n1, &n2] {
        let r = dreq(
            node,
            "fw-dr",
            "async-id=fw-1",
            &json!({"method": "GET", "uri": "/3/0/0"}),
        );
        assert_eq!(r.status, 409, "{}", r.body);
    }
    send_update(&mut dev, &reg);
    let (req, from) = next_request(&dev, RequestType::Put, "/1/0/1");
    assert_eq!(from, n1.coap, "only the owner talks to its device");
    assert_eq!(req.payload, b"45");
    dev.reply(&req, from, ResponseType::Changed, b"", None, None);
    assert_eq!(n1.async_response("fw-1", WAIT)["status"], 200);
}
