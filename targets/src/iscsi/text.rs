//! The key=value text format of Login and Text PDUs (RFC 7143 section 6): pairs separated
//! by NUL bytes, keys up to 63 characters.

use std::fmt;

/// Longest key RFC 7143 allows.
pub const MAX_KEY_LEN: usize = 63;

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
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::NoEquals(s) => write!(f, "text pair '{s}' has no '='"),
            TextError::BadKey(k) => write!(f, "invalid text key '{k}'"),
            TextError::NotUtf8 => write!(f, "text is not UTF-8"),
            TextError::Duplicate(k) => write!(f, "key '{k}' sent twice"),
        }
    }
}

impl std::error::Error for TextError {}

/// Ordered key=value pairs, as received or to be sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextPairs(pub Vec<(String, String)>);

impl TextPairs {
    /// Reads a data segment; trailing NUL padding and a missing final NUL are tolerated.
    pub fn parse(data: &[u8]) -> Result<TextPairs, TextError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| TextError::NoEquals(s.to_string()))?;
            if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TextError::BadKey(k.to_string()));
            }
            if pairs.iter().any(|(have, _)| have == k) {
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
}
