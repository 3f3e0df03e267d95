//! Metadata journal: typed records packed into checksummed 4 KiB blocks, appended to a ring
//! region per reactor (map changes) and to the control log (volume table changes).
//!
//! Block layout (little-endian): magic u32 "TJNL", crc32c u32 (over the block with this
//! field zero), region u32, record count u16, record bytes u16, seq u64, run u64, durable
//! u64, then the records. A block is accepted at replay only with the expected run and
//! sequence number, so a torn or stale block ends the replay of its region. `durable`: every
//! block of the region below that sequence number was durable before this one was written;
//! a valid block whose `durable` lies above a missing one tells damage from a torn tail.

use crate::buf::AlignedBuf;
use crate::format::{Reader, BLOCK};
use crate::map::{MapEntry, Validity};

const MAGIC: u32 = u32::from_le_bytes(*b"TJNL");
const HEADER: usize = 40;
/// Record bytes that fit in one block.
pub const BLOCK_PAYLOAD: usize = BLOCK as usize - HEADER;
/// The shortest record: a tag and one id.
const MIN_RECORD: usize = 9;

/// What an image in the volume table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// A writable volume (a clone when `of` names a snapshot).
    Volume = 0,
    /// A read-only snapshot of volume `of`.
    Snapshot = 1,
}

/// A volume or snapshot as recorded in the control log and checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub created_unix: u64,
    pub kind: ImageKind,
    /// Snapshot: the volume it was taken of. Volume: the snapshot it was cloned
    /// from (until inflated), or NONE.
    pub of: u64,
    /// Snapshot: the epoch it froze. Volume: S, the epoch of its newest snapshot (or of
    /// its origin snapshot), so entries born after it belong to the volume alone.
    pub epoch: u64,
    /// [`FLAG_SCHEDULED`], [`FLAG_PROTECTED`]; 0 for volumes.
    pub flags: u8,
}

/// A snapshot taken by a schedule: only these are ever expired by one.
pub const FLAG_SCHEDULED: u8 = 1;
/// A protected snapshot: nothing deletes it until it is unprotected.
pub const FLAG_PROTECTED: u8 = 2;
/// Every flag this build knows; a record with others is refused as corrupt.
const KNOWN_FLAGS: u8 = FLAG_SCHEDULED | FLAG_PROTECTED;

/// One metadata change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Cluster `index` of shard `shard` of volume `vol` now maps to `entry`.
    Entry {
        vol: u64,
        shard: u32,
        index: u32,
        entry: MapEntry,
    },
    /// A volume was created.
    VolumeCreate(VolumeRecord),
    /// A volume was deleted (its map records are ignored from now on).
    VolumeDelete { id: u64 },
    /// A volume was resized.
    VolumeResize { id: u64, size: u64 },
    /// Control log: a snapshot exists (every region froze its shards before this record).
    SnapshotCreate(VolumeRecord),
    /// Control log: a snapshot was deleted.
    SnapshotDelete { id: u64 },
    /// Control log: a clone no longer depends on its origin snapshot.
    CloneInflated { id: u64 },
    /// Control log: image `id`'s flags are now `flags` (a snapshot protected or not).
    ImageFlags { id: u64, flags: u8 },
    /// Region: this region's shards of `vol` were frozen into snapshot `snap` here.
    Freeze { vol: u64, snap: u64, epoch: u64 },
    /// Region: clone `vol` starts with this region's shards of snapshot `from`.
    Clone { vol: u64, from: u64 },
    /// Region: this region's shards of `vol` were replaced by snapshot `snap`'s.
    Rollback { vol: u64, snap: u64 },
    /// Region: image `id` was deleted here; entries no other image reads through are gone.
    Drop { id: u64 },
}

pub(crate) fn put_entry(out: &mut Vec<u8>, e: &MapEntry) {
    out.extend_from_slice(&e.phys.to_le_bytes());
    out.extend_from_slice(&e.born.to_le_bytes());
    out.extend_from_slice(&e.parent.to_le_bytes());
    put_validity(out, &e.valid);
    put_validity(out, &e.pvalid);
}

