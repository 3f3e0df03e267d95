//! Snapshots, clones, inflate and rollback (issue 3, DESIGN.md sections 3, 5 and 6):
//! point-in-time correctness under concurrent load, 1,000 snapshots of one volume, typed
//! errors, and regressions found while writing these tests.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessel_engine::*;

const B4K: u64 = 4096;

fn mem_pool(size: u64, reactors: usize) -> (Arc<MemDisk>, Engine) {
    let disk = MemDisk::new(size, false);
    let dev = [DeviceSpec::Mem(disk.clone())];
    Engine::format(&dev, &small_opts()).expect("format");
    (disk, Engine::open(&dev, cfg(reactors)).expect("open"))
}

fn reopen(disk: &Arc<MemDisk>, e: Engine, reactors: usize) -> Engine {
    e.shutdown().expect("shutdown");
    drop(e);
    Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(reactors)).expect("reopen")
}

/// A 4 KiB block tagged with (writer, lba, generation) and a derived fill.
fn tagged(writer: u64, lba: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; B4K as usize];
    b[0..8].copy_from_slice(&writer.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&gen.to_le_bytes());
    let mut x = Rng(writer ^ lba.rotate_left(24) ^ gen.rotate_left(44));
    for c in b[24..].chunks_mut(8) {
        c.copy_from_slice(&x.next().to_le_bytes());
    }
    b
}

/// Decode a tagged block: None for zeros; panics on bytes no write produced.
fn untag(block: &[u8], what: &str) -> Option<(u64, u64, u64)> {
    if block.iter().all(|&b| b == 0) {
        return None;
    }
    let w = u64::from_le_bytes(block[0..8].try_into().unwrap());
    let l = u64::from_le_bytes(block[8..16].try_into().unwrap());
    let g = u64::from_le_bytes(block[16..24].try_into().unwrap());
    assert!(
        tagged(w, l, g) == block,
        "{what}: damaged block (header says writer {w} lba {l} gen {g})"
    );
    Some((w, l, g))
}

