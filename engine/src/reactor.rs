//! The reactor: one poller thread per core. It owns its shards, allocation groups, journal
//! and io_uring; other threads reach it only through its inbox (DESIGN.md section 4).

use crate::alloc::{AllocGroup, Allocator};
use crate::backend::inline::Inline;
use crate::backend::uring::Ring;
use crate::backend::{Backend, DevOp};
use crate::io::{Completion, Request};
use crate::journal::Journal;
use crate::layout::Layout;
use crate::map::ShardMap;
use crate::media::Member;
use crate::request::{Doorbell, Parent, ParentPool, ReplyTo, Sink};
use crate::slab::Slab;
use crate::volume::{MetaCache, VolumeTable};
use crossbeam_queue::ArrayQueue;
use rustc_hash::FxHashMap;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How an idle reactor waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Spin forever like SPDK: lowest latency, one busy core per reactor.
    Busy,
    /// Spin for a short budget, then sleep in io_uring_enter until woken.
    Adaptive,
}

/// On inline media (memory, null) a commit's device write runs on the reactor thread,
/// a pause of all its I/O as long as the write: a commit starts once this many blocks are
/// sealed, not only every 50 ms, so that no single commit is long (a snapshot's freeze
/// waits for one, with the volume's writes in flight). io_uring media write off the
/// reactor and batch more per device sync.
const SYNC_COMMIT_BLOCKS: u64 = 128;

/// Latency histogram buckets: exact below 16 µs, then 8 per power of two up to ~2^40 µs.
pub const LAT_BUCKETS: usize = 16 + 37 * 8;

/// The histogram bucket of a latency in microseconds.
pub fn lat_bucket(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros() as usize;
    (16 + (exp - 4) * 8 + ((us >> (exp - 3)) & 7) as usize).min(LAT_BUCKETS - 1)
}

/// A representative latency (µs) of a bucket: its lower bound.
pub fn bucket_us(b: usize) -> u64 {
    if b < 16 {
        return b as u64;
    }
    let exp = (b - 16) / 8 + 4;
    (8 + ((b - 16) % 8) as u64) << (exp - 3)
}

/// Counters a reactor publishes (read by `stats`).
pub struct CoreStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    /// Cluster operations in flight, sampled every loop pass.
    pub in_flight: AtomicU64,
    /// Completed requests by latency bucket (see `lat_bucket`).
    pub latency: Vec<AtomicU64>,
}

