//! Timestamps: milliseconds since the Unix epoch, shown as ISO 8601 (`2016-06-13T04:00:00.000Z`,
//! the form of the seed's examples) and read back from ISO 8601 in advanced queries.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn format_iso(ms: u64) -> String {
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

/// Reads an ISO 8601 date or date-time into milliseconds since the epoch (negative before
/// 1970): `YYYY-MM-DD`, or that followed by `T` (or a space), `HH:MM`, optional `:SS`, an
/// optional fraction of a second, and an optional zone (`Z`, `±HH:MM`, `±HHMM`; none is UTC).
pub fn parse_iso(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo as u32) {
        return None;
    }
    let mut ms = days_from_civil(y, mo as u32, d as u32) * 86_400_000;
    if b.len() == 10 {
        return Some(ms);
    }
    if b[10] != b'T' && b[10] != b't' && b[10] != b' ' {
        return None;
    }
    let mut i = 11;
    let h = num(i, 2)?;
    if b.get(i + 2) != Some(&b':') {
        return None;
    }
    let mi = num(i + 3, 2)?;
    i += 5;
    let mut sec = 0;
    if b.get(i) == Some(&b':') {
        sec = num(i + 1, 2)?;
        i += 3;
    }
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    ms += (h * 3600 + mi * 60 + sec) * 1000;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Milliseconds: the first three digits (padded), the rest truncated.
        let digits: String = s[start..i].chars().chain("00".chars()).take(3).collect();
        ms += digits.parse::<i64>().ok()?;
    }
    match b.get(i) {
        None => Some(ms),
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => Some(ms),
        Some(&sign @ (b'+' | b'-')) => {
            let oh = num(i + 1, 2)?;
            let om = match b.len() - i {
                6 if b[i + 3] == b':' => num(i + 4, 2)?,
                5 => num(i + 3, 2)?,
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = (oh * 60 + om) * 60_000;
            Some(if sign == b'+' {
                ms - offset
            } else {
                ms + offset
            })
        }
        _ => None,
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> i64 {
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
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
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

    #[test]
    fn format_known_instants() {
        let cases: &[(u64, &str)] = &[
            (0, "1970-01-01T00:00:00.000Z"),
            (1_465_790_400_000, "2016-06-13T04:00:00.000Z"),
            (1_612_189_931_000, "2021-02-01T14:32:11.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
        ];
        for (ms, iso) in cases {
            assert_eq!(format_iso(*ms), *iso, "{ms}");
            assert_eq!(parse_iso(iso), Some(*ms as i64), "{iso}");
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
}
