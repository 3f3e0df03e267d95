//! Snapshots, clones and their upkeep on the owner reactor (DESIGN.md sections 3 and 5):
//! the barrier's hold and freeze, clone and rollback of this reactor's shards, dropping an
//! image, cluster reference checks, and the background jobs (fill, inflate).

use crate::barrier::{Action, BarrierId, Reply, Scope, ToCoordinator, ToParticipant};
use crate::datapath::{Job, Stage};
use crate::error::IoError;
use crate::io::Op;
use crate::journal::Record;
use crate::map::{MapEntry, MapPage, ShardMap, Validity, NONE};
use crate::reactor::{Hold, Reactor, Shard, VolState, Waiter};
use crate::request::{Parent, ReplyTo};
use rustc_hash::FxHashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Background cluster operations a reactor keeps in flight when it has host work.
const JOBS_BUSY: usize = 1;
/// ... and when it is otherwise idle.
const JOBS_IDLE: usize = 4;

/// Queued background jobs a reactor looks at per pass, at most.
const JOB_LOOKS: usize = 64;

/// Map entries a reactor looks at per pass while it releases a dropped image's clusters
/// (tens of ns each: a 4 GiB snapshot of 64 KiB clusters released in one piece kept the
/// reactor from its I/O for 2-3 ms).
const DROP_LOOKS: usize = 256;

/// While host I/O is in flight, releasing a dropped image takes at most about one part in
/// `DROP_SHARE` of the reactor's time (a 4 GiB snapshot: 2.6 ms of releases in 3 ms with
/// no limit, the foreground at a third of its rate meanwhile; with one part in eight, the
/// null device's foreground still dipped to 0.62-0.93x of its rate).
const DROP_SHARE: u32 = 16;

/// An image being dropped: its shards still to release (the last first), and the next
/// page of the last one.
pub(crate) struct Dropping {
    pub id: u64,
    shards: Vec<u64>,
    page: usize,
    started: Instant,
    /// A busy reactor releases the next batch no sooner than this.
    next: Instant,
}

/// Route of completions of background jobs (no poller has it).
const JOB_ROUTE: u32 = u32::MAX;

fn clone_shards(from: &FxHashMap<u64, Shard>) -> FxHashMap<u64, Shard> {
    from.iter()
        .map(|(s, sh)| {
            (
                *s,
                Shard {
                    map: sh.map.clone(),
                    locks: Default::default(),
                },
            )
        })
        .collect()
}

impl Reactor {
    /// Does any image here that `by` picks still point at cluster `c` (as its cluster or
    /// its parent) at this cluster position? Clusters never move between positions, and
    /// every image of a family keeps shard `s` on the same reactor, so this is the whole
    /// question.
    pub(crate) fn needed(
        &self,
        shard: u64,
        idx: u32,
        c: u64,
        by: impl Fn(u64, &VolState) -> bool,
    ) -> bool {
        self.vols.iter().any(|(id, v)| {
            by(*id, v)
                && v.shards.get(&shard).is_some_and(|s| {
                    let e = s.map.get(idx as usize);
                    e.phys == c || e.parent == c
                })
        })
    }

    /// A reference to `c` at this position was dropped: free it if it was the last (an
    /// image being released still counts: whoever lets go of `c` last frees it).
    pub(crate) fn release_ref(&mut self, shard: u64, idx: u32, c: u64) {
        if c != NONE && !self.needed(shard, idx, c, |_, _| true) {
            self.free_cluster(c);
        }
    }

    /// Release every reference a map made, except through pages another image here still
    /// holds at the same place (those reference the same clusters).
    fn release_map(&mut self, shard: u64, map: ShardMap) {
        for (pi, page) in map.pages().enumerate() {
            if let Some(page) = page {
                self.release_page(shard, pi, page);
            }
        }
    }

