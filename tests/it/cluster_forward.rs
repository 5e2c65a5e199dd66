//! Issue 22: any node answers any REST call. A request or subscription for a device
//! another node owns is forwarded to the owner over NATS request/reply; the owner sends
//! it to the device and publishes the async response on its own channel for the key (the
//! tests long-poll the owner: cluster-wide channels are another step). Every node follows
//! the subscriptions and pre-subscriptions made on the others.
//!
//! Each test starts its own nats-server (testkit, never 4222) and the daemons as
//! processes; the devices are real UDP sockets (the testkit device, aiocoap).

use std::time::{Duration, Instant};

use coap_lite::{MessageType, Packet, RequestType, ResponseType};
use connectord_testkit::nats::NatsServer;
use serde_json::json;

use crate::cluster::{LINKS, WAIT, cluster, second_node, until_listed};
use crate::support::coap::{Device, path_of, uint_option};
use crate::support::peers::Lwm2mDevice;
use crate::support::{self, Daemon, b64, eventually, observe_content, send_packet};

/// Two nodes on one nats-server; `n1_extra` is added to node 1's configuration.
fn two_nodes(server: &NatsServer, n1_extra: &str) -> (Daemon, Daemon) {
    let n1 = Daemon::start_with(&format!("{}{n1_extra}", cluster(&[server.url()], "n1")));
    let n2 = second_node(server, &n1, "n2", "");
    (n1, n2)
}

/// The next request the device gets (within [`WAIT`]), asserting it came from `owner`.
fn next_request(dev: &Device, owner: &Daemon) -> Packet {
    let (req, from) = dev.recv_request(WAIT).expect("the owner sends the request");
    assert_eq!(from, owner.coap, "only the owner talks to its device");
    req
}

fn forwarded(d: &Daemon, direction: &str) -> u64 {
    d.metric(&format!(
        "cluster_forwarded_requests_total{{direction=\"{direction}\"}}"
    ))
}

/// This node's `forwarded_requests` in `GET /v2/cluster`.
fn cluster_counts(d: &Daemon, node: &str) -> (u64, u64) {
    let body = d.get("/v2/cluster").json();
    let me = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node"] == node)
        .cloned()
        .unwrap_or_else(|| panic!("{node} not in {body}"));
    let f = &me["forwarded_requests"];
    (f["out"].as_u64().unwrap(), f["in"].as_u64().unwrap())
}

