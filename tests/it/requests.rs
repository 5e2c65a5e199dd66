//! End-to-end tests of requests to devices (seed 000, "Resources"): the REST call, the
//! CoAP exchange with a device on a real UDP socket, and the async response on the
//! notification channel.

use crate::support;

use std::time::Duration;

use coap_lite::{CoapOption, MessageType, RequestType, ResponseType};
use support::coap::{path_of, uint_option};
use support::peers::Lwm2mDevice;
use support::{Daemon, b64};

const LINKS: &str = "</1/0>,</3/0>,</3303/0/5700>;obs,</5/0>";
const WAIT: Duration = Duration::from_secs(10);
/// Fast retransmission so that timeouts take well under a second.
const FAST: &str = "ack_timeout_ms = 100\nack_random_factor = 1.0\nmax_retransmit = 1\nseparate_response_timeout_s = 5";

/// Sends a registration update without waiting for its answer (the daemon's queued
/// requests may arrive before it; `recv_request` skips the answer).
pub(crate) fn send_update(dev: &mut support::coap::Device, reg: &str) {
    let path = ["rd", reg];
    let p = dev.build(&support::coap::Req::new(RequestType::Post, &path));
    dev.send_raw(&p.to_bytes().unwrap());
}

/// The next request the daemon sends `dev` (within 10 s), asserting its method and path.
pub(crate) fn next_request(
    dev: &support::coap::Device,
    method: RequestType,
    path: &str,
) -> (coap_lite::Packet, std::net::SocketAddr) {
    let (req, from) = dev
        .recv_request(WAIT)
        .unwrap_or_else(|| panic!("the daemon sent no {method:?} {path}"));
    assert_eq!(req.header.code, coap_lite::MessageClass::Request(method));
    assert_eq!(path_of(&req), path);
    (req, from)
}

#[test]
fn read_write_execute_delete_round_trip() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=dev-1", "lt=300"], LINKS);

    let id = d.async_request("GET", "/v2/endpoints/dev-1/3303/0/5700", None, None);
    let (req, from) = next_request(&dev, RequestType::Get, "/3303/0/5700");
    assert_eq!(
        from, d.coap,
        "requests come from the socket the device registered to"
    );
    assert_eq!(req.header.get_type(), MessageType::Confirmable);
    assert_eq!(req.get_token().len(), 8);
    dev.reply(
        &req,
        from,
        ResponseType::Content,
        b"21.5",
        Some(0),
        Some(30),
    );
    let r = d.async_response(&id, WAIT);
    assert_eq!(
        r,
        serde_json::json!({"id": id, "status": 200, "payload": b64(b"21.5"), "ct": "text/plain", "max-age": 30}),
        "no `error` key on success"
    );

    // Write: the body and its content format reach the device.
    let id = d.async_request(
        "PUT",
        "/endpoints/dev-1/1/0/1",
        Some("text/plain"),
        Some(b"60"),
    );
    let (req, from) = next_request(&dev, RequestType::Put, "/1/0/1");
    assert_eq!(req.payload, b"60");
    assert_eq!(uint_option(&req, CoapOption::ContentFormat), Some(0));
    dev.reply(&req, from, ResponseType::Changed, b"", None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(""))
    );

    // Execute with arguments, at /v1.
    let id = d.async_request(
        "POST",
        "/v1/endpoints/dev-1/3/0/4",
        Some("text/plain"),
        Some(b"now"),
    );
    let (req, from) = next_request(&dev, RequestType::Post, "/3/0/4");
    assert_eq!(req.payload, b"now");
    dev.reply(&req, from, ResponseType::Changed, b"", None, None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);

    // Delete; the device refuses: the status and an error come back.
    let id = d.async_request("DELETE", "/v2/endpoints/dev-1/5/0", None, None);
    let (req, from) = next_request(&dev, RequestType::Delete, "/5/0");
    dev.reply(
        &req,
        from,
        ResponseType::MethodNotAllowed,
        b"not deletable",
        None,
        None,
    );
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 405);
    // The CoAP code by its number and RFC name (it was the Rust variant,
    // "MethodNotAllowed"), then the device's diagnostic.
    assert_eq!(
        r["error"], "the device answered 4.05 Method Not Allowed: not deletable",
        "{r}"
    );
}

