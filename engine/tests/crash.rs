//! Crash simulation against the durability contract (DESIGN.md section 6).
//!
//! Random workloads run on a `MemDisk` that behaves like a disk with a volatile write cache.
//! At random points the disk "loses power" (`MemDisk::crash`), the image is opened by a new
//! engine and every 512-byte sector of every volume is checked:
//! - the pool opens without repair, volumes created/deleted before the crash are
//!   present/absent with their size and block size;
//! - a sector whose last durable write (acknowledged before a completed flush, or FUA) is
//!   known reads as that write or a later one, never older data;
//! - every sector reads as zeros or as a value written to that very sector of that very
//!   volume (contents identify volume, sector and generation), never foreign or freed data.
//!
//! The recovered engine then carries on with the workload, so crashes also hit pools that
//! were recovered before. Seeds are printed on failure; `TESSEL_CRASH_SEED=n` reruns one
//! workload, `TESSEL_CRASH_WORKLOADS=n` changes how many run.

mod common;
use common::*;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tessel_engine::*;

const SECTOR: usize = 512;
/// The smallest practical pool: 25 MiB of metadata (two journal regions), 3 MiB of data.
const DISK: u64 = 28 << 20;
const MAGIC: u32 = u32::from_le_bytes(*b"TSCT");

/// What a sector holds: zeros, or the data of one write generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Val {
    Zero,
    Data(u64),
}

/// A sector's contents for (volume, sector, generation): a header and a derived fill.
fn sector_bytes(vol: u64, sector: u64, gen: u64, out: &mut [u8]) {
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..12].copy_from_slice(&vol.to_le_bytes());
    out[12..20].copy_from_slice(&sector.to_le_bytes());
    out[20..28].copy_from_slice(&gen.to_le_bytes());
    let mut x = Rng(vol ^ sector.rotate_left(20) ^ gen.rotate_left(40));
    for chunk in out[28..].chunks_mut(8) {
        let v = x.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// What a sector read back says it is; Err describes bytes that are nobody's.
fn decode(vol: u64, sector: u64, b: &[u8]) -> Result<Val, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(Val::Zero);
    }
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let v = u64::from_le_bytes(b[4..12].try_into().unwrap());
    let s = u64::from_le_bytes(b[12..20].try_into().unwrap());
    let gen = u64::from_le_bytes(b[20..28].try_into().unwrap());
    if magic != MAGIC {
        return Err("bytes that no test write produced".into());
    }
    let mut want = [0u8; SECTOR];
    sector_bytes(v, s, gen, &mut want);
    if want[..] != b[..] {
        return Err(format!(
            "a damaged sector (header says volume {v} sector {s} gen {gen})"
        ));
    }
    if v != vol || s != sector {
        return Err(format!(
            "foreign data: volume {v} sector {s} gen {gen} (another volume or LBA)"
        ));
    }
    Ok(Val::Data(gen))
}

/// The history of one sector since its last durable value.
#[derive(Clone, Debug)]
struct Sector {
    /// Values written (acknowledged), oldest first; `durable` indexes the newest durable one.
    hist: Vec<(Val, bool)>,
    durable: Option<usize>,
}

impl Sector {
    fn new() -> Sector {
        // A new volume reads zeros, durably (its creation is durable when it returns).
        Sector {
            hist: vec![(Val::Zero, true)],
            durable: Some(0),
        }
    }
    /// Record an acknowledged change; `definite` is false for a trim (zeros or unchanged).
    fn push(&mut self, v: Val, definite: bool, durable: bool) {
        self.hist.push((v, definite));
        if durable && definite {
            self.durable = Some(self.hist.len() - 1);
        }
    }
    /// A completed flush: the newest definite value is durable; forget what precedes it.
    fn flushed(&mut self) {
        if let Some(d) = self.hist.iter().rposition(|(_, def)| *def) {
            self.hist.drain(..d);
            self.durable = Some(0);
        }
    }
    fn allowed(&self) -> HashSet<Val> {
        let from = self.durable.unwrap_or(0);
        let mut s: HashSet<Val> = self.hist[from..].iter().map(|(v, _)| *v).collect();
        if self.durable.is_none() {
            s.insert(Val::Zero);
        }
        s
    }
}

