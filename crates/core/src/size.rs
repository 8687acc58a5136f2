//! Sizes given by users (`512M`, `2G`, `2048`) and the limits banger accepts for VM resources.

/// Why a size or resource figure was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The text is not a number with an optional unit.
    #[error("'{0}' is not a size; write a number of MiB or one with a unit, e.g. 512M, 2G")]
    Unreadable(String),
    /// The figure is outside what banger accepts.
    #[error("{what} {value} is out of range; use {min} to {max}")]
    OutOfRange {
        /// Which figure.
        what: &'static str,
        /// The figure given.
        value: u64,
        /// The smallest accepted.
        min: u64,
        /// The largest accepted.
        max: u64,
    },
}

/// vCPU limits.
pub const VCPUS: (u64, u64) = (1, 64);
/// Memory limits in MiB.
pub const MEMORY_MIB: (u64, u64) = (64, 1024 * 1024);
/// Work-disk limits in MiB.
pub const DISK_MIB: (u64, u64) = (64, 16 * 1024 * 1024);

/// Parses a size into MiB. A bare number is MiB; units K, M, G, T (optionally followed by `i`
/// and/or `B`, any case) are binary.
pub fn parse_mib(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| SizeError::Unreadable(text.to_owned()))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let mib = match unit {
        "" | "m" => Some(n),
        "k" => Some(n / 1024),
        "g" => n.checked_mul(1024),
        "t" => n.checked_mul(1024 * 1024),
        _ => None,
    };
    mib.ok_or_else(|| SizeError::Unreadable(text.to_owned()))
}

/// Checks `value` against `(min, max)`.
pub fn check_range(what: &'static str, value: u64, (min, max): (u64, u64)) -> Result<u64, SizeError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(SizeError::OutOfRange { what, value, min, max })
    }
}

/// Renders MiB for humans: `512M`, `2G`, `1.5G`.
pub fn human_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else if mib >= 1024 {
        format!("{:.1}G", mib as f64 / 1024.0)
    } else {
        format!("{mib}M")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("2GiB"), Ok(2048));
        assert_eq!(parse_mib("1t"), Ok(1024 * 1024));
        assert_eq!(parse_mib("2048k"), Ok(2));
        assert!(parse_mib("lots").is_err());
        assert!(parse_mib("12X").is_err());
        assert!(parse_mib("").is_err());
        assert_eq!(human_mib(2048), "2G");
        assert_eq!(human_mib(1536), "1.5G");
        assert_eq!(human_mib(512), "512M");
    }

    #[test]
    fn checks_ranges() {
        assert_eq!(check_range("vcpus", 2, VCPUS), Ok(2));
        assert!(check_range("vcpus", 0, VCPUS).is_err());
        assert!(check_range("memory", 10, MEMORY_MIB).is_err());
    }
}
