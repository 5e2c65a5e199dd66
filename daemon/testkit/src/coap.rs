//! A minimal CoAP device for tests, on a real UDP socket, built with coap-lite.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};

pub struct Device {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    mid: u16,
    /// Datagrams read while waiting for something else (e.g. a request from the daemon
    /// arriving while the device waits for its own response); `recv_request` sees them.
    stash: std::cell::RefCell<std::collections::VecDeque<(Vec<u8>, SocketAddr)>>,
    /// The (source, message id) of each request [`Device::first_time`] was asked about.
    seen: std::cell::RefCell<std::collections::HashSet<(SocketAddr, u16)>>,
}

/// A request under construction.
pub struct Req<'a> {
    pub method: RequestType,
    pub path: &'a [&'a str],
    pub query: &'a [&'a str],
    pub payload: &'a [u8],
    pub content_format: Option<ContentFormat>,
    pub confirmable: bool,
}

impl<'a> Req<'a> {
    pub fn new(method: RequestType, path: &'a [&'a str]) -> Req<'a> {
        Req {
            method,
            path,
            query: &[],
            payload: &[],
            content_format: None,
            confirmable: true,
        }
    }
}

impl Device {
    pub fn new(server: SocketAddr) -> Device {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind device socket");
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Device {
            sock,
            server,
            mid: rand_mid(),
            stash: Default::default(),
            seen: Default::default(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// Encodes a request with a fresh message id and token.
    pub fn build(&mut self, r: &Req) -> Packet {
        self.mid = self.mid.wrapping_add(1);
        let mut p = Packet::new();
        p.header.set_type(if r.confirmable {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        });
        p.header.code = MessageClass::Request(r.method);
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        for seg in r.path {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in r.query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if let Some(cf) = r.content_format {
            p.set_content_format(cf);
        }
        p.payload = r.payload.to_vec();
        p
    }

    pub fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.server).expect("send");
    }

    /// The next datagram from the server, or None after `timeout`.
    pub fn recv_raw(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 2048];
        let r = self
            .sock
            .recv_from(&mut buf)
            .ok()
            .map(|(n, _)| buf[..n].to_vec());
        self.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        r
    }

    /// Sends a request and returns the response with the same token.
    pub fn request(&mut self, r: &Req) -> Packet {
        let p = self.build(r);
        self.send_and_wait(&p, |resp| resp.get_token() == p.get_token())
    }

    /// Sends `p` and returns the first datagram from connectord that `answers` it (each
    /// waited for at most 5 s), skipping the others.
    pub fn send_and_wait(&self, p: &Packet, answers: impl Fn(&Packet) -> bool) -> Packet {
        self.send_raw(&p.to_bytes().unwrap());
        loop {
            let bytes = self
                .recv_raw(Duration::from_secs(5))
                .expect("no response from connectord");
            let resp = Packet::from_bytes(&bytes).expect("undecodable response");
            if answers(&resp) {
                return resp;
            }
        }
    }

    /// Registers and returns the registration id from `Location-Path: rd/{id}`.
    pub fn register(&mut self, query: &[&str], links: &str) -> String {
        let mut r = Req::new(RequestType::Post, &["rd"]);
        r.query = query;
        r.payload = links.as_bytes();
        r.content_format = Some(ContentFormat::ApplicationLinkFormat);
        let resp = self.request(&r);
        assert_eq!(
            code(&resp),
            ResponseType::Created,
            "register: {}",
            diag(&resp)
        );
        location(&resp)
    }

    pub fn update(&mut self, id: &str, query: &[&str], links: Option<&str>) -> ResponseType {
        let path = ["rd", id];
        let mut r = Req::new(RequestType::Post, &path);
        r.query = query;
        if let Some(l) = links {
            r.payload = l.as_bytes();
            r.content_format = Some(ContentFormat::ApplicationLinkFormat);
        }
        code(&self.request(&r))
    }

    pub fn deregister(&mut self, id: &str) -> ResponseType {
        code(&self.request(&Req::new(RequestType::Delete, &["rd", id])))
    }
}

impl Device {
    /// Whether `req` from `from` is new to this device rather than a retransmission of a
    /// request it saw before (the same message id from the same address, RFC 7252 §4.5);
    /// a test that counts requests counts only the first.
    pub fn first_time(&self, req: &Packet, from: SocketAddr) -> bool {
        self.seen.borrow_mut().insert((from, req.header.message_id))
    }

    /// The next request the daemon sends to this device (ACKs and other messages are
    /// skipped), with the address it came from; None after `timeout`.
    pub fn recv_request(&self, timeout: Duration) -> Option<(Packet, SocketAddr)> {
        while let Some((bytes, from)) = self.stash.borrow_mut().pop_front() {
            if let Ok(p) = Packet::from_bytes(&bytes)
                && matches!(p.header.code, MessageClass::Request(_))
            {
                return Some((p, from));
            }
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                return None;
            };
            if let Ok(p) = Packet::from_bytes(&buf[..n])
                && matches!(p.header.code, MessageClass::Request(_))
            {
                return Some((p, from));
            }
        }
    }

    /// Answers `req` (piggybacked in an ACK for a CON) to `to`.
    pub fn reply(
        &self,
        req: &Packet,
        to: SocketAddr,
        code: ResponseType,
        payload: &[u8],
        cf: Option<u16>,
        max_age: Option<u32>,
    ) {
        let p = response(req, code, payload, cf, max_age);
        self.sock
            .send_to(&p.to_bytes().unwrap(), to)
            .expect("send reply");
    }
}

/// The response to `req`: piggybacked on its ACK (a CON request) or NON, with its token,
/// `code`, `payload` and the options given.
pub fn response(
    req: &Packet,
    code: ResponseType,
    payload: &[u8],
    cf: Option<u16>,
    max_age: Option<u32>,
) -> Packet {
    let mut p = Packet::new();
    p.header
        .set_type(if req.header.get_type() == MessageType::Confirmable {
            MessageType::Acknowledgement
        } else {
            MessageType::NonConfirmable
        });
    p.header.code = MessageClass::Response(code);
    p.header.message_id = req.header.message_id;
    p.set_token(req.get_token().to_vec());
    if let Some(cf) = cf {
        p.add_option(CoapOption::ContentFormat, uint(cf.into()));
    }
    if let Some(m) = max_age {
        p.add_option(CoapOption::MaxAge, uint(m));
    }
    p.payload = payload.to_vec();
    p
}

/// The Uri-Path of a request joined with slashes, leading slash included.
pub fn path_of(p: &Packet) -> String {
    format!("/{}", option_strings(p, CoapOption::UriPath).join("/"))
}

/// The values of a repeatable string option (Uri-Path, Location-Path), in order.
fn option_strings(p: &Packet, option: CoapOption) -> Vec<String> {
    p.get_option(option)
        .map(|l| {
            l.iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An unsigned option value, minimal bytes.
pub fn uint(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

/// An unsigned option of a packet.
pub fn uint_option(p: &Packet, opt: CoapOption) -> Option<u32> {
    p.get_first_option(opt)
        .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

fn rand_mid() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xFFFF) as u16
}

/// The response code of a packet.
pub fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

/// The diagnostic payload of an error response.
pub fn diag(p: &Packet) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// `Location-Path` joined: must be `rd/{id}`; returns the id.
pub fn location(p: &Packet) -> String {
    let segs = option_strings(p, CoapOption::LocationPath);
    assert_eq!(segs.len(), 2, "Location-Path {segs:?}");
    assert_eq!(segs[0], "rd");
    segs[1].clone()
}