/// Every kind of request on a resource, made through node 2 for a device node 1 owns:
/// read, write (text and JSON, transcoded by the owner for the LwM2M device), execute,
/// delete, `noResp=true`, `cacheOnly=true` (answered from the owner's cache: node 2 never
/// read the value), `Accept: application/json`; the answers arrive as async responses on
/// node 1's channel. Refusals map as locally (404 unknown resource, 429 the owner's full
/// queue, 409 `noResp` on a queue-mode device is tested with queue mode below). The
/// forwarded requests are counted on both nodes, in `/metrics` and `GET /v2/cluster`.
#[test]
fn every_request_kind_through_a_non_owner_is_carried_out_by_the_owner() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "[requests]\nqueue_len = 1\n");
    let mut dev = n1.device();
    dev.register(&["ep=fw", "lt=300", "lwm2m=1.0"], LINKS);
    until_listed(&n2, &["fw"]);
    let base = "/v2/endpoints/fw";

    // Read: the first one through n2 is also the first value n1 caches.
    let t = Instant::now();
    let id = n2.async_request("GET", &format!("{base}/3303/0/5700"), None, None);
    println!("a forwarded read answered 202 after {:?}", t.elapsed());
    let req = next_request(&dev, &n1);
    assert_eq!(
        req.header.code,
        coap_lite::MessageClass::Request(RequestType::Get)
    );
    assert_eq!(path_of(&req), "/3303/0/5700");
    dev.reply(
        &req,
        n1.coap,
        ResponseType::Content,
        b"21.5",
        Some(0),
        Some(60),
    );
    let r = n1.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"21.5").as_str()))
    );

    // cacheOnly: the owner's cache (n2 has none of its own for n1's device).
    let r = n2.call(
        "GET",
        &format!("{base}/3303/0/5700?cacheOnly=true"),
        None,
        None,
    );
    assert_eq!((r.status, r.body.as_str()), (200, "21.5"), "{}", r.body);
    assert_eq!(r.content_type, "text/plain");

    // Accept: application/json, decoded on the owner.
    let r = support::http(
        "GET",
        &n2.url(&format!("{base}/3303/0/5700")),
        &[
            ("Authorization", &format!("Bearer {}", n2.key)),
            ("Accept", "application/json"),
        ],
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["async-response-id"].as_str().unwrap().to_string();
    let req = next_request(&dev, &n1);
    dev.reply(
        &req,
        n1.coap,
        ResponseType::Content,
        b"22.5",
        Some(0),
        Some(60),
    );
    let r = n1.async_response(&id, WAIT);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["ct"], "application/json", "{r}");

    // Write, text.
    let id = n2.async_request(
        "PUT",
        &format!("{base}/1/0/1"),
        Some("text/plain"),
        Some(b"120"),
    );
    let req = next_request(&dev, &n1);
    assert_eq!(
        req.header.code,
        coap_lite::MessageClass::Request(RequestType::Put)
    );
    assert_eq!(
        (path_of(&req).as_str(), &req.payload[..]),
        ("/1/0/1", &b"120"[..])
    );
    dev.reply(&req, n1.coap, ResponseType::Changed, b"", None, None);
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);

    // Write, JSON: the owner encodes it for the LwM2M device (not JSON on the wire).
    let id = n2.async_request(
        "PUT",
        &format!("{base}/1/0/1"),
        Some("application/json"),
        Some(b"300"),
    );
    let req = next_request(&dev, &n1);
    let cf = uint_option(&req, coap_lite::CoapOption::ContentFormat);
    assert!(cf.is_some() && cf != Some(50), "content format {cf:?}");
    dev.reply(&req, n1.coap, ResponseType::Changed, b"", None, None);
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);

    // Execute and delete.
    let id = n2.async_request("POST", &format!("{base}/3/0/4"), None, None);
    let req = next_request(&dev, &n1);
    assert_eq!(
        req.header.code,
        coap_lite::MessageClass::Request(RequestType::Post)
    );
    dev.reply(&req, n1.coap, ResponseType::Changed, b"", None, None);
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);
    let id = n2.async_request("DELETE", &format!("{base}/5/0"), None, None);
    let req = next_request(&dev, &n1);
    assert_eq!(
        req.header.code,
        coap_lite::MessageClass::Request(RequestType::Delete)
    );
    dev.reply(&req, n1.coap, ResponseType::Deleted, b"", None, None);
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);

    // noResp: 204 at once, a NON request from the owner.
    let r = n2.call(
        "PUT",
        &format!("{base}/1/0/1?noResp=true"),
        Some("text/plain"),
        Some(b"5"),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let req = next_request(&dev, &n1);
    assert_eq!(req.header.get_type(), MessageType::NonConfirmable);

    // Refusals as locally: unknown resource 404; the owner's queue (queue_len = 1) full:
    // one in flight, one waiting, the third 429.
    let r = n2.call("GET", &format!("{base}/9/9/9"), None, None);
    assert_eq!(r.status, 404, "{}", r.body);
    let a = n2.async_request("GET", &format!("{base}/3/0/0"), None, None);
    let held = next_request(&dev, &n1);
    let b = n2.async_request("GET", &format!("{base}/3/0/0"), None, None);
    let r = n2.call("GET", &format!("{base}/3/0/0"), None, None);
    assert_eq!(r.status, 429, "{}", r.body);
    dev.reply(&held, n1.coap, ResponseType::Content, b"a", Some(0), None);
    let req = next_request(&dev, &n1);
    dev.reply(&req, n1.coap, ResponseType::Content, b"b", Some(0), None);
    assert_eq!(n1.async_response(&a, WAIT)["status"], 200);
    assert_eq!(n1.async_response(&b, WAIT)["status"], 200);
    support::no_request(&dev, Duration::from_millis(300), "nothing else is sent");

    // Counted: every forwarded call once on each side (n2 made them all, n1 took them).
    let out = forwarded(&n2, "out");
    assert_eq!(out, 12, "forwarded by n2");
    assert_eq!(forwarded(&n1, "in"), out);
    assert_eq!((forwarded(&n2, "in"), forwarded(&n1, "out")), (0, 0));
    assert_eq!(cluster_counts(&n2, "n2"), (out, 0));
    assert_eq!(cluster_counts(&n1, "n1"), (0, out));
    // n2 sent the device nothing itself.
    assert_eq!(n2.metric("device_requests_total"), 0);
}

