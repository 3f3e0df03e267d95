//! A minimal iSCSI initiator over a plain TcpStream (no digests, no authentication, one
//! connection, ERL 0), so tests can read and write blocks without a kernel initiator and
//! send exactly the bytes they want: unknown opcodes, lying lengths, truncated segments,
//! CmdSNs outside the window, a close in the middle of a transfer.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const BHS_LEN: usize = 48;
const OP_NOP_OUT: u8 = 0x00;
const OP_SCSI_CMD: u8 = 0x01;
const OP_LOGIN: u8 = 0x03;
const OP_DATA_OUT: u8 = 0x05;
const OP_LOGOUT: u8 = 0x06;
const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
const OP_R2T: u8 = 0x31;
pub const OP_REJECT: u8 = 0x3f;
pub const INITIATOR: &str = "iqn.2026-11.dev.tessel:raw-test";

/// What a SCSI command ended with.
#[derive(Debug)]
pub struct ScsiResult {
    pub status: u8,
    /// Sense data (without the 2-byte length), empty when none.
    pub sense: Vec<u8>,
    /// Data-In, assembled by buffer offset.
    pub data: Vec<u8>,
}

impl ScsiResult {
    /// Sense key, ASC, ASCQ (fixed or descriptor format).
    pub fn sense_key(&self) -> Option<(u8, u8, u8)> {
        let s = &self.sense;
        match s.first().map(|b| b & 0x7f) {
            Some(0x70 | 0x71) if s.len() >= 14 => Some((s[2] & 0x0f, s[12], s[13])),
            Some(0x72 | 0x73) if s.len() >= 4 => Some((s[1] & 0x0f, s[2], s[3])),
            _ => None,
        }
    }
}

/// A logged-in normal session (or a bare connection for hand-made bytes).
pub struct RawIscsi {
    pub stream: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    itt: u32,
    /// The target's MaxRecvDataSegmentLength: the most we may send in one PDU.
    pub max_send: usize,
}

/// One received PDU.
#[derive(Debug)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bhs[at..at + 4].try_into().unwrap())
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set_data_len(b: &mut [u8; BHS_LEN], len: usize) {
    b[5..8].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
}

fn lun_field(lun: u16) -> [u8; 8] {
    let mut l = [0u8; 8];
    l[..2].copy_from_slice(&lun.to_be_bytes());
    l
}

/// Connect to the portal, with generous timeouts.
pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the iSCSI portal");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// True when the peer closed the connection (EOF or reset) within the read timeout.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a Reject or login response before the close
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

impl RawIscsi {
    /// A bare connection: nothing sent yet.
    pub fn bare(addr: &str) -> RawIscsi {
        RawIscsi {
            stream: connect(addr),
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            max_send: 8192,
        }
    }

    /// Log in to `<prefix>:volume` straight into operational negotiation (no security
    /// stage: the volume must have no CHAP). Panics on a refused login.
    pub fn login(addr: &str, volume: &str) -> RawIscsi {
        RawIscsi::login_with(addr, volume, true)
    }

    /// `login`, offering InitialR2T=`initial_r2t` (No lets unsolicited Data-Out follow a
    /// write command).
    pub fn login_with(addr: &str, volume: &str, initial_r2t: bool) -> RawIscsi {
        let mut s = RawIscsi::bare(addr);
        let r2t = if initial_r2t { "Yes" } else { "No" };
        let keys = format!(
            "InitiatorName={INITIATOR}\0SessionType=Normal\0\
             TargetName=iqn.2026-11.dev.tessel:{volume}\0HeaderDigest=None\0\
             DataDigest=None\0MaxRecvDataSegmentLength=262144\0ImmediateData=Yes\0\
             InitialR2T={r2t}\0MaxBurstLength=262144\0FirstBurstLength=65536\0"
        );
        let mut body = keys.into_bytes();
        for _ in 0..4 {
            s.send_login(&body);
            let r = s.recv().expect("login response");
            assert_eq!(r.opcode(), OP_LOGIN_RESP, "not a login response: {r:?}");
            assert_eq!(
                (r.bhs[36], r.bhs[37]),
                (0, 0),
                "login refused: {}",
                String::from_utf8_lossy(&r.data)
            );
            s.exp_stat_sn = r.u32_at(24).wrapping_add(1);
            for kv in r.data.split(|&b| b == 0) {
                let kv = String::from_utf8_lossy(kv);
                if let Some(v) = kv.strip_prefix("MaxRecvDataSegmentLength=") {
                    s.max_send = v.parse().expect("a number");
                }
            }
            if r.bhs[1] & 0x80 != 0 && r.bhs[1] & 0x03 == 3 {
                return s;
            }
            body = Vec::new();
        }
        panic!("the target did not move to full feature phase");
    }

