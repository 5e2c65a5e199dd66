//! The server side of Block1 (RFC 7959 §2.5): a device sends a request body too large for
//! one datagram (a registration listing many objects, say) in blocks, each acknowledged
//! with 2.31 Continue; the request is handled once, with the whole body, when its last
//! block arrives, and its response echoes that last Block1.
//!
//! Transfers are keyed by the peer, the method, the request's Uri-Path and Uri-Query (the
//! token may change from block to block, §2.3) and its Request-Tag options (RFC 9175
//! §3.3: blocks with different Request-Tags are never one body, so a device may run two
//! transfers to the same resource, or start a new one over a stale one, by tagging them).
//! Blocks must come in order; a gap, a repeat of an earlier block (once the duplicate
//! cache has forgotten it) or a block of a transfer that is not known is 4.08 Request
//! Entity Incomplete. A non-last block whose
//! payload is not exactly its block size is 4.00. A body past [`MAX_BODY`] is 4.13 with
//! Size1. At most [`MAX_TRANSFERS`] transfers are assembled at once (5.03 past it), at most
//! [`MAX_TRANSFERS_PER_PEER`] of one peer (5.03 with Max-Age past it), each
//! forgotten [`LIFETIME`] after its first block: the memory held is bounded whatever the
//! devices send.

use std::time::{Duration, Instant};

use coap_lite::{CoapOption, Packet, ResponseType};

use crate::Map;

use crate::client::Block;
use crate::message::{self, Response};
use crate::peer::Source;

/// The largest request body assembled from blocks (a registration's object list is a few
/// KiB at most).
pub const MAX_BODY: usize = 64 * 1024;
/// Transfers assembled at once, all peers together.
pub const MAX_TRANSFERS: usize = 256;
/// Transfers one peer may have in progress (a device sends one body at a time, rarely
/// two: a registration and an update; a proxy relaying several devices through one port
/// more): past it, its next is 5.03 with Max-Age until its oldest expires, so one peer
/// cannot take the room of the others, nor break its own transfers in progress.
pub const MAX_TRANSFERS_PER_PEER: usize = 16;
/// How long a transfer may take from its first block to its last (RFC 7252's
/// EXCHANGE_LIFETIME is 247 s; a device sends its blocks back to back).
pub const LIFETIME: Duration = Duration::from_secs(60);

/// What to do with a request after Block1 processing.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Handle the request: it had no Block1, or it was the last block and the packet's
    /// payload is now the whole body (the option removed). The response must carry this
    /// Block1 (the last block's) when there is one.
    Handle(Option<Block>),
    /// Answer at once with this response (2.31 Continue, or a refusal).
    Answer(Response),
}

/// A transfer's identity: the peer (on its listener), the method code, and the values of its Uri-Path,
/// Uri-Query and Request-Tag options (each option's values kept apart, so that no
/// arrangement of bytes in one can pass for another).
type Key = (Source, u8, [Vec<Vec<u8>>; 3]);

/// The Request-Tag option (RFC 9175 §3.2): elective, repeatable, 0 to 8 bytes each.
pub const REQUEST_TAG: CoapOption = CoapOption::Unknown(292);

struct Partial {
    body: Vec<u8>,
    started: Instant,
}

/// Block1 transfers in progress.
#[derive(Default)]
pub struct Assemblies {
    partial: Map<Key, Partial>,
}

fn key(peer: Source, packet: &Packet) -> Key {
    let values = |opt: CoapOption| -> Vec<Vec<u8>> {
        packet
            .get_option(opt)
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    };
    // "No tag" and "one empty tag" are different transfers (§3.2). A tag longer than 8
    // bytes is an unrecognised elective option (RFC 7252 §5.4.3): ignored.
    let mut tags = values(REQUEST_TAG);
    tags.retain(|t| t.len() <= 8);
    (
        peer,
        u8::from(packet.header.code),
        [
            values(CoapOption::UriPath),
            values(CoapOption::UriQuery),
            tags,
        ],
    )
}