    /// Release every reference page `pi` of a map of `shard` made, unless another image here
    /// holds the same page (it references the same clusters). Compared by identity with the
    /// other images' pages, not by reference count: a checkpoint in progress also holds
    /// pages. The page must no longer be in any image's map. Returns the entries looked at.
    fn release_page(&mut self, shard: u64, pi: usize, page: &Arc<MapPage>) -> usize {
        let shared = self.vols.values().any(|v| {
            v.shards
                .get(&shard)
                .and_then(|s| s.map.page(pi))
                .is_some_and(|p| Arc::ptr_eq(p, page))
        });
        if shared {
            return 1;
        }
        for (k, e) in page.iter().enumerate() {
            if e.is_allocated() {
                let idx = (pi * crate::map::ENTRIES_PER_PAGE + k) as u32;
                self.release_ref(shard, idx, e.phys);
                self.release_ref(shard, idx, e.parent);
            }
        }
        page.len()
    }

    /// Forget a deleted volume or snapshot (none of its I/O in flight). The record is
    /// journaled now; its clusters are released a bounded number of map entries per pass
    /// (`run_drops`), so that a large image does not stop this reactor's I/O for the
    /// length of its release. Until then the image stays in `vols`, marked deleting: new
    /// I/O to it fails, checkpoints leave it out, and `needed` still sees the pages not
    /// yet released, so a cluster it shares is freed once, by whoever lets go of it last.
    pub(crate) fn drop_image(&mut self, id: u64) {
        let Some(v) = self.vols.get(&id) else {
            return;
        };
        if self.drops.iter().any(|d| d.id == id) {
            return;
        }
        let shards = v.shards.keys().copied().collect();
        self.journal.append(&Record::Drop { id });
        self.commit_wanted(None);
        self.drops.push_back(Dropping {
            id,
            shards,
            page: 0,
            started: Instant::now(),
            next: Instant::now(),
        });
    }

    /// Release the next pages of the oldest image being dropped, about `DROP_LOOKS`
    /// entries; while host I/O is in flight, only once the previous batch's time times
    /// `DROP_SHARE - 1` has passed. Returns true on progress.
    pub(crate) fn run_drops(&mut self) -> bool {
        let Some(d) = self.drops.front() else {
            return false;
        };
        let id = d.id;
        let now = Instant::now();
        // Host operations in flight now or at the end of the last pass (not background
        // jobs, nor writes waiting for space, which this release may be about to give
        // them). The last pass counts: on synchronous media a pass's operations are all
        // finished by the time this runs, and the next ones are submitted after it.
        let others = self.jobs_in_flight + self.space_waiters.len();
        let last = self.shared.stats[self.id].in_flight.load(Ordering::Relaxed) as usize;
        let busy = self.ops.len() > others || last > others || !self.ready.is_empty();
        if busy && now < d.next {
            return false;
        }
        self.release_some(id);
        if let Some(d) = self.drops.front_mut().filter(|d| d.id == id) {
            d.next = now + now.elapsed() * (DROP_SHARE - 1);
        }
        true
    }

    /// Release about `DROP_LOOKS` entries of image `id`, the oldest being dropped.
    fn release_some(&mut self, id: u64) {
        let mut budget = DROP_LOOKS;
        while budget > 0 {
            let d = self.drops.front_mut().expect("an image being dropped");
            let (shard, pi) = (d.shards.last().copied(), d.page);
            let Some(shard) = shard else {
                // Every page released: the image is gone. Its frees become reusable with
                // the next commit, which also makes the record that dropped it durable.
                let started = self.drops.pop_front().map(|d| d.started);
                self.vols.remove(&id);
                self.commit_wanted(None);
                tracing::info!(
                    core = self.id,
                    image = id,
                    ms = started.map_or(0, |t| t.elapsed().as_millis() as u64),
                    "dropped image released"
                );
                return;
            };
            d.page += 1;
            let Some(map) = self
                .vols
                .get_mut(&id)
                .and_then(|v| v.shards.get_mut(&shard))
                .map(|sh| &mut sh.map)
                .filter(|m| pi < m.page_count())
            else {
                // This shard is done: go on with the next.
                let d = self.drops.front_mut().expect("an image being dropped");
                d.shards.pop();
                d.page = 0;
                if let Some(v) = self.vols.get_mut(&id) {
                    v.shards.remove(&shard);
                }
                continue;
            };
            budget = budget.saturating_sub(match map.take_page(pi) {
                Some(page) => self.release_page(shard, pi, &page),
                None => 1,
            });
        }
    }

