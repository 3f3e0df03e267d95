//! SBC-3 block commands: capacity, reads and writes, verify, write same, unmap, compare and
//! write, cache synchronisation, prefetch, LBA status; and the block VPD pages.
//!
//! COMPARE AND WRITE reads, compares, then writes: it is atomic with respect to the commands
//! of its own session only (the engine has no compare-and-swap), which is what one host
//! using one session per volume needs.

use tessel_engine::{AlignedBuf, Extent, Op};

use super::cdb::Cdb;
use super::sense::Sense;
use super::{Io, IoRequest, Lun, Reply, Step, Then, MAX_TRANSFER_BYTES};

/// Largest WRITE SAME of a non-zero block expanded into one buffer (and the MAXIMUM WRITE
/// SAME LENGTH reported: hosts may not ask for more than one transfer's worth).
pub const MAX_WRITE_SAME_BYTES: u64 = MAX_TRANSFER_BYTES;
/// Largest COMPARE AND WRITE, in blocks.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u32 = 32;
/// Largest UNMAP range per descriptor, and descriptors per command.
pub const MAX_UNMAP_BLOCKS: u32 = 0x0010_0000;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 64;
/// Largest range GET LBA STATUS asks the engine about at once.
const LBA_STATUS_WINDOW: u64 = 1 << 30;

fn be32(v: u64) -> [u8; 4] {
    (v.min(u64::from(u32::MAX)) as u32).to_be_bytes()
}

/// Block Limits VPD page (B0h) body.
pub fn block_limits(lun: &Lun) -> Vec<u8> {
    let bs = u64::from(lun.block_size());
    let mut b = vec![0u8; 0x3c];
    b[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
    b[1] = MAX_COMPARE_AND_WRITE_BLOCKS as u8;
    b[2..4].copy_from_slice(&((4096 / bs).max(1) as u16).to_be_bytes());
    b[4..8].copy_from_slice(&be32(MAX_TRANSFER_BYTES / bs));
    b[8..12].copy_from_slice(&be32((128 << 10) / bs));
    b[16..20].copy_from_slice(&be32(u64::from(MAX_UNMAP_BLOCKS)));
    b[20..24].copy_from_slice(&be32(u64::from(MAX_UNMAP_DESCRIPTORS)));
    b[24..28].copy_from_slice(&be32((4096 / bs).max(1)));
    b[32..40].copy_from_slice(&(MAX_WRITE_SAME_BYTES / bs).to_be_bytes());
    b
}

/// Logical Block Provisioning VPD page (B2h) body: thin, UNMAP and WRITE SAME unmap, LBPRZ.
pub fn logical_block_provisioning(_lun: &Lun) -> Vec<u8> {
    vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
}

fn read_capacity_10(lun: &Lun) -> Vec<u8> {
    let last = lun.blocks().saturating_sub(1).min(u64::from(u32::MAX));
    let mut d = (last as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&lun.block_size().to_be_bytes());
    d
}

fn read_capacity_16(lun: &Lun) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lun.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lun.block_size().to_be_bytes());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: GET LBA STATUS answers per
    // logical block, and hosts (libiscsi's conformance tests among them) expect a
    // physical block to be unmappable on its own when the exponent says so.
    d[14] = 0x80 | 0x40; // LBPME (thin), LBPRZ (unmapped blocks read as zeros)
    d
}