impl Default for CoreStats {
    fn default() -> Self {
        CoreStats {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            latency: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl CoreStats {
    /// Count one completed request. Only the owner reactor calls this (see `bump`).
    pub fn record_latency(&self, d: Duration) {
        bump(&self.latency[lat_bucket(d.as_micros() as u64)], 1);
    }
}

/// Add `n` to a counter of `CoreStats`. Only the owner reactor writes its counters, so a
/// plain load and store do, without the locked read-modify-write of `fetch_add` (which
/// costs the hot path more than the rest of the accounting); readers on other threads see
/// the value before or after.
#[inline]
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// What every reactor and client shares (read-only or atomic).
pub struct Shared {
    pub layout: Layout,
    pub members: Vec<Member>,
    pub inboxes: Vec<Arc<Inbox>>,
    pub volumes: VolumeTable,
    /// Pool-wide epoch (grows at each snapshot barrier).
    pub epoch: AtomicU64,
    pub used_clusters: AtomicU64,
    pub stopping: AtomicBool,
    /// Set when a reactor thread panicked: its shards have no owner any more, so whoever
    /// hosts the engine must stop rather than run half alive.
    pub panicked: AtomicBool,
    /// Set by a reactor whose journal is half full.
    pub want_checkpoint: AtomicBool,
    /// Per reactor: percent of its journal ring still needed by recovery.
    pub journal_fill: Vec<std::sync::atomic::AtomicU32>,
    pub stats: Vec<CoreStats>,
    /// Clusters per allocation group, and which reactor owns each group now.
    pub group_size: u64,
    pub group_owner: Vec<std::sync::atomic::AtomicU32>,
    pub poll: PollMode,
    pub spin: Duration,
    pub ring_entries: u32,
    /// Device I/O entries queued before they are submitted mid-pass.
    pub submit_batch: usize,
    /// Test hook (`Engine::pause_fills`): queued fills wait, so reads resolve redirected
    /// entries through their parents.
    pub fills_paused: AtomicBool,
}

impl Shared {
    /// Reactor owning shard `shard` of any volume (clones share their origin's placement).
    #[inline]
    pub fn owner(&self, shard: u64) -> usize {
        let n = self.inboxes.len();
        if n.is_power_of_two() {
            // One reactor, two, four...: a mask rather than a division per piece.
            (shard as usize) & (n - 1)
        } else {
            (shard % n as u64) as usize
        }
    }

    /// Send a message to reactor `to`, spinning while its inbox is full (back-pressure for
    /// threads outside the reactors).
    pub fn send_blocking(&self, to: usize, mut m: Msg) {
        let inbox = &self.inboxes[to];
        loop {
            match inbox.queue.push(m) {
                Ok(()) => break,
                Err(back) => {
                    m = back;
                    inbox.bell.ring();
                    std::thread::yield_now();
                }
            }
        }
        inbox.bell.ring();
    }
}

/// A reactor's inbound ring and wake-up line, and the sink for completions of requests its
/// pollers submitted.
pub struct Inbox {
    pub queue: ArrayQueue<Msg>,
    pub bell: Arc<Doorbell>,
    pub sink: Arc<Sink>,
}

/// A message to a reactor.
pub enum Msg {
    /// Part of a request that falls in one shard owned by the receiver (or a flush).
    Piece(Piece),
    /// Run a closure on the reactor (control operations: volume table, checkpoint, stats).
    Task(Box<dyn FnOnce(&mut Reactor) + Send>),
    /// A barrier message from a coordinator, and where to answer it.
    Barrier(crate::barrier::ToParticipant, crate::barrier::Reply),
    /// Clusters of groups the receiver owns, freed elsewhere (and counted free there).
    Free(Vec<u64>),
    /// Reactor `from` ran out of space: give it a group if you can.
    GroupAsk { from: usize },
    /// Answer to GroupAsk.
    GroupGive {
        group: Option<AllocGroup>,
        from: usize,
    },
}

/// The part of a request inside one shard.
pub struct Piece {
    pub parent: Arc<Parent>,
    pub vol: u64,
    pub shard: u64,
    /// Byte offset in the volume.
    pub off: u64,
    pub len: u64,
    /// Offset of this piece's bytes in the caller's buffer.
    pub buf_off: usize,
}

/// A task hosted on a reactor: a connection of a target, say. Driven by the reactor's
/// loop; submits requests through `PollCtx`.
pub trait Poller: Send {
    /// Do a bounded amount of work. Returns true when it made progress.
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> bool;
    /// A request this poller submitted has completed.
    fn complete(&mut self, c: Completion, ctx: &mut PollCtx<'_>);
    /// A file descriptor and poll(2) events to wait for while the reactor sleeps.
    fn wait_fd(&self) -> Option<(i32, u32)>;
    /// True once the poller is done, with no request in flight: it is then dropped.
    fn finished(&self) -> bool;
}

/// What a poller may do on its reactor.
pub struct PollCtx<'a> {
    reactor: &'a mut Reactor,
    route: u32,
    /// When this call's first request was submitted: the start time of all of them.
    batch: Option<Instant>,
}

impl PollCtx<'_> {
    /// Submit a request; its completion arrives through `Poller::complete`. Requests
    /// submitted in one call of the poller share a start time for the latency statistics
    /// (one clock reading per batch rather than per request: the clock costs the null
    /// target a tenth of its time); they are started together anyway, after the call.
    pub fn submit(&mut self, req: Request) {
        let started = *self.batch.get_or_insert_with(Instant::now);
        let r = &mut *self.reactor;
        let (id, shared, meta, parents, mut sender) = r.split_send();
        crate::dispatch::dispatch(
            shared,
            meta,
            req,
            ReplyTo::Reactor(id),
            self.route,
            started,
            |p| parents.make(p),
            |to, m| sender.send(shared, to, m),
        );
    }

    /// The reactor's core index.
    pub fn core(&self) -> usize {
        self.reactor.id
    }

    /// True when the engine is shutting down.
    pub fn stopping(&self) -> bool {
        self.reactor.shared.stopping.load(Ordering::Relaxed)
    }
}

/// Continuation of an io_uring operation, keyed by user_data.
pub(crate) enum Cont {
    /// A device read or write of cluster operation `op`.
    Data { op: usize, len: u32 },
    /// One step of the journal commit chain; `len`: the bytes its write must write (0 for
    /// a sync).
    Commit { len: u32 },
    /// The doorbell's eventfd became readable.
    Bell,
    /// Poller `poller`'s fd became ready (or its poll was cancelled).
    PollFd { poller: usize },
    /// An io_uring cancellation finished.
    Cancel,
}

/// One volume's shards on this reactor.
pub struct VolState {
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// Epoch of the volume's newest snapshot: entries born after it belong to it alone.
    pub snap_epoch: u64,
    pub shards: FxHashMap<u64, Shard>,
    /// Cluster operations in flight on this volume here.
    pub inflight: u32,
    /// Of those, host writes (trims, zeroes) — what a snapshot barrier drains.
    pub writes_inflight: u32,
    /// Deleted: new pieces fail; clusters are freed once `inflight` drains.
    pub deleting: bool,
    /// Set by a snapshot barrier (or a rollback): pieces held until it commits or aborts.
    pub hold: Option<Hold>,
}

/// Pieces held by a barrier, and whom to tell once the volume is drained.
pub struct Hold {
    pub barrier: crate::barrier::BarrierId,
    /// Hold reads too (rollback), not only writes (snapshot).
    pub all: bool,
    pub pieces: Vec<Piece>,
    /// The coordinator waiting for `Ready`, until it is sent.
    pub(crate) ready: Option<crate::barrier::Reply>,
}

/// A shard owned by this reactor: its map and its cluster range locks.
pub struct Shard {
    pub map: ShardMap,
    pub(crate) locks: crate::rangelock::RangeLocks,
}

/// State of the journal commit pipeline (group commit: one in flight, the next gathers).
#[derive(Default)]
pub(crate) struct Commit {
    pub in_flight: bool,
    pub wanted: bool,
    pub waiting: Vec<Waiter>,
    pub riding: Vec<Waiter>,
    pub steps: u32,
    pub error: Option<i32>,
    pub buf: Option<crate::buf::AlignedBuf>,
    /// Commits failed in a row (logged at the first, and when one succeeds again).
    pub failures: u32,
}

/// Something that completes when a commit is durable.
pub(crate) enum Waiter {
    Op(usize),
    Flush(Arc<Parent>),
    /// A control operation waiting for its records to be durable.
    Call(Box<dyn FnOnce(Result<(), crate::error::IoError>) + Send>),
}

/// What `Reactor::send` needs: the reactor's own queues.
struct Sender<'a> {
    id: usize,
    local: &'a mut VecDeque<Msg>,
    outbox: &'a mut Vec<VecDeque<Msg>>,
}

impl Sender<'_> {
    fn send(&mut self, shared: &Shared, to: usize, m: Msg) {
        if to == self.id {
            self.local.push_back(m);
            return;
        }
        if !self.outbox[to].is_empty() {
            self.outbox[to].push_back(m);
            return;
        }
        let inbox = &shared.inboxes[to];
        match inbox.queue.push(m) {
            Ok(()) => inbox.bell.ring(),
            Err(m) => self.outbox[to].push_back(m),
        }
    }
}