    /// A barrier message (see `barrier`): prepare holds, commit acts and releases, abort
    /// releases; each is answered through `reply`.
    pub(crate) fn on_barrier(&mut self, m: ToParticipant, reply: Reply) {
        let from = self.id as u32;
        match m {
            ToParticipant::Prepare {
                barrier,
                vol,
                scope,
            } => self.hold(vol, barrier, scope, reply),
            ToParticipant::Commit {
                barrier,
                vol,
                action,
            } => {
                let done = Box::new(move |result| {
                    reply.send(ToCoordinator::Committed {
                        barrier,
                        from,
                        result,
                    })
                });
                match action {
                    Action::Freeze { snap, epoch } => self.freeze(vol, snap, epoch, done),
                    Action::Rollback { snap } => self.rollback(vol, snap, done),
                }
            }
            ToParticipant::Abort { barrier, vol } => {
                if self
                    .vols
                    .get(&vol)
                    .and_then(|v| v.hold.as_ref())
                    .is_some_and(|h| h.barrier == barrier)
                {
                    self.release_hold(vol);
                }
                reply.send(ToCoordinator::Released { barrier, from });
            }
        }
    }

    /// Barrier, prepare: hold new writes (and reads, with `Scope::All`) to `vol`; answer
    /// ready once those admitted before are done.
    fn hold(&mut self, vol: u64, barrier: BarrierId, scope: Scope, reply: Reply) {
        let Some(v) = self.vols.get_mut(&vol) else {
            return reply.send(ToCoordinator::Ready {
                barrier,
                from: self.id as u32,
            });
        };
        let all = scope == Scope::All;
        v.hold = Some(Hold {
            barrier,
            all,
            pieces: Vec::new(),
            ready: Some(reply),
        });
        let drained = if all {
            v.inflight == 0
        } else {
            v.writes_inflight == 0
        };
        if drained {
            self.hold_drained(vol);
        }
    }

    /// The volume a hold is on has drained: tell the coordinator (once).
    pub(crate) fn hold_drained(&mut self, vol: u64) {
        let from = self.id as u32;
        if let Some(h) = self.vols.get_mut(&vol).and_then(|v| v.hold.as_mut()) {
            if let Some(reply) = h.ready.take() {
                reply.send(ToCoordinator::Ready {
                    barrier: h.barrier,
                    from,
                });
            }
        }
    }

    /// End a hold: held pieces run in arrival order.
    pub(crate) fn release_hold(&mut self, vol: u64) {
        let held = self.vols.get_mut(&vol).and_then(|v| v.hold.take());
        for p in held.map(|h| h.pieces).unwrap_or_default() {
            self.start_piece(p);
        }
    }

    /// Barrier, commit: freeze this reactor's shards of `vol` into snapshot `snap` (pages
    /// shared, nothing copied), release the held writes, and call `done` once the record is
    /// durable.
    fn freeze(
        &mut self,
        vol: u64,
        snap: u64,
        epoch: u64,
        done: Box<dyn FnOnce(Result<(), IoError>) + Send>,
    ) {
        let Some(v) = self.vols.get_mut(&vol) else {
            return done(Err(IoError::UnknownVolume));
        };
        let image = VolState {
            size: v.size,
            block_size: v.block_size,
            read_only: true,
            snap_epoch: epoch,
            shards: clone_shards(&v.shards),
            inflight: 0,
            writes_inflight: 0,
            deleting: false,
            hold: None,
        };
        v.snap_epoch = epoch;
        self.vols.insert(snap, image);
        self.journal.append(&Record::Freeze { vol, snap, epoch });
        self.release_hold(vol);
        self.commit_wanted(Some(Waiter::Call(done)));
    }

    /// A clone `vol` starts with snapshot `from`'s shards here.
    pub(crate) fn clone_image(
        &mut self,
        vol: u64,
        from: u64,
        mut state: VolState,
        done: Box<dyn FnOnce(Result<(), IoError>) + Send>,
    ) {
        let Some(src) = self.vols.get(&from) else {
            return done(Err(IoError::UnknownVolume));
        };
        state.shards = clone_shards(&src.shards);
        self.vols.insert(vol, state);
        self.journal.append(&Record::Clone { vol, from });
        self.commit_wanted(Some(Waiter::Call(done)));
    }

