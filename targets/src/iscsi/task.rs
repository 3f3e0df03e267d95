//! SCSI tasks of a session: immediate and unsolicited data, R2T and Data-Out gathering
//! straight into the engine buffer, execution through the SCSI layer, engine completions,
//! and the answer as Data-In (status in the last PDU) or a SCSI Response with sense.

use tessel_engine::{AlignedBuf, Completion, IoError, Request};

use super::pdu::{self, Bhs, Residual, RESERVED_TAG};
use super::scsi::{self, Cdb, Done, Sense, Step, Then};
use super::session::{IscsiSession, State};
use super::IscsiError;
use crate::export::{Actions, Exports};

/// An outstanding R2T.
#[derive(Debug)]
struct R2tWindow {
    ttt: u32,
    offset: u32,
    len: u32,
    next_data_sn: u32,
    received: u32,
}

/// One SCSI command between its arrival and its response.
#[derive(Debug)]
pub(super) struct Task {
    pub itt: u32,
    pub lun: u64,
    cdb: Result<Cdb, Sense>,
    edtl: u32,
    read: bool,
    /// Data-out the command needs (from the CDB).
    needed: u64,
    /// Data-out we keep: min(EDTL, needed); the buffer is exactly this long.
    wanted: u32,
    /// Bytes of buffers the task holds once admitted: its data-out and engine buffers.
    cost: u64,
    /// Admitted under the session's buffer budget: its buffer exists, it may get R2Ts and
    /// run. Until then it waits in `IscsiSession::waiting`.
    admitted: bool,
    /// Immediate and unsolicited data that came before admission (at most
    /// FirstBurstLength), moved into `buf` at admission.
    early: Vec<u8>,
    buf: Option<AlignedBuf>,
    /// End of the contiguous data received so far.
    received: u32,
    unsolicited_open: bool,
    unsolicited_limit: u32,
    unsolicited_sn: u32,
    r2ts: Vec<R2tWindow>,
    next_r2t_offset: u32,
    r2t_sn: u32,
    /// Engine requests not yet completed, and what to do when they are.
    pub pending: usize,
    then: Option<Then>,
    done: Option<Done>,
    pub aborted: bool,
}

impl Task {
    /// Checks a Data-Out against the unsolicited sequence or its R2T, and lands it.
    fn accept_data_out(&mut self, d: &pdu::DataOut, data: &[u8]) -> Result<(), IscsiError> {
        if d.ttt == RESERVED_TAG {
            if !self.unsolicited_open || d.data_sn != self.unsolicited_sn {
                return Err(IscsiError::Protocol(format!(
                    "unexpected unsolicited Data-Out DataSN {}",
                    d.data_sn
                )));
            }
            if u64::from(d.buffer_offset) + data.len() as u64 > u64::from(self.unsolicited_limit) {
                return Err(IscsiError::Protocol(
                    "unsolicited data beyond FirstBurstLength".into(),
                ));
            }
            self.unsolicited_sn += 1;
            self.land(d.buffer_offset, data)?;
            if d.final_ {
                self.unsolicited_open = false;
            }
            return Ok(());
        }
        let Some(at) = self.r2ts.iter().position(|r| r.ttt == d.ttt) else {
            return Err(IscsiError::Protocol(format!(
                "Data-Out for unknown TTT {:#x}",
                d.ttt
            )));
        };
        let r = &mut self.r2ts[at];
        let end = u64::from(d.buffer_offset) + data.len() as u64;
        if d.data_sn != r.next_data_sn
            || d.buffer_offset < r.offset
            || end > u64::from(r.offset + r.len)
        {
            return Err(IscsiError::Protocol(format!(
                "Data-Out DataSN {} or offset out of sequence",
                d.data_sn
            )));
        }
        r.next_data_sn += 1;
        r.received += data.len() as u32;
        let finished = r.received == r.len || d.final_;
        if finished {
            self.r2ts.remove(at);
        }
        self.land(d.buffer_offset, data)?;
        if finished && self.received < self.next_r2t_offset && self.r2ts.is_empty() {
            return Err(IscsiError::Protocol("R2T sequence ended short".into()));
        }
        Ok(())
    }

    /// True while Data-Out may still arrive: an unsolicited sequence or an R2T is open.
    /// Such a task has not reached the engine yet.
    fn awaits_data(&self) -> bool {
        self.unsolicited_open || !self.r2ts.is_empty()
    }

    fn data_complete(&self) -> bool {
        !self.unsolicited_open && self.r2ts.is_empty() && self.next_r2t_offset >= self.wanted
    }

