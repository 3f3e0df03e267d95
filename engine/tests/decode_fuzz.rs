//! Fuzzing of the on-disk decoders (issue 14): superblocks, journal and control-log blocks
//! and checkpoints, fed random bytes and mutated valid encodings whose checksums are left
//! stale or recomputed (a checksum that matches only says the bytes are the ones written,
//! not that their fields make sense). Checked:
//! - decoding and recovery never panic;
//! - no allocation is larger than the region being read (a global allocator records the
//!   largest allocation of the test's thread), so no length field sizes a buffer unchecked;
//! - a mutation under a stale checksum is never accepted: the decoder refuses it, recovery
//!   falls back or stops before it;
//! - valid values round-trip.
//!
//! 256 cases per property in `cargo test` (a few seconds); `TESSEL_FUZZ_CASES=N` runs more
//! and `PROPTEST_RNG_SEED=S` picks the seed (tools/fuzz).

mod common;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::sync::{Arc, Mutex, OnceLock};
use tessel_engine::format::{plan, FormatOptions, Superblock, BLOCK, SB_SIZE};
use tessel_engine::journal::{
    open_block, seal_block, ImageKind, OpenBlock, Record, VolumeRecord, BLOCK_PAYLOAD,
};
use tessel_engine::layout::Layout;
use tessel_engine::map::{MapEntry, ShardMap, Validity, NONE};
use tessel_engine::media::Member;
use tessel_engine::pool::{self, PoolState};
use tessel_engine::{DeviceSpec, MemDisk, PoolError};

