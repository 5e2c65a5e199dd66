//! LwM2M content formats ⇄ one JSON value tree. Pure: bytes and `serde_json::Value` in and
//! out, no I/O, nothing of HTTP or CoAP sockets (used by `requests`, `rest`, `simulate`).
//!
//! # The value tree
//!
//! The tree is relative to the requested path (`Lwm2mValueTree` in docs/openapi.json):
//!
//! | requested path           | tree                                                    |
//! |--------------------------|---------------------------------------------------------|
//! | resource `/3/0/0`        | the value itself: `"Open Mobile Alliance"`              |
//! | multi-instance `/3/0/7`  | `{"<resource instance id>": value}`: `{"0": 3800, "1": 5000}` |
//! | resource instance `/3/0/7/1` | the value itself: `5000`                            |
//! | object instance `/3/0`   | `{"<resource id>": value or multi-instance object}`     |
//! | object `/3`              | `{"<instance id>": {…object instance…}}`                |
//!
//! Values (leaves): string → JSON string; integer, unsigned integer and time → JSON integer;
//! float → JSON number (always written with a fraction or exponent, `22.0`); boolean →
//! `true`/`false`; objlnk → the string `"oid:iid"`; opaque → `{"base64": "<standard base64,
//! padded>"}`. Tree nodes only ever have decimal keys, so an object with a `base64` key is
//! always an opaque value. A resource read whose payload carries several resource
//! instances is a multi-instance resource (`{"0": …}`), one value is a single resource; a
//! payload mixing the two for one resource, naming a path outside the requested one, or
//! naming one path twice is a [`DecodeError`], as is any malformed input. Nothing here
//! panics on outside input; sizes are bounded by [`MAX_ENTRIES`] and [`MAX_CBOR_DEPTH`].
//!
//! # Types
//!
//! SenML, LwM2M JSON, LwM2M CBOR and CBOR carry their own types; numbers are also shaped
//! by the built-in table (`model`: the core objects 0–7 and the IPSO reusable resources),
//! so a float resource sent as `22` reads `22.0` whatever the format. TLV and text/plain
//! are untyped: the table decides, and a resource it does not know is read by this
//! heuristic: valid UTF-8 without control characters → string; else a length of 1, 2, 4
//! or 8 bytes → signed big-endian integer; else opaque. (So an unknown integer resource
//! whose bytes happen to be printable text, such as 100 = `"d"`, reads as a string: only
//! the table makes TLV exact.)
//!
//! Writing ([`encode`]) takes the type from the table, else from the JSON value: an integral
//! number → integer (TLV: the shortest of 1/2/4/8 bytes), any other number → float (TLV: 8
//! bytes), bool → boolean, string → string, `{"base64"}` → opaque. A value of the wrong
//! JSON type for a known resource (a string for `/3/0/13`) is an [`EncodeError`].
//! [`choose_write_format`] picks the format a device registered support for.
//!
//! # Formats
//!
//! Decoded: text/plain 0, octet-stream 42, CBOR 60, SenML JSON 110, SenML CBOR 112, LwM2M
//! TLV 11542 (1542), LwM2M JSON 11543 (1543, the LwM2M 1.0 `{"bn", "e": […]}` form), LwM2M
//! CBOR 11544 (LwM2M 1.2 nested maps keyed by absolute path components). Encoded: TLV,
//! SenML CBOR, SenML JSON, text/plain, octet-stream and CBOR (the last three for one
//! value). `decode(encode(tree)) == tree` for every encoded format, with the untyped
//! formats' limits above; SenML cannot carry an empty object instance or an empty
//! multi-instance resource, so encoding one is an error.

#![forbid(unsafe_code)]

mod model;
mod plain;
mod senml;
mod tlv;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use serde_json::{Map, Value};