/// A queue-mode device: the request made through node 2 is queued on node 1 (stored
/// there) and sent when the device next updates its registration; `noResp=true` is 409
/// as on one node.
#[test]
fn a_request_through_a_non_owner_waits_in_the_owners_queue_for_a_queue_mode_device() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "");
    let mut dev = n1.device();
    let reg = dev.register(&["ep=fw-q", "lt=300", "b=UQ"], LINKS);
    until_listed(&n2, &["fw-q"]);
    let id = n2.async_request("GET", "/v2/endpoints/fw-q/3303/0/5700", None, None);
    assert_eq!(n1.metric("requests_queued"), 1);
    assert_eq!(n2.metric("requests_queued"), 0);
    support::no_request(
        &dev,
        Duration::from_millis(300),
        "queued until the device wakes",
    );
    let r = n2.call("GET", "/v2/endpoints/fw-q/3/0/0?noResp=true", None, None);
    assert_eq!(r.status, 409, "{}", r.body);

    // The device wakes: an update, answered; then the queued request.
    let path = ["rd", reg.as_str()];
    let update = dev.build(&support::coap::Req::new(RequestType::Post, &path));
    dev.send_raw(&update.to_bytes().unwrap());
    let deadline = Instant::now() + WAIT;
    let req = loop {
        assert!(Instant::now() < deadline, "the queued request never came");
        if let Some((req, from)) = dev.recv_request(Duration::from_millis(500)) {
            assert_eq!(from, n1.coap);
            break req;
        }
    };
    assert_eq!(path_of(&req), "/3303/0/5700");
    dev.reply(&req, n1.coap, ResponseType::Content, b"19", Some(0), None);
    let r = n1.async_response(&id, WAIT);
    assert_eq!(r["payload"], b64(b"19"));
}

