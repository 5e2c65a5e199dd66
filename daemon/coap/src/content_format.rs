//! CoAP Content-Format numbers and the media types the REST API shows for them.

/// (number, media type) for the formats LwM2M devices use.
const TABLE: &[(u16, &str)] = &[
    (0, "text/plain"),
    (40, "application/link-format"),
    (41, "application/xml"),
    (42, "application/octet-stream"),
    (47, "application/exi"),
    (50, "application/json"),
    (60, "application/cbor"),
    (110, "application/senml+json"),
    (112, "application/senml+cbor"),
    (1542, "application/vnd.oma.lwm2m+tlv"),
    (1543, "application/vnd.oma.lwm2m+json"),
    (11542, "application/vnd.oma.lwm2m+tlv"),
    (11543, "application/vnd.oma.lwm2m+json"),
    (11544, "application/vnd.oma.lwm2m+cbor"),
];

/// `application/json`.
pub const JSON: u16 = 50;

/// The media type of a Content-Format number, when known.
pub fn media_type(n: u16) -> Option<&'static str> {
    TABLE.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
}

/// The Content-Format number of a media type (parameters such as `; charset=utf-8` are
/// ignored). The LwM2M TLV and JSON types map to their registered numbers 11542/11543.
pub fn from_media_type(mt: &str) -> Option<u16> {
    let base = mt
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    TABLE
        .iter()
        .rev()
        .find(|(_, v)| *v == base)
        .map(|(k, _)| *k)
}

/// A Content-Format as the REST API reports it: the media type when known, else the number.
pub fn describe(n: u16) -> String {
    media_type(n)
        .map(str::to_owned)
        .unwrap_or_else(|| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions() {
        assert_eq!(media_type(0), Some("text/plain"));
        assert_eq!(from_media_type("text/plain; charset=utf-8"), Some(0));
        assert_eq!(
            from_media_type("application/vnd.oma.lwm2m+tlv"),
            Some(11542)
        );
        assert_eq!(from_media_type("image/png"), None);
        assert_eq!(describe(11543), "application/vnd.oma.lwm2m+json");
        assert_eq!(describe(9999), "9999");
    }
}
