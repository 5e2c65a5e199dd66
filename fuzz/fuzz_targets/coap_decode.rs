#![no_main]
//! Any datagram: `decode` must not panic, re-encoding a packet it accepted must not panic
//! either, and neither must the Block1 assembly it goes through next (each datagram as the
//! next block of one peer's transfer, so that runs of inputs build on each other).
use std::sync::Mutex;
use std::time::Instant;

use connectord::coap::block1::Assemblies;
use libfuzzer_sys::fuzz_target;

static BLOCKS: Mutex<Option<Assemblies>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    if let Ok(mut packet) = connectord::coap::message::decode(data) {
        let _ = packet.to_bytes();
        let peer = connectord::coap::peer::Source {
            via: 0,
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 5683)),
        };
        let mut blocks = BLOCKS.lock().unwrap_or_else(|p| p.into_inner());
        let _ = blocks
            .get_or_insert_with(Assemblies::default)
            .on_request(peer, &mut packet, Instant::now());
    }
});
