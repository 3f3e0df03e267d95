//! The devices under a pool: files and block devices opened O_DIRECT, an in-memory disk
//! with an optional volatile-cache crash simulator (model tests), and a null device.

use crate::backend::inline::Medium;
use crate::buf::AlignedBuf;
use crate::error::PoolError;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How to reach one device of a pool.
#[derive(Clone, Debug)]
pub enum DeviceSpec {
    /// A regular file (created sparse with `create_size` if missing) or a block device.
    Path {
        path: PathBuf,
        create_size: Option<u64>,
    },
    /// An in-memory disk (tests; with crash simulation if built so).
    Mem(Arc<MemDisk>),
    /// Data reads return zeros and data writes are dropped (metadata is kept in memory so
    /// the pool opens): measures the engine alone.
    Null(Arc<NullDisk>),
}

impl DeviceSpec {
    /// A file or block device path, not created if missing.
    pub fn path(p: impl Into<PathBuf>) -> DeviceSpec {
        DeviceSpec::Path {
            path: p.into(),
            create_size: None,
        }
    }

    /// A name for messages.
    pub fn display(&self) -> PathBuf {
        match self {
            DeviceSpec::Path { path, .. } => path.clone(),
            DeviceSpec::Mem(_) => PathBuf::from("mem"),
            DeviceSpec::Null(_) => PathBuf::from("null"),
        }
    }

    /// A null device of `size` bytes.
    pub fn null(size: u64) -> DeviceSpec {
        DeviceSpec::Null(NullDisk::new(size))
    }
}

/// One opened device.
pub enum Member {
    File {
        path: PathBuf,
        /// Shared with a reactor's inline backend when io_uring cannot serve the pool.
        file: Arc<File>,
        size: u64,
        /// Logical sector size: every O_DIRECT transfer is aligned to it.
        sector: u32,
        /// Holds the device's claim (O_EXCL, or the advisory lock) while the member is open.
        _lock: File,
    },
    Mem(Arc<MemDisk>),
    Null(Arc<NullDisk>),
}

fn io_err(path: &Path, source: std::io::Error) -> PoolError {
    PoolError::Io {
        device: path.to_path_buf(),
        source,
    }
}

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sszget, libc::BLKSSZGET, libc::c_int);

/// The largest device sector a pool accepts: its buffers' alignment and metadata block.
pub const MAX_SECTOR: u32 = crate::buf::BUF_ALIGN as u32;

/// The logical sector size of an open device, the unit its O_DIRECT transfers must be
/// aligned to: BLKSSZGET for a block device; for a file, the filesystem's O_DIRECT offset
/// alignment (statx DIOALIGN), or where the kernel does not say, 4096 if a 512-byte
/// O_DIRECT read is refused and 512 otherwise.
fn sector_size(file: &File, block: bool) -> std::io::Result<u32> {
    if block {
        let mut s: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        unsafe { blk_sszget(file.as_raw_fd(), &mut s) }.map_err(std::io::Error::from)?;
        return Ok(s as u32);
    }
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on an open fd with an empty path (AT_EMPTY_PATH) fills `stx` only.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        return Ok(stx.stx_dio_offset_align);
    }
    let mut probe = AlignedBuf::zeroed(512);
    match FileExt::read_at(file, probe.as_mut_slice(), 512) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(4096),
        _ => Ok(512),
    }
}

