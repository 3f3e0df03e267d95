//! Device faults under the engine (issue 14): the in-memory disk fails chosen reads, writes
//! and flushes (EIO, ENOSPC), then loses power. A flush reported successful must hold after
//! the crash, whatever failed before it; a failed one must be reported; and no block ever
//! reads data it was not written (metadata never points at a write that failed).
//!
//! `TESSEL_FAULT_SEEDS=n` runs more seeded workloads of the fault model (default 24).

mod common;
use common::*;
use std::sync::Arc;
use tessel_engine::*;

const DISK: u64 = 64 << 20;
const BS: u64 = 4096;

/// A crash-simulating disk holding a formatted pool; the range of its journal regions. The
/// disk starts as garbage: a map entry pointing at a cluster whose write failed reads as
/// bytes nobody wrote.
fn pool() -> (Arc<MemDisk>, std::ops::Range<u64>) {
    let disk = garbage_disk(DISK, true, 0xFA);
    let sb = Engine::format(&[DeviceSpec::Mem(disk.clone())], &small_opts()).expect("format");
    let journals =
        sb.journal_start..sb.journal_start + sb.journal_regions as u64 * sb.journal_region_bytes;
    (disk, journals)
}

fn open(disk: &Arc<MemDisk>, reactors: usize) -> Engine {
    Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(reactors)).expect("open")
}

fn try_flush(c: &mut Client, vol: VolumeId) -> Result<(), IoError> {
    run(c, vol, Op::Flush, 0, 0, None).result
}

#[test]
fn a_flush_after_a_failed_journal_write_is_durable() {
    let _w = watchdog();
    for reactors in [1, 2] {
        let (disk, journals) = pool();
        let e = open(&disk, reactors);
        let v = e.create_volume("v", 16 << 20, 4096).unwrap().id;
        let mut c = e.client();
        write(&mut c, v, 0, &pattern(0, 64 << 10, 1));
        flush(&mut c, v);
        // The filesystem under the pool runs full: every journal write fails.
        disk.inject(Fault::always(
            FaultOp::Write,
            journals.clone(),
            libc::ENOSPC,
        ));
        write(&mut c, v, 1 << 20, &pattern(1 << 20, 64 << 10, 2));
        let failed = try_flush(&mut c, v);
        assert!(failed.is_err(), "a flush whose journal write failed fails");
        write(&mut c, v, 3 << 20, &pattern(3 << 20, 64 << 10, 3));
        assert!(
            try_flush(&mut c, v).is_err(),
            "no flush succeeds while the journal cannot be written"
        );
        // Space comes back: the next commit rewrites the failed blocks first.
        disk.clear_faults();
        write(&mut c, v, 2 << 20, &pattern(2 << 20, 64 << 10, 4));
        flush(&mut c, v);
        let image = disk.crash(7);
        e.shutdown().expect("shutdown");
        let e = open(&image, reactors);
        let mut c = e.client();
        for (off, gen) in [(0, 1), (1 << 20, 2), (3 << 20, 3), (2 << 20, 4)] {
            assert!(
                read(&mut c, v, off, 64 << 10) == pattern(off, 64 << 10, gen),
                "{reactors} reactors: data at {off} written before a successful flush is lost"
            );
        }
        e.shutdown().expect("shutdown");
        assert_eq!(
            failed,
            Err(IoError::Device(libc::ENOSPC)),
            "the host is told why"
        );
    }
}

#[test]
fn a_failed_data_sync_fails_the_flush_and_a_later_one_holds() {
    let _w = watchdog();
    let (disk, _) = pool();
    let e = open(&disk, 1);
    let v = e.create_volume("v", 16 << 20, 4096).unwrap().id;
    let mut c = e.client();
    write(&mut c, v, 0, &pattern(0, 64 << 10, 1));
    disk.inject(Fault {
        times: 1,
        ..Fault::always(FaultOp::Flush, 0..0, libc::EIO)
    });
    // The background commit may meet the fault before this flush does: then the flush
    // rides the retry. Either way the fault fired and nothing said success for it.
    let first = try_flush(&mut c, v);
    assert_eq!(disk.injected(), 1);
    assert!(matches!(first, Ok(()) | Err(IoError::Device(libc::EIO))));
    flush(&mut c, v);
    let image = disk.crash(3);
    e.shutdown().expect("shutdown");
    let e = open(&image, 1);
    let mut c = e.client();
    assert!(read(&mut c, v, 0, 64 << 10) == pattern(0, 64 << 10, 1));
    e.shutdown().expect("shutdown");
}

