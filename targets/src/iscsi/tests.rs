//! Session tests that drive an `IscsiSession` through bytes, as an initiator would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tessel_engine::{Completion, Op, VolumeId};

use super::pdu::{self, Bhs, Digests, RESERVED_TAG};
use super::text::TextPairs;
use super::{IscsiConfig, IscsiSession, State};
use crate::budget::{Allowance, MemoryBudget};
use crate::export::{Actions, ExportInfo};

pub(super) fn exports() -> Vec<ExportInfo> {
    let e = |name: &str, id, ro| ExportInfo {
        name: name.into(),
        description: String::new(),
        volume: VolumeId(id),
        size: 1 << 20,
        block_size: 512,
        read_only: ro,
    };
    vec![e("vol0", 1, false), e("vol0@s1", 2, true)]
}

/// A scripted initiator: encodes requests, decodes the session's answers.
pub(super) struct Initiator {
    pub(super) session: IscsiSession,
    pub(super) cmd_sn: u32,
    pub(super) digests: Digests,
    name: String,
}

impl Initiator {
    fn new() -> Initiator {
        Initiator::named(&Arc::new(IscsiConfig::default()), "iqn.2026-11.test:host")
    }

    /// An initiator called `name` on the portal of `config` (shared with other initiators).
    pub(super) fn named(config: &Arc<IscsiConfig>, name: &str) -> Initiator {
        Initiator {
            session: IscsiSession::new(config.clone()),
            cmd_sn: 1,
            digests: Digests::default(),
            name: name.to_string(),
        }
    }

    fn send(&mut self, bhs: Bhs, data: &[u8]) -> (Vec<(Bhs, Vec<u8>)>, Actions) {
        let mut bytes = Vec::new();
        pdu::encode(&bhs, &[], data, self.digests, &mut bytes);
        let mut actions = Actions::default();
        let used = self
            .session
            .receive(&bytes, &exports(), &mut actions)
            .expect("session accepts the PDU");
        assert_eq!(used, bytes.len());
        (self.decode(&actions.send), actions)
    }

    pub(super) fn decode(&self, mut bytes: &[u8]) -> Vec<(Bhs, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = pdu::frame(bytes, self.digests).unwrap() {
            out.push((Bhs::decode(&f.header).unwrap(), f.data.to_vec()));
            bytes = &bytes[f.len..];
        }
        assert!(bytes.is_empty());
        out
    }

    fn login(&mut self, keys: &[(&str, &str)]) -> TextPairs {
        let mut text = TextPairs::default();
        text.push("InitiatorName", self.name.clone());
        for (k, v) in keys {
            text.push(*k, *v);
        }
        let req = pdu::LoginRequest {
            transit: true,
            cont: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
        };
        let (out, _) = self.send(Bhs::LoginRequest(req), &text.encode());
        let Bhs::LoginResponse(r) = &out[0].0 else {
            panic!("expected a login response: {out:?}")
        };
        assert_eq!((r.status_class, r.transit, r.nsg), (0, true, 3));
        assert!(matches!(self.session.state(), State::FullFeature));
        let keys = TextPairs::parse(&out[0].1).unwrap();
        self.digests = Digests {
            header: keys.get("HeaderDigest") == Some("CRC32C"),
            data: keys.get("DataDigest") == Some("CRC32C"),
        };
        keys
    }

    pub(super) fn normal_login(&mut self, extra: &[(&str, &str)]) -> TextPairs {
        let mut keys = vec![("TargetName", "iqn.2026-11.dev.tessel:vol0")];
        keys.extend_from_slice(extra);
        self.login(&keys)
    }

    fn command(
        &mut self,
        itt: u32,
        lun: u16,
        cdb: &[u8],
        edtl: u32,
        write: bool,
        data: &[u8],
    ) -> (Vec<(Bhs, Vec<u8>)>, Actions) {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let cmd = pdu::ScsiCommand {
            immediate: false,
            final_: true,
            read: !write && edtl > 0,
            write,
            attr: 1,
            lun: pdu::lun_field(lun),
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
            cdb: c,
        };
        self.cmd_sn += 1;
        self.send(Bhs::ScsiCommand(cmd), data)
    }

    fn complete(&mut self, actions: Actions, fill: u8) -> Vec<(Bhs, Vec<u8>)> {
        let mut out = Actions::default();
        for mut r in actions.submit {
            if let Some(b) = r.buf.as_mut() {
                if r.op == Op::Read {
                    b.as_mut_slice().fill(fill);
                }
            }
            let c = Completion {
                tag: r.tag,
                result: Ok(()),
                buf: r.buf,
                extents: Vec::new(),
            };
            self.session.complete(c, &mut out);
        }
        self.decode(&out.send)
    }
}