/// 2.31 Continue for a stored block, echoing its Block1 (§2.3).
fn continue_with(block: Block) -> Step {
    let mut r = Response::new(ResponseType::Continue);
    r.options.push((CoapOption::Block1, block.encode()));
    Step::Answer(r)
}

fn refuse(code: ResponseType, why: &str) -> Step {
    Step::Answer(Response::diagnostic(code, why))
}

impl Assemblies {
    /// When `peer` has [`MAX_TRANSFERS_PER_PEER`] transfers in time: how long until its
    /// oldest expires (the Max-Age of the 5.03 refusing another).
    fn peer_full(&self, peer: Source, now: Instant) -> Option<Duration> {
        let mut count = 0;
        let mut oldest: Option<Instant> = None;
        for p in self
            .partial
            .iter()
            .filter(|(k, _)| k.0 == peer)
            .map(|(_, p)| p)
        {
            if now.saturating_duration_since(p.started) >= LIFETIME {
                continue;
            }
            count += 1;
            oldest = Some(oldest.map_or(p.started, |o| o.min(p.started)));
        }
        let oldest = oldest.filter(|_| count >= MAX_TRANSFERS_PER_PEER)?;
        Some(LIFETIME.saturating_sub(now.saturating_duration_since(oldest)))
    }

    /// Transfers in progress.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Takes one request datagram (new, not a duplicate).
    pub fn on_request(&mut self, peer: Source, packet: &mut Packet, now: Instant) -> Step {
        // 0 to 3 bytes (RFC 7959 §2.2).
        if packet
            .get_first_option(CoapOption::Block1)
            .is_some_and(|v| v.len() > 3)
        {
            return refuse(ResponseType::BadOption, "Block1 option longer than 3 bytes");
        }
        let Some(raw) = message::uint_option(packet, CoapOption::Block1) else {
            return Step::Handle(None);
        };
        let Some(block) = Block::decode(raw) else {
            return refuse(ResponseType::BadOption, "Block1 with the reserved size 7");
        };
        let k = key(peer, packet);
        let offset = (block.num as usize).saturating_mul(block.size());
        if block.more && packet.payload.len() != block.size() {
            self.partial.remove(&k);
            return refuse(
                ResponseType::BadRequest,
                "a block that is not the last must carry exactly its block size",
            );
        }
        if offset.saturating_add(packet.payload.len()) > MAX_BODY {
            self.partial.remove(&k);
            let mut r = Response::diagnostic(
                ResponseType::RequestEntityTooLarge,
                format!("request bodies sent block-wise may be up to {MAX_BODY} bytes"),
            );
            r.options
                .push((CoapOption::Size1, message::encode_uint(MAX_BODY as u32)));
            return Step::Answer(r);
        }
        if block.num == 0 {
            if !self.partial.contains_key(&k)
                && let Some(wait) = self.peer_full(peer, now)
            {
                let mut r = Response::diagnostic(
                    ResponseType::ServiceUnavailable,
                    format!(
                        "more than {MAX_TRANSFERS_PER_PEER} block-wise transfers in progress from this address"
                    ),
                );
                let secs = u32::try_from(wait.as_secs()).unwrap_or(u32::MAX).max(1);
                r.options
                    .push((CoapOption::MaxAge, message::encode_uint(secs)));
                return Step::Answer(r);
            }
            if !self.partial.contains_key(&k) && self.partial.len() >= MAX_TRANSFERS {
                self.partial
                    .retain(|_, p| now.saturating_duration_since(p.started) < LIFETIME);
                if self.partial.len() >= MAX_TRANSFERS {
                    return refuse(
                        ResponseType::ServiceUnavailable,
                        "too many block-wise transfers in progress",
                    );
                }
            }
            self.partial.insert(
                k.clone(),
                Partial {
                    body: Vec::new(),
                    started: now,
                },
            );
        }
        // What is stored of this transfer, if it is still in time.
        let stored = self
            .partial
            .get(&k)
            .filter(|p| now.saturating_duration_since(p.started) < LIFETIME)
            .map(|p| p.body.len());
        match stored {
            // The next block, in order.
            Some(len) if len == offset => {}
            // The block just stored, again (its 2.31 was lost and the duplicate cache no
            // longer has it): answer it again rather than break the transfer.
            Some(len) if block.num > 0 && block.more && len == offset + packet.payload.len() => {
                return continue_with(block);
            }
            _ => {
                self.partial.remove(&k);
                return refuse(
                    ResponseType::RequestEntityIncomplete,
                    "block out of order, or of a transfer that is not in progress: start again from block 0",
                );
            }
        }
        if block.more {
            if let Some(p) = self.partial.get_mut(&k) {
                p.body.extend_from_slice(&packet.payload);
            }
            return continue_with(block);
        }
        let mut body = self.partial.remove(&k).map(|p| p.body).unwrap_or_default();
        body.extend_from_slice(&packet.payload);
        packet.payload = body;
        packet.clear_option(CoapOption::Block1);
        Step::Handle(Some(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::{MessageClass, RequestType};

    fn peer(port: u16) -> Source {
        Source {
            via: 0,
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The step for the last 16-byte block `num`: the whole body handed on to the handler.
    fn handed_on_last(num: u32) -> Step {
        Step::Handle(Some(Block {
            num,
            more: false,
            szx: 0,
        }))
    }

    fn block_request(num: u32, more: bool, szx: u8, payload: &[u8]) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Post);
        p.add_option(CoapOption::UriPath, b"rd".to_vec());
        p.add_option(CoapOption::UriQuery, b"ep=big".to_vec());
        p.add_option(CoapOption::Block1, Block { num, more, szx }.encode());
        p.payload = payload.to_vec();
        p
    }

    fn code(s: &Step) -> Option<ResponseType> {
        match s {
            Step::Answer(r) => Some(r.code),
            Step::Handle(_) => None,
        }
    }

    #[test]
    fn blocks_in_order_make_the_whole_body() {
        let mut a = Assemblies::default();
        let t = Instant::now();
        let body: Vec<u8> = (0..40u8).collect();
        let mut p = block_request(0, true, 0, &body[..16]);
        let s = a.on_request(peer(1), &mut p, t);
        let Step::Answer(r) = &s else { panic!("{s:?}") };
        assert_eq!(r.code, ResponseType::Continue);
        assert_eq!(
            r.options,
            vec![(
                CoapOption::Block1,
                Block {
                    num: 0,
                    more: true,
                    szx: 0
                }
                .encode()
            )]
        );
        let mut p = block_request(1, true, 0, &body[16..32]);
        assert_eq!(
            code(&a.on_request(peer(1), &mut p, t)),
            Some(ResponseType::Continue)
        );
        // Another peer's transfer to the same URI is a different one.
        let mut other = block_request(1, true, 0, &body[16..32]);
        assert_eq!(
            code(&a.on_request(peer(2), &mut other, t)),
            Some(ResponseType::RequestEntityIncomplete)
        );
        let mut last = block_request(2, false, 0, &body[32..]);
        let s = a.on_request(peer(1), &mut last, t);
        assert_eq!(s, handed_on_last(2));
        assert_eq!(last.payload, body);
        assert!(last.get_first_option(CoapOption::Block1).is_none());
        assert!(a.is_empty());
    }

    /// RFC 9175 §3.3: blocks with different Request-Tags are never joined, so two tagged
    /// transfers of one peer to one resource are assembled apart, and an untagged one is
    /// a third.
    #[test]
    fn request_tags_keep_transfers_apart() {
        let mut a = Assemblies::default();
        let t = Instant::now();
        let tagged = |num: u32, more: bool, tag: Option<&[u8]>, payload: &[u8]| {
            let mut p = block_request(num, more, 0, payload);
            if let Some(tag) = tag {
                p.add_option(REQUEST_TAG, tag.to_vec());
            }
            p
        };
        let (x, y) = ([b'x'; 16], [b'y'; 16]);
        for (tag, first) in [(Some(&b"A"[..]), &x), (Some(&b""[..]), &y), (None, &y)] {
            let mut p = tagged(0, true, tag, first);
            assert_eq!(
                code(&a.on_request(peer(1), &mut p, t)),
                Some(ResponseType::Continue),
                "{tag:?}"
            );
        }
        assert_eq!(
            a.len(),
            3,
            "tag A, the empty tag and no tag are three transfers"
        );
        let mut last = tagged(1, false, Some(b"A"), b"end");
        assert_eq!(a.on_request(peer(1), &mut last, t), handed_on_last(1));
        assert_eq!(
            last.payload,
            [&x[..], b"end"].concat(),
            "only tag A's blocks"
        );
        // A block of a tag that never started is not appended to another tag's body.
        let mut stray = tagged(1, false, Some(b"B"), b"z");
        assert_eq!(
            code(&a.on_request(peer(1), &mut stray, t)),
            Some(ResponseType::RequestEntityIncomplete)
        );
        assert_eq!(a.len(), 2);
        // A tag past 8 bytes is ignored: this block continues the untagged transfer.
        let mut long = tagged(1, false, Some(b"123456789"), b"!");
        assert_eq!(a.on_request(peer(1), &mut long, t), handed_on_last(1));
        assert_eq!(long.payload, [&y[..], b"!"].concat());
    }

    /// A block sent again after its 2.31 (lost on the way, and gone from the duplicate
    /// cache) is answered again, not appended twice.
    #[test]
    fn a_repeated_block_is_answered_again() {
        let mut a = Assemblies::default();
        let t = Instant::now();
        let body: Vec<u8> = (0..40u8).collect();
        for (num, range) in [(0, 0..16), (1, 16..32), (1, 16..32)] {
            let mut p = block_request(num, true, 0, &body[range]);
            assert_eq!(
                code(&a.on_request(peer(1), &mut p, t)),
                Some(ResponseType::Continue)
            );
        }
        let mut last = block_request(2, false, 0, &body[32..]);
        assert!(matches!(
            a.on_request(peer(1), &mut last, t),
            Step::Handle(Some(_))
        ));
        assert_eq!(last.payload, body);
    }

    #[test]
    fn a_request_without_block1_is_handled_as_it_is() {
        let mut a = Assemblies::default();
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Post);
        p.payload = b"</3/0>".to_vec();
        assert_eq!(
            a.on_request(peer(1), &mut p, Instant::now()),
            Step::Handle(None)
        );
        assert_eq!(p.payload, b"</3/0>");
    }

    #[test]
    fn gaps_wrong_sizes_and_unknown_transfers_are_refused() {
        let mut a = Assemblies::default();
        let t = Instant::now();
        let mut p = block_request(0, true, 0, &[1; 16]);
        a.on_request(peer(1), &mut p, t);
        // Block 2 after block 0: a gap.
        let mut p = block_request(2, true, 0, &[1; 16]);
        assert_eq!(
            code(&a.on_request(peer(1), &mut p, t)),
            Some(ResponseType::RequestEntityIncomplete)
        );
        assert!(a.is_empty(), "a broken transfer is dropped");
        // A non-last block shorter than its size.
        let mut p = block_request(0, true, 0, &[1; 10]);
        assert_eq!(
            code(&a.on_request(peer(1), &mut p, t)),
            Some(ResponseType::BadRequest)
        );
        // A transfer that took too long.
        let mut p = block_request(0, true, 0, &[1; 16]);
        a.on_request(peer(1), &mut p, t);
        let mut p = block_request(1, false, 0, &[1; 3]);
        assert_eq!(
            code(&a.on_request(peer(1), &mut p, t + LIFETIME)),
            Some(ResponseType::RequestEntityIncomplete)
        );
        // The reserved size, and an option of 4 bytes.
        for bad in [vec![0x0f], vec![0, 0, 0, 0x08]] {
            let mut p = block_request(0, true, 0, &[1; 16]);
            p.clear_option(CoapOption::Block1);
            p.add_option(CoapOption::Block1, bad);
            assert_eq!(
                code(&a.on_request(peer(1), &mut p, t)),
                Some(ResponseType::BadOption)
            );
        }
    }

    #[test]
    fn bodies_and_transfers_are_bounded() {
        let mut a = Assemblies::default();
        let t = Instant::now();
        // Past MAX_BODY: 4.13 with Size1.
        let num = (MAX_BODY / 1024) as u32;
        let mut p = block_request(num, false, 6, &[1; 1]);
        let s = a.on_request(peer(1), &mut p, t);
        let Step::Answer(r) = s else { panic!() };
        assert_eq!(r.code, ResponseType::RequestEntityTooLarge);
        assert!(r.options.iter().any(|(o, _)| *o == CoapOption::Size1));
        // MAX_TRANSFERS at once; the next is 5.03 until old ones expire.
        for port in 0..MAX_TRANSFERS as u16 {
            let mut p = block_request(0, true, 0, &[1; 16]);
            assert_eq!(
                code(&a.on_request(peer(port), &mut p, t)),
                Some(ResponseType::Continue)
            );
        }
        let mut p = block_request(0, true, 0, &[1; 16]);
        assert_eq!(
            code(&a.on_request(peer(60000), &mut p, t)),
            Some(ResponseType::ServiceUnavailable)
        );
        assert_eq!(a.len(), MAX_TRANSFERS);
        let mut p = block_request(0, true, 0, &[1; 16]);
        assert_eq!(
            code(&a.on_request(peer(60000), &mut p, t + LIFETIME)),
            Some(ResponseType::Continue)
        );
        assert_eq!(a.len(), 1, "the expired transfers were dropped");
    }

    /// One peer holds at most MAX_TRANSFERS_PER_PEER transfers: its next is 5.03 with a
    /// Max-Age until its oldest expires, its transfers in progress go on, and the others'
    /// room is untouched. Before, one peer could open all MAX_TRANSFERS and every other
    /// device got 5.03.
    #[test]
    fn one_peer_cannot_take_every_transfer() {
        let mut a = Assemblies::default();
        let t = Instant::now();
        let tagged = |num: u32, more: bool, tag: u16| {
            let payload: &[u8] = if more { &[1; 16] } else { &[2; 3] };
            let mut p = block_request(num, more, 0, payload);
            p.add_option(REQUEST_TAG, tag.to_be_bytes().to_vec());
            p
        };
        for tag in 0..MAX_TRANSFERS_PER_PEER as u16 {
            let at = t + Duration::from_secs(u64::from(tag));
            assert_eq!(
                code(&a.on_request(peer(1), &mut tagged(0, true, tag), at)),
                Some(ResponseType::Continue)
            );
        }
        let later = t + Duration::from_secs(20);
        let Step::Answer(r) = a.on_request(peer(1), &mut tagged(0, true, 999), later) else {
            panic!("a transfer past the peer's share was taken");
        };
        assert_eq!(r.code, ResponseType::ServiceUnavailable);
        let max_age = r.options.iter().find(|(o, _)| *o == CoapOption::MaxAge);
        assert_eq!(
            max_age.map(|(_, v)| v.clone()),
            Some(message::encode_uint(40))
        );
        assert_eq!(a.len(), MAX_TRANSFERS_PER_PEER);
        // Another device still gets its transfer.
        let mut p = block_request(0, true, 0, &[1; 16]);
        assert_eq!(
            code(&a.on_request(peer(2), &mut p, later)),
            Some(ResponseType::Continue)
        );
        // The peer's transfers in progress go on, its oldest included.
        assert!(matches!(
            a.on_request(peer(1), &mut tagged(1, false, 0), later),
            Step::Handle(Some(_))
        ));
        // Once its oldest has ended, there is room again.
        assert_eq!(
            code(&a.on_request(peer(1), &mut tagged(0, true, 999), later)),
            Some(ResponseType::Continue)
        );
    }
}
