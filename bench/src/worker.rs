//! The workload state machine: keeps a pass's queue depth of requests in flight, checks and
//! times their completions. Two drivers run it: a submitter thread with its own engine
//! `Client` (`--driver thread`), or a poller hosted on a reactor (`--driver reactor`, the
//! default), which submits and completes on the reactor's own thread the way a target
//! connection does and the way SPDK's bdevperf runs its jobs.

use crate::report::{Progress, Stats};
use crate::snap::{StallTracker, Windows};
use crate::workload::{Generator, Kind, Mismatch, Pattern, XorShift};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessel_engine::{AlignedBuf, Completion, Op, PollCtx, Poller, Request, VolumeId};

/// What writes carry and what reads are checked against.
#[derive(Clone, Copy)]
pub enum Data {
    /// Random bytes filled once per buffer; reads are not checked.
    Filler,
    /// The verify pattern: written per request, checked on every read.
    Pattern(Pattern),
}

/// One phase of a run.
#[derive(Clone)]
pub struct Pass {
    pub label: &'static str,
    pub qd: u32,
    /// Stop issuing after this long; None: run the generators to their end.
    pub deadline: Option<Duration>,
    pub data: Data,
    /// Snapshot create windows to measure write stalls against.
    pub windows: Option<Arc<Windows>>,
}

/// What a phase measured.
pub struct Outcome {
    pub stats: Stats,
    pub seconds: f64,
    pub mismatches: Vec<Mismatch>,
    /// Longest write stall during a snapshot create window (ns).
    pub stall_ns: u64,
}

impl Outcome {
    pub fn empty() -> Outcome {
        Outcome {
            stats: Stats::new(),
            seconds: 0.0,
            mismatches: Vec::new(),
            stall_ns: 0,
        }
    }
}

/// One request slot: its buffer and when it was submitted.
struct Slot {
    buf: Option<AlignedBuf>,
    kind: Kind,
    offset: u64,
    submitted: Instant,
}

/// One job's state: `qd` slots, the generator, and what was measured so far.
pub struct Worker {
    vol: VolumeId,
    gen: Generator,
    pass: Pass,
    progress: Arc<Progress>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    out: Outcome,
    stalls: StallTracker,
    began: Instant,
    deadline: Option<Instant>,
    exhausted: bool,
    /// Counted since the last `publish`.
    pending: (u64, u64, u64),
}

impl Worker {
    /// A job for submitter `thread` (seeds its filler data).
    pub fn new(
        vol: VolumeId,
        gen: Generator,
        pass: Pass,
        progress: Arc<Progress>,
        thread: usize,
    ) -> Worker {
        let bs = gen.bs() as usize;
        let mut rng = XorShift::new(0xf111 + thread as u64);
        let now = Instant::now();
        let slots: Vec<Slot> = (0..pass.qd)
            .map(|_| {
                let mut b = AlignedBuf::zeroed(bs);
                if matches!(pass.data, Data::Filler) {
                    for w in b.as_mut_slice().chunks_mut(8) {
                        w.copy_from_slice(&rng.next_u64().to_le_bytes()[..w.len()]);
                    }
                }
                Slot {
                    buf: Some(b),
                    kind: Kind::Read,
                    offset: 0,
                    submitted: now,
                }
            })
            .collect();
        Worker {
            vol,
            gen,
            progress,
            free: (0..slots.len()).rev().collect(),
            slots,
            out: Outcome::empty(),
            stalls: StallTracker::default(),
            began: now,
            deadline: pass.deadline.map(|d| now + d),
            pass,
            exhausted: false,
            pending: (0, 0, 0),
        }
    }

    /// Start the clock (right before the first `issue`).
    pub fn start(&mut self, now: Instant) {
        self.began = now;
        self.deadline = self.pass.deadline.map(|d| now + d);
    }

    /// True once no more requests will be issued.
    fn stopping(&self, now: Instant) -> bool {
        self.exhausted || self.deadline.is_some_and(|d| now >= d)
    }

    /// True once issuing stopped and every request came back.
    pub fn done(&self, now: Instant) -> bool {
        self.stopping(now) && self.free.len() == self.slots.len()
    }

    /// Fill every free slot with a request handed to `submit`; returns how many.
    pub fn issue(&mut self, now: Instant, mut submit: impl FnMut(Request)) -> usize {
        if self.stopping(now) {
            return 0;
        }
        let mut n = 0;
        while let Some(&i) = self.free.last() {
            let Some((kind, offset, len)) = self.gen.next_op() else {
                self.exhausted = true;
                break;
            };
            self.free.pop();
            let slot = &mut self.slots[i];
            let mut buf = slot.buf.take().expect("free slot has its buffer");
            buf.set_len(len as usize);
            if let (Kind::Write, Data::Pattern(p)) = (kind, self.pass.data) {
                p.fill(offset, buf.as_mut_slice());
            }
            let op = match kind {
                Kind::Read => Op::Read,
                Kind::Write => Op::Write { fua: false },
            };
            slot.kind = kind;
            slot.offset = offset;
            slot.submitted = now;
            submit(Request {
                tag: i as u64,
                volume: self.vol,
                op,
                offset,
                len,
                buf: Some(buf),
            });
            n += 1;
        }
        n
    }

