//! The query parameters of `GET /applications/{APPLICATION_ID}/keys`: sorting, paging, the
//! simple `filterField`/`filter` glob and the advanced `query` JSON.

use std::cmp::Ordering;

use serde_json::Value;

use crate::model::{KeyRecord, Tag, is_object_id};
use crate::time::parse_iso;

pub const DEFAULT_PER_PAGE: u64 = 100;
pub const MAX_PER_PAGE: u64 = 1000;
/// Most items of one `$and`/`$or`/`$nor` array or `$in`/`$nin` list (the seed's schema).
pub const MAX_ITEMS: usize = 100;
/// Deepest nesting of `$and`/`$or`/`$nor` accepted.
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    Key,
    Status,
    Id,
    CreationDate,
    LastUpdated,
}

impl SortField {
    pub const ALL: [SortField; 5] = [
        SortField::Key,
        SortField::Status,
        SortField::Id,
        SortField::CreationDate,
        SortField::LastUpdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SortField::Key => "key",
            SortField::Status => "status",
            SortField::Id => "id",
            SortField::CreationDate => "creationDate",
            SortField::LastUpdated => "lastUpdated",
        }
    }

    fn compare(self, a: &KeyRecord, b: &KeyRecord) -> Ordering {
        match self {
            SortField::Key => a.key.cmp(&b.key),
            SortField::Status => a.status.as_str().cmp(b.status.as_str()),
            SortField::Id => a.id.cmp(&b.id),
            SortField::CreationDate => a.creation_date.cmp(&b.creation_date),
            SortField::LastUpdated => a.last_updated.cmp(&b.last_updated),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterField {
    Key,
    Status,
}

impl FilterField {
    fn value(self, rec: &KeyRecord) -> &str {
        match self {
            FilterField::Key => &rec.key,
            FilterField::Status => rec.status.as_str(),
        }
    }
}

/// The parsed query parameters of a list request.
#[derive(Debug, Clone)]
pub struct ListParams {
    pub sort_field: SortField,
    pub descending: bool,
    pub page: u64,
    pub per_page: u64,
    /// As given (echoed in the answer), when not blank.
    pub filter_field: Option<String>,
    pub filter: Option<String>,
    pub query: Option<Query>,
}

impl ListParams {
    pub fn sort_direction(&self) -> &'static str {
        if self.descending { "desc" } else { "asc" }
    }

    fn filter_field_parsed(&self) -> Option<FilterField> {
        match self.filter_field.as_deref() {
            Some("key") => Some(FilterField::Key),
            Some("status") => Some(FilterField::Status),
            _ => None,
        }
    }

    /// Does `rec` pass the filter: the advanced query when there is one, else the glob
    /// on the filter field when both are given, else everything passes.
    pub fn matches(&self, rec: &KeyRecord) -> bool {
        if let Some(q) = &self.query {
            return q.matches(rec);
        }
        match (self.filter_field_parsed(), &self.filter) {
            (Some(field), Some(pattern)) => glob(pattern, field.value(rec)),
            _ => true,
        }
    }

    /// Sorts by the sort field, ties broken by id, both in the requested direction.
    pub fn sort(&self, items: &mut [&KeyRecord]) {
        items.sort_by(|a, b| {
            let o = self.sort_field.compare(a, b).then_with(|| a.id.cmp(&b.id));
            if self.descending { o.reverse() } else { o }
        });
    }

    /// The items of the requested page.
    pub fn page_of<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        let start = self
            .page
            .checked_mul(self.per_page)
            .and_then(|s| usize::try_from(s).ok())
            .unwrap_or(usize::MAX);
        if start >= items.len() {
            return &[];
        }
        let end = start
            .saturating_add(usize::try_from(self.per_page).unwrap_or(usize::MAX))
            .min(items.len());
        &items[start..end]
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("malformed percent-encoding in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("query component {s:?} is not UTF-8"))
}

fn parse_count(name: &str, v: &str, min: u64, max: u64) -> Result<u64, String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("\"{name}\" must be a non-negative integer"));
    }
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("\"{name}\" must be between {min} and {max}")),
    }
}

