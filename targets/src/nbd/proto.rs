//! NBD wire constants (doc/proto.md of the NBD project) and the one mapping from engine
//! errors to NBD error values.

use tessel_engine::IoError;

/// Server greeting, first 8 bytes: ASCII "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle magic, ASCII "IHAVEOPT": in the greeting and before every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 bytes of zeroes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the zeroes after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid (always set).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts NBD_CMD_FLUSH.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours NBD_CMD_FLAG_FUA.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server accepts NBD_CMD_TRIM.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server accepts NBD_CMD_WRITE_ZEROES.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server honours NBD_CMD_FLAG_DF.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections to this export see each other's writes and flushes.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: the server accepts NBD_CMD_CACHE.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the server honours NBD_CMD_FLAG_FAST_ZERO.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client ends the session.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for NBD_CMD_BLOCK_STATUS.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: the option succeeded (final reply).
pub const REP_ACK: u32 = 1;
/// Option reply: one export of NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: known and well-formed, but refused by the server's configuration.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: the option is malformed or not valid now.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: the option (or the export it names) needs TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Option error: no export of that name.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option error: the client must ask for NBD_INFO_BLOCK_SIZE before entering transmission.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
/// Option error: the option's data is larger than the server accepts.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Information item: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information item: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect once in-flight requests are answered; no reply.
pub const CMD_DISC: u16 = 2;
/// Command: make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard a range.
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch a range.
pub const CMD_CACHE: u16 = 5;
/// Command: make a range read as zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: report the state of a range in the negotiated metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): answer with at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): answer with one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail rather than zero slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload (ends a successful reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: offset then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: offset then the length of a run that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: metadata context id then (length, status) descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: errno, message length, message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context tessel serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Id tessel gives `base:allocation` in NBD_REP_META_CONTEXT and block status chunks.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// base:allocation status bit: the range is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation status bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The error values NBD allows in replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Invalid argument (misaligned, unknown command or flag).
    Inval = 22,
    /// No space left (past the end, pool full).
    NoSpc = 28,
    /// Value too large (read larger than the maximum payload).
    Overflow = 75,
    /// The server is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// What an engine error is called on the NBD wire: the one place this mapping lives.
impl From<&IoError> for Errno {
    fn from(e: &IoError) -> Errno {
        match e {
            IoError::ReadOnly => Errno::Perm,
            IoError::OutOfRange { .. } | IoError::NoSpace => Errno::NoSpc,
            IoError::Device(e) if [libc::ENOSPC, libc::EDQUOT, libc::EFBIG].contains(e) => {
                Errno::NoSpc
            }
            IoError::Misaligned { .. } | IoError::ZeroLength | IoError::BadBuffer => Errno::Inval,
            IoError::ShuttingDown => Errno::Shutdown,
            IoError::UnknownVolume | IoError::Device(_) => Errno::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn engine_errors_map_to_protocol_errnos() {
        assert_eq!(Errno::from(&IoError::ReadOnly), Errno::Perm);
        assert_eq!(Errno::from(&IoError::NoSpace), Errno::NoSpc);
        assert_eq!(Errno::from(&IoError::Device(libc::EIO)), Errno::Io);
        assert_eq!(Errno::from(&IoError::Device(libc::EDQUOT)), Errno::NoSpc);
        assert_eq!(Errno::from(&IoError::ShuttingDown), Errno::Shutdown);
        assert_eq!(Errno::from(&IoError::ZeroLength), Errno::Inval);
    }
}
