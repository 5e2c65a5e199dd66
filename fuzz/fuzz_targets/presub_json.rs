#![no_main]
//! Any body of PUT /subscriptions: `parse` must not panic, and matching accepted rules
//! against a few endpoint names / types / paths must not panic either.
use connectord::subscriptions::presub::{any_match, parse};
use libfuzzer_sys::fuzz_target;

const CASES: &[(&str, Option<&str>, &str)] = &[
    ("node-001", Some("sensor"), "/3/0/1"),
    ("", None, "/"),
    ("", Some(""), ""),
    ("*", Some("*"), "*"),
    ("ä-ep", Some("tÿpe"), "/3303/0/5700"),
    ("a*b?c", None, "/1/*/2"),
];

fuzz_target!(|data: &[u8]| {
    if let Ok(rules) = parse(data) {
        for (name, ept, path) in CASES {
            let _ = any_match(&rules, name, *ept, path);
        }
        // Use the raw input as a name and path too, when it is text.
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = any_match(&rules, text, Some(text), text);
        }
    }
});
