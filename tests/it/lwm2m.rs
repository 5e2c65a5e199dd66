//! End-to-end tests of what real LwM2M clients and the official REST SDKs need (issue 17):
//! observing LwM2M clients (whose links carry no `obs`), Accept and content formats,
//! `DELETE /endpoints/{ep}`, requests ended with 410 when their endpoint leaves, the
//! Location-Path of a create, subscriptions after de-registration, `ver=` and `ct=`.
//! The device is a scripted CoAP peer on a real UDP socket (`support::coap::Device`).

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use serde_json::json;
use support::coap::{Device, path_of, uint, uint_option};
use support::peers::Lwm2mDevice;
use support::{Daemon, b64};

const WAIT: Duration = Duration::from_secs(10);
/// What an LwM2M 1.1 client registers: no `obs` anywhere, objects and instances, `ver=`
/// on an object, its content formats on the root link.
const LW_LINKS: &str = r#"</>;rt="oma.lwm2m";ct="110 11542",</1/0>,</3>;ver=1.1,</3/0>,</3303/0>"#;

/// A request of the daemon's that the device received, and where from.
fn expect_request(dev: &Device, path: &str) -> (Packet, SocketAddr) {
    let (req, from) = dev
        .recv_request(WAIT)
        .unwrap_or_else(|| panic!("the daemon sent no request for {path}"));
    assert_eq!(path_of(&req), path);
    (req, from)
}

/// Answers `req` (piggybacked) with an Observe option when `observe` is given.
fn answer(
    dev: &Device,
    req: &Packet,
    to: SocketAddr,
    code: ResponseType,
    observe: Option<u32>,
    ct: Option<u16>,
    payload: &[u8],
) {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Acknowledgement);
    p.header.code = MessageClass::Response(code);
    p.header.message_id = req.header.message_id;
    p.set_token(req.get_token().to_vec());
    if let Some(seq) = observe {
        p.add_option(CoapOption::Observe, uint(seq));
    }
    if let Some(ct) = ct {
        p.add_option(CoapOption::ContentFormat, uint(u32::from(ct)));
    }
    p.payload = payload.to_vec();
    dev.sock.send_to(&p.to_bytes().unwrap(), to).unwrap();
}

/// A CON notification of an established observation.
fn notify(dev: &Device, token: &[u8], to: SocketAddr, mid: u16, seq: u32, value: &str) {
    let p = support::observe_content(MessageType::Confirmable, mid, token, seq, value.as_bytes());
    support::send_packet(dev, &p, to);
}

fn subscribe(d: &Daemon, ep: &str, path: &str) -> support::Http {
    d.call("PUT", &format!("/v2/subscriptions/{ep}{path}"), None, None)
}

/// Subscribes to `path` of `ep`, which the device `dev` is asked to observe (Observe 0)
/// and answers with `value` (Observe 1, text/plain); asserts the subscription's async
/// response is 200. Returns the observe request and where it came from.
fn observed(d: &Daemon, dev: &Device, ep: &str, path: &str, value: &[u8]) -> (Packet, SocketAddr) {
    let id = subscribed(d, ep, path);
    let (req, from) = expect_request(dev, path);
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    answer(
        dev,
        &req,
        from,
        ResponseType::Content,
        Some(1),
        Some(0),
        value,
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["status"], 200, "{a}");
    (req, from)
}

/// Subscribes to `path` of `ep`, asserting 202; returns the async-response id that brings
/// the first value.
fn subscribed(d: &Daemon, ep: &str, path: &str) -> String {
    d.async_request("PUT", &format!("/v2/subscriptions/{ep}{path}"), None, None)
}

/// `GET path` with the admin key and an `Accept` header when given.
fn get_accepting(d: &Daemon, path: &str, accept: Option<&str>) -> support::Http {
    let auth = format!("Bearer {}", d.key);
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(a) = accept {
        headers.push(("Accept", a));
    }
    support::http("GET", &d.url(path), &headers, None)
}

/// A read with `accept`, asserted accepted (202): its async-response id.
pub(crate) fn read_accepting(d: &Daemon, path: &str, accept: Option<&str>) -> String {
    let r = get_accepting(d, path, accept);
    assert_eq!(r.status, 202, "{path} {accept:?}: {}", r.body);
    r.json()["async-response-id"].as_str().unwrap().to_string()
}

/// The value tree an `Accept: application/json` read's async response carries.
pub(crate) fn json_tree(a: &serde_json::Value) -> serde_json::Value {
    assert_eq!(
        (a["status"].as_u64(), a["ct"].as_str()),
        (Some(200), Some("application/json")),
        "{a}"
    );
    serde_json::from_slice(&payload(a)).unwrap()
}

/// An LwM2M client lists no `obs`: its listed paths show as observable, a subscription to
/// an instance or to a resource below one is accepted and observed, and the
/// notifications flow. An mbed-style device (no `lwm2m=`) keeps the `obs` rule (412).
#[test]
fn lwm2m_clients_are_observable_without_obs() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=lw-1", "lt=300", "lwm2m=1.1", "et=sensor"], LW_LINKS);

    let res = d.get("/v2/endpoints/lw-1").json();
    let res = res.as_array().unwrap();
    assert_eq!(res.len(), 4, "{res:?}");
    assert!(res.iter().all(|r| r["obs"] == "true"), "{res:?}");
    assert_eq!(
        res.iter().find(|r| r["uri"] == "/3").unwrap()["ver"],
        "1.1",
        "ver= is kept"
    );
    let list = d.get("/v2/endpoints").json();
    assert_eq!(
        list,
        json!([{"name": "lw-1", "type": "sensor", "status": "ACTIVE", "q": false,
                "lwm2m": "1.1", "ct": "application/senml+json"}])
    );
    let lf = d.get_accept("/v2/endpoints/lw-1", "application/link-format");
    assert!(lf.body.contains(r#"</3>;obs;ver="1.1""#), "{}", lf.body);

    // A resource below a listed instance.
    let id = subscribed(&d, "lw-1", "/3303/0/5700");
    let (req, from) = expect_request(&dev, "/3303/0/5700");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    assert_eq!(
        uint_option(&req, CoapOption::Accept),
        Some(0),
        "a single resource of an LwM2M client is asked for as text/plain"
    );
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        Some(1),
        Some(0),
        b"21.5",
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), a["payload"].as_str()),
        (Some(200), Some(b64(b"21.5").as_str()))
    );
    notify(&dev, req.get_token(), from, 0x4000, 2, "22.0");
    let ev = d.collect_events(WAIT, |e| !e.of("notifications").is_empty());
    assert_eq!(ev.of("notifications")[0]["payload"], b64(b"22.0"));
    assert_eq!(ev.of("notifications")[0]["path"], "/3303/0/5700");

    // A listed instance.
    let r = subscribe(&d, "lw-1", "/3/0");
    assert_eq!(r.status, 202, "{}", r.body);
    let (req, _) = expect_request(&dev, "/3/0");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    assert_eq!(
        uint_option(&req, CoapOption::Accept),
        None,
        "an instance: the device's format"
    );

    // Below nothing listed: 404 as before.
    assert_eq!(subscribe(&d, "lw-1", "/4/0/1").status, 404);

    // mbed Client style: the seed's rule.
    let mut mbed = d.device();
    mbed.register(&["ep=mbed-1", "lt=300"], "</3/0>,</3303/0/5700>;obs");
    assert_eq!(subscribe(&d, "mbed-1", "/3/0").status, 412);
    let res = d.get("/v2/endpoints/mbed-1").json();
    assert_eq!(res[0]["obs"], "false");
    assert_eq!(res[1]["obs"], "true");
    let list = d.get("/v2/endpoints").json();
    let item = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "mbed-1")
        .unwrap();
    assert!(
        item.get("lwm2m").is_none() && item.get("ct").is_none(),
        "{item}"
    );
}

