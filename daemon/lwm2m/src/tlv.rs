//! LwM2M TLV (11542, legacy 1542), OMA-TS-LightweightM2M-V1_0 §6.4.3.
//!
//! Each TLV: a type byte (bits 7–6: object instance 00, resource instance 01, multiple
//! resource 10, resource with value 11; bit 5: 16-bit identifier; bits 4–3: length field
//! of 0–3 bytes; bits 2–0: the length itself when that field is absent), the identifier,
//! the length, the value. Values are typed by the table (`model`), else by the heuristic
//! of the module documentation.

use std::collections::BTreeMap;

use super::model::{self, Kind};
use super::{DecodeError, EncodeError, Entries, Leaf, Node, Path};

const OBJECT_INSTANCE: u8 = 0;
const RESOURCE_INSTANCE: u8 = 1;
const MULTIPLE_RESOURCE: u8 = 2;
const RESOURCE: u8 = 3;

/// Longest value a TLV length field (3 bytes) can give.
const MAX_LEN: usize = 0xFF_FFFF;

struct Tlv<'a> {
    kind: u8,
    id: u16,
    value: &'a [u8],
}

/// Splits `bytes` into its TLVs.
fn parse<'a>(mut bytes: &'a [u8], e: &Entries) -> Result<Vec<Tlv<'a>>, DecodeError> {
    let total = bytes.len();
    let mut out = Vec::new();
    while let Some((&t, rest)) = bytes.split_first() {
        let at = total - bytes.len();
        let short = || e.malformed(format!("TLV at byte {at} is cut short"));
        let id_len = if t & 0x20 != 0 { 2 } else { 1 };
        let len_len = usize::from((t >> 3) & 0x3);
        let (id_bytes, rest) = rest.split_at_checked(id_len).ok_or_else(short)?;
        let id = id_bytes
            .iter()
            .fold(0u16, |acc, &b| (acc << 8) | u16::from(b));
        let (len, rest) = if len_len == 0 {
            (usize::from(t & 0x7), rest)
        } else {
            let (len_bytes, rest) = rest.split_at_checked(len_len).ok_or_else(short)?;
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        };
        let (value, rest) = rest.split_at_checked(len).ok_or_else(short)?;
        if out.len() >= super::MAX_ENTRIES {
            return Err(DecodeError::TooManyValues { format: e.format });
        }
        out.push(Tlv {
            kind: t >> 6,
            id,
            value,
        });
        bytes = rest;
    }
    Ok(out)
}

/// Entries of the TLV payload answering a request on `requested`.
pub(super) fn decode(
    payload: &[u8],
    requested: &Path,
    entries: &mut Entries,
) -> Result<(), DecodeError> {
    let ids = requested.ids();
    let at = |ids: &[u16]| Path::new(ids).map_err(|e| entries_err(e.to_string()));
    for tlv in parse(payload, entries)? {
        match (requested.depth(), tlv.kind) {
            // An object: its instances; an object instance: the instance wrapped in its own
            // TLV (its id must be the requested one), or its resources (below).
            (1 | 2, OBJECT_INSTANCE) => {
                let inst = at(&[ids[0], tlv.id])?;
                instance(tlv.value, inst, entries)?;
            }
            (2, RESOURCE | MULTIPLE_RESOURCE) => {
                resource(&tlv, *requested, entries)?;
            }
            // A resource: its value, or its instances.
            (3, RESOURCE | MULTIPLE_RESOURCE) => {
                let inst = at(&ids[..2])?;
                resource(&tlv, inst, entries)?;
            }
            (3 | 4, RESOURCE_INSTANCE) => {
                let res = at(&ids[..3])?;
                resource_instance(&tlv, res, entries)?;
            }
            (_, kind) => {
                return Err(entries.malformed(format!(
                    "a {} TLV (id {}) where {} calls for {}",
                    kind_name(kind),
                    tlv.id,
                    requested,
                    match requested.depth() {
                        1 => "object instances",
                        2 => "resources",
                        3 => "a resource",
                        _ => "a resource instance",
                    }
                )));
            }
        }
    }
    Ok(())
}

