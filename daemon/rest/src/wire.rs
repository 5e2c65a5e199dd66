//! The mbed JSON of events: each event's entry and the notification message of a batch
//! (seed 000, "Notification data structure"). The only place that knows these shapes:
//! long-poll answers are rendered here, and sinks outside this crate (the sink plugin's
//! adapter) get [`Mbed`] as their `events::Render`.
//!
//! Every object writes its fields in name order, absent optional fields left out: the
//! text is byte for byte what the daemon wrote before issue 20 moved rendering here (it
//! built `serde_json::Value` maps, whose keys are sorted).
//!
//! An entry is rendered once per event and kept with it (`Event::rendered`): an event
//! queued for several keys, or delivered again, is not rendered again. Measured (issue
//! 20, callgrind, one notification at a time, docs/PERFORMANCE.md): with rendering here
//! and the store's typed record, a notification to a long-poll costs about 91 000
//! user-space instructions against 87 300 when core made and stored the rendered text
//! (+4.2 %), to a webhook 121 100 against 120 500 (+0.4 %), a proxied read 74 700
//! against 71 800 (+4.0 %); a registration with no channel to route it to is no longer
//! rendered at all (108 100 against 139 900).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use crate::events::{
    AsyncResponse, EndpointSummary, Entry, Event, Notification, Render, SubscriptionError,
};

/// The renderer handed to sinks outside this crate.
pub struct Mbed;

impl Render for Mbed {
    fn message(&self, events: &[Event]) -> String {
        message(events)
    }

    /// The entry as rendered (and kept with the event, so the answer reuses it).
    fn entry_len(&self, event: &Event) -> usize {
        entry_of(event).len()
    }
}

/// The notification message for a batch of events, in order: one array per event type
/// present (types in name order), entries in the order they happened.
pub fn message(events: &[Event]) -> String {
    let mut groups: BTreeMap<&'static str, Vec<&str>> = BTreeMap::new();
    let mut len = 2;
    for e in events {
        let text = entry_of(e);
        len += text.len() + 1;
        groups.entry(e.kind().as_str()).or_default().push(text);
    }
    let mut out = String::with_capacity(len + groups.len() * 24);
    out.push('{');
    for (i, (kind, entries)) in groups.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Event type names are fixed ASCII words: nothing to escape.
        out.push('"');
        out.push_str(kind);
        out.push_str("\":[");
        for (j, b) in entries.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(b);
        }
        out.push(']');
    }
    out.push('}');
    out
}

/// The event's entry, rendered once and kept with the event.
pub fn entry_of(e: &Event) -> &str {
    e.rendered(entry)
}

/// The JSON entry of an event.
pub fn entry(e: &Entry) -> String {
    let b64 = |p: &[u8]| base64::engine::general_purpose::STANDARD.encode(p);
    let text = match e {
        Entry::Notification(Notification {
            ep,
            path,
            ct,
            payload,
            max_age,
        }) => {
            #[derive(Serialize)]
            struct N<'a> {
                #[serde(skip_serializing_if = "Option::is_none")]
                ct: Option<&'a str>,
                ep: &'a str,
                #[serde(rename = "max-age")]
                max_age: u32,
                path: &'a str,
                payload: String,
            }
            serde_json::to_string(&N {
                ct: ct.as_deref(),
                ep,
                max_age: *max_age,
                path,
                payload: b64(payload),
            })
        }
        Entry::Registration(s) | Entry::RegUpdate(s) => registration(s),
        Entry::DeRegistration(ep) | Entry::Expired(ep) => serde_json::to_string(ep),
        // Written by hand (the serde struct it replaces is `tests::SerdeAnswer`, which the
        // tests compare it with): one per proxied read, where serde's field and string
        // writers were about 2 500 instructions (callgrind, docs/PERFORMANCE.md, issue 24).
        Entry::AsyncResponse(a) => Ok(async_response(a)),
        Entry::SubscriptionError(SubscriptionError {
            ep,
            path,
            status,
            error,
        }) => {
            #[derive(Serialize)]
            struct S<'a> {
                ep: &'a str,
                error: &'a str,
                path: &'a str,
                status: u16,
            }
            serde_json::to_string(&S {
                ep,
                error,
                path,
                status: *status,
            })
        }
    };
    // Nothing here fails to serialise (strings, numbers, booleans); if it did, the entry
    // would be `null`, as before.
    text.unwrap_or_else(|e| {
        tracing::error!("event entry not serialisable: {e}");
        "null".into()
    })
}

