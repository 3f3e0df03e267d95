//! On-disk format: the superblock (two copies on every member device) and the pool layout.
//!
//! Member 0 layout, in bytes (every region 1 MiB aligned):
//! `[superblock A 4K][superblock B 4K] … [control log][checkpoint slot 0][checkpoint slot 1]
//!  [journal region 0] … [journal region R-1][data clusters …]`.
//! Other members: `[superblock A][superblock B] … [data clusters …]`.
//! Data clusters are numbered pool-wide: member 0's first, then member 1's, and so on.
//! docs/format.md documents every field.

use crate::error::PoolError;
use std::path::Path;

/// Identifies a tessel superblock.
pub const MAGIC: [u8; 8] = *b"TESSELPL";
/// The only format version this build reads and writes. 2: map entries store their
/// block bitmaps without trailing zero bytes. 3: a bitmap has at most 64 bits, one per
/// grain of max(4 KiB, cluster size / 64) (docs/format.md). 4: journal blocks say which
/// blocks before them were durable, so that replay tells damage from a torn tail.
pub const VERSION: u32 = 4;
/// Size of one superblock copy; the second copy follows the first.
pub const SB_SIZE: usize = 4096;
/// Unit of metadata I/O (journal and checkpoint blocks).
pub const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// One member device's superblock. All sizes and offsets in bytes unless named otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub pool_uuid: [u8; 16],
    pub member_index: u32,
    pub member_count: u32,
    /// Bytes of this device used by the pool.
    pub member_bytes: u64,
    pub cluster_size: u32,
    pub shard_size: u64,
    /// Data clusters in the whole pool.
    pub total_clusters: u64,
    /// Pool-wide index of this member's first data cluster.
    pub first_cluster: u64,
    /// Data clusters on this member.
    pub member_clusters: u64,
    /// Offset of this member's first data cluster.
    pub data_start: u64,
    /// Metadata regions (member 0; copied on every member for identification).
    pub control_start: u64,
    pub control_bytes: u64,
    pub ckpt_start: u64,
    pub ckpt_slot_bytes: u64,
    pub journal_start: u64,
    pub journal_region_bytes: u64,
    pub journal_regions: u32,
}

/// Why a superblock could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum SbError {
    NotAPool,
    BadChecksum,
    UnknownVersion(u32),
    /// The checksum matches but the geometry is not one `plan` lays out: which field.
    BadGeometry(String),
}

struct Writer<'a> {
    b: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.b[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes())
    }
}

/// Little-endian field reader over a byte slice; reads past the end yield zeros, callers
/// validate lengths first.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|s| u16::from_le_bytes(s.try_into().unwrap()))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    }
    pub(crate) fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
}