/// One core's poller and everything it owns.
pub struct Reactor {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// The reactor's io_uring: its doorbell and pollers' waits, and device I/O on files.
    pub(crate) ring: Ring,
    /// Device I/O on media io_uring cannot serve (memory, null): run inline.
    inline: Option<Inline>,
    pub(crate) conts: Slab<Cont>,
    pub vols: FxHashMap<u64, VolState>,
    pub alloc: Allocator,
    pub journal: Journal,
    pub(crate) commit: Commit,
    pub(crate) ops: Slab<crate::datapath::ClusterOp>,
    pub(crate) ready: VecDeque<usize>,
    pub(crate) local: VecDeque<Msg>,
    outbox: Vec<VecDeque<Msg>>,
    /// Completions being handled by `reap`, kept between passes for its capacity.
    reaped: Vec<(u64, i32)>,
    /// Completions of requests this reactor's pollers submitted, finished here.
    pub(crate) done_here: VecDeque<(u32, Completion)>,
    /// The time the requests finishing now completed at, read at most once per stage of a
    /// pass (reaping, running ready operations): completions batch as submissions do.
    pub(crate) done_clock: Option<Instant>,
    /// Finished requests' allocations, for this reactor's pollers' next requests.
    pub(crate) parents: ParentPool,
    /// Finished cluster operations' bounce buffers, for the next read-modify-writes.
    pub(crate) bounces: crate::buf::BufPool,
    pub(crate) space_waiters: VecDeque<usize>,
    /// Redirected clusters of live volumes waiting for a background fill.
    pub(crate) fills: VecDeque<(u64, u64, u32)>,
    /// Clusters of clones being inflated.
    pub(crate) inflates: VecDeque<(u64, u64, u32)>,
    /// Deleted images whose clusters are being released, oldest first.
    pub(crate) drops: VecDeque<crate::snapshot::Dropping>,
    pub(crate) jobs_in_flight: usize,
    pub(crate) asking: Option<usize>,
    /// A borrowed group arrived this pass for writes waiting for space: no group is given
    /// away before they ran.
    pub(crate) fresh_group: bool,
    pub(crate) meta: MetaCache,
    pollers: Vec<Option<Box<dyn Poller>>>,
    /// Pollers with a POLL_ADD in flight: (fd, events, user_data).
    poll_armed: HashMap<usize, (i32, u32, u64)>,
    bell_armed: bool,
    bell_buf: Box<u64>,
    last_commit: Instant,
    /// The largest logical sector of the pool's members: device I/O is aligned to it.
    pub(crate) sector: u32,
    /// Reused by `push_dev` to key a chain's operations without allocating each time.
    dev_chain: Vec<(DevOp, u64)>,
    /// The first error of a submit to the ring, logged once (they are retried every pass).
    submit_failed: bool,
}

