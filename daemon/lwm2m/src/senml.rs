//! The self-describing formats: SenML JSON (110) and SenML CBOR (112) of RFC 8428 with the
//! LwM2M 1.1 `vlo` (object link) field, LwM2M JSON (11543, legacy 1543: the LwM2M 1.0
//! `{"bn", "e": [{"n", "v"|"sv"|"bv"|"ov"}]}` form) and LwM2M CBOR (11544: LwM2M 1.2
//! nested maps keyed by path components, absolute from the object id).

use base64::Engine as _;
use serde_json::{Map, Value};

use super::model::Kind;
use super::plain::{cbor_leaf, leaf_cbor, read_cbor, write_cbor};
use super::{
    DecodeError, EncodeError, Entries, Entry, Leaf, MAX_ENTRIES, Num, Path, decode_base64,
    number_leaf, parse_objlnk,
};

/// The value of one SenML record.
enum RecValue {
    Num(Num),
    Str(String),
    Bool(bool),
    Data(Vec<u8>),
    Objlnk(String),
}

/// One SenML record, the fields LwM2M uses.
#[derive(Default)]
struct Record {
    bn: Option<String>,
    n: Option<String>,
    bv: Option<Num>,
    value: Option<RecValue>,
}

impl Record {
    fn set_value(&mut self, v: RecValue, e: &Entries) -> Result<(), DecodeError> {
        if self.value.replace(v).is_some() {
            return Err(e.malformed("a record with more than one value field"));
        }
        Ok(())
    }
}

/// Resolves names (base name + name) and base values, and adds each record's value.
fn add_records(records: Vec<Record>, entries: &mut Entries) -> Result<(), DecodeError> {
    let mut base_name = String::new();
    let mut base_value: Option<Num> = None;
    for r in records {
        if let Some(bn) = r.bn {
            base_name = bn;
        }
        if let Some(bv) = r.bv {
            base_value = Some(bv);
        }
        let name = format!("{base_name}{}", r.n.as_deref().unwrap_or(""));
        let path = Path::parse(&name).map_err(|e| entries.malformed(e.to_string()))?;
        let kind = path.kind();
        let leaf = match r.value {
            None => return Err(entries.malformed(format!("the record of {path} has no value"))),
            Some(RecValue::Num(n)) => number_leaf(add_base(base_value, n), kind),
            Some(RecValue::Str(s)) => text_leaf(s, kind),
            Some(RecValue::Bool(b)) => Leaf::Bool(b),
            Some(RecValue::Data(d)) => Leaf::Opaque(d),
            Some(RecValue::Objlnk(s)) => parse_objlnk(&s)
                .ok_or_else(|| entries.malformed(format!("vlo {s:?} is not \"oid:iid\"")))?,
        };
        entries.push(path, Some(leaf))?;
    }
    Ok(())
}

/// A string value as a leaf: for an object link resource sent as a string (`vs`, LwM2M
/// JSON's `sv`, where `vlo`/`ov` were due), the link itself when the string is one, so
/// that the tree says `"1:63"` for `"01:63"` as it does from `vlo` (found by the
/// `lwm2m_decode` fuzz target: the tree changed on its way through SenML); any other
/// string as it is.
fn text_leaf(s: String, kind: Option<Kind>) -> Leaf {
    match kind {
        Some(Kind::Objlnk) => parse_objlnk(&s).unwrap_or(Leaf::Str(s)),
        _ => Leaf::Str(s),
    }
}

/// `bv + v` (RFC 8428 §4.5.2).
fn add_base(base: Option<Num>, v: Num) -> Num {
    let f = |n: Num| match n {
        Num::Int(i) => i as f64,
        Num::Uint(u) => u as f64,
        Num::Float(x) => x,
    };
    match (base, v) {
        (None, v) => v,
        (Some(Num::Int(a)), Num::Int(b)) => a
            .checked_add(b)
            .map_or(Num::Float(a as f64 + b as f64), Num::Int),
        (Some(b), v) => Num::Float(f(b) + f(v)),
    }
}

fn too_many(records: usize, e: &Entries) -> Result<(), DecodeError> {
    if records > MAX_ENTRIES {
        return Err(DecodeError::TooManyValues { format: e.format });
    }
    Ok(())
}

