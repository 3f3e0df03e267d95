//! A stream fuzzer for the iSCSI session state machine (issue 14, "Fuzzing"): after a
//! login with random operational keys, arbitrary sequences of valid-looking PDUs (SCSI
//! commands with random CDBs, lengths and flags, Data-Out with random ITTs, TTTs, DataSNs
//! and offsets, NOP-Out, task management, Text, Logout) and raw bytes, cut into random
//! chunks, interleaved with engine completions (some failing), output drains and ticks.
//!
//! Each case checks: no panic; the session's engine requests in flight are exactly those
//! not completed yet; its buffered bytes stay within the budget plus one command and the
//! data that may come before admission; and at the end, with every request completed, a
//! reset and a Logout close the session with nothing left behind (no hang, no leaked task).
//!
//! `cargo test --release -p tessel-targets stream_fuzz` runs 256 cases; a long run:
//! `TESSEL_FUZZ_CASES=200000 cargo test --release -p tessel-targets stream_fuzz`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tessel_engine::{Completion, IoError, Request};

use super::pdu::{self, Bhs, RESERVED_TAG};
use super::scsi::MAX_TRANSFER_BYTES;
use super::tests::{exports, Initiator};
use super::{IscsiConfig, IscsiSession, State};
use crate::budget::{Allowance, MemoryBudget};
use crate::export::Actions;

/// The fuzzed sessions' allowance: small, so that commands wait for it.
const BUDGET: u64 = 64 << 10;
/// The most a session may hold (buffers, unsent Data-In): the allowance, one command
/// admitted past it (data-out and engine buffer, 8 MiB each at most), and the
/// FirstBurstLength (256 KiB at most) each of the 128 commands of the CmdSN window may
/// send before admission (a driver bounds that by reading no input while commands wait).
const MOST_BUFFERED: u64 = BUDGET + 2 * MAX_TRANSFER_BYTES + 128 * (256 << 10);

/// What the fuzzed initiator does next.
#[derive(Clone, Debug)]
enum Step {
    Command {
        itt: u32,
        lun: u16,
        cdb: [u8; 16],
        edtl: u32,
        flags: u8,
        cmd_sn_skew: i8,
        immediate: bool,
        data: usize,
    },
    DataOut {
        itt: u32,
        /// 0: unsolicited (TTT 0xffffffff); n: the TTT of the n-th R2T seen, if any.
        r2t: usize,
        data_sn: u32,
        offset: Option<u32>,
        data: usize,
        last: bool,
    },
    Nop(usize),
    TaskManagement {
        function: u8,
        rtt: u32,
    },
    Text(usize),
    Logout,
    Garbage(Vec<u8>),
    /// Complete this many engine requests, the `failing`-th of them with an error.
    Complete {
        count: usize,
        failing: usize,
    },
    /// The peer read what was sent.
    Drain,
    Tick(u64),
}

fn cdb() -> impl Strategy<Value = [u8; 16]> {
    let opcodes = prop::sample::select(vec![
        0x00u8, 0x08, 0x0a, 0x12, 0x28, 0x2a, 0x2e, 0x2f, 0x35, 0x41, 0x42, 0x55, 0x5f, 0x88, 0x89,
        0x8a, 0x8f, 0x93, 0x9e, 0xa0, 0xa8, 0xaa, 0x5e, 0x15, 0x16,
    ]);
    (opcodes, any::<[u8; 16]>(), any::<bool>()).prop_map(|(op, mut c, small)| {
        c[0] = op;
        if small {
            // Small LBAs and lengths: commands that run rather than fail their checks.
            c[1] = 0;
            c[2..6].fill(0);
            c[6..9].fill(0);
            c[9] &= 0x3f;
            c[10..13].fill(0);
            c[13] &= 0x3f;
        }
        c
    })
}

fn edtl() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(512),
        Just(4096),
        Just(16384),
        Just(65536),
        0u32..70_000,
        any::<u32>(),
    ]
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(512), Just(4096), 0usize..9000]
}

fn step() -> impl Strategy<Value = Step> {
    let itt = 0u32..6;
    prop_oneof![
        6 => (itt.clone(), 0u16..3, cdb(), edtl(), any::<u8>(), -2i8..3, any::<bool>(), length())
            .prop_map(|(itt, lun, cdb, edtl, flags, cmd_sn_skew, immediate, data)| {
                Step::Command { itt, lun, cdb, edtl, flags, cmd_sn_skew, immediate, data }
            }),
        5 => (itt.clone(), 0usize..4, 0u32..4, prop::option::of(prop_oneof![
                Just(0u32), Just(512), Just(8192), 0u32..70_000, any::<u32>()
            ]), length(), any::<bool>())
            .prop_map(|(itt, r2t, data_sn, offset, data, last)| {
                Step::DataOut { itt, r2t, data_sn, offset, data, last }
            }),
        1 => (0usize..600).prop_map(Step::Nop),
        1 => (0u8..10, 0u32..6).prop_map(|(function, rtt)| Step::TaskManagement { function, rtt }),
        1 => (0usize..70_000).prop_map(Step::Text),
        1 => Just(Step::Logout),
        1 => prop::collection::vec(any::<u8>(), 1..120).prop_map(Step::Garbage),
        5 => (1usize..6, 0usize..12).prop_map(|(count, failing)| Step::Complete { count, failing }),
        2 => Just(Step::Drain),
        1 => (0u64..40).prop_map(Step::Tick),
    ]
}

