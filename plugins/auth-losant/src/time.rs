//! Timestamps: milliseconds since the Unix epoch, shown as ISO 8601 (`2016-06-13T04:00:00.000Z`,
//! the form of the seed's examples, [`format_ms`]) and read back from ISO 8601 in advanced
//! queries ([`parse_iso`]), through the `time` crate.

use ::time::format_description::BorrowedFormatItem;
use ::time::macros::format_description;
use ::time::parsing::Parsed;
use ::time::{Date, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// `creationDate` and `lastUpdated` as shown: UTC, always with milliseconds.
const SHOWN: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// What [`parse_iso`] reads: a date; after a separator, a time with optional seconds and
/// fraction; then a zone other than `Z`.
const DATE: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");
const TIME: &[BorrowedFormatItem<'_>] = format_description!(
    version = 2,
    "[hour]:[minute][optional [:[second]]][optional [.[subsecond digits:1+]]]"
);
const OFFSET: &[BorrowedFormatItem<'_>] = format_description!(
    version = 2,
    "[offset_hour sign:mandatory][optional [:]][offset_minute]"
);

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (empty past the year 9999, which [`now_ms`] never
/// gives).
pub fn format_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t.format(SHOWN).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Reads an ISO 8601 date or date-time into milliseconds since the epoch (negative before
/// 1970): `YYYY-MM-DD`, or that followed by `T` (or a space), `HH:MM`, optional `:SS`, an
/// optional fraction of a second (truncated to milliseconds), and an optional zone (`Z`,
/// `±HH:MM`, `±HHMM`; none is UTC). A leap second (`:60`) is refused.
pub fn parse_iso(s: &str) -> Option<i64> {
    // `time` would take a signed year (`+2016`) and read past ASCII digits nowhere else.
    if !s.as_bytes().first()?.is_ascii_digit() {
        return None;
    }
    let mut p = Parsed::new();
    let rest = p.parse_items(s.as_bytes(), DATE).ok()?;
    if let Some((sep, rest)) = rest.split_first() {
        if !b"Tt ".contains(sep) {
            return None;
        }
        let zone = p.parse_items(rest, TIME).ok()?;
        if !matches!(zone, b"Z" | b"z" | b"") && !p.parse_items(zone, OFFSET).ok()?.is_empty() {
            return None;
        }
    }
    let date = Date::from_calendar_date(p.year()?, p.month()?, p.day()?.get()).ok()?;
    let time = match p.hour_24() {
        None => Time::MIDNIGHT,
        Some(hour) => Time::from_hms_nano(
            hour,
            p.minute()?,
            p.second().unwrap_or(0),
            p.subsecond().unwrap_or(0) / 1_000_000 * 1_000_000,
        )
        .ok()?,
    };
    let offset = match p.offset_hour() {
        Some(h) if h.unsigned_abs() > 23 => return None,
        Some(h) => UtcOffset::from_hms(h, p.offset_minute_signed()?, 0).ok()?,
        None => UtcOffset::UTC,
    };
    let t = PrimitiveDateTime::new(date, time).assume_offset(offset);
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // `now_is_after_2020` and `format_known_instants` came from the SDK's `time` module
    // (gone: plugins use `time` themselves), its reader's forms into `parse_forms_and_refusals`.
    #[test]
    fn now_is_after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }

    #[test]
    fn format_known_instants() {
        let cases: &[(u64, &str)] = &[
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_465_790_400_000, "2016-06-13T04:00:00.000Z"),
            (1_612_189_931_000, "2021-02-01T14:32:11.000Z"),
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_ms(*ms), *text, "{ms}");
            assert_eq!(parse_iso(text), Some(*ms as i64), "{text}");
        }
    }

    #[test]
    fn parse_forms_and_refusals() {
        let ok: &[(&str, i64)] = &[
            ("2016-06-13", 1_465_776_000_000),
            ("2016-06-13T04:00", 1_465_790_400_000),
            ("2016-06-13T04:00:00Z", 1_465_790_400_000),
            ("2016-06-13 04:00:00", 1_465_790_400_000),
            ("2016-06-13T04:00:00.5Z", 1_465_790_400_500),
            ("2016-06-13T04:00:00.123456Z", 1_465_790_400_123),
            ("2016-06-13T06:00:00+02:00", 1_465_790_400_000),
            ("2016-06-13T02:30:00-0130", 1_465_790_400_000),
            ("1969-12-31T23:59:59.000Z", -1000),
            // The forms of the SDK's reader this replaces (its leap second aside).
            ("2023-11-14", 1_699_920_000_000),
            ("2023-11-14T22:13", 1_700_000_000_000 - 20_000),
            ("2023-11-14T22:13Z", 1_700_000_000_000 - 20_000),
            ("2023-11-14T22:13:20", 1_700_000_000_000),
            ("2023-11-14T22:13:20Z", 1_700_000_000_000),
            ("2023-11-14t22:13:20z", 1_700_000_000_000),
            ("2023-11-14 22:13:20Z", 1_700_000_000_000),
            ("2023-11-14T22:13:20.5Z", 1_700_000_000_000 + 500),
            ("2023-11-14T22:13:20.12Z", 1_700_000_000_000 + 120),
            ("2023-11-14T22:13:20.123456789Z", 1_700_000_000_000 + 123),
            ("2023-11-14T22:13.5", 1_700_000_000_000 - 19_500),
            ("2023-11-14T23:13:20+01:00", 1_700_000_000_000),
            ("2023-11-14T23:13:20+0100", 1_700_000_000_000),
            ("2023-11-14T20:43:20-01:30", 1_700_000_000_000),
            ("2023-11-14T20:43:20-0130", 1_700_000_000_000),
            ("1969-12-31T23:59:59.000Z", -1000),
            ("0000-03-01", -62_162_035_200_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_iso(s), Some(*ms), "{s}");
        }
        for bad in [
            "",
            "2016",
            "2016-13-01",
            "2016-02-30",
            "2015-02-29",
            "2016-06-13X04:00",
            "2016-06-13T24:00",
            "2016-06-13T04:60",
            "2016-06-13T04:00:00.",
            "2016-06-13T04:00:00Zjunk",
            "2016-06-13T04:00:00+2",
            "yesterday",
            "１２３４-06-13",
            // The SDK reader's refusals.
            "2016-06-1",
            "2016-00-01",
            "2016-04-31",
            "2016-06-00",
            "2016/06/13",
            "2016-06-13T",
            "2016-06-13T4:00",
            "2016-06-13T04",
            "2016-06-13T04-00",
            "2016-06-13T04:00:61",
            "2016-06-13T04:00:6",
            "2016-06-13T04:00:00.Z",
            "2016-06-13T04:00:00+02:0",
            "2016-06-13T04:00:00+02000",
            "2016-06-13T04:00:00+24:00",
            "2016-06-13T04:00:00+02:60",
            "2016-06-13T04:00:00 ",
            "abcd-ef-ghTij:kl:mnZ",
            "２023-11-14T22:13:20Z",
            "+2016-06-13",
        ] {
            assert_eq!(parse_iso(bad), None, "{bad:?}");
        }
        assert!(parse_iso("2024-02-29").is_some());
        assert!(parse_iso("2000-02-29").is_some());
        assert!(parse_iso("1900-02-29").is_none());
    }

    #[test]
    fn leap_second_refused() {
        assert_eq!(parse_iso("2016-12-31T23:59:60Z"), None);
        assert_eq!(parse_iso("2016-12-31T23:59:59Z"), Some(1_483_228_799_000));
        assert_eq!(parse_iso("2016-06-13T04:00.5"), Some(1_465_790_400_500));
    }
}
