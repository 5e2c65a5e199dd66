//! Registration storms (issue 24): a daemon with every `coap.max_in_flight` permit taken
//! answers a confirmable request at once with 5.03 Service Unavailable and a Max-Age (when
//! to retry), never with silence that costs the device its retransmissions; devices that
//! retry after Max-Age all register.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, ContentFormat, MessageType, Packet, RequestType, ResponseType};
use connectord_testkit::coap::{Device, Req, code, location, uint_option};

use crate::support::{self, Daemon};

/// The diagnostic of a 5.03 answered for load (`connectord_coap::transport::SHED_DIAGNOSTIC`).
const SHED: &str = "busy: retry after Max-Age";

/// How long the first transmission of every request of a burst may wait for its answer
/// before the test calls it silence (a device's first retransmission comes after 2–3 s;
/// this bound is a liveness limit, not a speed figure: the answers come in milliseconds).
const FIRST_ANSWER: Duration = Duration::from_secs(10);

/// What a registration's answer was.
enum Answer {
    Created(String),
    /// 5.03 for load, with its Max-Age in seconds.
    Shed(u32),
}

fn classify(p: &Packet) -> Answer {
    match code(p) {
        ResponseType::Created => Answer::Created(location(p)),
        ResponseType::ServiceUnavailable => {
            assert_eq!(
                String::from_utf8_lossy(&p.payload),
                SHED,
                "a 5.03 other than load shedding"
            );
            let age = uint_option(p, CoapOption::MaxAge).expect("a shed 5.03 carries Max-Age");
            assert!((1..=60).contains(&age), "Max-Age {age}");
            Answer::Shed(age)
        }
        other => panic!(
            "registration answered {other:?}: {}",
            String::from_utf8_lossy(&p.payload)
        ),
    }
}

fn registration(dev: &mut Device, name: &str) -> Packet {
    let query = [format!("ep={name}"), "lt=300".into(), "b=U".into()];
    let query: Vec<&str> = query.iter().map(String::as_str).collect();
    let mut r = Req::new(RequestType::Post, &["rd"]);
    r.query = &query;
    r.payload = b"</3/0>,</3303/0>";
    r.content_format = Some(ContentFormat::ApplicationLinkFormat);
    dev.build(&r)
}

/// None for 2.04, the Max-Age of a shed 5.03; panics on anything else.
fn classify_update(p: &Packet) -> Option<u32> {
    match code(p) {
        ResponseType::Changed => None,
        ResponseType::ServiceUnavailable => match classify(p) {
            Answer::Shed(age) => Some(age),
            Answer::Created(_) => unreachable!(),
        },
        other => panic!(
            "update answered {other:?}: {}",
            String::from_utf8_lossy(&p.payload)
        ),
    }
}

