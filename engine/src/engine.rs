//! The engine: opens a pool, starts one reactor per core, and offers the control
//! operations (volumes, checkpoints, stats) and clients for I/O.

use crate::alloc::{self, Allocator};
use crate::error::{ControlError, PoolError};
use crate::format::{FormatOptions, Superblock};
use crate::io::{Completion, Request, VolumeId};
use crate::journal::{ImageKind, Journal, Record, VolumeRecord};
use crate::layout::Layout;
use crate::map::ShardMap;
use crate::media::DeviceSpec;
use crate::pool::{self, PoolState};
use crate::reactor::{CoreStats, Inbox, Msg, PollMode, Poller, Reactor, Shard, Shared, VolState};
use crate::request::{Doorbell, ReplyTo, Sink};
use crate::volume::{MetaCache, VolumeMeta, VolumeTable};
use crossbeam_queue::ArrayQueue;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// CPU ids to pin one reactor each to (at most the pool's journal regions).
    pub cores: Vec<usize>,
    pub poll: PollMode,
    /// io_uring submission queue entries per reactor.
    pub ring_entries: u32,
    /// Adaptive polling: spin this long before sleeping.
    pub spin: Duration,
    /// Pin reactors to their cores.
    pub pin: bool,
    /// Device reads and writes queued before a reactor enters the kernel to submit them
    /// (the rest go at the end of its pass). 1 submits each at once, as fio does by
    /// default: on a paravirtual disk one submit per batch of completions sends the
    /// device convoys that cost up to a third of its IOPS at QD32 (docs/benchmarks.md).
    /// Larger batches save syscalls on devices that prefer them.
    pub submit_batch: u32,
    /// Test hook: this reactor fails to start as if its ring could not be enabled.
    #[cfg(test)]
    pub(crate) fail_start: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineConfig {
            cores: (0..n).collect(),
            poll: PollMode::Adaptive,
            ring_entries: 256,
            spin: Duration::from_micros(50),
            pin: true,
            submit_batch: 1,
            #[cfg(test)]
            fail_start: None,
        }
    }
}

/// A volume as the control plane shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix: u64,
}

/// Pool space and identity.
#[derive(Clone, Debug)]
pub struct PoolInfo {
    pub uuid: String,
    pub cluster_size: u64,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub devices: Vec<String>,
}

/// One reactor's counters.
#[derive(Clone, Debug, Default)]
pub struct CoreCounters {
    pub core: usize,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    /// Cluster operations in flight now.
    pub in_flight: u64,
    /// Completed requests per latency bucket since start (`percentile_us` reads it).
    pub latency: Vec<u64>,
}

/// Keep this process's memory in 4 KiB pages, not transparent huge pages. Reactors
/// allocate map pages as thin volumes fill and as writes diverge from snapshots; where the
/// allocator or the system (`transparent_hugepage=always`) hands out huge pages, the first
/// touch of each 2 MiB region zeroes all of it on the reactor. Measured with an allocator
/// that asks for huge pages (mimalloc), 1 TiB thin volume under snapshots: 2-3 ms map
/// updates 477 times in 5 s with them, 9 without; p999 write latency 3.6 ms vs 1.1 ms.
/// Binaries call it first in main; children inherit it; a no-op where the kernel lacks it.
pub fn avoid_huge_page_faults() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes nothing but
    // this process's huge page policy.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::debug!("transparent huge pages could not be turned off");
    }
}

