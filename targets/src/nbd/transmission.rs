//! The transmission phase codec: request headers in, checks against the export, and simple
//! or structured replies out.

use super::proto::*;
use super::{NbdConfig, NbdError};
use crate::export::ExportInfo;
use tessel_engine::{Extent, Op};

/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Longest error message put in a structured error chunk.
const MAX_MESSAGE: usize = 1024;

/// The export a connection entered transmission on, and what was negotiated for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmission {
    /// The export served.
    pub export: ExportInfo,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    /// The client asked for block size constraints: requests outside them get EINVAL (or
    /// EOVERFLOW). Otherwise any byte range is served, as the protocol's defaults ask.
    pub strict: bool,
}

/// The transmission flags tessel advertises for an export.
pub fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
    if export.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// One decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (NBD_CMD_FLAG_*).
    pub flags: u16,
    /// Command type (NBD_CMD_*).
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (of the range, and of the payload for writes).
    pub len: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// Decode a request header; a wrong magic ends the session.
pub fn parse_request_header(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, NbdError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(NbdError::BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

/// Why a request is refused: the error value and a reason for the client's user.
type Rejection = (Errno, &'static str);
const PAST_END_NOSPC: Rejection = (Errno::NoSpc, "request extends beyond the end of the export");

/// How the reply to an engine request is shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyShape {
    /// Success or error, no data.
    Status,
    /// `len` bytes of data read at `offset`: bytes `skip..skip + len` of the engine's
    /// buffer (a read widened to whole blocks), sent in data chunks of at most `chunk`.
    Read {
        offset: u64,
        len: u32,
        skip: u32,
        chunk: u32,
    },
    /// base:allocation descriptors for the client's range.
    BlockStatus(StatusQuery),
}

/// The range a BLOCK_STATUS request asked about, as the client gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusQuery {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// NBD_CMD_FLAG_REQ_ONE: answer with one descriptor.
    pub req_one: bool,
}

/// Engine work for one admitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    /// The engine operation.
    pub op: Op,
    /// Byte offset for the engine.
    pub offset: u64,
    /// Length in bytes for the engine.
    pub len: u64,
    /// How the completion is answered.
    pub shape: ReplyShape,
}

/// What to do with a request, once checked against the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Ask the engine, and answer its completion.
    Submit(Work),
    /// Answer success without I/O.
    Succeed,
    /// Answer this error, with a reason for structured replies.
    Reject(Errno, &'static str),
    /// NBD_CMD_DISC: finish in-flight requests, then close.
    Disconnect,
}

impl Transmission {
    /// Transmission flags of this connection.
    pub fn flags(&self) -> u16 {
        transmission_flags(&self.export, self.structured)
    }

    /// Check a request against the export and the protocol's rules.
    pub fn admit(&self, h: &RequestHeader, config: &NbdConfig, shutting_down: bool) -> Admission {
        match self.check(h, config, shutting_down) {
            Ok(admission) => admission,
            Err((errno, reason)) => Admission::Reject(errno, reason),
        }
    }