const READ10_2: [u8; 10] = [0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0];
const WRITE10_2: [u8; 10] = [0x2a, 0, 0, 0, 0, 4, 0, 0, 2, 0];

#[test]
fn login_read_returns_data_in_with_collapsed_status() {
    let mut ini = Initiator::new();
    let keys = ini.normal_login(&[
        ("MaxRecvDataSegmentLength", "512"),
        ("HeaderDigest", "None"),
    ]);
    assert_eq!(keys.get("TargetPortalGroupTag"), Some("1"));
    assert_eq!(keys.get("HeaderDigest"), Some("None"));
    let (out, actions) = ini.command(7, 0, &READ10_2, 1024, false, &[]);
    assert!(out.is_empty());
    assert_eq!(actions.submit.len(), 1);
    let r = &actions.submit[0];
    assert_eq!(
        (r.op, r.offset, r.len, r.volume),
        (Op::Read, 2048, 1024, VolumeId(1))
    );
    assert_eq!(ini.session.in_flight(), 1);
    let out = ini.complete(actions, 0xab);
    assert_eq!(
        out.len(),
        2,
        "two Data-In PDUs of MaxRecvDataSegmentLength 512"
    );
    let Bhs::DataIn(first) = &out[0].0 else {
        panic!()
    };
    let Bhs::DataIn(last) = &out[1].0 else {
        panic!()
    };
    assert_eq!(
        (first.status, first.data_sn, first.buffer_offset),
        (None, 0, 0)
    );
    assert_eq!(
        (last.status, last.data_sn, last.buffer_offset, last.itt),
        (Some(0), 1, 512, 7)
    );
    assert!(out
        .iter()
        .all(|(_, d)| d.len() == 512 && d.iter().all(|&b| b == 0xab)));
    assert_eq!(ini.session.in_flight(), 0);
}

#[test]
fn crc32c_digests_are_used_when_the_initiator_insists() {
    let mut ini = Initiator::new();
    ini.normal_login(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
    assert!(ini.digests.header && ini.digests.data);
    let (out, _) = ini.command(1, 0, &[0x00], 0, false, &[]);
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!("{out:?}")
    };
    assert_eq!(r.status, 0);
}

#[test]
fn write_with_r2t_gathers_data_out_into_the_engine_buffer() {
    let mut ini = Initiator::new();
    ini.normal_login(&[
        ("InitialR2T", "Yes"),
        ("ImmediateData", "No"),
        ("MaxBurstLength", "512"),
        ("MaxOutstandingR2T", "2"),
    ]);
    let (out, _) = ini.command(9, 0, &WRITE10_2, 1024, true, &[]);
    let r2ts: Vec<pdu::R2t> = out
        .into_iter()
        .map(|(b, _)| match b {
            Bhs::R2t(r) => r,
            other => panic!("expected R2T, got {other:?}"),
        })
        .collect();
    assert_eq!(r2ts.len(), 2);
    assert_eq!(
        (
            r2ts[1].buffer_offset,
            r2ts[1].desired_length,
            r2ts[1].r2t_sn
        ),
        (512, 512, 1)
    );
    let mut submitted = Vec::new();
    for (i, r) in r2ts.iter().enumerate() {
        let d = pdu::DataOut {
            final_: true,
            lun: 0,
            itt: 9,
            ttt: r.ttt,
            exp_stat_sn: 0,
            data_sn: 0,
            buffer_offset: r.buffer_offset,
        };
        let (out, actions) = ini.send(Bhs::DataOut(d), &[i as u8 + 1; 512]);
        assert!(out.is_empty());
        submitted.extend(actions.submit);
    }
    assert_eq!(submitted.len(), 1);
    let w = &submitted[0];
    assert_eq!(
        (w.op, w.offset, w.len),
        (Op::Write { fua: false }, 2048, 1024)
    );
    let buf = w.buf.as_ref().unwrap().as_slice();
    assert!(buf[..512].iter().all(|&b| b == 1) && buf[512..].iter().all(|&b| b == 2));
}