/// An LwM2M 1.0 client may leave out `lwm2m=` (optional in 1.0) and never marks `obs`:
/// a registration whose links mark nothing observable leaves it to the device, as an
/// LwM2M client's. Before, its resources showed `obs: "false"`, a subscription was
/// refused with 412 before the device was asked, and a pre-subscription skipped it
/// without a word.
#[test]
fn a_client_without_lwm2m_that_marks_nothing_obs_is_observed() {
    let d = Daemon::in_process();
    let r = d.send_json(
        "PUT",
        "/v2/subscriptions",
        br#"[{"endpoint-name": "lw10-pre", "resource-path": ["/3303/0/5700"]}]"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let links = "</3/0>,</3/0/0>,</3303/0/5700>";
    let mut dev = d.device();
    dev.register(&["ep=lw10", "lt=300"], links);
    let res = d.get("/v2/endpoints/lw10").json();
    assert!(
        res.as_array().unwrap().iter().all(|r| r["obs"] == "true"),
        "{res}"
    );

    let (req, from) = observed(&d, &dev, "lw10", "/3303/0/5700", b"7");
    notify(&dev, req.get_token(), from, 0x4100, 2, "8");
    let ev = d.collect_events(WAIT, |e| !e.of("notifications").is_empty());
    assert_eq!(ev.of("notifications")[0]["payload"], b64(b"8"));

    // The pre-subscription observes such a device at registration.
    let mut pre = d.device();
    pre.register(&["ep=lw10-pre", "lt=300"], links);
    let (req, _) = expect_request(&pre, "/3303/0/5700");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
}

/// A separate response answers a request only from where the request went (RFC 7252
/// §5.3.2): one with the request's token from another port is rejected with RST, and the
/// device's own answer is the async response. Before, the token alone routed it: the
/// forged payload was the answer.
#[test]
fn a_response_from_another_port_does_not_answer_a_request() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=src-1", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let id = read_accepting(&d, "/v2/endpoints/src-1/3/0/1", None);
    let (req, from) = expect_request(&dev, "/3/0/1");
    let other = d.device();
    let mut forged = Packet::new();
    forged.header.set_type(MessageType::Confirmable);
    forged.header.code = MessageClass::Response(ResponseType::Content);
    forged.header.message_id = 0x7000;
    forged.set_token(req.get_token().to_vec());
    forged.payload = b"FORGED".to_vec();
    other
        .sock
        .send_to(&forged.to_bytes().unwrap(), from)
        .unwrap();
    let rst = Packet::from_bytes(&other.recv_raw(WAIT).expect("no answer to the forgery")).unwrap();
    assert_eq!(
        (rst.header.get_type(), rst.header.message_id),
        (MessageType::Reset, 0x7000)
    );
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(0),
        b"real",
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), a["payload"].as_str()),
        (Some(200), Some(b64(b"real").as_str()))
    );
}

/// A device that updates its registration from a new port (a NAT's new mapping) is
/// observed again there: its notifications from the new port are not those of the
/// observation made at the old one, which the message layer would reject.
#[test]
fn a_device_that_updates_from_a_new_port_is_observed_there() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    let loc = dev.register(&["ep=nat-1", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let (req, from) = observed(&d, &dev, "nat-1", "/3303/0/5700", b"1");
    let old_token = req.get_token().to_vec();

    // Before its update, a notification from the new port is taken (plain UDP: the
    // token is the guard, and an RST would end the device's observation).
    let mut moved = d.device();
    notify(&moved, &old_token, from, 0x4201, 2, "1b");
    d.collect_events(WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == b64(b"1b"))
    });

    assert_eq!(moved.update(&loc, &[], None), ResponseType::Changed);
    let (req, from) = expect_request(&moved, "/3303/0/5700");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    answer(
        &moved,
        &req,
        from,
        ResponseType::Content,
        Some(3),
        Some(0),
        b"2",
    );
    notify(&moved, req.get_token(), from, 0x4200, 4, "3");
    let ev = d.collect_events(WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["payload"] == b64(b"3"))
    });
    let values: Vec<_> = ev
        .of("notifications")
        .iter()
        .map(|n| n["payload"].clone())
        .collect();
    assert!(
        values.ends_with(&[json!(b64(b"2")), json!(b64(b"3"))]),
        "{values:?}"
    );
    // The observation made at the old port is gone: its token gets RST now.
    notify(&moved, &old_token, from, 0x4202, 9, "old");
    let rst = loop {
        let p = Packet::from_bytes(&moved.recv_raw(WAIT).expect("an answer")).unwrap();
        if p.header.message_id == 0x4202 {
            break p;
        }
    };
    assert_eq!(rst.header.get_type(), MessageType::Reset);
}

/// A Block2 option value (RFC 7959 §2.2) for blocks of 64 bytes.
fn block64(num: u32, more: bool) -> Vec<u8> {
    uint((num << 4) | (u32::from(more) << 3) | 2)
}

/// Answers `req` with one 64-byte block of `body` (piggybacked), with an Observe number
/// when given and the ETag `b"e1"`.
fn answer_block(
    dev: &Device,
    req: &Packet,
    to: SocketAddr,
    observe: Option<u32>,
    num: u32,
    body: &[u8],
) {
    let start = num as usize * 64;
    let end = (start + 64).min(body.len());
    let mut p = Packet::new();
    p.header.set_type(MessageType::Acknowledgement);
    p.header.code = MessageClass::Response(ResponseType::Content);
    p.header.message_id = req.header.message_id;
    p.set_token(req.get_token().to_vec());
    if let Some(seq) = observe {
        p.add_option(CoapOption::Observe, uint(seq));
    }
    p.add_option(CoapOption::ETag, b"e1".to_vec());
    p.add_option(CoapOption::ContentFormat, uint(0));
    p.add_option(CoapOption::Block2, block64(num, end < body.len()));
    p.payload = body[start..end].to_vec();
    dev.sock.send_to(&p.to_bytes().unwrap(), to).unwrap();
}

/// The daemon's GET of block `num` of `path`, without Observe (RFC 7959 §2.6).
fn expect_block_request(dev: &Device, path: &str, num: u32) -> (Packet, SocketAddr) {
    let (req, from) = expect_request(dev, path);
    assert_eq!(uint_option(&req, CoapOption::Observe), None, "{req:?}");
    assert_eq!(
        uint_option(&req, CoapOption::Block2),
        Some((num << 4) | 2),
        "block {num} at the device's size"
    );
    (req, from)
}