    /// Rollback, once `vol` is drained: its shards here become snapshot `snap`'s.
    fn rollback(&mut self, vol: u64, snap: u64, done: Box<dyn FnOnce(Result<(), IoError>) + Send>) {
        let Some(src) = self.vols.get(&snap) else {
            self.release_hold(vol);
            return done(Err(IoError::UnknownVolume));
        };
        let mut fresh = clone_shards(&src.shards);
        let Some(v) = self.vols.get_mut(&vol) else {
            return done(Err(IoError::UnknownVolume));
        };
        let cps = self.shared.layout.clusters_per_shard() as usize;
        let mut old = Vec::new();
        for (s, sh) in v.shards.iter_mut() {
            let map = fresh
                .remove(s)
                .map_or_else(|| ShardMap::new(cps), |f| f.map);
            old.push((*s, std::mem::replace(&mut sh.map, map)));
        }
        for (s, sh) in fresh {
            v.shards.insert(s, sh);
        }
        // The snapshot's entries still redirected (fills pending when it was taken) come
        // with their parents, and a snapshot is never filled: queue fills for them here, as
        // an open does for every writable image, or the parents stay pinned by this volume
        // after the snapshot is deleted (the model test found two such clusters).
        self.fills.extend(v.shards.iter().flat_map(|(s, sh)| {
            sh.map
                .allocated()
                .filter(|(_, e)| e.parent != NONE)
                .map(move |(i, _)| (vol, *s, i as u32))
        }));
        self.journal.append(&Record::Rollback { vol, snap });
        for (s, map) in old {
            self.release_map(s, map);
        }
        self.release_hold(vol);
        self.commit_wanted(Some(Waiter::Call(done)));
    }

    /// Clusters an image references here, and those no other image references. An image
    /// being released does not count: its clusters are on their way out, and one it shares
    /// with this image is freed by whichever of the two lets go last (what deleting this
    /// image frees, in time).
    pub(crate) fn image_space(&self, id: u64) -> (u64, u64) {
        let Some(v) = self.vols.get(&id) else {
            return (0, 0);
        };
        let mut all = 0;
        let mut own = 0;
        for (s, sh) in &v.shards {
            for (i, e) in sh.map.allocated() {
                all += 1;
                if !self.needed(*s, i as u32, e.phys, |o, v| o != id && !v.deleting) {
                    own += 1;
                }
            }
        }
        (all, own)
    }

    /// Queue every cluster of clone `vol` that still reads through a snapshot; returns how
    /// many were queued.
    pub(crate) fn queue_inflate(&mut self, vol: u64) -> u64 {
        let Some(v) = self.vols.get(&vol) else {
            return 0;
        };
        let mut n = 0;
        for (s, sh) in &v.shards {
            for (i, e) in sh.map.allocated() {
                if e.born <= v.snap_epoch || e.parent != NONE {
                    self.inflates.push_back((vol, *s, i as u32));
                    n += 1;
                }
            }
        }
        n
    }

    /// Start background jobs while host work leaves room. Returns true on progress.
    pub(crate) fn run_jobs(&mut self) -> bool {
        let limit = if self.ops.len() > self.jobs_in_flight || !self.ready.is_empty() {
            JOBS_BUSY
        } else {
            JOBS_IDLE
        };
        let mut progress = false;
        // Each queued job is looked at once per pass at most (a held volume's go back), and
        // at most JOB_LOOKS of them: after a snapshot under load tens of thousands of fills
        // wait, and cycling through all of them while a barrier holds the volume kept the
        // reactor from the barrier's next message for 5-20 ms.
        let mut budget = (self.inflates.len() + self.fills.len()).min(JOB_LOOKS);
        let fills = !self.shared.fills_paused.load(Ordering::Acquire);
        while self.jobs_in_flight < limit && budget > 0 {
            budget -= 1;
            let (job, key) = match self.inflates.pop_front() {
                Some(k) => (Job::Inflate, k),
                None => match if fills { self.fills.pop_front() } else { None } {
                    Some(k) => (Job::Fill, k),
                    None => break,
                },
            };
            progress |= self.start_job(job, key);
        }
        progress
    }

