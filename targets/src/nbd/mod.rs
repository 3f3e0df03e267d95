//! The NBD target: fixed newstyle handshake, structured replies, base:allocation block
//! status, as a sans-IO session (bytes and completions in, bytes and engine requests out).
//!
//! `proto` holds the wire constants, `handshake` and `transmission` the codecs of the two
//! protocol phases, `session` the connection state machine that the daemon drives, `tls`
//! which exports need TLS (the TLS itself runs in the driver, between socket and session).

pub mod handshake;
pub mod proto;
pub mod session;
pub mod tls;
pub mod transmission;

#[cfg(test)]
mod stream_fuzz;
#[cfg(test)]
mod testing;

pub use session::NbdSession;
pub use tls::{TlsMode, TlsPolicy};

use std::fmt;
use std::sync::Arc;

/// Limits of an NBD session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdConfig {
    /// Largest read or write payload accepted (advertised as the maximum block size).
    pub max_payload: u32,
    /// Largest option data accepted in the handshake; larger gets NBD_REP_ERR_TOO_BIG.
    pub max_option_len: u32,
    /// Preferred block size advertised (raised to the export's block size if smaller).
    pub preferred_block_size: u32,
    /// Which exports need TLS; None: the driver has no TLS, NBD_OPT_STARTTLS is refused.
    pub tls: Option<Arc<TlsPolicy>>,
    /// Refuse clients that did not ask for block size constraints (NBD_OPT_GO without
    /// NBD_INFO_BLOCK_SIZE, NBD_OPT_EXPORT_NAME) instead of serving any byte range to them.
    pub require_block_size: bool,
    /// Largest read or write served to a client that asked for no block size constraints
    /// (advertised as its maximum): what the daemon's memory budget can hold at once.
    pub max_unnegotiated: u32,
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            max_payload: 32 << 20,
            max_option_len: 64 << 10,
            preferred_block_size: 4096,
            tls: None,
            require_block_size: false,
            max_unnegotiated: u32::MAX,
        }
    }
}

/// A protocol violation: the connection is closed after what was queued is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdError {
    /// The client's flags word holds flags this server does not know.
    UnknownClientFlags(u32),
    /// An option did not start with IHAVEOPT.
    BadOptionMagic(u64),
    /// NBD_OPT_EXPORT_NAME larger than the option limit (it cannot be answered with an error).
    ExportNameTooLong { len: u32, max: u32 },
    /// NBD_OPT_EXPORT_NAME named no export (it cannot be answered with an error).
    UnknownExport(String),
    /// NBD_OPT_EXPORT_NAME without TLS for an export that needs it (or on a server that
    /// needs TLS for every option).
    TlsRequired(String),
    /// NBD_OPT_EXPORT_NAME while the daemon shuts down.
    ShuttingDown,
    /// NBD_OPT_EXPORT_NAME while block size negotiation is required (it cannot carry it).
    BlockSizeRequired,
    /// A request did not start with the request magic.
    BadRequestMagic(u32),
    /// A write payload larger than the maximum payload.
    PayloadTooBig { len: u32, max: u32 },
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdError::UnknownClientFlags(x) => write!(f, "unknown client flags {x:#x}"),
            NbdError::BadOptionMagic(m) => write!(f, "option magic {m:#018x} is not IHAVEOPT"),
            NbdError::ExportNameTooLong { len, max } => {
                write!(
                    f,
                    "NBD_OPT_EXPORT_NAME of {len} bytes exceeds the limit of {max}"
                )
            }
            NbdError::UnknownExport(name) => {
                write!(f, "NBD_OPT_EXPORT_NAME names no export: {name:?}")
            }
            NbdError::TlsRequired(name) => {
                write!(
                    f,
                    "NBD_OPT_EXPORT_NAME {name:?} without TLS, which it needs"
                )
            }
            NbdError::ShuttingDown => write!(f, "NBD_OPT_EXPORT_NAME while shutting down"),
            NbdError::BlockSizeRequired => write!(
                f,
                "NBD_OPT_EXPORT_NAME refused: require_block_size asks clients for NBD_OPT_GO with NBD_INFO_BLOCK_SIZE"
            ),
            NbdError::BadRequestMagic(m) => write!(f, "request magic {m:#010x} is wrong"),
            NbdError::PayloadTooBig { len, max } => {
                write!(
                    f,
                    "write payload of {len} bytes exceeds the maximum of {max}"
                )
            }
        }
    }
}

impl std::error::Error for NbdError {}
