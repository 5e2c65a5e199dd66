//! RFC 8323 framing (CoAP over TCP and TLS) and its signalling messages, sans-IO.
//!
//! A frame is `Len|TKL` (one byte), an extended length (0, 1, 2 or 4 bytes), the code, the
//! token and then options and payload encoded as in RFC 7252. `Len` counts the bytes of
//! the options, the payload marker and the payload only (not code nor token):
//! 0..=12 as is, 13 + one byte (13..=268), 14 + two bytes (269..=65804), 15 + four bytes
//! (65805..). There is no message type and no message id.
//!
//! [`decode`] reads one frame from the front of a receive buffer and says how many bytes
//! it used, or that more bytes are needed; any input that is not a frame (reserved token
//! length, a frame over the agreed size, broken options) is a [`FrameError`], which the
//! connection answers with Abort (7.05) and a close: never a panic (see the `tcp_frame`
//! fuzz target).
//!
//! The reliable listener ([`crate::tls`]) keeps the message layer unchanged by translating
//! at its edge: [`to_udp`] gives a frame the RFC 7252 header the message layer expects (a
//! type and a message id it picks), [`from_udp`] takes that header off again.
//!
//! BERT (RFC 8323 §6, block size exponent 7) is not offered: our CSM carries no
//! Block-Wise-Transfer option, so peers use ordinary block sizes.

/// Code of the signalling messages (class 7).
pub const CSM: u8 = 0xE1;
pub const PING: u8 = 0xE2;
pub const PONG: u8 = 0xE3;
pub const RELEASE: u8 = 0xE4;
pub const ABORT: u8 = 0xE5;

/// CSM option Max-Message-Size (RFC 8323 §5.3.1).
pub const OPT_MAX_MESSAGE_SIZE: u16 = 2;
/// CSM option Block-Wise-Transfer (RFC 8323 §5.3.2).
pub const OPT_BLOCK_WISE: u16 = 4;
/// Abort option Bad-CSM-Option (RFC 8323 §5.6).
pub const OPT_BAD_CSM_OPTION: u16 = 2;

/// The default Max-Message-Size a peer may assume before our CSM (RFC 8323 §5.3.1).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1152;

/// One RFC 8323 message: code, token, and its options and payload as RFC 7252 encodes
/// them (`body`: options, then `0xFF` and the payload when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub code: u8,
    pub token: Vec<u8>,
    pub body: Vec<u8>,
}

/// Why bytes from a connection are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("token length {0} is reserved")]
    TokenLength(u8),
    #[error("message of {size} bytes is over the Max-Message-Size of {max}")]
    TooLarge { size: u64, max: usize },
    #[error("malformed options: {0}")]
    Options(&'static str),
    #[error("signalling message with unknown critical option {0}")]
    CriticalOption(u16),
    #[error("unknown signalling code 7.{0:02}")]
    UnknownSignal(u8),
    #[error("message code {}.{:02} is not used over TCP", .0 >> 5, .0 & 0x1f)]
    Code(u8),
    #[error("not an RFC 7252 message: {0}")]
    Udp(&'static str),
}

/// Encodes `frame` with the shortest length class.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let len = frame.body.len();
    let tkl = frame.token.len() as u8 & 0x0f;
    let mut out = Vec::with_capacity(len + frame.token.len() + 6);
    match len {
        0..=12 => out.push(((len as u8) << 4) | tkl),
        13..=268 => {
            out.push((13 << 4) | tkl);
            out.push((len - 13) as u8);
        }
        269..=65_804 => {
            out.push((14 << 4) | tkl);
            out.extend_from_slice(&((len - 269) as u16).to_be_bytes());
        }
        _ => {
            out.push((15 << 4) | tkl);
            out.extend_from_slice(&((len - 65_805) as u32).to_be_bytes());
        }
    }
    out.push(frame.code);
    out.extend_from_slice(&frame.token);
    out.extend_from_slice(&frame.body);
    out
}

/// Reads one frame from the front of `buf`: `Ok(None)` when more bytes are needed,
/// else the frame and the bytes it took. A frame larger than `max` (all of it: length,
/// code, token, options and payload) is refused as soon as its header says so, before its
/// body is read. Options are checked (their encoding, not their meaning).
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let (len_nibble, tkl) = (first >> 4, first & 0x0f);
    if tkl > 8 {
        return Err(FrameError::TokenLength(tkl));
    }
    let ext = match len_nibble {
        13 => 1,
        14 => 2,
        15 => 4,
        _ => 0,
    };
    let Some(ext_bytes) = buf.get(1..1 + ext) else {
        return Ok(None);
    };
    let body_len: u64 = match len_nibble {
        13 => u64::from(ext_bytes[0]) + 13,
        14 => u64::from(u16::from_be_bytes([ext_bytes[0], ext_bytes[1]])) + 269,
        15 => {
            u64::from(u32::from_be_bytes([
                ext_bytes[0],
                ext_bytes[1],
                ext_bytes[2],
                ext_bytes[3],
            ])) + 65_805
        }
        n => u64::from(n),
    };
    let head = 1 + ext + 1 + usize::from(tkl);
    let size = head as u64 + body_len;
    if size > max as u64 {
        return Err(FrameError::TooLarge { size, max });
    }
    let size = size as usize;
    if buf.len() < size {
        return Ok(None);
    }
    let code = buf[1 + ext];
    let token = buf[2 + ext..head].to_vec();
    let body = buf[head..size].to_vec();
    check_body(&body)?;
    Ok(Some((Frame { code, token, body }, size)))
}