/// A device's random wait added to Max-Age, under 1 s (a fixed spread: reproducible).
fn jitter(device: usize, nth: u64) -> Duration {
    let x = (device as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nth.wrapping_mul(7919);
    Duration::from_millis(x % 1000)
}

/// Sends every packet once (all before reading any answer), then collects the answer to
/// each first transmission from its socket: none is retransmitted. Panics naming the
/// requests that got no answer within [`FIRST_ANSWER`].
fn burst(devs: &mut [Device], packets: &[Packet]) -> Vec<Packet> {
    for (d, p) in devs.iter().zip(packets) {
        d.sock.set_nonblocking(true).unwrap();
        d.send_raw(&p.to_bytes().unwrap());
    }
    let deadline = Instant::now() + FIRST_ANSWER;
    let mut answers: Vec<Option<Packet>> = vec![None; devs.len()];
    let mut buf = [0u8; 2048];
    while answers.iter().any(Option::is_none) && Instant::now() < deadline {
        let mut progress = false;
        for (i, d) in devs.iter().enumerate() {
            if answers[i].is_some() {
                continue;
            }
            match d.sock.recv(&mut buf) {
                Ok(n) => {
                    let p = Packet::from_bytes(&buf[..n]).expect("decodable answer");
                    if p.header.message_id == packets[i].header.message_id {
                        assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
                        assert_eq!(p.get_token(), packets[i].get_token());
                        answers[i] = Some(p);
                        progress = true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        if !progress {
            thread::sleep(Duration::from_millis(2));
        }
    }
    let silent: Vec<usize> = (0..devs.len()).filter(|&i| answers[i].is_none()).collect();
    assert!(
        silent.is_empty(),
        "{} of {} requests got no answer to their first transmission (silently dropped): {silent:?}",
        silent.len(),
        devs.len()
    );
    for d in devs.iter() {
        d.sock.set_nonblocking(false).unwrap();
    }
    answers.into_iter().map(Option::unwrap).collect()
}

/// A burst of registrations from 64 sockets at a daemon that handles one request at a
/// time: each gets 2.01 or 5.03 with Max-Age at once; a retransmission of a shed request
/// gets the same answer; retrying after Max-Age (a new request) registers every one.
#[test]
fn a_busy_daemon_answers_every_registration_and_retries_after_max_age_register() {
    const N: usize = 64;
    let d = Daemon::start_custom("max_in_flight = 1", "");
    let mut devs: Vec<Device> = (0..N).map(|_| Device::new(d.coap)).collect();
    let names: Vec<String> = (0..N).map(|i| format!("storm-{i}")).collect();
    let packets: Vec<Packet> = devs
        .iter_mut()
        .zip(&names)
        .map(|(dev, name)| registration(dev, name))
        .collect();

    let answers = burst(&mut devs, &packets);
    let mut shed_seen = 0u64;
    // When each shed device may retry.
    let mut retry: HashMap<usize, Instant> = HashMap::new();
    let mut registered: HashMap<usize, String> = HashMap::new();
    let t = Instant::now();
    for (i, a) in answers.iter().enumerate() {
        match classify(a) {
            Answer::Created(id) => {
                registered.insert(i, id);
            }
            Answer::Shed(age) => {
                shed_seen += 1;
                retry.insert(
                    i,
                    t + Duration::from_secs(age.into()) + jitter(i, shed_seen),
                );
            }
        }
    }
    assert!(
        shed_seen > 0,
        "64 registrations at once with max_in_flight = 1: some must have been shed"
    );

    // A retransmission of a shed request (same message id) is answered from the duplicate
    // cache with the same 5.03, not handled.
    let (&i, _) = retry.iter().next().unwrap();
    devs[i].send_raw(&packets[i].to_bytes().unwrap());
    let again = devs[i]
        .recv_raw(FIRST_ANSWER)
        .expect("the retransmission is answered");
    assert_eq!(again, answers[i].to_bytes().unwrap());

    // The shed devices come back after Max-Age plus up to 1 s of jitter (as devices do:
    // not all in the same millisecond), each with a new request; some may be shed again,
    // with a new Max-Age. Bounded in time (every Max-Age is at most 60 s).
    let deadline = Instant::now() + Duration::from_secs(300);
    while !retry.is_empty() {
        assert!(
            Instant::now() < deadline,
            "still shed after 300 s: {}",
            retry.len()
        );
        let due = retry.values().min().copied().unwrap();
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let ready: Vec<usize> = retry
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(i, _)| *i)
            .collect();
        let mut batch: Vec<Device> = Vec::new();
        let mut packets = Vec::new();
        for &i in &ready {
            retry.remove(&i);
            let mut dev = std::mem::replace(&mut devs[i], Device::new(d.coap));
            packets.push(registration(&mut dev, &names[i]));
            batch.push(dev);
        }
        let answers = burst(&mut batch, &packets);
        let t = Instant::now();
        for ((i, dev), a) in ready.iter().zip(batch).zip(&answers) {
            devs[*i] = dev;
            match classify(a) {
                Answer::Created(id) => {
                    registered.insert(*i, id);
                }
                Answer::Shed(age) => {
                    shed_seen += 1;
                    retry.insert(
                        *i,
                        t + Duration::from_secs(age.into()) + jitter(*i, shed_seen),
                    );
                }
            }
        }
    }
    assert_eq!(registered.len(), N);
    let listed = d.get("/v2/endpoints").json();
    assert_eq!(listed.as_array().map(Vec::len), Some(N), "{listed}");
    assert_eq!(
        d.metric("coap_shed_total"),
        shed_seen,
        "every shed answer counted"
    );
    assert_eq!(
        d.metric("coap_busy_drops_total"),
        0,
        "no CON request dropped"
    );
    // Each device's registration is the one it was told about: its update is 2.04 (or
    // shed too, then tried again after Max-Age: with one permit, a request can arrive
    // before the previous one's task has let its permit go).
    for (i, id) in &registered {
        let mut dev = Device::new(d.coap);
        let mut tries = 0;
        loop {
            let r = dev.request(&Req::new(RequestType::Post, &["rd", id]));
            match classify_update(&r) {
                None => break,
                Some(age) => {
                    tries += 1;
                    assert!(tries < 10, "{} at {id}: shed {tries} times", names[*i]);
                    thread::sleep(Duration::from_secs(age.into()));
                }
            }
        }
    }
}

/// aiocoap's resource-directory client (`Registerer`), 100 of them at once against a daemon
/// that handles one request at a time: it waits for Max-Age on a 5.03 and tries again, and
/// every one registers (none gives up: it would after 7 sheds in a row).
#[test]
fn aiocoap_rd_clients_back_off_on_max_age_and_all_register() {
    const N: usize = 100;
    let d = Daemon::start_custom("max_in_flight = 1", "");
    let python = support::peers::aiocoap_python();
    let script = support::peers::script("aiocoap_rd_storm.py");
    // The storm from one aiocoap process is a burst only if the daemon is still busy with
    // earlier requests when later ones arrive; try up to three bursts for one that was
    // shed, each with names of its own.
    let mut total = 0;
    for attempt in 0..3 {
        let out = support::run_ok(
            Command::new(&python)
                .arg(&script)
                .arg(d.coap.ip().to_string())
                .arg(d.coap.port().to_string())
                .arg(N.to_string())
                .arg(format!("aio{attempt}-"))
                .arg("150"),
            "aiocoap RD storm",
        );
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("the script's JSON report");
        eprintln!("aiocoap storm {attempt}: {report}");
        assert_eq!(report["registered"], N, "{report}");
        assert_eq!(report["failed"], 0, "{report}");
        total += N;
        let listed = d.get("/v2/endpoints").json();
        assert_eq!(listed.as_array().map(Vec::len), Some(total), "{listed}");
        if report["retried"].as_u64().unwrap_or(0) > 0 {
            assert!(d.metric("coap_shed_total") > 0);
            assert_eq!(d.metric("coap_busy_drops_total"), 0);
            return;
        }
    }
    panic!("three bursts of {N} aiocoap registrations and none was shed: nothing was tested");
}
