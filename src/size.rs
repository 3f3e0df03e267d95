//! Human sizes and durations: parsing what people type ("4G", "512MiB", "15m") and
//! formatting byte counts for people ("4.0 GiB").
//!
//! Units are always binary: "4G", "4GiB" and "4GB" all mean 4 × 2^30 bytes. Disk vendors'
//! decimal gigabytes have no place in a block target's configuration, and accepting "GB" as
//! binary is what qemu-img and most storage tools do, so users are not surprised.

use std::fmt;
use std::time::Duration;

/// Why a size or duration string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Nothing to parse.
    Empty,
    /// The number part is missing or not a whole number.
    BadNumber(String),
    /// The unit is not one we know.
    BadUnit { input: String, unit: String },
    /// The value does not fit in 64 bits.
    TooLarge(String),
    /// A decimal size that is not a whole number of bytes ("1.3K").
    NotWholeBytes(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Empty => write!(f, "empty value"),
            SizeError::BadNumber(s) => write!(f, "'{s}' does not start with a whole number"),
            SizeError::BadUnit { input, unit } => write!(f, "unknown unit '{unit}' in '{input}'"),
            SizeError::TooLarge(s) => write!(f, "'{s}' is too large"),
            SizeError::NotWholeBytes(s) => write!(f, "'{s}' is not a whole number of bytes"),
        }
    }
}

impl std::error::Error for SizeError {}

/// Splits "64K" into (64, "K"), trimming spaces around and between.
fn split_number(input: &str) -> Result<(u64, &str), SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(SizeError::BadNumber(input.to_string()));
    }
    let number = s[..digits]
        .parse::<u64>()
        .map_err(|_| SizeError::TooLarge(input.to_string()))?;
    Ok((number, s[digits..].trim()))
}

/// Parses a size in bytes: "4096", "64K", "512MiB", "4G", "4GB", "1T", "1.5G" (binary
/// units, case insensitive; K M G T P, with optional "i" and "B"; a decimal must come to a
/// whole number of bytes).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let (number, rest) = split_number(input)?;
    let (fraction, unit) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            if n == 0 {
                return Err(SizeError::BadNumber(input.to_string()));
            }
            (&r[..n], r[n..].trim())
        }
        None => ("", rest),
    };
    let upper = unit.to_ascii_uppercase();
    let prefix = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let shift = match prefix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => {
            return Err(SizeError::BadUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    // "iB" / "B" alone with no prefix: "4096B" is fine, "4096iB" is not.
    if prefix.is_empty() && upper == "IB" {
        return Err(SizeError::BadUnit {
            input: input.to_string(),
            unit: unit.to_string(),
        });
    }
    let whole = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(input.to_string()))?;
    if fraction.is_empty() {
        return Ok(whole);
    }
    // Exactly, in integers: fraction × 2^shift / 10^digits must leave no remainder.
    let digits = fraction.trim_end_matches('0');
    if digits.len() > 18 {
        return Err(SizeError::NotWholeBytes(input.to_string()));
    }
    let numerator = digits.parse::<u128>().unwrap_or(0) << shift;
    let denominator = 10u128.pow(digits.len() as u32);
    if numerator % denominator != 0 {
        return Err(SizeError::NotWholeBytes(input.to_string()));
    }
    whole
        .checked_add((numerator / denominator) as u64)
        .ok_or_else(|| SizeError::TooLarge(input.to_string()))
}

/// Parses a duration: "30s", "15m", "1h", "2d" (a bare number is seconds).
pub fn parse_duration(input: &str) -> Result<Duration, SizeError> {
    let (number, unit) = split_number(input)?;
    let seconds_per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(SizeError::BadUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    number
        .checked_mul(seconds_per)
        .map(Duration::from_secs)
        .ok_or_else(|| SizeError::TooLarge(input.to_string()))
}

/// A size in bytes read from configuration: a string with a unit ("4G") or an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteSizeVisitor;
        impl serde::de::Visitor<'_> for ByteSizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"4G\", \"512MiB\", \"64K\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(|e| {
                    E::custom(format!(
                        "{e}, expected a size like \"4G\", \"512MiB\" or \"64K\""
                    ))
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
        }
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

/// Formats a byte count for people: "512 B", "64.0 KiB", "4.0 GiB", "1.5 TiB".
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds per unit of the duration formats, largest first.
const TIME_UNITS: [(u64, &str); 4] = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];

/// Formats a whole number of seconds the way `parse_duration` reads it back: "1h", "90s".
pub fn format_duration(secs: u64) -> String {
    for &(per, unit) in &TIME_UNITS[..3] {
        if secs != 0 && secs.rem_euclid(per) == 0 {
            return format!("{}{unit}", secs / per);
        }
    }
    format!("{secs}s")
}

/// A time left, for people: the two largest non-zero units ("59m 59s", "1h", "2d 3h").
pub fn format_remaining(secs: u64) -> String {
    let parts: Vec<String> = TIME_UNITS
        .iter()
        .scan(secs, |left, &(per, unit)| {
            let n = *left / per;
            *left %= per;
            Some((n, unit))
        })
        .filter(|&(n, _)| n > 0)
        .take(2)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_shows_two_units() {
        assert_eq!(format_remaining(3600), "1h");
        assert_eq!(format_remaining(3599), "59m 59s");
        assert_eq!(format_remaining(90_061), "1d 1h");
        assert_eq!(format_remaining(0), "0s");
    }

    #[test]
    fn sizes_use_binary_units_whatever_the_spelling() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4GB"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size(" 8 G "), Ok(8 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn decimal_sizes_are_exact_and_must_come_to_whole_bytes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size("2.25 MiB"), Ok(9 << 18));
        assert_eq!(parse_size("1.0G"), Ok(1 << 30));
        assert_eq!(
            parse_size("1.3K"),
            Err(SizeError::NotWholeBytes("1.3K".into()))
        );
        assert_eq!(parse_size("1.G"), Err(SizeError::BadNumber("1.G".into())));
        assert_eq!(
            parse_size("1.5"),
            Err(SizeError::NotWholeBytes("1.5".into()))
        );
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("G"), Err(SizeError::BadNumber("G".into())));
        assert_eq!(parse_size("-4G"), Err(SizeError::BadNumber("-4G".into())));
        assert_eq!(
            parse_size("4X"),
            Err(SizeError::BadUnit {
                input: "4X".into(),
                unit: "X".into()
            })
        );
        assert!(matches!(parse_size("4iB"), Err(SizeError::BadUnit { .. })));
        assert_eq!(
            parse_size("99999999P"),
            Err(SizeError::TooLarge("99999999P".into()))
        );
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn durations_parse_seconds_minutes_hours_days() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(matches!(
            parse_duration("1w"),
            Err(SizeError::BadUnit { .. })
        ));
        assert_eq!(parse_duration(""), Err(SizeError::Empty));
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 10), "64.0 KiB");
        assert_eq!(format_size(4 << 30), "4.0 GiB");
        assert_eq!(format_size(3 << 39), "1.5 TiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_format_in_their_largest_whole_unit() {
        assert_eq!(format_duration(3600), "1h");
        assert_eq!(format_duration(90), "90s");
        assert_eq!(format_duration(900), "15m");
        assert_eq!(format_duration(172_800), "2d");
        assert_eq!(format_duration(0), "0s");
    }
}
