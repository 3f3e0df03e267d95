//! iSCSI PDU codec (RFC 7143 section 11): the 48-byte Basic Header Segment of every opcode
//! as a typed struct, framing with AHS, padded data segment and optional CRC32C digests.
//! Pure functions from bytes to PDUs and back; no session state.

use std::fmt;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The "no tag" value of ITT and TTT fields.
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest data segment framing accepts (the 24-bit field's limit).
pub const MAX_DATA_SEGMENT: usize = (1 << 24) - 1;

/// Which digests are in force on a connection (both directions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over BHS + AHS.
    pub header: bool,
    /// CRC32C over the padded data segment.
    pub data: bool,
}

/// Why bytes could not be read as a PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PduError {
    /// The opcode is not one RFC 7143 defines for that direction.
    UnknownOpcode(u8),
    /// The header digest does not match: framing can no longer be trusted.
    HeaderDigest { expected: u32, got: u32 },
    /// A field holds a value the PDU cannot carry (names the field).
    InvalidField(&'static str),
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::UnknownOpcode(op) => write!(f, "unknown iSCSI opcode {op:#04x}"),
            PduError::HeaderDigest { expected, got } => {
                write!(
                    f,
                    "header digest {got:#010x} does not match {expected:#010x}"
                )
            }
            PduError::InvalidField(field) => write!(f, "invalid PDU field: {field}"),
        }
    }
}

impl std::error::Error for PduError {}

/// Residual count of a SCSI Response or final Data-In (the O/U flags with their count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residual {
    /// Exactly the expected transfer length moved.
    #[default]
    None,
    /// The command wanted this many bytes more than the expected transfer length.
    Overflow(u32),
    /// This many bytes of the expected transfer length were not moved.
    Underflow(u32),
}

impl Residual {
    /// The residual of a transfer of `actual` bytes for an expected length `expected`.
    pub fn of(expected: u32, actual: u64) -> Residual {
        match actual.cmp(&u64::from(expected)) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Less => Residual::Underflow(expected - actual as u32),
            std::cmp::Ordering::Greater => {
                Residual::Overflow((actual - u64::from(expected)).min(u64::from(u32::MAX)) as u32)
            }
        }
    }

    fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Overflow(_) => 0x04,
            Residual::Underflow(_) => 0x02,
        }
    }

    fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Overflow(n) | Residual::Underflow(n) => n,
        }
    }

    fn from_flags(flags: u8, count: u32) -> Residual {
        if flags & 0x04 != 0 {
            Residual::Overflow(count)
        } else if flags & 0x02 != 0 {
            Residual::Underflow(count)
        } else {
            Residual::None
        }
    }
}

/// NOP-Out (0x00): initiator ping, or the answer to a target's NOP-In.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Command (0x01).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub edtl: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

/// SCSI Task Management Function Request (0x02).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    /// Referenced Task Tag.
    pub rtt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request (0x03).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    /// Current stage: 0 security, 1 operational.
    pub csg: u8,
    /// Next stage: 1 operational, 3 full feature.
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Request (0x04).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Data-Out (0x05).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Logout Request (0x06).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close the session, 1 close the connection, 2 remove it for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (0x10); only meaningful at ERL > 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snack {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In (0x20): answer to a NOP-Out, or the target's own ping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Response (0x21). Sense data travels in the data segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    /// 0 command completed at target, 1 target failure.
    pub response: u8,
    pub status: u8,
    pub residual: Residual,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// SCSI Task Management Function Response (0x22).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response (0x23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response (0x24).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Data-In (0x25); with `status` set it also ends the command (phase collapse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub status: Option<u8>,
    pub residual: Residual,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Logout Response (0x26).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (0x31).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_length: u32,
}

/// Asynchronous Message (0x32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub params: [u16; 3],
}