/// Cases per property: 256, or `TESSEL_FUZZ_CASES`.
fn fuzz_cases() -> u32 {
    std::env::var("TESSEL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The system allocator, recording the largest allocation each thread asks for.
struct Tracking;

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; only sizes are noted.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Run `f` and return its result with the largest allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

/// Write `value`'s low `width` bytes (little-endian) at `at`, a length or count field's
/// worth of bytes rather than one flipped bit.
#[derive(Clone, Debug)]
struct Mutation {
    at: usize,
    width: usize,
    value: u64,
    /// Where: anywhere (0), in the first 64 bytes: a header's fields (1), or in the 256
    /// bytes after the first block: a checkpoint payload's counts (2).
    zone: u8,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![
        any::<u64>(),
        0..300u64,
        Just(u64::MAX),
        Just(u64::MAX - 4095),
        Just(u32::MAX as u64),
        Just(u16::MAX as u64),
        Just(1 << 31),
        Just(1 << 63),
    ];
    (
        any::<usize>(),
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        value,
        0..3u8,
    )
        .prop_map(|(at, width, value, zone)| Mutation {
            at,
            width,
            value,
            zone,
        })
}

fn apply(bytes: &mut [u8], mutations: &[Mutation]) {
    for m in mutations {
        let block = BLOCK as usize;
        let (start, end) = match m.zone {
            1 => (0, bytes.len().min(64)),
            2 if bytes.len() > block + 8 => (block, bytes.len().min(block + 256)),
            _ => (0, bytes.len()),
        };
        let at = start + m.at % (end - start - m.width + 1);
        bytes[at..at + m.width].copy_from_slice(&m.value.to_le_bytes()[..m.width]);
    }
}

/// Recompute a journal block's checksum (over the block with its checksum field zero).
fn fix_block_crc(block: &mut [u8]) {
    block[4..8].fill(0);
    let crc = crc32c::crc32c(block);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
}

// ---- Superblocks ----

fn planned_superblocks() -> impl Strategy<Value = Vec<Superblock>> {
    (
        proptest::collection::vec(64u64 << 20..=4 << 40, 1..4),
        12u32..=20,
        1u64..=64,
        1u32..=256,
        any::<[u8; 16]>(),
    )
        .prop_filter_map(
            "geometry plan refuses",
            |(sizes, shift, k, regions, uuid)| {
                let opts = FormatOptions {
                    cluster_size: 1 << shift,
                    shard_size: (1u64 << shift) * k * 256,
                    journal_regions: regions,
                    force: false,
                };
                plan(&sizes, &opts, uuid).ok()
            },
        )
}

/// What a decoded superblock feeds: the layout and the geometry questions asked of it.
fn use_geometry(sb: &Superblock) {
    let layout = Layout::new(std::slice::from_ref(sb));
    let _ = (
        layout.clusters_per_shard(),
        layout.blocks_per_cluster(),
        layout.grain(),
        layout.shards_for(u64::MAX),
        layout.shard_of(u64::MAX),
        sb.data_bytes(),
    );
}

/// A small pool on an in-memory disk, for recovery from mutated metadata.
struct Fixture {
    disk: Arc<MemDisk>,
    sb: Superblock,
    /// Pristine copies of what the cases mutate: (offset, bytes).
    checkpoint: (u64, Vec<u8>),
    control: (u64, Vec<u8>),
    journal: (u64, Vec<u8>),
    /// Control-log blocks written, one volume created by each (ids `CONTROL_IDS + k`).
    control_blocks: u64,
    journal_blocks: u64,
    /// Serialises the cases of the properties that share the disk.
    lock: Mutex<()>,
}

const DISK: u64 = 40 << 20;
const RUN: u64 = 0x5eed;
const VOL: u64 = 1;
const SNAP: u64 = 2;
const CONTROL_IDS: u64 = 10;
/// Journal block j maps VOL's cluster `JOURNAL_INDEX + j` to cluster `JOURNAL_PHYS + j`.
const JOURNAL_INDEX: u64 = 16;
const JOURNAL_PHYS: u64 = 200;

fn volume(id: u64, name: &str, kind: ImageKind, of: u64) -> VolumeRecord {
    VolumeRecord {
        id,
        name: name.to_string(),
        size: 4 << 20,
        block_size: 4096,
        created_unix: 1_700_000_000,
        kind,
        of,
        epoch: 3,
        flags: 0,
    }
}

fn mapped(phys: u64) -> MapEntry {
    MapEntry {
        phys,
        born: 2,
        parent: NONE,
        valid: Validity(0xf),
        pvalid: Validity(0),
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let disk = MemDisk::new(DISK, false);
        let spec = [DeviceSpec::Mem(disk.clone())];
        let opts = FormatOptions {
            cluster_size: 16 << 10,
            shard_size: 1 << 20,
            journal_regions: 2,
            force: false,
        };
        let sb = pool::format(&spec, &opts).expect("format");
        let layout = Layout::new(std::slice::from_ref(&sb));
        let members = vec![Member::open(&spec[0]).unwrap()];
        // A checkpoint (generation 2, slot 0) of a volume with a snapshot that shares its
        // pages, then control-log and journal blocks after it.
        let cps = layout.clusters_per_shard() as usize;
        let mut live = ShardMap::new(cps);
        for i in 0..8 {
            live.set(i, mapped(100 + i as u64));
        }
        let snap = live.clone();
        live.set(40, mapped(150));
        let mut other = ShardMap::new(cps);
        other.set(3, mapped(160));
        let part =
            pool::encode_maps([(VOL, 0, &live), (SNAP, 0, &snap), (VOL, 1, &other)].into_iter());
        let mut st = PoolState {
            run: RUN,
            gen: 2,
            next_volume_id: 3,
            epoch: 5,
            reactors: 2,
            region_seq: vec![0, 0],
            ..Default::default()
        };
        st.volumes
            .insert(VOL, volume(VOL, "vol", ImageKind::Volume, NONE));
        st.volumes
            .insert(SNAP, volume(SNAP, "snap", ImageKind::Snapshot, VOL));
        pool::write_checkpoint(&members, &layout, &st, &[part]).expect("checkpoint");
        let control_records = [
            Record::VolumeCreate(volume(CONTROL_IDS, "c0", ImageKind::Volume, NONE)),
            Record::SnapshotCreate(volume(CONTROL_IDS + 1, "c1", ImageKind::Snapshot, VOL)),
            Record::VolumeCreate(volume(CONTROL_IDS + 2, "c2", ImageKind::Volume, SNAP)),
            Record::CloneInflated {
                id: CONTROL_IDS + 2,
            },
            Record::VolumeResize {
                id: CONTROL_IDS,
                size: 8 << 20,
            },
            Record::VolumeCreate(volume(CONTROL_IDS + 5, "c5", ImageKind::Volume, NONE)),
        ];
        for (seq, rec) in control_records.iter().enumerate() {
            pool::append_control(&members[0], &layout, RUN, seq as u64, rec).expect("control");
        }
        let journal_blocks = 5u64;
        for j in 0..journal_blocks {
            let mut records = Vec::new();
            Record::Entry {
                vol: VOL,
                shard: 0,
                index: (JOURNAL_INDEX + j) as u32,
                entry: mapped(JOURNAL_PHYS + j),
            }
            .encode(&mut records);
            let mut block = vec![0u8; BLOCK as usize];
            seal_block(&mut block, 0, j, RUN, j, 1, &records);
            disk.write(sb.journal_start + j * BLOCK, &block);
        }
        disk.flush();
        let copy = |off: u64, len: u64| {
            let mut b = vec![0u8; len as usize];
            disk.read(off, &mut b);
            (off, b)
        };
        let mut head = [0u8; 48];
        disk.read(sb.ckpt_start, &mut head);
        let payload = u64::from_le_bytes(head[40..48].try_into().unwrap());
        let fixture = Fixture {
            checkpoint: copy(sb.ckpt_start, BLOCK + payload),
            control: copy(sb.control_start, control_records.len() as u64 * BLOCK),
            journal: copy(sb.journal_start, journal_blocks * BLOCK),
            control_blocks: control_records.len() as u64,
            journal_blocks,
            disk,
            sb,
            lock: Mutex::new(()),
        };
        // The pristine pool recovers everything written.
        let st = fixture.recover().expect("pristine pool recovers");
        assert_eq!(st.gen, 2);
        assert_eq!(st.volumes.len(), 6, "{:?}", st.volumes.keys());
        assert_eq!(
            st.maps[&(VOL, 0)].get(JOURNAL_INDEX as usize + 4).phys,
            JOURNAL_PHYS + 4
        );
        fixture
    })
}

impl Fixture {
    fn restore(&self) {
        for (off, bytes) in [&self.checkpoint, &self.control, &self.journal] {
            self.disk.write(*off, bytes);
        }
        let sb = self.sb.encode();
        self.disk.write(0, &sb);
        self.disk.write(SB_SIZE as u64, &sb);
    }

    fn recover(&self) -> Result<PoolState, PoolError> {
        let (members, sbs) = pool::open_members(&[DeviceSpec::Mem(self.disk.clone())])?;
        let layout = Layout::new(&sbs);
        pool::recover(&members, &layout, false).map(|(st, _)| st)
    }

    /// Recover under the allocation tracker: no allocation may exceed the disk.
    fn recover_bounded(&self) -> Result<PoolState, PoolError> {
        let (r, largest) = largest_allocation(|| self.recover());
        assert!(
            largest <= DISK as usize,
            "recovery allocated {largest} bytes at once from a {DISK}-byte pool"
        );
        r
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    #[test]
    fn superblocks_of_any_planned_pool_round_trip(sbs in planned_superblocks()) {
        let _w = common::watchdog();
        for sb in sbs {
            prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        }
    }

    #[test]
    fn random_bytes_never_decode_as_a_superblock_or_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), SB_SIZE),
        magic in any::<bool>(),
    ) {
        if magic {
            bytes[..8].copy_from_slice(b"TESSELPL");
        }
        let (r, largest) = largest_allocation(|| Superblock::decode(&bytes));
        prop_assert!(r.is_err(), "random bytes decoded as {:?}", r);
        prop_assert!(largest <= SB_SIZE, "decode allocated {} bytes", largest);
    }

    /// A mutated superblock under its old checksum is refused; one whose checksum was
    /// recomputed either is refused or describes a geometry that layout, open and recovery
    /// use without panicking or allocating past the device.
    #[test]
    fn mutated_superblocks_are_refused_or_safe_to_open(
        mutations in proptest::collection::vec(mutation(), 1..4),
        fix_crc in any::<bool>(),
    ) {
        let _w = common::watchdog();
        let f = fixture();
        let _one = f.lock.lock().unwrap_or_else(|p| p.into_inner());
        f.restore();
        let good = f.sb.encode();
        let mut bytes = good;
        // The checksum itself is not a target: recomputed or not, it covers the rest.
        apply(&mut bytes[..SB_SIZE - 4], &mutations);
        if fix_crc {
            let crc = crc32c::crc32c(&bytes[..SB_SIZE - 4]);
            bytes[SB_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        }
        let decoded = Superblock::decode(&bytes);
        if !fix_crc && bytes != good {
            prop_assert!(decoded.is_err(), "accepted under a stale checksum: {:?}", decoded);
        }
        if let Ok(sb) = &decoded {
            use_geometry(sb);
        }
        // Both copies replaced: the fallback copy cannot hide what the primary holds.
        f.disk.write(0, &bytes);
        f.disk.write(SB_SIZE as u64, &bytes);
        let _ = f.recover_bounded();
    }

    #[test]
    fn journal_blocks_round_trip_any_records(
        records in proptest::collection::vec(record(), 0..200),
        region in any::<u32>(),
        seq in any::<u64>(),
        run in any::<u64>(),
        durable in any::<u64>(),
    ) {
        let (records, bytes) = pack(records);
        let mut block = vec![0u8; BLOCK as usize];
        seal_block(&mut block, region, seq, run, durable, records.len() as u16, &bytes);
        prop_assert_eq!(
            open_block(&block, run, seq),
            Some(OpenBlock { records, durable })
        );
        prop_assert_eq!(open_block(&block, run, seq.wrapping_add(1)), None);
        prop_assert_eq!(open_block(&block, run.wrapping_add(1), seq), None);
    }

    /// Random bytes, checksummed or not, with or without the magic: no panic, and no
    /// allocation beyond a small multiple of the block (the record count is checked
    /// against the bytes that hold the records before it sizes anything).
    #[test]
    fn journal_blocks_of_random_bytes_open_without_panic_or_large_allocation(
        mut block in proptest::collection::vec(any::<u8>(), BLOCK as usize),
        magic in any::<bool>(),
        fix_crc in any::<bool>(),
        fits in any::<bool>(),
    ) {
        if magic {
            block[..4].copy_from_slice(b"TJNL");
        }
        if fits {
            // A record length the header check lets through, so the records get parsed.
            let used = u16::from_le_bytes(block[14..16].try_into().unwrap());
            let used = used % (BLOCK_PAYLOAD as u16 + 1);
            block[14..16].copy_from_slice(&used.to_le_bytes());
        }
        if fix_crc {
            fix_block_crc(&mut block);
        }
        // The block's own run and sequence: the expected ones, as at replay.
        let seq = u64::from_le_bytes(block[16..24].try_into().unwrap());
        let run = u64::from_le_bytes(block[24..32].try_into().unwrap());
        let (opened, largest) = largest_allocation(|| open_block(&block, run, seq));
        prop_assert!(largest <= 64 << 10, "open_block allocated {} bytes", largest);
        if !(magic && fix_crc) {
            prop_assert!(opened.is_none(), "opened without magic or checksum: {:?}", opened);
        }
    }

    #[test]
    fn mutated_journal_blocks_are_refused_unless_their_checksum_matches(
        records in proptest::collection::vec(record(), 1..60),
        mutations in proptest::collection::vec(mutation(), 1..4),
        fix_crc in any::<bool>(),
    ) {
        let (records, bytes) = pack(records);
        let mut good = vec![0u8; BLOCK as usize];
        seal_block(&mut good, 3, 7, RUN, 7, records.len() as u16, &bytes);
        let mut block = good.clone();
        apply(&mut block, &mutations);
        if fix_crc {
            fix_block_crc(&mut block);
        }
        let (opened, largest) = largest_allocation(|| open_block(&block, RUN, 7));
        prop_assert!(largest <= 64 << 10, "open_block allocated {} bytes", largest);
        if !fix_crc && block != good {
            prop_assert!(opened.is_none(), "accepted under a stale checksum: {:?}", opened);
        }
    }

    /// The checkpoint (header and payload), the control log and a journal region of a
    /// small pool, mutated: recovery never panics nor allocates past the pool; under a
    /// stale checksum it falls back to the older checkpoint, or applies only the blocks
    /// before the first mutated one (or refuses to open).
    #[test]
    fn recovery_from_mutated_metadata_never_panics_nor_trusts_a_stale_checksum(
        target in 0..3u8,
        mutations in proptest::collection::vec(mutation(), 1..4),
        fix_crc in any::<bool>(),
    ) {
        check_recovery(target, |b| apply(b, &mutations), fix_crc)?;
    }
}

