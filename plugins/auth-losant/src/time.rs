//! Timestamps: milliseconds since the Unix epoch, shown as ISO 8601 (`2016-06-13T04:00:00.000Z`,
//! the form of the seed's examples, by [`connectord_plugin_sdk::time::format_ms`]) and read
//! back from ISO 8601 in advanced queries ([`parse_iso`]).

use connectord_plugin_sdk::time::parse_date_time;

/// Reads an ISO 8601 date or date-time into milliseconds since the epoch (negative before
/// 1970): `YYYY-MM-DD`, or that followed by `T` (or a space), `HH:MM`, optional `:SS`, an
/// optional fraction of a second, and an optional zone (`Z`, `±HH:MM`, `±HHMM`; none is UTC).
/// A leap second (`:60`) is refused.
pub fn parse_iso(s: &str) -> Option<i64> {
    let dt = parse_date_time(s)?;
    if dt.time.is_some_and(|t| t.second == Some(60)) {
        return None;
    }
    Some(dt.unix_ms())
}

#[cfg(test)]
mod tests {
    // The formatting tests are the SDK's (`connectord_plugin_sdk::time`).
    use super::*;

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
        ] {
            assert_eq!(parse_iso(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn leap_second_refused() {
        assert_eq!(parse_iso("2016-12-31T23:59:60Z"), None);
        assert_eq!(parse_iso("2016-12-31T23:59:59Z"), Some(1_483_228_799_000));
        assert_eq!(parse_iso("2016-06-13T04:00.5"), Some(1_465_790_400_500));
    }
}
