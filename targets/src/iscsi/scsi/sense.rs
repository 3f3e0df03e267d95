//! SCSI status and sense data (SPC-4 4.5): every error the SCSI layer reports is a `Sense`
//! built here, and `Sense::from_io_error` is the one place engine errors become sense.

use tessel_engine::IoError;

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const RESERVATION_CONFLICT: u8 = 0x18;

    /// The status of a reply: CHECK CONDITION when it carries sense, else RESERVATION
    /// CONFLICT when a reservation refused it, else GOOD.
    pub fn of(sense: Option<&super::Sense>, conflict: bool) -> u8 {
        match (sense, conflict) {
            (Some(_), _) => CHECK_CONDITION,
            (None, true) => RESERVATION_CONFLICT,
            (None, false) => GOOD,
        }
    }
}

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Where in the CDB or parameter list an invalid field sits (sense-key specific bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True for a CDB field, false for a parameter-list field.
    pub in_cdb: bool,
    /// Byte offset of the field.
    pub byte: u16,
}

/// One sense report: key, additional sense code and qualifier, optional details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (the miscompare offset, for instance).
    pub information: Option<u64>,
    /// Field pointer for ILLEGAL REQUEST.
    pub field: Option<FieldPointer>,
}

impl Sense {
    /// A sense with no details.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    /// NO SENSE, as REQUEST SENSE returns when nothing is pending.
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20/00).
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21/00).
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (1A/00).
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25/00).
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (39/00).
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// ABORTED COMMAND, DATA PHASE ERROR (4B/00): Data-Out out of sequence.
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x00);
    /// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26/04).
    pub const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    /// DATA PROTECT, WRITE PROTECTED (27/00).
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00), field not pointed at.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00) at byte `byte`.
    pub const fn invalid_cdb(byte: u16) -> Sense {
        Sense {
            field: Some(FieldPointer { in_cdb: true, byte }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26/00) at byte `byte`.
    pub const fn invalid_param(byte: u16) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
            }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }

    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION (1D/00) at data-out offset `offset`.
    pub const fn miscompare(offset: u64) -> Sense {
        Sense {
            information: Some(offset),
            ..Sense::new(key::MISCOMPARE, 0x1d, 0x00)
        }
    }

    /// The sense an engine error reports, for a request that wrote (`write`) or read.
    pub fn from_io_error(error: &IoError, write: bool) -> Sense {
        match error {
            IoError::UnknownVolume => Sense::LUN_NOT_SUPPORTED,
            IoError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
            IoError::Misaligned { .. } | IoError::ZeroLength => Sense::invalid_cdb(0),
            IoError::ReadOnly => Sense::WRITE_PROTECTED,
            // SBC-3 thin provisioning: SPACE ALLOCATION FAILED WRITE PROTECT (27/07).
            IoError::NoSpace => Sense::new(key::DATA_PROTECT, 0x27, 0x07),
            // WRITE ERROR (0C/00) or UNRECOVERED READ ERROR (11/00).
            IoError::Device(_) if write => Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00),
            IoError::Device(_) => Sense::new(key::MEDIUM_ERROR, 0x11, 0x00),
            // INTERNAL TARGET FAILURE (44/00).
            IoError::BadBuffer => Sense::new(key::HARDWARE_ERROR, 0x44, 0x00),
            // LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE (04/00): the host retries.
            IoError::ShuttingDown => Sense::new(key::NOT_READY, 0x04, 0x00),
        }
    }

    fn key_specific(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        let [hi, lo] = f.byte.to_be_bytes();
        Some([0x80 | if f.in_cdb { 0x40 } else { 0 }, hi, lo])
    }

    /// The sense data bytes: descriptor format (72h) or fixed format (70h).
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut out = vec![0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.information {
                out.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                out.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.key_specific() {
                out.extend_from_slice(&[0x02, 0x06, 0, 0, sks[0], sks[1], sks[2], 0]);
            }
            out[7] = (out.len() - 8) as u8;
            out
        } else {
            let mut out = vec![0u8; 18];
            out[0] = 0x70;
            out[2] = self.key;
            if let Some(info) = self.information {
                out[0] |= 0x80;
                out[3..7].copy_from_slice(&(info.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            }
            out[7] = 10;
            out[12] = self.asc;
            out[13] = self.ascq;
            if let Some(sks) = self.key_specific() {
                out[15..18].copy_from_slice(&sks);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_carries_key_asc_ascq_and_field_pointer() {
        let s = Sense::invalid_cdb(2).encode(false);
        assert_eq!(s.len(), 18);
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x24, 0));
        assert_eq!(&s[15..18], &[0xc0, 0, 2]);
    }

    #[test]
    fn descriptor_format_carries_information() {
        let s = Sense::miscompare(513).encode(true);
        assert_eq!(&s[..4], &[0x72, key::MISCOMPARE, 0x1d, 0]);
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(&s[8..12], &[0, 0x0a, 0x80, 0]);
        assert_eq!(u64::from_be_bytes(s[12..20].try_into().unwrap()), 513);
        let fixed = Sense::miscompare(513).encode(false);
        assert_eq!(fixed[0], 0xf0);
        assert_eq!(u32::from_be_bytes(fixed[3..7].try_into().unwrap()), 513);
    }

    #[test]
    fn engine_errors_map_to_their_sense() {
        let oor = IoError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(Sense::from_io_error(&oor, false), Sense::LBA_OUT_OF_RANGE);
        assert_eq!(
            Sense::from_io_error(&IoError::ReadOnly, true),
            Sense::WRITE_PROTECTED
        );
        assert_eq!(Sense::from_io_error(&IoError::NoSpace, true).ascq, 0x07);
        assert_eq!(Sense::from_io_error(&IoError::Device(5), true).asc, 0x0c);
        assert_eq!(Sense::from_io_error(&IoError::Device(5), false).asc, 0x11);
        assert_eq!(
            Sense::from_io_error(&IoError::ShuttingDown, false).key,
            key::NOT_READY
        );
    }
}
