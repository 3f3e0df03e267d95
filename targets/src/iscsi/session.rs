//! One iSCSI connection (and its single-connection session): the state machine
//! Login → FullFeature → LoggingOut → Closed, the CmdSN window and StatSN, NOP-In/NOP-Out,
//! task management, text (SendTargets), logout and Reject. SCSI tasks live in `task.rs`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessel_engine::Completion;

use super::discovery;
use super::login::{Login, LoginReply, LoginStatus, SessionKind};
use super::negotiate::Params;
use super::pdu::{self, reject_reason, Bhs, Digests, Frame, RESERVED_TAG};
use super::scsi::{Lun, Nexus};
use super::task::Task;
use super::text::TextPairs;
use super::{IscsiConfig, IscsiError};
use crate::budget::Allowance;
use crate::export::{Actions, Exports};

/// Commands the initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1).
pub(super) const CMD_WINDOW: u32 = 128;

/// Session identifying handles, unique in this process.
static NEXT_TSIH: AtomicU16 = AtomicU16::new(1);

/// Where the connection is in its life.
#[derive(Debug)]
pub enum State {
    /// Login in progress.
    Login(Box<Login>),
    /// Commands flow.
    FullFeature,
    /// A logout arrived; its response waits for the tasks still in the engine.
    LoggingOut { itt: u32 },
    /// Nothing more is sent or accepted.
    Closed,
}

/// Our NOP-In ping waiting for its NOP-Out.
#[derive(Debug, Clone, Copy)]
struct Ping {
    ttt: u32,
    /// When it was sent, as the first tick after it saw it (`receive` has no clock).
    sent: Option<Instant>,
}

/// A Text Response too long for one PDU, sent piece by piece.
#[derive(Debug)]
struct PendingText {
    itt: u32,
    ttt: u32,
    rest: Vec<u8>,
}

/// One iSCSI connection's protocol state; see the crate docs for the sans-IO contract.
#[derive(Debug)]
pub struct IscsiSession {
    pub(super) config: Arc<IscsiConfig>,
    pub(super) state: State,
    pub(super) kind: Option<SessionKind>,
    pub(super) initiator: String,
    pub(super) params: Params,
    pub(super) digests: Digests,
    pub(super) isid: [u8; 6],
    /// The I_T nexus of a logged-in session (reservations are held per nexus).
    pub(super) nexus: Nexus,
    pub(super) tsih: u16,
    pub(super) stat_sn: u32,
    pub(super) exp_cmd_sn: u32,
    /// CmdSNs received ahead of ExpCmdSN (a gap not yet filled).
    ahead: BTreeSet<u32>,
    pub(super) luns: Vec<Lun>,
    pub(super) tasks: HashMap<u64, Task>,
    pub(super) by_itt: HashMap<u32, u64>,
    pub(super) next_task: u64,
    pub(super) next_ttt: u32,
    pub(super) in_flight: usize,
    /// Tasks not admitted yet, oldest first (see `admit_waiting`).
    pub(super) waiting: VecDeque<u64>,
    /// Data buffers the session may hold (write data, read data, Data-In not yet sent):
    /// the connection's share of the daemon's memory budget.
    pub(super) allowance: Allowance,
    /// Bytes of `allowance` the admitted tasks hold (data-out, engine buffers).
    pub(super) charged: u64,
    /// Bytes of `allowance` held by Data-In queued for the peer and not sent yet.
    pub(super) unsent: u64,
    ping: Option<Ping>,
    heard: bool,
    last_heard: Option<Instant>,
    text: Option<PendingText>,
}

/// Serial number arithmetic (RFC 1982) distance from `from` to `to`.
pub(super) fn sn_diff(to: u32, from: u32) -> i32 {
    to.wrapping_sub(from) as i32
}

impl IscsiSession {
    /// A session for a freshly accepted connection.
    pub fn new(config: Arc<IscsiConfig>) -> IscsiSession {
        IscsiSession {
            config,
            state: State::Login(Box::default()),
            kind: None,
            initiator: String::new(),
            params: Params::default(),
            digests: Digests::default(),
            isid: [0; 6],
            nexus: Nexus {
                initiator: String::new(),
                isid: [0; 6],
            },
            tsih: 0,
            stat_sn: 1,
            exp_cmd_sn: 0,
            ahead: BTreeSet::new(),
            luns: Vec::new(),
            tasks: HashMap::new(),
            by_itt: HashMap::new(),
            next_task: 1,
            next_ttt: 1,
            in_flight: 0,
            waiting: VecDeque::new(),
            allowance: Allowance::unlimited(),
            charged: 0,
            unsent: 0,
            ping: None,
            heard: false,
            last_heard: None,
            text: None,
        }
    }