fn entries_err(m: String) -> DecodeError {
    DecodeError::Malformed {
        format: "LwM2M TLV",
        message: m,
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        OBJECT_INSTANCE => "object instance",
        RESOURCE_INSTANCE => "resource instance",
        MULTIPLE_RESOURCE => "multiple resource",
        _ => "resource",
    }
}

fn instance(bytes: &[u8], inst: Path, entries: &mut Entries) -> Result<(), DecodeError> {
    let tlvs = parse(bytes, entries)?;
    if tlvs.is_empty() {
        return entries.push(inst, None);
    }
    for tlv in tlvs {
        match tlv.kind {
            RESOURCE | MULTIPLE_RESOURCE => resource(&tlv, inst, entries)?,
            k => {
                return Err(entries.malformed(format!(
                    "a {} TLV inside object instance {inst}",
                    kind_name(k)
                )));
            }
        }
    }
    Ok(())
}

fn resource(tlv: &Tlv<'_>, inst: Path, entries: &mut Entries) -> Result<(), DecodeError> {
    let Some(path) = inst.child(tlv.id) else {
        return Err(entries.malformed("too deep"));
    };
    if tlv.kind == RESOURCE {
        let leaf = value(tlv.value, path.kind(), entries)?;
        return entries.push(path, Some(leaf));
    }
    let tlvs = parse(tlv.value, entries)?;
    if tlvs.is_empty() {
        return entries.push(path, None);
    }
    for t in tlvs {
        if t.kind != RESOURCE_INSTANCE {
            return Err(entries.malformed(format!(
                "a {} TLV inside multiple resource {path}",
                kind_name(t.kind)
            )));
        }
        resource_instance(&t, path, entries)?;
    }
    Ok(())
}

fn resource_instance(tlv: &Tlv<'_>, res: Path, entries: &mut Entries) -> Result<(), DecodeError> {
    let Some(path) = res.child(tlv.id) else {
        return Err(entries.malformed("too deep"));
    };
    let leaf = value(tlv.value, path.kind(), entries)?;
    entries.push(path, Some(leaf))
}

/// A value of a resource of `kind` (unknown: the heuristic).
fn value(v: &[u8], kind: Option<Kind>, e: &Entries) -> Result<Leaf, DecodeError> {
    let bad = |what: &str| e.malformed(format!("{} bytes are not {what}", v.len()));
    Ok(match kind {
        Some(Kind::String) => {
            Leaf::Str(String::from_utf8(v.to_vec()).map_err(|_| bad("a UTF-8 string"))?)
        }
        Some(Kind::Integer | Kind::Time) => Leaf::Int(signed(v).ok_or_else(|| bad("an integer"))?),
        Some(Kind::Unsigned) => {
            let u = unsigned(v).ok_or_else(|| bad("an unsigned integer"))?;
            i64::try_from(u).map_or(Leaf::Uint(u), Leaf::Int)
        }
        Some(Kind::Float) => {
            let f = match v.len() {
                4 => v
                    .try_into()
                    .map(|b: [u8; 4]| f64::from(f32::from_be_bytes(b)))
                    .map_err(|_| bad("a float"))?,
                8 => v
                    .try_into()
                    .map(f64::from_be_bytes)
                    .map_err(|_| bad("a float"))?,
                _ => return Err(bad("a float (4 or 8 bytes)")),
            };
            if !f.is_finite() {
                return Err(bad("a finite float"));
            }
            Leaf::Float(f)
        }
        Some(Kind::Boolean) => match v {
            [0] => Leaf::Bool(false),
            [1] => Leaf::Bool(true),
            _ => return Err(bad("a boolean (one byte, 0 or 1)")),
        },
        Some(Kind::Objlnk) => match v {
            [a, b, c, d] => {
                Leaf::Objlnk(u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))
            }
            _ => return Err(bad("an object link (4 bytes)")),
        },
        Some(Kind::Opaque) => Leaf::Opaque(v.to_vec()),
        Some(Kind::Execute) | None => guess(v),
    })
}

