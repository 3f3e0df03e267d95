//! SPC-4 commands every device type has: INQUIRY with its VPD pages, MODE SENSE / MODE
//! SELECT (caching and control pages), REPORT LUNS, REPORT SUPPORTED OPERATION CODES and
//! REQUEST SENSE.

use tessel_engine::AlignedBuf;

use super::cdb::{Cdb, SUPPORTED};
use super::sense::Sense;
use super::{sbc, Lun, Reply};

const VENDOR: &[u8; 8] = b"TESSEL  ";
const PRODUCT: &[u8; 16] = b"tessel volume   ";
const REVISION: &[u8; 4] = b"0001";
/// Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
const VERSIONS: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];
/// VPD pages served, in ascending order.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn standard_inquiry(qualifier_type: u8) -> Vec<u8> {
    let mut d = vec![0u8; 74];
    d[0] = qualifier_type;
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    for (i, v) in VERSIONS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// INQUIRY for a LUN that does not exist: peripheral qualifier 3, no device type.
pub fn inquiry_no_lun(alloc: u32) -> Reply {
    Reply::data(standard_inquiry(0x7f), alloc)
}

/// INQUIRY: standard data, or a VPD page.
pub fn inquiry(lun: &Lun, evpd: bool, page: u8, alloc: u32) -> Reply {
    if !evpd {
        return Reply::data(standard_inquiry(0x00), alloc);
    }
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => format!("{:015x}", lun.id).into_bytes(),
        0x83 => device_identification(lun),
        0xb0 => sbc::block_limits(lun),
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[1] = 0x01; // MEDIUM ROTATION RATE 1: non-rotating
            b
        }
        0xb2 => sbc::logical_block_provisioning(lun),
        _ => return Reply::check(Sense::invalid_cdb(2)),
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Reply::data(d, alloc)
}

/// One designation descriptor: code set, association and type, value.
fn designator(out: &mut Vec<u8>, code_set: u8, piv_assoc_type: u8, value: &[u8]) {
    out.extend_from_slice(&[code_set, piv_assoc_type, 0, value.len() as u8]);
    out.extend_from_slice(value);
}

fn device_identification(lun: &Lun) -> Vec<u8> {
    let mut d = Vec::new();
    // NAA locally assigned (type 3, NAA 3): the LUN's stable id.
    designator(&mut d, 0x01, 0x03, &((3u64 << 60) | lun.id).to_be_bytes());
    // T10 vendor identification (type 1, ASCII).
    let mut t10 = VENDOR.to_vec();
    t10.extend_from_slice(format!("{:015x}", lun.id).as_bytes());
    designator(&mut d, 0x02, 0x01, &t10);
    // Relative target port 1 (iSCSI protocol 5, PIV, association target port, type 4).
    designator(&mut d, 0x51, 0x94, &[0, 0, 0, 1]);
    // SCSI name string of the target device (UTF-8, association target device, type 8),
    // NUL-terminated and padded to a multiple of 4.
    let mut name = lun.target_name.as_bytes().to_vec();
    name.push(0);
    name.resize(name.len().div_ceil(4) * 4, 0);
    designator(&mut d, 0x53, 0xa8, &name);
    d
}

/// Current values of the caching (08h) and control (0Ah) mode pages.
fn mode_page(lun: &Lun, page: u8, changeable: bool) -> Vec<u8> {
    match page {
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            // WCE: tessel is a disk with a volatile write cache (FLUSH makes writes durable).
            p[2] = if changeable { 0 } else { 0x04 };
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            if changeable {
                p[2] = 0x04; // only D_SENSE can be changed
            } else {
                p[2] = if lun.descriptor_sense { 0x04 } else { 0 };
                p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
            }
            p
        }
    }
}

