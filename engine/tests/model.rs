//! Model-based tests: random sequences of volume and I/O operations against an in-memory
//! model, on 1-3 reactors, with clean close/reopen in between, on a pool that starts as
//! garbage. After every step the pool's space accounting is checked against the engine's
//! own allocation count: used >= allocated, and equal once settled (after a flush or a
//! reopen; in half the cases every step is settled and checked exactly).
//!
//! Trim semantics modelled: a trimmed range reads as zeros or as its old contents, per
//! 512-byte sector (tessel unmaps whole clusters and clears whole 4 KiB blocks of owned
//! clusters; partial blocks keep their data); once read, a sector keeps what it showed.
//! Write-zeroes reads as zeros exactly.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use tessel_engine::*;

const SECTOR: usize = 512;
const POOL: u64 = 64 << 20;
const MAX_VOLUMES: usize = 4;

#[derive(Clone, Debug)]
enum Step {
    Create {
        name: u8,
        kib: u32,
        bs4k: bool,
    },
    Write {
        vol: u8,
        at: u32,
        blocks: u16,
        fua: bool,
        fill: Fill,
    },
    Read {
        vol: u8,
        at: u32,
        blocks: u16,
    },
    Trim {
        vol: u8,
        at: u32,
        blocks: u16,
    },
    Zero {
        vol: u8,
        at: u32,
        blocks: u16,
        fua: bool,
    },
    Flush,
    Resize {
        vol: u8,
        grow_kib: u16,
    },
    Delete {
        vol: u8,
    },
    Reopen {
        reactors: usize,
    },
}

/// Data a write carries: random bytes, or one byte repeated (zeros included).
#[derive(Clone, Copy, Debug)]
enum Fill {
    Random(u64),
    Byte(u8),
}

fn step() -> impl Strategy<Value = Step> {
    let at = any::<u32>();
    // Up to 96 KiB of 512-byte blocks (24 of 4 KiB): crosses 16 KiB clusters.
    let blocks = 1..192u16;
    prop_oneof![
        2 => (0..6u8, 16..2600u32, any::<bool>())
            .prop_map(|(name, kib, bs4k)| Step::Create { name, kib, bs4k }),
        10 => (any::<u8>(), at, blocks.clone(), any::<bool>(), prop_oneof![
            any::<u64>().prop_map(Fill::Random),
            any::<u8>().prop_map(Fill::Byte),
            Just(Fill::Byte(0)),
        ])
            .prop_map(|(vol, at, blocks, fua, fill)| Step::Write { vol, at, blocks, fua, fill }),
        6 => (any::<u8>(), at, blocks.clone())
            .prop_map(|(vol, at, blocks)| Step::Read { vol, at, blocks }),
        3 => (any::<u8>(), at, blocks.clone())
            .prop_map(|(vol, at, blocks)| Step::Trim { vol, at, blocks }),
        3 => (any::<u8>(), at, blocks, any::<bool>())
            .prop_map(|(vol, at, blocks, fua)| Step::Zero { vol, at, blocks, fua }),
        2 => Just(Step::Flush),
        1 => (any::<u8>(), 1..1100u16).prop_map(|(vol, grow_kib)| Step::Resize { vol, grow_kib }),
        1 => any::<u8>().prop_map(|vol| Step::Delete { vol }),
        1 => (1..=3usize).prop_map(|reactors| Step::Reopen { reactors }),
    ]
}

/// A volume as the model sees it.
struct Vol {
    id: VolumeId,
    bs: u64,
    data: Vec<u8>,
    /// Per sector: trimmed since last written, so zeros are acceptable too.
    maybe_zero: Vec<bool>,
}

struct Harness {
    dev: [DeviceSpec; 1],
    engine: Engine,
    client: Client,
    vols: BTreeMap<String, Vol>,
    cluster: u64,
}

