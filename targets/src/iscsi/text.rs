//! The key=value text format of Login and Text PDUs (RFC 7143 section 6): pairs separated
//! by NUL bytes, keys up to 63 characters.

use std::collections::HashSet;
use std::fmt;

/// Longest key RFC 7143 allows.
pub const MAX_KEY_LEN: usize = 63;
/// Most pairs one exchange may carry: a login sends about 25, SendTargets one.
pub const MAX_KEYS: usize = 256;
/// Longest text one exchange may carry, all its PDUs together (CHAP values, the longest
/// RFC 7143 allows, are 8 KiB at most).
pub const MAX_TEXT_LEN: usize = 64 << 10;

/// Why a text data segment could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextError {
    /// A pair without '=' (holds the offending text).
    NoEquals(String),
    /// A key that is empty, too long or not printable.
    BadKey(String),
    /// Bytes that are not UTF-8.
    NotUtf8,
    /// The same key twice in one exchange.
    Duplicate(String),
    /// More than `MAX_KEYS` pairs.
    TooManyKeys,
    /// More than `MAX_TEXT_LEN` bytes (holds the length).
    TooLong(usize),
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::NoEquals(s) => write!(f, "text pair '{s}' has no '='"),
            TextError::BadKey(k) => write!(f, "invalid text key '{k}'"),
            TextError::NotUtf8 => write!(f, "text is not UTF-8"),
            TextError::Duplicate(k) => write!(f, "key '{k}' sent twice"),
            TextError::TooManyKeys => write!(f, "more than {MAX_KEYS} keys"),
            TextError::TooLong(len) => {
                write!(f, "{len} bytes of text exceed the limit of {MAX_TEXT_LEN}")
            }
        }
    }
}

impl std::error::Error for TextError {}

/// Ordered key=value pairs, as received or to be sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextPairs(pub Vec<(String, String)>);

impl TextPairs {
    /// Reads a data segment; trailing NUL padding and a missing final NUL are tolerated.
    /// Linear in the length; refuses more than `MAX_TEXT_LEN` bytes or `MAX_KEYS` pairs.
    pub fn parse(data: &[u8]) -> Result<TextPairs, TextError> {
        if data.len() > MAX_TEXT_LEN {
            return Err(TextError::TooLong(data.len()));
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            if pairs.len() == MAX_KEYS {
                return Err(TextError::TooManyKeys);
            }
            let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| TextError::NoEquals(s.to_string()))?;
            if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TextError::BadKey(k.to_string()));
            }
            if !seen.insert(k) {
                return Err(TextError::Duplicate(k.to_string()));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(TextPairs(pairs))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Appends a pair.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// True when no pair is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The data segment: every pair followed by a NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_in_order() {
        let mut p = TextPairs::default();
        p.push("InitiatorName", "iqn.2000-01.x:y");
        p.push("HeaderDigest", "CRC32C,None");
        p.push("Empty", "");
        let bytes = p.encode();
        assert_eq!(TextPairs::parse(&bytes).unwrap(), p);
        assert_eq!(p.get("HeaderDigest"), Some("CRC32C,None"));
    }

    #[test]
    fn padding_and_missing_final_nul_are_tolerated() {
        let p = TextPairs::parse(b"A=1\0B=2\0\0\0").unwrap();
        assert_eq!(p.0.len(), 2);
        assert_eq!(TextPairs::parse(b"A=1\0B=2").unwrap(), p);
    }

    #[test]
    fn malformed_text_is_a_typed_error() {
        assert_eq!(
            TextPairs::parse(b"novalue\0"),
            Err(TextError::NoEquals("novalue".into()))
        );
        assert_eq!(
            TextPairs::parse(b"=x\0"),
            Err(TextError::BadKey(String::new()))
        );
        assert_eq!(
            TextPairs::parse(b"A=1\0A=2\0"),
            Err(TextError::Duplicate("A".into()))
        );
        assert_eq!(
            TextPairs::parse(&[b'A', b'=', 0xff]),
            Err(TextError::NotUtf8)
        );
        let long = format!("{}=1", "K".repeat(64));
        assert!(matches!(
            TextPairs::parse(long.as_bytes()),
            Err(TextError::BadKey(_))
        ));
    }

    /// `n` distinct pairs `Knnnnn=v`, NUL-terminated.
    fn distinct_keys(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("K{i:06}=v\0").into_bytes())
            .collect()
    }

    #[test]
    fn parsing_is_linear_and_bounded_in_keys_and_length() {
        let at_cap = distinct_keys(MAX_KEYS);
        let start = std::time::Instant::now();
        assert_eq!(TextPairs::parse(&at_cap).unwrap().0.len(), MAX_KEYS);
        assert_eq!(
            TextPairs::parse(&distinct_keys(MAX_KEYS + 1)),
            Err(TextError::TooManyKeys)
        );
        let mut long = b"A=".to_vec();
        long.resize(MAX_TEXT_LEN + 1, b'x');
        assert_eq!(
            TextPairs::parse(&long),
            Err(TextError::TooLong(MAX_TEXT_LEN + 1))
        );
        // 256 KiB of distinct keys (27,000): refused at once, not compared pairwise.
        let huge = distinct_keys(27_000);
        assert!(huge.len() >= 256 << 10);
        assert!(TextPairs::parse(&huge).is_err());
        // A duplicate at the very end is still found among the first keys.
        let mut dup = distinct_keys(MAX_KEYS - 1);
        dup.extend_from_slice(b"K000000=w\0");
        assert_eq!(
            TextPairs::parse(&dup),
            Err(TextError::Duplicate("K000000".into()))
        );
        assert!(start.elapsed() < std::time::Duration::from_millis(50));
    }
}