/// Operational keys of the login: every combination of the data transfer rules.
fn keys() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    (
        prop::sample::select(vec!["Yes", "No"]),
        prop::sample::select(vec!["Yes", "No"]),
        prop::sample::select(vec!["512", "262144"]),
        prop::sample::select(vec!["512", "65536"]),
        prop::sample::select(vec!["1", "4"]),
        prop::sample::select(vec!["512", "262144"]),
    )
        .prop_map(|(r2t, imm, burst, first, outstanding, mrdsl)| {
            vec![
                ("InitialR2T", r2t),
                ("ImmediateData", imm),
                ("MaxBurstLength", burst),
                ("FirstBurstLength", first),
                ("MaxOutstandingR2T", outstanding),
                ("MaxRecvDataSegmentLength", mrdsl),
            ]
        })
}

/// The fuzzed initiator and what it knows of the target's answers.
struct Fuzz {
    ini: Initiator,
    actions: Actions,
    /// Engine requests submitted and not completed, oldest first.
    outstanding: VecDeque<Request>,
    /// ITTs and TTTs of the R2Ts received.
    ttts: Vec<(u32, u32)>,
    /// Bytes of `actions.send` already looked at.
    seen: usize,
    start: Instant,
}

impl Fuzz {
    fn feed(&mut self, bytes: &[u8], cuts: &[usize]) -> bool {
        let mut pending = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&bytes.len()]) {
            let end = cut.clamp(at, bytes.len());
            pending.extend_from_slice(&bytes[at..end]);
            at = end;
            match self
                .ini
                .session
                .receive(&pending, &exports(), &mut self.actions)
            {
                Ok(used) => {
                    pending.drain(..used);
                }
                Err(_) => return false,
            }
            self.collect();
        }
        true
    }

    /// Takes the submitted requests and notes the R2Ts sent.
    fn collect(&mut self) {
        self.outstanding.extend(self.actions.submit.drain(..));
        let new = &self.actions.send[self.seen..];
        self.seen = self.actions.send.len();
        for (b, _) in self.ini.decode(new) {
            if let Bhs::R2t(r) = b {
                self.ttts.push((r.itt, r.ttt));
            }
        }
    }

    fn complete(&mut self, count: usize, failing: usize) {
        for i in 0..count {
            let Some(r) = self.outstanding.pop_front() else {
                return;
            };
            let result = if i == failing {
                Err(IoError::NoSpace)
            } else {
                Ok(())
            };
            let c = Completion {
                tag: r.tag,
                result,
                buf: r.buf,
                extents: Vec::new(),
            };
            self.ini.session.complete(c, &mut self.actions);
            self.collect();
        }
    }

    fn drain(&mut self) {
        self.collect();
        self.actions.send.clear();
        self.ini.session.queued(0);
        self.seen = 0;
    }

    fn check(&self) {
        assert_eq!(self.ini.session.in_flight(), self.outstanding.len());
        let held = self.ini.session.buffered();
        assert!(held <= MOST_BUFFERED, "{held} bytes buffered");
    }

    /// The bytes of one step (None: not a PDU step).
    fn encode(&mut self, step: &Step) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let digests = self.ini.digests;
        let cmd_sn = self.ini.cmd_sn;
        let bhs = match step.clone() {
            Step::Command {
                itt,
                lun,
                cdb,
                edtl,
                flags,
                cmd_sn_skew,
                immediate,
                data,
            } => {
                let sn = cmd_sn.wrapping_add_signed(i32::from(cmd_sn_skew));
                if !immediate && cmd_sn_skew == 0 {
                    self.ini.cmd_sn += 1;
                }
                let cmd = pdu::ScsiCommand {
                    immediate,
                    final_: flags & 0x80 != 0,
                    read: flags & 0x40 != 0,
                    write: flags & 0x20 != 0,
                    attr: flags & 7,
                    lun: pdu::lun_field(lun),
                    itt,
                    edtl,
                    cmd_sn: sn,
                    exp_stat_sn: 0,
                    cdb,
                };
                pdu::encode(
                    &Bhs::ScsiCommand(cmd),
                    &[],
                    &vec![0x5a; data],
                    digests,
                    &mut out,
                );
                return Some(out);
            }
            Step::DataOut {
                itt,
                r2t,
                data_sn,
                offset,
                data: _,
                last,
            } => {
                let (itt, ttt) = match r2t.checked_sub(1).and_then(|n| self.ttts.get(n)) {
                    Some(&(itt, ttt)) => (itt, ttt),
                    None => (itt, RESERVED_TAG),
                };
                Bhs::DataOut(pdu::DataOut {
                    final_: last,
                    lun: 0,
                    itt,
                    ttt,
                    exp_stat_sn: 0,
                    data_sn,
                    buffer_offset: offset.unwrap_or(data_sn * 512),
                })
            }
            Step::Nop(len) => {
                let nop = pdu::NopOut {
                    immediate: true,
                    lun: 0,
                    itt: 100,
                    ttt: RESERVED_TAG,
                    cmd_sn,
                    exp_stat_sn: 0,
                };
                pdu::encode(&Bhs::NopOut(nop), &[], &vec![1; len], digests, &mut out);
                return Some(out);
            }
            Step::TaskManagement { function, rtt } => Bhs::TaskMgmtRequest(pdu::TaskMgmtRequest {
                immediate: true,
                function,
                lun: 0,
                itt: 101,
                rtt,
                cmd_sn,
                exp_stat_sn: 0,
                ref_cmd_sn: cmd_sn.wrapping_sub(1),
                exp_data_sn: 0,
            }),
            Step::Text(len) => {
                let text: Vec<u8> = (0..)
                    .flat_map(|i: u32| format!("K{i}=v\0").into_bytes())
                    .take(len)
                    .collect();
                let req = pdu::TextRequest {
                    immediate: true,
                    final_: true,
                    cont: false,
                    lun: 0,
                    itt: 102,
                    ttt: RESERVED_TAG,
                    cmd_sn,
                    exp_stat_sn: 0,
                };
                pdu::encode(&Bhs::TextRequest(req), &[], &text, digests, &mut out);
                return Some(out);
            }
            Step::Logout => Bhs::LogoutRequest(pdu::LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 103,
                cid: 0,
                cmd_sn,
                exp_stat_sn: 0,
            }),
            Step::Garbage(bytes) => return Some(bytes),
            Step::Complete { .. } | Step::Drain | Step::Tick(_) => return None,
        };
        let data = match step {
            Step::DataOut { data, .. } => vec![0xa5; *data],
            _ => Vec::new(),
        };
        pdu::encode(&bhs, &[], &data, digests, &mut out);
        Some(out)
    }

    /// Completes everything, resets, logs out: the session must close with nothing left.
    fn finish(&mut self) {
        for _ in 0..1000 {
            if self.outstanding.is_empty() {
                break;
            }
            self.complete(self.outstanding.len(), usize::MAX);
            self.drain();
            let _ = self.ini.session.receive(&[], &exports(), &mut self.actions);
            self.collect();
        }
        assert!(self.outstanding.is_empty(), "requests keep coming");
        self.check();
        if !matches!(self.ini.session.state(), State::FullFeature) {
            return;
        }
        self.drain();
        let reset = self.encode(&Step::TaskManagement {
            function: 6,
            rtt: RESERVED_TAG,
        });
        let logout = self.encode(&Step::Logout);
        let bytes = [reset.unwrap(), logout.unwrap()].concat();
        assert!(self.feed(&bytes, &[]), "reset and logout refused");
        assert!(self.outstanding.is_empty());
        let out = self.ini.decode(&self.actions.send);
        assert!(
            out.iter()
                .any(|(b, _)| matches!(b, Bhs::LogoutResponse(r) if r.response == 0)),
            "no Logout Response: {out:?}"
        );
        assert!(matches!(self.ini.session.state(), State::Closed));
        assert!(self.ini.session.tasks.is_empty() && self.ini.session.by_itt.is_empty());
        assert_eq!(self.ini.session.buffered(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::fuzz_cases(), ..ProptestConfig::default() })]

    #[test]
    fn stream_fuzz_session_never_panics_leaks_or_hangs(
        keys in keys(),
        steps in prop::collection::vec((step(), prop::collection::vec(0usize..20_000, 0..3)), 1..40),
    ) {
        let config = Arc::new(IscsiConfig {
            nop_interval_secs: 5,
            nop_timeout_secs: 30,
            ..IscsiConfig::default()
        });
        let mut f = Fuzz {
            ini: Initiator::named(&config, "iqn.2026-11.test:fuzz"),
            actions: Actions::default(),
            outstanding: VecDeque::new(),
            ttts: Vec::new(),
            seen: 0,
            start: Instant::now(),
        };
        let budget = MemoryBudget::new(1 << 40);
        f.ini.session = IscsiSession::new(config.clone())
            .with_allowance(Allowance::new(budget.clone(), BUDGET));
        f.ini.normal_login(&keys);
        for (step, cuts) in &steps {
            let alive = match step {
                Step::Complete { count, failing } => {
                    f.complete(*count, *failing);
                    true
                }
                Step::Drain => {
                    f.drain();
                    f.ini.session.receive(&[], &exports(), &mut f.actions).is_ok()
                }
                Step::Tick(secs) => {
                    let now = f.start + Duration::from_secs(*secs);
                    let ok = f.ini.session.tick(now, &mut f.actions).is_ok();
                    f.collect();
                    ok
                }
                _ => {
                    let bytes = f.encode(step).expect("a PDU step");
                    f.feed(&bytes, cuts)
                }
            };
            f.check();
            if !alive {
                break;
            }
        }
        f.finish();
        drop(f);
        prop_assert_eq!(budget.used(), 0, "bytes held after the session ended");
    }
}