    /// Lands `data` at `offset`; bytes beyond what we keep are dropped.
    fn land(&mut self, offset: u32, data: &[u8]) -> Result<(), IscsiError> {
        let end = u64::from(offset) + data.len() as u64;
        if end > u64::from(self.edtl) {
            return Err(IscsiError::Protocol(format!(
                "data ends at {end}, beyond the expected length {}",
                self.edtl
            )));
        }
        if offset != self.received {
            return Err(IscsiError::Protocol(format!(
                "data at offset {offset}, expected {}",
                self.received
            )));
        }
        // Data past `wanted` (the command needs less than EDTL) is legal to send and is
        // dropped; only the part inside the buffer is copied.
        let keep = u64::from(self.wanted)
            .saturating_sub(u64::from(offset))
            .min(data.len() as u64) as usize;
        if keep > 0 {
            match self.buf.as_mut() {
                Some(buf) => {
                    buf.as_mut_slice()[offset as usize..][..keep].copy_from_slice(&data[..keep])
                }
                // Not admitted yet: everything so far was kept, so `early` ends at `offset`.
                None => self.early.extend_from_slice(&data[..keep]),
            }
        }
        self.received = end as u32;
        Ok(())
    }
}

impl IscsiSession {
    /// A SCSI Command PDU whose CmdSN was accepted.
    pub(super) fn scsi_command(
        &mut self,
        cmd: &pdu::ScsiCommand,
        immediate: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<(), IscsiError> {
        if self.by_itt.contains_key(&cmd.itt) {
            self.reject(
                pdu::reject_reason::INVALID_PDU_FIELD,
                &cmd_header(cmd),
                actions,
            );
            return Ok(());
        }
        let lun_number = pdu::lun_number(cmd.lun);
        if lun_number.is_some_and(|n| usize::from(n) >= self.luns.len()) {
            if let Some(super::login::SessionKind::Normal { volume, .. }) = self.kind.clone() {
                self.refresh_luns(&volume, exports);
            }
        }
        let lun = lun_number.and_then(|n| self.luns.get(usize::from(n)));
        let block_size = lun.map(|l| l.block_size()).unwrap_or(512);
        // Every limit on the command's size is checked now, before a buffer exists or an
        // R2T is sent; WRITE PROTECTED comes first, then range and transfer length, then an
        // inconsistent expected length.
        let cdb = Cdb::parse(&cmd.cdb).and_then(|c| {
            match lun {
                Some(lun) => scsi::sbc::check_arrival(lun, &c)?,
                None if c.data_out_len(block_size) > 0 => return Err(Sense::LUN_NOT_SUPPORTED),
                None => {}
            }
            c.check_expected_length(if cmd.write { cmd.edtl } else { 0 }, block_size)?;
            Ok(c)
        });
        let needed = match (&cdb, cmd.write) {
            (Ok(c), true) => c.data_out_len(block_size),
            _ => 0,
        };
        let wanted = needed.min(u64::from(cmd.edtl)) as u32;
        let engine_bytes = cdb.as_ref().map_or(0, |c| c.engine_buffer_len(block_size));
        let p = &self.params;
        let unsolicited_limit = if cmd.write {
            cmd.edtl.min(p.first_burst_length)
        } else {
            0
        };
        if immediate.len() as u64 > u64::from(unsolicited_limit)
            || (!immediate.is_empty() && !p.immediate_data)
        {
            self.reject(
                pdu::reject_reason::PROTOCOL_ERROR,
                &cmd_header(cmd),
                actions,
            );
            return Ok(());
        }
        let unsolicited_open = cmd.write
            && !cmd.final_
            && !p.initial_r2t
            && immediate.len() < unsolicited_limit as usize;
        let id = self.next_task;
        self.next_task += 1;
        let mut task = Task {
            itt: cmd.itt,
            lun: cmd.lun,
            cdb,
            edtl: cmd.edtl,
            read: cmd.read,
            needed,
            wanted,
            cost: u64::from(wanted) + engine_bytes,
            admitted: false,
            early: Vec::new(),
            buf: None,
            received: 0,
            unsolicited_open,
            unsolicited_limit,
            unsolicited_sn: 0,
            r2ts: Vec::new(),
            next_r2t_offset: 0,
            r2t_sn: 0,
            pending: 0,
            then: None,
            done: None,
            aborted: false,
        };
        task.land(0, immediate)?;
        // A command refused up front answers at once; unsolicited data still on its way
        // is then dropped as data for an unknown task.
        if let Err(sense) = &task.cdb {
            let sense = *sense;
            self.respond(&mut task, scsi::Reply::check(sense), actions);
            return Ok(());
        }
        // Immediate data is here already: it counts from now on.
        self.allowance.hold(task.early.len() as u64);
        self.tasks.insert(id, task);
        self.by_itt.insert(cmd.itt, id);
        self.waiting.push_back(id);
        self.admit_waiting(actions);
        Ok(())
    }

    /// Admits waiting tasks, oldest first, while the allowance lets their buffers (write
    /// data, read data, an expanded WRITE SAME block) be taken: within the session's
    /// limit beside what it holds (admitted tasks, Data-In not sent yet, data of waiting
    /// tasks), and within the daemon's budget. One task is admitted beyond the session's
    /// limit when no admitted task or unsent reply holds anything, so an 8 MiB command
    /// runs under a smaller limit; never beyond the daemon's budget. Tasks past it wait
    /// (their CmdSN was accepted: they are never dropped).
    ///
    /// Admission is tried again on input (the driver calls `receive`, also without
    /// input, while `waiting_for_memory`), completions, sent replies (`queued`, or
    /// `actions.send` found shorter) and ticks. A driver that does not report sent bytes
    /// still resumes: when only unread replies hold the tasks back, a NOP-In ping goes out
    /// behind them, and its answer is input that comes once the peer has read them (a
    /// peer that never reads is dropped by the ping timeout).
    pub(super) fn admit_waiting(&mut self, actions: &mut Actions) {
        self.queued(actions.send.len());
        while let Some(&id) = self.waiting.front() {
            let task = self.tasks.get_mut(&id).expect("waiting tasks exist");
            // What came before admission is held already, and is part of the task's cost
            // (it is data the task keeps: at most `wanted`).
            let early = task.early.len() as u64;
            task.cost = task.cost.max(early);
            let more = task.cost - early;
            let alone = self.charged == 0 && self.unsent == 0;
            let taken = if alone {
                self.allowance.try_take_beyond_limit(more)
            } else {
                self.allowance.try_take(more)
            };
            if !taken {
                let open = matches!(self.state, State::FullFeature | State::LoggingOut { .. });
                if self.charged == 0 && self.unsent > 0 && open {
                    self.ping(None, actions);
                }
                return;
            }
            self.waiting.pop_front();
            self.charged += task.cost;
            task.admitted = true;
            if task.wanted > 0 {
                let mut buf = AlignedBuf::zeroed(task.wanted as usize);
                buf.as_mut_slice()[..task.early.len()].copy_from_slice(&task.early);
                task.buf = Some(buf);
            }
            task.early = Vec::new();
            self.advance(id, actions);
        }
    }

    /// Removes a task; what it holds stays taken until `release`.
    fn take_task(&mut self, id: u64) -> Option<Task> {
        let task = self.tasks.remove(&id)?;
        if !task.admitted {
            self.waiting.retain(|&w| w != id);
        }
        Some(task)
    }

    /// Gives back what a removed task held.
    fn release(&mut self, task: &Task) {
        let held = if task.admitted {
            self.charged -= task.cost;
            task.cost
        } else {
            task.early.len() as u64
        };
        self.allowance.give(held);
    }

    /// Removes a task and gives back what it held.
    pub(super) fn remove_task(&mut self, id: u64) -> Option<Task> {
        let task = self.take_task(id)?;
        self.release(&task);
        Some(task)
    }

    /// Bytes the session holds: buffers of admitted tasks (data-out, engine buffers, read
    /// data until it is queued as Data-In), Data-In queued and not reported sent, and data
    /// that came before admission.
    pub fn buffered(&self) -> u64 {
        self.allowance.held()
    }

    /// A Data-Out PDU. One out of sequence (DataSN, offset, TTT) ends its task with
    /// CHECK CONDITION, DATA PHASE ERROR; the connection stays up.
    pub(super) fn data_out(
        &mut self,
        d: &pdu::DataOut,
        header: &[u8; pdu::BHS_LEN],
        data: &[u8],
        actions: &mut Actions,
    ) {
        let Some(&id) = self.by_itt.get(&d.itt) else {
            // Data for a task that already ended (answered early, or aborted).
            return;
        };
        let task = self.tasks.get_mut(&id).expect("indexed task exists");
        if !task.awaits_data() {
            // A read, or a write whose data is complete and which may be in the engine:
            // the PDU is refused and the task goes on untouched (RFC 7143 11.17.1: a
            // Reject never ends a task).
            self.reject(pdu::reject_reason::INVALID_PDU_FIELD, header, actions);
            return;
        }
        let before = task.early.len();
        let accepted = task.accept_data_out(d, data);
        // Unsolicited data of a task not admitted yet is held from now on.
        let grew = (task.early.len() - before) as u64;
        self.allowance.hold(grew);
        if let Err(e) = accepted {
            tracing::debug!(itt = d.itt, "iSCSI Data-Out refused: {e}");
            let mut task = self.remove_task(id).expect("indexed task exists");
            self.by_itt.remove(&task.itt);
            self.respond(
                &mut task,
                scsi::Reply::check(Sense::DATA_PHASE_ERROR),
                actions,
            );
            return;
        }
        if task.admitted {
            self.advance(id, actions);
        }
    }

    /// Sends the R2Ts a task may have outstanding, or executes it once its data is in.
    fn advance(&mut self, id: u64, actions: &mut Actions) {
        let (max_r2t, max_burst) = (
            self.params.max_outstanding_r2t as usize,
            self.params.max_burst_length,
        );
        let mut r2ts = Vec::new();
        {
            let task = self.tasks.get_mut(&id).expect("task exists");
            if !task.unsolicited_open {
                task.next_r2t_offset = task.next_r2t_offset.max(task.received);
                while task.r2ts.len() < max_r2t && task.next_r2t_offset < task.wanted {
                    let len = (task.wanted - task.next_r2t_offset).min(max_burst);
                    r2ts.push((task.next_r2t_offset, len, task.r2t_sn, task.itt, task.lun));
                    task.next_r2t_offset += len;
                    task.r2t_sn += 1;
                    // The TTT is filled in below (it needs the session's counter).
                    task.r2ts.push(R2tWindow {
                        ttt: RESERVED_TAG,
                        offset: task.next_r2t_offset - len,
                        len,
                        next_data_sn: 0,
                        received: 0,
                    });
                }
            }
        }
        for (offset, len, r2t_sn, itt, lun) in r2ts {
            let ttt = self.new_ttt();
            let task = self.tasks.get_mut(&id).expect("task exists");
            if let Some(w) = task
                .r2ts
                .iter_mut()
                .find(|w| w.offset == offset && w.ttt == RESERVED_TAG)
            {
                w.ttt = ttt;
            }
            let r2t = pdu::R2t {
                lun,
                itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                r2t_sn,
                buffer_offset: offset,
                desired_length: len,
            };
            self.send(&Bhs::R2t(r2t), &[], actions);
        }
        let task = self.tasks.get(&id).expect("task exists");
        if task.data_complete() && task.then.is_none() && task.pending == 0 {
            self.execute(id, actions);
        }
    }

    fn execute(&mut self, id: u64, actions: &mut Actions) {
        let task = self.tasks.get_mut(&id).expect("task exists");
        let cdb = task
            .cdb
            .clone()
            .expect("refused commands never reach execute");
        let data = task.buf.take();
        let numbers: Vec<u16> = self.luns.iter().map(|l| l.number).collect();
        let issuer = scsi::Issuer {
            nexus: &self.nexus,
            reservations: &self.config.reservations,
        };
        let step = match pdu::lun_number(task.lun).and_then(|n| self.luns.get_mut(usize::from(n))) {
            Some(lun) => scsi::execute(lun, &numbers, &cdb, data, issuer),
            None => Step::Reply(scsi::execute_without_lun(&numbers, &cdb)),
        };
        self.run_step(id, step, actions);
    }

    fn run_step(&mut self, id: u64, step: Step, actions: &mut Actions) {
        match step {
            Step::Reply(reply) => {
                // The read data is queued as Data-In (and held as unsent) before the task
                // gives its buffers back, so the daemon's budget never counts it twice
                // or not at all.
                let mut task = self.take_task(id).expect("task exists");
                self.by_itt.remove(&task.itt);
                self.respond(&mut task, reply, actions);
                self.release(&task);
            }
            Step::Io(io) => {
                let task = self.tasks.get_mut(&id).expect("task exists");
                let volume = pdu::lun_number(task.lun)
                    .and_then(|n| self.luns.get(usize::from(n)))
                    .map(|l| l.export.volume)
                    .expect("I/O only for existing LUNs");
                task.pending = io.requests.len();
                task.then = Some(io.then);
                task.done = Some(Done {
                    result: Ok(()),
                    buf: None,
                    extents: Vec::new(),
                    wrote: false,
                });
                self.in_flight += io.requests.len();
                for r in io.requests {
                    if let Some(done) = task.done.as_mut() {
                        done.wrote |= r.op.is_write();
                    }
                    actions.submit.push(Request {
                        tag: id,
                        volume,
                        op: r.op,
                        offset: r.offset,
                        len: r.len,
                        buf: r.buf,
                    });
                }
            }
        }
    }

    /// An engine completion for one of this session's tasks.
    pub(super) fn task_completion(&mut self, c: Completion, actions: &mut Actions) {
        // Every completion is for a request this session submitted, task or no task.
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(task) = self.tasks.get_mut(&c.tag) else {
            return;
        };
        task.pending = task.pending.saturating_sub(1);
        let done = task.done.get_or_insert(Done {
            result: Ok(()),
            buf: None,
            extents: Vec::new(),
            wrote: false,
        });
        if done.result.is_ok() {
            if let Err(e) = c.result {
                done.result = Err(e);
            }
        }
        if done.buf.is_none() {
            done.buf = c.buf;
        }
        done.extents.extend(c.extents);
        if task.pending > 0 {
            return;
        }
        if task.aborted {
            self.remove_task(c.tag);
            return;
        }
        let then = task
            .then
            .take()
            .expect("a task with I/O has a continuation");
        let done = task.done.take().expect("gathered above");
        let lun_index = pdu::lun_number(task.lun).map(usize::from);
        let step = match lun_index.and_then(|n| self.luns.get(n)) {
            Some(lun) => scsi::resume(lun, then, done),
            None => Step::Reply(scsi::Reply::check(Sense::from_io_error(
                &IoError::UnknownVolume,
                false,
            ))),
        };
        self.run_step(c.tag, step, actions);
    }

    /// Sends a task's data-in and status.
    fn respond(&mut self, task: &mut Task, reply: scsi::Reply, actions: &mut Actions) {
        let data = reply.data.as_slice();
        let (residual, send_len) = if task.read && task.needed == 0 {
            (
                Residual::of(task.edtl, data.len() as u64),
                data.len().min(task.edtl as usize),
            )
        } else {
            (Residual::of(task.edtl, task.needed), 0)
        };
        let descriptor = pdu::lun_number(task.lun)
            .and_then(|n| self.luns.get(usize::from(n)))
            .is_some_and(|l| l.descriptor_sense);
        let collapse = reply.status() == scsi::sense::status::GOOD;
        let max_seg = (self.params.peer_max_recv_data_segment_length as usize).max(512);
        let max_burst = (self.params.max_burst_length as usize).max(max_seg);
        let mut offset = 0;
        let mut data_sn = 0;
        while offset < send_len {
            let burst_end = (offset / max_burst + 1) * max_burst;
            let len = (send_len - offset).min(max_seg).min(burst_end - offset);
            let last = offset + len == send_len;
            let status = (last && collapse).then_some(scsi::sense::status::GOOD);
            let d = pdu::DataIn {
                final_: last || offset + len == burst_end,
                ack: false,
                status,
                residual: if status.is_some() {
                    residual
                } else {
                    Residual::None
                },
                lun: task.lun,
                itt: task.itt,
                ttt: RESERVED_TAG,
                stat_sn: if status.is_some() {
                    self.next_stat_sn()
                } else {
                    0
                },
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                data_sn,
                buffer_offset: offset as u32,
            };
            self.send(&Bhs::DataIn(d), &data[offset..offset + len], actions);
            offset += len;
            data_sn += 1;
        }
        // Data-In waits for the peer to read it: held until the driver reports it sent.
        self.allowance.hold(send_len as u64);
        self.unsent += send_len as u64;
        if collapse && send_len > 0 {
            return;
        }
        let mut sense_data = Vec::new();
        if let Some(s) = reply.sense {
            let bytes = s.encode(descriptor);
            sense_data.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            sense_data.extend_from_slice(&bytes);
        }
        let status = reply.status();
        let resp = pdu::ScsiResponse {
            response: 0,
            status,
            residual,
            itt: task.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            exp_data_sn: if task.read { data_sn } else { task.r2t_sn },
        };
        self.send(&Bhs::ScsiResponse(resp), &sense_data, actions);
    }
}

/// The raw header of a command, for a Reject.
fn cmd_header(cmd: &pdu::ScsiCommand) -> [u8; pdu::BHS_LEN] {
    Bhs::ScsiCommand(cmd.clone()).encode(0, 0)
}
