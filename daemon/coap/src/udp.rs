//! CoAP over UDP (RFC 7252): one socket per listener, one session per peer address.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

use crate::listener::Listener;
use crate::peer::ListenerId;

/// A bound UDP socket. An IPv6 one is IPv6-only, so that it can sit beside the IPv4
/// wildcard.
#[derive(Debug)]
pub struct UdpListener {
    id: ListenerId,
    socket: UdpSocket,
}

impl UdpListener {
    /// Binds `addr` (port 0 is resolved: see [`Listener::id`]).
    pub fn bind(addr: SocketAddr) -> io::Result<UdpListener> {
        let socket = bind_one(addr)?;
        let local = socket.local_addr()?;
        Ok(UdpListener {
            id: ListenerId::udp(local),
            socket,
        })
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
        self.socket.recv_from(buf)
    }

    async fn send(&self, session: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        self.socket.send_to(bytes, session).await.map(|_| ())
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
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}