impl Member {
    /// Open a device O_DIRECT and claim it: O_EXCL for a block device, an exclusive
    /// advisory lock for a file.
    pub fn open(spec: &DeviceSpec) -> Result<Member, PoolError> {
        match spec {
            DeviceSpec::Mem(m) => Ok(Member::Mem(m.clone())),
            DeviceSpec::Null(n) => Ok(Member::Null(n.clone())),
            DeviceSpec::Path { path, create_size } => {
                if !path.exists() {
                    let Some(size) = create_size else {
                        return Err(io_err(
                            path,
                            std::io::Error::from(std::io::ErrorKind::NotFound),
                        ));
                    };
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|e| io_err(path, e))?;
                    }
                    // Volume data: no other user may read it. Mode 0600 whatever the umask
                    // (a umask can only take bits away).
                    let f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| io_err(path, e))?;
                    f.set_len(*size).map_err(|e| io_err(path, e))?;
                }
                // The claim lives on a second handle that io_uring never holds: the kernel
                // drops a ring's registered files lazily, and a claim held through one of them
                // would outlive the engine (and the process) for a while. A block device is
                // opened O_EXCL here: the kernel then refuses every other exclusive open of
                // it (another daemon through any device node with its major:minor, a mount),
                // which an advisory lock on one node cannot see. Files get an flock.
                let block = std::fs::metadata(path)
                    .map_err(|e| io_err(path, e))?
                    .file_type()
                    .is_block_device();
                let lock = OpenOptions::new()
                    .read(true)
                    .custom_flags(if block { libc::O_EXCL } else { 0 })
                    .open(path)
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::EBUSY) if block => PoolError::Busy {
                            device: path.clone(),
                        },
                        _ => io_err(path, e),
                    })?;
                // SAFETY: flock on a valid fd owned by `lock`.
                if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    return Err(PoolError::Locked {
                        device: path.clone(),
                    });
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(|e| io_err(path, e))?;
                let meta = file.metadata().map_err(|e| io_err(path, e))?;
                let sector = sector_size(&file, meta.file_type().is_block_device())
                    .map_err(|e| io_err(path, e))?;
                if !sector.is_power_of_two() || sector > MAX_SECTOR {
                    return Err(PoolError::SectorSize {
                        device: path.clone(),
                        sector,
                    });
                }
                let size = if meta.file_type().is_block_device() {
                    let mut s = 0u64;
                    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
                    unsafe { blk_getsize64(file.as_raw_fd(), &mut s) }
                        .map_err(|e| io_err(path, std::io::Error::from(e)))?;
                    s
                } else if meta.file_type().is_file() {
                    meta.len()
                } else {
                    return Err(io_err(
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            "not a file or block device",
                        ),
                    ));
                };
                Ok(Member::File {
                    path: path.clone(),
                    file: Arc::new(file),
                    size,
                    sector,
                    _lock: lock,
                })
            }
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Member::File { size, .. } => *size,
            Member::Null(n) => n.size,
            Member::Mem(m) => m.size(),
        }
    }

    /// Logical sector size: device I/O is aligned to it (memory and null media need no
    /// alignment and say 512, the smallest volume block).
    pub fn sector(&self) -> u32 {
        match self {
            Member::File { sector, .. } => *sector,
            Member::Mem(_) | Member::Null(_) => 512,
        }
    }

    /// Name for messages.
    pub fn path(&self) -> PathBuf {
        match self {
            Member::File { path, .. } => path.clone(),
            Member::Mem(_) => PathBuf::from("mem"),
            Member::Null(_) => PathBuf::from("null"),
        }
    }

    /// The raw fd for io_uring registration (files only).
    pub fn raw_fd(&self) -> Option<i32> {
        match self {
            Member::File { file, .. } => Some(file.as_raw_fd()),
            _ => None,
        }
    }

    /// The member as a synchronous medium (for a reactor's inline backend).
    pub(crate) fn medium(&self) -> Arc<dyn Medium> {
        match self {
            Member::File { file, .. } => file.clone(),
            Member::Mem(m) => m.clone(),
            Member::Null(n) => n.clone(),
        }
    }

    fn as_medium(&self) -> &dyn Medium {
        match self {
            Member::File { file, .. } => &**file,
            Member::Mem(m) => &**m,
            Member::Null(n) => &**n,
        }
    }

    /// Synchronous read (open, recovery, checkpoint): fills `buf` from `off`.
    pub fn read_at(&self, off: u64, buf: &mut AlignedBuf) -> Result<(), PoolError> {
        self.read_slice(off, buf.as_mut_slice())
    }

    /// Synchronous read into any slice (memory and null devices need no alignment; files
    /// opened O_DIRECT need a 512-byte aligned slice).
    pub fn read_slice(&self, off: u64, out: &mut [u8]) -> Result<(), PoolError> {
        self.as_medium()
            .read_at(off, out)
            .map_err(|e| io_err(&self.path(), e))
    }

    /// Synchronous write.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> Result<(), PoolError> {
        debug_assert_eq!(
            buf.as_ptr() as usize % 512,
            0,
            "O_DIRECT needs aligned buffers"
        );
        self.as_medium()
            .write_at(off, buf)
            .map_err(|e| io_err(&self.path(), e))
    }

    /// Make completed writes durable.
    pub fn sync(&self) -> Result<(), PoolError> {
        self.as_medium()
            .flush()
            .map_err(|e| io_err(&self.path(), e))
    }
}

