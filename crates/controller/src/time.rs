//! Time as the controller records and shows it: Unix seconds, formatted for people. Below
//! every other module, so the logic, the CLI and the notifier share one clock and one format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Formats a Unix time as UTC, `2026-11-29 14:31:39Z`, or `-` for zero.
pub fn fmt_time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    // RFC 3339 has four-digit years: a later time (which only a hostile or mistyped input
    // gives) is shown as its number instead of failing to format.
    if unix > LAST_RFC3339_SECOND {
        return format!("@{unix}");
    }
    let t = UNIX_EPOCH + Duration::from_secs(unix as u64);
    humantime::format_rfc3339_seconds(t).to_string().replace('T', " ")
}

/// 9999-12-31 23:59:59 UTC.
pub const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// Formats how long ago a Unix time was, `12s ago`.
pub fn fmt_ago(unix: i64) -> String {
    if unix <= 0 {
        return "never".into();
    }
    let secs = (now() - unix).max(0) as u64;
    format!("{} ago", humantime::format_duration(Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_year_9999_format_without_panicking() {
        assert_eq!(fmt_time(LAST_RFC3339_SECOND), "9999-12-31 23:59:59Z");
        assert_eq!(fmt_time(LAST_RFC3339_SECOND + 1), format!("@{}", LAST_RFC3339_SECOND + 1));
        assert_eq!(fmt_time(i64::MAX), format!("@{}", i64::MAX));
    }

    #[test]
    fn times_format_for_people() {
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_time(1_795_962_699), "2026-11-29 14:31:39Z");
        assert_eq!(fmt_ago(0), "never");
        assert!(fmt_ago(now() - 12).ends_with("s ago"));
    }
}
