//! A minimal NBD client over a plain TcpStream (fixed newstyle, NBD_OPT_GO, simple replies),
//! so tests can send exactly the bytes they want: bad magic, short payloads, early closes.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_FLUSH: u16 = 3;

/// A connection in the transmission phase (or just past the greeting).
pub struct RawNbd {
    pub stream: TcpStream,
    /// Export size from the GO reply.
    pub size: u64,
    cookie: u64,
}

/// Connect and read the server greeting; the caller continues the handshake by hand.
pub fn greeted(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect to the NBD target");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("NBD greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], IHAVEOPT);
    s
}

impl RawNbd {
    /// Handshake with NBD_OPT_GO for `export`, asking for NBD_INFO_BLOCK_SIZE (as qemu and
    /// libnbd do): requests are held to the advertised sizes. Simple replies only.
    pub fn connect(addr: &str, export: &str) -> RawNbd {
        let mut s = greeted(addr);
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(IHAVEOPT);
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 4).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        // One information request: NBD_INFO_BLOCK_SIZE (3).
        opt.extend_from_slice(&1u16.to_be_bytes());
        opt.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).expect("option reply data");
            assert!(
                kind & 0x8000_0000 == 0,
                "NBD_OPT_GO {export}: error reply {kind:#x}"
            );
            // NBD_INFO_EXPORT: u16 type 0, u64 size, u16 flags.
            if kind == 3 && len >= 12 && data[0..2] == [0, 0] {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
            }
            if kind == REP_ACK {
                break;
            }
        }
        RawNbd {
            stream: s,
            size: size.expect("NBD_INFO_EXPORT in the GO reply"),
            cookie: 1,
        }
    }

    /// The cookie of the last request header made.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The 28-byte request header.
    pub fn header(&mut self, kind: u16, offset: u64, len: u32) -> Vec<u8> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    /// Read a simple reply with `data_len` bytes of data; Err(errno) on an error reply.
    fn reply(&mut self, data_len: usize) -> Result<Vec<u8>, u32> {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h).expect("simple reply");
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.cookie
        );
        let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if errno != 0 {
            return Err(errno);
        }
        let mut data = vec![0u8; data_len];
        self.stream.read_exact(&mut data).expect("read reply data");
        Ok(data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        let mut req = self.header(CMD_WRITE, offset, data.len() as u32);
        req.extend_from_slice(data);
        self.stream.write_all(&req).expect("send write");
        self.reply(0).map(drop)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let req = self.header(CMD_READ, offset, len);
        self.stream.write_all(&req).expect("send read");
        self.reply(len as usize)
    }

    pub fn flush(&mut self) -> Result<(), u32> {
        let req = self.header(CMD_FLUSH, 0, 0);
        self.stream.write_all(&req).expect("send flush");
        self.reply(0).map(drop)
    }
}

/// Read until the peer closes; true if it closed (EOF or reset) before the socket's timeout.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}
