//! JSON written by hand where serde's writer was measured to cost (issue 24: the store's
//! records and the REST answers of every proxied read), with serde's escapes.

/// Appends `s` as a JSON string: copied between quotes when nothing in it needs escaping
/// (JSON escapes only `"`, `\` and control characters; serde_json escapes nothing else),
/// else escaped by serde_json, so the text is byte for byte what serde writes.
pub fn push_string(out: &mut String, s: &str) {
    // Without an early exit, so that the compiler checks many bytes at a time.
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        match serde_json::to_string(s) {
            Ok(escaped) => out.push_str(&escaped),
            // Serialising a str cannot fail; an empty string keeps the text valid JSON.
            Err(_) => out.push_str("\"\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_written_as_serde_writes_them() {
        for s in [
            "",
            "plain",
            "with \"quotes\" and \\ backslash",
            "ctrl \u{1} \n \t \u{1f} \u{7f}",
            "ünïcödé and 日本語 and 🎉, long enough for several chunks",
            "0123456789abcdef\"",
            // One byte to escape, alone or last, after a run that needs none.
            "\u{1f}",
            "0123456789abcdefghij\u{0}",
            "0123456789abcdefghij\\",
            // Nothing to escape: DEL, non-ASCII, the space.
            "\u{7f}",
            "é",
            " ",
        ] {
            let mut out = String::new();
            push_string(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap());
        }
    }
}
