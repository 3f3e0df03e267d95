//! Pool persistence outside the data path: formatting, the control log, checkpoints and
//! recovery (load the newest checkpoint, replay the control log and every journal, check
//! cluster references). DESIGN.md section 6; docs/format.md.

use crate::buf::AlignedBuf;
use crate::error::PoolError;
pub use crate::error::{Damage, Ring};
use crate::format::{self, FormatOptions, Reader, Superblock, BLOCK, SB_SIZE};
use crate::journal::{self, open_block, seal_block, Record, VolumeRecord};
use crate::layout::Layout;
use crate::map::{MapEntry, MapPage, ShardMap};
use crate::media::{DeviceSpec, Member};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const CKPT_MAGIC: u32 = u32::from_le_bytes(*b"TCKP");
/// Region number stamped on control-log blocks.
pub const CONTROL_REGION: u32 = u32::MAX;

/// Everything the pool holds besides data, as loaded at open and written by checkpoints.
#[derive(Debug, Default)]
pub struct PoolState {
    pub run: u64,
    pub gen: u64,
    pub next_volume_id: u64,
    pub epoch: u64,
    /// First control-log block recovery replays.
    pub control_seq: u64,
    /// Next control-log block to write (not stored; equals control_seq after a checkpoint).
    pub control_next: u64,
    pub region_seq: Vec<u64>,
    /// Reactors of the run the checkpoint starts: region r owned shards s with s % n == r.
    pub reactors: u32,
    pub volumes: BTreeMap<u64, VolumeRecord>,
    pub maps: HashMap<(u64, u64), ShardMap>,
}

/// Open every device and check that they form one pool; members ordered by index.
pub fn open_members(specs: &[DeviceSpec]) -> Result<(Vec<Member>, Vec<Superblock>), PoolError> {
    let mut found: Vec<(Member, Superblock)> = Vec::new();
    for spec in specs {
        let m = Member::open(spec)?;
        let sb = read_superblock(&m)?;
        found.push((m, sb));
    }
    let first = &found[0].1;
    let (uuid, count) = (first.pool_uuid, first.member_count);
    if found.len() != count as usize {
        return Err(PoolError::Membership {
            device: found[0].0.path(),
            reason: format!("pool has {count} devices but {} were given", found.len()),
        });
    }
    for (m, sb) in &found {
        if sb.pool_uuid != uuid {
            return Err(PoolError::Membership {
                device: m.path(),
                reason: format!(
                    "belongs to pool {}, not {}",
                    format::uuid_string(&sb.pool_uuid),
                    format::uuid_string(&uuid)
                ),
            });
        }
    }
    found.sort_by_key(|(_, sb)| sb.member_index);
    // Members number their clusters one after the other, and together hold them all.
    let mut next_cluster = 0u64;
    for (i, (m, sb)) in found.iter().enumerate() {
        if sb.member_index as usize != i {
            return Err(PoolError::Membership {
                device: m.path(),
                reason: format!("member {i} is missing or given twice"),
            });
        }
        let last = i + 1 == found.len();
        next_cluster = next_cluster.saturating_add(sb.member_clusters);
        if sb.first_cluster != next_cluster - sb.member_clusters
            || sb.total_clusters != found[0].1.total_clusters
            || (last && next_cluster != sb.total_clusters)
        {
            return Err(PoolError::Membership {
                device: m.path(),
                reason: format!(
                    "member {i} holds clusters {} + {} of {}, which do not follow the other members'",
                    sb.first_cluster, sb.member_clusters, sb.total_clusters
                ),
            });
        }
        if m.size() < sb.member_bytes {
            return Err(PoolError::Membership {
                device: m.path(),
                reason: format!(
                    "device is {} bytes, smaller than the {} the pool uses",
                    m.size(),
                    sb.member_bytes
                ),
            });
        }
    }
    Ok(found.into_iter().unzip())
}

fn read_superblock(m: &Member) -> Result<Superblock, PoolError> {
    let mut b = AlignedBuf::zeroed(2 * SB_SIZE);
    m.read_at(0, &mut b)?;
    match Superblock::decode(&b.as_slice()[..SB_SIZE]) {
        Ok(sb) => Ok(sb),
        Err(first) => match Superblock::decode(&b.as_slice()[SB_SIZE..]) {
            Ok(sb) => {
                tracing::warn!(device = %m.path().display(), "primary superblock unreadable ({first:?}); using the copy");
                Ok(sb)
            }
            Err(_) => Err(format::sb_error(&m.path(), first)),
        },
    }
}

