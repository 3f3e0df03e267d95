//! The recorded state of the powercut fs: sparse file images, the volatile writes since each
//! file's last fsync, and the crash image a power cut leaves.

use std::collections::{BTreeMap, HashMap};

/// Granularity of torn writes: a volatile write that survives a power cut in part keeps
/// whole 4 KiB pieces (counted from its start offset), as the engine's in-memory crash
/// simulator does. 4 KiB is the engine's block: journal blocks and data grains are 4 KiB
/// aligned, and a disk that tears inside one (512-byte sectors) is outside what tessel claims.
pub const TEAR: usize = 4096;

const PAGE: usize = 4096;

/// Files by name, each a size and its non-zero pages (a sparse pool file costs only what
/// was written to it).
#[derive(Clone, Debug, Default)]
pub struct Disk {
    files: BTreeMap<String, File>,
}

#[derive(Clone, Debug, Default)]
struct File {
    size: u64,
    pages: HashMap<u64, Box<[u8; PAGE]>>,
}

impl File {
    fn read(&self, off: u64, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let pos = off + done as u64;
            let (page, within) = (pos / PAGE as u64, (pos % PAGE as u64) as usize);
            let n = (PAGE - within).min(out.len() - done);
            match self.pages.get(&page) {
                Some(p) => out[done..done + n].copy_from_slice(&p[within..within + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let pos = off + done as u64;
            let (page, within) = (pos / PAGE as u64, (pos % PAGE as u64) as usize);
            let n = (PAGE - within).min(data.len() - done);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| Box::new([0u8; PAGE]));
            p[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.size = self.size.max(off + data.len() as u64);
    }

    fn set_size(&mut self, size: u64) {
        if size < self.size {
            let first_gone = size.div_ceil(PAGE as u64);
            self.pages.retain(|&p, _| p < first_gone);
            if let Some(p) = self.pages.get_mut(&(size / PAGE as u64)) {
                p[(size % PAGE as u64) as usize..].fill(0);
            }
        }
        self.size = size;
    }
}

impl Disk {
    /// The files' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// A file's size; None if there is no such file.
    pub fn size(&self, name: &str) -> Option<u64> {
        self.files.get(name).map(|f| f.size)
    }

    /// Bytes of `name` at `off` into `out`; past the end (or no such file) reads zeros.
    pub fn read(&self, name: &str, off: u64, out: &mut [u8]) {
        match self.files.get(name) {
            Some(f) => f.read(off, out),
            None => out.fill(0),
        }
    }

    /// Write `data` at `off` of `name` (created if missing), growing it as a file grows.
    pub fn write(&mut self, name: &str, off: u64, data: &[u8]) {
        self.files
            .entry(name.to_string())
            .or_default()
            .write(off, data);
    }

    /// Create `name` empty if it does not exist.
    pub fn create(&mut self, name: &str) {
        self.files.entry(name.to_string()).or_default();
    }

    /// Truncate or extend `name` (created if missing) to `size` bytes.
    pub fn set_size(&mut self, name: &str, size: u64) {
        self.files
            .entry(name.to_string())
            .or_default()
            .set_size(size);
    }
}

/// What the filesystem has been asked to do so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Writes recorded (O_DSYNC ones included).
    pub writes: u64,
    /// Writes with O_DSYNC, durable when answered.
    pub dsync_writes: u64,
    /// Completed fsyncs and fdatasyncs.
    pub fsyncs: u64,
    /// Requests refused with EIO after the power cut.
    pub refused: u64,
}

/// What a power cut did to the writes not yet made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Volatile writes at the cut (written, answered, no fsync since).
    pub volatile: usize,
    /// Of those, kept whole.
    pub kept: usize,
    /// Kept in part: some 4 KiB pieces, not all.
    pub torn: usize,
    /// Lost entirely.
    pub dropped: usize,
}

/// One write since its file's last fsync.
#[derive(Debug)]
struct Pending {
    file: String,
    off: u64,
    data: Vec<u8>,
    /// Written with O_DSYNC: survives any cut, but stays in order with the volatile writes
    /// around it, so that an older volatile write to the same place never lands over it.
    dsync: bool,
}

/// The volatile-cache model: what readers see now, what a power cut keeps for sure, and the
/// writes in between, in the order they were answered.
#[derive(Debug)]
pub struct Recorder {
    current: Disk,
    durable: Disk,
    pending: Vec<Pending>,
    cut: bool,
    stats: Stats,
}

/// The filesystem was power-cut: the request fails with EIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoweredOff;

impl Recorder {
    /// A filesystem whose files hold `disk`, all of it durable.
    pub fn new(disk: Disk) -> Recorder {
        Recorder {
            current: disk.clone(),
            durable: disk,
            pending: Vec::new(),
            cut: false,
            stats: Stats::default(),
        }
    }