/// Options as (number, value), in order.
pub type Options<'a> = Vec<(u16, &'a [u8])>;

/// The options of a body as (number, value), and the payload; checks the encoding
/// (RFC 7252 §3.1: nibble 15 only in the payload marker, a marker followed by a payload,
/// lengths within the body).
pub fn options(body: &[u8]) -> Result<(Options<'_>, &[u8]), FrameError> {
    let mut opts = Vec::new();
    let mut number: u32 = 0;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == 0xff {
            if i + 1 == body.len() {
                return Err(FrameError::Options("payload marker with no payload"));
            }
            return Ok((opts, &body[i + 1..]));
        }
        i += 1;
        let mut ext = |nibble: u8| -> Result<u32, FrameError> {
            match nibble {
                13 => {
                    let v = body.get(i).ok_or(FrameError::Options("truncated option"))?;
                    i += 1;
                    Ok(u32::from(*v) + 13)
                }
                14 => {
                    let v = body
                        .get(i..i + 2)
                        .ok_or(FrameError::Options("truncated option"))?;
                    i += 2;
                    Ok(u32::from(u16::from_be_bytes([v[0], v[1]])) + 269)
                }
                15 => Err(FrameError::Options("reserved option nibble 15")),
                n => Ok(u32::from(n)),
            }
        };
        let delta = ext(b >> 4)?;
        let len = ext(b & 0x0f)? as usize;
        number += delta;
        let n =
            u16::try_from(number).map_err(|_| FrameError::Options("option number over 65535"))?;
        let value = body
            .get(i..i + len)
            .ok_or(FrameError::Options("option value past the end"))?;
        i += len;
        opts.push((n, value));
    }
    Ok((opts, &[]))
}

fn check_body(body: &[u8]) -> Result<(), FrameError> {
    options(body).map(|_| ())
}