/// Reject (0x3f); the data segment holds the rejected PDU's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// A Basic Header Segment, typed by opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(Snack),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn bit(b: u8, mask: u8) -> bool {
    b & mask != 0
}
fn flag(set: bool, mask: u8) -> u8 {
    if set {
        mask
    } else {
        0
    }
}
fn stages(b: u8) -> (bool, bool, u8, u8) {
    (bit(b, 0x80), bit(b, 0x40), (b >> 2) & 3, b & 3)
}
fn isid(b: &[u8]) -> [u8; 6] {
    b[8..14].try_into().expect("6 bytes")
}

impl Bhs {
    /// The opcode byte (without the I bit).
    pub fn opcode(&self) -> u8 {
        match self {
            Bhs::NopOut(_) => 0x00,
            Bhs::ScsiCommand(_) => 0x01,
            Bhs::TaskMgmtRequest(_) => 0x02,
            Bhs::LoginRequest(_) => 0x03,
            Bhs::TextRequest(_) => 0x04,
            Bhs::DataOut(_) => 0x05,
            Bhs::LogoutRequest(_) => 0x06,
            Bhs::Snack(_) => 0x10,
            Bhs::NopIn(_) => 0x20,
            Bhs::ScsiResponse(_) => 0x21,
            Bhs::TaskMgmtResponse(_) => 0x22,
            Bhs::LoginResponse(_) => 0x23,
            Bhs::TextResponse(_) => 0x24,
            Bhs::DataIn(_) => 0x25,
            Bhs::LogoutResponse(_) => 0x26,
            Bhs::R2t(_) => 0x31,
            Bhs::AsyncMessage(_) => 0x32,
            Bhs::Reject(_) => 0x3f,
        }
    }

