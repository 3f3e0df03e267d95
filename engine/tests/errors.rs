//! Every bad input of issue 2 gets its typed error, never a panic. Extends the basic cases
//! in engine.rs (out of range, misaligned offset, zero length, unknown volume, short
//! buffer, duplicate/bad names, bad size and block size, deleting an unknown volume).

mod common;
use common::*;
use std::sync::Arc;
use tessel_engine::*;

fn mem_pool(n: usize) -> (Arc<MemDisk>, Engine) {
    let disk = MemDisk::new(64 << 20, false);
    let dev = [DeviceSpec::Mem(disk.clone())];
    Engine::format(&dev, &small_opts()).expect("format");
    (disk, Engine::open(&dev, cfg(n)).expect("open"))
}

fn req(vol: VolumeId, op: Op, offset: u64, len: u64, buf: Option<usize>) -> Request {
    Request {
        tag: 42,
        volume: vol,
        op,
        offset,
        len,
        buf: buf.map(AlignedBuf::zeroed),
    }
}

#[test]
fn misaligned_reads_and_block_status_are_refused_on_every_block_size() {
    let _w = watchdog();
    let (_d, e) = mem_pool(2);
    let small = e.create_volume("s", 1 << 20, 512).unwrap();
    let big = e.create_volume("b", 1 << 20, 4096).unwrap();
    let mut c = e.client();
    // Writes, trims and write-zeroes take any byte range (tests/bytes.rs).
    let ops = [Op::Read, Op::BlockStatus];
    for op in ops {
        let buf = |len: u64| matches!(op, Op::Read | Op::Write { .. }).then_some(len as usize);
        for (vol, off, len) in [
            (small.id, 256, 512),
            (small.id, 0, 700),
            (big.id, 512, 4096),
            (big.id, 0, 4096 + 512),
        ] {
            let r = c.run(req(vol, op, off, len, buf(len)));
            assert_eq!(
                r.result,
                Err(IoError::Misaligned {
                    offset: off,
                    len,
                    block_size: if vol == small.id { 512 } else { 4096 }
                }),
                "{op:?} {off}+{len}"
            );
            assert_eq!(r.tag, 42);
        }
    }
    // The buffer comes back with the refusal.
    let r = c.run(req(small.id, Op::Read, 1, 512, Some(512)));
    assert_eq!(r.buf.map(|b| b.len()), Some(512));
    e.shutdown().unwrap();
}

#[test]
fn ranges_past_the_end_are_refused_even_when_they_overflow() {
    let _w = watchdog();
    let (_d, e) = mem_pool(1);
    let v = e.create_volume("v", 1 << 20, 512).unwrap();
    let mut c = e.client();
    for (off, len) in [
        ((1 << 20) - 512, 1024),
        (1 << 20, 512),
        (u64::MAX - 511, 512),
        (512, u64::MAX - 511),
    ] {
        for op in [Op::Trim, Op::WriteZeroes { fua: true }, Op::BlockStatus] {
            let r = c.run(req(v.id, op, off, len, None));
            assert!(
                matches!(r.result, Err(IoError::OutOfRange { .. })),
                "{op:?} {off}+{len}: {:?}",
                r.result
            );
        }
    }
    let r = c.run(req(v.id, Op::Read, (1 << 20) - 512, 1024, Some(1024)));
    assert!(matches!(r.result, Err(IoError::OutOfRange { .. })));
    // The last block is fine.
    write(&mut c, v.id, (1 << 20) - 512, &[7u8; 512]);
    assert_eq!(read(&mut c, v.id, (1 << 20) - 512, 512), vec![7u8; 512]);
    e.shutdown().unwrap();
}

#[test]
fn buffers_must_match_the_op() {
    let _w = watchdog();
    let (_d, e) = mem_pool(1);
    let v = e.create_volume("v", 1 << 20, 4096).unwrap();
    let mut c = e.client();
    for (op, buf) in [
        (Op::Read, None),
        (Op::Write { fua: false }, None),
        (Op::Read, Some(8192)),
        (Op::Trim, Some(4096)),
        (Op::WriteZeroes { fua: false }, Some(4096)),
    ] {
        let r = c.run(req(v.id, op, 0, 4096, buf));
        assert_eq!(r.result, Err(IoError::BadBuffer), "{op:?} with {buf:?}");
    }
    for op in [
        Op::Read,
        Op::Write { fua: true },
        Op::WriteZeroes { fua: true },
    ] {
        let r = c.run(req(v.id, op, 0, 0, Some(0)));
        assert_eq!(r.result, Err(IoError::ZeroLength), "{op:?}");
    }
    e.shutdown().unwrap();
}

#[test]
fn a_deleted_volume_refuses_io_and_its_name_can_be_reused_empty() {
    let _w = watchdog();
    let (_d, e) = mem_pool(2);
    let v = e.create_volume("v", 4 << 20, 512).unwrap();
    let mut c = e.client();
    write(&mut c, v.id, 0, &pattern(0, 64 << 10, 1));
    e.delete_volume("v").unwrap();
    for op in [
        Op::Write { fua: true },
        Op::Trim,
        Op::WriteZeroes { fua: false },
        Op::Flush,
        Op::BlockStatus,
    ] {
        let buf = matches!(op, Op::Write { .. }).then_some(4096);
        let len = if op == Op::Flush { 0 } else { 4096 };
        let r = c.run(req(v.id, op, 0, len, buf));
        assert_eq!(r.result, Err(IoError::UnknownVolume), "{op:?}");
    }
    assert!(matches!(
        e.delete_volume("v"),
        Err(ControlError::UnknownVolume(_))
    ));
    assert!(matches!(
        e.resize_volume("v", 8 << 20),
        Err(ControlError::UnknownVolume(_))
    ));
    let w = e.create_volume("v", 4 << 20, 512).unwrap();
    assert_ne!(w.id, v.id, "volume ids are never reused");
    assert!(read(&mut c, w.id, 0, 64 << 10).iter().all(|&b| b == 0));
    e.shutdown().unwrap();
}

