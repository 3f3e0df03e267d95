//! Writes, write-zeroes and trims at any byte offset and length (what an NBD client that
//! negotiated no block size sends): the bytes land exactly, through in-place, fresh and
//! redirected clusters, and the read-modify-write of a partial grain loses no concurrent
//! write to the rest of that grain.

mod common;
use common::*;
use std::sync::Arc;
use tessel_engine::*;

fn mem_pool(reactors: usize) -> (Arc<MemDisk>, Engine) {
    let disk = garbage_disk(64 << 20, false, 7);
    let dev = [DeviceSpec::Mem(disk.clone())];
    Engine::format(&dev, &small_opts()).expect("format");
    (disk, Engine::open(&dev, cfg(reactors)).expect("open"))
}

/// A pool on a file, through io_uring and O_DIRECT: device I/O that is not aligned in
/// memory or on the device fails there (a memory disk takes anything).
struct FilePool(std::path::PathBuf);

impl FilePool {
    fn open(tag: &str) -> (FilePool, Engine) {
        let dir = std::env::temp_dir().join(format!("tessel-bytes-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dev = [DeviceSpec::Path {
            path: dir.join("pool"),
            create_size: Some(64 << 20),
        }];
        Engine::format(&dev, &small_opts()).expect("format");
        let e = Engine::open(&dev, cfg(2)).expect("open");
        (FilePool(dir), e)
    }
}

impl Drop for FilePool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next() as u8).collect()
}

#[test]
fn byte_ranges_land_exactly_on_both_block_sizes_across_a_snapshot() {
    let _w = watchdog();
    let (_d, e) = mem_pool(2);
    byte_ranges_land_exactly(&e);
}

#[test]
fn byte_ranges_land_exactly_through_o_direct() {
    let _w = watchdog();
    let (_dir, e) = FilePool::open("odirect");
    byte_ranges_land_exactly(&e);
}

fn byte_ranges_land_exactly(e: &Engine) {
    for (name, bs) in [("b512", 512u32), ("b4k", 4096)] {
        let size = 2u64 << 20;
        let v = e.create_volume(name, size, bs).unwrap();
        let mut c = e.client();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(u64::from(bs));
        for step in 0..400 {
            if step == 200 {
                // Later writes redirect: the partial grains come from the snapshot's cluster.
                e.snapshot_create(name, "s").unwrap();
            }
            let most = if rng.chance(80) { 600 } else { 70_000 };
            let len = 1 + rng.below(most) as usize;
            let at = rng.below(size - len as u64);
            let range = at as usize..at as usize + len;
            match rng.below(10) {
                0 => {
                    let r = run(
                        &mut c,
                        v.id,
                        Op::WriteZeroes { fua: false },
                        at,
                        len as u64,
                        None,
                    );
                    r.result.unwrap();
                    model[range].fill(0);
                }
                1 => {
                    // Trim is advice for partial grains: what it leaves must be the old bytes
                    // or zeros; write over it so the model stays exact.
                    run(&mut c, v.id, Op::Trim, at, len as u64, None)
                        .result
                        .unwrap();
                    let data = bytes(&mut rng, len);
                    write(&mut c, v.id, at, &data);
                    model[range].copy_from_slice(&data);
                }
                _ => {
                    let data = bytes(&mut rng, len);
                    let fua = rng.chance(20);
                    let r = run(&mut c, v.id, Op::Write { fua }, at, len as u64, Some(&data));
                    r.result.unwrap();
                    model[range].copy_from_slice(&data);
                }
            }
        }
        assert!(
            read(&mut c, v.id, 0, size) == model,
            "{name}: the volume differs from the model"
        );
    }
    e.shutdown().unwrap();
}

#[test]
fn reads_and_block_status_stay_block_aligned() {
    let _w = watchdog();
    let (_d, e) = mem_pool(1);
    let v = e.create_volume("v", 1 << 20, 4096).unwrap();
    let mut c = e.client();
    for op in [Op::Read, Op::BlockStatus] {
        let r = run(&mut c, v.id, op, 1, 4096, None);
        assert!(
            matches!(r.result, Err(IoError::Misaligned { .. })),
            "{op:?}"
        );
    }
    e.shutdown().unwrap();
}

/// One thread writes random byte ranges inside the even 512-byte blocks of a 512-byte
/// volume while another rewrites the odd blocks whole: both share every 4 KiB grain, so a
/// read-modify-write that read the grain before the other's write and wrote it back after
/// would bring back an odd block's old contents (or an even block's).
#[test]
fn sub_block_writes_lose_no_concurrent_write_to_the_same_grain() {
    let _w = watchdog();
    let (_d, e) = mem_pool(2);
    let blocks = 256u64; // 128 KiB: eight 16 KiB clusters of 32 grains
    let v = e.create_volume("v", blocks * 512, 512).unwrap();
    let id = v.id;
    let odd = {
        let mut c = e.client();
        std::thread::spawn(move || {
            let mut last = vec![0u8; blocks as usize];
            for round in 1..=40u8 {
                for b in (1..blocks).step_by(2) {
                    write(&mut c, id, b * 512, &[round; 512]);
                    last[b as usize] = round;
                }
            }
            last
        })
    };
    let mut c = e.client();
    let mut model = vec![0u8; (blocks * 512) as usize];
    let mut rng = Rng(3);
    for _ in 0..4000 {
        let b = rng.below(blocks / 2) * 2;
        let start = rng.below(512);
        let len = 1 + rng.below(512 - start);
        let at = b * 512 + start;
        let data = bytes(&mut rng, len as usize);
        write(&mut c, id, at, &data);
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    let last = odd.join().unwrap();
    let got = read(&mut c, id, 0, blocks * 512);
    for b in 0..blocks as usize {
        let block = &got[b * 512..(b + 1) * 512];
        if b % 2 == 1 {
            assert!(
                block.iter().all(|&x| x == last[b]),
                "odd block {b}: a write of round {} was lost",
                last[b]
            );
        } else {
            assert!(
                block == &model[b * 512..(b + 1) * 512],
                "even block {b}: a sub-block write was lost"
            );
        }
    }
    e.shutdown().unwrap();
}
