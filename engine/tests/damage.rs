//! Damaged metadata (issue 14): one flipped byte in a journal block or a control-log block
//! that blocks written after it depend on refuses the open, naming the ring and the block;
//! `salvage` opens such a pool, reports what it drops, and leaves it opening normally. A
//! torn last block (power loss during its write) still opens silently.

mod common;
use common::*;
use std::sync::Arc;
use tessel_engine::format::Superblock;
use tessel_engine::pool::{self, Ring};
use tessel_engine::*;

const ROUNDS: u64 = 12;
const LEN: u64 = 1 << 20;

/// A pool written in `ROUNDS` flushed rounds of 1 MiB on one reactor (each round's map
/// records in journal blocks of their own), then power loss: the image and its superblock.
fn journaled_image() -> (Arc<MemDisk>, Superblock, VolumeId) {
    let disk = MemDisk::new(64 << 20, true);
    let dev = [DeviceSpec::Mem(disk.clone())];
    let sb = Engine::format(&dev, &small_opts()).expect("format");
    let e = Engine::open(&dev, cfg(1)).expect("open");
    let v = e.create_volume("v", 32 << 20, 4096).unwrap().id;
    let mut c = e.client();
    for k in 0..ROUNDS {
        write(&mut c, v, k * LEN, &pattern(k * LEN, LEN as usize, 1));
        flush(&mut c, v);
    }
    let image = disk.crash(1);
    e.shutdown().expect("shutdown");
    (image, sb, v)
}

/// Flip one byte of block `seq` of a ring (its first lap).
fn flip(disk: &MemDisk, ring_start: u64, seq: u64) {
    let at = ring_start + seq * 4096 + 200;
    let mut b = [0u8; 1];
    disk.read(at, &mut b);
    disk.write(at, &[b[0] ^ 0x10]);
}

/// The last block of a ring that holds a block of the pool's current run (first lap).
fn last_block(disk: &MemDisk, ring_start: u64) -> u64 {
    let mut seq = 0;
    let mut b = vec![0u8; 4096];
    loop {
        disk.read(ring_start + (seq + 1) * 4096, &mut b);
        let s = u64::from_le_bytes(b[16..24].try_into().unwrap());
        if &b[..4] != b"TJNL" || s != seq + 1 {
            return seq;
        }
        seq += 1;
    }
}

fn open(disk: &Arc<MemDisk>) -> Result<Engine, PoolError> {
    Engine::open(&[DeviceSpec::Mem(disk.clone())], cfg(1))
}

fn rounds_intact(e: &Engine, v: VolumeId) -> u64 {
    let mut c = e.client();
    (0..ROUNDS)
        .take_while(|&k| read(&mut c, v, k * LEN, LEN) == pattern(k * LEN, LEN as usize, 1))
        .count() as u64
}

#[test]
fn a_damaged_journal_block_refuses_the_open_and_salvage_reports_what_it_drops() {
    let _w = watchdog();
    for bad in [1, 3] {
        let (image, sb, v) = journaled_image();
        let last = last_block(&image, sb.journal_start);
        assert!(last > bad + 1, "blocks after the damaged one: {last}");
        flip(&image, sb.journal_start, bad);
        let err = open(&image)
            .err()
            .expect("a damaged journal must not open silently");
        let PoolError::Damaged { damage, .. } = &err else {
            panic!("block {bad}: expected Damaged, got {err}");
        };
        assert_eq!((damage.ring, damage.seq), (Ring::Journal(0), bad), "{err}");
        assert_eq!(damage.offset, sb.journal_start + bad * 4096);
        assert_eq!(damage.last_seq, last);
        assert!(damage.blocks_after >= last - bad - 1 && damage.records_after > 0);
        let text = err.to_string();
        assert!(
            text.contains("journal region 0 block") && text.contains("salvage"),
            "{text}"
        );
        let report = pool::salvage(&[DeviceSpec::Mem(image.clone())]).expect("salvage");
        assert_eq!(report.damage, vec![damage.clone()]);
        assert_eq!(report.images, 1);
        let e = open(&image).expect("a salvaged pool opens");
        // What blocks before the damaged one recorded is there; the rest was dropped.
        assert!(rounds_intact(&e, v) >= 1, "block {bad}");
        assert!(rounds_intact(&e, v) < ROUNDS, "block {bad}");
        e.shutdown().expect("shutdown");
        open(&image).expect("and keeps opening").shutdown().unwrap();
    }
}

#[test]
fn a_torn_last_journal_block_still_opens() {
    let _w = watchdog();
    let (image, sb, v) = journaled_image();
    let last = last_block(&image, sb.journal_start);
    flip(&image, sb.journal_start, last);
    let e = open(&image).expect("a torn tail is what power loss leaves");
    assert!(rounds_intact(&e, v) >= ROUNDS - 2);
    e.shutdown().expect("shutdown");
}

#[test]
fn a_damaged_control_log_block_refuses_the_open_and_no_volume_vanishes_silently() {
    let _w = watchdog();
    let disk = MemDisk::new(64 << 20, true);
    let dev = [DeviceSpec::Mem(disk.clone())];
    let sb = Engine::format(&dev, &small_opts()).expect("format");
    let e = Engine::open(&dev, cfg(1)).expect("open");
    for name in ["a", "b", "c", "d"] {
        e.create_volume(name, 1 << 20, 4096).unwrap();
    }
    let image = disk.crash(2);
    e.shutdown().expect("shutdown");
    // The torn-tail case first, on a copy: the last record is the one power loss can tear.
    let copy = image.crash(0);
    flip(&copy, sb.control_start, 3);
    let e = open(&copy).expect("a torn last control block opens");
    assert_eq!(e.volumes().len(), 3);
    e.shutdown().unwrap();
    flip(&image, sb.control_start, 1);
    let err = open(&image)
        .err()
        .expect("volume b must not vanish silently");
    let PoolError::Damaged { damage, .. } = &err else {
        panic!("expected Damaged, got {err}");
    };
    assert_eq!(
        (damage.ring, damage.seq, damage.blocks_after),
        (Ring::ControlLog, 1, 2)
    );
    assert!(err.to_string().contains("control log block 1"), "{err}");
    let report = pool::salvage(&[DeviceSpec::Mem(image.clone())]).expect("salvage");
    assert_eq!(report.damage.len(), 1);
    assert_eq!(
        report.images, 1,
        "only volume a was recorded before the damage"
    );
    let e = open(&image).expect("a salvaged pool opens");
    let names: Vec<String> = e.volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a"]);
    e.shutdown().unwrap();
}