/// Content-Format numbers this module knows.
pub mod format {
    pub const TEXT_PLAIN: u16 = 0;
    pub const OCTET_STREAM: u16 = 42;
    pub const CBOR: u16 = 60;
    pub const SENML_JSON: u16 = 110;
    pub const SENML_CBOR: u16 = 112;
    /// LwM2M 1.0's pre-registration number of TLV.
    pub const LEGACY_TLV: u16 = 1542;
    /// LwM2M 1.0's pre-registration number of LwM2M JSON.
    pub const LEGACY_LWM2M_JSON: u16 = 1543;
    pub const TLV: u16 = 11542;
    pub const LWM2M_JSON: u16 = 11543;
    pub const LWM2M_CBOR: u16 = 11544;
}

/// The formats [`decode`] reads.
pub const DECODES: &[u16] = &[
    format::TEXT_PLAIN,
    format::OCTET_STREAM,
    format::CBOR,
    format::SENML_JSON,
    format::SENML_CBOR,
    format::LEGACY_TLV,
    format::LEGACY_LWM2M_JSON,
    format::TLV,
    format::LWM2M_JSON,
    format::LWM2M_CBOR,
];

/// The formats [`encode`] writes.
pub const ENCODES: &[u16] = &[
    format::TEXT_PLAIN,
    format::OCTET_STREAM,
    format::CBOR,
    format::SENML_JSON,
    format::SENML_CBOR,
    format::LEGACY_TLV,
    format::TLV,
];

/// Most values (resources and resource instances) one payload may carry.
pub const MAX_ENTRIES: usize = 4096;
/// Deepest nesting of CBOR containers accepted (LwM2M CBOR needs 5: four path levels and
/// the value).
pub const MAX_CBOR_DEPTH: usize = 16;

/// An LwM2M path: object, instance, resource, resource instance (1 to 4 ids).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    ids: [u16; 4],
    len: u8,
}

/// A string that is not an LwM2M path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LwM2M path {text:?}: {reason}")]
pub struct PathError {
    text: String,
    reason: &'static str,
}

impl Path {
    /// A path of 1 to 4 ids.
    pub fn new(ids: &[u16]) -> Result<Path, PathError> {
        if ids.is_empty() || ids.len() > 4 {
            return Err(PathError {
                text: format!("{ids:?}"),
                reason: "it needs 1 to 4 ids",
            });
        }
        let mut p = Path {
            ids: [0; 4],
            len: 0,
        };
        for &id in ids {
            p.ids[usize::from(p.len)] = id;
            p.len += 1;
        }
        Ok(p)
    }

    /// `/3`, `/3/0`, `/3/0/7` or `/3/0/7/1`.
    pub fn parse(text: &str) -> Result<Path, PathError> {
        let err = |reason| PathError {
            text: text.to_owned(),
            reason,
        };
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| err("no leading '/'"))?;
        let mut ids = Vec::with_capacity(4);
        for seg in rest.split('/') {
            if ids.len() == 4 {
                return Err(err("more than 4 ids"));
            }
            if seg.is_empty() || !seg.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err("each id is a decimal number"));
            }
            ids.push(seg.parse::<u16>().map_err(|_| err("an id is over 65535"))?);
        }
        Path::new(&ids)
    }

    /// The ids, object first.
    pub fn ids(&self) -> &[u16] {
        &self.ids[..usize::from(self.len)]
    }

    /// 1 (object) to 4 (resource instance).
    pub fn depth(&self) -> usize {
        usize::from(self.len)
    }

    fn starts_with(&self, prefix: &Path) -> bool {
        self.ids().starts_with(prefix.ids())
    }

    fn child(&self, id: u16) -> Option<Path> {
        if self.len >= 4 {
            return None;
        }
        let mut p = *self;
        p.ids[usize::from(p.len)] = id;
        p.len += 1;
        Some(p)
    }

    /// The type of the resource this path names or lies in, when known.
    fn kind(&self) -> Option<model::Kind> {
        match self.ids() {
            [oid, _, rid, ..] => model::kind(*oid, *rid),
            _ => None,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for id in self.ids() {
            write!(f, "/{id}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Path({self})")
    }
}

impl FromStr for Path {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Path, PathError> {
        Path::parse(s)
    }
}

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("content format {0} is not one that LwM2M data is decoded from")]
    UnsupportedFormat(u16),
    /// The bytes are not valid in their format.
    #[error("malformed {format} payload: {message}")]
    Malformed {
        format: &'static str,
        message: String,
    },
    /// Well-formed, but not a tree of values under the requested path.
    #[error("{format} payload does not fit {requested}: {message}")]
    Shape {
        format: &'static str,
        requested: Path,
        message: String,
    },
    #[error("{format} payload has more than {MAX_ENTRIES} values")]
    TooManyValues { format: &'static str },
}

