//! CHAP authentication for iSCSI login (RFC 7143 section 12.1.3, RFC 1994): MD5 only,
//! one-way (the initiator proves its secret) or mutual (the target proves its own too).

use md5::{Digest, Md5};

use super::text::TextPairs;

/// A CHAP name and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// CHAP_N: the name sent or expected.
    pub user: String,
    /// The shared secret (RFC 7143 asks for at least 12 bytes).
    pub secret: String,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChapCredentials {{ user: {:?}, secret: <hidden> }}",
            self.user
        )
    }
}

/// The CHAP algorithm number of MD5 (RFC 1994).
const CHAP_MD5: &str = "5";
/// Length of the challenges we send.
pub const CHALLENGE_LEN: usize = 16;

/// Why authentication failed; every case ends the login with "authentication failure".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChapError {
    /// The initiator offered no algorithm we support (holds its CHAP_A).
    NoAlgorithm(String),
    /// A CHAP key is missing or malformed (names it).
    Malformed(&'static str),
    /// Unknown CHAP_N or wrong CHAP_R.
    BadResponse,
    /// The initiator asked for mutual CHAP and none is configured, or reflected our challenge.
    MutualRefused,
}

/// MD5(id || secret || challenge), the CHAP response.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize());
    out
}

/// Binary values: 0x-prefixed hex or 0b-prefixed base64 (RFC 7143 5.1).
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        // An odd number of digits has an implied leading zero.
        let padded = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex.to_string()
        };
        return (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(padded.get(i..i + 2)?, 16).ok())
            .collect();
    }
    let b64 = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))?;
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in b64.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = bits << 6 | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    Some(out)
}

/// 0x-prefixed lower-case hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The target's side of one CHAP exchange.
#[derive(Clone, Debug)]
pub struct ChapExchange {
    id: u8,
    challenge: [u8; CHALLENGE_LEN],
    challenged: bool,
}

impl ChapExchange {
    /// An exchange with the given identifier and challenge (random in production).
    pub fn new(id: u8, challenge: [u8; CHALLENGE_LEN]) -> ChapExchange {
        ChapExchange {
            id,
            challenge,
            challenged: false,
        }
    }

    /// True once CHAP_A was answered with our challenge.
    pub fn challenged(&self) -> bool {
        self.challenged
    }

    /// Answers CHAP_A (a list): pick MD5 and send CHAP_I and CHAP_C.
    pub fn on_algorithms(&mut self, chap_a: &str, out: &mut TextPairs) -> Result<(), ChapError> {
        if !chap_a.split(',').any(|a| a == CHAP_MD5) {
            return Err(ChapError::NoAlgorithm(chap_a.to_string()));
        }
        out.push("CHAP_A", CHAP_MD5);
        out.push("CHAP_I", self.id.to_string());
        out.push("CHAP_C", encode_hex(&self.challenge));
        self.challenged = true;
        Ok(())
    }

    /// Checks CHAP_N / CHAP_R against `expected`; when the initiator sends CHAP_I / CHAP_C
    /// it wants mutual authentication, answered with `mutual` (the target's credentials).
    pub fn on_response(
        &self,
        keys: &TextPairs,
        expected: &ChapCredentials,
        mutual: Option<&ChapCredentials>,
        out: &mut TextPairs,
    ) -> Result<(), ChapError> {
        let name = keys.get("CHAP_N").ok_or(ChapError::Malformed("CHAP_N"))?;
        let got = keys
            .get("CHAP_R")
            .and_then(decode_binary)
            .ok_or(ChapError::Malformed("CHAP_R"))?;
        let want = response(self.id, expected.secret.as_bytes(), &self.challenge);
        if name != expected.user || got != want {
            return Err(ChapError::BadResponse);
        }
        match (keys.get("CHAP_I"), keys.get("CHAP_C")) {
            (None, None) => Ok(()),
            (Some(i), Some(c)) => {
                let id: u8 = i.parse().map_err(|_| ChapError::Malformed("CHAP_I"))?;
                let challenge = decode_binary(c).ok_or(ChapError::Malformed("CHAP_C"))?;
                let creds = mutual.ok_or(ChapError::MutualRefused)?;
                // A reflected challenge would let an attacker use us as an oracle.
                if challenge == self.challenge || challenge.is_empty() {
                    return Err(ChapError::MutualRefused);
                }
                out.push("CHAP_N", creds.user.clone());
                out.push(
                    "CHAP_R",
                    encode_hex(&response(id, creds.secret.as_bytes(), &challenge)),
                );
                Ok(())
            }
            _ => Err(ChapError::Malformed("CHAP_I/CHAP_C")),
        }
    }
}