impl Harness {
    fn new(reactors: usize) -> Harness {
        let disk: Arc<MemDisk> = garbage_disk(POOL, false, reactors as u64);
        let dev = [DeviceSpec::Mem(disk)];
        Engine::format(&dev, &small_opts()).expect("format");
        let engine = Engine::open(&dev, cfg(reactors)).expect("open");
        let client = engine.client();
        let cluster = engine.pool_info().cluster_size;
        Harness {
            dev,
            engine,
            client,
            vols: BTreeMap::new(),
            cluster,
        }
    }

    /// The `k`th volume (modulo how many exist), if any.
    fn pick(&self, k: u8) -> Option<String> {
        let n = self.vols.len();
        (n > 0).then(|| self.vols.keys().nth(k as usize % n).cloned().expect("name"))
    }

    /// A block-aligned range of volume `name` from two random numbers.
    fn range(&self, name: &str, at: u32, blocks: u16) -> (VolumeId, u64, u64) {
        let v = &self.vols[name];
        let total = v.data.len() as u64 / v.bs;
        let first = at as u64 % total;
        let per_block = v.bs / SECTOR as u64;
        let n = (blocks as u64 / per_block).max(1).min(total - first);
        (v.id, first * v.bs, n * v.bs)
    }

    fn sectors(off: u64, len: u64) -> std::ops::Range<usize> {
        off as usize / SECTOR..(off + len) as usize / SECTOR
    }

