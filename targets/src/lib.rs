//! tessel-targets: protocol codecs and sessions for NBD and iSCSI.
//!
//! Sessions are sans-IO: they take received bytes and engine completions, and produce bytes
//! to send and engine requests to submit. The daemon drives them from a reactor; tests drive
//! them from memory.

pub mod budget;
pub mod control;
pub mod export;
pub mod iscsi;
pub mod nbd;

/// Cases per run of each fuzzer (session streams, control lines): 256, or `TESSEL_FUZZ_CASES` for longer runs.
#[cfg(test)]
fn fuzz_cases() -> u32 {
    std::env::var("TESSEL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}
