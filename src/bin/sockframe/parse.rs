//! Parsers for command-line values: durations (`500ms`, `5s`, `2m`, `1h`) and byte sizes
//! (`65536`, `64KiB`, `16MiB`, `1MB`).
//!
//! Written by hand: each is a dozen lines, and a crate such as humantime or bytesize would
//! be a dependency for two value parsers.

use std::time::Duration;

/// A duration: a whole number followed by `ms`, `s`, `m` or `h`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(s);
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" if !number.is_empty() => {
            return Err(format!(
                "`{s}` needs a unit: ms, s, m or h (like 500ms or 5s)"
            ));
        }
        _ => {
            return Err(format!(
                "`{s}` is not a duration; expected a whole number and ms, s, m or h (like 500ms or 5s)"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(millis_per_unit))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is not a duration; expected a whole number and ms, s, m or h (like 500ms or 5s)"))
}

/// A size in bytes: a whole number, optionally followed by `B`, `KiB`, `MiB`, `GiB`
/// (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000), in any letter case.
pub fn size(s: &str) -> Result<usize, String> {
    let (number, unit) = split_number(s);
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "`{s}` is not a size; expected bytes, optionally with KiB, MiB, GiB, KB, MB or GB (like 65536 or 16MiB)"
            ));
        }
    };
    let n: u64 = number.parse().map_err(|_| {
        format!("`{s}` is not a size; expected a whole number of bytes, like 65536 or 16MiB")
    })?;
    n.checked_mul(multiplier)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Splits `s` (trimmed) into its leading digits and the rest (trimmed, so `16 MiB` works).
fn split_number(s: &str) -> (&str, &str) {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    (number, unit.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        assert!(duration("5").unwrap_err().contains("needs a unit"));
        for bad in [
            "",
            "s",
            "5x",
            "-5s",
            "1.5s",
            "5 s s",
            "99999999999999999999s",
        ] {
            assert!(duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("65536"), Ok(65536));
        assert_eq!(size("64KiB"), Ok(64 * 1024));
        assert_eq!(size("16MiB"), Ok(16 * 1024 * 1024));
        assert_eq!(size("16 mib"), Ok(16 * 1024 * 1024));
        assert_eq!(size("1MB"), Ok(1_000_000));
        assert_eq!(size("2GiB"), Ok(2 << 30));
        assert_eq!(size("10B"), Ok(10));
        for bad in ["", "MiB", "16M", "1.5MiB", "-1", "99999999999999999999GiB"] {
            assert!(size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
