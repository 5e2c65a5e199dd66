//! The one-value formats: text/plain (0), application/octet-stream (42), CBOR (60).

use base64::Engine as _;

use super::model::Kind;
use super::{
    DecodeError, EncodeError, Entries, Leaf, MAX_CBOR_DEPTH, Num, Path, decode_base64, format,
    format_name, number_leaf, parse_objlnk,
};

/// The value of the resource (instance) `requested`.
pub(super) fn decode(
    content_format: u16,
    payload: &[u8],
    requested: &Path,
    entries: &Entries,
) -> Result<Leaf, DecodeError> {
    if requested.depth() < 3 {
        return Err(DecodeError::Shape {
            format: format_name(content_format),
            requested: *requested,
            message: "this format carries one resource value; the path is not a resource".into(),
        });
    }
    let kind = requested.kind();
    match content_format {
        format::OCTET_STREAM => Ok(Leaf::Opaque(payload.to_vec())),
        format::CBOR => decode_cbor(payload, kind, entries),
        _ => decode_text(payload, kind, entries),
    }
}

fn decode_text(payload: &[u8], kind: Option<Kind>, e: &Entries) -> Result<Leaf, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|_| e.malformed("not UTF-8"))?;
    let number = |what: &str| e.malformed(format!("{text:?} is not {what}"));
    Ok(match kind {
        Some(Kind::Integer | Kind::Time) => {
            Leaf::Int(text.parse().map_err(|_| number("an integer"))?)
        }
        Some(Kind::Unsigned) => {
            let u: u64 = text.parse().map_err(|_| number("an unsigned integer"))?;
            i64::try_from(u).map_or(Leaf::Uint(u), Leaf::Int)
        }
        Some(Kind::Float) => {
            let f: f64 = text.parse().map_err(|_| number("a number"))?;
            if !f.is_finite() {
                return Err(number("a finite number"));
            }
            Leaf::Float(f)
        }
        Some(Kind::Boolean) => match text {
            "1" | "true" => Leaf::Bool(true),
            "0" | "false" => Leaf::Bool(false),
            _ => return Err(number("a boolean (0 or 1)")),
        },
        Some(Kind::Objlnk) => parse_objlnk(text).ok_or_else(|| number("an object link"))?,
        Some(Kind::Opaque) => Leaf::Opaque(decode_base64(text).ok_or_else(|| number("base64"))?),
        Some(Kind::String | Kind::Execute) | None => Leaf::Str(text.to_owned()),
    })
}

fn decode_cbor(payload: &[u8], kind: Option<Kind>, e: &Entries) -> Result<Leaf, DecodeError> {
    let value = read_cbor(payload).map_err(|m| e.malformed(m))?;
    cbor_leaf(value, kind).map_err(|m| e.malformed(m))
}

/// One CBOR item that is all of `payload`.
pub(super) fn read_cbor(payload: &[u8]) -> Result<ciborium::Value, String> {
    let mut rest = payload;
    let value: ciborium::Value =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_CBOR_DEPTH).map_err(
            |err| match err {
                ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
                ciborium::de::Error::Io(e) => format!("truncated CBOR ({e})"),
                ciborium::de::Error::Semantic(at, m) => match at {
                    Some(at) => format!("invalid CBOR at byte {at}: {m}"),
                    None => format!("invalid CBOR: {m}"),
                },
                ciborium::de::Error::RecursionLimitExceeded => {
                    format!("CBOR nested deeper than {MAX_CBOR_DEPTH}")
                }
            },
        )?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the CBOR item", rest.len()));
    }
    Ok(value)
}

/// A CBOR value as a leaf of a resource of `kind`.
pub(super) fn cbor_leaf(value: ciborium::Value, kind: Option<Kind>) -> Result<Leaf, String> {
    use ciborium::Value as C;
    Ok(match value {
        C::Integer(i) => {
            let n = Num::from_i128(i128::from(i))
                .ok_or_else(|| "an integer out of the 64-bit range".to_owned())?;
            number_leaf(n, kind)
        }
        C::Float(f) if f.is_finite() => number_leaf(Num::Float(f), kind),
        C::Float(f) => return Err(format!("the float {f} has no JSON form")),
        C::Text(s) if kind == Some(Kind::Objlnk) => {
            parse_objlnk(&s).ok_or_else(|| format!("{s:?} is not an object link"))?
        }
        C::Text(s) => Leaf::Str(s),
        C::Bytes(b) => Leaf::Opaque(b),
        C::Bool(b) => Leaf::Bool(b),
        // RFC 8949 tag 1: epoch-based time, a number like any other (so a float resource
        // still reads a float).
        C::Tag(1, inner) => match *inner {
            C::Integer(i) => number_leaf(
                Num::from_i128(i128::from(i)).ok_or_else(|| "a time out of range".to_owned())?,
                kind,
            ),
            _ => return Err("tag 1 (time) on something other than an integer".into()),
        },
        C::Tag(t, _) => return Err(format!("unsupported CBOR tag {t}")),
        C::Null => return Err("null is not a value".into()),
        C::Array(_) | C::Map(_) => return Err("an array or map where a value belongs".into()),
        _ => return Err("an unsupported CBOR item".into()),
    })
}

/// The CBOR item of a leaf.
pub(super) fn leaf_cbor(leaf: &Leaf) -> ciborium::Value {
    use ciborium::Value as C;
    match leaf {
        Leaf::Str(s) => C::Text(s.clone()),
        Leaf::Int(i) => C::Integer((*i).into()),
        Leaf::Uint(u) => C::Integer((*u).into()),
        Leaf::Float(f) => C::Float(*f),
        Leaf::Bool(b) => C::Bool(*b),
        Leaf::Objlnk(o, i) => C::Text(format!("{o}:{i}")),
        Leaf::Opaque(b) => C::Bytes(b.clone()),
    }
}

pub(super) fn write_cbor(value: &ciborium::Value) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| EncodeError::Unrepresentable {
        format: "CBOR",
        message: e.to_string(),
    })?;
    Ok(out)
}

pub(super) fn encode(format: u16, leaf: &Leaf, _requested: &Path) -> Result<Vec<u8>, EncodeError> {
    match format {
        format::OCTET_STREAM => match leaf {
            Leaf::Opaque(b) => Ok(b.clone()),
            Leaf::Str(s) => Ok(s.as_bytes().to_vec()),
            _ => Err(EncodeError::Unrepresentable {
                format: "application/octet-stream",
                message: "only opaque values and strings are bytes".into(),
            }),
        },
        format::CBOR => write_cbor(&leaf_cbor(leaf)),
        _ => Ok(match leaf {
            Leaf::Str(s) => s.clone(),
            Leaf::Int(i) => i.to_string(),
            Leaf::Uint(u) => u.to_string(),
            Leaf::Float(f) => format_float(*f),
            Leaf::Bool(b) => if *b { "1" } else { "0" }.to_owned(),
            Leaf::Objlnk(o, i) => format!("{o}:{i}"),
            Leaf::Opaque(b) => base64::engine::general_purpose::STANDARD.encode(b),
        }
        .into_bytes()),
    }
}

/// A float in text that reads back as the same float (Rust's shortest round-trip form).
fn format_float(f: f64) -> String {
    format!("{f:?}")
}
