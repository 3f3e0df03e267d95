//! Test harness shared by the NBD unit tests: a client speaking bytes to a session, and a
//! volume in memory that executes the session's engine requests.

use super::proto::*;
use super::{NbdConfig, NbdSession};
use crate::export::{Actions, ExportInfo};
use tessel_engine::{Completion, Extent, IoError, Op, Request, VolumeId};

/// Size of every test export.
pub const SIZE: u64 = 1 << 20;

/// `vol0` (read-write, 512-byte blocks) and `vol0@snap` (read-only, 4096-byte blocks).
pub fn exports() -> Vec<ExportInfo> {
    let export = |name: &str, volume, block_size, read_only| ExportInfo {
        name: name.into(),
        description: format!("{name} described"),
        volume: VolumeId(volume),
        size: SIZE,
        block_size,
        read_only,
    };
    vec![
        export("vol0", 1, 512, false),
        export("vol0@snap", 2, 4096, true),
    ]
}

/// A volume in memory with 4 KiB allocation granularity, executing engine requests.
pub struct Memory {
    /// The volume's bytes.
    pub data: Vec<u8>,
    /// Allocation state per 4 KiB block.
    pub allocated: Vec<bool>,
    /// When set, every request fails with this error.
    pub fail_with: Option<IoError>,
}

impl Memory {
    /// A volume of `SIZE` zeroes, nothing allocated.
    pub fn new() -> Memory {
        let blocks = (SIZE / 4096) as usize;
        Memory {
            data: vec![0; SIZE as usize],
            allocated: vec![false; blocks],
            fail_with: None,
        }
    }

    /// Execute one request and answer it.
    pub fn execute(&mut self, mut r: Request) -> Completion {
        let range = r.offset as usize..(r.offset + r.len) as usize;
        let blocks = range.start / 4096..range.end.div_ceil(4096);
        let mut extents = Vec::new();
        let result = match (self.fail_with.clone(), r.op) {
            (Some(e), _) => Err(e),
            (None, Op::Read) => {
                r.buf
                    .as_mut()
                    .unwrap()
                    .as_mut_slice()
                    .copy_from_slice(&self.data[range]);
                Ok(())
            }
            (None, Op::Write { .. }) => {
                self.data[range].copy_from_slice(r.buf.as_ref().unwrap().as_slice());
                self.allocated[blocks].fill(true);
                Ok(())
            }
            (None, Op::Trim | Op::WriteZeroes { .. }) => {
                self.data[range].fill(0);
                self.allocated[blocks].fill(false);
                Ok(())
            }
            (None, Op::Flush) => Ok(()),
            (None, Op::BlockStatus) => {
                for b in blocks {
                    let (offset, len) = (b as u64 * 4096, 4096);
                    extents.push(Extent {
                        offset,
                        len,
                        allocated: self.allocated[b],
                    });
                }
                Ok(())
            }
        };
        Completion {
            tag: r.tag,
            result,
            buf: r.buf,
            extents,
        }
    }
}

/// A client talking to a session through bytes, with the engine in memory.
pub struct Client {
    /// The session under test.
    pub session: NbdSession,
    /// What the session asked for, not yet consumed by the test.
    pub actions: Actions,
    /// The exports the session sees.
    pub exports: Vec<ExportInfo>,
    /// The volume behind every export.
    pub memory: Memory,
}

impl Client {
    /// A new connection, greeting checked and taken.
    pub fn connect(exports: Vec<ExportInfo>) -> Client {
        Client::connect_with(NbdConfig::default(), exports)
    }

    /// A new connection under `config`, greeting checked and taken.
    pub fn connect_with(config: NbdConfig, exports: Vec<ExportInfo>) -> Client {
        let mut actions = Actions::default();
        let session = NbdSession::new(config, &mut actions);
        assert_eq!(&actions.send[..8], b"NBDMAGIC");
        actions.send.clear();
        Client {
            session,
            actions,
            exports,
            memory: Memory::new(),
        }
    }