/// Cases the fuzzer found, each failing before its fix: a checkpoint length near 2^64
/// wrapped past the slot check and sized a buffer (a panic); a map page count of 2^32 - 1
/// reserved 32 GiB before a page was read (an abort).
#[test]
fn checkpoints_with_huge_lengths_or_counts_are_refused_without_allocating_them() {
    let f = fixture();
    let len_field = 40..48;
    check_recovery(0, |b| b[len_field].fill(0xff), true).unwrap();
    // The page count follows the payload's head: four u64, the two regions' sequence
    // numbers, the checkpoint's two volumes, the maps' length and the part's length.
    let volumes: usize = [
        volume(VOL, "vol", ImageKind::Volume, NONE),
        volume(SNAP, "snap", ImageKind::Snapshot, VOL),
    ]
    .into_iter()
    .map(|v| {
        let mut b = Vec::new();
        Record::VolumeCreate(v).encode(&mut b);
        b.len() - 1
    })
    .sum();
    let at = BLOCK as usize + 32 + 4 + 8 * 2 + 4 + volumes + 8 + 8;
    let npages = u32::from_le_bytes(f.checkpoint.1[at..at + 4].try_into().unwrap());
    assert_eq!(npages, 3, "the fixture's checkpoint holds three map pages");
    check_recovery(0, |b| b[at..at + 4].fill(0xff), true).unwrap();
}