    /// What readers see now.
    pub fn current(&self) -> &Disk {
        &self.current
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn powered(&mut self) -> Result<(), PoweredOff> {
        if self.cut {
            self.stats.refused += 1;
            return Err(PoweredOff);
        }
        Ok(())
    }

    /// Create an empty file (durable at once: metadata is the host filesystem's business).
    pub fn create(&mut self, name: &str) -> Result<(), PoweredOff> {
        self.powered()?;
        self.current.create(name);
        self.durable.create(name);
        Ok(())
    }

    /// Truncate or extend a file (durable at once, like `create`).
    pub fn set_size(&mut self, name: &str, size: u64) -> Result<(), PoweredOff> {
        self.powered()?;
        self.current.set_size(name, size);
        self.durable.set_size(name, size);
        Ok(())
    }

    /// Read what a reader sees now.
    pub fn read(&mut self, name: &str, off: u64, out: &mut [u8]) -> Result<(), PoweredOff> {
        self.powered()?;
        self.current.read(name, off, out);
        Ok(())
    }

    /// A write the filesystem answers now: volatile until the next fsync of `name`, or
    /// durable at once with `dsync`.
    pub fn write(
        &mut self,
        name: &str,
        off: u64,
        data: &[u8],
        dsync: bool,
    ) -> Result<(), PoweredOff> {
        self.powered()?;
        self.current.write(name, off, data);
        self.pending.push(Pending {
            file: name.to_string(),
            off,
            data: data.to_vec(),
            dsync,
        });
        self.stats.writes += 1;
        self.stats.dsync_writes += u64::from(dsync);
        Ok(())
    }

    /// An fsync (or fdatasync) of `name` completes: every write to it answered before now is
    /// durable.
    pub fn fsync(&mut self, name: &str) -> Result<(), PoweredOff> {
        self.powered()?;
        let durable = &mut self.durable;
        self.pending.retain(|p| {
            if p.file != name {
                return true;
            }
            durable.write(&p.file, p.off, &p.data);
            false
        });
        self.stats.fsyncs += 1;
        Ok(())
    }

    /// Power cut: from now on every request fails. Returns what the disk holds when power
    /// comes back: the durable image, then the volatile writes in the order they were
    /// answered, each kept whole (one in two), or else each of its 4 KiB pieces kept or lost
    /// (one in two each) — `MemDisk::crash`'s rule — and O_DSYNC writes always kept.
    pub fn power_cut(&mut self, seed: u64) -> (Disk, CrashReport) {
        self.cut = true;
        let mut image = self.durable.clone();
        let mut report = CrashReport::default();
        let mut rng = SplitMix(seed);
        for p in &self.pending {
            if p.dsync {
                image.write(&p.file, p.off, &p.data);
                continue;
            }
            report.volatile += 1;
            let keep_all = rng.next_u64().is_multiple_of(2);
            let pieces = p.data.len().div_ceil(TEAR);
            let mut kept = 0;
            for (i, piece) in p.data.chunks(TEAR).enumerate() {
                if keep_all || rng.next_u64().is_multiple_of(2) {
                    image.write(&p.file, p.off + (i * TEAR) as u64, piece);
                    kept += 1;
                }
            }
            match kept {
                0 => report.dropped += 1,
                k if k == pieces => report.kept += 1,
                _ => report.torn += 1,
            }
        }
        (image, report)
    }
}

/// splitmix64: the seeded generator of crash images (the same as the engine's simulator),
/// also the workload generator of the tests that use this crate.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(disk: &Disk, off: u64) -> Vec<u8> {
        let mut b = vec![0u8; TEAR];
        disk.read("pool", off, &mut b);
        b
    }

    fn filled(byte: u8, blocks: usize) -> Vec<u8> {
        vec![byte; blocks * TEAR]
    }

    #[test]
    fn crash_images_drop_and_tear_volatile_writes() {
        let mut r = Recorder::new(Disk::default());
        r.set_size("pool", 1 << 20).unwrap();
        let mut totals = CrashReport::default();
        for seed in 0..64 {
            let mut r = Recorder::new(r.current().clone());
            r.write("pool", 0, &filled(1, 8), false).unwrap();
            r.write("pool", 64 << 10, &filled(2, 1), false).unwrap();
            let (image, report) = r.power_cut(seed);
            assert_eq!(report.volatile, 2);
            assert_eq!(report.kept + report.torn + report.dropped, 2);
            totals.kept += report.kept;
            totals.torn += report.torn;
            totals.dropped += report.dropped;
            let survived = (0..8)
                .filter(|i| block(&image, i * TEAR as u64) == filled(1, 1))
                .count();
            let lost = (0..8)
                .filter(|i| block(&image, i * TEAR as u64) == filled(0, 1))
                .count();
            assert_eq!(survived + lost, 8, "a piece is all old or all new");
        }
        assert!(totals.kept > 0, "some writes survive whole: {totals:?}");
        assert!(totals.torn > 0, "some writes are torn: {totals:?}");
        assert!(totals.dropped > 0, "some writes are lost: {totals:?}");
    }