#[test]
fn immediate_and_unsolicited_data_need_no_r2t() {
    let mut ini = Initiator::new();
    ini.normal_login(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
    let (out, actions) = ini.command(3, 0, &WRITE10_2, 1024, true, &[5u8; 1024]);
    assert!(out.is_empty());
    assert_eq!(
        actions.submit[0].buf.as_ref().unwrap().as_slice(),
        &[5u8; 1024]
    );
    let out = ini.complete(actions, 0);
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!((r.status, r.residual), (0, pdu::Residual::None));
}

#[test]
fn a_data_out_out_of_sequence_fails_the_task_not_the_session() {
    let mut ini = Initiator::new();
    ini.normal_login(&[("InitialR2T", "No"), ("ImmediateData", "No")]);
    let mut cdb = [0u8; 16];
    cdb[..10].copy_from_slice(&WRITE10_2);
    let cmd = pdu::ScsiCommand {
        immediate: false,
        final_: false,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt: 4,
        edtl: 1024,
        cmd_sn: 1,
        exp_stat_sn: 0,
        cdb,
    };
    assert!(ini.send(Bhs::ScsiCommand(cmd), &[]).0.is_empty());
    let d = pdu::DataOut {
        final_: true,
        lun: 0,
        itt: 4,
        ttt: RESERVED_TAG,
        exp_stat_sn: 0,
        data_sn: 27,
        buffer_offset: 0,
    };
    let (out, _) = ini.send(Bhs::DataOut(d), &[0u8; 1024]);
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.status, 2);
    assert_eq!(&out[0].1[2..3], &[0x70]);
    assert_eq!(out[0].1[2 + 12], 0x4b);
}

#[test]
fn errors_carry_sense_and_snapshots_are_write_protected() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let (out, _) = ini.command(
        1,
        0,
        &[0x28, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0],
        1024,
        false,
        &[],
    );
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!((r.status, r.residual), (2, pdu::Residual::Underflow(1024)));
    let sense = &out[0].1[2..];
    assert_eq!((sense[2], sense[12], sense[13]), (0x05, 0x21, 0x00));
    let (out, _) = ini.command(2, 1, &WRITE10_2, 1024, true, &[0u8; 1024]);
    let sense = &out[0].1[2..];
    assert_eq!((sense[2], sense[12]), (0x07, 0x27));
    let (out, _) = ini.command(3, 0, &[0xc1], 0, false, &[]);
    let sense = &out[0].1[2..];
    assert_eq!((sense[2], sense[12]), (0x05, 0x20));
    let (out, _) = ini.command(4, 5, &[0x00], 0, false, &[]);
    assert_eq!(out[0].1[2 + 12], 0x25);
}

/// The SCSI status of a command answered without engine I/O (None when it went to the
/// engine).
fn status(out: &[(Bhs, Vec<u8>)], actions: &Actions) -> Option<u8> {
    if !actions.submit.is_empty() {
        return None;
    }
    match &out[0].0 {
        Bhs::ScsiResponse(r) => Some(r.status),
        Bhs::DataIn(d) => d.status,
        other => panic!("expected a SCSI response, got {other:?}"),
    }
}

/// PERSISTENT RESERVE OUT `action` of type `kind` with reservation and service action keys.
fn prout(ini: &mut Initiator, itt: u32, action: u8, kind: u8, key: u64, sark: u64) -> u8 {
    let mut list = key.to_be_bytes().to_vec();
    list.extend_from_slice(&sark.to_be_bytes());
    list.extend_from_slice(&[0; 8]);
    let cdb = [0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
    let (out, actions) = ini.command(itt, 0, &cdb, 24, true, &list);
    status(&out, &actions).expect("PERSISTENT RESERVE OUT needs no engine I/O")
}

#[test]
fn a_persistent_reservation_refuses_other_sessions_with_reservation_conflict() {
    let config = Arc::new(IscsiConfig::default());
    let mut a = Initiator::named(&config, "iqn.2026-11.test:a");
    let mut b = Initiator::named(&config, "iqn.2026-11.test:b");
    a.normal_login(&[("ImmediateData", "Yes"), ("InitialR2T", "No")]);
    b.normal_login(&[("ImmediateData", "Yes"), ("InitialR2T", "No")]);
    assert_eq!(prout(&mut a, 1, 6, 0, 0, 0xa), 0);
    assert_eq!(prout(&mut b, 1, 6, 0, 0, 0xb), 0);
    // EXCLUSIVE ACCESS held by a: b may neither read nor write, a may.
    assert_eq!(prout(&mut a, 2, 1, 3, 0xa, 0), 0);
    let (out, actions) = b.command(2, 0, &READ10_2, 1024, false, &[]);
    assert_eq!(status(&out, &actions), Some(0x18));
    assert!(out[0].1.is_empty(), "RESERVATION CONFLICT carries no sense");
    let (out, actions) = b.command(3, 0, &WRITE10_2, 1024, true, &[0; 1024]);
    assert_eq!(status(&out, &actions), Some(0x18));
    let (out, actions) = a.command(3, 0, &READ10_2, 1024, false, &[]);
    assert_eq!(status(&out, &actions), None);
    a.complete(actions, 0);
    // b sees the reservation, then preempts it.
    let (out, _) = b.command(4, 0, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 64, 0], 64, false, &[]);
    assert_eq!(&out[0].1[8..16], &0xau64.to_be_bytes());
    assert_eq!(prout(&mut b, 5, 4, 1, 0xb, 0xa), 0);
    let (out, actions) = a.command(4, 0, &WRITE10_2, 1024, true, &[0; 1024]);
    assert_eq!(status(&out, &actions), Some(0x18));
    let (out, actions) = a.command(5, 0, &READ10_2, 1024, false, &[]);
    assert_eq!(
        status(&out, &actions),
        None,
        "WRITE EXCLUSIVE lets others read"
    );
}