/// An `async-responses` entry: `ct`, `error` (only when there is one: the official
/// Python client treats any `error` key as a failure), `id`, `location` (an extension),
/// `max-age`, `payload` (base64), `status`, in name order, absent ones left out; byte for
/// byte what serde wrote.
fn async_response(a: &AsyncResponse) -> String {
    let AsyncResponse {
        id,
        status,
        payload,
        ct,
        max_age,
        error,
        location,
    } = a;
    let mut out = String::with_capacity(
        64 + id.len()
            + payload.len().div_ceil(3) * 4
            + ct.as_ref().map_or(0, String::len)
            + error.as_ref().map_or(0, String::len)
            + location.as_ref().map_or(0, String::len),
    );
    out.push('{');
    if let Some(ct) = ct {
        out.push_str("\"ct\":");
        json_string(&mut out, ct);
        out.push(',');
    }
    if let Some(error) = error {
        out.push_str("\"error\":");
        json_string(&mut out, error);
        out.push(',');
    }
    out.push_str("\"id\":");
    json_string(&mut out, id);
    if let Some(location) = location {
        out.push_str(",\"location\":");
        json_string(&mut out, location);
    }
    if let Some(max_age) = max_age {
        out.push_str(",\"max-age\":");
        out.push_str(itoa::Buffer::new().format(*max_age));
    }
    out.push_str(",\"payload\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(payload, &mut out);
    out.push_str("\",\"status\":");
    out.push_str(itoa::Buffer::new().format(*status));
    out.push('}');
    out
}

/// A JSON string, with serde's escapes (shared with the store's records).
pub(crate) use connectord_core::model::json::push_string as json_string;

/// A `registrations` / `reg-updates` entry: `ep`, `ept`, `q`, the resources (each with the
/// seed's `rf` for its resource type and also `rt`, the link-format name that clients
/// written against the real service read; `obs` a boolean) and the extensions `lwm2m`
/// and `ct` (the device's preferred content format).
fn registration(s: &EndpointSummary) -> serde_json::Result<String> {
    #[derive(Serialize)]
    struct R<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        ct: Option<&'a str>,
        #[serde(rename = "if", skip_serializing_if = "Option::is_none")]
        iface: Option<&'a str>,
        obs: bool,
        path: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        rf: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rt: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ver: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct E<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        ct: Option<&'a str>,
        ep: &'a str,
        ept: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        lwm2m: Option<&'a str>,
        q: bool,
        resources: Vec<R<'a>>,
    }
    serde_json::to_string(&E {
        ct: s.ct.as_deref(),
        ep: &s.ep,
        ept: &s.ept,
        lwm2m: s.lwm2m.as_deref(),
        q: s.queue,
        resources: s
            .resources
            .iter()
            .map(|r| R {
                ct: r.ct.as_deref(),
                iface: r.iface.as_deref(),
                obs: r.obs,
                path: &r.path,
                rf: r.rt.as_deref(),
                rt: r.rt.as_deref(),
                ver: r.ver.as_deref(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Kind;

    fn ev(entry: Entry) -> Event {
        Event::new(entry, 0)
    }

    fn answer(status: u16, payload: &[u8], ct: Option<&str>, max_age: Option<u32>) -> Entry {
        Entry::AsyncResponse(AsyncResponse {
            id: "x".into(),
            status,
            payload: payload.to_vec(),
            ct: ct.map(Into::into),
            max_age,
            error: None,
            location: None,
        })
    }

    #[test]
    fn batches_group_by_type_in_name_order_entries_in_order() {
        let reg = |ep: &str| {
            Entry::Registration(EndpointSummary {
                ep: ep.into(),
                ept: String::new(),
                queue: false,
                resources: vec![],
                lwm2m: None,
                ct: None,
            })
        };
        let batch = message(&[
            ev(reg("a")),
            ev(answer(200, b"", None, None)),
            ev(reg("b")),
            ev(Entry::DeRegistration("a".into())),
        ]);
        assert_eq!(
            batch,
            r#"{"async-responses":[{"id":"x","payload":"","status":200}],"de-registrations":["a"],"registrations":[{"ep":"a","ept":"","q":false,"resources":[]},{"ep":"b","ept":"","q":false,"resources":[]}]}"#
        );
        assert_eq!(message(&[]), "{}");
    }

    /// The texts the daemon wrote before rendering moved here (issue 20), byte for byte.
    #[test]
    fn entries_are_the_seed_fields_in_name_order() {
        let n = |ct: Option<&str>, max_age| {
            entry(&Entry::Notification(Notification {
                ep: "ep1".into(),
                path: "/3303/0/5700".into(),
                ct: ct.map(Into::into),
                payload: b"21.5".to_vec(),
                max_age,
            }))
        };
        assert_eq!(
            n(Some("text/plain"), 60),
            r#"{"ct":"text/plain","ep":"ep1","max-age":60,"path":"/3303/0/5700","payload":"MjEuNQ=="}"#
        );
        assert_eq!(
            n(None, 5),
            r#"{"ep":"ep1","max-age":5,"path":"/3303/0/5700","payload":"MjEuNQ=="}"#
        );
        // `error` only when failed.
        assert_eq!(
            entry(&answer(200, b"12", Some("text/plain"), Some(0))),
            r#"{"ct":"text/plain","id":"x","max-age":0,"payload":"MTI=","status":200}"#
        );
        let Entry::AsyncResponse(mut bad) = answer(504, b"", None, None) else {
            unreachable!()
        };
        bad.error = Some("timeout".into());
        bad.location = Some("/3303/1".into());
        assert_eq!(
            entry(&Entry::AsyncResponse(bad)),
            r#"{"error":"timeout","id":"x","location":"/3303/1","payload":"","status":504}"#
        );
        assert_eq!(
            entry(&Entry::SubscriptionError(SubscriptionError {
                ep: "e".into(),
                path: "/3/0/1".into(),
                status: 412,
                error: "no \"Observe\"".into(),
            })),
            r#"{"ep":"e","error":"no \"Observe\"","path":"/3/0/1","status":412}"#
        );
        assert_eq!(entry(&Entry::Expired("e\u{1}".into())), r#""e\u0001""#);
        let summary = connectord_model::testing::endpoint_summary();
        assert_eq!(
            entry(&Entry::RegUpdate(summary)),
            r#"{"ct":"application/vnd.oma.lwm2m+tlv","ep":"e","ept":"Sensor","lwm2m":"1.1","q":true,"resources":[{"ct":"text/plain","if":"sensor","obs":true,"path":"/3/0","rf":"oma.lwm2m","rt":"oma.lwm2m","ver":"1.1"},{"obs":false,"path":"/1/0"}]}"#
        );
    }

    /// The serde struct the async-response entry was written with before issue 24: the
    /// hand-written one must give the same bytes.
    #[derive(Serialize)]
    struct SerdeAnswer<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        ct: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
        id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        location: Option<&'a str>,
        #[serde(rename = "max-age", skip_serializing_if = "Option::is_none")]
        max_age: Option<u32>,
        payload: String,
        status: u16,
    }

    const AWKWARD: &[&str] = &[
        "",
        "plain",
        "1234#0b1e3d6a-1c2b-4f5e-8a9b-0c1d2e3f4a5b",
        "quote \" and backslash \\",
        "control \u{0} \u{1f} \n \t \r \u{8} \u{c}",
        "DEL \u{7f}, non-ASCII é 日本 \u{2028} \u{10ffff}",
        "/3/0/0",
    ];

    #[test]
    fn async_responses_are_written_as_serde_wrote_them() {
        let opt = |i: usize| (!i.is_multiple_of(3)).then(|| AWKWARD[i % AWKWARD.len()]);
        let payloads: [&[u8]; 5] = [b"", b"1", b"12", b"123", &[0, 255, 34, 92, 10, 200, 7]];
        let mut n = 0;
        for (i, id) in AWKWARD.iter().enumerate() {
            for (j, payload) in payloads.iter().enumerate() {
                for status in [0u16, 200, 504, u16::MAX] {
                    let k = i * 7 + j * 3 + usize::from(status % 5);
                    let a = AsyncResponse {
                        id: (*id).into(),
                        status,
                        payload: payload.to_vec(),
                        ct: opt(k).map(Into::into),
                        max_age: (!k.is_multiple_of(4)).then_some([0, 60, u32::MAX][k % 3]),
                        error: opt(k + 1).map(Into::into),
                        location: opt(k + 2).map(Into::into),
                    };
                    let want = serde_json::to_string(&SerdeAnswer {
                        ct: a.ct.as_deref(),
                        error: a.error.as_deref(),
                        id: &a.id,
                        location: a.location.as_deref(),
                        max_age: a.max_age,
                        payload: base64::engine::general_purpose::STANDARD.encode(&a.payload),
                        status: a.status,
                    })
                    .unwrap();
                    assert_eq!(entry(&Entry::AsyncResponse(a)), want);
                    n += 1;
                }
            }
        }
        assert_eq!(n, AWKWARD.len() * 5 * 4);
    }

    #[test]
    fn json_strings_are_escaped_as_serde_escapes_them() {
        for s in AWKWARD {
            let mut out = String::from("x");
            json_string(&mut out, s);
            assert_eq!(
                out,
                format!("x{}", serde_json::to_string(s).unwrap()),
                "{s:?}"
            );
        }
    }

    #[test]
    fn an_entry_is_rendered_once_and_shared_by_its_clones() {
        let e = ev(Entry::DeRegistration("a".into()));
        let copy = e.clone();
        assert_eq!(entry_of(&e), r#""a""#);
        // The clone (the same event queued for another key) finds it rendered.
        assert_eq!(copy.rendered(|_| unreachable!("rendered twice")), r#""a""#);
        assert_eq!(Mbed.message(&[copy]), r#"{"de-registrations":["a"]}"#);
        assert_eq!(e.kind(), Kind::DeRegistrations);
    }
}
