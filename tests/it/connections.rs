//! Connection exhaustion (issue 19, item 5). With the default `[rest]` limits, one client
//! address that opens 1 024 idle TCP connections (and one that sends its headers a byte at
//! a time) must not lock out everybody else: it gets at most
//! `rest.max_connections_per_address` of the `rest.max_connections` slots, the connections
//! past that are refused at once, logged (once per address and interval) and counted, and
//! a client on another address keeps being served. A connection that sends nothing at all
//! is closed after a few seconds, not `rest.client_timeout_s`.

use crate::support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use support::Daemon;

/// How long the well-behaved client waits for each answer: well under the default
/// `rest.client_timeout_s` (30 s), for which it waited before.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.bind(&SockAddr::from(SocketAddr::from((from, 0))))
        .unwrap();
    s.connect_timeout(&SockAddr::from(to), ANSWER_WAIT)
        .expect("connect");
    s.into()
}

/// One `GET path` with the admin key from 127.0.0.2, on a fresh connection: status and body.
fn get_from_other_address(d: &Daemon, path: &str) -> (u16, String) {
    let (status, head, body) = get_as(d, [127, 0, 0, 2], path, &d.key);
    let _ = head;
    (status, body)
}

/// One `GET path` with `key` as a bearer token from the loopback address `from`, on a
/// fresh connection: status, head and body.
fn get_as(d: &Daemon, from: [u8; 4], path: &str, key: &str) -> (u16, String, String) {
    get_at(from, d.rest, path, key)
}