/// RFC 8428 §4.4: a field whose label ends in `_` must be understood.
fn must_understand(label: &str, e: &Entries) -> Result<(), DecodeError> {
    if label.ends_with('_') {
        return Err(e.malformed(format!("unsupported must-understand field {label:?}")));
    }
    Ok(())
}

pub(super) fn decode_senml_json(payload: &[u8], entries: &mut Entries) -> Result<(), DecodeError> {
    let root: Value =
        serde_json::from_slice(payload).map_err(|e| entries.malformed(e.to_string()))?;
    let Value::Array(items) = root else {
        return Err(entries.malformed("not an array of records"));
    };
    too_many(items.len(), entries)?;
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(fields) = item else {
            return Err(entries.malformed("a record that is not an object"));
        };
        let mut r = Record::default();
        for (label, v) in fields {
            let wrong = |what: &str| entries.malformed(format!("{label:?} must be {what}"));
            match (label.as_str(), v) {
                ("bn", Value::String(s)) => r.bn = Some(s),
                ("n", Value::String(s)) => r.n = Some(s),
                ("bv", Value::Number(n)) => r.bv = Num::from_json(&n),
                ("v", Value::Number(n)) => {
                    let n = Num::from_json(&n).ok_or_else(|| wrong("a number"))?;
                    r.set_value(RecValue::Num(n), entries)?;
                }
                ("vs", Value::String(s)) => r.set_value(RecValue::Str(s), entries)?,
                ("vb", Value::Bool(b)) => r.set_value(RecValue::Bool(b), entries)?,
                ("vd", Value::String(s)) => {
                    let d = decode_base64(&s).ok_or_else(|| wrong("base64"))?;
                    r.set_value(RecValue::Data(d), entries)?;
                }
                ("vlo", Value::String(s)) => r.set_value(RecValue::Objlnk(s), entries)?,
                ("bn" | "n" | "vs" | "vd" | "vlo", _) => return Err(wrong("a string")),
                ("bv" | "v", _) => return Err(wrong("a number")),
                ("vb", _) => return Err(wrong("a boolean")),
                (other, _) => must_understand(other, entries)?,
            }
        }
        records.push(r);
    }
    add_records(records, entries)
}

/// SenML CBOR labels (RFC 8428 §6).
const BN: i128 = -2;
const BV: i128 = -5;
const N: i128 = 0;
const V: i128 = 2;
const VS: i128 = 3;
const VB: i128 = 4;
const VD: i128 = 8;

pub(super) fn decode_senml_cbor(payload: &[u8], entries: &mut Entries) -> Result<(), DecodeError> {
    use ciborium::Value as C;
    let root = read_cbor(payload).map_err(|m| entries.malformed(m))?;
    let C::Array(items) = root else {
        return Err(entries.malformed("not an array of records"));
    };
    too_many(items.len(), entries)?;
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        let C::Map(fields) = item else {
            return Err(entries.malformed("a record that is not a map"));
        };
        let mut r = Record::default();
        for (label, v) in fields {
            let label = match label {
                C::Integer(i) => Ok(i128::from(i)),
                C::Text(t) => Err(t),
                _ => return Err(entries.malformed("a label that is neither integer nor text")),
            };
            let wrong = |what: &str| entries.malformed(format!("label {label:?} must be {what}"));
            let num = |v: C| match v {
                C::Integer(i) => Num::from_i128(i128::from(i)),
                C::Float(f) if f.is_finite() => Some(Num::Float(f)),
                _ => None,
            };
            match (&label, v) {
                (Ok(BN), C::Text(s)) => r.bn = Some(s),
                (Ok(N), C::Text(s)) => r.n = Some(s),
                (Ok(BV), v) => r.bv = Some(num(v).ok_or_else(|| wrong("a finite number"))?),
                (Ok(V), v) => {
                    let n = num(v).ok_or_else(|| wrong("a finite number"))?;
                    r.set_value(RecValue::Num(n), entries)?;
                }
                (Ok(VS), C::Text(s)) => r.set_value(RecValue::Str(s), entries)?,
                (Ok(VB), C::Bool(b)) => r.set_value(RecValue::Bool(b), entries)?,
                (Ok(VD), C::Bytes(d)) => r.set_value(RecValue::Data(d), entries)?,
                (Err(t), C::Text(s)) if t == "vlo" => r.set_value(RecValue::Objlnk(s), entries)?,
                (Ok(BN | N | VS), _) => return Err(wrong("a text string")),
                (Ok(VB), _) => return Err(wrong("a boolean")),
                (Ok(VD), _) => return Err(wrong("a byte string")),
                (Err(t), _) if t == "vlo" => return Err(wrong("a text string")),
                (Err(t), _) => must_understand(t, entries)?,
                // Other integer labels (times, units, sums, versions) are not needed.
                (Ok(_), _) => {}
            }
        }
        records.push(r);
    }
    add_records(records, entries)
}

