//! Issue 22, a cluster on NATS JetStream: quotas over the whole cluster, device
//! credentials followed by every node, and devices moving between nodes. Each test starts
//! its own nats-server on its own loopback ports and the daemons as processes (the helpers
//! are `tests/it/cluster.rs`'s). Times are printed, never asserted; waits are bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageType, ResponseType};
use connectord_testkit::nats::NatsServer;
use serde_json::json;

use crate::cluster::{LINKS, WAIT, cluster, copy_ca, second_node, until_listed};
use crate::dtls::{DtlsDevice, psk_hex, put_psk};
use crate::support::{self, Daemon, coap::Device};

/// Waits (at most [`WAIT`]) until `d`'s `GET /v2/limits` counts `n` transactions; returns
/// how long it took.
fn until_counted(d: &Daemon, n: u64) -> Duration {
    let t = Instant::now();
    loop {
        let got = d.get("/v2/limits").json()["transaction-count"].as_u64();
        if got == Some(n) {
            return t.elapsed();
        }
        assert!(t.elapsed() < WAIT, "counted {got:?}, never {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 22, "limits are enforced cluster-wide": two nodes on one nats-server, a quota of
/// 10 transactions per domain, a device on each node. Node 1's traffic shows in node 2's
/// `GET /v2/limits` (the cluster's total) within about a second (`save_interval_ms` is
/// 5 s here, capped to 1 s on NATS; the time is printed), node 2 refuses with 429 exactly
/// when the cluster's total reaches the quota, and so does node 1 once it sees node 2's
/// traffic.
#[test]
fn a_quota_holds_across_two_nodes() {
    let server = NatsServer::start().unwrap();
    let limits = "[limits]\ntransaction_quota = 10\nsave_interval_ms = 5000\n";
    let n1 = Daemon::start_with(&format!("{}{limits}", cluster(&[server.url()], "n1")));
    let n2 = second_node(&server, &n1, "n2", limits);
    let mut d1 = n1.device();
    d1.register(&["ep=q1", "lt=300"], LINKS); // n1: 1
    let mut d2 = n2.device();
    d2.register(&["ep=q2", "lt=300"], LINKS); // n2: 1
    until_listed(&n1, &["q1", "q2"]);
    // Four reads through n1 (each one transaction; the device need not answer).
    for _ in 0..4 {
        n1.async_request("GET", "/v2/endpoints/q1/3/0/0", None, None);
    }
    // n1 counted 5, n2 1: both show the cluster's 6.
    let t = Instant::now();
    let took = until_counted(&n2, 6);
    println!("n1's traffic counted on n2 after {took:?}");
    until_counted(&n1, 6);
    assert!(t.elapsed() < WAIT);
    // Through n2: four more fit (10), the fifth crosses the quota.
    for i in 0..4 {
        let r = n2.call("GET", "/v2/endpoints/q2/3/0/0", None, None);
        assert_eq!(r.status, 202, "request {i} on n2: {}", r.body);
    }
    let r = n2.call("GET", "/v2/endpoints/q2/3/0/0", None, None);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("quota"), "{}", r.body);
    // n1 refuses too once n2's count reached it (a second of propagation, bounded).
    let took = until_counted(&n1, 10);
    println!("n2's traffic counted on n1 after {took:?}");
    let r = n1.call("GET", "/v2/endpoints/q1/3/0/0", None, None);
    assert_eq!(r.status, 429, "{}", r.body);
    // A registration update is a transaction too: 4.29 on either node.
    let mut again = n2.device();
    let mut reg = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
    reg.query = &["ep=q3", "lt=300"];
    let resp = again.request(&reg);
    assert_eq!(support::coap::code(&resp), ResponseType::TooManyRequests);
    assert_eq!(n2.get("/v2/limits").json()["transaction-count"], 10);
    assert!(n1.metric("limits_refused_total") >= 1);
    assert!(n2.metric("limits_refused_total") >= 2);
}

/// A node on `server` with a DTLS listener, `first`'s CA and admin key.
fn dtls_node(server: &NatsServer, first: &Daemon, node: &str) -> Daemon {
    let p = support::Prepared::new(DTLS, &cluster(&[server.url()], node));
    copy_ca(&first.state_dir(), &p.0.dir.path().join("state"));
    let mut d = p.start();
    d.key = first.key.clone();
    d
}

const DTLS: &str = "listen_dtls = [\"127.0.0.1:0\"]";

fn dtls_addr(d: &Daemon) -> std::net::SocketAddr {
    d.ready.as_ref().expect("ready file").coap_dtls[0]
}

/// Waits (at most [`WAIT`]) until `d`'s metric `name` is `want`.
fn until_metric(d: &Daemon, name: &str, want: u64) {
    let t = Instant::now();
    while d.metric(name) != want {
        assert!(
            t.elapsed() < WAIT,
            "{name} is {}, never {want}",
            d.metric(name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 22, credentials followed by every node: a PSK provisioned through node 1's REST
/// lets its device do a DTLS handshake with node 2 and register there (the time from the
/// REST answer to the first handshake node 2 accepts is printed); a new key given through
/// node 1 closes the device's open session on node 2 and node 2 refuses the old key; a
/// revocation through node 1 closes it again and node 2 refuses the key from then on.
#[test]
fn a_psk_made_on_one_node_works_and_is_revoked_on_another() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_custom(DTLS, &cluster(&[server.url()], "n1"));
    let n2 = dtls_node(&server, &n1, "n2");
    let (old, new) = ("cluster-key-16-bytes", "cluster-new-16-bytes");
    let r = put_psk(&n1, "dtls-roamer", "roam-id", &psk_hex(old));
    assert_eq!(r.status, 201, "{}", r.body);
    let t = Instant::now();
    let mut dev = loop {
        match DtlsDevice::connect(dtls_addr(&n2), "roam-id", old) {
            Ok(d) => break d,
            Err(e) => assert!(t.elapsed() < WAIT, "n2 never took n1's PSK: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "a PSK made on n1 did a handshake with n2 after {:?}",
        t.elapsed()
    );
    let id = dev.register().expect("registered on n2 over DTLS");
    assert_eq!(dev.update(&id), Some(ResponseType::Changed));
    assert_eq!(n2.metric("coap_dtls_sessions"), 1);
    until_listed(&n1, &["dtls-roamer"]);

    // A new key through n1: n2 closes the session that used the old one.
    let r = put_psk(&n1, "dtls-roamer", "roam-id", &psk_hex(new));
    assert_eq!(r.status, 200, "{}", r.body);
    until_metric(&n2, "coap_dtls_sessions", 0);
    assert!(n2.wait_log("another node took device credentials away", WAIT));
    assert_eq!(dev.update(&id), None, "the old session still answers on n2");
    assert!(DtlsDevice::connect(dtls_addr(&n2), "roam-id", old).is_err());
    let mut dev = DtlsDevice::connect(dtls_addr(&n2), "roam-id", new).expect("the new key");
    assert_eq!(dev.update(&id), Some(ResponseType::Changed));

    // Revoked through n1: closed on n2, and refused there from now on; n2, its owner,
    // ends the registration (as a revocation through n2 would): listed on neither node.
    let r = n1.call("DELETE", "/v2/device-credentials/dtls-roamer", None, None);
    assert_eq!(r.status, 204, "{}", r.body);
    until_metric(&n2, "coap_dtls_sessions", 0);
    assert_eq!(
        dev.update(&id),
        None,
        "the revoked session still answers on n2"
    );
    assert!(DtlsDevice::connect(dtls_addr(&n2), "roam-id", new).is_err());
    until_listed(&n2, &[]);
    until_listed(&n1, &[]);
    assert!(n2.wait_log(
        "another node revoked the device credentials of an endpoint registered here",
        WAIT
    ));
}

/// A PSK provisioned through node 1 for an endpoint registered over plain CoAP on node 2
/// ends that registration on node 2, its owner, as a provisioning through node 2 does:
/// the name is no longer held without credentials. Before, node 1 left it to node 2 and
/// node 2 did nothing: it stayed listed and served over plain CoAP until its lifetime ran
/// out.
#[test]
fn a_psk_made_on_one_node_ends_a_plain_registration_on_another() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_custom(DTLS, &cluster(&[server.url()], "n1"));
    let n2 = dtls_node(&server, &n1, "n2");
    let mut plain = n2.device();
    plain.register(&["ep=plain-then-psk", "lt=300"], LINKS);
    let mut other = n2.device();
    other.register(&["ep=stays-plain", "lt=300"], LINKS);
    until_listed(&n1, &["plain-then-psk", "stays-plain"]);
    let r = put_psk(
        &n1,
        "plain-then-psk",
        "plain-id",
        &psk_hex("plain-key-16-byte"),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let t = Instant::now();
    until_listed(&n2, &["stays-plain"]);
    println!(
        "provisioned on n1; n2 ended the plain registration after {:?}",
        t.elapsed()
    );
    until_listed(&n1, &["stays-plain"]);
    assert!(n2.wait_log(
        "another node provisioned a PSK for an endpoint registered here over plain CoAP",
        WAIT
    ));
    // Its device can come back over DTLS with the key.
    let mut dev = DtlsDevice::connect(dtls_addr(&n2), "plain-id", "plain-key-16-byte")
        .expect("the new key on n2");
    dev.register().expect("registered on n2 over DTLS");
}

/// A device's resources, two of them observable.
const TWO_OBSERVABLE: &str = "</3/0>,</3303/0/5700>;obs,</3303/0/5701>;obs";

/// The observe requests the daemon sends `dev` until `window` passes without one, each
/// answered (2.05, Observe 1, `0`): path → (token, the node's address). Retransmissions
/// are answered again and not counted twice.
fn observed(dev: &Device, window: Duration) -> BTreeMap<String, (Vec<u8>, SocketAddr)> {
    let mut out = BTreeMap::new();
    while let Some((req, from)) = dev.recv_request(window) {
        let (mid, token) = (req.header.message_id, req.get_token().to_vec());
        if req.get_option(CoapOption::Observe).is_some() {
            out.insert(support::coap::path_of(&req), (token.clone(), from));
        }
        let p = support::observe_content(MessageType::Acknowledgement, mid, &token, 1, b"0");
        support::send_packet(dev, &p, from);
    }
    out
}

/// Waits (at most [`WAIT`]) until `dev` was asked to observe every one of `paths`.
fn until_observed(dev: &Device, paths: &[&str]) -> BTreeMap<String, (Vec<u8>, SocketAddr)> {
    let t = Instant::now();
    let mut all = BTreeMap::new();
    while !paths.iter().all(|p| all.contains_key(*p)) {
        assert!(t.elapsed() < WAIT, "observed only {:?}", all.keys());
        all.extend(observed(dev, Duration::from_millis(300)));
    }
    all
}

/// A notification (CON, Observe `seq`) of `value` with `token` to `to`; the answer's
/// message type, if one came within 2 s.
fn notify(
    dev: &Device,
    to: SocketAddr,
    token: &[u8],
    seq: u32,
    value: &[u8],
) -> Option<MessageType> {
    let mid = 40_000 + seq as u16;
    let p = support::observe_content(MessageType::Confirmable, mid, token, seq, value);
    support::send_packet(dev, &p, to);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Some(bytes) = dev.recv_raw(Duration::from_millis(200)) else {
            continue;
        };
        if let Ok(answer) = coap_lite::Packet::from_bytes(&bytes)
            && answer.header.message_id == mid
        {
            return Some(answer.header.get_type());
        }
    }
    None
}

/// Waits (at most [`WAIT`]) for a notification of `ep`'s `path` with `value` in `d`'s
/// channel (pulled from `d`).
fn until_notified(d: &Daemon, ep: &str, path: &str, value: &[u8]) {
    let want = support::b64(value);
    let events = d.collect_events(WAIT, |e| {
        e.of("notifications")
            .iter()
            .any(|n| n["ep"] == ep && n["path"] == path && n["payload"] == want.as_str())
    });
    assert!(
        events
            .of("notifications")
            .iter()
            .any(|n| n["ep"] == ep && n["path"] == path && n["payload"] == want.as_str()),
        "no notification of {ep}{path} = {value:?} on {}: {events:?}",
        d.rest
    );
}

/// Issue 22, a device moving by re-registering: subscribed on node 1 (a subscription and
/// a pre-subscription match, both made through node 1 after node 2 started, so node 2
/// knows of them only from the store), it registers again on node 2. Node 2 observes both
/// resources at the device's address, and a notification the device sends node 2 reaches
/// a long-poll on node 2 (the key's channel is node 1's). Node 1 forgot its observations: a notification still sent to
/// it with the old token is answered with RST (RFC 7252 §4.2, RFC 7641 §3.6), which ends
/// the observation on the device.
#[test]
fn a_device_that_registers_on_another_node_is_observed_there() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    // The application opens its channel on node 1 (node 1 owns it); after the move its
    // long-polls on node 2 are forwarded to node 1, and node 2's events for the key are
    // appended through node 1 (channels across nodes).
    assert_eq!(n1.pull_now(), None);
    let mut dev = n1.device();
    dev.register(&["ep=sub-mover", "lt=300"], TWO_OBSERVABLE);
    until_listed(&n2, &["sub-mover"]);
    let presubs = json!([{"endpoint-name": "sub-mover", "resource-path": ["/3303/0/5701"]}]);
    let r = n1.send_json("PUT", "/v2/subscriptions", presubs.to_string());
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let r = n1.call("PUT", "/v2/subscriptions/sub-mover/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    // n1 observes the subscribed resource (the pre-subscription applies at the device's
    // next registration or update; answer whatever comes).
    let on_n1 = until_observed(&dev, &["/3303/0/5700"]);
    let (old_token, from) = on_n1["/3303/0/5700"].clone();
    assert_eq!(from, n1.coap);

    dev.server = n2.coap;
    let t = Instant::now();
    dev.register(&["ep=sub-mover", "lt=300"], TWO_OBSERVABLE);
    let on_n2 = until_observed(&dev, &["/3303/0/5700", "/3303/0/5701"]);
    println!(
        "re-registered on n2; n2 observed both after {:?}",
        t.elapsed()
    );
    for (path, (_, from)) in &on_n2 {
        assert_eq!(*from, n2.coap, "{path} observed by n2, not n1");
    }
    let (token, _) = on_n2["/3303/0/5700"].clone();
    n2.clear_inbox();
    assert_eq!(
        notify(&dev, n2.coap, &token, 7, b"22.5"),
        Some(MessageType::Acknowledgement)
    );
    until_notified(&n2, "sub-mover", "/3303/0/5700", b"22.5");
    // n1 no longer has the observation (it learnt of the move from the watch).
    assert!(n1.wait_log("which owns it now", WAIT));
    assert_eq!(
        notify(&dev, n1.coap, &old_token, 8, b"23.0"),
        Some(MessageType::Reset),
        "n1 answers a notification of an observation it forgot with RST"
    );
    assert_eq!(
        n2.get("/v2/subscriptions/sub-mover").status,
        200,
        "the subscriptions are the cluster's"
    );
}

/// Waits (at most [`WAIT`]) until `d` counts `n` endpoints of its own.
fn until_owned(d: &Daemon, n: u64) {
    until_metric(d, "cluster_owned_endpoints", n);
}

/// Issue 22, a registration update arriving at a node that does not own the registration
/// (a UDP load balancer's mapping changed): node 2 accepts it (2.04) and takes the
/// registration over, node 1 forgets the device, node 2 observes the subscription made
/// through node 1 and the device's notification reaches a long-poll on node 2. An update
/// of a location no node has is 4.04 there as before.
#[test]
fn an_update_arriving_at_another_node_moves_the_registration_there() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert_eq!(n2.pull_now(), None);
    let mut dev = n1.device();
    let id = dev.register(&["ep=lb-mover", "lt=300"], TWO_OBSERVABLE);
    until_listed(&n2, &["lb-mover"]);
    let r = n1.call("PUT", "/v2/subscriptions/lb-mover/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let on_n1 = until_observed(&dev, &["/3303/0/5700"]);
    assert_eq!(on_n1["/3303/0/5700"].1, n1.coap);
    until_owned(&n1, 1);

    // The device's update goes to n2 now.
    dev.server = n2.coap;
    let t = Instant::now();
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed);
    let on_n2 = until_observed(&dev, &["/3303/0/5700"]);
    println!("updated through n2; n2 observed after {:?}", t.elapsed());
    let (token, from) = on_n2["/3303/0/5700"].clone();
    assert_eq!(from, n2.coap);
    until_owned(&n2, 1);
    until_owned(&n1, 0);
    assert!(n1.wait_log("which owns it now", WAIT));
    assert!(n2.wait_log("this node owns it now", WAIT));
    // The same registration (its location stays), listed by both.
    assert_eq!(n1.get("/v2/endpoints/lb-mover").status, 200);
    assert_eq!(
        dev.update(&id, &[], None),
        ResponseType::Changed,
        "again on n2"
    );
    n2.clear_inbox();
    assert_eq!(
        notify(&dev, n2.coap, &token, 9, b"19.0"),
        Some(MessageType::Acknowledgement)
    );
    until_notified(&n2, "lb-mover", "/3303/0/5700", b"19.0");
    // A location no node has: 4.04 as before.
    assert_eq!(
        dev.update("0123456789abcdef", &[], None),
        ResponseType::NotFound
    );
    // n1 is told nothing by the device any more; a request for it through n1 is
    // forwarded to n2, which sends it (n1 does not talk to the device now).
    let r = n1.call("GET", "/v2/endpoints/lb-mover/3/0/0", None, None);
    assert_eq!(r.status, 202, "forwarded to n2: {}", r.body);
    let deadline = Instant::now() + WAIT;
    loop {
        let (req, from) = dev
            .recv_request(deadline.saturating_duration_since(Instant::now()))
            .expect("n2 sends the read");
        assert_eq!(from, n2.coap, "only n2 talks to the device");
        if support::coap::path_of(&req) == "/3/0/0" {
            break;
        }
    }
}

/// A device's registration removed through a node that does not own it (a REST `DELETE
/// /endpoints/{name}` on node 2, and a CoAP de-registration that reaches node 2) is gone
/// from its owner too: the device's next update there is 4.04 and no node lists it.
/// Before, the owner kept it in memory and the next update wrote it back: every node
/// listed it again and its channel got `reg-updates` after the de-registration (found by
/// an outside review).
#[test]
fn a_registration_removed_through_another_node_is_gone_from_its_owner() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    for how in ["rest", "coap"] {
        let ep = format!("ghost-{how}");
        let mut dev = n1.device();
        let id = dev.register(&[&format!("ep={ep}"), "lt=300"], LINKS);
        until_listed(&n2, &[ep.as_str()]);
        until_owned(&n1, 1);
        if how == "rest" {
            let r = n2.call("DELETE", &format!("/v2/endpoints/{ep}"), None, None);
            assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
        } else {
            let mut other = n2.device();
            assert_eq!(other.deregister(&id), ResponseType::Deleted);
        }
        // Gone from its owner's memory: listed by neither node.
        let deadline = Instant::now() + WAIT;
        while n1.get(&format!("/v2/endpoints/{ep}")).status != 404 {
            assert!(
                Instant::now() < deadline,
                "{how}: the owner still lists {ep}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        until_owned(&n1, 0);
        // Its next update, to the owner, is refused: it registers again.
        assert_eq!(dev.update(&id, &[], None), ResponseType::NotFound, "{how}");
        std::thread::sleep(Duration::from_millis(500));
        for n in [&n1, &n2] {
            assert_eq!(n.get(&format!("/v2/endpoints/{ep}")).status, 404, "{how}");
        }
    }
}

/// Issue 22, a queue-mode device moving by an update: a request queued for it on node 1
/// while it slept is taken by node 2 when the device's update arrives there, and sent to
/// the device right after the update's answer; its answer comes to node 2's long-poll.
#[test]
fn a_queue_mode_device_updating_on_another_node_gets_its_queued_request_there() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert_eq!(n2.pull_now(), None);
    let mut dev = n1.device();
    let id = dev.register(&["ep=sleeper", "lt=300", "b=UQ"], LINKS);
    until_listed(&n2, &["sleeper"]);
    // The device sleeps: the request waits on n1 (nothing is sent).
    let rid = n1.async_request("GET", "/v2/endpoints/sleeper/3/0/0", None, None);
    support::no_request(&dev, Duration::from_millis(300), "the device sleeps");
    assert_eq!(n1.metric("requests_queued"), 1);

    dev.server = n2.coap;
    assert_eq!(dev.update(&id, &[], None), ResponseType::Changed);
    let (req, from) = dev.recv_request(WAIT).expect("the queued request, from n2");
    assert_eq!(from, n2.coap, "n2 owns the device now");
    assert_eq!(support::coap::path_of(&req), "/3/0/0");
    dev.reply(&req, from, ResponseType::Content, b"moved", None, None);
    let answer = n2.async_response(&rid, WAIT);
    assert_eq!(answer["payload"], support::b64(b"moved"));
    until_metric(&n1, "requests_queued", 0);
    until_owned(&n1, 0);
    until_owned(&n2, 1);
}

/// Issue 22, a certificate revoked through one node is refused on every node: a device
/// certificate from node 1's `/api/cert` (the cluster's CA) does a DTLS handshake with
/// node 2 and registers there; revoked through node 1, node 2 closes the session and
/// refuses the certificate's next handshake (node 2 never saw the certificate issued: it
/// learnt of it, and of its revocation, from the store's watch).
#[test]
fn a_certificate_revoked_on_one_node_is_refused_on_another() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_custom(DTLS, &cluster(&[server.url()], "n1"));
    let n2 = dtls_node(&server, &n1, "n2");
    let dir = tempfile::tempdir().unwrap();
    let ep = support::certs::device_certificate(&n1, dir.path());
    let mut dev = DtlsDevice::connect_cert(dtls_addr(&n2), dir.path()).expect("handshake on n2");
    let id = dev
        .register()
        .expect("registered on n2 with the certificate");
    assert_eq!(dev.update(&id), Some(ResponseType::Changed));
    assert_eq!(n2.metric("coap_dtls_sessions"), 1);
    until_listed(&n1, &[ep.as_str()]);

    let t = Instant::now();
    let r = n1.call(
        "DELETE",
        &format!("/v2/device-credentials/{ep}"),
        None,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    until_metric(&n2, "coap_dtls_sessions", 0);
    println!(
        "revoked on n1; n2 closed the session after {:?}",
        t.elapsed()
    );
    assert_eq!(
        dev.update(&id),
        None,
        "the revoked session still answers on n2"
    );
    assert!(DtlsDevice::connect_cert(dtls_addr(&n2), dir.path()).is_err());
    n2.expect_log(&format!("revoked (CN={ep}"), WAIT);
}