pub(crate) fn get_entry(r: &mut Reader) -> Option<MapEntry> {
    Some(MapEntry {
        phys: r.u64()?,
        born: r.u64()?,
        parent: r.u64()?,
        valid: get_validity(r)?,
        pvalid: get_validity(r)?,
    })
}

/// A grain bitmap as its bytes up to the last one that is not zero, after their count:
/// a 64 KiB cluster's 16 grains take at most 3 bytes rather than 8.
fn put_validity(out: &mut Vec<u8>, v: &Validity) {
    let bytes = v.0.to_le_bytes();
    let n = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    out.push(n as u8);
    out.extend_from_slice(&bytes[..n]);
}

fn get_validity(r: &mut Reader) -> Option<Validity> {
    let n = r.u8()? as usize;
    if n > 8 {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes[..n].copy_from_slice(r.take(n)?);
    Some(Validity(u64::from_le_bytes(bytes)))
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn get_str(r: &mut Reader) -> Option<String> {
    let n = r.u16()? as usize;
    String::from_utf8(r.take(n)?.to_vec()).ok()
}

pub(crate) fn put_volume(out: &mut Vec<u8>, v: &VolumeRecord) {
    out.extend_from_slice(&v.id.to_le_bytes());
    put_str(out, &v.name);
    out.extend_from_slice(&v.size.to_le_bytes());
    out.extend_from_slice(&v.block_size.to_le_bytes());
    out.extend_from_slice(&v.created_unix.to_le_bytes());
    // The flags share the kind's byte (kind in the low nibble): pools written before
    // flags existed hold 0 or 1 there and read back with no flags.
    out.push(v.kind as u8 | v.flags << 4);
    out.extend_from_slice(&v.of.to_le_bytes());
    out.extend_from_slice(&v.epoch.to_le_bytes());
}

pub(crate) fn get_volume(r: &mut Reader) -> Option<VolumeRecord> {
    let (id, name, size, block_size, created_unix) =
        (r.u64()?, get_str(r)?, r.u64()?, r.u32()?, r.u64()?);
    let kind_byte = r.u8()?;
    Some(VolumeRecord {
        id,
        name,
        size,
        block_size,
        created_unix,
        kind: match kind_byte & 0x0f {
            0 => ImageKind::Volume,
            1 => ImageKind::Snapshot,
            _ => return None,
        },
        of: r.u64()?,
        epoch: r.u64()?,
        flags: match kind_byte >> 4 {
            f if f & !KNOWN_FLAGS == 0 => f,
            _ => return None,
        },
    })
}

fn put_ids(out: &mut Vec<u8>, tag: u8, ids: &[u64]) {
    out.push(tag);
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

impl Record {
    /// Append the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Entry {
                vol,
                shard,
                index,
                entry,
            } => {
                out.push(1);
                out.extend_from_slice(&vol.to_le_bytes());
                out.extend_from_slice(&shard.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                put_entry(out, entry);
            }
            Record::VolumeCreate(v) => {
                out.push(2);
                put_volume(out, v);
            }
            Record::VolumeDelete { id } => {
                out.push(3);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Record::VolumeResize { id, size } => {
                out.push(4);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
            }
            Record::SnapshotCreate(v) => {
                out.push(5);
                put_volume(out, v);
            }
            Record::SnapshotDelete { id } => put_ids(out, 6, &[*id]),
            Record::CloneInflated { id } => put_ids(out, 7, &[*id]),
            Record::Freeze { vol, snap, epoch } => put_ids(out, 8, &[*vol, *snap, *epoch]),
            Record::Clone { vol, from } => put_ids(out, 9, &[*vol, *from]),
            Record::Rollback { vol, snap } => put_ids(out, 10, &[*vol, *snap]),
            Record::Drop { id } => put_ids(out, 11, &[*id]),
            Record::ImageFlags { id, flags } => {
                put_ids(out, 12, &[*id]);
                out.push(*flags);
            }
        }
    }

    /// Decode one record; None on a malformed one.
    pub(crate) fn decode(r: &mut Reader) -> Option<Record> {
        Some(match r.u8()? {
            1 => Record::Entry {
                vol: r.u64()?,
                shard: r.u32()?,
                index: r.u32()?,
                entry: get_entry(r)?,
            },
            2 => Record::VolumeCreate(get_volume(r)?),
            3 => Record::VolumeDelete { id: r.u64()? },
            4 => Record::VolumeResize {
                id: r.u64()?,
                size: r.u64()?,
            },
            5 => Record::SnapshotCreate(get_volume(r)?),
            6 => Record::SnapshotDelete { id: r.u64()? },
            7 => Record::CloneInflated { id: r.u64()? },
            8 => Record::Freeze {
                vol: r.u64()?,
                snap: r.u64()?,
                epoch: r.u64()?,
            },
            9 => Record::Clone {
                vol: r.u64()?,
                from: r.u64()?,
            },
            10 => Record::Rollback {
                vol: r.u64()?,
                snap: r.u64()?,
            },
            11 => Record::Drop { id: r.u64()? },
            12 => Record::ImageFlags {
                id: r.u64()?,
                flags: match r.u8()? {
                    f if f & !KNOWN_FLAGS == 0 => f,
                    _ => return None,
                },
            },
            _ => return None,
        })
    }
}

/// Lay records out in one block, all but its `durable` field and checksum (`stamp_block`).
fn fill_block(block: &mut [u8], region: u32, seq: u64, run: u64, nrec: u16, records: &[u8]) {
    debug_assert!(records.len() <= BLOCK_PAYLOAD);
    block.fill(0);
    block[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..12].copy_from_slice(&region.to_le_bytes());
    block[12..14].copy_from_slice(&nrec.to_le_bytes());
    block[14..16].copy_from_slice(&(records.len() as u16).to_le_bytes());
    block[16..24].copy_from_slice(&seq.to_le_bytes());
    block[24..32].copy_from_slice(&run.to_le_bytes());
    block[HEADER..HEADER + records.len()].copy_from_slice(records);
}

/// Set a filled block's `durable` sequence number and its checksum.
fn stamp_block(block: &mut [u8], durable: u64) {
    block[32..40].copy_from_slice(&durable.to_le_bytes());
    block[4..8].fill(0);
    let crc = crc32c::crc32c(&block[..BLOCK as usize]);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Seal records into one block written when every block before `durable` is durable.
pub fn seal_block(
    block: &mut [u8],
    region: u32,
    seq: u64,
    run: u64,
    durable: u64,
    nrec: u16,
    records: &[u8],
) {
    fill_block(block, region, seq, run, nrec, records);
    stamp_block(block, durable);
}

/// An intact block's records, and the sequence number below which its region was durable
/// when it was written.
#[derive(Debug, PartialEq, Eq)]
pub struct OpenBlock {
    pub records: Vec<Record>,
    pub durable: u64,
}

/// Open a block: its records if it is intact and carries the expected run and sequence.
pub fn open_block(block: &[u8], run: u64, seq: u64) -> Option<OpenBlock> {
    if block.len() < BLOCK as usize || u32::from_le_bytes(block[0..4].try_into().unwrap()) != MAGIC
    {
        return None;
    }
    let crc = u32::from_le_bytes(block[4..8].try_into().unwrap());
    let mut copy = block[..BLOCK as usize].to_vec();
    copy[4..8].fill(0);
    if crc32c::crc32c(&copy) != crc {
        return None;
    }
    let nrec = u16::from_le_bytes(block[12..14].try_into().unwrap());
    let used = u16::from_le_bytes(block[14..16].try_into().unwrap()) as usize;
    let bseq = u64::from_le_bytes(block[16..24].try_into().unwrap());
    let brun = u64::from_le_bytes(block[24..32].try_into().unwrap());
    let durable = u64::from_le_bytes(block[32..40].try_into().unwrap());
    if bseq != seq || brun != run || used > BLOCK_PAYLOAD {
        return None;
    }
    let mut r = Reader::new(&block[HEADER..HEADER + used]);
    // The count sizes nothing until the bytes that hold the records vouch for it.
    let mut records = Vec::with_capacity((nrec as usize).min(used / MIN_RECORD));
    for _ in 0..nrec {
        records.push(Record::decode(&mut r)?);
    }
    Some(OpenBlock { records, durable })
}

/// A reactor's journal: records waiting for the next commit, and where the ring stands.
#[derive(Debug)]
pub struct Journal {
    /// Region number (which reactor).
    pub region: u32,
    /// Run number: every open of the pool starts a new one.
    pub run: u64,
    /// Byte offset of the region on member 0.
    pub offset: u64,
    /// Blocks in the region.
    pub blocks: u64,
    /// Sequence number of the next block to write.
    pub next_seq: u64,
    /// Oldest block recovery still needs (set by checkpoints).
    pub tail_seq: u64,
    /// Records of the open block, and how many.
    pending: Vec<u8>,
    pending_count: u16,
    /// Full blocks waiting for a commit, sealed as each filled (the k-th carries sequence
    /// `next_seq + k`), so that a commit seals at most one block on the reactor instead of
    /// tens of milliseconds' worth of them at once.
    staged: Option<AlignedBuf>,
    staged_blocks: u64,
    /// The last `take_commit` left records behind (ring full, or cut at its end).
    cut: bool,
    /// Blocks handed to the commit in flight, not yet known durable.
    in_flight: u64,
}

impl Journal {
    /// An empty journal for a new run.
    pub fn new(region: u32, run: u64, offset: u64, bytes: u64) -> Journal {
        Journal {
            region,
            run,
            offset,
            blocks: bytes / BLOCK,
            next_seq: 0,
            tail_seq: 0,
            pending: Vec::with_capacity(2 * BLOCK_PAYLOAD),
            pending_count: 0,
            staged: None,
            staged_blocks: 0,
            cut: false,
            in_flight: 0,
        }
    }

    /// Queue a record for the next commit.
    pub fn append(&mut self, rec: &Record) {
        let before = self.pending.len();
        rec.encode(&mut self.pending);
        if self.pending.len() > BLOCK_PAYLOAD {
            // It does not fit: the open block is sealed now and the record starts the next.
            self.seal_open(before);
            self.pending.drain(..before);
            self.pending_count = 0;
        }
        self.pending_count += 1;
    }

    /// Seal the first `used` bytes of the open block (its `pending_count` records) behind
    /// the staged blocks.
    fn seal_open(&mut self, used: usize) {
        let at = (self.staged_blocks * BLOCK) as usize;
        let need = at + BLOCK as usize;
        if self.staged.as_ref().is_none_or(|b| b.capacity() < need) {
            let mut grown = AlignedBuf::zeroed((need * 2).next_power_of_two());
            if let Some(old) = &self.staged {
                grown.as_mut_slice()[..at].copy_from_slice(&old.as_slice()[..at]);
            }
            self.staged = Some(grown);
        }
        let buf = self.staged.as_mut().expect("staged blocks");
        buf.set_len(need);
        // Checksummed when a commit takes it, which knows what is durable by then.
        fill_block(
            &mut buf.as_mut_slice()[at..],
            self.region,
            self.next_seq + self.staged_blocks,
            self.run,
            self.pending_count,
            &self.pending[..used],
        );
        self.staged_blocks += 1;
    }

    /// True when records wait for a commit.
    pub fn has_pending(&self) -> bool {
        self.pending_count > 0 || self.staged_blocks > 0
    }

    /// Full blocks waiting for a commit.
    pub fn staged_blocks(&self) -> u64 {
        self.staged_blocks
    }

    /// True when the last `take_commit` could not take every record then pending: the
    /// waiters of that commit wait for a later one. Records appended since do not count;
    /// they belong to waiters of the next commit.
    pub fn commit_was_cut(&self) -> bool {
        self.cut
    }

    /// Blocks the ring holds that recovery still needs. After a failed commit rewound
    /// `next_seq`, a checkpoint cut while it flew may have set the tail above it: none then.
    pub fn used_blocks(&self) -> u64 {
        self.next_seq.saturating_sub(self.tail_seq)
    }

    /// Seal the pending records into blocks for one write, handed over in `buf` (the
    /// caller's buffer and the staging buffer trade places when every block goes, so a
    /// reactor allocates no fresh megabytes per commit): (byte offset, block count); `buf`
    /// then holds exactly those blocks. Returns None when nothing is pending or the ring
    /// has no room (a checkpoint must move the tail first). The write never wraps: a commit
    /// that would cross the end is cut there.
    pub fn take_commit(&mut self, buf: &mut Option<AlignedBuf>) -> Option<(u64, u64)> {
        self.cut = false;
        if !self.has_pending() {
            return None;
        }
        if self.pending_count > 0 {
            self.seal_open(self.pending.len());
            self.pending.clear();
            self.pending_count = 0;
        }
        let room = self.blocks - self.used_blocks();
        let to_end = self.blocks - self.next_seq % self.blocks;
        let n = self.staged_blocks.min(room).min(to_end);
        self.cut = n < self.staged_blocks;
        if n == 0 {
            return None;
        }
        let first = self.next_seq;
        let bytes = (n * BLOCK) as usize;
        if n == self.staged_blocks {
            std::mem::swap(buf, &mut self.staged);
            if let Some(s) = &mut self.staged {
                s.set_len(0);
            }
        } else {
            if buf.as_ref().is_none_or(|b| b.capacity() < bytes) {
                *buf = Some(AlignedBuf::zeroed(bytes.next_power_of_two()));
            }
            let data = buf.as_mut().expect("commit buffer");
            data.set_len(bytes);
            let staged = self.staged.as_mut().expect("staged blocks");
            data.as_mut_slice()
                .copy_from_slice(&staged.as_slice()[..bytes]);
            let total = staged.len();
            staged.as_mut_slice().copy_within(bytes..total, 0);
            staged.set_len(total - bytes);
        }
        let data = buf.as_mut().expect("commit buffer");
        for b in data.as_mut_slice().chunks_exact_mut(BLOCK as usize) {
            // Commits are one at a time, and a failed one is rewritten from its start:
            // every block before this write's first is durable.
            stamp_block(b, first);
        }
        self.staged_blocks -= n;
        self.next_seq += n;
        self.in_flight = n;
        Some((self.offset + (first % self.blocks) * BLOCK, n))
    }

    /// The blocks of the last `take_commit` are durable.
    pub fn commit_done(&mut self) {
        self.in_flight = 0;
    }

    /// The write (or a sync) of the last `take_commit`'s blocks failed: they are staged
    /// again, in front of the blocks sealed since, and `next_seq` goes back to the first of
    /// them, so the next commit rewrites them at the same sequence numbers and offsets.
    /// Recovery replays a region up to its first missing block: a later commit written
    /// behind a hole would be acknowledged but never replayed. `buf` is the buffer the
    /// failed commit was handed; it comes back holding no blocks.
    pub fn commit_failed(&mut self, buf: &mut Option<AlignedBuf>) {
        let n = std::mem::take(&mut self.in_flight);
        if n == 0 {
            return;
        }
        let failed = (n * BLOCK) as usize;
        let later = (self.staged_blocks * BLOCK) as usize;
        let need = failed + later;
        let b = buf.take().expect("a commit in flight holds its buffer");
        let mut out = if b.capacity() >= need {
            b
        } else {
            let mut grown = AlignedBuf::zeroed(need.next_power_of_two());
            grown.as_mut_slice()[..failed].copy_from_slice(&b.as_slice()[..failed]);
            grown
        };
        out.set_len(need);
        if let Some(s) = &self.staged {
            out.as_mut_slice()[failed..].copy_from_slice(&s.as_slice()[..later]);
        }
        *buf = self.staged.take();
        if let Some(b) = buf {
            b.set_len(0);
        }
        self.staged = Some(out);
        self.staged_blocks += n;
        self.next_seq -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::NONE;

    proptest::proptest! {
        #[test]
        fn entries_round_trip_in_their_compact_form(
            phys: u64, born: u64, parent: u64, valid: u64, pvalid: u64,
            bits in 0u32..=64,
        ) {
            // Bitmaps of every width: all 64 grains, and with the top bits zero as a
            // cluster of fewer grains has them.
            let cut = |w: u64| Validity(if bits == 64 { w } else { w & ((1u64 << bits) - 1) });
            let e = MapEntry { phys, born, parent, valid: cut(valid), pvalid: cut(pvalid) };
            let mut out = Vec::new();
            put_entry(&mut out, &e);
            let mut r = Reader::new(&out);
            proptest::prop_assert_eq!(get_entry(&mut r), Some(e));
            proptest::prop_assert_eq!(r.remaining(), 0);
        }
    }

    #[test]
    fn a_bitmap_wider_than_64_grains_is_refused() {
        // Version 2 allowed 32-byte bitmaps; this format never writes more than 8 bytes.
        let mut out = vec![9u8];
        out.extend_from_slice(&[0xff; 9]);
        assert_eq!(get_validity(&mut Reader::new(&out)), None);
    }

    #[test]
    fn a_64k_cluster_entry_is_compact_and_a_bad_bitmap_length_is_refused() {
        let e = MapEntry {
            phys: 7,
            born: 3,
            parent: NONE,
            valid: Validity::range(0, 16),
            pvalid: Validity::default(),
        };
        let mut out = Vec::new();
        put_entry(&mut out, &e);
        // Three u64, the valid bitmap in 1 + 2 bytes, the empty one in 1.
        assert_eq!(out.len(), 24 + 3 + 1);
        out[24] = 33;
        assert_eq!(get_entry(&mut Reader::new(&out)), None);
    }

    fn entry_rec(i: u32) -> Record {
        Record::Entry {
            vol: 7,
            shard: 2,
            index: i,
            entry: MapEntry {
                phys: i as u64 * 3,
                born: 4,
                parent: NONE,
                valid: Validity::range(0, i % 16 + 1),
                pvalid: Validity::range(0, 3),
            },
        }
    }

    #[test]
    fn records_round_trip_through_blocks() {
        let mut j = Journal::new(1, 9, 1 << 20, 64 * BLOCK);
        let recs: Vec<Record> = (0..200)
            .map(entry_rec)
            .chain([
                Record::VolumeCreate(VolumeRecord {
                    id: 3,
                    name: "v".into(),
                    size: 1 << 30,
                    block_size: 512,
                    created_unix: 5,
                    kind: ImageKind::Volume,
                    of: NONE,
                    epoch: 0,
                    flags: 0,
                }),
                Record::SnapshotCreate(VolumeRecord {
                    id: 4,
                    name: "s".into(),
                    size: 1 << 30,
                    block_size: 512,
                    created_unix: 6,
                    kind: ImageKind::Snapshot,
                    of: 3,
                    epoch: 9,
                    flags: FLAG_SCHEDULED | FLAG_PROTECTED,
                }),
                Record::ImageFlags {
                    id: 4,
                    flags: FLAG_SCHEDULED,
                },
                Record::SnapshotDelete { id: 4 },
                Record::CloneInflated { id: 5 },
                Record::Freeze {
                    vol: 3,
                    snap: 4,
                    epoch: 9,
                },
                Record::Clone { vol: 5, from: 4 },
                Record::Rollback { vol: 3, snap: 4 },
                Record::Drop { id: 4 },
                Record::VolumeResize {
                    id: 3,
                    size: 2 << 30,
                },
                Record::VolumeDelete { id: 3 },
            ])
            .collect();
        for r in &recs {
            j.append(r);
        }
        let mut buf = None;
        let (off, n) = j.take_commit(&mut buf).unwrap();
        let data = buf.unwrap().as_slice().to_vec();
        assert_eq!(off, 1 << 20);
        assert_eq!(data.len() as u64, n * BLOCK);
        let mut back = Vec::new();
        for k in 0..n {
            back.extend(
                open_block(
                    &data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize],
                    9,
                    k,
                )
                .unwrap()
                .records,
            );
        }
        assert_eq!(back, recs);
    }

    #[test]
    fn stale_or_torn_blocks_are_refused() {
        let mut j = Journal::new(0, 1, 0, 8 * BLOCK);
        j.append(&entry_rec(1));
        let mut buf = None;
        j.take_commit(&mut buf).unwrap();
        let mut data = buf.unwrap().as_slice().to_vec();
        assert!(open_block(&data, 1, 0).is_some());
        assert!(open_block(&data, 2, 0).is_none(), "another run");
        assert!(open_block(&data, 1, 1).is_none(), "another lap of the ring");
        data[100] ^= 0xff;
        assert!(open_block(&data, 1, 0).is_none(), "torn");
    }

    #[test]
    fn a_full_ring_waits_for_a_checkpoint() {
        let mut j = Journal::new(0, 1, 0, 2 * BLOCK);
        for round in 0..3 {
            j.append(&entry_rec(round));
            let got = j.take_commit(&mut None);
            assert_eq!(got.is_some(), round < 2);
        }
        assert!(j.commit_was_cut());
        j.tail_seq = 2;
        assert!(j.take_commit(&mut None).is_some());
        assert!(!j.commit_was_cut());
    }

    #[test]
    fn blocks_left_by_a_cut_keep_their_sequence_numbers() {
        // A ring of 8 blocks whose next write starts 3 blocks before its end: a commit of
        // many blocks is cut there, and the rest open, in order, in the next commits.
        let mut j = Journal::new(0, 5, 0, 8 * BLOCK);
        j.next_seq = 5;
        j.tail_seq = 5;
        let recs: Vec<Record> = (0..400).map(entry_rec).collect();
        for r in &recs {
            j.append(r);
        }
        assert!(j.staged_blocks() >= 3);
        let mut back = Vec::new();
        let mut seq = 5;
        let mut buf = None;
        while j.has_pending() {
            let (off, n) = j.take_commit(&mut buf).expect("room");
            assert_eq!(off, (seq % 8) * BLOCK);
            let data = buf.as_ref().unwrap().as_slice();
            assert_eq!(data.len() as u64, n * BLOCK);
            for k in 0..n as usize {
                let b = &data[k * BLOCK as usize..(k + 1) * BLOCK as usize];
                back.extend(
                    open_block(b, 5, seq)
                        .expect("block opens with its sequence")
                        .records,
                );
                seq += 1;
            }
            j.tail_seq = seq;
        }
        assert_eq!(back, recs);
    }

    #[test]
    fn a_failed_commit_is_rewritten_at_its_place_before_later_blocks() {
        let mut j = Journal::new(0, 3, 0, 64 * BLOCK);
        let first: Vec<Record> = (0..300).map(entry_rec).collect();
        for r in &first {
            j.append(r);
        }
        let mut buf = None;
        let (off, n) = j.take_commit(&mut buf).expect("room");
        let failed = buf.as_ref().unwrap().as_slice().to_vec();
        // Records arrive while the write flies, and fill blocks of their own.
        let later: Vec<Record> = (300..700).map(entry_rec).collect();
        for r in &later {
            j.append(r);
        }
        assert!(j.staged_blocks() > 0);
        j.commit_failed(&mut buf);
        assert_eq!(j.next_seq, 0);
        let (off2, n2) = j.take_commit(&mut buf).expect("room");
        assert_eq!(off2, off, "rewritten where it failed");
        assert!(n2 > n);
        let data = buf.as_ref().unwrap().as_slice();
        assert_eq!(&data[..failed.len()], &failed[..], "the same blocks");
        let mut back = Vec::new();
        for k in 0..n2 {
            let b = &data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize];
            let block = open_block(b, 3, k).expect("consecutive sequence numbers");
            assert_eq!(block.durable, 0, "nothing was durable before this write");
            back.extend(block.records);
        }
        assert_eq!(back, [first, later].concat());
        j.commit_done();
        assert_eq!(j.next_seq, n2);
    }

    #[test]
    fn records_appended_after_a_commit_started_do_not_cut_it() {
        let mut j = Journal::new(0, 1, 0, 8 * BLOCK);
        j.append(&entry_rec(1));
        assert!(j.take_commit(&mut None).is_some());
        j.append(&entry_rec(2));
        assert!(j.has_pending());
        assert!(
            !j.commit_was_cut(),
            "the commit took every record pending when it began"
        );
    }
}
