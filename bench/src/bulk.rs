//! A registration-only load generator for endpoint counts beyond one socket per device.
//!
//! The device simulator gives every device its own UDP socket, so it can register at most
//! `ulimit -n` devices (20 000 on the machine of docs/PERFORMANCE.md). For the RSS and
//! restart figures at 100 000 endpoints only registrations matter, so this loader registers
//! many endpoints from each socket: an LwM2M server must accept several endpoints behind
//! one address (a gateway, or many devices behind one NAT address), and connectord keys
//! registrations by endpoint name, not by address. The registrations are the simulator's
//! (`POST /rd?ep=..&lt=86400&lwm2m=1.0&b=U` with [`connectord::simulate::LINKS`]), each a
//! confirmable request with its own message id and token; ACKs are matched by token and
//! message id. Nothing here answers requests from the daemon, so this is for registrations
//! only.
//!
//! It behaves as a CoAP client does (RFC 7252 §4.2, §5.9.3.4): a request unanswered after
//! a random 2–3 s is retransmitted, the timeout doubling, 4 times at most, then it fails;
//! a 5.03 Service Unavailable with Max-Age is waited out (Max-Age plus up to 1 s of random
//! jitter) and the registration sent again as a new request (new message id), as often as
//! the daemon asks until the run's deadline. Shed answers (5.03) and retransmissions are
//! counted apart.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;

/// What a bulk registration run did.
#[derive(Debug, Default, Clone)]
pub struct BulkReport {
    pub registered: usize,
    /// Registrations that failed: another answer than 2.01 or a shed 5.03, or no answer
    /// after the last retransmission.
    pub failed: usize,
    /// Datagrams sent again after an ACK timeout (same message id).
    pub retransmissions: u64,
    /// 5.03 answers with Max-Age (each followed by a new request after Max-Age).
    pub shed: u64,
    /// Those 5.03 answers' Max-Age, summed (seconds).
    pub shed_max_age_s: u64,
    /// Registrations that gave up after the last retransmission (part of `failed`).
    pub timed_out: usize,
    /// Registrations neither registered nor failed at the deadline.
    pub unfinished: usize,
    pub elapsed: Duration,
}

/// Registers `n` endpoints named `{prefix}{socket}-{index}` at `server` from `sockets`
/// UDP sockets spread over 127.0.0.x addresses, at most `window` outstanding per socket.
pub fn register(
    server: SocketAddr,
    n: usize,
    sockets: usize,
    window: usize,
    prefix: &str,
    timeout: Duration,
) -> Result<BulkReport> {
    ensure!(server.ip().is_loopback(), "loopback only");
    let sockets = sockets.clamp(1, n.max(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..sockets {
            let names = socket_names(prefix, s, n, sockets);
            let bind = socket_ip(1, s);
            let sock = UdpSocket::bind(SocketAddr::new(bind, 0))
                .await
                .with_context(|| format!("bind {bind}"))?;
            let deadline = t0 + timeout;
            tasks.push(tokio::spawn(async move {
                one_socket(&sock, server, &names, window.max(1), deadline).await
            }));
        }
        let mut total = BulkReport::default();
        for t in tasks {
            let r = t.await??;
            total.registered += r.registered;
            total.failed += r.failed;
            total.retransmissions += r.retransmissions;
            total.shed += r.shed;
            total.shed_max_age_s += r.shed_max_age_s;
            total.timed_out += r.timed_out;
            total.unfinished += r.unfinished;
        }
        total.elapsed = t0.elapsed();
        Ok(total)
    })
}

/// The endpoints of socket `s` of `sockets` (`s`, `s + sockets`, `s + 2 * sockets`, ...
/// below `n`), named `{prefix}{s}-{index:07}`.
/// The name [`register`] gives endpoint `i` (0-based) of `n` registered from `sockets`
/// sockets with `prefix`.
pub fn endpoint_name(prefix: &str, i: usize, n: usize, sockets: usize) -> String {
    let sockets = sockets.clamp(1, n.max(1));
    format!("{prefix}{}-{i:07}", i % sockets)
}

