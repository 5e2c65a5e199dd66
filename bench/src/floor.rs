//! `--io-floor`: what the system calls of a proxied read cost on this machine, with no
//! daemon work around them (issue 24).
//!
//! A "null daemon" on one thread (a current-thread tokio runtime, as the daemon's REST
//! and CoAP tasks are tokio tasks) does, per request, only the I/O a proxied read does:
//! it reads an HTTP request of a read's size from one of 64 keep-alive TCP connections,
//! sends a CoAP GET of a read's size over UDP to a device, writes a 202 of a read's size,
//! and receives the device's answer (`recv_from`, one datagram a call). The load
//! generator (64 connections) and the echoing device run on other threads of this
//! process. The null daemon's thread CPU per request (`CLOCK_THREAD_CPUTIME_ID`) is the
//! floor under the daemon's "CPU per read" on this machine, less what the daemon adds on
//! top of this I/O: its store (WAL writes, `fsync`), the long-poll answers, its own code.
//!
//! Beside it, the UDP send alone: CPU per datagram sent with `sendto` one at a time and
//! with `sendmmsg` 8 at a time, to a socket another thread drains; the difference is the
//! most a send queue drained with `sendmmsg` could take off a read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, sendmmsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Row;

/// An HTTP request as the read scenario sends it (same headers, a typical path).
const REQUEST: &[u8] = b"GET /v2/endpoints/p-0000042/3/0/0 HTTP/1.1\r\nhost: 127.0.0.1:40000\r\nauthorization: Bearer 0123456789abcdef0123456789abcdef0123456789abcdef\r\n\r\n";
/// The daemon's 202 to it (headers and body of the same length).
const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 58\r\ndate: Sun, 06 Dec 2026 12:00:00 GMT\r\n\r\n{\"async-response-id\":\"1733486400#0123456789abcdef01234567\"}";
/// A CoAP GET of /3/0/0 with an 8-byte token and Accept (text/plain), and its answer.
const COAP_GET: &[u8] = &[
    0x48, 0x01, 0x12, 0x34, 1, 2, 3, 4, 5, 6, 7, 8, 0xb1, b'3', 0x01, b'0', 0x01, b'0', 0x61, 0x00,
];
const COAP_ANSWER: &[u8] = &[
    0x68, 0x45, 0x12, 0x34, 1, 2, 3, 4, 5, 6, 7, 8, 0xc0, 0xff, b'C', b'o', b'n', b'n', b'e', b'c',
    b't', b'o', b'r', b'd',
];

const CONNECTIONS: usize = 64;

/// The CPU time of the calling thread.
fn thread_cpu() -> Result<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

pub fn run(requests: usize, datagrams: usize) -> Result<Vec<Row>> {
    let (per_request, elapsed, lost) = null_daemon(requests)?;
    let one = udp_sends(datagrams, 1)?;
    let eight = udp_sends(datagrams, 8)?;
    Ok(vec![
        Row {
            scenario: "I/O floor: a read's system calls alone (null daemon)".into(),
            value: per_request.as_secs_f64() * 1e6,
            unit: "µs CPU",
            target: None,
            detail: format!(
                "{requests} requests over {CONNECTIONS} keep-alive connections in {:.2} s: \
                 per request one TCP read ({} B), one UDP sendto ({} B), one TCP write \
                 ({} B), one UDP recv_from ({} B), on one thread; its CPU per request; \
                 {lost} device answers dropped by the kernel",
                elapsed.as_secs_f64(),
                REQUEST.len(),
                COAP_GET.len(),
                ACCEPTED.len(),
                COAP_ANSWER.len()
            ),
        },
        Row {
            scenario: "I/O floor: a UDP datagram sent, sendto / sendmmsg of 8".into(),
            value: one.as_secs_f64() * 1e6,
            unit: "µs CPU",
            target: None,
            detail: format!(
                "{datagrams} datagrams of {} B to a socket another thread drains: {:.2} µs \
                 each by sendto, {:.2} µs each by sendmmsg of 8 (the most a sendmmsg queue \
                 could save per read: {:.2} µs)",
                COAP_GET.len(),
                one.as_secs_f64() * 1e6,
                eight.as_secs_f64() * 1e6,
                (one.as_secs_f64() - eight.as_secs_f64()) * 1e6
            ),
        },
    ])
}

/// The null daemon's thread CPU per request, the wall time of the load, and the device
/// answers that did not come back (dropped by the kernel for room).
fn null_daemon(requests: usize) -> Result<(Duration, Duration, usize)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let rest = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let coap = UdpSocket::bind("127.0.0.1:0")?;
    coap.set_nonblocking(true)?;
    let device = UdpSocket::bind("127.0.0.1:0")?;
    let device_addr = device.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    // The device: answers every GET from where it came.
    let echo = receiver(device, &stop, Some(COAP_ANSWER))?;

    // The null daemon.
    let server = std::thread::spawn(move || -> Result<(Duration, usize)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let coap = Arc::new(tokio::net::UdpSocket::from_std(coap)?);
            let answered = Arc::new(AtomicUsize::new(0));
            let mut conns = Vec::new();
            for _ in 0..CONNECTIONS {
                let (s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                conns.push(s);
            }
            let cpu0 = thread_cpu()?;
            let receiver = {
                let (coap, answered) = (Arc::clone(&coap), Arc::clone(&answered));
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    // Until every answer is in, or none came for a while (a datagram
                    // the kernel dropped for room: counted, not waited for).
                    while answered.load(Ordering::Relaxed) < requests {
                        let next = coap.recv_from(&mut buf);
                        match tokio::time::timeout(Duration::from_millis(500), next).await {
                            Ok(Ok(_)) => answered.fetch_add(1, Ordering::Relaxed),
                            _ => break,
                        };
                    }
                    answered.load(Ordering::Relaxed)
                })
            };
            for mut s in conns {
                let coap = Arc::clone(&coap);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    loop {
                        match s.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have += n,
                        }
                        // Whole requests only (they come one at a time per connection).
                        while have >= REQUEST.len() {
                            buf.copy_within(REQUEST.len()..have, 0);
                            have -= REQUEST.len();
                            if coap.send_to(COAP_GET, device_addr).await.is_err()
                                || s.write_all(ACCEPTED).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
            let answered = receiver.await?;
            Ok((thread_cpu()?.saturating_sub(cpu0), answered))
        })
    });

    // The load generator: each connection one request at a time, `requests` in all.
    let issued = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let issued = Arc::clone(&issued);
            let mut s = TcpStream::connect(rest)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(std::thread::spawn(move || -> Result<()> {
                let mut buf = vec![0u8; ACCEPTED.len()];
                while issued.fetch_add(1, Ordering::Relaxed) < requests {
                    s.write_all(REQUEST)?;
                    s.read_exact(&mut buf)?;
                }
                Ok(())
            }))
        })
        .collect::<Result<_>>()?;
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("load generator thread panicked"))??;
    }
    let elapsed = t0.elapsed();
    let (cpu, answered) = server
        .join()
        .map_err(|_| anyhow::anyhow!("null daemon panicked"))??;
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    Ok((
        cpu / requests.max(1) as u32,
        elapsed,
        requests - answered.min(requests),
    ))
}

