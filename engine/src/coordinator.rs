//! The coordinator side of snapshots and clones (DESIGN.md section 5): it drives the
//! per-core barrier, writes the overall records to the control log once every reactor's
//! part is durable, and tracks background inflates.

use crate::barrier::{
    self, BarrierId, Deadlines, Outcome, Participants, Plan, Reply, Round, Scope, ToParticipant,
};
use crate::control::{check_size, info_of, meta_of, vol_state};
use crate::engine::{now_unix, valid_name, ControlState, Engine, VolumeInfo};
use crate::error::{ControlError, IoError};
use crate::journal::{ImageKind, Record, VolumeRecord, FLAG_PROTECTED, FLAG_SCHEDULED};
use crate::map::NONE;
use crate::reactor::Reactor;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, MutexGuard};
use std::time::{Duration, Instant};

/// How often the housekeeper looks for work. Short: under a stream of redirects a journal
/// ring fills from half to full in tens of milliseconds, and records then wait (and frees
/// with them) until a checkpoint makes room.
const HOUSEKEEPING: Duration = Duration::from_millis(10);
/// Inflate progress (a scan of the clone's maps on every reactor) is looked at every tenth.
const INFLATE_EVERY: u64 = 10;

/// A snapshot as the control plane shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub id: crate::io::VolumeId,
    pub created_unix: u64,
    pub epoch: u64,
    /// Bytes of clusters it references.
    pub allocated_bytes: u64,
    /// Bytes only it references: what deleting it frees.
    pub exclusive_bytes: u64,
    /// Bytes it shares with its volume, other snapshots or clones.
    pub shared_bytes: u64,
    /// Taken by a schedule (recorded when it was taken): the only kind a schedule expires.
    pub scheduled: bool,
    /// Protected: nothing deletes it until it is unprotected.
    pub protected: bool,
}

/// Progress of a clone inflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflateProgress {
    /// Clusters copied so far.
    pub done: u64,
    /// Clusters to copy in all.
    pub total: u64,
    /// The clone no longer depends on its snapshot.
    pub finished: bool,
}

type Done = Box<dyn FnOnce(Result<(), IoError>) + Send>;

impl Engine {
    /// Checkpoint now if a journal asked for one. Operations that wait for a reactor's
    /// commit while holding the control lock call this first: a commit that finds its
    /// ring full waits for a checkpoint, and the housekeeper cannot take the lock to write
    /// it, so the operation would stall until its 60 s timeout.
    fn journal_room(&self, c: &mut ControlState) -> Result<(), ControlError> {
        if self.journal_nearly_full() {
            self.checkpoint_locked(c)?;
        }
        Ok(())
    }

    /// Run `f` on every reactor, each given a completion callback; wait until every reactor
    /// called it (or `deadline`), returning the first error.
    ///
    /// The caller holds the control lock, so nobody else can checkpoint meanwhile: a reactor
    /// whose journal ring fills while we wait (its commit then waits for a checkpoint) is
    /// served here, or the two would wait for each other.
    pub(crate) fn on_all_until(
        &self,
        c: &mut ControlState,
        deadline: Duration,
        f: impl Fn(&mut Reactor, Done) + Send + Sync + 'static,
    ) -> Result<Result<(), IoError>, ()> {
        let (tx, rx) = mpsc::channel::<Result<(), IoError>>();
        let f = Arc::new(f);
        let n = self.reactors();
        for r in 0..n {
            let (f, tx) = (f.clone(), tx.clone());
            self.inner.shared.send_blocking(
                r,
                crate::reactor::Msg::Task(Box::new(move |re: &mut Reactor| {
                    let done: Done = Box::new(move |res| {
                        let _ = tx.send(res);
                    });
                    f(re, done)
                })),
            );
        }
        drop(tx);
        self.wait_answers(c, &rx, n, Instant::now() + deadline, || false)
    }