/// Mutate one of the fixture's metadata areas (0: checkpoint, 1: control log, 2: journal
/// region 0), recompute its checksums or not, and recover.
fn check_recovery(
    target: u8,
    mutate: impl FnOnce(&mut [u8]),
    fix_crc: bool,
) -> Result<(), TestCaseError> {
    let _w = common::watchdog();
    let f = fixture();
    let _one = f.lock.lock().unwrap_or_else(|p| p.into_inner());
    f.restore();
    let (off, good) = match target {
        0 => &f.checkpoint,
        1 => &f.control,
        _ => &f.journal,
    };
    let mut bytes = good.clone();
    mutate(&mut bytes);
    if fix_crc {
        match target {
            0 => fix_checkpoint_crcs(&f.sb, &mut bytes),
            _ => bytes.chunks_mut(BLOCK as usize).for_each(fix_block_crc),
        }
    }
    f.disk.write(*off, &bytes);
    let result = f.recover_bounded();
    let changed = good != &bytes;
    if fix_crc || !changed {
        return Ok(());
    }
    let Ok(st) = result else { return Ok(()) };
    // The first block that no longer matches.
    let first_bad = bytes
        .chunks(BLOCK as usize)
        .zip(good.chunks(BLOCK as usize))
        .position(|(b, g)| b != g)
        .expect("a changed block") as u64;
    match target {
        0 => prop_assert_eq!(st.gen, 1, "a checkpoint with a stale checksum was loaded"),
        1 => {
            for k in first_bad..f.control_blocks {
                prop_assert!(
                    !control_block_applied(&st, k),
                    "control block {} applied after block {} went bad",
                    k,
                    first_bad
                );
            }
        }
        _ => {
            let map = &st.maps[&(VOL, 0)];
            for j in first_bad..f.journal_blocks {
                prop_assert!(
                    map.get((JOURNAL_INDEX + j) as usize).phys != JOURNAL_PHYS + j,
                    "journal block {} applied after block {} went bad",
                    j,
                    first_bad
                );
            }
        }
    }
    Ok(())
}