/// MODE SENSE 6/10.
pub fn mode_sense(lun: &Lun, cdb: &Cdb) -> Reply {
    let Cdb::ModeSense {
        ten,
        dbd,
        llbaa,
        pc,
        page,
        subpage,
        alloc,
    } = *cdb
    else {
        unreachable!("mode_sense called with {cdb:?}");
    };
    if pc == 3 {
        return Reply::check(Sense::SAVING_NOT_SUPPORTED);
    }
    let pages: &[u8] = match (page, subpage) {
        (0x08, 0) => &[0x08],
        (0x0a, 0) => &[0x0a],
        (0x3f, 0 | 0xff) => &[0x08, 0x0a],
        (0x08 | 0x0a | 0x3f, _) => return Reply::check(Sense::invalid_cdb(3)),
        _ => return Reply::check(Sense::invalid_cdb(2)),
    };
    let mut body = Vec::new();
    for &p in pages {
        body.extend(mode_page(lun, p, pc == 1));
    }
    let blocks = lun.blocks();
    let bs = lun.block_size();
    let descriptor: Vec<u8> = match (dbd, llbaa) {
        (true, _) => Vec::new(),
        (false, false) => {
            let mut d = (blocks.min(0xff_ffff) as u32).to_be_bytes().to_vec();
            d.extend_from_slice(&bs.to_be_bytes());
            d
        }
        (false, true) => {
            let mut d = blocks.to_be_bytes().to_vec();
            d.extend_from_slice(&[0, 0, 0, 0]);
            d.extend_from_slice(&bs.to_be_bytes());
            d
        }
    };
    // Device-specific parameter: WP for read-only LUNs, DPOFUA.
    let dsp = if lun.export.read_only { 0x90 } else { 0x10 };
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[3] = dsp;
        h[4] = u8::from(llbaa && !dbd);
        h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, dsp, descriptor.len() as u8]
    };
    d.extend(descriptor);
    d.extend(body);
    let len = d.len();
    if ten {
        d[0..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
    } else {
        d[0] = (len - 1) as u8;
    }
    Reply::data(d, alloc)
}

/// MODE SELECT 6/10: only the control page's D_SENSE can change; every other field must be
/// sent back with its current value.
pub fn mode_select(
    lun: &mut Lun,
    ten: bool,
    save: bool,
    len: u32,
    data: Option<AlignedBuf>,
) -> Reply {
    if save {
        return Reply::check(Sense::invalid_cdb(1));
    }
    let data = data.as_ref().map(|b| b.as_slice()).unwrap_or(&[]);
    let len = len as usize;
    let header = if ten { 8 } else { 4 };
    if len == 0 {
        return Reply::good();
    }
    if len < header || data.len() < len {
        return Reply::check(Sense::PARAMETER_LIST_LENGTH);
    }
    let data = &data[..len];
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([data[6], data[7]]))
    } else {
        usize::from(data[3])
    };
    let mut at = header + bd_len;
    if at > len {
        return Reply::check(Sense::PARAMETER_LIST_LENGTH);
    }
    let mut descriptor_sense = lun.descriptor_sense;
    while at < len {
        if at + 2 > len {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH);
        }
        let code = data[at] & 0x3f;
        let spf = data[at] & 0x40 != 0;
        let page_len = usize::from(data[at + 1]) + 2;
        if spf || !(code == 0x08 || code == 0x0a) {
            return Reply::check(Sense::invalid_param(at as u16));
        }
        if at + page_len > len {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH);
        }
        let current = mode_page(lun, code, false);
        let changeable = mode_page(lun, code, true);
        let new = &data[at..at + page_len];
        if new.len() != current.len() {
            return Reply::check(Sense::invalid_param(at as u16 + 1));
        }
        // The PS bit (byte 0 bit 7) is reserved in MODE SELECT.
        for i in 1..new.len() {
            if (new[i] ^ current[i]) & !changeable[i] != 0 {
                return Reply::check(Sense::invalid_param((at + i) as u16));
            }
        }
        if code == 0x0a {
            descriptor_sense = new[2] & 0x04 != 0;
        }
        at += page_len;
    }
    lun.descriptor_sense = descriptor_sense;
    Reply::good()
}

/// REPORT LUNS.
pub fn report_luns(luns: &[u16], select: u8, alloc: u32) -> Reply {
    if alloc < 16 {
        return Reply::check(Sense::invalid_cdb(6));
    }
    let listed: &[u16] = match select {
        0x00..=0x02 => luns,
        0x10..=0x12 => &[],
        _ => return Reply::check(Sense::invalid_cdb(2)),
    };
    let mut d = ((listed.len() * 8) as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 4]);
    for &l in listed {
        d.extend_from_slice(&crate::iscsi::pdu::lun_field(l).to_be_bytes());
    }
    Reply::data(d, alloc)
}

/// CDB usage map for REPORT SUPPORTED OPERATION CODES: the opcode, the service action,
/// every other bit usable except the reserved NACA/link bits of the control byte.
fn usage(opcode: u8, sa: Option<u16>, len: u8) -> Vec<u8> {
    let mut u = vec![0xff; usize::from(len)];
    u[0] = opcode;
    if let Some(sa) = sa {
        u[1] = sa as u8;
    }
    u[usize::from(len) - 1] = 0x00;
    u
}

fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    t
}

