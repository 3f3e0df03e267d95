//! The engine: its shared state and control lock, checkpoints, stats and clients for I/O.
//! Opening and stopping it are in `lifecycle.rs`, volume control in `control.rs`, snapshots
//! and the barrier's coordinator in `coordinator.rs`.

use crate::error::ControlError;
use crate::io::{Completion, Request, VolumeId};
use crate::journal::{ImageKind, Record, VolumeRecord};
use crate::map::ShardMap;
use crate::pool::{self, PoolState};
use crate::reactor::{Msg, PollMode, Poller, Reactor, Shared};
use crate::request::{ReplyTo, Sink};
use crate::volume::MetaCache;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) stopped: AtomicBool,
    /// Held while a checkpoint is encoded and written: one at a time, the control lock
    /// held only for its cut.
    pub(crate) checkpointing: Mutex<()>,
    /// First control-log block the newest durable checkpoint needs.
    pub(crate) control_tail: AtomicU64,
    /// Generation of the newest durable checkpoint. The next one goes to the other slot:
    /// after a failed checkpoint write (its slot half written) the retry takes the same
    /// slot again, never the one holding the newest good checkpoint.
    pub(crate) durable_gen: AtomicU64,
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

pub use crate::name::{valid_name, NAME_RULE};

impl Engine {
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
}

/// One reactor's maps handed to a checkpoint: (image, shard, map) at journal sequence `.1`.
type ReactorMaps = (Vec<(u64, u64, ShardMap)>, u64);

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
fn mem_engine_with(reactors: usize, fail_start: Option<usize>) -> Result<Engine, crate::PoolError> {
    let dev = [crate::DeviceSpec::Mem(crate::media::MemDisk::new(
        64 << 20,
        false,
    ))];
    let opts = crate::FormatOptions {
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