/// Format a pool on the devices; returns the member-0 superblock.
pub fn format(specs: &[DeviceSpec], opts: &FormatOptions) -> Result<Superblock, PoolError> {
    let mut members = Vec::new();
    for spec in specs {
        let m = Member::open(spec)?;
        if !opts.force {
            let mut head = AlignedBuf::zeroed(format::SIGNATURE_PROBE);
            if m.size() >= format::SIGNATURE_PROBE as u64 {
                m.read_at(0, &mut head)?;
                if let Some(what) = format::detect_signature(head.as_slice()) {
                    return Err(PoolError::InUse {
                        device: m.path(),
                        what: what.to_string(),
                    });
                }
            }
        }
        members.push(m);
    }
    let sizes: Vec<u64> = members.iter().map(|m| m.size()).collect();
    let uuid = format::new_uuid();
    let sbs = format::plan(&sizes, opts, uuid)?;
    let layout = Layout::new(&sbs);
    let run = u64::from_le_bytes(uuid[..8].try_into().unwrap()) >> 1 | 1;
    let state = PoolState {
        run,
        gen: 1,
        next_volume_id: 1,
        epoch: 1,
        region_seq: vec![0; sbs[0].journal_regions as usize],
        ..Default::default()
    };
    // Checkpoint first, superblocks last: a half-formatted device is not a pool.
    write_checkpoint(&members, &layout, &state, &[])?;
    for (m, sb) in members.iter().zip(&sbs) {
        let mut b = AlignedBuf::zeroed(2 * SB_SIZE);
        let enc = sb.encode();
        b.as_mut_slice()[..SB_SIZE].copy_from_slice(&enc);
        b.as_mut_slice()[SB_SIZE..].copy_from_slice(&enc);
        m.write_at(0, b.as_slice())?;
        m.sync()?;
    }
    Ok(sbs.into_iter().next().expect("one member"))
}

/// Serialize shard maps (one reactor's part of a checkpoint). Pages shared between maps (a
/// volume and its snapshots) are written once and referenced by number; a page that is a
/// copy of the previous page written for the same position (a snapshot's page after one
/// write) is written as the entries that differ from it.
pub fn encode_maps<'a>(maps: impl Iterator<Item = (u64, u64, &'a ShardMap)>) -> Vec<u8> {
    let mut maps: Vec<(u64, u64, &ShardMap)> = maps.collect();
    maps.sort_by_key(|(img, shard, _)| (*shard, *img));
    let mut ids: HashMap<*const MapPage, u32> = HashMap::new();
    // Last page written for each (shard, page slot): the base of the next one's diff.
    let mut last: HashMap<(u64, usize), (u32, &MapPage)> = HashMap::new();
    // The page count goes first, filled in at the end; the pages are encoded in place
    // after it (a part is hundreds of MiB on a large pool: no second copy of them).
    let mut out = vec![0u8; 4];
    let mut npages = 0u32;
    let mut index = Vec::new();
    for (img, shard, map) in &maps {
        index.extend_from_slice(&img.to_le_bytes());
        index.extend_from_slice(&shard.to_le_bytes());
        index.extend_from_slice(&(map.page_count() as u32).to_le_bytes());
        for (slot, p) in map.pages().enumerate() {
            let id = match p {
                None => u32::MAX,
                Some(p) => {
                    if let Some(&id) = ids.get(&Arc::as_ptr(p)) {
                        id
                    } else {
                        let id = npages;
                        npages += 1;
                        ids.insert(Arc::as_ptr(p), id);
                        let base = last.get(&(*shard, slot)).copied();
                        encode_page(&mut out, p, base);
                        last.insert((*shard, slot), (id, p));
                        id
                    }
                }
            };
            index.extend_from_slice(&id.to_le_bytes());
        }
    }
    out[..4].copy_from_slice(&npages.to_le_bytes());
    out.reserve_exact(4 + index.len());
    out.extend_from_slice(&(maps.len() as u32).to_le_bytes());
    out.extend_from_slice(&index);
    out
}