    /// Reads a header (lengths are framing's business, see `Frame`).
    pub fn decode(b: &[u8; BHS_LEN]) -> Result<Bhs, PduError> {
        let imm = bit(b[0], 0x40);
        let f = bit(b[1], 0x80);
        let lun = u64_at(b, 8);
        let itt = u32_at(b, 16);
        Ok(match b[0] & 0x3f {
            0x00 => Bhs::NopOut(NopOut {
                immediate: imm,
                lun,
                itt,
                ttt: u32_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
            }),
            0x01 => Bhs::ScsiCommand(ScsiCommand {
                immediate: imm,
                final_: f,
                read: bit(b[1], 0x40),
                write: bit(b[1], 0x20),
                attr: b[1] & 7,
                lun,
                itt,
                edtl: u32_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
                cdb: b[32..48].try_into().expect("16 bytes"),
            }),
            0x02 => Bhs::TaskMgmtRequest(TaskMgmtRequest {
                immediate: imm,
                function: b[1] & 0x7f,
                lun,
                itt,
                rtt: u32_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
                ref_cmd_sn: u32_at(b, 32),
                exp_data_sn: u32_at(b, 36),
            }),
            0x03 => {
                let (transit, cont, csg, nsg) = stages(b[1]);
                Bhs::LoginRequest(LoginRequest {
                    transit,
                    cont,
                    csg,
                    nsg,
                    version_max: b[2],
                    version_min: b[3],
                    isid: isid(b),
                    tsih: u16_at(b, 14),
                    itt,
                    cid: u16_at(b, 20),
                    cmd_sn: u32_at(b, 24),
                    exp_stat_sn: u32_at(b, 28),
                })
            }
            0x04 => Bhs::TextRequest(TextRequest {
                immediate: imm,
                final_: f,
                cont: bit(b[1], 0x40),
                lun,
                itt,
                ttt: u32_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
            }),
            0x05 => Bhs::DataOut(DataOut {
                final_: f,
                lun,
                itt,
                ttt: u32_at(b, 20),
                exp_stat_sn: u32_at(b, 28),
                data_sn: u32_at(b, 36),
                buffer_offset: u32_at(b, 40),
            }),
            0x06 => Bhs::LogoutRequest(LogoutRequest {
                immediate: imm,
                reason: b[1] & 0x7f,
                itt,
                cid: u16_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
            }),
            0x10 => Bhs::Snack(Snack {
                kind: b[1] & 0x0f,
                lun,
                itt,
                ttt: u32_at(b, 20),
                exp_stat_sn: u32_at(b, 28),
                beg_run: u32_at(b, 40),
                run_length: u32_at(b, 44),
            }),
            0x20 => Bhs::NopIn(NopIn {
                lun,
                itt,
                ttt: u32_at(b, 20),
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
            }),
            0x21 => Bhs::ScsiResponse(ScsiResponse {
                response: b[2],
                status: b[3],
                residual: Residual::from_flags(b[1], u32_at(b, 44)),
                itt,
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
                exp_data_sn: u32_at(b, 36),
            }),
            0x22 => Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt,
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
            }),
            0x23 => {
                let (transit, cont, csg, nsg) = stages(b[1]);
                Bhs::LoginResponse(LoginResponse {
                    transit,
                    cont,
                    csg,
                    nsg,
                    version_max: b[2],
                    version_active: b[3],
                    isid: isid(b),
                    tsih: u16_at(b, 14),
                    itt,
                    stat_sn: u32_at(b, 24),
                    exp_cmd_sn: u32_at(b, 28),
                    max_cmd_sn: u32_at(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            0x24 => Bhs::TextResponse(TextResponse {
                final_: f,
                cont: bit(b[1], 0x40),
                lun,
                itt,
                ttt: u32_at(b, 20),
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
            }),
            0x25 => Bhs::DataIn(DataIn {
                final_: f,
                ack: bit(b[1], 0x40),
                status: bit(b[1], 0x01).then_some(b[3]),
                residual: Residual::from_flags(b[1], u32_at(b, 44)),
                lun,
                itt,
                ttt: u32_at(b, 20),
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
                data_sn: u32_at(b, 36),
                buffer_offset: u32_at(b, 40),
            }),
            0x26 => Bhs::LogoutResponse(LogoutResponse {
                response: b[2],
                itt,
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
                time2wait: u16_at(b, 40),
                time2retain: u16_at(b, 42),
            }),
            0x31 => Bhs::R2t(R2t {
                lun,
                itt,
                ttt: u32_at(b, 20),
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
                r2t_sn: u32_at(b, 36),
                buffer_offset: u32_at(b, 40),
                desired_length: u32_at(b, 44),
            }),
            0x32 => Bhs::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
                event: b[36],
                vcode: b[37],
                params: [u16_at(b, 38), u16_at(b, 40), u16_at(b, 42)],
            }),
            0x3f => Bhs::Reject(Reject {
                reason: b[2],
                stat_sn: u32_at(b, 24),
                exp_cmd_sn: u32_at(b, 28),
                max_cmd_sn: u32_at(b, 32),
                data_sn: u32_at(b, 36),
            }),
            op => return Err(PduError::UnknownOpcode(op)),
        })
    }