/// An observed resource larger than one block: the observe's first answer and a
/// notification come as their first block (Block2, more to follow), and the daemon fetches
/// the rest with GETs without Observe (RFC 7959 §2.6). Before, the first 64 bytes were
/// delivered as the whole value, as a 200.
#[test]
fn a_block_wise_observe_answer_and_notification_are_fetched_whole() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=blk-obs", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let first: Vec<u8> = (0..138u8).map(|i| b'a' + i % 26).collect();
    let id = subscribed(&d, "blk-obs", "/3/0/1");
    let (req, from) = expect_request(&dev, "/3/0/1");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    let token = req.get_token().to_vec();
    answer_block(&dev, &req, from, Some(1), 0, &first);
    for num in 1..=2 {
        let (req, from) = expect_block_request(&dev, "/3/0/1", num);
        answer_block(&dev, &req, from, None, num, &first);
    }
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), payload(&a)),
        (Some(200), first.clone()),
        "{a}"
    );

    // A CON notification in blocks: its rest is fetched, then it is acknowledged.
    let next: Vec<u8> = (0..84u8).map(|i| b'A' + i % 26).collect();
    let mut p = support::observe_content(MessageType::Confirmable, 0x4300, &token, 2, &next[..64]);
    p.add_option(CoapOption::ETag, b"e1".to_vec());
    p.add_option(CoapOption::Block2, block64(0, true));
    support::send_packet(&dev, &p, from);
    let (req, from) = expect_block_request(&dev, "/3/0/1", 1);
    answer_block(&dev, &req, from, None, 1, &next);
    let ev = d.collect_events(WAIT, |e| !e.of("notifications").is_empty());
    let got: Vec<Vec<u8>> = ev.of("notifications").iter().map(payload).collect();
    assert_eq!(got, [next]);
    let ack = dev.recv_raw(WAIT).map(|b| Packet::from_bytes(&b).unwrap());
    assert!(
        ack.as_ref()
            .is_some_and(|a| a.header.get_type() == MessageType::Acknowledgement
                && a.header.message_id == 0x4300),
        "the notification is acknowledged: {ack:?}"
    );

    // An observe answered separately (an empty ACK, then a CON 2.05 in blocks): its rest
    // is fetched once, and the observation is made.
    let id = subscribed(&d, "blk-obs", "/3/0/2");
    let (req, from) = expect_request(&dev, "/3/0/2");
    let mut empty = Packet::new();
    empty.header.set_type(MessageType::Acknowledgement);
    empty.header.message_id = req.header.message_id;
    support::send_packet(&dev, &empty, from);
    let mut p = support::observe_content(
        MessageType::Confirmable,
        0x4400,
        req.get_token(),
        1,
        &first[..64],
    );
    p.add_option(CoapOption::ETag, b"e1".to_vec());
    p.add_option(CoapOption::Block2, block64(0, true));
    support::send_packet(&dev, &p, from);
    for num in 1..=2 {
        let (req, from) = expect_block_request(&dev, "/3/0/2", num);
        answer_block(&dev, &req, from, None, num, &first);
    }
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), payload(&a)),
        (Some(200), first),
        "{a}"
    );
}

/// A device that answers 4.08 to block 1 of an observe's answer has the transfer begun
/// again with a plain GET; when the value now fits one message (no Block2), that message
/// is the value, with its own Content-Format (not the first block's).
#[test]
fn a_block_transfer_begun_again_takes_the_new_answers_value_and_format() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=blk-again", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let first: Vec<u8> = vec![b'a'; 100];
    let id = subscribed(&d, "blk-again", "/3/0/3");
    let (req, from) = expect_request(&dev, "/3/0/3");
    answer_block(&dev, &req, from, Some(1), 0, &first);
    let (req, from) = expect_block_request(&dev, "/3/0/3", 1);
    answer(
        &dev,
        &req,
        from,
        ResponseType::RequestEntityIncomplete,
        None,
        None,
        b"",
    );
    // Begun again: a plain GET of block 0, without Observe.
    let (req, from) = expect_block_request(&dev, "/3/0/3", 0);
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(42),
        b"short now",
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), payload(&a), a["ct"].as_str()),
        (
            Some(200),
            b"short now".to_vec(),
            Some("application/octet-stream")
        ),
        "{a}"
    );
}

/// aiocoap (a stack nobody here wrote) as the device: a 3000-byte observed resource whose
/// observe answer and notifications are its first block of 1024 bytes. aiocoap answers
/// 4.08 to a GET of block 1 of a transfer it did not begin, so the daemon begins it again
/// at block 0 of a plain GET. Every value reaches the application whole.
#[test]
fn aiocoap_block_wise_notifications_arrive_whole() {
    let d = Daemon::in_process();
    let mut dev = Lwm2mDevice::start(d.coap, "aio-big", &["--notify-interval", "3600"]);
    let id = subscribed(&d, "aio-big", "/5/0/2");
    let a = d.async_response(&id, WAIT);
    let want = |round: u32| [format!("{round:04}-").into_bytes(), vec![b'x'; 2995]].concat();
    assert_eq!(
        (a["status"].as_u64(), payload(&a)),
        (Some(200), want(0)),
        "{a}"
    );
    for round in 1..=3 {
        dev.command("notify-big");
        let ev = d.collect_events(WAIT, |e| {
            e.of("notifications")
                .iter()
                .any(|n| payload(n) == want(round))
        });
        for n in ev.of("notifications") {
            assert_eq!(payload(&n).len(), 3000, "a value cut short: {n}");
        }
    }
}

/// A device that answers an observe without Observe, or with an error, ends the
/// subscription visibly: the async response says so, the key's channel gets a
/// `subscription-errors` entry, and `GET /subscriptions/{ep}` no longer lists it.
#[test]
fn a_refused_observe_ends_the_subscription_visibly() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=lw-2", "lt=300", "lwm2m=1.0"], LW_LINKS);

    // Without Observe.
    let id = subscribed(&d, "lw-2", "/3/0/1");
    assert_eq!(
        d.get("/v2/subscriptions/lw-2/3/0/1").status,
        200,
        "subscribed while pending"
    );
    let (req, from) = expect_request(&dev, "/3/0/1");
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(0),
        b"model",
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["status"], 412, "{a}");
    let ev = d.collect_events(WAIT, |e| !e.of("subscription-errors").is_empty());
    assert_eq!(
        ev.of("subscription-errors")[0],
        json!({"ep": "lw-2", "path": "/3/0/1", "status": 412,
               "error": "the device does not let this resource be observed (it answered without Observe)"})
    );
    assert_eq!(d.get("/v2/subscriptions/lw-2/3/0/1").status, 404);
    assert_eq!(d.get("/v2/subscriptions/lw-2").status, 404);

    // With an error code.
    d.clear_inbox();
    let r = subscribe(&d, "lw-2", "/3/0/4");
    assert_eq!(r.status, 202);
    let (req, from) = expect_request(&dev, "/3/0/4");
    answer(
        &dev,
        &req,
        from,
        ResponseType::MethodNotAllowed,
        None,
        None,
        b"",
    );
    let ev = d.collect_events(WAIT, |e| !e.of("subscription-errors").is_empty());
    assert_eq!(ev.of("subscription-errors")[0]["status"], 405);
    assert_eq!(d.get("/v2/subscriptions/lw-2/3/0/4").status, 404);

    // An established observation the device ends later.
    d.clear_inbox();
    let r = subscribe(&d, "lw-2", "/3303/0/5700");
    assert_eq!(r.status, 202);
    let (req, from) = expect_request(&dev, "/3303/0/5700");
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        Some(7),
        Some(0),
        b"20",
    );
    let mut end = Packet::new();
    end.header.set_type(MessageType::NonConfirmable);
    end.header.code = MessageClass::Response(ResponseType::NotFound);
    end.header.message_id = 0x5001;
    end.set_token(req.get_token().to_vec());
    dev.sock.send_to(&end.to_bytes().unwrap(), from).unwrap();
    let ev = d.collect_events(WAIT, |e| !e.of("subscription-errors").is_empty());
    assert_eq!(ev.of("subscription-errors")[0]["path"], "/3303/0/5700");
    assert_eq!(ev.of("subscription-errors")[0]["status"], 404);
    assert_eq!(d.get("/v2/subscriptions/lw-2/3303/0/5700").status, 404);
}

