//! RFC 3339 timestamps to and from milliseconds since the Unix epoch (UTC), for the years
//! 1970 to 9999, on top of the SDK's [`connectord_plugin_sdk::time`].

use connectord_plugin_sdk::time::{DateTime, Zone, parse_date_time};

pub use connectord_plugin_sdk::time::MAX_MS;

/// `2026-03-01T12:34:56.789Z`: UTC, always with milliseconds; instants after [`MAX_MS`]
/// are shown as [`MAX_MS`].
pub fn format_ms(ms: u64) -> String {
    connectord_plugin_sdk::time::format_ms(ms.min(MAX_MS))
}

/// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`, `z` and
/// a space for `T` accepted) into milliseconds since the epoch. Fractions beyond
/// milliseconds are truncated; a leap second `:60` counts as the next second.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 date-time such as \"2030-01-31T12:00:00Z\"");
    let dt = parse_date_time(s).ok_or_else(bad)?;
    if !is_rfc3339(&dt) {
        return Err(bad());
    }
    let ms = dt.unix_ms();
    if ms < 0 {
        return Err(format!("{s:?} is before 1970"));
    }
    let ms = ms as u64;
    if ms > MAX_MS {
        return Err(format!("{s:?} is after the year 9999"));
    }
    Ok(ms)
}

/// What RFC 3339 requires of the SDK's wider forms: a year from 1, a time with seconds,
/// and a zone, `Z` or `±HH:MM`.
fn is_rfc3339(dt: &DateTime) -> bool {
    dt.year >= 1
        && dt.time.is_some_and(|t| {
            t.second.is_some()
                && matches!(t.zone, Some(Zone::Utc | Zone::Offset { colon: true, .. }))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_known_instants() {
        let cases: &[(u64, &str)] = &[
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (MAX_MS, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_ms(*ms), *text);
            assert_eq!(parse_rfc3339_ms(text), Ok(*ms), "{text}");
        }
    }

    #[test]
    fn parse_variants() {
        let base = 1_700_000_000_000; // 2023-11-14T22:13:20Z
        let cases: &[(&str, u64)] = &[
            ("2023-11-14T22:13:20Z", base),
            ("2023-11-14t22:13:20z", base),
            ("2023-11-14 22:13:20Z", base),
            ("2023-11-14T22:13:20.5Z", base + 500),
            ("2023-11-14T22:13:20.123456789Z", base + 123),
            ("2023-11-14T23:13:20+01:00", base),
            ("2023-11-14T20:43:20-01:30", base),
            ("2023-11-14T22:13:60Z", base + 40_000),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_rfc3339_ms(text), Ok(*ms), "{text}");
        }
    }

    #[test]
    fn parse_refusals() {
        for text in [
            "",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20+0100",
            "2023-11-14T22:13:20.Z",
            "2023-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2023-04-31T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:60:00Z",
            "2023-11-14T22:13:61Z",
            "2023-11-14T22:13:20+24:00",
            "2023-11-14T22:13:20Zjunk",
            "1969-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "２023-11-14T22:13:20Z",
            "abcd-ef-ghTij:kl:mnZ",
        ] {
            assert!(parse_rfc3339_ms(text).is_err(), "{text:?}");
        }
        assert!(parse_rfc3339_ms("2024-02-29T00:00:00Z").is_ok());
    }

    #[test]
    fn refuses_the_wider_iso_8601_forms() {
        for text in [
            "2023-11-14T22:13Z",
            "2023-11-14T22:13.5Z",
            "2023-11-14T22:13+01:00",
            "2023-11-14T23:13:20+0100",
            "2023-11-14T22:13:20.5",
        ] {
            assert!(parse_rfc3339_ms(text).is_err(), "{text:?}");
        }
    }
}