/// Subscriptions through node 2 for node 1's device: the subscription is forwarded, n1
/// observes the device (the first value in n1's async response), both nodes list it, a
/// notification from the device reaches n1's channel; unsubscribing through node 2 (by
/// resource, then by endpoint) ends the listing on both and node 1's observation (the
/// device's next notification is reset).
#[test]
fn subscriptions_through_a_non_owner_are_made_and_ended_on_the_owner() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "");
    let mut dev = n1.device();
    dev.register(&["ep=fw-s", "lt=300"], LINKS);
    until_listed(&n2, &["fw-s"]);
    let sub = "/v2/subscriptions/fw-s/3303/0/5700";

    let id = n2.async_request("PUT", sub, None, None);
    let req = next_request(&dev, &n1);
    assert_eq!(uint_option(&req, coap_lite::CoapOption::Observe), Some(0));
    let token = req.get_token().to_vec();
    let ack = observe_content(
        MessageType::Acknowledgement,
        req.header.message_id,
        &token,
        1,
        b"20",
    );
    send_packet(&dev, &ack, n1.coap);
    let r = n1.async_response(&id, WAIT);
    assert_eq!(r["payload"], b64(b"20"));
    // Listed on both (n2 at once: it answered after n1 stored it; n1 stored it).
    for d in [&n1, &n2] {
        let r = d.get(sub);
        assert_eq!(r.status, 200, "{}", r.body);
        let r = d.get("/v2/subscriptions/fw-s");
        assert_eq!(r.body, "/subscriptions/fw-s/3303/0/5700");
    }
    // Already observed: the next subscription through n2 is 200 at once.
    assert_eq!(n2.call("PUT", sub, None, None).status, 200);
    // A notification reaches the owner's channel.
    let n = observe_content(MessageType::NonConfirmable, 0x7001, &token, 2, b"21");
    send_packet(&dev, &n, n1.coap);
    let e = n1.events_of("notifications", 1);
    assert_eq!(e[0]["payload"], b64(b"21"), "{e}");

    // Unsubscribed through n2: gone on both, and n1 stops observing.
    assert_eq!(n2.call("DELETE", sub, None, None).status, 204);
    assert_eq!(n2.get(sub).status, 404);
    let t = Instant::now();
    assert!(
        eventually(WAIT, || n1.get(sub).status == 404),
        "n1 still lists the subscription"
    );
    println!("unsubscribed on n2, gone on n1 after {:?}", t.elapsed());
    // n1 ends the observation on the device (GET with Observe=1), and answers a
    // notification still on its way with RST.
    assert_eq!(support::accept_cancels(&dev, 1)[0].1, token.to_vec());
    let n = observe_content(MessageType::Confirmable, 0x7002, &token, 3, b"22");
    send_packet(&dev, &n, n1.coap);
    let reset = dev.recv_raw(WAIT).expect("n1 answers the notification");
    let reset = Packet::from_bytes(&reset).unwrap();
    assert_eq!(
        reset.header.get_type(),
        MessageType::Reset,
        "no longer observed"
    );

    // By endpoint: subscribe again through n2, delete the endpoint's through n2.
    let id = n2.async_request("PUT", sub, None, None);
    let req = next_request(&dev, &n1);
    let ack = observe_content(
        MessageType::Acknowledgement,
        req.header.message_id,
        req.get_token(),
        1,
        b"23",
    );
    send_packet(&dev, &ack, n1.coap);
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);
    assert!(eventually(WAIT, || n1.get(sub).status == 200));
    assert_eq!(
        n2.call("DELETE", "/v2/subscriptions/fw-s", None, None)
            .status,
        204
    );
    assert!(
        eventually(WAIT, || n1.get("/v2/subscriptions/fw-s").status == 404),
        "n1 still lists the endpoint's subscriptions"
    );
    assert_eq!(n2.get("/v2/subscriptions/fw-s").status, 404);
}

/// Pre-subscriptions set on node 1 are followed by node 2: a device registering on node 2
/// is observed by node 2 at the matching resource, and the subscription node 2 recorded is
/// listed on node 1; removing it on node 1 ends node 2's observation.
#[test]
fn a_presubscription_made_on_one_node_is_observed_by_a_device_registering_on_another() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "");
    let rules = json!([{"endpoint-name": "pre-*", "resource-path": ["/3303/0/5700"]}]);
    let r = n1.send_json("PUT", "/v2/subscriptions", rules.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    let t = Instant::now();
    assert!(
        eventually(WAIT, || n2.get("/v2/subscriptions").json() == rules),
        "n2 never had the rules: {}",
        n2.get("/v2/subscriptions").body
    );
    println!("pre-subscriptions set on n1, on n2 after {:?}", t.elapsed());

    let mut dev = n2.device();
    dev.register(&["ep=pre-1", "lt=300"], LINKS);
    let deadline = Instant::now() + WAIT;
    let req = loop {
        let (req, from) = dev
            .recv_request(deadline.saturating_duration_since(Instant::now()))
            .expect("n2 observes the pre-subscribed resource");
        assert_eq!(from, n2.coap, "the owner observes");
        if dev.first_time(&req, from) {
            break req;
        }
    };
    assert_eq!(path_of(&req), "/3303/0/5700");
    assert_eq!(uint_option(&req, coap_lite::CoapOption::Observe), Some(0));
    let token = req.get_token().to_vec();
    let ack = observe_content(
        MessageType::Acknowledgement,
        req.header.message_id,
        &token,
        1,
        b"5",
    );
    send_packet(&dev, &ack, n2.coap);
    support::no_request(&dev, Duration::from_millis(300), "one observation");
    let sub = "/v2/subscriptions/pre-1/3303/0/5700";
    assert_eq!(n2.get(sub).status, 200);
    assert!(
        eventually(WAIT, || n1.get(sub).status == 200),
        "n1 never listed n2's subscription"
    );
    // n1 sent the device nothing.
    assert_eq!(n1.metric("device_requests_total"), 0);

    // Removed on n1 (not the owner): n2 follows and stops observing.
    assert_eq!(n1.call("DELETE", sub, None, None).status, 204);
    assert!(
        eventually(WAIT, || n2.get(sub).status == 404),
        "n2 still lists it"
    );
    assert_eq!(support::accept_cancels(&dev, 1)[0].1, token.to_vec());
    let n = observe_content(MessageType::Confirmable, 0x7101, &token, 2, b"6");
    send_packet(&dev, &n, n2.coap);
    let reset = Packet::from_bytes(&dev.recv_raw(WAIT).expect("an answer")).unwrap();
    assert_eq!(reset.header.get_type(), MessageType::Reset);
}

