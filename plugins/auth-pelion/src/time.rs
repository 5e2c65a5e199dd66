//! RFC 3339 timestamps to and from milliseconds since the Unix epoch (UTC), for the years
//! 1970 to 9999, through the `time` crate.

use ::time::format_description::BorrowedFormatItem;
use ::time::format_description::well_known::Rfc3339;
use ::time::macros::format_description;
use ::time::{Duration, OffsetDateTime};

/// The last millisecond of 9999-12-31 UTC: the latest instant with a four-digit year.
pub const MAX_MS: u64 = 253_402_300_799_999;

/// How timestamps are shown: UTC, always with milliseconds.
const SHOWN: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// `2026-03-01T12:34:56.789Z`: UTC, always with milliseconds; instants after [`MAX_MS`]
/// are shown as [`MAX_MS`].
pub fn format_ms(ms: u64) -> String {
    let nanos = i128::from(ms.min(MAX_MS)) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(SHOWN).ok())
        // Unreachable: every instant up to MAX_MS is in range and has four year digits.
        .unwrap_or_default()
}

/// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`, `z` and
/// a space for `T` accepted) into milliseconds since the epoch. Fractions beyond
/// milliseconds are truncated; a leap second `:60` counts as the next second.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 date-time such as \"2030-01-31T12:00:00Z\"");
    // `time` takes any separator and a leap second only where one can be (23:59:60 UTC at a
    // month's end, read as 23:59:59.999999999): both are narrowed or widened here.
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return Err(bad());
    }
    let (text, leap) = match s.get(17..19) {
        Some("60") => (format!("{}59{}", &s[..17], &s[19..]), Duration::SECOND),
        _ => (s.to_string(), Duration::ZERO),
    };
    let t = OffsetDateTime::parse(&text, &Rfc3339).map_err(|_| bad())? + leap;
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    if ms < 0 {
        return Err(format!("{s:?} is before 1970"));
    }
    let ms = u64::try_from(ms).map_err(|_| bad())?;
    if ms > MAX_MS {
        return Err(format!("{s:?} is after the year 9999"));
    }
    Ok(ms)
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
        assert_eq!(format_ms(MAX_MS + 1), format_ms(MAX_MS));
        assert!(now_ms() > 1_577_836_800_000);
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
            ("2016-12-31T23:59:60Z", 1_483_228_800_000),
            ("2016-12-31T23:59:60.5Z", 1_483_228_800_500),
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
            "2023-11-14X22:13:20Z",
            "2023-11-14T22:13:20+02:60",
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