#[test]
fn a_device_that_never_answers_gives_504() {
    let d = Daemon::start_custom(FAST, "");
    let mut dev = d.device();
    dev.register(&["ep=silent", "lt=300"], LINKS);
    let id = d.async_request("GET", "/v2/endpoints/silent/3/0/0", None, None);
    // Two transmissions (max_retransmit = 1), no answer.
    let (a, _) = dev.recv_request(WAIT).unwrap();
    let (b, _) = dev.recv_request(WAIT).unwrap();
    assert_eq!(a, b, "a retransmission is the same message");
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 504);
    assert!(r["error"].as_str().unwrap().contains("timeout"));
    assert_eq!(d.metric("device_timeouts_total"), 1);
}

#[test]
fn a_lost_request_is_retransmitted_and_then_answered() {
    let d = Daemon::start_custom(FAST, "");
    let mut dev = d.device();
    dev.register(&["ep=lossy", "lt=300"], LINKS);
    let id = d.async_request("GET", "/v2/endpoints/lossy/3/0/0", None, None);
    let (first, _) = dev.recv_request(WAIT).unwrap(); // "lost"
    let (again, from) = dev.recv_request(WAIT).unwrap();
    assert_eq!(first.header.message_id, again.header.message_id);
    dev.reply(&again, from, ResponseType::Content, b"ok", Some(0), None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"ok").as_str()))
    );
    assert_eq!(r["max-age"], 60, "CoAP's default Max-Age");
}

#[test]
fn one_request_in_flight_per_endpoint_and_a_full_queue_is_429() {
    let d = Daemon::start_custom(FAST, "[requests]\nqueue_len = 1\n");
    let mut dev = d.device();
    dev.register(&["ep=busy", "lt=300"], LINKS);
    let first = d.async_request("GET", "/v2/endpoints/busy/3/0/0", None, None);
    let (req, from) = dev.recv_request(WAIT).unwrap();
    // The first is in flight; the second waits; the third finds the queue full.
    let second = d.async_request("GET", "/v2/endpoints/busy/3/0/1", None, None);
    let r = d.call("GET", "/v2/endpoints/busy/3/0/2", None, None);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["type"], "too_many_requests");
    dev.reply(&req, from, ResponseType::Content, b"1", None, None);
    assert_eq!(d.async_response(&first, WAIT)["status"], 200);
    // Only now the second goes out.
    let (req, from) = loop {
        let (p, f) = dev.recv_request(WAIT).expect("second request");
        if path_of(&p) == "/3/0/1" {
            break (p, f);
        }
    };
    dev.reply(&req, from, ResponseType::Content, b"2", None, None);
    assert_eq!(d.async_response(&second, WAIT)["payload"], b64(b"2"));
}

/// The queue's bound holds for requests submitted at once: each holds its place from the
/// check to its queueing. Before, every request that arrived while the others waited for
/// their store writes passed the check, and the queue grew past `requests.queue_len`.
#[test]
fn requests_submitted_at_once_do_not_pass_the_queue_bound() {
    let d = Daemon::start_with("[requests]\nqueue_len = 2\n");
    let d = &d;
    // Three endpoints, one burst each: before, most bursts passed the bound.
    for round in 0..3 {
        let mut dev = d.device();
        let ep = format!("bound{round}");
        dev.register(&[&format!("ep={ep}"), "lt=300"], LINKS);
        let first = d.async_request("GET", &format!("/v2/endpoints/{ep}/3/0/0"), None, None);
        let (req, from) = dev.recv_request(WAIT).unwrap();
        // The first is in flight (not counted); of eight more at once, two wait.
        let mut statuses = support::at_once(8, |i| {
            let path = format!("/v2/endpoints/{ep}/3/0/{}", i + 1);
            d.call("GET", &path, None, None).status
        });
        statuses.sort();
        assert_eq!(
            statuses,
            [202, 202, 429, 429, 429, 429, 429, 429],
            "round {round}"
        );
        dev.reply(&req, from, ResponseType::Content, b"1", None, None);
        assert_eq!(d.async_response(&first, WAIT)["status"], 200);
        // The two waiting go out, one at a time, and nothing else (a retransmission of
        // the first aside).
        let mut sent = Vec::new();
        while sent.len() < 2 {
            let (req, from) = dev.recv_request(WAIT).expect("a queued request");
            if path_of(&req) != "/3/0/0" {
                sent.push(path_of(&req));
                dev.reply(&req, from, ResponseType::Content, b"2", None, None);
            }
        }
        if let Some((p, _)) = dev.recv_request(Duration::from_millis(300)) {
            assert_eq!(
                path_of(&p),
                "/3/0/0",
                "only the two queued went out: {sent:?}"
            );
        }
    }
}