/// Why a tree could not be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("content format {0} is not one that LwM2M data is encoded to")]
    UnsupportedFormat(u16),
    /// The tree does not have the shape its path calls for.
    #[error("at {path}: {message}")]
    Shape { path: Path, message: String },
    /// The tree is fine but the format cannot carry it.
    #[error("{format} cannot carry this: {message}")]
    Unrepresentable {
        format: &'static str,
        message: String,
    },
    #[error("the tree has more than {MAX_ENTRIES} values")]
    TooManyValues,
}

/// One value, typed.
#[derive(Debug, Clone, PartialEq)]
enum Leaf {
    Str(String),
    Int(i64),
    /// Only for values over `i64::MAX`.
    Uint(u64),
    Float(f64),
    Bool(bool),
    Objlnk(u16, u16),
    Opaque(Vec<u8>),
}

impl Leaf {
    fn to_json(&self) -> Result<Value, String> {
        Ok(match self {
            Leaf::Str(s) => Value::String(s.clone()),
            Leaf::Int(i) => Value::from(*i),
            Leaf::Uint(u) => Value::from(*u),
            Leaf::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| format!("the float {f} has no JSON form"))?,
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::Objlnk(o, i) => Value::String(format!("{o}:{i}")),
            Leaf::Opaque(b) => {
                let mut m = Map::new();
                m.insert(
                    "base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                );
                Value::Object(m)
            }
        })
    }
}

/// A number as a format carries it, before the table shapes it.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Uint(u64),
    Float(f64),
}

impl Num {
    fn from_i128(v: i128) -> Option<Num> {
        if let Ok(i) = i64::try_from(v) {
            Some(Num::Int(i))
        } else {
            u64::try_from(v).ok().map(Num::Uint)
        }
    }

    fn from_json(n: &serde_json::Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Uint(u))
        } else {
            n.as_f64().map(Num::Float)
        }
    }
}

/// A number read from a typed format, shaped by the table: a float resource is always a
/// float, an integral float for an integer resource is an integer.
fn number_leaf(n: Num, kind: Option<model::Kind>) -> Leaf {
    use model::Kind;
    match (n, kind) {
        (Num::Int(i), Some(Kind::Float)) => Leaf::Float(i as f64),
        (Num::Uint(u), Some(Kind::Float)) => Leaf::Float(u as f64),
        (Num::Float(f), Some(Kind::Integer | Kind::Time | Kind::Unsigned))
            if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 =>
        {
            Leaf::Int(f as i64)
        }
        (Num::Int(i), _) => Leaf::Int(i),
        (Num::Uint(u), _) => Leaf::Uint(u),
        (Num::Float(f), _) => Leaf::Float(f),
    }
}

/// `"oid:iid"`.
fn parse_objlnk(s: &str) -> Option<Leaf> {
    let (o, i) = s.split_once(':')?;
    let ok = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !ok(o) || !ok(i) {
        return None;
    }
    Some(Leaf::Objlnk(o.parse().ok()?, i.parse().ok()?))
}

/// Base64 as clients write it: standard or URL-safe alphabet, padded or not.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 {
        return None;
    }
    if body.contains(['-', '_']) {
        URL_SAFE_NO_PAD.decode(body).ok()
    } else {
        STANDARD_NO_PAD.decode(body).ok()
    }
}

/// One value at its absolute path, or (`leaf: None`) an empty object, object instance or
/// multi-instance resource.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    path: Path,
    leaf: Option<Leaf>,
}

/// Entries collected by a decoder, bounded by [`MAX_ENTRIES`].
struct Entries {
    format: &'static str,
    list: Vec<Entry>,
}

