//! The JSON of the two records stored on every proxied read and every notification (the
//! request to a device, the queued event), written by hand: byte for byte what
//! `serde_json` writes for their `Serialize` derives (the tests compare, escapes
//! included), and read back with serde as before.
//!
//! Decision: `serde_json` escapes every key and value through its general escaper, which
//! was about 7 % of the daemon's user-space instructions per proxied read (callgrind,
//! docs/PERFORMANCE.md). Here the field names are literals and a value is copied as it is
//! unless it holds one of the characters JSON must escape (`"`, `\`, a control
//! character), in which case `serde_json` writes that one value.

use connectord_model::{Event, Job, Method, StoredEvent};

/// `serde_json::to_string(job)`.
pub fn request(job: &Job) -> String {
    // Every field named, none with `..`: a field added to `Job` fails the build here
    // until it is written below (serde writes every field not skipped).
    let Job {
        id,
        key_id,
        domain,
        ep,
        method,
        path,
        payload,
        content_format,
        accept,
        accept_fallback,
        as_json,
        created_ms,
        internal,
        row: _,
    } = job;
    let mut out = String::with_capacity(
        160 + id.len() + key_id.len() + domain.len() + ep.len() + path.len() + payload.len(),
    );
    out.push_str("{\"id\":");
    string(&mut out, id);
    out.push_str(",\"key_id\":");
    string(&mut out, key_id);
    out.push_str(",\"domain\":");
    string(&mut out, domain);
    out.push_str(",\"ep\":");
    string(&mut out, ep);
    out.push_str(",\"method\":\"");
    out.push_str(method_name(*method));
    out.push_str("\",\"path\":");
    string(&mut out, path);
    out.push_str(",\"payload\":");
    string(&mut out, payload);
    out.push_str(",\"content_format\":");
    match content_format {
        Some(cf) => number(&mut out, u64::from(*cf)),
        None => out.push_str("null"),
    }
    out.push_str(",\"accept\":");
    match accept {
        Some(cf) => number(&mut out, u64::from(*cf)),
        None => out.push_str("null"),
    }
    out.push_str(",\"accept_fallback\":");
    out.push_str(if *accept_fallback { "true" } else { "false" });
    out.push_str(",\"as_json\":");
    out.push_str(if *as_json { "true" } else { "false" });
    out.push_str(",\"created_ms\":");
    number(&mut out, *created_ms);
    out.push_str(",\"internal\":");
    out.push_str(if *internal { "true" } else { "false" });
    out.push('}');
    out
}

/// `serde_json::to_string(event)`.
pub fn event(e: &StoredEvent) -> String {
    // As in `request`: a new field fails the build here.
    let StoredEvent {
        key_id,
        seq,
        event: Event {
            kind,
            body,
            created_ms,
        },
    } = e;
    let body = body.as_str();
    let mut out = String::with_capacity(96 + key_id.len() + body.len());
    out.push_str("{\"key_id\":");
    string(&mut out, key_id);
    out.push_str(",\"seq\":");
    number(&mut out, *seq);
    out.push_str(",\"event\":{\"kind\":\"");
    out.push_str(kind.as_str());
    out.push_str("\",\"body\":");
    // Valid JSON already (a `RawValue`), written as it is, as serde writes it.
    out.push_str(body);
    out.push_str(",\"created_ms\":");
    number(&mut out, *created_ms);
    out.push_str("}}");
    out
}

/// The variant name serde's derive writes.
fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "Get",
        Method::Put => "Put",
        Method::Post => "Post",
        Method::Delete => "Delete",
        Method::Observe => "Observe",
    }
}

fn number(out: &mut String, n: u64) {
    // itoa, not `write!`: the formatting machinery was about 600 instructions a number.
    out.push_str(itoa::Buffer::new().format(n));
}

/// A JSON string: copied between quotes when nothing in it needs escaping (JSON escapes
/// only `"`, `\` and control characters; serde_json escapes nothing else), else escaped
/// by serde_json.
fn string(out: &mut String, s: &str) {
    // Without an early exit, so that the compiler checks many bytes at a time.
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        match serde_json::to_string(s) {
            Ok(escaped) => out.push_str(&escaped),
            // Serialising a str cannot fail; an empty string keeps the record valid.
            Err(_) => out.push_str("\"\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connectord_model::{Body, Kind};

    const AWKWARD: &[&str] = &[
        "",
        "plain",
        "quote \" and backslash \\",
        "control \u{0} \u{1f} \n \t \r \u{8} \u{c}",
        "DEL \u{7f}, non-ASCII é 日本 \u{2028} \u{10ffff}",
        "/3/0/0",
        "1234#0b1e3d6a-1c2b-4f5e-8a9b-0c1d2e3f4a5b",
    ];

    fn job(s: &str, method: Method, cf: Option<u16>, internal: bool) -> Job {
        Job {
            id: s.into(),
            key_id: format!("k{s}"),
            domain: s.into(),
            ep: format!("{s}ep"),
            method,
            path: s.into(),
            payload: s.into(),
            content_format: cf,
            accept: cf.map(|c| c ^ 1),
            accept_fallback: internal,
            as_json: !internal,
            created_ms: 1_764_000_000_000,
            internal,
            row: 42,
        }
    }

    #[test]
    fn requests_are_written_as_serde_writes_them() {
        let methods = [
            Method::Get,
            Method::Put,
            Method::Post,
            Method::Delete,
            Method::Observe,
        ];
        for (i, s) in AWKWARD.iter().enumerate() {
            for (m, cf) in methods
                .iter()
                .zip([None, Some(0), Some(50), Some(u16::MAX), None])
            {
                let j = job(s, *m, cf, i % 2 == 0);
                assert_eq!(request(&j), serde_json::to_string(&j).unwrap(), "{j:?}");
            }
        }
        let mut j = job("x", Method::Get, None, false);
        j.created_ms = u64::MAX;
        assert_eq!(request(&j), serde_json::to_string(&j).unwrap());
        // And it reads back (the row number is kept beside the record, not in it).
        let back: Job = serde_json::from_str(&request(&j)).unwrap();
        assert_eq!(back, Job { row: 0, ..j });
    }

    #[test]
    fn events_are_written_as_serde_writes_them() {
        for (i, s) in AWKWARD.iter().enumerate() {
            for kind in Kind::ALL {
                let e = StoredEvent {
                    key_id: s.to_string(),
                    seq: i as u64 * 1_000_003,
                    event: Event {
                        kind,
                        body: Body::new(&serde_json::json!({"ep": s, "n": [1, 2.5, null]})),
                        created_ms: 1_764_000_000_000 + i as u64,
                    },
                };
                let ours = event(&e);
                assert_eq!(ours, serde_json::to_string(&e).unwrap(), "{e:?}");
                let back: StoredEvent = serde_json::from_str(&ours).unwrap();
                assert_eq!(back, e);
            }
        }
    }
}
