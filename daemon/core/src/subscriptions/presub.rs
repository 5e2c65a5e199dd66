//! Pre-subscription rules (seed 000, "Automatically subscribe to resources"): a JSON array
//! of objects with optional `endpoint-name` (a trailing `*` matches any suffix),
//! `endpoint-type` and `resource-path` (a list of paths; `*` matches any run of
//! characters). An object matches a resource when every field it has matches; a missing
//! field matches everything.

pub use connectord_model::PreSub;
use wildmatch::WildMatchPattern;

/// Most rules one key may set.
pub const MAX_RULES: usize = 1000;
/// Most paths in one rule's `resource-path`.
pub const MAX_PATHS: usize = 100;
/// Longest name, type or path pattern, in bytes.
pub const MAX_LEN: usize = 256;

/// Why a pre-subscription body was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PresubError(pub String);

/// Parses and checks a `PUT /subscriptions` body.
pub fn parse(body: &[u8]) -> Result<Vec<PreSub>, PresubError> {
    let rules: Vec<PreSub> = serde_json::from_slice(body).map_err(|e| {
        PresubError(format!(
            "the body must be a JSON array of objects with endpoint-name, endpoint-type and resource-path: {e}"
        ))
    })?;
    if rules.len() > MAX_RULES {
        return Err(PresubError(format!(
            "at most {MAX_RULES} pre-subscription rules are allowed"
        )));
    }
    for (i, r) in rules.iter().enumerate() {
        let field = |name: &str, v: &str| -> Result<(), PresubError> {
            if v.is_empty() || v.len() > MAX_LEN {
                return Err(PresubError(format!(
                    "rule {i}: {name} must be 1 to {MAX_LEN} bytes"
                )));
            }
            Ok(())
        };
        if let Some(n) = &r.endpoint_name {
            field("endpoint-name", n)?;
            if n.trim_end_matches('*').contains('*') || n.ends_with("**") {
                return Err(PresubError(format!(
                    "rule {i}: endpoint-name may only have a single * at its end"
                )));
            }
        }
        if let Some(t) = &r.endpoint_type {
            field("endpoint-type", t)?;
        }
        if let Some(paths) = &r.resource_path {
            if paths.len() > MAX_PATHS {
                return Err(PresubError(format!(
                    "rule {i}: at most {MAX_PATHS} resource paths per rule"
                )));
            }
            for p in paths {
                field("resource-path", p)?;
                if !p.starts_with('/') {
                    return Err(PresubError(format!(
                        "rule {i}: resource path {p:?} must start with /"
                    )));
                }
            }
        }
    }
    Ok(rules)
}

/// `*` matches any run of characters (also none); everything else literally, `?` too.
pub fn glob(pattern: &str, text: &str) -> bool {
    // wildmatch always has a single-character wildcard: it is given U+FFFF, a noncharacter,
    // and a pattern that holds one matches nothing rather than a wider set of texts.
    !pattern.contains(NO_SINGLE) && WildMatchPattern::<'*', NO_SINGLE>::new(pattern).matches(text)
}

/// The single-character wildcard that [`glob`] does not have.
const NO_SINGLE: char = '\u{FFFF}';

/// How a pre-subscription rule ([`PreSub`], a record of `connectord-model`) matches.
pub trait RuleMatch {
    /// Does this rule ask for `path` on an endpoint with this name and type?
    fn matches(&self, name: &str, ept: Option<&str>, path: &str) -> bool;
    /// Does this rule apply to an endpoint with this name and type (any of its paths)?
    fn matches_endpoint(&self, name: &str, ept: Option<&str>) -> bool;
}

impl RuleMatch for PreSub {
    fn matches(&self, name: &str, ept: Option<&str>, path: &str) -> bool {
        let path_ok = match &self.resource_path {
            None => true,
            Some(paths) => paths.iter().any(|p| glob(p, path)),
        };
        path_ok && self.matches_endpoint(name, ept)
    }

    fn matches_endpoint(&self, name: &str, ept: Option<&str>) -> bool {
        let name_ok = match &self.endpoint_name {
            None => true,
            Some(n) => match n.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => n == name,
            },
        };
        let type_ok = match &self.endpoint_type {
            None => true,
            Some(t) => ept == Some(t.as_str()),
        };
        name_ok && type_ok
    }
}