/// Pre-subscriptions start observations on an LwM2M client at registration, for paths
/// it lists (no `obs` needed) and for concrete paths below them; a refused one is
/// reported once and not asked for again at the next update.
#[test]
fn pre_subscriptions_observe_lwm2m_clients_at_registration() {
    let d = Daemon::in_process();
    let r = d.send_json(
        "PUT",
        "/v2/subscriptions",
        br#"[{"endpoint-name": "lw-*", "resource-path": ["/3303/0/5700", "/1/*"]}]"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let mut dev = d.device();
    let reg = dev.register(&["ep=lw-3", "lt=300", "lwm2m=1.1"], LW_LINKS);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (req, from) = dev.recv_request(WAIT).expect("an observe request");
        assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
        let path = path_of(&req);
        if path == "/1/0" {
            // Refused: no Observe in the answer.
            answer(
                &dev,
                &req,
                from,
                ResponseType::Content,
                None,
                Some(11542),
                b"",
            );
        } else {
            answer(
                &dev,
                &req,
                from,
                ResponseType::Content,
                Some(1),
                Some(0),
                b"19.5",
            );
        }
        seen.push(path);
    }
    seen.sort();
    assert_eq!(seen, ["/1/0", "/3303/0/5700"]);
    let ev = d.collect_events(WAIT, |e| {
        !e.of("subscription-errors").is_empty() && !e.of("notifications").is_empty()
    });
    assert_eq!(ev.of("subscription-errors")[0]["path"], "/1/0");
    assert_eq!(ev.of("notifications")[0]["payload"], b64(b"19.5"));
    let subs = d.get("/v2/subscriptions/lw-3");
    assert_eq!(subs.status, 200);
    assert_eq!(subs.body.trim(), "/subscriptions/lw-3/3303/0/5700");

    // An update: the refused path is not asked for again, the observed one is kept.
    let code = dev.update(&reg, &[], None);
    assert_eq!(code, ResponseType::Changed);
    support::no_request(
        &dev,
        Duration::from_millis(1500),
        "nothing is observed again at an update",
    );
}

/// The REST Accept header becomes the CoAP Accept option; with none, a single resource
/// of an LwM2M client is asked for as text/plain and, if the device refuses that, asked
/// again without Accept; a device without `lwm2m=` gets no Accept.
#[test]
fn accept_reaches_the_device_and_text_is_the_default_for_one_resource() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=lw-4", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let read = |path: &str, accept: Option<&str>| read_accepting(&d, path, accept);

    let id = read(
        "/v2/endpoints/lw-4/3/0",
        Some("application/vnd.oma.lwm2m+tlv"),
    );
    let (req, from) = expect_request(&dev, "/3/0");
    assert_eq!(uint_option(&req, CoapOption::Accept), Some(11542));
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(11542),
        &[0xc1, 0x00, 0x41],
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["ct"], "application/vnd.oma.lwm2m+tlv");

    // No Accept: text/plain; the device refuses it, the daemon asks again without.
    let id = read("/v2/endpoints/lw-4/3/0/0", None);
    let (req, from) = expect_request(&dev, "/3/0/0");
    assert_eq!(uint_option(&req, CoapOption::Accept), Some(0));
    answer(
        &dev,
        &req,
        from,
        ResponseType::NotAcceptable,
        None,
        None,
        b"",
    );
    let (req, from) = expect_request(&dev, "/3/0/0");
    assert_eq!(
        uint_option(&req, CoapOption::Accept),
        None,
        "asked again without Accept"
    );
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(11542),
        &[0xc3, 0x00, b'A', b'B', b'C'],
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), a["ct"].as_str()),
        (Some(200), Some("application/vnd.oma.lwm2m+tlv"))
    );

    // The application's own text/plain is not retried: the device's 4.06 is the answer.
    let id = read("/v2/endpoints/lw-4/3/0/0", Some("text/plain"));
    let (req, from) = expect_request(&dev, "/3/0/0");
    assert_eq!(uint_option(&req, CoapOption::Accept), Some(0));
    answer(
        &dev,
        &req,
        from,
        ResponseType::NotAcceptable,
        None,
        None,
        b"",
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 406);

    // Not a media type a device can answer in.
    let r = get_accepting(&d, "/v2/endpoints/lw-4/3/0/0", Some("text/html"));
    assert_eq!(r.status, 406, "{}", r.body);

    // mbed Client style: no Accept unless asked.
    let mut mbed = d.device();
    mbed.register(&["ep=mbed-4", "lt=300"], "</3/0>");
    let id = read("/v2/endpoints/mbed-4/3/0/0", None);
    let (req, from) = expect_request(&mbed, "/3/0/0");
    assert_eq!(uint_option(&req, CoapOption::Accept), None);
    answer(
        &mbed,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(0),
        b"x",
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
}

/// `DELETE /v2/endpoints/{ep}`: 200, a `de-registrations` event, the device's next update
/// is 4.04 (so it registers again), a second delete is 404; a request in flight ends at
/// once with 410, and the endpoint's subscriptions are gone.
#[test]
fn deleting_an_endpoint_deregisters_it_and_ends_its_requests() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    let reg = dev.register(&["ep=gone-1", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let r = subscribe(&d, "gone-1", "/3303/0/5700");
    assert_eq!(r.status, 202);
    let (req, from) = expect_request(&dev, "/3303/0/5700");
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        Some(1),
        Some(0),
        b"1",
    );
    assert_eq!(d.get("/v2/subscriptions/gone-1").status, 200);

    // A read the device never answers: in flight, retransmitted.
    let id = d.async_request("GET", "/v2/endpoints/gone-1/3/0/0", None, None);
    expect_request(&dev, "/3/0/0");
    d.clear_inbox();
    let t = Instant::now();
    let r = d.call("DELETE", "/v2/endpoints/gone-1", None, None);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, ""),
        "200, for the official Python SDK"
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["status"], 410, "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("de-registered"),
        "{a}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "ended at once, not after retransmissions"
    );
    let ev = d.collect_events(WAIT, |e| !e.of("de-registrations").is_empty());
    assert_eq!(ev.of("de-registrations"), [json!("gone-1")]);
    assert_eq!(d.get("/v2/endpoints/gone-1").status, 404);
    assert_eq!(
        d.get("/v2/subscriptions/gone-1").status,
        404,
        "subscriptions left with it"
    );
    assert_eq!(dev.update(&reg, &[], None), ResponseType::NotFound);
    assert_eq!(
        d.call("DELETE", "/v2/endpoints/gone-1", None, None).status,
        404
    );
    // GET on the same route still works for other endpoints; PUT is not a method there.
    assert_eq!(
        d.call("PUT", "/v2/endpoints/gone-1", None, None).status,
        405
    );
}