#[test]
fn synchronous_status_codes() {
    let d = Daemon::start_with("[requests]\nmax_body = 2048\n");
    let mut dev = d.device();
    dev.register(&["ep=codes", "lt=300"], LINKS);
    let mut q = d.device();
    q.register(&["ep=queued", "lt=300", "b=UQ"], LINKS);
    /// (method, path, content type, body, status, error type)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a [u8]>,
        u16,
        &'a str,
    );
    let cases: &[Case] = &[
        ("GET", "/v2/endpoints/nobody/3/0/0", None, None, 410, "gone"),
        (
            "GET",
            "/v2/endpoints/codes/42/0/1",
            None,
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            "/v2/endpoints/codes/42/0",
            None,
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/v2/endpoints/queued/3/0/0?noResp=true",
            None,
            None,
            409,
            "conflict",
        ),
        (
            "GET",
            "/v2/endpoints/codes/3/0/0?noResp=maybe",
            None,
            None,
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/v2/endpoints/codes/1/0/1",
            Some("application/json"),
            Some(b"{not json"),
            412,
            "precondition_failed",
        ),
        (
            "PUT",
            "/v2/endpoints/codes/1/0/1",
            Some("text/plain"),
            Some(&[0xFF, 0xFE]),
            412,
            "precondition_failed",
        ),
        (
            "PUT",
            "/v2/endpoints/codes/1/0/1",
            Some("image/png"),
            Some(b"x"),
            415,
            "unsupported_media_type",
        ),
        (
            "PUT",
            "/v2/endpoints/codes/1/0/1",
            Some("text/plain"),
            Some(&[b'a'; 3000]),
            413,
            "payload_too_large",
        ),
        (
            "PATCH",
            "/v2/endpoints/codes/1/0/1",
            None,
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, ct, body, status, kind) in cases {
        let r = d.call(method, path, *ct, *body);
        assert_eq!(r.status, *status, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["type"], *kind, "{method} {path}");
    }
    support::no_request(
        &dev,
        Duration::from_millis(200),
        "nothing reached the device",
    );

    // noResp=true: a NON request, 204, no async response.
    let r = d.call(
        "PUT",
        "/v2/endpoints/codes/1/0/1?noResp=true",
        Some("text/plain"),
        Some(b"5"),
    );
    assert_eq!(r.status, 204);
    let (req, _) = dev.recv_request(WAIT).unwrap();
    assert_eq!(req.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(req.payload, b"5");

    // cacheOnly: 205 before a read, 200 with the value after one.
    let r = d.call(
        "GET",
        "/v2/endpoints/codes/3303/0/5700?cacheOnly=true",
        None,
        None,
    );
    assert_eq!((r.status, r.body.as_str()), (205, ""));
    let id = d.async_request("GET", "/v2/endpoints/codes/3303/0/5700", None, None);
    let (req, from) = dev.recv_request(WAIT).unwrap();
    dev.reply(
        &req,
        from,
        ResponseType::Content,
        b"22.0",
        Some(0),
        Some(60),
    );
    d.async_response(&id, WAIT);
    let r = d.call(
        "GET",
        "/v2/endpoints/codes/3303/0/5700?cacheOnly=true",
        None,
        None,
    );
    assert_eq!(
        (r.status, r.content_type.as_str(), r.body.as_str()),
        (200, "text/plain", "22.0")
    );
}

#[test]
fn a_stale_socket_is_503_until_the_device_updates() {
    let d = Daemon::start();
    let mut dev = d.device();
    let id = dev.register(&["ep=moved", "lt=300"], LINKS);
    // Restarted on another port: the registration's socket is gone.
    let d = d.crash_and_restart();
    let r = d.call("GET", "/v2/endpoints/moved/3/0/0", None, None);
    assert_eq!(r.status, 503, "{}", r.body);
    dev.server = d.coap;
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed);
    let id = d.async_request("GET", "/v2/endpoints/moved/3/0/0", None, None);
    let (req, from) = dev.recv_request(WAIT).unwrap();
    assert_eq!(from, d.coap);
    dev.reply(&req, from, ResponseType::Content, b"x", None, None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
}

#[test]
fn queue_mode_requests_wait_for_the_next_update() {
    let d = Daemon::start();
    let mut dev = d.device();
    let reg = dev.register(&["ep=sleepy", "lt=300", "b=UQ"], LINKS);
    let id1 = d.async_request("GET", "/v2/endpoints/sleepy/3/0/0", None, None);
    let id2 = d.async_request(
        "PUT",
        "/v2/endpoints/sleepy/1/0/1",
        Some("text/plain"),
        Some(b"90"),
    );
    support::no_request(
        &dev,
        Duration::from_millis(500),
        "sent before the device woke up",
    );
    // The device wakes up: an update; the queued requests follow, in order.
    send_update(&mut dev, &reg);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (req, from) = dev
            .recv_request(WAIT)
            .expect("queued request after the update");
        seen.push(path_of(&req));
        dev.reply(&req, from, ResponseType::Content, b"v", None, None);
    }
    assert_eq!(seen, vec!["/3/0/0", "/1/0/1"]);
    assert_eq!(d.async_response(&id1, WAIT)["status"], 200);
    assert_eq!(d.async_response(&id2, WAIT)["status"], 200);
}