    /// Writes the header with the given AHS length (in 4-byte words) and data length.
    pub fn encode(&self, ahs_words: u8, data_len: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = self.opcode();
        b[4] = ahs_words;
        b[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
        match self {
            Bhs::NopOut(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::ScsiCommand(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = flag(p.final_, 0x80) | flag(p.read, 0x40) | flag(p.write, 0x20) | p.attr & 7;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.edtl);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                b[32..48].copy_from_slice(&p.cdb);
            }
            Bhs::TaskMgmtRequest(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = 0x80 | p.function & 0x7f;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.rtt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 32, p.ref_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
            }
            Bhs::LoginRequest(p) => {
                b[0] |= 0x40;
                b[1] = flag(p.transit, 0x80) | flag(p.cont, 0x40) | (p.csg & 3) << 2 | p.nsg & 3;
                b[2] = p.version_max;
                b[3] = p.version_min;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::TextRequest(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = flag(p.final_, 0x80) | flag(p.cont, 0x40);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::DataOut(p) => {
                b[1] = flag(p.final_, 0x80);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.buffer_offset);
            }
            Bhs::LogoutRequest(p) => {
                b[0] |= flag(p.immediate, 0x40);
                b[1] = 0x80 | p.reason & 0x7f;
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::Snack(p) => {
                b[1] = 0x80 | p.kind & 0x0f;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 40, p.beg_run);
                put32(&mut b, 44, p.run_length);
            }
            Bhs::NopIn(p) => {
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Bhs::ScsiResponse(p) => {
                b[1] = 0x80 | p.residual.flags();
                b[2] = p.response;
                b[3] = p.status;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
                put32(&mut b, 44, p.residual.count());
            }
            Bhs::TaskMgmtResponse(p) => {
                b[1] = 0x80;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Bhs::LoginResponse(p) => {
                b[1] = flag(p.transit, 0x80) | flag(p.cont, 0x40) | (p.csg & 3) << 2 | p.nsg & 3;
                b[2] = p.version_max;
                b[3] = p.version_active;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                b[36] = p.status_class;
                b[37] = p.status_detail;
            }
            Bhs::TextResponse(p) => {
                b[1] = flag(p.final_, 0x80) | flag(p.cont, 0x40);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Bhs::DataIn(p) => {
                b[1] = flag(p.final_, 0x80) | flag(p.ack, 0x40);
                if let Some(status) = p.status {
                    b[1] |= 0x01 | p.residual.flags();
                    b[3] = status;
                    put32(&mut b, 44, p.residual.count());
                }
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.buffer_offset);
            }
            Bhs::LogoutResponse(p) => {
                b[1] = 0x80;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put16(&mut b, 40, p.time2wait);
                put16(&mut b, 42, p.time2retain);
            }
            Bhs::R2t(p) => {
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.r2t_sn);
                put32(&mut b, 40, p.buffer_offset);
                put32(&mut b, 44, p.desired_length);
            }
            Bhs::AsyncMessage(p) => {
                b[1] = 0x80;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                b[36] = p.event;
                b[37] = p.vcode;
                put16(&mut b, 38, p.params[0]);
                put16(&mut b, 40, p.params[1]);
                put16(&mut b, 42, p.params[2]);
            }
            Bhs::Reject(p) => {
                b[1] = 0x80;
                b[2] = p.reason;
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.data_sn);
            }
        }
        b
    }
}

/// One framed PDU borrowed from the receive buffer. The header is kept raw so that a PDU
/// with an unknown opcode can still be skipped and rejected.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The Basic Header Segment as received.
    pub header: [u8; BHS_LEN],
    /// Additional Header Segments.
    pub ahs: &'a [u8],
    /// The data segment, without padding.
    pub data: &'a [u8],
    /// False when the data digest did not match (the PDU must be rejected).
    pub data_digest_ok: bool,
    /// Bytes the whole PDU takes in the input.
    pub len: usize,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// The 24-bit DataSegmentLength of a raw header.
pub fn data_segment_length(header: &[u8; BHS_LEN]) -> usize {
    (usize::from(header[5]) << 16) | (usize::from(header[6]) << 8) | usize::from(header[7])
}

/// Cuts one PDU off the front of `input`; `Ok(None)` when more bytes are needed.
pub fn frame(input: &[u8], digests: Digests) -> Result<Option<Frame<'_>>, PduError> {
    let Some(header) = input.get(..BHS_LEN) else {
        return Ok(None);
    };
    let header: [u8; BHS_LEN] = header.try_into().expect("48 bytes");
    let ahs_len = usize::from(header[4]) * 4;
    let data_len = data_segment_length(&header);
    let hd = if digests.header { 4 } else { 0 };
    let dd = if digests.data && data_len > 0 { 4 } else { 0 };
    let head_end = BHS_LEN + ahs_len;
    let data_start = head_end + hd;
    let len = data_start + pad4(data_len) + dd;
    if input.len() < len {
        // Check the header digest as soon as it is here: a bad one means a bad length.
        if hd > 0 && input.len() >= data_start {
            check_header_digest(&input[..head_end], &input[head_end..data_start])?;
        }
        return Ok(None);
    }
    if hd > 0 {
        check_header_digest(&input[..head_end], &input[head_end..data_start])?;
    }
    let data_digest_ok = dd == 0 || {
        let padded = &input[data_start..data_start + pad4(data_len)];
        let got = u32::from_le_bytes(input[len - 4..len].try_into().expect("4 bytes"));
        crc32c::crc32c(padded) == got
    };
    Ok(Some(Frame {
        header,
        ahs: &input[BHS_LEN..head_end],
        data: &input[data_start..data_start + data_len],
        data_digest_ok,
        len,
    }))
}

fn check_header_digest(head: &[u8], digest: &[u8]) -> Result<(), PduError> {
    let expected = crc32c::crc32c(head);
    let got = u32::from_le_bytes(digest.try_into().expect("4 bytes"));
    if expected == got {
        Ok(())
    } else {
        Err(PduError::HeaderDigest { expected, got })
    }
}

/// Appends one PDU (header, AHS, digests, padded data) to `out`.
pub fn encode(bhs: &Bhs, ahs: &[u8], data: &[u8], digests: Digests, out: &mut Vec<u8>) {
    debug_assert!(ahs.len() & 3 == 0 && ahs.len() / 4 <= 255);
    debug_assert!(data.len() <= MAX_DATA_SEGMENT);
    let start = out.len();
    out.extend_from_slice(&bhs.encode((ahs.len() / 4) as u8, data.len() as u32));
    out.extend_from_slice(ahs);
    if digests.header {
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    if !data.is_empty() {
        let data_start = out.len();
        out.extend_from_slice(data);
        out.resize(data_start + pad4(data.len()), 0);
        if digests.data {
            let crc = crc32c::crc32c(&out[data_start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Decodes the 8-byte LUN field (SAM peripheral or flat addressing) to a LUN number.
pub fn lun_number(field: u64) -> Option<u16> {
    let b = field.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u16::from(b[1])),
        1 => Some(u16::from(b[0] & 0x3f) << 8 | u16::from(b[1])),
        _ => None,
    }
}

/// Encodes a LUN number as the 8-byte LUN field (peripheral below 256, flat above).
pub fn lun_field(lun: u16) -> u64 {
    let first = if lun < 256 {
        0
    } else {
        0x40 | (lun >> 8) as u8
    };
    u64::from_be_bytes([first, lun as u8, 0, 0, 0, 0, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Bhs> {
        vec![
            Bhs::NopOut(NopOut {
                immediate: true,
                lun: 1 << 48,
                itt: 7,
                ttt: RESERVED_TAG,
                cmd_sn: 3,
                exp_stat_sn: 4,
            }),
            Bhs::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: true,
                write: false,
                attr: 1,
                lun: 0,
                itt: 9,
                edtl: 4096,
                cmd_sn: 10,
                exp_stat_sn: 11,
                cdb: [0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
            }),
            Bhs::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: 1,
                lun: 0,
                itt: 1,
                rtt: 2,
                cmd_sn: 3,
                exp_stat_sn: 4,
                ref_cmd_sn: 5,
                exp_data_sn: 6,
            }),
            Bhs::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 0,
                itt: 1,
                cid: 2,
                cmd_sn: 3,
                exp_stat_sn: 4,
            }),
            Bhs::TextRequest(TextRequest {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt: 1,
                ttt: RESERVED_TAG,
                cmd_sn: 2,
                exp_stat_sn: 3,
            }),
            Bhs::DataOut(DataOut {
                final_: true,
                lun: 0,
                itt: 1,
                ttt: 2,
                exp_stat_sn: 3,
                data_sn: 4,
                buffer_offset: 8192,
            }),
            Bhs::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 1,
                cid: 0,
                cmd_sn: 2,
                exp_stat_sn: 3,
            }),
            Bhs::Snack(Snack {
                kind: 1,
                lun: 0,
                itt: 1,
                ttt: 2,
                exp_stat_sn: 3,
                beg_run: 4,
                run_length: 5,
            }),
            Bhs::NopIn(NopIn {
                lun: 0,
                itt: 1,
                ttt: RESERVED_TAG,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
            }),
            Bhs::ScsiResponse(ScsiResponse {
                response: 0,
                status: 2,
                residual: Residual::Underflow(512),
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
                exp_data_sn: 0,
            }),
            Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: 1,
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
            }),
            Bhs::LoginResponse(LoginResponse {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version_active: 0,
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 9,
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
                status_class: 2,
                status_detail: 1,
            }),
            Bhs::TextResponse(TextResponse {
                final_: true,
                cont: false,
                lun: 0,
                itt: 1,
                ttt: RESERVED_TAG,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
            }),
            Bhs::DataIn(DataIn {
                final_: true,
                ack: false,
                status: Some(0),
                residual: Residual::Overflow(3),
                lun: 0,
                itt: 1,
                ttt: RESERVED_TAG,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
                data_sn: 5,
                buffer_offset: 6,
            }),
            Bhs::LogoutResponse(LogoutResponse {
                response: 0,
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
                time2wait: 5,
                time2retain: 6,
            }),
            Bhs::R2t(R2t {
                lun: 0,
                itt: 1,
                ttt: 2,
                stat_sn: 3,
                exp_cmd_sn: 4,
                max_cmd_sn: 5,
                r2t_sn: 6,
                buffer_offset: 7,
                desired_length: 8,
            }),
            Bhs::AsyncMessage(AsyncMessage {
                lun: 0,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 3,
                event: 1,
                vcode: 0,
                params: [1, 2, 3],
            }),
            Bhs::Reject(Reject {
                reason: 4,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 3,
                data_sn: 0,
            }),
        ]
    }

    #[test]
    fn every_opcode_round_trips_through_bytes() {
        for bhs in samples() {
            for digests in [
                Digests::default(),
                Digests {
                    header: true,
                    data: true,
                },
            ] {
                let mut out = Vec::new();
                encode(&bhs, &[], b"hello", digests, &mut out);
                let f = frame(&out, digests).unwrap().unwrap();
                assert_eq!(f.len, out.len());
                assert_eq!(f.data, b"hello");
                assert!(f.data_digest_ok);
                assert_eq!(Bhs::decode(&f.header).unwrap(), bhs);
            }
        }
    }

    #[test]
    fn frame_waits_for_the_whole_pdu_and_pads_data() {
        let bhs = samples().remove(0);
        let mut out = Vec::new();
        encode(&bhs, &[], &[1, 2, 3, 4, 5], Digests::default(), &mut out);
        assert_eq!(out.len(), 48 + 8);
        for cut in 0..out.len() {
            assert!(frame(&out[..cut], Digests::default()).unwrap().is_none());
        }
    }

    #[test]
    fn corrupt_digests_are_reported() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut out = Vec::new();
        encode(&samples()[1], &[], b"data", digests, &mut out);
        let mut bad_data = out.clone();
        bad_data[52] ^= 1;
        assert!(!frame(&bad_data, digests).unwrap().unwrap().data_digest_ok);
        out[20] ^= 1;
        assert!(matches!(
            frame(&out, digests),
            Err(PduError::HeaderDigest { .. })
        ));
    }

    #[test]
    fn crc32c_matches_the_rfc_3720_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn unknown_opcodes_are_typed_errors() {
        let mut h = [0u8; BHS_LEN];
        h[0] = 0x1c;
        assert_eq!(Bhs::decode(&h), Err(PduError::UnknownOpcode(0x1c)));
    }

    #[test]
    fn lun_fields_use_peripheral_then_flat_addressing() {
        for lun in [0u16, 1, 255, 256, 0x3fff] {
            assert_eq!(lun_number(lun_field(lun)), Some(lun));
        }
        assert_eq!(lun_field(1), 0x0001_0000_0000_0000);
        assert_eq!(lun_number(0x0000_0000_0000_0001), None);
    }
}