/// An option's value as an unsigned integer (at most 4 bytes).
pub(crate) fn uint(v: &[u8]) -> Option<u32> {
    (v.len() <= 4).then(|| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

fn encode_uint(v: u32) -> Vec<u8> {
    crate::message::encode_uint(v)
}

/// Encodes options (sorted by number) and a payload as a frame body.
pub fn body(opts: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last = 0u16;
    for (n, v) in opts {
        let delta = n - last;
        last = *n;
        let nib = |x: usize| -> (u8, Vec<u8>) {
            match x {
                0..=12 => (x as u8, vec![]),
                13..=268 => (13, vec![(x - 13) as u8]),
                _ => (14, ((x - 269) as u16).to_be_bytes().to_vec()),
            }
        };
        let (dn, de) = nib(usize::from(delta));
        let (ln, le) = nib(v.len());
        out.push((dn << 4) | ln);
        out.extend(de);
        out.extend(le);
        out.extend_from_slice(v);
    }
    if !payload.is_empty() {
        out.push(0xff);
        out.extend_from_slice(payload);
    }
    out
}

/// A signalling message (class 7) as the connection acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// 7.01: the peer's Max-Message-Size (None: the default, 1152) and whether it offers
    /// BERT.
    Csm {
        max_message_size: Option<u32>,
        block_wise: bool,
    },
    /// 7.02: answered with a Pong carrying the same token.
    Ping,
    /// 7.03.
    Pong,
    /// 7.04: the peer closes gracefully.
    Release,
    /// 7.05: the peer aborts; its diagnostic payload.
    Abort(String),
}

impl Signal {
    /// The signal a frame carries: `Ok(None)` for a frame outside class 7. An unknown
    /// critical (odd) option or an unknown 7.xx code is an error (answered with Abort);
    /// unknown elective options are ignored (RFC 8323 §5.2).
    pub fn read(frame: &Frame) -> Result<Option<Signal>, FrameError> {
        if frame.code >> 5 != 7 {
            return Ok(None);
        }
        let (opts, payload) = options(&frame.body)?;
        // Options known per code: CSM 2 and 4; Ping/Pong 2 (Custody); Release 2, 4;
        // Abort 2.
        let known: &[u16] = match frame.code {
            CSM => &[OPT_MAX_MESSAGE_SIZE, OPT_BLOCK_WISE],
            PING | PONG => &[2],
            RELEASE => &[2, 4],
            ABORT => &[OPT_BAD_CSM_OPTION],
            c => return Err(FrameError::UnknownSignal(c & 0x1f)),
        };
        if let Some((n, _)) = opts.iter().find(|(n, _)| n % 2 == 1 && !known.contains(n)) {
            return Err(FrameError::CriticalOption(*n));
        }
        Ok(Some(match frame.code {
            CSM => Signal::Csm {
                max_message_size: opts
                    .iter()
                    .find(|(n, _)| *n == OPT_MAX_MESSAGE_SIZE)
                    .and_then(|(_, v)| uint(v)),
                block_wise: opts.iter().any(|(n, _)| *n == OPT_BLOCK_WISE),
            },
            PING => Signal::Ping,
            PONG => Signal::Pong,
            RELEASE => Signal::Release,
            _ => Signal::Abort(String::from_utf8_lossy(payload).into_owned()),
        }))
    }
}

/// Our CSM: Max-Message-Size, no Block-Wise-Transfer (no BERT).
pub fn csm(max_message_size: u32) -> Frame {
    let v = encode_uint(max_message_size);
    Frame {
        code: CSM,
        token: Vec::new(),
        body: body(&[(OPT_MAX_MESSAGE_SIZE, &v)], &[]),
    }
}

/// A signal with no options: Ping, Pong (with the Ping's token), Release.
pub fn signal(code: u8, token: &[u8]) -> Frame {
    Frame {
        code,
        token: token.to_vec(),
        body: Vec::new(),
    }
}

/// Abort with a diagnostic payload (cut to 128 bytes on a character boundary).
pub fn abort(diagnostic: &str) -> Frame {
    let mut end = diagnostic.len().min(128);
    while !diagnostic.is_char_boundary(end) {
        end -= 1;
    }
    Frame {
        code: ABORT,
        token: Vec::new(),
        body: body(&[], &diagnostic.as_bytes()[..end]),
    }
}

/// RFC 7252 message types, as [`to_udp`] writes them.
pub const CON: u8 = 0;
pub const NON: u8 = 1;
pub const ACK: u8 = 2;
pub const RST: u8 = 3;

/// The frame as an RFC 7252 message of type `mtype` with message id `mid`.
pub fn to_udp(frame: &Frame, mtype: u8, mid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + frame.token.len() + frame.body.len());
    out.push(0x40 | (mtype << 4) | (frame.token.len() as u8 & 0x0f));
    out.push(frame.code);
    out.extend_from_slice(&mid.to_be_bytes());
    out.extend_from_slice(&frame.token);
    out.extend_from_slice(&frame.body);
    out
}

