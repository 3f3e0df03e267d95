//! The engine through its public API, on memory and on real files (io_uring, O_DIRECT).

mod common;
use common::*;
use tessel_engine::*;

fn mem_pool(size: u64, n: usize) -> (std::sync::Arc<MemDisk>, Engine) {
    let disk = MemDisk::new(size, false);
    let dev = [DeviceSpec::Mem(disk.clone())];
    Engine::format(&dev, &small_opts()).expect("format");
    (disk, Engine::open(&dev, cfg(n)).expect("open"))
}

#[test]
fn unwritten_blocks_read_as_zeros_and_writes_read_back() {
    let _w = watchdog();
    let (_d, e) = mem_pool(64 << 20, 2);
    let v = e.create_volume("v", 8 << 20, 512).unwrap();
    let mut c = e.client();
    assert!(read(&mut c, v.id, 0, 64 << 10).iter().all(|&b| b == 0));
    // Crosses clusters (16K) and a shard (1M) boundary, 512-aligned.
    let off = (1 << 20) - 3 * 512;
    let data = pattern(off, 40 << 10, 1);
    write(&mut c, v.id, off, &data);
    assert_eq!(read(&mut c, v.id, off, data.len() as u64), data);
    // Partial overwrite inside a block keeps the rest of the block.
    let small = pattern(off + 512, 512, 2);
    write(&mut c, v.id, off + 512, &small);
    let back = read(&mut c, v.id, off, 2048);
    assert_eq!(&back[..512], &data[..512]);
    assert_eq!(&back[512..1024], &small[..]);
    assert_eq!(&back[1024..], &data[1024..2048]);
    e.shutdown().unwrap();
}

#[test]
fn trim_and_write_zeroes_read_back_as_zeros_and_free_space() {
    let _w = watchdog();
    let (_d, e) = mem_pool(64 << 20, 2);
    let v = e.create_volume("v", 4 << 20, 4096).unwrap();
    let mut c = e.client();
    write(&mut c, v.id, 0, &pattern(0, 1 << 20, 3));
    flush(&mut c, v.id);
    let used = e.pool_info().used_bytes;
    assert_eq!(used, 1 << 20);
    run(&mut c, v.id, Op::Trim, 0, 1 << 20, None)
        .result
        .unwrap();
    run(
        &mut c,
        v.id,
        Op::WriteZeroes { fua: true },
        4096,
        8192,
        None,
    )
    .result
    .unwrap();
    assert!(read(&mut c, v.id, 0, 1 << 20).iter().all(|&b| b == 0));
    flush(&mut c, v.id);
    assert!(e.pool_info().used_bytes < used);
    e.shutdown().unwrap();
}

/// Clusters written on one reactor and trimmed after a reopen on two: half of the shards
/// moved to the reactor that does not own the groups their clusters come from, so its commit
/// frees clusters of another reactor's groups. After each flush the pool counts exactly the
/// clusters still mapped (it used to count such a free only once the owner had taken the
/// cluster back, after the flush was answered).
#[test]
fn frees_of_another_reactors_groups_are_counted_by_the_flush() {
    let _w = watchdog();
    const SIZE: u64 = 8 << 20;
    let (disk, e) = mem_pool(64 << 20, 1);
    let v = e.create_volume("v", SIZE, 4096).unwrap().id;
    let mut c = e.client();
    write(&mut c, v, 0, &pattern(0, SIZE as usize, 5));
    flush(&mut c, v);
    e.shutdown().unwrap();
    drop((c, e));
    let e = Engine::open(&[DeviceSpec::Mem(disk)], cfg(2)).unwrap();
    let mut c = e.client();
    let cs = e.pool_info().cluster_size;
    assert_eq!(e.pool_info().used_bytes, SIZE);
    for k in 0..SIZE / cs {
        run(&mut c, v, Op::Trim, k * cs, cs, None).result.unwrap();
        flush(&mut c, v);
        assert_eq!(
            e.pool_info().used_bytes,
            e.allocated_bytes(v),
            "after trimming cluster {k} and a flush"
        );
    }
    assert_eq!(e.pool_info().used_bytes, 0);
    e.shutdown().unwrap();
}

