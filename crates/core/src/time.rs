//! Timestamps: RFC 3339 UTC strings with millisecond precision, so they sort as text and read
//! well in JSON and SQLite alike.

use std::time::{Duration, SystemTime};

/// Now, as an RFC 3339 UTC string.
pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now())
}

/// `t` as an RFC 3339 UTC string with millisecond precision.
pub fn format_rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 timestamp made by [`format_rfc3339`].
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

/// Time elapsed since `s`, or zero when `s` is unreadable or in the future.
pub fn age(s: &str) -> Duration {
    parse_rfc3339(s).and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_default()
}

/// A short human rendering of a duration: `850ms`, `12.3s`, `4m05s`, `3h12m`, `2d04h`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_renders() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z'));
        assert!(parse_rfc3339(&now).is_some());
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 12 * 60)), "3h12m");
        assert_eq!(human_duration(Duration::from_secs(2 * 86400 + 4 * 3600)), "2d04h");
    }
}