/// A block's contents for (block, generation): what the fault model writes and recognises.
fn block_bytes(block: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    let mut x = Rng(block.rotate_left(32) ^ gen);
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&gen.to_le_bytes());
    for chunk in b[16..].chunks_mut(8) {
        chunk.copy_from_slice(&x.next().to_le_bytes());
    }
    b
}

/// What a block read back holds: Some(generation) (0 for zeros), None for bytes nobody
/// wrote to this block.
fn decode(block: u64, b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let gen = u64::from_le_bytes(b[8..16].try_into().unwrap());
    (b == block_bytes(block, gen)).then_some(gen)
}

/// One block's possible contents: every generation from the newest one a successful flush
/// covers on (a write that failed may still have landed, whole: its map entry may be in
/// the journal the retry writes).
#[derive(Clone)]
struct Allowed {
    gens: Vec<u64>,
}

impl Allowed {
    fn check(&self, got: Option<u64>, what: &str) {
        match got {
            Some(g) if self.gens.contains(&g) => {}
            _ => panic!("{what}: reads {got:?}, allowed {:?}", self.gens),
        }
    }
}

/// Random writes, FUA writes, trims and flushes against random read, write and flush
/// faults (journal, checkpoint and data alike), then power loss; returns failures seen.
fn fault_workload(seed: u64) -> u64 {
    let (disk, _) = pool();
    let mut rng = Rng(seed);
    let reactors = 1 + rng.below(2) as usize;
    let e = open(&disk, reactors);
    let blocks = 512u64;
    let v = e.create_volume("v", blocks * BS, 4096).unwrap().id;
    let mut c = e.client();
    // Generation 0 (zeros) is where every block starts, durably.
    let mut model: Vec<Allowed> = vec![Allowed { gens: vec![0] }; blocks as usize];
    // Acknowledged (true) or failed writes since the last successful flush, per block.
    let mut since: Vec<Vec<(u64, bool)>> = vec![Vec::new(); blocks as usize];
    for (op, errno) in [
        (FaultOp::Write, libc::ENOSPC),
        (FaultOp::Write, libc::EIO),
        (FaultOp::Read, libc::EIO),
        (FaultOp::Flush, libc::EIO),
    ] {
        disk.inject(Fault {
            one_in: 4 + rng.below(12),
            ..Fault::always(op, 0..DISK, errno)
        });
    }
    let mut gen = 0;
    let mut failures = 0;
    for step in 0..300 {
        if step == 250 {
            // The faults go away: what failed must be made good by what follows.
            disk.clear_faults();
        }
        let b = rng.below(blocks);
        match rng.below(10) {
            0 | 1 => {
                let ok = try_flush(&mut c, v).is_ok();
                failures += u64::from(!ok);
                if ok {
                    for (k, s) in since.iter_mut().enumerate() {
                        // The newest acknowledged write and anything later can hold.
                        if let Some(i) = s.iter().rposition(|&(_, acked)| acked) {
                            model[k].gens = s[i..].iter().map(|&(g, _)| g).collect();
                        } else {
                            model[k].gens.extend(s.iter().map(|&(g, _)| g));
                        }
                        s.clear();
                    }
                }
            }
            2 => {
                let r = run(&mut c, v, Op::Read, b * BS, BS, None);
                if r.result.is_ok() {
                    let got = decode(b, r.buf.expect("buffer").as_slice());
                    let mut now = model[b as usize].clone();
                    now.gens.extend(since[b as usize].iter().map(|&(g, _)| g));
                    now.check(got, &format!("seed {seed} step {step}: live block {b}"));
                } else {
                    failures += 1;
                }
            }
            _ => {
                gen += 1;
                let fua = rng.chance(30);
                let data = block_bytes(b, gen);
                let r = run(&mut c, v, Op::Write { fua }, b * BS, BS, Some(&data));
                failures += u64::from(r.result.is_err());
                let acked = r.result.is_ok();
                if acked && fua {
                    model[b as usize].gens = vec![gen];
                    since[b as usize].clear();
                } else {
                    since[b as usize].push((gen, acked));
                }
            }
        }
    }
    flush(&mut c, v);
    for (k, s) in since.iter_mut().enumerate() {
        if let Some(i) = s.iter().rposition(|&(_, acked)| acked) {
            model[k].gens = s[i..].iter().map(|&(g, _)| g).collect();
        } else {
            model[k].gens.extend(s.iter().map(|&(g, _)| g));
        }
    }
    let image = disk.crash(seed);
    e.shutdown().expect("shutdown");
    let e = Engine::open(&[DeviceSpec::Mem(image)], cfg(reactors))
        .unwrap_or_else(|err| panic!("seed {seed}: the crashed pool does not open: {err}"));
    let mut c = e.client();
    let back = read(&mut c, v, 0, blocks * BS);
    for b in 0..blocks {
        let bytes = &back[(b * BS) as usize..((b + 1) * BS) as usize];
        model[b as usize].check(decode(b, bytes), &format!("seed {seed}: block {b}"));
    }
    e.shutdown().expect("shutdown");
    failures
}