/// A request in flight when the device de-registers ends at once with 410 (it used to
/// keep retransmitting and end with 504 after about 70 s).
#[test]
fn a_request_in_flight_ends_with_410_when_the_device_deregisters() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    let reg = dev.register(&["ep=leaving", "lt=300"], "</3/0>");
    let id = d.async_request("GET", "/v2/endpoints/leaving/3/0/0", None, None);
    expect_request(&dev, "/3/0/0");
    let t = Instant::now();
    assert_eq!(dev.deregister(&reg), ResponseType::Deleted);
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["status"], 410, "{a}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// A create's Location-Path reaches the application as `location`.
#[test]
fn a_created_instance_reports_its_location() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=maker", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let id = d.async_request(
        "POST",
        "/v2/endpoints/maker/3303",
        Some("application/vnd.oma.lwm2m+tlv"),
        Some(&[0xc1, 0x00, 0x01]),
    );
    let (req, from) = expect_request(&dev, "/3303");
    assert_eq!(req.header.code, MessageClass::Request(RequestType::Post));
    let mut p = Packet::new();
    p.header.set_type(MessageType::Acknowledgement);
    p.header.code = MessageClass::Response(ResponseType::Created);
    p.header.message_id = req.header.message_id;
    p.set_token(req.get_token().to_vec());
    p.add_option(CoapOption::LocationPath, b"3303".to_vec());
    p.add_option(CoapOption::LocationPath, b"1".to_vec());
    dev.sock.send_to(&p.to_bytes().unwrap(), from).unwrap();
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), a["location"].as_str()),
        (Some(201), Some("/3303/1"))
    );

    // No Location-Path, no field.
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/maker/1/0/1",
        Some("text/plain"),
        Some(b"60"),
    );
    let (req, from) = expect_request(&dev, "/1/0/1");
    answer(&dev, &req, from, ResponseType::Changed, None, None, b"");
    assert!(d.async_response(&id, WAIT).get("location").is_none());
}

// --- CoAP stacks nobody here wrote -------------------------------------------------------

/// The aiocoap peer as an LwM2M 1.1 client (links without `obs`, TLV unless asked),
/// notifying by stdin command only (its timer is an hour).
fn aiocoap_lwm2m_client(d: &Daemon, ep: &str) -> Lwm2mDevice {
    Lwm2mDevice::start(d.coap, ep, &["--lwm2m", "1.1", "--notify-interval", "3600"])
}

/// The peer's TLV (OMA-TS-LightweightM2M-V1_0 §6.4.3, "resource with value" entries) of
/// /3303/0 at `celsius`: 5700 as a 4-byte float (16-bit identifier, 3-bit length), 5701
/// "Cel".
fn temperature_tlv(celsius: f32) -> Vec<u8> {
    let mut v = vec![0b1110_0100, 0x16, 0x44];
    v.extend(celsius.to_be_bytes());
    v.extend([0b1110_0011, 0x16, 0x45, b'C', b'e', b'l']);
    v
}

/// The payload of an async response or notification.
fn payload(e: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(e["payload"].as_str().unwrap_or(""))
        .unwrap()
}

/// The peer's report of the daemon's `nth` request (from 1) for `path`, waited for: the
/// peer prints it before it answers, but it is read from its stdout by another thread.
fn peer_request(dev: &Lwm2mDevice, path: &str, nth: usize) -> serde_json::Value {
    let of_path = || -> Vec<serde_json::Value> {
        dev.events()
            .into_iter()
            .filter(|e| e["event"] == "request" && e["path"] == path)
            .collect()
    };
    assert!(
        support::eventually(WAIT, || of_path().len() >= nth),
        "no request {nth} for {path}: {:?}",
        dev.events()
    );
    of_path().swap_remove(nth - 1)
}

/// aiocoap as an LwM2M client: every resource it lists is observable although no link
/// says `obs`; a resource below a listed instance is observed (asked for as text/plain)
/// and aiocoap's notifications reach the long-poll; the resource that aiocoap answers
/// without Observe ends its subscription visibly (412, `subscription-errors`, 404).
/// Before issue 17's fix the listing said `obs: "false"` and no Accept was sent (aiocoap
/// answered TLV).
#[test]
fn aiocoap_lwm2m_client_is_observed_and_its_refusal_is_reported() {
    let d = Daemon::in_process();
    let ep = "aio-lw-obs";
    let mut dev = aiocoap_lwm2m_client(&d, ep);

    let res = d.get(&format!("/v2/endpoints/{ep}")).json();
    let mut uris: Vec<&str> = res
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uri"].as_str().unwrap())
        .collect();
    uris.sort();
    assert_eq!(uris, ["/1/0", "/3/0", "/3303/0"], "{res}");
    assert!(
        res.as_array().unwrap().iter().all(|r| r["obs"] == "true"),
        "{res}"
    );
    let list = d.get("/v2/endpoints").json();
    assert_eq!(list[0]["lwm2m"], "1.1", "{list}");
    assert_eq!(list[0]["ct"], "application/vnd.oma.lwm2m+tlv", "{list}");

    let id = subscribed(&d, ep, "/3303/0/5700");
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), payload(&a), a["ct"].as_str()),
        (Some(200), b"21.5".to_vec(), Some("text/plain")),
        "{a}"
    );
    let req = peer_request(&dev, "/3303/0/5700", 1);
    assert_eq!(
        (&req["observe"], &req["accept"]),
        (&json!(0), &json!(0)),
        "{req}"
    );
    dev.wait_event(WAIT, |e| {
        e["event"] == "observers" && e["path"] == "/3303/0/5700" && e["count"] == 1
    });

    // One at a time: aiocoap sends only the latest of changes it has not sent yet.
    dev.command("notify");
    d.collect_events(WAIT, |e| !e.of("notifications").is_empty());
    dev.command("notify");
    let ev = d.collect_events(WAIT, |e| e.of("notifications").len() >= 2);
    let got: Vec<(Vec<u8>, serde_json::Value)> = ev
        .of("notifications")
        .iter()
        .map(|n| (payload(n), json!([n["ep"], n["path"], n["ct"]])))
        .collect();
    let meta = json!([ep, "/3303/0/5700", "text/plain"]);
    assert_eq!(
        got,
        [(b"22.0".to_vec(), meta.clone()), (b"22.5".to_vec(), meta)]
    );

    // /3/0/13 is a plain aiocoap Resource: it answers the observe without Observe.
    d.clear_inbox();
    let id = subscribed(&d, ep, "/3/0/13");
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["status"], 412, "{a}");
    assert_eq!(peer_request(&dev, "/3/0/13", 1)["observe"], 0);
    let ev = d.collect_events(WAIT, |e| !e.of("subscription-errors").is_empty());
    let errors = ev.of("subscription-errors");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (&errors[0]["ep"], &errors[0]["path"], &errors[0]["status"]),
        (&json!(ep), &json!("/3/0/13"), &json!(412)),
        "{errors:?}"
    );
    assert!(
        errors[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("without Observe")),
        "{errors:?}"
    );
    assert_eq!(d.get(&format!("/v2/subscriptions/{ep}/3/0/13")).status, 404);
    let subs = d.get(&format!("/v2/subscriptions/{ep}"));
    assert_eq!(
        subs.body.trim(),
        format!("/subscriptions/{ep}/3303/0/5700"),
        "the refusal ended only its own subscription"
    );
}