/// Does the recovered state show the effect of the fixture's control-log block `k`?
fn control_block_applied(st: &PoolState, k: u64) -> bool {
    let v = |id: u64| st.volumes.get(&id);
    match k {
        3 => v(CONTROL_IDS + 2).is_some_and(|c| c.of == NONE),
        4 => v(CONTROL_IDS).is_some_and(|c| c.size == 8 << 20),
        _ => v(CONTROL_IDS + k).is_some(),
    }
}

/// Recompute a checkpoint's payload checksum (over the length its header now says, when
/// that fits the slot) and its header checksum.
fn fix_checkpoint_crcs(sb: &Superblock, bytes: &mut [u8]) {
    let len = u64::from_le_bytes(bytes[40..48].try_into().unwrap());
    if len
        .checked_add(BLOCK)
        .is_some_and(|end| end <= sb.ckpt_slot_bytes)
    {
        // Bytes past what the fixture copied are the slot's zeros.
        let mut payload = bytes[BLOCK as usize..].to_vec();
        payload.resize(len as usize, 0);
        let crc = crc32c::crc32c(&payload);
        bytes[48..52].copy_from_slice(&crc.to_le_bytes());
    }
    bytes[4..8].fill(0);
    let crc = crc32c::crc32c(&bytes[..BLOCK as usize]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Records that fit one block, in order, and their encoding.
fn pack(records: Vec<Record>) -> (Vec<Record>, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut kept = Vec::new();
    for r in records {
        let mut one = Vec::new();
        r.encode(&mut one);
        if bytes.len() + one.len() > BLOCK_PAYLOAD {
            break;
        }
        bytes.extend_from_slice(&one);
        kept.push(r);
    }
    (kept, bytes)
}

fn entry() -> impl Strategy<Value = MapEntry> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(phys, born, parent, valid, pvalid)| MapEntry {
            phys,
            born,
            parent,
            valid: Validity(valid),
            pvalid: Validity(pvalid),
        })
}