impl Superblock {
    /// Encode into one 4 KiB copy; the CRC32C of bytes 0..4092 sits in the last 4 bytes.
    pub fn encode(&self) -> [u8; SB_SIZE] {
        let mut b = [0u8; SB_SIZE];
        let mut w = Writer { b: &mut b, at: 0 };
        w.put(&MAGIC);
        w.u32(self.version);
        w.put(&self.pool_uuid);
        w.u32(self.member_index);
        w.u32(self.member_count);
        w.u64(self.member_bytes);
        w.u32(self.cluster_size);
        w.u64(self.shard_size);
        w.u64(self.total_clusters);
        w.u64(self.first_cluster);
        w.u64(self.member_clusters);
        w.u64(self.data_start);
        w.u64(self.control_start);
        w.u64(self.control_bytes);
        w.u64(self.ckpt_start);
        w.u64(self.ckpt_slot_bytes);
        w.u64(self.journal_start);
        w.u64(self.journal_region_bytes);
        w.u32(self.journal_regions);
        let crc = crc32c::crc32c(&b[..SB_SIZE - 4]);
        b[SB_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode one copy, checking magic, checksum and version in that order.
    pub fn decode(b: &[u8]) -> Result<Superblock, SbError> {
        if b.len() < SB_SIZE || b[..8] != MAGIC {
            return Err(SbError::NotAPool);
        }
        let crc = u32::from_le_bytes(b[SB_SIZE - 4..SB_SIZE].try_into().unwrap());
        if crc32c::crc32c(&b[..SB_SIZE - 4]) != crc {
            return Err(SbError::BadChecksum);
        }
        let mut r = Reader::new(&b[8..]);
        let version = r.u32().ok_or(SbError::NotAPool)?;
        if version != VERSION {
            return Err(SbError::UnknownVersion(version));
        }
        let mut pool_uuid = [0u8; 16];
        pool_uuid.copy_from_slice(r.take(16).ok_or(SbError::NotAPool)?);
        let bad = || SbError::NotAPool;
        let sb = Superblock {
            version,
            pool_uuid,
            member_index: r.u32().ok_or_else(bad)?,
            member_count: r.u32().ok_or_else(bad)?,
            member_bytes: r.u64().ok_or_else(bad)?,
            cluster_size: r.u32().ok_or_else(bad)?,
            shard_size: r.u64().ok_or_else(bad)?,
            total_clusters: r.u64().ok_or_else(bad)?,
            first_cluster: r.u64().ok_or_else(bad)?,
            member_clusters: r.u64().ok_or_else(bad)?,
            data_start: r.u64().ok_or_else(bad)?,
            control_start: r.u64().ok_or_else(bad)?,
            control_bytes: r.u64().ok_or_else(bad)?,
            ckpt_start: r.u64().ok_or_else(bad)?,
            ckpt_slot_bytes: r.u64().ok_or_else(bad)?,
            journal_start: r.u64().ok_or_else(bad)?,
            journal_region_bytes: r.u64().ok_or_else(bad)?,
            journal_regions: r.u32().ok_or_else(bad)?,
        };
        sb.check_geometry().map_err(SbError::BadGeometry)?;
        Ok(sb)
    }

    /// What `plan` guarantees, checked on every decoded copy: a checksum says the bytes are
    /// the ones written, not that their sizes are sane, and every size here drives a
    /// division, a loop or an allocation at open.
    fn check_geometry(&self) -> Result<(), String> {
        let cs = self.cluster_size as u64;
        if !self.cluster_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&self.cluster_size)
        {
            return Err(format!("cluster size {}", self.cluster_size));
        }
        // Cluster indexes within a shard are u32 on disk.
        if self.shard_size == 0
            || !self.shard_size.is_multiple_of(cs)
            || self.shard_size / cs > u32::MAX as u64
        {
            return Err(format!("shard size {}", self.shard_size));
        }
        if !(1..=256).contains(&self.journal_regions) {
            return Err(format!("{} journal regions", self.journal_regions));
        }
        if self.member_index >= self.member_count {
            return Err(format!(
                "member {} of {}",
                self.member_index, self.member_count
            ));
        }
        // The metadata regions follow the superblocks in order, whole blocks each.
        let mut end = 2 * SB_SIZE as u64;
        for (what, start, bytes, count) in [
            ("control log", self.control_start, self.control_bytes, 1),
            ("checkpoint slots", self.ckpt_start, self.ckpt_slot_bytes, 2),
            (
                "journal regions",
                self.journal_start,
                self.journal_region_bytes,
                self.journal_regions as u64,
            ),
        ] {
            end = match bytes.checked_mul(count).and_then(|b| start.checked_add(b)) {
                Some(e) if start >= end && bytes > 0 && bytes.is_multiple_of(BLOCK) => e,
                _ => return Err(format!("{what} at {start}, {bytes} bytes")),
            };
        }
        let data_end = self
            .member_clusters
            .checked_mul(cs)
            .and_then(|b| self.data_start.checked_add(b));
        let data_ok = data_end.is_some_and(|e| e <= self.member_bytes)
            && self.data_start.is_multiple_of(cs)
            && (self.member_index != 0 || self.data_start >= end);
        if !data_ok {
            return Err(format!(
                "{} data clusters at {} in {} bytes",
                self.member_clusters, self.data_start, self.member_bytes
            ));
        }
        if self
            .first_cluster
            .checked_add(self.member_clusters)
            .is_none_or(|e| e > self.total_clusters)
            || (self.member_count == 1 && self.member_clusters != self.total_clusters)
        {
            return Err(format!(
                "clusters {} + {} of {}",
                self.first_cluster, self.member_clusters, self.total_clusters
            ));
        }
        Ok(())
    }

    /// Pool-wide data bytes.
    pub fn data_bytes(&self) -> u64 {
        self.total_clusters * self.cluster_size as u64
    }
}

/// Choices made when formatting a pool.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Cluster size: a power of two from 4 KiB to 1 MiB.
    pub cluster_size: u32,
    /// Shard size: a multiple of the cluster size (default 1 GiB).
    pub shard_size: u64,
    /// Journal regions (one per reactor; the pool serves at most this many cores).
    pub journal_regions: u32,
    /// Format even when the device holds a pool or a filesystem signature.
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            cluster_size: 64 << 10,
            shard_size: 1 << 30,
            journal_regions: 16,
            force: false,
        }
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Compute every member's superblock for devices of the given sizes.
pub fn plan(
    sizes: &[u64],
    opts: &FormatOptions,
    uuid: [u8; 16],
) -> Result<Vec<Superblock>, PoolError> {
    let cs = opts.cluster_size as u64;
    if !opts.cluster_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&opts.cluster_size) {
        return Err(PoolError::Geometry(format!(
            "cluster size {} must be a power of two from 4 KiB to 1 MiB",
            opts.cluster_size
        )));
    }
    if opts.shard_size == 0 || !opts.shard_size.is_multiple_of(cs) {
        return Err(PoolError::Geometry(format!(
            "shard size {} must be a non-zero multiple of the cluster size {cs}",
            opts.shard_size
        )));
    }
    if !(1..=256).contains(&opts.journal_regions) {
        return Err(PoolError::Geometry(
            "journal regions must be 1..=256".into(),
        ));
    }
    if sizes.is_empty() {
        return Err(PoolError::Geometry(
            "a pool needs at least one device".into(),
        ));
    }
    let raw_total: u64 = sizes.iter().sum();
    // Upper bound on clusters, to size the checkpoint slots (a checkpoint entry is at most
    // 96 bytes; copies of pages kept by snapshots are written as differences, and the
    // volume table adds a little).
    let max_clusters = raw_total / cs;
    let control_bytes = 4 * MIB;
    let ckpt_slot_bytes = align_up(max_clusters * 128 + 8 * MIB, MIB);
    let journal_region_bytes = align_up((raw_total / 1024).clamp(MIB, 256 * MIB), MIB);
    let control_start = MIB;
    let ckpt_start = control_start + control_bytes;
    let journal_start = ckpt_start + 2 * ckpt_slot_bytes;
    let meta_end = journal_start + journal_region_bytes * opts.journal_regions as u64;
    let mut sbs = Vec::with_capacity(sizes.len());
    let mut first_cluster = 0;
    for (i, &size) in sizes.iter().enumerate() {
        let data_start = align_up(if i == 0 { meta_end } else { MIB }, cs.max(MIB));
        if size <= data_start + cs {
            return Err(PoolError::Geometry(format!(
                "device {i} of {size} bytes is too small: metadata needs {data_start} bytes plus data"
            )));
        }
        let member_clusters = (size - data_start) / cs;
        sbs.push(Superblock {
            version: VERSION,
            pool_uuid: uuid,
            member_index: i as u32,
            member_count: sizes.len() as u32,
            member_bytes: data_start + member_clusters * cs,
            cluster_size: opts.cluster_size,
            shard_size: opts.shard_size,
            total_clusters: 0,
            first_cluster,
            member_clusters,
            data_start,
            control_start,
            control_bytes,
            ckpt_start,
            ckpt_slot_bytes,
            journal_start,
            journal_region_bytes,
            journal_regions: opts.journal_regions,
        });
        first_cluster += member_clusters;
    }
    for sb in &mut sbs {
        sb.total_clusters = first_cluster;
    }
    Ok(sbs)
}