/// Wait until the pool's used space equals what the live volumes hold (background fills
/// drop parent clusters a while after the last snapshot sharing them is deleted).
fn settle(e: &Engine, c: &mut Client, vols: &[VolumeId]) -> (u64, u64) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        flush(c, vols[0]);
        let used = e.pool_info().used_bytes;
        let alloc: u64 = vols.iter().map(|v| e.allocated_bytes(*v)).sum();
        if used == alloc || Instant::now() > end {
            return (used, alloc);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[test]
fn snapshot_and_clone_errors_are_typed() {
    let _w = watchdog();
    let (_d, e) = mem_pool(64 << 20, 2);
    let v = e.create_volume("vol", 2 << 20, 4096).unwrap();
    let mut c = e.client();
    write(&mut c, v.id, 0, &vec![7u8; 64 << 10]);

    // Snapshot of an unknown volume.
    match e.snapshot_create("nope", "s") {
        Err(ControlError::UnknownVolume(n)) => assert_eq!(n, "nope"),
        other => panic!("snapshot of an unknown volume: {other:?}"),
    }
    // Bad snapshot name.
    assert!(matches!(
        e.snapshot_create("vol", "a b"),
        Err(ControlError::BadName(_))
    ));
    let s = e.snapshot_create("vol", "s1").unwrap();
    assert_eq!((s.volume.as_str(), s.name.as_str()), ("vol", "s1"));
    // Duplicate snapshot name.
    match e.snapshot_create("vol", "s1") {
        Err(ControlError::Exists(n)) => assert!(n.contains("s1"), "{n}"),
        other => panic!("duplicate snapshot: {other:?}"),
    }
    // The same snapshot name on another volume is fine.
    e.create_volume("other", 1 << 20, 512).unwrap();
    e.snapshot_create("other", "s1").unwrap();

    // Writes of every kind to a snapshot are refused; reads work.
    for op in [
        Op::Write { fua: false },
        Op::Write { fua: true },
        Op::Trim,
        Op::WriteZeroes { fua: false },
    ] {
        let data = vec![1u8; 4096];
        let r = run(&mut c, s.id, op, 0, 4096, Some(&data));
        assert_eq!(r.result, Err(IoError::ReadOnly), "{op:?} to a snapshot");
    }
    assert_eq!(read(&mut c, s.id, 0, 4096), vec![7u8; 4096]);

    // Clone of an unknown snapshot / of a snapshot of an unknown volume.
    match e.clone_create("vol", "nosuch", "c") {
        Err(ControlError::UnknownSnapshot { volume, snapshot }) => {
            assert_eq!((volume.as_str(), snapshot.as_str()), ("vol", "nosuch"))
        }
        other => panic!("clone of an unknown snapshot: {other:?}"),
    }
    assert!(matches!(
        e.clone_create("ghost", "s1", "c"),
        Err(ControlError::UnknownVolume(_))
    ));
    // A clone may not take an existing volume's name.
    assert!(matches!(
        e.clone_create("vol", "s1", "other"),
        Err(ControlError::Exists(_))
    ));
    let cl = e.clone_create("vol", "s1", "kid").unwrap();
    assert_eq!(e.origin_of("kid").as_deref(), Some("vol@s1"));
    assert_eq!(read(&mut c, cl.id, 0, 4096), vec![7u8; 4096]);

    // Delete of a snapshot a clone depends on names the clone.
    match e.snapshot_delete("vol", "s1") {
        Err(ControlError::InUse(m)) => assert!(m.contains("kid"), "{m}"),
        other => panic!("delete of a snapshot with clones: {other:?}"),
    }
    // Delete of a volume that has snapshots names them.
    match e.delete_volume("vol") {
        Err(ControlError::InUse(m)) => assert!(m.contains("s1"), "{m}"),
        other => panic!("delete of a volume with snapshots: {other:?}"),
    }
    // Unknown snapshot on delete and rollback.
    assert!(matches!(
        e.snapshot_delete("vol", "zz"),
        Err(ControlError::UnknownSnapshot { .. })
    ));
    assert!(matches!(
        e.rollback("vol", "zz"),
        Err(ControlError::UnknownSnapshot { .. })
    ));
    // Inflate of a volume that is not a clone.
    assert!(matches!(
        e.clone_inflate("vol"),
        Err(ControlError::InUse(_))
    ));
    assert!(matches!(
        e.clone_inflate("ghost"),
        Err(ControlError::UnknownVolume(_))
    ));
    // Everything still works after the refusals: delete the clone, then the snapshot.
    e.delete_volume("kid").unwrap();
    e.snapshot_delete("vol", "s1").unwrap();
    // A deleted snapshot's id no longer reads.
    let r = run(&mut c, s.id, Op::Read, 0, 4096, None);
    assert_eq!(r.result, Err(IoError::UnknownVolume));
    assert!(e.snapshots(Some("vol")).unwrap().is_empty());
    e.delete_volume("vol").unwrap();
    e.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------------

/// A redirected cluster keeps reading blocks from its parent until fill copies them. When
/// the snapshot that owned the parent is deleted, the parent is referenced only as a
/// parent; it must stay allocated across a reopen (fills queued before it are lost).
#[test]
fn a_parent_only_cluster_survives_snapshot_delete_and_reopen() {
    let _w = watchdog();
    // Crash simulation: the fills' records are not committed when the image is taken.
    let disk = MemDisk::new(64 << 20, true);
    Engine::format(&[DeviceSpec::Mem(disk.clone())], &small_opts()).expect("format");
    let mut e = Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(1)).expect("open");
    let v = e.create_volume("vol", 4 << 20, 4096).unwrap();
    let mut c = e.client();
    let cs = e.pool_info().cluster_size;
    let clusters = (4 << 20) / cs;
    let old: Vec<u8> = (0..4u64 << 20)
        .map(|i| (i / 4096 % 251) as u8 + 1)
        .collect();
    write(&mut c, v.id, 0, &old);
    e.snapshot_create("vol", "s").unwrap();
    // Rewrite one block of every cluster (redirect: the rest reads from the parent), all
    // at once, then close at once so that fills are still queued.
    let mut want = old.clone();
    for k in 0..clusters {
        let off = k * cs;
        let buf = AlignedBuf::from_slice(&vec![0xEE; 4096]);
        c.submit(Request {
            tag: k,
            volume: v.id,
            op: Op::Write { fua: true },
            offset: off,
            len: 4096,
            buf: Some(buf),
        });
        want[off as usize..off as usize + 4096].fill(0xEE);
    }
    let mut out = Vec::new();
    while out.len() < clusters as usize {
        c.poll(&mut out);
        c.wait(Duration::from_millis(10));
    }
    assert!(out.iter().all(|r| r.result.is_ok()));
    drop(c);
    let disk = disk.crash(1);
    e.shutdown().unwrap();
    e = Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(1)).expect("open after crash");
    let info = &e.snapshots(Some("vol")).unwrap()[0];
    eprintln!("after crash: {info:?} used {}", e.pool_info().used_bytes);
    e.snapshot_delete("vol", "s").unwrap();
    let mut c = e.client();
    flush(&mut c, v.id);
    e = reopen(&disk, e, 1);
    let mut c = e.client();
    // Fill a second volume: it must not be handed the first volume's parent clusters.
    let w = e.create_volume("w", 8 << 20, 4096).unwrap();
    write(&mut c, w.id, 0, &vec![0x55; 8 << 20]);
    flush(&mut c, w.id);
    assert!(
        read(&mut c, v.id, 0, 4 << 20) == want,
        "vol changed after its snapshot was deleted and another volume was written"
    );
    let (used, alloc) = settle(&e, &mut c, &[v.id, w.id]);
    assert_eq!(used, alloc, "used vs allocated once fills settle");
    e = reopen(&disk, e, 2);
    let mut c = e.client();
    assert!(read(&mut c, v.id, 0, 4 << 20) == want);
    e.shutdown().unwrap();
}