fn check_range(lun: &Lun, lba: u64, blocks: u32) -> Result<(), Sense> {
    match lba.checked_add(u64::from(blocks)) {
        Some(end) if end <= lun.blocks() => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}

fn check_transfer(lun: &Lun, blocks: u32) -> Result<u64, Sense> {
    let bytes = u64::from(blocks) * u64::from(lun.block_size());
    if bytes > MAX_TRANSFER_BYTES {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    Ok(bytes)
}

/// Refuses, when a command arrives and before any buffer is allocated or R2T sent, what
/// `run` would refuse about its size: a transfer out of range or longer than one command
/// may move, data-out longer than that, or a write to a read-only LUN (checked in `run`'s
/// order, so the sense is the same).
pub fn check_arrival(lun: &Lun, cdb: &Cdb) -> Result<(), Sense> {
    if cdb.writes() {
        check_writable(lun)?;
    }
    match *cdb {
        Cdb::Read { lba, blocks, .. }
        | Cdb::Write { lba, blocks, .. }
        | Cdb::Verify { lba, blocks, .. } => {
            check_range(lun, lba, blocks)?;
            check_transfer(lun, blocks)?;
        }
        _ if cdb.data_out_len(lun.block_size()) > MAX_TRANSFER_BYTES => {
            return Err(Sense::INVALID_FIELD_IN_CDB)
        }
        _ => {}
    }
    Ok(())
}

fn check_writable(lun: &Lun) -> Result<(), Sense> {
    if lun.export.read_only {
        return Err(Sense::WRITE_PROTECTED);
    }
    Ok(())
}

fn request(lun: &Lun, op: Op, lba: u64, blocks: u64, buf: Option<AlignedBuf>) -> IoRequest {
    let bs = u64::from(lun.block_size());
    IoRequest {
        op,
        offset: lba * bs,
        len: blocks * bs,
        buf,
    }
}

fn one(req: IoRequest, then: Then) -> Step {
    Step::Io(Io {
        requests: vec![req],
        then,
    })
}

/// Runs a block command; data-out commands get their data in `data_out`.
pub fn execute(lun: &mut Lun, cdb: &Cdb, data_out: Option<AlignedBuf>) -> Step {
    match run(lun, cdb, data_out) {
        Ok(step) => step,
        Err(sense) => sense.into(),
    }
}

fn run(lun: &Lun, cdb: &Cdb, data_out: Option<AlignedBuf>) -> Result<Step, Sense> {
    let bs = u64::from(lun.block_size());
    Ok(match *cdb {
        Cdb::ReadCapacity10 { .. } => Reply::data(read_capacity_10(lun), 8).into(),
        Cdb::ReadCapacity16 { alloc } => Reply::data(read_capacity_16(lun), alloc).into(),
        Cdb::Read {
            lba,
            blocks,
            fua: _,
        } => {
            check_range(lun, lba, blocks)?;
            let bytes = check_transfer(lun, blocks)?;
            if blocks == 0 {
                return Ok(Reply::good().into());
            }
            let buf = AlignedBuf::zeroed(bytes as usize);
            one(
                request(lun, Op::Read, lba, blocks.into(), Some(buf)),
                Then::ReadData,
            )
        }
        Cdb::Write {
            lba,
            blocks,
            fua,
            verify: _,
        } => {
            check_writable(lun)?;
            check_range(lun, lba, blocks)?;
            check_transfer(lun, blocks)?;
            // A short expected transfer length writes only the whole blocks it carried.
            let Some(mut buf) = data_out.filter(|b| b.len() as u64 >= bs) else {
                return Ok(Reply::good().into());
            };
            let whole = (buf.len() as u64 / bs).min(u64::from(blocks));
            buf.set_len((whole * bs) as usize);
            one(
                request(lun, Op::Write { fua }, lba, whole, Some(buf)),
                Then::Good,
            )
        }
        Cdb::Verify {
            lba,
            blocks,
            bytchk,
        } => {
            check_range(lun, lba, blocks)?;
            let bytes = check_transfer(lun, blocks)?;
            if blocks == 0 || bytchk == 0 {
                return Ok(Reply::good().into());
            }
            let expected =
                data_out.filter(|b| b.len() as u64 == cdb.data_out_len(lun.block_size()));
            let expected = expected.ok_or(Sense::INVALID_FIELD_IN_CDB)?;
            let read = AlignedBuf::zeroed(bytes as usize);
            let then = Then::Compare {
                expected,
                repeat_block: bytchk == 3,
                write: None,
            };
            one(request(lun, Op::Read, lba, blocks.into(), Some(read)), then)
        }
        Cdb::PreFetch { lba, blocks } => {
            check_range(lun, lba, blocks)?;
            Reply::good().into()
        }
        Cdb::SyncCache { lba, blocks } => {
            check_range(lun, lba, blocks)?;
            if lun.export.read_only {
                return Ok(Reply::good().into());
            }
            one(
                IoRequest {
                    op: Op::Flush,
                    offset: 0,
                    len: 0,
                    buf: None,
                },
                Then::Good,
            )
        }
        Cdb::WriteSame {
            lba,
            blocks,
            unmap,
            ndob,
        } => {
            check_writable(lun)?;
            if blocks == 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            check_range(lun, lba, blocks)?;
            if u64::from(blocks) * bs > MAX_WRITE_SAME_BYTES {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let block = match data_out {
                _ if ndob => None,
                Some(b) if b.len() as u64 == bs => Some(b),
                _ => return Err(Sense::INVALID_FIELD_IN_CDB),
            };
            match block.filter(|b| b.as_slice().iter().any(|&x| x != 0)) {
                None => {
                    let op = if unmap {
                        Op::Trim
                    } else {
                        Op::WriteZeroes { fua: false }
                    };
                    one(request(lun, op, lba, blocks.into(), None), Then::Good)
                }
                Some(block) => {
                    let mut buf = AlignedBuf::zeroed((u64::from(blocks) * bs) as usize);
                    for chunk in buf.as_mut_slice().chunks_mut(bs as usize) {
                        chunk.copy_from_slice(block.as_slice());
                    }
                    one(
                        request(lun, Op::Write { fua: false }, lba, blocks.into(), Some(buf)),
                        Then::Good,
                    )
                }
            }
        }
        Cdb::Unmap { len } => {
            check_writable(lun)?;
            let data = data_out.as_ref().map(|b| b.as_slice()).unwrap_or(&[]);
            unmap(lun, len as usize, data)?
        }
        Cdb::CompareAndWrite { lba, blocks, fua } => {
            check_writable(lun)?;
            if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
                return Err(Sense::invalid_cdb(13));
            }
            check_range(lun, lba, blocks)?;
            if blocks == 0 {
                return Ok(Reply::good().into());
            }
            let half = (u64::from(blocks) * bs) as usize;
            let data = data_out
                .filter(|b| b.len() == 2 * half)
                .ok_or(Sense::invalid_cdb(13))?;
            let mut expected = data;
            let new = AlignedBuf::from_slice(&expected.as_slice()[half..]);
            expected.set_len(half);
            let write = request(lun, Op::Write { fua }, lba, blocks.into(), Some(new));
            let read = request(
                lun,
                Op::Read,
                lba,
                blocks.into(),
                Some(AlignedBuf::zeroed(half)),
            );
            one(
                read,
                Then::Compare {
                    expected,
                    repeat_block: false,
                    write: Some(write),
                },
            )
        }
        Cdb::GetLbaStatus { lba, alloc } => {
            if lba >= lun.blocks() {
                return Err(Sense::LBA_OUT_OF_RANGE);
            }
            let len = ((lun.blocks() - lba) * bs).min(LBA_STATUS_WINDOW);
            let req = IoRequest {
                op: Op::BlockStatus,
                offset: lba * bs,
                len,
                buf: None,
            };
            one(req, Then::LbaStatus { lba, alloc })
        }
        Cdb::ReadDefectData {
            twelve,
            lists,
            format,
            alloc,
        } => Step::Reply(read_defect_data(twelve, lists, format, alloc)),
        _ => return Err(Sense::INVALID_OPCODE),
    })
}

/// READ DEFECT DATA 10/12: a volume has no defects, so every list asked for is valid and
/// empty, in the format asked for.
fn read_defect_data(twelve: bool, lists: u8, format: u8, alloc: u32) -> Reply {
    let flags = lists | format;
    let d = if twelve {
        vec![0, flags, 0, 0, 0, 0, 0, 0]
    } else {
        vec![0, flags, 0, 0]
    };
    Reply::data(d, alloc)
}

/// UNMAP parameter list: an 8-byte header, then 16-byte block descriptors.
fn unmap(lun: &Lun, len: usize, data: &[u8]) -> Result<Step, Sense> {
    if len == 0 {
        return Ok(Reply::good().into());
    }
    if len < 8 || data.len() < len {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let data = &data[..len];
    let desc_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    if desc_len > len - 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let count = desc_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_param(2));
    }
    let mut requests = Vec::new();
    for i in 0..count {
        let d = &data[8 + 16 * i..24 + 16 * i];
        let lba = u64::from_be_bytes(d[0..8].try_into().expect("8 bytes"));
        let blocks = u32::from_be_bytes(d[8..12].try_into().expect("4 bytes"));
        if blocks > MAX_UNMAP_BLOCKS {
            return Err(Sense::invalid_param((16 + 16 * i) as u16));
        }
        check_range(lun, lba, blocks)?;
        if blocks > 0 {
            requests.push(request(lun, Op::Trim, lba, blocks.into(), None));
        }
    }
    Ok(if requests.is_empty() {
        Reply::good().into()
    } else {
        Step::Io(Io {
            requests,
            then: Then::Good,
        })
    })
}

/// GET LBA STATUS parameter data from the engine's extents, which start at `lba`.
pub fn lba_status(lun: &Lun, lba: u64, alloc: u32, extents: &[Extent]) -> Reply {
    let bs = u64::from(lun.block_size());
    let mut descriptors: Vec<(u64, u64, bool)> = Vec::new();
    for e in extents.iter().filter(|e| e.len > 0) {
        let start = e.offset / bs;
        let blocks = e.len / bs;
        match descriptors.last_mut() {
            Some(last) if last.2 == e.allocated && last.0 + last.1 == start => last.1 += blocks,
            _ => descriptors.push((start, blocks, e.allocated)),
        }
    }
    if descriptors.first().map(|d| d.0) != Some(lba) {
        // The engine must describe the range from its start; report it mapped otherwise.
        descriptors.insert(0, (lba, 1, true));
    }
    let mut d = vec![0u8; 8];
    for (start, blocks, allocated) in descriptors {
        d.extend_from_slice(&start.to_be_bytes());
        d.extend_from_slice(&be32(blocks));
        d.extend_from_slice(&[if allocated { 0 } else { 1 }, 0, 0, 0]);
    }
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    Reply::data(d, alloc)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cdb, execute as scsi_execute, io, lun, reply};
    use super::super::{resume, Done};
    use super::*;

    fn run(l: &mut Lun, bytes: &[u8], data: Option<&[u8]>) -> Step {
        scsi_execute(l, &[0], &cdb(bytes), data.map(AlignedBuf::from_slice))
    }

    #[test]
    fn arrival_checks_refuse_what_run_would_before_data_comes() {
        let w16 = |blocks: u32| {
            let mut c = [0u8; 16];
            c[0] = 0x8a;
            c[10..14].copy_from_slice(&blocks.to_be_bytes());
            cdb(&c)
        };
        let l = lun(1 << 20, false);
        assert_eq!(check_arrival(&l, &w16(16 << 10)), Ok(()));
        assert_eq!(
            check_arrival(&l, &w16((16 << 10) + 1)),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            check_arrival(&l, &w16(2 << 20)),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            check_arrival(&lun(1 << 20, true), &w16(2 << 20)),
            Err(Sense::WRITE_PROTECTED)
        );
        let prout = cdb(&[0x5f, 0, 0, 0, 0, 0x01, 0, 0, 0, 0]);
        assert_eq!(check_arrival(&l, &prout), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn read_capacity_reports_last_lba_and_lbpme() {
        let mut l = lun(1000, false);
        let d = reply(run(&mut l, &[0x25], None)).data.as_slice().to_vec();
        assert_eq!(d, [0, 0, 0x03, 0xe7, 0, 0, 2, 0]);
        let d = reply(run(
            &mut l,
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32],
            None,
        ));
        let d = d.data.as_slice();
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 999);
        assert_eq!(d[13], 0);
        assert_eq!(d[14] & 0xc0, 0xc0);
    }

    #[test]
    fn reads_become_one_engine_read_of_exact_size() {
        let mut l = lun(1000, false);
        let io = io(run(&mut l, &[0x28, 0, 0, 0, 0, 10, 0, 0, 4, 0], None));
        let r = &io.requests[0];
        assert_eq!((r.op, r.offset, r.len), (Op::Read, 5120, 2048));
        assert_eq!(r.buf.as_ref().unwrap().len(), 2048);
        assert!(
            reply(run(&mut l, &[0x28, 0, 0, 0, 0, 10, 0, 0, 0, 0], None))
                .sense
                .is_none()
        );
    }

    #[test]
    fn out_of_range_io_reports_lba_out_of_range() {
        let mut l = lun(1000, false);
        let r = reply(run(&mut l, &[0x28, 0, 0, 0, 0x03, 0xe7, 0, 0, 2, 0], None));
        assert_eq!(r.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let mut r16 = [0u8; 16];
        r16[0] = 0x88;
        r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        r16[13] = 1;
        let r = reply(run(&mut l, &r16, None));
        assert_eq!(r.sense, Some(Sense::LBA_OUT_OF_RANGE));
    }

    #[test]
    fn writes_carry_fua_and_refuse_read_only_luns() {
        let mut l = lun(1000, false);
        let io = io(run(
            &mut l,
            &[0x2a, 0x08, 0, 0, 0, 1, 0, 0, 1, 0],
            Some(&[9u8; 512]),
        ));
        assert_eq!(io.requests[0].op, Op::Write { fua: true });
        let mut ro = lun(1000, true);
        let r = reply(run(
            &mut ro,
            &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0],
            Some(&[9u8; 512]),
        ));
        assert_eq!(r.sense, Some(Sense::WRITE_PROTECTED));
    }

    #[test]
    fn a_short_transfer_writes_only_the_blocks_it_carried() {
        let mut l = lun(1000, false);
        let io = io(run(
            &mut l,
            &[0x2a, 0, 0, 0, 0, 1, 0, 0, 2, 0],
            Some(&[9u8; 512]),
        ));
        assert_eq!(io.requests[0].len, 512);
    }

    #[test]
    fn write_same_picks_trim_zeroes_or_expansion() {
        let mut l = lun(1000, false);
        let zero = io(run(
            &mut l,
            &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 8, 0],
            Some(&[0u8; 512]),
        ));
        assert_eq!(zero.requests[0].op, Op::Trim);
        let zero = io(run(
            &mut l,
            &[0x41, 0, 0, 0, 0, 0, 0, 0, 8, 0],
            Some(&[0u8; 512]),
        ));
        assert_eq!(zero.requests[0].op, Op::WriteZeroes { fua: false });
        let data = io(run(
            &mut l,
            &[0x41, 0, 0, 0, 0, 0, 0, 0, 3, 0],
            Some(&[5u8; 512]),
        ));
        let buf = data.requests[0].buf.as_ref().unwrap();
        assert_eq!(buf.len(), 1536);
        assert!(buf.as_slice().iter().all(|&b| b == 5));
        let none = reply(run(
            &mut l,
            &[0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Some(&[5u8; 512]),
        ));
        assert_eq!(none.sense, Some(Sense::INVALID_FIELD_IN_CDB));
        let mut big = lun(1 << 20, false);
        let mut ws16 = [0u8; 16];
        ws16[0] = 0x93;
        ws16[10..14].copy_from_slice(&0x8001u32.to_be_bytes());
        let r = reply(run(&mut big, &ws16, Some(&[5u8; 512])));
        assert_eq!(r.sense, Some(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn unmap_trims_each_descriptor_and_checks_ranges() {
        let mut l = lun(1000, false);
        let mut p = vec![0, 38, 0, 32, 0, 0, 0, 0];
        for (lba, n) in [(10u64, 4u32), (500, 0)] {
            p.extend_from_slice(&lba.to_be_bytes());
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&[0; 4]);
        }
        let io = io(run(&mut l, &[0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0], Some(&p)));
        assert_eq!(io.requests.len(), 1);
        assert_eq!((io.requests[0].op, io.requests[0].offset), (Op::Trim, 5120));
        p[8..16].copy_from_slice(&999u64.to_be_bytes());
        let r = reply(run(&mut l, &[0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0], Some(&p)));
        assert_eq!(r.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let r = reply(run(
            &mut l,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0],
            Some(&p[..4]),
        ));
        assert_eq!(r.sense, Some(Sense::PARAMETER_LIST_LENGTH));
    }

    #[test]
    fn compare_and_write_reads_compares_then_writes() {
        let mut l = lun(1000, false);
        let mut data = vec![1u8; 512];
        data.extend(vec![2u8; 512]);
        let mut c = [0u8; 16];
        c[0] = 0x89;
        c[9] = 7;
        c[13] = 1;
        let step = run(&mut l, &c, Some(&data));
        let first = io(step);
        assert_eq!(first.requests[0].op, Op::Read);
        let read = AlignedBuf::from_slice(&[1u8; 512]);
        let done = Done {
            result: Ok(()),
            buf: Some(read),
            extents: vec![],
            wrote: false,
        };
        let second = io(resume(&l, first.then, done));
        let w = &second.requests[0];
        assert_eq!((w.op, w.offset), (Op::Write { fua: false }, 7 * 512));
        assert!(w.buf.as_ref().unwrap().as_slice().iter().all(|&b| b == 2));
        c[13] = 2;
        let r = reply(run(&mut l, &c, Some(&data)));
        assert_eq!(r.sense, Some(Sense::invalid_cdb(13)));
    }

    #[test]
    fn verify_without_bytchk_only_checks_the_range() {
        let mut l = lun(1000, false);
        assert!(reply(run(&mut l, &[0x2f, 0, 0, 0, 0, 0, 0, 0, 8, 0], None))
            .sense
            .is_none());
        let cmp = io(run(
            &mut l,
            &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0],
            Some(&[0u8; 512]),
        ));
        assert!(matches!(cmp.then, Then::Compare { .. }));
    }

    #[test]
    fn sync_cache_flushes_and_get_lba_status_describes_extents() {
        let mut l = lun(1000, false);
        let f = io(run(&mut l, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], None));
        assert_eq!(f.requests[0].op, Op::Flush);
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x12;
        c[9] = 8;
        c[13] = 64;
        let g = io(run(&mut l, &c, None));
        assert_eq!((g.requests[0].offset, g.requests[0].len), (4096, 992 * 512));
        let extents = vec![
            Extent {
                offset: 4096,
                len: 4096,
                allocated: true,
            },
            Extent {
                offset: 8192,
                len: 4096,
                allocated: true,
            },
            Extent {
                offset: 12288,
                len: 500 * 512,
                allocated: false,
            },
        ];
        let d = lba_status(&l, 8, 64, &extents).data.as_slice().to_vec();
        assert_eq!(&d[..4], &[0, 0, 0, 36]);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 8);
        assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 16);
        assert_eq!(d[20], 0);
        assert_eq!(d[36], 1);
        c[2..10].copy_from_slice(&1000u64.to_be_bytes());
        assert_eq!(
            reply(run(&mut l, &c, None)).sense,
            Some(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[test]
    fn block_vpd_pages_advertise_thin_provisioning() {
        let l = lun(1000, false);
        let b2 = logical_block_provisioning(&l);
        assert_eq!(b2[1] & 0xe0, 0xe0);
        assert_eq!(b2[2], 2);
        let b0 = block_limits(&l);
        assert_eq!(b0[0] & 1, 1);
        assert_eq!(
            u32::from_be_bytes(b0[16..20].try_into().unwrap()),
            MAX_UNMAP_BLOCKS
        );
    }

    #[test]
    fn read_defect_data_reports_empty_lists() {
        let mut l = lun(1000, false);
        let ten = reply(run(&mut l, &[0x37, 0, 0x1d, 0, 0, 0, 0, 0, 32, 0], None));
        assert_eq!(ten.data.as_slice(), &[0, 0x1d, 0, 0]);
        let twelve = reply(run(
            &mut l,
            &[0xb7, 0x08, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            None,
        ));
        assert_eq!(twelve.data.as_slice(), &[0, 0x08, 0, 0, 0, 0, 0, 0]);
        let short = reply(run(&mut l, &[0x37, 0, 0, 0, 0, 0, 0, 0, 2, 0], None));
        assert_eq!(short.data.as_slice().len(), 2);
    }
}
