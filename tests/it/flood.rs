//! Bounded memory under a flood. The real daemon runs with deliberately small limits and
//! is flooded, on 127.0.0.1 only and bounded in count and time, with
//!
//! - CoAP registrations from thousands of distinct UDP source ports, far more than the
//!   endpoint quotas, each sent twice with the same message id (the second must be
//!   answered from the duplicate cache, byte for byte): every other wave in the default
//!   domain (past its quota: 4.03), the others each in a domain of its own, as `d=` lets a
//!   device choose (past the quota over all domains: 5.03);
//! - malformed datagrams and distinct-message-id junk requests from distinct ports (the
//!   duplicate cache must stay at its capacity);
//! - REST: valid asynchronous reads of registered devices that never answer (their queues
//!   fill: 429), requests with unknown keys (401), oversized bodies (413), pipelined
//!   garbage, and slow or half-open connections (nothing sent, half a request line, half
//!   an HTTP/2 preface, a body that never completes, an idle keep-alive connection, a
//!   header that grows past the head limit and never ends, pipelined requests whose
//!   responses are never read), more of them than `rest.max_connections`; every one must
//!   be closed by the daemon.
//!
//! The daemon's VmRSS is read from /proc before, during (sampled, peak) and after, and its
//! growth must stay under a bound derived from the configured limits (see [`rss_bound`]).
//! Afterwards the daemon must still answer REST and a new in-quota registration. No
//! timing assertions: memory bounds and behaviour only.

use crate::support;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use support::coap::{code, location};
use support::{Prepared, eventually};

// The configured limits (small on purpose).
/// `registry.max_endpoints_per_domain`.
const QUOTA: usize = 100;
/// `registry.max_endpoints` (over all domains).
const TOTAL: usize = 150;
/// `coap.dedup_capacity`.
const DEDUP: usize = 512;
/// `coap.max_in_flight`.
const IN_FLIGHT: usize = 32;
/// `requests.queue_len`.
const QUEUE_LEN: usize = 4;
/// `requests.max_body`.
const MAX_BODY: usize = 4096;
/// `notifications.max_queued_per_key`.
const MAX_QUEUED: usize = 50;
/// `rest.max_connections`.
const MAX_CONNS: usize = 64;
/// `rest.client_timeout_s`.
const CLIENT_TIMEOUT_S: u64 = 2;

// The flood.
/// Registered devices that never answer: the targets of the REST reads.
const SILENT: usize = 8;
/// Registering sockets per wave. Waves run one after the other so that every exchange of a
/// wave is still in the duplicate cache when its duplicate arrives (WAVE < DEDUP).
const WAVE: usize = 400;
const REG_WAVES: usize = 8;
/// Junk requests: sockets (in waves of WAVE) and distinct message ids per socket.
const JUNK_SOCKETS: usize = 1200;
const JUNK_PER_SOCKET: usize = 8;
/// Sockets that each send five malformed datagrams (in waves of WAVE).
const MALFORMED_SOCKETS: usize = 1200;
/// REST threads sending asynchronous reads, and reads per thread.
const READ_THREADS: usize = 6;
const READS_PER_THREAD: usize = 300;
/// Oversized bodies per thread (two threads).
const OVERSIZE_PER_THREAD: usize = 150;
/// Connections that send valid requests followed by pipelined garbage.
const GARBAGE_CONNS: usize = 200;
/// Slow and half-open connections, opened at once (several times MAX_CONNS).
const SLOW_CONNS: usize = 7 * MAX_CONNS;

/// Retransmission interval of the test's CoAP devices.
const RETRANSMIT: Duration = Duration::from_millis(300);
/// Longest wait of any one phase (a hang fails the test instead of blocking it).
const PHASE: Duration = Duration::from_secs(60);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The most the daemon's resident memory may grow during the flood, from the limits.
///
/// What the limits let the daemon keep, per item with a margin over what was measured:
/// - endpoints: TOTAL × 16 KiB. One registration with the flood's 48-link object list
///   (record, links text, parsed resources, name maps, its `registrations` event) was
///   measured at about 10 KiB: with the quota lifted, this flood grew the daemon by
///   32 MiB;
/// - duplicate cache: DEDUP × 1 KiB (key, order slot, an encoded reply of at most a few
///   hundred bytes);
/// - CoAP handlers in flight: IN_FLIGHT × 16 KiB (task, a request of at most
///   `coap.max_datagram` bytes, the registry's work on it);
/// - requests queued for the silent devices: SILENT × (QUEUE_LEN + 1) × (MAX_BODY + 4 KiB);
/// - undelivered events of the one access key: MAX_QUEUED × 8 KiB;
/// - REST connections: MAX_CONNS × (64 KiB + 32 KiB): hyper's read buffer, which the
///   daemon caps at 64 KiB (a longer head is 431), plus write buffer, task and a body of
///   at most MAX_BODY;
///
/// plus a fixed 8 MiB for what does not grow per item: SQLite's page cache (2 MiB by
/// default) and WAL index, malloc arenas of the runtime threads touched further under
/// load, allocator fragmentation.
///
/// That is about 17 MiB; the growth measured on a 2-core machine was 6–7 MiB. The flood
/// sends some 22,000 datagrams and 3,000 HTTP requests over some 1,800 connections, so a
/// leak of even 1 KiB per item, or the endpoint quota not applied (+32 MiB, above), would
/// break it; the behaviour assertions cover the limits whose items are too small to show
/// in RSS (cache entries, queued requests, events, open connections).
fn rss_bound() -> u64 {
    let n = |x: usize| x as u64;
    n(TOTAL) * 16 * KIB
        + n(DEDUP) * KIB
        + n(IN_FLIGHT) * 16 * KIB
        + n(SILENT) * (n(QUEUE_LEN) + 1) * (n(MAX_BODY) + 4 * KIB)
        + n(MAX_QUEUED) * 8 * KIB
        + n(MAX_CONNS) * (64 + 32) * KIB
        + 8 * MIB
}