impl Reactor {
    /// Set up the reactor's ring (files registered when the media are files).
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        alloc: Allocator,
        journal: Journal,
    ) -> std::io::Result<Reactor> {
        // Files and block devices go through the ring as registered files; a pool with
        // any other member runs all its device I/O inline.
        let fds: Option<Vec<i32>> = shared.members.iter().map(|m| m.raw_fd()).collect();
        let ring = Ring::new(shared.ring_entries, fds.as_deref().unwrap_or_default())?;
        let inline = fds
            .is_none()
            .then(|| Inline::new(shared.members.iter().map(|m| m.medium()).collect()));
        let sector = shared
            .members
            .iter()
            .map(Member::sector)
            .max()
            .unwrap_or(512);
        let n = shared.inboxes.len();
        let meta = MetaCache::default();
        Ok(Reactor {
            id,
            shared,
            ring,
            inline,
            conts: Slab::default(),
            vols: FxHashMap::default(),
            alloc,
            journal,
            commit: Commit::default(),
            ops: Slab::default(),
            ready: VecDeque::new(),
            local: VecDeque::new(),
            outbox: (0..n).map(|_| VecDeque::new()).collect(),
            reaped: Vec::new(),
            done_here: VecDeque::new(),
            done_clock: None,
            parents: ParentPool::default(),
            bounces: crate::buf::BufPool::default(),
            space_waiters: VecDeque::new(),
            fills: VecDeque::new(),
            inflates: VecDeque::new(),
            drops: VecDeque::new(),
            jobs_in_flight: 0,
            asking: None,
            fresh_group: false,
            meta,
            pollers: Vec::new(),
            poll_armed: HashMap::new(),
            bell_armed: false,
            bell_buf: Box::new(0),
            last_commit: Instant::now(),
            sector,
            dev_chain: Vec::new(),
            submit_failed: false,
        })
    }

    /// Send a message to reactor `to` (to ourselves without the ring). A full inbox keeps
    /// the message in our outbox for the next pass: back-pressure, never a drop.
    pub fn send(&mut self, to: usize, m: Msg) {
        let (_, shared, _, _, mut sender) = self.split_send();
        sender.send(shared, to, m);
    }

    /// The parts `send` needs, borrowed apart from the volume cache and the kept requests
    /// (for `dispatch`).
    fn split_send(&mut self) -> (usize, &Shared, &mut MetaCache, &mut ParentPool, Sender<'_>) {
        let sender = Sender {
            id: self.id,
            local: &mut self.local,
            outbox: &mut self.outbox,
        };
        (
            self.id,
            &*self.shared,
            &mut self.meta,
            &mut self.parents,
            sender,
        )
    }

    /// A request part is done: the last one delivers the completion. One for a poller of
    /// this reactor goes straight to `done_here`, its queue of local completions; the sink
    /// (and its doorbell) is for completions crossing threads. Returns true for the last
    /// part.
    pub(crate) fn reply(&mut self, p: &Parent, result: Result<(), crate::error::IoError>) -> bool {
        let Some(c) = p.settle(result) else {
            return false;
        };
        match p.reply {
            ReplyTo::Reactor(core) if core == self.id => self.done_here.push_back((p.route, c)),
            ref to => to.push(|core| &self.shared.inboxes[core].sink, p.route, c),
        }
        true
    }

    fn flush_outboxes(&mut self) -> bool {
        let mut progress = false;
        for to in 0..self.outbox.len() {
            let inbox = &self.shared.inboxes[to];
            let mut pushed = false;
            while let Some(m) = self.outbox[to].pop_front() {
                if let Err(m) = inbox.queue.push(m) {
                    self.outbox[to].push_front(m);
                    break;
                }
                pushed = true;
            }
            if pushed {
                inbox.bell.ring();
                progress = true;
            }
        }
        progress
    }

    /// Where this reactor's device I/O goes.
    fn dev(&mut self) -> &mut dyn Backend {
        match &mut self.inline {
            Some(inline) => inline,
            None => &mut self.ring,
        }
    }

    /// Start a chain of device operations (see `Backend::push`), each with the continuation
    /// its completion runs; each operation after the first runs only if the one before it
    /// succeeded. Submitted once `submit_batch` operations are queued, or at the end of
    /// the pass.
    ///
    /// # Safety
    /// Every buffer of `chain` belongs to state that lives, untouched by anyone else, until
    /// the operation's completion is reaped (the caller's request, a cluster operation's
    /// bounce buffer, the commit's buffer).
    pub(crate) unsafe fn push_dev(&mut self, chain: impl IntoIterator<Item = (DevOp, Cont)>) {
        let mut ops = std::mem::take(&mut self.dev_chain);
        ops.extend(
            chain
                .into_iter()
                .map(|(op, c)| (op, self.conts.insert(c) as u64)),
        );
        // SAFETY: the caller's contract.
        unsafe { self.dev().push(&ops) };
        ops.clear();
        self.dev_chain = ops;
        if self.dev().queued() >= self.shared.submit_batch {
            self.submit();
        }
    }

    /// Hand queued entries to the kernel. A failure is not retried here: the entries stay
    /// queued and the next pass submits them again.
    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            if !self.submit_failed {
                self.submit_failed = true;
                tracing::warn!(core = self.id, error = %e, "io_uring submit failed; retrying every pass");
            }
        }
    }

    /// Install a poller on this reactor.
    pub fn add_poller(&mut self, p: Box<dyn Poller>) {
        match self.pollers.iter().position(|s| s.is_none()) {
            Some(k) => self.pollers[k] = Some(p),
            None => self.pollers.push(Some(p)),
        }
    }

    /// Number of pollers hosted here.
    pub fn pollers(&self) -> usize {
        self.pollers.iter().flatten().count()
    }

    fn run_pollers(&mut self) -> bool {
        let mut progress = false;
        for k in 0..self.pollers.len() {
            let Some(mut p) = self.pollers[k].take() else {
                continue;
            };
            let mut ctx = PollCtx {
                reactor: self,
                route: k as u32,
                batch: None,
            };
            progress |= p.poll(&mut ctx);
            if p.finished() {
                self.disarm(k);
                progress = true;
            } else {
                self.pollers[k] = Some(p);
            }
        }
        progress
    }

    fn deliver_completions(&mut self) -> bool {
        let sink = self.shared.inboxes[self.id].sink.clone();
        let mut progress = false;
        loop {
            let Some((route, c)) = self.done_here.pop_front().or_else(|| sink.pop()) else {
                break;
            };
            progress = true;
            let k = route as usize;
            if let Some(mut p) = self.pollers.get_mut(k).and_then(|s| s.take()) {
                let mut ctx = PollCtx {
                    reactor: self,
                    route,
                    batch: None,
                };
                p.complete(c, &mut ctx);
                self.pollers[k] = Some(p);
            }
        }
        progress
    }

    pub(crate) fn mark_commit_time(&mut self) {
        self.last_commit = Instant::now();
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Piece(p) => self.start_piece(p),
            Msg::Task(f) => f(self),
            Msg::Barrier(m, reply) => self.on_barrier(m, reply),
            Msg::Free(cs) => {
                // Freed by another reactor (a durable commit's frees, a failed write's
                // cluster), which counted them as free.
                for c in cs {
                    if !self.alloc.release_now(c) {
                        // The group moved on; pass the cluster to whoever took it.
                        let to = (self.id + 1) % self.shared.inboxes.len();
                        if to != self.id {
                            self.send(to, Msg::Free(vec![c]));
                        }
                    }
                }
            }
            Msg::GroupAsk { from } => {
                // Nothing goes while a group that just arrived waits for the writes it came
                // for: it would be the freest and go straight back, and two dry reactors
                // passed one group to and fro without either using it (a livelock near
                // full). Otherwise the freest group goes, the last one too, so that a write
                // load on one reactor's shards can use the whole pool.
                let group = if self.fresh_group {
                    None
                } else {
                    self.alloc.donate()
                };
                self.give_group(from, group);
            }
            Msg::GroupGive { group, from } => self.on_group(group, from),
        }
    }

    /// Handle the messages this reactor sent itself.
    fn drain_local(&mut self) -> bool {
        let mut progress = false;
        while let Some(m) = self.local.pop_front() {
            self.handle(m);
            progress = true;
        }
        progress
    }

    /// One pass of the loop: bounded work from every source. Returns true on progress.
    fn pass(&mut self) -> bool {
        let mut progress = false;
        self.done_clock = None;
        for _ in 0..256 {
            match self.shared.inboxes[self.id].queue.pop() {
                Some(m) => {
                    self.handle(m);
                    progress = true;
                }
                None => break,
            }
        }
        progress |= self.drain_local();
        self.done_clock = None;
        progress |= self.reap();
        self.done_clock = None;
        while let Some(op) = self.ready.pop_front() {
            self.run_op(op);
            progress = true;
        }
        self.fresh_group = false;
        self.done_clock = None;
        progress |= self.run_jobs();
        progress |= self.run_drops();
        progress |= self.deliver_completions();
        progress |= self.run_pollers();
        // Start what the pollers just submitted to this reactor's own shards, so their
        // device reads go out with this pass's submit rather than one pass later.
        progress |= self.drain_local();
        if self.journal.has_pending()
            && (self.last_commit.elapsed() > Duration::from_millis(50)
                || (self.dev().runs_inline() && self.journal.staged_blocks() >= SYNC_COMMIT_BLOCKS))
        {
            self.commit_wanted(None);
        }
        self.maybe_commit();
        progress |= self.flush_outboxes();
        self.shared.stats[self.id]
            .in_flight
            .store(self.ops.len() as u64, Ordering::Relaxed);
        // An empty submit is a wasted syscall on every spinning pass: completions are
        // reaped from the shared ring without one. `Ring::submit` enters only when entries
        // wait or the kernel holds deferred completions for us (TASKRUN flag: they are run
        // by an enter with GETEVENTS, which it then passes).
        self.submit();
        progress
    }

    fn reap(&mut self) -> bool {
        // Handlers may queue new inline completions; those wait for the next pass.
        let mut done = std::mem::take(&mut self.reaped);
        if let Some(inline) = &mut self.inline {
            inline.reap(&mut done);
        }
        self.ring.reap(&mut done);
        let progress = !done.is_empty();
        for &(ud, res) in &done {
            let Some(c) = self.conts.remove(ud as usize) else {
                continue;
            };
            match c {
                Cont::Data { op, len } => self.on_data(op, res, len),
                Cont::Commit { len } => self.on_commit_step(res, len),
                Cont::Bell => self.bell_armed = false,
                Cont::PollFd { poller } => {
                    if self.poll_armed.get(&poller).is_some_and(|a| a.2 == ud) {
                        self.poll_armed.remove(&poller);
                    }
                }
                Cont::Cancel => {}
            }
        }
        done.clear();
        self.reaped = done;
        progress
    }

    fn sleep(&mut self) {
        if !self.bell_armed {
            let fd = self.shared.inboxes[self.id].bell.fd;
            let key = self.conts.insert(Cont::Bell) as u64;
            // SAFETY: the buffer is the reactor's own and boxed (its address is stable),
            // and `ring` is declared before it: the ring is torn down first.
            unsafe { self.ring.read_eventfd(fd, &mut *self.bell_buf, key) };
            self.bell_armed = true;
        }
        // One readiness poll per poller, re-armed only when it fired or its fd or events
        // changed (a connection with output waiting also needs POLLOUT).
        let mut arm = Vec::new();
        for k in 0..self.pollers.len() {
            if let Some((fd, ev)) = self.pollers[k].as_ref().and_then(|p| p.wait_fd()) {
                match self.poll_armed.get(&k) {
                    Some(&(f, e, _)) if f == fd && e == ev => {}
                    _ => arm.push((k, fd, ev)),
                }
            }
        }
        for (k, fd, ev) in arm {
            self.disarm(k);
            let key = self.conts.insert(Cont::PollFd { poller: k }) as u64;
            self.ring.poll_fd(fd, ev, key);
            self.poll_armed.insert(k, (fd, ev, key));
        }
        let bell = self.shared.inboxes[self.id].bell.clone();
        bell.sleeping.store(true, Ordering::SeqCst);
        let idle = self.shared.inboxes[self.id].queue.is_empty()
            && self.shared.inboxes[self.id].sink.is_empty()
            && self.done_here.is_empty()
            && self.local.is_empty()
            && self.ready.is_empty()
            && self.inline.as_ref().is_none_or(Inline::is_idle)
            && self.drops.is_empty();
        if idle {
            let timeout = Duration::from_millis(if self.journal.has_pending() { 20 } else { 200 });
            // A failed wait (a signal) returns to the loop, which spins and sleeps again.
            let _ = self.ring.wait(timeout);
        }
        bell.sleeping.store(false, Ordering::SeqCst);
    }

    /// Cancel a poller's readiness poll, if one is in flight.
    fn disarm(&mut self, k: usize) {
        if let Some((_, _, key)) = self.poll_armed.remove(&k) {
            let me = self.conts.insert(Cont::Cancel) as u64;
            self.ring.cancel(key, me);
        }
    }

    /// Make the reactor ready to run on this thread: a ring set up disabled for deferred
    /// task work is enabled by the thread that will be its only issuer.
    pub fn start(&mut self) -> std::io::Result<()> {
        self.ring.enable()
    }

    /// The loop, after `start`: runs until the engine stops and nothing is in flight.
    pub fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        let mut idle_passes = 0u32;
        loop {
            let progress = self.pass();
            if progress {
                idle_since = None;
                idle_passes = 0;
                continue;
            }
            if self.shared.stopping.load(Ordering::Acquire)
                && self.ops.is_empty()
                && !self.commit.in_flight
                && self.pollers() == 0
                && self.conts.len() <= usize::from(self.bell_armed)
            {
                break;
            }
            idle_passes += 1;
            if self.shared.poll == PollMode::Adaptive {
                // Spin politely: a thread woken on this core (a client on a small machine)
                // runs now instead of waiting out the spin budget.
                std::thread::yield_now();
                if idle_passes.is_multiple_of(32) {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.shared.spin {
                        self.sleep();
                        idle_since = None;
                    }
                }
            } else if self.shared.poll == PollMode::Busy {
                std::hint::spin_loop();
            }
        }
    }
}
