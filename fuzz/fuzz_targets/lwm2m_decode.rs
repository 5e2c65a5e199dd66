#![no_main]
//! Any payload in any LwM2M content format: `lwm2m_data::decode` must not panic, and a tree
//! it returns must encode without panicking; what SenML writes must read back as the same
//! tree, what TLV writes must read back.
//!
//! Input: byte 0 picks the content format (an index into `DECODES`), byte 1 the requested
//! path (an index into `PATHS`), the rest is the payload.
use connectord::lwm2m_data::{DECODES, ENCODES, Path, decode, encode, format};
use libfuzzer_sys::fuzz_target;

/// Paths whose resources the built-in table knows (string, integer, time, float, boolean,
/// objlnk, opaque) and does not know, at every depth.
const PATHS: &[&str] = &[
    "/3",
    "/3/0",
    "/3/0/0",
    "/3/0/6",
    "/3/0/6/0",
    "/3/0/13",
    "/3/0/22/0",
    "/0/0/3",
    "/1",
    "/6/0",
    "/3303/0",
    "/3303/0/5700",
    "/3311/0/5850",
    "/10241",
    "/10241/0",
    "/10241/0/1",
];

fuzz_target!(|data: &[u8]| {
    let [f, p, payload @ ..] = data else {
        return;
    };
    let content_format = DECODES[usize::from(*f) % DECODES.len()];
    let path = Path::parse(PATHS[usize::from(*p) % PATHS.len()]).expect("a valid path");
    let Ok(tree) = decode(content_format, payload, &path) else {
        return;
    };
    for &out in ENCODES {
        let Ok(bytes) = encode(&tree, &path, out) else {
            continue;
        };
        let back = decode(out, &bytes, &path);
        match out {
            format::SENML_JSON | format::SENML_CBOR => {
                assert_eq!(back.as_ref(), Ok(&tree), "format {out} changed the tree");
            }
            format::TLV | format::LEGACY_TLV => {
                assert!(
                    back.is_ok(),
                    "TLV written by encode does not read back: {back:?}"
                );
            }
            _ => {}
        }
    }
});
