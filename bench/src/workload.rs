//! Workload generation: which operation comes next and where, and the self-checking pattern
//! of `verify`.

use crate::args::Workload;

/// xorshift64*: a few instructions per offset, reproducible from a seed; no `rand` needed.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator; a zero seed (xorshift's fixed point) is replaced by a constant.
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0), by multiply-shift rather than a biased modulo.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Direction of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

/// How offsets advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Uniform over the whole volume, until stopped.
    Random,
    /// Through the thread's slice, wrapping around, until stopped.
    Sequential,
    /// Through the thread's slice once (prefill, verify passes).
    Once,
}

/// The offsets and directions one submitter thread issues.
#[derive(Clone, Debug)]
pub struct Generator {
    order: Order,
    bs: u64,
    /// The thread's slice of the volume, in bytes (the whole volume for random orders).
    start: u64,
    end: u64,
    next: u64,
    /// Percentage of reads (100 = reads only, 0 = writes only).
    read_pct: u64,
    rng: XorShift,
}

/// The thread's slice `[start, end)` of `size` bytes cut into `threads` parts that start on
/// `bs` boundaries; the last one takes the remainder.
pub fn slice(size: u64, bs: u64, thread: usize, threads: usize) -> (u64, u64) {
    let per = size / bs / threads as u64 * bs;
    let start = per * thread as u64;
    let end = if thread + 1 == threads {
        size
    } else {
        start + per
    };
    (start, end)
}

impl Generator {
    /// The timed generator for `workload` on thread `thread` of `threads`.
    pub fn timed(
        workload: Workload,
        size: u64,
        bs: u64,
        rwmix: u8,
        seed: u64,
        thread: usize,
        threads: usize,
    ) -> Generator {
        let (order, read_pct) = match workload {
            Workload::Randread => (Order::Random, 100),
            Workload::Randwrite => (Order::Random, 0),
            Workload::Randrw => (Order::Random, rwmix as u64),
            Workload::Read => (Order::Sequential, 100),
            Workload::Write => (Order::Sequential, 0),
            Workload::Verify => (Order::Once, 0),
        };
        let (start, end) = match order {
            Order::Random => (0, size),
            _ => slice(size, bs, thread, threads),
        };
        Generator {
            order,
            bs,
            start,
            end,
            next: start,
            read_pct,
            rng: XorShift::new(seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    /// One sequential pass of `kind` over thread `thread`'s slice.
    pub fn once(kind: Kind, size: u64, bs: u64, thread: usize, threads: usize) -> Generator {
        let (start, end) = slice(size, bs, thread, threads);
        Generator {
            order: Order::Once,
            bs,
            start,
            end,
            next: start,
            read_pct: if kind == Kind::Read { 100 } else { 0 },
            rng: XorShift::new(1),
        }
    }

    /// The largest request this generator issues.
    pub fn bs(&self) -> u64 {
        self.bs
    }

    /// Bytes this generator covers in one pass.
    pub fn span(&self) -> u64 {
        self.end - self.start
    }

    /// The next request, or None when a one-pass generator is done.
    pub fn next_op(&mut self) -> Option<(Kind, u64, u64)> {
        let kind = match self.read_pct {
            100 => Kind::Read,
            0 => Kind::Write,
            p if self.rng.below(100) < p => Kind::Read,
            _ => Kind::Write,
        };
        match self.order {
            Order::Random => {
                let units = (self.end - self.start) / self.bs;
                Some((kind, self.start + self.rng.below(units) * self.bs, self.bs))
            }
            Order::Sequential | Order::Once => {
                if self.next >= self.end {
                    if self.order == Order::Once {
                        return None;
                    }
                    self.next = self.start;
                }
                let off = self.next;
                let len = self.bs.min(self.end - off);
                self.next += len;
                Some((kind, off, len))
            }
        }
    }
}

/// Marks a block written by `verify`.
const VERIFY_MAGIC: u64 = u64::from_le_bytes(*b"TSLVRFY1");

/// The `verify` pattern: every volume block holds a 24-byte header (magic, its LBA, the run's
/// generation) followed by filler derived from both, so a block read from the wrong place,
/// from an older run or torn, is told apart.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    /// Volume block size: the pattern unit and the unit of LBAs.
    pub block: u64,
    pub generation: u64,
}

/// One block that did not read back as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub lba: u64,
    pub what: String,
}

impl Pattern {
    /// Fill `buf`, which will be written at byte `offset`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        for (i, block) in buf.chunks_mut(self.block as usize).enumerate() {
            let lba = offset / self.block + i as u64;
            self.fill_block(lba, block);
        }
    }

    fn fill_block(&self, lba: u64, block: &mut [u8]) {
        block[..8].copy_from_slice(&VERIFY_MAGIC.to_le_bytes());
        block[8..16].copy_from_slice(&lba.to_le_bytes());
        block[16..24].copy_from_slice(&self.generation.to_le_bytes());
        let mut rng = XorShift::new(lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.generation);
        for word in block[24..].chunks_mut(8) {
            let v = rng.next_u64().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }

    /// Check `buf`, read at byte `offset`; one entry per bad block.
    pub fn check(&self, offset: u64, buf: &[u8]) -> Vec<Mismatch> {
        let mut out = Vec::new();
        let mut want = vec![0u8; self.block as usize];
        for (i, got) in buf.chunks(self.block as usize).enumerate() {
            let lba = offset / self.block + i as u64;
            self.fill_block(lba, &mut want);
            if got != &want[..got.len()] {
                out.push(Mismatch {
                    lba,
                    what: describe(got, &want),
                });
            }
        }
        out
    }
}

