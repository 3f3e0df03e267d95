//! The SCSI command layer: a parsed CDB plus the logical unit it addresses becomes either
//! an immediate reply (data-in and status) or engine I/O, whose completion is turned into
//! the reply by `resume`. Pure: no session or transport state.

pub mod cdb;
pub mod pr;
pub mod sbc;
pub mod sense;
pub mod spc;

use tessel_engine::{AlignedBuf, Extent, IoError, Op};

use crate::export::ExportInfo;
pub use cdb::Cdb;
pub use pr::{Nexus, Reservations};
pub use sense::Sense;

/// Largest data transfer one command may ask for (the Block Limits VPD page says so).
pub const MAX_TRANSFER_BYTES: u64 = 8 << 20;

/// One logical unit of a target: a volume (LUN 0) or one of its snapshots.
#[derive(Clone, Debug)]
pub struct Lun {
    /// The export behind the LUN.
    pub export: ExportInfo,
    /// The LUN number.
    pub number: u16,
    /// The target's IQN, for the device identification page.
    pub target_name: String,
    /// A stable 60-bit identifier (NAA and serial number), from the target and export names.
    pub id: u64,
    /// Control mode page D_SENSE: report sense in descriptor format.
    pub descriptor_sense: bool,
}

impl Lun {
    /// The LUN `number` of target `target_name` backed by `export`.
    pub fn new(export: ExportInfo, number: u16, target_name: &str) -> Lun {
        // FNV-1a: stable across restarts, distinct per target and export name.
        let mut id: u64 = 0xcbf2_9ce4_8422_2325;
        for b in target_name.bytes().chain([b'/']).chain(export.name.bytes()) {
            id = (id ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Lun {
            export,
            number,
            target_name: target_name.to_string(),
            id: id >> 4,
            descriptor_sense: false,
        }
    }

    /// Exported block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.export.block_size
    }

    /// Capacity in blocks.
    pub fn blocks(&self) -> u64 {
        self.export.size / u64::from(self.export.block_size)
    }
}

/// Data-in of a reply.
#[derive(Debug, Default)]
pub enum Data {
    /// No data-in.
    #[default]
    None,
    /// Data built by the SCSI layer (INQUIRY and friends).
    Bytes(Vec<u8>),
    /// A buffer filled by the engine (reads), sent without copying it again.
    Buf(AlignedBuf),
}

impl Data {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Data::None => &[],
            Data::Bytes(v) => v,
            Data::Buf(b) => b.as_slice(),
        }
    }
}

/// The outcome of a command: data-in, then GOOD, CHECK CONDITION with sense, or
/// RESERVATION CONFLICT.
#[derive(Debug, Default)]
pub struct Reply {
    pub data: Data,
    pub sense: Option<Sense>,
    /// A reservation refused the command (status RESERVATION CONFLICT, no sense).
    pub conflict: bool,
}

impl Reply {
    /// GOOD with no data.
    pub fn good() -> Reply {
        Reply::default()
    }

    /// GOOD with `data`, cut to the allocation length.
    pub fn data(mut data: Vec<u8>, alloc: u32) -> Reply {
        data.truncate(alloc as usize);
        Reply {
            data: Data::Bytes(data),
            ..Reply::default()
        }
    }

    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Reply {
        Reply {
            sense: Some(sense),
            ..Reply::default()
        }
    }

    /// RESERVATION CONFLICT.
    pub fn conflict() -> Reply {
        Reply {
            conflict: true,
            ..Reply::default()
        }
    }

    /// The SCSI status byte.
    pub fn status(&self) -> u8 {
        sense::status::of(self.sense.as_ref(), self.conflict)
    }
}

/// One engine request the command needs.
#[derive(Debug)]
pub struct IoRequest {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub buf: Option<AlignedBuf>,
}

/// What to do once every request of an `Io` step completed.
#[derive(Debug)]
pub enum Then {
    /// The (single) read buffer is the data-in.
    ReadData,
    /// GOOD.
    Good,
    /// Compare the read buffer with `expected` (one block repeated when `repeat_block`), then
    /// on a match issue `write` (COMPARE AND WRITE) or answer GOOD (VERIFY).
    Compare {
        expected: AlignedBuf,
        repeat_block: bool,
        write: Option<IoRequest>,
    },
    /// Build GET LBA STATUS data from the extents, starting at `lba`.
    LbaStatus { lba: u64, alloc: u32 },
}