/// Reads the query string of a list request. Unknown parameters are ignored; a known one
/// given twice, or with a value outside what the seed accepts, is an error (400). A blank
/// value counts as not given.
pub fn parse_list_params(raw: Option<&str>) -> Result<ListParams, String> {
    let mut p = ListParams {
        sort_field: SortField::CreationDate,
        descending: true,
        page: 0,
        per_page: DEFAULT_PER_PAGE,
        filter_field: None,
        filter: None,
        query: None,
    };
    let mut seen: Vec<String> = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = form_decode(name)?;
        let value = form_decode(value)?;
        let known = [
            "sortField",
            "sortDirection",
            "page",
            "perPage",
            "filterField",
            "filter",
            "query",
        ];
        if !known.contains(&name.as_str()) {
            continue;
        }
        if seen.contains(&name) {
            return Err(format!("\"{name}\" may be given only once"));
        }
        seen.push(name.clone());
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "sortField" => {
                p.sort_field = SortField::ALL
                    .into_iter()
                    .find(|f| f.as_str() == value)
                    .ok_or_else(|| {
                        "\"sortField\" must be one of key, status, id, creationDate, lastUpdated"
                            .to_string()
                    })?
            }
            "sortDirection" => {
                p.descending = match value.as_str() {
                    "asc" | "ASC" => false,
                    "desc" | "DESC" => true,
                    _ => return Err("\"sortDirection\" must be one of asc, desc".into()),
                }
            }
            "page" => p.page = parse_count("page", &value, 0, u64::from(u32::MAX))?,
            "perPage" => p.per_page = parse_count("perPage", &value, 1, MAX_PER_PAGE)?,
            "filterField" => {
                if value != "key" && value != "status" {
                    return Err("\"filterField\" must be one of key, status".into());
                }
                p.filter_field = Some(value);
            }
            "filter" => p.filter = Some(value),
            "query" => {
                let v: Value = serde_json::from_str(&value)
                    .map_err(|e| format!("\"query\" is not valid JSON: {e}"))?;
                p.query = Some(Query::parse(&v).map_err(|e| format!("\"query\": {e}"))?);
            }
            _ => {}
        }
    }
    Ok(p)
}

/// Glob matching for `filter` and `$like`: `*` any run of characters (also none), `?`
/// exactly one character, anything else itself; case-insensitive; the whole text must
/// match.
pub fn glob(pattern: &str, text: &str) -> bool {
    wildmatch::WildMatch::new_case_insensitive(pattern).matches(text)
}

/// A field an advanced query can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    Key,
    Status,
    Description,
    FilterType,
    CreationDate,
    LastUpdated,
    DeviceIds,
    PubTopics,
    SubTopics,
}

/// How a field's operands are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 24-hex ids (`id`, `deviceIds`): operands ids or null, one operator, no `$like`.
    ObjectId,
    /// Text or list of text: operands any JSON scalar.
    Text,
    /// Dates: numbers are milliseconds since the epoch, strings ISO 8601; no `$like`.
    Date,
}

impl Field {
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "id" => Field::Id,
            "key" => Field::Key,
            "status" => Field::Status,
            "description" => Field::Description,
            "filterType" => Field::FilterType,
            "creationDate" => Field::CreationDate,
            "lastUpdated" => Field::LastUpdated,
            "deviceIds" => Field::DeviceIds,
            "pubTopics" => Field::PubTopics,
            "subTopics" => Field::SubTopics,
            _ => return None,
        })
    }

    fn kind(self) -> Kind {
        match self {
            Field::Id | Field::DeviceIds => Kind::ObjectId,
            Field::CreationDate | Field::LastUpdated => Kind::Date,
            _ => Kind::Text,
        }
    }

    fn value(self, rec: &KeyRecord) -> FieldValue<'_> {
        match self {
            Field::Id => FieldValue::Text(Some(&rec.id)),
            Field::Key => FieldValue::Text(Some(&rec.key)),
            Field::Status => FieldValue::Text(Some(rec.status.as_str())),
            Field::Description => FieldValue::Text(rec.description.as_deref()),
            Field::FilterType => FieldValue::Text(Some(rec.filter_type.as_str())),
            Field::CreationDate => FieldValue::Number(rec.creation_date as f64),
            Field::LastUpdated => FieldValue::Number(rec.last_updated as f64),
            Field::DeviceIds => FieldValue::List(&rec.device_ids),
            Field::PubTopics => FieldValue::List(&rec.pub_topics),
            Field::SubTopics => FieldValue::List(&rec.sub_topics),
        }
    }
}