#[test]
fn a_reserve6_ends_with_the_session_that_took_it() {
    let config = Arc::new(IscsiConfig::default());
    let mut a = Initiator::named(&config, "iqn.2026-11.test:a");
    let mut b = Initiator::named(&config, "iqn.2026-11.test:b");
    a.normal_login(&[]);
    b.normal_login(&[]);
    let (out, actions) = a.command(1, 0, &[0x16, 0, 0, 0, 0, 0], 0, false, &[]);
    assert_eq!(status(&out, &actions), Some(0));
    let (out, actions) = b.command(1, 0, &[0x16, 0, 0, 0, 0, 0], 0, false, &[]);
    assert_eq!(status(&out, &actions), Some(0x18));
    let (out, actions) = b.command(2, 0, &[0x00, 0, 0, 0, 0, 0], 0, false, &[]);
    assert_eq!(status(&out, &actions), Some(0x18));
    drop(a);
    let (out, actions) = b.command(3, 0, &[0x16, 0, 0, 0, 0, 0], 0, false, &[]);
    assert_eq!(status(&out, &actions), Some(0));
    // A LUN reset ends it too.
    let tmf = pdu::TaskMgmtRequest {
        immediate: true,
        function: 5,
        lun: pdu::lun_field(0),
        itt: 9,
        rtt: RESERVED_TAG,
        cmd_sn: b.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: 0,
        exp_data_sn: 0,
    };
    b.send(Bhs::TaskMgmtRequest(tmf), &[]);
    let mut c = Initiator::named(&config, "iqn.2026-11.test:c");
    c.normal_login(&[]);
    let (out, actions) = c.command(1, 0, &[0x16, 0, 0, 0, 0, 0], 0, false, &[]);
    assert_eq!(status(&out, &actions), Some(0));
}

#[test]
fn commands_outside_the_cmdsn_window_are_ignored() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let expected = ini.cmd_sn;
    ini.cmd_sn = expected.wrapping_add(1000);
    assert!(ini.command(1, 0, &[0x00], 0, false, &[]).0.is_empty());
    ini.cmd_sn = expected.wrapping_sub(10);
    assert!(ini.command(2, 0, &[0x00], 0, false, &[]).0.is_empty());
    ini.cmd_sn = expected;
    let (out, _) = ini.command(3, 0, &[0x00], 0, false, &[]);
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!()
    };
    assert_eq!(r.exp_cmd_sn, ini.cmd_sn);
}

#[test]
fn nop_out_is_echoed_and_idle_initiators_are_pinged_then_dropped() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let nop = pdu::NopOut {
        immediate: true,
        lun: 0,
        itt: 5,
        ttt: RESERVED_TAG,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
    };
    let (out, _) = ini.send(Bhs::NopOut(nop), b"ping");
    assert!(matches!(&out[0].0, Bhs::NopIn(n) if n.itt == 5));
    assert_eq!(out[0].1, b"ping");
    let t0 = Instant::now();
    let mut a = Actions::default();
    ini.session.tick(t0, &mut a).unwrap();
    assert!(a.send.is_empty());
    ini.session
        .tick(t0 + Duration::from_secs(6), &mut a)
        .unwrap();
    let out = ini.decode(&a.send);
    let Bhs::NopIn(ping) = &out[0].0 else {
        panic!()
    };
    assert_eq!(ping.itt, RESERVED_TAG);
    let answer = pdu::NopOut {
        immediate: true,
        lun: 0,
        itt: RESERVED_TAG,
        ttt: ping.ttt,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
    };
    assert!(ini.send(Bhs::NopOut(answer), &[]).0.is_empty());
    let mut a = Actions::default();
    ini.session
        .tick(t0 + Duration::from_secs(12), &mut a)
        .unwrap();
    ini.session
        .tick(t0 + Duration::from_secs(18), &mut a)
        .unwrap();
    assert!(ini
        .session
        .tick(t0 + Duration::from_secs(60), &mut a)
        .is_err());
}