    /// Connected, with the client's flags sent.
    pub fn negotiated(no_zeroes: bool) -> Client {
        let mut c = Client::connect(exports());
        let no_zeroes = if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&(FLAG_C_FIXED_NEWSTYLE | no_zeroes).to_be_bytes());
        c
    }

    /// Connected under `config` to the test exports, with NO_ZEROES set.
    pub fn negotiated_with(config: NbdConfig) -> Client {
        let mut c = Client::connect_with(config, exports());
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    /// Fed in one piece; asserts that everything was consumed.
    pub fn send(&mut self, bytes: &[u8]) {
        let n = self
            .session
            .receive(bytes, &self.exports, &mut self.actions)
            .unwrap();
        assert_eq!(n, bytes.len());
    }

    /// Everything the session sent since the last take.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.actions.send)
    }

    /// Send an option and decode its replies: (option, reply type, data).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        self.send(&option_bytes(option, data));
        parse_option_replies(&self.take())
    }

    /// Handshake to transmission on `name` of the test exports via NBD_OPT_GO.
    pub fn go(name: &str, structured: bool, meta: bool) -> Client {
        Client::go_on(exports(), name, structured, meta)
    }

    /// Handshake to transmission on `name` of `exports` via NBD_OPT_GO, asking for block
    /// sizes (as qemu and libnbd do by default): requests are held to them.
    pub fn go_on(exports: Vec<ExportInfo>, name: &str, structured: bool, meta: bool) -> Client {
        let config = NbdConfig::default();
        Client::go_with(exports, config, name, structured, meta, &[INFO_BLOCK_SIZE])
    }

    /// Handshake to `vol0` (512-byte blocks) via NBD_OPT_GO without asking for block sizes:
    /// the protocol's defaults hold.
    pub fn go_unnegotiated(config: NbdConfig, structured: bool) -> Client {
        Client::go_with(exports(), config, "vol0", structured, false, &[])
    }

    /// Handshake via NBD_OPT_GO asking for the information items `info`.
    pub fn go_with(
        exports: Vec<ExportInfo>,
        config: NbdConfig,
        name: &str,
        structured: bool,
        meta: bool,
        info: &[u16],
    ) -> Client {
        let mut c = Client::connect_with(config, exports);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[])[0].1, REP_ACK);
        }
        if meta {
            let replies = c.option(OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION]));
            assert_eq!(replies.last().unwrap().1, REP_ACK);
        }
        let replies = c.option(OPT_GO, &go_data(name, info));
        assert_eq!(replies.last().unwrap().1, REP_ACK, "{replies:?}");
        c
    }

    /// Send one request header.
    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request_bytes(kind, flags, cookie, offset, len));
    }

    /// Send one write request with its payload.
    pub fn write(&mut self, cookie: u64, offset: u64, payload: &[u8]) {
        let mut b = request_bytes(CMD_WRITE, 0, cookie, offset, payload.len() as u32);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Complete every submitted request in submission order.
    pub fn run_engine(&mut self) {
        for r in std::mem::take(&mut self.actions.submit) {
            let completion = self.memory.execute(r);
            self.session.complete(completion, &mut self.actions);
        }
    }
}

/// A client option on the wire.
pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// NBD_OPT_GO / NBD_OPT_INFO data.
pub fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    requests
        .iter()
        .for_each(|r| d.extend_from_slice(&r.to_be_bytes()));
    d
}

/// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A request header on the wire.
pub fn request_bytes(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// The big-endian u32 at the start of `b`.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// The big-endian u64 at the start of `b`.
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Option replies: (option, reply type, data).
pub fn parse_option_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut replies = Vec::new();
    while !b.is_empty() {
        assert_eq!(be64(b), REP_MAGIC);
        let len = be32(&b[16..]) as usize;
        replies.push((be32(&b[8..]), be32(&b[12..]), b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    replies
}

/// A simple reply: (error, cookie); any data follows its 16 bytes.
pub fn simple(b: &[u8]) -> (u32, u64) {
    assert_eq!(be32(b), SIMPLE_REPLY_MAGIC);
    (be32(&b[4..]), be64(&b[8..]))
}

/// Structured chunks: (flags, type, cookie, payload).
pub fn chunks(mut b: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(be32(b), STRUCTURED_REPLY_MAGIC);
        let flags = u16::from_be_bytes([b[4], b[5]]);
        let kind = u16::from_be_bytes([b[6], b[7]]);
        let len = be32(&b[16..]) as usize;
        out.push((flags, kind, be64(&b[8..]), b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    out
}
