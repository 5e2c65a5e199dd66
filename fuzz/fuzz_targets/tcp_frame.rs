#![no_main]
//! Any bytes from a CoAP over TLS connection (RFC 8323): `decode` must not panic, reading
//! frames one after another as the connection does; a frame it accepted must encode back
//! to the same bytes, and its signal and its translation to RFC 7252 must not panic either.
use connectord::coap::rfc8323::{self, Signal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = rfc8323::decode(rest, 1 << 20) {
        assert_eq!(rfc8323::encode(&frame), rest[..used], "round trip");
        let _ = Signal::read(&frame);
        let udp = rfc8323::to_udp(&frame, rfc8323::CON, 1);
        let _ = connectord::coap::message::decode(&udp);
        let _ = rfc8323::from_udp(&udp);
        rest = &rest[used..];
    }
    let _ = rfc8323::from_udp(data);
});