/// Pre-subscriptions made before aiocoap starts observe it at registration: a resource
/// below a listed instance (asked for as text/plain) and a listed instance (in the
/// device's own format, TLV); a change is notified on both, each in its format. Before
/// issue 17's fix nothing was observed (no `obs` on the links).
#[test]
fn pre_subscriptions_observe_an_aiocoap_lwm2m_client_at_registration() {
    let d = Daemon::in_process();
    let r = d.send_json(
        "PUT",
        "/v2/subscriptions",
        br#"[{"endpoint-name": "aio-pre*", "resource-path": ["/3303/0/5700", "/3303/0"]}]"#,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let mut dev = aiocoap_lwm2m_client(&d, "aio-pre-1");
    for path in ["/3303/0/5700", "/3303/0"] {
        dev.wait_event(WAIT, |e| {
            e["event"] == "observers" && e["path"] == path && e["count"] == 1
        });
    }
    assert_eq!(peer_request(&dev, "/3303/0/5700", 1)["accept"], 0);
    assert!(
        peer_request(&dev, "/3303/0", 1).get("accept").is_none(),
        "an instance is asked for in the device's format"
    );

    // A pre-subscription has no async response: the first values are notifications.
    d.collect_events(WAIT, |e| e.of("notifications").len() >= 2);
    dev.command("notify");
    let ev = d.collect_events(WAIT, |e| e.of("notifications").len() >= 4);
    let of = |path: &str| -> Vec<(Vec<u8>, serde_json::Value)> {
        ev.of("notifications")
            .iter()
            .filter(|n| n["path"] == path)
            .map(|n| (payload(n), n["ct"].clone()))
            .collect()
    };
    let tlv = json!("application/vnd.oma.lwm2m+tlv");
    assert_eq!(
        of("/3303/0"),
        [
            (temperature_tlv(21.5), tlv.clone()),
            (temperature_tlv(22.0), tlv)
        ]
    );
    let text = json!("text/plain");
    assert_eq!(
        of("/3303/0/5700"),
        [(b"21.5".to_vec(), text.clone()), (b"22.0".to_vec(), text)]
    );
}

/// Reads of aiocoap as an LwM2M client: one resource without Accept comes as text/plain
/// (the daemon sends Accept 0; aiocoap would answer TLV without it); the application's
/// Accept reaches aiocoap (TLV bytes, SenML JSON), and one aiocoap cannot do is its 4.06.
/// Then `DELETE /v2/endpoints/{ep}`: 200, the observation aiocoap still holds is reset at
/// its next notification, and aiocoap's next update is 4.04. Before issue 17's fix no
/// Accept was sent (TLV came back, text/plain was 200) and DELETE was 405.
#[test]
fn aiocoap_lwm2m_client_reads_honour_accept_and_delete_deregisters_it() {
    let d = Daemon::in_process();
    let ep = "aio-lw-read";
    let mut dev = aiocoap_lwm2m_client(&d, ep);
    let read = |path: &str, accept: Option<&str>| -> serde_json::Value {
        let id = read_accepting(&d, &format!("/v2/endpoints/{ep}{path}"), accept);
        d.async_response(&id, WAIT)
    };

    let a = read("/3/0/0", None);
    assert_eq!(
        (a["status"].as_u64(), payload(&a), a["ct"].as_str()),
        (Some(200), b"connectord-test".to_vec(), Some("text/plain")),
        "{a}"
    );
    assert_eq!(peer_request(&dev, "/3/0/0", 1)["accept"], 0);

    let a = read("/3/0", Some("application/vnd.oma.lwm2m+tlv"));
    let mut tlv = vec![0b1100_1000, 0, 15];
    tlv.extend(b"connectord-test");
    tlv.extend([0b1100_0101, 1]);
    tlv.extend(b"sim-1");
    tlv.extend([0b1100_0100, 13]);
    tlv.extend(1_700_000_000_i32.to_be_bytes());
    assert_eq!(
        (a["status"].as_u64(), payload(&a), a["ct"].as_str()),
        (Some(200), tlv, Some("application/vnd.oma.lwm2m+tlv")),
        "{a}"
    );
    assert_eq!(peer_request(&dev, "/3/0", 1)["accept"], 11542);

    let a = read("/3303/0", Some("application/senml+json"));
    assert_eq!(a["ct"], "application/senml+json", "{a}");
    let senml: serde_json::Value = serde_json::from_slice(&payload(&a)).unwrap();
    assert_eq!(
        senml,
        json!([{"bn": "/3303/0/", "n": "5700", "v": 21.5}, {"n": "5701", "vs": "Cel"}])
    );

    // An instance as text/plain: aiocoap's 4.06 is the answer (the application chose it).
    let a = read("/3/0", Some("text/plain"));
    assert_eq!(a["status"], 406, "{a}");
    assert_eq!(peer_request(&dev, "/3/0", 2)["accept"], 0);

    let r = subscribe(&d, ep, "/3303/0/5700");
    assert_eq!(r.status, 202, "{}", r.body);
    dev.wait_event(WAIT, |e| e["event"] == "observers" && e["count"] == 1);

    let r = d.call("DELETE", &format!("/v2/endpoints/{ep}"), None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(d.get(&format!("/v2/endpoints/{ep}")).status, 404);
    dev.command("notify");
    dev.wait_event(WAIT, |e| e["event"] == "observers" && e["count"] == 0);
    dev.command("update");
    let up = dev.wait_event(WAIT, |e| e["event"] == "updated");
    assert_eq!(up["code"], "4.04", "{up}");
}

/// What libcoap registers in these tests: an LwM2M client's links, no `obs`.
const LIBCOAP_LINKS: &str = r#"</>;rt="oma.lwm2m",</3/0>,</3303/0>"#;

/// libcoap's client registers as an LwM2M 1.1 client with links that carry no `obs`: the
/// listing says every resource is observable and subscriptions to a listed instance and
/// to a resource below one are accepted (before issue 17's fix: `obs: "false"`, and 412
/// for the instance). libcoap's client serves nothing afterwards, so the observations
/// themselves are not followed here (see the next test).
#[test]
fn libcoap_lwm2m_registration_without_obs_is_observable() {
    let d = Daemon::in_process();
    let ack = support::peers::libcoap_ack(&[
        "-m",
        "post",
        "-t",
        "40",
        "-e",
        LIBCOAP_LINKS,
        &format!("coap://{}/rd?ep=libcoap-lw&lwm2m=1.1&lt=60", d.coap),
    ]);
    assert!(ack.contains("c:2.01"), "{ack}");
    let res = d.get("/v2/endpoints/libcoap-lw").json();
    assert_eq!(res.as_array().unwrap().len(), 2, "{res}");
    assert!(
        res.as_array().unwrap().iter().all(|r| r["obs"] == "true"),
        "{res}"
    );
    for path in ["/3303/0", "/3303/0/5700"] {
        let r = subscribe(&d, "libcoap-lw", path);
        assert_eq!(r.status, 202, "{path}: {}", r.body);
    }
}

/// A child process killed when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free for UDP and TCP (libcoap's server listens on both).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// libcoap as a serving LwM2M device: `coap-client-notls` registers from a chosen port,
/// then libcoap's `coap-server-notls` serves on that port (the registration's address,
/// where the daemon sends its requests), with resources created by PUT (`-d`), which
/// libcoap makes observable and notifies on change. The daemon observes a listed instance
/// and a resource below one although no link says `obs` (before issue 17's fix the
/// instance was 412), libcoap's notification reaches the long-poll, and libcoap's 4.04 to
/// an observe ends that subscription visibly.
#[test]
fn libcoap_server_as_an_lwm2m_device_is_observed() {
    let d = Daemon::in_process();
    let port = free_port();
    let port_arg = port.to_string();
    let ack = support::peers::libcoap_ack(&[
        "-a",
        "127.0.0.1",
        "-p",
        &port_arg,
        "-m",
        "post",
        "-t",
        "40",
        "-e",
        LIBCOAP_LINKS,
        &format!("coap://{}/rd?ep=libcoap-srv&lwm2m=1.1&lt=60", d.coap),
    ]);
    assert!(ack.contains("c:2.01"), "{ack}");
    let server = std::process::Command::new(
        support::peers::libcoap_client().with_file_name("coap-server-notls"),
    )
    .args(["-A", "127.0.0.1", "-p", &port_arg, "-d", "10"])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("start coap-server-notls");
    let _server = Reaped(server);
    let resource = format!("coap://127.0.0.1:{port}/3303/0/5700");
    // Listening (a probing bind could take the port from it while it starts).
    let bound = format!("0100007F:{port:04X} ");
    assert!(
        support::eventually(WAIT, || std::fs::read_to_string("/proc/net/udp")
            .is_ok_and(|t| t.contains(&bound))),
        "coap-server-notls does not listen on {port}"
    );
    let ack = support::peers::libcoap_ack(&["-m", "put", "-t", "0", "-e", "21.5", &resource]);
    assert!(ack.contains("c:2.01"), "{ack}");
    let instance = format!("coap://127.0.0.1:{port}/3303/0");
    let ack = support::peers::libcoap_ack(&["-m", "put", "-t", "0", "-e", "5700=21.5", &instance]);
    assert!(ack.contains("c:2.01"), "{ack}");
    let id = subscribed(&d, "libcoap-srv", "/3303/0");
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), payload(&a)),
        (Some(200), b"5700=21.5".to_vec()),
        "{a}"
    );

    let id = subscribed(&d, "libcoap-srv", "/3303/0/5700");
    let a = d.async_response(&id, WAIT);
    assert_eq!(
        (a["status"].as_u64(), payload(&a)),
        (Some(200), b"21.5".to_vec()),
        "{a}"
    );
    let ack = support::peers::libcoap_ack(&["-m", "put", "-t", "0", "-e", "22.0", &resource]);
    assert!(ack.contains("c:2.04"), "{ack}");
    let ev = d.collect_events(WAIT, |e| !e.of("notifications").is_empty());
    let n = &ev.of("notifications")[0];
    assert_eq!(
        (n["path"].as_str(), payload(n)),
        (Some("/3303/0/5700"), b"22.0".to_vec()),
        "{n}"
    );

    // No such resource on the server: its 4.04 ends the subscription.
    d.clear_inbox();
    let r = subscribe(&d, "libcoap-srv", "/3/0/0");
    assert_eq!(r.status, 202, "{}", r.body);
    let ev = d.collect_events(WAIT, |e| !e.of("subscription-errors").is_empty());
    let errors = ev.of("subscription-errors");
    assert_eq!(
        (&errors[0]["path"], &errors[0]["status"]),
        (&json!("/3/0/0"), &json!(404)),
        "{errors:?}"
    );
    assert_eq!(d.get("/v2/subscriptions/libcoap-srv/3/0/0").status, 404);
    let mut subs: Vec<String> = d
        .get("/v2/subscriptions/libcoap-srv")
        .body
        .lines()
        .map(str::to_string)
        .collect();
    subs.sort();
    assert_eq!(
        subs,
        [
            "/subscriptions/libcoap-srv/3303/0",
            "/subscriptions/libcoap-srv/3303/0/5700"
        ]
    );
}

