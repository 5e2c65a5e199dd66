//! Time as plugins store it, milliseconds since the Unix epoch (UTC), and as they show and
//! read it: ISO 8601 / RFC 3339 text, without a date crate.
//!
//! [`format_ms`] writes `YYYY-MM-DDTHH:MM:SS.mmmZ`. [`parse_date_time`] reads the forms
//! below and checks each field's range; what a plugin accepts of them (RFC 3339 only, a
//! date alone, a leap second, ...) is its own choice, made on the [`DateTime`] it returns:
//!
//! - `YYYY-MM-DD` (a date alone), or that followed by
//! - `T`, `t` or a space, `HH:MM`, optionally `:SS` (`60`, a leap second, included), an
//!   optional fraction of a second (`.` and at least one digit; beyond milliseconds it is
//!   truncated), and
//! - an optional zone: `Z`, `z`, `±HH:MM` or `±HHMM`.

use std::time::{SystemTime, UNIX_EPOCH};

/// The last millisecond of 9999-12-31 UTC: the latest instant [`format_ms`] writes with a
/// four-digit year (so the latest whose text [`parse_date_time`] reads back).
pub const MAX_MS: u64 = 253_402_300_799_999;

const MS_PER_DAY: i64 = 86_400_000;

/// Now, in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, always with milliseconds), e.g.
/// `2016-06-13T04:00:00.000Z`. After [`MAX_MS`] the year has more than four digits.
pub fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A date or date-time as written (see the [module](self) for the forms), each field in
/// its range: a year of four digits, a month and a day that exist, hours 0 to 23, minutes
/// 0 to 59, seconds 0 to 60, a zone offset of at most 23:59.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// 0 to 9999 (proleptic Gregorian).
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to the month's last day.
    pub day: u32,
    /// `None` for a date alone (`YYYY-MM-DD`): midnight UTC.
    pub time: Option<TimeOfDay>,
}

/// The time part of a [`DateTime`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    /// 0 to 23.
    pub hour: u32,
    /// 0 to 59.
    pub minute: u32,
    /// 0 to 60 (a leap second, counted as the first second of the next minute); `None` when
    /// the text has no seconds (`HH:MM`), which means 0.
    pub second: Option<u32>,
    /// The fraction of a second in milliseconds (0 when none is written).
    pub millis: u32,
    /// `None` when the text has no zone (read as UTC).
    pub zone: Option<Zone>,
}

/// The zone of a [`TimeOfDay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// `Z` or `z`.
    Utc,
    /// `±HH:MM` (`colon`) or `±HHMM`: the local time is UTC plus `minutes`.
    Offset { minutes: i64, colon: bool },
}

impl DateTime {
    /// Milliseconds since the Unix epoch (negative before 1970).
    pub fn unix_ms(&self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        let Some(t) = self.time else {
            return days * MS_PER_DAY;
        };
        let offset = match t.zone {
            Some(Zone::Offset { minutes, .. }) => minutes,
            Some(Zone::Utc) | None => 0,
        };
        let minutes = i64::from(t.hour) * 60 + i64::from(t.minute) - offset;
        let seconds = minutes * 60 + i64::from(t.second.unwrap_or(0));
        days * MS_PER_DAY + seconds * 1000 + i64::from(t.millis)
    }
}

