//! Issue 22, item 4: failures under load. Three connectord processes on a three-server
//! NATS JetStream cluster (`replicas = 3`, each server and node started by the test on its
//! own loopback ports), a fleet of testkit UDP devices and REST clients; then `kill -9` of
//! one node, or of one NATS server (the JetStream meta leader). What must hold: every
//! registration acknowledged is listed (or was re-registered) on the survivors, every
//! request accepted (202) reaches its device and its answer the key's channel, stored
//! subscriptions survive, registration events of the surviving nodes are all delivered,
//! and REST and CoAP calls on the survivors fail at most during a bounded recovery window
//! (the failures and the window are printed; after it, none).
//!
//! Timings are printed, never asserted (2 shared cores); every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coap_lite::{RequestType, ResponseType};
use connectord_testkit::nats::NatsCluster;

use crate::support::failover::{self, start_nodes, try_http, try_register, try_update};
use crate::support::{self, Daemon, coap};

/// A bounded wait for one thing to happen.
const WAIT: Duration = Duration::from_secs(10);
/// How long a single CoAP or HTTP call of the load may take before it counts as failed.
const ANSWER: Duration = Duration::from_secs(3);
/// The fleet's lifetime: longer than a test, so that nothing expires meanwhile.
const LT: u32 = 300;
/// Requests the load sends at most per queue-mode device (under `[requests] queue_len`).
const MAX_QUEUED: usize = 6;
/// How long the calls must go on without a failure for the nodes to count as recovered.
/// Longer than a call may take ([`ANSWER`]), so that a call in flight when the window
/// starts ends inside it.
const CLEAN: Duration = Duration::from_secs(4);

/// A test device: its socket, endpoint name, registration id, the node (index) it is
/// registered with, and whether it is in queue mode (`b=UQ`: requests wait for it).
struct Dev {
    name: String,
    dev: coap::Device,
    reg: String,
    node: usize,
    queue: bool,
}

/// Opens the admin key's channel on every node (a pull without waiting): events of a key
/// are kept from its channel's creation on (mbed semantics), so a test that checks that no
/// event is lost opens it before the events happen.
fn open_channels(nodes: &[Daemon]) {
    for d in nodes {
        assert!(d.pull_now().is_none(), "no events yet");
    }
}

/// Registers `per_node` devices on each node, the first `queue` of them in queue mode;
/// every registration must be acknowledged.
fn register_fleet(nodes: &[Daemon], per_node: usize, queue: usize) -> Vec<Dev> {
    let mut fleet = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..per_node {
            let name = format!("n{}-{}{i}", n + 1, if i < queue { "q" } else { "d" });
            let mut dev = node.device();
            let reg = try_register(&mut dev, &name, LT, i < queue, ANSWER)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            fleet.push(Dev {
                name,
                dev,
                reg,
                node: n,
                queue: i < queue,
            });
        }
    }
    fleet
}

/// A request the test expects to reach a device: its async-response id, the endpoint and
/// the resource path.
#[derive(Debug, Clone)]
struct Queued {
    id: String,
    ep: String,
    path: String,
}

/// Sends `GET <path>` of `ep` through `node`; the accepted request, or why not.
fn queue_request(node: SocketAddr, key: &str, ep: &str, path: &str) -> Result<Queued, String> {
    let (status, body) = try_http(
        node,
        "GET",
        &format!("/v2/endpoints/{ep}{path}"),
        key,
        ANSWER,
    )?;
    if status != 202 {
        return Err(format!("{status} {body}"));
    }
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let id = json["async-response-id"]
        .as_str()
        .ok_or_else(|| format!("no id in {body}"))?;
    Ok(Queued {
        id: id.to_string(),
        ep: ep.to_string(),
        path: path.to_string(),
    })
}

/// One call of the load.
struct Call {
    at: Instant,
    ok: bool,
}

/// What the load did and what was acknowledged to it.
#[derive(Default)]
struct Seen {
    calls: Vec<Call>,
    /// The first failures, described (bounded).
    failures: Vec<String>,
    failed: BTreeMap<&'static str, usize>,
    /// Registrations acknowledged (2.01) to the load's fresh devices: name, node.
    registered: Vec<(String, usize)>,
    /// Requests accepted (202) to the load, by node.
    queued: Vec<(usize, Queued)>,
}

impl Seen {
    fn record(&mut self, what: &'static str, ok: bool, detail: impl FnOnce() -> String) {
        self.calls.push(Call {
            at: Instant::now(),
            ok,
        });
        if !ok {
            *self.failed.entry(what).or_default() += 1;
            if self.failures.len() < 20 {
                self.failures.push(format!("{what}: {}", detail()));
            }
        }
    }
}

fn lock(m: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The load on the nodes `targets` (indices into the nodes): one thread of REST calls
/// (the endpoint list, and requests to the targets' own queue-mode devices), one of CoAP
/// updates of `devices` and registrations of fresh devices.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    rest: Option<JoinHandle<()>>,
    coap: Option<JoinHandle<Vec<Dev>>>,
}

