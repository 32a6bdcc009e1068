//! Hot path: RFC 5424 / RFC 3339 timestamps as UTC nanoseconds since the Unix epoch.

/// A point in time, nanoseconds since 1970-01-01T00:00:00Z (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

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

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl Timestamp {
    /// Parses `YYYY-MM-DDThh:mm:ss[.frac](Z|+hh:mm|-hh:mm)`; up to 9 fraction digits.
    /// Times before 1677-09-21 or after 2262-04-11 (beyond i64 nanoseconds) are clamped
    /// to the first or last representable instant.
    pub fn parse(s: &[u8]) -> Option<Timestamp> {
        if s.len() < 20 || s[4] != b'-' || s[7] != b'-' || (s[10] != b'T' && s[10] != b't') {
            return None;
        }
        if s[13] != b':' || s[16] != b':' {
            return None;
        }
        let y = digits(&s[0..4])?;
        let mo = digits(&s[5..7])?;
        let d = digits(&s[8..10])?;
        let h = digits(&s[11..13])?;
        let mi = digits(&s[14..16])?;
        let sec = digits(&s[17..19])?;
        if !(1..=12).contains(&mo)
            || d == 0
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            // RFC 5424 §6.2.3.1: leap seconds MUST NOT be used (a 60 would roll into the
            // next minute and sort the line after the ones that follow it).
            || sec > 59
        {
            return None;
        }
        let mut i = 19;
        let mut nanos = 0u32;
        if s[i] == b'.' {
            i += 1;
            let start = i;
            while i < s.len() && s[i].is_ascii_digit() {
                if i - start < 9 {
                    nanos = nanos * 10 + u32::from(s[i] - b'0');
                }
                i += 1;
            }
            let n = i - start;
            if n == 0 || n > 9 {
                return None;
            }
            for _ in n..9 {
                nanos *= 10;
            }
        }
        let offset_secs: i64 = match s.get(i..)? {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), oh1, oh2, b':', om1, om2] => {
                let oh = i64::from(digits(&[*oh1, *oh2])?);
                let om = i64::from(digits(&[*om1, *om2])?);
                if oh > 23 || om > 59 {
                    return None;
                }
                let off = oh * 3600 + om * 60;
                if *sign == b'-' {
                    -off
                } else {
                    off
                }
            }
            _ => return None,
        };
        let days = days_from_civil(i64::from(y), mo, d);
        let secs =
            days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec) - offset_secs;
        // i64 nanoseconds reach from 1677-09-21T00:12:43.145224192Z to
        // 2262-04-11T23:47:16.854775807Z. A valid time outside that (a wrong clock, a
        // placeholder like 0001-01-01) is clamped to the nearest end rather than refused:
        // refusing would turn the whole message raw and lose its app. Clamped times sort
        // at the edges and all compare equal at each end.
        let n = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Some(Timestamp(
            n.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
        ))
    }

    /// Writes RFC 3339 in UTC with the fraction's trailing zeros trimmed, as Go's
    /// `time.RFC3339Nano` does: `2009-11-10T23:00:00.123456Z`.
    pub fn write_rfc3339(self, out: &mut Vec<u8>) {
        let secs = self.0.div_euclid(1_000_000_000);
        let mut nanos = self.0.rem_euclid(1_000_000_000) as u32;
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400) as u32;
        let two = |v: u32, sep: u8, out: &mut Vec<u8>| {
            out.push(b'0' + (v / 10) as u8);
            out.push(b'0' + (v % 10) as u8);
            out.push(sep);
        };
        let y = y.clamp(0, 9999) as u32;
        out.extend_from_slice(&[
            b'0' + (y / 1000) as u8,
            b'0' + (y / 100 % 10) as u8,
            b'0' + (y / 10 % 10) as u8,
            b'0' + (y % 10) as u8,
            b'-',
        ]);
        two(m, b'-', out);
        two(d, b'T', out);
        two(sod / 3600, b':', out);
        two(sod / 60 % 60, b':', out);
        out.push(b'0' + (sod % 60 / 10) as u8);
        out.push(b'0' + (sod % 10) as u8);
        if nanos > 0 {
            out.push(b'.');
            let mut width = 9;
            while nanos.is_multiple_of(10) {
                nanos /= 10;
                width -= 1;
            }
            let mut tmp = [b'0'; 9];
            for slot in tmp[..width].iter_mut().rev() {
                *slot = b'0' + (nanos % 10) as u8;
                nanos /= 10;
            }
            out.extend_from_slice(&tmp[..width]);
        }
        out.push(b'Z');
    }

    /// [`Timestamp::write_rfc3339`] into a new `String` (not for the hot path).
    pub fn to_rfc3339(self) -> String {
        let mut v = Vec::with_capacity(32);
        self.write_rfc3339(&mut v);
        String::from_utf8(v).unwrap_or_default()
    }

    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_table() {
        let cases = [
            (
                "2009-11-10T23:00:00.123456Z",
                Some("2009-11-10T23:00:00.123456Z"),
            ),
            ("2009-11-10T23:00:00Z", Some("2009-11-10T23:00:00Z")),
            (
                "2009-11-10T23:00:00.120000Z",
                Some("2009-11-10T23:00:00.12Z"),
            ),
            (
                "2009-11-11T00:30:00.5+01:30",
                Some("2009-11-10T23:00:00.5Z"),
            ),
            (
                "2009-11-10T20:00:00.000001-03:00",
                Some("2009-11-10T23:00:00.000001Z"),
            ),
            ("2003-10-11T22:14:15.003Z", Some("2003-10-11T22:14:15.003Z")),
            ("1970-01-01T00:00:00Z", Some("1970-01-01T00:00:00Z")),
            (
                "2000-02-29T12:00:00.123456789Z",
                Some("2000-02-29T12:00:00.123456789Z"),
            ),
            ("2001-02-29T12:00:00Z", None),
            ("2016-12-31T23:59:60Z", None),
            ("2016-12-31T23:59:59.999Z", Some("2016-12-31T23:59:59.999Z")),
            ("2009-13-10T23:00:00Z", None),
            ("2009-11-10 23:00:00Z", None),
            ("2009-11-10T23:00:00", None),
            ("2009-11-10T23:00:00.Z", None),
            ("2009-11-10T23:00:00.1234567890Z", None),
            ("2009-11-10T23:00:00+0100", None),
            // Outside what i64 nanoseconds can hold: clamped to the nearest end.
            (
                "2300-01-01T00:00:00Z",
                Some("2262-04-11T23:47:16.854775807Z"),
            ),
            (
                "9999-12-31T23:59:59.999999999Z",
                Some("2262-04-11T23:47:16.854775807Z"),
            ),
            (
                "0001-01-01T00:00:00Z",
                Some("1677-09-21T00:12:43.145224192Z"),
            ),
            (
                "1677-09-21T00:12:43.145224191Z",
                Some("1677-09-21T00:12:43.145224192Z"),
            ),
            (
                "1677-09-21T00:12:43.145224193Z",
                Some("1677-09-21T00:12:43.145224193Z"),
            ),
            (
                "2262-04-11T23:47:16.854775807Z",
                Some("2262-04-11T23:47:16.854775807Z"),
            ),
            ("-", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = Timestamp::parse(input.as_bytes()).map(Timestamp::to_rfc3339);
            assert_eq!(got.as_deref(), want, "{input}");
        }
    }

    #[test]
    fn ordering_across_offsets() {
        let a = Timestamp::parse(b"2009-11-10T23:00:00Z").unwrap();
        let b = Timestamp::parse(b"2009-11-11T00:00:00.000001+01:00").unwrap();
        assert!(b > a);
        assert_eq!(a.0, 1_257_894_000_000_000_000);
    }
}
