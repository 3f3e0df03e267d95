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