impl Entries {
    fn new(format: &'static str) -> Entries {
        Entries {
            format,
            list: Vec::new(),
        }
    }

    fn push(&mut self, path: Path, leaf: Option<Leaf>) -> Result<(), DecodeError> {
        if self.list.len() >= MAX_ENTRIES {
            return Err(DecodeError::TooManyValues {
                format: self.format,
            });
        }
        self.list.push(Entry { path, leaf });
        Ok(())
    }

    fn malformed(&self, message: impl Into<String>) -> DecodeError {
        DecodeError::Malformed {
            format: self.format,
            message: message.into(),
        }
    }
}

/// The tree under the requested path, while it is built.
#[derive(Debug)]
enum Node {
    Leaf(Leaf),
    Branch(BTreeMap<u16, Node>),
}

/// Places `entries` under `requested`; the message says what does not fit. `None` when
/// there are no entries.
fn build(requested: &Path, entries: Vec<Entry>) -> Result<Option<Node>, String> {
    let mut root: Option<Node> = None;
    for e in entries {
        let depth = e.path.depth();
        match e.leaf {
            Some(_) if depth < 3 => {
                return Err(format!("a value at {}, which is not a resource", e.path));
            }
            None if depth > 3 => {
                return Err(format!("{} holds no value", e.path));
            }
            _ => {}
        }
        if !e.path.starts_with(requested) {
            return Err(format!("{} is not under the requested path", e.path));
        }
        let rel = e.path.ids().get(requested.depth()..).unwrap_or_default();
        insert(&mut root, rel, e.leaf).map_err(|m| format!("{}: {m}", e.path))?;
    }
    Ok(root)
}

fn insert(slot: &mut Option<Node>, rel: &[u16], leaf: Option<Leaf>) -> Result<(), &'static str> {
    let Some((&first, rest)) = rel.split_first() else {
        return match (slot.as_ref(), leaf) {
            (None, Some(l)) => {
                *slot = Some(Node::Leaf(l));
                Ok(())
            }
            (None, None) => {
                *slot = Some(Node::Branch(BTreeMap::new()));
                Ok(())
            }
            (Some(Node::Branch(_)), None) => Ok(()),
            (Some(Node::Leaf(_)), Some(_)) => Err("named twice"),
            _ => Err("both a single value and a container of values"),
        };
    };
    let map = match slot.get_or_insert_with(|| Node::Branch(BTreeMap::new())) {
        Node::Branch(m) => m,
        Node::Leaf(_) => return Err("both a single value and a container of values"),
    };
    let mut child = map.remove(&first);
    let r = insert(&mut child, rest, leaf);
    if let Some(c) = child {
        map.insert(first, c);
    }
    r
}

fn node_to_json(node: &Node) -> Result<Value, String> {
    match node {
        Node::Leaf(l) => l.to_json(),
        Node::Branch(m) => {
            let mut out = Map::new();
            for (id, child) in m {
                out.insert(id.to_string(), node_to_json(child)?);
            }
            Ok(Value::Object(out))
        }
    }
}

/// Human name of a format, for messages.
fn format_name(format: u16) -> &'static str {
    match format {
        format::TEXT_PLAIN => "text/plain",
        format::OCTET_STREAM => "application/octet-stream",
        format::CBOR => "CBOR",
        format::SENML_JSON => "SenML JSON",
        format::SENML_CBOR => "SenML CBOR",
        format::TLV | format::LEGACY_TLV => "LwM2M TLV",
        format::LWM2M_JSON | format::LEGACY_LWM2M_JSON => "LwM2M JSON",
        format::LWM2M_CBOR => "LwM2M CBOR",
        _ => "unknown",
    }
}

