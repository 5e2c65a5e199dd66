//! Callback URLs of the MQTT sink and the topics of its messages.
//!
//! A URL is `mqtt://[user[:password]@]host[:port][/prefix]` (`mqtts://` for TLS; ports 1883
//! and 8883 by default). The user and password are percent-decoded; the path, percent-decoded,
//! is the topic prefix (`connectord` when empty). A query or fragment is refused (nothing
//! reads one).
//!
//! Each event is one message, on the topic
//! `<prefix>/<key id>/<event type>/<endpoint>[/<resource path>]`:
//!
//! | event type | topic after the prefix |
//! | --- | --- |
//! | `notifications` | `<key id>/notifications/<endpoint>/<path>` (`/3/0/1` → `3/0/1`) |
//! | `registrations`, `reg-updates`, `de-registrations`, `registrations-expired` | `<key id>/<type>/<endpoint>` |
//! | `async-responses` | `<key id>/async-responses/<async id>` |
//! | `subscription-errors` | `<key id>/subscription-errors/<endpoint>/<path>` |
//!
//! Another type: `<key id>/<type>/<endpoint>[/<path>]` when its entry has `ep`, else
//! `<key id>/<type>`. The key id is the auth backend's id of the access key (what its key listing shows), never the
//! secret. A level taken from a name (key id, endpoint, async id, each level of a path) has
//! `/`, `+`, `#`, `%` and control characters percent-encoded, so a name cannot add levels or
//! wildcards. The payload is the event's entry of the mbed notification message, as JSON
//! text (the same object a webhook receives in the type's array).

use std::collections::BTreeMap;

use connectord_plugin_sdk::sink::redact_url;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde_json::value::RawValue;

/// Default MQTT port.
pub const MQTT_PORT: u16 = 1883;
/// Default MQTT over TLS port.
pub const MQTTS_PORT: u16 = 8883;
/// The topic prefix of a URL without a path.
pub const DEFAULT_PREFIX: &str = "connectord";

/// A parsed callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub tls: bool,
    /// A name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The topic prefix, without a leading or trailing `/`.
    pub prefix: String,
}

impl Broker {
    /// `host:port`, for messages (never the credentials).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What a topic level taken from a name may not hold as is.
const LEVEL: &AsciiSet = &CONTROLS.add(b'/').add(b'+').add(b'#').add(b'%');

/// Parses and checks a callback URL.
pub fn parse(url: &str) -> Result<Broker, String> {
    let invalid = |why: &str| format!("invalid MQTT callback URL {}: {why}", redact_url(url));
    let uri: http::Uri = url.parse().map_err(|e| invalid(&format!("{e}")))?;
    let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("mqtt") => false,
        Some("mqtts") => true,
        _ => return Err(invalid("the scheme must be mqtt or mqtts")),
    };
    if uri.query().is_some() || url.contains('#') {
        return Err(invalid(
            "a query or fragment is not used (the topic prefix is the path)",
        ));
    }
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let port = match authority.port_u16() {
        Some(0) => return Err(invalid("port 0")),
        Some(p) => p,
        None if tls => MQTTS_PORT,
        None => MQTT_PORT,
    };
    let decode = |s: &str, what: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| invalid(&format!("the {what} is not UTF-8 once percent-decoded")))
    };
    let (user, password) = match authority.as_str().rsplit_once('@') {
        None => (None, None),
        Some((userinfo, _)) => match userinfo.split_once(':') {
            Some((u, p)) => (Some(decode(u, "user")?), Some(decode(p, "password")?)),
            None => (Some(decode(userinfo, "user")?), None),
        },
    };
    let prefix = decode(uri.path().trim_matches('/'), "path")?;
    if prefix.contains(['+', '#', '\0']) {
        return Err(invalid(
            "the topic prefix (the path) must not hold the wildcards + and # or NUL",
        ));
    }
    let prefix = if prefix.is_empty() {
        DEFAULT_PREFIX.to_string()
    } else {
        prefix
    };
    Ok(Broker {
        tls,
        host: host.to_string(),
        port,
        user,
        password,
        prefix,
    })
}

/// One MQTT message: an event's topic and its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: String,
}

fn level(name: &str) -> String {
    utf8_percent_encode(name, LEVEL).to_string()
}

/// The levels of a resource path (`/3/0/1` → `3/0/1`), each encoded as a name.
fn path_levels(path: &str) -> String {
    let levels: Vec<String> = path.trim_start_matches('/').split('/').map(level).collect();
    levels.join("/")
}

/// The messages of one notification message (`{"notifications": [...], ...}`, the event
/// types in name order, each type's entries in the order they happened), in that order.
pub fn messages(prefix: &str, key_id: &str, body: &str) -> Result<Vec<Message>, String> {
    let groups: BTreeMap<String, Vec<Box<RawValue>>> = serde_json::from_str(body)
        .map_err(|e| format!("the notification message is not an object of arrays: {e}"))?;
    let key = level(key_id);
    let mut out = Vec::new();
    for (kind, entries) in &groups {
        for entry in entries {
            let text = entry.get();
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("bad {kind} entry: {e}"))?;
            let field = |name: &str| value.get(name).and_then(|v| v.as_str());
            let mut topic = format!("{prefix}/{key}/{}", level(kind));
            let name = match (&value, kind.as_str()) {
                (serde_json::Value::String(ep), _) => Some(ep.as_str()),
                (_, "async-responses") => field("id"),
                _ => field("ep"),
            };
            if let Some(name) = name {
                topic.push('/');
                topic.push_str(&level(name));
                if let Some(path) = field("path").filter(|_| kind != "async-responses") {
                    topic.push('/');
                    topic.push_str(&path_levels(path));
                }
            }
            out.push(Message {
                topic,
                payload: text.to_string(),
            });
        }
    }
    Ok(out)
}