pub(super) fn decode_lwm2m_json(
    payload: &[u8],
    requested: &Path,
    entries: &mut Entries,
) -> Result<(), DecodeError> {
    let root: Value =
        serde_json::from_slice(payload).map_err(|e| entries.malformed(e.to_string()))?;
    let Value::Object(mut root) = root else {
        return Err(entries.malformed("not an object"));
    };
    let base = match root.remove("bn") {
        Some(Value::String(s)) => s,
        None => format!("{requested}/"),
        Some(_) => return Err(entries.malformed("\"bn\" must be a string")),
    };
    let Some(Value::Array(items)) = root.remove("e") else {
        return Err(entries.malformed("no \"e\" array"));
    };
    too_many(items.len(), entries)?;
    for item in items {
        let Value::Object(mut fields) = item else {
            return Err(entries.malformed("an element of \"e\" that is not an object"));
        };
        let name = match fields.remove("n") {
            Some(Value::String(n)) if !n.is_empty() => format!("{base}{n}"),
            None | Some(Value::String(_)) => base.trim_end_matches('/').to_owned(),
            Some(_) => return Err(entries.malformed("\"n\" must be a string")),
        };
        let path = Path::parse(&name).map_err(|e| entries.malformed(e.to_string()))?;
        let kind = path.kind();
        let mut leaf = None;
        for (label, v) in fields {
            let wrong = |what: &str| entries.malformed(format!("{label:?} must be {what}"));
            let l = match (label.as_str(), v) {
                ("v", Value::Number(n)) => {
                    number_leaf(Num::from_json(&n).ok_or_else(|| wrong("a number"))?, kind)
                }
                // LwM2M 1.0 JSON carries opaque values as base64 strings.
                ("sv", Value::String(s)) if kind == Some(Kind::Opaque) => {
                    Leaf::Opaque(decode_base64(&s).ok_or_else(|| wrong("base64"))?)
                }
                ("sv", Value::String(s)) => text_leaf(s, kind),
                ("bv", Value::Bool(b)) => Leaf::Bool(b),
                ("ov", Value::String(s)) => {
                    parse_objlnk(&s).ok_or_else(|| wrong("an object link \"oid:iid\""))?
                }
                ("v", _) => return Err(wrong("a number")),
                ("sv" | "ov", _) => return Err(wrong("a string")),
                ("bv", _) => return Err(wrong("a boolean")),
                _ => continue,
            };
            if leaf.replace(l).is_some() {
                return Err(entries.malformed(format!("{path} has more than one value field")));
            }
        }
        let leaf = leaf.ok_or_else(|| entries.malformed(format!("{path} has no value")))?;
        entries.push(path, Some(leaf))?;
    }
    Ok(())
}

pub(super) fn decode_lwm2m_cbor(payload: &[u8], entries: &mut Entries) -> Result<(), DecodeError> {
    let root = read_cbor(payload).map_err(|m| entries.malformed(m))?;
    match root {
        ciborium::Value::Map(pairs) => lwm2m_cbor_map(pairs, &[], entries),
        _ => Err(entries.malformed("not a map")),
    }
}