/// A queue-mode device that wakes and sends a notification, without an update, is sent
/// what waits for it (OMA LwM2M 1.0, queue mode: the server checks its queue on any
/// message from the client). Before, the read waited for the device's next update.
#[test]
fn a_queue_mode_device_that_wakes_with_a_notification_gets_its_queued_requests() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    let reg = dev.register(&["ep=napper", "lt=300", "b=UQ"], LINKS);
    let sub = d.async_request("PUT", "/v2/subscriptions/napper/3303/0/5700", None, None);
    send_update(&mut dev, &reg);
    let (obs, from) = dev
        .recv_request(WAIT)
        .expect("the observe after the update");
    assert_eq!(path_of(&obs), "/3303/0/5700");
    let mut p = support::observe_content(
        MessageType::Acknowledgement,
        obs.header.message_id,
        obs.get_token(),
        1,
        b"20",
    );
    p.header.code = coap_lite::MessageClass::Response(ResponseType::Content);
    support::send_packet(&dev, &p, from);
    assert_eq!(d.async_response(&sub, WAIT)["status"], 200);

    let id = d.async_request("GET", "/v2/endpoints/napper/3/0/0", None, None);
    support::no_request(
        &dev,
        Duration::from_millis(500),
        "sent before the device woke up",
    );
    // A notification from another address (a NAT's new port, not yet in an update) is
    // taken, but sends nothing to the registration's old address.
    let moved = d.device();
    let n = support::observe_content(
        MessageType::Confirmable,
        0x5101,
        obs.get_token(),
        2,
        b"20.5",
    );
    support::send_packet(&moved, &n, from);
    support::no_request(
        &dev,
        Duration::from_millis(500),
        "sent on a notification from elsewhere",
    );
    let n = support::observe_content(MessageType::Confirmable, 0x5100, obs.get_token(), 3, b"21");
    support::send_packet(&dev, &n, from);
    let (req, from) = dev
        .recv_request(WAIT)
        .expect("the queued read after the notification");
    assert_eq!(path_of(&req), "/3/0/0");
    dev.reply(&req, from, ResponseType::Content, b"v", None, None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
}