/// REPORT SUPPORTED OPERATION CODES: all commands, or one.
pub fn report_supported_opcodes(cdb: &Cdb) -> Reply {
    let Cdb::ReportSupportedOpcodes {
        rctd,
        options,
        opcode,
        service_action,
        alloc,
    } = *cdb
    else {
        unreachable!("report_supported_opcodes called with {cdb:?}");
    };
    if options == 0 {
        let mut d = vec![0u8; 4];
        for &(op, sa, len) in SUPPORTED {
            let flags = u8::from(sa.is_some()) | if rctd { 0x02 } else { 0 };
            d.extend_from_slice(&[op, 0]);
            d.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
            d.extend_from_slice(&[0, flags, 0, len]);
            if rctd {
                d.extend_from_slice(&timeouts());
            }
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        return Reply::data(d, alloc);
    }
    let has_sa = SUPPORTED
        .iter()
        .any(|&(op, sa, _)| op == opcode && sa.is_some());
    let want_sa = match options {
        1 if has_sa => return Reply::check(Sense::invalid_cdb(2)),
        1 => None,
        2 if !has_sa && SUPPORTED.iter().any(|&(op, _, _)| op == opcode) => {
            return Reply::check(Sense::invalid_cdb(2))
        }
        2 => Some(service_action),
        3 => has_sa.then_some(service_action),
        _ => return Reply::check(Sense::invalid_cdb(2)),
    };
    let ctdp = if rctd { 0x80 } else { 0 };
    let d = match SUPPORTED
        .iter()
        .find(|&&(op, sa, _)| op == opcode && sa == want_sa)
    {
        Some(&(op, sa, len)) => {
            let mut d = vec![0, ctdp | 0x03];
            d.extend_from_slice(&u16::from(len).to_be_bytes());
            d.extend(usage(op, sa, len));
            if rctd {
                d.extend_from_slice(&timeouts());
            }
            d
        }
        None => vec![0, 0x01, 0, 0],
    };
    Reply::data(d, alloc)
}

/// REQUEST SENSE: sense is always reported with the status (autosense), so nothing is
/// ever pending here.
pub fn request_sense(descriptor: bool, alloc: u32) -> Reply {
    Reply::data(Sense::NO_SENSE.encode(descriptor), alloc)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cdb, execute, lun, reply};
    use super::super::Step;
    use super::*;

    fn run(l: &mut super::Lun, bytes: &[u8]) -> Reply {
        reply(execute(l, &[0, 1], &cdb(bytes), None))
    }

    #[test]
    fn standard_inquiry_names_sbc3_and_honours_alloc() {
        let mut l = lun(100, false);
        let r = run(&mut l, &[0x12, 0, 0, 0, 0xff]);
        let d = r.data.as_slice();
        assert_eq!(d[0], 0);
        assert_eq!(d[4] as usize + 5, d.len());
        assert_eq!(&d[8..16], VENDOR);
        assert!(d[58..74].chunks(2).any(|c| c == [0x04, 0xc0]));
        assert_eq!(run(&mut l, &[0x12, 0, 0, 0, 5]).data.as_slice().len(), 5);
    }

    #[test]
    fn vpd_pages_list_and_serve_every_page() {
        let mut l = lun(100, false);
        let d = run(&mut l, &[0x12, 1, 0, 0, 0xff]).data.as_slice().to_vec();
        assert_eq!(&d[4..], &VPD_PAGES);
        for page in VPD_PAGES {
            let r = run(&mut l, &[0x12, 1, page, 0, 0xff]);
            assert!(r.sense.is_none(), "page {page:#x}");
            let d = r.data.as_slice();
            assert_eq!(d[1], page);
            assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])) + 4, d.len());
        }
        assert_eq!(
            run(&mut l, &[0x12, 1, 0x99, 0, 0xff]).sense,
            Some(Sense::invalid_cdb(2))
        );
    }

    #[test]
    fn device_identification_has_naa_and_scsi_name() {
        let mut l = lun(100, false);
        let r = run(&mut l, &[0x12, 1, 0x83, 0, 0xff]);
        let d = &r.data.as_slice()[4..];
        assert_eq!(&d[..4], &[0x01, 0x03, 0, 8]);
        assert_eq!(d[4] >> 4, 3);
        let text = String::from_utf8_lossy(d);
        assert!(text.contains("iqn.2026-11.dev.tessel:vol0"));
    }

    #[test]
    fn mode_sense_reports_wp_for_read_only_luns() {
        let mut rw = lun(100, false);
        let mut ro = lun(100, true);
        let d = run(&mut rw, &[0x1a, 0, 0x3f, 0, 0xff])
            .data
            .as_slice()
            .to_vec();
        assert_eq!(d[0] as usize + 1, d.len());
        assert_eq!(d[2] & 0x80, 0);
        assert_eq!(d[3], 8);
        assert_eq!(&d[12..14], &[0x08, 0x12]);
        assert_eq!(&d[32..34], &[0x0a, 0x0a]);
        let d = run(&mut ro, &[0x1a, 0x08, 0x0a, 0, 0xff])
            .data
            .as_slice()
            .to_vec();
        assert_eq!(d[2] & 0x80, 0x80);
        assert_eq!(d[3], 0);
        assert_eq!(d.len(), 4 + 12);
    }

    #[test]
    fn mode_sense_10_with_long_lba_descriptor() {
        let mut l = lun(100, false);
        let d = run(&mut l, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 0, 0xff, 0])
            .data
            .as_slice()
            .to_vec();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize + 2, d.len());
        assert_eq!(d[4], 1);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 100);
    }

    #[test]
    fn mode_sense_refuses_saved_values_and_unknown_pages() {
        let mut l = lun(100, false);
        assert_eq!(
            run(&mut l, &[0x1a, 0, 0xc8, 0, 0xff]).sense,
            Some(Sense::SAVING_NOT_SUPPORTED)
        );
        assert_eq!(
            run(&mut l, &[0x1a, 0, 0x19, 0, 0xff]).sense,
            Some(Sense::invalid_cdb(2))
        );
    }

    #[test]
    fn mode_select_switches_d_sense_and_refuses_other_changes() {
        let mut l = lun(100, false);
        let mut page = mode_page(&l, 0x0a, false);
        page[2] |= 0x04;
        let mut list = vec![0, 0, 0, 0];
        list.extend(&page);
        let data = AlignedBuf::from_slice(&list);
        let c = cdb(&[0x15, 0x10, 0, 0, list.len() as u8]);
        assert!(reply(execute(&mut l, &[0], &c, Some(data))).sense.is_none());
        assert!(l.descriptor_sense);
        list[4 + 3] = 0;
        let r = reply(execute(
            &mut l,
            &[0],
            &c,
            Some(AlignedBuf::from_slice(&list)),
        ));
        assert_eq!(r.sense, Some(Sense::invalid_param(7)));
    }

    #[test]
    fn report_luns_lists_every_lun() {
        let mut l = lun(100, false);
        let d = run(&mut l, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
            .data
            .as_slice()
            .to_vec();
        assert_eq!(&d[..4], &[0, 0, 0, 16]);
        assert_eq!(&d[16..18], &[0, 1]);
        assert_eq!(
            run(&mut l, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8]).sense,
            Some(Sense::invalid_cdb(6))
        );
    }

    #[test]
    fn report_supported_opcodes_all_and_one() {
        let mut l = lun(100, false);
        let all = run(&mut l, &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        let d = all.data.as_slice();
        assert_eq!(
            u32::from_be_bytes(d[..4].try_into().unwrap()) as usize,
            SUPPORTED.len() * 8
        );
        let one = run(&mut l, &[0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&one.data.as_slice()[..5], &[0, 3, 0, 10, 0x28]);
        let sa = run(&mut l, &[0xa3, 0x0c, 0x02, 0x9e, 0, 0x10, 0, 0, 1, 0]);
        assert_eq!(&sa.data.as_slice()[..6], &[0, 3, 0, 16, 0x9e, 0x10]);
        let none = run(&mut l, &[0xa3, 0x0c, 0x01, 0xc1, 0, 0, 0, 0, 1, 0]);
        assert_eq!(none.data.as_slice(), &[0, 1, 0, 0]);
        let bad = run(&mut l, &[0xa3, 0x0c, 0x01, 0x9e, 0, 0, 0, 0, 1, 0]);
        assert_eq!(bad.sense, Some(Sense::invalid_cdb(2)));
    }

    #[test]
    fn request_sense_reports_no_sense_in_either_format() {
        let mut l = lun(100, false);
        assert_eq!(run(&mut l, &[0x03, 0, 0, 0, 252]).data.as_slice()[0], 0x70);
        assert_eq!(run(&mut l, &[0x03, 1, 0, 0, 252]).data.as_slice()[0], 0x72);
    }

    #[test]
    fn test_unit_ready_is_good() {
        let mut l = lun(100, false);
        assert!(matches!(
            execute(&mut l, &[0], &cdb(&[0]), None),
            Step::Reply(Reply { sense: None, .. })
        ));
    }
}