/// What a device's first bytes say it holds, if anything: a tessel pool or a known
/// filesystem / partition table signature.
pub fn detect_signature(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| {
        head.len() >= off + sig.len() && &head[off..off + sig.len()] == sig
    };
    if at(0, &MAGIC) || at(SB_SIZE, &MAGIC) {
        Some("a tessel pool")
    } else if at(1080, &[0x53, 0xEF]) {
        Some("an ext2/3/4 filesystem")
    } else if at(0, b"XFSB") {
        Some("an XFS filesystem")
    } else if at(65600, b"_BHRfS_M") {
        Some("a btrfs filesystem")
    } else if at(4086, b"SWAPSPACE2") {
        Some("a swap area")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("a LUKS volume")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(510, &[0x55, 0xAA]) {
        Some("an MBR partition table")
    } else {
        None
    }
}

/// Bytes to read from a device's start to run `detect_signature`.
pub const SIGNATURE_PROBE: usize = 68 << 10;

/// A fresh random pool uuid.
pub fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut u);
    }
    if u == [0u8; 16] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    u
}

/// The uuid as the usual 8-4-4-4-12 hex text.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Map a superblock read failure to the pool error naming the device.
pub fn sb_error(device: &Path, e: SbError) -> PoolError {
    let device = device.to_path_buf();
    match e {
        SbError::NotAPool => PoolError::NotAPool { device },
        SbError::BadChecksum => PoolError::BadChecksum { device },
        SbError::UnknownVersion(version) => PoolError::UnknownVersion { device, version },
        SbError::BadGeometry(what) => PoolError::Corrupt(format!(
            "{}: superblock geometry is invalid ({what})",
            device.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> Superblock {
        plan(&[1 << 30], &FormatOptions::default(), [7; 16])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn superblock_round_trips() {
        let sb = one();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn corrupted_superblock_fails_its_checksum() {
        let mut b = one().encode();
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(SbError::BadChecksum));
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut sb = one();
        sb.version = 99;
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b), Err(SbError::UnknownVersion(99)));
    }

    #[test]
    fn a_checksummed_superblock_with_impossible_geometry_is_refused() {
        let mut zero_shards = one();
        zero_shards.shard_size = 0;
        let mut endless_regions = one();
        endless_regions.journal_regions = u32::MAX;
        let mut overlapping = one();
        overlapping.ckpt_start = overlapping.control_start;
        let mut past_the_end = one();
        past_the_end.member_clusters += 1;
        for sb in [zero_shards, endless_regions, overlapping, past_the_end] {
            assert!(
                matches!(
                    Superblock::decode(&sb.encode()),
                    Err(SbError::BadGeometry(_))
                ),
                "{sb:?}"
            );
        }
    }

    #[test]
    fn zeros_are_not_a_pool() {
        assert_eq!(Superblock::decode(&[0u8; SB_SIZE]), Err(SbError::NotAPool));
    }

    #[test]
    fn members_number_clusters_pool_wide() {
        let sbs = plan(&[1 << 30, 1 << 30], &FormatOptions::default(), [1; 16]).unwrap();
        assert_eq!(sbs[1].first_cluster, sbs[0].member_clusters);
        assert_eq!(
            sbs[0].total_clusters,
            sbs[0].member_clusters + sbs[1].member_clusters
        );
        assert_eq!(sbs[1].data_start % (64 << 10), 0);
    }

    #[test]
    fn bad_geometry_is_refused() {
        let o = FormatOptions {
            cluster_size: 3000,
            ..Default::default()
        };
        assert!(matches!(
            plan(&[1 << 30], &o, [0; 16]),
            Err(PoolError::Geometry(_))
        ));
        assert!(matches!(
            plan(&[1 << 20], &FormatOptions::default(), [0; 16]),
            Err(PoolError::Geometry(_))
        ));
    }

    #[test]
    fn filesystem_signatures_are_detected() {
        let mut head = vec![0u8; SIGNATURE_PROBE];
        assert_eq!(detect_signature(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(detect_signature(&head), Some("an ext2/3/4 filesystem"));
    }
}