/// A page: kind 0 (count u16, (slot u8, entry) × count: the allocated entries), or kind 1
/// (base page id u32, count u16, (slot u8, entry) × count: the entries that differ).
fn encode_page(out: &mut Vec<u8>, p: &MapPage, base: Option<(u32, &MapPage)>) {
    let diff: Option<(u32, Vec<usize>)> = base.and_then(|(id, b)| {
        let d: Vec<usize> = (0..p.len()).filter(|&k| p[k] != b[k]).collect();
        (d.len() * 2 < p.iter().filter(|e| e.is_allocated()).count()).then_some((id, d))
    });
    let (slots, kind): (Vec<usize>, u8) = match &diff {
        Some((_, d)) => (d.clone(), 1),
        None => ((0..p.len()).filter(|&k| p[k].is_allocated()).collect(), 0),
    };
    out.push(kind);
    if let Some((id, _)) = diff {
        out.extend_from_slice(&id.to_le_bytes());
    }
    out.extend_from_slice(&(slots.len() as u16).to_le_bytes());
    for k in slots {
        out.push(k as u8);
        journal::put_entry(out, &p[k]);
    }
}

fn decode_part(
    r: &mut Reader,
    layout: &Layout,
    maps: &mut HashMap<(u64, u64), ShardMap>,
) -> Option<()> {
    let npages = r.u32()?;
    // Each page takes at least its kind and count (3 bytes): the count sizes nothing the
    // bytes that follow cannot hold.
    let mut pages: Vec<Arc<MapPage>> = Vec::with_capacity((npages as usize).min(r.remaining() / 3));
    for _ in 0..npages {
        let mut page = match r.u8()? {
            0 => [MapEntry::UNALLOCATED; crate::map::ENTRIES_PER_PAGE],
            1 => *pages.get(r.u32()? as usize)?.as_ref(),
            _ => return None,
        };
        let n = r.u16()?;
        for _ in 0..n {
            let k = r.u8()? as usize;
            *page.get_mut(k)? = journal::get_entry(r)?;
        }
        pages.push(Arc::new(page));
    }
    let slots = layout
        .clusters_per_shard()
        .div_ceil(crate::map::ENTRIES_PER_PAGE as u64) as usize;
    let nmaps = r.u32()?;
    for _ in 0..nmaps {
        let img = r.u64()?;
        let shard = r.u64()?;
        let n = r.u32()? as usize;
        if n != slots {
            return None;
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u32()?;
            v.push(if id == u32::MAX {
                None
            } else {
                Some(pages.get(id as usize)?.clone())
            });
        }
        maps.insert((img, shard), ShardMap::from_pages(v));
    }
    Some(())
}

fn decode_maps(b: &[u8], layout: &Layout, maps: &mut HashMap<(u64, u64), ShardMap>) -> Option<()> {
    let mut r = Reader::new(b);
    while r.remaining() > 0 {
        let len = r.u64()? as usize;
        let part = r.take(len)?;
        decode_part(&mut Reader::new(part), layout, maps)?;
    }
    Some(())
}

/// Bytes written through this buffer at a time by `SlotWriter`.
const SLOT_CHUNK: usize = 4 << 20;

/// Sequential writer of a checkpoint payload: one aligned buffer of `SLOT_CHUNK` bytes,
/// written out as it fills, the last piece padded with zeros to a block; computes the
/// payload's CRC-32C on the way.
struct SlotWriter<'a> {
    member: &'a Member,
    off: u64,
    buf: AlignedBuf,
    fill: usize,
    crc: u32,
}

