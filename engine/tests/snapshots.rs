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

/// A small deterministic generator (splitmix64), so that a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

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
    // Crash simulation: the fills' records are not committed when the image is taken.
    let disk = MemDisk::new(64 << 20, true);
    Engine::format(&[DeviceSpec::Mem(disk.clone())], &small_opts()).expect("format");
    let mut e = Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(1)).expect("open");
    let v = e.create_volume("vol", 4 << 20, 4096).unwrap();
    let mut c = e.client();
    let cs = e.pool_info().cluster_size;
    let clusters = (4 << 20) / cs;
    let old: Vec<u8> = (0..4u64 << 20).map(|i| (i / 4096 % 251) as u8 + 1).collect();
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