    fn send_login(&mut self, data: &[u8]) {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x40 | OP_LOGIN;
        b[1] = 0x80 | (1 << 2) | 3; // T, CSG operational, NSG full feature
        b[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        put_u32(&mut b, 16, 0);
        put_u32(&mut b, 24, self.cmd_sn);
        put_u32(&mut b, 28, self.exp_stat_sn);
        self.send_pdu(b, data);
    }

    /// Send a header and its data segment (padded).
    pub fn send_pdu(&mut self, bhs: [u8; BHS_LEN], data: &[u8]) {
        self.try_send_pdu(bhs, data).expect("send a PDU");
    }

    /// Send a header and its data segment, reporting a write error (the target may close
    /// the connection before a refused PDU is fully written).
    pub fn try_send_pdu(&mut self, mut bhs: [u8; BHS_LEN], data: &[u8]) -> std::io::Result<()> {
        set_data_len(&mut bhs, data.len());
        let mut v = bhs.to_vec();
        v.extend_from_slice(data);
        v.resize(v.len().next_multiple_of(4), 0);
        self.stream.write_all(&v)
    }

    /// Raw bytes, exactly as given.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next PDU (None at EOF), answering the target's NOP-In pings on the way.
    pub fn recv(&mut self) -> Option<Pdu> {
        loop {
            let mut bhs = [0u8; BHS_LEN];
            if let Err(e) = self.stream.read_exact(&mut bhs) {
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) {
                    return None;
                }
                panic!("receive a PDU header: {e}");
            }
            let ahs = usize::from(bhs[4]) * 4;
            let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
            let mut rest = vec![0u8; ahs + len.next_multiple_of(4)];
            self.stream
                .read_exact(&mut rest)
                .expect("receive a data segment");
            let pdu = Pdu {
                bhs,
                data: rest[ahs..ahs + len].to_vec(),
            };
            if pdu.opcode() == OP_NOP_IN && pdu.u32_at(16) == 0xffff_ffff {
                // A ping: answer with the same TTT, immediate, no CmdSN consumed.
                let mut b = [0u8; BHS_LEN];
                b[0] = 0x40 | OP_NOP_OUT;
                b[1] = 0x80;
                put_u32(&mut b, 16, 0xffff_ffff);
                b[20..24].copy_from_slice(&pdu.bhs[20..24]);
                put_u32(&mut b, 24, self.cmd_sn);
                put_u32(&mut b, 28, self.exp_stat_sn);
                self.send_pdu(b, &[]);
                continue;
            }
            return Some(pdu);
        }
    }

    /// The header of a SCSI Command with the next ITT and CmdSN (advanced).
    pub fn command_header(&mut self, lun: u16, cdb: &[u8], read: u32, write: u32) -> [u8; 48] {
        let mut b = [0u8; BHS_LEN];
        b[0] = OP_SCSI_CMD;
        b[1] = 0x80 | 1; // F, simple task attribute
        if read > 0 {
            b[1] |= 0x40;
        }
        if write > 0 {
            b[1] |= 0x20;
        }
        b[8..16].copy_from_slice(&lun_field(lun));
        put_u32(&mut b, 16, self.itt);
        put_u32(&mut b, 20, read.max(write));
        put_u32(&mut b, 24, self.cmd_sn);
        put_u32(&mut b, 28, self.exp_stat_sn);
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        self.itt = self.itt.wrapping_add(1);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        b
    }