/// The latency (µs) below which a fraction `q` of the requests in `hist` completed.
pub fn percentile_us(hist: &[u64], q: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let want = (total as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (b, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want {
            return crate::reactor::bucket_us(b) as f64;
        }
    }
    0.0
}

pub(crate) struct ControlState {
    pub(crate) state: PoolState,
    /// Clones being inflated: clusters queued at the start.
    pub(crate) inflating: HashMap<u64, u64>,
    /// Volumes in a barrier: control operations on them wait (`Engine::control_idle`).
    pub(crate) busy: HashSet<u64>,
}

impl ControlState {
    /// The volume (not snapshot) of that name.
    pub(crate) fn find_volume(&self, name: &str) -> Option<&VolumeRecord> {
        self.state
            .volumes
            .values()
            .find(|v| v.kind == ImageKind::Volume && v.name == name)
    }

    /// Snapshots of volume `id`, oldest first.
    pub(crate) fn snapshots_of(&self, id: u64) -> Vec<&VolumeRecord> {
        let mut v: Vec<&VolumeRecord> = self
            .state
            .volumes
            .values()
            .filter(|s| s.kind == ImageKind::Snapshot && s.of == id)
            .collect();
        v.sort_by_key(|s| s.epoch);
        v
    }

    /// Clones still depending on snapshot `id`.
    pub(crate) fn clones_of(&self, id: u64) -> Vec<&VolumeRecord> {
        self.state
            .volumes
            .values()
            .filter(|v| v.kind == ImageKind::Volume && v.of == id)
            .collect()
    }
}

pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) control: Mutex<ControlState>,
    /// Signalled when a volume leaves a barrier (`ControlState::busy`).
    pub(crate) idle: Condvar,
    /// The next barrier round's id.
    pub(crate) barriers: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
    /// Held while a checkpoint is encoded and written: one at a time, the control lock
    /// held only for its cut.
    checkpointing: Mutex<()>,
    /// First control-log block the newest durable checkpoint needs.
    control_tail: AtomicU64,
    /// Generation of the newest durable checkpoint. The next one goes to the other slot:
    /// after a failed checkpoint write (its slot half written) the retry takes the same
    /// slot again, never the one holding the newest good checkpoint.
    durable_gen: AtomicU64,
}

/// A running engine. Cheap to clone; `shutdown` stops it.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The rule [`valid_name`] checks, for error messages (the engine's and the configuration's).
pub const NAME_RULE: &str = "1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-'";