#[test]
fn control_operations_refuse_bad_names_and_sizes() {
    let _w = watchdog();
    let (_d, e) = mem_pool(1);
    for name in ["", &"x".repeat(65), "a/b", "é", "a b", "semi;colon"] {
        assert!(
            matches!(
                e.create_volume(name, 1 << 20, 512),
                Err(ControlError::BadName(_))
            ),
            "{name:?}"
        );
    }
    e.create_volume(&"x".repeat(64), 1 << 20, 512)
        .expect("64 characters");
    for (size, bs) in [(0, 512), (4096 + 512, 4096), (MAX_VOLUME_SIZE + 4096, 4096)] {
        assert!(
            matches!(
                e.create_volume("v", size, bs),
                Err(ControlError::BadSize(_))
            ),
            "{size} {bs}"
        );
    }
    for bs in [0, 1024, 2048, 8192] {
        assert!(matches!(
            e.create_volume("v", 1 << 20, bs),
            Err(ControlError::BadBlockSize(b)) if b == bs
        ));
    }
    e.create_volume("v", 1 << 20, 4096).unwrap();
    for size in [512 << 10, (1 << 20) + 512, 0, MAX_VOLUME_SIZE + 4096] {
        assert!(
            matches!(e.resize_volume("v", size), Err(ControlError::BadSize(_))),
            "resize to {size}"
        );
    }
    assert_eq!(
        e.volume("v").unwrap().size,
        1 << 20,
        "a refused resize changes nothing"
    );
    assert!(e.volume("nope").is_none());
    e.shutdown().unwrap();
}

#[test]
fn a_64_tib_volume_works_at_both_ends() {
    let _w = watchdog();
    let (_d, e) = mem_pool(2);
    let v = e.create_volume("huge", MAX_VOLUME_SIZE, 4096).unwrap();
    let mut c = e.client();
    let last = MAX_VOLUME_SIZE - (64 << 10);
    write(&mut c, v.id, last, &pattern(last, 64 << 10, 3));
    write(&mut c, v.id, 0, &pattern(0, 4096, 4));
    assert_eq!(
        read(&mut c, v.id, last, 64 << 10),
        pattern(last, 64 << 10, 3)
    );
    let r = run(&mut c, v.id, Op::Read, MAX_VOLUME_SIZE, 4096, None);
    assert!(matches!(r.result, Err(IoError::OutOfRange { .. })));
    flush(&mut c, v.id);
    assert_eq!(e.allocated_bytes(v.id), 5 * (16 << 10));
    e.shutdown().unwrap();
}

#[test]
fn opening_needs_devices_and_no_more_cores_than_journal_regions() {
    let _w = watchdog();
    assert!(matches!(
        Engine::open(&[], cfg(1)),
        Err(PoolError::Geometry(_))
    ));
    let disk = MemDisk::new(64 << 20, false);
    let dev = [DeviceSpec::Mem(disk)];
    Engine::format(&dev, &small_opts()).unwrap();
    match Engine::open(&dev, cfg(5)) {
        Err(PoolError::Geometry(m)) => assert!(m.contains("journal regions"), "{m}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened with more reactors than journal regions"),
    }
    let bad = FormatOptions {
        cluster_size: 2048,
        force: true,
        ..small_opts()
    };
    assert!(matches!(
        Engine::format(&dev, &bad),
        Err(PoolError::Geometry(_))
    ));
    let bad = FormatOptions {
        shard_size: (1 << 20) + 4096,
        force: true,
        ..small_opts()
    };
    assert!(matches!(
        Engine::format(&dev, &bad),
        Err(PoolError::Geometry(_))
    ));
    // A refused format wrote nothing; a pool already there needs force, and with force it
    // is a new, empty pool.
    let e = Engine::open(&dev, cfg(1)).unwrap();
    e.create_volume("v", 1 << 20, 512).unwrap();
    e.shutdown().unwrap();
    assert!(matches!(
        Engine::format(&dev, &small_opts()),
        Err(PoolError::InUse { .. })
    ));
    let forced = FormatOptions {
        force: true,
        ..small_opts()
    };
    Engine::format(&dev, &forced).unwrap();
    let e = Engine::open(&dev, cfg(1)).unwrap();
    assert!(e.volumes().is_empty());
    e.shutdown().unwrap();
}

#[test]
fn requests_after_shutdown_fail_cleanly() {
    let _w = watchdog();
    let (_d, e) = mem_pool(2);
    let v = e.create_volume("v", 1 << 20, 512).unwrap();
    let mut c = e.client();
    e.shutdown().unwrap();
    let r = run(&mut c, v.id, Op::Read, 0, 512, None);
    assert_eq!(r.result, Err(IoError::ShuttingDown));
    e.shutdown().expect("a second shutdown is harmless");
}
