//! CDB parsing (SPC-4, SBC-3): the 16 bytes of a SCSI command become a typed `Cdb`, or the
//! sense an initiator gets for an unsupported or malformed one.

use super::sense::Sense;

/// A parsed SCSI command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cdb {
    TestUnitReady,
    RequestSense {
        descriptor: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        save: bool,
        len: u32,
    },
    StartStopUnit,
    PreventAllow,
    ReadCapacity10 {
        pmi: bool,
        lba: u32,
    },
    ReadCapacity16 {
        alloc: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    /// READ 6/10/12/16.
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// WRITE 6/10/12/16 and WRITE AND VERIFY 10/12/16 (`verify`: made durable first).
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
        verify: bool,
    },
    /// VERIFY 10/12/16; `bytchk` 0 checks the medium, 1 compares data-out, 3 one block.
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    /// WRITE SAME 10/16; `ndob`: no data-out, the block is zeros.
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        service_action: u16,
        alloc: u32,
    },
    /// READ DEFECT DATA 10/12; `lists`: the REQ_PLIST and REQ_GLIST bits (0x18).
    ReadDefectData {
        twelve: bool,
        lists: u8,
        format: u8,
        alloc: u32,
    },
    Reserve6,
    Release6,
    PersistentReserveIn {
        action: u8,
        alloc: u32,
    },
    /// PERSISTENT RESERVE OUT; `kind` is the reservation type code, `len` the parameter
    /// list length.
    PersistentReserveOut {
        action: u8,
        scope: u8,
        kind: u8,
        len: u32,
    },
}

/// Operation codes this target implements.
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
    /// SERVICE ACTION IN(16) service actions.
    pub const SA_READ_CAPACITY_16: u16 = 0x10;
    pub const SA_GET_LBA_STATUS: u16 = 0x12;
    /// MAINTENANCE IN service action.
    pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0c;
}

/// Every supported command: (opcode, service action, CDB length).
pub const SUPPORTED: &[(u8, Option<u16>, u8)] = &[
    (opcode::TEST_UNIT_READY, None, 6),
    (opcode::REQUEST_SENSE, None, 6),
    (opcode::READ_6, None, 6),
    (opcode::WRITE_6, None, 6),
    (opcode::INQUIRY, None, 6),
    (opcode::MODE_SELECT_6, None, 6),
    (opcode::RESERVE_6, None, 6),
    (opcode::RELEASE_6, None, 6),
    (opcode::MODE_SENSE_6, None, 6),
    (opcode::START_STOP_UNIT, None, 6),
    (opcode::PREVENT_ALLOW, None, 6),
    (opcode::READ_CAPACITY_10, None, 10),
    (opcode::READ_10, None, 10),
    (opcode::WRITE_10, None, 10),
    (opcode::WRITE_VERIFY_10, None, 10),
    (opcode::VERIFY_10, None, 10),
    (opcode::PRE_FETCH_10, None, 10),
    (opcode::SYNC_CACHE_10, None, 10),
    (opcode::READ_DEFECT_DATA_10, None, 10),
    (opcode::WRITE_SAME_10, None, 10),
    (opcode::UNMAP, None, 10),
    (opcode::MODE_SELECT_10, None, 10),
    (opcode::MODE_SENSE_10, None, 10),
    (opcode::PERSISTENT_RESERVE_IN, None, 10),
    (opcode::PERSISTENT_RESERVE_OUT, None, 10),
    (opcode::READ_16, None, 16),
    (opcode::COMPARE_AND_WRITE, None, 16),
    (opcode::WRITE_16, None, 16),
    (opcode::WRITE_VERIFY_16, None, 16),
    (opcode::VERIFY_16, None, 16),
    (opcode::PRE_FETCH_16, None, 16),
    (opcode::SYNC_CACHE_16, None, 16),
    (opcode::WRITE_SAME_16, None, 16),
    (
        opcode::SERVICE_ACTION_IN_16,
        Some(opcode::SA_READ_CAPACITY_16),
        16,
    ),
    (
        opcode::SERVICE_ACTION_IN_16,
        Some(opcode::SA_GET_LBA_STATUS),
        16,
    ),
    (opcode::REPORT_LUNS, None, 12),
    (
        opcode::MAINTENANCE_IN,
        Some(opcode::SA_REPORT_SUPPORTED_OPCODES),
        12,
    ),
    (opcode::READ_12, None, 12),
    (opcode::WRITE_12, None, 12),
    (opcode::WRITE_VERIFY_12, None, 12),
    (opcode::VERIFY_12, None, 12),
    (opcode::READ_DEFECT_DATA_12, None, 12),
];