    fn apply(&mut self, s: &Step) {
        match *s {
            Step::Create { name, kib, bs4k } => {
                let name = format!("v{name}");
                if self.vols.contains_key(&name) || self.vols.len() >= MAX_VOLUMES {
                    return;
                }
                let bs = if bs4k { 4096 } else { 512 };
                let size = (kib as u64 * 1024 / bs).max(1) * bs;
                let info = self
                    .engine
                    .create_volume(&name, size, bs as u32)
                    .expect("create");
                assert_eq!((info.size, info.block_size), (size, bs as u32));
                // A new volume reads zeros, whatever the pool held before.
                assert!(read(&mut self.client, info.id, 0, size)
                    .iter()
                    .all(|&b| b == 0));
                self.vols.insert(
                    name,
                    Vol {
                        id: info.id,
                        bs,
                        data: vec![0; size as usize],
                        maybe_zero: vec![false; size as usize / SECTOR],
                    },
                );
            }
            Step::Write {
                vol,
                at,
                blocks,
                fua,
                fill,
            } => {
                let Some(name) = self.pick(vol) else { return };
                let (id, off, len) = self.range(&name, at, blocks);
                let data: Vec<u8> = match fill {
                    Fill::Byte(b) => vec![b; len as usize],
                    Fill::Random(seed) => {
                        let mut x = seed;
                        (0..len)
                            .map(|_| {
                                x = x
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                (x >> 56) as u8
                            })
                            .collect()
                    }
                };
                let r = run(
                    &mut self.client,
                    id,
                    Op::Write { fua },
                    off,
                    len,
                    Some(&data),
                );
                r.result.expect("write");
                let v = self.vols.get_mut(&name).expect("vol");
                v.data[off as usize..(off + len) as usize].copy_from_slice(&data);
                v.maybe_zero[Self::sectors(off, len)].fill(false);
            }
            Step::Read { vol, at, blocks } => {
                let Some(name) = self.pick(vol) else { return };
                let (id, off, len) = self.range(&name, at, blocks);
                let got = read(&mut self.client, id, off, len);
                let status = run(&mut self.client, id, Op::BlockStatus, off, len, None);
                status.result.expect("block status");
                let v = self.vols.get_mut(&name).expect("vol");
                for k in Self::sectors(off, len) {
                    let g = &got[k * SECTOR - off as usize..][..SECTOR];
                    let want = &mut v.data[k * SECTOR..(k + 1) * SECTOR];
                    let ok = g == want || (v.maybe_zero[k] && g.iter().all(|&b| b == 0));
                    assert!(
                        ok,
                        "volume {name} sector {k} (byte {}) differs from the model{}",
                        k * SECTOR,
                        if v.maybe_zero[k] { " (trimmed)" } else { "" }
                    );
                    want.copy_from_slice(g);
                    v.maybe_zero[k] = false;
                }
                // Unallocated extents read as zeros; extents tile the range in order.
                let mut pos = off;
                for e in &status.extents {
                    assert_eq!(e.offset, pos, "extents {:?}", status.extents);
                    if !e.allocated {
                        let a = (e.offset - off) as usize;
                        assert!(got[a..a + e.len as usize].iter().all(|&b| b == 0));
                    }
                    pos += e.len;
                }
                assert_eq!(pos, off + len, "extents {:?}", status.extents);
            }
            Step::Trim { vol, at, blocks } => {
                let Some(name) = self.pick(vol) else { return };
                let (id, off, len) = self.range(&name, at, blocks);
                run(&mut self.client, id, Op::Trim, off, len, None)
                    .result
                    .expect("trim");
                let v = self.vols.get_mut(&name).expect("vol");
                v.maybe_zero[Self::sectors(off, len)].fill(true);
            }
            Step::Zero {
                vol,
                at,
                blocks,
                fua,
            } => {
                let Some(name) = self.pick(vol) else { return };
                let (id, off, len) = self.range(&name, at, blocks);
                let r = run(
                    &mut self.client,
                    id,
                    Op::WriteZeroes { fua },
                    off,
                    len,
                    None,
                );
                r.result.expect("write zeroes");
                let v = self.vols.get_mut(&name).expect("vol");
                v.data[off as usize..(off + len) as usize].fill(0);
                v.maybe_zero[Self::sectors(off, len)].fill(false);
            }
            Step::Flush => {
                if let Some(v) = self.vols.values().next() {
                    flush(&mut self.client, v.id);
                }
            }
            Step::Resize { vol, grow_kib } => {
                let Some(name) = self.pick(vol) else { return };
                let v = self.vols.get_mut(&name).expect("vol");
                let size = v.data.len() as u64 + (grow_kib as u64 * 1024).div_ceil(v.bs) * v.bs;
                let info = self.engine.resize_volume(&name, size).expect("resize");
                assert_eq!(info.size, size);
                v.data.resize(size as usize, 0);
                v.maybe_zero.resize(size as usize / SECTOR, false);
            }
            Step::Delete { vol } => {
                let Some(name) = self.pick(vol) else { return };
                let id = self.vols.remove(&name).expect("vol").id;
                self.engine.delete_volume(&name).expect("delete");
                let r = run(&mut self.client, id, Op::Read, 0, 4096, None);
                assert_eq!(r.result, Err(IoError::UnknownVolume));
            }
            Step::Reopen { reactors } => {
                self.engine.shutdown().expect("shutdown");
                self.engine = Engine::open(&self.dev, cfg(reactors)).expect("reopen");
                self.client = self.engine.client();
                let names: Vec<String> =
                    self.engine.volumes().into_iter().map(|v| v.name).collect();
                assert_eq!(names, self.vols.keys().cloned().collect::<Vec<_>>());
                for (name, v) in &self.vols {
                    let info = self.engine.volume(name).expect("volume after reopen");
                    assert_eq!(
                        (info.id, info.size, info.block_size as u64),
                        (v.id, v.data.len() as u64, v.bs)
                    );
                }
            }
        }
    }