fn config() -> Prepared {
    let coap = format!(
        "dedup_capacity = {DEDUP}\nmax_in_flight = {IN_FLIGHT}\n\
         ack_timeout_ms = 500\nack_random_factor = 1.0\nmax_retransmit = 0\n"
    );
    let extra = format!(
        "[registry]\nmax_endpoints_per_domain = {QUOTA}\nmax_endpoints = {TOTAL}\n\
         [requests]\nqueue_len = {QUEUE_LEN}\nmax_body = {MAX_BODY}\n\
         [notifications]\nmax_queued_per_key = {MAX_QUEUED}\n"
    );
    let p = Prepared::new(&coap, &extra);
    // The harness writes `[rest]` itself; the REST limits join that section. The flood's
    // unknown keys all come from 127.0.0.1 and are counted as 401s: no bound on failed
    // authentications per address, which would answer them (and the valid reads after
    // them) 429 (connections::an_address_that_fails_authentication_too_often_waits).
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let text = text.replacen(
        "[rest]\n",
        &format!(
            "[rest]\nmax_connections = {MAX_CONNS}\nclient_timeout_s = {CLIENT_TIMEOUT_S}\n\
             auth_failures_per_minute = 0\n"
        ),
        1,
    );
    std::fs::write(&p.config_path, text).unwrap();
    p
}

/// The daemon's resident set size in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * KIB
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

// ---------------------------------------------------------------------------------------
// CoAP

/// A CoAP request datagram.
fn coap_request(
    mid: u16,
    method: RequestType,
    path: &[&str],
    query: &[String],
    payload: &[u8],
    cf: Option<ContentFormat>,
) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(vec![(mid >> 8) as u8, mid as u8, 0xF1, 0x00]);
    for seg in path {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    for q in query {
        p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
    }
    if let Some(cf) = cf {
        p.set_content_format(cf);
    }
    p.payload = payload.to_vec();
    p.to_bytes().expect("encode")
}

/// The object list of the flood's devices: 48 links, about 1 KiB (a datagram holds it).
fn flood_links() -> String {
    let mut links = vec!["</3/0>".to_string(), "</1/0>".to_string()];
    links.extend((0..46).map(|i| format!("</3303/{i}/5700>;obs")));
    links.join(",")
}

/// A registration of `ep`, in `domain` (`d=`) or the default domain.
fn registration(mid: u16, ep: &str, domain: Option<&str>) -> Vec<u8> {
    let mut query = vec![format!("ep={ep}"), "lt=600".into()];
    query.extend(domain.map(|d| format!("d={d}")));
    coap_request(
        mid,
        RequestType::Post,
        &["rd"],
        &query,
        flood_links().as_bytes(),
        Some(ContentFormat::ApplicationLinkFormat),
    )
}

/// One device socket and what it sends: datagrams in order, one outstanding at a time.
/// `Some(mid)` waits for a reply with that message id (retransmitting the datagram until
/// then, as a CoAP client does); `None` is sent once and not answered.
struct Peer {
    sock: UdpSocket,
    script: Vec<(Vec<u8>, Option<u16>)>,
    next: usize,
    sent_at: Option<Instant>,
    /// The replies, one per datagram that expects one.
    replies: Vec<Vec<u8>>,
    /// Nothing is sent before this (a device waiting out a 5.03's Max-Age).
    not_before: Option<Instant>,
}

impl Peer {
    fn new(server: SocketAddr, script: Vec<(Vec<u8>, Option<u16>)>) -> Peer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind device socket");
        sock.connect(server).unwrap();
        sock.set_nonblocking(true).unwrap();
        Peer {
            sock,
            script,
            next: 0,
            sent_at: None,
            replies: Vec::new(),
            not_before: None,
        }
    }

    fn done(&self) -> bool {
        self.next == self.script.len()
    }
}