    /// Run a SCSI command: `data_out` goes as immediate data and then as Data-Out for the
    /// R2Ts; `read` bytes of Data-In are expected.
    pub fn command(&mut self, lun: u16, cdb: &[u8], data_out: &[u8], read: u32) -> ScsiResult {
        let b = self.command_header(lun, cdb, read, data_out.len() as u32);
        let itt = u32::from_be_bytes(b[16..20].try_into().unwrap());
        let immediate = data_out.len().min(self.max_send).min(65536);
        self.send_pdu(b, &data_out[..immediate]);
        let mut data = vec![0u8; read as usize];
        loop {
            let p = self
                .recv()
                .expect("the target closed the connection mid-command");
            if matches!(p.opcode(), OP_R2T | OP_DATA_IN | OP_SCSI_RESP) {
                assert_eq!(p.u32_at(16), itt, "an answer for another task: {p:?}");
            }
            match p.opcode() {
                OP_R2T => {
                    let ttt = p.u32_at(20);
                    let (offset, len) = (p.u32_at(40) as usize, p.u32_at(44) as usize);
                    let mut sent = 0;
                    let mut data_sn = 0;
                    while sent < len {
                        let n = (len - sent).min(self.max_send);
                        let mut d = [0u8; BHS_LEN];
                        d[0] = OP_DATA_OUT;
                        if sent + n == len {
                            d[1] = 0x80;
                        }
                        d[8..16].copy_from_slice(&lun_field(lun));
                        put_u32(&mut d, 16, itt);
                        put_u32(&mut d, 20, ttt);
                        put_u32(&mut d, 28, self.exp_stat_sn);
                        put_u32(&mut d, 36, data_sn);
                        put_u32(&mut d, 40, (offset + sent) as u32);
                        let at = offset + sent;
                        self.send_pdu(d, &data_out[at..at + n]);
                        sent += n;
                        data_sn += 1;
                    }
                }
                OP_DATA_IN => {
                    let offset = p.u32_at(40) as usize;
                    data[offset..offset + p.data.len()].copy_from_slice(&p.data);
                    if p.bhs[1] & 0x01 != 0 {
                        self.exp_stat_sn = p.u32_at(24).wrapping_add(1);
                        return ScsiResult {
                            status: p.bhs[3],
                            sense: Vec::new(),
                            data,
                        };
                    }
                }
                OP_SCSI_RESP => {
                    self.exp_stat_sn = p.u32_at(24).wrapping_add(1);
                    let sense = if p.data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                        p.data[2..(2 + n).min(p.data.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return ScsiResult {
                        status: p.bhs[3],
                        sense,
                        data,
                    };
                }
                other => panic!("unexpected PDU {other:#04x} during a command: {p:?}"),
            }
        }
    }

    /// The header of a Data-Out for task `itt` (`ttt` 0xffffffff: unsolicited).
    pub fn data_out_header(itt: u32, ttt: u32, data_sn: u32, offset: u32, last: bool) -> [u8; 48] {
        let mut d = [0u8; BHS_LEN];
        d[0] = OP_DATA_OUT;
        if last {
            d[1] = 0x80;
        }
        put_u32(&mut d, 16, itt);
        put_u32(&mut d, 20, ttt);
        put_u32(&mut d, 36, data_sn);
        put_u32(&mut d, 40, offset);
        d
    }

    /// Log out (close the session) and return the target's answer.
    pub fn logout(&mut self) -> Option<Pdu> {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x40 | OP_LOGOUT;
        b[1] = 0x80; // close the session
        put_u32(&mut b, 16, self.itt);
        put_u32(&mut b, 24, self.cmd_sn);
        put_u32(&mut b, 28, self.exp_stat_sn);
        self.itt = self.itt.wrapping_add(1);
        self.send_pdu(b, &[]);
        self.recv()
    }

    /// READ(16) of `blocks` blocks of `block_size` bytes at `lba`.
    pub fn read16(&mut self, lun: u16, lba: u64, blocks: u32, block_size: u32) -> ScsiResult {
        self.command(lun, &cdb16(0x88, lba, blocks), &[], blocks * block_size)
    }

    /// WRITE(16) of `data` (whole blocks) at `lba`.
    pub fn write16(&mut self, lun: u16, lba: u64, data: &[u8], block_size: u32) -> ScsiResult {
        let blocks = (data.len() / block_size as usize) as u32;
        self.command(lun, &cdb16(0x8a, lba, blocks), data, 0)
    }
}

/// A 16-byte READ/WRITE CDB.
pub fn cdb16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}
