//! Crash durability under load: while devices register, keys are made, subscriptions are
//! added and requests are queued for sleeping devices, the daemon is killed with
//! `kill -9`. Everything the daemon acknowledged before the kill must still be there after
//! it starts again on the same state directory.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use coap_lite::{ContentFormat, MessageClass, Packet, RequestType, ResponseType};
use support::coap::{Device, Req, location, path_of};
use support::{Daemon, b64};

/// Longest single wait of the checks after the restart.
const WAIT: Duration = Duration::from_secs(20);
/// How long the load runs before the kill.
const LOAD: Duration = Duration::from_millis(1500);

const REG_THREADS: usize = 3;
const REGS_PER_THREAD: usize = 2000;
const MAX_KEYS: usize = 2000;
const SUB_DEVICES: usize = 40;
const SUB_INSTANCES: usize = 8;
const QUEUE_DEVICES: usize = 30;
/// `requests.queue_len` is 20 by default; stay within it.
const PER_QUEUE_DEVICE: usize = 15;

/// Per queue-mode endpoint, its acknowledged requests as (path, async id), in order.
type Queued = BTreeMap<String, Vec<(String, String)>>;

/// What the REST load threads share: the flag that stops them, the API's address and key.
struct Load {
    stop: Arc<AtomicBool>,
    base: String,
    key: String,
}

impl Load {
    /// A load thread of REST calls: `step(n, load, found)` for `n` in `0..count`, until
    /// `stop` is set; `step` records what the daemon acknowledged in `found`.
    fn worker<T: Send + 'static>(
        self: &Arc<Self>,
        found: &Arc<Mutex<T>>,
        count: usize,
        step: impl Fn(usize, &Load, &Mutex<T>) + Send + 'static,
    ) -> thread::JoinHandle<()> {
        let (load, found) = (Arc::clone(self), Arc::clone(found));
        thread::spawn(move || {
            for n in 0..count {
                if load.stop.load(Ordering::SeqCst) {
                    break;
                }
                step(n, &load, &found);
            }
        })
    }

    /// `method` on a device's resource under `/v2/{route}` (`endpoints`,
    /// `subscriptions`), without a body, as [`try_http`].
    fn device_call(
        &self,
        method: &str,
        route: &str,
        ep: &str,
        path: &str,
    ) -> Option<(u16, String)> {
        let url = format!("{}/v2/{route}/{ep}{path}", self.base);
        try_http(method, &url, &self.key, None, None)
    }
}

/// A request that never panics: `None` on a connection error (the daemon was killed).
fn try_http(
    method: &str,
    url: &str,
    key: &str,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut b = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("Authorization", format!("Bearer {key}"));
    if let Some(ct) = content_type {
        b = b.header("Content-Type", ct);
    }
    let result = match body {
        Some(body) => agent.run(b.body(body.to_vec()).ok()?),
        None => agent.run(b.body(()).ok()?),
    };
    let mut resp = result.ok()?;
    let status = resp.status().as_u16();
    // A body cut short by the kill: the answer was not (fully) received.
    let body = resp.body_mut().read_to_string().ok()?;
    Some((status, body))
}

/// Registers `ep` from a fresh socket; the registration id when answered 2.01 Created,
/// `None` when the daemon did not answer (it may have been killed) or refused.
fn try_register(server: SocketAddr, ep: &str, links: &str) -> Option<String> {
    let mut dev = Device::new(server);
    let q = format!("ep={ep}");
    let query = [q.as_str(), "lt=300"];
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.query = &query;
    r.payload = links.as_bytes();
    r.content_format = Some(ContentFormat::ApplicationLinkFormat);
    let p = dev.build(&r);
    dev.sock.send_to(&p.to_bytes().ok()?, server).ok()?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let bytes = dev.recv_raw(left.max(Duration::from_millis(1)))?;
        let Ok(resp) = Packet::from_bytes(&bytes) else {
            continue;
        };
        if resp.get_token() != p.get_token() {
            continue;
        }
        return match resp.header.code {
            MessageClass::Response(ResponseType::Created) => Some(location(&resp)),
            _ => None,
        };
    }
}

/// Sends a registration update without waiting for its answer (the queued requests may
/// arrive before it; `recv_request` skips the answer).
fn send_update(dev: &mut Device, reg: &str) {
    let path = ["rd", reg];
    let p = dev.build(&Req::new(RequestType::Post, &path));
    dev.send_raw(&p.to_bytes().unwrap());
}

