//! A stream fuzzer for the NBD session: arbitrary sequences of client flags, options,
//! request headers, write payloads and raw bytes, fed in arbitrary pieces, interleaved
//! with engine completions and with the host reading its replies (or not). Nothing may
//! panic, the session never holds more than its allowance (or one request's worth when it
//! held nothing), and every byte it held goes back once the requests finish and the
//! connection ends. Some runs offer TLS (option 5 is NBD_OPT_STARTTLS): the driver's part
//! is played by taking `start_tls` and going on with the bytes as if decrypted.
//!
//! `cargo test --release -p tessel-targets nbd::stream_fuzz` runs 256 cases;
//! `TESSEL_FUZZ_CASES=20000` runs more.

use super::proto::*;
use super::testing::{option_bytes, request_bytes, Client};
use super::{NbdConfig, NbdSession, TlsMode, TlsPolicy};
use crate::budget::{Allowance, MemoryBudget};
use crate::export::Actions;
use proptest::prelude::*;

/// What one connection may hold in these runs.
const ALLOWANCE: u64 = 256 << 10;

#[derive(Debug, Clone)]
enum Piece {
    /// Bytes the client sends.
    Bytes(Vec<u8>),
    /// The engine finishes every request submitted so far.
    Engine,
    /// The host reads every reply queued so far.
    Read,
}

fn option() -> impl Strategy<Value = Vec<u8>> {
    (0u32..16, proptest::collection::vec(any::<u8>(), 0..48))
        .prop_map(|(code, data)| option_bytes(code, &data))
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    // Mostly whole 512-byte blocks inside the 1 MiB export (so requests run), and some of
    // any shape (so they are refused).
    let len = prop_oneof![
        4 => (1u32..=128).prop_map(|n| n * 512),
        1 => 0u32..8192,
        1 => 0u32..(1 << 21),
        1 => any::<u32>(),
    ];
    let offset = prop_oneof![
        4 => (0u64..2048).prop_map(|n| n * 512),
        1 => 0u64..(1 << 20),
        1 => any::<u64>(),
    ];
    let kind = prop_oneof![3 => Just(CMD_READ), 2 => Just(CMD_WRITE), 2 => 0u16..10];
    let flags = prop_oneof![3 => Just(0u16), 1 => any::<u16>()];
    (kind, flags, any::<u64>(), offset, len, any::<bool>()).prop_map(
        |(kind, flags, cookie, offset, len, with_payload)| {
            let mut b = request_bytes(kind, flags, cookie, offset, len);
            if kind == CMD_WRITE && with_payload && len <= 64 << 10 {
                b.resize(b.len() + len as usize, 0x5a);
            }
            b
        },
    )
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => request().prop_map(Piece::Bytes),
        1 => option().prop_map(Piece::Bytes),
        1 => Just(Piece::Bytes(option_bytes(OPT_STARTTLS, &[]))),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Piece::Bytes),
        2 => Just(Piece::Engine),
        1 => Just(Piece::Read),
    ]
}

/// Feed what is pending; false once the session closed the connection. A requested TLS
/// start is taken at once (the bytes after it stand for decrypted ones).
fn feed(c: &mut Client, pending: &mut Vec<u8>) -> bool {
    loop {
        match c.session.receive(pending, &c.exports, &mut c.actions) {
            Ok(n) => {
                pending.drain(..n);
                if !std::mem::take(&mut c.actions.start_tls) {
                    return !c.actions.close;
                }
            }
            Err(_) => return false,
        }
    }
}

fn run(handshake: bool, tls: bool, pieces: Vec<Piece>, split: usize) -> Result<(), TestCaseError> {
    let budget = MemoryBudget::new(1 << 30);
    let mut c = if handshake {
        Client::go("vol0", true, true)
    } else if tls {
        // vol0 needs TLS, vol0@snap does not.
        let policy = TlsPolicy {
            default: TlsMode::Require,
            exports: [("vol0@snap".to_string(), TlsMode::Optional)].into(),
        };
        Client::negotiated_with(NbdConfig {
            tls: Some(std::sync::Arc::new(policy)),
            ..NbdConfig::default()
        })
    } else {
        Client::negotiated(false)
    };
    c.session = std::mem::replace(
        &mut c.session,
        NbdSession::new(NbdConfig::default(), &mut Actions::default()),
    )
    .with_allowance(Allowance::new(budget.clone(), ALLOWANCE));
    let bound = ALLOWANCE.max(u64::from(NbdConfig::default().max_payload));
    let mut pending = Vec::new();
    let mut open = true;
    for p in pieces {
        match p {
            Piece::Bytes(b) => {
                // Arrive in pieces of at most `split` bytes, as a socket may cut them.
                for chunk in b.chunks(split.max(1)) {
                    pending.extend_from_slice(chunk);
                    if open {
                        open = feed(&mut c, &mut pending);
                    }
                }
            }
            Piece::Engine => c.run_engine(),
            Piece::Read => {
                c.take();
                c.session.queued(0);
                if open {
                    open = feed(&mut c, &mut pending);
                }
            }
        }
        prop_assert!(budget.used() <= bound, "held {} > {bound}", budget.used());
    }
    // Everything finishes and every reply is read: nothing stays in flight.
    for _ in 0..64 {
        c.run_engine();
        c.take();
        c.session.queued(0);
        if open {
            open = feed(&mut c, &mut pending);
        }
        if c.actions.submit.is_empty() {
            break;
        }
    }
    prop_assert_eq!(c.session.in_flight(), 0);
    if !c.session.gathering_payload() {
        prop_assert_eq!(
            budget.used(),
            0,
            "bytes held with nothing in flight or unread"
        );
    }
    drop(c);
    prop_assert_eq!(budget.used(), 0, "bytes held after the connection ended");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

    #[test]
    fn arbitrary_streams_never_panic_or_hold_more_than_allowed(
        handshake in any::<bool>(),
        tls in any::<bool>(),
        pieces in proptest::collection::vec(piece(), 0..40),
        split in 1usize..200,
    ) {
        run(handshake, tls, pieces, split)?;
    }
}
