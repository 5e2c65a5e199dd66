//! The JSON of the two records stored on every proxied read and every notification (the
//! request to a device, the queued event), written by hand. The request is byte for byte
//! what `serde_json` writes for its `Serialize` derive (the tests compare, escapes
//! included), read back with serde as before; the event's record is the store's own
//! ([`event`], read by [`read_event`]).
//!
//! Decision: `serde_json` escapes every key and value through its general escaper, which
//! was about 7 % of the daemon's user-space instructions per proxied read (callgrind,
//! docs/PERFORMANCE.md). Here the field names are literals and a value is copied as it is
//! unless it holds one of the characters JSON must escape (`"`, `\`, a control
//! character), in which case `serde_json` writes that one value.

use base64::Engine;
use serde::Deserialize;

use connectord_model::{
    AsyncResponse, EndpointSummary, Entry, Event, Job, Kind, Method, Notification, ResourceSummary,
    SubscriptionError,
};

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
        device_request,
        attempts: _,
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
    if let Some(terms) = device_request {
        // Only device-requests (issue 23) carry it: serde writes this rare value.
        out.push_str(",\"device_request\":");
        match serde_json::to_string(terms) {
            Ok(t) => out.push_str(&t),
            Err(_) => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

/// The stored record of an event (the `data` column; its key id and sequence number are
/// columns of their own): `{"kind":..,"created_ms":..}` and the entry's fields, by kind
/// (`ep`, `path`, `ct`, `max_age`, `payload` in base64, ...; absent optional fields are
/// left out). Read back by [`read_event`]. The store's own format: not the mbed entry,
/// though the schema-8 migration made these records from stored entries.
pub fn event(e: &Event) -> String {
    let mut out = String::with_capacity(160);
    out.push_str("{\"kind\":\"");
    out.push_str(e.kind().as_str());
    out.push_str("\",\"created_ms\":");
    number(&mut out, e.created_ms);
    match e.entry() {
        Entry::Notification(Notification {
            ep,
            path,
            ct,
            payload,
            max_age,
        }) => {
            field_str(&mut out, "ep", ep);
            field_str(&mut out, "path", path);
            opt_str(&mut out, "ct", ct.as_deref());
            out.push_str(",\"max_age\":");
            number(&mut out, u64::from(*max_age));
            bytes(&mut out, "payload", payload);
        }
        Entry::Registration(s) | Entry::RegUpdate(s) => {
            let EndpointSummary {
                ep,
                ept,
                queue,
                resources,
                lwm2m,
                ct,
            } = s;
            field_str(&mut out, "ep", ep);
            field_str(&mut out, "ept", ept);
            out.push_str(if *queue {
                ",\"q\":true"
            } else {
                ",\"q\":false"
            });
            opt_str(&mut out, "lwm2m", lwm2m.as_deref());
            opt_str(&mut out, "ct", ct.as_deref());
            out.push_str(",\"resources\":[");
            for (i, r) in resources.iter().enumerate() {
                let ResourceSummary {
                    path,
                    iface,
                    rt,
                    ct,
                    obs,
                    ver,
                } = r;
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"path\":");
                string(&mut out, path);
                opt_str(&mut out, "if", iface.as_deref());
                opt_str(&mut out, "rt", rt.as_deref());
                opt_str(&mut out, "ct", ct.as_deref());
                out.push_str(if *obs {
                    ",\"obs\":true"
                } else {
                    ",\"obs\":false"
                });
                opt_str(&mut out, "ver", ver.as_deref());
                out.push('}');
            }
            out.push(']');
        }
        Entry::DeRegistration(ep) | Entry::Expired(ep) => field_str(&mut out, "ep", ep),
        Entry::AsyncResponse(AsyncResponse {
            id,
            status,
            payload,
            ct,
            max_age,
            error,
            location,
        }) => {
            field_str(&mut out, "id", id);
            out.push_str(",\"status\":");
            number(&mut out, u64::from(*status));
            bytes(&mut out, "payload", payload);
            opt_str(&mut out, "ct", ct.as_deref());
            if let Some(m) = max_age {
                out.push_str(",\"max_age\":");
                number(&mut out, u64::from(*m));
            }
            opt_str(&mut out, "error", error.as_deref());
            opt_str(&mut out, "location", location.as_deref());
        }
        Entry::SubscriptionError(SubscriptionError {
            ep,
            path,
            status,
            error,
        }) => {
            field_str(&mut out, "ep", ep);
            field_str(&mut out, "path", path);
            out.push_str(",\"status\":");
            number(&mut out, u64::from(*status));
            field_str(&mut out, "error", error);
        }
    }
    out.push('}');
    out
}

/// Every field an event record may have (which ones it must have depends on its kind).
#[derive(Deserialize)]
struct EventRecord {
    kind: String,
    created_ms: u64,
    ep: Option<String>,
    path: Option<String>,
    ct: Option<String>,
    max_age: Option<u32>,
    payload: Option<String>,
    ept: Option<String>,
    q: Option<bool>,
    lwm2m: Option<String>,
    resources: Option<Vec<ResourceRecord>>,
    id: Option<String>,
    status: Option<u16>,
    error: Option<String>,
    location: Option<String>,
}

#[derive(Deserialize)]
struct ResourceRecord {
    path: String,
    #[serde(rename = "if")]
    iface: Option<String>,
    rt: Option<String>,
    ct: Option<String>,
    #[serde(default)]
    obs: bool,
    ver: Option<String>,
}

/// Reads an event record written by [`event`] (or by the schema-8 migration); the error
/// names what is wrong with it.
pub fn read_event(data: &str) -> Result<Event, String> {
    let r: EventRecord = serde_json::from_str(data).map_err(|e| e.to_string())?;
    fn need<T>(v: Option<T>, what: &str) -> Result<T, String> {
        v.ok_or_else(|| format!("no {what}"))
    }
    let payload = |p: Option<String>| -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(need(p, "payload")?)
            .map_err(|e| format!("payload: {e}"))
    };
    let kind = Kind::from_name(&r.kind).ok_or_else(|| format!("unknown kind {:?}", r.kind))?;
    let summary = |r: EventRecord| -> Result<EndpointSummary, String> {
        Ok(EndpointSummary {
            ep: need(r.ep, "ep")?,
            ept: r.ept.unwrap_or_default(),
            queue: r.q.unwrap_or(false),
            resources: need(r.resources, "resources")?
                .into_iter()
                .map(|x| ResourceSummary {
                    path: x.path,
                    iface: x.iface,
                    rt: x.rt,
                    ct: x.ct,
                    obs: x.obs,
                    ver: x.ver,
                })
                .collect(),
            lwm2m: r.lwm2m,
            ct: r.ct,
        })
    };
    let created_ms = r.created_ms;
    let entry = match kind {
        Kind::Notifications => Entry::Notification(Notification {
            ep: need(r.ep, "ep")?,
            path: need(r.path, "path")?,
            ct: r.ct,
            max_age: need(r.max_age, "max_age")?,
            payload: payload(r.payload)?,
        }),
        Kind::Registrations => Entry::Registration(summary(r)?),
        Kind::RegUpdates => Entry::RegUpdate(summary(r)?),
        Kind::DeRegistrations => Entry::DeRegistration(need(r.ep, "ep")?),
        Kind::RegistrationsExpired => Entry::Expired(need(r.ep, "ep")?),
        Kind::AsyncResponses => Entry::AsyncResponse(AsyncResponse {
            id: need(r.id, "id")?,
            status: need(r.status, "status")?,
            payload: payload(r.payload)?,
            ct: r.ct,
            max_age: r.max_age,
            error: r.error,
            location: r.location,
        }),
        Kind::SubscriptionErrors => Entry::SubscriptionError(SubscriptionError {
            ep: need(r.ep, "ep")?,
            path: need(r.path, "path")?,
            status: need(r.status, "status")?,
            error: need(r.error, "error")?,
        }),
    };
    Ok(Event::new(entry, created_ms))
}

