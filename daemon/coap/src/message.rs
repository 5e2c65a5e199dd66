//! Decoding and building CoAP messages on top of `coap-lite`, with the checks RFC 7252
//! asks for that `coap-lite` leaves out (version, empty-message shape, payload marker).

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

/// Most options accepted in one message; more is treated as a format error.
pub const MAX_OPTIONS: usize = 64;

/// Most bytes of a diagnostic payload ([`Response::diagnostic`]): a sentence, with room
/// for the headers, token and options of any response in a 1 280-byte datagram.
pub const MAX_DIAGNOSTIC: usize = 256;

/// Why a datagram is not a valid CoAP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram shorter than the 4-byte CoAP header")]
    TooShort,
    #[error("unsupported CoAP version {0}")]
    Version(u8),
    #[error("malformed message: {0}")]
    Format(String),
    #[error("empty message (code 0.00) with token, options or payload")]
    NonEmptyEmpty,
    #[error("payload marker followed by no payload")]
    EmptyPayloadAfterMarker,
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// The fixed header fields, readable from any datagram of at least 4 bytes. Used to reject
/// a malformed confirmable message with RST (RFC 7252 §4.2) when the rest cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub version: u8,
    pub confirmable: bool,
    pub message_id: u16,
}

impl RawHeader {
    pub fn read(buf: &[u8]) -> Option<RawHeader> {
        let b = buf.get(..4)?;
        Some(RawHeader {
            version: b[0] >> 6,
            confirmable: (b[0] >> 4) & 0x3 == 0,
            message_id: u16::from_be_bytes([b[2], b[3]]),
        })
    }
}

/// A decoded datagram and where it came from.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub packet: Packet,
    /// Who sent it: the listener that received it and the device's session there
    /// (requests to the device go back the same way).
    pub peer: crate::peer::PeerRef,
    /// What the peer proved on a secure listener (DTLS, TLS); `None` on plain UDP.
    pub identity: Option<crate::peer::PeerIdentity>,
}

/// Decodes one datagram strictly.
pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
    let head = RawHeader::read(buf).ok_or(DecodeError::TooShort)?;
    if head.version != 1 {
        return Err(DecodeError::Version(head.version));
    }
    let packet = Packet::from_bytes(buf).map_err(|e| DecodeError::Format(format!("{e:?}")))?;
    if packet.header.code == MessageClass::Empty {
        // An empty message is exactly 4 bytes (RFC 7252 §4.1).
        if buf.len() != 4 {
            return Err(DecodeError::NonEmptyEmpty);
        }
    }
    if packet.payload.is_empty() && ends_with_payload_marker(buf, packet.get_token().len()) {
        return Err(DecodeError::EmptyPayloadAfterMarker);
    }
    let count: usize = packet.options().map(|(_, v)| v.len()).sum();
    if count > MAX_OPTIONS {
        return Err(DecodeError::TooManyOptions);
    }
    Ok(packet)
}

/// True when the byte that ends the option list is a payload marker with nothing after it.
/// `coap-lite` accepts that; RFC 7252 §3 calls it a format error.
fn ends_with_payload_marker(buf: &[u8], token_len: usize) -> bool {
    // Walk the options the same way the decoder did, to find where they end.
    let mut idx = 4 + token_len;
    while idx < buf.len() {
        let byte = buf[idx];
        if byte == 0xFF {
            return idx + 1 == buf.len();
        }
        idx += 1;
        let ext = |nibble: u8, idx: &mut usize| -> usize {
            match nibble {
                13 => {
                    let v = buf.get(*idx).map(|b| *b as usize + 13).unwrap_or(0);
                    *idx += 1;
                    v
                }
                14 => {
                    let v = match (buf.get(*idx), buf.get(*idx + 1)) {
                        (Some(a), Some(b)) => u16::from_be_bytes([*a, *b]) as usize + 269,
                        _ => 0,
                    };
                    *idx += 2;
                    v
                }
                n => n as usize,
            }
        };
        let _delta = ext(byte >> 4, &mut idx);
        let len = ext(byte & 0x0F, &mut idx);
        idx += len;
    }
    false
}

/// Encodes an unsigned option value in the fewest bytes (RFC 7252 §3.2: 0 is empty).
pub fn encode_uint(v: u32) -> Vec<u8> {
    let (b, skip) = uint_bytes(v);
    b[skip..].to_vec()
}