fn lwm2m_cbor_map(
    pairs: Vec<(ciborium::Value, ciborium::Value)>,
    prefix: &[u16],
    entries: &mut Entries,
) -> Result<(), DecodeError> {
    use ciborium::Value as C;
    let id = |v: &C| match v {
        C::Integer(i) => u16::try_from(i128::from(*i)).ok(),
        _ => None,
    };
    for (key, value) in pairs {
        let mut ids = prefix.to_vec();
        match &key {
            C::Array(parts) if !parts.is_empty() => {
                for p in parts {
                    ids.push(
                        id(p).ok_or_else(|| entries.malformed("a key part that is not an id"))?,
                    );
                }
            }
            k => ids.push(id(k).ok_or_else(|| entries.malformed("a key that is not an id"))?),
        }
        let path = Path::new(&ids)
            .map_err(|_| entries.malformed(format!("a path of {} ids", ids.len())))?;
        match value {
            C::Map(inner) if inner.is_empty() => entries.push(path, None)?,
            C::Map(inner) => lwm2m_cbor_map(inner, &ids, entries)?,
            v => {
                let leaf = cbor_leaf(v, path.kind())
                    .map_err(|m| entries.malformed(format!("{path}: {m}")))?;
                entries.push(path, Some(leaf))?;
            }
        }
    }
    Ok(())
}

/// Names of `entries` relative to `requested`: `(base name, [(name, leaf)])`, SenML cannot
/// carry an empty container.
fn named<'a>(
    entries: &'a [Entry],
    requested: &Path,
    format: &'static str,
) -> Result<Vec<(String, &'a Leaf)>, EncodeError> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Some(leaf) = &e.leaf else {
            return Err(EncodeError::Unrepresentable {
                format,
                message: format!("{} is empty, and SenML has no record for that", e.path),
            });
        };
        let rel: String = e
            .path
            .ids()
            .get(requested.depth()..)
            .unwrap_or_default()
            .iter()
            .map(|id| format!("/{id}"))
            .collect();
        out.push((rel, leaf));
    }
    if out.is_empty() {
        return Err(EncodeError::Unrepresentable {
            format,
            message: "there is no value to write".into(),
        });
    }
    Ok(out)
}

pub(super) fn encode_senml_json(
    entries: &[Entry],
    requested: &Path,
) -> Result<Vec<u8>, EncodeError> {
    let mut records = Vec::new();
    for (i, (rel, leaf)) in named(entries, requested, "SenML JSON")?
        .into_iter()
        .enumerate()
    {
        let mut r = Map::new();
        if i == 0 {
            r.insert("bn".into(), Value::String(requested.to_string()));
        }
        if !rel.is_empty() {
            r.insert("n".into(), Value::String(rel));
        }
        let (label, v) = match leaf {
            Leaf::Int(n) => ("v", Value::from(*n)),
            Leaf::Uint(n) => ("v", Value::from(*n)),
            Leaf::Float(f) => (
                "v",
                serde_json::Number::from_f64(*f)
                    .map(Value::Number)
                    .ok_or_else(|| EncodeError::Unrepresentable {
                        format: "SenML JSON",
                        message: format!("the float {f}"),
                    })?,
            ),
            Leaf::Str(s) => ("vs", Value::String(s.clone())),
            Leaf::Bool(b) => ("vb", Value::Bool(*b)),
            Leaf::Objlnk(o, i) => ("vlo", Value::String(format!("{o}:{i}"))),
            Leaf::Opaque(d) => (
                "vd",
                Value::String(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)),
            ),
        };
        r.insert(label.into(), v);
        records.push(Value::Object(r));
    }
    serde_json::to_vec(&Value::Array(records)).map_err(|e| EncodeError::Unrepresentable {
        format: "SenML JSON",
        message: e.to_string(),
    })
}

pub(super) fn encode_senml_cbor(
    entries: &[Entry],
    requested: &Path,
) -> Result<Vec<u8>, EncodeError> {
    use ciborium::Value as C;
    let label = |l: i128| C::Integer(i64::try_from(l).unwrap_or(0).into());
    let mut records = Vec::new();
    for (i, (rel, leaf)) in named(entries, requested, "SenML CBOR")?
        .into_iter()
        .enumerate()
    {
        let mut r = Vec::new();
        if i == 0 {
            r.push((label(BN), C::Text(requested.to_string())));
        }
        if !rel.is_empty() {
            r.push((label(N), C::Text(rel)));
        }
        let value = leaf_cbor(leaf);
        r.push(match leaf {
            Leaf::Int(_) | Leaf::Uint(_) | Leaf::Float(_) => (label(V), value),
            Leaf::Str(_) => (label(VS), value),
            Leaf::Bool(_) => (label(VB), value),
            Leaf::Objlnk(..) => (C::Text("vlo".into()), value),
            Leaf::Opaque(_) => (label(VD), value),
        });
        records.push(C::Map(r));
    }
    write_cbor(&C::Array(records))
}