/// The documented heuristic for resources the table does not know.
fn guess(v: &[u8]) -> Leaf {
    if let Ok(s) = std::str::from_utf8(v)
        && !s.chars().any(char::is_control)
    {
        return Leaf::Str(s.to_owned());
    }
    match signed(v) {
        Some(i) => Leaf::Int(i),
        None => Leaf::Opaque(v.to_vec()),
    }
}

/// A big-endian integer of 1, 2, 4 or 8 bytes, sign-extended when `signed`.
fn be_int(v: &[u8], signed: bool) -> Option<i128> {
    if ![1, 2, 4, 8].contains(&v.len()) {
        return None;
    }
    let fill = if signed && v[0] & 0x80 != 0 { 0xFF } else { 0 };
    let mut wide = [fill; 16];
    wide[16 - v.len()..].copy_from_slice(v);
    Some(i128::from_be_bytes(wide))
}

fn signed(v: &[u8]) -> Option<i64> {
    be_int(v, true).and_then(|i| i64::try_from(i).ok())
}

fn unsigned(v: &[u8]) -> Option<u64> {
    be_int(v, false).and_then(|i| u64::try_from(i).ok())
}

/// The TLV payload of the tree `root` under `requested`.
pub(super) fn encode(root: Option<&Node>, requested: &Path) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    let Some(root) = root else {
        return Ok(out);
    };
    let last = requested.ids().last().copied().unwrap_or(0);
    match (requested.depth(), root) {
        (1, Node::Branch(instances)) => {
            for (&iid, inst) in instances {
                let Node::Branch(resources) = inst else {
                    return Err(shape(requested, "an instance must be an object"));
                };
                let mut body = Vec::new();
                resources_tlv(resources, &mut body, requested)?;
                header(OBJECT_INSTANCE, iid, &body, &mut out, requested)?;
            }
        }
        (2, Node::Branch(resources)) => resources_tlv(resources, &mut out, requested)?,
        (3, node) => resource_tlv(last, node, &mut out, requested)?,
        (4, Node::Leaf(leaf)) => {
            let v = leaf_bytes(leaf, requested.kind(), requested)?;
            header(RESOURCE_INSTANCE, last, &v, &mut out, requested)?;
        }
        _ => return Err(shape(requested, "the tree does not match the path")),
    }
    Ok(out)
}

fn shape(path: &Path, message: &str) -> EncodeError {
    EncodeError::Shape {
        path: *path,
        message: message.into(),
    }
}

fn resources_tlv(
    resources: &BTreeMap<u16, Node>,
    out: &mut Vec<u8>,
    at: &Path,
) -> Result<(), EncodeError> {
    for (&rid, node) in resources {
        resource_tlv(rid, node, out, at)?;
    }
    Ok(())
}

fn resource_tlv(rid: u16, node: &Node, out: &mut Vec<u8>, at: &Path) -> Result<(), EncodeError> {
    let kind = at.ids().first().and_then(|&oid| model::kind(oid, rid));
    match node {
        Node::Leaf(leaf) => {
            let v = leaf_bytes(leaf, kind, at)?;
            header(RESOURCE, rid, &v, out, at)
        }
        Node::Branch(instances) => {
            let mut body = Vec::new();
            for (&riid, inst) in instances {
                let Node::Leaf(leaf) = inst else {
                    return Err(shape(at, "a resource instance must be a value"));
                };
                let v = leaf_bytes(leaf, kind, at)?;
                header(RESOURCE_INSTANCE, riid, &v, &mut body, at)?;
            }
            header(MULTIPLE_RESOURCE, rid, &body, out, at)
        }
    }
}