/// The official mbed Device Connector Python SDK (`mbed-connector-api` from PyPI) lists
/// the endpoints and resources and deletes an endpoint (`deleteEndpoint`, which takes only
/// 200 or 202 as success).
#[test]
fn the_official_python_sdk_deletes_an_endpoint() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=sdk-1", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let python = support::peers::python_venv("mbed-sdk", "mbed-connector-api==1.0.4", "requests");
    let out = support::run_ok(
        std::process::Command::new(python)
            .arg(support::peers::script("mbed_python_sdk.py"))
            .args([&format!("http://{}", d.rest), &d.key, "sdk-1"]),
        "the SDK script",
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        got,
        json!({
            "endpoints": {"status": 200, "error": false, "names": ["sdk-1"]},
            "resources": {"status": 200, "error": false, "uris": ["/1/0", "/3", "/3/0", "/3303/0"]},
            "delete": {"status": 200, "error": false, "done": true},
            "delete_again": {"status": 404, "error": true, "done": true},
            "resources_after": {"status": 404, "error": true}
        })
    );
    assert!(d.get("/v2/endpoints").json().as_array().unwrap().is_empty());
}

/// The TLV of `/3/0` with resource 0 "ACME", 7 (multi-instance) 3800 and 5000, 9 = 87,
/// written out by hand from OMA-TS-LightweightM2M-V1_0 §6.4.3.
const DEVICE_TLV: &[u8] = &[
    0xc4, 0x00, b'A', b'C', b'M', b'E', // resource 0, 4 bytes
    0x88, 0x07, 0x08, // multiple resource 7, 8 bytes (8-bit length field)
    0x42, 0x00, 0x0e, 0xd8, // resource instance 0: 3800
    0x42, 0x01, 0x13, 0x88, // resource instance 1: 5000
    0xc1, 0x09, 0x57, // resource 9: 87
];

/// `Accept: application/json` decodes whatever the device sent into one JSON value tree:
/// TLV, SenML JSON, text; the async response is `application/json`.
#[test]
fn json_reads_decode_tlv_senml_and_text() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    // No formats on the root link: the device's own choice (TLV) is what comes back.
    dev.register(
        &["ep=json-1", "lt=300", "lwm2m=1.0"],
        r#"</>;rt="oma.lwm2m",</1/0>,</3/0>,</3303/0>"#,
    );
    let read_json = |path: &str| read_accepting(&d, path, Some("application/json"));
    let decoded = |id: &str| json_tree(&d.async_response(id, WAIT));

    // An instance in TLV (the device lists no typed format: no Accept is sent).
    let id = read_json("/v2/endpoints/json-1/3/0");
    let (req, from) = expect_request(&dev, "/3/0");
    assert_eq!(uint_option(&req, CoapOption::Accept), None);
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(11542),
        DEVICE_TLV,
    );
    assert_eq!(
        decoded(&id),
        json!({"0": "ACME", "7": {"0": 3800, "1": 5000}, "9": 87})
    );

    // One resource: asked for as text, typed by the object model (battery level: integer).
    let id = read_json("/v2/endpoints/json-1/3/0/9");
    let (req, from) = expect_request(&dev, "/3/0/9");
    assert_eq!(uint_option(&req, CoapOption::Accept), Some(0));
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(0),
        b"87",
    );
    assert_eq!(decoded(&id), json!(87));

    // SenML JSON.
    let id = read_json("/v2/endpoints/json-1/3303/0");
    let (req, from) = expect_request(&dev, "/3303/0");
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(110),
        br#"[{"bn":"/3303/0/","n":"5700","v":21.5},{"n":"5701","vs":"Cel"}]"#,
    );
    assert_eq!(decoded(&id), json!({"5700": 21.5, "5701": "Cel"}));

    // What cannot be decoded is a 502 that says why.
    let id = read_json("/v2/endpoints/json-1/3/0");
    let (req, from) = expect_request(&dev, "/3/0");
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(11542),
        &[0xc8, 0x00],
    );
    let a = d.async_response(&id, WAIT);
    assert_eq!(a["status"], 502, "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("cannot be decoded"),
        "{a}"
    );
}