/// Fresh random bytes for a challenge and identifier, from the kernel.
pub fn random_challenge() -> (u8, [u8; CHALLENGE_LEN]) {
    let mut buf = [0u8; CHALLENGE_LEN + 1];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge.copy_from_slice(&buf[1..]);
    (buf[0], challenge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, secret: &str) -> ChapCredentials {
        ChapCredentials {
            user: user.into(),
            secret: secret.into(),
        }
    }

    fn challenge() -> [u8; 16] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn md5_response_matches_known_vectors() {
        assert_eq!(
            encode_hex(&response(1, b"secretsecret", &challenge())),
            "0x226dc576c33f04ff9c3a200ffe35f442"
        );
        assert_eq!(
            encode_hex(&response(0x2a, b"mutualsecret!", &[0xaa; 16])),
            "0xd6ba4294c23b7f4f5fef0a04e94b8386"
        );
    }

    #[test]
    fn binary_values_decode_from_hex_and_base64() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 0xff]));
        assert_eq!(decode_binary("0x102"), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 0xff]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("plain"), None);
    }

    #[test]
    fn chap_a_is_a_list_and_md5_is_chosen() {
        let mut x = ChapExchange::new(1, challenge());
        let mut out = TextPairs::default();
        x.on_algorithms("7,5", &mut out).unwrap();
        assert_eq!(out.get("CHAP_A"), Some("5"));
        assert_eq!(out.get("CHAP_I"), Some("1"));
        assert_eq!(out.get("CHAP_C"), Some(encode_hex(&challenge()).as_str()));
        assert!(matches!(
            x.on_algorithms("7", &mut out),
            Err(ChapError::NoAlgorithm(_))
        ));
    }

    #[test]
    fn one_way_chap_accepts_the_right_secret_only() {
        let x = ChapExchange::new(1, challenge());
        let user = creds("alice", "secretsecret");
        let mut keys = TextPairs::default();
        keys.push("CHAP_N", "alice");
        keys.push("CHAP_R", "0x226dc576c33f04ff9c3a200ffe35f442");
        let mut out = TextPairs::default();
        x.on_response(&keys, &user, None, &mut out).unwrap();
        assert!(out.is_empty());
        let wrong = creds("alice", "othersecret!");
        assert_eq!(
            x.on_response(&keys, &wrong, None, &mut out),
            Err(ChapError::BadResponse)
        );
        let other_user = creds("bob", "secretsecret");
        assert_eq!(
            x.on_response(&keys, &other_user, None, &mut out),
            Err(ChapError::BadResponse)
        );
    }

    #[test]
    fn mutual_chap_answers_the_initiators_challenge() {
        let x = ChapExchange::new(1, challenge());
        let mut keys = TextPairs::default();
        keys.push("CHAP_N", "alice");
        keys.push(
            "CHAP_R",
            encode_hex(&response(1, b"secretsecret", &challenge())),
        );
        keys.push("CHAP_I", "42");
        keys.push("CHAP_C", encode_hex(&[0xaa; 16]));
        let mut out = TextPairs::default();
        let target = creds("target", "mutualsecret!");
        x.on_response(
            &keys,
            &creds("alice", "secretsecret"),
            Some(&target),
            &mut out,
        )
        .unwrap();
        assert_eq!(out.get("CHAP_N"), Some("target"));
        assert_eq!(
            out.get("CHAP_R"),
            Some("0xd6ba4294c23b7f4f5fef0a04e94b8386")
        );
        let user = creds("alice", "secretsecret");
        assert_eq!(
            x.on_response(&keys, &user, None, &mut out),
            Err(ChapError::MutualRefused)
        );
    }

    #[test]
    fn a_reflected_challenge_is_refused() {
        let x = ChapExchange::new(1, challenge());
        let mut keys = TextPairs::default();
        keys.push("CHAP_N", "alice");
        keys.push(
            "CHAP_R",
            encode_hex(&response(1, b"secretsecret", &challenge())),
        );
        keys.push("CHAP_I", "1");
        keys.push("CHAP_C", encode_hex(&challenge()));
        let target = creds("target", "mutualsecret!");
        let user = creds("alice", "secretsecret");
        let r = x.on_response(&keys, &user, Some(&target), &mut TextPairs::default());
        assert_eq!(r, Err(ChapError::MutualRefused));
    }

    #[test]
    fn random_challenges_differ() {
        assert_ne!(random_challenge().1, random_challenge().1);
    }
}