/// Writes one TLV: header for `kind`, `id`, then `value`.
fn header(
    kind: u8,
    id: u16,
    value: &[u8],
    out: &mut Vec<u8>,
    at: &Path,
) -> Result<(), EncodeError> {
    let len = value.len();
    if len > MAX_LEN {
        return Err(EncodeError::Unrepresentable {
            format: "LwM2M TLV",
            message: format!("a value of {len} bytes under {at} (at most {MAX_LEN})"),
        });
    }
    let mut t = kind << 6;
    if id > 0xFF {
        t |= 0x20;
    }
    let len_bytes: usize = match len {
        0..=7 => {
            // The length fits in the type byte; `len` is below 8 here.
            t |= u8::try_from(len).unwrap_or(0);
            0
        }
        8..=0xFF => 1,
        0x100..=0xFFFF => 2,
        _ => 3,
    };
    // The length field's size; `len_bytes` is at most 3.
    t |= u8::try_from(len_bytes).unwrap_or(0) << 3;
    out.push(t);
    if id > 0xFF {
        out.extend_from_slice(&id.to_be_bytes());
    } else {
        out.push(id.to_be_bytes()[1]);
    }
    let len_be = (len as u64).to_be_bytes();
    out.extend_from_slice(&len_be[8 - len_bytes..]);
    out.extend_from_slice(value);
    Ok(())
}

/// The bytes of a value: strings UTF-8, integers the shortest of 1/2/4/8 bytes, floats 8
/// bytes, booleans 1 byte, object links 4 bytes, opaque as is.
fn leaf_bytes(leaf: &Leaf, kind: Option<Kind>, at: &Path) -> Result<Vec<u8>, EncodeError> {
    Ok(match leaf {
        Leaf::Str(s) => s.as_bytes().to_vec(),
        Leaf::Int(i) => {
            let i = *i;
            if let Ok(b) = i8::try_from(i) {
                b.to_be_bytes().to_vec()
            } else if let Ok(b) = i16::try_from(i) {
                b.to_be_bytes().to_vec()
            } else if let Ok(b) = i32::try_from(i) {
                b.to_be_bytes().to_vec()
            } else {
                i.to_be_bytes().to_vec()
            }
        }
        // Values over i64::MAX: 8 unsigned bytes for an Unsigned resource of the table;
        // any other resource would read them back as a negative integer.
        Leaf::Uint(u) if kind == Some(Kind::Unsigned) => u.to_be_bytes().to_vec(),
        Leaf::Uint(u) => {
            return Err(EncodeError::Unrepresentable {
                format: "LwM2M TLV",
                message: format!("{u} under {at} is over the largest signed TLV integer"),
            });
        }
        Leaf::Float(f) => f.to_be_bytes().to_vec(),
        Leaf::Bool(b) => vec![u8::from(*b)],
        Leaf::Objlnk(o, i) => {
            let mut v = o.to_be_bytes().to_vec();
            v.extend_from_slice(&i.to_be_bytes());
            v
        }
        Leaf::Opaque(b) => b.clone(),
    })
}

#[cfg(test)]
mod int_tests {
    use super::{signed, unsigned};

    #[test]
    fn integers_are_read_at_every_tlv_width_with_and_without_sign() {
        assert_eq!(signed(&[0x7F]), Some(127));
        assert_eq!(signed(&[0x80]), Some(-128));
        assert_eq!(signed(&[0xFF, 0xFE]), Some(-2));
        assert_eq!(signed(&[0x00, 0x00, 0x01, 0x00]), Some(256));
        assert_eq!(signed(&[0x80, 0, 0, 0, 0, 0, 0, 0]), Some(i64::MIN));
        assert_eq!(
            signed(&[0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Some(i64::MAX)
        );
        assert_eq!(unsigned(&[0x80]), Some(128));
        assert_eq!(unsigned(&[0xFF, 0xFE]), Some(65534));
        assert_eq!(unsigned(&[0xFF; 8]), Some(u64::MAX));
        for bad in [&[][..], &[1, 2, 3], &[0; 5], &[0; 9]] {
            assert_eq!(signed(bad), None, "{bad:?}");
            assert_eq!(unsigned(bad), None, "{bad:?}");
        }
    }
}
