//! Names the daemon accepts: domains, endpoint names and types.

/// Longest endpoint name, endpoint type or domain accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A domain name: 1 to 64 of letters, digits, `-`, `_`, `.`; not `.` or `..`.
pub fn valid_domain(d: &str) -> bool {
    (1..=64).contains(&d.len())
        && !is_dot_segment(d)
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An endpoint name or type: 1 to [`MAX_NAME_LEN`] bytes, no control characters, none of
/// `/ ? #`, and not `.` or `..` (also percent-encoded), all of which would make it
/// unusable as a REST path segment (a URL parser resolves a dot segment away).
pub fn valid_name(n: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&n.len())
        && !is_dot_segment(n)
        && !n
            .chars()
            .any(|c| c.is_control() || matches!(c, '/' | '?' | '#'))
}

/// A `.` or `..` path segment, also percent-encoded (`%2e`, `%2E`), as URL parsers
/// (browsers, RFC 3986 §5.2.4 resolvers) treat it: no name, and no segment of a device's
/// resource path (refused at registration, `registry::parse_resources`).
pub fn is_dot_segment(s: &str) -> bool {
    let s = s.to_ascii_lowercase().replace("%2e", ".");
    s == "." || s == ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25 review: `.` and `..` (also percent-encoded) are no names: a URL parser
    /// resolves them away, so no REST path could name such an endpoint.
    #[test]
    fn dot_segments_are_no_names() {
        for n in [".", "..", "%2e", "%2E%2e", ".%2E"] {
            assert!(!valid_name(n), "{n}");
            assert!(!valid_domain(n) || n.contains('%'), "{n}");
        }
        for n in ["...", ".a", "a.", "sensor.1", "%2e%2e%2e"] {
            assert!(valid_name(n), "{n}");
        }
        assert!(!valid_domain("..") && !valid_domain("."));
        assert!(valid_domain("a.b") && valid_domain("..."));
    }
}