/// The same pre-subscription rules PUT again on one node: the owner of a device, which
/// learns of it as the deletes of the key's subscriptions and then the rules, keeps the
/// observations the rules subscribe to again (before: it cancelled each at its delete and
/// observed it anew). Rules that no longer match end the observation on the device.
#[test]
fn the_same_presubscriptions_again_on_another_node_keep_the_owners_observations() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "");
    let rules = json!([{"endpoint-name": "again-*", "resource-path": ["/3303/0/5700"]}]);
    let put = |rules: &serde_json::Value| {
        let r = n1.send_json("PUT", "/v2/subscriptions", rules.to_string());
        assert_eq!(r.status, 204, "{}", r.body);
        assert!(
            eventually(WAIT, || n2.get("/v2/subscriptions").json() == *rules),
            "n2 never had the rules: {}",
            n2.get("/v2/subscriptions").body
        );
    };
    put(&rules);
    let mut dev = n2.device();
    dev.register(&["ep=again-1", "lt=300"], LINKS);
    let (token, from) = support::answer_observe(&dev, WAIT, b"5");
    assert_eq!(from, n2.coap, "the owner observes");
    let sub = "/v2/subscriptions/again-1/3303/0/5700";
    assert_eq!(n2.get(sub).status, 200, "the rules' resource is observed");
    assert!(
        eventually(WAIT, || n1.get(sub).status == 200),
        "n1 lists it"
    );

    // The same rules again: the subscription is removed and made again (n1 lists it
    // again), and n2 sends the device nothing.
    put(&rules);
    support::no_request(
        &dev,
        Duration::from_secs(1),
        "the rules subscribe to the resource again: its observation stays",
    );
    assert_eq!(n2.get(sub).status, 200);
    assert!(
        eventually(WAIT, || n1.get(sub).status == 200),
        "n1 lists it"
    );

    // Rules that no longer match: the owner cancels the observation.
    put(&json!([{"endpoint-name": "other-*"}]));
    assert_eq!(support::accept_cancels(&dev, 1)[0].1, token);
    assert_eq!(n2.get(sub).status, 404);
}

