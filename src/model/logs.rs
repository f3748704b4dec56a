//! Following a container's logs exactly (`task logs -f`): the engine prefixes each
//! line with an RFC 3339 UTC timestamp (nanoseconds, trailing zeros trimmed) and its
//! `since` filter counts whole seconds, so the worker asks from the cursor's second
//! and keeps only the lines strictly after the cursor. No time crate is needed for
//! the one fixed format the engine writes; these functions read only that format.

/// Sortable form of an engine timestamp: the fraction padded to nine digits, so that
/// string order is time order. `None` for anything else.
pub fn log_time_key(ts: &str) -> Option<String> {
    let body = ts.strip_suffix('Z')?;
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    if secs.len() != 19 || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    log_time_secs(ts)?;
    Some(format!("{secs}.{frac:0<9}"))
}

/// Seconds since the epoch of an engine timestamp (`2026-11-30T16:51:00.5Z`).
pub fn log_time_secs(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's method.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3_600 + mi * 60 + s)
}

/// The lines of `text` (each `<timestamp> <line>`) written strictly after `after`
/// (all of them when `after` is empty). Lines without a readable timestamp are kept
/// only on a first read, where there is no cursor to compare with.
pub fn log_lines_after(text: &str, after: &str) -> String {
    let cursor = log_time_key(after);
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let key = line.split_once(' ').and_then(|(ts, _)| log_time_key(ts));
        let keep = match (&cursor, key) {
            (None, _) => after.is_empty(),
            (Some(c), Some(k)) => k > *c,
            (Some(_), None) => false,
        };
        if keep {
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_timestamps_order_as_time_and_convert_to_seconds() {
        assert_eq!(log_time_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(log_time_secs("2000-03-01T00:00:01.5Z"), Some(951_868_801));
        assert_eq!(log_time_secs("2026-11-30T16:51:00.123456789Z"), Some(1_796_057_460));
        // Trimmed fractions still sort by time.
        let a = log_time_key("2026-11-30T16:51:00.1234Z").unwrap();
        let b = log_time_key("2026-11-30T16:51:00.12345Z").unwrap();
        let c = log_time_key("2026-11-30T16:51:01Z").unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
        for bad in ["", "x", "2026-11-30 16:51:00Z", "2026-13-30T16:51:00Z", "2026-11-30T16:51:00.1234567890Z"] {
            assert_eq!(log_time_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_lines_after_the_cursor_are_kept() {
        let text = "2026-11-30T16:51:00.1Z one\n2026-11-30T16:51:00.2Z two\n2026-11-30T16:51:01Z three\n";
        assert_eq!(log_lines_after(text, ""), text);
        assert_eq!(
            log_lines_after(text, "2026-11-30T16:51:00.1Z"),
            "2026-11-30T16:51:00.2Z two\n2026-11-30T16:51:01Z three\n"
        );
        assert_eq!(log_lines_after(text, "2026-11-30T16:51:01Z"), "");
        // A cursor the engine could not have written keeps nothing rather than repeating.
        assert_eq!(log_lines_after(text, "garbage"), "");
    }
}