/// An RFC 7252 message the message layer sends, as its type, message id and frame.
pub fn from_udp(bytes: &[u8]) -> Result<(u8, u16, Frame), FrameError> {
    let h = bytes
        .get(..4)
        .ok_or(FrameError::Udp("shorter than 4 bytes"))?;
    if h[0] >> 6 != 1 {
        return Err(FrameError::Udp("version is not 1"));
    }
    let tkl = usize::from(h[0] & 0x0f);
    if tkl > 8 {
        return Err(FrameError::TokenLength(tkl as u8));
    }
    let token = bytes
        .get(4..4 + tkl)
        .ok_or(FrameError::Udp("token past the end"))?;
    Ok((
        (h[0] >> 4) & 0x3,
        u16::from_be_bytes([h[2], h[3]]),
        Frame {
            code: h[1],
            token: token.to_vec(),
            body: bytes[4 + tkl..].to_vec(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_body_len(n: usize) -> Frame {
        // A payload of n - 1 bytes after the marker: a body of exactly n bytes.
        Frame {
            code: 0x45,
            token: vec![1, 2, 3],
            body: body(&[], &vec![7u8; n - 1]),
        }
    }

    /// Every length class on both sides of its boundary: the first byte's Len nibble,
    /// the extended length, and a round trip.
    #[test]
    fn length_class_boundaries() {
        for (len, nibble, ext) in [
            (12usize, 12u8, vec![]),
            (13, 13, vec![0]),
            (268, 13, vec![255]),
            (269, 14, vec![0, 0]),
            (65_804, 14, vec![255, 255]),
            (65_805, 15, vec![0, 0, 0, 0]),
        ] {
            let f = with_body_len(len);
            let bytes = encode(&f);
            assert_eq!(bytes[0] >> 4, nibble, "Len nibble for {len}");
            assert_eq!(bytes[0] & 0x0f, 3, "TKL for {len}");
            assert_eq!(
                &bytes[1..1 + ext.len()],
                ext.as_slice(),
                "extended length for {len}"
            );
            assert_eq!(bytes.len(), 1 + ext.len() + 1 + 3 + len);
            let (back, used) = decode(&bytes, usize::MAX).unwrap().unwrap();
            assert_eq!((back, used), (f, bytes.len()));
            // One byte short of the frame: more is needed, nothing is consumed.
            assert_eq!(decode(&bytes[..bytes.len() - 1], usize::MAX), Ok(None));
        }
    }

    #[test]
    fn frames_split_and_joined() {
        let a = encode(&signal(PING, &[9]));
        let b = encode(&with_body_len(300));
        let mut both = a.clone();
        both.extend_from_slice(&b);
        let (fa, ua) = decode(&both, 2048).unwrap().unwrap();
        assert_eq!(
            (fa.code, fa.token.as_slice(), ua),
            (PING, &[9u8][..], a.len())
        );
        let (fb, ub) = decode(&both[ua..], 2048).unwrap().unwrap();
        assert_eq!((fb.body.len(), ub), (300, b.len()));
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut], 2048), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        // Reserved token lengths 9..=15.
        for tkl in 9u8..=15 {
            assert_eq!(
                decode(&[tkl, 0x01], 1024),
                Err(FrameError::TokenLength(tkl))
            );
        }
        // Over the size we agreed to, refused from the header alone (4-byte length).
        assert!(matches!(
            decode(&[0xf0, 0xff, 0xff, 0xff, 0xff], 1152),
            Err(FrameError::TooLarge { .. })
        ));
        // A payload marker with nothing after it; option nibble 15; an option past the end.
        assert!(matches!(
            decode(&[0x10, 0x45, 0xff], 64),
            Err(FrameError::Options(_))
        ));
        assert!(matches!(
            decode(&[0x10, 0x45, 0xf0], 64),
            Err(FrameError::Options(_))
        ));
        assert!(matches!(
            decode(&[0x10, 0x45, 0x13], 64),
            Err(FrameError::Options(_))
        ));
        // Every short prefix of random-looking bytes: an answer, never a panic.
        let junk: Vec<u8> = (0u32..600)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for start in 0..junk.len() {
            let _ = decode(&junk[start..], 4096);
            let _ = from_udp(&junk[start..]);
        }
    }

    #[test]
    fn signals_read_and_written() {
        let f = csm(4096);
        let (back, _) = decode(&encode(&f), 64).unwrap().unwrap();
        assert_eq!(
            Signal::read(&back),
            Ok(Some(Signal::Csm {
                max_message_size: Some(4096),
                block_wise: false
            }))
        );
        assert_eq!(Signal::read(&signal(PING, &[1])), Ok(Some(Signal::Ping)));
        assert_eq!(
            Signal::read(&signal(RELEASE, &[])),
            Ok(Some(Signal::Release))
        );
        assert_eq!(
            Signal::read(&abort("bye")),
            Ok(Some(Signal::Abort("bye".into())))
        );
        // An unknown critical option in a CSM; an unknown signal code; not a signal.
        let bad = Frame {
            code: CSM,
            token: vec![],
            body: body(&[(9, &[])], &[]),
        };
        assert_eq!(Signal::read(&bad), Err(FrameError::CriticalOption(9)));
        assert_eq!(
            Signal::read(&signal(0xE6, &[])),
            Err(FrameError::UnknownSignal(6))
        );
        assert_eq!(Signal::read(&with_body_len(3)), Ok(None));
        // A long diagnostic is cut on a character boundary.
        let long = "é".repeat(100);
        let (_, payload) = options(&abort(&long).body)
            .map(|(o, p)| (o.len(), p.to_vec()))
            .unwrap();
        assert!(payload.len() <= 128 && std::str::from_utf8(&payload).is_ok());
    }

    #[test]
    fn translation_to_and_from_rfc7252() {
        let f = Frame {
            code: 0x01,
            token: vec![0xaa, 0xbb],
            body: body(&[(11, b"rd")], b"</1/0>"),
        };
        let udp = to_udp(&f, CON, 0x1234);
        let p = coap_lite::Packet::from_bytes(&udp).unwrap();
        assert_eq!(p.header.message_id, 0x1234);
        assert_eq!(p.get_token(), &[0xaa, 0xbb]);
        assert_eq!(p.payload, b"</1/0>");
        assert_eq!(from_udp(&udp), Ok((CON, 0x1234, f)));
        assert!(from_udp(&[0x40, 0]).is_err());
        assert!(from_udp(&[0x80, 0, 0, 0]).is_err());
        assert!(from_udp(&[0x42, 0, 0, 0, 1]).is_err());
    }
}
