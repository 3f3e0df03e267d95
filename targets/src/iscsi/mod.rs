//! The iSCSI target (RFC 7143, ERL 0) as a sans-IO session: bytes and engine completions
//! in, bytes and engine requests out (see `IscsiSession`).
//!
//! One target per volume, named `<iqn_prefix>:<volume>`; LUN 0 is the volume, LUNs 1.. its
//! exported snapshots (read-only) in the order the exports list them.

pub mod access;
pub mod chap;
mod discovery;
pub mod login;
pub mod negotiate;
pub mod pdu;
pub mod scsi;
mod session;
#[cfg(test)]
mod stream_fuzz;
mod task;
#[cfg(test)]
mod tests;
pub mod text;

use std::fmt;
use std::sync::Arc;

pub use access::{TargetAccess, Unmatched};
pub use chap::ChapCredentials;
pub use session::{IscsiSession, State};

/// The iSCSI portal's configuration, shared by every session.
#[derive(Clone, Debug)]
pub struct IscsiConfig {
    /// Target names are `<iqn_prefix>:<volume>`.
    pub iqn_prefix: String,
    /// The portal address reported by SendTargets (`host:port`; `,1` is the portal group).
    pub portal: String,
    /// Access rules by volume name or pattern, in file order (see `access`).
    pub targets: Vec<TargetAccess>,
    /// Whether volumes no rule covers are open or refused.
    pub unmatched: Unmatched,
    /// Seconds of silence before we ping the initiator with a NOP-In (0: never).
    pub nop_interval_secs: u32,
    /// Seconds a ping may stay unanswered before the session is dropped.
    pub nop_timeout_secs: u32,
    /// Reservations of every LUN, shared by all sessions of the portal.
    pub reservations: Arc<scsi::Reservations>,
}

impl Default for IscsiConfig {
    fn default() -> IscsiConfig {
        IscsiConfig {
            iqn_prefix: "iqn.2026-11.dev.tessel".to_string(),
            portal: "127.0.0.1:3260".to_string(),
            targets: Vec::new(),
            unmatched: Unmatched::Allow,
            nop_interval_secs: 5,
            nop_timeout_secs: 30,
            reservations: Arc::default(),
        }
    }
}

/// Why a session must end; the driver sends what is in `Actions::send`, then closes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IscsiError {
    /// The byte stream is not iSCSI (bad header digest, unknown PDU during login …).
    Pdu(pdu::PduError),
    /// A data segment longer than we declared we accept.
    DataSegmentTooLong { len: usize, max: usize },
    /// The initiator broke a rule RFC 7143 makes fatal at ERL 0 (says which).
    Protocol(String),
    /// The login failed with this status class and detail (the reply was sent).
    LoginFailed { class: u8, detail: u8 },
    /// Our NOP-In ping went unanswered.
    PingTimeout,
}

impl fmt::Display for IscsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IscsiError::Pdu(e) => write!(f, "{e}"),
            IscsiError::DataSegmentTooLong { len, max } => {
                write!(
                    f,
                    "data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}"
                )
            }
            IscsiError::Protocol(s) => write!(f, "iSCSI protocol error: {s}"),
            IscsiError::LoginFailed { class, detail } => {
                write!(f, "login failed with status {class:#04x}/{detail:#04x}")
            }
            IscsiError::PingTimeout => write!(f, "initiator stopped answering NOP-In pings"),
        }
    }
}

impl std::error::Error for IscsiError {}

impl From<pdu::PduError> for IscsiError {
    fn from(e: pdu::PduError) -> IscsiError {
        IscsiError::Pdu(e)
    }
}