/// `v`'s big-endian bytes and how many of them lead as zeros: `b[skip..]` is the option
/// value ([`encode_uint`], without its allocation for [`Writer::uint_option`]).
fn uint_bytes(v: u32) -> ([u8; 4], usize) {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    (b, skip)
}

/// The first `opt` option read as an unsigned integer; None when it is longer than `opt`
/// may be ([`uint_length`]).
pub fn uint_option(packet: &Packet, opt: CoapOption) -> Option<u32> {
    let v = packet.get_first_option(opt)?;
    if v.len() > uint_length(opt) {
        return None;
    }
    Some(v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// The longest value RFC 7252 §5.10 (table 4), RFC 7641 and RFC 7959 allow a uint option:
/// a longer one is treated as absent (§5.4.3), never cut to fit.
fn uint_length(opt: CoapOption) -> usize {
    match opt {
        CoapOption::ContentFormat | CoapOption::Accept | CoapOption::UriPort => 2,
        CoapOption::Observe | CoapOption::Block1 | CoapOption::Block2 => 3,
        _ => 4,
    }
}

/// Critical options (odd numbers, RFC 7252 §5.4.1) that a request to the daemon may carry:
/// If-Match, Uri-Host, If-None-Match, Uri-Port, Uri-Path, Uri-Query, Accept, Block2,
/// Block1. Any other critical option is one the daemon does not understand (OSCORE,
/// Q-Block, a private one); Proxy-Uri and Proxy-Scheme are known but not served.
const KNOWN_CRITICAL: [u16; 9] = [1, 3, 5, 7, 11, 15, 17, 23, 27];
/// Proxy-Uri and Proxy-Scheme (RFC 7252 §5.10.2).
const PROXY_OPTIONS: [u16; 2] = [35, 39];

/// Why a request is refused before any handler sees it ([`check_request`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The answer to a confirmable request.
    pub response: Response,
    /// A non-confirmable request is rejected with RST instead of answered (RFC 7252
    /// §5.4.1: an unrecognised critical option in a NON message makes it rejected, §4.3).
    pub reset_non: bool,
}

/// The checks every request passes before a handler sees it, in this order:
/// - an unrecognised critical option → 4.02 Bad Option naming it (a NON request: RST);
/// - Proxy-Uri or Proxy-Scheme → 5.05 Proxying Not Supported (the daemon is no proxy);
/// - a Uri-Host, Uri-Path or Uri-Query value that is not UTF-8 → 4.00 (RFC 7252 §5.10.1
///   makes them UTF-8 strings; a lossy conversion would let two different endpoint names
///   become one).
///
/// Unknown elective options (even numbers) are ignored, as §5.4.1 says.
pub fn check_request(packet: &Packet) -> Result<(), Refusal> {
    let refuse = |code, text: String, reset_non| Refusal {
        response: Response::diagnostic(code, text),
        reset_non,
    };
    for (&n, _) in packet.options() {
        if n % 2 == 1 && !KNOWN_CRITICAL.contains(&n) && !PROXY_OPTIONS.contains(&n) {
            return Err(refuse(
                ResponseType::BadOption,
                format!("unrecognised critical option {n}"),
                true,
            ));
        }
    }
    if let Some(&n) = PROXY_OPTIONS
        .iter()
        .find(|n| packet.get_option(CoapOption::from(**n)).is_some())
    {
        let name = if n == 35 { "Proxy-Uri" } else { "Proxy-Scheme" };
        return Err(refuse(
            ResponseType::ProxyingNotSupported,
            format!("{name}: this server is not a proxy"),
            false,
        ));
    }
    for (opt, name) in [
        (CoapOption::UriHost, "Uri-Host"),
        (CoapOption::UriPath, "Uri-Path"),
        (CoapOption::UriQuery, "Uri-Query"),
    ] {
        let bad = packet
            .get_option(opt)
            .is_some_and(|l| l.iter().any(|v| std::str::from_utf8(v).is_err()));
        if bad {
            return Err(refuse(
                ResponseType::BadRequest,
                format!("a {name} option is not valid UTF-8"),
                false,
            ));
        }
    }
    Ok(())
}

/// The request's Uri-Path segments as UTF-8. Requests reach handlers only after
/// [`check_request`], which refuses non-UTF-8 ones, so the conversion never replaces
/// anything there.
pub fn uri_path(packet: &Packet) -> Vec<String> {
    option_strings(packet, CoapOption::UriPath)
}

/// The request's Uri-Query items, each `name=value` or a bare `name` (UTF-8, as
/// [`uri_path`]).
pub fn uri_query(packet: &Packet) -> Vec<String> {
    option_strings(packet, CoapOption::UriQuery)
}

fn option_strings(packet: &Packet, opt: CoapOption) -> Vec<String> {
    packet
        .get_option(opt)
        .map(|l| {
            l.iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The response to `request`: piggybacked in an ACK for a CON, a NON for a NON
/// (with the message id filled in by the caller, see [`Response::into_packet`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub code: ResponseType,
    pub options: Vec<(CoapOption, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Response {
    pub fn new(code: ResponseType) -> Response {
        Response {
            code,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// An error response with a diagnostic payload (RFC 7252 §5.5.2), which devices log.
    /// The text is cut to [`MAX_DIAGNOSTIC`] bytes (at a character boundary, ending in
    /// "…"): a diagnostic that repeats what the device sent could otherwise outgrow the
    /// datagram, and the device would get no answer at all.
    pub fn diagnostic(code: ResponseType, text: impl Into<String>) -> Response {
        let mut text = text.into();
        if text.len() > MAX_DIAGNOSTIC {
            let mut end = MAX_DIAGNOSTIC - '…'.len_utf8();
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        let mut r = Response::new(code);
        r.payload = text.into_bytes();
        r
    }

    pub fn with_option(mut self, opt: CoapOption, value: Vec<u8>) -> Response {
        self.options.push((opt, value));
        self
    }

    /// Builds the message answering `request`. `fresh_mid` supplies a message id for a NON
    /// response; a CON request is answered with a piggybacked ACK carrying its own id.
    pub fn into_packet(self, request: &Packet, fresh_mid: impl FnOnce() -> u16) -> Packet {
        self.into_reply(ReplyTo::of(request), fresh_mid)
    }

    /// [`Response::into_packet`] from what the response needs of its request
    /// ([`ReplyTo`]), so that the request itself can go to its handler.
    pub fn into_reply(self, to: ReplyTo, fresh_mid: impl FnOnce() -> u16) -> Packet {
        let mut p = Packet::new();
        if to.confirmable {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = to.message_id;
        } else {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = fresh_mid();
        }
        p.header.code = MessageClass::Response(self.code);
        p.set_token(to.token);
        for (opt, value) in self.options {
            p.add_option(opt, value);
        }
        p.payload = self.payload;
        p
    }
}

/// What the response to a request needs of it: its type, message id and token. Kept
/// while the request itself is handed over to its handler (instead of a copy of the whole
/// packet, options and payload included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// A CON request (answered with a piggybacked ACK); otherwise NON.
    pub confirmable: bool,
    pub message_id: u16,
    pub token: Vec<u8>,
}

impl ReplyTo {
    pub fn of(request: &Packet) -> ReplyTo {
        ReplyTo {
            confirmable: request.header.get_type() == MessageType::Confirmable,
            message_id: request.header.message_id,
            token: request.get_token().to_vec(),
        }
    }
}

/// An empty ACK for `message_id`: acknowledges a CON response or notification.
pub fn empty_ack(message_id: u16) -> Vec<u8> {
    let b = (1u8 << 6) | (2 << 4);
    let [hi, lo] = message_id.to_be_bytes();
    vec![b, 0, hi, lo]
}

/// What a request handler returns: the response to send (None: no reply, for a NON
/// request) and work to run once it has been sent (so that, for example, requests to a
/// device that just registered go out after its registration is acknowledged).
pub struct Handled {
    pub response: Option<Response>,
    pub after_send: Option<Box<dyn FnOnce() + Send>>,
}

impl From<Response> for Handled {
    fn from(r: Response) -> Handled {
        Handled {
            response: Some(r),
            after_send: None,
        }
    }
}

/// Why a message cannot be encoded ([`Writer::finish`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the message takes {0} bytes, more than the {1} allowed")]
    TooLarge(usize, usize),
    #[error("{0}")]
    Shape(&'static str),
}

/// Writes one CoAP message (RFC 7252 §3) straight into its datagram: header, token,
/// options in the order given (each number at least the one before), payload.
///
/// Decision: requests to devices are written with this rather than built as a `coap-lite`
/// `Packet` and serialised (`Packet::to_bytes`): the packet's option map (a `BTreeMap` of
/// lists of `Vec`s, one allocation per option), its serialisation (a `Vec` per option
/// header) and its drop cost about 2 600 instructions a proxied read, a sixth of the
/// CoAP exchange (callgrind, issue 24); this costs a few hundred. Decoding stays
/// `coap-lite`'s ([`decode`]). The tests check every message byte for byte against
/// `coap-lite`'s encoding.
pub struct Writer {
    buf: Vec<u8>,
    last: u16,
    /// An option out of order or too long to encode, a token too long: the message is
    /// refused at `finish`.
    broken: Option<&'static str>,
}

impl Writer {
    /// A message of type `mtype` with `code` (class << 5 | detail), `message_id` and a
    /// token of at most 8 bytes; `capacity` is a hint for its size.
    pub fn new(
        mtype: MessageType,
        code: MessageClass,
        message_id: u16,
        token: &[u8],
        capacity: usize,
    ) -> Writer {
        let t: u8 = match mtype {
            MessageType::Confirmable => 0,
            MessageType::NonConfirmable => 1,
            MessageType::Acknowledgement => 2,
            MessageType::Reset => 3,
        };
        let mut buf = Vec::with_capacity(capacity.max(4 + token.len()));
        let tkl = token.len().min(8);
        buf.push((1 << 6) | (t << 4) | tkl as u8);
        buf.push(u8::from(code));
        buf.extend_from_slice(&message_id.to_be_bytes());
        buf.extend_from_slice(&token[..tkl]);
        Writer {
            buf,
            last: 0,
            broken: (token.len() > 8).then_some("a token longer than 8 bytes"),
        }
    }

    /// Appends option `number` with `value`; numbers must not decrease.
    pub fn option(&mut self, number: u16, value: &[u8]) -> &mut Writer {
        if number < self.last {
            self.broken.get_or_insert("options out of order");
            return self;
        }
        if value.len() > usize::from(u16::MAX) + 269 {
            self.broken
                .get_or_insert("an option value too long to encode");
            return self;
        }
        let delta = usize::from(number - self.last);
        self.last = number;
        let nibble = |n: usize| -> u8 {
            match n {
                0..=12 => n as u8,
                13..=268 => 13,
                _ => 14,
            }
        };
        self.buf.push((nibble(delta) << 4) | nibble(value.len()));
        for n in [delta, value.len()] {
            match n {
                0..=12 => {}
                13..=268 => self.buf.push((n - 13) as u8),
                _ => self
                    .buf
                    .extend_from_slice(&((n - 269) as u16).to_be_bytes()),
            }
        }
        self.buf.extend_from_slice(value);
        self
    }

    /// Appends an unsigned option value in its fewest bytes (RFC 7252 §3.2).
    pub fn uint_option(&mut self, number: u16, v: u32) -> &mut Writer {
        let (b, skip) = uint_bytes(v);
        self.option(number, &b[skip..])
    }

    /// The datagram, with `payload` after the marker when it is not empty; refused when
    /// it would be longer than `limit` bytes, or an option was out of order.
    pub fn finish(mut self, payload: &[u8], limit: usize) -> Result<Vec<u8>, EncodeError> {
        let len = self.buf.len()
            + if payload.is_empty() {
                0
            } else {
                1 + payload.len()
            };
        if let Some(why) = self.broken {
            return Err(EncodeError::Shape(why));
        }
        if len > limit {
            return Err(EncodeError::TooLarge(len, limit));
        }
        if !payload.is_empty() {
            self.buf.push(0xFF);
            self.buf.extend_from_slice(payload);
        }
        Ok(self.buf)
    }
}

/// An RST for `message_id`: the answer to a confirmable message we cannot process
/// (RFC 7252 §4.2), and to a CoAP ping.
pub fn reset(message_id: u16) -> Vec<u8> {
    let b = (1u8 << 6) | (3 << 4);
    let [hi, lo] = message_id.to_be_bytes();
    vec![b, 0, hi, lo]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An option longer than RFC 7252 §5.10 / RFC 7641 / RFC 7959 allow it is treated as
    /// absent, never cut: a 3-byte Content-Format is no format at all (not the 2-byte
    /// number its low bytes spell), a 4-byte Observe or Block2 none either.
    #[test]
    fn uint_options_longer_than_allowed_are_absent() {
        let with = |opt: CoapOption, v: &[u8]| {
            let mut p = Packet::new();
            p.add_option(opt, v.to_vec());
            uint_option(&p, opt)
        };
        assert_eq!(with(CoapOption::ContentFormat, &[0x2d, 0x16]), Some(11542));
        assert_eq!(with(CoapOption::ContentFormat, &[0x01, 0x2d, 0x16]), None);
        assert_eq!(with(CoapOption::Accept, &[0, 0, 50]), None);
        assert_eq!(with(CoapOption::Observe, &[1, 2, 3]), Some(0x010203));
        assert_eq!(with(CoapOption::Observe, &[0, 1, 2, 3]), None);
        assert_eq!(with(CoapOption::Block2, &[0, 0, 0, 0x16]), None);
        assert_eq!(with(CoapOption::MaxAge, &[0, 0, 0, 60]), Some(60));
        assert_eq!(with(CoapOption::MaxAge, &[0, 0, 0, 0, 60]), None);
    }

    #[test]
    fn rejects_malformed_datagrams() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "short"),
            (&[0x40, 0x01], "short"),
            (&[0x80, 0x01, 0, 1], "version 2"),
            (&[0x49, 0x01, 0, 1], "token length 9"),
            (&[0x44, 0x01, 0, 1, 1, 2], "token past the end"),
            (&[0x41, 0x00, 0, 1, 7], "empty message with token"),
            (&[0x40, 0x01, 0, 1, 0xFF], "marker without payload"),
            (&[0x40, 0x01, 0, 1, 0xB5, b'a'], "option past the end"),
            (&[0x40, 0x01, 0, 1, 0xF0], "option delta 15"),
        ];
        for (buf, why) in cases {
            assert!(decode(buf).is_err(), "{why}: {buf:?} decoded");
        }
    }

    #[test]
    fn accepts_valid_messages() {
        // CON GET /rd with token 0x01 and payload "x".
        let ok: &[&[u8]] = &[
            &[0x40, 0x00, 0, 1],
            &[0x41, 0x01, 0, 1, 9, 0xB2, b'r', b'd', 0xFF, b'x'],
            &[0x50, 0x02, 0x12, 0x34],
        ];
        for buf in ok {
            decode(buf).unwrap_or_else(|e| panic!("{buf:?}: {e}"));
        }
    }

    #[test]
    fn too_many_options() {
        let mut buf = vec![0x40, 0x01, 0, 1];
        // 65 zero-length Uri-Query options: first delta 15 via extended 13, then delta 0.
        buf.push(0xD0);
        buf.push(15 - 13);
        buf.extend(std::iter::repeat_n(0x00, MAX_OPTIONS));
        assert_eq!(decode(&buf), Err(DecodeError::TooManyOptions));
    }

    #[test]
    fn con_answered_by_piggybacked_ack_non_by_non() {
        let mut req = Packet::new();
        req.header.set_type(MessageType::Confirmable);
        req.header.message_id = 77;
        req.set_token(vec![1, 2]);
        let ack = Response::new(ResponseType::Created).into_packet(&req, || 5);
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, 77);
        assert_eq!(ack.get_token(), &[1, 2]);

        req.header.set_type(MessageType::NonConfirmable);
        let non = Response::new(ResponseType::Created).into_packet(&req, || 5);
        assert_eq!(non.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(non.header.message_id, 5);
    }

    #[test]
    fn uint_options_round_trip() {
        for v in [0u32, 1, 255, 256, 65_535, 1 << 20, u32::MAX] {
            let mut p = Packet::new();
            p.add_option(CoapOption::MaxAge, encode_uint(v));
            assert_eq!(uint_option(&p, CoapOption::MaxAge), Some(v));
        }
        assert_eq!(encode_uint(0), Vec::<u8>::new());
        assert_eq!(encode_uint(0x0102), vec![1, 2]);
    }

    #[test]
    fn reset_is_a_valid_empty_rst() {
        let p = decode(&reset(0xBEEF)).unwrap();
        assert_eq!(p.header.get_type(), MessageType::Reset);
        assert_eq!(p.header.message_id, 0xBEEF);
        assert_eq!(p.header.code, MessageClass::Empty);
    }
}