/// Names of volumes, snapshots and pools. They become export names, IQN parts, file names
/// and command-line arguments, so `.`, `..` (paths) and a leading '-' (an option) are out.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Engine {
    /// Format a pool on the devices.
    pub fn format(devices: &[DeviceSpec], opts: &FormatOptions) -> Result<Superblock, PoolError> {
        pool::format(devices, opts)
    }

    /// Open a pool (recovering it if it was not closed cleanly) and start the reactors.
    pub fn open(devices: &[DeviceSpec], cfg: EngineConfig) -> Result<Engine, PoolError> {
        if devices.is_empty() {
            return Err(PoolError::Geometry(
                "a pool needs at least one device".into(),
            ));
        }
        let (members, sbs) = pool::open_members(devices)?;
        let layout = Layout::new(&sbs);
        let n = cfg.cores.len().max(1);
        if n > layout.sb.journal_regions as usize {
            return Err(PoolError::Geometry(format!(
                "{n} cores requested but the pool was formatted with {} journal regions",
                layout.sb.journal_regions
            )));
        }
        let (mut st, _) = pool::recover(&members, &layout, false)?;
        let maps = std::mem::take(&mut st.maps);
        let mut used = vec![false; layout.total_clusters as usize];
        for m in maps.values() {
            for (_, e) in m.allocated() {
                used[e.phys as usize] = true;
                // A redirected entry still reads blocks from its parent until fill copies
                // them: the parent stays allocated even when no image maps it as its own.
                if e.parent != crate::map::NONE {
                    used[e.parent as usize] = true;
                }
            }
        }
        let used_count = used.iter().filter(|&&u| u).count() as u64;
        tracing::info!(
            volumes = st.volumes.len(),
            used_clusters = used_count,
            total_clusters = layout.total_clusters,
            "pool recovered"
        );
        pool::begin_run(&members, &layout, &mut st, &maps, n as u32)?;

        let gsize = alloc::group_size(layout.total_clusters, n);
        let mut groups = alloc::groups(layout.total_clusters, gsize);
        for g in &mut groups {
            for c in g.first..g.first + g.count {
                if used[c as usize] {
                    g.mark_used(c);
                }
            }
        }
        let group_owner: Vec<AtomicU32> = groups
            .iter()
            .map(|g| AtomicU32::new(g.index % n as u32))
            .collect();
        let mut allocs: Vec<Allocator> = (0..n).map(|_| Allocator::default()).collect();
        for g in groups {
            let r = (g.index as usize) % n;
            allocs[r].groups.push(g);
        }
        let mut inboxes = Vec::new();
        for _ in 0..n {
            let bell = Doorbell::new().map_err(|e| PoolError::Io {
                device: members[0].path(),
                source: e,
            })?;
            inboxes.push(Arc::new(Inbox {
                queue: ArrayQueue::new((cfg.ring_entries as usize * 4).max(1024)),
                sink: Sink::for_reactor(bell.clone()),
                bell,
            }));
        }
        let volumes = VolumeTable::default();
        for v in st.volumes.values() {
            let of = st.volumes.get(&v.of).map(|o| o.name.as_str());
            volumes.insert(Arc::new(meta_of(v, of)));
        }
        let shared = Arc::new(Shared {
            layout: layout.clone(),
            members,
            inboxes,
            volumes,
            epoch: AtomicU64::new(st.epoch),
            used_clusters: AtomicU64::new(used_count),
            stopping: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            want_checkpoint: AtomicBool::new(false),
            journal_fill: (0..n).map(|_| AtomicU32::new(0)).collect(),
            stats: (0..n).map(|_| CoreStats::default()).collect(),
            group_size: gsize,
            group_owner,
            poll: cfg.poll,
            spin: cfg.spin,
            ring_entries: cfg.ring_entries,
            submit_batch: cfg.submit_batch.clamp(1, cfg.ring_entries.max(8)) as usize,
            fills_paused: AtomicBool::new(false),
        });
        let sb = &layout.sb;
        let mut maps_by_reactor: Vec<HashMap<(u64, u64), ShardMap>> =
            (0..n).map(|_| HashMap::new()).collect();
        for ((v, s), m) in maps {
            maps_by_reactor[shared.owner(s)].insert((v, s), m);
        }
        let mut reactors = Vec::new();
        for (r, (alloc, maps)) in allocs.into_iter().zip(maps_by_reactor).enumerate() {
            let j = Journal::new(
                r as u32,
                st.run,
                sb.journal_start + r as u64 * sb.journal_region_bytes,
                sb.journal_region_bytes,
            );
            let mut reactor =
                Reactor::new(r, shared.clone(), alloc, j).map_err(|e| PoolError::Io {
                    device: shared.members[0].path(),
                    source: e,
                })?;
            for v in st.volumes.values() {
                reactor.vols.insert(v.id, vol_state(v));
            }
            for ((v, s), map) in maps {
                if let Some(vs) = reactor.vols.get_mut(&v) {
                    // Fills queued before the close (or crash) are lost with the reactor:
                    // queue again every cluster the image owns that still has a parent.
                    if !vs.read_only {
                        for (i, e) in map.allocated() {
                            if e.parent != crate::map::NONE {
                                reactor.fills.push_back((v, s, i as u32));
                            }
                        }
                    }
                    vs.shards.insert(
                        s,
                        Shard {
                            map,
                            locks: Default::default(),
                        },
                    );
                }
            }
            reactors.push(reactor);
        }
        // Each reactor reports whether it could start (enable its ring) before it runs;
        // the engine opens only when every one did, and otherwise stops the others.
        let (started_tx, started) = std::sync::mpsc::channel::<(usize, std::io::Result<()>)>();
        let mut threads = Vec::new();
        let mut failed: Option<PoolError> = None;
        // Reactor i's CPU (the first when none are configured).
        let cpus: Vec<usize> = cfg
            .cores
            .iter()
            .chain(std::iter::repeat(&0))
            .take(n)
            .copied()
            .collect();
        for (mut reactor, &core) in reactors.into_iter().zip(&cpus) {
            let pin = cfg.pin;
            let tx = started_tx.clone();
            #[cfg(test)]
            let fail = cfg.fail_start == Some(reactor.id);
            let spawned = std::thread::Builder::new()
                .name(format!("reactor-{}", reactor.id))
                .spawn(move || {
                    if pin && !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(core, "could not pin reactor to its core");
                    }
                    let r = reactor.start();
                    #[cfg(test)]
                    let r = if fail {
                        Err(std::io::Error::from_raw_os_error(libc::EBADFD))
                    } else {
                        r
                    };
                    let ok = r.is_ok();
                    let (id, shared) = (reactor.id, reactor.shared.clone());
                    let _ = tx.send((id, r));
                    // AssertUnwindSafe: after a panic the reactor is dropped, never run
                    // again; the flag tells the engine's host to stop the process.
                    let run = std::panic::AssertUnwindSafe(|| reactor.run());
                    if ok && std::panic::catch_unwind(run).is_err() {
                        shared.panicked.store(true, Ordering::Release);
                        tracing::error!(reactor = id, "reactor thread panicked");
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    failed = Some(PoolError::Io {
                        device: shared.members[0].path(),
                        source: e,
                    });
                    break;
                }
            }
        }
        drop(started_tx);
        for _ in 0..threads.len() {
            match started.recv() {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(e))) => {
                    failed.get_or_insert(PoolError::Io {
                        device: shared.members[0].path(),
                        source: std::io::Error::new(
                            e.kind(),
                            format!("reactor {id} could not enable its io_uring ring: {e}"),
                        ),
                    });
                }
                Err(_) => break,
            }
        }
        if let Some(e) = failed {
            shared.stopping.store(true, Ordering::Release);
            for inbox in &shared.inboxes {
                inbox.bell.ring();
            }
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        tracing::info!(reactors = n, poll = ?cfg.poll, "engine started");
        let gen = st.gen;
        let inner = Arc::new(Inner {
            shared,
            control: Mutex::new(ControlState {
                state: st,
                inflating: HashMap::new(),
                busy: HashSet::new(),
            }),
            idle: Condvar::new(),
            barriers: AtomicU64::new(1),
            threads: Mutex::new(threads),
            stopped: AtomicBool::new(false),
            checkpointing: Mutex::new(()),
            control_tail: AtomicU64::new(0),
            durable_gen: AtomicU64::new(gen),
        });
        let pinned = if cfg.pin { cpus } else { Vec::new() };
        crate::coordinator::spawn_housekeeper(Arc::downgrade(&inner), pinned);
        Ok(Engine { inner })
    }

    pub(crate) fn control(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.inner.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on every reactor and collect the answers in reactor order.
    pub(crate) fn on_all<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Reactor) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let n = self.reactors();
        let (tx, rx) = mpsc::channel();
        for r in 0..n {
            let (f, tx) = (f.clone(), tx.clone());
            self.inner.shared.send_blocking(
                r,
                Msg::Task(Box::new(move |re: &mut Reactor| {
                    let _ = tx.send((re.id, f(re)));
                })),
            );
        }
        drop(tx);
        let mut out: Vec<(usize, T)> = rx.iter().collect();
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, t)| t).collect()
    }

    /// Number of reactors.
    pub fn reactors(&self) -> usize {
        self.inner.shared.inboxes.len()
    }

    pub(crate) fn log_control(
        &self,
        c: &mut ControlState,
        rec: Record,
    ) -> Result<(), ControlError> {
        let s = &self.inner.shared;
        let blocks = s.layout.sb.control_bytes / crate::format::BLOCK;
        // The oldest block the newest durable checkpoint needs: one being written meanwhile
        // does not free the log before it is durable.
        let tail = self.inner.control_tail.load(Ordering::Acquire);
        if c.state.control_next - tail + 1 >= blocks {
            self.checkpoint_locked(c)?;
        }
        let seq = c.state.control_next;
        pool::append_control(&s.members[0], &s.layout, c.state.run, seq, &rec)?;
        c.state.control_next += 1;
        Ok(())
    }

    /// Create a thin volume.
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
    ) -> Result<VolumeInfo, ControlError> {
        if !valid_name(name) {
            return Err(ControlError::BadName(name.into()));
        }
        if block_size != 512 && block_size != 4096 {
            return Err(ControlError::BadBlockSize(block_size));
        }
        check_size(size, block_size)?;
        let mut c = self.control();
        if c.find_volume(name).is_some() {
            return Err(ControlError::Exists(name.into()));
        }
        let v = VolumeRecord {
            id: c.state.next_volume_id,
            name: name.into(),
            size,
            block_size,
            created_unix: now_unix(),
            kind: ImageKind::Volume,
            of: crate::map::NONE,
            epoch: 0,
        };
        self.log_control(&mut c, Record::VolumeCreate(v.clone()))?;
        c.state.next_volume_id += 1;
        c.state.volumes.insert(v.id, v.clone());
        let vr = v.clone();
        self.on_all(move |r| {
            r.vols.insert(vr.id, vol_state(&vr));
        });
        self.inner
            .shared
            .volumes
            .insert(Arc::new(meta_of(&v, None)));
        tracing::info!(volume = name, size, block_size, "volume created");
        Ok(info_of(&v))
    }

    /// Delete a volume and free its clusters.
    pub fn delete_volume(&self, name: &str) -> Result<(), ControlError> {
        let mut c = self.control_idle(name);
        let id = c
            .find_volume(name)
            .map(|v| v.id)
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?;
        let snaps: Vec<String> = c.snapshots_of(id).iter().map(|s| s.name.clone()).collect();
        if !snaps.is_empty() {
            return Err(ControlError::InUse(format!(
                "volume '{name}' has snapshots ({}); delete them first",
                snaps.join(", ")
            )));
        }
        self.log_control(&mut c, Record::VolumeDelete { id })?;
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
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Grow a volume.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, ControlError> {
        let mut c = self.control_idle(name);
        let v = c
            .find_volume(name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?;
        check_size(size, v.block_size)?;
        if size < v.size {
            return Err(ControlError::BadSize(format!(
                "{size} is smaller than the current size {}; volumes only grow",
                v.size
            )));
        }
        self.log_control(&mut c, Record::VolumeResize { id: v.id, size })?;
        let id = v.id;
        if let Some(rec) = c.state.volumes.get_mut(&id) {
            rec.size = size;
        }
        self.on_all(move |r| {
            if let Some(vs) = r.vols.get_mut(&id) {
                vs.size = size;
            }
        });
        if let Some(m) = self.inner.shared.volumes.get(id) {
            m.size.store(size, Ordering::Release);
        }
        Ok(VolumeInfo {
            size,
            ..info_of(&v)
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let c = self.control();
        let mut v: Vec<VolumeInfo> = c
            .state
            .volumes
            .values()
            .filter(|v| v.kind == ImageKind::Volume)
            .map(info_of)
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The volume of that name.
    pub fn volume(&self, name: &str) -> Option<VolumeInfo> {
        self.control().find_volume(name).map(info_of)
    }

    /// Bytes of clusters a volume has allocated.
    pub fn allocated_bytes(&self, id: VolumeId) -> u64 {
        let cs = self.inner.shared.layout.cluster_size;
        self.on_all(move |r| {
            r.vols.get(&id.0).map_or(0, |v| {
                v.shards
                    .values()
                    .map(|s| s.map.allocated().count() as u64)
                    .sum::<u64>()
            })
        })
        .into_iter()
        .sum::<u64>()
            * cs
    }

    /// Test hook: hold (true) or resume (false) the background fills of redirected clusters,
    /// so that a test reads blocks that still resolve through a snapshot's cluster (the
    /// parent), which fills otherwise retire within milliseconds.
    #[doc(hidden)]
    pub fn pause_fills(&self, paused: bool) {
        self.inner
            .shared
            .fills_paused
            .store(paused, Ordering::Release);
    }

    /// Deleted volumes and snapshots whose clusters are still being released: a delete is
    /// durable when it returns, but its clusters are released in the background, a few map
    /// pages per reactor pass (`drop_image`). Once this is 0, the next flush (a journal
    /// commit on every reactor) makes all of their space free.
    pub fn releases_pending(&self) -> usize {
        let mut ids: Vec<u64> = self
            .on_all(|r| {
                r.vols
                    .iter()
                    .filter(|(_, v)| v.deleting)
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            })
            .into_iter()
            .flatten()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Bytes of map pages held in memory, and allocated clusters (metadata cost per cluster).
    pub fn map_memory(&self) -> (u64, u64) {
        let v = self.on_all(|r| {
            let mut bytes = 0u64;
            let mut clusters = 0u64;
            for vs in r.vols.values() {
                for s in vs.shards.values() {
                    bytes += s.map.page_bytes() as u64;
                    clusters += s.map.allocated().count() as u64;
                }
            }
            (bytes, clusters)
        });
        v.into_iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Space and identity of the pool.
    pub fn pool_info(&self) -> PoolInfo {
        let s = &self.inner.shared;
        PoolInfo {
            uuid: crate::format::uuid_string(&s.layout.sb.pool_uuid),
            cluster_size: s.layout.cluster_size,
            total_bytes: s.layout.total_clusters * s.layout.cluster_size,
            used_bytes: s.used_clusters.load(Ordering::Relaxed) * s.layout.cluster_size,
            devices: s
                .members
                .iter()
                .map(|m| m.path().display().to_string())
                .collect(),
        }
    }

    /// Per-reactor counters.
    pub fn counters(&self) -> Vec<CoreCounters> {
        self.inner
            .shared
            .stats
            .iter()
            .enumerate()
            .map(|(core, s)| CoreCounters {
                core,
                reads: s.reads.load(Ordering::Relaxed),
                writes: s.writes.load(Ordering::Relaxed),
                read_bytes: s.read_bytes.load(Ordering::Relaxed),
                write_bytes: s.write_bytes.load(Ordering::Relaxed),
                flushes: s.flushes.load(Ordering::Relaxed),
                in_flight: s.in_flight.load(Ordering::Relaxed),
                latency: s
                    .latency
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
            })
            .collect()
    }

    /// A client for submitting requests from a thread outside the reactors.
    pub fn client(&self) -> Client {
        Client {
            shared: self.inner.shared.clone(),
            sink: Sink::for_thread(),
            cache: MetaCache::default(),
            in_flight: 0,
        }
    }

    /// Host a poller (a target connection, say) on reactor `core % reactors`.
    pub fn add_poller(&self, core: usize, p: Box<dyn Poller>) {
        let n = self.reactors();
        let mut p = Some(p);
        let cell = Mutex::new(p.take());
        self.inner.shared.send_blocking(
            core % n,
            Msg::Task(Box::new(move |r: &mut Reactor| {
                if let Some(p) = cell.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    r.add_poller(p);
                }
            })),
        );
    }

    /// True once a reactor thread has panicked: the engine is half alive and its host
    /// must stop (without `shutdown`, which needs every reactor).
    pub fn reactor_panicked(&self) -> bool {
        self.inner.shared.panicked.load(Ordering::Acquire)
    }

    /// True when a reactor asked for a checkpoint (its journal is half full).
    pub fn checkpoint_wanted(&self) -> bool {
        self.inner.shared.want_checkpoint.load(Ordering::Acquire)
    }

    /// True when some reactor's journal ring is more than three quarters full: a control
    /// operation about to wait for commits checkpoints first (the housekeeper usually has,
    /// at half full).
    pub(crate) fn journal_nearly_full(&self) -> bool {
        self.inner
            .shared
            .journal_fill
            .iter()
            .any(|f| f.load(Ordering::Relaxed) > 75)
    }

    /// Write a checkpoint so that journals can be reused. The control lock is held only
    /// while the reactors hand over their maps; the encoding and the writes (hundreds of
    /// milliseconds for a large pool) run without it, so snapshot creates and other control
    /// operations go on meanwhile.
    pub fn checkpoint(&self) -> Result<(), ControlError> {
        let mut c = self.control();
        let one = self
            .inner
            .checkpointing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let cut = self.checkpoint_cut(&mut c);
        drop(c);
        let r = self.checkpoint_write(cut);
        drop(one);
        r
    }

    /// Checkpoint with the control lock held throughout (a control operation that must
    /// have room in the journals or the control log before it goes on).
    pub(crate) fn checkpoint_locked(&self, c: &mut ControlState) -> Result<(), ControlError> {
        // Lock order: control, then checkpointing. A checkpoint being written without the
        // control lock never takes it again, so waiting for it here is safe.
        let _one = self
            .inner
            .checkpointing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let cut = self.checkpoint_cut(c);
        self.checkpoint_write(cut)
    }

    /// The consistent point of a checkpoint, taken under the control lock: each reactor
    /// hands over its maps at a point of its own journal stream (clones of the page
    /// vectors, O(pages), the pages themselves shared; pages written meanwhile are copied
    /// on write), and the volume table and control-log position at the same moment.
    fn checkpoint_cut(&self, c: &mut ControlState) -> (PoolState, Vec<ReactorMaps>) {
        let s = &self.inner.shared;
        s.want_checkpoint.store(false, Ordering::Release);
        let images: Vec<ReactorMaps> = self.on_all(|r| {
            let maps = r
                .vols
                .iter()
                .filter(|(_, v)| !v.deleting)
                .flat_map(|(id, v)| {
                    v.shards
                        .iter()
                        .map(move |(s, sh)| (*id, *s, sh.map.clone()))
                })
                .collect();
            (maps, r.journal.next_seq)
        });
        c.state.gen = self.inner.durable_gen.load(Ordering::Acquire) + 1;
        c.state.epoch = s.epoch.load(Ordering::Acquire);
        c.state.control_seq = c.state.control_next;
        let mut region_seq = vec![0; s.layout.sb.journal_regions as usize];
        for (r, (_, seq)) in images.iter().enumerate() {
            region_seq[r] = *seq;
        }
        c.state.region_seq = region_seq;
        let st = &c.state;
        let state = PoolState {
            run: st.run,
            gen: st.gen,
            next_volume_id: st.next_volume_id,
            epoch: st.epoch,
            control_seq: st.control_seq,
            control_next: st.control_next,
            region_seq: st.region_seq.clone(),
            reactors: st.reactors,
            volumes: st.volumes.clone(),
            maps: HashMap::new(),
        };
        (state, images)
    }

    /// Encode and write a checkpoint cut, then let the journals and the control log reuse
    /// what it covers. Needs no control lock.
    fn checkpoint_write(
        &self,
        (state, images): (PoolState, Vec<ReactorMaps>),
    ) -> Result<(), ControlError> {
        let s = &self.inner.shared;
        let started = Instant::now();
        let bytes: Vec<Vec<u8>> = images
            .iter()
            .map(|(maps, _)| pool::encode_maps(maps.iter().map(|(i, s, m)| (*i, *s, m))))
            .collect();
        drop(images);
        pool::write_checkpoint(&s.members, &s.layout, &state, &bytes)?;
        self.inner.durable_gen.store(state.gen, Ordering::Release);
        let region_seq = state.region_seq.clone();
        self.on_all(move |r| {
            r.journal.tail_seq = region_seq[r.id];
            r.publish_journal_fill();
        });
        self.inner
            .control_tail
            .store(state.control_seq, Ordering::Release);
        tracing::info!(
            generation = state.gen,
            bytes = bytes.iter().map(Vec::len).sum::<usize>(),
            ms = started.elapsed().as_millis() as u64,
            "checkpoint written"
        );
        Ok(())
    }

    /// True once `shutdown` began.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// Stop: fail new requests, let in-flight ones finish, flush, checkpoint, join reactors.
    pub fn shutdown(&self) -> Result<(), ControlError> {
        if self.inner.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let s = &self.inner.shared;
        // Make everything durable while the reactors still run, then checkpoint. The wait
        // serves checkpoints itself: the housekeeper has stopped, and a commit that finds
        // its journal ring full waits for one.
        let r = {
            let mut c = self.control();
            let flushed = self.on_all_until(&mut c, Duration::from_secs(60), |r, done| {
                r.commit_wanted(Some(crate::reactor::Waiter::Call(done)))
            });
            if !matches!(flushed, Ok(Ok(()))) {
                tracing::error!("flush at shutdown failed or timed out");
            }
            self.checkpoint_locked(&mut c)
        };
        s.stopping.store(true, Ordering::Release);
        for inbox in &s.inboxes {
            inbox.bell.sleeping.store(true, Ordering::SeqCst);
            inbox.bell.ring();
        }
        for t in self
            .inner
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        tracing::info!("engine stopped");
        r
    }
}

/// One reactor's maps handed to a checkpoint: (image, shard, map) at journal sequence `.1`.
type ReactorMaps = (Vec<(u64, u64, ShardMap)>, u64);

pub(crate) fn check_size(size: u64, block_size: u32) -> Result<(), ControlError> {
    if size == 0 || !size.is_multiple_of(block_size as u64) {
        return Err(ControlError::BadSize(format!(
            "{size} bytes is not a non-zero multiple of the block size {block_size}"
        )));
    }
    if size > crate::MAX_VOLUME_SIZE {
        return Err(ControlError::BadSize(format!(
            "{size} bytes is above the limit of {} bytes",
            crate::MAX_VOLUME_SIZE
        )));
    }
    Ok(())
}

/// The submit path's view of an image; snapshots are named `volume@snapshot`.
pub(crate) fn meta_of(v: &VolumeRecord, of: Option<&str>) -> VolumeMeta {
    let name = match (v.kind, of) {
        (ImageKind::Snapshot, Some(vol)) => format!("{vol}@{}", v.name),
        _ => v.name.clone(),
    };
    VolumeMeta {
        id: v.id,
        name,
        block_size: v.block_size,
        size: AtomicU64::new(v.size),
        read_only: v.kind != ImageKind::Volume,
        deleted: AtomicBool::new(false),
        created_unix: v.created_unix,
    }
}

pub(crate) fn info_of(v: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        id: VolumeId(v.id),
        name: v.name.clone(),
        size: v.size,
        block_size: v.block_size,
        created_unix: v.created_unix,
    }
}

pub(crate) fn vol_state(v: &VolumeRecord) -> VolState {
    VolState {
        size: v.size,
        block_size: v.block_size,
        read_only: v.kind != ImageKind::Volume,
        snap_epoch: v.epoch,
        shards: Default::default(),
        inflight: 0,
        writes_inflight: 0,
        deleting: false,
        hold: None,
    }
}

/// Submits requests from one thread and collects their completions.
pub struct Client {
    shared: Arc<Shared>,
    sink: Arc<Sink>,
    cache: MetaCache,
    in_flight: usize,
}

impl Client {
    /// Submit a request; its completion comes back through `poll` or `wait`.
    pub fn submit(&mut self, req: Request) {
        self.in_flight += 1;
        let shared = &self.shared;
        crate::dispatch::dispatch(
            shared,
            &mut self.cache,
            req,
            ReplyTo::Sink(self.sink.clone()),
            0,
            Instant::now(),
            Arc::new,
            |to, m| shared.send_blocking(to, m),
        );
    }

    /// Move finished completions into `out`; returns how many.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        while let Some((_, c)) = self.sink.pop() {
            out.push(c);
            n += 1;
        }
        self.in_flight -= n;
        n
    }

    /// Requests submitted and not yet polled.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Block until at least one completion is ready (or `timeout`).
    pub fn wait(&self, timeout: Duration) {
        self.sink.park(timeout);
    }

    /// Submit one request and wait for its completion.
    pub fn run(&mut self, req: Request) -> Completion {
        self.submit(req);
        let mut out = Vec::with_capacity(1);
        loop {
            if self.poll(&mut out) > 0 {
                return out.pop().expect("completion");
            }
            self.wait(Duration::from_millis(100));
        }
    }
}

/// A pool of 64 MiB in memory (16 KiB clusters, 1 MiB shards) opened with `reactors`
/// unpinned adaptive reactors, for the crate's unit tests that work on reactor state.
#[cfg(test)]
pub(crate) fn mem_engine(reactors: usize) -> Engine {
    mem_engine_with(reactors, None).expect("open")
}

#[cfg(test)]
fn mem_engine_with(reactors: usize, fail_start: Option<usize>) -> Result<Engine, PoolError> {
    let dev = [DeviceSpec::Mem(crate::media::MemDisk::new(64 << 20, false))];
    let opts = FormatOptions {
        cluster_size: 16 << 10,
        shard_size: 1 << 20,
        journal_regions: 4,
        force: false,
    };
    Engine::format(&dev, &opts).expect("format");
    let cfg = EngineConfig {
        cores: (0..reactors).collect(),
        poll: PollMode::Adaptive,
        ring_entries: 64,
        spin: Duration::from_micros(20),
        pin: false,
        submit_batch: 1,
        fail_start,
    };
    Engine::open(&dev, cfg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reactor_that_cannot_start_fails_the_open_and_stops_the_others() {
        let t = std::time::Instant::now();
        match super::mem_engine_with(3, Some(1)) {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("reactor 1 could not enable its io_uring ring"),
                    "{msg}"
                );
            }
            Ok(_) => panic!("opened with a reactor that did not start"),
        }
        // The started reactors were stopped and joined, not left spinning or waited on.
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        let e = super::mem_engine(3);
        assert_eq!(e.reactors(), 3);
    }
}