    fn check(
        &self,
        h: &RequestHeader,
        config: &NbdConfig,
        down: bool,
    ) -> Result<Admission, Rejection> {
        if h.kind == CMD_DISC {
            return Ok(Admission::Disconnect);
        }
        if down {
            return Err((Errno::Shutdown, "the server is shutting down"));
        }
        let allowed_flags = match h.kind {
            CMD_READ if self.structured => CMD_FLAG_DF,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_FLUSH | CMD_CACHE => 0,
            _ => return Err((Errno::Inval, "unknown command")),
        };
        if h.flags & !allowed_flags != 0 {
            return Err((Errno::Inval, "command flag not valid for this command"));
        }
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.export.read_only {
            return Err((Errno::Perm, "the export is read-only"));
        }
        if h.kind == CMD_FLUSH {
            if h.offset != 0 || h.len != 0 {
                return Err((Errno::Inval, "flush with a non-zero offset or length"));
            }
            let shape = ReplyShape::Status;
            return Ok(Admission::Submit(Work {
                op: Op::Flush,
                offset: 0,
                len: 0,
                shape,
            }));
        }
        if h.kind == CMD_BLOCK_STATUS && !(self.structured && self.base_allocation) {
            return Err((
                Errno::Inval,
                "block status without base:allocation negotiated",
            ));
        }
        if h.len == 0 {
            return Err((Errno::Inval, "zero-length request"));
        }
        let end = match h.offset.checked_add(u64::from(h.len)) {
            Some(end) if end <= self.export.size => end,
            // The protocol asks ENOSPC for writes past the end, EINVAL for the rest.
            _ if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) => return Err(PAST_END_NOSPC),
            _ => return Err((Errno::Inval, PAST_END_NOSPC.1)),
        };
        let block = u64::from(self.export.block_size.max(1));
        if h.kind == CMD_BLOCK_STATUS {
            // Clients may ask about any byte range; the engine sees it widened to blocks.
            let start = h.offset / block * block;
            let end = end.div_ceil(block) * block;
            let shape = ReplyShape::BlockStatus(StatusQuery {
                offset: h.offset,
                len: h.len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            });
            let len = end.min(self.export.size) - start;
            return Ok(Admission::Submit(Work {
                op: Op::BlockStatus,
                offset: start,
                len,
                shape,
            }));
        }
        let aligned = h.offset.is_multiple_of(block) && u64::from(h.len).is_multiple_of(block);
        if self.strict && !aligned {
            return Err((
                Errno::Inval,
                "offset or length not a multiple of the block size",
            ));
        }
        let max = if self.strict {
            config.max_payload
        } else {
            config.max_unnegotiated
        };
        if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > max {
            let errno = if self.structured && h.kind == CMD_READ {
                Errno::Overflow
            } else {
                Errno::Inval
            };
            return Err((errno, "read or write larger than the maximum payload"));
        }
        let (op, shape) = match h.kind {
            CMD_READ => {
                // Device reads are block-aligned: read the covering blocks, send the slice.
                let start = h.offset / block * block;
                let len = end.div_ceil(block) * block - start;
                // Data chunks no larger than a negotiated maximum payload, unless the
                // client asked for one chunk (DF).
                let chunk = if h.flags & CMD_FLAG_DF != 0 {
                    u32::MAX
                } else {
                    config.max_payload
                };
                let shape = ReplyShape::Read {
                    offset: h.offset,
                    len: h.len,
                    skip: (h.offset - start) as u32,
                    chunk,
                };
                return Ok(Admission::Submit(Work {
                    op: Op::Read,
                    offset: start,
                    len,
                    shape,
                }));
            }
            CMD_WRITE => (Op::Write { fua }, ReplyShape::Status),
            CMD_TRIM => (Op::Trim, ReplyShape::Status),
            CMD_WRITE_ZEROES => (Op::WriteZeroes { fua }, ReplyShape::Status),
            _ => return Ok(Admission::Succeed), // CMD_CACHE: tessel has no cache to warm
        };
        let (offset, len) = (h.offset, u64::from(h.len));
        Ok(Admission::Submit(Work {
            op,
            offset,
            len,
            shape,
        }))
    }
}

/// Append a structured chunk header.
fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Append a simple reply header (the data, if any, follows).
fn put_simple(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Append a successful reply without data.
pub fn put_success(out: &mut Vec<u8>, structured: bool, cookie: u64) {
    if structured {
        put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        put_simple(out, cookie, 0);
    }
}

/// Append an error reply; structured replies carry `message` for the client's user.
pub fn put_error(out: &mut Vec<u8>, structured: bool, cookie: u64, errno: Errno, message: &str) {
    if !structured {
        return put_simple(out, cookie, errno.code());
    }
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    );
    out.extend_from_slice(&errno.code().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// Append a successful read reply: with structured replies one chunk per `chunk` bytes,
/// each OFFSET_HOLE when all its data is zeroes (sparse reads cost no bandwidth), else
/// OFFSET_DATA, the last one flagged DONE; without, a simple reply and the data.
pub fn put_read(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    offset: u64,
    data: &[u8],
    chunk: u32,
) {
    if !structured {
        put_simple(out, cookie, 0);
        out.extend_from_slice(data);
        return;
    }
    let chunk = (chunk as usize).max(1);
    let pieces = data.len().div_ceil(chunk);
    for (i, piece) in data.chunks(chunk).enumerate() {
        let flags = if i + 1 == pieces { REPLY_FLAG_DONE } else { 0 };
        let at = offset + (i * chunk) as u64;
        if is_zero(piece) {
            put_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            out.extend_from_slice(&at.to_be_bytes());
            out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        } else {
            let len = 8 + piece.len() as u32;
            put_chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, cookie, len);
            out.extend_from_slice(&at.to_be_bytes());
            out.extend_from_slice(piece);
        }
    }
}

/// True when every byte is zero; a page at a time so the OR folds into vector code.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|page| page.iter().fold(0, |acc, &b| acc | b) == 0)
}

