//! Checks on the names and other text that clients give keys and applications.

/// Refuses text with a control character (NUL, BEL, a newline, …: anything
/// [`char::is_control`] calls one): such names break logs and listings. `what` names the
/// field in the message.
pub fn refuse_control_chars(what: &str, text: &str) -> Result<(), String> {
    if text.chars().any(char::is_control) {
        return Err(format!("{what} must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused() {
        for bad in [
            "a\0b",
            "bell\u{7}",
            "two\nlines",
            "cr\r",
            "tab\t",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            assert_eq!(
                refuse_control_chars("name", bad),
                Err("name must not contain control characters".to_string()),
                "{bad:?}"
            );
        }
        for good in ["", "plain", "with space", "ünïcödé ✓", "a-b_c.d"] {
            assert_eq!(refuse_control_chars("name", good), Ok(()), "{good:?}");
        }
    }
}