/// A write with `Content-Type: application/json` (the value tree) is encoded for an LwM2M
/// client in a format it registered support for: TLV for 1.0, SenML CBOR for a 1.1 client
/// that lists it. A tree that does not fit the path is 412 at once (seed 000: "Request
/// payload was not valid"; it was 400).
#[test]
fn json_writes_are_encoded_for_the_device() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=w-10", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/w-10/3303/0",
        Some("application/json"),
        Some(br#"{"5750": "kitchen"}"#),
    );
    let (req, from) = expect_request(&dev, "/3303/0");
    assert_eq!(uint_option(&req, CoapOption::ContentFormat), Some(11542));
    // Resource 5750 (16-bit id), 7 bytes: type 0b111_00_111.
    assert_eq!(req.payload, [&[0xe7, 0x16, 0x76][..], b"kitchen"].concat());
    answer(&dev, &req, from, ResponseType::Changed, None, None, b"");
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);

    let mut dev11 = d.device();
    dev11.register(
        &["ep=w-11", "lt=300", "lwm2m=1.1"],
        r#"</>;rt="oma.lwm2m";ct="112 11542",</1/0>,</3303/0>"#,
    );
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/w-11/1/0/1",
        Some("application/json"),
        Some(b"120"),
    );
    let (req, from) = expect_request(&dev11, "/1/0/1");
    assert_eq!(uint_option(&req, CoapOption::ContentFormat), Some(112));
    let path: connectord::lwm2m_data::Path = "/1/0/1".parse().unwrap();
    assert_eq!(
        connectord::lwm2m_data::decode(112, &req.payload, &path).unwrap(),
        json!(120)
    );
    answer(&dev11, &req, from, ResponseType::Changed, None, None, b"");
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);

    // A string where the object model says integer (lifetime): refused before it is sent.
    let r = d.send_json("PUT", "/v2/endpoints/w-11/1/0/1", br#""soon""#);
    assert_eq!(r.status, 412, "{}", r.body);
    assert!(dev11.recv_request(Duration::from_millis(300)).is_none());

    // A device without lwm2m= gets the JSON as it is.
    let mut mbed = d.device();
    mbed.register(&["ep=w-mbed", "lt=300"], "</dev/cfg>");
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/w-mbed/dev/cfg",
        Some("application/json"),
        Some(br#"{"a":1}"#),
    );
    let (req, from) = expect_request(&mbed, "/dev/cfg");
    assert_eq!(uint_option(&req, CoapOption::ContentFormat), Some(50));
    assert_eq!(req.payload, br#"{"a":1}"#);
    answer(&mbed, &req, from, ResponseType::Changed, None, None, b"");
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
}

/// `cacheOnly=true` honours Accept: the cached value in the format asked for (200), a
/// cached value in another format is no answer (205), and `application/json` decodes it.
#[test]
fn cache_only_reads_honour_accept() {
    let d = Daemon::in_process();
    let mut dev = d.device();
    dev.register(&["ep=cached", "lt=300", "lwm2m=1.0"], LW_LINKS);
    let id = d.async_request("GET", "/v2/endpoints/cached/3/0/9", None, None);
    let (req, from) = expect_request(&dev, "/3/0/9");
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        None,
        Some(0),
        b"87",
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);

    let cached = |accept: &str| {
        get_accepting(
            &d,
            "/v2/endpoints/cached/3/0/9?cacheOnly=true",
            Some(accept),
        )
    };
    let r = cached("text/plain");
    assert_eq!((r.status, r.body.as_str()), (200, "87"));
    assert_eq!(cached("application/vnd.oma.lwm2m+tlv").status, 205);
    let r = cached("application/json");
    assert_eq!(
        (r.status, r.content_type.as_str(), r.body.as_str()),
        (200, "application/json", "87")
    );
    assert_eq!(cached("*/*").status, 200);
}

/// `connectord simulate --lwm2m 1.1 --type T`: simulated LwM2M 1.1 clients (no `obs`, TLV
/// unless asked) that the tests and users can drive without hardware: the type and LwM2M
/// version are listed, every resource is observable, a subscription below a listed
/// instance notifies as text, a JSON read decodes their TLV, a JSON write is encoded in
/// SenML CBOR (which they list) and the device announces the new lifetime.
#[test]
fn the_simulator_behaves_like_an_lwm2m_1_1_client() {
    let d = Daemon::in_process();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _sim = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_connectord"))
            .args([
                "simulate",
                "--devices",
                "2",
                "--prefix",
                "lw11-",
                "--lwm2m",
                "1.1",
            ])
            .args([
                "--type",
                "thermometer",
                "--notify-interval",
                "300",
                "--server",
            ])
            .arg(d.coap.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the simulator"),
    );
    assert!(
        support::eventually(WAIT, || d
            .get("/v2/endpoints")
            .json()
            .as_array()
            .unwrap()
            .len()
            == 2),
        "the simulated devices did not register"
    );
    let list = d.get("/v2/endpoints?type=thermometer").json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["lwm2m"], "1.1");
    assert_eq!(list[0]["ct"], "application/vnd.oma.lwm2m+tlv");
    let res = d.get("/v2/endpoints/lw11-000000").json();
    assert!(
        res.as_array().unwrap().iter().all(|r| r["obs"] == "true"),
        "{res}"
    );

    // Observe a resource below a listed instance: text/plain (the daemon's default).
    let r = subscribe(&d, "lw11-000000", "/3303/0/5700");
    assert_eq!(r.status, 202, "{}", r.body);
    let notifications = d.events_of("notifications", 2);
    let n = &notifications[1];
    assert_eq!(
        (n["ct"].as_str(), n["path"].as_str()),
        (Some("text/plain"), Some("/3303/0/5700")),
        "{n}"
    );

    // A JSON read of an instance (the simulator answers TLV without Accept).
    let tlv_id = read_accepting(
        &d,
        "/v2/endpoints/lw11-000001/3/0",
        Some("application/vnd.oma.lwm2m+tlv"),
    );
    let a = d.async_response(&tlv_id, WAIT);
    assert_eq!(a["ct"], "application/vnd.oma.lwm2m+tlv", "{a}");
    let id = read_accepting(
        &d,
        "/v2/endpoints/lw11-000001/3/0",
        Some("application/json"),
    );
    let tree = json_tree(&d.async_response(&id, WAIT));
    assert_eq!(
        tree,
        json!({"0": "connectord", "1": "simulator", "2": "lw11-000001"})
    );

    // A JSON write of the lifetime: encoded for the device, which announces it.
    d.clear_inbox();
    let id = d.async_request(
        "PUT",
        "/v2/endpoints/lw11-000001/1/0/1",
        Some("application/json"),
        Some(b"240"),
    );
    assert_eq!(d.async_response(&id, WAIT)["status"], 200);
    let ev = d.collect_events(WAIT, |e| {
        e.of("reg-updates").iter().any(|u| u["ep"] == "lw11-000001")
    });
    assert!(!ev.of("reg-updates").is_empty(), "{ev:?}");
}

/// A Lua rule (`presubscribe`) starts observations on an LwM2M client at registration:
/// every path it lists is offered as observable, though its links carry no `obs`.
#[test]
fn lua_rules_observe_lwm2m_clients_at_registration() {
    let d = Daemon::in_process();
    // The key needs a notification channel to be offered resources.
    assert!(d.pull_now().is_none());
    let before = d.metric("lua_reloads_total");
    let tmp = d.scripts_dir().join(".20-lwm2m.lua.tmp");
    std::fs::write(
        &tmp,
        "function presubscribe(endpoint, resource, key)\n  return resource.obs and resource.path == '/3303/0'\nend\n",
    )
    .unwrap();
    std::fs::rename(&tmp, d.scripts_dir().join("20-lwm2m.lua")).unwrap();
    assert!(
        support::eventually(WAIT, || d.metric("lua_reloads_total") > before),
        "the rule was not loaded"
    );
    let mut dev = d.device();
    dev.register(&["ep=lua-lw", "lt=300", "lwm2m=1.1"], LW_LINKS);
    let (req, from) = expect_request(&dev, "/3303/0");
    assert_eq!(uint_option(&req, CoapOption::Observe), Some(0));
    answer(
        &dev,
        &req,
        from,
        ResponseType::Content,
        Some(1),
        Some(11542),
        &[],
    );
    support::no_request(&dev, Duration::from_millis(500), "only /3303/0");
    let subs = d.get("/v2/subscriptions/lua-lw");
    assert_eq!(
        (subs.status, subs.body.trim()),
        (200, "/subscriptions/lua-lw/3303/0")
    );
}