#[derive(Clone, Debug)]
struct Vol {
    id: VolumeId,
    size: u64,
    bs: u32,
    sectors: Vec<Sector>,
}

/// Everything the test knows the pool must show after a crash.
#[derive(Clone, Debug, Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
    deleted: Vec<String>,
}

impl Model {
    fn flushed(&mut self) {
        for v in self.vols.values_mut() {
            v.sectors.iter_mut().for_each(Sector::flushed);
        }
    }
}

struct Run {
    seed: u64,
    rng: Rng,
    gen: u64,
    model: Model,
    log: Vec<String>,
    images: usize,
}

fn opts() -> FormatOptions {
    FormatOptions {
        cluster_size: 16 << 10,
        shard_size: 1 << 20,
        journal_regions: 2,
        force: false,
    }
}

impl Run {
    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(40).rev().collect();
        panic!(
            "crash test seed {} failed: {what}\nrerun with TESSEL_CRASH_SEED={}\nlast steps:\n  {}",
            self.seed,
            self.seed,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }

    /// One random step of the workload on `e`.
    fn step(&mut self, e: &Engine, c: &mut Client) {
        let r = self.rng.below(100);
        let names: Vec<String> = self.model.vols.keys().cloned().collect();
        if names.is_empty() || (r < 4 && names.len() < 3) {
            return self.create(e);
        }
        if r < 6 {
            let name = names[self.rng.below(names.len() as u64) as usize].clone();
            self.log.push(format!("delete {name}"));
            e.delete_volume(&name)
                .unwrap_or_else(|err| self.fail(format!("delete {name}: {err}")));
            self.model.vols.remove(&name);
            self.model.deleted.push(name);
            return;
        }
        if r < 8 {
            let name = names[self.rng.below(names.len() as u64) as usize].clone();
            let v = &self.model.vols[&name];
            let size = v.size + (1 + self.rng.below(64)) * v.bs as u64;
            self.log.push(format!("resize {name} to {size}"));
            e.resize_volume(&name, size)
                .unwrap_or_else(|err| self.fail(format!("resize {name}: {err}")));
            let v = self.model.vols.get_mut(&name).unwrap();
            v.size = size;
            v.sectors.resize(size as usize / SECTOR, Sector::new());
            return;
        }
        if r < 16 {
            self.log.push("flush".into());
            let vol = self.model.vols[&names[0]].id;
            let res = run(c, vol, Op::Flush, 0, 0, None).result;
            res.unwrap_or_else(|err| self.fail(format!("flush: {err}")));
            return self.model.flushed();
        }
        let name = names[self.rng.below(names.len() as u64) as usize].clone();
        let (id, size, bs) = {
            let v = &self.model.vols[&name];
            (v.id, v.size, v.bs as u64)
        };
        let blocks = size / bs;
        // Mostly small, sometimes up to three clusters, to cross cluster and shard edges.
        let max = if self.rng.chance(20) {
            (48 << 10) / bs
        } else {
            (8 << 10) / bs
        };
        let first = self.rng.below(blocks);
        let n = 1 + self.rng.below(max.min(blocks - first));
        let (off, len) = (first * bs, n * bs);
        let fua = self.rng.chance(30);
        let (op, val, definite) = match r {
            16..=27 => (Op::Trim, Val::Zero, false),
            28..=37 => (Op::WriteZeroes { fua }, Val::Zero, true),
            _ => {
                self.gen += 1;
                (Op::Write { fua }, Val::Data(self.gen), true)
            }
        };
        self.log
            .push(format!("{op:?} {name} off {off} len {len} -> {val:?}"));
        let data = match val {
            Val::Data(g) => {
                let mut d = vec![0u8; len as usize];
                for (k, s) in d.chunks_mut(SECTOR).enumerate() {
                    sector_bytes(id.0, off / SECTOR as u64 + k as u64, g, s);
                }
                Some(d)
            }
            Val::Zero => None,
        };
        let res = run(c, id, op, off, len, data.as_deref()).result;
        res.unwrap_or_else(|err| self.fail(format!("{op:?} {name} {off}+{len}: {err}")));
        let durable = fua && op != Op::Trim;
        let v = self.model.vols.get_mut(&name).unwrap();
        for s in &mut v.sectors[off as usize / SECTOR..(off + len) as usize / SECTOR] {
            s.push(val, definite, durable);
        }
    }