/// One base:allocation descriptor: length and status flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes covered.
    pub len: u32,
    /// NBD_STATE_* bits.
    pub flags: u32,
}

/// Turn engine extents into consecutive descriptors covering the queried range from its
/// start (merged where the state repeats; one only for REQ_ONE). Where the engine says
/// nothing, the range is reported as data, which the protocol allows.
pub fn descriptors(extents: &[Extent], query: StatusQuery) -> Vec<Descriptor> {
    let StatusQuery {
        offset,
        len,
        req_one,
    } = query;
    let end = offset + u64::from(len);
    let mut pos = offset;
    let mut out: Vec<Descriptor> = Vec::new();
    for e in extents {
        let e_end = e.offset.saturating_add(e.len);
        if e_end <= pos {
            continue;
        }
        if e.offset > pos || pos >= end {
            break;
        }
        let run = (e_end.min(end) - pos) as u32;
        let flags = if e.allocated {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += run,
            _ => out.push(Descriptor { len: run, flags }),
        }
        pos += u64::from(run);
    }
    if out.is_empty() {
        out.push(Descriptor { len, flags: 0 });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Append a BLOCK_STATUS chunk for base:allocation, ending the reply.
pub fn put_block_status(out: &mut Vec<u8>, cookie: u64, descriptors: &[Descriptor]) {
    let len = 4 + 8 * descriptors.len() as u32;
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::*;
    use tessel_engine::{IoError, VolumeId};

    fn tx(read_only: bool, structured: bool) -> Transmission {
        Transmission {
            export: ExportInfo {
                name: "vol0".into(),
                description: String::new(),
                volume: VolumeId(1),
                size: 1 << 20,
                block_size: 512,
                read_only,
            },
            structured,
            base_allocation: structured,
            strict: true,
        }
    }

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    fn admit(t: &Transmission, h: RequestHeader) -> Admission {
        t.admit(&h, &NbdConfig::default(), false)
    }

    fn rejected(t: &Transmission, h: RequestHeader) -> Option<Errno> {
        match admit(t, h) {
            Admission::Reject(errno, _) => Some(errno),
            _ => None,
        }
    }

    #[test]
    fn read_only_exports_advertise_no_write_commands() {
        let flags = tx(true, false).flags();
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_eq!(
            flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA),
            0
        );
        assert_eq!(flags & FLAG_SEND_DF, 0);
        assert_ne!(tx(false, true).flags() & FLAG_SEND_DF, 0);
    }

    #[test]
    fn writes_past_the_end_are_enospc_and_reads_einval() {
        let t = tx(false, false);
        let past = (1 << 20) - 512;
        assert_eq!(
            rejected(&t, header(CMD_WRITE, 0, past, 1024)),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            rejected(&t, header(CMD_READ, 0, past, 1024)),
            Some(Errno::Inval)
        );
        let wrap = header(CMD_WRITE_ZEROES, 0, u64::MAX - 1, 512);
        assert_eq!(rejected(&t, wrap), Some(Errno::NoSpc));
    }

    #[test]
    fn misaligned_and_flagged_requests_are_einval() {
        let t = tx(false, false);
        assert_eq!(
            rejected(&t, header(CMD_READ, 0, 100, 512)),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(&t, header(CMD_READ, CMD_FLAG_DF, 0, 512)),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(&t, header(CMD_FLUSH, 0, 0, 512)),
            Some(Errno::Inval)
        );
        assert_eq!(rejected(&t, header(99, 0, 0, 512)), Some(Errno::Inval));
    }

    #[test]
    fn block_status_range_is_widened_to_blocks_for_the_engine() {
        let t = tx(false, true);
        let a = admit(&t, header(CMD_BLOCK_STATUS, 0, 100, 1000));
        let shape = ReplyShape::BlockStatus(StatusQuery {
            offset: 100,
            len: 1000,
            req_one: false,
        });
        assert_eq!(
            a,
            Admission::Submit(Work {
                op: Op::BlockStatus,
                offset: 0,
                len: 1536,
                shape
            })
        );
    }

    fn query(offset: u64, len: u32, req_one: bool) -> StatusQuery {
        StatusQuery {
            offset,
            len,
            req_one,
        }
    }

    #[test]
    fn descriptors_clip_merge_and_honour_req_one() {
        let e = |offset, len, allocated| Extent {
            offset,
            len,
            allocated,
        };
        let extents = [e(0, 4096, true), e(4096, 4096, true), e(8192, 8192, false)];
        let d = descriptors(&extents, query(1024, 10240, false));
        assert_eq!(
            d,
            vec![
                Descriptor {
                    len: 7168,
                    flags: 0
                },
                Descriptor {
                    len: 3072,
                    flags: STATE_HOLE | STATE_ZERO
                }
            ]
        );
        assert_eq!(descriptors(&extents, query(1024, 10240, true)).len(), 1);
        assert_eq!(
            descriptors(&[], query(0, 512, false)),
            vec![Descriptor { len: 512, flags: 0 }]
        );
    }

    #[test]
    fn structured_error_chunk_carries_errno_and_message() {
        let mut out = Vec::new();
        put_error(&mut out, true, 9, Errno::NoSpc, "pool is full");
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 6 + 12);
        assert_eq!(u32::from_be_bytes(out[20..24].try_into().unwrap()), 28);
        assert_eq!(&out[26..], b"pool is full");
    }

    #[test]
    fn structured_read_of_zeroes_answers_one_offset_hole_chunk() {
        let mut c = Client::go("vol0", true, false);
        c.request(CMD_READ, 0, 4, 4096, 8192);
        c.run_engine();
        let chunks = chunks(&c.take());
        assert_eq!(chunks.len(), 1);
        let (flags, kind, cookie, payload) = &chunks[0];
        assert_eq!(
            (*flags, *kind, *cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 4)
        );
        assert_eq!(
            (be64(payload), be32(&payload[8..]), payload.len()),
            (4096, 8192, 12)
        );
    }

    #[test]
    fn structured_read_answers_one_offset_data_chunk() {
        let mut c = Client::go("vol0", true, false);
        c.memory.data[512..1024].fill(0xab);
        c.request(CMD_READ, CMD_FLAG_DF, 3, 512, 512);
        c.run_engine();
        let chunks = chunks(&c.take());
        assert_eq!(chunks.len(), 1);
        let (flags, kind, cookie, payload) = &chunks[0];
        assert_eq!(
            (*flags, *kind, *cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 3)
        );
        assert_eq!(be64(payload), 512);
        assert!(payload[8..].iter().all(|&b| b == 0xab) && payload.len() == 8 + 512);
    }

    #[test]
    fn write_to_read_only_export_is_eperm_without_engine_request() {
        let mut c = Client::go("vol0@snap", false, false);
        let mut bytes = request_bytes(CMD_WRITE, 0, 4, 0, 4096);
        bytes.extend_from_slice(&[1; 4096]);
        bytes.extend_from_slice(&request_bytes(CMD_TRIM, 0, 5, 0, 4096));
        c.send(&bytes);
        let reply = c.take();
        assert_eq!(simple(&reply), (Errno::Perm.code(), 4));
        assert_eq!(simple(&reply[16..]), (Errno::Perm.code(), 5));
        assert!(c.actions.submit.is_empty());
    }

    #[test]
    fn misaligned_and_out_of_range_requests_get_their_errnos() {
        let mut c = Client::go("vol0", false, false);
        c.request(CMD_READ, 0, 1, 100, 512);
        c.request(CMD_READ, 0, 2, SIZE, 512);
        c.request(CMD_WRITE_ZEROES, 0, 3, SIZE - 512, 1024);
        c.request(CMD_READ, 0, 4, 0, 0);
        c.request(42, 0, 5, 0, 512);
        c.request(CMD_READ, CMD_FLAG_FUA, 6, 0, 512);
        let reply = c.take();
        let got: Vec<_> = reply.chunks(16).map(simple).collect();
        let inval = Errno::Inval.code();
        let expected = [
            (inval, 1),
            (inval, 2),
            (Errno::NoSpc.code(), 3),
            (inval, 4),
            (inval, 5),
            (inval, 6),
        ];
        assert_eq!(got, expected);
        assert!(c.actions.submit.is_empty());
    }

    #[test]
    fn read_larger_than_max_payload_is_eoverflow_with_structured_replies() {
        let mut big = exports();
        big[0].size = 1 << 30;
        for (structured, errno) in [(true, Errno::Overflow), (false, Errno::Inval)] {
            let mut c = Client::go_on(big.clone(), "vol0", structured, false);
            c.request(CMD_READ, 0, 1, 0, (32 << 20) + 512);
            let reply = c.take();
            let got = if structured {
                be32(&chunks(&reply)[0].3)
            } else {
                simple(&reply).0
            };
            assert_eq!(got, errno.code());
            assert!(c.actions.submit.is_empty());
        }
    }

    #[test]
    fn engine_errors_become_protocol_errnos_with_a_message() {
        let mut c = Client::go("vol0", true, false);
        let mut bytes = request_bytes(CMD_WRITE, CMD_FLAG_FUA, 8, 0, 512);
        bytes.extend_from_slice(&[9; 512]);
        c.send(&bytes);
        assert_eq!(c.actions.submit[0].op, Op::Write { fua: true });
        c.memory.fail_with = Some(IoError::NoSpace);
        c.run_engine();
        c.memory.fail_with = Some(IoError::Device(libc::EIO));
        c.request(CMD_READ, 0, 9, 0, 512);
        c.run_engine();
        let chunks = chunks(&c.take());
        assert_eq!((chunks[0].1, chunks[0].2), (REPLY_TYPE_ERROR, 8));
        assert_eq!(be32(&chunks[0].3), Errno::NoSpc.code());
        assert_eq!(&chunks[0].3[6..], b"pool is full");
        assert_eq!((chunks[1].2, be32(&chunks[1].3)), (9, Errno::Io.code()));
    }

    #[test]
    fn flush_trim_and_write_zeroes_reach_the_engine_with_their_flags() {
        let mut c = Client::go("vol0", true, false);
        c.request(CMD_FLUSH, 0, 1, 0, 0);
        c.request(CMD_TRIM, CMD_FLAG_FUA, 2, 0, 4096);
        let zero_flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
        c.request(CMD_WRITE_ZEROES, zero_flags, 3, 4096, 4096);
        let ops: Vec<_> = c
            .actions
            .submit
            .iter()
            .map(|r| (r.op, r.offset, r.len))
            .collect();
        assert_eq!(
            ops,
            [
                (Op::Flush, 0, 0),
                (Op::Trim, 0, 4096),
                (Op::WriteZeroes { fua: true }, 4096, 4096)
            ]
        );
        assert!(c
            .actions
            .submit
            .iter()
            .all(|r| r.buf.is_none() && r.volume == VolumeId(1)));
        c.run_engine();
        let done: Vec<_> = chunks(&c.take())
            .iter()
            .map(|ch| (ch.0, ch.1, ch.2))
            .collect();
        let none = |cookie| (REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie);
        assert_eq!(done, [none(1), none(2), none(3)]);
    }

    #[test]
    fn cache_succeeds_without_engine_request() {
        let mut c = Client::go("vol0", false, false);
        c.request(CMD_CACHE, 0, 6, 0, 4096);
        assert_eq!(simple(&c.take()), (0, 6));
        assert!(c.actions.submit.is_empty());
    }

    #[test]
    fn block_status_maps_unallocated_to_hole_and_zero() {
        let mut c = Client::go("vol0", true, true);
        c.memory.allocated[1] = true;
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 16384);
        c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 8, 4096, 12288);
        c.run_engine();
        let chunks = chunks(&c.take());
        let descriptors = |payload: &[u8]| -> Vec<(u32, u32)> {
            assert_eq!(be32(payload), BASE_ALLOCATION_ID);
            payload[4..]
                .chunks(8)
                .map(|d| (be32(d), be32(&d[4..])))
                .collect()
        };
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!((chunks[0].1, chunks[0].2), (REPLY_TYPE_BLOCK_STATUS, 7));
        assert_eq!(
            descriptors(&chunks[0].3),
            [(4096, hole), (4096, 0), (8192, hole)]
        );
        assert_eq!(descriptors(&chunks[1].3), [(4096, 0)]);
    }

    fn pattern(memory: &mut Memory) {
        for (i, b) in memory.data.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
    }

    #[test]
    fn unnegotiated_reads_read_the_covering_blocks_and_answer_the_slice() {
        for structured in [false, true] {
            let mut c = Client::go_unnegotiated(NbdConfig::default(), structured);
            pattern(&mut c.memory);
            c.request(CMD_READ, 0, 1, 100, 1000);
            let submitted = &c.actions.submit[0];
            assert_eq!((submitted.offset, submitted.len), (0, 1536));
            c.run_engine();
            let reply = c.take();
            let data = if structured {
                let chunks = chunks(&reply);
                assert_eq!(chunks.len(), 1);
                assert_eq!(
                    (chunks[0].0, chunks[0].1),
                    (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)
                );
                assert_eq!(be64(&chunks[0].3), 100);
                chunks[0].3[8..].to_vec()
            } else {
                assert_eq!(simple(&reply), (0, 1));
                reply[16..].to_vec()
            };
            assert!(data == c.memory.data[100..1100], "structured: {structured}");
        }
    }

    #[test]
    fn unnegotiated_writes_trims_and_zeroes_go_to_the_engine_at_their_bytes() {
        let mut c = Client::go_unnegotiated(NbdConfig::default(), false);
        pattern(&mut c.memory);
        c.write(1, 3, b"hello");
        c.request(CMD_WRITE_ZEROES, 0, 2, 700, 13);
        c.request(CMD_TRIM, 0, 3, 5000, 1);
        let ops: Vec<_> = c
            .actions
            .submit
            .iter()
            .map(|r| (r.op, r.offset, r.len))
            .collect();
        assert_eq!(
            ops,
            [
                (Op::Write { fua: false }, 3, 5),
                (Op::WriteZeroes { fua: false }, 700, 13),
                (Op::Trim, 5000, 1)
            ]
        );
        c.run_engine();
        let replies: Vec<_> = c.take().chunks(16).map(simple).collect();
        assert_eq!(replies, [(0, 1), (0, 2), (0, 3)]);
        assert_eq!(&c.memory.data[3..8], b"hello");
        assert!(c.memory.data[700..713].iter().all(|&b| b == 0));
        assert_ne!(c.memory.data[699], 0);
        assert_ne!(c.memory.data[713], 0);
    }

    #[test]
    fn unnegotiated_reads_over_the_maximum_payload_come_in_chunks_unless_df() {
        let config = NbdConfig {
            max_payload: 4096,
            ..NbdConfig::default()
        };
        let mut c = Client::go_unnegotiated(config, true);
        pattern(&mut c.memory);
        c.memory.data[4097..8193].fill(0);
        c.request(CMD_READ, 0, 1, 1, 10_000);
        c.request(CMD_READ, CMD_FLAG_DF, 2, 1, 10_000);
        c.run_engine();
        let chunks = chunks(&c.take());
        let shape: Vec<_> = chunks
            .iter()
            .map(|(flags, kind, cookie, p)| (*cookie, *flags, *kind, be64(p)))
            .collect();
        let data = REPLY_TYPE_OFFSET_DATA;
        assert_eq!(
            shape,
            [
                (1, 0, data, 1),
                (1, 0, REPLY_TYPE_OFFSET_HOLE, 4097),
                (1, REPLY_FLAG_DONE, data, 8193),
                (2, REPLY_FLAG_DONE, data, 1)
            ]
        );
        assert_eq!(be32(&chunks[1].3[8..]), 4096);
        assert!(chunks[0].3[8..] == c.memory.data[1..4097]);
        assert!(chunks[2].3[8..] == c.memory.data[8193..10_001]);
        assert!(chunks[3].3[8..] == c.memory.data[1..10_001]);
    }

    #[test]
    fn unnegotiated_requests_beyond_memory_are_refused_and_the_connection_goes_on() {
        let config = NbdConfig {
            max_unnegotiated: 8192,
            ..NbdConfig::default()
        };
        let mut c = Client::go_unnegotiated(config, true);
        c.write(1, 0, &[7; 8193]);
        c.request(CMD_READ, 0, 2, 0, 8193);
        c.write(3, 1, &[7; 8192]);
        let chunks = chunks(&c.take());
        let errors: Vec<_> = chunks.iter().map(|ch| (ch.2, be32(&ch.3))).collect();
        assert_eq!(
            errors,
            [(1, Errno::Inval.code()), (2, Errno::Overflow.code())]
        );
        assert_eq!(c.actions.submit.len(), 1, "the write that fits is served");
    }

    #[test]
    fn block_status_without_base_allocation_is_einval() {
        let mut c = Client::go("vol0", true, false);
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096);
        assert_eq!(be32(&chunks(&c.take())[0].3), Errno::Inval.code());
        let mut c = Client::negotiated(true);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        c.option(
            OPT_SET_META_CONTEXT,
            &meta_data("vol0@snap", &[BASE_ALLOCATION]),
        );
        c.option(OPT_GO, &go_data("vol0", &[]));
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096);
        assert_eq!(be32(&chunks(&c.take())[0].3), Errno::Inval.code());
    }
}