    /// Space accounting. Clusters freed by trims, write-zeroes and deletes count as used
    /// until the record freeing them is durable, so in general used >= allocated; after a
    /// reopen, or a flush issued when no deleted volume was still being released, every free
    /// is durable and the two are equal. Every cluster holding data the model says is there
    /// (non-zero, not trimmed) is allocated.
    /// Wait until no deleted volume is being released any more (a delete's clusters are
    /// released in the background, a few map pages per reactor pass), then flush: every
    /// free is durable after that.
    fn settle_releases(&mut self) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.engine.releases_pending() > 0 {
            assert!(
                std::time::Instant::now() < end,
                "a deleted volume's release never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let v = self.vols.values().next().expect("a volume to flush");
        flush(&mut self.client, v.id);
    }

    fn check_space(&mut self, settled: bool) {
        let used = self.engine.pool_info().used_bytes;
        let mut allocated = 0;
        for (name, v) in &self.vols {
            let a = self.engine.allocated_bytes(v.id);
            let holding = v
                .data
                .chunks(self.cluster as usize)
                .zip(v.maybe_zero.chunks(self.cluster as usize / SECTOR))
                .filter(|(d, mz)| {
                    d.chunks(SECTOR)
                        .zip(mz.iter())
                        .any(|(s, &m)| !m && s.iter().any(|&b| b != 0))
                })
                .count() as u64;
            assert!(
                a >= holding * self.cluster,
                "volume {name}: {a} bytes allocated but {holding} clusters hold data"
            );
            assert!(a <= (v.data.len() as u64).div_ceil(self.cluster) * self.cluster);
            allocated += a;
        }
        if settled {
            assert_eq!(
                used, allocated,
                "used bytes vs. allocated bytes after a flush"
            );
        } else {
            assert!(used >= allocated, "used {used} < allocated {allocated}");
        }
    }
}

/// Run `steps`; with `settle_each`, every step is also settled (releases done, a flush) and
/// the space checked exactly after it, so a leak shows at the step that made it.
fn run_steps(reactors: usize, steps: &[Step], settle_each: bool) {
    let mut h = Harness::new(reactors);
    for s in steps {
        // A flush makes durable the frees made before it; the release of a deleted volume
        // goes on in the background and frees its clusters after the delete returned, maybe
        // after the flush's commit (docs/snapshots.md). Asked before the flush: once none is
        // pending, all of their frees precede it.
        let releasing = matches!(s, Step::Flush) && h.engine.releases_pending() > 0;
        h.apply(s);
        // A flush needs a volume to address; with none, frees may still be in flight.
        let flushed = matches!(s, Step::Flush) && !h.vols.is_empty();
        h.check_space((flushed && !releasing) || matches!(s, Step::Reopen { .. }));
        if (flushed && releasing) || (settle_each && !h.vols.is_empty()) {
            h.settle_releases();
            h.check_space(true);
        }
    }
    // Everything left reads back after one more close and reopen.
    h.apply(&Step::Reopen { reactors: 1 });
    for k in 0..h.vols.len() {
        h.apply(&Step::Read {
            vol: k as u8,
            at: 0,
            blocks: u16::MAX,
        });
    }
    h.engine.shutdown().expect("shutdown");
}

/// Cases per run: 48 (a few seconds), or PROPTEST_CASES for a longer hunt.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn volumes_behave_like_the_model(
        reactors in 1..=3usize,
        steps in prop::collection::vec(step(), 1..80),
        settle_each in any::<bool>(),
    ) {
        let _w = watchdog();
        run_steps(reactors, &steps, settle_each);
    }
}

/// A volume over three shards, written in odd pieces across cluster and shard edges and
/// partly trimmed, compares whole after a reopen.
#[test]
fn a_whole_volume_written_in_odd_pieces_reads_back() {
    let _w = watchdog();
    let mut steps = vec![Step::Create {
        name: 0,
        kib: 2600,
        bs4k: false,
    }];
    for k in 0..40u32 {
        steps.push(Step::Write {
            vol: 0,
            at: k * 131,
            blocks: 37,
            fua: k % 3 == 0,
            fill: Fill::Random(k as u64),
        });
        if k % 7 == 0 {
            steps.push(Step::Trim {
                vol: 0,
                at: k * 97,
                blocks: 50,
            });
        }
    }
    steps.push(Step::Flush);
    run_steps(2, &steps, true);
}