    fn create(&mut self, e: &Engine) {
        let bs = if self.rng.chance(50) { 512 } else { 4096 };
        // Between a quarter MiB and a bit over one shard (1 MiB).
        let size = ((256 << 10) + self.rng.below(832 << 10)) / bs * bs;
        let name = format!("v{}", self.rng.below(6));
        if self.model.vols.contains_key(&name) {
            return;
        }
        self.log.push(format!("create {name} size {size} bs {bs}"));
        let info = e
            .create_volume(&name, size, bs as u32)
            .unwrap_or_else(|err| self.fail(format!("create {name}: {err}")));
        self.model.deleted.retain(|d| *d != name);
        self.model.vols.insert(
            name,
            Vol {
                id: info.id,
                size,
                bs: bs as u32,
                sectors: vec![Sector::new(); size as usize / SECTOR],
            },
        );
    }

    /// Open a crashed image and check it against the model; returns the engine and what
    /// each sector now holds (durably: opening checkpoints the recovered state).
    fn check_image(&mut self, image: Arc<MemDisk>, reactors: usize) -> (Engine, Model) {
        self.images += 1;
        let dev = [DeviceSpec::Mem(image)];
        let e = Engine::open(&dev, cfg(reactors))
            .unwrap_or_else(|err| self.fail(format!("crashed pool does not open: {err}")));
        let mut c = e.client();
        let mut after = Model::default();
        for name in &self.model.deleted {
            if e.volume(name).is_some() {
                self.fail(format!("volume {name} was deleted but came back"));
            }
        }
        let listed: Vec<String> = e.volumes().into_iter().map(|v| v.name).collect();
        let want: Vec<String> = self.model.vols.keys().cloned().collect();
        if listed != want {
            self.fail(format!("volumes after crash {listed:?}, expected {want:?}"));
        }
        for (name, v) in &self.model.vols {
            let info = e.volume(name).unwrap();
            if (info.id, info.size, info.block_size) != (v.id, v.size, v.bs) {
                self.fail(format!(
                    "volume {name} came back as {info:?}, expected id {:?} size {} bs {}",
                    v.id, v.size, v.bs
                ));
            }
            let back = read(&mut c, v.id, 0, v.size);
            let mut nv = Vol {
                sectors: Vec::with_capacity(v.sectors.len()),
                ..v.clone()
            };
            for (k, s) in v.sectors.iter().enumerate() {
                let bytes = &back[k * SECTOR..(k + 1) * SECTOR];
                let got = decode(v.id.0, k as u64, bytes).unwrap_or_else(|why| {
                    self.fail(format!("volume {name} sector {k} holds {why}"))
                });
                let allowed = s.allowed();
                if !allowed.contains(&got) {
                    self.fail(format!(
                        "volume {name} sector {k} reads {got:?}; allowed {allowed:?} (history {:?}, durable {:?})",
                        s.hist, s.durable
                    ));
                }
                nv.sectors.push(Sector {
                    hist: vec![(got, true)],
                    durable: Some(0),
                });
            }
            after.vols.insert(name.clone(), nv);
        }
        after.deleted = self.model.deleted.clone();
        let used = e.pool_info().used_bytes;
        let alloc: u64 = e.volumes().iter().map(|v| e.allocated_bytes(v.id)).sum();
        if used != alloc {
            self.fail(format!(
                "after recovery {used} bytes are used but volumes hold {alloc}"
            ));
        }
        (e, after)
    }
}