fn describe(got: &[u8], want: &[u8]) -> String {
    let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    if got.iter().all(|&b| b == 0) {
        return "block reads as zeros".into();
    }
    if word(got, 0) != VERIFY_MAGIC {
        return "block holds no verify header (foreign data)".into();
    }
    let (lba, gen) = (word(got, 8), word(got, 16));
    if lba != word(want, 8) {
        return format!("block holds the data of LBA {lba} (generation {gen})");
    }
    if gen != word(want, 16) {
        return format!("block holds generation {gen}, not {}", word(want, 16));
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    format!("filler differs from byte {at} of the block")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_are_aligned_and_inside_the_volume() {
        let mut g = Generator::timed(Workload::Randread, 1 << 20, 4096, 70, 7, 0, 1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (k, off, len) = g.next_op().unwrap();
            assert_eq!(k, Kind::Read);
            assert_eq!(off % 4096, 0);
            assert!(off + len <= 1 << 20);
            seen.insert(off);
        }
        assert_eq!(seen.len(), 256, "every block is reached");
    }

    #[test]
    fn randrw_mixes_reads_by_percentage() {
        let mut g = Generator::timed(Workload::Randrw, 1 << 30, 4096, 70, 7, 0, 1);
        let reads = (0..100_000)
            .filter(|_| g.next_op().unwrap().0 == Kind::Read)
            .count();
        assert!((68_000..72_000).contains(&reads), "{reads}");
    }

    #[test]
    fn one_pass_slices_cover_the_volume_exactly_once() {
        let size = (10 << 20) + 8192;
        let mut covered = 0;
        let mut last_end = 0;
        for t in 0..3 {
            let mut g = Generator::once(Kind::Write, size, 1 << 20, t, 3);
            while let Some((_, off, len)) = g.next_op() {
                assert_eq!(off, last_end);
                last_end = off + len;
                covered += len;
            }
        }
        assert_eq!(covered, size);
    }

    #[test]
    fn sequential_wraps_inside_the_slice() {
        let mut g = Generator::timed(Workload::Write, 64 << 10, 16 << 10, 0, 1, 1, 2);
        let offs: Vec<u64> = (0..3).map(|_| g.next_op().unwrap().1).collect();
        assert_eq!(offs, vec![32 << 10, 48 << 10, 32 << 10]);
    }

    #[test]
    fn verify_pattern_names_the_bad_lba() {
        let p = Pattern {
            block: 4096,
            generation: 9,
        };
        let mut buf = vec![0u8; 16384];
        p.fill(8192, &mut buf);
        assert!(p.check(8192, &buf).is_empty());
        let stale = Pattern { generation: 8, ..p };
        let mut old = vec![0u8; 4096];
        stale.fill(12288, &mut old);
        buf[4096..8192].copy_from_slice(&old);
        buf[8192 + 100] ^= 1;
        buf[12288..].fill(0);
        let bad = p.check(8192, &buf);
        let lbas: Vec<u64> = bad.iter().map(|m| m.lba).collect();
        assert_eq!(lbas, vec![3, 4, 5]);
        assert!(bad[0].what.contains("generation 8"), "{}", bad[0].what);
        assert!(bad[1].what.contains("byte 100"), "{}", bad[1].what);
        assert!(bad[2].what.contains("zeros"), "{}", bad[2].what);
    }
}