#[test]
fn an_aborted_tasks_completion_is_dropped() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let (_, actions) = ini.command(8, 0, &READ10_2, 1024, false, &[]);
    let tmf = pdu::TaskMgmtRequest {
        immediate: true,
        function: 1,
        lun: 0,
        itt: 9,
        rtt: 8,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: ini.cmd_sn - 1,
        exp_data_sn: 0,
    };
    let (out, _) = ini.send(Bhs::TaskMgmtRequest(tmf.clone()), &[]);
    assert!(matches!(&out[0].0, Bhs::TaskMgmtResponse(r) if r.response == 0 && r.itt == 9));
    assert!(ini.complete(actions, 0).is_empty());
    assert_eq!(ini.session.in_flight(), 0);
    let (out, _) = ini.send(Bhs::TaskMgmtRequest(tmf), &[]);
    assert!(matches!(&out[0].0, Bhs::TaskMgmtResponse(r) if r.response == 1));
}

/// An immediate Logout (ITT 10) sent while `submit` is still in the engine gets no answer
/// yet; then the engine completes every request. Returns what the completions sent.
fn logout_while_in_the_engine(ini: &mut Initiator, submit: Vec<tessel_engine::Request>) -> Actions {
    let logout = pdu::LogoutRequest {
        immediate: true,
        reason: 0,
        itt: 10,
        cid: 0,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
    };
    let (out, a) = ini.send(Bhs::LogoutRequest(logout), &[]);
    assert!(out.is_empty() && !a.close);
    let mut done = Actions::default();
    for r in submit {
        let c = Completion {
            tag: r.tag,
            result: Ok(()),
            buf: r.buf,
            extents: Vec::new(),
        };
        ini.session.complete(c, &mut done);
    }
    done
}

#[test]
fn logout_waits_for_tasks_in_the_engine() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let (_, actions) = ini.command(8, 0, &READ10_2, 1024, false, &[]);
    let done = logout_while_in_the_engine(&mut ini, actions.submit);
    let out = ini.decode(&done.send);
    assert!(matches!(&out[0].0, Bhs::DataIn(d) if d.status == Some(0)));
    assert!(matches!(&out[1].0, Bhs::LogoutResponse(r) if r.response == 0 && r.itt == 10));
    assert!(done.close);
}

#[test]
fn discovery_answers_send_targets_all() {
    let mut ini = Initiator::new();
    ini.login(&[
        ("SessionType", "Discovery"),
        ("HeaderDigest", "CRC32C,None"),
    ]);
    assert!(!ini.digests.header);
    let mut text = TextPairs::default();
    text.push("SendTargets", "All");
    let req = pdu::TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt: 2,
        ttt: RESERVED_TAG,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
    };
    let (out, _) = ini.send(Bhs::TextRequest(req), &text.encode());
    let keys = TextPairs::parse(&out[0].1).unwrap();
    assert_eq!(keys.get("TargetName"), Some("iqn.2026-11.dev.tessel:vol0"));
    assert_eq!(keys.get("TargetAddress"), Some("127.0.0.1:3260,1"));
}

#[test]
fn report_luns_lists_the_volume_and_its_snapshot() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let (out, _) = ini.command(
        1,
        0,
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        256,
        false,
        &[],
    );
    let Bhs::DataIn(d) = &out[0].0 else { panic!() };
    assert_eq!(d.residual, pdu::Residual::Underflow(256 - 24));
    assert_eq!(&out[0].1[..4], &[0, 0, 0, 16]);
}

#[test]
fn unknown_opcodes_are_rejected_in_full_feature_phase() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    let mut h = [0u8; pdu::BHS_LEN];
    h[0] = 0x1c;
    let mut a = Actions::default();
    ini.session.receive(&h, &exports(), &mut a).unwrap();
    let out = ini.decode(&a.send);
    assert!(
        matches!(&out[0].0, Bhs::Reject(r) if r.reason == pdu::reject_reason::COMMAND_NOT_SUPPORTED)
    );
    assert_eq!(out[0].1, h);
}