enum FieldValue<'a> {
    /// `None`: the field is absent (a key without description).
    Text(Option<&'a str>),
    Number(f64),
    List(&'a [String]),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Lt,
    Gte,
    Lte,
    In,
    Nin,
    Like,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "$eq" => Op::Eq,
            "$ne" => Op::Ne,
            "$gt" => Op::Gt,
            "$lt" => Op::Lt,
            "$gte" => Op::Gte,
            "$lte" => Op::Lte,
            "$in" => Op::In,
            "$nin" => Op::Nin,
            "$like" => Op::Like,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    One(Scalar),
    Many(Vec<Scalar>),
}

/// One condition on the device tags (`$tagKey`/`$tagValue`, or `{"<tag key>": value}`),
/// possibly negated with `$ne`.
#[derive(Debug, Clone, PartialEq)]
pub struct TagCond {
    pub negated: bool,
    pub matcher: TagMatcher,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TagMatcher {
    /// Some one tag matches both parts (an absent part matches anything).
    KeyValue {
        key: Option<StrMatch>,
        value: Option<StrMatch>,
    },
    /// For each pair, some tag has that key and a matching value.
    Pairs(Vec<(String, StrMatch)>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum StrMatch {
    Is(String),
    /// No value (a tag given without one).
    Null,
    In(Vec<String>),
    Nin(Vec<String>),
}

impl StrMatch {
    fn matches(&self, v: Option<&str>) -> bool {
        match self {
            StrMatch::Is(s) => v == Some(s.as_str()),
            StrMatch::Null => v.is_none(),
            StrMatch::In(l) => v.is_some_and(|v| l.iter().any(|s| s == v)),
            StrMatch::Nin(l) => !v.is_some_and(|v| l.iter().any(|s| s == v)),
        }
    }
}

impl TagMatcher {
    fn matches(&self, tags: &[Tag]) -> bool {
        match self {
            TagMatcher::KeyValue { key, value } => tags.iter().any(|t| {
                key.as_ref().is_none_or(|k| k.matches(Some(&t.key)))
                    && value.as_ref().is_none_or(|v| v.matches(t.value.as_deref()))
            }),
            TagMatcher::Pairs(pairs) => pairs.iter().all(|(k, m)| {
                tags.iter()
                    .any(|t| &t.key == k && m.matches(t.value.as_deref()))
            }),
        }
    }
}

/// An advanced application key query (the seed's Advanced Application Key Query).
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// `$and`, and the entries of one object: every one matches.
    And(Vec<Query>),
    /// `$or`: some one matches.
    Or(Vec<Query>),
    /// `$nor`: none matches.
    Nor(Vec<Query>),
    /// Every operator holds for the field.
    Field(Field, Vec<(Op, Operand)>),
    Tags(TagCond),
}

impl Query {
    pub fn parse(v: &Value) -> Result<Query, String> {
        parse_query(v, 0)
    }

    pub fn matches(&self, rec: &KeyRecord) -> bool {
        match self {
            Query::And(qs) => qs.iter().all(|q| q.matches(rec)),
            // Losant: "Match ANY" with no filters returns everything.
            Query::Or(qs) => qs.is_empty() || qs.iter().any(|q| q.matches(rec)),
            // Losant: "Match NONE" with no filters returns nothing.
            Query::Nor(qs) => !qs.is_empty() && !qs.iter().any(|q| q.matches(rec)),
            Query::Field(f, ops) => {
                let fv = f.value(rec);
                ops.iter().all(|(op, operand)| test(&fv, *op, operand))
            }
            Query::Tags(c) => c.matcher.matches(&rec.device_tags) != c.negated,
        }
    }
}

fn parse_query(v: &Value, depth: usize) -> Result<Query, String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let Value::Object(obj) = v else {
        return Err("a query must be a JSON object".into());
    };
    let mut parts = Vec::with_capacity(obj.len());
    for (name, value) in obj {
        let part = match name.as_str() {
            "$and" | "$or" | "$nor" => {
                let Value::Array(items) = value else {
                    return Err(format!("{name} must be an array"));
                };
                if items.len() > MAX_ITEMS {
                    return Err(format!("{name} must hold at most {MAX_ITEMS} queries"));
                }
                let qs = items
                    .iter()
                    .map(|i| parse_query(i, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                match name.as_str() {
                    "$and" => Query::And(qs),
                    "$or" => Query::Or(qs),
                    _ => Query::Nor(qs),
                }
            }
            "deviceTags" => Query::Tags(parse_tag_cond(value)?),
            other => {
                let field = Field::parse(other).ok_or_else(|| {
                    format!(
                        "unknown field {other:?} (fields: id, key, status, description, filterType, \
                         creationDate, lastUpdated, deviceIds, deviceTags, pubTopics, subTopics)"
                    )
                })?;
                Query::Field(field, parse_conditions(field, other, value)?)
            }
        };
        parts.push(part);
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Query::And(parts)
    })
}

/// The operators of one field: a bare scalar is `$eq`; an object lists operators.
fn parse_conditions(field: Field, name: &str, v: &Value) -> Result<Vec<(Op, Operand)>, String> {
    let kind = field.kind();
    let Value::Object(ops) = v else {
        return Ok(vec![(Op::Eq, Operand::One(scalar(kind, name, v)?))]);
    };
    if ops.is_empty() {
        return Err(format!(
            "{name}: an operator object needs at least one operator"
        ));
    }
    if kind == Kind::ObjectId && ops.len() > 1 {
        return Err(format!("{name}: only one operator is allowed"));
    }
    let mut out = Vec::with_capacity(ops.len());
    for (op_name, operand) in ops {
        let op =
            Op::parse(op_name).ok_or_else(|| format!("{name}: unknown operator {op_name:?}"))?;
        let operand = match op {
            Op::In | Op::Nin => {
                let Value::Array(items) = operand else {
                    return Err(format!("{name}: {op_name} needs an array"));
                };
                if items.len() > MAX_ITEMS {
                    return Err(format!(
                        "{name}: {op_name} takes at most {MAX_ITEMS} values"
                    ));
                }
                let list = items
                    .iter()
                    .map(|i| match i {
                        Value::Null => Err(format!("{name}: {op_name} values may not be null")),
                        other => scalar(kind, name, other),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Operand::Many(list)
            }
            Op::Like => {
                if kind != Kind::Text {
                    return Err(format!("{name}: $like applies to text fields only"));
                }
                match operand {
                    Value::String(s) => Operand::One(Scalar::Str(s.clone())),
                    _ => return Err(format!("{name}: $like needs a string")),
                }
            }
            _ => Operand::One(scalar(kind, name, operand)?),
        };
        out.push((op, operand));
    }
    Ok(out)
}

/// One operand, checked and normalized for the field's kind.
fn scalar(kind: Kind, name: &str, v: &Value) -> Result<Scalar, String> {
    match (kind, v) {
        (_, Value::Array(_) | Value::Object(_)) => Err(format!(
            "{name}: expected a string, number, boolean or null"
        )),
        (Kind::ObjectId, Value::Null) => Ok(Scalar::Null),
        (Kind::ObjectId, Value::String(s)) if is_object_id(s) => {
            Ok(Scalar::Str(s.to_ascii_lowercase()))
        }
        (Kind::ObjectId, _) => Err(format!(
            "{name}: expected an id of 24 hexadecimal characters or null"
        )),
        (Kind::Date, Value::String(s)) => parse_iso(s)
            .map(|ms| Scalar::Num(ms as f64))
            .ok_or_else(|| format!("{name}: {s:?} is not an ISO 8601 date")),
        (_, Value::Null) => Ok(Scalar::Null),
        (_, Value::Bool(b)) => Ok(Scalar::Bool(*b)),
        (_, Value::Number(n)) => Ok(Scalar::Num(n.as_f64().unwrap_or(f64::NAN))),
        (_, Value::String(s)) => Ok(Scalar::Str(s.clone())),
    }
}

fn parse_tag_cond(v: &Value) -> Result<TagCond, String> {
    let Value::Object(obj) = v else {
        return Err("deviceTags: expected an object".into());
    };
    if obj.len() == 1
        && let Some((op, inner)) = obj.iter().next()
        && (op == "$eq" || op == "$ne")
    {
        return Ok(TagCond {
            negated: op == "$ne",
            matcher: parse_tag_matcher(inner)?,
        });
    }
    Ok(TagCond {
        negated: false,
        matcher: parse_tag_matcher(v)?,
    })
}

fn parse_tag_matcher(v: &Value) -> Result<TagMatcher, String> {
    let Value::Object(obj) = v else {
        return Err("deviceTags: expected an object".into());
    };
    if obj.is_empty() {
        return Err("deviceTags: expected at least one tag condition".into());
    }
    if obj.keys().any(|k| k.starts_with('$')) {
        let mut key = None;
        let mut value = None;
        for (k, m) in obj {
            match k.as_str() {
                "$tagKey" => key = Some(str_match(k, m)?),
                "$tagValue" => value = Some(str_match(k, m)?),
                other => {
                    return Err(format!(
                        "deviceTags: unknown operator {other:?} (use $tagKey, $tagValue, or $eq/$ne around them)"
                    ));
                }
            }
        }
        return Ok(TagMatcher::KeyValue { key, value });
    }
    let mut pairs = Vec::with_capacity(obj.len());
    for (k, m) in obj {
        if k.is_empty()
            || k.len() > 255
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("deviceTags: {k:?} is not a tag key"));
        }
        pairs.push((k.clone(), str_match(k, m)?));
    }
    Ok(TagMatcher::Pairs(pairs))
}

fn str_match(name: &str, v: &Value) -> Result<StrMatch, String> {
    let list = |items: &Value| -> Result<Vec<String>, String> {
        let Value::Array(items) = items else {
            return Err(format!("deviceTags.{name}: expected an array"));
        };
        if items.len() > MAX_ITEMS {
            return Err(format!("deviceTags.{name}: at most {MAX_ITEMS} values"));
        }
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(String::from)
                    .ok_or_else(|| format!("deviceTags.{name}: values must be strings"))
            })
            .collect()
    };
    match v {
        Value::Null => Ok(StrMatch::Null),
        Value::String(s) if s.chars().count() <= 255 => Ok(StrMatch::Is(s.clone())),
        Value::Object(o) if o.len() == 1 && o.contains_key("$in") => {
            Ok(StrMatch::In(list(&o["$in"])?))
        }
        Value::Object(o) if o.len() == 1 && o.contains_key("$nin") => {
            Ok(StrMatch::Nin(list(&o["$nin"])?))
        }
        _ => Err(format!(
            "deviceTags.{name}: expected a string (at most 255 characters), null, {{\"$in\": [...]}} or {{\"$nin\": [...]}}"
        )),
    }
}

fn eq(fv: &FieldValue<'_>, s: &Scalar) -> bool {
    match (fv, s) {
        (FieldValue::Text(Some(t)), Scalar::Str(x)) => *t == x,
        (FieldValue::Text(None), Scalar::Null) => true,
        (FieldValue::Number(n), Scalar::Num(x)) => n == x,
        (FieldValue::List(l), Scalar::Str(x)) => l.iter().any(|t| t == x),
        (FieldValue::List(l), Scalar::Null) => l.is_empty(),
        _ => false,
    }
}

/// Is some value of the field ordered against `s` as `want` says? Values of different
/// types are not ordered (so never match).
fn ordered(fv: &FieldValue<'_>, s: &Scalar, want: fn(Ordering) -> bool) -> bool {
    match (fv, s) {
        (FieldValue::Text(Some(t)), Scalar::Str(x)) => want((*t).cmp(x.as_str())),
        (FieldValue::Number(n), Scalar::Num(x)) => n.partial_cmp(x).is_some_and(want),
        (FieldValue::List(l), Scalar::Str(x)) => l.iter().any(|t| want(t.as_str().cmp(x))),
        _ => false,
    }
}

fn like(fv: &FieldValue<'_>, s: &Scalar) -> bool {
    let Scalar::Str(p) = s else { return false };
    match fv {
        FieldValue::Text(Some(t)) => glob(p, t),
        FieldValue::List(l) => l.iter().any(|t| glob(p, t)),
        _ => false,
    }
}

fn test(fv: &FieldValue<'_>, op: Op, operand: &Operand) -> bool {
    match (op, operand) {
        (Op::In, Operand::Many(l)) => l.iter().any(|s| eq(fv, s)),
        (Op::Nin, Operand::Many(l)) => !l.iter().any(|s| eq(fv, s)),
        (_, Operand::Many(_)) => false,
        (Op::Eq, Operand::One(s)) => eq(fv, s),
        (Op::Ne, Operand::One(s)) => !eq(fv, s),
        (Op::Gt, Operand::One(s)) => ordered(fv, s, Ordering::is_gt),
        (Op::Gte, Operand::One(s)) => ordered(fv, s, Ordering::is_ge),
        (Op::Lt, Operand::One(s)) => ordered(fv, s, Ordering::is_lt),
        (Op::Lte, Operand::One(s)) => ordered(fv, s, Ordering::is_le),
        (Op::Like, Operand::One(s)) => like(fv, s),
        (Op::In | Op::Nin, Operand::One(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("the*key", "the-best-key", true),
            ("the*key", "thekey", true),
            ("the*key", "the-key-2", false),
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "x", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a?c", "abbc", false),
            ("ACT*", "active", true),
            ("*ive", "INACTIVE", true),
            ("in*ct*e", "inactive", true),
            ("*a*a*a", "aaa", true),
            ("*a*a*a", "aa", false),
            ("abc", "abcd", false),
            ("ab*", "a", false),
            ("**", "x", true),
            ("é*", "École", true),
            ("e*", "École", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob(p, t), *want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%20c%2B%2a").unwrap(), "a b c+*");
        assert_eq!(form_decode("%7B%22id%22%7D").unwrap(), "{\"id\"}");
        assert!(form_decode("%zz").is_err());
        assert!(form_decode("%2").is_err());
        assert!(form_decode("%ff").is_err());
    }
}
