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
        Entry::AsyncResponse(AsyncResponse {
            id,
            status,
            payload,
            ct,
            max_age,
            error,
            location,
        }) => {
            // `error` only when there is one: the official Python client treats any
            // `error` key as a failure. `location` is an extension.
            #[derive(Serialize)]
            struct A<'a> {
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
            serde_json::to_string(&A {
                ct: ct.as_deref(),
                error: error.as_deref(),
                id,
                location: location.as_deref(),
                max_age: *max_age,
                payload: b64(payload),
                status: *status,
            })
        }
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