/// As [`get_as`], to the REST address `to`.
fn get_at(from: [u8; 4], to: SocketAddr, path: &str, key: &str) -> (u16, String, String) {
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!("no answer within {ANSWER_WAIT:?} from {from:?}: {e}");
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

fn metric(text: &str, name: &str) -> Option<u64> {
    let prefix = format!("connectord_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
}

#[test]
fn one_address_cannot_take_every_connection() {
    let d = Daemon::start();
    // The slowloris: 1 024 idle connections from 127.0.0.1 (the default
    // rest.max_connections), and one that sends its head a byte at a time.
    let idle: Vec<TcpStream> = (0..1024)
        .map(|_| connect_from([127, 0, 0, 1], d.rest))
        .collect();
    let rest = d.rest;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = std::sync::Arc::clone(&stop);
    let slow = std::thread::spawn(move || {
        let mut s = connect_from([127, 0, 0, 1], rest);
        for b in b"GET /endpoints HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if stopped.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    // Meanwhile a client on another address is served, again and again.
    for _ in 0..5 {
        let (status, body) = get_from_other_address(&d, "/endpoints");
        assert_eq!(status, 200, "{body}");
    }
    // The connections past the per-address bound were refused at once: closed by the
    // daemon (end of input or a reset), not left waiting.
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut closed = 0;
    let mut told = 0;
    for mut s in idle.iter().rev().take(512) {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(n) => {
                closed += 1;
                // Told why first (best effort): a JSON 503.
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.starts_with("HTTP/1.1 503") && text.contains("max_connections_per_address")
                {
                    told += 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
            Err(_) => {}
        }
    }
    assert!(
        closed >= 512,
        "only {closed} of the last 512 connections were refused"
    );
    assert!(told > 0, "no refused connection was answered 503");
    let (status, text) = get_from_other_address(&d, "/metrics");
    assert_eq!(status, 200, "{text}");
    let refused = metric(&text, "rest_connections_refused_total").expect("the refusal counter");
    assert!(refused >= 512, "{refused} refusals counted");
    // Logged, once for the address (not once per refusal).
    let lines: Vec<String> = d
        .logs()
        .into_iter()
        .filter(|l| l.contains("max_connections_per_address") && l.contains("127.0.0.1"))
        .collect();
    assert_eq!(lines.len(), 1, "one log line for the address: {lines:#?}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(idle);
    slow.join().unwrap();
}

#[test]
fn a_connection_that_sends_nothing_is_closed_early() {
    let d = Daemon::start();
    let mut s = connect_from([127, 0, 0, 1], d.rest);
    // rest.client_timeout_s is 30 s here (the default); nothing sent is closed long before.
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "unexpected answer: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("still open after 15 s: {e}"),
    }
    // One that sent part of its head gets rest.client_timeout_s for the rest: still open.
    let mut s = connect_from([127, 0, 0, 1], d.rest);
    s.write_all(b"GET /endpoints HTTP/1.1\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let e = s.read(&mut buf).expect_err("still open");
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    // And its request is answered once it is complete.
    s.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    write!(
        s,
        "Host: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        d.key
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Connections that arrive while every `rest.max_connections` slot is taken wait in the
/// listener's accept queue and are served once a slot frees, however many arrive at once
/// (up to the kernel's bound, `net.core.somaxconn`). With tokio's default queue of 128,
/// the kernel dropped the SYNs past it, and those clients waited for their SYN
/// retransmissions (1 s, then 3 s, …): the flood test's 10 s connect timeout in CI.
#[test]
fn a_burst_of_connections_waits_for_a_slot_in_the_accept_queue() {
    const SLOTS: usize = 2;
    const BURST: usize = 400;
    let p = support::Prepared::new("", "");
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let text = text.replacen(
        "[rest]\n",
        &format!("[rest]\nmax_connections = {SLOTS}\n"),
        1,
    );
    std::fs::write(&p.config_path, text).unwrap();
    let d = p.start();
    // Every slot held by a connection that sends nothing (closed only after a few seconds).
    let held: Vec<TcpStream> = (0..SLOTS)
        .map(|_| connect_from([127, 0, 0, 1], d.rest))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let request = format!(
        "GET /v2/endpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        d.key
    );
    let started = Instant::now();
    let mut burst = Vec::with_capacity(BURST);
    for i in 0..BURST {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        if let Err(e) = s.connect_timeout(&SockAddr::from(d.rest), Duration::from_millis(800)) {
            panic!(
                "connection {i} of {BURST} not queued within 800 ms while {SLOTS} slots were taken: {e}"
            );
        }
        let mut s: TcpStream = s.into();
        // Buffered by the kernel until the daemon accepts the connection.
        s.write_all(request.as_bytes()).unwrap();
        burst.push(s);
    }
    eprintln!("{BURST} connections queued in {:?}", started.elapsed());
    drop(held);
    // Each is served in its turn: the last one too.
    let mut last = burst.pop().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut out = Vec::new();
    last.read_to_end(&mut out)
        .expect("the last queued connection was not served");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

/// Failed authentications per address (`rest.auth_failures_per_minute`): nothing bounded
/// how often one address could guess keys before (a `headerkeys` key an operator chose may
/// be short). Past the bound, the address's requests are refused 429 with `Retry-After`
/// without their credentials being checked (a right guess tells nothing either), logged
/// once and counted; another address is served, and the address may try again after a
/// failure's worth of time.
#[test]
fn an_address_that_fails_authentication_too_often_waits() {
    let d = support::Daemon::start_with_rest("auth_failures_per_minute = 30\n");
    let guess = |n: usize| format!("not-the-key-{n}");
    for n in 0..30 {
        let (status, head, body) = get_as(&d, [127, 0, 0, 3], "/endpoints", &guess(n));
        assert_eq!(status, 401, "{head}\n{body}");
    }
    // Past the bound: refused unchecked, a right key too.
    for key in [guess(30), d.key.clone()] {
        let (status, head, body) = get_as(&d, [127, 0, 0, 3], "/endpoints", &key);
        assert_eq!(status, 429, "{head}\n{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "too_many_requests", "{body}");
        let retry: u64 = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("retry-after: ")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no retry-after in {head}"))
            .trim()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&retry), "retry-after {retry}");
    }
    // Another address is not concerned.
    let (status, _, body) = get_as(&d, [127, 0, 0, 4], "/endpoints", &d.key);
    assert_eq!(status, 200, "{body}");
    // Logged once for the address, counted per refusal.
    let lines: Vec<String> = d
        .logs()
        .into_iter()
        .filter(|l| l.contains("auth_failures_per_minute") && l.contains("127.0.0.3"))
        .collect();
    assert_eq!(lines.len(), 1, "one log line for the address: {lines:#?}");
    let (status, _, text) = get_as(&d, [127, 0, 0, 4], "/metrics", &d.key);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        metric(&text, "rest_auth_throttled_total"),
        Some(2),
        "{text}"
    );
    // A failure's worth (2 s at 30 a minute) later, the address may try once more.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, _, body) = get_as(&d, [127, 0, 0, 3], "/endpoints", &d.key);
    assert_eq!(status, 200, "{body}");
}

/// A listener waits for a free connection slot without holding one. Before, each
/// listener took a slot and then waited in `accept`: `rest_connections` counted every
/// listener as an open connection, and with one slot left an idle listener held it while
/// a client of another listener waited in the backlog (found by an outside review: with
/// `max_connections = 1` and two addresses, one of them was never served).
#[test]
fn a_listener_holds_no_connection_slot_while_it_waits() {
    let p = support::Prepared::new("", "");
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let two = "listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]";
    let text = text.replacen("listen = [\"127.0.0.1:0\"]", two, 1);
    assert!(text.contains(two), "{text}");
    let text = text.replacen("[rest]\n", "[rest]\nmax_connections = 1\n", 1);
    std::fs::write(&p.config_path, text).unwrap();
    let d = p.start();
    let rest = d.ready.as_ref().expect("ready").rest.clone();
    assert_eq!(rest.len(), 2, "{rest:?}");
    // Each address is served through the one slot, in turn and twice in a row (with the
    // slot handed from listener to listener in turn, alternating alone could pass).
    for round in 0..2 {
        for to in rest.iter().chain(rest.iter().rev()) {
            let (status, head, body) = get_at([127, 0, 0, 1], *to, "/endpoints", &d.key);
            assert_eq!(status, 200, "round {round}, {to}: {head}\n{body}");
        }
    }
    // The gauge counts connections, not listeners: the one asking.
    let (status, _, text) = get_at([127, 0, 0, 1], rest[1], "/metrics", &d.key);
    assert_eq!(status, 200, "{text}");
    assert_eq!(metric(&text, "rest_connections"), Some(1), "{text}");
}