/// Reads a date or a date-time in one of the module's forms; `None` when `s` is in none of
/// them or a field is out of range.
pub fn parse_date_time(s: &str) -> Option<DateTime> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
    };
    let byte_is = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));

    let year = i64::from(num(0, 4)?);
    let month = byte_is(4, b"-").then(|| num(5, 2))??;
    let day = byte_is(7, b"-").then(|| num(8, 2))??;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let date = |time| DateTime {
        year,
        month,
        day,
        time,
    };
    if b.len() == 10 {
        return Some(date(None));
    }

    if !byte_is(10, b"Tt ") {
        return None;
    }
    let hour = num(11, 2)?;
    let minute = byte_is(13, b":").then(|| num(14, 2))??;
    let mut i = 16;
    let mut second = None;
    if byte_is(i, b":") {
        second = Some(num(i + 1, 2)?);
        i += 3;
    }
    if hour > 23 || minute > 59 || second.is_some_and(|s| s > 60) {
        return None;
    }
    let mut millis = 0;
    if byte_is(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &b[start..i];
        if digits.is_empty() {
            return None;
        }
        // The first three digits, padded with zeros; the rest is truncated.
        for k in 0..3 {
            millis = millis * 10 + digits.get(k).map_or(0, |d| u32::from(d - b'0'));
        }
    }

    let zone = match b.get(i) {
        None => None,
        Some(b'Z' | b'z') if b.len() == i + 1 => Some(Zone::Utc),
        Some(&sign @ (b'+' | b'-')) => {
            let oh = num(i + 1, 2)?;
            let (om, colon) = match b.len() - i {
                6 if b[i + 3] == b':' => (num(i + 4, 2)?, true),
                5 => (num(i + 3, 2)?, false),
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let minutes = i64::from(oh * 60 + om);
            Some(Zone::Offset {
                minutes: if sign == b'-' { -minutes } else { minutes },
                colon,
            })
        }
        _ => return None,
    };
    Some(date(Some(TimeOfDay {
        hour,
        minute,
        second,
        millis,
        zone,
    })))
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_of(s: &str) -> Option<i64> {
        parse_date_time(s).map(|dt| dt.unix_ms())
    }

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
            (MAX_MS, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_ms(*ms), *text, "{ms}");
            assert_eq!(ms_of(text), Some(*ms as i64), "{text}");
        }
        assert_eq!(format_ms(MAX_MS + 1), "10000-01-01T00:00:00.000Z");
    }

    #[test]
    fn parse_forms() {
        let base = 1_700_000_000_000; // 2023-11-14T22:13:20Z
        let cases: &[(&str, i64)] = &[
            ("2023-11-14", 1_699_920_000_000),
            ("2023-11-14T22:13", base - 20_000),
            ("2023-11-14T22:13Z", base - 20_000),
            ("2023-11-14T22:13:20", base),
            ("2023-11-14T22:13:20Z", base),
            ("2023-11-14t22:13:20z", base),
            ("2023-11-14 22:13:20Z", base),
            ("2023-11-14T22:13:20.5Z", base + 500),
            ("2023-11-14T22:13:20.12Z", base + 120),
            ("2023-11-14T22:13:20.123456789Z", base + 123),
            ("2023-11-14T22:13.5", base - 19_500),
            ("2023-11-14T23:13:20+01:00", base),
            ("2023-11-14T23:13:20+0100", base),
            ("2023-11-14T20:43:20-01:30", base),
            ("2023-11-14T20:43:20-0130", base),
            ("2023-11-14T22:13:60Z", base + 40_000),
            ("1969-12-31T23:59:59.000Z", -1000),
            ("0000-03-01", -62_162_035_200_000),
        ];
        for (text, ms) in cases {
            assert_eq!(ms_of(text), Some(*ms), "{text}");
        }
    }

    #[test]
    fn parse_fields() {
        let date = parse_date_time("2016-06-13").unwrap();
        assert_eq!(
            (date.year, date.month, date.day, date.time),
            (2016, 6, 13, None)
        );
        let time = |s: &str| parse_date_time(s).and_then(|dt| dt.time).unwrap();
        let offset = |minutes, colon| Some(Zone::Offset { minutes, colon });
        let cases: &[(&str, Option<u32>, u32, Option<Zone>)] = &[
            ("2016-06-13T04:05", None, 0, None),
            ("2016-06-13T04:05:06", Some(6), 0, None),
            ("2016-06-13T04:05:06.7z", Some(6), 700, Some(Zone::Utc)),
            ("2016-06-13T04:05+02:30", None, 0, offset(150, true)),
            ("2016-06-13T04:05-0230", None, 0, offset(-150, false)),
        ];
        for (text, second, millis, zone) in cases {
            let t = time(text);
            assert_eq!((t.hour, t.minute), (4, 5), "{text}");
            assert_eq!(
                (t.second, t.millis, t.zone),
                (*second, *millis, *zone),
                "{text}"
            );
        }
    }

    #[test]
    fn parse_refusals() {
        for text in [
            "",
            "2016",
            "2016-06-1",
            "2016-13-01",
            "2016-00-01",
            "2016-02-30",
            "2015-02-29",
            "2016-04-31",
            "2016-06-00",
            "2016/06/13",
            "2016-06-13X04:00",
            "2016-06-13T",
            "2016-06-13T4:00",
            "2016-06-13T04",
            "2016-06-13T04-00",
            "2016-06-13T24:00",
            "2016-06-13T04:60",
            "2016-06-13T04:00:61",
            "2016-06-13T04:00:6",
            "2016-06-13T04:00:00.",
            "2016-06-13T04:00:00.Z",
            "2016-06-13T04:00:00Zjunk",
            "2016-06-13T04:00:00+2",
            "2016-06-13T04:00:00+02:0",
            "2016-06-13T04:00:00+02000",
            "2016-06-13T04:00:00+24:00",
            "2016-06-13T04:00:00+02:60",
            "2016-06-13T04:00:00 ",
            "yesterday",
            "abcd-ef-ghTij:kl:mnZ",
            "１２３４-06-13",
            "２023-11-14T22:13:20Z",
        ] {
            assert_eq!(parse_date_time(text), None, "{text:?}");
        }
        assert!(parse_date_time("2024-02-29").is_some());
        assert!(parse_date_time("2000-02-29").is_some());
        assert!(parse_date_time("1900-02-29").is_none());
    }

    #[test]
    fn days_roundtrip() {
        for days in (-1000..200_000).step_by(37) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