impl Medium for File {
    fn read_at(&self, pos: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.read_exact_at(out, pos)
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        self.write_all_at(data, pos)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.sync_data()
    }
}

impl Medium for MemDisk {
    fn read_at(&self, pos: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.check(FaultOp::Read, pos, out.len())?;
        self.read(pos, out);
        Ok(())
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(FaultOp::Write, pos, data.len())?;
        self.write(pos, data);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        self.check(FaultOp::Flush, 0, 0)?;
        MemDisk::flush(self);
        Ok(())
    }
}

impl Medium for NullDisk {
    fn read_at(&self, pos: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.read(pos, out);
        Ok(())
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        self.write(pos, data);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The null device, the engine's stand-in for an infinitely fast disk (SPDK's null bdev):
/// keeps what is written to the superblocks, the control log and the checkpoint slots (the
/// first write at offset 0 that is a superblock gives the layout), so that a pool can be
/// formatted and opened; drops data and journal writes, reads data as the buffer was and
/// journals as zeros. A reopened null pool is its last checkpoint, and its data is gone
/// anyway. Journal commits thus cost the reactor the engine's work only: on a null pool
/// they are synchronous, and storing up to 128 journal blocks (an allocation, a page fault
/// and a copy each) held the reactor for 0.5-1.3 ms every few milliseconds under redirects.
pub struct NullDisk {
    size: u64,
    data_start: std::sync::atomic::AtomicU64,
    /// The journal regions, `[start, end)`; empty until a superblock is written.
    journal: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
    meta: Mutex<std::collections::HashMap<u64, Box<[u8; 4096]>>>,
}

impl std::fmt::Debug for NullDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NullDisk({} bytes)", self.size)
    }
}

impl NullDisk {
    /// A null device of `size` bytes.
    pub fn new(size: u64) -> Arc<NullDisk> {
        Arc::new(NullDisk {
            size,
            data_start: std::sync::atomic::AtomicU64::new(u64::MAX),
            journal: Default::default(),
            meta: Mutex::new(Default::default()),
        })
    }

    fn journal(&self, off: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        (self.journal.0.load(Relaxed)..self.journal.1.load(Relaxed)).contains(&off)
    }

    fn data(&self, off: u64) -> bool {
        off >= self.data_start.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read(&self, off: u64, out: &mut [u8]) {
        if self.data(off) {
            // Like SPDK's null bdev: data reads leave the buffer as it is.
            return;
        }
        if self.journal(off) {
            out.fill(0);
            return;
        }
        let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in out.chunks_mut(4096).enumerate() {
            match meta.get(&(off / 4096 + i as u64)) {
                Some(b) => chunk.copy_from_slice(&b[..chunk.len()]),
                None => chunk.fill(0),
            }
        }
    }

    fn write(&self, off: u64, data: &[u8]) {
        if self.data(off) || self.journal(off) {
            return;
        }
        if off == 0 {
            if let Ok(sb) = crate::format::Superblock::decode(data) {
                use std::sync::atomic::Ordering::Relaxed;
                self.data_start.store(sb.data_start, Relaxed);
                let end = sb.journal_start + sb.journal_region_bytes * sb.journal_regions as u64;
                self.journal.0.store(sb.journal_start, Relaxed);
                self.journal.1.store(end, Relaxed);
            }
        }
        // Only control-plane threads get here (reactors' journal writes are dropped above).
        // A block written before (a checkpoint slot's or the control log's next use) is
        // overwritten in place.
        let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in data.chunks(4096).enumerate() {
            let b = meta
                .entry(off / 4096 + i as u64)
                .or_insert_with(|| Box::new([0u8; 4096]));
            b[..chunk.len()].copy_from_slice(chunk);
            b[chunk.len()..].fill(0);
        }
    }
}

impl std::fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemDisk({} bytes)", self.size)
    }
}

/// An in-memory disk. With crash simulation on, it behaves like a disk with a volatile write
/// cache: writes since the last flush may be lost or torn (at 4 KiB) by `crash`. Faults can
/// be injected (`inject`): the engine's reads, writes and flushes through it then fail.
pub struct MemDisk {
    state: Mutex<MemState>,
    size: u64,
    faults: Mutex<Faults>,
    trap: Mutex<Trap>,
}

/// `crash_after`: writes and flushes still to pass and the crash's seed, and the image taken.
#[derive(Default)]
struct Trap {
    armed: Option<(u64, u64)>,
    taken: Option<Arc<MemDisk>>,
}