/// The owner does not answer: stopped (SIGSTOP), a forwarded request is 503 naming it
/// after `[cluster] timeout_ms`; killed with -9, 503 naming it at once (nobody serves its
/// calls). Both bounded; the times printed.
#[test]
fn a_request_for_a_device_of_a_stopped_or_killed_owner_is_503_naming_it() {
    let server = NatsServer::start().unwrap();
    let (mut n1, n2) = two_nodes(&server, "");
    let mut dev = n1.device();
    dev.register(&["ep=fw-k", "lt=300"], LINKS);
    until_listed(&n2, &["fw-k"]);
    let path = "/v2/endpoints/fw-k/3303/0/5700";

    n1.signal("STOP");
    let t = Instant::now();
    let r = n2.call("GET", path, None, None);
    let took = t.elapsed();
    n1.signal("CONT");
    println!("a stopped owner: 503 after {took:?} (timeout_ms = 2000)");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("cluster node n1") && r.body.contains("did not answer"),
        "{}",
        r.body
    );
    assert!(took < WAIT, "{took:?}");

    n1.0.kill9();
    let t = Instant::now();
    let r = n2.call("GET", path, None, None);
    let took = t.elapsed();
    println!("a killed owner: 503 after {took:?}");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("cluster node n1"), "{}", r.body);
    assert!(took < WAIT, "{took:?}");
    let r = n2.call("PUT", "/v2/subscriptions/fw-k/3303/0/5700", None, None);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("cluster node n1"), "{}", r.body);
    assert_eq!(
        n2.get("/v2/subscriptions/fw-k/3303/0/5700").status,
        404,
        "a refused subscription is not listed"
    );
}

/// aiocoap as the device (a CoAP stack nobody here wrote), registered with node 1: a read
/// (also as JSON) and a write made through node 2, answered on node 1's channel.
#[test]
fn an_aiocoap_device_answers_requests_made_through_a_non_owner() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "");
    let dev = Lwm2mDevice::start(n1.coap, "aio-fw", &[]);
    until_listed(&n2, &["aio-fw"]);

    let id = n2.async_request("GET", "/v2/endpoints/aio-fw/3/0/0", None, None);
    let r = n1.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["payload"].as_str()),
        (Some(200), Some(b64(b"connectord-test").as_str()))
    );
    let r = support::http(
        "GET",
        &n2.url("/v2/endpoints/aio-fw/3/0/0"),
        &[
            ("Authorization", &format!("Bearer {}", n2.key)),
            ("Accept", "application/json"),
        ],
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["async-response-id"].as_str().unwrap().to_string();
    let r = n1.async_response(&id, WAIT);
    assert_eq!(
        (r["status"].as_u64(), r["ct"].as_str()),
        (Some(200), Some("application/json")),
        "{r}"
    );

    let id = n2.async_request(
        "PUT",
        "/v2/endpoints/aio-fw/1/0/1",
        Some("text/plain"),
        Some(b"120"),
    );
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);
    dev.wait_event(WAIT, |e| {
        e["event"] == "request" && e["path"] == "/1/0/1" && e["payload"] == "120"
    });
}

/// A subscription follows its device to a new owner: made on node 1 (which observes the
/// device), followed by node 2; when the device registers with node 2, node 2 observes it
/// (node 2 knew the subscription from the watch, not from a restart).
#[test]
fn a_subscription_follows_its_device_to_its_new_owner() {
    let server = NatsServer::start().unwrap();
    let (n1, n2) = two_nodes(&server, "");
    let mut dev = n1.device();
    dev.register(&["ep=fw-m", "lt=300"], LINKS);
    until_listed(&n2, &["fw-m"]);
    let sub = "/v2/subscriptions/fw-m/3303/0/5700";
    let id = n1.async_request("PUT", sub, None, None);
    let req = next_request(&dev, &n1);
    let ack = observe_content(
        MessageType::Acknowledgement,
        req.header.message_id,
        req.get_token(),
        1,
        b"1",
    );
    send_packet(&dev, &ack, n1.coap);
    assert_eq!(n1.async_response(&id, WAIT)["status"], 200);
    assert!(
        eventually(WAIT, || n2.get(sub).status == 200),
        "n2 never listed n1's subscription"
    );

    dev.server = n2.coap;
    dev.register(&["ep=fw-m", "lt=300"], LINKS);
    let deadline = Instant::now() + WAIT;
    let req = loop {
        let (req, from) = dev
            .recv_request(deadline.saturating_duration_since(Instant::now()))
            .expect("n2 observes the moved device");
        if from == n2.coap && dev.first_time(&req, from) {
            break req;
        }
    };
    assert_eq!(path_of(&req), "/3303/0/5700");
    assert_eq!(uint_option(&req, coap_lite::CoapOption::Observe), Some(0));
    assert_eq!(n1.get(sub).status, 200, "still listed");
}
