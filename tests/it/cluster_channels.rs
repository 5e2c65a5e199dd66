//! Issue 22, notification channels cluster-wide: each key's events are queued and
//! delivered by one node at a time, the key's channel owner (a lease in NATS); the other
//! nodes send their events for the key to it and forward the key's long-polls there.
//! Real nats-server, real daemon processes, testkit UDP devices, a real webhook receiver.
//! Timings are printed, not asserted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageType};
use connectord_testkit::nats::NatsServer;
use serde_json::{Value, json};

use crate::cluster::{LINKS, WAIT, cluster, second_node};
use crate::support::receiver::Receiver;
use crate::support::{self, Daemon, Events, observe_content, send_packet};

/// How long a killed owner's lease may take to be taken over, and its events delivered:
/// the lease lives 6 s, a forwarded pull or append retries for 15 s.
const TAKEOVER: Duration = Duration::from_secs(30);

/// The `ep` of each event of `kind` received so far.
fn eps(events: &Events, kind: &str) -> Vec<String> {
    support::strings_of(&Value::Array(events.of(kind)), "ep")
}

/// Waits until `d` knows `n` notification channels (another node's record reaches it
/// through the channels watch).
fn until_channels(d: &Daemon, n: u64) {
    let t = Instant::now();
    while d.metric("notification_channels") < n {
        assert!(t.elapsed() < WAIT, "the channel never reached this node");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pulls (without waiting) on `d` until `done` holds or `timeout` passes, accepting a
/// 503 (the owner being replaced) as "nothing yet".
fn collect(d: &Daemon, timeout: Duration, done: impl Fn(&Events) -> bool) -> Events {
    let deadline = Instant::now() + timeout;
    let mut all = Events::default();
    loop {
        let r = d.get("/v2/notification/pull?noWait=true");
        match r.status {
            200 => all.add(&r.json()),
            204 | 503 => {}
            s => panic!("pull answered {s}: {}", r.body),
        }
        if done(&all) || Instant::now() >= deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The payloads (base64) of the notifications among `e`, in order.
fn payloads(e: &Events) -> Vec<String> {
    e.of("notifications")
        .iter()
        .map(|n| n["payload"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Pulls on `d` until a notification of `value` arrives or [`WAIT`] passes: the payloads
/// of every notification pulled.
fn until_payload(d: &Daemon, value: &[u8]) -> Vec<String> {
    let want = support::b64(value);
    payloads(&collect(d, WAIT, |e| payloads(e).contains(&want)))
}

/// Answers the daemon's next observe request with `value`: its token and where it came
/// from.
fn accept_observe(dev: &support::coap::Device, value: &str) -> (Vec<u8>, SocketAddr) {
    let (req, from) = dev.recv_request(WAIT).expect("no observe request");
    assert_eq!(
        support::coap::uint_option(&req, CoapOption::Observe),
        Some(0)
    );
    let p = observe_content(
        MessageType::Acknowledgement,
        req.header.message_id,
        req.get_token(),
        1,
        value.as_bytes(),
    );
    send_packet(dev, &p, from);
    (req.get_token().to_vec(), from)
}

/// The registrations (by `ep`) of the callback deliveries `rx` received, in order, from
/// its `from`th request on.
fn delivered_eps_from(rx: &Receiver, from: usize) -> Vec<String> {
    rx.requests()
        .iter()
        .skip(from)
        .filter(|r| r.method == "POST" || (r.method == "PUT" && !r.body.is_empty()))
        .flat_map(|r| {
            r.json()["registrations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|e| e["ep"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// [`delivered_eps_from`] the first request.
fn delivered_eps(rx: &Receiver) -> Vec<String> {
    delivered_eps_from(rx, 0)
}

/// Waits until `GET /v2/cluster` on `d` gives each named member that many
/// `owned_channels`.
fn until_owned_channels(d: &Daemon, want: &[(&str, u64)]) {
    let t = Instant::now();
    loop {
        let body = d.get("/v2/cluster").json();
        let got: Vec<(String, u64)> = body["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let n = m["owned_channels"]
                    .as_u64()
                    .expect("owned_channels in every member");
                (m["node"].as_str().unwrap().to_string(), n)
            })
            .collect();
        let matches = want
            .iter()
            .all(|(n, c)| got.iter().any(|(gn, gc)| gn == n && gc == c));
        if matches {
            return;
        }
        assert!(
            t.elapsed() < WAIT,
            "owned_channels in /v2/cluster: {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A long-poll channel owned by node 1: devices registering alternately on node 2 and
/// node 1 reach it as one ordered stream, each event once, whichever node is pulled
/// (node 2 forwards its pulls to node 1); a device of node 2 observed through node 2
/// sends notifications that reach the key's channel on node 1 after its registration; a
/// long-poll waiting on node 2 is answered by an event made on node 1.
#[test]
fn a_long_poll_on_any_node_gets_every_event_of_its_key_in_order_once() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    // The key's channel is made on n1, which takes its lease; n2 learns of it.
    assert!(n1.pull_now().is_none());
    until_channels(&n2, 1);
    assert_eq!(n1.metric("cluster_owned_channels"), 1);
    assert_eq!(n2.metric("cluster_owned_channels"), 0);
    // Every node's `GET /v2/cluster` tells who owns channels (from the heartbeats).
    for node in [&n1, &n2] {
        until_owned_channels(node, &[("n1", 1), ("n2", 0)]);
    }

    let t = Instant::now();
    let mut devices = Vec::new();
    for (i, node) in [&n2, &n1, &n2, &n1, &n2].into_iter().enumerate() {
        let mut dev = node.device();
        dev.register(&[&format!("ep=ordered-{i}"), "lt=300"], LINKS);
        devices.push(dev);
    }
    println!("5 registrations on two nodes took {:?}", t.elapsed());
    let want: Vec<String> = (0..5).map(|i| format!("ordered-{i}")).collect();
    // Half pulled through n2 (forwarded to the owner), the rest on n1.
    let t = Instant::now();
    let first = collect(&n2, WAIT, |e| e.of("registrations").len() >= 2);
    let mut got = eps(&first, "registrations");
    println!(
        "n2's forwarded pulls got {} events in {:?}",
        got.len(),
        t.elapsed()
    );
    let rest = collect(&n1, WAIT, |e| {
        got.len() + e.of("registrations").len() >= want.len()
    });
    got.extend(eps(&rest, "registrations"));
    assert_eq!(got, want, "one stream, in order, each once");
    assert!(n1.pull_now().is_none(), "nothing twice (n1)");
    assert!(n2.pull_now().is_none(), "nothing twice (n2)");

    // Notifications of a device of n2, observed through n2 (its owner).
    let dev = &devices[0];
    let r = n2.call("PUT", "/v2/subscriptions/ordered-0/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let (token, from) = accept_observe(dev, "20");
    for (i, v) in ["21", "22", "23"].into_iter().enumerate() {
        let p = observe_content(
            MessageType::NonConfirmable,
            900 + i as u16,
            &token,
            2 + i as u32,
            v.as_bytes(),
        );
        send_packet(dev, &p, from);
    }
    let want_values: Vec<String> = ["21", "22", "23"]
        .iter()
        .map(|v| support::b64(v.as_bytes()))
        .collect();
    let values = |e: &Events| -> Vec<String> {
        payloads(e)
            .into_iter()
            .filter(|p| *p != support::b64(b"20"))
            .collect()
    };
    // The subscription's own answer (an async response with the first value, when the
    // PUT said 202) comes by its own path: not ordered with the notifications, so it is
    // waited for too before "nothing twice" is asked.
    let async_id = serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["async-response-id"].as_str().map(String::from));
    let answered = |e: &Events| {
        async_id.as_ref().is_none_or(|id| {
            e.of("async-responses")
                .iter()
                .any(|a| a["id"].as_str() == Some(id.as_str()))
        })
    };
    let t = Instant::now();
    let notes = collect(&n1, WAIT, |e| values(e).len() >= 3 && answered(e));
    println!(
        "notifications of a device of n2 pulled on n1 after {:?}",
        t.elapsed()
    );
    assert_eq!(values(&notes), want_values, "in order, each once");
    let again = n2.pull_now();
    assert!(again.is_none(), "nothing twice: {again:?}");

    // A long-poll waiting on n2 (forwarded with its wait) is answered by an event made
    // on n1.
    let waiting = {
        let url = n2.url("/v2/notification/pull");
        let key = n2.key.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = support::http(
                "GET",
                &url,
                &[("Authorization", &format!("Bearer {key}"))],
                None,
            );
            (r, t)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let made = Instant::now();
    n1.device().register(&["ep=late", "lt=300"], LINKS);
    let (r, started) = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["registrations"][0]["ep"], "late");
    println!(
        "a long-poll waiting on n2 for {:?} got n1's event {:?} after it was made",
        started.elapsed(),
        made.elapsed()
    );
    assert!(n1.pull_now().is_none(), "acknowledged by the next pull");
}

/// A callback set on node 1 (its owner) gets the events of devices on node 2 and on
/// node 1, each delivered once: node 2 delivers nothing itself in steady state. The
/// callback is visible on node 2 too.
#[test]
fn a_callback_set_on_one_node_gets_other_nodes_events_once() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    let rx = Receiver::start(0);
    let body = json!({"url": rx.url("/hook"), "headers": {}});
    let r = n1.send_json("PUT", "/v2/notification/callback", body.to_string());
    assert_eq!(r.status, 204, "{}", r.body);
    until_channels(&n2, 1);
    let t = Instant::now();
    while n2.get("/v2/notification/callback").status != 200 {
        assert!(t.elapsed() < WAIT, "n2 never saw the callback");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(n2.get("/v2/notification/pull").status, 409);
    assert_eq!(n1.metric("cluster_owned_channels"), 1);

    let t = Instant::now();
    for (i, node) in [&n2, &n2, &n1, &n2].into_iter().enumerate() {
        node.device()
            .register(&[&format!("ep=pushed-{i}"), "lt=300"], LINKS);
    }
    let want: Vec<String> = (0..4).map(|i| format!("pushed-{i}")).collect();
    rx.wait(WAIT, |_| delivered_eps(&rx).len() >= 4);
    println!("4 events from two nodes delivered after {:?}", t.elapsed());
    // Time for a second delivery, if some node made one.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(delivered_eps(&rx), want, "in order, each once");
    assert_eq!(n2.metric("cluster_owned_channels"), 0);
    assert_eq!(n2.metric("events_queued"), 0);
}

/// Node 1, the owner of a long-poll channel and of a callback channel, is killed with
/// -9 while events acknowledged to their devices (made on node 2) wait in both (the
/// receiver refused them so far). Node 2 takes both leases once they lapse, loads the
/// events and delivers every one: the long-poll through its pulls, the callback by
/// itself; none is lost (the callback may see a batch twice, never miss one).
#[test]
fn a_killed_channel_owner_is_replaced_and_nothing_acknowledged_is_lost() {
    let server = NatsServer::start().unwrap();
    let mut n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    // A second key, for the callback.
    let r = n1.send_json(
        "POST",
        "/api/api_tokens",
        json!({"name": "hook"}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let hook_key = r.json()["access_key"].as_str().unwrap().to_string();
    let n2 = second_node(&server, &n1, "n2", "");
    assert!(
        n1.pull_now().is_none(),
        "the long-poll channel, owned by n1"
    );
    let rx = Receiver::start(0);
    let body = json!({"url": rx.url("/hook"), "headers": {}});
    let r = support::http(
        "PUT",
        &n1.url("/v2/notification/callback"),
        &[
            ("Authorization", &format!("Bearer {hook_key}")),
            ("Content-Type", "application/json"),
        ],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    until_channels(&n2, 2);
    assert_eq!(n1.metric("cluster_owned_channels"), 2);
    // The receiver refuses for now: n1 keeps the events and retries.
    rx.status.store(503, std::sync::atomic::Ordering::Relaxed);
    let want: Vec<String> = (0..3).map(|i| format!("kept-{i}")).collect();
    for ep in &want {
        n2.device()
            .register(&[&format!("ep={ep}"), "lt=300"], LINKS);
    }
    assert!(
        rx.wait(WAIT, |r| r.len() >= 2).len() >= 2,
        "n1 tried the callback"
    );
    n1.0.kill9();
    let killed = Instant::now();
    // What came before was n1's, refused; what comes now is n2's.
    let refused = rx.requests().len();
    rx.status.store(200, std::sync::atomic::Ordering::Relaxed);

    let polled = collect(&n2, TAKEOVER, |e| e.of("registrations").len() >= 3);
    println!(
        "n1 killed; n2 answered its events to a pull after {:?}",
        killed.elapsed()
    );
    assert_eq!(eps(&polled, "registrations"), want, "none lost, in order");
    assert!(n2.pull_now().is_none(), "each once");

    let t = Instant::now();
    loop {
        let got = delivered_eps_from(&rx, refused);
        if want.iter().all(|w| got.contains(w)) {
            break;
        }
        assert!(
            t.elapsed() < TAKEOVER,
            "the callback never got every event: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "n1 killed; n2 delivered the callback's events after {:?} ({} requests refused before)",
        killed.elapsed(),
        refused
    );
    // Every delivery after the kill came from n2; in order, nothing lost.
    let got = delivered_eps_from(&rx, refused);
    let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
    for (i, ep) in got.iter().enumerate() {
        firsts.entry(ep.clone()).or_insert(i);
    }
    let order: Vec<&String> = want.iter().collect();
    let mut by_first: Vec<&String> = firsts.keys().collect();
    by_first.sort_by_key(|ep| firsts[*ep]);
    assert_eq!(by_first, order, "first deliveries in order: {got:?}");
    assert_eq!(n2.metric("cluster_owned_channels"), 2);
}

/// A long-poll that node 2 forwarded to the channel's owner, node 1, when node 1 is
/// killed: node 2 takes the channel once node 1's lease lapses and the same long-poll
/// gets the event made meanwhile. Before, it waited for node 1's answer for its whole
/// bound and got 503 "the state store is failing" after 36 s while node 2 held the event
/// (found by an outside review).
#[test]
fn a_long_poll_forwarded_to_a_killed_owner_is_answered_by_the_new_owner() {
    let server = NatsServer::start().unwrap();
    let mut n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert!(n1.pull_now().is_none(), "the channel, owned by n1");
    until_channels(&n2, 1);
    let (url, key) = (n2.url("/v2/notification/pull"), n2.key.clone());
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let auth = format!("Bearer {key}");
        let r = support::http("GET", &url, &[("Authorization", &auth)], None);
        (r, t.elapsed())
    });
    // The poll is held by n1 now.
    std::thread::sleep(Duration::from_millis(500));
    n1.0.kill9();
    // Answered once the event is stored, by n2 as the new owner (retransmitted until).
    let mut dev = n2.device();
    support::failover::try_register(&mut dev, "after-kill", 300, false, TAKEOVER)
        .unwrap_or_else(|e| panic!("the registration on n2: {e}"));
    let (r, took) = poll.join().unwrap();
    println!("the forwarded long-poll answered after {took:?}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("after-kill"), "{}", r.body);
}

/// A channel owner's clean stop releases its leases: node 2 takes the channel at its
/// next need (a pull) without waiting for the lease to lapse, with the events node 1 had
/// queued.
#[test]
fn a_channel_owners_clean_stop_hands_the_channel_over() {
    let server = NatsServer::start().unwrap();
    let mut n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert!(n1.pull_now().is_none());
    until_channels(&n2, 1);
    let want: Vec<String> = (0..3).map(|i| format!("handed-{i}")).collect();
    for ep in &want {
        n1.device()
            .register(&[&format!("ep={ep}"), "lt=300"], LINKS);
    }
    n1.signal("TERM");
    assert_eq!(n1.wait_exit(WAIT), Some(0));
    let stopped = Instant::now();
    assert!(
        n1.logs()
            .iter()
            .any(|l| l.contains("released 1 channel leases")),
        "{:?}",
        n1.logs()
    );
    let got = collect(&n2, WAIT, |e| e.of("registrations").len() >= 3);
    println!(
        "n1 stopped; n2 answered its queued events after {:?}",
        stopped.elapsed()
    );
    assert_eq!(eps(&got, "registrations"), want);
    assert_eq!(n2.metric("cluster_owned_channels"), 1);
}

/// A long-poll on node 2 (forwarded to node 1, the owner) whose client gives up while it
/// waits loses no event: what the owner answered to the abandoned poll is queued again at
/// once, and the client's next pulls on node 2 get every event, in order, once (a
/// duplicate is allowed only for what the abandoned poll may have held: the first event).
#[test]
fn a_forwarded_long_poll_whose_client_aborts_loses_no_event() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert!(n1.pull_now().is_none());
    until_channels(&n2, 1);
    crate::notifications::abort_a_long_poll(&n2);
    let aborted = Instant::now();
    let mut sent = Vec::new();
    for at in [0, 1, 3] {
        std::thread::sleep(Duration::from_secs(at).saturating_sub(aborted.elapsed()));
        let ep = format!("after-{at}s");
        n2.device()
            .register(&[&format!("ep={ep}"), "lt=300"], LINKS);
        sent.push(ep);
    }
    let t = Instant::now();
    let e = collect(&n2, WAIT, |e| e.of("registrations").len() >= sent.len());
    println!("n2's pulls got the events {:?} after the last", t.elapsed());
    let mut got = eps(&e, "registrations");
    if got.len() > sent.len() && got[0] == got[1] {
        got.remove(0);
    }
    assert_eq!(got, sent, "every event, in order, once");
    assert!(n2.pull_now().is_none(), "nothing else");
}

/// The async response of a request to a device of node 1 (sent through node 1, its
/// owner) reaches the key's channel, owned by node 2: node 1 sends it there and forgets
/// the request once node 2 stored it; a pull on either node answers it, once.
#[test]
fn an_async_response_reaches_the_keys_channel_on_another_node() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    // The channel is made on n2, which owns it.
    assert!(n2.pull_now().is_none());
    until_channels(&n1, 1);
    assert_eq!(n2.metric("cluster_owned_channels"), 1);
    let mut dev = n1.device();
    dev.register(&["ep=answering", "lt=300"], LINKS);
    assert_eq!(
        eps(
            &collect(&n2, WAIT, |e| !e.of("registrations").is_empty()),
            "registrations"
        ),
        ["answering"]
    );
    let id = n1.async_request("GET", "/v2/endpoints/answering/3/0/0", None, None);
    let (req, from) = dev.recv_request(WAIT).expect("the request never came");
    dev.reply(
        &req,
        from,
        coap_lite::ResponseType::Content,
        b"answer",
        None,
        None,
    );
    let t = Instant::now();
    let e = collect(&n1, WAIT, |e| e.async_response(&id).is_some());
    println!(
        "the async response, made on n1, pulled through n1 from n2 after {:?}",
        t.elapsed()
    );
    let r = e.async_response(&id).expect("no async response");
    assert_eq!(r["payload"], support::b64(b"answer"), "{r}");
    assert_eq!(e.count(), 1, "once: {e:?}");
    assert!(n2.pull_now().is_none(), "nothing twice");
    assert_eq!(n1.metric("requests_queued"), 0);
}

/// What one long-poll loop received: the `ep` of every registration each answer brought,
/// in the order received.
type Received = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A long-poll loop of one key on `d` until `stop`, into `got`.
fn poll_loop(
    d: &Daemon,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    got: Received,
) -> std::thread::JoinHandle<()> {
    let url = d.url("/v2/notification/pull");
    let auth = format!("Bearer {}", d.key);
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = support::http("GET", &url, &[("Authorization", &auth)], None);
            match r.status {
                200 => {
                    let mut e = Events::default();
                    e.add(&r.json());
                    got.lock().unwrap().extend(eps(&e, "registrations"));
                }
                204 | 503 => {}
                s => panic!("pull answered {s}: {}", r.body),
            }
        }
    })
}

/// The numbers of `prefix`'s eps in `got`, in the order received.
fn numbers_of(got: &[String], prefix: &str) -> Vec<usize> {
    got.iter()
        .filter_map(|ep| ep.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// Two replicas of an application long-poll one key, one through each node, while devices
/// register on both nodes: every event reaches one of them (at least once) within a
/// bound, each node's events in their order in each poller's stream. The long-poll wait
/// is long (35 s, under the test client's 40 s; the bound 25 s) so that an answer in
/// flight nobody acknowledges shows as a stall rather than a pause.
#[test]
fn concurrent_long_polls_of_one_key_on_two_nodes_get_every_event() {
    const N: usize = 30;
    let extra = "[notifications]\nlong_poll_s = 35\n";
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&format!("{}{extra}", cluster(&[server.url()], "n1")));
    let n2 = second_node(&server, &n1, "n2", extra);
    assert!(n1.pull_now().is_none());
    until_channels(&n2, 1);
    assert_eq!(n1.metric("cluster_owned_channels"), 1);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let got: [Received; 2] = Default::default();
    let pollers = [
        poll_loop(&n1, stop.clone(), got[0].clone()),
        poll_loop(&n2, stop.clone(), got[1].clone()),
    ];
    let union = |prefix: &str| -> Vec<usize> {
        let mut all: Vec<usize> = got
            .iter()
            .flat_map(|g| numbers_of(&g.lock().unwrap(), prefix))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    let want: Vec<usize> = (0..N).collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for (name, node) in [("a", &n1), ("b", &n2)] {
            s.spawn(move || {
                for i in 0..N {
                    node.device()
                        .register(&[&format!("ep={name}-{i}"), "lt=300"], LINKS);
                    // Spread over many answers (each a chance for the pollers to meet).
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
    });
    println!(
        "{} registrations on two nodes took {:?}",
        2 * N,
        t.elapsed()
    );
    let bound = Duration::from_secs(25);
    let t = Instant::now();
    while (union("a-") != want || union("b-") != want) && t.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "the pollers had {} + {} of {} events {:?} after the last registration (n1's poller {}, n2's {})",
        union("a-").len(),
        union("b-").len(),
        2 * N,
        t.elapsed(),
        got[0].lock().unwrap().len(),
        got[1].lock().unwrap().len(),
    );
    for prefix in ["a-", "b-"] {
        assert_eq!(union(prefix), want, "every {prefix} event arrived in time");
        for g in &got {
            let mine = numbers_of(&g.lock().unwrap(), prefix);
            assert!(
                mine.windows(2).all(|w| w[0] <= w[1]),
                "{prefix} events in order in one poller's stream: {mine:?}"
            );
        }
    }
    // The pollers end with their next answer (events made for them).
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in 0..4 {
        n1.device()
            .register(&[&format!("ep=z-end{i}"), "lt=300"], LINKS);
    }
    for p in pollers {
        p.join().unwrap();
    }
}

/// Devices registering at once on a node that does not own the key's channel: each
/// registration's answer waits until its event is stored through the owner, and the
/// events of many registrations share the calls to it, so all are answered within a bound
/// and all their events are pulled, each once. Times printed: one registration on the
/// owner and on the other node, and the whole burst.
#[test]
fn many_registrations_on_a_non_owner_are_answered_and_their_events_arrive() {
    const M: usize = 200;
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert!(n1.pull_now().is_none());
    until_channels(&n2, 1);
    assert_eq!(n1.metric("cluster_owned_channels"), 1);

    for (name, node) in [("owner", &n1), ("non-owner", &n2)] {
        let mut took = Vec::new();
        for i in 0..5 {
            let t = Instant::now();
            node.device()
                .register(&[&format!("ep=single-{name}-{i}"), "lt=300"], LINKS);
            took.push(t.elapsed());
        }
        println!("one registration on the {name} node took {took:?}");
    }
    let singles = collect(&n1, WAIT, |e| e.of("registrations").len() >= 10);
    assert_eq!(eps(&singles, "registrations").len(), 10);

    let t = Instant::now();
    let answered: Vec<Duration> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..M)
            .map(|i| {
                let n2 = &n2;
                s.spawn(move || {
                    let mut dev = n2.device();
                    let t = Instant::now();
                    dev.register(&[&format!("ep=burst-{i}"), "lt=300"], LINKS);
                    t.elapsed()
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all = t.elapsed();
    let slowest = answered.iter().max().copied().unwrap_or_default();
    println!(
        "{M} registrations at once on the non-owner: all answered in {all:?} (slowest {slowest:?})"
    );
    assert!(all < Duration::from_secs(60), "answered within the bound");

    let t = Instant::now();
    let got = collect(&n1, Duration::from_secs(30), |e| {
        e.of("registrations").len() >= M
    });
    let mut got = eps(&got, "registrations");
    println!("their {} events pulled in {:?}", got.len(), t.elapsed());
    got.sort();
    let mut want: Vec<String> = (0..M).map(|i| format!("burst-{i}")).collect();
    want.sort();
    assert_eq!(got, want, "every registration's event, once");
}

/// Issue 24, one feed for every observation: in a cluster, a batch whose events go to a
/// key whose channel another node owns does not hold up the next batch while that node
/// does not answer. Key A's channel is on n1, key B's on n2; a device of n2 has A
/// subscribed to one resource and B to another. With n1 stopped (SIGSTOP), A's CON
/// notification waits for n1 (not acknowledged to the device yet), while B's, sent after
/// it, reaches B's channel on n2 at once. Once n1 runs again, A's arrives there and the
/// device gets its ACK.
#[test]
fn a_peer_that_does_not_answer_holds_up_no_other_keys_notifications() {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    // Key A (the admin key): its channel on n1.
    assert!(n1.pull_now().is_none());
    // Key B: made on n1, its channel on n2.
    let r = n1.send_json("POST", "/api/api_tokens", json!({"name": "b"}).to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    let kb = r.json()["access_key"].as_str().unwrap().to_string();
    let pull_b = || {
        let r = support::bearer_call(
            &n2,
            "GET",
            "/v2/notification/pull?noWait=true",
            Some(&kb),
            None,
        );
        match r.status {
            200 => Some(r.json()),
            204 => None,
            // The key is not known on n2 yet.
            401 => None,
            s => panic!("B's pull on n2 answered {s}: {}", r.body),
        }
    };
    let t = Instant::now();
    while support::bearer_call(&n2, "GET", "/v2/endpoints", Some(&kb), None).status != 200 {
        assert!(t.elapsed() < WAIT, "key B never worked on n2");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pull_b().is_none());
    until_channels(&n1, 2);
    until_channels(&n2, 2);
    until_owned_channels(&n2, &[("n1", 1), ("n2", 1)]);

    let links = "</3303/0/5700>;obs,</3303/0/5701>;obs";
    let mut dev = n2.device();
    dev.register(&["ep=two-keys", "lt=300"], links);
    let r = n2.call("PUT", "/v2/subscriptions/two-keys/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let (token_a, from) = accept_observe(&dev, "a0");
    let r = support::bearer_call(
        &n2,
        "PUT",
        "/v2/subscriptions/two-keys/3303/0/5701",
        Some(&kb),
        None,
    );
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let (token_b, _) = accept_observe(&dev, "b0");
    // Drain the subscriptions' own answers and first values.
    std::thread::sleep(Duration::from_millis(500));
    while pull_b().is_some() {}
    let _ = collect(&n1, Duration::from_millis(500), |_| false);

    n1.signal("STOP");
    let a1 = observe_content(MessageType::Confirmable, 0x7101, &token_a, 2, b"a1");
    send_packet(&dev, &a1, from);
    // A's batch is waiting for n1 now; B's comes after it.
    std::thread::sleep(Duration::from_millis(300));
    let b1 = observe_content(MessageType::NonConfirmable, 0x7102, &token_b, 2, b"b1");
    let sent = Instant::now();
    send_packet(&dev, &b1, from);
    let mut got_b = None;
    while sent.elapsed() < Duration::from_secs(4) {
        if let Some(batch) = pull_b() {
            got_b = Some(batch);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let waited = sent.elapsed();
    let acked_early = dev.recv_raw(Duration::from_millis(100));
    n1.signal("CONT");
    let batch = got_b.expect("B's notification was held up behind A's forward to a stopped node");
    println!("B's notification reached its channel on n2 after {waited:?} with n1 stopped");
    assert_eq!(
        batch["notifications"][0]["payload"],
        support::b64(b"b1"),
        "{batch}"
    );
    assert!(
        acked_early.is_none(),
        "A's CON notification was acknowledged before n1 stored it: {:?}",
        acked_early.as_deref().map(coap_lite::Packet::from_bytes)
    );
    // n1 runs again: A's notification is stored there, and then acknowledged.
    let ack = dev
        .recv_raw(WAIT)
        .expect("A's notification never acknowledged");
    let ack = coap_lite::Packet::from_bytes(&ack).unwrap();
    assert_eq!(
        (ack.header.get_type(), ack.header.message_id),
        (MessageType::Acknowledgement, 0x7101)
    );
    let a_values = until_payload(&n1, b"a1");
    assert!(a_values.contains(&support::b64(b"a1")), "{a_values:?}");
    assert!(!a_values.contains(&support::b64(b"b1")), "B's went to A");
}

/// The fence of a lapsed owner's appends, end to end. n1 owns the admin key's channel and
/// is stopped (SIGSTOP) longer than its lease lives; a device of n2 sends a CON
/// notification, which n2 forwards to n1 (no answer) until the lease lapses, then takes
/// the channel over, stores it and acknowledges it; a pull on n2 gets it. n1 runs again
/// with n2's forwards of it waiting in its socket; then n2 stops cleanly and n1 takes the
/// channel back. The notification is not delivered a second time: n1, whose lease lapsed,
/// no longer stores the forwarded copies.
#[test]
fn a_channel_owner_resumed_after_its_lease_lapsed_stores_no_stale_copies() {
    let (_server, n1, mut n2, dev) = channel_on_n1_device_on_n2("lapsed", "</3303/0/5700>;obs");
    let _ = collect(&n1, Duration::from_millis(500), |_| false);
    let r = n2.call("PUT", "/v2/subscriptions/lapsed/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let (token, from) = accept_observe(&dev, "0");
    let _ = collect(&n1, Duration::from_secs(1), |_| false);

    n1.signal("STOP");
    let a1 = observe_content(MessageType::Confirmable, 0x7201, &token, 2, b"a1");
    send_packet(&dev, &a1, from);
    // Acknowledged once n2 took the channel over and stored it (CoAP retransmissions
    // are the device's: this one sends it again until then).
    let sent = Instant::now();
    let mut acked = false;
    while sent.elapsed() < Duration::from_secs(40) && !acked {
        match dev.recv_raw(Duration::from_secs(2)) {
            Some(ack) => {
                let ack = coap_lite::Packet::from_bytes(&ack).unwrap();
                acked = ack.header.message_id == 0x7201;
            }
            None => send_packet(&dev, &a1, from),
        }
    }
    assert!(acked, "n2 never took the channel over from the stopped n1");
    let got = collect(&n2, WAIT, |e| !e.of("notifications").is_empty());
    assert_eq!(payloads(&got), [support::b64(b"a1")]);
    // Acknowledged by the next pull.
    let _ = collect(&n2, Duration::from_millis(300), |_| false);

    n1.signal("CONT");
    std::thread::sleep(Duration::from_secs(4));
    n2.signal("TERM");
    assert_eq!(n2.wait_exit(WAIT), Some(0), "n2's clean stop");
    let again = collect(&n1, Duration::from_secs(8), |_| false);
    assert!(
        !payloads(&again).contains(&support::b64(b"a1")),
        "delivered again after the channel moved back: {:?}",
        payloads(&again)
    );
}

/// The fence, for the stale owner's own events. n1 owns the admin key's channel and
/// observes a device of its own; n1 is stopped (SIGSTOP) until n2 takes the channel over,
/// and the device sends a NON notification to n1 meanwhile. n1 runs again and handles it
/// at once, still taking itself for the channel's owner: the store's fence refuses the
/// event (n1's lease lapsed), and n1 steps down and sends it to n2, where the channel's
/// client gets it. Before the hub forwarded it, the event stayed in n1's memory only and
/// went with the step-down (a NON notification is not sent again).
#[test]
fn an_event_of_an_owner_whose_lease_lapsed_reaches_the_new_owner() {
    let (_server, n1, n2, mut dev) = channel_on_n1_device_on_n2("trigger", "</3/0>");
    let mut obs = n1.device();
    obs.register(&["ep=observed", "lt=300"], "</3303/0/5700>;obs");
    let r = n1.call("PUT", "/v2/subscriptions/observed/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let (token, from) = accept_observe(&obs, "0");
    let _ = collect(&n1, Duration::from_secs(1), |_| false);
    n1.signal("STOP");
    // n2 takes the channel over at its next event, once n1's lease lapsed.
    let started = Instant::now();
    let mut taken = false;
    let mut i = 0;
    while !taken {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "n2 never took the channel over"
        );
        i += 1;
        // A re-registration of the device on n2: an event for the key. Sent without
        // waiting for the answer, which comes once n2 stored the event.
        let links = format!("</3/{i}>");
        let mut r = support::coap::Req::new(coap_lite::RequestType::Post, &["rd"]);
        r.query = &["ep=trigger", "lt=300"];
        r.payload = links.as_bytes();
        r.content_format = Some(coap_lite::ContentFormat::ApplicationLinkFormat);
        let p = dev.build(&r);
        dev.send_raw(&p.to_bytes().unwrap());
        taken = eps(
            &collect(&n2, Duration::from_secs(2), |e| {
                !e.of("registrations").is_empty()
            }),
            "registrations",
        )
        .contains(&"trigger".to_string());
    }
    // The device's NON notification waits in the stopped n1's socket.
    let n = observe_content(MessageType::NonConfirmable, 0x7301, &token, 2, b"late");
    send_packet(&obs, &n, from);
    std::thread::sleep(Duration::from_millis(300));
    n1.signal("CONT");
    let got = until_payload(&n2, b"late");
    assert!(
        got.contains(&support::b64(b"late")),
        "the notification the stale owner took never reached the new owner: {got:?}"
    );
}

/// One JetStream API request to the nats-server on `port` (`$JS.API...`), over the NATS
/// text protocol on a plain TCP connection: its JSON answer.
/// Two nodes on one NATS server: n1 owns the admin key's channel, and the device `ep`
/// (with `links`) is registered on n2, its registration event seen on n1 (and stored
/// until the next pull acknowledges it: the events stream is not empty, which
/// [`refuse_new_events`] needs).
fn channel_on_n1_device_on_n2(
    ep: &str,
    links: &str,
) -> (NatsServer, Daemon, Daemon, support::coap::Device) {
    let server = NatsServer::start().unwrap();
    let n1 = Daemon::start_with(&cluster(&[server.url()], "n1"));
    let n2 = second_node(&server, &n1, "n2", "");
    assert!(n1.pull_now().is_none());
    until_channels(&n2, 1);
    until_owned_channels(&n2, &[("n1", 1)]);
    let mut dev = n2.device();
    dev.register(&[&format!("ep={ep}"), "lt=300"], links);
    let got = collect(&n1, WAIT, |e| {
        eps(e, "registrations").contains(&ep.to_string())
    });
    assert!(
        eps(&got, "registrations").contains(&ep.to_string()),
        "{ep}'s registration never reached n1"
    );
    (server, n1, n2, dev)
}

/// Makes the JetStream events stream (`cd_events`) refuse new messages (`max_msgs` at
/// its count, `discard: new`; it must hold some) while the leases, in a stream of their
/// own, keep working: the channel owner's store then refuses events. Its configuration
/// before, for [`accept_new_events`].
fn refuse_new_events(server: &NatsServer) -> Value {
    let info = js_request(server.port(), "$JS.API.STREAM.INFO.cd_events", &json!({}));
    let stored = info["state"]["messages"].as_u64().unwrap();
    assert!(stored > 0, "{info}");
    let original = info["config"].clone();
    let mut full = original.clone();
    full["max_msgs"] = json!(stored);
    full["discard"] = json!("new");
    let r = js_request(server.port(), "$JS.API.STREAM.UPDATE.cd_events", &full);
    assert!(r.get("error").is_none(), "{r}");
    original
}

/// Gives the events stream its configuration from before [`refuse_new_events`] back.
fn accept_new_events(server: &NatsServer, original: &Value) {
    let r = js_request(server.port(), "$JS.API.STREAM.UPDATE.cd_events", original);
    assert!(r.get("error").is_none(), "{r}");
}

fn js_request(port: u16, subject: &str, body: &Value) -> Value {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    let payload = body.to_string();
    write!(
        w,
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB test.reply 1\r\n\
         PUB {subject} test.reply {}\r\n{payload}\r\n",
        payload.len()
    )
    .unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("PING") {
            w.write_all(b"PONG\r\n").unwrap();
            continue;
        }
        if let Some(head) = line.strip_prefix("MSG ") {
            let len: usize = head.trim().rsplit(' ').next().unwrap().parse().unwrap();
            let mut buf = vec![0u8; len + 2];
            r.read_exact(&mut buf).unwrap();
            return serde_json::from_slice(&buf[..len]).unwrap();
        }
        assert!(!line.starts_with("-ERR"), "{line}");
    }
}

/// Issue 25 review: a CON notification forwarded to the node that owns its key's channel
/// is acknowledged to the device only once that node stored it. Before, when the owner
/// could not store it within the forwarding bound (15 s), the device got its ACK anyway
/// and the notification was lost. Here n1 owns the channel and its JetStream events
/// stream refuses new messages (`max_msgs` at its count, `discard: new`) while the
/// leases, in a stream of their own, keep working. Once it accepts them again, the
/// device's retransmission is taken as new, stored on n1 and acknowledged.
#[test]
fn a_notification_its_channel_owner_could_not_store_is_not_acknowledged() {
    let (server, n1, n2, dev) = channel_on_n1_device_on_n2("far", "</3303/0/5700>;obs");
    let r = n2.call("PUT", "/v2/subscriptions/far/3303/0/5700", None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let (token, from) = accept_observe(&dev, "v0");

    let original = refuse_new_events(&server);

    let v1 = observe_content(MessageType::Confirmable, 0x7201, &token, 2, b"v1");
    let sent = Instant::now();
    send_packet(&dev, &v1, from);
    // The forwarding bound is 15 s: wait past it.
    let acked = dev.recv_raw(Duration::from_secs(20));
    accept_new_events(&server, &original);
    assert!(
        acked.is_none(),
        "acknowledged after {:?} although its channel's owner never stored it",
        sent.elapsed()
    );
    // The device sends it again.
    send_packet(&dev, &v1, from);
    let ack = dev
        .recv_raw(WAIT)
        .expect("the retransmission was never acknowledged");
    let ack = coap_lite::Packet::from_bytes(&ack).unwrap();
    assert_eq!(
        (ack.header.get_type(), ack.header.message_id),
        (MessageType::Acknowledgement, 0x7201)
    );
    assert!(
        until_payload(&n1, b"v1").contains(&support::b64(b"v1")),
        "v1 never reached n1"
    );
}

/// An async response its key's channel owner could not store (its store refusing
/// writes) is sent again until it is stored, and arrives once: before, it was given up
/// after the forwarding bound (15 s), and its request, still stored, was answered only
/// after a restart. n1 owns the channel, the device is n2's, n1's JetStream events
/// stream refuses new messages (`max_msgs` at its count, `discard: new`) for a while.
#[test]
fn an_async_response_its_channel_owner_could_not_store_is_sent_again() {
    let (server, n1, n2, dev) = channel_on_n1_device_on_n2("refused", LINKS);
    let original = refuse_new_events(&server);

    let id = n2.async_request("GET", "/v2/endpoints/refused/3/0/0", None, None);
    let (req, from) = dev.recv_request(WAIT).expect("the request never came");
    dev.reply(
        &req,
        from,
        coap_lite::ResponseType::Content,
        b"late",
        None,
        None,
    );
    // Past the forwarding bound (15 s): the first forward was given up.
    n2.expect_log(
        "not stored: the key's channel owner was not reached",
        Duration::from_secs(25),
    );
    accept_new_events(&server, &original);
    let e = collect(&n1, Duration::from_secs(40), |e| {
        e.async_response(&id).is_some()
    });
    let r = e
        .async_response(&id)
        .expect("the async response never arrived");
    assert_eq!(r["payload"], support::b64(b"late"), "{r}");
    assert_eq!(e.count(), 1, "once: {e:?}");
    n2.expect_log("had not stored is delivered now", WAIT);
    // And no copy comes later.
    let later = collect(&n1, Duration::from_secs(3), |_| false);
    assert_eq!(later.count(), 0, "a second copy: {later:?}");
}