    /// Start a job's operation; false when it was dropped or put back for later.
    fn start_job(&mut self, job: Job, (vol, shard, idx): (u64, u64, u32)) -> bool {
        let Some(v) = self
            .vols
            .get_mut(&vol)
            .filter(|v| !v.deleting && !v.read_only && v.hold.is_none())
        else {
            // A held volume (snapshot barrier, rollback) gets its fills when it is released.
            if self.vols.get(&vol).is_some_and(|v| v.hold.is_some()) {
                match job {
                    Job::Fill => self.fills.push_back((vol, shard, idx)),
                    Job::Inflate => self.inflates.push_back((vol, shard, idx)),
                    Job::None => {}
                }
            }
            return false;
        };
        v.inflight += 1;
        let cs = self.shared.layout.cluster_size;
        let reply = ReplyTo::Reactor(self.id);
        let now = std::time::Instant::now();
        // In a kept request allocation, as a poller's requests are (`ParentPool`).
        let parent = self.parents.make(Parent::build(
            0,
            Op::Write { fua: false },
            0,
            0,
            None,
            reply,
            JOB_ROUTE,
            1,
            now,
        ));
        let span = crate::datapath::Span {
            vol,
            shard,
            idx,
            coff: 0,
            clen: cs as u32,
            buf_off: 0,
            vol_off: shard * self.shared.layout.shard_size + idx as u64 * cs,
        };
        let op = crate::datapath::ClusterOp::new(parent, Op::Write { fua: false }, job, span);
        let k = self.ops.insert(op);
        self.jobs_in_flight += 1;
        self.ready.push_back(k);
        true
    }

    /// Run a job's cluster operation (exclusive on its cluster).
    pub(crate) fn op_job(&mut self, i: usize, job: Job) {
        if !self.acquire(i, true) {
            return;
        }
        let Some((e, snap)) = self.entry_of(i) else {
            return self.finish_op(i, Err(IoError::UnknownVolume));
        };
        let owned = e.is_allocated() && e.born > snap;
        let epoch = self.shared.epoch.load(Ordering::Relaxed);
        let (target, set, ne, drops, fresh) = match job {
            Job::Fill => {
                // Also when a snapshot taken since the redirect shares the entry: filling
                // writes only blocks the cluster does not hold, which no image reads from
                // it, with the parent's immutable bytes. Skipping left the parent pinned by
                // the live entry after every snapshot was deleted (space never reclaimed).
                if !e.is_allocated() || e.parent == NONE {
                    return self.finish_op(i, Ok(()));
                }
                let copy = e.pvalid.minus(e.valid);
                let ne = MapEntry {
                    valid: e.valid.or(copy),
                    parent: NONE,
                    pvalid: Validity::default(),
                    ..e
                };
                (e.phys, copy, ne, [NONE, e.parent], false)
            }
            Job::Inflate => {
                if !e.is_allocated() || (owned && e.parent == NONE) {
                    return self.finish_op(i, Ok(()));
                }
                let set = if e.parent != NONE {
                    e.valid.or(e.pvalid)
                } else {
                    e.valid
                };
                let Some(t) = self.alloc_cluster() else {
                    return self.wait_space(i);
                };
                let ne = MapEntry {
                    phys: t,
                    born: epoch,
                    parent: NONE,
                    valid: set,
                    pvalid: Validity::default(),
                };
                (t, set, ne, [e.phys, e.parent], true)
            }
            Job::None => unreachable!("host operation in op_job"),
        };
        {
            let bounce = self.bounces.take(self.shared.layout.cluster_size as usize);
            let op = self.ops.get_mut(i).expect("op");
            op.base = Some(Box::new(e));
            op.target = target;
            op.fresh = fresh;
            op.new_entry = Some(ne);
            op.drops = drops;
            op.write_set = set;
            op.bounce = Some(bounce);
            op.stage = Stage::RmwRead;
        }
        self.read_blocks_into_bounce(i, &e, set);
        self.maybe_advance(i);
    }

