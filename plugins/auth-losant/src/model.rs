//! Application keys: the record kept in the host's state, the JSON the API shows, the
//! request bodies that create and change keys, and the mapping of a key's device filter
//! and topics onto the core's `allow` patterns.

use crate::time::format_ms;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Longest description, in characters (the seed's schema).
pub const MAX_DESCRIPTION: usize = 32_767;
/// Most device ids one key may list.
pub const MAX_DEVICE_IDS: usize = 1000;
/// Most device tags one key may list.
pub const MAX_DEVICE_TAGS: usize = 100;
/// Longest tag key or value, in characters.
pub const MAX_TAG_LEN: usize = 255;
/// Longest topic, in characters.
pub const MAX_TOPIC_LEN: usize = 1024;
/// The device tag whose value names connectord endpoints (an endpoint-name glob).
pub const ENDPOINT_TAG: &str = "endpoint";
/// The first topic level under which topics name connectord endpoints and resources.
pub const ENDPOINT_TOPIC_ROOT: &str = "ep";

/// The fields a `PATCH …/keys/{APPLICATION_KEY_ID}` body may hold: `status`, then the
/// [`POST_FIELDS`].
pub const PATCH_FIELDS: &[&str] = &[
    "status",
    "description",
    "deviceIds",
    "deviceTags",
    "filterType",
    "pubTopics",
    "subTopics",
];
/// The fields a `POST /applications/{APPLICATION_ID}/keys` body may hold: those of a
/// PATCH but `status` (a new key is always active).
pub const POST_FIELDS: &[&str] = PATCH_FIELDS.split_at(1).1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Inactive,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Inactive => "inactive",
        }
    }
}

/// Which devices may use a key (Losant's `filterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterType {
    /// Every device.
    All,
    /// Only the listed devices.
    Whitelist,
    /// Every device but the listed ones.
    Blacklist,
    /// No device (the key only reaches its topics).
    None,
}

impl FilterType {
    pub fn as_str(self) -> &'static str {
        match self {
            FilterType::All => "all",
            FilterType::Whitelist => "whitelist",
            FilterType::Blacklist => "blacklist",
            FilterType::None => "none",
        }
    }

    fn parse(s: &str) -> Option<FilterType> {
        [
            FilterType::All,
            FilterType::Whitelist,
            FilterType::Blacklist,
            FilterType::None,
        ]
        .into_iter()
        .find(|f| f.as_str() == s)
    }
}

/// A device tag filter entry: a key, and optionally the value it must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// One application key as stored (`key/<id>` in the host state). It holds the SHA-256 of
/// the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    /// 24 lower-case hex characters.
    pub id: String,
    pub application_id: String,
    /// The public half of the credential (a random UUID-shaped string).
    pub key: String,
    /// SHA-256 of the secret, lower-case hex.
    pub secret_hash: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub device_ids: Vec<String>,
    #[serde(default)]
    pub device_tags: Vec<Tag>,
    pub filter_type: FilterType,
    #[serde(default)]
    pub pub_topics: Vec<String>,
    #[serde(default)]
    pub sub_topics: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub creation_date: u64,
    pub last_updated: u64,
}

impl KeyRecord {
    /// The key as the API shows it (the seed's Application Key schema; never the secret).
    /// `deviceIds` and `deviceTags` appear only when non-empty, `description` only when set.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("applicationKeyId".into(), json!(self.id));
        m.insert("applicationId".into(), json!(self.application_id));
        m.insert("creationDate".into(), json!(format_ms(self.creation_date)));
        m.insert("lastUpdated".into(), json!(format_ms(self.last_updated)));
        m.insert("key".into(), json!(self.key));
        m.insert("status".into(), json!(self.status.as_str()));
        if let Some(d) = &self.description {
            m.insert("description".into(), json!(d));
        }
        if !self.device_ids.is_empty() {
            m.insert("deviceIds".into(), json!(self.device_ids));
        }
        if !self.device_tags.is_empty() {
            m.insert(
                "deviceTags".into(),
                serde_json::to_value(&self.device_tags).unwrap_or(Value::Null),
            );
        }
        m.insert("filterType".into(), json!(self.filter_type.as_str()));
        m.insert("pubTopics".into(), json!(self.pub_topics));
        m.insert("subTopics".into(), json!(self.sub_topics));
        Value::Object(m)
    }

    /// Applies the fields a validated body sets.
    pub fn apply(&mut self, f: KeyFields) {
        if let Some(s) = f.status {
            self.status = s;
        }
        if let Some(d) = f.description {
            self.description = Some(d);
        }
        if let Some(v) = f.device_ids {
            self.device_ids = v;
        }
        if let Some(v) = f.device_tags {
            self.device_tags = v;
        }
        if let Some(v) = f.filter_type {
            self.filter_type = v;
        }
        if let Some(v) = f.pub_topics {
            self.pub_topics = v;
        }
        if let Some(v) = f.sub_topics {
            self.sub_topics = v;
        }
    }
}