/// Runs every peer's script to its end (all replies received) or fails after PHASE.
/// Returns how many datagrams were retransmitted.
fn drive(peers: &mut [Peer]) -> usize {
    let deadline = Instant::now() + PHASE;
    let mut buf = [0u8; 2048];
    let mut retransmitted = 0;
    loop {
        let mut progress = false;
        let mut pending = 0;
        for p in peers.iter_mut() {
            if p.not_before.is_some_and(|t| Instant::now() < t) {
                pending += 1;
                continue;
            }
            while !p.done() {
                let (bytes, expect) = &p.script[p.next];
                match expect {
                    None => {
                        let _ = p.sock.send(bytes);
                        p.next += 1;
                    }
                    Some(_) => {
                        if p.sent_at.is_none_or(|t| t.elapsed() >= RETRANSMIT) {
                            if p.sent_at.is_some() {
                                retransmitted += 1;
                            }
                            let _ = p.sock.send(bytes);
                            p.sent_at = Some(Instant::now());
                            progress = true;
                        }
                        break;
                    }
                }
            }
            loop {
                match p.sock.recv(&mut buf) {
                    Ok(n) => {
                        let Some((_, Some(mid))) = p.script.get(p.next) else {
                            continue;
                        };
                        if n >= 4 && u16::from_be_bytes([buf[2], buf[3]]) == *mid {
                            p.replies.push(buf[..n].to_vec());
                            p.next += 1;
                            p.sent_at = None;
                            progress = true;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ICMP from an earlier send, or similar: not a reply.
                    Err(_) => break,
                }
            }
            if !p.done() {
                pending += 1;
            }
        }
        if pending == 0 {
            return retransmitted;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} CoAP peers still unanswered after {PHASE:?}"
        );
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Registrations from REG_WAVES × WAVE distinct sockets, each sent twice with the same
/// message id; even waves in the default domain, odd waves each registration in a domain
/// of its own. Returns the count of each answer and one accepted (socket, registration
/// id) of the default domain.
fn registration_flood(server: SocketAddr) -> (RegTally, Option<(Peer, String)>) {
    let mut t = RegTally::default();
    let mut kept = None;
    for wave in 0..REG_WAVES {
        let mut peers: Vec<Peer> = (0..WAVE)
            .map(|i| {
                let mid = (wave * WAVE + i) as u16;
                let name = format!("flood-{wave}-{i}");
                let dg = registration(mid, &name, (wave % 2 == 1).then_some(name.as_str()));
                Peer::new(server, vec![(dg.clone(), Some(mid)), (dg, Some(mid))])
            })
            .collect();
        drive(&mut peers);
        // A registration shed for load (5.03 with Max-Age: coap.max_in_flight busy) comes
        // back after Max-Age as a new request, as a device does, until it gets its answer.
        let mut peers: Vec<(usize, Peer)> = peers.into_iter().enumerate().collect();
        let mut answered = Vec::new();
        let mut round = 0u16;
        while !peers.is_empty() {
            let mut retry = Vec::new();
            for (i, p) in peers {
                let first = Packet::from_bytes(&p.replies[0]).expect("decodable reply");
                assert_eq!(
                    p.replies[0], p.replies[1],
                    "a duplicate registration must be answered from the duplicate cache"
                );
                match shed_max_age(&first) {
                    Some(age) => retry.push((i, age)),
                    None => answered.push((i, p, first)),
                }
            }
            if retry.is_empty() {
                break;
            }
            round += 1;
            assert!(round <= 30, "registrations still shed after 30 rounds");
            // Each comes back after its own Max-Age plus up to 1 s (a spread, as devices
            // are not synchronised to the millisecond).
            let now = Instant::now();
            let mut next: Vec<Peer> = retry
                .iter()
                .map(|&(i, age)| {
                    let mid = (wave * WAVE + i) as u16 ^ (round << 12);
                    let name = format!("flood-{wave}-{i}");
                    let dg = registration(mid, &name, (wave % 2 == 1).then_some(name.as_str()));
                    let mut p = Peer::new(server, vec![(dg.clone(), Some(mid)), (dg, Some(mid))]);
                    let spread = Duration::from_millis(
                        (i as u64 * 7919 + u64::from(round) * 104_729) % 1000,
                    );
                    p.not_before = Some(now + Duration::from_secs(age.into()) + spread);
                    p
                })
                .collect();
            drive(&mut next);
            peers = retry.into_iter().map(|(i, _)| i).zip(next).collect();
        }
        answered.sort_by_key(|(i, _, _)| *i);
        for (_, p, first) in answered {
            match code(&first) {
                ResponseType::Created => {
                    t.created += 1;
                    if kept.is_none() && wave % 2 == 0 {
                        let id = location(&first);
                        kept = Some((p, id));
                    }
                }
                ResponseType::Forbidden => t.forbidden += 1,
                ResponseType::ServiceUnavailable => t.unavailable += 1,
                other => panic!(
                    "registration answered {other:?}: {}",
                    String::from_utf8_lossy(&first.payload)
                ),
            }
        }
    }
    (t, kept)
}

/// The Max-Age of a 5.03 answered for load (`coap.max_in_flight` busy), None for any other
/// answer (a 5.03 of a full server carries another diagnostic).
fn shed_max_age(p: &Packet) -> Option<u32> {
    (code(p) == ResponseType::ServiceUnavailable && p.payload == b"busy: retry after Max-Age").then(
        || support::coap::uint_option(p, CoapOption::MaxAge).expect("a shed 5.03 has Max-Age"),
    )
}

/// Answers to the registration flood.
#[derive(Default)]
struct RegTally {
    /// 2.01.
    created: usize,
    /// 4.03: the default domain is full.
    forbidden: usize,
    /// 5.03: the server is full (all domains).
    unavailable: usize,
}

/// Distinct-message-id junk requests from distinct sockets: unknown paths (4.04),
/// registrations without `ep` (4.00), with a wrong Content-Format (4.15), and with bad
/// link-format in a fresh domain each (4.00). Returns the number sent.
fn junk_flood(server: SocketAddr) -> usize {
    let mut sent = 0;
    for wave in 0..JUNK_SOCKETS / WAVE {
        let mut peers: Vec<Peer> = (0..WAVE)
            .map(|i| {
                let script = (0..JUNK_PER_SOCKET)
                    .map(|k| {
                        let mid = (k * 7919 + i) as u16;
                        let n = (wave * WAVE + i) * JUNK_PER_SOCKET + k;
                        let dg = match k % 4 {
                            0 => coap_request(
                                mid,
                                RequestType::Get,
                                &["junk", &n.to_string()],
                                &[],
                                b"",
                                None,
                            ),
                            1 => coap_request(
                                mid,
                                RequestType::Post,
                                &["rd"],
                                &["lt=60".into()],
                                b"</3/0>",
                                Some(ContentFormat::ApplicationLinkFormat),
                            ),
                            2 => coap_request(
                                mid,
                                RequestType::Post,
                                &["rd"],
                                &[format!("ep=junk-{n}")],
                                b"</3/0>",
                                Some(ContentFormat::TextPlain),
                            ),
                            _ => coap_request(
                                mid,
                                RequestType::Post,
                                &["rd"],
                                &[format!("ep=junk-{n}"), format!("d=junk{n}")],
                                b"<unterminated",
                                Some(ContentFormat::ApplicationLinkFormat),
                            ),
                        };
                        (dg, Some(mid))
                    })
                    .collect();
                Peer::new(server, script)
            })
            .collect();
        drive(&mut peers);
        for p in &peers {
            for r in &p.replies {
                let packet = Packet::from_bytes(r).expect("decodable reply");
                let c = code(&packet);
                // Or shed for load (5.03 with Max-Age) while coap.max_in_flight were busy:
                // an answer too, and junk needs no retry.
                assert!(
                    matches!(
                        c,
                        ResponseType::NotFound
                            | ResponseType::BadRequest
                            | ResponseType::UnsupportedContentFormat
                    ) || shed_max_age(&packet).is_some(),
                    "junk answered {c:?}"
                );
            }
            sent += p.replies.len();
        }
    }
    sent
}

/// Malformed datagrams from distinct sockets: version 2, a runt, token length 9, an
/// oversized one (dropped unread), and a confirmable one ending in a payload marker, which
/// is rejected with RST (the socket waits for that, so the earlier ones have been read).
/// Returns (malformed sent, oversized sent).
fn malformed_flood(server: SocketAddr) -> (usize, usize) {
    let (mut malformed, mut oversize) = (0, 0);
    for wave in 0..MALFORMED_SOCKETS / WAVE {
        let mut peers: Vec<Peer> = (0..WAVE)
            .map(|i| {
                let mid = (wave * WAVE + i) as u16;
                let [hi, lo] = mid.to_be_bytes();
                let script = vec![
                    (vec![0x80, 0x01, hi, lo, 0xB2, b'r', b'd'], None),
                    (vec![0x40, 0x01], None),
                    (vec![0x59, 0x01, hi, lo, 1, 2, 3, 4, 5, 6, 7, 8, 9], None),
                    (vec![0x42; 1600], None),
                    (vec![0x40, 0x01, hi, lo, 0xFF], Some(mid)),
                ];
                Peer::new(server, script)
            })
            .collect();
        drive(&mut peers);
        for p in &peers {
            let rst = Packet::from_bytes(&p.replies[0]).expect("decodable RST");
            assert_eq!(rst.header.get_type(), MessageType::Reset);
        }
        malformed += 4 * WAVE;
        oversize += WAVE;
    }
    (malformed, oversize)
}

// ---------------------------------------------------------------------------------------
// HTTP

/// A raw HTTP/1.1 connection that reads responses off a buffer (so pipelined answers can
/// be read one by one).
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(PHASE)).unwrap();
        s.set_write_timeout(Some(PHASE)).unwrap();
        Conn { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    /// The next response's status and body; None when the daemon closed the connection.
    fn response(&mut self) -> Option<(u16, Vec<u8>)> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body = self.buf[end + 4..end + 4 + len].to_vec();
                    self.buf.drain(..end + 4 + len);
                    return Some((status, body));
                }
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Status counts, shared by the REST threads.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<String, usize>>);

impl Tally {
    fn add(&self, what: impl Into<String>) {
        *self.0.lock().unwrap().entry(what.into()).or_default() += 1;
    }
}

fn get_request(path: &str, key: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: flood\r\nAuthorization: Bearer {key}\r\n\r\n")
        .into_bytes()
}

/// Asynchronous reads of the silent devices: half of the threads keep one connection,
/// half open a new one per request; every fifth request carries an unknown key.
fn read_flood(rest: SocketAddr, key: &str, t: usize, tally: &Tally) {
    let keep = t.is_multiple_of(2);
    let mut conn = keep.then(|| Conn::open(rest));
    for i in 0..READS_PER_THREAD {
        let path = format!("/v2/endpoints/silent-{}/3/0/0", (t + i) % SILENT);
        let req = if i % 5 == 4 {
            get_request(&path, &format!("bogus-{t}-{i}"))
        } else {
            get_request(&path, key)
        };
        let c = match &mut conn {
            Some(c) => c,
            None => conn.insert(Conn::open(rest)),
        };
        c.send(&req).expect("send a read");
        let (status, _) = c.response().expect("a response to a read");
        tally.add(format!("read {status}"));
        if !keep {
            conn = None;
        }
    }
}

/// Bodies over `requests.max_body`: with Content-Length, chunked, and a Content-Length of
/// a megabyte of which only 2 × max_body are sent. Every one must be 413.
fn oversize_flood(rest: SocketAddr, key: &str, t: usize, tally: &Tally) {
    for i in 0..OVERSIZE_PER_THREAD {
        let mut c = Conn::open(rest);
        let head = format!(
            "PUT /v2/endpoints/silent-0/3/0/0 HTTP/1.1\r\nHost: flood\r\nAuthorization: Bearer {key}\r\nContent-Type: text/plain\r\n"
        );
        let size = MAX_BODY + 1 + (t * OVERSIZE_PER_THREAD + i) % MAX_BODY;
        let mut req = head.into_bytes();
        match i % 3 {
            0 => {
                req.extend(format!("Content-Length: {size}\r\n\r\n").bytes());
                req.extend(std::iter::repeat_n(b'x', size));
            }
            1 => {
                req.extend(b"Transfer-Encoding: chunked\r\n\r\n");
                for _ in 0..size.div_ceil(1000) {
                    req.extend(format!("{:x}\r\n", 1000).bytes());
                    req.extend(std::iter::repeat_n(b'x', 1000));
                    req.extend(b"\r\n");
                }
                req.extend(b"0\r\n\r\n");
            }
            _ => {
                req.extend(b"Content-Length: 1048576\r\n\r\n");
                req.extend(std::iter::repeat_n(b'x', 2 * MAX_BODY));
            }
        }
        // The daemon may answer (and close) before the whole body is written.
        let _ = c.send(&req);
        match c.response() {
            Some((status, _)) => tally.add(format!("oversize {status}")),
            None => tally.add("oversize closed"),
        }
    }
}

/// Valid requests followed by pipelined garbage on one connection: the valid ones are
/// answered in order, then the daemon answers 400 or closes.
fn garbage_flood(rest: SocketAddr, key: &str, tally: &Tally) {
    for i in 0..GARBAGE_CONNS {
        let mut c = Conn::open(rest);
        let valid = 1 + i % 5;
        let mut req = Vec::new();
        for _ in 0..valid {
            req.extend(get_request("/v2/endpoints?type=none", key));
        }
        req.extend(b"\x16\x03\x01\x02\x00 GARBAGE \x00\xff\r\n\r\nNOT HTTP AT ALL\r\n\r\n");
        req.extend(std::iter::repeat_n(b'z', 64 * (i % 64)));
        req.extend(get_request("/v2/endpoints", key));
        let _ = c.send(&req);
        for _ in 0..valid {
            let (status, _) = c.response().expect("pipelined request answered");
            tally.add(format!("pipelined {status}"));
        }
        match c.response() {
            Some((status, _)) => {
                tally.add(format!("garbage {status}"));
                assert!(c.response().is_none(), "connection kept after garbage");
            }
            None => tally.add("garbage closed"),
        }
    }
}

/// Responses a non-reading client asks for (slow kind 6), of `openapi.json` (about
/// 200 KiB each): far more than the socket buffers hold.
const UNREAD: usize = 100;

/// Slow and half-open connections, all opened at once; each must be closed by the daemon.
/// Returns how many were.
fn slow_flood(rest: SocketAddr, key: &str, tally: &Tally) -> usize {
    let mut conns: Vec<(usize, TcpStream, Vec<u8>)> = Vec::new();
    for i in 0..SLOW_CONNS {
        let mut s = TcpStream::connect_timeout(&rest, Duration::from_secs(10)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let kind = i % 7;
        let bytes: Vec<u8> = match kind {
            // Nothing at all.
            0 => Vec::new(),
            // Half a request line.
            1 => b"GET /v2/endpoints HTT".to_vec(),
            // Complete headers, 10 of 1000 body bytes.
            2 => format!(
                "PUT /v2/endpoints/silent-0/3/0/0 HTTP/1.1\r\nHost: flood\r\nAuthorization: Bearer {key}\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n0123456789"
            )
            .into_bytes(),
            // Half of the HTTP/2 connection preface.
            3 => b"PRI * HTTP/2.0\r\n".to_vec(),
            // One complete request, then idle on a keep-alive connection.
            4 => get_request("/v2/endpoints?type=none", key),
            // A 100 KiB header that never ends (over the daemon's 64 KiB head limit).
            5 => {
                let mut b = b"GET /v2/endpoints HTTP/1.1\r\nHost: flood\r\nX-Big: ".to_vec();
                b.extend(std::iter::repeat_n(b'a', 100 * 1024));
                b
            }
            // Pipelined requests for large responses, none of which is ever read.
            _ => get_request("/v2/openapi.json", key).repeat(UNREAD),
        };
        let _ = s.write_all(&bytes);
        s.set_nonblocking(true).unwrap();
        conns.push((kind, s, Vec::new()));
    }
    let deadline = Instant::now() + PHASE;
    let mut closed = vec![false; conns.len()];
    let mut buf = [0u8; 16384];
    let mut read_all = |n: usize, s: &mut TcpStream, got: &mut Vec<u8>, closed: &mut [bool]| loop {
        match s.read(&mut buf) {
            Ok(0) => {
                closed[n] = true;
                break;
            }
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => {
                closed[n] = true;
                break;
            }
        }
    };
    // Kinds 0 to 5: read what comes until the daemon closes.
    let reader = |kind: usize| kind != 6;
    while conns
        .iter()
        .enumerate()
        .any(|(n, (k, _, _))| reader(*k) && !closed[n])
        && Instant::now() < deadline
    {
        for (n, (kind, s, got)) in conns.iter_mut().enumerate() {
            if reader(*kind) && !closed[n] {
                read_all(n, s, got, &mut closed);
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Kind 6 has been accepted by now and stalled for a while: the daemon must have given
    // up on it, so that reading now finds the responses cut short and the connection closed.
    thread::sleep(Duration::from_secs(3 * CLIENT_TIMEOUT_S));
    while conns.iter().enumerate().any(|(n, _)| !closed[n]) && Instant::now() < deadline {
        for (n, (_, s, got)) in conns.iter_mut().enumerate() {
            if !closed[n] {
                read_all(n, s, got, &mut closed);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    for (n, (kind, _, got)) in conns.iter().enumerate() {
        let text = String::from_utf8_lossy(got);
        let first = text.split("\r\n").next().unwrap_or("").to_string();
        let status = first.split(' ').nth(1).unwrap_or("none").to_string();
        let answered = text.matches("HTTP/1.1 200").count();
        tally.add(format!(
            "slow kind {kind} {} (status {status}){}",
            if closed[n] { "closed" } else { "OPEN" },
            if *kind == 6 && answered < UNREAD {
                " cut short"
            } else {
                ""
            }
        ));
    }
    closed.iter().filter(|c| **c).count()
}

// ---------------------------------------------------------------------------------------

#[test]
fn memory_stays_bounded_under_a_flood() {
    let started = Instant::now();
    let d = config().start();
    let pid = d.pid();
    let (rest, coap, key) = (d.rest, d.coap, d.key.clone());

    // Warm-up: the silent devices, the admin key's channel, one of each kind of exchange,
    // so that what is allocated once (not per item) is in the baseline.
    let mut silent = Vec::new();
    for i in 0..SILENT {
        let mut dev = d.device();
        dev.register(&[&format!("ep=silent-{i}"), "lt=600"], "</3/0>,</1/0>");
        silent.push(dev);
    }
    assert!(d.pull_now().is_none(), "no events yet");
    assert_eq!(
        d.call("GET", "/v2/endpoints/silent-0/3/0/0", None, None)
            .status,
        202
    );
    assert_eq!(d.get("/v2/endpoints").status, 200);
    let mut warm = vec![Peer::new(
        coap,
        vec![
            (vec![0x40, 0x01, 0xAB, 0xCD, 0xFF], Some(0xABCD)),
            (
                coap_request(7, RequestType::Get, &["junk"], &[], b"", None),
                Some(7),
            ),
        ],
    )];
    drive(&mut warm);
    thread::sleep(Duration::from_millis(500));

    let before = rss(pid);
    let m0 = |name: &str| d.metric(name);
    let (dup0, malformed0, oversize0, busy0, discarded0) = (
        m0("coap_duplicates_total"),
        m0("coap_malformed_total"),
        m0("coap_oversize_total"),
        m0("coap_busy_drops_total"),
        m0("events_discarded_total"),
    );
    eprintln!("flood: RSS before {}", mib(before));

    // RSS sampler.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(rss(pid), Ordering::SeqCst);
                thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // REST floods, all at once, beside the CoAP floods below.
    let tally = Arc::new(Tally::default());
    let mut rest_threads = Vec::new();
    {
        let (key, tally) = (key.clone(), Arc::clone(&tally));
        rest_threads.push(thread::spawn(move || {
            let closed = slow_flood(rest, &key, &tally);
            tally.add(format!("slow closed total {closed}"));
        }));
    }
    for t in 0..READ_THREADS {
        let (key, tally) = (key.clone(), Arc::clone(&tally));
        rest_threads.push(thread::spawn(move || read_flood(rest, &key, t, &tally)));
    }
    for t in 0..2 {
        let (key, tally) = (key.clone(), Arc::clone(&tally));
        rest_threads.push(thread::spawn(move || oversize_flood(rest, &key, t, &tally)));
    }
    {
        let (key, tally) = (key.clone(), Arc::clone(&tally));
        rest_threads.push(thread::spawn(move || garbage_flood(rest, &key, &tally)));
    }

    // CoAP floods, one after the other (each bounded by PHASE).
    let (regs, kept) = registration_flood(coap);
    let junk = junk_flood(coap);
    let (malformed, oversize) = malformed_flood(coap);
    let coap_done = started.elapsed();

    for t in rest_threads {
        t.join().expect("REST flood thread");
    }
    let flood_done = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    // Let the last requests to the silent devices time out and their events be queued.
    thread::sleep(Duration::from_secs(2));
    let after = rss(pid);

    let tally: BTreeMap<String, usize> = tally.0.lock().unwrap().clone();
    let m = |name: &str| d.metric(name);
    eprintln!(
        "flood: {} registrations ({} created, {} refused 4.03, {} refused 5.03), {junk} junk requests, {malformed} malformed + {oversize} oversized datagrams; CoAP done at {coap_done:?}, REST at {flood_done:?}",
        REG_WAVES * WAVE,
        regs.created,
        regs.forbidden,
        regs.unavailable
    );
    eprintln!(
        "flood: duplicates {}, busy drops {}, events discarded {}, dedup entries {}, REST connections {}",
        m("coap_duplicates_total") - dup0,
        m("coap_busy_drops_total") - busy0,
        m("events_discarded_total") - discarded0,
        m("coap_dedup_entries"),
        m("rest_connections"),
    );
    eprintln!("flood: REST outcomes {tally:#?}");
    let bound = rss_bound();
    eprintln!(
        "flood: RSS before {}, peak {}, after {}; growth bound {}",
        mib(before),
        mib(peak),
        mib(after),
        mib(bound)
    );

    // Memory.
    assert!(
        peak.saturating_sub(before) < bound,
        "peak RSS grew by {} (bound {})",
        mib(peak - before),
        mib(bound)
    );
    assert!(
        after.saturating_sub(before) < bound,
        "RSS after the flood grew by {} (bound {})",
        mib(after - before),
        mib(bound)
    );

    // CoAP behaviour.
    assert_eq!(
        regs.created,
        TOTAL - SILENT,
        "registrations accepted up to the quota over all domains"
    );
    assert_eq!(
        regs.forbidden,
        REG_WAVES / 2 * WAVE - (QUOTA - SILENT),
        "the rest of the default domain's got 4.03"
    );
    assert_eq!(
        regs.unavailable,
        REG_WAVES / 2 * WAVE - (TOTAL - QUOTA),
        "the rest of those in domains of their own got 5.03"
    );
    assert_eq!(m("registered_endpoints"), TOTAL as u64);
    assert!(
        m("coap_duplicates_total") - dup0 >= (REG_WAVES * WAVE) as u64,
        "every duplicate registration was recognised"
    );
    assert!(m("coap_malformed_total") - malformed0 >= malformed as u64);
    assert_eq!(m("coap_oversize_total") - oversize0, oversize as u64);
    assert_eq!(
        m("coap_dedup_entries"),
        DEDUP as u64,
        "the duplicate cache is full and no larger than coap.dedup_capacity"
    );

    // REST behaviour.
    let count = |k: &str| tally.get(k).copied().unwrap_or(0);
    let reads = READ_THREADS * READS_PER_THREAD;
    assert!(count("read 202") > 0, "some reads accepted: {tally:?}");
    assert!(count("read 429") > 0, "full queues answered 429: {tally:?}");
    assert_eq!(count("read 401"), reads / 5, "unknown keys refused");
    assert_eq!(
        count("read 202") + count("read 429") + count("read 401"),
        reads,
        "no other answer to a read: {tally:?}"
    );
    assert_eq!(
        count("oversize 413"),
        2 * OVERSIZE_PER_THREAD,
        "every oversized body answered 413: {tally:?}"
    );
    let pipelined: usize = (0..GARBAGE_CONNS).map(|i| 1 + i % 5).sum();
    assert_eq!(count("pipelined 200"), pipelined, "{tally:?}");
    assert_eq!(
        count("garbage 400") + count("garbage closed"),
        GARBAGE_CONNS,
        "garbage ends the connection: {tally:?}"
    );
    assert_eq!(
        count(&format!("slow closed total {SLOW_CONNS}")),
        1,
        "every slow or half-open connection was closed by the daemon: {tally:?}"
    );
    assert!(
        tally
            .keys()
            .filter(|k| k.starts_with("slow kind 2"))
            .all(|k| k.contains("status 408")),
        "an unfinished body is answered 408: {tally:?}"
    );
    assert!(
        tally
            .keys()
            .filter(|k| k.starts_with("slow kind 6"))
            .all(|k| k.ends_with("cut short")),
        "a client that reads nothing is disconnected: {tally:?}"
    );
    assert!(
        tally
            .keys()
            .filter(|k| k.starts_with("slow kind 5"))
            .all(|k| k.contains("status 431")),
        "a head over 64 KiB is answered 431: {tally:?}"
    );
    assert!(
        m("events_discarded_total") > discarded0,
        "the admin key's queue stayed at notifications.max_queued_per_key"
    );
    assert!(m("rest_connections") <= MAX_CONNS as u64);

    // Still serving: REST, and a new registration within the quota (after one leaves),
    // each answered within 5 s (the device helper's own read timeout).
    let mut c = Conn::open(rest);
    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send(&get_request("/v2/endpoints", &key)).unwrap();
    let (status, body) = c.response().expect("REST answers after the flood");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), QUOTA);
    let (leaver, id) = kept.expect("one accepted flood registration");
    leaver.sock.set_nonblocking(false).unwrap();
    leaver
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let bye = coap_request(60001, RequestType::Delete, &["rd", &id], &[], b"", None);
    leaver.sock.send(&bye).unwrap();
    // The answer to this message id: on a slow machine the socket may still hold late
    // answers to the flood's own retransmissions (a 2.01 from the duplicate cache).
    let mut buf = [0u8; 2048];
    let answer = loop {
        let n = leaver
            .sock
            .recv(&mut buf)
            .expect("de-registration answered");
        if let Ok(p) = Packet::from_bytes(&buf[..n])
            && p.header.message_id == 60001
        {
            break p;
        }
    };
    assert_eq!(code(&answer), ResponseType::Deleted);
    let mut late = d.device();
    late.register(&["ep=after-the-flood", "lt=600"], "</3/0>");
    let mut refused = d.device();
    let mut req = support::coap::Req::new(RequestType::Post, &["rd"]);
    let q = ["ep=one-too-many"];
    req.query = &q;
    req.payload = b"</3/0>";
    req.content_format = Some(ContentFormat::ApplicationLinkFormat);
    assert_eq!(code(&refused.request(&req)), ResponseType::Forbidden);
    let q = ["ep=one-too-many", "d=a-domain-of-its-own"];
    req.query = &q;
    assert_eq!(
        code(&refused.request(&req)),
        ResponseType::ServiceUnavailable
    );
    assert!(eventually(Duration::from_secs(5), || d
        .get("/v2/endpoints/after-the-flood")
        .status
        == 200));
    eprintln!("flood: whole test {:?}", started.elapsed());
    drop(silent);
}

/// An HTTP/2 connection that made a request and then sends nothing is closed after
/// `rest.client_timeout_s` (hyper has no idle timeout of its own for HTTP/2, so it held
/// its `rest.max_connections` slot for good). Frames are written by hand: a GET of
/// `/v2/endpoints` with the admin key, then silence.
#[test]
fn an_idle_http2_connection_is_closed() {
    let d = config().start();
    let mut s = TcpStream::connect(d.rest).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10 * CLIENT_TIMEOUT_S)))
        .unwrap();
    // HPACK, no Huffman, no indexing: :method GET, :scheme http (static 2, 6), then :path,
    // :authority and authorization with static names 4, 1, 23.
    let literal = |out: &mut Vec<u8>, name_index: &[u8], value: &str| {
        out.extend_from_slice(name_index);
        assert!(value.len() < 127);
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    };
    let mut block = vec![0x82, 0x86];
    literal(&mut block, &[0x04], "/v2/endpoints");
    literal(&mut block, &[0x01], "127.0.0.1");
    literal(&mut block, &[0x0f, 0x08], &format!("Bearer {}", d.key));
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    s.write_all(&out).unwrap();
    // Read frames until the connection ends: the response to stream 1 must come first.
    let started = Instant::now();
    let mut answered = false;
    let mut head = [0u8; 9];
    loop {
        match s.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the idle connection was not closed within {:?}: {e}",
                started.elapsed()
            ),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if head[3] == 0x1 && stream == 1 {
            // :status 200 is static entry 8.
            assert_eq!(payload.first(), Some(&0x88), "status of GET /v2/endpoints");
            answered = true;
        }
        if head[3] == 0x4 && head[4] & 0x1 == 0 {
            s.write_all(&frame(0x4, 0x1, 0, &[])).unwrap(); // SETTINGS ACK
        }
    }
    assert!(
        answered,
        "the request was answered before the connection closed"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(CLIENT_TIMEOUT_S),
        "closed before rest.client_timeout_s"
    );
}