    /// Account one completion seen at `now`.
    pub fn complete(&mut self, c: Completion, now: Instant) {
        let i = c.tag as usize;
        let counted = self.deadline.is_none_or(|d| now < d);
        let slot = &mut self.slots[i];
        let buf = c
            .buf
            .unwrap_or_else(|| AlignedBuf::zeroed(self.gen.bs() as usize));
        let ok = match &c.result {
            Ok(()) => true,
            Err(e) => {
                if self.out.stats.errors < 5 {
                    tracing::error!(
                        op = ?slot.kind,
                        offset = slot.offset,
                        len = buf.len(),
                        "request failed: {e}"
                    );
                }
                false
            }
        };
        if let (true, Kind::Read, Data::Pattern(p)) = (ok, slot.kind, self.pass.data) {
            self.out
                .mismatches
                .extend(p.check(slot.offset, buf.as_slice()));
        }
        if let (Some(w), Kind::Write, true) = (&self.pass.windows, slot.kind, counted) {
            self.stalls.observe(w, w.ns(slot.submitted), w.ns(now));
        }
        if counted {
            let len = buf.len() as u64;
            self.out
                .stats
                .record(now.duration_since(slot.submitted), len, ok);
            self.pending.0 += 1;
            self.pending.1 += len;
            self.pending.2 += u64::from(!ok);
        }
        slot.buf = Some(buf);
        self.free.push(i);
    }

    /// Add what was counted since the last call to the shared progress counters.
    pub fn publish(&mut self) {
        let (ops, bytes, errors) = std::mem::take(&mut self.pending);
        if ops > 0 {
            self.progress.ops.fetch_add(ops, Ordering::Relaxed);
            self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.progress.errors.fetch_add(errors, Ordering::Relaxed);
        }
    }

    /// What the job measured.
    pub fn finish(mut self) -> Outcome {
        self.publish();
        self.out.seconds = self.began.elapsed().as_secs_f64();
        self.out.stall_ns = self.stalls.max_ns;
        self.out
    }
}

/// Empty polls spun through before a submitter thread parks until a completion wakes it.
const SPIN_POLLS: u32 = 1000;

/// `--driver thread`: run `w` on the calling thread through `client`.
pub fn run_thread(client: &mut tessel_engine::Client, mut w: Worker) -> Outcome {
    let mut done: Vec<Completion> = Vec::with_capacity(w.slots.len());
    let mut now = Instant::now();
    w.start(now);
    let mut idle = 0u32;
    loop {
        w.issue(now, |r| client.submit(r));
        if w.done(now) {
            break;
        }
        if client.poll(&mut done) == 0 {
            // Spin a little (completions usually follow within microseconds), then park;
            // the clock is read only now and then so that spinning stays cheap.
            idle += 1;
            if idle.is_multiple_of(64) {
                now = Instant::now();
            }
            if idle < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                client.wait(Duration::from_millis(1));
                now = Instant::now();
            }
            continue;
        }
        idle = 0;
        now = Instant::now();
        for c in done.drain(..) {
            w.complete(c, now);
        }
        w.publish();
    }
    w.finish()
}

/// Where a reactor-hosted job leaves its outcome.
#[derive(Default)]
pub struct Finished {
    pub outcomes: Mutex<Vec<Outcome>>,
    pub count: AtomicUsize,
}

/// `--driver reactor`: a job hosted on a reactor. Completions are gathered as they arrive
/// and accounted in the next `poll` with one clock reading for the batch, then the free slots
/// are refilled, as the thread driver does.
pub struct JobPoller {
    worker: Option<Worker>,
    arrived: Vec<Completion>,
    started: bool,
    finished: Arc<Finished>,
}

impl JobPoller {
    pub fn new(worker: Worker, finished: Arc<Finished>) -> JobPoller {
        JobPoller {
            arrived: Vec::with_capacity(worker.slots.len()),
            worker: Some(worker),
            started: false,
            finished,
        }
    }
}

impl Poller for JobPoller {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> bool {
        let Some(w) = self.worker.as_mut() else {
            return false;
        };
        if self.started && self.arrived.is_empty() && w.free.is_empty() {
            // Every slot in flight: nothing to do until a completion arrives.
            return false;
        }
        let now = Instant::now();
        if !self.started {
            self.started = true;
            w.start(now);
        }
        let came = !self.arrived.is_empty();
        for c in self.arrived.drain(..) {
            w.complete(c, now);
        }
        if came {
            w.publish();
        }
        let sent = w.issue(now, |r| ctx.submit(r));
        if w.done(now) {
            let w = self.worker.take().expect("worker present");
            let out = w.finish();
            self.finished
                .outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(out);
            self.finished.count.fetch_add(1, Ordering::Release);
            return true;
        }
        came || sent > 0
    }

    fn complete(&mut self, c: Completion, _ctx: &mut PollCtx<'_>) {
        self.arrived.push(c);
    }

    fn wait_fd(&self) -> Option<(i32, u32)> {
        None
    }

    fn finished(&self) -> bool {
        self.worker.is_none()
    }
}
