//! CoAP over UDP (RFC 7252): one socket per listener, one session per peer address.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::listener::{Listener, RecvBatch};
use crate::peer::ListenerId;

/// A bound UDP socket. An IPv6 one is IPv6-only, so that it can sit beside the IPv4
/// wildcard.
#[derive(Debug)]
pub struct UdpListener {
    id: ListenerId,
    socket: UdpSocket,
    /// Datagrams the kernel dropped at the socket ([`KernelDrops`]).
    drops: KernelDrops,
}

impl UdpListener {
    /// Binds `addr` (port 0 is resolved: see [`Listener::id`]).
    pub fn bind(addr: SocketAddr) -> io::Result<UdpListener> {
        let socket = bind_one(addr)?;
        let local = socket.local_addr()?;
        Ok(UdpListener {
            id: ListenerId::udp(local),
            socket,
            drops: KernelDrops::default(),
        })
    }

    /// Datagrams the kernel dropped at this listener's socket since it was bound, as of
    /// the last batch received ([`Listener::recv_batch`]; one of the last
    /// [`KernelDrops::SAMPLE`] datagrams when received one by one).
    pub fn kernel_drops(&self) -> u64 {
        self.drops.get()
    }
}

impl Listener for UdpListener {
    fn id(&self) -> ListenerId {
        self.id
    }

    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a {
        // A datagram longer than `buf` is cut to it: the caller gives one byte more than
        // it accepts and sees a full buffer as oversize.
        self.drops.recv(&self.socket, buf)
    }

    fn recv_batch<'a>(
        &'a self,
        batch: &'a mut RecvBatch,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a {
        self.drops.recv_batch(&self.socket, batch)
    }

    async fn send(&self, session: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        self.socket.send_to(bytes, session).await.map(|_| ())
    }
}

/// The kernel's count of the datagrams it dropped at a listener's socket (its receive
/// buffer full while the daemon was behind, or a bad checksum), which it attaches to each
/// datagram with `SO_RXQ_OVFL` (set by [`bind_one`]).
///
/// Decisions (issue 24: no silent drops): one datagram in [`KernelDrops::SAMPLE`] is
/// received with `recvmsg` and that control message (nix, no unsafe code here), the others
/// with `recv_from` as before: the count is a running total, so a sample loses nothing but
/// freshness, and `recvmsg` on every datagram cost the registration storm's daemon 2–14 %
/// more CPU per registration in three alternated runs. Reading the `drops` of
/// `/proc/net/udp` instead costs the kernel about 67 ms per read with 10 000 UDP sockets on
/// the host (2 ms with 1 000: it walks the table again for every page it gives), as the
/// bench's simulated devices have.
#[derive(Debug, Default)]
pub(crate) struct KernelDrops {
    drops: AtomicU64,
    received: AtomicU64,
}

impl KernelDrops {
    /// One datagram in this many carries the count here.
    pub(crate) const SAMPLE: u64 = 32;

    /// The count as of the last sampled datagram.
    pub(crate) fn get(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    /// Receives the datagrams ready on `socket` (waiting for one), at most the batch's
    /// capacity, in one `recvmmsg`; each carries the kernel's count when it changed.
    ///
    /// Decision (issue 24): under a stream of notifications the daemon spent about 14 %
    /// of its CPU in `recvfrom`, one system call per datagram, while several were
    /// usually waiting.
    pub(crate) async fn recv_batch(
        &self,
        socket: &UdpSocket,
        batch: &mut RecvBatch,
    ) -> io::Result<()> {
        batch.clear();
        socket
            .async_io(Interest::READABLE, || {
                recv_batch_now(socket, &self.drops, batch)
            })
            .await
    }

    /// Receives one datagram on `socket`, as `UdpSocket::recv_from` does (a datagram
    /// longer than `buf` is cut to it), taking the count from one in [`Self::SAMPLE`].
    pub(crate) async fn recv(
        &self,
        socket: &UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr)> {
        if self
            .received
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(Self::SAMPLE)
        {
            socket
                .async_io(Interest::READABLE, || recv_now(socket, &self.drops, buf))
                .await
        } else {
            socket.recv_from(buf).await
        }
    }
}

fn recv_batch_now(socket: &UdpSocket, drops: &AtomicU64, batch: &mut RecvBatch) -> io::Result<()> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage};
    use std::os::fd::AsRawFd;
    // Made for each call: nix's `recvmmsg` does not reset the lengths of the address and
    // control buffers that the kernel shortens, so kept headers would cut later
    // addresses and lose the drop count.
    let mut headers =
        MultiHeaders::<SockaddrStorage>::preallocate(batch.capacity(), Some(nix::cmsg_space!(u32)));
    let mut iovs: Vec<[io::IoSliceMut<'_>; 1]> = batch
        .bufs
        .iter_mut()
        .map(|b| [io::IoSliceMut::new(b)])
        .collect();
    let received = nix::sys::socket::recvmmsg(
        socket.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)?;
    for msg in received {
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::RxqOvfl(n) = c {
                    drops.store(u64::from(n), Ordering::Relaxed);
                }
            }
        }
        // A datagram from an address of another family cannot come on an IP socket; it
        // is skipped, as `recv_from` would fail on it.
        if let Some(from) = msg.address.as_ref().and_then(socket_addr) {
            batch.got.push((msg.bytes, from));
        }
    }
    Ok(())
}

/// The socket address of a datagram's sender (IPv4 or IPv6).
fn socket_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }
}