    /// Clusters of clone `vol` that still read through a snapshot here.
    pub(crate) fn dependent_clusters(&self, vol: u64) -> u64 {
        let Some(v) = self.vols.get(&vol) else {
            return 0;
        };
        v.shards
            .values()
            .map(|sh| {
                sh.map
                    .allocated()
                    .filter(|(_, e)| e.born <= v.snap_epoch || e.parent != NONE)
                    .count() as u64
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use crate::io::{Op, Request, VolumeId};
    use crate::{AlignedBuf, Engine, IoError};

    /// Write `byte` over the first `len` bytes of volume `v`.
    fn write_all(e: &Engine, v: u64, len: u64, byte: u8) -> Result<(), IoError> {
        e.client()
            .run(Request {
                tag: 1,
                volume: VolumeId(v),
                op: Op::Write { fua: false },
                offset: 0,
                len,
                buf: Some(AlignedBuf::from_slice(&vec![byte; len as usize])),
            })
            .result
    }

    #[test]
    fn a_barrier_that_cannot_drain_is_abandoned_and_releases_everything() {
        let e = crate::engine::mem_engine(2);
        let len = 2u64 << 20;
        let v = e.create_volume("v", len, 4096).expect("volume").id.0;
        // A write on reactor 1 that never completes, as a device that stopped answering
        // would leave one: that reactor never drains.
        let stuck = |e: &Engine, d: i64| {
            e.on_all(move |r| {
                if r.id == 1 {
                    let vs = r.vols.get_mut(&v).expect("volume state");
                    vs.writes_inflight = (vs.writes_inflight as i64 + d) as _;
                }
            })
        };
        stuck(&e, 1);
        let r = e.snapshot_create("v", "s");
        assert!(
            matches!(r, Err(crate::ControlError::BarrierTimeout)),
            "{r:?}"
        );
        // Nothing stays held or half made: no hold on any reactor, writes go through on
        // both reactors' shards, and the snapshot does not exist.
        assert_eq!(
            e.on_all(move |r| r.vols[&v].hold.is_none()),
            vec![true, true]
        );
        assert_eq!(write_all(&e, v, len, 3), Ok(()));
        assert!(e.snapshots(Some("v")).expect("list").is_empty());
        // Once the stuck write is gone, the same snapshot can be taken.
        stuck(&e, -1);
        e.snapshot_create("v", "s")
            .expect("snapshot after the abort");
        assert_eq!(e.snapshots(Some("v")).expect("list").len(), 1);
    }

    #[test]
    fn a_snapshot_shares_nothing_with_one_being_deleted() {
        let e = crate::engine::mem_engine(2);
        // Two shards, one on each reactor, written whole.
        let len = 2u64 << 20;
        let v = e.create_volume("v", len, 4096).expect("volume").id.0;
        assert_eq!(write_all(&e, v, len, 1), Ok(()));
        let s1 = e.snapshot_create("v", "s1").expect("s1").id.0;
        let s2 = e.snapshot_create("v", "s2").expect("s2").id.0;
        // The volume moves to new clusters: s1 and s2 hold the old ones, between them.
        assert_eq!(write_all(&e, v, len, 2), Ok(()));
        let clusters = len / (16 << 10);
        let space = |e: &Engine| {
            e.on_all(move |r| r.image_space(s2))
                .into_iter()
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        assert_eq!(space(&e), (clusters, 0));
        // Each reactor's part of deleting s1 (as `snapshot_delete`), and s2's space asked
        // before any of s1 is released (a pass of the reactor releases, not a task).
        let during = e
            .on_all(move |r| {
                if let Some(v) = r.vols.get_mut(&s1) {
                    v.deleting = true;
                }
                r.drop_image(s1);
                let releasing = r.drops.iter().any(|d| d.id == s1) && r.vols.contains_key(&s1);
                (releasing, r.image_space(s2))
            })
            .into_iter()
            .fold((true, (0, 0)), |a, (rel, sp)| {
                (a.0 && rel, (a.1 .0 + sp.0, a.1 .1 + sp.1))
            });
        assert_eq!(during, (true, (clusters, clusters)));
        // The pool's own delete (already under way on the reactors) and its listing agree.
        e.snapshot_delete("v", "s1").expect("delete s1");
        let listed = e.snapshots(Some("v")).expect("list");
        let cs = 16 << 10;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].allocated_bytes,
                listed[0].exclusive_bytes,
                listed[0].shared_bytes
            ),
            (clusters * cs, clusters * cs, 0)
        );
        e.shutdown().expect("shutdown");
    }
}