/// CPU per datagram sent by this thread, `batch` per system call (1: `sendto`, more:
/// `sendmmsg`), to a socket another thread drains.
fn udp_sends(datagrams: usize, batch: usize) -> Result<Duration> {
    let sink = UdpSocket::bind("127.0.0.1:0")?;
    let to = match sink.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => anyhow::bail!("an IPv4 socket was bound to an IPv6 address"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let drain = receiver(sink, &stop, None)?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let addr = SockaddrIn::from(to);
    let addrs = vec![Some(addr); batch];
    let iovs: Vec<[std::io::IoSlice<'_>; 1]> = (0..batch)
        .map(|_| [std::io::IoSlice::new(COAP_GET)])
        .collect();
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(batch, None);
    let cpu0 = thread_cpu()?;
    let mut sent = 0;
    while sent < datagrams {
        if batch == 1 {
            sock.send_to(COAP_GET, to).context("sendto")?;
            sent += 1;
        } else {
            use std::os::fd::AsRawFd;
            let r = sendmmsg(
                sock.as_raw_fd(),
                &mut headers,
                &iovs,
                &addrs,
                [] as [ControlMessage<'_>; 0],
                MsgFlags::empty(),
            )
            .context("sendmmsg")?;
            sent += r.count();
        }
        // Paced a little, so that the drain keeps up and nothing is dropped for room.
        if sent % 400 < batch {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let cpu = thread_cpu()?.saturating_sub(cpu0);
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    ensure!(sent > 0, "no datagram sent");
    Ok(cpu / sent as u32)
}

/// A thread receiving on `sock` until `stop` is set (looking every 100 ms), answering each
/// datagram with `answer` where it came from, if given.
fn receiver(
    sock: UdpSocket,
    stop: &Arc<AtomicBool>,
    answer: Option<&'static [u8]>,
) -> Result<std::thread::JoinHandle<()>> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::clone(stop);
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            if let (Ok((_, from)), Some(a)) = (sock.recv_from(&mut buf), answer) {
                let _ = sock.send_to(a, from);
            }
        }
    }))
}