impl<'a> SlotWriter<'a> {
    fn new(member: &'a Member, off: u64) -> SlotWriter<'a> {
        SlotWriter {
            member,
            off,
            buf: AlignedBuf::zeroed(SLOT_CHUNK),
            fill: 0,
            crc: 0,
        }
    }

    fn put(&mut self, mut b: &[u8]) -> Result<(), PoolError> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        while !b.is_empty() {
            let n = (SLOT_CHUNK - self.fill).min(b.len());
            self.buf.as_mut_slice()[self.fill..self.fill + n].copy_from_slice(&b[..n]);
            self.fill += n;
            b = &b[n..];
            if self.fill == SLOT_CHUNK {
                self.member.write_at(self.off, self.buf.as_slice())?;
                self.off += SLOT_CHUNK as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// Write what is left; returns the CRC-32C of everything put.
    fn finish(mut self) -> Result<u32, PoolError> {
        if self.fill > 0 {
            let end = self.fill.div_ceil(BLOCK as usize) * BLOCK as usize;
            self.buf.as_mut_slice()[self.fill..end].fill(0);
            self.member
                .write_at(self.off, &self.buf.as_slice()[..end])?;
        }
        Ok(self.crc)
    }
}

/// Write a checkpoint into the slot `state.gen % 2`: data syncs first (entries point at it),
/// then the payload, then the header that makes it the newest.
pub fn write_checkpoint(
    members: &[Member],
    layout: &Layout,
    state: &PoolState,
    parts: &[Vec<u8>],
) -> Result<(), PoolError> {
    let sb = &layout.sb;
    let mut p = Vec::new();
    for v in [
        state.next_volume_id,
        state.epoch,
        state.control_seq,
        state.reactors as u64,
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&(state.region_seq.len() as u32).to_le_bytes());
    for s in &state.region_seq {
        p.extend_from_slice(&s.to_le_bytes());
    }
    p.extend_from_slice(&(state.volumes.len() as u32).to_le_bytes());
    for v in state.volumes.values() {
        journal::put_volume(&mut p, v);
    }
    // The payload is this head, the maps' length, then each part with its length. It is
    // streamed through one bounded buffer: on a large pool the parts are hundreds of MiB,
    // and building the payload whole took four more copies of them.
    let maps_len: u64 = parts.iter().map(|p| 8 + p.len() as u64).sum();
    p.extend_from_slice(&maps_len.to_le_bytes());
    let len = p.len() as u64 + maps_len;
    if len + BLOCK > sb.ckpt_slot_bytes {
        return Err(PoolError::Corrupt(format!(
            "checkpoint of {len} bytes does not fit its slot of {} bytes",
            sb.ckpt_slot_bytes
        )));
    }
    let slot = sb.ckpt_start + (state.gen % 2) * sb.ckpt_slot_bytes;
    for m in members {
        m.sync()?;
    }
    let mut w = SlotWriter::new(&members[0], slot + BLOCK);
    w.put(&p)?;
    for part in parts {
        w.put(&(part.len() as u64).to_le_bytes())?;
        w.put(part)?;
    }
    let payload_crc = w.finish()?;
    members[0].sync()?;
    let mut h = AlignedBuf::zeroed(BLOCK as usize);
    {
        let hb = h.as_mut_slice();
        hb[0..4].copy_from_slice(&CKPT_MAGIC.to_le_bytes());
        hb[8..24].copy_from_slice(&sb.pool_uuid);
        hb[24..32].copy_from_slice(&state.gen.to_le_bytes());
        hb[32..40].copy_from_slice(&state.run.to_le_bytes());
        hb[40..48].copy_from_slice(&len.to_le_bytes());
        hb[48..52].copy_from_slice(&payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(hb);
        hb[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    members[0].write_at(slot, h.as_slice())?;
    members[0].sync()
}

fn read_checkpoint(
    m0: &Member,
    layout: &Layout,
    slot: u64,
) -> Result<Option<PoolState>, PoolError> {
    let sb = &layout.sb;
    let at = sb.ckpt_start + slot * sb.ckpt_slot_bytes;
    let mut h = AlignedBuf::zeroed(BLOCK as usize);
    m0.read_at(at, &mut h)?;
    let hb = h.as_mut_slice();
    if u32::from_le_bytes(hb[0..4].try_into().unwrap()) != CKPT_MAGIC || hb[8..24] != sb.pool_uuid {
        return Ok(None);
    }
    let crc = u32::from_le_bytes(hb[4..8].try_into().unwrap());
    hb[4..8].fill(0);
    if crc32c::crc32c(hb) != crc {
        return Ok(None);
    }
    let gen = u64::from_le_bytes(hb[24..32].try_into().unwrap());
    let run = u64::from_le_bytes(hb[32..40].try_into().unwrap());
    let len = u64::from_le_bytes(hb[40..48].try_into().unwrap());
    let pcrc = u32::from_le_bytes(hb[48..52].try_into().unwrap());
    if len
        .checked_add(BLOCK)
        .is_none_or(|end| end > sb.ckpt_slot_bytes)
    {
        return Ok(None);
    }
    let mut pb =
        AlignedBuf::zeroed((len as usize).div_ceil(BLOCK as usize).max(1) * BLOCK as usize);
    m0.read_at(at + BLOCK, &mut pb)?;
    let p = &pb.as_slice()[..len as usize];
    if crc32c::crc32c(p) != pcrc {
        return Ok(None);
    }
    let bad = || PoolError::Corrupt(format!("checkpoint generation {gen} is malformed"));
    let mut r = Reader::new(p);
    let mut st = PoolState {
        run,
        gen,
        ..Default::default()
    };
    st.next_volume_id = r.u64().ok_or_else(bad)?;
    st.epoch = r.u64().ok_or_else(bad)?;
    st.control_seq = r.u64().ok_or_else(bad)?;
    st.reactors = r.u64().ok_or_else(bad)? as u32;
    let nr = r.u32().ok_or_else(bad)?;
    for _ in 0..nr {
        st.region_seq.push(r.u64().ok_or_else(bad)?);
    }
    let nv = r.u32().ok_or_else(bad)?;
    for _ in 0..nv {
        let v = journal::get_volume(&mut r).ok_or_else(bad)?;
        st.volumes.insert(v.id, v);
    }
    let ml = r.u64().ok_or_else(bad)? as usize;
    let maps = r.take(ml).ok_or_else(bad)?;
    decode_maps(maps, layout, &mut st.maps).ok_or_else(bad)?;
    Ok(Some(st))
}

/// Blocks read past a region's end looking for valid blocks of its run: a hole that has
/// some within this distance after it is told from a torn tail. Damage wider than this
/// looks like a tail.
const LOOKAHEAD: u64 = 64;

/// A ring replayed: its records in order, the sequence number after the last block read,
/// and the damage that stopped it, if that was not its end.
struct Replay {
    records: Vec<Record>,
    next: u64,
    damage: Option<Damage>,
}

/// Read blocks of a ring region from `seq` on while they carry the expected run and
/// sequence numbers; where that stops, look for intact blocks of the run written after the
/// missing one was durable (its `durable` mark lies above it).
fn replay_region(
    m0: &Member,
    ring: Ring,
    offset: u64,
    bytes: u64,
    run: u64,
    mut seq: u64,
) -> Result<Replay, PoolError> {
    let blocks = bytes / BLOCK;
    let mut records = Vec::new();
    let mut b = AlignedBuf::zeroed(BLOCK as usize);
    let at = |s: u64| offset + (s % blocks) * BLOCK;
    let start = seq;
    while seq - start < blocks {
        m0.read_at(at(seq), &mut b)?;
        match open_block(b.as_slice(), run, seq) {
            Some(block) => records.extend(block.records),
            None => break,
        }
        seq += 1;
    }
    let mut damage: Option<Damage> = None;
    let mut gap = 0;
    let mut k = seq + 1;
    while gap < LOOKAHEAD && k - start < blocks {
        m0.read_at(at(k), &mut b)?;
        match open_block(b.as_slice(), run, k) {
            Some(block) => {
                gap = 0;
                if block.durable > seq || damage.is_some() {
                    let d = damage.get_or_insert(Damage {
                        ring,
                        seq,
                        offset: at(seq),
                        blocks_after: 0,
                        records_after: 0,
                        last_seq: k,
                    });
                    d.blocks_after += 1;
                    d.records_after += block.records.len() as u64;
                    d.last_seq = k;
                }
            }
            None => gap += 1,
        }
        k += 1;
    }
    Ok(Replay {
        records,
        next: seq,
        damage,
    })
}

/// Load the newest checkpoint, replay the control log and every journal region, and check
/// that no cluster is referenced twice or lies outside the pool. A ring damaged before
/// records written after it (`Damage`) fails the recovery, unless `salvage` asks to replay
/// every ring up to its damage and report what was left out.
pub fn recover(
    members: &[Member],
    layout: &Layout,
    salvage: bool,
) -> Result<(PoolState, Vec<Damage>), PoolError> {
    let m0 = &members[0];
    let a = read_checkpoint(m0, layout, 0)?;
    let b = read_checkpoint(m0, layout, 1)?;
    let mut st = match (a, b) {
        (Some(a), Some(b)) => {
            if a.gen > b.gen {
                a
            } else {
                b
            }
        }
        (Some(s), None) | (None, Some(s)) => s,
        (None, None) => {
            return Err(PoolError::Corrupt(
                "no valid checkpoint in either slot".into(),
            ))
        }
    };
    let sb = &layout.sb;
    let mut damaged = Vec::new();
    let mut check = |r: Replay| -> Result<Vec<Record>, PoolError> {
        if let Some(d) = r.damage {
            if !salvage {
                return Err(PoolError::Damaged {
                    device: m0.path(),
                    damage: d,
                });
            }
            tracing::warn!("salvage: {d}");
            damaged.push(d);
        }
        Ok(r.records)
    };
    let control = replay_region(
        m0,
        Ring::ControlLog,
        sb.control_start,
        sb.control_bytes,
        st.run,
        st.control_seq,
    )?;
    st.control_next = control.next;
    for rec in check(control)? {
        match rec {
            Record::VolumeCreate(v) => {
                st.next_volume_id = st.next_volume_id.max(v.id + 1);
                st.volumes.insert(v.id, v);
            }
            Record::SnapshotCreate(v) => {
                st.next_volume_id = st.next_volume_id.max(v.id + 1);
                if let Some(vol) = st.volumes.get_mut(&v.of) {
                    vol.epoch = vol.epoch.max(v.epoch);
                }
                st.volumes.insert(v.id, v);
            }
            Record::VolumeDelete { id } | Record::SnapshotDelete { id } => {
                st.volumes.remove(&id);
            }
            Record::VolumeResize { id, size } => {
                if let Some(v) = st.volumes.get_mut(&id) {
                    v.size = size;
                }
            }
            Record::CloneInflated { id } => {
                if let Some(v) = st.volumes.get_mut(&id) {
                    v.of = crate::map::NONE;
                }
            }
            Record::ImageFlags { id, flags } => {
                if let Some(v) = st.volumes.get_mut(&id) {
                    v.flags = flags;
                }
            }
            other => {
                return Err(PoolError::Corrupt(format!(
                    "region record in the control log: {other:?}"
                )))
            }
        }
    }
    let cps = layout.clusters_per_shard() as usize;
    for r in 0..sb.journal_regions as usize {
        let from = st.region_seq.get(r).copied().unwrap_or(0);
        let off = sb.journal_start + r as u64 * sb.journal_region_bytes;
        let replay = replay_region(
            m0,
            Ring::Journal(r as u32),
            off,
            sb.journal_region_bytes,
            st.run,
            from,
        )?;
        for rec in check(replay)? {
            apply_region_record(&mut st.maps, rec, cps, r as u64, st.reactors.max(1) as u64);
        }
    }
    // Maps of deleted volumes (or beyond a volume's end) are dropped: their clusters are free.
    st.maps.retain(|(vol, shard), _| {
        st.volumes
            .get(vol)
            .is_some_and(|v| *shard < layout.shards_for(v.size))
    });
    // Every cluster lies inside the pool and is referenced from one position only (clusters
    // never move between positions; snapshots and clones share them in place).
    let mut position: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut max_born = 0;
    for ((vol, shard), map) in &st.maps {
        for (i, e) in map.allocated() {
            max_born = max_born.max(e.born);
            for c in [e.phys, e.parent] {
                if c == crate::map::NONE {
                    continue;
                }
                if c >= layout.total_clusters {
                    return Err(PoolError::Corrupt(format!(
                        "image {vol} shard {shard} cluster {i} refers to cluster {c} beyond the pool's {}",
                        layout.total_clusters
                    )));
                }
                if let Some(&(s0, i0)) = position.get(&c) {
                    if (s0, i0) != (*shard, i) {
                        return Err(PoolError::Corrupt(format!(
                            "cluster {c} is referenced from shard {s0} cluster {i0} and from shard {shard} cluster {i}"
                        )));
                    }
                }
                position.insert(c, (*shard, i));
            }
        }
    }
    // Every image's epoch, not only live snapshots': a volume keeps the epoch of its newest
    // snapshot after that snapshot is deleted, and the next epoch must lie above it, or its
    // new entries are born "shared" (every write redirects, an inflate never finishes).
    let max_epoch = st.volumes.values().map(|v| v.epoch).max().unwrap_or(0);
    st.epoch = st.epoch.max(max_born).max(max_epoch + 1);
    Ok((st, damaged))
}

/// Start a new run on recovered state: checkpoint it whole, so that the journals and the
/// control log start empty under the new run number (and the new placement of shards on
/// `reactors` reactors). What the rings of older runs hold is never replayed again.
pub fn begin_run(
    members: &[Member],
    layout: &Layout,
    st: &mut PoolState,
    maps: &HashMap<(u64, u64), ShardMap>,
    reactors: u32,
) -> Result<(), PoolError> {
    st.run += 1;
    st.gen += 1;
    st.control_seq = 0;
    st.control_next = 0;
    st.reactors = reactors;
    st.region_seq = vec![0; layout.sb.journal_regions as usize];
    let parts = vec![encode_maps(maps.iter().map(|((v, s), m)| (*v, *s, m)))];
    write_checkpoint(members, layout, st, &parts)
}

/// What `salvage` did: the damage it replayed up to, and the images the pool holds after.
#[derive(Debug)]
pub struct Salvage {
    pub damage: Vec<Damage>,
    pub images: usize,
}

/// Open a pool whose metadata is damaged (offline: nothing else may have it open), replay
/// every ring up to its damage, and checkpoint the result, so that it opens normally from
/// now on. What lay beyond the damage is gone; the report says where and how much.
pub fn salvage(specs: &[DeviceSpec]) -> Result<Salvage, PoolError> {
    let (members, sbs) = open_members(specs)?;
    let layout = Layout::new(&sbs);
    let (mut st, damage) = recover(&members, &layout, true)?;
    let maps = std::mem::take(&mut st.maps);
    begin_run(&members, &layout, &mut st, &maps, 1)?;
    Ok(Salvage {
        damage,
        images: st.volumes.len(),
    })
}

/// Apply one journal record of region `region` (which owned shards s with s % n == region)
/// to the maps being recovered.
fn apply_region_record(
    maps: &mut HashMap<(u64, u64), ShardMap>,
    rec: Record,
    cps: usize,
    region: u64,
    n: u64,
) {
    let mine = |img: u64, maps: &HashMap<(u64, u64), ShardMap>| -> Vec<u64> {
        maps.keys()
            .filter(|(i, s)| *i == img && s % n == region)
            .map(|(_, s)| *s)
            .collect()
    };
    match rec {
        Record::Entry {
            vol,
            shard,
            index,
            entry,
        } => {
            if (index as usize) < cps {
                maps.entry((vol, shard as u64))
                    .or_insert_with(|| ShardMap::new(cps))
                    .set(index as usize, entry);
            }
        }
        Record::Freeze { vol, snap, .. } => {
            for s in mine(vol, maps) {
                let m = maps[&(vol, s)].clone();
                maps.insert((snap, s), m);
            }
        }
        Record::Clone { vol, from } => {
            for s in mine(from, maps) {
                let m = maps[&(from, s)].clone();
                maps.insert((vol, s), m);
            }
        }
        Record::Rollback { vol, snap } => {
            for s in mine(vol, maps) {
                maps.remove(&(vol, s));
            }
            for s in mine(snap, maps) {
                let m = maps[&(snap, s)].clone();
                maps.insert((vol, s), m);
            }
        }
        Record::Drop { id } => {
            for s in mine(id, maps) {
                maps.remove(&(id, s));
            }
        }
        Record::VolumeCreate(_)
        | Record::VolumeDelete { .. }
        | Record::VolumeResize { .. }
        | Record::SnapshotCreate(_)
        | Record::SnapshotDelete { .. }
        | Record::CloneInflated { .. }
        | Record::ImageFlags { .. } => {}
    }
}

/// Append one record to the control log (one block, synced) at `seq`.
pub fn append_control(
    m0: &Member,
    layout: &Layout,
    run: u64,
    seq: u64,
    rec: &Record,
) -> Result<(), PoolError> {
    let sb = &layout.sb;
    let blocks = sb.control_bytes / BLOCK;
    let mut enc = Vec::new();
    rec.encode(&mut enc);
    let mut b = AlignedBuf::zeroed(BLOCK as usize);
    // Each block is synced before the next is written: all before it are durable.
    seal_block(b.as_mut_slice(), CONTROL_REGION, seq, run, seq, 1, &enc);
    m0.write_at(sb.control_start + (seq % blocks) * BLOCK, b.as_slice())?;
    m0.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{plan, FormatOptions};
    use crate::map::{Validity, NONE};

    fn entry(phys: u64) -> MapEntry {
        MapEntry {
            phys,
            born: 1,
            parent: NONE,
            valid: Validity::range(0, 4),
            pvalid: Validity::default(),
        }
    }

    #[test]
    fn slot_writer_streams_across_chunks_and_pads_the_end() {
        let disk = crate::media::MemDisk::new(16 << 20, false);
        let m = Member::Mem(disk);
        // Pieces of odd sizes that cross two chunk boundaries; the end is not a block.
        let pieces: Vec<Vec<u8>> = [5usize, SLOT_CHUNK - 3, 7, SLOT_CHUNK + 4090, 1]
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 31 + k * 7) as u8).collect())
            .collect();
        let at = 3 * BLOCK;
        let whole = pieces.concat();
        let padded = whole.len().div_ceil(BLOCK as usize) * BLOCK as usize;
        // Bytes after the payload's last block must stay untouched.
        let tail = AlignedBuf::from_slice(&[0xAB; BLOCK as usize]);
        m.write_at(at + padded as u64, tail.as_slice()).unwrap();
        let mut w = SlotWriter::new(&m, at);
        for p in &pieces {
            w.put(p).unwrap();
        }
        let crc = w.finish().unwrap();
        assert_eq!(crc, crc32c::crc32c(&whole));
        let mut back = AlignedBuf::zeroed(padded + BLOCK as usize);
        m.read_at(at, &mut back).unwrap();
        let b = back.as_slice();
        assert_eq!(&b[..whole.len()], &whole[..]);
        assert!(b[whole.len()..padded].iter().all(|&x| x == 0));
        assert!(b[padded..].iter().all(|&x| x == 0xAB));
    }

    #[test]
    fn checkpoint_maps_round_trip_with_shared_and_diffed_pages() {
        let opts = FormatOptions {
            cluster_size: 4 << 10,
            shard_size: 1 << 20,
            ..Default::default()
        };
        let layout = Layout::new(&plan(&[64 << 20], &opts, [3; 16]).unwrap());
        let cps = layout.clusters_per_shard() as usize;
        let mut live = ShardMap::new(cps);
        for i in 0..cps {
            live.set(i, entry(i as u64 + 100));
        }
        let snap1 = live.clone();
        live.set(5, entry(9_000));
        let snap2 = live.clone();
        live.set(5, MapEntry::UNALLOCATED);
        let bytes = encode_maps([(1, 0, &live), (2, 0, &snap1), (3, 0, &snap2)].into_iter());
        let full = encode_maps([(1, 0, &live)].into_iter()).len();
        assert!(
            bytes.len() < full * 2,
            "copies should be written as differences"
        );
        let mut part = (bytes.len() as u64).to_le_bytes().to_vec();
        part.extend_from_slice(&bytes);
        let mut maps = HashMap::new();
        decode_maps(&part, &layout, &mut maps).expect("decodes");
        for (img, want) in [(1, &live), (2, &snap1), (3, &snap2)] {
            let got = &maps[&(img, 0)];
            for i in 0..cps {
                assert_eq!(got.get(i), want.get(i), "image {img} entry {i}");
            }
        }
        // Pages equal in the source are one shared page after decoding.
        let (a, b) = (&maps[&(1, 0)], &maps[&(2, 0)]);
        let shared = a.pages().zip(b.pages()).filter(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            _ => false,
        });
        assert!(shared.count() > 0);
    }
}