/// Which device operation a fault fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
}

/// A failure the in-memory disk injects: operations `op` that touch bytes `range` (any
/// flush, for `Flush`) fail with `errno`, one in `one_in` of them (1: every one), at most
/// `times` times. A failed write stores nothing; a failed flush makes nothing durable.
#[derive(Clone, Debug)]
pub struct Fault {
    pub op: FaultOp,
    pub range: std::ops::Range<u64>,
    pub errno: i32,
    pub one_in: u64,
    pub times: u64,
}

impl Fault {
    /// Every operation `op` on `range` fails with `errno` until the faults are cleared.
    pub fn always(op: FaultOp, range: std::ops::Range<u64>, errno: i32) -> Fault {
        Fault {
            op,
            range,
            errno,
            one_in: 1,
            times: u64::MAX,
        }
    }
}

/// The faults armed on a disk, with the generator that picks the `one_in` victims and a
/// count of the failures injected so far.
struct Faults {
    armed: Vec<Fault>,
    rng: SplitMix,
    injected: u64,
}

/// Crash simulation: the contents as of the last flush, and the writes since.
type CrashState = (Vec<u8>, Vec<(u64, Vec<u8>)>);

struct MemState {
    data: Vec<u8>,
    /// Present with crash simulation: the contents as of the last flush, and the writes since.
    crash: Option<CrashState>,
}