/// A redirected cluster whose fill has not run reads each block from itself, from its
/// parent (the snapshot's cluster) only where the parent holds that block for it, and as
/// zeros elsewhere: never the parent's other bytes. Fills are paused (a test hook) because
/// they otherwise retire the parent within milliseconds, before any read could tell; the
/// pool starts as garbage, so a block read from where nothing was written shows.
#[test]
fn unfilled_redirected_clusters_read_the_parent_only_for_the_blocks_it_holds_for_them() {
    let _w = watchdog();
    let disk = garbage_disk(64 << 20, false, 0x6A5B);
    let dev = [DeviceSpec::Mem(disk.clone())];
    Engine::format(&dev, &small_opts()).expect("format");
    let e = Engine::open(&dev, cfg(2)).expect("open");
    let mut c = e.client();
    let cs = e.pool_info().cluster_size;
    let v = e.create_volume("v", 4 * cs, 4096).unwrap();
    let mut want = vec![0u8; 4 * cs as usize];
    let mut put = |c: &mut Client, op: Op, off: u64, data: &[u8]| {
        let r = run(
            c,
            v.id,
            op,
            off,
            data.len() as u64,
            Some(data).filter(|_| op == Op::Write { fua: false }),
        );
        r.result.expect("write/trim/zero");
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    let w = Op::Write { fua: false };
    // Cluster 0 written whole, cluster 1 in its first two blocks only (the others are
    // garbage on the device, valid nowhere).
    put(&mut c, w, 0, &pattern(0, cs as usize, 1));
    put(&mut c, w, cs, &pattern(cs, 8192, 1));
    e.snapshot_create("v", "s").unwrap();
    e.pause_fills(true);
    // Redirect both: one new block each; the rest of each cluster resolves via the parent.
    put(&mut c, w, 4096, &pattern(4096, 4096, 2));
    put(&mut c, w, cs + 3 * 4096, &pattern(cs + 3 * 4096, 4096, 2));
    // Trim and zero blocks the parent holds: they no longer come from it.
    put(&mut c, Op::Trim, 2 * 4096, &[0; 4096]);
    put(
        &mut c,
        Op::WriteZeroes { fua: false },
        cs + 4096,
        &[0; 4096],
    );
    let check = |c: &mut Client, when: &str| {
        let got = read(c, v.id, 0, 4 * cs);
        for b in 0..(4 * cs / 4096) as usize {
            let (g, w) = (&got[b * 4096..][..4096], &want[b * 4096..][..4096]);
            assert!(
                g == w,
                "{when}: block {b} reads {:02x?}.., want {:02x?}..",
                &g[..8],
                &w[..8]
            );
        }
    };
    check(&mut c, "fills paused");
    e.pause_fills(false);
    flush(&mut c, v.id);
    std::thread::sleep(Duration::from_millis(50));
    check(&mut c, "fills resumed");
    let snap = e.snapshots(Some("v")).unwrap()[0].id;
    let s = read(&mut c, snap, 0, 2 * cs);
    assert!(
        s[..cs as usize] == pattern(0, cs as usize, 1)[..],
        "snapshot changed"
    );
    assert!(
        s[cs as usize..][..8192] == pattern(cs, 8192, 1)[..],
        "snapshot changed"
    );
    assert!(
        s[cs as usize + 8192..].iter().all(|&x| x == 0),
        "snapshot shows garbage"
    );
    drop(c);
    let e = reopen(&disk, e, 1);
    let mut c = e.client();
    check(&mut c, "after a reopen");
    drop(c);
    e.shutdown().unwrap();
}

#[test]
fn partial_writes_into_new_and_redirected_clusters_read_zeros_where_nothing_was_written() {
    let _w = watchdog();
    // Bounce buffers are reused, not freshly zeroed: the blocks of a read-modify-write that
    // live nowhere must be zeroed explicitly. Dirty the reactor's buffers first (fills of a
    // volume full of 0xAB), then write pieces of blocks where nothing was written before.
    let disk = MemDisk::new(64 << 20, false);
    let opts = FormatOptions {
        cluster_size: 64 << 10,
        ..small_opts()
    };
    Engine::format(&[DeviceSpec::Mem(disk.clone())], &opts).expect("format");
    let e = Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(1)).expect("open");
    let mut c = e.client();
    let cs = e.pool_info().cluster_size;
    let dirty = e.create_volume("dirty", 16 * cs, 512).unwrap();
    write(&mut c, dirty.id, 0, &vec![0xAB; 16 * cs as usize]);
    e.snapshot_create("dirty", "s").unwrap();
    for k in 0..16 {
        // Redirects: each reads its edge block, then a fill copies the rest of the cluster.
        write(&mut c, dirty.id, k * cs + 3 * 4096 + 512, &[0xCD; 512]);
    }
    flush(&mut c, dirty.id);
    // Let the fills finish so that their buffers are back in the pool (the checks below
    // hold either way).
    std::thread::sleep(Duration::from_millis(50));

    let v = e.create_volume("vol", 4 * cs, 512).unwrap();
    let mut want = vec![0u8; 4 * cs as usize];
    let put = |c: &mut Client, want: &mut Vec<u8>, off: u64, data: &[u8]| {
        write(c, v.id, off, data);
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    // Cluster 0: a piece of one block of an unallocated cluster.
    put(&mut c, &mut want, 4096 + 512, &[0x11; 512]);
    // Cluster 1: two blocks written, snapshot, then pieces of unwritten blocks (redirect
    // whose edge blocks have no source), twice, so that the second may find the cluster
    // still reading from its parent (the fill not run yet).
    put(&mut c, &mut want, cs, &pattern(cs, 8192, 1));
    e.snapshot_create("vol", "a").unwrap();
    put(&mut c, &mut want, cs + 5 * 4096 + 512, &[0x22; 1024]);
    e.snapshot_create("vol", "b").unwrap();
    put(&mut c, &mut want, cs + 9 * 4096 + 3072, &[0x33; 2048]);
    // Cluster 2: fully written and shared by snapshots; zeroing part of a block redirects
    // it through the write path with zeros for the caller's bytes.
    put(&mut c, &mut want, 2 * cs, &pattern(2 * cs, cs as usize, 2));
    e.snapshot_create("vol", "c").unwrap();
    let r = run(
        &mut c,
        v.id,
        Op::WriteZeroes { fua: false },
        2 * cs + 7 * 4096 + 1024,
        512,
        None,
    );
    r.result.expect("write zeroes");
    let at = (2 * cs + 7 * 4096 + 1024) as usize;
    want[at..at + 512].fill(0);
    // Cluster 3: an unaligned write spanning two blocks of an unallocated cluster.
    put(&mut c, &mut want, 3 * cs + 4096 - 512, &[0x44; 1024]);
    flush(&mut c, v.id);
    assert!(read(&mut c, v.id, 0, 4 * cs) == want, "live volume");
    drop(c);
    let e = reopen(&disk, e, 1);
    let mut c = e.client();
    assert!(read(&mut c, v.id, 0, 4 * cs) == want, "after reopen");
    e.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------
// Point-in-time correctness under load
// ---------------------------------------------------------------------------------------

const WRITERS: usize = 3;
const QD: usize = 8;

/// One writer's sequence: write g (1-based) goes to `blocks[(g - 1) % n]`, so a block's
/// generations are those congruent to its slot; no two writes in flight share a block.
struct Writer {
    blocks: Vec<u64>,
    /// Highest g submitted (set before the submit).
    started: AtomicU64,
    /// Highest g such that every write <= g completed.
    completed: AtomicU64,
    /// For each g: every writer's `completed` just before g was submitted.
    seen: Mutex<Vec<[u64; WRITERS]>>,
}

impl Writer {
    /// The newest generation written to slot `k` among writes 1..=upto (0: none).
    fn last_in_slot(&self, k: u64, upto: u64) -> u64 {
        let n = self.blocks.len() as u64;
        if upto < k + 1 {
            0
        } else {
            k + 1 + (upto - (k + 1)) / n * n
        }
    }
}

fn writer_loop(w: usize, ws: &[Writer], vol: VolumeId, mut c: Client, stop: &AtomicBool) {
    let me = &ws[w];
    let mut g = 0u64;
    let mut done = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    loop {
        while c.in_flight() < QD && !stop.load(Ordering::Relaxed) {
            g += 1;
            let seen: [u64; WRITERS] =
                std::array::from_fn(|k| ws[k].completed.load(Ordering::Acquire));
            me.seen.lock().unwrap().push(seen);
            me.started.store(g, Ordering::Release);
            let lba = me.blocks[((g - 1) % me.blocks.len() as u64) as usize];
            c.submit(Request {
                tag: g,
                volume: vol,
                op: Op::Write { fua: false },
                offset: lba * B4K,
                len: B4K,
                buf: Some(AlignedBuf::from_slice(&tagged(w as u64, lba, g))),
            });
        }
        if c.in_flight() == 0 {
            return;
        }
        c.wait(Duration::from_millis(1));
        out.clear();
        c.poll(&mut out);
        for r in &out {
            r.result.clone().expect("write under load");
            done.insert(r.tag);
        }
        let mut p = me.completed.load(Ordering::Relaxed);
        while done.remove(&(p + 1)) {
            p += 1;
        }
        me.completed.store(p, Ordering::Release);
    }
}

/// Several threads write generation-tagged blocks (QD 8 each) to their own blocks spread
/// over every shard and reactor while ~20 snapshots are taken. Each snapshot must be one
/// consistent cut:
/// - every block shows a write to that very block (or zeros if it was never written)
///   that was started before `snapshot_create` returned;
/// - it shows the newest write to it among those completed before the call began;
/// - the cut: if a snapshot holds write g of writer A, it holds every write (of any
///   writer) that had completed before A submitted g — g was admitted before the barrier,
///   so those were too. This fails if reactors froze their shards at different moments.
#[test]
fn snapshot_is_one_consistent_cut_under_load() {
    let _w = watchdog();
    let (_d, e) = mem_pool(256 << 20, 3);
    const SIZE: u64 = 6 << 20;
    let vol = e.create_volume("load", SIZE, 4096).unwrap().id;
    let nblocks = SIZE / B4K;
    // Shuffle the blocks, then deal them to the writers.
    let mut rng = Rng(0xC0FFEE);
    let mut all: Vec<u64> = (0..nblocks).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let ws: Vec<Writer> = (0..WRITERS)
        .map(|w| Writer {
            blocks: all.iter().copied().skip(w).step_by(WRITERS).collect(),
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            seen: Mutex::new(vec![[0; WRITERS]]),
        })
        .collect();
    let stop = AtomicBool::new(false);
    let mut c = e.client();
    let start = Instant::now();
    let mut checked = 0;
    let mut max_create = Duration::ZERO;
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (ws, stop, cl) = (&ws, &stop, e.client());
            s.spawn(move || writer_loop(w, ws, vol, cl, stop));
        }
        for si in 0..20u64 {
            std::thread::sleep(Duration::from_millis(5 + si % 4 * 10));
            let before: Vec<u64> = ws
                .iter()
                .map(|w| w.completed.load(Ordering::Acquire))
                .collect();
            let t = Instant::now();
            let snap = e.snapshot_create("load", &format!("s{si}")).unwrap();
            max_create = max_create.max(t.elapsed());
            let after: Vec<u64> = ws
                .iter()
                .map(|w| w.started.load(Ordering::Acquire))
                .collect();
            let img = read(&mut c, snap.id, 0, SIZE);
            // Per writer: the slot and generation each of its blocks shows.
            let mut shown: Vec<Vec<(u64, u64)>> = vec![Vec::new(); WRITERS];
            let slot_of: std::collections::HashMap<u64, (usize, u64)> = ws
                .iter()
                .enumerate()
                .flat_map(|(w, wr)| {
                    wr.blocks
                        .iter()
                        .enumerate()
                        .map(move |(k, &b)| (b, (w, k as u64)))
                })
                .collect();
            for b in 0..nblocks {
                let (w, k) = slot_of[&b];
                let blk = &img[(b * B4K) as usize..((b + 1) * B4K) as usize];
                let g = match untag(blk, &format!("snapshot s{si} block {b}")) {
                    None => 0,
                    Some((tw, tl, tg)) => {
                        assert_eq!((tw, tl), (w as u64, b), "s{si} block {b}: foreign data");
                        tg
                    }
                };
                let n = ws[w].blocks.len() as u64;
                assert!(
                    g == 0 || (g - 1) % n == k,
                    "s{si} block {b}: generation {g} was not written to it"
                );
                assert!(
                    g <= after[w],
                    "s{si} block {b}: writer {w} gen {g} started after create returned ({})",
                    after[w]
                );
                shown[w].push((k, g));
            }
            // Lower bound per writer: completed before the call, and completed before any
            // write the snapshot holds was submitted.
            let mut lower = before.clone();
            {
                let seen: Vec<Vec<[u64; WRITERS]>> =
                    ws.iter().map(|w| w.seen.lock().unwrap().clone()).collect();
                for (w, sh) in shown.iter().enumerate() {
                    let gmax = sh.iter().map(|&(_, g)| g).max().unwrap_or(0);
                    for (x, l) in lower.iter_mut().enumerate() {
                        *l = (*l).max(seen[w][gmax as usize][x]);
                    }
                }
            }
            for (w, sh) in shown.iter().enumerate() {
                for &(k, g) in sh {
                    let want = ws[w].last_in_slot(k, lower[w]);
                    assert!(
                        g >= want,
                        "snapshot s{si} is not a cut: writer {w} slot {k} shows gen {g} but gen \
                         {want} had completed before the call ({}) or before a write the \
                         snapshot holds was submitted (lower bound {})",
                        before[w],
                        lower[w]
                    );
                }
            }
            checked += 1;
            // Keep space bounded: drop older snapshots, under load too.
            if si >= 2 {
                e.snapshot_delete("load", &format!("s{}", si - 2)).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let writes: u64 = ws.iter().map(|w| w.completed.load(Ordering::Relaxed)).sum();
    println!(
        "{checked} snapshots checked under load; {writes} writes in {:.1?}; slowest create {:.1?}",
        start.elapsed(),
        max_create
    );
    assert!(writes > 1000, "too little load: {writes} writes");
    // The live volume holds every writer's last write to each block.
    let img = read(&mut c, vol, 0, SIZE);
    for (w, wr) in ws.iter().enumerate() {
        let last = wr.completed.load(Ordering::Relaxed);
        for (k, &b) in wr.blocks.iter().enumerate() {
            let blk = &img[(b * B4K) as usize..((b + 1) * B4K) as usize];
            let g = untag(blk, "live volume").map_or(0, |t| t.2);
            assert_eq!(
                g,
                wr.last_in_slot(k as u64, last),
                "live block {b} writer {w}"
            );
        }
    }
    for s in e.snapshots(Some("load")).unwrap() {
        e.snapshot_delete("load", &s.name).unwrap();
    }
    let (used, alloc) = settle(&e, &mut c, &[vol]);
    assert_eq!(used, alloc, "space after deleting every snapshot");
    e.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------
// 1,000 snapshots
// ---------------------------------------------------------------------------------------

/// Contents of a volume of `nblocks` 4 KiB blocks after the first `upto` writes.
fn image_after(writes: &[(u64, u64)], upto: usize, nblocks: u64) -> Vec<u8> {
    let mut last = vec![0u64; nblocks as usize];
    for &(b, g) in &writes[..upto] {
        last[b as usize] = g;
    }
    let mut img = vec![0u8; (nblocks * B4K) as usize];
    for (b, &g) in last.iter().enumerate() {
        if g > 0 {
            img[b * B4K as usize..(b + 1) * B4K as usize].copy_from_slice(&tagged(0, b as u64, g));
        }
    }
    img
}

#[test]
fn thousand_snapshots_then_random_deletes_leave_exactly_the_live_data() {
    let _w = watchdog();
    const SIZE: u64 = 3 << 20;
    const SNAPS: usize = 1000;
    let nblocks = SIZE / B4K;
    let start = Instant::now();
    let (disk, mut e) = mem_pool(192 << 20, 2);
    let vol = e.create_volume("v", SIZE, 4096).unwrap().id;
    let mut c = e.client();
    let mut rng = Rng(1000);
    let mut writes: Vec<(u64, u64)> = Vec::new();
    // snaps[i] = (name, id, writes before it)
    let mut snaps = Vec::with_capacity(SNAPS);
    for i in 0..SNAPS {
        for _ in 0..1 + rng.below(4) {
            let b = rng.below(nblocks);
            let g = writes.len() as u64 + 1;
            write(&mut c, vol, b * B4K, &tagged(0, b, g));
            writes.push((b, g));
        }
        let name = format!("s{i:04}");
        let info = e.snapshot_create("v", &name).unwrap();
        snaps.push((name, info.id, writes.len()));
    }
    let created = start.elapsed();
    let listed = e.snapshots(Some("v")).unwrap();
    assert_eq!(listed.len(), SNAPS);
    assert!(
        listed.windows(2).all(|w| w[0].epoch < w[1].epoch),
        "listed oldest first with growing epochs"
    );
    // A few snapshots (first, last and random ones) read back exactly.
    let mut pick = vec![0, SNAPS - 1];
    pick.extend((0..6).map(|_| rng.below(SNAPS as u64) as usize));
    for &i in &pick {
        let (name, id, upto) = &snaps[i];
        assert!(
            read(&mut c, *id, 0, SIZE) == image_after(&writes, *upto, nblocks),
            "snapshot {name} differs from the volume as it was"
        );
    }
    let live = image_after(&writes, writes.len(), nblocks);
    // Reopen with all of them present: the checkpoint holds 1,000 maps sharing pages.
    drop(c);
    e = reopen(&disk, e, 2);
    let mut c = e.client();
    let (name, id, upto) = &snaps[pick[2]];
    assert!(
        read(&mut c, *id, 0, SIZE) == image_after(&writes, *upto, nblocks),
        "snapshot {name} after reopen"
    );
    // Delete in a seeded random order, reading a survivor now and then.
    let mut order: Vec<usize> = (0..SNAPS).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (k, &i) in order.iter().enumerate() {
        e.snapshot_delete("v", &snaps[i].0).unwrap();
        if k % 250 == 0 && k + 1 < SNAPS {
            let j = order[k + 1 + rng.below((SNAPS - k - 1) as u64) as usize];
            let (name, id, upto) = &snaps[j];
            assert!(
                read(&mut c, *id, 0, SIZE) == image_after(&writes, *upto, nblocks),
                "snapshot {name} after {k} deletes"
            );
        }
    }
    assert!(e.snapshots(Some("v")).unwrap().is_empty());
    let (used, alloc) = settle(&e, &mut c, &[vol]);
    assert_eq!(
        used, alloc,
        "pool space vs the live volume after deleting every snapshot"
    );
    assert!(
        read(&mut c, vol, 0, SIZE) == live,
        "live volume after the deletes"
    );
    drop(c);
    e = reopen(&disk, e, 1);
    let mut c = e.client();
    assert!(
        read(&mut c, vol, 0, SIZE) == live,
        "live volume after reopen"
    );
    let (used, alloc) = settle(&e, &mut c, &[vol]);
    assert_eq!(used, alloc, "pool space after reopen");
    e.shutdown().unwrap();
    println!(
        "{SNAPS} snapshots of {} writes: created in {created:.1?}, all in {:.1?}",
        writes.len(),
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Delete while the volume is written: the release runs in pieces
// ---------------------------------------------------------------------------------------

/// A deleted snapshot's clusters are released a few map pages per reactor pass. Meanwhile
/// the volume keeps writing: its first writes to clusters born before the snapshot redirect
/// and later fills drop the old clusters, the very ones the release is letting go of. Each
/// must be freed once, by whichever lets go last: at the end the pool holds exactly the
/// volume's clusters and the volume reads back what was written, also after a reopen. The
/// first snapshot deleted shares every map page with the second (nothing of it is freed).
#[test]
fn snapshot_released_in_pieces_while_the_volume_writes_frees_each_cluster_once() {
    let _w = watchdog();
    const SIZE: u64 = 64 << 20;
    let (disk, mut e) = mem_pool(512 << 20, 2);
    let vol = e.create_volume("v", SIZE, 4096).unwrap().id;
    let mut c = e.client();
    for off in (0..SIZE).step_by(1 << 20) {
        write(&mut c, vol, off, &pattern(off, 1 << 20, 1));
    }
    e.snapshot_create("v", "a").unwrap();
    e.snapshot_create("v", "b").unwrap();
    let (stop, done) = (AtomicBool::new(false), AtomicU64::new(0));
    let model = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut c = e.client();
            let mut gens = vec![1u8; (SIZE / B4K) as usize];
            let mut rng = Rng(7);
            let mut n = 0u64;
            while n < 6000 || !stop.load(Ordering::Relaxed) {
                let b = rng.below(SIZE / B4K);
                let g = (n % 200) as u8 + 2;
                write(&mut c, vol, b * B4K, &pattern(b * B4K, B4K as usize, g));
                gens[b as usize] = g;
                n += 1;
                done.store(n, Ordering::Release);
            }
            gens
        });
        // Delete once redirects (and fills waiting to drop their parents) are under way.
        while done.load(Ordering::Acquire) < 2000 {
            std::thread::yield_now();
        }
        e.snapshot_delete("v", "a").unwrap();
        e.snapshot_delete("v", "b").unwrap();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    });
    let want: Vec<u8> = (0..SIZE / B4K)
        .flat_map(|b| pattern(b * B4K, B4K as usize, model[b as usize]))
        .collect();
    let (used, alloc) = settle(&e, &mut c, &[vol]);
    assert_eq!(used, alloc, "pool space vs the volume after the deletes");
    assert!(
        read(&mut c, vol, 0, SIZE) == want,
        "volume after the deletes"
    );
    drop(c);
    e = reopen(&disk, e, 2);
    let mut c = e.client();
    assert!(read(&mut c, vol, 0, SIZE) == want, "volume after reopen");
    let (used, alloc) = settle(&e, &mut c, &[vol]);
    assert_eq!(used, alloc, "pool space after reopen");
    e.shutdown().unwrap();
}