/// Engine I/O to submit, and how to finish.
#[derive(Debug)]
pub struct Io {
    pub requests: Vec<IoRequest>,
    pub then: Then,
}

/// The next step of a command.
#[derive(Debug)]
pub enum Step {
    Reply(Reply),
    Io(Io),
}

impl From<Reply> for Step {
    fn from(r: Reply) -> Step {
        Step::Reply(r)
    }
}

impl From<Sense> for Step {
    fn from(s: Sense) -> Step {
        Step::Reply(Reply::check(s))
    }
}

/// The gathered result of an `Io` step's requests.
#[derive(Debug)]
pub struct Done {
    /// The first error among the requests, if any.
    pub result: Result<(), IoError>,
    /// The buffer of the first request (the read data, for reads).
    pub buf: Option<AlignedBuf>,
    /// Block status extents, for GET LBA STATUS.
    pub extents: Vec<Extent>,
    /// True when any request wrote (for the sense of an error).
    pub wrote: bool,
}

/// Who issued a command: its I_T nexus, and the reservations it is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Issuer<'a> {
    pub nexus: &'a Nexus,
    pub reservations: &'a Reservations,
}

/// Runs a command from `issuer` on `lun`; `data_out` holds the data-out the command took,
/// `luns` every LUN number of the target (for REPORT LUNS).
pub fn execute(
    lun: &mut Lun,
    luns: &[u16],
    cdb: &Cdb,
    data_out: Option<AlignedBuf>,
    issuer: Issuer<'_>,
) -> Step {
    let reservations = issuer.reservations;
    if let Err(conflict) = reservations.check(lun.id, issuer.nexus, cdb) {
        return conflict.into();
    }
    match cdb {
        Cdb::Reserve6 => reservations.reserve6(lun.id, issuer.nexus).into(),
        Cdb::Release6 => reservations.release6(lun.id, issuer.nexus).into(),
        Cdb::PersistentReserveIn { action, alloc } => {
            reservations.read(lun.id, *action, *alloc).into()
        }
        Cdb::PersistentReserveOut { .. } => reservations
            .update(lun.id, issuer.nexus, cdb, data_out)
            .into(),
        Cdb::TestUnitReady | Cdb::StartStopUnit | Cdb::PreventAllow => Reply::good().into(),
        Cdb::RequestSense { descriptor, alloc } => spc::request_sense(*descriptor, *alloc).into(),
        Cdb::Inquiry { evpd, page, alloc } => spc::inquiry(lun, *evpd, *page, *alloc).into(),
        Cdb::ModeSense { .. } => spc::mode_sense(lun, cdb).into(),
        Cdb::ModeSelect { ten, save, len } => {
            spc::mode_select(lun, *ten, *save, *len, data_out).into()
        }
        Cdb::ReportLuns { select, alloc } => spc::report_luns(luns, *select, *alloc).into(),
        Cdb::ReportSupportedOpcodes { .. } => spc::report_supported_opcodes(cdb).into(),
        _ => sbc::execute(lun, cdb, data_out),
    }
}

/// Runs a command addressed to a LUN the target does not have.
pub fn execute_without_lun(luns: &[u16], cdb: &Cdb) -> Reply {
    match cdb {
        Cdb::Inquiry {
            evpd: false, alloc, ..
        } => spc::inquiry_no_lun(*alloc),
        Cdb::ReportLuns { select, alloc } => spc::report_luns(luns, *select, *alloc),
        Cdb::RequestSense { descriptor, alloc } => {
            Reply::data(Sense::LUN_NOT_SUPPORTED.encode(*descriptor), *alloc)
        }
        _ => Reply::check(Sense::LUN_NOT_SUPPORTED),
    }
}