    /// Wait for `n` answers on `rx` until `end`, returning the first error; Err(()) at
    /// `end`, when the senders are gone, or when `give_up` (asked every 20 ms without an
    /// answer) says so. Checkpoints a reactor waits for are written here meanwhile (see
    /// `on_all_until`).
    fn wait_answers(
        &self,
        c: &mut ControlState,
        rx: &mpsc::Receiver<Result<(), IoError>>,
        n: usize,
        end: Instant,
        mut give_up: impl FnMut() -> bool,
    ) -> Result<Result<(), IoError>, ()> {
        let mut result = Ok(());
        let mut answered = 0;
        while answered < n {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            match rx.recv_timeout(left.min(Duration::from_millis(20))) {
                Ok(r) => {
                    answered += 1;
                    if let (Err(e), true) = (r, result.is_ok()) {
                        result = Err(e);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if give_up() {
                        return Err(());
                    }
                    if self.checkpoint_wanted() {
                        tracing::info!("checkpoint while waiting for reactors");
                        if let Err(e) = self.checkpoint_locked(c) {
                            tracing::error!("checkpoint while waiting for reactors failed: {e}");
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(()),
            }
        }
        Ok(result)
    }

    /// Run one barrier round over every reactor (see `barrier`), without the control lock:
    /// the caller marked the volume busy, so no other control operation changes it
    /// meanwhile, and checkpoints go on (a reactor whose journal fills during the commit
    /// waits for one).
    fn barrier(&self, vol: u64, scope: Scope, plan: Plan) -> Outcome {
        let id = BarrierId(self.inner.barriers.fetch_add(1, Ordering::Relaxed));
        let n = self.reactors();
        let mut round = Round::new(
            id,
            vol,
            scope,
            plan,
            n,
            Deadlines::default(),
            Instant::now(),
        );
        let shared = &self.inner.shared;
        barrier::run(&mut round, &Reactors(shared), &mut || {
            shared.epoch.fetch_add(1, Ordering::AcqRel)
        })
    }

    /// The control state once volume `name` is in no barrier (returned as is when there is
    /// no such volume: the caller reports it).
    pub(crate) fn control_idle(&self, name: &str) -> MutexGuard<'_, ControlState> {
        let mut c = self.control();
        while c.find_volume(name).is_some_and(|v| c.busy.contains(&v.id)) {
            c = self.inner.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c
    }

    /// Take a crash-consistent snapshot of a volume through the barrier.
    pub fn snapshot_create(&self, volume: &str, name: &str) -> Result<SnapshotInfo, ControlError> {
        self.snapshot_create_flagged(volume, name, 0)
    }

    /// `snapshot_create` for a schedule: the snapshot is recorded as scheduled, which is
    /// what lets the schedule expire it later (its name plays no part).
    pub fn snapshot_create_scheduled(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ControlError> {
        self.snapshot_create_flagged(volume, name, FLAG_SCHEDULED)
    }

    fn snapshot_create_flagged(
        &self,
        volume: &str,
        name: &str,
        flags: u8,
    ) -> Result<SnapshotInfo, ControlError> {
        if !valid_name(name) {
            return Err(ControlError::BadName(name.into()));
        }
        let (v, snap, _busy) = {
            let mut c = self.control_idle(volume);
            let v = c
                .find_volume(volume)
                .cloned()
                .ok_or_else(|| ControlError::UnknownVolume(volume.into()))?;
            if c.snapshots_of(v.id).iter().any(|s| s.name == name) {
                return Err(ControlError::Exists(format!("{volume}@{name}")));
            }
            let snap = c.state.next_volume_id;
            c.state.next_volume_id += 1;
            let busy = Busy::mark(self, &mut c, v.id);
            (v, snap, busy)
        };
        let vol = v.id;
        let started = Instant::now();
        let (epoch, drained) = match self.barrier(vol, Scope::Writes, Plan::Snapshot { snap }) {
            Outcome::Committed { epoch, drained } => (epoch, drained),
            Outcome::Aborted => {
                tracing::warn!(
                    volume,
                    snapshot = name,
                    "snapshot barrier timed out; released"
                );
                return Err(ControlError::BarrierTimeout);
            }
            Outcome::Failed(e) => return Err(ControlError::Io(e)),
        };
        let paused = started.elapsed();
        let mut c = self.control();
        let rec = VolumeRecord {
            id: snap,
            name: name.into(),
            size: v.size,
            block_size: v.block_size,
            created_unix: now_unix(),
            kind: ImageKind::Snapshot,
            of: vol,
            epoch,
            flags,
        };
        self.log_control(&mut c, Record::SnapshotCreate(rec.clone()))?;
        if let Some(vr) = c.state.volumes.get_mut(&vol) {
            vr.epoch = epoch;
        }
        c.state.volumes.insert(snap, rec.clone());
        self.inner
            .shared
            .volumes
            .insert(Arc::new(meta_of(&rec, Some(volume))));
        tracing::info!(
            volume,
            snapshot = name,
            epoch,
            drain_us = drained.as_micros() as u64,
            barrier_us = paused.as_micros() as u64,
            "snapshot created"
        );
        Ok(SnapshotInfo {
            volume: volume.into(),
            name: name.into(),
            id: crate::io::VolumeId(snap),
            created_unix: rec.created_unix,
            epoch,
            allocated_bytes: 0,
            exclusive_bytes: 0,
            shared_bytes: 0,
            scheduled: flags & FLAG_SCHEDULED != 0,
            protected: false,
        })
    }

    /// Protect a snapshot from deletion (by hand, by a schedule's expiry, with its volume),
    /// or lift that; recorded in the control log, so it holds across restarts.
    pub fn snapshot_protect(
        &self,
        volume: &str,
        name: &str,
        protected: bool,
    ) -> Result<(), ControlError> {
        let mut c = self.control();
        let (_, s) = Self::find_snapshot(&c, volume, name)?;
        let flags = if protected {
            s.flags | FLAG_PROTECTED
        } else {
            s.flags & !FLAG_PROTECTED
        };
        if flags == s.flags {
            return Ok(());
        }
        self.log_control(&mut c, Record::ImageFlags { id: s.id, flags })?;
        if let Some(rec) = c.state.volumes.get_mut(&s.id) {
            rec.flags = flags;
        }
        tracing::info!(
            volume,
            snapshot = name,
            protected,
            "snapshot protection changed"
        );
        Ok(())
    }

    fn find_snapshot(
        c: &ControlState,
        volume: &str,
        name: &str,
    ) -> Result<(VolumeRecord, VolumeRecord), ControlError> {
        let v = c
            .find_volume(volume)
            .cloned()
            .ok_or_else(|| ControlError::UnknownVolume(volume.into()))?;
        let s = c
            .snapshots_of(v.id)
            .into_iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownSnapshot {
                volume: volume.into(),
                snapshot: name.into(),
            })?;
        Ok((v, s))
    }

    /// Delete a snapshot; clusters nothing else references are freed in the background.
    pub fn snapshot_delete(&self, volume: &str, name: &str) -> Result<(), ControlError> {
        let mut c = self.control();
        let (_, s) = Self::find_snapshot(&c, volume, name)?;
        if s.flags & FLAG_PROTECTED != 0 {
            return Err(ControlError::Protected(format!("{volume}@{name}")));
        }
        let clones: Vec<String> = c.clones_of(s.id).iter().map(|v| v.name.clone()).collect();
        if !clones.is_empty() {
            return Err(ControlError::InUse(format!(
                "clones depend on {volume}@{name}: {} (inflate or delete them first)",
                clones.join(", ")
            )));
        }
        let id = s.id;
        self.log_control(&mut c, Record::SnapshotDelete { id })?;
        c.state.volumes.remove(&id);
        self.inner.shared.volumes.remove(id);
        self.on_all(move |r| {
            if let Some(v) = r.vols.get_mut(&id) {
                v.deleting = true;
                if v.inflight == 0 {
                    r.drop_image(id);
                }
            }
        });
        tracing::info!(volume, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Snapshots of one volume (or of all), oldest first, with their space.
    pub fn snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>, ControlError> {
        let c = self.control();
        let vols: Vec<VolumeRecord> = match volume {
            Some(n) => vec![c
                .find_volume(n)
                .cloned()
                .ok_or_else(|| ControlError::UnknownVolume(n.into()))?],
            None => c
                .state
                .volumes
                .values()
                .filter(|v| v.kind == ImageKind::Volume)
                .cloned()
                .collect(),
        };
        let cs = self.inner.shared.layout.cluster_size;
        let mut out = Vec::new();
        for v in vols {
            for s in c.snapshots_of(v.id) {
                let id = s.id;
                let (all, own) = self
                    .on_all(move |r| r.image_space(id))
                    .into_iter()
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                out.push(SnapshotInfo {
                    volume: v.name.clone(),
                    name: s.name.clone(),
                    id: crate::io::VolumeId(id),
                    created_unix: s.created_unix,
                    epoch: s.epoch,
                    allocated_bytes: all * cs,
                    exclusive_bytes: own * cs,
                    shared_bytes: (all - own) * cs,
                    scheduled: s.flags & FLAG_SCHEDULED != 0,
                    protected: s.flags & FLAG_PROTECTED != 0,
                });
            }
        }
        Ok(out)
    }

    /// A writable clone of a snapshot, sharing every cluster until written.
    pub fn clone_create(
        &self,
        volume: &str,
        snapshot: &str,
        new: &str,
    ) -> Result<VolumeInfo, ControlError> {
        if !valid_name(new) {
            return Err(ControlError::BadName(new.into()));
        }
        let mut c = self.control();
        let (_, s) = Self::find_snapshot(&c, volume, snapshot)?;
        if c.find_volume(new).is_some() {
            return Err(ControlError::Exists(new.into()));
        }
        check_size(s.size, s.block_size)?;
        let rec = VolumeRecord {
            id: c.state.next_volume_id,
            name: new.into(),
            size: s.size,
            block_size: s.block_size,
            created_unix: now_unix(),
            kind: ImageKind::Volume,
            of: s.id,
            epoch: s.epoch,
            flags: 0,
        };
        self.journal_room(&mut c)?;
        c.state.next_volume_id += 1;
        let (id, from) = (rec.id, s.id);
        let r2 = rec.clone();
        // Each region records the clone's maps first; the control record makes it exist.
        match self.on_all_until(&mut c, Duration::from_secs(60), move |r, done| {
            r.clone_image(id, from, vol_state(&r2), done)
        }) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ControlError::Io(e)),
            Err(()) => return Err(ControlError::Io(IoError::Device(libc::ETIMEDOUT))),
        }
        self.log_control(&mut c, Record::VolumeCreate(rec.clone()))?;
        c.state.volumes.insert(id, rec.clone());
        self.inner
            .shared
            .volumes
            .insert(Arc::new(meta_of(&rec, None)));
        tracing::info!(origin = %format!("{volume}@{snapshot}"), clone = new, "clone created");
        Ok(info_of(&rec))
    }

    /// The image named `volume` or `volume@snapshot`, and whether it is read-only.
    pub fn image(&self, name: &str) -> Option<(VolumeInfo, bool)> {
        let c = self.control();
        match name.split_once('@') {
            None => c.find_volume(name).map(|v| (info_of(v), false)),
            Some((vol, snap)) => {
                let v = c.find_volume(vol)?;
                let s = c.snapshots_of(v.id).into_iter().find(|s| s.name == snap)?;
                Some((
                    VolumeInfo {
                        name: name.to_string(),
                        ..info_of(s)
                    },
                    true,
                ))
            }
        }
    }

    /// Like `image`, but read from the table the submit path uses, without the control
    /// lock: safe on a reactor thread (target sessions resolving export names), where
    /// `image` can deadlock with a control operation that holds the lock and waits for
    /// every reactor (a checkpoint, a snapshot barrier).
    pub fn image_nowait(&self, name: &str) -> Option<(VolumeInfo, bool)> {
        let m = self.inner.shared.volumes.by_name(name)?;
        Some((meta_info(&m), m.read_only))
    }

    /// Like `volumes` (read-write volumes, by name), without the control lock; see
    /// `image_nowait`.
    pub fn volumes_nowait(&self) -> Vec<VolumeInfo> {
        let all = self.inner.shared.volumes.all();
        all.iter()
            .filter(|m| !m.read_only)
            .map(|m| meta_info(m))
            .collect()
    }

    /// Names of a volume's snapshots, oldest first.
    pub fn snapshot_names(&self, volume: &str) -> Vec<String> {
        let c = self.control();
        c.find_volume(volume).map_or_else(Vec::new, |v| {
            c.snapshots_of(v.id)
                .iter()
                .map(|s| s.name.clone())
                .collect()
        })
    }

    /// The snapshot a clone still depends on, as `volume@snapshot`.
    pub fn origin_of(&self, volume: &str) -> Option<String> {
        let c = self.control();
        let v = c.find_volume(volume)?;
        let s = c.state.volumes.get(&v.of)?;
        let parent = c.state.volumes.get(&s.of)?;
        Some(format!("{}@{}", parent.name, s.name))
    }

    /// Start copying every cluster a clone shares with its snapshot (background).
    pub fn clone_inflate(&self, volume: &str) -> Result<InflateProgress, ControlError> {
        let id = {
            let mut c = self.control();
            let v = c
                .find_volume(volume)
                .cloned()
                .ok_or_else(|| ControlError::UnknownVolume(volume.into()))?;
            if v.of == NONE {
                return Err(ControlError::InUse(format!(
                    "volume '{volume}' is not a clone (or is already independent)"
                )));
            }
            if let std::collections::hash_map::Entry::Vacant(e) = c.inflating.entry(v.id) {
                let id = v.id;
                let total: u64 = self.on_all(move |r| r.queue_inflate(id)).into_iter().sum();
                e.insert(total);
                tracing::info!(volume, clusters = total, "inflate started");
            }
            v.id
        };
        Ok(self.inflate_progress_of(id))
    }

    /// Progress of a clone inflate.
    pub fn inflate_progress(&self, volume: &str) -> Result<InflateProgress, ControlError> {
        let id = self
            .control()
            .find_volume(volume)
            .map(|v| v.id)
            .ok_or_else(|| ControlError::UnknownVolume(volume.into()))?;
        Ok(self.inflate_progress_of(id))
    }

    fn inflate_progress_of(&self, id: u64) -> InflateProgress {
        let mut c = self.control();
        let Some(v) = c.state.volumes.get(&id).cloned() else {
            return InflateProgress {
                done: 0,
                total: 0,
                finished: false,
            };
        };
        let Some(&total) = c.inflating.get(&id) else {
            return InflateProgress {
                done: 0,
                total: 0,
                finished: v.of == NONE,
            };
        };
        let left: u64 = self
            .on_all(move |r| {
                let n = r.dependent_clusters(id);
                if n > 0 && r.inflates.is_empty() && r.jobs_in_flight == 0 {
                    // Written while inflating (redirected into new clusters): queue those too.
                    r.queue_inflate(id);
                }
                n
            })
            .into_iter()
            .sum();
        if left > 0 {
            return InflateProgress {
                done: total.saturating_sub(left),
                total: total.max(left),
                finished: false,
            };
        }
        // Make the copies durable, then record that the clone stands alone.
        if self.journal_room(&mut c).is_err() {
            return InflateProgress {
                done: total,
                total,
                finished: false,
            };
        }
        let flushed = self.on_all_until(&mut c, Duration::from_secs(60), |r, done| {
            r.commit_wanted(Some(crate::reactor::Waiter::Call(done)));
        });
        if !matches!(flushed, Ok(Ok(()))) {
            return InflateProgress {
                done: total,
                total,
                finished: false,
            };
        }
        if self
            .log_control(&mut c, Record::CloneInflated { id })
            .is_ok()
        {
            if let Some(r) = c.state.volumes.get_mut(&id) {
                r.of = NONE;
            }
            c.inflating.remove(&id);
            tracing::info!(volume = %v.name, "inflate finished; the clone no longer depends on its snapshot");
        }
        InflateProgress {
            done: total,
            total,
            finished: true,
        }
    }

    /// Return a volume to a snapshot's contents, through the barrier with reads held too:
    /// in-flight I/O to the volume drains first; the caller makes sure no host is writing
    /// (the daemon refuses for exported volumes unless forced).
    pub fn rollback(&self, volume: &str, snapshot: &str) -> Result<(), ControlError> {
        let (vol, snap, _busy) = {
            let mut c = self.control_idle(volume);
            let (v, s) = Self::find_snapshot(&c, volume, snapshot)?;
            let busy = Busy::mark(self, &mut c, v.id);
            (v.id, s.id, busy)
        };
        match self.barrier(vol, Scope::All, Plan::Rollback { snap }) {
            Outcome::Committed { .. } => {}
            Outcome::Aborted => return Err(ControlError::BarrierTimeout),
            Outcome::Failed(e) => return Err(ControlError::Io(e)),
        }
        tracing::info!(volume, snapshot, "volume rolled back");
        Ok(())
    }

    /// Background upkeep: a checkpoint when a journal is half full (looked at every
    /// `HOUSEKEEPING`), and finishing inflates (every `INFLATE_EVERY` of those).
    pub(crate) fn housekeeping(&self, tick: u64) {
        if self.checkpoint_wanted() {
            if let Err(e) = self.checkpoint() {
                tracing::error!("checkpoint failed: {e}");
            }
        }
        if !tick.is_multiple_of(INFLATE_EVERY) {
            return;
        }
        let ids: Vec<u64> = self.control().inflating.keys().copied().collect();
        for id in ids {
            self.inflate_progress_of(id);
        }
    }
}

/// The reactors as barrier participants: participant i is reactor i.
struct Reactors<'a>(&'a crate::reactor::Shared);

impl Participants for Reactors<'_> {
    fn send(&self, to: usize, m: ToParticipant, reply: &Reply) {
        self.0
            .send_blocking(to, crate::reactor::Msg::Barrier(m, reply.clone()));
    }
}

/// A volume in a barrier: control operations on it wait (`control_idle`) until this is
/// dropped.
struct Busy<'a> {
    engine: &'a Engine,
    vol: u64,
}

impl<'a> Busy<'a> {
    fn mark(engine: &'a Engine, c: &mut ControlState, vol: u64) -> Busy<'a> {
        c.busy.insert(vol);
        Busy { engine, vol }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.engine.control().busy.remove(&self.vol);
        self.engine.inner.idle.notify_all();
    }
}

/// Start the thread that checkpoints and runs schedules until the engine is dropped or
/// stopped. It stays off the CPUs of pinned reactors (`reactor_cpus`; empty when they
/// float).
pub(crate) fn spawn_housekeeper(
    weak: std::sync::Weak<crate::engine::Inner>,
    reactor_cpus: Vec<usize>,
) {
    let _ = std::thread::Builder::new()
        .name("housekeeper".into())
        .spawn(move || {
            keep_off_cpus(&reactor_cpus);
            for tick in 1.. {
                std::thread::sleep(HOUSEKEEPING);
                let Some(inner) = weak.upgrade() else { break };
                let e = Engine { inner };
                if e.is_stopped() {
                    break;
                }
                e.housekeeping(tick);
            }
        });
}

/// Move the calling thread off `cpus` (pinned reactors' CPUs). A pinned reactor spins on
/// its CPU; a checkpoint (encoding and writing hundreds of MiB on a large pool) that the
/// scheduler puts beside it takes its time slices from that reactor's I/O. When reactors
/// hold every CPU the thread stays where it is, at normal priority: a starved checkpoint
/// would let the journals fill, and full journals hold up flushes.
fn keep_off_cpus(cpus: &[usize]) {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    if cpus.is_empty() {
        return;
    }
    let me = Pid::from_raw(0);
    let Ok(allowed) = sched_getaffinity(me) else {
        return;
    };
    let mut spare = CpuSet::new();
    let mut any = false;
    for c in (0..CpuSet::count()).filter(|c| !cpus.contains(c)) {
        if allowed.is_set(c).unwrap_or(false) && spare.set(c).is_ok() {
            any = true;
        }
    }
    if !any {
        tracing::debug!("reactors hold every CPU: the housekeeper shares theirs");
        return;
    }
    if let Err(e) = sched_setaffinity(me, &spare) {
        tracing::warn!(error = %e, "could not move a background thread off the reactors' CPUs");
    }
}

fn meta_info(m: &crate::volume::VolumeMeta) -> VolumeInfo {
    VolumeInfo {
        id: crate::io::VolumeId(m.id),
        name: m.name.clone(),
        size: m.size.load(Ordering::Acquire),
        block_size: m.block_size,
        created_unix: m.created_unix,
    }
}