/// The settable fields of a key, each `Some` when a request body sets it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyFields {
    pub status: Option<Status>,
    pub description: Option<String>,
    pub device_ids: Option<Vec<String>>,
    pub device_tags: Option<Vec<Tag>>,
    pub filter_type: Option<FilterType>,
    pub pub_topics: Option<Vec<String>>,
    pub sub_topics: Option<Vec<String>>,
}

pub fn is_object_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_tag_key(s: &str) -> bool {
    (1..=MAX_TAG_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads a key body: a JSON object (an empty body counts as `{}`) holding only `allowed`
/// fields, each valid. `Err` is the message of a 400 `Validation` error.
pub fn parse_body(body: &str, allowed: &[&str]) -> Result<KeyFields, String> {
    let value: Value = if body.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(body).map_err(|e| format!("body is not valid JSON: {e}"))?
    };
    let Value::Object(fields) = value else {
        return Err("body must be a JSON object".into());
    };
    let mut out = KeyFields::default();
    for (name, v) in &fields {
        if !allowed.contains(&name.as_str()) {
            return Err(format!("\"{name}\" is not allowed"));
        }
        match name.as_str() {
            "status" => {
                out.status = Some(match v.as_str() {
                    Some("active") => Status::Active,
                    Some("inactive") => Status::Inactive,
                    _ => return Err("\"status\" must be one of active, inactive".into()),
                })
            }
            "description" => {
                let Some(s) = v.as_str() else {
                    return Err("\"description\" must be a string".into());
                };
                if s.chars().count() > MAX_DESCRIPTION {
                    return Err(format!(
                        "\"description\" must be at most {MAX_DESCRIPTION} characters long"
                    ));
                }
                out.description = Some(s.to_string());
            }
            "filterType" => {
                out.filter_type = Some(v.as_str().and_then(FilterType::parse).ok_or(
                    "\"filterType\" must be one of all, whitelist, blacklist, none".to_string(),
                )?)
            }
            "deviceIds" => out.device_ids = Some(parse_device_ids(v)?),
            "deviceTags" => out.device_tags = Some(parse_device_tags(v)?),
            "pubTopics" | "subTopics" => {
                let topics = parse_topics(name, v)?;
                if name == "pubTopics" {
                    out.pub_topics = Some(topics);
                } else {
                    out.sub_topics = Some(topics);
                }
            }
            _ => return Err(format!("\"{name}\" is not allowed")),
        }
    }
    Ok(out)
}

/// The field `name`'s array, of at most `most` items when given, each parsed by `item`
/// with its index.
fn parse_array<T>(
    name: &str,
    v: &Value,
    most: Option<usize>,
    item: impl Fn(usize, &Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let Some(items) = v.as_array() else {
        return Err(format!("\"{name}\" must be an array"));
    };
    if let Some(most) = most.filter(|most| items.len() > *most) {
        return Err(format!("\"{name}\" must hold at most {most} items"));
    }
    items.iter().enumerate().map(|(i, v)| item(i, v)).collect()
}

fn parse_device_ids(v: &Value) -> Result<Vec<String>, String> {
    parse_array("deviceIds", v, Some(MAX_DEVICE_IDS), |i, item| {
        match item.as_str() {
            Some(s) if is_object_id(s) => Ok(s.to_ascii_lowercase()),
            _ => Err(format!(
                "\"deviceIds[{i}]\" must be an id of 24 hexadecimal characters"
            )),
        }
    })
}

fn parse_device_tags(v: &Value) -> Result<Vec<Tag>, String> {
    parse_array("deviceTags", v, Some(MAX_DEVICE_TAGS), parse_device_tag)
}

fn parse_device_tag(i: usize, item: &Value) -> Result<Tag, String> {
    let Some(obj) = item.as_object() else {
        return Err(format!("\"deviceTags[{i}]\" must be an object"));
    };
    if let Some(extra) = obj.keys().find(|k| *k != "key" && *k != "value") {
        return Err(format!("\"deviceTags[{i}].{extra}\" is not allowed"));
    }
    let key = match obj.get("key").and_then(Value::as_str) {
        Some(k) if is_tag_key(k) => k.to_string(),
        _ => {
            return Err(format!(
                "\"deviceTags[{i}].key\" must be 1 to {MAX_TAG_LEN} letters, digits, _ or -"
            ));
        }
    };
    let value = match obj.get("value") {
        None => None,
        Some(Value::String(s)) if (1..=MAX_TAG_LEN).contains(&s.chars().count()) => Some(s.clone()),
        Some(_) => {
            return Err(format!(
                "\"deviceTags[{i}].value\" must be a string of 1 to {MAX_TAG_LEN} characters"
            ));
        }
    };
    if key == ENDPOINT_TAG && value.as_deref().is_some_and(|v| v.contains('/')) {
        return Err(format!(
            "\"deviceTags[{i}].value\": an {ENDPOINT_TAG} tag names endpoints and may not contain /"
        ));
    }
    Ok(Tag { key, value })
}

fn parse_topics(name: &str, v: &Value) -> Result<Vec<String>, String> {
    parse_array(name, v, None, |i, item| {
        let Some(t) = item.as_str() else {
            return Err(format!("\"{name}[{i}]\" must be a string"));
        };
        check_topic(t).map_err(|why| format!("\"{name}[{i}]\" {why}"))?;
        Ok(t.to_string())
    })
}

/// Is `t` an acceptable topic filter: 1 to 1024 characters, no NUL, MQTT wildcards used
/// as MQTT allows (`+` alone in a level, `#` alone in the last level), and no `*` under
/// `ep/` (connectord would read it as a glob)?
pub fn check_topic(t: &str) -> Result<(), String> {
    let len = t.chars().count();
    if !(1..=MAX_TOPIC_LEN).contains(&len) {
        return Err(format!("must be 1 to {MAX_TOPIC_LEN} characters long"));
    }
    if t.contains('\0') {
        return Err("may not contain NUL".into());
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("may use # only as the whole last level".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("may use + only as a whole level".into());
        }
    }
    if levels[0] == ENDPOINT_TOPIC_ROOT && t.contains('*') {
        return Err(format!(
            "may not contain * under {ENDPOINT_TOPIC_ROOT}/ (use the MQTT wildcards + and #)"
        ));
    }
    Ok(())
}

/// The core's `allow` patterns for a key (see the crate documentation for the rules):
/// `Ok(None)` for no restriction, `Ok(Some(patterns))` for a restriction (possibly to
/// nothing at all), `Err(why)` when the key's filter cannot be enforced (a non-empty
/// blacklist: the core's patterns cannot exclude).
pub fn allow_patterns(rec: &KeyRecord) -> Result<Option<Vec<String>>, String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |p: String| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    match rec.filter_type {
        FilterType::All => return Ok(None),
        FilterType::Blacklist => {
            if rec.device_ids.is_empty() && rec.device_tags.is_empty() {
                return Ok(None);
            }
            return Err(
                "this application key's blacklist device filter cannot be enforced by connectord"
                    .into(),
            );
        }
        FilterType::Whitelist => {
            for id in &rec.device_ids {
                push(id.clone());
            }
            for tag in &rec.device_tags {
                if tag.key == ENDPOINT_TAG {
                    push(tag.value.clone().unwrap_or_else(|| "*".into()));
                }
            }
        }
        FilterType::None => {}
    }
    for topic in rec.pub_topics.iter().chain(&rec.sub_topics) {
        for p in topic_patterns(topic) {
            push(p);
        }
    }
    Ok(Some(out))
}

/// The allow patterns one topic stands for: none unless it starts with `ep/`; then the
/// second level is the endpoint name and the rest the resource path, with `+` read as `*`
/// and a final `#` as "this level and everything below".
pub fn topic_patterns(topic: &str) -> Vec<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.len() < 2 || levels[0] != ENDPOINT_TOPIC_ROOT || levels[1].is_empty() {
        return Vec::new();
    }
    let endpoint = match levels[1] {
        "+" => "*",
        "#" => return vec!["*".to_string()],
        name => name,
    };
    let rest: Vec<&str> = levels[2..]
        .iter()
        .map(|l| if *l == "+" { "*" } else { l })
        .collect();
    match rest.split_last() {
        // `ep/<e>` and `ep/<e>/#`: the endpoint and every resource of it.
        None => vec![endpoint.to_string()],
        Some((&"#", [])) => vec![endpoint.to_string()],
        Some((&"#", base)) => {
            let base = base.join("/");
            vec![format!("{endpoint}/{base}"), format!("{endpoint}/{base}/*")]
        }
        Some(_) => vec![format!("{endpoint}/{}", rest.join("/"))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(filter_type: FilterType) -> KeyRecord {
        KeyRecord {
            id: "5f1e0c2a0000000000000001".into(),
            application_id: "5f1e0c2a00000000000000aa".into(),
            key: "k".into(),
            secret_hash: "00".into(),
            status: Status::Active,
            description: None,
            device_ids: vec![],
            device_tags: vec![],
            filter_type,
            pub_topics: vec![],
            sub_topics: vec![],
            creation_date: 0,
            last_updated: 0,
        }
    }

    #[test]
    fn topic_pattern_table() {
        let cases: &[(&str, &[&str])] = &[
            ("ep/sensor-1/3303/#", &["sensor-1/3303", "sensor-1/3303/*"]),
            ("ep/sensor-1/3303/0/5700", &["sensor-1/3303/0/5700"]),
            ("ep/sensor-1/+/0/5700", &["sensor-1/*/0/5700"]),
            ("ep/+/3303/+/5700", &["*/3303/*/5700"]),
            ("ep/+/3303/#", &["*/3303", "*/3303/*"]),
            ("ep/sensor-1", &["sensor-1"]),
            ("ep/sensor-1/#", &["sensor-1"]),
            ("ep/+", &["*"]),
            ("ep/#", &["*"]),
            ("ep/+/#", &["*"]),
            ("ep", &[]),
            ("ep/", &[]),
            ("other/sensor-1/3303", &[]),
            ("#", &[]),
            ("+/sensor-1/3303", &[]),
            ("losant/5f1e0c2a0000000000000001/state", &[]),
        ];
        for (topic, want) in cases {
            assert_eq!(topic_patterns(topic), *want, "{topic}");
        }
    }

    #[test]
    fn allow_pattern_table() {
        let id = "5f1e0c2a0000000000000abc".to_string();
        let tag = |k: &str, v: Option<&str>| Tag {
            key: k.into(),
            value: v.map(String::from),
        };
        type Case = (
            &'static str,
            KeyRecord,
            Result<Option<Vec<&'static str>>, ()>,
        );
        let mut cases: Vec<Case> = Vec::new();

        let mut all = record(FilterType::All);
        all.pub_topics = vec!["ep/a/1/#".into()];
        cases.push(("all ignores topics", all, Ok(None)));

        cases.push((
            "empty blacklist is all",
            record(FilterType::Blacklist),
            Ok(None),
        ));
        let mut bl = record(FilterType::Blacklist);
        bl.device_ids = vec![id.clone()];
        cases.push(("non-empty blacklist", bl, Err(())));

        let mut wl = record(FilterType::Whitelist);
        wl.device_ids = vec![id.clone()];
        wl.device_tags = vec![
            tag("endpoint", Some("sensor-*")),
            tag("floor", Some("8")),
            tag("endpoint", None),
        ];
        wl.sub_topics = vec!["ep/gw-1/3303/#".into(), "other/x".into()];
        wl.pub_topics = vec!["ep/gw-1/3311/0/5850".into(), "ep/gw-1/3303/#".into()];
        cases.push((
            "whitelist",
            wl,
            Ok(Some(vec![
                "5f1e0c2a0000000000000abc",
                "sensor-*",
                "*",
                "gw-1/3311/0/5850",
                "gw-1/3303",
                "gw-1/3303/*",
            ])),
        ));

        cases.push((
            "empty whitelist",
            record(FilterType::Whitelist),
            Ok(Some(vec![])),
        ));
        let mut none = record(FilterType::None);
        none.device_ids = vec![id];
        none.sub_topics = vec!["ep/+/3303/0/5700".into()];
        cases.push(("none: topics only", none, Ok(Some(vec!["*/3303/0/5700"]))));

        for (what, rec, want) in cases {
            let got = allow_patterns(&rec).map_err(|_| ());
            let want = want.map(|o| o.map(|v| v.iter().map(|s| s.to_string()).collect()));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn topic_check_table() {
        let ok = [
            "a",
            "a/b/c",
            "ep/sensor-1/3303/#",
            "ep/+/3303/+/5700",
            "#",
            "+",
            "/",
            "a//b",
            "other/*/x",
        ];
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        let bad = [
            "",
            long.as_str(),
            "a/#/b",
            "a#",
            "a/b#",
            "a+/b",
            "a/+b",
            "ep/s*/3303",
            "ep/s/3303/*",
            "a\0b",
        ];
        for (topics, valid) in [(&ok[..], true), (&bad[..], false)] {
            for t in topics {
                assert_eq!(check_topic(t).is_ok(), valid, "{t:?}");
            }
        }
    }

    #[test]
    fn body_parsing_accepts_schema_and_normalizes_ids() {
        let f = parse_body(
            r#"{"description":"d","filterType":"whitelist","deviceIds":["ABCDEF0123456789abcdef01"],
                "deviceTags":[{"key":"endpoint","value":"s-*"},{"key":"floor"}],
                "pubTopics":["ep/a/1/#"],"subTopics":[]}"#,
            POST_FIELDS,
        )
        .unwrap();
        assert_eq!(f.description.as_deref(), Some("d"));
        assert_eq!(f.filter_type, Some(FilterType::Whitelist));
        assert_eq!(
            f.device_ids,
            Some(vec!["abcdef0123456789abcdef01".to_string()])
        );
        assert_eq!(f.device_tags.as_ref().unwrap().len(), 2);
        assert_eq!(f.device_tags.as_ref().unwrap()[1].value, None);
        assert_eq!(f.sub_topics, Some(vec![]));
        assert_eq!(parse_body("", POST_FIELDS).unwrap(), KeyFields::default());
        assert_eq!(parse_body("  ", POST_FIELDS).unwrap(), KeyFields::default());
        // status is a PATCH field only.
        assert!(parse_body(r#"{"status":"inactive"}"#, POST_FIELDS).is_err());
        assert_eq!(
            parse_body(r#"{"status":"inactive"}"#, PATCH_FIELDS)
                .unwrap()
                .status,
            Some(Status::Inactive)
        );
    }

    #[test]
    fn to_json_shape() {
        let mut r = record(FilterType::All);
        r.creation_date = 1_465_790_400_000;
        r.last_updated = 1_465_790_400_000;
        let v = r.to_json();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "id",
            "applicationKeyId",
            "applicationId",
            "creationDate",
            "lastUpdated",
            "key",
            "status",
            "filterType",
            "pubTopics",
            "subTopics",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["creationDate"], "2016-06-13T04:00:00.000Z");
        assert!(v.get("secret").is_none());
        assert!(v.get("secretHash").is_none());
    }
}