/// Finishes (or continues) a command once its engine requests completed.
pub fn resume(lun: &Lun, then: Then, done: Done) -> Step {
    if let Err(e) = &done.result {
        return Sense::from_io_error(e, done.wrote).into();
    }
    match then {
        Then::Good => Reply::good().into(),
        Then::ReadData => match done.buf {
            Some(buf) => Reply {
                data: Data::Buf(buf),
                ..Reply::default()
            }
            .into(),
            None => Sense::from_io_error(&IoError::BadBuffer, false).into(),
        },
        Then::Compare {
            expected,
            repeat_block,
            write,
        } => {
            let Some(read) = done.buf else {
                return Sense::from_io_error(&IoError::BadBuffer, false).into();
            };
            let bs = lun.block_size() as usize;
            let want = expected.as_slice();
            let got = read.as_slice();
            let mismatch = (0..got.len()).find(|&i| {
                let w = if repeat_block { want[i % bs] } else { want[i] };
                w != got[i]
            });
            match (mismatch, write) {
                (Some(at), _) => Sense::miscompare(at as u64).into(),
                (None, Some(w)) => Step::Io(Io {
                    requests: vec![w],
                    then: Then::Good,
                }),
                (None, None) => Reply::good().into(),
            }
        }
        Then::LbaStatus { lba, alloc } => sbc::lba_status(lun, lba, alloc, &done.extents).into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tessel_engine::VolumeId;

    pub fn lun(blocks: u64, read_only: bool) -> Lun {
        let export = ExportInfo {
            name: if read_only {
                "vol0@s".into()
            } else {
                "vol0".into()
            },
            description: String::new(),
            volume: VolumeId(1),
            size: blocks * 512,
            block_size: 512,
            read_only,
        };
        Lun::new(export, u16::from(read_only), "iqn.2026-11.dev.tessel:vol0")
    }

    /// The I_T nexus of test initiator `n`.
    pub fn nexus(n: u8) -> Nexus {
        Nexus {
            initiator: format!("iqn.2026-11.test:host{n}"),
            isid: [0x80, 0, 0, 0, 0, n],
        }
    }

    /// `super::execute` from initiator 1, with no reservation anywhere.
    pub fn execute(lun: &mut Lun, luns: &[u16], cdb: &Cdb, data: Option<AlignedBuf>) -> Step {
        let reservations = Reservations::default();
        let issuer = Issuer {
            nexus: &nexus(1),
            reservations: &reservations,
        };
        super::execute(lun, luns, cdb, data, issuer)
    }

    pub fn cdb(bytes: &[u8]) -> Cdb {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        Cdb::parse(&c).unwrap()
    }

    pub fn reply(step: Step) -> Reply {
        match step {
            Step::Reply(r) => r,
            Step::Io(io) => panic!("expected a reply, got I/O {io:?}"),
        }
    }

    pub fn io(step: Step) -> Io {
        match step {
            Step::Io(io) => io,
            Step::Reply(r) => panic!("expected I/O, got {r:?}"),
        }
    }

    fn done(buf: Option<AlignedBuf>) -> Done {
        Done {
            result: Ok(()),
            buf,
            extents: Vec::new(),
            wrote: false,
        }
    }

    #[test]
    fn luns_get_distinct_stable_ids() {
        let a = lun(8, false);
        let b = lun(8, true);
        assert_ne!(a.id, b.id);
        assert_eq!(a.id, lun(8, false).id);
        assert_eq!(a.id >> 60, 0);
    }

    #[test]
    fn engine_errors_become_check_condition() {
        let l = lun(8, false);
        let d = Done {
            result: Err(IoError::NoSpace),
            buf: None,
            extents: vec![],
            wrote: true,
        };
        let r = reply(resume(&l, Then::Good, d));
        assert_eq!(r.sense.unwrap().asc, 0x27);
    }

    #[test]
    fn compare_reports_the_first_mismatching_byte() {
        let l = lun(8, false);
        let expected = AlignedBuf::from_slice(&[7u8; 1024]);
        let mut read = vec![7u8; 1024];
        read[700] = 0;
        let then = Then::Compare {
            expected,
            repeat_block: false,
            write: None,
        };
        let r = reply(resume(&l, then, done(Some(AlignedBuf::from_slice(&read)))));
        assert_eq!(r.sense, Some(Sense::miscompare(700)));
    }

    #[test]
    fn compare_with_a_repeated_block_checks_every_block() {
        let l = lun(8, false);
        let expected = AlignedBuf::from_slice(&[3u8; 512]);
        let then = Then::Compare {
            expected,
            repeat_block: true,
            write: None,
        };
        let r = reply(resume(
            &l,
            then,
            done(Some(AlignedBuf::from_slice(&[3u8; 1536]))),
        ));
        assert!(r.sense.is_none());
    }

    #[test]
    fn commands_to_a_missing_lun_report_lun_not_supported() {
        let r = execute_without_lun(&[0], &cdb(&[0x00]));
        assert_eq!(r.sense, Some(Sense::LUN_NOT_SUPPORTED));
        let inq = execute_without_lun(&[0], &cdb(&[0x12, 0, 0, 0, 36]));
        assert_eq!(inq.data.as_slice()[0], 0x7f);
        let luns = execute_without_lun(&[0, 1], &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
        assert_eq!(luns.data.as_slice().len(), 24);
    }
}