    /// Hold data buffers within `allowance` (the default has no limit).
    pub fn with_allowance(mut self, allowance: Allowance) -> IscsiSession {
        self.allowance = allowance;
        self
    }

    /// True while commands wait for memory: the driver should read no more input (the
    /// data of commands not admitted yet would pile up) and call `receive`, with or
    /// without input, once bytes may have come back.
    pub fn waiting_for_memory(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The driver still has `bytes` queued to send: Data-In beyond that has left, and
    /// its bytes go back to the allowance.
    pub fn queued(&mut self, bytes: usize) {
        let left = self.unsent.min(bytes as u64);
        self.allowance.give(self.unsent - left);
        self.unsent = left;
    }

    /// The connection's state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Engine requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The initiator's IQN; empty until the login finished.
    pub fn initiator(&self) -> &str {
        &self.initiator
    }

    /// For a logged-in normal session: the target's IQN and the volume behind LUN 0.
    pub fn target(&self) -> Option<(&str, tessel_engine::VolumeId)> {
        match (&self.state, &self.kind) {
            (State::Login(_), _) => None,
            (
                _,
                Some(SessionKind::Normal {
                    volume,
                    target_name,
                }),
            ) => {
                let lun = self.luns.iter().find(|l| l.export.name == *volume)?;
                Some((target_name.as_str(), lun.export.volume))
            }
            _ => None,
        }
    }

    /// Feeds received bytes; returns how many were consumed (the driver keeps the rest and
    /// calls again with more). Err is fatal: send `actions.send`, then close.
    pub fn receive(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<usize, IscsiError> {
        let mut used = 0;
        while used < input.len() {
            if matches!(self.state, State::Closed) {
                return Ok(input.len());
            }
            let rest = &input[used..];
            if rest.len() >= pdu::BHS_LEN {
                let header: &[u8; pdu::BHS_LEN] =
                    rest[..pdu::BHS_LEN].try_into().expect("48 bytes");
                let len = pdu::data_segment_length(header);
                let max = self.params.max_recv_data_segment_length.max(8192) as usize;
                if len > max {
                    self.state = State::Closed;
                    return Err(IscsiError::DataSegmentTooLong { len, max });
                }
            }
            let frame = match pdu::frame(rest, self.digests) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.state = State::Closed;
                    return Err(e.into());
                }
            };
            used += frame.len;
            self.heard = true;
            if let Err(e) = self.dispatch(&frame, exports, actions) {
                self.state = State::Closed;
                return Err(e);
            }
        }
        // Also with no input: the driver may call after its output drained.
        self.admit_waiting(actions);
        Ok(used)
    }

    fn dispatch(
        &mut self,
        frame: &Frame<'_>,
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<(), IscsiError> {
        let bhs = Bhs::decode(&frame.header);
        if let State::Login(_) = self.state {
            return match bhs? {
                Bhs::LoginRequest(req) => self.login(&req, frame.data, exports, actions),
                other => Err(IscsiError::Protocol(format!(
                    "opcode {:#04x} before login completed",
                    other.opcode()
                ))),
            };
        }
        let bhs = match bhs {
            Ok(b) => b,
            Err(_) => {
                self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &frame.header, actions);
                return Ok(());
            }
        };
        if !frame.data_digest_ok {
            self.reject(reject_reason::DATA_DIGEST_ERROR, &frame.header, actions);
            return Ok(());
        }
        if let State::LoggingOut { .. } = self.state {
            if !matches!(bhs, Bhs::DataOut(_) | Bhs::NopOut(_)) {
                self.reject(reject_reason::WAITING_FOR_LOGOUT, &frame.header, actions);
                return Ok(());
            }
        }
        match bhs {
            Bhs::ScsiCommand(cmd) => {
                if self.accept_cmd_sn(cmd.cmd_sn, cmd.immediate) {
                    self.scsi_command(&cmd, frame.data, exports, actions)?;
                }
            }
            Bhs::DataOut(d) => self.data_out(&d, &frame.header, frame.data, actions),
            Bhs::NopOut(n) => {
                if n.itt == RESERVED_TAG {
                    // The answer to our ping (never consumes a CmdSN: it must be immediate).
                    if self.ping.is_some_and(|p| p.ttt == n.ttt) {
                        self.ping = None;
                    }
                } else if self.accept_cmd_sn(n.cmd_sn, n.immediate) {
                    let reply = pdu::NopIn {
                        lun: n.lun,
                        itt: n.itt,
                        ttt: RESERVED_TAG,
                        stat_sn: self.next_stat_sn(),
                        exp_cmd_sn: self.exp_cmd_sn,
                        max_cmd_sn: self.max_cmd_sn(),
                    };
                    self.send(&Bhs::NopIn(reply), frame.data, actions);
                }
            }
            Bhs::TaskMgmtRequest(t) => {
                if self.accept_cmd_sn(t.cmd_sn, t.immediate) {
                    self.task_management(&t, actions);
                }
            }
            Bhs::TextRequest(t) => {
                if self.accept_cmd_sn(t.cmd_sn, t.immediate) {
                    self.text_request(&t, &frame.header, frame.data, exports, actions);
                }
            }
            Bhs::LogoutRequest(l) => {
                if self.accept_cmd_sn(l.cmd_sn, l.immediate) {
                    self.logout(&l, actions);
                }
            }
            Bhs::LoginRequest(_) => {
                return Err(IscsiError::Protocol(
                    "Login Request in full feature phase".into(),
                ))
            }
            Bhs::Snack(_) => self.reject(reject_reason::PROTOCOL_ERROR, &frame.header, actions),
            _ => self.reject(reject_reason::PROTOCOL_ERROR, &frame.header, actions),
        }
        Ok(())
    }