/// True when any rule asks for the resource.
pub fn any_match(rules: &[PreSub], name: &str, ept: Option<&str>, path: &str) -> bool {
    rules.iter().any(|r| r.matches(name, ept, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<PreSub> {
        parse(
            br#"[
                {"endpoint-name": "node-001", "resource-path": ["/dev"]},
                {"endpoint-type": "Light", "resource-path": ["/sen/*"]},
                {"endpoint-name": "node*"},
                {"endpoint-type": "Sensor"},
                {"resource-path": ["/dev/temp", "/dev/hum"]}
            ]"#,
        )
        .unwrap()
    }

    /// The seed's example, table-driven: (name, type, path, subscribed?).
    #[test]
    fn the_seed_example() {
        let r = rules();
        let table: &[(&str, Option<&str>, &str, bool)] = &[
            ("node-001", None, "/dev", true),
            ("node-002", None, "/anything", true),
            ("nodeX", None, "/x", true),
            ("lamp-1", Some("Light"), "/sen/0/temp", true),
            ("lamp-1", Some("Light"), "/sen", false),
            ("lamp-1", Some("Light"), "/act/0", false),
            ("s-1", Some("Sensor"), "/whatever/1", true),
            ("other", None, "/dev/temp", true),
            ("other", None, "/dev/hum", true),
            ("other", None, "/dev/pressure", false),
            ("other", Some("Light"), "/dev/x", false),
            ("Node-1", None, "/x", false),
        ];
        for (name, ept, path, want) in table {
            assert_eq!(
                any_match(&r, name, *ept, path),
                *want,
                "{name} {ept:?} {path}"
            );
        }
    }

    #[test]
    fn an_empty_object_matches_everything_and_an_empty_array_nothing() {
        let all = parse(b"[{}]").unwrap();
        assert!(any_match(&all, "x", None, "/1/2"));
        assert!(!any_match(&parse(b"[]").unwrap(), "x", None, "/1/2"));
    }

    #[test]
    fn globs() {
        let table = [
            ("/3303/*/5700", "/3303/0/5700", true),
            ("/3303/*/5700", "/3303/12/5700", true),
            ("/3303/*/5700", "/3303/0/5701", false),
            ("/*", "/a/b", true),
            ("/a*b*c", "/aXbYc", true),
            ("/a*b*c", "/aXc", false),
            ("/a", "/a", true),
            ("/a", "/ab", false),
            ("*", "", true),
            ("/ab*ab", "/ab", false),
            ("/a?", "/ab", false),
            ("/a?", "/a?", true),
            ("/a\u{FFFF}", "/ab", false),
        ];
        for (p, t, want) in table {
            assert_eq!(glob(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        let long = format!("[{{\"endpoint-name\": \"{}\"}}]", "x".repeat(MAX_LEN + 1));
        let many = format!("[{}]", vec!["{}"; MAX_RULES + 1].join(","));
        let cases: Vec<(&[u8], &str)> = vec![
            (b"{}", "JSON array"),
            (b"[{endpoint-name: \"x\"}]", "JSON array"),
            (b"[{\"endpoint-nam\": \"x\"}]", "unknown field"),
            (b"[{\"endpoint-name\": 5}]", "invalid type"),
            (b"[{\"resource-path\": \"/x\"}]", "invalid type"),
            (b"[{\"resource-path\": [\"x\"]}]", "must start with /"),
            (b"[{\"endpoint-name\": \"a*b\"}]", "single *"),
            (b"[{\"endpoint-name\": \"\"}]", "1 to"),
            (long.as_bytes(), "1 to"),
            (many.as_bytes(), "at most"),
        ];
        for (body, want) in cases {
            let e = parse(body).unwrap_err();
            assert!(e.0.contains(want), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn round_trips_as_given() {
        let body = r#"[{"endpoint-name":"a*","resource-path":["/1/*"]},{"endpoint-type":"T"}]"#;
        let r = parse(body.as_bytes()).unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), body);
    }
}