#[test]
fn bad_requests_get_typed_errors() {
    let _w = watchdog();
    let (_d, e) = mem_pool(64 << 20, 2);
    let v = e.create_volume("v", 1 << 20, 4096).unwrap();
    let mut c = e.client();
    let r = run(&mut c, v.id, Op::Read, 1 << 20, 4096, None);
    assert!(matches!(r.result, Err(IoError::OutOfRange { .. })));
    let r = run(&mut c, v.id, Op::Read, 512, 4096, None);
    assert!(matches!(r.result, Err(IoError::Misaligned { .. })));
    let r = run(&mut c, v.id, Op::Trim, 0, 0, None);
    assert_eq!(r.result, Err(IoError::ZeroLength));
    let r = run(&mut c, VolumeId(999), Op::Read, 0, 4096, None);
    assert_eq!(r.result, Err(IoError::UnknownVolume));
    let r = c.run(Request {
        tag: 5,
        volume: v.id,
        op: Op::Write { fua: false },
        offset: 0,
        len: 8192,
        buf: Some(AlignedBuf::zeroed(4096)),
    });
    assert_eq!(r.result, Err(IoError::BadBuffer));
    assert_eq!(r.tag, 5);
    assert!(matches!(
        e.create_volume("v", 1 << 20, 4096),
        Err(ControlError::Exists(_))
    ));
    assert!(matches!(
        e.create_volume("bad name", 1 << 20, 4096),
        Err(ControlError::BadName(_))
    ));
    assert!(matches!(
        e.create_volume("w", 1000, 512),
        Err(ControlError::BadSize(_))
    ));
    assert!(matches!(
        e.create_volume("w", 1 << 20, 1024),
        Err(ControlError::BadBlockSize(1024))
    ));
    assert!(matches!(
        e.delete_volume("nope"),
        Err(ControlError::UnknownVolume(_))
    ));
    e.delete_volume("v").unwrap();
    let r = run(&mut c, v.id, Op::Read, 0, 4096, None);
    assert_eq!(r.result, Err(IoError::UnknownVolume));
    e.shutdown().unwrap();
}