/// `,"name":"value"`.
fn field_str(out: &mut String, name: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
    string(out, value);
}

/// [`field_str`] when there is a value.
fn opt_str(out: &mut String, name: &str, value: Option<&str>) {
    if let Some(v) = value {
        field_str(out, name, v);
    }
}

/// `,"name":"<base64>"`.
fn bytes(out: &mut String, name: &str, value: &[u8]) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(value, out);
    out.push('"');
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

/// A JSON string, with serde's escapes.
use connectord_model::json::push_string as string;

#[cfg(test)]
mod tests {
    use super::*;

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
            device_request: None,
            attempts: 0,
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
        j.device_request = Some(connectord_model::DeviceRequestTerms {
            expires_ms: u64::MAX,
            retry: 24,
        });
        assert_eq!(request(&j), serde_json::to_string(&j).unwrap());
        j.created_ms = u64::MAX;
        assert_eq!(request(&j), serde_json::to_string(&j).unwrap());
        // And it reads back (the row number is kept beside the record, not in it).
        let back: Job = serde_json::from_str(&request(&j)).unwrap();
        assert_eq!(back, Job { row: 0, ..j });
    }

    /// One event of every kind, with awkward strings and optional fields set or not.
    pub(crate) fn every_kind(s: &str, i: u64) -> Vec<Event> {
        let opt = |on: bool| on.then(|| s.to_string());
        let on = i.is_multiple_of(2);
        let summary = EndpointSummary {
            ep: s.into(),
            ept: s.into(),
            queue: on,
            resources: vec![
                ResourceSummary {
                    path: format!("/3/0/{s}"),
                    iface: opt(on),
                    rt: opt(!on),
                    ct: opt(on),
                    obs: on,
                    ver: opt(!on),
                },
                ResourceSummary {
                    path: "/1".into(),
                    iface: None,
                    rt: None,
                    ct: None,
                    obs: false,
                    ver: None,
                },
            ],
            lwm2m: opt(on),
            ct: opt(!on),
        };
        let t = 1_764_000_000_000 + i;
        vec![
            Event::new(
                Entry::Notification(Notification {
                    ep: s.into(),
                    path: s.into(),
                    ct: opt(on),
                    payload: s.as_bytes().to_vec(),
                    max_age: i as u32,
                }),
                t,
            ),
            Event::new(Entry::Registration(summary.clone()), t),
            Event::new(
                Entry::RegUpdate(EndpointSummary {
                    resources: vec![],
                    ..summary
                }),
                t,
            ),
            Event::new(Entry::DeRegistration(s.into()), t),
            Event::new(Entry::Expired(s.into()), t),
            Event::new(
                Entry::AsyncResponse(AsyncResponse {
                    id: s.into(),
                    status: 200 + i as u16,
                    payload: vec![0, 255, i as u8],
                    ct: opt(on),
                    max_age: on.then_some(i as u32),
                    error: opt(!on),
                    location: opt(on),
                }),
                t,
            ),
            Event::new(
                Entry::SubscriptionError(SubscriptionError {
                    ep: s.into(),
                    path: s.into(),
                    status: 412,
                    error: s.into(),
                }),
                t,
            ),
        ]
    }

    #[test]
    fn events_of_every_kind_read_back_as_written() {
        for (i, s) in AWKWARD.iter().enumerate() {
            for e in every_kind(s, i as u64) {
                let text = event(&e);
                // Valid JSON, whatever the strings hold.
                serde_json::from_str::<serde_json::Value>(&text).unwrap();
                assert_eq!(read_event(&text).unwrap(), e, "{text}");
            }
        }
    }

    #[test]
    fn unreadable_event_records_say_why() {
        for (bad, why) in [
            ("not json", "expected"),
            (r#"{"kind":"nope","created_ms":1}"#, "unknown kind"),
            (
                r#"{"kind":"notifications","created_ms":1,"ep":"a"}"#,
                "no path",
            ),
            (
                r#"{"kind":"async-responses","created_ms":1,"id":"x","status":200,"payload":"!"}"#,
                "payload",
            ),
        ] {
            let e = read_event(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
