//! Names the daemon accepts: domains, endpoint names and types.

/// Longest endpoint name, endpoint type or domain accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A domain name: 1 to 64 of letters, digits, `-`, `_`, `.`.
pub fn valid_domain(d: &str) -> bool {
    (1..=64).contains(&d.len())
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An endpoint name or type: 1 to [`MAX_NAME_LEN`] bytes, no control characters, and none
/// of `/ ? #` that would make it unusable as a REST path segment.
pub fn valid_name(n: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&n.len())
        && !n
            .chars()
            .any(|c| c.is_control() || matches!(c, '/' | '?' | '#'))
}