fn be16(c: &[u8], at: usize) -> u32 {
    u32::from(u16::from_be_bytes([c[at], c[at + 1]]))
}
fn be32(c: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(c[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(c: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(c[at..at + 8].try_into().expect("8 bytes"))
}

/// Protection information fields must be zero: volumes carry no PI.
fn no_protection(c: &[u8]) -> Result<(), Sense> {
    if c[1] >> 5 != 0 {
        return Err(Sense::invalid_cdb(1));
    }
    Ok(())
}

/// Byte 1 of READ/WRITE 10/12/16: (FUA, protection checked).
fn rw_flags(c: &[u8]) -> Result<bool, Sense> {
    no_protection(c)?;
    Ok(c[1] & 0x08 != 0)
}

/// (LBA, blocks) of a 10-, 12- or 16-byte block command.
fn range(c: &[u8]) -> (u64, u32) {
    match c[0] >> 5 {
        1 | 2 => (u64::from(be32(c, 2)), be16(c, 7)),
        5 => (u64::from(be32(c, 2)), be32(c, 6)),
        _ => (be64(c, 2), be32(c, 10)),
    }
}

impl Cdb {
    /// Parses a CDB.
    pub fn parse(c: &[u8; 16]) -> Result<Cdb, Sense> {
        use opcode::*;
        let (lba, blocks) = range(c);
        Ok(match c[0] {
            TEST_UNIT_READY => Cdb::TestUnitReady,
            REQUEST_SENSE => Cdb::RequestSense {
                descriptor: c[1] & 1 != 0,
                alloc: u32::from(c[4]),
            },
            INQUIRY => {
                let evpd = c[1] & 1 != 0;
                if c[1] & 0x02 != 0 || (!evpd && c[2] != 0) {
                    return Err(Sense::invalid_cdb(if evpd { 1 } else { 2 }));
                }
                Cdb::Inquiry {
                    evpd,
                    page: c[2],
                    alloc: be16(c, 3),
                }
            }
            MODE_SENSE_6 | MODE_SENSE_10 => {
                let ten = c[0] == MODE_SENSE_10;
                Cdb::ModeSense {
                    ten,
                    dbd: c[1] & 0x08 != 0,
                    llbaa: ten && c[1] & 0x10 != 0,
                    pc: c[2] >> 6,
                    page: c[2] & 0x3f,
                    subpage: c[3],
                    alloc: if ten { be16(c, 7) } else { u32::from(c[4]) },
                }
            }
            MODE_SELECT_6 | MODE_SELECT_10 => {
                let ten = c[0] == MODE_SELECT_10;
                Cdb::ModeSelect {
                    ten,
                    save: c[1] & 1 != 0,
                    len: if ten { be16(c, 7) } else { u32::from(c[4]) },
                }
            }
            START_STOP_UNIT => Cdb::StartStopUnit,
            RESERVE_6 | RELEASE_6 => {
                if c[1] & 0x01 != 0 {
                    // Extent reservations are obsolete (SPC-2).
                    return Err(Sense::invalid_cdb(1));
                }
                if c[0] == RESERVE_6 {
                    Cdb::Reserve6
                } else {
                    Cdb::Release6
                }
            }
            READ_DEFECT_DATA_10 => Cdb::ReadDefectData {
                twelve: false,
                lists: c[2] & 0x18,
                format: c[2] & 0x07,
                alloc: be16(c, 7),
            },
            READ_DEFECT_DATA_12 => Cdb::ReadDefectData {
                twelve: true,
                lists: c[1] & 0x18,
                format: c[1] & 0x07,
                alloc: be32(c, 6),
            },
            PERSISTENT_RESERVE_IN => Cdb::PersistentReserveIn {
                action: c[1] & 0x1f,
                alloc: be16(c, 7),
            },
            PERSISTENT_RESERVE_OUT => Cdb::PersistentReserveOut {
                action: c[1] & 0x1f,
                scope: c[2] >> 4,
                kind: c[2] & 0x0f,
                len: be32(c, 5),
            },
            PREVENT_ALLOW => Cdb::PreventAllow,
            READ_CAPACITY_10 => {
                let pmi = c[8] & 1 != 0;
                let lba = be32(c, 2);
                if !pmi && lba != 0 {
                    return Err(Sense::invalid_cdb(2));
                }
                Cdb::ReadCapacity10 { pmi, lba }
            }
            READ_6 | WRITE_6 => {
                let lba = u64::from(u32::from_be_bytes([0, c[1] & 0x1f, c[2], c[3]]));
                // A transfer length of 0 means 256 blocks in the 6-byte commands.
                let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
                if c[0] == READ_6 {
                    Cdb::Read {
                        lba,
                        blocks,
                        fua: false,
                    }
                } else {
                    Cdb::Write {
                        lba,
                        blocks,
                        fua: false,
                        verify: false,
                    }
                }
            }
            READ_10 | READ_12 | READ_16 => Cdb::Read {
                lba,
                blocks,
                fua: rw_flags(c)?,
            },
            WRITE_10 | WRITE_12 | WRITE_16 => Cdb::Write {
                lba,
                blocks,
                fua: rw_flags(c)?,
                verify: false,
            },
            WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
                no_protection(c)?;
                Cdb::Write {
                    lba,
                    blocks,
                    fua: true,
                    verify: true,
                }
            }
            VERIFY_10 | VERIFY_12 | VERIFY_16 => {
                no_protection(c)?;
                let bytchk = (c[1] >> 1) & 3;
                if bytchk == 2 {
                    return Err(Sense::invalid_cdb(1));
                }
                Cdb::Verify {
                    lba,
                    blocks,
                    bytchk,
                }
            }
            PRE_FETCH_10 | PRE_FETCH_16 => Cdb::PreFetch { lba, blocks },
            SYNC_CACHE_10 | SYNC_CACHE_16 => Cdb::SyncCache { lba, blocks },
            WRITE_SAME_10 | WRITE_SAME_16 => {
                no_protection(c)?;
                if c[1] & 0x10 != 0 {
                    // ANCHOR: anchored blocks are not supported (ANC_SUP is 0).
                    return Err(Sense::invalid_cdb(1));
                }
                let ndob = c[0] == WRITE_SAME_16 && c[1] & 1 != 0;
                Cdb::WriteSame {
                    lba,
                    blocks,
                    unmap: c[1] & 0x08 != 0,
                    ndob,
                }
            }
            UNMAP => {
                if c[1] & 1 != 0 {
                    return Err(Sense::invalid_cdb(1));
                }
                Cdb::Unmap { len: be16(c, 7) }
            }
            COMPARE_AND_WRITE => Cdb::CompareAndWrite {
                lba: be64(c, 2),
                blocks: u32::from(c[13]),
                fua: rw_flags(c)?,
            },
            SERVICE_ACTION_IN_16 => match u16::from(c[1] & 0x1f) {
                SA_READ_CAPACITY_16 => Cdb::ReadCapacity16 { alloc: be32(c, 10) },
                SA_GET_LBA_STATUS => Cdb::GetLbaStatus {
                    lba: be64(c, 2),
                    alloc: be32(c, 10),
                },
                _ => return Err(Sense::invalid_cdb(1)),
            },
            REPORT_LUNS => Cdb::ReportLuns {
                select: c[2],
                alloc: be32(c, 6),
            },
            MAINTENANCE_IN => match u16::from(c[1] & 0x1f) {
                SA_REPORT_SUPPORTED_OPCODES => Cdb::ReportSupportedOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options: c[2] & 7,
                    opcode: c[3],
                    service_action: be16(c, 4) as u16,
                    alloc: be32(c, 6),
                },
                _ => return Err(Sense::invalid_cdb(1)),
            },
            _ => return Err(Sense::INVALID_OPCODE),
        })
    }

    /// True for commands that change the medium (refused on read-only LUNs).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Cdb::Write { .. }
                | Cdb::WriteSame { .. }
                | Cdb::Unmap { .. }
                | Cdb::CompareAndWrite { .. }
        )
    }

    /// Commands whose data-out must be exactly as long as the CDB says: a different
    /// expected transfer length makes the CDB inconsistent (INVALID FIELD IN CDB), unlike
    /// a plain WRITE, which transfers what it can and reports the residual.
    pub fn check_expected_length(&self, edtl: u32, block_size: u32) -> Result<(), Sense> {
        let exact = matches!(
            self,
            Cdb::CompareAndWrite { .. }
                | Cdb::WriteSame { ndob: false, .. }
                | Cdb::Verify { bytchk: 1 | 3, .. }
        );
        if exact && u64::from(edtl) != self.data_out_len(block_size) {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok(())
    }

    /// Bytes of engine buffers (read data, an expanded WRITE SAME block) the command
    /// allocates when it runs, besides its data-out, for a LUN of `block_size`: at most
    /// one transfer's worth, as execution refuses longer ones before allocating.
    pub fn engine_buffer_len(&self, block_size: u32) -> u64 {
        let bs = u64::from(block_size);
        let len = match *self {
            Cdb::Read { blocks, .. }
            | Cdb::Verify { blocks, .. }
            | Cdb::WriteSame { blocks, .. }
            | Cdb::CompareAndWrite { blocks, .. } => u64::from(blocks) * bs,
            _ => 0,
        };
        len.min(super::MAX_TRANSFER_BYTES)
    }

    /// Bytes of data-out the command takes, for a LUN of `block_size`.
    pub fn data_out_len(&self, block_size: u32) -> u64 {
        let bs = u64::from(block_size);
        match *self {
            Cdb::Write { blocks, .. } => u64::from(blocks) * bs,
            Cdb::Verify {
                blocks, bytchk: 1, ..
            } => u64::from(blocks) * bs,
            Cdb::Verify {
                blocks, bytchk: 3, ..
            } if blocks > 0 => bs,
            Cdb::WriteSame { ndob: false, .. } => bs,
            Cdb::CompareAndWrite { blocks, .. } => 2 * u64::from(blocks) * bs,
            Cdb::Unmap { len }
            | Cdb::ModeSelect { len, .. }
            | Cdb::PersistentReserveOut { len, .. } => u64::from(len),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn read_and_write_ranges_parse_for_every_size() {
        assert_eq!(
            Cdb::parse(&cdb(&[0x08, 0x01, 0x02, 0x03, 0])).unwrap(),
            Cdb::Read {
                lba: 0x10203,
                blocks: 256,
                fua: false
            }
        );
        assert_eq!(
            Cdb::parse(&cdb(&[0x28, 0x08, 0, 0, 1, 0, 0, 0, 8, 0])).unwrap(),
            Cdb::Read {
                lba: 256,
                blocks: 8,
                fua: true
            }
        );
        assert_eq!(
            Cdb::parse(&cdb(&[0xaa, 0, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0])).unwrap(),
            Cdb::Write {
                lba: 9,
                blocks: 65536,
                fua: false,
                verify: false
            }
        );
        let mut w16 = cdb(&[0x8a, 0x08]);
        w16[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
        w16[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            Cdb::parse(&w16).unwrap(),
            Cdb::Write {
                lba: 1 << 40,
                blocks: 7,
                fua: true,
                verify: false
            }
        );
    }

    #[test]
    fn protection_fields_and_unknown_opcodes_are_refused() {
        assert_eq!(Cdb::parse(&cdb(&[0x28, 0x20])), Err(Sense::invalid_cdb(1)));
        assert_eq!(Cdb::parse(&cdb(&[0xc0])), Err(Sense::INVALID_OPCODE));
        assert_eq!(Cdb::parse(&cdb(&[0x9e, 0x1f])), Err(Sense::invalid_cdb(1)));
        assert_eq!(
            Cdb::parse(&cdb(&[0x12, 0, 0x80])),
            Err(Sense::invalid_cdb(2))
        );
    }

    #[test]
    fn data_out_lengths_follow_the_command() {
        let bs = 512;
        let ws = Cdb::WriteSame {
            lba: 0,
            blocks: 100,
            unmap: false,
            ndob: false,
        };
        assert_eq!(ws.data_out_len(bs), 512);
        let caw = Cdb::CompareAndWrite {
            lba: 0,
            blocks: 2,
            fua: false,
        };
        assert_eq!(caw.data_out_len(bs), 2048);
        assert_eq!(
            Cdb::Verify {
                lba: 0,
                blocks: 4,
                bytchk: 0
            }
            .data_out_len(bs),
            0
        );
        assert_eq!(Cdb::Unmap { len: 24 }.data_out_len(bs), 24);
        assert_eq!(
            Cdb::Read {
                lba: 0,
                blocks: 4,
                fua: false
            }
            .data_out_len(bs),
            0
        );
    }

    #[test]
    fn exact_data_out_commands_refuse_a_different_expected_length() {
        let caw = Cdb::CompareAndWrite {
            lba: 0,
            blocks: 1,
            fua: false,
        };
        assert!(caw.check_expected_length(1024, 512).is_ok());
        assert_eq!(
            caw.check_expected_length(2048, 512),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        let w = Cdb::Write {
            lba: 0,
            blocks: 1,
            fua: false,
            verify: false,
        };
        assert!(w.check_expected_length(0, 512).is_ok());
    }

    #[test]
    fn service_actions_select_the_command() {
        let mut rc16 = cdb(&[0x9e, 0x10]);
        rc16[13] = 32;
        assert_eq!(
            Cdb::parse(&rc16).unwrap(),
            Cdb::ReadCapacity16 { alloc: 32 }
        );
        let rsoc = cdb(&[0xa3, 0x0c, 0x82, 0x9e, 0, 0x10, 0, 0, 1, 0]);
        assert_eq!(
            Cdb::parse(&rsoc).unwrap(),
            Cdb::ReportSupportedOpcodes {
                rctd: true,
                options: 2,
                opcode: 0x9e,
                service_action: 0x10,
                alloc: 256
            }
        );
    }
}
