//! Secrets: random credentials, and the SHA-256 digests a plugin stores instead of them.

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

/// SHA-256 of `text` (its UTF-8 bytes), as 64 lower-case hex characters.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Is `s` what [`sha256_hex`] returns: exactly 64 lower-case hex characters?
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `len` random characters of `[A-Za-z0-9]`, from the thread's CSPRNG (about 5.95 bits
/// each).
pub fn random_alphanumeric(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lower_case_hex() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_sha256_hex(&sha256_hex("x")));
        assert!(!is_sha256_hex(&sha256_hex("x").to_uppercase()));
        assert!(!is_sha256_hex(&sha256_hex("x")[1..]));
        assert!(!is_sha256_hex(&format!("{}0", sha256_hex("x"))));
        assert!(!is_sha256_hex(&"g".repeat(64)));
    }

    #[test]
    fn random_alphanumeric_has_the_length_and_alphabet() {
        for len in [0, 1, 20, 100] {
            let s = random_alphanumeric(len);
            assert_eq!(s.len(), len);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
        }
        assert_ne!(random_alphanumeric(48), random_alphanumeric(48));
    }
}