proptest! {
    #[test]
    fn random_bytes_never_panic_in_any_state(logged_in: bool, chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..8)) {
        let mut ini = Initiator::new();
        if logged_in {
            ini.normal_login(&[]);
        }
        let mut pending = Vec::new();
        for c in chunks {
            pending.extend(c);
            let mut a = Actions::default();
            match ini.session.receive(&pending, &exports(), &mut a) {
                Ok(used) => { pending.drain(..used); }
                Err(_) => break,
            }
            for r in a.submit {
                let c = Completion { tag: r.tag, result: Ok(()), buf: r.buf, extents: Vec::new() };
                ini.session.complete(c, &mut Actions::default());
            }
        }
    }

    #[test]
    fn random_pdus_after_login_never_panic(op in 0u8..0x40, body in prop::collection::vec(any::<u8>(), 47), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut ini = Initiator::new();
        ini.normal_login(&[]);
        let mut h = [0u8; pdu::BHS_LEN];
        h[1..].copy_from_slice(&body);
        h[0] = op;
        h[4] = 0;
        h[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        let mut bytes = h.to_vec();
        bytes.extend(&data);
        bytes.resize(pdu::BHS_LEN + data.len().div_ceil(4) * 4, 0);
        let mut a = Actions::default();
        let _ = ini.session.receive(&bytes, &exports(), &mut a);
        for r in a.submit {
            let c = Completion { tag: r.tag, result: Ok(()), buf: r.buf, extents: Vec::new() };
            ini.session.complete(c, &mut Actions::default());
        }
    }
}

/// A SCSI Command PDU for `cdb` with the F bit clear: unsolicited Data-Out follows.
fn write_without_final(ini: &mut Initiator, itt: u32, cdb: &[u8], edtl: u32) -> Bhs {
    let mut c = [0u8; 16];
    c[..cdb.len()].copy_from_slice(cdb);
    let cmd = pdu::ScsiCommand {
        immediate: false,
        final_: false,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt,
        edtl,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
        cdb: c,
    };
    ini.cmd_sn += 1;
    Bhs::ScsiCommand(cmd)
}

fn unsolicited(itt: u32, data_sn: u32, offset: u32, final_: bool) -> Bhs {
    Bhs::DataOut(pdu::DataOut {
        final_,
        lun: 0,
        itt,
        ttt: RESERVED_TAG,
        exp_stat_sn: 0,
        data_sn,
        buffer_offset: offset,
    })
}

#[test]
fn unsolicited_data_past_what_the_command_needs_is_dropped() {
    // WRITE(10) of one 512-byte block, EDTL 16384: the initiator may send up to EDTL
    // unsolicited; the target keeps the block and drops the rest (this used to panic).
    let mut ini = Initiator::new();
    ini.normal_login(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
    let cmd = write_without_final(&mut ini, 5, &[0x2a, 0, 0, 0, 0, 4, 0, 0, 1, 0], 16384);
    assert!(ini.send(cmd, &[]).0.is_empty());
    assert!(ini
        .send(unsolicited(5, 0, 0, false), &[7; 8192])
        .0
        .is_empty());
    let (out, actions) = ini.send(unsolicited(5, 1, 8192, true), &[8; 4096]);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(actions.submit.len(), 1);
    let w = &actions.submit[0];
    assert_eq!(
        (w.op, w.offset, w.len),
        (Op::Write { fua: false }, 2048, 512)
    );
    assert_eq!(w.buf.as_ref().unwrap().as_slice(), &[7u8; 512]);
    let out = ini.complete(actions, 0);
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!("{out:?}")
    };
    assert_eq!(
        (r.status, r.residual),
        (0, pdu::Residual::Underflow(16384 - 512))
    );
}

#[test]
fn unsolicited_data_past_the_expected_length_fails_only_its_task() {
    let mut ini = Initiator::new();
    ini.normal_login(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
    let cmd = write_without_final(&mut ini, 6, &WRITE10_2, 1024);
    assert!(ini.send(cmd, &[]).0.is_empty());
    let (out, actions) = ini.send(unsolicited(6, 0, 512, true), &[1; 1024]);
    assert!(actions.submit.is_empty());
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!("{out:?}")
    };
    assert_eq!((r.status, out[0].1[2 + 12]), (2, 0x4b));
    let (out, _) = ini.command(7, 0, &[0x00], 0, false, &[]);
    assert!(matches!(&out[0].0, Bhs::ScsiResponse(r) if r.status == 0 && r.itt == 7));
}

