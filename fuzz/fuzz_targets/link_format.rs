#![no_main]
//! Any UTF-8 text as a registration payload: the link-format parser and the registry's
//! resource list parser must not panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = connectord::coap::link_format::parse(text);
        let _ = connectord::registry::parse_resources(text);
    }
});