/// Reads a device's `payload` of Content-Format `content_format`, the answer to a request
/// on `requested`, as the value tree described in the module documentation.
pub fn decode(content_format: u16, payload: &[u8], requested: &Path) -> Result<Value, DecodeError> {
    let name = format_name(content_format);
    let mut entries = Entries::new(name);
    match content_format {
        format::TEXT_PLAIN | format::OCTET_STREAM | format::CBOR => {
            let leaf = plain::decode(content_format, payload, requested, &entries)?;
            entries.push(*requested, Some(leaf))?;
        }
        format::TLV | format::LEGACY_TLV => tlv::decode(payload, requested, &mut entries)?,
        format::SENML_JSON => senml::decode_senml_json(payload, &mut entries)?,
        format::SENML_CBOR => senml::decode_senml_cbor(payload, &mut entries)?,
        format::LWM2M_JSON | format::LEGACY_LWM2M_JSON => {
            senml::decode_lwm2m_json(payload, requested, &mut entries)?
        }
        format::LWM2M_CBOR => senml::decode_lwm2m_cbor(payload, &mut entries)?,
        other => return Err(DecodeError::UnsupportedFormat(other)),
    }
    let shape = |message: String| DecodeError::Shape {
        format: name,
        requested: *requested,
        message,
    };
    match build(requested, entries.list).map_err(shape)? {
        Some(node) => node_to_json(&node).map_err(shape),
        None if requested.depth() >= 3 => Err(shape("no value in the payload".into())),
        None => Ok(Value::Object(Map::new())),
    }
}

/// Writes `tree` (the value tree of `requested`, as [`decode`] returns it) in Content-Format
/// `format`, for a Write to the device.
pub fn encode(tree: &Value, requested: &Path, format: u16) -> Result<Vec<u8>, EncodeError> {
    if !ENCODES.contains(&format) {
        return Err(EncodeError::UnsupportedFormat(format));
    }
    let mut entries = Vec::new();
    flatten(tree, *requested, &mut entries)?;
    match format {
        format::TEXT_PLAIN | format::OCTET_STREAM | format::CBOR => {
            let leaf = match entries.as_slice() {
                [
                    Entry {
                        path,
                        leaf: Some(leaf),
                    },
                ] if path == requested => leaf,
                _ => {
                    return Err(EncodeError::Unrepresentable {
                        format: format_name(format),
                        message: "it carries one resource value, not a container".into(),
                    });
                }
            };
            plain::encode(format, leaf, requested)
        }
        format::TLV | format::LEGACY_TLV => {
            let root = build(requested, entries).map_err(|message| EncodeError::Shape {
                path: *requested,
                message,
            })?;
            tlv::encode(root.as_ref(), requested)
        }
        format::SENML_JSON => senml::encode_senml_json(&entries, requested),
        format::SENML_CBOR => senml::encode_senml_cbor(&entries, requested),
        other => Err(EncodeError::UnsupportedFormat(other)),
    }
}

/// The format to write to a device in: LwM2M 1.0 or an unknown version → TLV; 1.1 and later
/// → SenML CBOR if the device registered it, else TLV if it registered TLV or no formats at
/// all, else SenML JSON if registered, else TLV.
pub fn choose_write_format(lwm2m_version: Option<&str>, registered_formats: &[u16]) -> u16 {
    let at_least_1_1 = lwm2m_version
        .and_then(|v| {
            let mut parts = v.trim().split('.');
            let major = parts.next()?.parse::<u32>().ok()?;
            let minor = parts.next().unwrap_or("0").parse::<u32>().ok()?;
            Some((major, minor) >= (1, 1))
        })
        .unwrap_or(false);
    let has = |f: u16| registered_formats.contains(&f);
    if !at_least_1_1 {
        format::TLV
    } else if has(format::SENML_CBOR) {
        format::SENML_CBOR
    } else if registered_formats.is_empty() || has(format::TLV) || has(format::LEGACY_TLV) {
        format::TLV
    } else if has(format::SENML_JSON) {
        format::SENML_JSON
    } else {
        format::TLV
    }
}