impl MemDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64, crash_simulation: bool) -> Arc<MemDisk> {
        let data = vec![0u8; size as usize];
        let crash = crash_simulation.then(|| (data.clone(), Vec::new()));
        MemDisk::with_state(MemState { data, crash }, size)
    }

    fn with_state(state: MemState, size: u64) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            state: Mutex::new(state),
            size,
            faults: Mutex::new(Faults {
                armed: Vec::new(),
                rng: SplitMix(size),
                injected: 0,
            }),
            trap: Mutex::default(),
        })
    }

    /// Arm a fault (seeded: the same faults on the same operations fail the same ones).
    pub fn inject(&self, f: Fault) {
        self.faults().armed.push(f);
    }

    /// Disarm every fault; returns how many failures were injected since the disk was made.
    pub fn clear_faults(&self) -> u64 {
        let mut f = self.faults();
        f.armed.clear();
        f.injected
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.faults().injected
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Does an injected fault fail this operation? Err carries the device error.
    fn check(&self, op: FaultOp, off: u64, len: usize) -> std::io::Result<()> {
        let mut f = self.faults();
        let Faults { armed, rng, .. } = &mut *f;
        let end = off + len as u64;
        let hit = armed.iter_mut().find_map(|x| {
            let touches = op == FaultOp::Flush || (x.range.start < end && off < x.range.end);
            if x.op != op || !touches || x.times == 0 || !rng.next().is_multiple_of(x.one_in) {
                return None;
            }
            x.times -= 1;
            Some(x.errno)
        });
        let Some(errno) = hit else { return Ok(()) };
        f.armed.retain(|x| x.times > 0);
        f.injected += 1;
        Err(std::io::Error::from_raw_os_error(errno))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copy out bytes at `off` (beyond the end reads zeros).
    pub fn read(&self, off: u64, out: &mut [u8]) {
        let s = self.lock();
        copy_out(&s.data, off, out);
    }

    /// Write bytes at `off` (beyond the end is dropped).
    pub fn write(&self, off: u64, data: &[u8]) {
        let mut s = self.lock();
        self.spring(&s);
        copy_in(&mut s.data, off, data);
        if let Some((_, pending)) = &mut s.crash {
            pending.push((off, data.to_vec()));
        }
    }

    /// Flush the volatile cache: everything written so far is durable.
    pub fn flush(&self) {
        let mut s = self.lock();
        self.spring(&s);
        let MemState { data: _, crash } = &mut *s;
        if let Some((durable, pending)) = crash {
            for (off, d) in pending.drain(..) {
                copy_in(durable, off, &d);
            }
        }
    }

    /// Simulate power loss: a new disk holding the durable contents plus, for each write
    /// since the last flush, a random subset of its 4 KiB blocks (seeded, reproducible).
    pub fn crash(&self, seed: u64) -> Arc<MemDisk> {
        self.image(&self.lock(), seed)
    }

    /// Test hook: power is lost just before the `ops`-th next write or flush (0: the next
    /// one), so a test picks a crash point inside an operation by a seed, not a clock. The
    /// image (`crash(seed)` at that instant) waits for `take_crash`.
    pub fn crash_after(&self, ops: u64, seed: u64) {
        *self.trap.lock().unwrap_or_else(|p| p.into_inner()) = Trap {
            armed: Some((ops, seed)),
            taken: None,
        };
    }

    /// The image `crash_after` took, if its point was reached; disarms it.
    pub fn take_crash(&self) -> Option<Arc<MemDisk>> {
        let mut t = self.trap.lock().unwrap_or_else(|p| p.into_inner());
        t.armed = None;
        t.taken.take()
    }

    /// A write or flush is about to change `s`: take the armed crash image if its time came.
    fn spring(&self, s: &MemState) {
        let mut t = self.trap.lock().unwrap_or_else(|p| p.into_inner());
        match &mut t.armed {
            Some((0, seed)) => {
                let seed = *seed;
                t.taken = Some(self.image(s, seed));
                t.armed = None;
            }
            Some((left, _)) => *left -= 1,
            None => {}
        }
    }

    fn image(&self, s: &MemState, seed: u64) -> Arc<MemDisk> {
        let (durable, pending) = s
            .crash
            .as_ref()
            .expect("crash simulation is off for this disk");
        let mut image = durable.clone();
        let mut rng = SplitMix(seed);
        for (off, d) in pending {
            let keep_all = rng.next().is_multiple_of(2);
            for (i, chunk) in d.chunks(4096).enumerate() {
                if keep_all || rng.next().is_multiple_of(2) {
                    copy_in(&mut image, off + (i * 4096) as u64, chunk);
                }
            }
        }
        MemDisk::with_state(
            MemState {
                data: image.clone(),
                crash: Some((image, Vec::new())),
            },
            self.size,
        )
    }
}

fn copy_out(data: &[u8], off: u64, out: &mut [u8]) {
    out.fill(0);
    let off = off as usize;
    if off < data.len() {
        let n = out.len().min(data.len() - off);
        out[..n].copy_from_slice(&data[off..off + n]);
    }
}

fn copy_in(data: &mut [u8], off: u64, src: &[u8]) {
    let off = off as usize;
    if off < data.len() {
        let n = src.len().min(data.len() - off);
        data[off..off + n].copy_from_slice(&src[..n]);
    }
}

/// A small deterministic generator for the crash simulator (splitmix64).
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_keeps_superblocks_and_checkpoints_and_drops_journals_and_data() {
        let size = 4u64 << 30;
        let sb = crate::format::plan(&[size], &Default::default(), [7; 16]).unwrap()[0].clone();
        let d = NullDisk::new(size);
        d.write(0, &sb.encode());
        let mut back = [0u8; 4096];
        d.read(0, &mut back);
        assert_eq!(crate::format::Superblock::decode(&back), Ok(sb.clone()));
        d.write(sb.ckpt_start, &[5u8; 8192]);
        d.write(sb.journal_start, &[6u8; 4096]);
        d.write(sb.data_start, &[7u8; 4096]);
        let mut b = [1u8; 8192];
        d.read(sb.ckpt_start, &mut b);
        assert!(b.iter().all(|&x| x == 5), "checkpoint kept");
        let mut b = [1u8; 4096];
        d.read(sb.journal_start, &mut b);
        assert!(b.iter().all(|&x| x == 0), "journal reads as zeros");
        let mut b = [1u8; 4096];
        d.read(sb.data_start, &mut b);
        assert!(b.iter().all(|&x| x == 1), "data reads leave the buffer");
        assert!(
            d.meta.lock().unwrap().len() <= 3,
            "journal and data blocks not stored"
        );
    }

    #[test]
    fn crash_keeps_flushed_writes_and_maybe_later_ones() {
        let d = MemDisk::new(1 << 20, true);
        d.write(0, &[1u8; 4096]);
        d.flush();
        d.write(0, &[2u8; 8192]);
        for seed in 0..20 {
            let c = d.crash(seed);
            let mut b = [0u8; 8192];
            c.read(0, &mut b);
            assert!(b[..4096].iter().all(|&x| x == 1) || b[..4096].iter().all(|&x| x == 2));
            assert!(b[4096..].iter().all(|&x| x == 0) || b[4096..].iter().all(|&x| x == 2));
        }
    }
}