impl Load {
    fn start(nodes: &[Daemon], targets: &[usize], fleet: &mut Vec<Dev>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let key = nodes[0].key.clone();
        let rest_of: Vec<SocketAddr> = nodes.iter().map(|d| d.rest).collect();
        let coap_of: Vec<SocketAddr> = nodes.iter().map(|d| d.coap).collect();
        let queue_targets: Vec<(usize, String)> = fleet
            .iter()
            .filter(|d| d.queue && targets.contains(&d.node))
            .map(|d| (d.node, d.name.clone()))
            .collect();
        let (mine, rest): (Vec<Dev>, Vec<Dev>) = std::mem::take(fleet)
            .into_iter()
            .partition(|d| !d.queue && targets.contains(&d.node));
        *fleet = rest;

        let rest_thread = {
            let (stop, seen, key, targets) =
                (stop.clone(), seen.clone(), key.clone(), targets.to_vec());
            let rest_of = rest_of.clone();
            std::thread::spawn(move || {
                let mut sent: BTreeMap<String, usize> = BTreeMap::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let node = targets[i % targets.len()];
                    let r = try_http(rest_of[node], "GET", "/v2/endpoints", &key, ANSWER);
                    let ok = matches!(&r, Ok((200, _)));
                    lock(&seen).record("GET /v2/endpoints", ok, || format!("n{}: {r:?}", node + 1));
                    if i.is_multiple_of(8) && !queue_targets.is_empty() {
                        let (owner, ep) = &queue_targets[(i / 8) % queue_targets.len()];
                        let n = sent.entry(ep.clone()).or_default();
                        if *n < MAX_QUEUED {
                            // A path per attempt: a request whose answer the client did not
                            // get (timed out) may still have been accepted, and reaches the
                            // device besides the ones accepted (which the test counts).
                            let path = format!("/3/0/{}", 10 + *n);
                            *n += 1;
                            let r = queue_request(rest_of[*owner], &key, ep, &path);
                            let mut s = lock(&seen);
                            s.record("GET a resource (queued)", r.is_ok(), || {
                                format!("n{} {ep}{path}: {r:?}", owner + 1)
                            });
                            if let Ok(q) = r {
                                s.queued.push((*owner, q));
                            }
                        }
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };

        let coap_thread = {
            let (stop, seen, targets) = (stop.clone(), seen.clone(), targets.to_vec());
            std::thread::spawn(move || {
                let mut devices = mine;
                let mut i = 0usize;
                let mut fresh = 0usize;
                while !stop.load(Ordering::Relaxed) && !devices.is_empty() {
                    if i % 5 == 4 {
                        let node = targets[fresh % targets.len()];
                        let name = format!("fresh-{fresh}");
                        fresh += 1;
                        let mut dev = coap::Device::new(coap_of[node]);
                        let reg = try_register(&mut dev, &name, LT, false, ANSWER);
                        let mut s = lock(&seen);
                        s.record("register", reg.is_ok(), || {
                            format!("{name} on n{}: {reg:?}", node + 1)
                        });
                        if let Ok(reg) = reg {
                            s.registered.push((name.clone(), node));
                            drop(s);
                            devices.push(Dev {
                                name,
                                dev,
                                reg,
                                node,
                                queue: false,
                            });
                        }
                    } else {
                        let at = i % devices.len();
                        let d = &mut devices[at];
                        let r = try_update(&mut d.dev, &d.reg, ANSWER);
                        lock(&seen).record("update", r.is_ok(), || {
                            format!("{} on n{}: {r:?}", d.name, d.node + 1)
                        });
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                devices
            })
        };
        Load {
            stop,
            seen,
            rest: Some(rest_thread),
            coap: Some(coap_thread),
        }
    }

    /// Waits until the calls ending after `since` went on for [`CLEAN`] without a failure
    /// (at least 20 calls), at most `within` after `since`; returns when the last failure
    /// was (`since` when there was none).
    fn recovered(&self, since: Instant, within: Duration) -> Instant {
        loop {
            {
                let s = lock(&self.seen);
                let last_failure = s
                    .calls
                    .iter()
                    .filter(|c| !c.ok && c.at >= since)
                    .map(|c| c.at)
                    .max();
                let from = last_failure.unwrap_or(since);
                let ok_after = s.calls.iter().filter(|c| c.at > from).count();
                if from.elapsed() >= CLEAN && ok_after >= 20 {
                    return from;
                }
                assert!(
                    since.elapsed() < within,
                    "the calls did not go on without failing within {within:?}: {} failures \
                     ({:?}), the first: {:#?}",
                    s.failed.values().sum::<usize>(),
                    s.failed,
                    s.failures
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the load; returns what it saw and its devices.
    fn stop(mut self) -> (Seen, Vec<Dev>) {
        self.stop.store(true, Ordering::Relaxed);
        self.rest
            .take()
            .unwrap()
            .join()
            .expect("the REST load panicked");
        let devices = self
            .coap
            .take()
            .unwrap()
            .join()
            .expect("the CoAP load panicked");
        let seen = std::mem::take(&mut *lock(&self.seen));
        (seen, devices)
    }
}

/// Prints what the load saw around `event` at `at`, and asserts that no call failed after
/// `last_failure` (the end of the recovery window, [`Load::recovered`]).
fn report(seen: &Seen, event: &str, at: Instant, last_failure: Instant) {
    let before = seen.calls.iter().filter(|c| c.at < at).count();
    let failed_after = seen.calls.iter().filter(|c| c.at >= at && !c.ok).count();
    println!(
        "{event}: {} calls ({before} before it); {failed_after} failed after it, the last \
         {:?} after it; failures by kind {:?}; first failures: {:#?}",
        seen.calls.len(),
        last_failure - at,
        seen.failed,
        seen.failures
    );
    let late = seen
        .calls
        .iter()
        .filter(|c| c.at > last_failure && !c.ok)
        .count();
    assert_eq!(late, 0, "calls failed after the recovery window");
}

/// The endpoint names `d` lists.
fn listed(d: &Daemon) -> BTreeSet<String> {
    let r = d.get("/v2/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    support::strings_of(&r.json(), "name").into_iter().collect()
}

/// Asserts that each of `nodes` lists every name of `names` (waiting at most [`WAIT`]
/// for the directory to follow).
fn all_listed(nodes: &[&Daemon], names: &BTreeSet<String>) {
    for d in nodes {
        let t = Instant::now();
        loop {
            let missing: Vec<_> = names.difference(&listed(d)).cloned().collect();
            if missing.is_empty() {
                break;
            }
            if t.elapsed() > WAIT {
                let watch: Vec<String> = d
                    .logs()
                    .into_iter()
                    .filter(|l| l.contains("watch") && !l.contains("DEBUG async_nats"))
                    .take(20)
                    .collect();
                panic!(
                    "acknowledged registrations missing from {}: {missing:?}; its log about \
                     watches: {watch:#?}",
                    d.rest
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Serves the requests `node` sends `d` until every path of `expected` came (answering
/// each 2.05 with its path as payload); at most [`WAIT`].
fn serve_until(d: &Dev, node: &Daemon, expected: &BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while !expected.is_subset(&seen) {
        let left = deadline.checked_duration_since(Instant::now());
        let Some((req, from)) = left.and_then(|l| d.dev.recv_request(l)) else {
            panic!(
                "{}: requests {:?} never came from its node {} (got {seen:?})",
                d.name,
                expected.difference(&seen).collect::<Vec<_>>(),
                node.coap
            );
        };
        assert_eq!(from, node.coap, "{}: a request from another node", d.name);
        let path = coap::path_of(&req);
        d.dev.reply(
            &req,
            from,
            ResponseType::Content,
            path.as_bytes(),
            None,
            None,
        );
        seen.insert(path);
    }
}

/// Pulls on every node of `nodes` until each id of `ids` arrived on one of them; at most
/// [`WAIT`]. Returns the node (index into `nodes`) each came on.
/// `ids` holds each request's id and endpoint (a failure prints what the nodes logged
/// about the endpoints whose answers are missing).
fn async_responses_on(nodes: &[&Daemon], ids: &[(String, String)]) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut found = BTreeMap::new();
        for (n, d) in nodes.iter().enumerate() {
            let events = d.collect_events(Duration::ZERO, |_| true);
            for (id, _) in ids {
                if events.async_response(id).is_some() {
                    found.insert(id.clone(), n);
                }
            }
        }
        if found.len() == ids.len() {
            return found;
        }
        if Instant::now() > deadline {
            let missing: Vec<&(String, String)> =
                ids.iter().filter(|(i, _)| !found.contains_key(i)).collect();
            // What the nodes logged about them (bounded).
            let mut lines = Vec::new();
            for (n, d) in nodes.iter().enumerate() {
                for l in d.logs() {
                    if missing
                        .iter()
                        .any(|(id, ep)| l.contains(id.as_str()) || l.contains(&format!("{ep} ")))
                        && !l.contains("async_nats")
                        && lines.len() < 30
                    {
                        lines.push(format!("n{}: {l}", n + 1));
                    }
                }
            }
            panic!("async responses never delivered: {missing:?}; logged about them: {lines:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that `d`'s channel holds a registration event of every name of `names`: those
/// the test's earlier pulls took (the testkit's inbox), then long-polls (`GET
/// /v2/notification/pull`, held at most `[notifications] long_poll_s` = 2 s, see
/// [`failover::node_config`]) until all came, at most [`WAIT`].
fn registration_events(d: &Daemon, names: &BTreeSet<String>) {
    let eps = |list: &[serde_json::Value]| -> Vec<String> {
        list.iter()
            .filter_map(|r| r["ep"].as_str().map(String::from))
            .collect()
    };
    let mut got: BTreeSet<String> = eps(&d
        .collect_events(Duration::ZERO, |_| true)
        .of("registrations"))
    .into_iter()
    .collect();
    let t = Instant::now();
    let mut polls = 0;
    while !names.is_subset(&got) && t.elapsed() < WAIT {
        polls += 1;
        let r = try_http(
            d.rest,
            "GET",
            "/v2/notification/pull",
            &d.key,
            Duration::from_secs(5),
        );
        match r {
            Ok((200, body)) => {
                let batch: serde_json::Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("a long-poll answer that is no JSON ({e}): {body}"));
                if let Some(list) = batch["registrations"].as_array() {
                    got.extend(eps(list));
                }
            }
            Ok((204, _)) => {}
            other => panic!("long-poll on {}: {other:?}", d.rest),
        }
    }
    let missing: Vec<_> = names.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "registration events lost on {} ({polls} long-polls): {missing:?}",
        d.rest
    );
}

/// Issue 22 item 4, a node dies: three nodes, 75 devices (5 in queue mode per node),
/// requests queued on node 3 for its sleeping devices; under REST and CoAP load on
/// nodes 1 and 2, node 3 is killed with -9. Its devices get no answer to their updates and
/// register with nodes 1 and 2 (as a real client does after a failed update): each
/// registration acknowledged before the kill is listed on the survivors, the requests
/// node 3 had accepted reach the devices from their new nodes (stored requests adopted)
/// with their answers on the new nodes' channels, registration events of the survivors
/// are all there, and the survivors' REST and CoAP calls keep succeeding (failures are
/// printed; after a bounded window there are none).
#[test]
fn a_node_killed_under_load_loses_no_acknowledged_registration_or_request() {
    let t0 = Instant::now();
    let cluster = NatsCluster::start().expect("three nats-servers");
    let mut nodes = start_nodes(&cluster.urls(), &["n1", "n2", "n3"]);
    println!("3 nats-servers and 3 nodes up after {:?}", t0.elapsed());
    open_channels(&nodes);
    let mut fleet = register_fleet(&nodes, 25, 5);
    let initial: BTreeSet<String> = fleet.iter().map(|d| d.name.clone()).collect();
    let key = nodes[0].key.clone();
    // Two requests for each sleeping device of node 3, one for those of node 1.
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut ids_n3 = Vec::new();
    for d in fleet.iter().filter(|d| d.queue && d.node != 1) {
        let paths: &[&str] = if d.node == 2 {
            &["/3/0/0", "/3/0/1"]
        } else {
            &["/3/0/0"]
        };
        for path in paths {
            let q = queue_request(nodes[d.node].rest, &key, &d.name, path)
                .unwrap_or_else(|e| panic!("{}{path}: {e}", d.name));
            expected.entry(d.name.clone()).or_default().insert(q.path);
            if d.node == 2 {
                ids_n3.push((q.id, q.ep));
            }
        }
    }
    println!("fleet registered, requests queued after {:?}", t0.elapsed());

    let load = Load::start(&nodes, &[0, 1], &mut fleet);
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = Instant::now();
    nodes[2].0.kill9();

    // Node 3's devices: their updates get no answer...
    let mut orphans: Vec<Dev> = Vec::new();
    let mut others = Vec::new();
    for d in fleet {
        if d.node == 2 {
            orphans.push(d);
        } else {
            others.push(d);
        }
    }
    for d in &mut orphans {
        let path = ["rd", d.reg.as_str()];
        let p = d.dev.build(&coap::Req::new(RequestType::Post, &path));
        d.dev.send_raw(&p.to_bytes().unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    for d in &orphans {
        assert!(
            d.dev.recv_raw(Duration::from_millis(1)).is_none(),
            "{}: the killed node answered",
            d.name
        );
    }
    // ...so they register with nodes 1 and 2, and the sleeping ones get the requests node 3
    // had accepted, from their new node.
    for (i, d) in orphans.iter_mut().enumerate() {
        d.node = i % 2;
        d.dev.server = nodes[d.node].coap;
        d.reg = try_register(&mut d.dev, &d.name, LT, d.queue, ANSWER)
            .unwrap_or_else(|e| panic!("{} could not register on n{}: {e}", d.name, d.node + 1));
        if d.queue {
            serve_until(d, &nodes[d.node], &expected[&d.name]);
        }
    }
    println!(
        "node 3's {} devices registered on nodes 1 and 2, their queued requests delivered, \
         {:?} after the kill",
        orphans.len(),
        killed_at.elapsed()
    );
    let survivors = [&nodes[0], &nodes[1]];
    let on = async_responses_on(&survivors, &ids_n3);
    for (id, ep) in &ids_n3 {
        // Each answer is published by the device's new owner.
        let d = orphans.iter().find(|d| &d.name == ep).unwrap();
        assert_eq!(
            on[id], d.node,
            "{ep}: the answer of {id} came on another node"
        );
    }
    println!(
        "the answers of node 3's requests delivered on the survivors {:?} after the kill",
        killed_at.elapsed()
    );

    let last_failure = load.recovered(killed_at, Duration::from_secs(20));
    let (seen, loaded) = load.stop();
    report(&seen, "node 3 killed", killed_at, last_failure);

    // Every registration acknowledged is listed on both survivors.
    let mut acked = initial.clone();
    acked.extend(seen.registered.iter().map(|(n, _)| n.clone()));
    all_listed(&survivors, &acked);
    // The survivors' sleeping devices wake: every request accepted for them (before the
    // kill and by the load) reaches them, and its answer the node's channel.
    for (_, q) in &seen.queued {
        expected
            .entry(q.ep.clone())
            .or_default()
            .insert(q.path.clone());
    }
    for d in others.iter_mut().filter(|d| d.queue) {
        if let Err(e) = try_update(&mut d.dev, &d.reg, ANSWER) {
            panic!("{}: update on n{}: {e}", d.name, d.node + 1);
        }
        serve_until(d, &nodes[d.node], &expected[&d.name]);
    }
    let ids: Vec<(String, String)> = seen
        .queued
        .iter()
        .map(|(_, q)| (q.id.clone(), q.ep.clone()))
        .collect();
    async_responses_on(&survivors, &ids);
    // No registration event of a survivor lost: each node's channel has every device that
    // registered with it (the fleet, the load's fresh devices, node 3's that moved).
    for (n, node) in survivors.iter().enumerate() {
        let names: BTreeSet<String> = others
            .iter()
            .chain(&orphans)
            .chain(&loaded)
            .filter(|d| d.node == n)
            .map(|d| d.name.clone())
            .collect();
        registration_events(node, &names);
    }
    println!(
        "{} registrations, {} queued requests checked; the test took {:?}",
        acked.len(),
        expected.values().map(BTreeSet::len).sum::<usize>(),
        t0.elapsed()
    );
}

/// Issue 22 item 4, a NATS server dies: three nodes on three nats-servers (R3), 57
/// devices (4 in queue mode per node) with a request queued for each sleeping one, REST
/// and CoAP load on all three nodes; the server leading the registrations bucket is
/// killed with -9. Calls may fail while JetStream elects new leaders (printed), then none
/// fail; every registration acknowledged (before and during the failure) is listed by the
/// node that acknowledged it, every request accepted reaches its device and its answer the
/// owner's channel, and no registration event is lost. Whether every node, and a node
/// started afterwards, list every registration acknowledged is
/// [`every_node_lists_every_registration_after_a_nats_server_dies`] (failing today).
#[test]
fn a_nats_server_killed_under_load_loses_nothing_acknowledged() {
    nats_server_killed_under_load(false);
}

/// As [`a_nats_server_killed_under_load_loses_nothing_acknowledged`], and every node lists
/// every registration acknowledged by any node, also those made after the server died, and
/// so does a node started afterwards on the two servers left.
///
/// Fails today, two bugs found by this test (`store::nats`), each seen in runs that killed
/// the leader of the registrations bucket:
/// - one node's registrations watch (`watch_registration_bucket`, an ordered push
///   consumer of async-nats 0.52) stops delivering the other nodes' writes: that node does
///   not list the other nodes' later registrations (6 of 8 runs). Its log (debug) shows
///   the consumer lost ("Connection lost" / "Connection restored, triggering consumer
///   recreation" when the node was connected to the killed server, or "the registrations
///   watch: missed idle heartbeat"), then async-nats' requests to create its replacement
///   (`<name>_1`, `by_start_sequence`) sent every 5 to 6 s and never answered, until the
///   test ends about 20 s after the kill, while writes to the same bucket work;
/// - a node started afterwards logged "loaded 0 stored registrations" (about 100 were
///   stored and acknowledged) and then failed its start with "state store: database
///   error: NATS JetStream: reading: timed out" (1 of 6 runs; not investigated further; a
///   likely cause: `read_all` trusts the `num_pending` of a new ephemeral pull consumer,
///   which a replica that is not current may report as 0).
#[test]
#[ignore = "issue 22, store::nats: after the registrations bucket's leader dies, a \
            node's registrations watch stops (its ordered consumer's re-creation is never \
            answered; the node no longer lists other nodes' new registrations), and a node \
            started then may load 0 registrations and fail its start reading"]
fn every_node_lists_every_registration_after_a_nats_server_dies() {
    nats_server_killed_under_load(true);
}

/// The scenario of [`a_nats_server_killed_under_load_loses_nothing_acknowledged`]; with
/// `everywhere`, every node must list every acknowledged registration, else only those it
/// acknowledged itself.
fn nats_server_killed_under_load(everywhere: bool) {
    let t0 = Instant::now();
    let mut cluster = NatsCluster::start().expect("three nats-servers");
    let urls = cluster.urls();
    let nodes = start_nodes(&urls, &["n1", "n2", "n3"]);
    println!("3 nats-servers and 3 nodes up after {:?}", t0.elapsed());
    open_channels(&nodes);
    let mut fleet = register_fleet(&nodes, 15, 4);
    let initial: BTreeSet<String> = fleet.iter().map(|d| d.name.clone()).collect();
    let key = nodes[0].key.clone();
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut queued = Vec::new();
    for d in fleet.iter().filter(|d| d.queue) {
        let q = queue_request(nodes[d.node].rest, &key, &d.name, "/3/0/0")
            .unwrap_or_else(|e| panic!("{}: {e}", d.name));
        expected
            .entry(d.name.clone())
            .or_default()
            .insert(q.path.clone());
        queued.push((d.node, q));
    }

    let load = Load::start(&nodes, &[0, 1, 2], &mut fleet);
    std::thread::sleep(Duration::from_secs(1));
    // The server that leads the registrations bucket: every registration and update
    // waits for the election of its successor.
    let meta = cluster.meta_leader().expect("a JetStream meta leader");
    let leader = cluster
        .stream_leader("KV_cd_registrations")
        .expect("a leader of the registrations bucket");
    let killed_at = Instant::now();
    cluster.servers[leader].kill();
    println!(
        "killed nats-server {} (the registrations bucket's leader; the meta leader is {}) \
         {:?} after the start",
        cluster.servers[leader].name(),
        cluster.servers[meta].name(),
        t0.elapsed()
    );
    let last_failure = load.recovered(killed_at, Duration::from_secs(40));
    let (seen, loaded) = load.stop();
    report(&seen, "a nats-server killed", killed_at, last_failure);

    let mut acked = initial.clone();
    acked.extend(seen.registered.iter().map(|(n, _)| n.clone()));
    let all: Vec<&Daemon> = nodes.iter().collect();
    if everywhere {
        all_listed(&all, &acked);
    } else {
        for (n, node) in nodes.iter().enumerate() {
            let own: BTreeSet<String> = fleet
                .iter()
                .chain(&loaded)
                .filter(|d| d.node == n)
                .map(|d| d.name.clone())
                .collect();
            all_listed(&[node], &own);
        }
    }
    // The sleeping devices wake: every request accepted reaches them from their node.
    queued.extend(seen.queued.iter().cloned());
    for (_, q) in &queued {
        expected
            .entry(q.ep.clone())
            .or_default()
            .insert(q.path.clone());
    }
    for d in fleet.iter_mut().filter(|d| d.queue) {
        if let Err(e) = try_update(&mut d.dev, &d.reg, ANSWER) {
            panic!("{}: update on n{}: {e}", d.name, d.node + 1);
        }
        serve_until(d, &nodes[d.node], &expected[&d.name]);
    }
    let ids: Vec<(String, String)> = queued
        .iter()
        .map(|(_, q)| (q.id.clone(), q.ep.clone()))
        .collect();
    let on = async_responses_on(&all, &ids);
    for (node, q) in &queued {
        assert_eq!(
            on[&q.id], *node,
            "{}: its answer came on another node",
            q.ep
        );
    }
    for (n, node) in nodes.iter().enumerate() {
        let names: BTreeSet<String> = fleet
            .iter()
            .chain(&loaded)
            .filter(|d| d.node == n)
            .map(|d| d.name.clone())
            .collect();
        registration_events(node, &names);
    }
    if everywhere {
        // In the store: a node started now (on the two servers left) lists them all.
        let n4 = start_nodes_joining(&urls, &nodes[0], "n4");
        all_listed(&[&n4], &acked);
    }
    println!(
        "{} registrations, {} queued requests checked; the test took {:?}",
        acked.len(),
        queued.len(),
        t0.elapsed()
    );
}

/// A node `name` joining the cluster of `first` (its CA copied, its admin key).
fn start_nodes_joining(urls: &[String], first: &Daemon, name: &str) -> Daemon {
    let p = support::Prepared::new("", &failover::node_config(urls, name));
    crate::cluster::copy_ca(&first.state_dir(), &p.0.dir.path().join("state"));
    let mut d = p.start();
    d.key = first.key.clone();
    d
}

/// Issue 22 item 4, subscriptions: a subscription made on node 2 (which observes the
/// device) survives node 2's death: when the device registers with node 1, node 1 observes
/// the resource, lists the subscription, and the device's notification reaches node 1's
/// channel.
///
/// Failed when it was written (a running node loaded the subscriptions at its start only);
/// every node now follows the subscriptions bucket (`NatsStore::watch_subscriptions`).
#[test]
fn a_subscription_survives_the_death_of_its_node() {
    let cluster = NatsCluster::start().expect("three nats-servers");
    let mut nodes = start_nodes(&cluster.urls(), &["n1", "n2"]);
    open_channels(&nodes);
    let mut dev = nodes[1].device();
    try_register(&mut dev, "watched", LT, false, ANSWER).expect("registered on n2");
    let sub = "/v2/subscriptions/watched/3303/0/5700";
    let r = nodes[1].call("PUT", sub, None, None);
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    assert_eq!(
        support::observed_paths(&dev, Duration::from_secs(1)),
        ["/3303/0/5700"],
        "n2 observes"
    );
    nodes[1].0.kill9();
    let killed_at = Instant::now();
    dev.server = nodes[0].coap;
    try_register(&mut dev, "watched", LT, false, ANSWER).expect("registered on n1");
    let r = nodes[0].get("/v2/subscriptions/watched");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("/3303/0/5700"), "{}", r.body);
    assert_eq!(
        support::observed_paths(&dev, Duration::from_secs(3)),
        ["/3303/0/5700"],
        "n1 observes the subscription stored by n2"
    );
    println!("observed by n1 {:?} after n2's death", killed_at.elapsed());
    let notes = nodes[0].events_of("notifications", 1);
    assert_eq!(notes[0]["ep"], "watched", "{notes}");
}

/// A device with its own loopback address (127.0.0.`host`), so that nginx's
/// `hash $remote_addr` spreads the test's devices over the nodes as it spreads devices of
/// different addresses.
fn device_at(host: u8, server: SocketAddr) -> coap::Device {
    let mut dev = coap::Device::new(server);
    dev.sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0))
        .expect("bind a device socket on 127.0.0.x");
    dev.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    dev
}

/// The node (index) that owns `ep`: a read of `/3/0/1` asked of node 0 is carried out by
/// the owner (forwarded to it if node 0 is not: node 0 counts one more forwarded request
/// out, the owner one more in). Either way the device is sent one read of `/3/0/1`.
fn owner_of(nodes: &[Daemon], names: &[&str], ep: &str) -> usize {
    let forwarded = |d: &Daemon, dir: &str| {
        d.metric(&format!(
            "cluster_forwarded_requests_total{{direction=\"{dir}\"}}"
        ))
    };
    let out_before = forwarded(&nodes[0], "out");
    let in_before: Vec<u64> = nodes.iter().map(|d| forwarded(d, "in")).collect();
    let r = nodes[0].call("GET", &format!("/v2/endpoints/{ep}/3/0/1"), None, None);
    assert_eq!(r.status, 202, "{ep}: {}", r.body);
    if forwarded(&nodes[0], "out") == out_before {
        return 0;
    }
    (1..nodes.len())
        .find(|&i| forwarded(&nodes[i], "in") > in_before[i])
        .unwrap_or_else(|| panic!("{ep}: no node of {names:?} took the forwarded read"))
}

/// docs/cluster.md's nginx set-up, literally: `etc/nginx/connectord-coap-udp.conf` (which
/// the docs include) with its ports replaced by the test's, in front of three nodes on one
/// nats-server. Twelve devices, each from its own loopback address, register through
/// nginx and spread over the nodes; a read sent through each device's owner reaches the
/// device through nginx (from nginx's address) and its answer the owner's channel; an
/// observation's notifications come back through nginx to the node. Then a node is
/// killed: its devices' updates through nginx get no answer, and their re-registrations
/// reach another node (nginx leaves the dead node out after its ICMP port unreachable).
#[test]
fn nginx_udp_load_balancing_as_documented() {
    let t0 = Instant::now();
    // The docs show the file as it is.
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cluster.md"),
    )
    .unwrap();
    assert!(
        docs.contains(failover::NGINX_CONF),
        "docs/cluster.md must show etc/nginx/connectord-coap-udp.conf as it is"
    );
    let server = connectord_testkit::nats::NatsServer::start().expect("nats-server");
    let names = ["n1", "n2", "n3"];
    let nodes = start_nodes(&[server.url()], &names);
    open_channels(&nodes);
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut conf = failover::NGINX_CONF.to_string();
    for (from, to) in [
        (
            "listen 5683 udp;".to_string(),
            format!("listen {listen} udp;"),
        ),
        (
            "server 127.0.0.1:5701 ".to_string(),
            format!("server {} ", nodes[0].coap),
        ),
        (
            "server 127.0.0.1:5702 ".to_string(),
            format!("server {} ", nodes[1].coap),
        ),
        (
            "server 127.0.0.1:5703 ".to_string(),
            format!("server {} ", nodes[2].coap),
        ),
    ] {
        assert!(
            conf.contains(&from),
            "the documented config has no {from:?}"
        );
        conf = conf.replace(&from, &to);
    }
    let nginx = failover::Nginx::start(&conf);
    println!(
        "nginx on {listen} in front of 3 nodes after {:?}",
        t0.elapsed()
    );

    let mut devs = Vec::new();
    for i in 0..12u8 {
        let mut dev = device_at(10 + i, listen);
        let name = format!("lb-{i}");
        let reg = try_register(&mut dev, &name, LT, false, ANSWER)
            .unwrap_or_else(|e| panic!("{name} through nginx: {e}; nginx: {}", nginx.log()));
        devs.push(Dev {
            node: owner_of(&nodes, &names, &name),
            name,
            dev,
            reg,
            queue: false,
        });
    }
    // owner_of sent each device a read (/3/0/1) through its owner: answer them.
    let why = |e: String, d: &Dev| {
        let logs: Vec<String> = nodes[d.node]
            .logs()
            .into_iter()
            .filter(|l| l.contains(&format!("{} ", d.name)) && !l.contains("async_nats"))
            .take(20)
            .collect();
        panic!("{e}; nginx: {}\nits node: {logs:#?}", nginx.log());
    };
    for d in &devs {
        serve_via(d, listen, &["/3/0/1"]).unwrap_or_else(|e| why(e, d));
    }
    let spread: Vec<usize> = (0..3)
        .map(|n| devs.iter().filter(|d| d.node == n).count())
        .collect();
    println!("12 devices through nginx, owned per node: {spread:?}");
    assert!(
        spread.iter().filter(|c| **c > 0).count() >= 2,
        "hash $remote_addr put every device on one node: {spread:?}"
    );

    // Reads through each owner reach the device through nginx; the answers reach the
    // owner's channel.
    let mut ids = Vec::new();
    for d in &devs {
        let id = nodes[d.node].async_request(
            "GET",
            &format!("/v2/endpoints/{}/3/0/0", d.name),
            None,
            None,
        );
        serve_via(d, listen, &["/3/0/0"]).unwrap_or_else(|e| why(e, d));
        ids.push((id, d.name.clone()));
    }
    let node_refs: Vec<&Daemon> = nodes.iter().collect();
    let on = async_responses_on(&node_refs, &ids);
    for (id, ep) in &ids {
        let d = devs.iter().find(|d| &d.name == ep).unwrap();
        assert_eq!(on[id], d.node, "{ep}: the answer came on another node");
    }

    // Observations: a subscription per node's first device; the observe request comes
    // through nginx, and so go the device's notifications.
    let watched: Vec<&Dev> = (0..3)
        .filter_map(|n| devs.iter().find(|d| d.node == n))
        .collect();
    for d in &watched {
        let r = nodes[d.node].call(
            "PUT",
            &format!("/v2/subscriptions/{}/3303/0/5700", d.name),
            None,
            None,
        );
        assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
        let (req, from) = d
            .dev
            .recv_request(WAIT)
            .unwrap_or_else(|| panic!("{}: no observe request through nginx", d.name));
        assert_eq!(from, listen, "requests come from nginx");
        assert_eq!(coap::path_of(&req), "/3303/0/5700");
        let ack = support::observe_content(
            coap_lite::MessageType::Acknowledgement,
            req.header.message_id,
            req.get_token(),
            1,
            b"20.5",
        );
        support::send_packet(&d.dev, &ack, listen);
        let note = support::observe_content(
            coap_lite::MessageType::NonConfirmable,
            req.header.message_id.wrapping_add(1000),
            req.get_token(),
            2,
            b"21.5",
        );
        support::send_packet(&d.dev, &note, listen);
    }
    for d in &watched {
        let node = &nodes[d.node];
        let want = support::b64(b"21.5");
        let events = node.collect_events(WAIT, |e| {
            e.of("notifications")
                .iter()
                .any(|n| n["ep"] == d.name.as_str() && n["payload"] == want.as_str())
        });
        assert!(
            events
                .of("notifications")
                .iter()
                .any(|n| n["ep"] == d.name.as_str() && n["payload"] == want.as_str()),
            "{}: the notification sent through nginx never reached n{}: {events:?}",
            d.name,
            d.node + 1
        );
    }
    println!(
        "reads and notifications through nginx checked after {:?}",
        t0.elapsed()
    );

    // A node dies: its devices' updates through nginx get no answer; re-registering, they
    // reach another node.
    let mut nodes = nodes;
    let victim = watched[0].node;
    nodes[victim].0.kill9();
    let killed_at = Instant::now();
    // Each device on its own thread, as devices are independent.
    let log = &nginx;
    let tries: Vec<usize> = std::thread::scope(|scope| {
        let handles: Vec<_> = devs
            .iter_mut()
            .filter(|d| d.node == victim)
            .map(|d| {
                scope.spawn(move || {
                    assert!(
                        try_update(&mut d.dev, &d.reg, Duration::from_secs(1)).is_err(),
                        "{}: an update answered by the killed node",
                        d.name
                    );
                    // As a client does after a failed update: register again (a few
                    // tries, 2 s each, as CoAP's first retransmission would).
                    let mut tries = 0;
                    d.reg = loop {
                        tries += 1;
                        match try_register(&mut d.dev, &d.name, LT, false, Duration::from_secs(2)) {
                            Ok(reg) => break reg,
                            Err(_) if tries < 5 => {}
                            Err(e) => panic!(
                                "{}: no node took its re-registration through nginx: {e}; \
                                 nginx: {}",
                                d.name,
                                log.log()
                            ),
                        }
                    };
                    tries
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let moved = tries.len();
    println!("registrations each needed (tries): {tries:?}");
    // Every device is owned by a live node: the survivors' counts add up to the fleet.
    let survivor = &nodes[(victim + 1) % 3];
    let t = Instant::now();
    loop {
        let members = survivor.get("/v2/cluster").json()["members"].clone();
        let owned: Vec<(String, u64)> = members
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["node"].as_str().unwrap_or_default().to_string(),
                    m["owned_endpoints"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        if owned.len() == 2 && owned.iter().map(|(_, n)| n).sum::<u64>() == 12 {
            println!("owned after the move: {owned:?}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the survivors do not own the fleet: {owned:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = nginx.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[error]") || l.contains("[warn]"))
        .take(12)
        .collect();
    println!("nginx's errors and warnings: {errors:#?}");
    println!(
        "n{}'s {moved} devices re-registered through nginx on the other nodes {:?} after \
         the kill; the test took {:?}",
        victim + 1,
        killed_at.elapsed(),
        t0.elapsed()
    );
}

/// Answers the requests nginx relays to `d` until each path of `paths` came (each 2.05
/// with its path); every request must come from nginx's address `via`.
fn serve_via(d: &Dev, via: SocketAddr, paths: &[&str]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while !paths.iter().all(|p| seen.contains(*p)) {
        let left = deadline.checked_duration_since(Instant::now());
        let Some((req, from)) = left.and_then(|l| d.dev.recv_request(l)) else {
            return Err(format!(
                "{}: {paths:?} never came through nginx (got {seen:?})",
                d.name
            ));
        };
        if from != via {
            return Err(format!(
                "{}: a request from {from}, not through nginx",
                d.name
            ));
        }
        let path = coap::path_of(&req);
        d.dev.reply(
            &req,
            from,
            ResponseType::Content,
            path.as_bytes(),
            None,
            None,
        );
        seen.insert(path);
    }
    Ok(())
}
