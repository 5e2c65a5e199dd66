#![no_main]
//! Any datagram: `decode` must not panic, and re-encoding a packet it accepted must not
//! panic either.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = connectord::coap::message::decode(data) {
        let _ = packet.to_bytes();
    }
});