#[test]
fn faults_never_turn_into_acknowledged_flushes_or_foreign_data() {
    let _w = watchdog();
    let seeds: u64 = std::env::var("TESSEL_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let failures: u64 = (0..seeds).map(|s| fault_workload(0xFA17 + s)).sum();
    println!("fault model: {seeds} workloads, {failures} failed requests, 0 violations");
    assert!(failures > 0, "the faults must fire");
}

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    /// None when this process may not mount (not root, or in a container that forbids it).
    fn mount(tag: &str, mib: u64) -> Option<SmallFs> {
        let dir = std::env::temp_dir().join(format!("tessel-fullfs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tessel-test"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Write a file of zeros until the filesystem has no space left; returns its path.
fn fill_up(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    for chunk in [1 << 20, 4096] {
        let zeros = vec![0u8; chunk];
        while f.write_all(&zeros).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

#[test]
fn a_pool_file_whose_filesystem_ran_full_keeps_later_flushes() {
    let _w = watchdog();
    // The case through io_uring: a sparse pool file on a small filesystem. Every
    // data cluster is written once and trimmed, so that data writes find their pages and
    // only the journal (whose later blocks were never written) needs new ones.
    let Some(fs) = SmallFs::mount("enospc", 96) else {
        return skip("cannot mount a tmpfs (needs root and a mount namespace that allows it)");
    };
    let pool = fs.0.join("pool.img");
    let dev = [DeviceSpec::Path {
        path: pool.clone(),
        create_size: Some(64 << 20),
    }];
    Engine::format(&dev, &small_opts()).expect("format");
    let e = Engine::open(&dev, cfg(1)).expect("open");
    let v = e.create_volume("v", 1 << 30, 4096).unwrap().id;
    let mut c = e.client();
    let chunk = 256u64 << 10;
    let mut end = 0;
    loop {
        let r = run(
            &mut c,
            v,
            Op::Write { fua: false },
            end,
            chunk,
            Some(&pattern(end, chunk as usize, 1)),
        );
        match r.result {
            Ok(()) => end += chunk,
            Err(IoError::NoSpace) => break,
            Err(err) => panic!("filling the pool: {err}"),
        }
    }
    flush(&mut c, v);
    run(&mut c, v, Op::Trim, 0, end, None).result.expect("trim");
    flush(&mut c, v);
    e.checkpoint().expect("checkpoint");
    let filler = fill_up(&fs.0);
    let len = 4u64 << 20;
    write(&mut c, v, 0, &pattern(0, len as usize, 2));
    let failed = run(&mut c, v, Op::Flush, 0, 0, None).result;
    assert!(
        failed.is_err(),
        "the journal cannot grow on a full filesystem"
    );
    std::fs::remove_file(&filler).expect("free space");
    write(&mut c, v, 8 << 20, &pattern(8 << 20, len as usize, 3));
    flush(&mut c, v);
    // What a SIGKILL leaves: the file as it is now.
    let image = std::env::temp_dir().join(format!("tessel-fullfs-image-{}", std::process::id()));
    std::fs::copy(&pool, &image).expect("copy the pool");
    let e2 = Engine::open(&[DeviceSpec::path(&image)], cfg(1)).expect("reopen");
    let mut c2 = e2.client();
    let first = read(&mut c2, v, 0, len) == pattern(0, len as usize, 2);
    let second = read(&mut c2, v, 8 << 20, len) == pattern(8 << 20, len as usize, 3);
    e2.shutdown().expect("shutdown");
    let _ = std::fs::remove_file(&image);
    e.shutdown().expect("shutdown");
    assert!(
        first && second,
        "data flushed after space came back is lost ({first}, {second})"
    );
    assert_eq!(
        failed,
        Err(IoError::Device(libc::ENOSPC)),
        "the host is told why"
    );
}
