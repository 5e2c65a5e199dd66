//! Device credentials, as stored: a PSK per endpoint, and the certificates `/api/cert`
//! issued (issue 21).

/// The pre-shared key of one endpoint (`domain`, `ep`): a device that completes a DTLS
/// handshake with `identity` and `key` is that endpoint.
///
/// `Debug` leaves the key out: it is a secret and must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct PskRecord {
    pub domain: String,
    pub ep: String,
    /// The PSK identity the device sends in its handshake; unique across every domain
    /// (the handshake names no domain).
    pub identity: String,
    /// The key, as bytes.
    pub key: Vec<u8>,
    /// When it was provisioned (ms since the Unix epoch).
    pub created_ms: u64,
}

impl std::fmt::Debug for PskRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskRecord")
            .field("domain", &self.domain)
            .field("ep", &self.ep)
            .field("identity", &self.identity)
            .field("key", &"<secret>")
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

/// A device certificate the daemon's CA issued (`POST /api/cert`), and whether it was
/// revoked since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// The serial number, lower-case hex without separators or leading zero bytes
    /// ([`normal_serial`]).
    pub serial: String,
    /// The certificate's OU.
    pub domain: String,
    /// The certificate's CN.
    pub ep: String,
    pub issued_ms: u64,
    /// When the certificate stops being valid (its `notAfter`).
    pub not_after_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

impl CertificateRecord {
    /// Whether the certificate still proves its endpoint at `now_ms`: neither revoked nor
    /// expired.
    pub fn in_force(&self, now_ms: u64) -> bool {
        self.revoked_ms.is_none() && now_ms < self.not_after_ms
    }
}

/// The one spelling of a certificate serial number that records and lookups compare:
/// hex digits only (`:` and spaces dropped), lower case, leading zeros dropped (a DER
/// INTEGER may carry a leading zero byte that another writer leaves out).
pub fn normal_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_not_in_debug_output() {
        let r = PskRecord {
            domain: "d".into(),
            ep: "ep".into(),
            identity: "id".into(),
            key: b"secret-key-bytes".to_vec(),
            created_ms: 1,
        };
        let text = format!("{r:?}");
        assert!(!text.contains("115"), "{text}");
        assert!(!text.contains("secret-key"), "{text}");
        assert!(text.contains("<secret>"), "{text}");
    }

    #[test]
    fn serials_compare_in_one_spelling() {
        assert_eq!(normal_serial("00:4A:bc"), "4abc");
        assert_eq!(normal_serial("4abc"), "4abc");
        assert_eq!(normal_serial("0"), "0");
    }
}