#[test]
fn a_full_pool_refuses_new_clusters_but_overwrites_work() {
    let _w = watchdog();
    let (_d, e) = mem_pool(48 << 20, 2);
    let v = e.create_volume("big", 1 << 30, 4096).unwrap();
    let mut c = e.client();
    let (total, used) = (e.pool_info().total_bytes, e.pool_info().used_bytes);
    let chunk = 256 << 10;
    let mut off = 0;
    let mut full = false;
    while off < 2 * total {
        let r = run(
            &mut c,
            v.id,
            Op::Write { fua: false },
            off,
            chunk,
            Some(&pattern(off, chunk as usize, 1)),
        );
        match r.result {
            Ok(()) => off += chunk,
            Err(IoError::NoSpace) => {
                full = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(full, "pool never filled");
    // Everything but the clusters a last partial chunk took may be written.
    let free = total - used;
    assert!(
        off + chunk >= free,
        "only {off} of {free} free bytes written before NoSpace"
    );
    write(&mut c, v.id, 0, &pattern(0, 4096, 9));
    assert_eq!(read(&mut c, v.id, 0, 4096), pattern(0, 4096, 9));
    e.shutdown().unwrap();
}

#[test]
fn volumes_and_data_survive_reopen_on_a_real_file() {
    let _w = watchdog();
    let dir = std::env::temp_dir().join(format!("tessel-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pool.img");
    let _ = std::fs::remove_file(&path);
    let dev = [DeviceSpec::Path {
        path: path.clone(),
        create_size: Some(256 << 20),
    }];
    Engine::format(&dev, &small_opts()).unwrap();
    let e = Engine::open(&dev, cfg(2)).unwrap();
    let v = e.create_volume("data", 16 << 20, 4096).unwrap();
    let mut c = e.client();
    for i in 0..64u64 {
        write(&mut c, v.id, i * 65536, &pattern(i * 65536, 8192, 4));
    }
    flush(&mut c, v.id);
    // A second open while the first runs is refused.
    assert!(matches!(
        Engine::open(&dev, cfg(1)),
        Err(PoolError::Locked { .. })
    ));
    e.shutdown().unwrap();
    drop((c, e));
    let e = Engine::open(&dev, cfg(1)).unwrap();
    let v = e.volume("data").unwrap();
    let mut c = e.client();
    for i in 0..64u64 {
        assert_eq!(
            read(&mut c, v.id, i * 65536, 8192),
            pattern(i * 65536, 8192, 4),
            "block {i}"
        );
    }
    e.shutdown().unwrap();
    drop((c, e));
    // Formatting over a pool needs force.
    assert!(matches!(
        Engine::format(&dev, &small_opts()),
        Err(PoolError::InUse { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn opening_a_foreign_or_corrupt_device_fails_with_its_name() {
    let _w = watchdog();
    let dir = std::env::temp_dir().join(format!("tessel-foreign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zeros.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    match Engine::open(&[DeviceSpec::path(&path)], cfg(1)) {
        Err(PoolError::NotAPool { device }) => assert_eq!(device, path),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened a zero file"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writes_owned_by_one_reactor_can_fill_the_whole_pool() {
    let _w = watchdog();
    // Shards alternate between the two reactors: writing only even shards makes reactor 0
    // allocate everything, borrowing reactor 1's groups down to its last one.
    let (_d, e) = mem_pool(48 << 20, 2);
    let shard = small_opts().shard_size;
    let v = e.create_volume("skewed", 1 << 30, 4096).unwrap();
    let mut c = e.client();
    let info = e.pool_info();
    let free = info.total_bytes - info.used_bytes;
    let chunk = 256 << 10;
    let mut written = 0u64;
    let mut k = 0u64;
    loop {
        let off = (k / (shard / chunk)) * 2 * shard + (k % (shard / chunk)) * chunk;
        assert!(off < 1 << 30, "the volume ran out before the pool");
        let data = pattern(off, chunk as usize, 3);
        match run(
            &mut c,
            v.id,
            Op::Write { fua: false },
            off,
            chunk,
            Some(&data),
        )
        .result
        {
            Ok(()) => written += chunk,
            Err(IoError::NoSpace) => break,
            Err(e) => panic!("unexpected {e}"),
        }
        k += 1;
    }
    // Everything but the clusters a last partial chunk took may be written.
    assert!(
        written + chunk >= free,
        "{written} of {free} free bytes written before NoSpace"
    );
    let first = pattern(0, 4096, 3);
    assert_eq!(read(&mut c, v.id, 0, 4096), first);
    e.shutdown().unwrap();
}

/// Bytes per write of `fill_until_full`, and slots of that size in its 1 GiB volumes.
const FILL_CHUNK: u64 = 64 << 10;
const FILL_SLOTS: u64 = (1 << 30) / FILL_CHUNK;

/// Write slots of `FILL_CHUNK` bytes with pattern generation `gen`, 32 in flight, visiting
/// them in scattered order (a stride coprime with the slot count) from the `*next`th on,
/// until one fails with NoSpace and the others in flight are answered. Returns the slots
/// written and those refused. Fails after 60 s: two dry reactors once passed one group to
/// and fro without using it (a livelock).
fn fill_until_full(c: &mut Client, v: VolumeId, next: &mut u64, gen: u8) -> (Vec<u64>, Vec<u64>) {
    let (mut ok, mut failed, mut out) = (Vec::new(), Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    while failed.is_empty() || c.in_flight() > 0 {
        while failed.is_empty() && c.in_flight() < 32 {
            let slot = *next * 7919 % FILL_SLOTS;
            let off = slot * FILL_CHUNK;
            c.submit(Request {
                tag: slot,
                volume: v,
                op: Op::Write { fua: false },
                offset: off,
                len: FILL_CHUNK,
                buf: Some(AlignedBuf::from_slice(&pattern(
                    off,
                    FILL_CHUNK as usize,
                    gen,
                ))),
            });
            *next += 1;
        }
        c.wait(std::time::Duration::from_millis(100));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "generation {gen}: writes stuck near full, {} in flight",
            c.in_flight()
        );
        c.poll(&mut out);
        for done in out.drain(..) {
            match done.result {
                Ok(()) => ok.push(done.tag),
                Err(IoError::NoSpace) => failed.push(done.tag),
                Err(e) => panic!("generation {gen}: unexpected {e}"),
            }
        }
    }
    (ok, failed)
}

#[test]
fn both_reactors_filling_the_pool_at_once_use_it_all_and_lose_nothing() {
    let _w = watchdog();
    // 32 writes in flight over every shard: both reactors run dry near the end and pass
    // their last groups back and forth until the pool is full.
    let (_d, e) = mem_pool(48 << 20, 2);
    let v = e.create_volume("both", 1 << 30, 4096).unwrap();
    let mut c = e.client();
    let info = e.pool_info();
    let free = info.total_bytes - info.used_bytes;
    let (ok, _) = fill_until_full(&mut c, v.id, &mut 0, 5);
    let written = ok.len() as u64 * FILL_CHUNK;
    // The writes in flight when the first NoSpace came may each have taken part of a chunk.
    assert!(
        written + 32 * FILL_CHUNK >= free,
        "{written} of {free} free bytes written before NoSpace"
    );
    for slot in ok {
        let off = slot * FILL_CHUNK;
        assert_eq!(
            read(&mut c, v.id, off, FILL_CHUNK),
            pattern(off, FILL_CHUNK as usize, 5)
        );
    }
    e.shutdown().unwrap();
}

/// Fill the pool with 32 writes in flight over both reactors' shards, trim half of what was
/// written, flush, and fill again, four times: near full the last groups move between the
/// reactors, so frees land in groups that changed hands. Every round must reuse what the
/// previous trims freed, and at the end every block reads back as written or trimmed.
#[test]
fn fill_trim_refill_with_groups_changing_hands_loses_nothing() {
    let _w = watchdog();
    let (_d, e) = mem_pool(48 << 20, 2);
    let v = e.create_volume("churn", 1 << 30, 4096).unwrap().id;
    let mut c = e.client();
    let chunk = FILL_CHUNK;
    // Slot -> generation written (0: trimmed); slots never touched are absent.
    let mut model = std::collections::BTreeMap::<u64, u8>::new();
    let mut next = 0u64;
    for round in 1..=4u8 {
        let free_before = {
            let i = e.pool_info();
            i.total_bytes - i.used_bytes
        };
        let (ok, failed) = fill_until_full(&mut c, v, &mut next, round);
        let written = ok.len() as u64 * chunk;
        model.extend(ok.into_iter().map(|slot| (slot, round)));
        assert!(
            written + 32 * chunk >= free_before,
            "round {round}: {written} of {free_before} free bytes written"
        );
        // A failed write may have landed in part: trim it to a known state.
        for slot in failed {
            run(&mut c, v, Op::Trim, slot * chunk, chunk, None)
                .result
                .unwrap();
            model.insert(slot, 0);
        }
        let live: Vec<u64> = model
            .iter()
            .filter(|&(_, &g)| g != 0)
            .map(|(&s, _)| s)
            .collect();
        for slot in live.into_iter().step_by(2) {
            run(&mut c, v, Op::Trim, slot * chunk, chunk, None)
                .result
                .unwrap();
            model.insert(slot, 0);
        }
        flush(&mut c, v);
        assert_eq!(
            e.pool_info().used_bytes,
            e.allocated_bytes(v),
            "round {round}"
        );
    }
    for (&slot, &g) in &model {
        let want = match g {
            0 => vec![0; chunk as usize],
            g => pattern(slot * chunk, chunk as usize, g),
        };
        assert!(
            read(&mut c, v, slot * chunk, chunk) == want,
            "slot {slot} (generation {g})"
        );
    }
    e.shutdown().unwrap();
}