/// One workload: rounds of random steps, each ending in crashes whose images are checked;
/// the last image of a round becomes the pool the next round runs on.
fn workload(seed: u64) -> usize {
    let mut run = Run {
        seed,
        rng: Rng(seed),
        gen: 0,
        model: Model::default(),
        log: Vec::new(),
        images: 0,
    };
    let disk = garbage_disk(DISK, true, seed);
    Engine::format(&[DeviceSpec::Mem(disk.clone())], &opts()).expect("format");
    let mut disk = disk;
    let mut e = Engine::open(
        &[DeviceSpec::Mem(disk.clone())],
        cfg(1 + run.rng.below(2) as usize),
    )
    .expect("open");
    let rounds = 1 + run.rng.below(3);
    for round in 0..rounds {
        let mut c = e.client();
        let steps = 5 + run.rng.below(40);
        for k in 0..steps {
            run.step(&e, &mut c);
            // Extra crash images in the middle of the round, checked and thrown away.
            if k + 1 < steps && run.rng.chance(8) {
                let s = run.rng.next();
                run.log.push(format!("crash (seed {s}), checked"));
                let (e2, _) = run.check_image(disk.crash(s), 1);
                e2.shutdown().expect("shutdown");
            }
        }
        let clean = round + 1 == rounds && run.rng.chance(25);
        if clean {
            // A clean shutdown makes every acknowledged write durable.
            run.log.push("shutdown".into());
            e.shutdown().expect("shutdown");
            run.model.flushed();
        }
        let s = run.rng.next();
        run.log.push(format!("crash (seed {s}), continue"));
        let image = disk.crash(s);
        let reactors = 1 + run.rng.below(2) as usize;
        let (e2, after) = run.check_image(image.clone(), reactors);
        if !clean {
            e.shutdown().expect("shutdown");
        }
        drop(c);
        e = e2;
        disk = image;
        run.model = after;
    }
    e.shutdown().expect("shutdown");
    run.images
}

/// The simulator itself loses power: over seeded crashes of the same unflushed writes,
/// some image lacks a whole write, some holds a torn one (some of its 4 KiB blocks, not
/// all), some holds it whole, and every image keeps what was flushed. Without this, a
/// simulator that kept every write would pass every durability check above.
#[test]
fn crash_images_drop_and_tear_unflushed_writes_and_keep_flushed_ones() {
    let _w = watchdog();
    const WRITES: usize = 8;
    const LEN: usize = 16 << 10;
    let disk = MemDisk::new(1 << 20, true);
    disk.write(0, &vec![0x11; WRITES * LEN]);
    disk.flush();
    for i in 0..WRITES {
        disk.write((i * LEN) as u64, &vec![0x20 + i as u8; LEN]);
    }
    let (mut lacking, mut tearing, mut whole) = (0, 0, 0);
    for seed in 0..64 {
        let image = disk.crash(seed);
        let (mut lost, mut torn) = (false, false);
        for i in 0..WRITES {
            let mut back = vec![0u8; LEN];
            image.read((i * LEN) as u64, &mut back);
            let new = back
                .chunks(4096)
                .filter(|b| match b[0] {
                    0x11 if b.iter().all(|&x| x == 0x11) => false,
                    x if x == 0x20 + i as u8 && b.iter().all(|&y| y == x) => true,
                    _ => panic!("seed {seed}: write {i} holds bytes neither flushed nor written"),
                })
                .count();
            match new {
                0 => lost = true,
                4 => whole += 1,
                _ => torn = true,
            }
        }
        lacking += lost as usize;
        tearing += torn as usize;
    }
    assert!(
        lacking > 0 && tearing > 0 && whole > 0,
        "over 64 crashes: {lacking} images lack a write, {tearing} hold a torn one, \
         {whole} writes kept whole; a crash must lose and tear unflushed writes"
    );
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[test]
fn crashes_keep_the_durability_contract() {
    let _w = watchdog();
    if let Some(seed) = env("TESSEL_CRASH_SEED") {
        let n = workload(seed);
        println!("seed {seed}: {n} crash images checked");
        return;
    }
    let workloads = env("TESSEL_CRASH_WORKLOADS").unwrap_or(350);
    let base = env("TESSEL_CRASH_BASE").unwrap_or(0x7E55E1);
    let start = std::time::Instant::now();
    let threads = 2;
    let images: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (0..workloads)
                        .filter(|w| w % threads == t)
                        .map(|w| workload(base + w))
                        .sum::<usize>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("workload")).sum()
    });
    println!(
        "{workloads} workloads (seeds {base}..{}), {images} crash images checked in {:.1?}",
        base + workloads,
        start.elapsed()
    );
}