#[test]
fn nothing_acknowledged_is_lost_when_killed_under_load() {
    let started = Instant::now();
    let d = Daemon::start();
    // The admin key's channel exists from here on (nothing pulled until after the kill).
    assert!(d.pull_now().is_none(), "no events yet");

    // Devices the workers act on, registered before the load (after the channel exists).
    let mut acked_regs: BTreeSet<String> = BTreeSet::new();
    let sub_links: String = (0..SUB_INSTANCES)
        .map(|i| format!("</3303/{i}/5700>;obs"))
        .collect::<Vec<_>>()
        .join(",");
    let mut sub_devs = Vec::new();
    for i in 0..SUB_DEVICES {
        let ep = format!("sub-{i}");
        let mut dev = d.device();
        dev.register(&[&format!("ep={ep}"), "lt=300"], &sub_links);
        acked_regs.insert(ep);
        sub_devs.push(dev);
    }
    let mut queue_devs = Vec::new();
    for i in 0..QUEUE_DEVICES {
        let ep = format!("q-{i}");
        let mut dev = d.device();
        let reg = dev.register(&[&format!("ep={ep}"), "lt=300", "b=UQ"], "</3/0>");
        acked_regs.insert(ep.clone());
        queue_devs.push((ep, reg, dev));
    }

    let coap = d.coap;
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load {
        stop: Arc::clone(&stop),
        base: format!("http://{}", d.rest),
        key: d.key.clone(),
    });

    let regs: Arc<Mutex<Vec<String>>> = Arc::default();
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let subs: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    // Per queue endpoint, its acknowledged requests in the order they were accepted.
    let queued: Arc<Mutex<Queued>> = Arc::default();
    let mut workers = Vec::new();

    // (a) Devices registering, each thread its own.
    for t in 0..REG_THREADS {
        let (stop, regs) = (Arc::clone(&stop), Arc::clone(&regs));
        workers.push(thread::spawn(move || {
            for n in 0..REGS_PER_THREAD {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let ep = format!("load-{t}-{n}");
                if try_register(coap, &ep, "</3/0>,</3303/0/5700>;obs").is_some() {
                    regs.lock().unwrap().push(ep);
                }
            }
        }));
    }
    // (b) API keys.
    workers.push(load.worker(&keys, MAX_KEYS, |n, load, keys| {
        let body = format!(r#"{{"name": "crash key {n}"}}"#);
        let url = format!("{}/api/api_tokens", load.base);
        let r = try_http(
            "POST",
            &url,
            &load.key,
            Some("application/json"),
            Some(body.as_bytes()),
        );
        if let Some((201, body)) = r {
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let k = v["access_key"].as_str().expect("access_key").to_string();
            keys.lock().unwrap().push(k);
        }
    }));
    // (c) Subscriptions on the registered `sub-*` devices, instance by instance.
    let count = SUB_INSTANCES * SUB_DEVICES;
    workers.push(load.worker(&subs, count, |n, load, subs| {
        let ep = format!("sub-{}", n % SUB_DEVICES);
        let path = format!("/3303/{}/5700", n / SUB_DEVICES);
        if let Some((200 | 202, _)) = load.device_call("PUT", "subscriptions", &ep, &path) {
            subs.lock().unwrap().push((ep, path));
        }
    }));
    // (d) Requests to the sleeping queue-mode devices, which stay queued: the first
    // resource of each device, then the second, ...
    let count = PER_QUEUE_DEVICE * QUEUE_DEVICES;
    workers.push(load.worker(&queued, count, |n, load, queued| {
        let ep = format!("q-{}", n % QUEUE_DEVICES);
        let path = format!("/3/0/{}", n / QUEUE_DEVICES);
        if let Some((202, body)) = load.device_call("GET", "endpoints", &ep, &path) {
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let id = v["async-response-id"].as_str().expect("id").to_string();
            queued
                .lock()
                .unwrap()
                .entry(ep)
                .or_default()
                .push((path, id));
        }
    }));

    // Kill while the workers are (most likely) still busy; they tolerate the failures.
    thread::sleep(LOAD);
    let in_flight = workers.iter().filter(|w| !w.is_finished()).count();
    let d = d.crash_and_restart();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("a worker panicked");
    }

    let regs = regs.lock().unwrap().clone();
    let keys = keys.lock().unwrap().clone();
    let subs = subs.lock().unwrap().clone();
    let queued = queued.lock().unwrap().clone();
    acked_regs.extend(regs.iter().cloned());
    eprintln!(
        "acknowledged before the kill: {} load registrations, {} keys, {} subscriptions, {} queued requests; {in_flight} workers still running at the kill",
        regs.len(),
        keys.len(),
        subs.len(),
        queued.values().map(Vec::len).sum::<usize>()
    );

    // Every acknowledged registration is listed.
    let r = d.get("/v2/endpoints");
    assert_eq!(r.status, 200, "{}", r.body);
    let listed: BTreeSet<String> = r
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_string())
        .collect();
    let lost: Vec<_> = acked_regs.difference(&listed).collect();
    assert!(lost.is_empty(), "acknowledged registrations lost: {lost:?}");

    // Every acknowledged key authenticates.
    let lost: Vec<_> = keys
        .iter()
        .filter(|k| {
            try_http("GET", &d.url("/v2/endpoints"), k, None, None).map(|r| r.0) != Some(200)
        })
        .map(|k| &k[..12])
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged keys lost (prefixes): {lost:?}"
    );

    // Every acknowledged subscription is listed.
    let mut lost = Vec::new();
    for i in 0..SUB_DEVICES {
        let ep = format!("sub-{i}");
        let r = d.get(&format!("/v2/subscriptions/{ep}"));
        let have: BTreeSet<&str> = if r.status == 200 {
            r.body.lines().map(str::trim).collect()
        } else {
            BTreeSet::new()
        };
        for (_, path) in subs.iter().filter(|(e, _)| *e == ep) {
            let want = format!("/subscriptions/{ep}{path}");
            if !have.contains(want.as_str()) {
                lost.push(want);
            }
        }
    }
    assert!(lost.is_empty(), "acknowledged subscriptions lost: {lost:?}");

    // The channel holds a `registrations` event for every acknowledged registration.
    let reg_eps = |e: &support::Events| -> BTreeSet<String> {
        e.of("registrations")
            .iter()
            .filter_map(|r| r["ep"].as_str().map(str::to_string))
            .collect()
    };
    let events = d.collect_events(WAIT, |e| acked_regs.is_subset(&reg_eps(e)));
    let seen = reg_eps(&events);
    let lost: Vec<_> = acked_regs.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "registration events lost for: {lost:?} ({} of {} seen)",
        acked_regs.len() - lost.len(),
        acked_regs.len()
    );

    // Every acknowledged queued request is still pending: each device's update brings its
    // requests in order, and the answers arrive under the original ids.
    let mut expected_answers = Vec::new();
    for (ep, reg, dev) in &mut queue_devs {
        let want = queued.get(ep.as_str()).cloned().unwrap_or_default();
        dev.server = d.coap;
        send_update(dev, reg);
        let mut got = Vec::new();
        // A request whose 202 was lost in the kill may be delivered too: keep answering
        // until every acknowledged one came and the device is quiet.
        let deadline = Instant::now() + WAIT;
        loop {
            let all_in = {
                let mut it = got.iter();
                want.iter().all(|(p, _)| it.any(|g| g == p))
            };
            let wait = if all_in {
                Duration::from_millis(300)
            } else {
                match deadline.checked_duration_since(Instant::now()) {
                    Some(left) => left,
                    None => break,
                }
            };
            let Some((req, from)) = dev.recv_request(wait) else {
                break;
            };
            let path = path_of(&req);
            dev.reply(
                &req,
                from,
                ResponseType::Content,
                path.as_bytes(),
                Some(0),
                None,
            );
            got.push(path);
        }
        // The acknowledged requests, in their order, within what the device received.
        let mut it = got.iter();
        let missing: Vec<_> = want
            .iter()
            .filter(|(p, _)| !it.any(|g| g == p))
            .map(|(p, _)| p.clone())
            .collect();
        assert!(
            missing.is_empty(),
            "{ep}: acknowledged requests lost or out of order: {missing:?}; acknowledged {:?}, received {got:?}",
            want.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
        expected_answers.extend(want);
    }
    let events = d.collect_events(WAIT, |e| {
        expected_answers
            .iter()
            .all(|(_, id)| e.async_response(id).is_some())
    });
    for (path, id) in &expected_answers {
        let r = events
            .async_response(id)
            .unwrap_or_else(|| panic!("no async response {id} for {path}"));
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["payload"], b64(path.as_bytes()), "{r}");
    }
    eprintln!("done in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(90));
}