#[test]
fn queued_requests_survive_kill_9() {
    let d = Daemon::start();
    let mut dev = d.device();
    let reg = dev.register(&["ep=durable", "lt=300", "b=UQ"], LINKS);
    let id1 = d.async_request("GET", "/v2/endpoints/durable/3/0/0", None, None);
    let id2 = d.async_request("GET", "/v2/endpoints/durable/3/0/1", None, None);
    let d = d.crash_and_restart();
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("loaded 2 stored requests")),
        "{}",
        d.logs().join("\n")
    );
    dev.server = d.coap;
    send_update(&mut dev, &reg);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (req, from) = dev
            .recv_request(WAIT)
            .expect("stored request after restart");
        seen.push(path_of(&req));
        dev.reply(
            &req,
            from,
            ResponseType::Content,
            path_of(&req).as_bytes(),
            None,
            None,
        );
    }
    assert_eq!(seen, vec!["/3/0/0", "/3/0/1"]);
    assert_eq!(d.async_response(&id1, WAIT)["payload"], b64(b"/3/0/0"));
    assert_eq!(d.async_response(&id2, WAIT)["payload"], b64(b"/3/0/1"));
}

#[test]
fn a_full_registration_cancels_queued_requests() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(&["ep=again", "lt=300", "b=UQ"], LINKS);
    let id = d.async_request("GET", "/v2/endpoints/again/3/0/0", None, None);
    dev.register(&["ep=again", "lt=300", "b=UQ"], LINKS);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["status"], 410);
    assert!(r["error"].as_str().unwrap().contains("registered again"));
}

/// aiocoap as the device: piggybacked and separate responses, Block2 reads and Block1
/// writes through a CoAP stack nobody here wrote.
#[test]
fn aiocoap_device_answers_reads_writes_and_block_transfers() {
    let d = Daemon::start();
    let dev = Lwm2mDevice::start(d.coap, "aio-dev", &["--slow-delay", "2.5"]);

    let id = d.async_request("GET", "/v2/endpoints/aio-dev/3/0/0", None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"connectord-test").as_str()))
    );

    let id = d.async_request(
        "PUT",
        "/v2/endpoints/aio-dev/1/0/1",
        Some("text/plain"),
        Some(b"120"),
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    dev.wait_event(WAIT, |e| {
        e["event"] == "request" && e["path"] == "/1/0/1" && e["payload"] == "120"
    });
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/aio-dev/1/0/1",
        Some("text/plain"),
        Some(b"abc"),
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 400);

    // Separate response: aiocoap sends an empty ACK, then the answer 2.5 s later.
    let id = d.async_request("GET", "/v2/endpoints/aio-dev/9/0/slow", None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"slow-ok").as_str()))
    );

    // Block2: 3000 bytes assembled.
    let id = d.async_request("GET", "/v2/endpoints/aio-dev/5/0/1", None, None);
    let r = d.async_response(&id, WAIT);
    assert_eq!(r["payload"], b64(&b"0123456789".repeat(300)));
    assert_eq!(r["ct"], "application/octet-stream");

    // Block1: a 5000-byte write arrives whole.
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/aio-dev/5/0/0",
        Some("application/octet-stream"),
        Some(&body),
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    let got = dev.wait_event(WAIT, |e| e["event"] == "request" && e["path"] == "/5/0/0");
    assert_eq!(got["payload_len"], 5000);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    assert_eq!(got["sha256"], sha);
}