fn volume_record() -> impl Strategy<Value = VolumeRecord> {
    (
        any::<u64>(),
        ".{0,70}",
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        0u8..4,
    )
        .prop_map(
            |(id, name, size, block_size, created_unix, snap, of, epoch, flags)| VolumeRecord {
                id,
                name,
                size,
                block_size,
                created_unix,
                kind: if snap {
                    ImageKind::Snapshot
                } else {
                    ImageKind::Volume
                },
                of,
                epoch,
                flags,
            },
        )
}

fn record() -> impl Strategy<Value = Record> {
    let id = any::<u64>();
    prop_oneof![
        4 => (any::<u64>(), any::<u32>(), any::<u32>(), entry()).prop_map(
            |(vol, shard, index, entry)| Record::Entry { vol, shard, index, entry }
        ),
        1 => volume_record().prop_map(Record::VolumeCreate),
        1 => id.prop_map(|id| Record::VolumeDelete { id }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(id, size)| Record::VolumeResize { id, size }),
        1 => volume_record().prop_map(Record::SnapshotCreate),
        1 => id.prop_map(|id| Record::SnapshotDelete { id }),
        1 => id.prop_map(|id| Record::CloneInflated { id }),
        1 => (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(vol, snap, epoch)| Record::Freeze { vol, snap, epoch }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(vol, from)| Record::Clone { vol, from }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(vol, snap)| Record::Rollback { vol, snap }),
        1 => id.prop_map(|id| Record::Drop { id }),
        1 => (any::<u64>(), 0u8..4).prop_map(|(id, flags)| Record::ImageFlags { id, flags }),
    ]
}