    #[test]
    fn a_write_followed_by_a_completed_fsync_always_survives() {
        for seed in 0..256u64 {
            let mut r = Recorder::new(Disk::default());
            let mut rng = SplitMix(seed ^ 0x5eed);
            let mut synced: BTreeMap<u64, u8> = BTreeMap::new();
            let mut volatile: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for step in 0..40u8 {
                let at = rng.next_u64() % 16;
                let len = 1 + (rng.next_u64() % 3) as usize;
                let value = step + 1;
                r.write("pool", at * TEAR as u64, &filled(value, len), false)
                    .unwrap();
                for b in at..at + len as u64 {
                    volatile.entry(b).or_default().push(value);
                }
                if rng.next_u64().is_multiple_of(5) {
                    r.fsync("pool").unwrap();
                    for (b, vs) in std::mem::take(&mut volatile) {
                        synced.insert(b, *vs.last().unwrap());
                    }
                }
            }
            let (image, _) = r.power_cut(seed);
            for b in 0..20u64 {
                let got = block(&image, b * TEAR as u64)[0];
                let mut allowed: Vec<u8> = synced.get(&b).copied().into_iter().collect();
                if allowed.is_empty() {
                    allowed.push(0);
                }
                allowed.extend(volatile.get(&b).into_iter().flatten());
                assert!(
                    allowed.contains(&got),
                    "seed {seed} block {b}: {got}, allowed {allowed:?}"
                );
            }
        }
    }

    #[test]
    fn dsync_writes_survive_and_older_volatile_writes_never_land_over_them() {
        for seed in 0..64 {
            let mut r = Recorder::new(Disk::default());
            r.write("pool", 0, &filled(1, 2), false).unwrap();
            r.write("pool", 0, &filled(2, 2), true).unwrap();
            r.write("pool", TEAR as u64, &filled(3, 1), false).unwrap();
            let (image, report) = r.power_cut(seed);
            assert_eq!(report.volatile, 2, "the dsync write is not volatile");
            assert_eq!(block(&image, 0), filled(2, 1));
            let second = block(&image, TEAR as u64);
            assert!(second == filled(2, 1) || second == filled(3, 1));
        }
    }

    #[test]
    fn fsync_of_one_file_leaves_another_files_writes_volatile() {
        let mut dropped = 0;
        for seed in 0..32 {
            let mut r = Recorder::new(Disk::default());
            r.write("pool", 0, &filled(1, 1), false).unwrap();
            r.write("other", 0, &filled(2, 1), false).unwrap();
            r.fsync("pool").unwrap();
            let (image, report) = r.power_cut(seed);
            assert_eq!(block(&image, 0), filled(1, 1));
            dropped += report.dropped;
        }
        assert!(dropped > 0, "the other file's write is sometimes lost");
    }

    #[test]
    fn after_the_cut_every_request_fails() {
        let mut r = Recorder::new(Disk::default());
        r.write("pool", 0, &filled(1, 1), false).unwrap();
        let _ = r.power_cut(1);
        let mut b = [0u8; 16];
        assert_eq!(r.write("pool", 0, &[1; 16], false), Err(PoweredOff));
        assert_eq!(r.fsync("pool"), Err(PoweredOff));
        assert_eq!(r.read("pool", 0, &mut b), Err(PoweredOff));
        assert_eq!(r.stats().refused, 3);
        assert_eq!(r.stats().writes, 1);
    }

    #[test]
    fn truncation_zeroes_what_it_cuts_off() {
        let mut d = Disk::default();
        d.write("f", 0, &[7u8; 3 * PAGE]);
        d.set_size("f", PAGE as u64 + 100);
        d.set_size("f", 3 * PAGE as u64);
        let mut b = vec![1u8; 3 * PAGE];
        d.read("f", 0, &mut b);
        assert!(b[..PAGE + 100].iter().all(|&x| x == 7));
        assert!(b[PAGE + 100..].iter().all(|&x| x == 0));
        assert_eq!(d.size("f"), Some(3 * PAGE as u64));
    }
}
