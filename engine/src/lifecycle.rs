//! The engine's life: format, open (recover the pool, build the allocators, build the
//! reactors, start them) and shut down. Each step of `Engine::open` is a function here.

use crate::alloc::{self, Allocator};
use crate::control::{meta_of, vol_state};
use crate::engine::{ControlState, Engine, EngineConfig, Inner};
use crate::error::{ControlError, PoolError};
use crate::format::{FormatOptions, Superblock};
use crate::journal::Journal;
use crate::layout::Layout;
use crate::map::ShardMap;
use crate::media::{DeviceSpec, Member};
use crate::pool::{self, PoolState};
use crate::reactor::{CoreStats, Inbox, Reactor, Shard, Shared};
use crate::request::{Doorbell, Sink};
use crate::volume::VolumeTable;
use crossbeam_queue::ArrayQueue;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A pool as recovery leaves it: its members, the control state, every image's maps, and
/// which clusters those maps use.
struct Recovered {
    members: Vec<Member>,
    layout: Layout,
    st: PoolState,
    maps: HashMap<(u64, u64), ShardMap>,
    used: Vec<bool>,
    used_count: u64,
}

/// The allocation groups, dealt to the reactors.
struct Allocators {
    group_size: u64,
    group_owner: Vec<AtomicU32>,
    per_reactor: Vec<Allocator>,
}

impl Engine {
    /// Format a pool on the devices.
    pub fn format(devices: &[DeviceSpec], opts: &FormatOptions) -> Result<Superblock, PoolError> {
        pool::format(devices, opts)
    }

    /// Open a pool (recovering it if it was not closed cleanly) and start the reactors.
    pub fn open(devices: &[DeviceSpec], cfg: EngineConfig) -> Result<Engine, PoolError> {
        let n = cfg.cores.len().max(1);
        let Recovered {
            members,
            layout,
            st,
            maps,
            used,
            used_count,
        } = recover(devices, n)?;
        let Allocators {
            group_size,
            group_owner,
            per_reactor,
        } = build_allocators(&layout, &used, n);
        let shared = build_shared(
            members,
            layout,
            &st,
            used_count,
            group_size,
            group_owner,
            &cfg,
        )?;
        let reactors = build_reactors(&shared, &st, maps, per_reactor)?;
        let (threads, cpus) = start_reactors(&shared, reactors, &cfg)?;
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

/// Open the members, recover the pool (checkpoint plus journals), and begin a new run on it
/// for `n` reactors.
fn recover(devices: &[DeviceSpec], n: usize) -> Result<Recovered, PoolError> {
    if devices.is_empty() {
        return Err(PoolError::Geometry(
            "a pool needs at least one device".into(),
        ));
    }
    let (members, sbs) = pool::open_members(devices)?;
    let layout = Layout::new(&sbs);
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
    Ok(Recovered {
        members,
        layout,
        st,
        maps,
        used,
        used_count,
    })
}

/// Cut the pool into allocation groups, mark the used clusters, and deal group `g` to
/// reactor `g % n`.
fn build_allocators(layout: &Layout, used: &[bool], n: usize) -> Allocators {
    let total = layout.total_clusters;
    let group_size = alloc::group_size(total, n);
    let mut groups = alloc::groups(total, group_size);
    for g in &mut groups {
        for c in g.first..g.first + g.count {
            if used[c as usize] {
                g.mark_used(c);
            }
        }
    }
    let group_owner = groups
        .iter()
        .map(|g| AtomicU32::new(g.index % n as u32))
        .collect();
    let mut per_reactor: Vec<Allocator> = (0..n).map(|_| Allocator::default()).collect();
    for g in groups {
        let r = (g.index as usize) % n;
        per_reactor[r].groups.push(g);
    }
    Allocators {
        group_size,
        group_owner,
        per_reactor,
    }
}

/// What the reactors and clients share: the members, an inbox per reactor, the volume table.
fn build_shared(
    members: Vec<Member>,
    layout: Layout,
    st: &PoolState,
    used_count: u64,
    group_size: u64,
    group_owner: Vec<AtomicU32>,
    cfg: &EngineConfig,
) -> Result<Arc<Shared>, PoolError> {
    let n = cfg.cores.len().max(1);
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
    Ok(Arc::new(Shared {
        layout,
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
        group_size,
        group_owner,
        poll: cfg.poll,
        spin: cfg.spin,
        ring_entries: cfg.ring_entries,
        submit_batch: cfg.submit_batch.clamp(1, cfg.ring_entries.max(8)) as usize,
        fills_paused: AtomicBool::new(false),
    }))
}

/// One reactor per allocator, each with its journal region, every image's state and the
/// maps of the shards it owns (fills queued again for redirected clusters).
fn build_reactors(
    shared: &Arc<Shared>,
    st: &PoolState,
    maps: HashMap<(u64, u64), ShardMap>,
    allocs: Vec<Allocator>,
) -> Result<Vec<Reactor>, PoolError> {
    let sb = &shared.layout.sb;
    let mut maps_by_reactor: Vec<HashMap<(u64, u64), ShardMap>> =
        (0..allocs.len()).map(|_| HashMap::new()).collect();
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
        let mut reactor = Reactor::new(r, shared.clone(), alloc, j).map_err(|e| PoolError::Io {
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
    Ok(reactors)
}

/// Start one thread per reactor (pinned to its CPU when configured). Each reports whether
/// it could start (enable its ring) before it runs; the engine opens only when every one
/// did, and otherwise stops the others. Returns the threads and each reactor's CPU.
fn start_reactors(
    shared: &Arc<Shared>,
    reactors: Vec<Reactor>,
    cfg: &EngineConfig,
) -> Result<(Vec<JoinHandle<()>>, Vec<usize>), PoolError> {
    let n = reactors.len();
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
    Ok((threads, cpus))
}