/// A resource path whose Uri-Path options do not fit a CoAP request (more than
/// `requests::MAX_PATH_BYTES` = 224 bytes) is refused 400 before anything is stored or
/// sent, for a read, a write, a device-request and a subscription. It was accepted (202)
/// and then answered 502 "cannot encode the request: InvalidPacketLength", or, with a
/// segment of 256 to about 1 200 bytes, sent to the device as a Uri-Path option longer
/// than RFC 7252 §5.10 allows. The longest path that fits is still sent.
#[test]
fn a_path_too_long_for_a_coap_request_is_400_and_nothing_is_sent() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=long-path", "lt=300"], LINKS);
    // /3/0 is listed, so any path under it is the device's to answer.
    let too_long = format!("/3/0/{}", "x".repeat(300));
    for (method, body) in [("GET", None), ("PUT", Some(&b"1"[..]))] {
        let r = d.call(
            method,
            &format!("/v2/endpoints/long-path{too_long}"),
            body.map(|_| "text/plain"),
            body,
        );
        assert_eq!(r.status, 400, "{method}: {}", r.body);
        assert_eq!(r.json()["type"], "bad_request", "{}", r.body);
        assert!(r.body.contains("too long for a CoAP request"), "{}", r.body);
    }
    let r = d.send_json(
        "POST",
        "/v2/device-requests/long-path?async-id=too-long-1",
        serde_json::json!({"method": "GET", "uri": too_long}).to_string(),
    );
    assert_eq!(r.status, 400, "device-request: {}", r.body);
    let r = d.call(
        "PUT",
        &format!("/v2/subscriptions/long-path{too_long}"),
        None,
        None,
    );
    assert_eq!(r.status, 400, "subscription: {}", r.body);
    let r = d.get("/v2/subscriptions/long-path");
    assert!(
        !r.body.contains("xxx"),
        "nothing subscribed: {} {}",
        r.status,
        r.body
    );
    support::no_request(&dev, Duration::from_millis(500), "a refused path");

    // The longest that fits: /3/0 (2 + 2 bytes) and a segment of 218 bytes (220).
    let fits = format!("/3/0/{}", "y".repeat(218));
    let id = d.async_request("GET", &format!("/v2/endpoints/long-path{fits}"), None, None);
    let (req, from) = next_request(&dev, RequestType::Get, &fits);
    dev.reply(&req, from, ResponseType::Content, b"ok", Some(0), None);
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
}

/// Seed 000: "The resource is not deleted from mbed Device Connector until the delete is
/// handled by mbed Client." Once the device answers 2.02 Deleted, the resource (and what
/// is listed below it) leaves the endpoint's resource list, before the async response,
/// and the applications get a `reg-updates` event; a delete the device refuses changes
/// nothing. Before, the list kept the deleted resource until the device's next update.
#[test]
fn a_resource_the_device_deleted_leaves_the_resource_list() {
    let d = Daemon::start();
    let mut dev = d.device();
    dev.register(
        &["ep=del", "lt=300"],
        r#"</3/0>,</5/0>;rt="fw",</5/0/1>,</6/0>;obs"#,
    );
    let paths = |d: &Daemon| {
        let r = d.get("/v2/endpoints/del");
        assert_eq!(r.status, 200, "{}", r.body);
        support::strings_of(&r.json(), "uri")
    };
    assert_eq!(paths(&d), ["/3/0", "/5/0", "/5/0/1", "/6/0"]);
    d.collect_events(Duration::from_millis(300), |_| false);

    // Refused by the device: nothing changes.
    let rid = d.async_request("DELETE", "/v2/endpoints/del/6/0", None, None);
    let (req, from) = dev.recv_request(WAIT).expect("the DELETE");
    dev.reply(&req, from, ResponseType::MethodNotAllowed, b"", None, None);
    assert_eq!(d.async_response(&rid, WAIT)["status"], 405);
    assert_eq!(paths(&d), ["/3/0", "/5/0", "/5/0/1", "/6/0"]);

    // Deleted: /5/0 and /5/0/1 go, the others stay as they were.
    let rid = d.async_request("DELETE", "/v2/endpoints/del/5/0", None, None);
    let (req, from) = dev.recv_request(WAIT).expect("the DELETE");
    assert_eq!(
        req.header.code,
        coap_lite::MessageClass::Request(RequestType::Delete)
    );
    dev.reply(&req, from, ResponseType::Deleted, b"", None, None);
    let events = d.collect_events(WAIT, |e| e.async_response(&rid).is_some());
    assert_eq!(events.async_response(&rid).unwrap()["status"], 200);
    assert_eq!(paths(&d), ["/3/0", "/6/0"]);
    let updates = events.of("reg-updates");
    assert_eq!(updates.len(), 1, "{events:?}");
    let listed: Vec<&str> = updates[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["path"].as_str())
        .collect();
    assert_eq!(listed, ["/3/0", "/6/0"], "{updates:?}");
    // A request for what was deleted is 404 now.
    let r = d.call("GET", "/v2/endpoints/del/5/0/1", None, None);
    assert_eq!(r.status, 404, "{}", r.body);
}
