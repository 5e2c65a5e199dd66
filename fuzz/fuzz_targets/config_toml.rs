#![no_main]
//! Any UTF-8 text as the configuration file: `Config::parse` must not panic (errors, with
//! their line:column, are fine).
use connectord::config::{Config, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Source::Embedded);
    }
});