fn socket_names(prefix: &str, s: usize, n: usize, sockets: usize) -> Vec<String> {
    (s..n)
        .step_by(sockets)
        .map(|i| format!("{prefix}{s}-{i:07}"))
        .collect()
}

/// The loopback address socket `s` binds: 250 sockets per address (which keeps well inside
/// the ephemeral port range), the third octet counting from `first`.
fn socket_ip(first: u8, s: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        first + (s / 250) as u8,
        1 + (s % 250) as u8,
    ))
}

struct Outstanding {
    /// Index of the endpoint name.
    name: usize,
    mid: u16,
    bytes: Vec<u8>,
    sent: Instant,
    /// This transmission's timeout (the first is random in [2, 3) s, then doubled).
    timeout: Duration,
    tries: u32,
    /// Shed: when to send a new request (nothing on the wire until then).
    retry_at: Option<Instant>,
}

/// A small xorshift for the random timeouts and jitter (no need for more).
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A random duration in [0, max).
    fn upto(&mut self, max: Duration) -> Duration {
        let n = max.as_micros().max(1) as u64;
        Duration::from_micros(self.next() % n)
    }
}

async fn one_socket(
    sock: &UdpSocket,
    server: SocketAddr,
    names: &[String],
    window: usize,
    deadline: Instant,
) -> Result<BulkReport> {
    let mut report = BulkReport::default();
    let mut next = 0usize;
    let mut mid: u16 = rand_u16(names);
    let mut jitter = Jitter(u64::from(mid) << 32 | 0x9E37_79B9 | names.len() as u64);
    let mut out: HashMap<u32, Outstanding> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    // RFC 7252 ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR 1.5, MAX_RETRANSMIT 4.
    let ack_timeout = Duration::from_secs(2);
    while next < names.len() || !out.is_empty() {
        while out.len() < window && next < names.len() {
            let token = next as u32;
            mid = mid.wrapping_add(1);
            let bytes = register_packet(&names[next], mid, token)?;
            sock.send_to(&bytes, server).await?;
            out.insert(
                token,
                Outstanding {
                    name: next,
                    mid,
                    bytes,
                    sent: Instant::now(),
                    timeout: ack_timeout + jitter.upto(ack_timeout / 2),
                    tries: 0,
                    retry_at: None,
                },
            );
            next += 1;
        }
        if Instant::now() >= deadline {
            // Reported, not an error: the storm's report says how far it got.
            report.unfinished = out.len() + names.len() - next;
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) => {
                let Ok(p) = Packet::from_bytes(&buf[..len]) else {
                    continue;
                };
                if p.get_token().len() != 4 || p.header.get_type() != MessageType::Acknowledgement {
                    continue;
                }
                let mut t = [0u8; 4];
                t.copy_from_slice(p.get_token());
                let token = u32::from_be_bytes(t);
                // The answer to the transmission on the wire (a late copy of an earlier
                // exchange's answer is not).
                let Some(o) = out
                    .get_mut(&token)
                    .filter(|o| o.retry_at.is_none() && o.mid == p.header.message_id)
                else {
                    continue;
                };
                match p.header.code {
                    MessageClass::Response(ResponseType::Created) => {
                        out.remove(&token);
                        report.registered += 1;
                    }
                    MessageClass::Response(ResponseType::ServiceUnavailable) => match max_age(&p) {
                        Some(age) => {
                            report.shed += 1;
                            report.shed_max_age_s += u64::from(age);
                            o.retry_at = Some(
                                Instant::now()
                                    + Duration::from_secs(age.into())
                                    + jitter.upto(Duration::from_secs(1)),
                            );
                        }
                        None => {
                            out.remove(&token);
                            report.failed += 1;
                        }
                    },
                    _ => {
                        out.remove(&token);
                        report.failed += 1;
                    }
                }
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
        // Retransmit what waited too long (doubling, as CoAP does, 4 times at most), and
        // send again, as a new request, what was shed once its Max-Age is over.
        let now = Instant::now();
        let mut give_up = Vec::new();
        for (token, o) in out.iter_mut() {
            if let Some(at) = o.retry_at {
                if now >= at {
                    mid = mid.wrapping_add(1);
                    o.mid = mid;
                    o.bytes = register_packet(&names[o.name], mid, *token)?;
                    o.sent = now;
                    o.timeout = ack_timeout + jitter.upto(ack_timeout / 2);
                    o.tries = 0;
                    o.retry_at = None;
                    sock.send_to(&o.bytes, server).await?;
                }
                continue;
            }
            if now.duration_since(o.sent) >= o.timeout {
                if o.tries >= 4 {
                    give_up.push(*token);
                    continue;
                }
                o.tries += 1;
                o.sent = now;
                o.timeout *= 2;
                report.retransmissions += 1;
                sock.send_to(&o.bytes, server).await?;
            }
        }
        for t in give_up {
            out.remove(&t);
            report.failed += 1;
            report.timed_out += 1;
        }
    }
    Ok(report)
}

/// The Max-Age option of a response, in seconds.
fn max_age(p: &Packet) -> Option<u32> {
    p.get_first_option(CoapOption::MaxAge)
        .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

fn register_packet(name: &str, mid: u16, token: u32) -> Result<Vec<u8>> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(token.to_be_bytes().to_vec());
    p.add_option(CoapOption::UriPath, b"rd".to_vec());
    for q in [
        format!("ep={name}"),
        "lt=86400".to_string(),
        "lwm2m=1.0".to_string(),
        "b=U".to_string(),
    ] {
        p.add_option(CoapOption::UriQuery, q.into_bytes());
    }
    p.add_option(CoapOption::ContentFormat, vec![40]);
    p.payload = connectord::simulate::LINKS.as_bytes().to_vec();
    p.to_bytes().context("encode a registration")
}

/// A starting message id that differs between sockets (no randomness needed).
fn rand_u16(names: &[String]) -> u16 {
    names
        .first()
        .map(|n| {
            n.bytes()
                .fold(0u16, |a, b| a.wrapping_mul(31).wrapping_add(b as u16))
        })
        .unwrap_or(0)
}

/// Counters of a running [`Notifier`].
#[derive(Debug, Default)]
pub struct NotifyCounters {
    /// Endpoints registered (2.01).
    pub registered: AtomicU64,
    /// Observe requests answered (observations established by the daemon).
    pub observed: AtomicU64,
    /// Notifications sent.
    pub sent: AtomicU64,
    /// GET requests answered (observe or not).
    pub answered: AtomicU64,
}

/// Registered endpoints that answer the daemon's GET requests (plain reads too, with a
/// piggybacked 2.05 "21.5") and send a NON notification for every observation each
/// `interval`, from few sockets: the offered
/// load costs far less CPU than the one-task-per-device simulator, so on a shared
/// machine more of it is left to the daemon. Which endpoint an observe request is for
/// does not matter here: the token identifies the observation, so every observation of
/// a socket is served alike.
pub struct Notifier {
    pub counters: Arc<NotifyCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Notifier {
    /// The name of endpoint `i` (0-based) of a notifier of `n` endpoints on `sockets`
    /// sockets.
    pub fn endpoint_name(i: usize, n: usize, sockets: usize) -> String {
        let sockets = sockets.clamp(1, n.max(1));
        format!("nb{}-{i:07}", i % sockets)
    }

    pub fn start(
        server: SocketAddr,
        n: usize,
        sockets: usize,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Notifier> {
        Notifier::start_named("nb", server, n, sockets, interval, timeout)
    }

    /// As [`Notifier::start`], the endpoints named `{prefix}{socket}-{i:07}` (several
    /// notifiers on one cluster need names of their own).
    pub fn start_named(
        prefix: &str,
        server: SocketAddr,
        n: usize,
        sockets: usize,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Notifier> {
        let prefix = prefix.to_string();
        ensure!(server.ip().is_loopback(), "loopback only");
        let sockets = sockets.clamp(1, n.max(1));
        let counters = Arc::new(NotifyCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (Arc::clone(&counters), Arc::clone(&stop));
        let thread = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for s in 0..sockets {
                    let names = socket_names(&prefix, s, n, sockets);
                    let bind = socket_ip(2, s);
                    let sock = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
                    let (c, st) = (Arc::clone(&c), Arc::clone(&st));
                    tasks.push(tokio::spawn(async move {
                        let deadline = Instant::now() + timeout;
                        let r = one_socket(&sock, server, &names, 8, deadline).await?;
                        c.registered
                            .fetch_add(r.registered as u64, Ordering::Relaxed);
                        notify_loop(&sock, server, interval, &c, &st).await
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                Ok(())
            })
        });
        Ok(Notifier {
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sending and waits for the sockets to close.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("notifier panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

async fn notify_loop(
    sock: &UdpSocket,
    server: SocketAddr,
    interval: Duration,
    c: &NotifyCounters,
    stop: &AtomicBool,
) -> Result<()> {
    // token → next Observe sequence number
    let mut observations: Vec<(Vec<u8>, u32)> = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // One timer for the stop check (a new sleep per datagram cost a timer entry each).
    let mut check_stop = tokio::time::interval(Duration::from_millis(100));
    let mut mid: u16 = 0x4000;
    while !stop.load(Ordering::Acquire) {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (len, from) = r?;
                let Ok(req) = Packet::from_bytes(&buf[..len]) else { continue };
                if !matches!(req.header.code, MessageClass::Request(RequestType::Get)) {
                    continue;
                }
                let observe = req.get_option(CoapOption::Observe).is_some();
                let mut ack = Packet::new();
                ack.header.set_version(1);
                ack.header.set_type(MessageType::Acknowledgement);
                ack.header.message_id = req.header.message_id;
                ack.set_token(req.get_token().to_vec());
                ack.header.code = MessageClass::Response(ResponseType::Content);
                if observe {
                    ack.add_option(CoapOption::Observe, vec![1]);
                    if !observations.iter().any(|(t, _)| t == req.get_token()) {
                        observations.push((req.get_token().to_vec(), 2));
                        c.observed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ack.add_option(CoapOption::ContentFormat, vec![]);
                ack.payload = b"21.5".to_vec();
                if let Ok(b) = ack.to_bytes() {
                    sock.send_to(&b, from).await?;
                    c.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tick.tick() => {
                for (token, seq) in observations.iter_mut() {
                    mid = mid.wrapping_add(1);
                    let mut p = Packet::new();
                    p.header.set_version(1);
                    p.header.set_type(MessageType::NonConfirmable);
                    p.header.message_id = mid;
                    p.header.code = MessageClass::Response(ResponseType::Content);
                    p.set_token(token.clone());
                    p.add_option(CoapOption::Observe, seq.to_be_bytes()[1..].to_vec());
                    *seq = (*seq + 1) & 0x00ff_ffff;
                    p.add_option(CoapOption::ContentFormat, vec![]);
                    p.payload = b"21.5".to_vec();
                    if let Ok(b) = p.to_bytes() {
                        // A full socket buffer is the daemon not keeping up: skip, as a
                        // sensor would, rather than queue.
                        if sock.try_send_to(&b, server).is_ok() {
                            c.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            _ = check_stop.tick() => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Notifier, socket_ip, socket_names};

    #[test]
    fn the_sockets_name_every_endpoint_once_as_endpoint_name_says() {
        let (n, sockets) = (23, 5);
        let mut named: Vec<String> = (0..sockets)
            .flat_map(|s| socket_names("nb", s, n, sockets))
            .collect();
        named.sort();
        let mut want: Vec<String> = (0..n)
            .map(|i| Notifier::endpoint_name(i, n, sockets))
            .collect();
        want.sort();
        assert_eq!(named, want);
        assert_eq!(socket_names("r", 1, 7, 3), ["r1-0000001", "r1-0000004"]);
    }

    #[test]
    fn sockets_spread_over_loopback_addresses_250_each() {
        assert_eq!(socket_ip(1, 0).to_string(), "127.0.1.1");
        assert_eq!(socket_ip(1, 249).to_string(), "127.0.1.250");
        assert_eq!(socket_ip(1, 250).to_string(), "127.0.2.1");
        assert_eq!(socket_ip(2, 0).to_string(), "127.0.2.1");
    }
}