    /// The CmdSN window: true when the command is to be executed (RFC 7143 4.2.2.1).
    fn accept_cmd_sn(&mut self, cmd_sn: u32, immediate: bool) -> bool {
        if immediate {
            return true;
        }
        let d = sn_diff(cmd_sn, self.exp_cmd_sn);
        if d < 0 || d >= CMD_WINDOW as i32 || self.ahead.contains(&cmd_sn) {
            return false;
        }
        if d == 0 {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            while self.ahead.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            }
        } else {
            self.ahead.insert(cmd_sn);
        }
        true
    }

    pub(super) fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1)
    }

    /// The StatSN of a status-bearing PDU; advances the counter.
    pub(super) fn next_stat_sn(&mut self) -> u32 {
        let sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        sn
    }

    pub(super) fn send(&self, bhs: &Bhs, data: &[u8], actions: &mut Actions) {
        pdu::encode(bhs, &[], data, self.digests, &mut actions.send);
    }

    pub(super) fn reject(
        &mut self,
        reason: u8,
        header: &[u8; pdu::BHS_LEN],
        actions: &mut Actions,
    ) {
        let r = pdu::Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
        };
        self.send(&Bhs::Reject(r), header, actions);
    }

    fn login(
        &mut self,
        req: &pdu::LoginRequest,
        data: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<(), IscsiError> {
        let State::Login(login) = &mut self.state else {
            unreachable!("login() outside the login state");
        };
        self.isid = req.isid;
        self.exp_cmd_sn = req.cmd_sn;
        let result = login.step(req, data, &self.config, exports);
        let initiator = login.initiator().unwrap_or_default().to_string();
        let kind = login.kind().cloned();
        let params = login.negotiator().map(|n| n.params.clone());
        let (reply, status) = match result {
            Ok(r) => (r, LoginStatus(0, 0)),
            Err(s) => (
                LoginReply {
                    csg: req.csg,
                    nsg: req.nsg,
                    ..LoginReply::default()
                },
                s,
            ),
        };
        let full_feature =
            status.0 == 0 && reply.transit && reply.nsg == super::login::FULL_FEATURE;
        if full_feature {
            self.tsih = NEXT_TSIH.fetch_add(1, Ordering::Relaxed).max(1);
        }
        let resp = pdu::LoginResponse {
            transit: reply.transit,
            cont: false,
            csg: reply.csg,
            nsg: reply.nsg,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: self.tsih,
            itt: req.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            status_class: status.0,
            status_detail: status.1,
        };
        self.send(&Bhs::LoginResponse(resp), &reply.keys.encode(), actions);
        if status.0 != 0 {
            actions.close = true;
            return Err(IscsiError::LoginFailed {
                class: status.0,
                detail: status.1,
            });
        }
        if full_feature {
            let params = params.unwrap_or_default();
            self.digests = Digests {
                header: params.header_digest,
                data: params.data_digest,
            };
            self.params = params;
            self.nexus = Nexus {
                initiator: initiator.clone(),
                isid: self.isid,
            };
            self.initiator = initiator;
            if let Some(SessionKind::Normal { volume, .. }) = &kind {
                self.refresh_luns(volume, exports);
            }
            self.kind = kind;
            self.state = State::FullFeature;
        }
        Ok(())
    }

    /// Brings the LUN table up to date: LUN 0 the volume, then its snapshots. LUN numbers
    /// already handed out in this session keep their export.
    pub(super) fn refresh_luns(&mut self, volume: &str, exports: &dyn Exports) {
        let target = self.config.target_name(volume);
        let prefix = format!("{volume}@");
        for e in exports.list() {
            if (e.name == volume || e.name.starts_with(&prefix))
                && !self.luns.iter().any(|l| l.export.name == e.name)
            {
                let number = self.luns.len() as u16;
                self.luns.push(Lun::new(e, number, &target));
            }
        }
    }

    fn text_request(
        &mut self,
        t: &pdu::TextRequest,
        header: &[u8; pdu::BHS_LEN],
        data: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) {
        let body = match self.text.take() {
            Some(p) if p.itt == t.itt && p.ttt == t.ttt => p.rest,
            _ => {
                let keys = match TextPairs::parse(data) {
                    Ok(keys) => keys,
                    Err(e) => {
                        tracing::debug!(itt = t.itt, "iSCSI Text Request refused: {e}");
                        self.reject(reject_reason::PROTOCOL_ERROR, header, actions);
                        return;
                    }
                };
                let current = match &self.kind {
                    Some(SessionKind::Normal { volume, .. }) => Some(volume.as_str()),
                    _ => None,
                };
                let mut out = TextPairs::default();
                for (k, v) in &keys.0 {
                    if k == "SendTargets" {
                        let found = discovery::send_targets(
                            v,
                            &self.initiator,
                            current,
                            &self.config,
                            exports,
                        );
                        out.0.extend(found.0);
                    } else {
                        out.push(k.clone(), "NotUnderstood");
                    }
                }
                out.encode()
            }
        };
        let max = self.params.peer_max_recv_data_segment_length as usize;
        let (now, rest) = body.split_at(body.len().min(max));
        let more = !rest.is_empty();
        let ttt = if more { self.new_ttt() } else { RESERVED_TAG };
        if more {
            self.text = Some(PendingText {
                itt: t.itt,
                ttt,
                rest: rest.to_vec(),
            });
        }
        let resp = pdu::TextResponse {
            final_: !more,
            cont: more,
            lun: t.lun,
            itt: t.itt,
            ttt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        self.send(&Bhs::TextResponse(resp), now, actions);
    }

    pub(super) fn new_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    fn task_management(&mut self, t: &pdu::TaskMgmtRequest, actions: &mut Actions) {
        const COMPLETE: u8 = 0;
        const NO_TASK: u8 = 1;
        const NO_LUN: u8 = 2;
        const NO_REASSIGN: u8 = 4;
        const NOT_SUPPORTED: u8 = 5;
        let lun = pdu::lun_number(t.lun);
        let lun_exists = lun.is_some_and(|n| usize::from(n) < self.luns.len());
        let response = match t.function {
            // ABORT TASK
            1 => match self.by_itt.get(&t.rtt).copied() {
                Some(id) => {
                    self.abort(id);
                    COMPLETE
                }
                // Not received yet (its CmdSN is still ahead): it is as good as aborted.
                None if sn_diff(t.ref_cmd_sn, self.exp_cmd_sn) >= 0 => COMPLETE,
                None => NO_TASK,
            },
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 4 | 5 if !lun_exists => NO_LUN,
            2 | 4 | 5 => {
                self.abort_where(|task| pdu::lun_number(task.lun) == lun);
                if t.function == 5 {
                    for l in self.luns.iter_mut().filter(|l| Some(l.number) == lun) {
                        l.descriptor_sense = false;
                        self.config.reservations.reset(l.id);
                    }
                }
                COMPLETE
            }
            // TARGET WARM RESET, TARGET COLD RESET
            6 | 7 => {
                self.abort_where(|_| true);
                for l in self.luns.iter_mut() {
                    l.descriptor_sense = false;
                    self.config.reservations.reset(l.id);
                }
                COMPLETE
            }
            8 => NO_REASSIGN,
            _ => NOT_SUPPORTED,
        };
        let resp = pdu::TaskMgmtResponse {
            response,
            itt: t.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        self.send(&Bhs::TaskMgmtResponse(resp), &[], actions);
        if t.function == 7 {
            // A cold reset drops every connection of the target; ours is the only one.
            actions.close = true;
            self.state = State::Closed;
        }
    }

    fn abort_where(&mut self, pred: impl Fn(&Task) -> bool) {
        let ids: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.aborted && pred(t))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.abort(id);
        }
    }

    /// Ends a task without a response; engine requests in flight cannot be recalled, so
    /// the task lingers (aborted) until they complete and their completions are dropped.
    fn abort(&mut self, id: u64) {
        if let Some(task) = self.tasks.get_mut(&id) {
            task.aborted = true;
            self.by_itt.remove(&task.itt);
            if task.pending == 0 {
                self.remove_task(id);
            }
        }
    }

    fn logout(&mut self, l: &pdu::LogoutRequest, actions: &mut Actions) {
        if l.reason == 2 {
            // Removing a connection for recovery needs ERL 2.
            self.logout_response(l.itt, 2, actions);
            return;
        }
        self.config.reservations.nexus_lost(&self.nexus);
        self.state = State::LoggingOut { itt: l.itt };
        self.finish_logout(actions);
    }

    /// Sends the pending logout response once no task is left in the engine.
    pub(super) fn finish_logout(&mut self, actions: &mut Actions) {
        if let State::LoggingOut { itt } = self.state {
            if self.tasks.values().all(|t| t.aborted) && self.in_flight == 0 {
                self.logout_response(itt, 0, actions);
                actions.close = true;
                self.state = State::Closed;
            }
        }
    }

    fn logout_response(&mut self, itt: u32, response: u8, actions: &mut Actions) {
        let resp = pdu::LogoutResponse {
            response,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            time2wait: 0,
            time2retain: 0,
        };
        self.send(&Bhs::LogoutResponse(resp), &[], actions);
    }

    /// Feeds an engine completion for a request this session submitted.
    pub fn complete(&mut self, completion: Completion, actions: &mut Actions) {
        self.task_completion(completion, actions);
        self.admit_waiting(actions);
        self.finish_logout(actions);
    }

    /// Called about once a second: pings an idle initiator, and fails when a ping went
    /// unanswered for `nop_timeout_secs`.
    pub fn tick(&mut self, now: Instant, actions: &mut Actions) -> Result<(), IscsiError> {
        // Commands that wait for the daemon's memory, not for this session's own buffers
        // or unread replies: the driver reads no input meanwhile, so silence is ours, and
        // a pending ping's answer may be unread.
        let waiting_on_daemon = self.waiting_for_memory() && self.charged == 0 && self.unsent == 0;
        if waiting_on_daemon {
            self.heard = true;
            if let Some(p) = self.ping.as_mut() {
                p.sent = Some(now);
            }
        }
        if self.heard || self.last_heard.is_none() {
            self.heard = false;
            self.last_heard = Some(now);
        }
        // Replies may have drained since the last call: waiting tasks get another chance.
        self.admit_waiting(actions);
        if !matches!(self.state, State::FullFeature) || self.config.nop_interval_secs == 0 {
            return Ok(());
        }
        if let Some(p) = self.ping.as_mut() {
            let sent = *p.sent.get_or_insert(now);
            if now.duration_since(sent) >= Duration::from_secs(self.config.nop_timeout_secs.into())
            {
                self.state = State::Closed;
                return Err(IscsiError::PingTimeout);
            }
            return Ok(());
        }
        let idle = now.duration_since(self.last_heard.unwrap_or(now));
        if idle >= Duration::from_secs(self.config.nop_interval_secs.into()) {
            self.ping(Some(now), actions);
        }
        Ok(())
    }

    /// Sends a NOP-In ping unless one is already out. Besides keep-alives, tasks waiting
    /// for replies to drain use it: its NOP-Out comes once the initiator has read all that
    /// was queued before it, and that input lets them run.
    pub(super) fn ping(&mut self, sent: Option<Instant>, actions: &mut Actions) {
        if self.ping.is_some() {
            return;
        }
        let ttt = self.new_ttt();
        let ping = pdu::NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        self.send(&Bhs::NopIn(ping), &[], actions);
        self.ping = Some(Ping { ttt, sent });
    }

    /// The daemon is stopping: tell the initiator the connection will drop, then close.
    /// Completions still in flight are dropped when they arrive.
    pub fn shut_down(&mut self, actions: &mut Actions) {
        if matches!(self.state, State::FullFeature | State::LoggingOut { .. }) {
            let msg = pdu::AsyncMessage {
                lun: 0,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                event: 2, // the target will drop this connection
                vcode: 0,
                params: [0, self.params.default_time2wait as u16, 0],
            };
            self.send(&Bhs::AsyncMessage(msg), &[], actions);
        }
        self.abort_where(|_| true);
        self.state = State::Closed;
        actions.close = true;
    }
}

impl Drop for IscsiSession {
    /// The connection is gone, and with it the I_T nexus: its RESERVE(6)s end.
    fn drop(&mut self) {
        if !self.nexus.initiator.is_empty() {
            self.config.reservations.nexus_lost(&self.nexus);
        }
    }
}
