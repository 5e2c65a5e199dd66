//! RFC 3339 timestamps to and from milliseconds since the Unix epoch (UTC), for the years
//! 1970 to 9999: all this plugin needs, without a date crate.

/// The last millisecond of 9999-12-31 UTC: the latest instant accepted.
pub const MAX_MS: u64 = 253_402_300_799_999;

const MS_PER_DAY: i64 = 86_400_000;

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

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// `2026-03-01T12:34:56.789Z`: UTC, always with milliseconds.
pub fn format_ms(ms: u64) -> String {
    let ms = ms.min(MAX_MS) as i64;
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let (h, rem) = (rem / 3_600_000, rem % 3_600_000);
    let (min, rem) = (rem / 60_000, rem % 60_000);
    let (s, milli) = (rem / 1000, rem % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`, `z` and
/// a space for `T` accepted) into milliseconds since the epoch. Fractions beyond
/// milliseconds are truncated; a leap second `:60` counts as the next second.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 date-time such as \"2030-01-31T12:00:00Z\"");
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let part = b.get(from..from + len).ok_or_else(bad)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        Ok(part
            .iter()
            .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(bad()),
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt ")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &b[start..i];
        if digits.is_empty() {
            return Err(bad());
        }
        for k in 0..3 {
            millis = millis * 10 + digits.get(k).map_or(0, |d| i64::from(d - b'0'));
        }
    }
    let offset_minutes = match b.get(i) {
        Some(b'Z' | b'z') if b.len() == i + 1 => 0,
        Some(&c @ (b'+' | b'-')) if b.len() == i + 6 => {
            let oh = num(i + 1, 2)?;
            sep(i + 3, b":")?;
            let om = num(i + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let off = oh * 60 + om;
            if c == b'-' { -off } else { off }
        }
        _ => return Err(bad()),
    };
    if year < 1 || !(1..=12).contains(&month) {
        return Err(bad());
    }
    let month = month as u32;
    if day < 1 || day > i64::from(days_in_month(year, month)) {
        return Err(bad());
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day as u32);
    let ms =
        days * MS_PER_DAY + ((hour * 60 + minute - offset_minutes) * 60 + second) * 1000 + millis;
    if ms < 0 {
        return Err(format!("{s:?} is before 1970"));
    }
    let ms = ms as u64;
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
    fn days_roundtrip() {
        for days in (-1000..200_000).step_by(37) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