fn recv_now(
    socket: &UdpSocket,
    drops: &AtomicU64,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(u32);
    let msg = nix::sys::socket::recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::RxqOvfl(n) = c {
                drops.store(u64::from(n), Ordering::Relaxed);
            }
        }
    }
    let from = msg.address.as_ref().and_then(socket_addr);
    match from {
        Some(from) => Ok((msg.bytes, from)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a datagram from an address of family {:?}",
                msg.address.as_ref().and_then(|a| a.family())
            ),
        )),
    }
}

/// True for the errors of a host without IPv6 (Linux EAFNOSUPPORT, EADDRNOTAVAIL).
pub(crate) fn family_missing(e: &io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    matches!(e.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL))
}

/// The receive buffer asked for each UDP listener (`SO_RCVBUF`), in bytes.
const RECV_BUFFER: usize = 4 << 20;

pub(crate) fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A larger receive buffer absorbs bursts of registrations; the kernel caps it at
    // net.core.rmem_max, and what does not fit is dropped unseen (the device retransmits
    // after 2-3 s): say so once at start rather than lose datagrams silently.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    if let Ok(got) = socket.recv_buffer_size()
        && got < RECV_BUFFER
    {
        // Linux reports twice what it grants (the kernel's bookkeeping share).
        tracing::warn!(
            "CoAP on {addr}: the kernel gave a receive buffer of {got} bytes, not {RECV_BUFFER}: \
             a burst of requests beyond it is dropped by the kernel (raise net.core.rmem_max)"
        );
    }
    // Each datagram carries the kernel's count of the socket's drops ([`KernelDrops`]).
    if let Err(e) = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RxqOvfl, &1) {
        tracing::debug!("CoAP on {addr}: SO_RXQ_OVFL: {e}; the kernel's drops are not counted");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's drops at a listener's socket: none while it keeps up; once a burst
    /// larger than its receive buffer arrived unread, the count the kernel attaches to
    /// the next datagram (real sockets).
    #[tokio::test]
    async fn the_kernels_drops_come_with_a_sampled_datagram() {
        let l = UdpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let to = l.id().local;
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 2048];
        s.send_to(b"one", to).unwrap();
        assert_eq!(
            l.recv(&mut buf).await.unwrap(),
            (3, s.local_addr().unwrap())
        );
        assert_eq!(l.kernel_drops(), 0);
        // More than 8 MiB (4 MiB asked, doubled by the kernel at most) unread.
        let burst = 12_000;
        for _ in 0..burst {
            s.send_to(&[0u8; 1200], to).unwrap();
        }
        let mut read = 0;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(std::time::Duration::from_millis(200), l.recv(&mut buf)).await
        {
            assert_eq!(n, 1200);
            read += 1;
        }
        assert!(read < burst, "{read} of {burst} read: nothing dropped");
        // The count comes with the next sampled datagram.
        for _ in 0..KernelDrops::SAMPLE {
            s.send_to(b"after", to).unwrap();
            assert_eq!(l.recv(&mut buf).await.unwrap().0, 5);
        }
        assert_eq!(l.kernel_drops(), (burst - read) as u64);
    }

    /// Issue 24: `recv_batch` takes what is waiting in one call, at most its capacity, in
    /// order, each with its sender and length (an oversize one with its full length over
    /// a cut buffer), on IPv4 and IPv6 sockets by turns (the headers are not shared
    /// between calls); after a burst overflowed the socket the batch brings the kernel's
    /// count.
    #[tokio::test]
    async fn a_batch_takes_the_waiting_datagrams_in_order_with_their_senders() {
        let l = UdpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let to = l.id().local;
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let six = UdpListener::bind("[::1]:0".parse().unwrap()).ok();
        let mut batch = RecvBatch::new(4, 16);
        a.send_to(b"a1", to).unwrap();
        b.send_to(b"b1", to).unwrap();
        a.send_to(&[7u8; 40], to).unwrap();
        b.send_to(b"b2", to).unwrap();
        a.send_to(b"a3", to).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let got = |batch: &RecvBatch| -> Vec<(Vec<u8>, usize, SocketAddr)> {
            batch
                .messages()
                .map(|(m, n, from)| (m.to_vec(), n, from))
                .collect()
        };
        l.recv_batch(&mut batch).await.unwrap();
        let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        assert_eq!(
            got(&batch),
            vec![
                (b"a1".to_vec(), 2, pa),
                (b"b1".to_vec(), 2, pb),
                (vec![7u8; 16], 16, pa),
                (b"b2".to_vec(), 2, pb),
            ],
            "the oversize one is cut to the buffer, its length at least the buffer's"
        );
        if let Some(six) = &six {
            let c = std::net::UdpSocket::bind("[::1]:0").unwrap();
            c.send_to(b"v6", six.id().local).unwrap();
            let mut other = RecvBatch::new(4, 16);
            six.recv_batch(&mut other).await.unwrap();
            assert_eq!(
                got(&other),
                vec![(b"v6".to_vec(), 2, c.local_addr().unwrap())]
            );
        }
        l.recv_batch(&mut batch).await.unwrap();
        assert_eq!(got(&batch), vec![(b"a3".to_vec(), 2, pa)]);
        // A burst past the receive buffer, then the count with the next batch.
        let burst = 12_000;
        for _ in 0..burst {
            a.send_to(&[0u8; 1200], to).unwrap();
        }
        let mut big = RecvBatch::new(16, 2048);
        let mut read = 0;
        while let Ok(Ok(())) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            l.recv_batch(&mut big),
        )
        .await
        {
            read += big.messages().count();
        }
        assert!(read < burst, "{read} of {burst} read: nothing dropped");
        b.send_to(b"after", to).unwrap();
        l.recv_batch(&mut big).await.unwrap();
        assert_eq!(got(&big), vec![(b"after".to_vec(), 5, pb)]);
        assert_eq!(l.kernel_drops(), (burst - read) as u64);
    }
}