/// The entries of `tree` at `path` (absolute), typed by the table or the JSON type.
fn flatten(tree: &Value, path: Path, out: &mut Vec<Entry>) -> Result<(), EncodeError> {
    let shape = |message: String| EncodeError::Shape { path, message };
    let is_value = !matches!(tree, Value::Object(m) if !m.contains_key("base64"));
    match path.depth() {
        3 | 4 if is_value => {
            if out.len() >= MAX_ENTRIES {
                return Err(EncodeError::TooManyValues);
            }
            out.push(Entry {
                path,
                leaf: Some(typed_leaf(tree, path)?),
            });
            Ok(())
        }
        4 => Err(shape(
            "a resource instance holds one value, not an object".into(),
        )),
        _ => {
            let Value::Object(map) = tree else {
                return Err(shape(format!(
                    "expected an object keyed by {} ids, got {}",
                    match path.depth() {
                        1 => "instance",
                        2 => "resource",
                        _ => "resource instance",
                    },
                    json_type(tree)
                )));
            };
            let mut children = Vec::with_capacity(map.len());
            for (k, v) in map {
                // Decimal as `decode` writes it: no sign, no leading zero.
                let id = k
                    .parse::<u16>()
                    .ok()
                    .filter(|id| id.to_string() == *k)
                    .ok_or_else(|| shape(format!("key {k:?} is not an id (0-65535)")))?;
                children.push((id, v));
            }
            children.sort_by_key(|&(id, _)| id);
            if children.is_empty() {
                out.push(Entry { path, leaf: None });
            }
            for (id, v) in children {
                let child = path.child(id).ok_or_else(|| shape("too deep".into()))?;
                flatten(v, child, out)?;
            }
            Ok(())
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The leaf a JSON value is for the resource at `path`.
fn typed_leaf(v: &Value, path: Path) -> Result<Leaf, EncodeError> {
    use model::Kind;
    let kind = path.kind();
    let wrong = |want: &str| EncodeError::Shape {
        path,
        message: format!("expected {want}, got {}", json_type(v)),
    };
    match (kind, v) {
        (Some(Kind::Execute), _) => Err(EncodeError::Shape {
            path,
            message: "an executable resource has no value to write".into(),
        }),
        (Some(Kind::String) | None, Value::String(s)) => Ok(Leaf::Str(s.clone())),
        (Some(Kind::Objlnk), Value::String(s)) => {
            parse_objlnk(s).ok_or_else(|| wrong("an object link \"oid:iid\""))
        }
        (Some(Kind::Boolean) | None, Value::Bool(b)) => Ok(Leaf::Bool(*b)),
        (Some(Kind::Integer | Kind::Time), Value::Number(n)) => {
            n.as_i64().map(Leaf::Int).ok_or_else(|| wrong("an integer"))
        }
        (Some(Kind::Unsigned), Value::Number(n)) => match n.as_u64() {
            Some(u) => Ok(i64::try_from(u).map_or(Leaf::Uint(u), Leaf::Int)),
            None => Err(wrong("an unsigned integer")),
        },
        (Some(Kind::Float), Value::Number(n)) => {
            n.as_f64().map(Leaf::Float).ok_or_else(|| wrong("a number"))
        }
        (None, Value::Number(n)) => match Num::from_json(n) {
            Some(num) => Ok(number_leaf(num, None)),
            None => Err(wrong("a number")),
        },
        (Some(Kind::Opaque) | None, Value::Object(m)) => match (m.len(), m.get("base64")) {
            (1, Some(Value::String(s))) => decode_base64(s)
                .map(Leaf::Opaque)
                .ok_or_else(|| wrong("{\"base64\": <valid base64>}")),
            _ => Err(wrong("{\"base64\": \"…\"} and no other member")),
        },
        (Some(Kind::String), _) => Err(wrong("a string")),
        (Some(Kind::Objlnk), _) => Err(wrong("an object link \"oid:iid\"")),
        (Some(Kind::Boolean), _) => Err(wrong("a boolean")),
        (Some(Kind::Integer | Kind::Time | Kind::Unsigned), _) => Err(wrong("an integer")),
        (Some(Kind::Float), _) => Err(wrong("a number")),
        (Some(Kind::Opaque), _) => Err(wrong("{\"base64\": \"…\"}")),
        (None, _) => Err(wrong("a string, number, boolean or {\"base64\": \"…\"}")),
    }
}

#[cfg(test)]
mod tests;