#[test]
fn a_data_out_for_a_read_is_rejected_and_logout_still_completes() {
    let mut ini = Initiator::new();
    ini.normal_login(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
    let read16 = [0x88, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0];
    // The READ and a Data-Out with its ITT arrive in one send.
    let mut c = [0u8; 16];
    c.copy_from_slice(&read16);
    let cmd = pdu::ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: 0,
        itt: 8,
        edtl: 1024,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
        cdb: c,
    };
    ini.cmd_sn += 1;
    let mut bytes = Vec::new();
    pdu::encode(&Bhs::ScsiCommand(cmd), &[], &[], ini.digests, &mut bytes);
    pdu::encode(
        &unsolicited(8, 0, 0, true),
        &[],
        &[9; 512],
        ini.digests,
        &mut bytes,
    );
    let mut actions = Actions::default();
    let used = ini
        .session
        .receive(&bytes, &exports(), &mut actions)
        .unwrap();
    assert_eq!(used, bytes.len());
    let out = ini.decode(&actions.send);
    assert!(
        matches!(&out[0].0, Bhs::Reject(r) if r.reason == pdu::reject_reason::INVALID_PDU_FIELD),
        "{out:?}"
    );
    assert_eq!(actions.submit.len(), 1);
    assert_eq!(ini.session.in_flight(), 1);
    let done = logout_while_in_the_engine(&mut ini, actions.submit);
    let out = ini.decode(&done.send);
    assert!(matches!(&out[0].0, Bhs::DataIn(d) if d.status == Some(0) && d.itt == 8));
    assert!(matches!(&out[1].0, Bhs::LogoutResponse(r) if r.response == 0 && r.itt == 10));
    assert!(done.close);
    assert_eq!(ini.session.in_flight(), 0);
}

#[test]
fn a_256k_text_request_is_refused_at_once_with_a_reject() {
    let mut ini = Initiator::new();
    ini.normal_login(&[]);
    // 27,000 distinct keys (256 KiB): parsed pairwise this took seconds of reactor time.
    let text: Vec<u8> = (0..27_000)
        .flat_map(|i| format!("K{i:06}=v\0").into_bytes())
        .take(256 << 10)
        .collect();
    let req = pdu::TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt: 3,
        ttt: RESERVED_TAG,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
    };
    let start = Instant::now();
    let (out, _) = ini.send(Bhs::TextRequest(req), &text);
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(&out[0].0, Bhs::Reject(r) if r.reason == pdu::reject_reason::PROTOCOL_ERROR),
        "{out:?}"
    );
    let (out, _) = ini.command(4, 0, &[0x00], 0, false, &[]);
    assert!(matches!(&out[0].0, Bhs::ScsiResponse(r) if r.status == 0));
}

/// WRITE(16) of `blocks` at LBA 0 with the F bit set, no data: with InitialR2T=Yes an
/// accepted one gets R2Ts, a refused one its CHECK CONDITION.
fn write16_header(ini: &mut Initiator, itt: u32, blocks: u32, edtl: u32) -> Bhs {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    let cmd = pdu::ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt,
        edtl,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
        cdb,
    };
    ini.cmd_sn += 1;
    Bhs::ScsiCommand(cmd)
}

/// Sense key and ASC of a CHECK CONDITION answer.
fn check_condition(out: &[(Bhs, Vec<u8>)]) -> (u8, u8) {
    let Bhs::ScsiResponse(r) = &out[0].0 else {
        panic!("expected a SCSI Response, got {out:?}")
    };
    assert_eq!(r.status, 2);
    (out[0].1[2 + 2] & 0x0f, out[0].1[2 + 12])
}

#[test]
fn oversized_writes_are_refused_on_arrival_before_any_buffer_or_r2t() {
    let mut ini = Initiator::new();
    ini.normal_login(&[("InitialR2T", "Yes"), ("ImmediateData", "No")]);
    // 16 MiB past the end of the 1 MiB volume: LBA OUT OF RANGE, no R2T (it used to
    // allocate the buffer and ask for the data first).
    let cmd = write16_header(&mut ini, 1, 32 << 10, 16 << 20);
    let (out, _) = ini.send(cmd, &[]);
    assert_eq!(check_condition(&out), (0x05, 0x21));
    // 8M blocks with EDTL 0xffffffff: refused the same, nothing allocated.
    let cmd = write16_header(&mut ini, 2, 8 << 20, u32::MAX);
    let (out, _) = ini.send(cmd, &[]);
    assert_eq!(check_condition(&out), (0x05, 0x21));
    assert_eq!(ini.session.buffered(), 0);
    // PERSISTENT RESERVE OUT with a 4 GiB parameter list: INVALID FIELD IN CDB.
    let prout = [0x5f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0];
    let (out, _) = ini.command(3, 0, &prout, u32::MAX, true, &[]);
    assert_eq!(check_condition(&out), (0x05, 0x24));
    assert_eq!(ini.session.buffered(), 0);
}

#[test]
fn reads_past_the_session_allowance_wait_until_replies_drain() {
    let config = Arc::new(IscsiConfig::default());
    let budget = MemoryBudget::new(1 << 30);
    let mut ini = Initiator::named(&config, "iqn.2026-11.test:slow-reader");
    ini.session =
        IscsiSession::new(config.clone()).with_allowance(Allowance::new(budget.clone(), 256 << 10));
    ini.normal_login(&[("MaxRecvDataSegmentLength", "262144")]);
    // 16 READ(16)s of 64 KiB (1 MiB) in one send to a peer that reads nothing: the
    // driver's output buffer (`actions.send`) is never drained.
    let mut bytes = Vec::new();
    for itt in 0..16u32 {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&u64::from(itt * 128).to_be_bytes());
        cdb[10..14].copy_from_slice(&128u32.to_be_bytes());
        let cmd = pdu::ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attr: 1,
            lun: 0,
            itt,
            edtl: 64 << 10,
            cmd_sn: ini.cmd_sn,
            exp_stat_sn: 0,
            cdb,
        };
        ini.cmd_sn += 1;
        pdu::encode(&Bhs::ScsiCommand(cmd), &[], &[], ini.digests, &mut bytes);
    }
    let mut actions = Actions::default();
    let used = ini
        .session
        .receive(&bytes, &exports(), &mut actions)
        .unwrap();
    assert_eq!(used, bytes.len());
    let mut answered = Vec::new();
    let mut most = 0;
    for _ in 0..100 {
        let submitted: Vec<_> = actions.submit.drain(..).collect();
        if submitted.is_empty() {
            let waiting = actions.send.len() as u64;
            for (b, _) in ini.decode(&actions.send) {
                if let Bhs::DataIn(d) = b {
                    answered.push(d.itt);
                }
            }
            if answered.len() == 16 {
                break;
            }
            // Nothing more runs until the peer reads: a ping went out behind the replies,
            // and the peer answers it once it has read them.
            assert!(waiting > 256 << 10, "stalled with {waiting} bytes queued");
            let ping = ini
                .decode(&actions.send)
                .into_iter()
                .find_map(|(b, _)| match b {
                    Bhs::NopIn(n) if n.itt == RESERVED_TAG => Some(n.ttt),
                    _ => None,
                })
                .expect("a NOP-In ping behind the replies");
            actions.send.clear();
            let answer = pdu::NopOut {
                immediate: true,
                lun: 0,
                itt: RESERVED_TAG,
                ttt: ping,
                cmd_sn: ini.cmd_sn,
                exp_stat_sn: 0,
            };
            let mut bytes = Vec::new();
            pdu::encode(&Bhs::NopOut(answer), &[], &[], ini.digests, &mut bytes);
            ini.session
                .receive(&bytes, &exports(), &mut actions)
                .unwrap();
            continue;
        }
        let reads: u64 = submitted.iter().map(|r| r.len).sum();
        assert!(reads <= 256 << 10, "{reads} bytes of reads at once");
        for mut r in submitted {
            r.buf.as_mut().unwrap().as_mut_slice().fill(r.tag as u8);
            let c = Completion {
                tag: r.tag,
                result: Ok(()),
                buf: r.buf,
                extents: Vec::new(),
            };
            ini.session.complete(c, &mut actions);
            most = most.max(budget.used());
        }
    }
    // Read buffers and unread replies together within the allowance, counted on the
    // daemon's budget; every command answered, in order.
    assert!(most <= 256 << 10, "{most} bytes held");
    assert_eq!(answered, (0..16).collect::<Vec<_>>());
    ini.session.queued(0);
    assert_eq!(budget.used(), 0, "bytes held once every reply left");
}

#[test]
fn sessions_wait_for_the_daemons_budget_and_resume_when_another_gives_back() {
    let config = Arc::new(IscsiConfig::default());
    let budget = MemoryBudget::new(1 << 20);
    let mut hog = Allowance::new(budget.clone(), 1 << 20);
    assert!(hog.try_take(1 << 20));
    let mut ini = Initiator::named(&config, "iqn.2026-11.test:starved");
    ini.session =
        IscsiSession::new(config.clone()).with_allowance(Allowance::new(budget.clone(), 1 << 20));
    ini.normal_login(&[]);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[10..14].copy_from_slice(&16u32.to_be_bytes());
    let (_, actions) = ini.command(1, 0, &cdb, 8 << 10, false, &[]);
    assert!(actions.submit.is_empty(), "ran without memory");
    assert!(ini.session.waiting_for_memory());
    // Silence while the driver reads nothing for it is not the peer's: no ping timeout.
    let start = Instant::now();
    for s in [40, 80] {
        let mut a = Actions::default();
        ini.session
            .tick(start + Duration::from_secs(s), &mut a)
            .expect("not dropped while waiting for the daemon's memory");
    }
    drop(hog);
    let mut actions = Actions::default();
    ini.session.receive(&[], &exports(), &mut actions).unwrap();
    assert_eq!(actions.submit.len(), 1, "runs once memory came back");
    assert!(!ini.session.waiting_for_memory());
}
